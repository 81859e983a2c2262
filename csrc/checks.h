// Input checks shared by the native ops. The Python layer validates first and
// raises ValueError/TypeError; these keep direct torch.ops.okadfa.* calls safe.
#pragma once

#include <ATen/ATen.h>

namespace okadfa {

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), "okadfa: ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, "okadfa: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "okadfa: ", name, " is on ", t.device(), " but expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "okadfa: ", name, " has dtype ", t.scalar_type(),
              " but expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "okadfa: ", name, " must be contiguous (the Python API makes it so)");
}

inline void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t expected) {
  TORCH_CHECK(t.size(d) == expected, "okadfa: ", name, " has size ", t.size(d), " in dimension ", d,
              " but expected ", expected, " (shape ", t.sizes(), ")");
}

// q, k: (B, H, T, Dq); v: (B, H, T, Dv); the same B, H, T.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_tensor(q, "q", 4, q);
  check_tensor(k, "k", 4, q);
  check_tensor(v, "v", 4, q);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "okadfa: the cpu kernels take float32 or float64, got ", q.scalar_type());
  for (int64_t d = 0; d < 3; ++d) {
    check_size(k, "k", d, q.size(d));
    check_size(v, "v", d, q.size(d));
  }
  check_size(k, "k", 3, q.size(3));
}

inline int64_t check_chunk(int64_t chunk) {
  TORCH_CHECK(chunk >= 1 && chunk <= 1024, "okadfa: chunk_size must be in [1, 1024], got ", chunk);
  return chunk;
}

}  // namespace okadfa
