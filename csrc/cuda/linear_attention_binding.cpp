// linear_attention on CUDA: checks, allocation and the chunked attention launchers on given
// features (kernels: chunked_attention.cu). Built only in CUDA builds (setup.py).
#include <torch/library.h>

#include "binding.h"

namespace okadfa {
namespace {

std::tuple<at::Tensor, at::Tensor> linear_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const std::optional<at::Tensor>& key_mask, bool causal,
                                                             int64_t chunk) {
  check_attention(q, k, v);
  check_chunk(chunk);
  auto s = attention_shape(q, v, q.size(3), /*fused=*/false, causal, 1.0);
  s.key_mask = key_mask_data(key_mask, q);
  return forward(s, q, k, v, at::Tensor(), "linear_attention_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lognorm, const std::optional<at::Tensor>& key_mask, bool causal,
    int64_t chunk) {
  check_attention(q, k, v);
  check_saved(grad_out, q, v, out, lognorm);
  check_chunk(chunk);
  auto s = attention_shape(q, v, q.size(3), /*fused=*/false, causal, 1.0);
  s.key_mask = key_mask_data(key_mask, q);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward(s, grad_out, q, k, v, at::Tensor(), out, lognorm, dq, dk, dv, nullptr, "linear_attention_bwd");
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cuda);
}

}  // namespace okadfa
