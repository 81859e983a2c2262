// CUDA registrations of the okadfa ops (schemas: csrc/registration.cpp). This is
// the only CUDA source that includes torch: it checks the tensors, allocates
// outputs and workspaces (through torch's caching allocator), and calls the
// torch-free launchers of launchers.h on the current stream. Built only in CUDA
// builds (setup.py); uses no torch API newer than 2.4.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "launchers.h"

namespace okadfa {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "okadfa: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "okadfa: ", name, " must be a CUDA tensor for the cuda kernels, got one on ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "okadfa: ", op, ": CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// q, k (B, H, T, Dq), v (B, H, T, Dv): CUDA, same device and dtype (float32/float64), contiguous.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cuda(q, "q");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "okadfa: the cuda kernels take float32 or float64 (half types are computed in float32 by the "
              "Python layer), got ",
              q.scalar_type());
  check_attention_inputs(q, k, v);   // dims, device, dtype, contiguity, sizes
}

void check_saved(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v, const at::Tensor& out,
                 const at::Tensor& lognorm) {
  check_tensor(grad_out, "grad_out", 4, q);
  check_tensor(out, "out", 4, q);
  check_tensor(lognorm, "lognorm", 3, q);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && out.sizes() == v.sizes(), "okadfa: grad_out and out must match v");
  TORCH_CHECK(lognorm.sizes() == q.sizes().slice(0, 3), "okadfa: lognorm must have shape ", q.sizes().slice(0, 3),
              ", got ", lognorm.sizes());
}

cuda::AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& v, int64_t m, bool fused, bool causal,
                                     double scale) {
  cuda::AttentionShape s;
  s.bh = q.size(0) * q.size(1);
  s.tn = q.size(2);
  s.dq = q.size(3);
  s.m = m;
  s.dv = v.size(3);
  s.fused = fused;
  s.causal = causal;
  s.sqrt_scale = std::sqrt(scale);
  return s;
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> forward(const cuda::AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& w, const char* op) {
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(v);
  auto lognorm = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "okadfa_attention_cuda", [&] {
    const int64_t group = cuda::attention_group(s, false, sizeof(scalar_t));
    auto ws = at::empty({cuda::attention_workspace(s, false, group)}, q.options());
    check_launch(cuda::attention_forward<scalar_t>(s, ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v),
                                                   ptr<scalar_t>(w), out.data_ptr<scalar_t>(),
                                                   lognorm.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), group,
                                                   current_stream()),
                 op);
  });
  return {out, lognorm};
}

void backward(const cuda::AttentionShape& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& w, const at::Tensor& out, const at::Tensor& lognorm,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor* dw, const char* op) {
  c10::cuda::CUDAGuard guard(q.device());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "okadfa_attention_cuda", [&] {
    const int64_t group = cuda::attention_group(s, true, sizeof(scalar_t));
    auto ws = at::empty({cuda::attention_workspace(s, true, group)}, q.options());
    check_launch(cuda::attention_backward<scalar_t>(
                     s, ptr<scalar_t>(grad_out), ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v),
                     ptr<scalar_t>(w), ptr<scalar_t>(out), ptr<scalar_t>(lognorm), dq.data_ptr<scalar_t>(),
                     dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dw ? dw->data_ptr<scalar_t>() : nullptr,
                     ws.data_ptr<scalar_t>(), group, current_stream()),
                 op);
  });
}

void check_projection(const at::Tensor& projection, const at::Tensor& q, double scale) {
  check_tensor(projection, "projection", 2, q);
  check_size(projection, "projection", 1, q.size(3));
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "okadfa: scale must be positive and finite, got ", scale);
}

// ------------------------------------------------------------------ attention ops

std::tuple<at::Tensor, at::Tensor> favor_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& projection,
                                                            bool causal, double scale, int64_t chunk) {
  check_attention(q, k, v);
  check_projection(projection, q, scale);
  check_chunk(chunk);   // validated for parity with the CPU op; the CUDA kernels use their own tiles
  const auto s = attention_shape(q, v, projection.size(0), /*fused=*/true, causal, scale);
  return forward(s, q, k, v, projection, "favor_attention_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& projection, const at::Tensor& out, const at::Tensor& lognorm, bool causal, double scale,
    int64_t chunk, bool projection_grad) {
  check_attention(q, k, v);
  check_projection(projection, q, scale);
  check_saved(grad_out, q, v, out, lognorm);
  check_chunk(chunk);
  auto s = attention_shape(q, v, projection.size(0), /*fused=*/true, causal, scale);
  s.need_dw = projection_grad;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dw = at::zeros_like(projection);
  backward(s, grad_out, q, k, v, projection, out, lognorm, dq, dk, dv, projection_grad ? &dw : nullptr,
           "favor_attention_bwd");
  return {dq, dk, dv, dw};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, bool causal, int64_t chunk) {
  check_attention(q, k, v);
  check_chunk(chunk);
  const auto s = attention_shape(q, v, q.size(3), /*fused=*/false, causal, 1.0);
  return forward(s, q, k, v, at::Tensor(), "linear_attention_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lognorm, bool causal, int64_t chunk) {
  check_attention(q, k, v);
  check_saved(grad_out, q, v, out, lognorm);
  check_chunk(chunk);
  const auto s = attention_shape(q, v, q.size(3), /*fused=*/false, causal, 1.0);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward(s, grad_out, q, k, v, at::Tensor(), out, lognorm, dq, dk, dv, nullptr, "linear_attention_bwd");
  return {dq, dk, dv};
}

// ------------------------------------------------------------------ DFA ops

// The feedback argument: stored (P, d, E) cast to the compute dtype, or seeded (empty `stored`).
struct Feedback {
  at::Tensor stored;
  int64_t points = 0, dim = 0;
  uint64_t seed = 0;
  int dist = 0;
  bool shared = false;
};

Feedback make_feedback(const std::optional<at::Tensor>& feedback, int64_t points, int64_t dim, int64_t seed,
                       int64_t dist, bool shared, int64_t error_dim, at::ScalarType acc, const at::Tensor& like) {
  Feedback fb;
  if (feedback.has_value() && feedback->defined()) {
    const at::Tensor& b = *feedback;
    TORCH_CHECK(b.dim() == 3 && b.size(2) == error_dim, "okadfa: feedback must have shape (P, d, ", error_dim,
                "), got ", b.sizes());
    TORCH_CHECK(b.device() == like.device(), "okadfa: feedback is on ", b.device(), " but expected ", like.device());
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), "okadfa: feedback must be floating point, got ",
                b.scalar_type());
    fb.stored = b.to(acc).contiguous();
    fb.points = b.size(0);
    fb.dim = b.size(1);
    return fb;
  }
  TORCH_CHECK(points >= 0 && points <= std::numeric_limits<uint32_t>::max(),
              "okadfa: points must be in [0, 2**32), got ", points);
  TORCH_CHECK(dim >= 0, "okadfa: dim must be non-negative, got ", dim);
  TORCH_CHECK(dist == 0 || dist == 1, "okadfa: dist must be 0 (normal) or 1 (uniform), got ", dist);
  fb.points = points;
  fb.dim = dim;
  fb.seed = static_cast<uint64_t>(seed);   // the uint64 seed, passed as int64 bits
  fb.dist = static_cast<int>(dist);
  fb.shared = shared;
  return fb;
}

template <typename T>
void project(const Feedback& fb, const T* e, int64_t rows, int64_t E, T* out, int64_t out_stride) {
  check_launch(cuda::dfa_project<T>(e, rows, E, fb.stored.defined() ? fb.stored.data_ptr<T>() : nullptr, fb.points,
                                    fb.dim, fb.seed, fb.dist, fb.shared, out, out_stride, current_stream()),
               "dfa feedback projection");
}

at::Tensor dfa_feedback_cuda(const at::Tensor& error, const std::optional<at::Tensor>& feedback, int64_t points,
                             int64_t dim, int64_t seed, int64_t dist, bool shared) {
  check_cuda(error, "error");
  TORCH_CHECK(error.dim() == 2, "okadfa: error must have shape (N, E), got ", error.sizes());
  TORCH_CHECK(at::isFloatingType(error.scalar_type()), "okadfa: error must be floating point, got ",
              error.scalar_type());
  c10::cuda::CUDAGuard guard(error.device());
  const at::ScalarType acc = at::promote_types(error.scalar_type(), at::kFloat);
  const at::Tensor e = error.to(acc).contiguous();
  const Feedback fb = make_feedback(feedback, points, dim, seed, dist, shared, e.size(1), acc, e);
  at::Tensor out = at::empty({fb.points, e.size(0), fb.dim}, e.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "dfa_feedback", [&] {
    project<scalar_t>(fb, e.data_ptr<scalar_t>(), e.size(0), e.size(1), out.data_ptr<scalar_t>(),
                      e.size(0) * fb.dim);
  });
  return out.to(error.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfa_head_cuda(
    const at::Tensor& h, const at::Tensor& w_dec, const at::Tensor& targets, const std::optional<at::Tensor>& feedback,
    int64_t points, int64_t dim, int64_t seed, int64_t dist, bool shared, int64_t ignore_index, bool logits_error,
    int64_t chunk_size) {
  check_cuda(h, "h");
  TORCH_CHECK(h.dim() == 2 && at::isFloatingType(h.scalar_type()), "okadfa: h must be a floating (N, d) tensor, got ",
              h.scalar_type(), " of shape ", h.sizes());
  TORCH_CHECK(w_dec.defined() && w_dec.dim() == 2 && at::isFloatingType(w_dec.scalar_type()),
              "okadfa: w_dec must be a floating (V, d) tensor");
  TORCH_CHECK(w_dec.size(1) == h.size(1), "okadfa: w_dec must have shape (V, ", h.size(1), "), got ", w_dec.sizes());
  TORCH_CHECK(w_dec.device() == h.device(), "okadfa: w_dec is on ", w_dec.device(), " but h is on ", h.device());
  TORCH_CHECK(targets.defined() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == h.size(0),
              "okadfa: targets must be an int64 tensor of shape (", h.size(0), ",)");
  TORCH_CHECK(targets.device() == h.device(), "okadfa: targets is on ", targets.device(), " but h is on ",
              h.device());
  TORCH_CHECK(chunk_size >= 1, "okadfa: chunk_size must be positive, got ", chunk_size);
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
        project<scalar_t>(fb, e.data_ptr<scalar_t>(), rows, E, signals.data_ptr<scalar_t>() + r0 * fb.dim,
                          N * fb.dim);
      }
    });
  }
  at::Tensor loss = loss_rows.sum() / n_valid.clamp_min(1).to(acc);
  return {loss, grad_h.to(h.scalar_type()), grad_w.to(w_dec.scalar_type()), signals.to(h.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CUDA, m) {
  m.impl("favor_attention_fwd", &favor_attention_fwd_cuda);
  m.impl("favor_attention_bwd", &favor_attention_bwd_cuda);
  m.impl("linear_attention_fwd", &linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cuda);
  m.impl("dfa_feedback", &dfa_feedback_cuda);
  m.impl("dfa_head", &dfa_head_cuda);
}

}  // namespace okadfa
