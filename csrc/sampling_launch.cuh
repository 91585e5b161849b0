// Host side of the CUDA sampler: picks one block per row (sample_kernel) or a cluster
// of C blocks per row (sample_cluster_kernel) and launches it. Plain CUDA runtime, no
// torch, so it compile-checks with nvcc alone; sampling_cuda.cu wraps it for torch.
//
// No host sync and nothing that depends on tensor values: the choice depends on B, V,
// the dtype and the device, so a captured CUDA graph replays the same launch. The
// per-device facts (does the loaded kernel binary have the cluster code, how many
// clusters fit at once, how much shared memory a block may have) are queried once per
// device and dtype and cached.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "sampling_cluster.cuh"
#include "sampling_kernel.cuh"

namespace gptfast {

// Arguments of one launch; pointers as in sample_kernel.
template <typename T>
struct SampleArgs {
  const T* logits;
  int64_t row_stride;
  int64_t B;
  int V;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* keys;
  int64_t* tokens;
  float* probs;  // nullptr unless return_probs
};

constexpr int kClusterSizes[3] = {2, 4, 8};  // portable cluster sizes; index = log2(C) - 1

// What a device offers the cluster kernel for one dtype, per cluster size.
struct ClusterCaps {
  int max_clusters[3] = {0, 0, 0};        // clusters that can be resident at once; 0: path unavailable
  int64_t max_dyn_smem[3] = {0, 0, 0};    // bytes of dynamic shared memory a block may use
};

// Launch configuration of sample_cluster_kernel: `rows` clusters of C blocks of kThreads
// threads, `dyn_smem` bytes of dynamic shared memory each. `attr` (the cluster-dimension
// attribute the config points to) must outlive the config's use.
inline cudaLaunchConfig_t cluster_launch_config(int C, int64_t rows, size_t dyn_smem, cudaStream_t stream,
                                                cudaLaunchAttribute& attr) {
  attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = C;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * C));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = dyn_smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Fills caps[i] for C blocks per row on `device` (the current device). false: a query
// failed (not cached, so the next call asks again); true: caps[i] holds the answer.
template <typename T, int C>
bool query_cluster_caps(int device, int i, ClusterCaps& caps) {
  auto kernel = sample_cluster_kernel<T, C>;
  cudaFuncAttributes fa{};
  int cluster_launch = 0, optin = 0;
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess ||
      cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for the launch check
    return false;
  }
  // The code the runtime loaded for this device must come from compute_90 or newer: an
  // sm_80 build (or compute_80 PTX JIT-compiled for an H100) has only the __trap stub.
  if (!cluster_launch || fa.ptxVersion < 90 || fa.binaryVersion < 90) return true;
  const int64_t dyn = static_cast<int64_t>(optin) - static_cast<int64_t>(fa.sharedSizeBytes);
  if (dyn <= 0 || cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)) !=
                      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // Resident clusters at the largest shared-memory size: the fewest, so a batch that
  // passes this test never needs a second wave.
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch_config(C, 1, static_cast<size_t>(dyn), nullptr, attr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  caps.max_clusters[i] = clusters;
  caps.max_dyn_smem[i] = dyn;
  return true;
}

// The caps of the current device (the caller has made `device` current), queried once
// (until a query succeeds: a failed one gives no cluster path for that call only).
template <typename T>
const ClusterCaps& cluster_caps(int device) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static ClusterCaps caps[kMaxDevices];
  static bool done[kMaxDevices] = {};
  static const ClusterCaps none;
  if (device < 0 || device >= kMaxDevices) return none;
  std::lock_guard<std::mutex> lock(mu);
  if (!done[device]) {
    ClusterCaps found;
    const bool ok = query_cluster_caps<T, 2>(device, 0, found) & query_cluster_caps<T, 4>(device, 1, found) &
                    query_cluster_caps<T, 8>(device, 2, found);
    if (!ok) return none;  // one block per row this time; asked again next time
    caps[device] = found;
    done[device] = true;
  }
  return caps[device];
}

inline int cluster_index(int C) { return C == 2 ? 0 : C == 4 ? 1 : C == 8 ? 2 : -1; }

// Whether C blocks per row can run these shapes here: the cluster code is loaded, a
// cluster fits the device, the slice fits shared memory, the grid fits.
inline bool cluster_possible(const ClusterCaps& caps, int C, int64_t B, int64_t V) {
  const int i = cluster_index(C);
  if (i < 0 || caps.max_clusters[i] <= 0) return false;
  const int64_t slice_bytes = (V + C - 1) / C * static_cast<int64_t>(sizeof(float));
  return slice_bytes <= caps.max_dyn_smem[i] && B * C <= 2147483647;
}

// Blocks per row. request: 0 = choose, 1 = one block, 2/4/8 = that cluster size
// (callers check cluster_possible first). Choosing: the largest C whose clusters for all
// B rows are resident at once (one wave) and which leaves every block >= kThreads
// tokens; else one block per row.
inline int blocks_per_row(const ClusterCaps& caps, int request, int64_t B, int64_t V) {
  if (request != 0) return request;
  for (int i = 2; i >= 0; --i) {
    const int C = kClusterSizes[i];
    if (B <= caps.max_clusters[i] && V >= static_cast<int64_t>(C) * kThreads && cluster_possible(caps, C, B, V))
      return C;
  }
  return 1;
}

template <typename T, int C>
cudaError_t launch_cluster(const SampleArgs<T>& a, cudaStream_t stream) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch_config(
      C, a.B, static_cast<size_t>((static_cast<int64_t>(a.V) + C - 1) / C) * sizeof(float), stream, attr);
  const cudaError_t err = cudaLaunchKernelEx(&cfg, sample_cluster_kernel<T, C>, a.logits, a.row_stride, a.V,
                                             a.temperature, a.top_k, a.top_p, a.min_p, a.keys, a.tokens, a.probs);
  if (err != cudaSuccess) cudaGetLastError();  // returned here: clear it so that later checks do not see it again
  return err;
}

// Launches C blocks per row (1: the one-block kernel). C != 1 must have passed
// cluster_possible for this device (which also set the kernel's shared-memory limit).
template <typename T>
cudaError_t launch_sample(const SampleArgs<T>& a, int C, cudaStream_t stream) {
  switch (C) {
    case 2: return launch_cluster<T, 2>(a, stream);
    case 4: return launch_cluster<T, 4>(a, stream);
    case 8: return launch_cluster<T, 8>(a, stream);
    default:
      sample_kernel<T><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
          a.logits, a.row_stride, a.V, a.temperature, a.top_k, a.top_p, a.min_p, a.keys, a.tokens, a.probs);
      return cudaGetLastError();
  }
}

}  // namespace gptfast
