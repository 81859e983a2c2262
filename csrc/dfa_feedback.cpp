// dfa_feedback on the CPU, and the feedback projection it shares with dfa_head
// (dfa_projection.h): out[p] = e B_pᵀ for every point p in one call, seeded
// matrices regenerated tile by tile in the kernel.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "cpu_math.h"
#include "dfa_projection.h"
#include "philox.h"

namespace okadfa {

Feedback make_feedback(const std::optional<at::Tensor>& feedback, int64_t points, int64_t dim, int64_t seed,
                       int64_t dist, bool shared, int64_t error_dim, at::ScalarType dtype, const at::Tensor& like) {
  Feedback fb;
  fb.error_dim = error_dim;
  if (feedback.has_value() && feedback->defined()) {
    const at::Tensor& b = *feedback;
    TORCH_CHECK(b.dim() == 3 && b.size(2) == error_dim, "okadfa: feedback must have shape (P, d, ", error_dim,
                "), got ", b.sizes());
    TORCH_CHECK(b.device() == like.device(), "okadfa: feedback is on ", b.device(), " but expected ", like.device());
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), "okadfa: feedback must be floating point, got ",
                b.scalar_type());
    fb.stored = b.to(dtype).contiguous();
    fb.points = b.size(0);
    fb.dim = b.size(1);
    return fb;
  }
  TORCH_CHECK(points >= 0 && points <= std::numeric_limits<uint32_t>::max(),
              "okadfa: points must be in [0, 2**32), got ", points);
  TORCH_CHECK(dim >= 0, "okadfa: dim must be non-negative, got ", dim);
  TORCH_CHECK(dist == kFeedbackNormal || dist == kFeedbackUniform, "okadfa: dist must be 0 (normal) or 1 (uniform), got ",
              dist);
  fb.points = points;
  fb.dim = dim;
  fb.seed = static_cast<uint64_t>(seed);   // the uint64 seed, passed as int64 bits
  fb.dist = static_cast<int>(dist);
  fb.shared = shared;
  return fb;
}

}  // namespace okadfa

namespace okadfa::cpu {
namespace {

// A tile of B_p: kTileRows rows of B (output columns of the product) by up to
// kTileCols entries of the error dimension (the GEMM's inner dimension).
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 1024;

// ln x in double for float x in (0, 1]: x = m·2^e with m in [√½, √2), ln m = 2 atanh(s),
// s = (m − 1)/(m + 1), |s| < 0.172, by its series to s²¹ (relative error < 1e-15). Rounded
// to float it equals the double libm's log rounded to float for each of the 2²⁴ values u_a
// can take (checked exhaustively). Branch-free and on 32-bit integers: loops vectorise.
inline double log_unit(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  bits = (bits & 0x7fffffu) | 0x3f800000u;
  float mf;
  std::memcpy(&mf, &bits, sizeof(mf));
  const bool big = mf > 1.41421356f;
  double m = big ? 0.5 * mf : static_cast<double>(mf);
  e = big ? e + 1 : e;
  const double s = (m - 1.0) / (m + 1.0), z = s * s;
  double poly = 1.0 / 21;
  for (int k = 19; k >= 1; k -= 2) poly = poly * z + 1.0 / k;
  return static_cast<double>(e) * 0.6931471805599453 + 2.0 * s * poly;
}

// cos x in double for float x in [0, 2π]: x = kπ/2 + r (Cody–Waite with fdlibm's 33-bit π/2
// split, exact first step), |r| <= π/4, then ±cos r or ±sin r by Taylor series to r¹⁸/r¹⁷
// (relative error < 1e-15; rounded to float it equals the double libm's cos for each of the
// 2²⁴ arguments fl(2π)·u_b, checked exhaustively).
inline double cos_turn(float x) {
  const double xd = x;
  const double k = (xd * 0.6366197723675814 + 6755399441055744.0) - 6755399441055744.0;   // round(x·2/π)
  const double r = (xd - k * 1.57079632673412561417e+00) - k * 6.07710050650619224932e-11;
  const double z = r * r;
  double c = 1.0 / 6402373705728000.0, sn = 1.0 / 355687428096000.0;   // 1/18!, 1/17!
  const double cos_coef[8] = {-1.0 / 20922789888000.0, 1.0 / 87178291200.0, -1.0 / 479001600.0, 1.0 / 3628800.0,
                              -1.0 / 40320.0, 1.0 / 720.0, -1.0 / 24.0, 0.5};
  const double sin_coef[8] = {-1.0 / 1307674368000.0, 1.0 / 6227020800.0, -1.0 / 39916800.0, 1.0 / 362880.0,
                              -1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0, 1.0};
  for (int i = 0; i < 8; ++i) {
    c = c * z + cos_coef[i];
    sn = sn * z + sin_coef[i];
  }
  const double cos_r = 1.0 - z * c, sin_r = r * sn;
  const int32_t q = static_cast<int32_t>(k) & 3;
  const double v = (q & 1) ? sin_r : cos_r;
  return (q == 1 || q == 2) ? -v : v;
}

// out[c] = B_p at flat index idx0 + c (i·E + j), c < n: philox.h's Philox words (scalar),
// then the normative float32 arithmetic with ln and cos from log_unit and cos_turn (a
// vectorised loop): the correctly rounded values the definition asks for, so every entry
// equals materialize_feedback's and philox.h's feedback_entry's bit for bit.
__attribute__((target_clones("avx512f", "avx2", "default")))
void seeded_values(uint64_t seed, uint32_t p, uint64_t idx0, int64_t n, float sqrt_e, int dist, float* out) {
  constexpr int64_t kBlock = 64;
  const float two_m24 = 5.9604644775390625e-08f;   // 2⁻²⁴
  float u_a[kBlock], u_b[kBlock];
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t m = std::min(kBlock, n - c0);
    for (int64_t c = 0; c < m; ++c) {
      const uint64_t idx = idx0 + static_cast<uint64_t>(c0 + c);
      uint32_t w[4] = {static_cast<uint32_t>(idx), p, static_cast<uint32_t>(idx >> 32), 0u};
      philox4x32_10(w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      u_a[c] = static_cast<float>((w[0] >> 8) + 1u) * two_m24;   // exact: 24-bit integers
      u_b[c] = static_cast<float>(w[1] >> 8) * two_m24;
    }
    float* o = out + c0;
    if (dist == kFeedbackUniform) {
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) o[c] = (2.0f * u_b[c] - 1.0f) / sqrt_e;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) {
        u_a[c] = -2.0f * static_cast<float>(log_unit(u_a[c]));                 // −2·ln u_a
        u_b[c] = static_cast<float>(cos_turn(6.28318548202514648f * u_b[c]));   // cos(fl(2π)·u_b)
      }
      // sqrtf apart: its errno path for negative arguments keeps the loop above from vectorising.
      for (int64_t c = 0; c < m; ++c) o[c] = std::sqrt(u_a[c]) * u_b[c] / sqrt_e;
    }
  }
}

// tile[r·cols + c] = B_p[i0 + r, j0 + c] for r < rows, c < cols (float32 values, widened for T = double).
template <typename T>
void seeded_tile(const Feedback& fb, uint32_t p, float sqrt_e, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                 T* tile) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t idx0 = static_cast<uint64_t>(i0 + r) * static_cast<uint64_t>(fb.error_dim) + j0;
    T* row = tile + r * cols;
    if constexpr (std::is_same_v<T, float>) {
      seeded_values(fb.seed, p, idx0, cols, sqrt_e, fb.dist, row);
    } else {
      float narrow[256];
      for (int64_t c0 = 0; c0 < cols; c0 += 256) {
        const int64_t n = std::min<int64_t>(256, cols - c0);
        seeded_values(fb.seed, p, idx0 + c0, n, sqrt_e, fb.dist, narrow);
        for (int64_t c = 0; c < n; ++c) row[c0 + c] = static_cast<T>(narrow[c]);
      }
    }
  }
}

}  // namespace


template <typename T, typename G>
void project_feedback(const Feedback& fb, const G* e, int64_t rows, int64_t lde, T* out, int64_t point_stride) {
  constexpr bool kHalf = !std::is_same_v<G, T>;
  const int64_t P = fb.points, d = fb.dim, E = fb.error_dim;
  if (rows == 0 || P == 0 || d == 0) return;
  if (E == 0) {
    for (int64_t p = 0; p < P; ++p) std::fill(out + p * point_stride, out + p * point_stride + rows * d, T(0));
    return;
  }
  const bool seeded = !fb.stored.defined();
  const int64_t computed = seeded && fb.shared ? 1 : P;   // shared seeded matrices: point 0, then copies
  // Stored matrices take the same tiles, so stored and seeded results are bit-identical.
  const int64_t ti = std::min(d, kTileRows), tj = std::min(E, kTileCols);
  const int64_t row_tiles = (d + ti - 1) / ti;
  const float sqrt_e = std::sqrt(static_cast<float>(E));
  const G* stored = seeded ? nullptr : fb.stored.data_ptr<G>();
  // Per thread, from torch's allocator (so memory profiles see it): a tile of B and, for
  // bfloat16 operands, the rows×ti bfloat16 product before it is added into float32.
  const int64_t per_thread = (seeded ? ti * tj : 0) + (kHalf ? rows * ti : 0);
  at::Tensor work = at::empty({at::get_num_threads() * per_thread},
                              at::TensorOptions().dtype(c10::CppTypeToScalarType<G>::value));
  at::parallel_for(0, computed * row_tiles, 1, [&](int64_t begin, int64_t end) {
    G* mine = work.data_ptr<G>() + at::get_thread_num() * per_thread;
    G* tile = seeded ? mine : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / row_tiles, i0 = (task % row_tiles) * ti, ni = std::min(ti, d - i0);
      for (int64_t j0 = 0; j0 < E; j0 += tj) {
        const int64_t nj = std::min(tj, E - j0);
        const G* b = tile;
        if (seeded)
          seeded_tile(fb, static_cast<uint32_t>(p), sqrt_e, i0, ni, j0, nj, tile);
        else
          b = stored + (p * d + i0) * E + j0;
        T* o = out + p * point_stride + i0;
        const T beta = j0 == 0 ? T(0) : T(1);
        if constexpr (kHalf)
          gemm(false, true, rows, ni, nj, 1.0f, e + j0, lde, b, seeded ? nj : E, beta, o, d, mine + (seeded ? ti * tj : 0));
        else
          gemm(false, true, rows, ni, nj, T(1), e + j0, lde, b, seeded ? nj : E, beta, o, d);
      }
    }
  });
  for (int64_t p = computed; p < P; ++p)
    for (int64_t n = 0; n < rows; ++n) std::memcpy(out + p * point_stride + n * d, out + n * d, d * sizeof(T));
}

template void project_feedback<float, float>(const Feedback&, const float*, int64_t, int64_t, float*, int64_t);
template void project_feedback<double, double>(const Feedback&, const double*, int64_t, int64_t, double*, int64_t);
template void project_feedback<float, c10::BFloat16>(const Feedback&, const c10::BFloat16*, int64_t, int64_t, float*,
                                                     int64_t);

bool half_projection(at::ScalarType dtype, int64_t rows, int64_t dim, int64_t error_dim) {
  return dtype == at::kBFloat16 && rows * std::min(dim, kTileRows) * std::min(error_dim, kTileCols) >= 64 * 64 * 64 &&
         half_gemm_path(at::kBFloat16).engine != HalfGemm::kFloat32;
}

namespace {

// (P, N, d) in error's dtype; half types are computed in float32, bfloat16 with bfloat16
// GEMM operands where half_projection says so.
at::Tensor dfa_feedback_cpu(const at::Tensor& error, const std::optional<at::Tensor>& feedback, int64_t points,
                            int64_t dim, int64_t seed, int64_t dist, bool shared) {
  check_error(error);
  const at::ScalarType acc = at::promote_types(error.scalar_type(), at::kFloat);
  const int64_t N = error.size(0), E = error.size(1);
  const int64_t d = feedback_rows(feedback, dim);
  const bool half = half_projection(error.scalar_type(), N, d, E);
  const at::Tensor e = half ? error.contiguous() : error.to(acc).contiguous();
  const Feedback fb = make_feedback(feedback, points, dim, seed, dist, shared, E, e.scalar_type(), e);
  at::Tensor out = at::empty({fb.points, N, fb.dim}, e.options().dtype(acc));
  if (half) {
    project_feedback<float, c10::BFloat16>(fb, e.data_ptr<c10::BFloat16>(), N, E, out.data_ptr<float>(), N * fb.dim);
  } else {
    AT_DISPATCH_FLOATING_TYPES(acc, "dfa_feedback", [&] {
      project_feedback<scalar_t, scalar_t>(fb, e.data_ptr<scalar_t>(), N, E, out.data_ptr<scalar_t>(), N * fb.dim);
    });
  }
  return out.to(error.scalar_type());
}

// B_point (dim, error_dim) in float32 exactly as the CPU kernels generate it (for
// diagnostics: okadfa.dfa.DFA.feedback_matrix).
at::Tensor seeded_feedback_cpu(int64_t point, int64_t dim, int64_t error_dim, int64_t seed, int64_t dist) {
  TORCH_CHECK(error_dim >= 0, "okadfa: error_dim must be non-negative, got ", error_dim);
  TORCH_CHECK(point >= 0 && point <= std::numeric_limits<uint32_t>::max(), "okadfa: point must be in [0, 2**32), got ",
              point);
  const Feedback fb = make_feedback(std::nullopt, point + 1, dim, seed, dist, false, error_dim, at::kFloat,
                                    at::empty({0}));
  at::Tensor out = at::empty({dim, error_dim}, at::kFloat);
  const float sqrt_e = std::sqrt(static_cast<float>(error_dim));
  at::parallel_for(0, dim, 16, [&](int64_t begin, int64_t end) {
    seeded_tile(fb, static_cast<uint32_t>(point), sqrt_e, begin, end - begin, 0, error_dim,
                out.data_ptr<float>() + begin * error_dim);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(okadfa, CPU, m) { m.impl("dfa_feedback", &dfa_feedback_cpu); }

// No tensor arguments, so no device key selects it: the catch-all key.
TORCH_LIBRARY_IMPL(okadfa, CompositeExplicitAutograd, m) { m.impl("seeded_feedback", &seeded_feedback_cpu); }

}  // namespace okadfa::cpu
