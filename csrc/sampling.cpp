// gptfast._C: the sampling op `gptfast::sample`, its schema and CPU implementation.
// The CUDA implementation lives in sampling_cuda.cu (built with GPTFAST_WITH_CUDA).
//
// Semantics are those of gptfast/ops/sampling.py:sample_reference, per row:
//   x = logits / temperature (temperature 0: x = logits, token = argmax, lowest index)
//   top-k:  keep x >= the k-th largest x (ties kept); 0 or >= V disables
//   top-p:  on the top-k survivors, keep x when the mass of strictly larger values
//           is < p * (their total mass); 1.0 disables. The kept set is {x >= T_p}
//           where T_p is the value at which the descending cumulative mass first
//           reaches p * total.
//   min-p:  keep exp(x - max) >= min_p (prob >= min_p * max prob; renormalising
//           after top-k / top-p does not change this ratio); 0 disables
//   draw:   argmax over kept tokens of x + Gumbel(u), u = uniform_at(key, v)
// Every filter keeps the maximum, so the kept set is always {x >= one threshold}.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "sampling_common.h"

// Importable as a Python extension module (gptfast._C); the ops register with
// the dispatcher when the .so loads (the pytorch/extension-cpp pattern).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "gptfast sampling extension (ops in torch.ops.gptfast)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace gptfast {

namespace {

// NaN (an exp of inf - inf) weighs 0, as the CUDA kernel's mass_of (a NaN cast to an integer is
// undefined behaviour).
inline uint64_t to_mass(float e) {
  return e == e ? static_cast<uint64_t>(std::nearbyint(static_cast<double>(e) * kMassScale)) : 0;
}

// One row. x: scratch [V]; order: scratch [V] of indices.
template <typename scalar_t>
void sample_row(const scalar_t* logits, int64_t V, float t, int64_t k, float p, float m, int64_t key,
                int64_t* token_out, float* probs_out, std::vector<float>& x, std::vector<int64_t>& order) {
  const float t_eff = t > 0.f ? t : 1.f;  // temperature-0 rows are filtered at 1 (for return_probs)
  float x_max = -std::numeric_limits<float>::infinity();
  int64_t argmax = 0;
  for (const auto v : c10::irange(V)) {
    const float xv = static_cast<float>(logits[v]) / t_eff;
    x[v] = xv;
    if (xv > x_max) {  // strict: the lowest index wins ties
      x_max = xv;
      argmax = v;
    }
  }
  if (t <= 0.f && probs_out == nullptr) {
    *token_out = argmax;
    return;
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (!(x_max > neg_inf) || std::isnan(x_max)) {  // unreachable after validation: stay in bounds
    *token_out = argmax;
    if (probs_out) std::fill(probs_out, probs_out + V, 0.f);
    return;
  }

  // top-k threshold: the k-th largest value
  float t_k = neg_inf;
  if (k > 0 && k < V) {
    std::vector<float> copy(x.begin(), x.begin() + V);
    std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<float>());
    t_k = copy[k - 1];
  }

  // top-p threshold: walk the survivors by decreasing value, one group of equal values at a time
  float t_p = neg_inf;
  if (p < 1.f) {
    int64_t n = 0;
    uint64_t total = 0;
    for (const auto v : c10::irange(V)) {
      if (x[v] >= t_k) {
        order[n++] = v;
        total += to_mass(std::exp(x[v] - x_max));
      }
    }
    std::sort(order.begin(), order.begin() + n,
              [&](int64_t a, int64_t b) { return x[a] > x[b]; });
    const double target = std::ceil(static_cast<double>(p) * static_cast<double>(total));
    uint64_t cum = 0;
    for (int64_t i = 0; i < n;) {
      const float value = x[order[i]];
      for (; i < n && x[order[i]] == value; ++i) cum += to_mass(std::exp(x[order[i]] - x_max));
      if (static_cast<double>(cum) >= target) {
        t_p = value;
        break;
      }
    }
  }
  const float threshold = std::max(t_k, t_p);

  // Gumbel-max draw over the kept tokens (and their mass, for return_probs)
  const RowKey rk = row_key(key);
  float best = neg_inf;
  int64_t drawn = argmax;
  double kept_mass = 0.0;
  for (const auto v : c10::irange(V)) {
    const float xv = x[v];
    if (!(xv >= threshold)) continue;
    const float e = std::exp(xv - x_max);
    if (m > 0.f && e < m) continue;
    kept_mass += e;
    const float u = uniform_at(rk, static_cast<uint32_t>(v));
    const float score = xv - std::log(-std::log(u));
    if (score > best) {
      best = score;
      drawn = v;
    }
  }
  *token_out = t > 0.f ? drawn : argmax;
  if (probs_out) {
    const float inv = static_cast<float>(1.0 / kept_mass);
    for (const auto v : c10::irange(V)) {
      const float xv = x[v];
      float e = xv >= threshold ? std::exp(xv - x_max) : 0.f;
      if (m > 0.f && e < m) e = 0.f;
      probs_out[v] = e * inv;
    }
  }
}

}  // namespace

// Argument checks shared with the CUDA implementation (declared in sampling_cuda.cu).
void check_sample_inputs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& keys) {
  TORCH_CHECK(logits.dim() == 2, "gptfast::sample: logits must be 2-D [B, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              "gptfast::sample: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  const int64_t B = logits.size(0);
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= gptfast::kMaxVocab,
              "gptfast::sample: vocab size must be in [1, 2^31 - 2^16], got ", logits.size(1));
  auto check_row = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "gptfast::sample: ", name, " must have shape [B]=[", B,
                "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "gptfast::sample: ", name, " must be ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == logits.device(), "gptfast::sample: ", name, " must be on ", logits.device(),
                " like logits, got ", t.device());
  };
  check_row(temperature, "temperature", at::kFloat);
  check_row(top_k, "top_k", at::kLong);
  check_row(top_p, "top_p", at::kFloat);
  check_row(min_p, "min_p", at::kFloat);
  check_row(keys, "keys", at::kLong);
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits_in, const at::Tensor& temperature_in,
                                              const at::Tensor& top_k_in, const at::Tensor& top_p_in,
                                              const at::Tensor& min_p_in, const at::Tensor& keys_in,
                                              bool return_probs) {
  check_sample_inputs(logits_in, temperature_in, top_k_in, top_p_in, min_p_in, keys_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous(), top_k = top_k_in.contiguous();
  const at::Tensor top_p = top_p_in.contiguous(), min_p = min_p_in.contiguous(), keys = keys_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor probs = return_probs ? at::empty({B, V}, logits.options().dtype(at::kFloat))
                                  : at::empty({0}, logits.options().dtype(at::kFloat));
  const float* t = temperature.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const float* p = top_p.data_ptr<float>();
  const float* m = min_p.data_ptr<float>();
  const int64_t* key = keys.data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* pr = return_probs ? probs.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gptfast_sample_cpu", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> x(V);
      std::vector<int64_t> order(V);
      for (int64_t r = begin; r < end; ++r) {
        sample_row<scalar_t>(base + r * V, V, t[r], k[r], p[r], m[r], key[r], tok + r,
                             pr ? pr + r * V : nullptr, x, order);
      }
    });
  });
  return {tokens, probs};
}

TORCH_LIBRARY(gptfast, lib) {
  // Per-row parameters are [B] tensors on the logits' device (temperature/top_p/min_p
  // float32, top_k int64); keys int64 [B] are the per-row RNG keys. Returns tokens
  // int64 [B] and, when return_probs, the filtered probabilities float32 [B, V]
  // (an empty [0] tensor otherwise).
  lib.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor keys, bool return_probs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptfast, CPU, lib) { lib.impl("sample", &sample_cpu); }

}  // namespace gptfast
