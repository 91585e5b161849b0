// CUDA implementation of gptfast::sample: the launcher. The kernel is in
// sampling_kernel.cuh (plain CUDA, compile-checkable without torch).
#ifdef GPTFAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sampling_kernel.cuh"

namespace gptfast {

// Defined in sampling.cpp.
void check_sample_inputs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& keys);

namespace {

template <typename scalar_t, typename cuda_t>
void launch(const at::Tensor& logits, const at::Tensor& t, const at::Tensor& k, const at::Tensor& p,
            const at::Tensor& m, const at::Tensor& key, at::Tensor& tokens, at::Tensor& probs, bool return_probs,
            cudaStream_t stream) {
  sample_kernel<cuda_t><<<static_cast<unsigned>(logits.size(0)), kThreads, 0, stream>>>(
      reinterpret_cast<const cuda_t*>(logits.const_data_ptr<scalar_t>()), logits.stride(0),
      static_cast<int>(logits.size(1)), t.const_data_ptr<float>(), k.const_data_ptr<int64_t>(),
      p.const_data_ptr<float>(), m.const_data_ptr<float>(), key.const_data_ptr<int64_t>(),
      tokens.mutable_data_ptr<int64_t>(), return_probs ? probs.mutable_data_ptr<float>() : nullptr);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits_in, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               const at::Tensor& min_p, const at::Tensor& keys,
                                               bool return_probs) {
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
  // Explicit cases, not AT_DISPATCH: float64 is rejected by check_sample_inputs and
  // must not instantiate the kernel.
  switch (logits.scalar_type()) {
    case at::kFloat: launch<float, float>(logits, t, k, p, m, key, tokens, probs, return_probs, stream); break;
    case at::kHalf: launch<at::Half, __half>(logits, t, k, p, m, key, tokens, probs, return_probs, stream); break;
    case at::kBFloat16:
      launch<at::BFloat16, __nv_bfloat16>(logits, t, k, p, m, key, tokens, probs, return_probs, stream);
      break;
    default: TORCH_CHECK(false, "gptfast::sample: unsupported logits dtype ", logits.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, probs};
}

TORCH_LIBRARY_IMPL(gptfast, CUDA, lib) { lib.impl("sample", &sample_cuda); }

}  // namespace gptfast
#endif  // GPTFAST_WITH_CUDA
