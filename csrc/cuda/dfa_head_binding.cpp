// dfa_head on CUDA: checks, the logit and gradient GEMMs (cuBLAS), the cross-entropy kernel
// (dfa_head.cu) and the projection launcher (dfa_feedback.cu). Built only in CUDA builds (setup.py).
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "dfa_projection.h"

namespace okadfa {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfa_head_cuda(
    const at::Tensor& h, const at::Tensor& w_dec, const at::Tensor& targets, const std::optional<at::Tensor>& feedback,
    int64_t points, int64_t dim, int64_t seed, int64_t dist, bool shared, int64_t ignore_index, bool logits_error,
    int64_t chunk_size) {
  check_head_inputs(h, w_dec, targets, chunk_size);
  check_cuda(h, "h");
  c10::cuda::CUDAGuard guard(h.device());
  {
    // As on the CPU: a target outside [0, V) that is not ignore_index is an error (this syncs once).
    const at::Tensor bad = targets.ne(ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(w_dec.size(0))));
    TORCH_CHECK(!bad.any().item<bool>(), "okadfa: targets must be in [0, ", w_dec.size(0), ") or equal ignore_index=",
                ignore_index, ", found ", targets.masked_select(bad)[0].item<int64_t>());
  }
  const at::ScalarType acc =
      at::promote_types(at::promote_types(h.scalar_type(), w_dec.scalar_type()), at::kFloat);
  const at::Tensor hc = h.to(acc).contiguous(), wc = w_dec.to(acc).contiguous(), tg = targets.contiguous();
  const int64_t N = hc.size(0), d = hc.size(1), V = wc.size(0), E = logits_error ? V : d;
  const Feedback fb = make_feedback(feedback, points, dim, seed, dist, shared, E, acc, hc);
  const auto opts = hc.options();
  at::Tensor n_valid = tg.ne(ignore_index).sum();   // int64, stays on the device (no sync)
  at::Tensor loss_rows = at::zeros({N}, opts);
  at::Tensor grad_h = at::zeros({N, d}, opts);
  at::Tensor grad_w = at::zeros({V, d}, opts);
  at::Tensor signals = at::zeros({fb.points, N, fb.dim}, opts);
  if (N > 0 && V > 0) {
    const int64_t rows_per = std::min(chunk_size, N);
    at::Tensor logits = at::empty({rows_per, V}, opts);
    const at::Tensor wt = wc.t();
    AT_DISPATCH_FLOATING_TYPES(acc, "dfa_head", [&] {
      for (int64_t r0 = 0; r0 < N; r0 += rows_per) {
        const int64_t rows = std::min(rows_per, N - r0);
        at::Tensor y = logits.narrow(0, 0, rows);
        const at::Tensor hr = hc.narrow(0, r0, rows);
        at::mm_out(y, hr, wt);   // logits of this chunk (cuBLAS)
        check_launch(cuda::softmax_xent<scalar_t>(y.data_ptr<scalar_t>(), rows, V, tg.data_ptr<int64_t>() + r0,
                                                  ignore_index, n_valid.data_ptr<int64_t>(),
                                                  loss_rows.data_ptr<scalar_t>() + r0, current_stream()),
                     "dfa_head cross-entropy");
        at::Tensor gh = grad_h.narrow(0, r0, rows);
        at::mm_out(gh, y, wc);     // grad_h = dy W_dec
        grad_w.addmm_(y.t(), hr);  // grad_w_dec += dyᵀ h
        const at::Tensor& e = logits_error ? y : gh;
        project_on_device<scalar_t>(fb, e.data_ptr<scalar_t>(), rows, E, signals.data_ptr<scalar_t>() + r0 * fb.dim,
                          N * fb.dim);
      }
    });
  }
  at::Tensor loss = loss_rows.sum() / n_valid.clamp_min(1).to(acc);
  return {loss, grad_h.to(h.scalar_type()), grad_w.to(w_dec.scalar_type()), signals.to(h.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CUDA, m) {
  m.impl("dfa_head", &dfa_head_cuda);
}

}  // namespace okadfa
