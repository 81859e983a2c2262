// Small dense building blocks for the CPU kernels: a row-major GEMM on top of
// the BLAS that torch links (MKL's or OpenBLAS's sgemm_/dgemm_), a GEMM on half-type
// operands (oneDNN's, through at::mm), the choice between them for half inputs, and
// vectorisable element-wise loops (exp with a row shift, row maxima).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>

namespace okadfa::cpu {

// C[m×n] = alpha · op(A) · op(B) + beta · C, every matrix row-major with its
// leading dimension. op(X) = Xᵀ when the trans flag is set.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

// The same with A and B in bfloat16 and C in float32: the product is oneDNN's (at::mm: float32
// accumulation, rounded to bfloat16 once), added into C in float32. Fast where the CPU has
// bfloat16 matrix instructions (see half_gemm_path). scratch: m·n bfloat16 for the product
// (nullptr: allocated).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc,
          c10::BFloat16* scratch = nullptr);

// The float32 GEMM above with op(A) and op(B) rounded to bfloat16 and multiplied on AMX tiles,
// the products summed in float32 straight into C (amx_gemm.cpp). One thread; only after
// amx_enable() said yes. scratch: amx_packed_size(m, k) + amx_packed_size(n, k) bfloat16 for the
// packed operands. The second form takes op(B) packed once by amx_pack_b (amx_packed_size(n, k)
// bfloat16), for an operand that several products share; its scratch needs amx_packed_size(m, k).
void gemm_amx(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc, c10::BFloat16* scratch);
void gemm_amx(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const c10::BFloat16* packed_b, float beta, float* c, int64_t ldc, c10::BFloat16* scratch);
void amx_pack_b(bool trans_b, int64_t k, int64_t n, const float* b, int64_t ldb, c10::BFloat16* out);
int64_t amx_packed_size(int64_t rows, int64_t k);
// Asks the OS for the AMX tile state (once per process): whether this process may use AMX.
bool amx_enable();

// C = beta·C, the product of an empty sum (beta 0: C is not read, it may hold anything).
template <typename T>
void scale_by_beta(int64_t m, int64_t n, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
}

// out[r·cols + j] = x[r·ld + j] rounded to bfloat16 (nearest even; NaN stays NaN), r < rows, j < cols.
void round_to(const float* x, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* out);

// How the CPU kernels multiply matrices for inputs of a half dtype. bfloat16: on AMX tiles
// (gemm_amx) where the CPU has AMX-BF16 and the OS grants it, else through oneDNN (the bfloat16
// gemm) where the CPU has AVX512-BF16 and torch has oneDNN enabled, else in float32. The
// environment variable OKADFA_CPU_HALF_GEMM=amx|onednn|float32 forces one (tests, comparisons;
// "half": the best bfloat16 engine here). float16: always float32, since the kernels' running
// sums leave float16's range.
enum class HalfGemm { kFloat32, kOneDnn, kAmx };
struct HalfGemmPath {
  HalfGemm engine;
  std::string reason;   // why, in words (okadfa.backends() shows it)
};
HalfGemmPath half_gemm_path(at::ScalarType dtype);

// body(T{}, G{}) with the compute type T and GEMM operand type G of the kernels for inputs of
// `dtype`: float64 and float32 as they are; half types computed in float32 (the caller converts
// them), their GEMMs in bfloat16 or in float32 as half_gemm_path says.
template <typename Body>
void dispatch_compute(at::ScalarType dtype, const char* name, Body&& body) {
  switch (dtype) {
    case at::kDouble: return body(double{}, double{});
    case at::kFloat: return body(float{}, float{});
    case at::kBFloat16:
      if (half_gemm_path(dtype).engine != HalfGemm::kFloat32) return body(float{}, c10::BFloat16{});
      return body(float{}, float{});
    case at::kHalf: return body(float{}, float{});
    default:
      TORCH_CHECK(false, "okadfa: ", name, " takes float64, float32, bfloat16 or float16, got ", dtype);
  }
}

// x[r, j] = exp(x[r, j] - shift[r]) for r < rows, j < cols (row stride ld).
// Arguments are expected to be <= 0 (stabilised); -inf gives 0.
void exp_shift_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* shift);
void exp_shift_rows(double* x, int64_t rows, int64_t cols, int64_t ld, const double* shift);

// out[r] = max_j x[r, j].
void row_max(const float* x, int64_t rows, int64_t cols, int64_t ld, float* out);
void row_max(const double* x, int64_t rows, int64_t cols, int64_t ld, double* out);

// A[t, s] *= exp(c_s - c_t) for s <= t and 0 above the diagonal (A is n×n, row
// stride lda). uniform: c is constant, only the mask applies.
void causal_decay(float* a, int64_t lda, int64_t n, const float* c, bool uniform);
void causal_decay(double* a, int64_t lda, int64_t n, const double* c, bool uniform);

// Scalar exp used for the per-position stabiliser factors (same accuracy as above).
float exp_scalar(float x);
double exp_scalar(double x);

}  // namespace okadfa::cpu
