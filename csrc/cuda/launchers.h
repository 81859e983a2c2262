// Host launchers of the CUDA kernels: raw device pointers, sizes and a stream, no
// torch types, so that the kernels (chunked_attention.cu, dfa_feedback.cu, dfa_head.cu)
// compile with nvcc alone. The bindings (<op>_binding.cpp) validate tensors, allocate outputs and
// workspaces and call these on the current stream. Every launcher returns the
// first launch error (cudaSuccess when all went well); it does not synchronise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace okadfa::cuda {

// ---- attention (favor_attention / linear_attention; csrc/chunked_attention.h semantics) ----
//
// Inputs, all contiguous: q, k (bh, tn, dq), v (bh, tn, dv), w (m, dq) for the fused
// FAVOR+ feature map (dq = Dk), or q, k given features (dq = m, w unused).
// Outputs: out (bh, tn, dv), lognorm (bh, tn) (forward); dq, dk, dv and dw (m, dq,
// optional) (backward). lognorm_t = log(den'_t) + aq_t + c_t exactly as on the CPU.
// key_mask (bh, tn), device memory, 1 = a real key: key padding as in chunked_attention.h.
struct AttentionShape {
  int64_t bh = 0, tn = 0, dq = 0, m = 0, dv = 0;
  const uint8_t* key_mask = nullptr;   // nullptr: every key is real
  bool fused = false, causal = false;
  double sqrt_scale = 1.0;   // √scale (fused only)
  bool need_dw = false;      // backward: compute the projection gradient
};

// Heads processed per pass so that the workspace stays bounded (every pass handles
// `group` heads; memory is linear in tn).
int64_t attention_group(const AttentionShape& s, bool backward, int64_t elem_size);
// Workspace elements (of the compute dtype) for one pass of `group` heads.
int64_t attention_workspace(const AttentionShape& s, bool backward, int64_t group);

template <typename T>
cudaError_t attention_forward(const AttentionShape& s, const T* q, const T* k, const T* v, const T* w, T* out,
                              T* lognorm, T* workspace, int64_t group, cudaStream_t stream);

// dw may be null (then not computed); when set it is overwritten.
template <typename T>
cudaError_t attention_backward(const AttentionShape& s, const T* grad_out, const T* q, const T* k, const T* v,
                               const T* w, const T* out, const T* lognorm, T* dq, T* dk, T* dv, T* dw, T* workspace,
                               int64_t group, cudaStream_t stream);

// ---- DFA (okadfa/reference/dfa.py semantics; csrc/philox.h for seeded entries) ----
// dfa_project: dfa_feedback.cu; softmax_xent: dfa_head.cu.
//
// out[p·out_stride + n·dim + i] = Σ_j e[n·E + j]·B_p[i, j] for p < points, n < rows, i < dim.
// B_p = stored[p] (stored: (points, dim, E) contiguous) or, when stored is null, the
// seeded matrix of point (shared ? 0 : p). One launch for every point.
template <typename T>
cudaError_t dfa_project(const T* e, int64_t rows, int64_t E, const T* stored, int64_t points, int64_t dim,
                        uint64_t seed, int dist, bool shared, T* out, int64_t out_stride, cudaStream_t stream);

// Row-wise softmax cross-entropy in place: logits (rows, V) become
// dy = (softmax − onehot(t)) / max(Nv, 1), zero for rows with t = ignore_index;
// loss_rows[n] = logsumexp(y_n) − y_n[t_n] (0 for ignored rows, NaN for a target
// outside [0, V)). n_valid: a device int64 holding Nv.
template <typename T>
cudaError_t softmax_xent(T* logits, int64_t rows, int64_t V, const int64_t* targets, int64_t ignore_index,
                         const int64_t* n_valid, T* loss_rows, cudaStream_t stream);

}  // namespace okadfa::cuda
