// The feedback projection launch shared by the CUDA dfa_feedback and dfa_head bindings.
#pragma once

#include "../dfa_projection.h"
#include "binding.h"

namespace okadfa {

// out[p·out_stride + n·dim + i] = Σ_j e[n·E + j]·B_p[i, j] (kernel: dfa_feedback.cu).
template <typename T>
inline void project_on_device(const Feedback& fb, const T* e, int64_t rows, int64_t E, T* out, int64_t out_stride) {
  check_launch(cuda::dfa_project<T>(e, rows, E, fb.stored.defined() ? fb.stored.data_ptr<T>() : nullptr, fb.points,
                                    fb.dim, fb.seed, fb.dist, fb.shared, out, out_stride, current_stream()),
               "dfa feedback projection");
}

}  // namespace okadfa
