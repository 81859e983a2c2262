// dfa_head on the CPU: the output head with DFA signals (docs/design.md §4), row chunk
// by row chunk so that the N×V logits never exist whole. For rows c of a chunk:
//
//   y_c = h_c W_decᵀ (c×V workspace)  →  in place  dy_c = (softmax(y_c) − onehot)/Nv
//   loss += Σ (logsumexp(y_n) − y_n[t_n]),   grad_h[c] = dy_c W_dec,   grad_W_dec += dy_cᵀ h_c
//   error="logits": signals[:, c] = dy_c B_pᵀ
//
// (rows with t_n = ignore_index get dy = 0 and no loss). error="hidden" projects
// e = grad_h after the loop, all rows at once, so each seeded entry of the d×d
// matrices is generated once per call; with error="logits" the d×V matrices are
// regenerated once per chunk (the price of storing nothing: larger chunks, fewer
// regenerations). The chunks run one after another with multi-threaded GEMMs and
// row-parallel softmax, so the grad_W_dec sum has a fixed order: deterministic.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "checks.h"
#include "cpu_math.h"
#include "dfa_projection.h"

namespace okadfa::cpu {
namespace {

// Rows of y (rows×V) become dy in place; row_loss[r] = logsumexp(y_r) − y_r[t_r] (0 if ignored).
template <typename T>
void softmax_cross_entropy(T* y, int64_t rows, int64_t V, const int64_t* targets, int64_t ignore_index, T inv_nv,
                           double* row_loss) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = y + r * V;
      if (targets[r] == ignore_index) {
        std::fill(row, row + V, T(0));
        row_loss[r] = 0.0;
        continue;
      }
      T shift;
      row_max(row, 1, V, V, &shift);
      const T target_logit = row[targets[r]];
      exp_shift_rows(row, 1, V, V, &shift);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < V; ++j) sum += row[j];
      row_loss[r] = static_cast<double>(shift + std::log(sum) - target_logit);
      const T scale = inv_nv / sum;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) row[j] *= scale;
      row[targets[r]] -= inv_nv;
    }
  });
}

// The head's bfloat16 operands for its three GEMMs through oneDNN (cpu_math.h's bfloat16 gemm,
// multi-threaded, on AMX or AVX512-BF16): h and w_dec are the inputs themselves; dy (N×V) is
// rounded into `dy` chunk by chunk and both gradient GEMMs run once over all rows after the
// loop (one grad_w_dec product instead of one per chunk, each of which would have to be added
// into float32: measured, those additions cost more than the products). `product` holds oneDNN's
// bfloat16 gradient before it is widened into float32; a chunk's bfloat16 logits land in its dy
// slot, which the rounded dy then overwrites (no more memory than the unfused head). As in PyTorch's own
// bfloat16 head, each logit is rounded to bfloat16 once; softmax and the loss stay in float32.
// With `projection` the feedback projection takes bfloat16 operands too (dfa_projection.h's
// half_projection): the rounded dy (error="logits") or grad_h rounded into `product`.
struct HalfOperands {
  const c10::BFloat16* h = nullptr;
  const c10::BFloat16* w = nullptr;
  c10::BFloat16* dy = nullptr;
  c10::BFloat16* product = nullptr;
  bool projection = false;
};

template <typename T>
void dfa_head_kernel(const T* h, const T* w, const int64_t* targets, int64_t N, int64_t d, int64_t V,
                     int64_t ignore_index, int64_t n_valid, bool logits_error, int64_t chunk, const Feedback& fb,
                     const HalfOperands& half, T* loss, T* grad_h, T* grad_w, T* signals) {
  const T inv_nv = T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1));
  const int64_t dp = fb.dim;
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor logits = at::empty({std::min(chunk, N), V}, opts);
  at::Tensor row_loss = at::empty({N}, at::kDouble);
  T* y = logits.data_ptr<T>();
  bool in_half = false;
  if constexpr (std::is_same_v<T, float>) in_half = half.h != nullptr;
  // signals (rows from `out`) = e B_pᵀ for e given in T, or its bfloat16 copy `e_half`
  auto project = [&](const T* e, const c10::BFloat16* e_half, int64_t rows, int64_t lde, T* out) {
    if constexpr (std::is_same_v<T, float>) {
      if (half.projection) return project_feedback<float, c10::BFloat16>(fb, e_half, rows, lde, out, N * dp);
    }
    project_feedback<T, T>(fb, e, rows, lde, out, N * dp);
  };
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t n = std::min(chunk, N - r0);
    if constexpr (std::is_same_v<T, float>) {
      // oneDNN's bfloat16 logits go where this chunk's dy will be rounded to
      if (in_half) gemm(false, true, n, V, d, 1.0f, half.h + r0 * d, d, half.w, d, 0.0f, y, V, half.dy + r0 * V);
    }
    if (!in_half) gemm(false, true, n, V, d, T(1), h + r0 * d, d, w, d, T(0), y, V);
    softmax_cross_entropy(y, n, V, targets + r0, ignore_index, inv_nv, row_loss.data_ptr<double>() + r0);
    if constexpr (std::is_same_v<T, float>) {
      if (in_half) round_to(y, n, V, V, half.dy + r0 * V);
    }
    if (!in_half) {
      gemm(false, false, n, d, V, T(1), y, V, w, d, T(0), grad_h + r0 * d, d);
      gemm(true, false, V, d, n, T(1), y, V, h + r0 * d, d, r0 == 0 ? T(0) : T(1), grad_w, d);
    }
    if (logits_error) project(y, half.projection ? half.dy + r0 * V : nullptr, n, V, signals + r0 * dp);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (in_half && N > 0) {
      gemm(false, false, N, d, V, 1.0f, half.dy, V, half.w, d, 0.0f, grad_h, d, half.product);
      gemm(true, false, V, d, N, 1.0f, half.dy, V, half.h, d, 0.0f, grad_w, d, half.product);
    }
  }
  if (!logits_error) {
    if constexpr (std::is_same_v<T, float>) {
      if (half.projection) round_to(grad_h, N, d, d, half.product);
    }
    project(grad_h, half.product, N, d, signals);
  }
  const double* rl = row_loss.data_ptr<double>();
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) total += rl[r];
  *loss = static_cast<T>(total / static_cast<double>(std::max<int64_t>(n_valid, 1)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfa_head_cpu(
    const at::Tensor& h, const at::Tensor& w_dec, const at::Tensor& targets, const std::optional<at::Tensor>& feedback,
    int64_t points, int64_t dim, int64_t seed, int64_t dist, bool shared, int64_t ignore_index, bool logits_error,
    int64_t chunk_size) {
  check_head_inputs(h, w_dec, targets, chunk_size);
  const int64_t N = h.size(0), d = h.size(1), V = w_dec.size(0);
  const at::Tensor t = targets.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (tp[r] == ignore_index) continue;
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "okadfa: targets must be in [0, ", V, ") or equal ignore_index=",
                ignore_index, ", found ", tp[r]);
    ++n_valid;
  }
  const at::ScalarType acc = at::promote_types(at::promote_types(h.scalar_type(), w_dec.scalar_type()), at::kFloat);
  // bfloat16 h and w_dec: bfloat16 GEMMs wherever the attention kernels use them (half_gemm_path),
  // unless a chunk's product is below 64³ multiply-adds (oneDNN's per-call cost outweighs its speed);
  // then no float32 copies of h and w_dec are made.
  const int64_t rows = std::min(chunk_size, N);
  const bool use_half = h.scalar_type() == at::kBFloat16 && w_dec.scalar_type() == at::kBFloat16 &&
                        rows * V * d >= 64 * 64 * 64 && half_gemm_path(at::kBFloat16).engine != HalfGemm::kFloat32;
  const at::Tensor hc = use_half ? h.contiguous() : h.to(acc).contiguous();
  const at::Tensor wc = use_half ? w_dec.contiguous() : w_dec.to(acc).contiguous();
  const auto out_options = h.options().dtype(acc);
  const int64_t error_dim = logits_error ? V : d;
  const int64_t dp = feedback_rows(feedback, dim);
  const bool half_fb = use_half && half_projection(at::kBFloat16, logits_error ? rows : N, dp, error_dim);
  const Feedback fb = make_feedback(feedback, points, dim, seed, dist, shared, error_dim,
                                    half_fb ? at::kBFloat16 : acc, hc);
  at::Tensor loss = at::empty({}, out_options);
  at::Tensor grad_h = at::empty({N, d}, out_options);
  at::Tensor grad_w = N > 0 ? at::empty({V, d}, out_options) : at::zeros({V, d}, out_options);
  at::Tensor signals = at::empty({fb.points, N, fb.dim}, out_options);
  HalfOperands half;
  at::Tensor half_storage;
  if (use_half) {
    half_storage = at::empty({N * V + std::max(N * d, V * d)}, h.options());
    half = {hc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(), half_storage.data_ptr<c10::BFloat16>(),
            half_storage.data_ptr<c10::BFloat16>() + N * V, half_fb};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "dfa_head", [&] {
    // in half mode the kernel reads only `half`
    const scalar_t* hp = use_half ? nullptr : hc.data_ptr<scalar_t>();
    const scalar_t* wp = use_half ? nullptr : wc.data_ptr<scalar_t>();
    dfa_head_kernel<scalar_t>(hp, wp, tp, N, d, V, ignore_index, n_valid, logits_error, chunk_size, fb, half,
                              loss.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
                              signals.data_ptr<scalar_t>());
  });
  return {loss, grad_h.to(h.scalar_type()), grad_w.to(w_dec.scalar_type()), signals.to(h.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CPU, m) { m.impl("dfa_head", &dfa_head_cpu); }

}  // namespace okadfa::cpu
