// See cpu_math.h. The float GEMM calls the Fortran BLAS symbols that libtorch_cpu
// exports (MKL in the official wheels). They are declared weak so that a torch
// built without an exported BLAS still loads us; then at::addmm_out is used.
//
// The half GEMM goes through at::mm, i.e. oneDNN's matmul: measured on an AVX512-BF16 CPU
// without AMX (2 threads, chunk shapes 128–256 × 65–256 × 64–256), it ran 1.2–4× faster
// than MKL's sgemm_, while MKL's own cblas_gemm_bf16bf16f32 (float32 output) ran at sgemm
// speed there and oneDNN's packed brgemm ukernel (at::native::cpublas::brgemm) refused to
// pack for lack of AMX. at::mm rounds its result to the half type, so each product is
// rounded once before it is added into the float32 C.
#include "cpu_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

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
  if (k == 0) return scale_by_beta(m, n, beta, c, ldc);
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

namespace {

// bfloat16 is the top half of a float32: round to nearest even on the bits (NaN kept quiet).
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void round_bf16(const float* x, int64_t rows, int64_t cols, int64_t ld, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    uint16_t* o = out + r * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = bf16_bits(row[j]);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void add_row(const uint16_t* p, int64_t n, float alpha, float beta, float* c) {
  if (beta == 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c[j] = alpha * bf16_value(p[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c[j] = alpha * bf16_value(p[j]) + beta * c[j];
  }
}

#if defined(__x86_64__)
struct CpuFeatures {
  bool avx512_bf16 = false, amx_bf16 = false;
};

// CPUID leaf 7 (Intel SDM vol. 2A, "CPUID"): sub-leaf 0 EDX bit 22 AMX-BF16, sub-leaf 1 EAX
// bit 5 AVX512-BF16. The OS must also save the AVX-512 state (XCR0 bits 5–7) and, for AMX,
// the tile state (bits 17–18); Linux must also grant the tile state to the process (amx_enable).
CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return f;   // no OSXSAVE: no XGETBV
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool zmm = (xcr0_lo & 0xe6u) == 0xe6u, tiles = (xcr0_lo & 0x60000u) == 0x60000u;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const unsigned subleaves = a;
  f.amx_bf16 = tiles && (d >> 22 & 1u);
  if (subleaves >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = zmm && (a >> 5 & 1u);
  return f;
}
#endif

}  // namespace

void round_to(const float* x, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* out) {
  round_bf16(x, rows, cols, ld, reinterpret_cast<uint16_t*>(out));
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
          const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc, c10::BFloat16* scratch) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(m, n, beta, c, ldc);
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  auto* pa = const_cast<c10::BFloat16*>(a);
  auto* pb = const_cast<c10::BFloat16*>(b);
  const at::Tensor A = ta ? at::from_blob(pa, {k, m}, {lda, 1}, opts).t() : at::from_blob(pa, {m, k}, {lda, 1}, opts);
  const at::Tensor B = tb ? at::from_blob(pb, {n, k}, {ldb, 1}, opts).t() : at::from_blob(pb, {k, n}, {ldb, 1}, opts);
  at::Tensor product = scratch ? at::from_blob(scratch, {m, n}, opts) : at::empty({m, n}, opts);
  at::mm_out(product, A, B);
  const auto* p = reinterpret_cast<const uint16_t*>(product.data_ptr<c10::BFloat16>());
  // c = alpha·p + beta·c (beta 0: c is not read, it may hold anything)
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) add_row(p + i * n, n, alpha, beta, c + i * ldc);
  });
}

HalfGemmPath half_gemm_path(at::ScalarType dtype) {
  if (dtype == at::kHalf)
    return {HalfGemm::kFloat32, "float32 GEMMs: the kernels' running sums and states leave float16's range (65504)"};
  TORCH_CHECK(dtype == at::kBFloat16, "okadfa: half_gemm_path takes bfloat16 or float16, got ", dtype);
  const bool onednn = at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
#if defined(__x86_64__)
  static const CpuFeatures cpu = detect_cpu_features();
  const bool amx = cpu.amx_bf16 && cpu.avx512_bf16 && amx_enable();
  const bool avx512_bf16 = cpu.avx512_bf16;
#else
  const bool amx = false, avx512_bf16 = false;
#endif
  const HalfGemmPath amx_path{HalfGemm::kAmx, "bfloat16 GEMMs on AMX tiles (AMX-BF16), float32 accumulation"};
  const HalfGemmPath onednn_path{HalfGemm::kOneDnn, std::string("bfloat16 GEMMs (oneDNN, ") +
                                                        (amx ? "AMX-BF16" : avx512_bf16 ? "AVX512-BF16" : "emulated") +
                                                        "), float32 accumulation, products rounded to bfloat16"};
  const char* forced = std::getenv("OKADFA_CPU_HALF_GEMM");
  const std::string f = forced ? forced : "";
  TORCH_CHECK(f.empty() || f == "half" || f == "amx" || f == "onednn" || f == "float32",
              "okadfa: OKADFA_CPU_HALF_GEMM must be 'amx', 'onednn', 'float32' or 'half', got '", f, "'");
  const std::string why = " (forced by OKADFA_CPU_HALF_GEMM)";
  if (f == "float32") return {HalfGemm::kFloat32, "float32 GEMMs" + why};
  if (f == "amx") {
    TORCH_CHECK(amx, "okadfa: OKADFA_CPU_HALF_GEMM=amx, but this CPU or OS offers no AMX-BF16 with AVX512-BF16");
    return {HalfGemm::kAmx, amx_path.reason + why};
  }
  // Forced, oneDNN runs anywhere it is built (emulated, slowly, without bfloat16 instructions).
  if (f == "onednn" || (f == "half" && !amx)) {
    TORCH_CHECK(onednn, "okadfa: OKADFA_CPU_HALF_GEMM=", f, ", but torch's oneDNN (mkldnn) is not built or is disabled");
    return {HalfGemm::kOneDnn, onednn_path.reason + why};
  }
  if (amx) return {HalfGemm::kAmx, amx_path.reason + (f == "half" ? why : "")};
  if (onednn && avx512_bf16) return {HalfGemm::kOneDnn, onednn_path.reason};
#if defined(__x86_64__)
  if (!avx512_bf16) return {HalfGemm::kFloat32, "float32 GEMMs: this CPU has neither AVX512-BF16 nor AMX-BF16"};
  return {HalfGemm::kFloat32, "float32 GEMMs: no AMX-BF16, and torch's oneDNN (mkldnn) is not built or is disabled"};
#else
  return {HalfGemm::kFloat32, "float32 GEMMs: bfloat16 matrix instructions are only looked for on x86-64"};
#endif
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
