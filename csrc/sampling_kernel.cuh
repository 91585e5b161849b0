// CUDA sampling kernel: one block per row, no host sync, no sort, and the device
// helpers shared with the cluster kernel (sampling_cluster.cuh: several blocks per row).
// Plain CUDA (no torch headers) so it can be compile-checked with nvcc alone; the
// host side is sampling_launch.cuh and sampling_cuda.cu. Semantics: see sampling.cpp
// (the CPU twin).
//
// Per row, every filter keeps the maximum, so the kept set is {x >= T} for one
// threshold T = max(T_k, T_p) plus the min-p test exp(x - max) >= min_p. Both
// thresholds are found by radix select on the float's ordered 32-bit key
// (digits of 11, 11 and 10 bits): a shared-memory histogram per digit (counts
// for top-k, fixed-point mass for top-p), then one warp scans it from the top to
// find the bin where the running total reaches the target. Passes over the row
// (the first from DRAM, the rest mostly from L2):
//   1  max / argmax, and the top-k digit-1 histogram
//   2,3  top-k digits 2 and 3                              (top-k only)
//   4  total mass of the top-k survivors + top-p digit-1   (top-p only)
//   5,6  top-p digits 2 and 3                              (top-p only)
//   7  Gumbel-max draw over the kept tokens (hash + 2 logs only for kept ones)
//   8  filtered probabilities                              (return_probs only)
// Greedy rows stop after pass 1.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "sampling_common.h"

namespace gptfast {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;  // largest digit: 11 bits
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ uint32_t key_of(float x) { return ordered_key(__float_as_uint(x)); }

// e in [0, 1], so a mass is <= 2^32 and a sum of fewer than 2^31 masses cannot wrap.
// NaN (only from +inf logits: inf - inf) weighs 0, so that holds for any input and
// every way of splitting the sums (one block or a cluster) gives the same totals.
__device__ __forceinline__ uint64_t mass_of(float e) {
  return e == e ? __float2ull_rn(e * static_cast<float>(kMassScale)) : 0ull;
}

// 1 / (kept mass), from the exact fixed-point sum; NaN when a kept exp was NaN, as a
// float sum of them would be.
__device__ __forceinline__ float inv_mass(unsigned long long kept, bool kept_nan) {
  return kept_nan ? __int_as_float(0x7fffffff) : static_cast<float>(kMassScale / static_cast<double>(kept));
}

// Scratch for block-wide reductions and the radix search.
struct Shared {
  unsigned long long hist[kBins];  // counts (top-k) or fixed-point mass (top-p)
  float red_f[kWarps];
  int red_i[kWarps];
  unsigned long long red_u[kWarps];
  // radix state, written by warp 0 and read by all after a barrier
  uint32_t prefix;         // the key bits found so far
  unsigned long long above;  // weight of keys with a larger prefix
  float max_x;
  int argmax;
};

// Adds `w` to hist[bin] for the lanes with `active`, one shared atomic per distinct
// bin in the warp: logits crowd into few bins, and per-lane atomics on one address
// would serialise 32-fold. Must be called by all 32 lanes.
__device__ __forceinline__ void warp_hist_add(unsigned long long* hist, int bin, unsigned long long w,
                                              bool active) {
  const int lane = threadIdx.x & 31;
  unsigned pending = __ballot_sync(kFull, active);
  while (pending) {
    const int leader = __ffs(pending) - 1;
    const int lb = __shfl_sync(kFull, bin, leader);
    const bool mine = active && bin == lb;
    const unsigned same = __ballot_sync(kFull, mine);
    unsigned long long v = mine ? w : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    if (lane == leader) atomicAdd(&hist[lb], v);
    pending &= ~same;
  }
}

template <typename S>
__device__ __forceinline__ void clear_hist(S& s) {
  for (int i = threadIdx.x; i < kBins; i += kThreads) s.hist[i] = 0ull;
}

// One warp: among bins h[0..n) (n a multiple of 32; h may be another block's shared
// memory), the highest b with base + sum(h[b..]) >= target; above = base + sum(h[b+1..]).
// If there is none (target above the total, which valid arguments never ask for):
// b = 0 and above = base + sum(h[0..]). Results in every lane.
__device__ __forceinline__ void warp_scan_bins(const unsigned long long* h, int n, unsigned long long base,
                                               unsigned long long target, int& b_out,
                                               unsigned long long& above_out) {
  const int lane = threadIdx.x & 31;
  const int per_lane = n / 32;  // lane 0 owns the top bins
  const int hi = n - 1 - lane * per_lane;
  unsigned long long lane_sum = 0;
#pragma unroll 8  // 8 loads in flight (DSMEM latency) without tying up 2 * per_lane registers
  for (int i = 0; i < per_lane; ++i) lane_sum += h[hi - i];
  // inclusive prefix over lanes (descending bins)
  unsigned long long incl = lane_sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  const unsigned hit = __ballot_sync(kFull, base + incl >= target);
  const int owner = hit ? __ffs(hit) - 1 : 31;
  int b = hi - per_lane + 1;
  unsigned long long acc = base + (incl - lane_sum);
  if (lane == owner) {
    for (int i = 0; i < per_lane; ++i) {
      const unsigned long long v = h[hi - i];
      if (acc + v >= target) {
        b = hi - i;
        break;
      }
      acc += v;
    }
  }
  b_out = __shfl_sync(kFull, b, owner);
  above_out = __shfl_sync(kFull, acc, owner);
}

// Warp 0: find the highest bin b (of nbins) with above + sum(hist[b..]) >= target;
// then prefix |= b << shift and above += sum(hist[b+1..]). Caller syncs before/after.
template <typename S>
__device__ void scan_select(S& s, int nbins, int shift, unsigned long long target) {
  if (threadIdx.x >= 32) return;
  int b;
  unsigned long long above;
  warp_scan_bins(s.hist, nbins, s.above, target, b, above);
  if (threadIdx.x == 0) {
    s.prefix |= static_cast<uint32_t>(b) << shift;
    s.above = above;
  }
}

// x_i = logits_i / t, read from the row in global memory (one-block kernel).
template <typename T>
struct RowView {
  const T* __restrict__ row;
  int V;
  float t_eff;
  __device__ __forceinline__ float x(int i) const { return to_float(__ldg(row + i)) / t_eff; }
};

// x_i of a block's slice, cached in shared memory by the cluster kernel: the same
// float as RowView::x (same load, same division), so both kernels select alike.
struct SliceView {
  const float* x_cached;
  int V;  // the slice length
  __device__ __forceinline__ float x(int i) const { return x_cached[i]; }
};

// Radix digits: (shift, bits) = (21, 11), (10, 11), (0, 10).
__device__ __forceinline__ int digit(uint32_t key, int shift, int bits) {
  return static_cast<int>((key >> shift) & ((1u << bits) - 1u));
}
__device__ __forceinline__ uint32_t high_mask(int shift) { return shift >= 32 ? 0u : ~((1u << shift) - 1u); }

// One radix level over the row (or slice) into s.hist. mode 0: counts of all keys;
// mode 1: mass of keys >= lo_key. Only keys matching s.prefix above the digit count.
template <typename S, typename View>
__device__ void radix_level(S& s, const View& r, int shift, int bits, int mode, uint32_t lo_key, float max_x) {
  const uint32_t want = s.prefix;
  const uint32_t mask = high_mask(shift + bits);
  for (int base = 0; base < r.V; base += kThreads) {  // uniform trip count: warps stay converged
    const int i = base + threadIdx.x;
    bool in = false;
    int bin = 0;
    unsigned long long w = 0;
    if (i < r.V) {
      const float xv = r.x(i);
      const uint32_t k = key_of(xv);
      in = (k & mask) == want && (mode == 0 || k >= lo_key);
      if (in) {
        bin = digit(k, shift, bits);
        w = mode == 0 ? 1ull : mass_of(expf(xv - max_x));
      }
    }
    warp_hist_add(s.hist, bin, w, in);
  }
}

// Full radix select: the key T with weight(key > T) < target <= weight(key >= T).
template <typename T>
__device__ uint32_t radix_select(Shared& s, const RowView<T>& r, int mode, uint32_t lo_key, float max_x,
                                 unsigned long long target, bool first_level_ready) {
  const int shifts[3] = {21, 10, 0};
  const int bits[3] = {11, 11, 10};
  for (int level = 0; level < 3; ++level) {
    if (level > 0 || !first_level_ready) {
      clear_hist(s);
      __syncthreads();
      radix_level(s, r, shifts[level], bits[level], mode, lo_key, max_x);
    }
    __syncthreads();
    scan_select(s, 1 << bits[level], shifts[level], target);
    __syncthreads();
  }
  const uint32_t result = s.prefix;
  __syncthreads();  // the caller resets s.prefix for the next search
  return result;
}

__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);  // lowest index wins ties
}

// Block argmax of (value, index); result broadcast to all threads. NaN values never
// win (better() is false for them), so over non-NaN candidates this is the maximum of
// a total order (value, then lowest index): any split of the row gives the same result.
template <typename S>
__device__ void block_argmax(S& s, float& v, int& idx) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, idx, o);
    if (better(ov, oi, v, idx)) { v = ov; idx = oi; }
  }
  if (lane == 0) { s.red_f[warp] = v; s.red_i[warp] = idx; }
  __syncthreads();
  if (warp == 0) {
    v = s.red_f[lane];
    idx = s.red_i[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, v, o);
      const int oi = __shfl_xor_sync(kFull, idx, o);
      if (better(ov, oi, v, idx)) { v = ov; idx = oi; }
    }
    if (lane == 0) { s.max_x = v; s.argmax = idx; }
  }
  __syncthreads();
  v = s.max_x;
  idx = s.argmax;
}

// Block sum of integers (exact, so order-independent).
template <typename S>
__device__ unsigned long long block_sum(S& s, unsigned long long v) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (lane == 0) s.red_u[warp] = v;
  __syncthreads();
  v = s.red_u[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  __syncthreads();  // red_u is reused by the next reduction
  return v;
}

// A thread's share of the kept mass, in fixed point (exact sums, so the normalisation
// is the same however the row is split), with bit 63 set once an exp was NaN: a sum of
// masses stays below 2^63 (see mass_of), and the flag costs no register in the draw loop.
constexpr unsigned long long kNanBit = 1ull << 63;

// One token of the draw: if kept, its Gumbel score joins the thread's argmax and its
// mass the thread's kept mass.
__device__ __forceinline__ void draw_step(float xv, int i, uint32_t lo_key, float max_x, float m, RowKey rk,
                                          float& score, int& drawn, unsigned long long& kept) {
  if (key_of(xv) < lo_key) return;
  const float e = expf(xv - max_x);
  if (m > 0.f && e < m) return;
  kept = (kept + mass_of(e)) | (e != e ? kNanBit : 0ull);
  const float u = uniform_at(rk, static_cast<uint32_t>(i));
  const float sc = xv - logf(-logf(u));
  if (better(sc, i, score, drawn)) { score = sc; drawn = i; }
}

// Filtered probability of one token (return_probs).
__device__ __forceinline__ float kept_prob(float xv, uint32_t lo_key, float max_x, float m, float inv) {
  float e = key_of(xv) >= lo_key ? expf(xv - max_x) : 0.f;
  if (m > 0.f && e < m) e = 0.f;
  return e * inv;
}

// grid: one block per row, kThreads threads.
template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(
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
  __shared__ Shared s;
  const int row = blockIdx.x;
  const float t = temperature[row];
  const int64_t k = top_k[row];
  const float p = top_p[row];
  const float m = min_p[row];
  const RowView<T> r{logits + row * row_stride, V, t > 0.f ? t : 1.f};
  float* row_probs = probs ? probs + static_cast<int64_t>(row) * V : nullptr;
  const bool use_k = k > 0 && k < V;
  const bool greedy_only = t <= 0.f && row_probs == nullptr;

  // Pass 1: max / argmax (+ top-k digit-1 histogram)
  if (threadIdx.x == 0) { s.prefix = 0u; s.above = 0ull; }
  const bool hist_k = use_k && !greedy_only;
  if (hist_k) clear_hist(s);
  __syncthreads();
  float best = -INFINITY;
  int best_i = 0x7fffffff;
  for (int base = 0; base < V; base += kThreads) {
    const int i = base + threadIdx.x;
    bool in = false;
    int bin = 0;
    if (i < V) {
      const float xv = r.x(i);
      if (better(xv, i, best, best_i)) { best = xv; best_i = i; }
      in = hist_k;
      bin = digit(key_of(xv), 21, 11);
    }
    if (hist_k) warp_hist_add(s.hist, bin, 1ull, in);  // hist_k is uniform over the block
  }
  block_argmax(s, best, best_i);
  const float max_x = best;
  const int argmax = best_i < V ? best_i : 0;  // all-NaN row: stay in bounds
  if (greedy_only) {
    if (threadIdx.x == 0) tokens[row] = argmax;
    return;
  }
  if (!(max_x > -INFINITY)) {  // no finite logit (the eager path rejects it): in-range token
    if (threadIdx.x == 0) tokens[row] = argmax;
    if (row_probs)
      for (int i = threadIdx.x; i < V; i += kThreads) row_probs[i] = 0.f;
    return;
  }

  uint32_t lo_key = 0u;  // keys below are removed
  if (use_k) lo_key = radix_select(s, r, 0, 0u, max_x, static_cast<unsigned long long>(k), true);

  if (p < 1.f) {
    // Pass 4: mass of the top-k survivors, and the top-p digit-1 histogram
    if (threadIdx.x == 0) { s.prefix = 0u; s.above = 0ull; }
    clear_hist(s);
    __syncthreads();
    unsigned long long local = 0;
    for (int base = 0; base < V; base += kThreads) {
      const int i = base + threadIdx.x;
      bool in = false;
      int bin = 0;
      unsigned long long w = 0;
      if (i < V) {
        const float xv = r.x(i);
        const uint32_t kx = key_of(xv);
        in = kx >= lo_key;
        if (in) {
          w = mass_of(expf(xv - max_x));
          bin = digit(kx, 21, 11);
          local += w;
        }
      }
      warp_hist_add(s.hist, bin, w, in);
    }
    const unsigned long long total = block_sum(s, local);
    const unsigned long long target =
        static_cast<unsigned long long>(ceil(static_cast<double>(p) * static_cast<double>(total)));
    const uint32_t tp_key = radix_select(s, r, 1, lo_key, max_x, target > 0 ? target : 1ull, true);
    lo_key = tp_key > lo_key ? tp_key : lo_key;
  }

  // Pass 7: Gumbel-max draw over the kept tokens
  const RowKey rk = row_key(keys[row]);
  float score = -INFINITY;
  int drawn = 0x7fffffff;
  unsigned long long kept = 0;
  for (int i = threadIdx.x; i < V; i += kThreads) draw_step(r.x(i), i, lo_key, max_x, m, rk, score, drawn, kept);
  block_argmax(s, score, drawn);
  if (threadIdx.x == 0) tokens[row] = t > 0.f ? (drawn < V ? drawn : argmax) : argmax;
  if (row_probs) {
    const bool kept_nan = __syncthreads_or((kept & kNanBit) != 0);
    const unsigned long long kept_mass = block_sum(s, kept & ~kNanBit);
    const float inv = inv_mass(kept_mass, kept_nan);
    for (int i = threadIdx.x; i < V; i += kThreads) row_probs[i] = kept_prob(r.x(i), lo_key, max_x, m, inv);
  }
}

}  // namespace gptfast
