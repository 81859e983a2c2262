// The feedback argument of the DFA ops (every device: csrc/ and csrc/cuda/), and the
// feedback projection shared by the dfa_feedback and dfa_head CPU kernels:
//
//   out[p, n, i] = Σ_j e[n, j]·B_p[i, j]     (g_p = e B_pᵀ, docs/design.md §4)
//
// B_p is either a stored tensor (P, d, E) or seeded: its entries are regenerated
// tile by tile from (seed, p, i, j) with philox.h (okadfa/feedback.py is
// the normative definition), so no matrix is ever materialised whole.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>

namespace okadfa {

// The feedback argument of the ops: `stored` (P, d, E) in the compute dtype, or
// undefined for seeded matrices described by the other fields.
struct Feedback {
  at::Tensor stored;
  int64_t points = 0, dim = 0, error_dim = 0;
  uint64_t seed = 0;
  int dist = 0;
  bool shared = false;
};

// The rows of each feedback matrix: a stored tensor's (P, d, E) d, else the `dim` argument
// (before make_feedback, which checks the tensor).
inline int64_t feedback_rows(const std::optional<at::Tensor>& feedback, int64_t dim) {
  return feedback.has_value() && feedback->defined() && feedback->dim() == 3 ? feedback->size(1) : dim;
}

// Checks the op arguments (stored shape and device, points/dim/dist ranges) and
// casts a stored tensor to `dtype`. `like` gives the device.
Feedback make_feedback(const std::optional<at::Tensor>& feedback, int64_t points, int64_t dim, int64_t seed,
                       int64_t dist, bool shared, int64_t error_dim, at::ScalarType dtype, const at::Tensor& like);

}  // namespace okadfa

namespace okadfa::cpu {

// out[p·point_stride + n·d + i] = Σ_j e[n·lde + j]·B_p[i, j] for p < P, n < rows, i < d.
// Parallel over (point, tile of B's rows): each seeded entry is generated once per call;
// every task writes its own part of out, so the result does not depend on the threads.
// G = T, or G = bfloat16 with T = float: e and B (the stored matrices, or the seeded
// entries rounded once) in bfloat16, each tile's product through cpu_math.h's bfloat16 GEMM
// (float32 accumulation) added into the float32 out.
template <typename T, typename G = T>
void project_feedback(const Feedback& fb, const G* e, int64_t rows, int64_t lde, T* out, int64_t point_stride);

// Whether a projection of `rows` errors of dtype `dtype` (bfloat16 only) through (dim, error_dim)
// matrices takes bfloat16 operands: where the attention kernels use a bfloat16 engine and a
// tile's product has at least 64³ multiply-adds (below, oneDNN's per-call cost outweighs its speed).
bool half_projection(at::ScalarType dtype, int64_t rows, int64_t dim, int64_t error_dim);

}  // namespace okadfa::cpu
