// favor_attention on the CPU: the FAVOR+ feature map fused into the chunked
// prefix-sum attention of chunked_attention.h, forward and backward.
#include <torch/library.h>

#include "checks.h"
#include "chunked_attention.h"

namespace okadfa {
namespace {

template <typename T>
cpu::AttentionProblem<T> favor_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& w, const uint8_t* key_mask, bool causal, double scale,
                                       int64_t chunk) {
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), w.data_ptr<T>(), key_mask,
          q.size(0) * q.size(1), q.size(2), q.size(3), w.size(0), v.size(3),
          /*fused=*/true, causal, static_cast<T>(std::sqrt(scale)), check_chunk(chunk)};
}

// out and lognorm in the compute dtype (float32 for half inputs, see check_attention_inputs).
std::tuple<at::Tensor, at::Tensor> favor_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, const at::Tensor& projection_in,
                                                           const std::optional<at::Tensor>& key_mask, bool causal,
                                                           double scale, int64_t chunk) {
  check_attention_inputs(q_in, k_in, v_in);
  check_projection(projection_in, q_in, scale);
  const uint8_t* mask = key_mask_data(key_mask, q_in);
  const at::Tensor q = computed(q_in), k = computed(k_in), v = computed(v_in), w = computed(projection_in);
  auto out = at::empty_like(v);
  auto lognorm = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  cpu::dispatch_compute(q_in.scalar_type(), "favor_attention_fwd", [&](auto t, auto g) {
    using T = decltype(t);
    auto p = favor_problem<T>(q, k, v, w, mask, causal, scale, chunk);
    cpu::ChunkedAttention<T, decltype(g)>(p).forward(out.data_ptr<T>(), lognorm.data_ptr<T>());
  });
  return {out, lognorm};
}

// Gradients in the dtypes of q, k, v and projection.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& projection_in, const at::Tensor& out, const at::Tensor& lognorm,
    const std::optional<at::Tensor>& key_mask, bool causal, double scale, int64_t chunk, bool projection_grad) {
  check_attention_inputs(q_in, k_in, v_in);
  check_projection(projection_in, q_in, scale);
  const uint8_t* mask = key_mask_data(key_mask, q_in);
  check_saved(grad_out, q_in, v_in, out, lognorm);
  const at::Tensor q = computed(q_in), k = computed(k_in), v = computed(v_in), w = computed(projection_in);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dw = at::zeros_like(w);
  cpu::dispatch_compute(q_in.scalar_type(), "favor_attention_bwd", [&](auto t, auto g) {
    using T = decltype(t);
    auto p = favor_problem<T>(q, k, v, w, mask, causal, scale, chunk);
    cpu::ChunkedAttention<T, decltype(g)>(p).backward(
        grad_out.data_ptr<T>(), out.data_ptr<T>(), lognorm.data_ptr<T>(), dq.data_ptr<T>(), dk.data_ptr<T>(),
        dv.data_ptr<T>(), projection_grad ? dw.data_ptr<T>() : nullptr);
  });
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type()),
          dw.to(projection_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CPU, m) {
  m.impl("favor_attention_fwd", &favor_attention_fwd_cpu);
  m.impl("favor_attention_bwd", &favor_attention_bwd_cpu);
}

}  // namespace okadfa
