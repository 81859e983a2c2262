// Input checks shared by the native ops, CPU (csrc/<op>.cpp) and CUDA (csrc/cuda/<op>.cpp)
// alike. The Python layer (okadfa/validation.py) validates first and raises
// ValueError/TypeError; these keep direct torch.ops.okadfa.* calls safe.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace okadfa {

// t: dim dimensions, contiguous, on like's device, of dtype (default: like's).
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like,
                         std::optional<at::ScalarType> dtype = std::nullopt) {
  const at::ScalarType want = dtype.value_or(like.scalar_type());
  TORCH_CHECK(t.defined(), "okadfa: ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, "okadfa: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "okadfa: ", name, " is on ", t.device(), " but expected ", like.device());
  TORCH_CHECK(t.scalar_type() == want, "okadfa: ", name, " has dtype ", t.scalar_type(), " but expected ", want);
  TORCH_CHECK(t.is_contiguous(), "okadfa: ", name, " must be contiguous (the Python API makes it so)");
}

// The dtype the attention kernels compute inputs of x's dtype in (half types: float32), and x in it.
inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::Tensor computed(const at::Tensor& x) { return x.to(compute_type(x)); }

inline void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t expected) {
  TORCH_CHECK(t.size(d) == expected, "okadfa: ", name, " has size ", t.size(d), " in dimension ", d,
              " but expected ", expected, " (shape ", t.sizes(), ")");
}

// q, k: (B, H, T, Dq); v: (B, H, T, Dv); the same B, H, T.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_tensor(q, "q", 4, q);
  check_tensor(k, "k", 4, q);
  check_tensor(v, "v", 4, q);
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "okadfa: the cpu kernels take float64, float32, bfloat16 or float16, got ", t);
  for (int64_t d = 0; d < 3; ++d) {
    check_size(k, "k", d, q.size(d));
    check_size(v, "v", d, q.size(d));
  }
  check_size(k, "k", 3, q.size(3));
}

// key_mask: None, or a bool (B, H, T) tensor over q's first three dimensions (true = a real
// key, okadfa/reference/attention.py). Returns its bytes, or nullptr for None.
inline const uint8_t* key_mask_data(const std::optional<at::Tensor>& key_mask, const at::Tensor& q) {
  if (!key_mask.has_value() || !key_mask->defined()) return nullptr;
  check_tensor(*key_mask, "key_mask", 3, q, at::kBool);
  TORCH_CHECK(key_mask->sizes() == q.sizes().slice(0, 3), "okadfa: key_mask must have shape ", q.sizes().slice(0, 3),
              ", got ", key_mask->sizes());
  return reinterpret_cast<const uint8_t*>(key_mask->data_ptr<bool>());
}

// The saved tensors a backward op receives: grad_out and out like v, lognorm (B, H, T), all
// three in the compute dtype (float32 for half inputs: what the forward returned).
inline void check_saved(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v, const at::Tensor& out,
                        const at::Tensor& lognorm) {
  check_tensor(grad_out, "grad_out", 4, q, compute_type(q));
  check_tensor(out, "out", 4, q, compute_type(q));
  check_tensor(lognorm, "lognorm", 3, q, compute_type(q));
  TORCH_CHECK(grad_out.sizes() == v.sizes() && out.sizes() == v.sizes(), "okadfa: grad_out and out must match v");
  TORCH_CHECK(lognorm.sizes() == q.sizes().slice(0, 3), "okadfa: lognorm must have shape ", q.sizes().slice(0, 3),
              ", got ", lognorm.sizes());
}

// favor_attention's projection (M, Dk) and scale.
inline void check_projection(const at::Tensor& projection, const at::Tensor& q, double scale) {
  check_tensor(projection, "projection", 2, q);
  check_size(projection, "projection", 1, q.size(3));
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "okadfa: scale must be positive and finite, got ", scale);
}

// dfa_feedback's error (N, E).
inline void check_error(const at::Tensor& error) {
  TORCH_CHECK(error.defined() && error.dim() == 2, "okadfa: error must have shape (N, E), got ", error.sizes());
  TORCH_CHECK(at::isFloatingType(error.scalar_type()), "okadfa: error must be floating point, got ",
              error.scalar_type());
}

// dfa_head's h (N, d), w_dec (V, d), targets (N,) int64 on one device, and chunk_size
// (the target range is checked where the targets are read: on the host or with one sync).
inline void check_head_inputs(const at::Tensor& h, const at::Tensor& w_dec, const at::Tensor& targets,
                              int64_t chunk_size) {
  TORCH_CHECK(h.defined() && h.dim() == 2 && at::isFloatingType(h.scalar_type()),
              "okadfa: h must be a floating (N, d) tensor, got ", h.scalar_type(), " ", h.sizes());
  TORCH_CHECK(w_dec.defined() && w_dec.dim() == 2 && at::isFloatingType(w_dec.scalar_type()) &&
                  w_dec.size(1) == h.size(1),
              "okadfa: w_dec must be a floating (V, ", h.size(1), ") tensor, got ", w_dec.scalar_type(), " ",
              w_dec.sizes());
  TORCH_CHECK(targets.defined() && targets.dim() == 1 && targets.size(0) == h.size(0) &&
                  targets.scalar_type() == at::kLong,
              "okadfa: targets must be an int64 tensor of shape (", h.size(0), "), got ", targets.scalar_type(), " ",
              targets.sizes());
  TORCH_CHECK(w_dec.device() == h.device() && targets.device() == h.device(),
              "okadfa: h, w_dec and targets must be on one device");
  TORCH_CHECK(chunk_size >= 1, "okadfa: chunk_size must be positive, got ", chunk_size);
}

// 1024 = okadfa.validation.MAX_CHUNK (tests/test_favor_attention.py checks that they agree).
inline int64_t check_chunk(int64_t chunk) {
  TORCH_CHECK(chunk >= 1 && chunk <= 1024, "okadfa: chunk_size must be in [1, 1024], got ", chunk);
  return chunk;
}

}  // namespace okadfa
