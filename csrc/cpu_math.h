// Small dense building blocks for the CPU kernels: a row-major GEMM on top of
// the BLAS that torch links (MKL's or OpenBLAS's sgemm_/dgemm_), and
// vectorisable element-wise loops (exp with a row shift, row maxima).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace okadfa::cpu {

// C[m×n] = alpha · op(A) · op(B) + beta · C, every matrix row-major with its
// leading dimension. op(X) = Xᵀ when the trans flag is set.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

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
