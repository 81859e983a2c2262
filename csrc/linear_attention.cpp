// linear_attention on the CPU: the chunked prefix-sum attention of
// chunked_attention.h on features the caller computed (non-negative).
#include <torch/library.h>

#include "checks.h"
#include "chunked_attention.h"

namespace okadfa {
namespace {

template <typename T>
cpu::AttentionProblem<T> linear_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        bool causal, int64_t chunk) {
  check_attention_inputs(q, k, v);
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), nullptr,
          q.size(0) * q.size(1), q.size(2), q.size(3), q.size(3), v.size(3),
          /*fused=*/false, causal, T(1), check_chunk(chunk)};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, bool causal, int64_t chunk) {
  auto out = at::empty_like(v);
  auto lognorm = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  check_attention_inputs(q, k, v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_attention_fwd", [&] {
    auto p = linear_problem<scalar_t>(q, k, v, causal, chunk);
    cpu::ChunkedAttention<scalar_t>(p).forward(out.data_ptr<scalar_t>(), lognorm.data_ptr<scalar_t>());
  });
  return {out, lognorm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lognorm, bool causal, int64_t chunk) {
  check_saved(grad_out, q, v, out, lognorm);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  check_attention_inputs(q, k, v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_attention_bwd", [&] {
    auto p = linear_problem<scalar_t>(q, k, v, causal, chunk);
    cpu::ChunkedAttention<scalar_t>(p).backward(
        grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lognorm.data_ptr<scalar_t>(),
        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), nullptr);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CPU, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cpu);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cpu);
}

}  // namespace okadfa
