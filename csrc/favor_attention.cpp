// favor_attention on the CPU: the FAVOR+ feature map fused into the chunked
// prefix-sum attention of chunked_attention.h, forward and backward.
#include <torch/library.h>

#include "checks.h"
#include "chunked_attention.h"

namespace okadfa {
namespace {

template <typename T>
cpu::AttentionProblem<T> favor_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& w, bool causal, double scale, int64_t chunk) {
  check_attention_inputs(q, k, v);
  check_projection(w, q, scale);
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), w.data_ptr<T>(),
          q.size(0) * q.size(1), q.size(2), q.size(3), w.size(0), v.size(3),
          /*fused=*/true, causal, static_cast<T>(std::sqrt(scale)), check_chunk(chunk)};
}

std::tuple<at::Tensor, at::Tensor> favor_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& projection,
                                                           bool causal, double scale, int64_t chunk) {
  auto out = at::empty_like(v);
  auto lognorm = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  check_attention_inputs(q, k, v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "favor_attention_fwd", [&] {
    auto p = favor_problem<scalar_t>(q, k, v, projection, causal, scale, chunk);
    cpu::ChunkedAttention<scalar_t>(p).forward(out.data_ptr<scalar_t>(), lognorm.data_ptr<scalar_t>());
  });
  return {out, lognorm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& projection, const at::Tensor& out, const at::Tensor& lognorm, bool causal, double scale,
    int64_t chunk, bool projection_grad) {
  check_saved(grad_out, q, v, out, lognorm);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dw = at::zeros_like(projection);
  check_attention_inputs(q, k, v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "favor_attention_bwd", [&] {
    auto p = favor_problem<scalar_t>(q, k, v, projection, causal, scale, chunk);
    cpu::ChunkedAttention<scalar_t>(p).backward(
        grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lognorm.data_ptr<scalar_t>(),
        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
        projection_grad ? dw.data_ptr<scalar_t>() : nullptr);
  });
  return {dq, dk, dv, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CPU, m) {
  m.impl("favor_attention_fwd", &favor_attention_fwd_cpu);
  m.impl("favor_attention_bwd", &favor_attention_bwd_cpu);
}

}  // namespace okadfa
