// favor_attention on CUDA: checks, allocation and the chunked attention launchers with the fused
// FAVOR+ feature map (kernels: chunked_attention.cu). Built only in CUDA builds (setup.py).
#include <torch/library.h>

#include "binding.h"

namespace okadfa {
namespace {

std::tuple<at::Tensor, at::Tensor> favor_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& projection,
                                                            const std::optional<at::Tensor>& key_mask, bool causal,
                                                            double scale, int64_t chunk) {
  check_attention(q, k, v);
  check_projection(projection, q, scale);
  check_chunk(chunk);   // validated for parity with the CPU op; the CUDA kernels use their own tiles
  auto s = attention_shape(q, v, projection.size(0), /*fused=*/true, causal, scale);
  s.key_mask = key_mask_data(key_mask, q);
  return forward(s, q, k, v, projection, "favor_attention_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& projection, const at::Tensor& out, const at::Tensor& lognorm,
    const std::optional<at::Tensor>& key_mask, bool causal, double scale, int64_t chunk, bool projection_grad) {
  check_attention(q, k, v);
  check_projection(projection, q, scale);
  check_saved(grad_out, q, v, out, lognorm);
  check_chunk(chunk);
  auto s = attention_shape(q, v, projection.size(0), /*fused=*/true, causal, scale);
  s.key_mask = key_mask_data(key_mask, q);
  s.need_dw = projection_grad;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dw = at::zeros_like(projection);
  backward(s, grad_out, q, k, v, projection, out, lognorm, dq, dk, dv, projection_grad ? &dw : nullptr,
           "favor_attention_bwd");
  return {dq, dk, dv, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CUDA, m) {
  m.impl("favor_attention_fwd", &favor_attention_fwd_cuda);
  m.impl("favor_attention_bwd", &favor_attention_bwd_cuda);
}

}  // namespace okadfa
