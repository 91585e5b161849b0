// CUDA implementation of gptfast::sample: the torch side of the launcher. The kernels
// are in sampling_kernel.cuh (one block per row) and sampling_cluster.cuh (a cluster of
// blocks per row); sampling_launch.cuh picks one and launches it (plain CUDA, all three
// compile-checkable without torch).
//
// GPTFAST_SAMPLE_CLUSTER (read once per process): unset or "auto" lets the launcher
// choose; 0 or 1: always one block per row; 2, 4 or 8: that many blocks per row wherever
// the cluster kernel can run (else one block per row). For A/B runs and as a fallback.
#ifdef GPTFAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "sampling_launch.cuh"

namespace gptfast {

// Defined in sampling.cpp.
void check_sample_inputs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& keys);

namespace {

constexpr const char* kClusterEnv = "GPTFAST_SAMPLE_CLUSTER";

// GPTFAST_SAMPLE_CLUSTER as a request: 0 choose, 1 one block, 2/4/8 that cluster size;
// -1 when the value is not one of those (an error at every call, naming the value).
struct EnvRequest {
  int request;
  std::string raw;
};

const EnvRequest& env_request() {
  static const EnvRequest value = [] {
    const char* v = std::getenv(kClusterEnv);
    const std::string raw = v ? v : "";
    if (raw.empty() || raw == "auto") return EnvRequest{0, raw};
    if (raw == "0" || raw == "1") return EnvRequest{1, raw};
    if (raw == "2" || raw == "4" || raw == "8") return EnvRequest{raw[0] - '0', raw};
    return EnvRequest{-1, raw};
  }();
  return value;
}

// Blocks per row for these logits. strict: a requested cluster size that cannot run
// here is an error (the test op); otherwise it falls back to one block per row.
template <typename cuda_t>
int blocks_for(const at::Tensor& logits, int request, bool strict) {
  if (request == 1) return 1;
  const int64_t B = logits.size(0), V = logits.size(1);
  const ClusterCaps& caps = cluster_caps<cuda_t>(logits.get_device());
  if (request >= 2 && !cluster_possible(caps, request, B, V)) {
    TORCH_CHECK(!strict, "gptfast::sample: ", request, " blocks per row cannot run here (needs sm_90 device code, "
                "a device with cluster launch, ceil(V/", request, ")*4 bytes of shared memory per block and B*",
                request, " < 2^31 blocks); got B=", B, ", V=", V);
    return 1;
  }
  return blocks_per_row(caps, request, B, V);
}

template <typename scalar_t, typename cuda_t>
void launch(const at::Tensor& logits, const at::Tensor& t, const at::Tensor& k, const at::Tensor& p,
            const at::Tensor& m, const at::Tensor& key, at::Tensor& tokens, at::Tensor& probs, bool return_probs,
            int request, bool strict, cudaStream_t stream) {
  const SampleArgs<cuda_t> a{reinterpret_cast<const cuda_t*>(logits.const_data_ptr<scalar_t>()),
                             logits.stride(0),
                             logits.size(0),
                             static_cast<int>(logits.size(1)),
                             t.const_data_ptr<float>(),
                             k.const_data_ptr<int64_t>(),
                             p.const_data_ptr<float>(),
                             m.const_data_ptr<float>(),
                             key.const_data_ptr<int64_t>(),
                             tokens.mutable_data_ptr<int64_t>(),
                             return_probs ? probs.mutable_data_ptr<float>() : nullptr};
  const int C = blocks_for<cuda_t>(logits, request, strict);
  cudaError_t err = launch_sample(a, C, stream);
  if (err != cudaSuccess && C != 1 && !strict) {
    // A cluster launch the device refused (MPS or a green context limiting SMs, say): the
    // one-block kernel gives the same tokens.
    TORCH_WARN_ONCE("gptfast::sample: the ", C, "-block cluster launch failed (", cudaGetErrorString(err),
                    "); sampling with one block per row");
    err = launch_sample(a, 1, stream);
  }
  C10_CUDA_CHECK(err);
}

// Explicit cases, not AT_DISPATCH: float64 is rejected by check_sample_inputs and must
// not instantiate the kernels.
template <typename F>
auto dispatch_dtype(const at::Tensor& logits, F&& f) {
  switch (logits.scalar_type()) {
    case at::kHalf: return f(at::Half{}, __half{});
    case at::kBFloat16: return f(at::BFloat16{}, __nv_bfloat16{});
    default: break;
  }
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "gptfast::sample: unsupported logits dtype ", logits.scalar_type());
  return f(float{}, float{});
}

std::tuple<at::Tensor, at::Tensor> sample_cuda_impl(const at::Tensor& logits_in, const at::Tensor& temperature,
                                                    const at::Tensor& top_k, const at::Tensor& top_p,
                                                    const at::Tensor& min_p, const at::Tensor& keys,
                                                    bool return_probs, int request, bool strict) {
  check_sample_inputs(logits_in, temperature, top_k, top_p, min_p, keys);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  // Rows may be strided (a slice of [B, T, V] logits); the vocab dimension must be dense.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const at::Tensor m = min_p.contiguous(), key = keys.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor probs = return_probs ? at::empty({B, V}, logits.options().dtype(at::kFloat))
                                  : at::empty({0}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, probs};
  TORCH_CHECK(B <= 2147483647, "gptfast::sample: batch must be < 2^31, got ", B);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(logits, [&](auto scalar, auto cuda) {
    launch<decltype(scalar), decltype(cuda)>(logits, t, k, p, m, key, tokens, probs, return_probs, request, strict,
                                             stream);
  });
  return {tokens, probs};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               const at::Tensor& min_p, const at::Tensor& keys,
                                               bool return_probs) {
  const EnvRequest& env = env_request();
  TORCH_CHECK(env.request >= 0, kClusterEnv, " must be auto, 0, 1, 2, 4 or 8, got '", env.raw, "'");
  return sample_cuda_impl(logits, temperature, top_k, top_p, min_p, keys, return_probs, env.request, false);
}

// Test-only: gptfast::sample with the blocks per row given (0 choose, ignoring the
// environment; 1 one block; 2, 4, 8 that cluster size, an error where it cannot run).
std::tuple<at::Tensor, at::Tensor> sample_with_cluster_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                            const at::Tensor& top_k, const at::Tensor& top_p,
                                                            const at::Tensor& min_p, const at::Tensor& keys,
                                                            bool return_probs, int64_t cluster) {
  TORCH_CHECK(cluster == 0 || cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8,
              "gptfast::_sample_with_cluster: cluster must be 0 (choose), 1, 2, 4 or 8, got ", cluster);
  return sample_cuda_impl(logits, temperature, top_k, top_p, min_p, keys, return_probs, static_cast<int>(cluster),
                          true);
}

// Blocks per row gptfast::sample uses for logits of this shape, dtype and device (the
// environment included): 1 is the one-block kernel. For tests and benchmarks.
int64_t sample_blocks_per_row_cuda(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) > 0 && logits.size(1) > 0 && logits.size(1) <= kMaxVocab,
              "gptfast::_sample_blocks_per_row: logits must be non-empty 2-D [B, V] with V <= 2^31 - 2^16, got shape ",
              logits.sizes());
  const EnvRequest& env = env_request();
  TORCH_CHECK(env.request >= 0, kClusterEnv, " must be auto, 0, 1, 2, 4 or 8, got '", env.raw, "'");
  const c10::cuda::CUDAGuard guard(logits.device());
  return dispatch_dtype(logits, [&](auto, auto cuda) { return blocks_for<decltype(cuda)>(logits, env.request, false); });
}

// Private ops, CUDA builds only; the public schema is in sampling.cpp.
TORCH_LIBRARY_FRAGMENT(gptfast, lib) {
  lib.def(
      "_sample_with_cluster(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor keys, bool return_probs, int cluster) -> (Tensor, Tensor)");
  lib.def("_sample_blocks_per_row(Tensor logits) -> int");
}

TORCH_LIBRARY_IMPL(gptfast, CUDA, lib) {
  lib.impl("sample", &sample_cuda);
  lib.impl("_sample_with_cluster", &sample_with_cluster_cuda);
  lib.impl("_sample_blocks_per_row", &sample_blocks_per_row_cuda);
}

}  // namespace gptfast
#endif  // GPTFAST_WITH_CUDA
