// dfa_feedback on CUDA: checks, allocation and the projection launcher (kernel: dfa_feedback.cu).
// Built only in CUDA builds (setup.py).
#include <torch/library.h>

#include <optional>

#include "dfa_projection.h"

namespace okadfa {
namespace {

at::Tensor dfa_feedback_cuda(const at::Tensor& error, const std::optional<at::Tensor>& feedback, int64_t points,
                             int64_t dim, int64_t seed, int64_t dist, bool shared) {
  check_error(error);
  check_cuda(error, "error");
  c10::cuda::CUDAGuard guard(error.device());
  const at::ScalarType acc = at::promote_types(error.scalar_type(), at::kFloat);
  const at::Tensor e = error.to(acc).contiguous();
  const Feedback fb = make_feedback(feedback, points, dim, seed, dist, shared, e.size(1), acc, e);
  at::Tensor out = at::empty({fb.points, e.size(0), fb.dim}, e.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "dfa_feedback", [&] {
    project_on_device<scalar_t>(fb, e.data_ptr<scalar_t>(), e.size(0), e.size(1), out.data_ptr<scalar_t>(),
                      e.size(0) * fb.dim);
  });
  return out.to(error.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CUDA, m) {
  m.impl("dfa_feedback", &dfa_feedback_cuda);
}

}  // namespace okadfa
