// Helpers of the CUDA bindings (csrc/cuda/<op>_binding.cpp, the only CUDA sources that include
// torch): device checks, launch errors, the current stream, and the forward/backward calls
// of the chunked attention launchers (launchers.h) shared by favor_attention and
// linear_attention. Argument checks shared with the CPU ops are in ../checks.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <tuple>

#include "../checks.h"
#include "launchers.h"

namespace okadfa {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "okadfa: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "okadfa: ", name, " must be a CUDA tensor for the cuda kernels, got one on ", t.device());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "okadfa: ", op, ": CUDA error: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// q, k (B, H, T, Dq), v (B, H, T, Dv): CUDA, same device and dtype (float32/float64), contiguous.
inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cuda(q, "q");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "okadfa: the cuda kernels take float32 or float64 (half types are computed in float32 by the "
              "Python layer), got ",
              q.scalar_type());
  check_attention_inputs(q, k, v);   // dims, device, dtype, contiguity, sizes
}

inline cuda::AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& v, int64_t m, bool fused, bool causal,
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
inline const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

inline std::tuple<at::Tensor, at::Tensor> forward(const cuda::AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
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

inline void backward(const cuda::AttentionShape& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
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

}  // namespace okadfa
