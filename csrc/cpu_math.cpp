// See cpu_math.h. The GEMM calls the Fortran BLAS symbols that libtorch_cpu
// exports (MKL in the official wheels). They are declared weak so that a torch
// built without an exported BLAS still loads us; then at::addmm_out is used.
#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace okadfa::cpu {

namespace {

template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = ta ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  auto B = tb ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) C.zero_();
  at::addmm_out(C, C, A, B, beta, alpha);
}

// Row-major C = op(A)op(B) is column-major Cᵀ = op(B)ᵀop(A)ᵀ: swap the operands.
template <typename T, typename F>
void gemm_impl(F blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (blas == nullptr || m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax ||
      ldc > kMax) {
    gemm_fallback(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int LDB = static_cast<int>(std::max<int64_t>(lda, 1));
  const int LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
  blas(&opb, &opa, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

// exp(x) for x <= ~0 as a branch-free polynomial the compiler vectorises:
// x = n·ln2 + r with |r| <= ln2/2 (n rounded to nearest) (Cody–Waite split of ln2), e^r by a degree-7
// minimax polynomial (the Cephes expf coefficients), 2^n by building the exponent
// bits. Below -87.3 the result flushes to 0, which is what the stabilised
// features want (their true value is below FLT_MIN anyway). Max error ~2 ulp.
inline float exp_poly(float x_in) {
  float x = x_in < -87.3f ? -87.3f : x_in;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding 1.5·2²³ (no floorf call, so the loop vectorises).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  e = e < 0 ? 0 : e;
  const int32_t bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x_in < -87.3f ? 0.0f : p * scale;
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_impl(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void exp_shift_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    const float s = shift[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = exp_poly(row[j] - s);
  }
}

void exp_shift_rows(double* x, int64_t rows, int64_t cols, int64_t ld, const double* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    double* row = x + r * ld;
    const double s = shift[r];
    for (int64_t j = 0; j < cols; ++j) row[j] = std::exp(row[j] - s);
  }
}

// NaNs are skipped here; they still propagate through exp(x - max).
__attribute__((target_clones("avx512f", "avx2", "default")))
void row_max(const float* x, int64_t rows, int64_t cols, int64_t ld, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < cols; ++j) m = row[j] > m ? row[j] : m;
    out[r] = m;
  }
}

void row_max(const double* x, int64_t rows, int64_t cols, int64_t ld, double* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = x + r * ld;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < cols; ++j) m = row[j] > m ? row[j] : m;
    out[r] = m;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void causal_decay(float* a, int64_t lda, int64_t n, const float* c, bool uniform) {
  for (int64_t t = 0; t < n; ++t) {
    float* row = a + t * lda;
    const float ct = c[t];
    if (!uniform) {
#pragma omp simd
      for (int64_t s = 0; s <= t; ++s) row[s] *= exp_poly(c[s] - ct);
    }
    for (int64_t s = t + 1; s < n; ++s) row[s] = 0.0f;
  }
}

void causal_decay(double* a, int64_t lda, int64_t n, const double* c, bool uniform) {
  for (int64_t t = 0; t < n; ++t) {
    double* row = a + t * lda;
    for (int64_t s = 0; s <= t; ++s) row[s] *= uniform ? 1.0 : std::exp(c[s] - c[t]);
    for (int64_t s = t + 1; s < n; ++s) row[s] = 0.0;
  }
}

float exp_scalar(float x) { return std::isnan(x) ? x : exp_poly(x); }
double exp_scalar(double x) { return std::exp(x); }

}  // namespace okadfa::cpu
