// Shared by the CPU (sampling.cpp) and CUDA (sampling_kernel.cuh) samplers: the
// counter-based RNG and the float -> ordered-key mapping. Plain C++, no torch, so
// the kernel can be compile-checked with nvcc alone.
//
// The hash MUST stay bit-identical to gptfast/ops/sampling.py:uniform_from_key,
// so that the extension and the reference draw the same tokens from the same keys.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GPTFAST_HD __host__ __device__ __forceinline__
#else
#define GPTFAST_HD inline
#endif

namespace gptfast {

constexpr uint32_t kKeySalt = 0x9E3779B9u;

// lowbias32 (C. Wellons): a bijective 32-bit integer hash.
GPTFAST_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-row part of the hash, computed once per row: kk = mix(k0 ^ mix(k1 ^ SALT)).
struct RowKey {
  uint32_t kk;
  uint32_t k1;
};

GPTFAST_HD RowKey row_key(int64_t key) {
  const uint64_t k = static_cast<uint64_t>(key);
  const uint32_t k0 = static_cast<uint32_t>(k & 0xFFFFFFFFu);
  const uint32_t k1 = static_cast<uint32_t>(k >> 32);
  return RowKey{mix32(k0 ^ mix32(k1 ^ kKeySalt)), k1};
}

// Uniform in (0, 1) for token v: ((h >> 9) + 0.5) / 2^23, exact in float32.
GPTFAST_HD float uniform_at(RowKey rk, uint32_t v) {
  const uint32_t h = mix32(mix32(v ^ rk.kk) ^ rk.k1);
  return (static_cast<float>(h >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// Monotone map of a float to uint32: a < b (as floats) <=> key(a) < key(b).
// -0.0 and +0.0 compare equal as floats, so both map to the key of +0.0: ties
// at the top-k / top-p threshold are decided on values, never on the sign bit.
GPTFAST_HD uint32_t ordered_key(uint32_t bits) {
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Probability mass in fixed point (2^-32 units). Integer sums are exact and
// order-independent, so the top-p cutoff is deterministic even when the CUDA
// kernel accumulates with atomics. A vocab below 2^31 cannot overflow 64 bits.
constexpr double kMassScale = 4294967296.0;

// Largest vocab the kernels take: their int loops step past the last token by at most
// kThreads * kLoadUnroll (8192) before testing it, so V stays 2^16 below 2^31 (no overflow).
constexpr int64_t kMaxVocab = (int64_t{1} << 31) - (int64_t{1} << 16);

}  // namespace gptfast
