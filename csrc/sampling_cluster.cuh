// CUDA sampling kernel for small batches: a cluster of C blocks per row (sm_90).
// Same algorithm and results as sample_kernel (sampling_kernel.cuh), split over C SMs:
// block `rank` of a row's cluster owns the contiguous slice [rank * ceil(V/C), ...) of
// the row, reads it from global memory once into shared memory (x = logits / t), and
// every later pass runs on that copy. Plain CUDA, compile-checkable with nvcc alone.
//
// Every row-wide quantity is combined across the cluster through distributed shared
// memory (DSMEM), one cluster barrier per step ("phase"):
//   - argmax and the draw: each block stores its (value, index) partial into slot
//     [rank] of every block's array; after the barrier each block combines the C
//     partials locally. better() is a total order, so the winner is the one-block one.
//   - radix histograms: each block builds its histogram locally, then adds its
//     non-zero bins into the owner block's combined copy (bins are split into C
//     segments, block q owns segment q) and the per-warp sums of 32 bins into every
//     block's per-segment totals (integer atomics on DSMEM: exact and
//     order-independent). After the barrier every block finds the segment holding the
//     cutoff from its local totals and scans that segment in the owner's shared
//     memory: all blocks reach the same digit without a second barrier.
//   - the kept mass (return_probs): fixed-point partials, summed like the argmax.
// The combined bins and segment totals are triple-buffered by phase p (p % 3): phase p
// adds into buffer p % 3 before barrier p and the blocks read it between barriers p and
// p + 1; each block zeroes its buffer (p + 1) % 3 during phase p, after the last
// readers of its previous use (phase p - 2, done before barrier p - 1) and before the
// first writers of its next use (after barrier p).
//
// DSMEM rules kept here: the first remote access follows a cluster barrier (all blocks
// of the cluster have started); every block passes every barrier (the sequence of
// barriers depends only on the row's parameters and on cluster-wide results, which all
// blocks compute identically); no block exits while another may still access its
// shared memory (the last remote access of a path precedes its last barrier).
//
// Phases (barriers) per row: greedy 1; top-k 3 + draw 1; top-p 4 + draw 1; both 6 + draw 1.
#pragma once
#include <cooperative_groups.h>

#include "sampling_kernel.cuh"

namespace gptfast {

constexpr int kLoadUnroll = 8;  // loads in flight per thread in the one pass over global memory

template <int C>
struct ClusterShared {
  static constexpr int kSeg = kBins / C;  // bins per segment (largest digit)
  unsigned long long hist[kBins];           // this block's histogram of the current digit
  unsigned long long comb[3][kSeg];         // segment `rank` summed over the cluster, by phase % 3
  unsigned long long seg[3][C];             // every segment's total over the cluster, by phase % 3
  float red_f[kWarps];
  int red_i[kWarps];
  unsigned long long red_u[kWarps];
  // partials of every block of the cluster, written remotely into slot [rank]
  float arg_v[2][C];  // [0] row max, [1] draw
  int arg_i[2][C];
  unsigned long long kept[C];
  int kept_nan[C];
  // radix state, written by warp 0 and read by all after a barrier
  uint32_t prefix;
  unsigned long long above;
  float max_x;
  int argmax;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// Ends phase p: zeroes this block's buffers of phase p + 1 (see the top), then the
// cluster barrier (release/acquire: the DSMEM atomics and stores of phase p are
// visible after it). Returns the buffer index of phase p, for its readers, and
// advances p. Called by every thread of every block of the cluster.
template <int C>
__device__ __forceinline__ int end_phase(ClusterShared<C>& s, int& phase) {
  const int next = (phase + 1) % 3;
  for (int i = threadIdx.x; i < ClusterShared<C>::kSeg; i += kThreads) s.comb[next][i] = 0ull;
  if (threadIdx.x < C) s.seg[next][threadIdx.x] = 0ull;
  cooperative_groups::this_cluster().sync();
  const int buf = phase % 3;
  ++phase;
  return buf;
}

// Adds this block's histogram (nbins, complete and block-synced) into the cluster's
// buffer `buf`: each non-zero bin into its owner's combined segment, each warp's sum of
// 32 bins (all in one segment) into every block's segment totals.
template <int C>
__device__ __forceinline__ void push_hist(ClusterShared<C>& s, int buf, int nbins) {
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int seg_n = nbins / C;  // a multiple of 32
  const int lane = threadIdx.x & 31;
  for (int b = threadIdx.x; b < nbins; b += kThreads) {  // nbins is a multiple of kThreads: uniform
    const unsigned long long v = s.hist[b];
    const int q = b / seg_n;
    if (v) atomicAdd(cluster.map_shared_rank(&s.comb[buf][b - q * seg_n], q), v);
    unsigned long long w = v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(kFull, w, o);
    if (w && lane < C) atomicAdd(cluster.map_shared_rank(&s.seg[buf][q], lane), w);
  }
}

// Warp 0, after the barrier of the phase that filled buffer `buf`: the cluster-wide
// scan_select. Finds the segment holding the cutoff from the local segment totals, then
// scans that segment in its owner's shared memory; same (bin, above) as scanning the
// whole combined histogram, including the no-hit fallback (bin 0, above = everything).
template <int C>
__device__ void cluster_scan_select(ClusterShared<C>& s, int buf, int nbins, int shift,
                                    unsigned long long target) {
  if (threadIdx.x >= 32) return;
  const int seg_n = nbins / C;
  unsigned long long acc = s.above;
  int q = C - 1;
  for (; q > 0; --q) {  // segments from the top
    if (acc + s.seg[buf][q] >= target) break;
    acc += s.seg[buf][q];
  }
  const unsigned long long* h = cooperative_groups::this_cluster().map_shared_rank(&s.comb[buf][0], q);
  int b;
  unsigned long long above;
  warp_scan_bins(h, seg_n, acc, target, b, above);
  if (threadIdx.x == 0) {
    s.prefix |= static_cast<uint32_t>(q * seg_n + b) << shift;
    s.above = above;
  }
}

// One radix digit on the cached slice: local histogram, push, barrier, scan.
// s.prefix / s.above hold the search state (reset by the caller before digit 1).
template <int C>
__device__ void cluster_radix_digit(ClusterShared<C>& s, const SliceView& x, int& phase, int shift, int bits,
                                    int mode, uint32_t lo_key, float max_x, unsigned long long target) {
  clear_hist(s);  // this block's last push of s.hist preceded the last barrier
  __syncthreads();
  radix_level(s, x, shift, bits, mode, lo_key, max_x);
  __syncthreads();
  push_hist(s, phase % 3, 1 << bits);
  const int buf = end_phase(s, phase);
  cluster_scan_select(s, buf, 1 << bits, shift, target);
  __syncthreads();
}

#endif  // __CUDA_ARCH__ >= 900

// grid: C blocks per row (cluster dims (C, 1, 1), launched by launch_sample), kThreads
// threads, dynamic shared memory ceil(V / C) floats. Arguments as sample_kernel.
template <typename T, int C>
__global__ void __launch_bounds__(kThreads, 1) sample_cluster_kernel(
    const T* __restrict__ logits,          // [B, V], row stride `row_stride`, unit inner stride
    int64_t row_stride,
    int V,
    const float* __restrict__ temperature,  // [B]
    const int64_t* __restrict__ top_k,      // [B]
    const float* __restrict__ top_p,        // [B]
    const float* __restrict__ min_p,        // [B]
    const int64_t* __restrict__ keys,       // [B] RNG keys (read on device: CUDA-graph safe)
    int64_t* __restrict__ tokens,           // [B] out
    float* __restrict__ probs) {            // [B, V] out, or nullptr
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  __shared__ ClusterShared<C> s;
  extern __shared__ float x_cached[];  // [ceil(V / C)]: this block's slice of x = logits / t
  const int rank = static_cast<int>(cluster.block_rank());
  const int row = blockIdx.x / C;
  const float t = temperature[row];
  const int64_t k = top_k[row];
  const float p = top_p[row];
  const float m = min_p[row];
  const float t_eff = t > 0.f ? t : 1.f;
  const int64_t chunk = (static_cast<int64_t>(V) + C - 1) / C;
  const int beg = static_cast<int>(min(static_cast<int64_t>(rank) * chunk, static_cast<int64_t>(V)));
  const int n = static_cast<int>(min(chunk, static_cast<int64_t>(V) - beg));  // 0 for some blocks of a tiny row
  const T* __restrict__ src = logits + row * row_stride + beg;
  float* row_probs = probs ? probs + static_cast<int64_t>(row) * V : nullptr;
  const bool use_k = k > 0 && k < V;
  const bool greedy_only = t <= 0.f && row_probs == nullptr;
  const bool hist_k = use_k && !greedy_only;
  const SliceView x{x_cached, n};

  // Zero the phase-0 and phase-1 buffers before anyone may add to them, and arrive at
  // the start barrier; its wait (before the first remote access) hides behind the load.
  for (int i = threadIdx.x; i < 2 * ClusterShared<C>::kSeg; i += kThreads) (&s.comb[0][0])[i] = 0ull;
  if (threadIdx.x < 2 * C) (&s.seg[0][0])[threadIdx.x] = 0ull;
  if (threadIdx.x == 0) { s.prefix = 0u; s.above = 0ull; }
  if (hist_k) clear_hist(s);
  __syncthreads();
  cluster.barrier_arrive();

  // Pass 1, the only read of global memory: cache x, local max / argmax, top-k digit-1 counts
  float best = -INFINITY;
  int best_i = 0x7fffffff;
  for (int base = 0; base < n; base += kThreads * kLoadUnroll) {  // uniform trip count
    float raw[kLoadUnroll];
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int j = base + u * kThreads + threadIdx.x;
      raw[u] = j < n ? to_float(__ldg(src + j)) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int j = base + u * kThreads + threadIdx.x;
      bool in = false;
      int bin = 0;
      if (j < n) {
        const float xv = raw[u] / t_eff;  // the float RowView::x computes
        x_cached[j] = xv;
        if (better(xv, beg + j, best, best_i)) { best = xv; best_i = beg + j; }
        in = hist_k;
        bin = digit(key_of(xv), 21, 11);
      }
      if (hist_k) warp_hist_add(s.hist, bin, 1ull, in);  // hist_k is uniform over the cluster
    }
  }
  block_argmax(s, best, best_i);  // its barriers also complete s.hist and x_cached
  cluster.barrier_wait();         // every block has started and zeroed its buffers

  int phase = 0;
  if (threadIdx.x < C) {
    *cluster.map_shared_rank(&s.arg_v[0][rank], threadIdx.x) = best;
    *cluster.map_shared_rank(&s.arg_i[0][rank], threadIdx.x) = best_i;
  }
  if (hist_k) push_hist(s, phase % 3, 1 << 11);
  const int buf0 = end_phase(s, phase);
  for (int q = 0; q < C; ++q)
    if (better(s.arg_v[0][q], s.arg_i[0][q], best, best_i)) { best = s.arg_v[0][q]; best_i = s.arg_i[0][q]; }
  const float max_x = best;
  const int argmax = best_i < V ? best_i : 0;  // all-NaN row: stay in bounds
  if (greedy_only) {  // no remote access after the barrier: the blocks may leave
    if (rank == 0 && threadIdx.x == 0) tokens[row] = argmax;
    return;
  }
  if (!(max_x > -INFINITY)) {  // no finite logit (the eager path rejects it): in-range token
    if (rank == 0 && threadIdx.x == 0) tokens[row] = argmax;
    if (row_probs)
      for (int j = threadIdx.x; j < n; j += kThreads) row_probs[beg + j] = 0.f;
    return;
  }

  uint32_t lo_key = 0u;  // keys below are removed
  if (use_k) {
    const unsigned long long target = static_cast<unsigned long long>(k);
    cluster_scan_select(s, buf0, 1 << 11, 21, target);
    __syncthreads();
    cluster_radix_digit(s, x, phase, 10, 11, 0, 0u, max_x, target);
    cluster_radix_digit(s, x, phase, 0, 10, 0, 0u, max_x, target);
    lo_key = s.prefix;
    __syncthreads();  // everyone has read s.prefix before it is reset
  }

  if (p < 1.f) {
    // mass of the top-k survivors by digit 1; the segment totals add up to their total
    if (threadIdx.x == 0) { s.prefix = 0u; s.above = 0ull; }
    clear_hist(s);
    __syncthreads();
    radix_level(s, x, 21, 11, 1, lo_key, max_x);  // prefix 0 under an all-zero mask: every key >= lo_key
    __syncthreads();
    push_hist(s, phase % 3, 1 << 11);
    const int buf = end_phase(s, phase);
    unsigned long long total = 0;
    for (int q = 0; q < C; ++q) total += s.seg[buf][q];
    const unsigned long long target =
        static_cast<unsigned long long>(ceil(static_cast<double>(p) * static_cast<double>(total)));
    const unsigned long long tgt = target > 0 ? target : 1ull;
    cluster_scan_select(s, buf, 1 << 11, 21, tgt);
    __syncthreads();
    cluster_radix_digit(s, x, phase, 10, 11, 1, lo_key, max_x, tgt);
    cluster_radix_digit(s, x, phase, 0, 10, 1, lo_key, max_x, tgt);
    const uint32_t tp_key = s.prefix;
    lo_key = tp_key > lo_key ? tp_key : lo_key;
  }

  // The draw: local Gumbel-max and kept mass, combined like the max
  const RowKey rk = row_key(keys[row]);
  float score = -INFINITY;
  int drawn = 0x7fffffff;
  unsigned long long kept = 0;
  for (int j = threadIdx.x; j < n; j += kThreads) draw_step(x.x(j), beg + j, lo_key, max_x, m, rk, score, drawn, kept);
  block_argmax(s, score, drawn);
  unsigned long long kept_mass = 0;
  int kept_nan = 0;
  if (row_probs) {
    kept_nan = __syncthreads_or((kept & kNanBit) != 0);
    kept_mass = block_sum(s, kept & ~kNanBit);
  }
  if (threadIdx.x < C) {
    *cluster.map_shared_rank(&s.arg_v[1][rank], threadIdx.x) = score;
    *cluster.map_shared_rank(&s.arg_i[1][rank], threadIdx.x) = drawn;
    *cluster.map_shared_rank(&s.kept[rank], threadIdx.x) = kept_mass;
    *cluster.map_shared_rank(&s.kept_nan[rank], threadIdx.x) = kept_nan;
  }
  end_phase(s, phase);  // the last barrier: only local shared memory from here on
  kept_mass = 0;
  kept_nan = 0;
  for (int q = 0; q < C; ++q) {
    if (better(s.arg_v[1][q], s.arg_i[1][q], score, drawn)) { score = s.arg_v[1][q]; drawn = s.arg_i[1][q]; }
    kept_mass += s.kept[q];
    kept_nan |= s.kept_nan[q];
  }
  if (rank == 0 && threadIdx.x == 0) tokens[row] = t > 0.f ? (drawn < V ? drawn : argmax) : argmax;
  if (row_probs) {
    const float inv = inv_mass(kept_mass, kept_nan != 0);
    for (int j = threadIdx.x; j < n; j += kThreads) row_probs[beg + j] = kept_prob(x.x(j), lo_key, max_x, m, inv);
  }
#else
  __trap();  // launch_sample only launches it where the device code is sm_90 or newer
#endif
}

}  // namespace gptfast
