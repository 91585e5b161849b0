// emu_sample: runs the CUDA sampling kernels on the CPU emulator (emu.h), one row at a
// time: BLOCKS = 1 runs sample_kernel (one block per row), 2 / 4 / 8 runs
// sample_cluster_kernel with that many blocks per row. Built by emulator.py from copies of
// the kernel headers whose __shared__ declarations it rewrote; not part of the extension.
//
//   emu_sample DTYPE BLOCKS B V ROW_STRIDE RETURN_PROBS SEED < input > output
//
// DTYPE: f32, f16 or bf16. SEED: the schedule and the initial shared memory (row r uses
// SEED + r). Input, raw little-endian: logits ((B - 1) * ROW_STRIDE + V elements of DTYPE),
// temperature f32[B], top_k i64[B], top_p f32[B], min_p f32[B], keys i64[B].
// Output: tokens i64[B], then probs f32[B * V] if RETURN_PROBS. Both are poisoned before
// the kernels run (tokens -7, probs -1), so an element the kernel leaves unwritten shows.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu.h"  // first: the CUDA keywords and built-ins the kernels use
#include "sampling_cluster.cuh"

namespace {

using namespace gptfast;

template <typename T>
std::vector<T> read_array(size_t n, const char* name) {
  std::vector<T> v(n);
  if (fread(v.data(), sizeof(T), n, stdin) != n) emu::fail("input ended before %s (%zu elements)", name, n);
  return v;
}

struct Rows {
  int B = 0, V = 0;
  int64_t row_stride = 0;
  std::vector<float> temperature, top_p, min_p;
  std::vector<int64_t> top_k, keys, tokens;
  std::vector<float> probs;  // empty unless return_probs
};

template <typename T, int C>
void run_rows(const std::vector<T>& logits, Rows& r, unsigned long long seed) {
  float* probs = r.probs.empty() ? nullptr : r.probs.data();
  for (int row = 0; row < r.B; ++row) {
    if constexpr (C == 1) {
      emu::run_cluster(1, kThreads, row, 0, seed + row, [&] {
        sample_kernel<T>(logits.data(), r.row_stride, r.V, r.temperature.data(), r.top_k.data(), r.top_p.data(),
                         r.min_p.data(), r.keys.data(), r.tokens.data(), probs);
      });
    } else {
      const size_t slice = (static_cast<size_t>(r.V) + C - 1) / C;  // as launch_sample sizes it
      emu::run_cluster(C, kThreads, row * C, slice * sizeof(float), seed + row, [&] {
        sample_cluster_kernel<T, C>(logits.data(), r.row_stride, r.V, r.temperature.data(), r.top_k.data(),
                                    r.top_p.data(), r.min_p.data(), r.keys.data(), r.tokens.data(), probs);
      });
    }
  }
}

template <typename T>
void run(int blocks, Rows& r, unsigned long long seed) {
  const auto logits = read_array<T>(static_cast<size_t>(r.B - 1) * r.row_stride + r.V, "the logits");
  r.temperature = read_array<float>(r.B, "temperature");
  r.top_k = read_array<int64_t>(r.B, "top_k");
  r.top_p = read_array<float>(r.B, "top_p");
  r.min_p = read_array<float>(r.B, "min_p");
  r.keys = read_array<int64_t>(r.B, "keys");
  switch (blocks) {
    case 1: run_rows<T, 1>(logits, r, seed); break;
    case 2: run_rows<T, 2>(logits, r, seed); break;
    case 4: run_rows<T, 4>(logits, r, seed); break;
    case 8: run_rows<T, 8>(logits, r, seed); break;
    default: emu::fail("BLOCKS must be 1, 2, 4 or 8, got %d", blocks);
  }
}

long long parse_int(const char* s, const char* name, long long lo, long long hi) {
  char* end = nullptr;
  const long long v = strtoll(s, &end, 10);
  if (*s == '\0' || *end != '\0' || v < lo || v > hi)
    emu::fail("%s must be an integer in [%lld, %lld], got '%s'", name, lo, hi, s);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) emu::fail("usage: %s DTYPE BLOCKS B V ROW_STRIDE RETURN_PROBS SEED < input > output", argv[0]);
  const std::string dtype = argv[1];
  const int blocks = static_cast<int>(parse_int(argv[2], "BLOCKS", 1, 8));
  Rows r;
  r.B = static_cast<int>(parse_int(argv[3], "B", 1, 1 << 20));
  r.V = static_cast<int>(parse_int(argv[4], "V", 1, (1ll << 31) - 1));
  r.row_stride = parse_int(argv[5], "ROW_STRIDE", r.V, 1ll << 40);
  const bool return_probs = parse_int(argv[6], "RETURN_PROBS", 0, 1) != 0;
  const auto seed = static_cast<unsigned long long>(parse_int(argv[7], "SEED", 0, 1ll << 62));
  r.tokens.assign(r.B, -7);
  if (return_probs) r.probs.assign(static_cast<size_t>(r.B) * r.V, -1.f);

  if (dtype == "f32") run<float>(blocks, r, seed);
  else if (dtype == "f16") run<__half>(blocks, r, seed);
  else if (dtype == "bf16") run<__nv_bfloat16>(blocks, r, seed);
  else emu::fail("DTYPE must be f32, f16 or bf16, got '%s'", dtype.c_str());

  fwrite(r.tokens.data(), sizeof(int64_t), r.tokens.size(), stdout);
  fwrite(r.probs.data(), sizeof(float), r.probs.size(), stdout);
  return fflush(stdout) == 0 ? 0 : 1;
}
