// The bfloat16 GEMM on AMX tiles (cpu_math.h: gemm_amx). Intel's AMX (Intel SDM vol. 1 ch. 18,
// "Intel Advanced Matrix Extensions") multiplies a 16×32 bfloat16 tile by a 32×16 one into a
// 16×16 float32 tile in one instruction (TDPBF16PS). Its B operand is "VNNI" packed: tile row r
// holds, for each of its 16 columns j, the pair (B[2r][j], B[2r+1][j]).
//
// Each call rounds op(A) and op(B) into packed copies (AVX512-BF16's VCVTNE2PS2BF16, nearest
// even), padded with zeros to 16 rows/columns and 32 along k, then walks C in 32×32 blocks: four
// accumulator tiles, two A and two B tiles per step of 32 along k. The float32 sums are written to
// C directly, so nothing is rounded after the products (unlike oneDNN's bfloat16 matmul, whose
// output is bfloat16). Single-threaded: the attention kernels call it inside their own threads.
// Both AMX instructions and VCVTNE2PS2BF16 treat subnormal inputs as zero.
#include "cpu_math.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define OKADFA_AMX 1
#endif

namespace okadfa::cpu {

namespace {
int64_t pad16(int64_t x) { return (x + 15) / 16 * 16; }
int64_t pad32(int64_t x) { return (x + 31) / 32 * 32; }
}  // namespace

int64_t amx_packed_size(int64_t rows, int64_t k) { return pad16(rows) * pad32(k); }

#if defined(OKADFA_AMX)

bool amx_enable() {
  // Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA, Documentation/arch/x86/xstate.rst); without it the first tile
  // instruction raises SIGILL. Asked once per process; oneDNN asks the same.
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

namespace {

#define OKADFA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// 32 floats of x (the first `count`, zeros after) as 32 bfloat16.
OKADFA_AMX_TARGET inline __m512i round32(const float* x, int64_t count) {
  const __mmask16 lo = count >= 16 ? 0xffff : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
  const __mmask16 hi = count >= 32 ? 0xffff : count <= 16 ? 0 : static_cast<__mmask16>((1u << (count - 16)) - 1);
  const __m512 a = _mm512_maskz_loadu_ps(lo, x), b = _mm512_maskz_loadu_ps(hi, x + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));   // a in the low half
}

// For j < 16: the bfloat16 pair (x0[j], x1[j]) as one 32-bit lane (x0 low); the first `count`
// columns, zeros after; x1 == nullptr: zeros in the high halves.
OKADFA_AMX_TARGET inline __m512i round_pairs(const float* x0, const float* x1, int64_t count) {
  const __mmask16 mask = count >= 16 ? 0xffff : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
  const __m512 a = _mm512_maskz_loadu_ps(mask, x0);
  const __m512 b = x1 ? _mm512_maskz_loadu_ps(mask, x1) : _mm512_setzero_ps();
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));   // a: words 0–15, b: 16–31
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, both);
}

// r[0..15], the rows of a 16×16 matrix of 32-bit lanes, transposed: pairs of lanes, then pairs
// of 64-bit halves, then the 128-bit quarters.
OKADFA_AMX_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // Now quarter q of r[4g + x] holds column 4q + x of rows 4g .. 4g + 3.
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int x = 0; x < 4; ++x) {
    const __m512i even0 = _mm512_shuffle_i32x4(r[x], r[4 + x], 0x88), odd0 = _mm512_shuffle_i32x4(r[x], r[4 + x], 0xdd);
    const __m512i even1 = _mm512_shuffle_i32x4(r[8 + x], r[12 + x], 0x88);
    const __m512i odd1 = _mm512_shuffle_i32x4(r[8 + x], r[12 + x], 0xdd);
    t[x] = _mm512_shuffle_i32x4(even0, even1, 0x88);
    t[8 + x] = _mm512_shuffle_i32x4(even0, even1, 0xdd);
    t[4 + x] = _mm512_shuffle_i32x4(odd0, odd1, 0x88);
    t[12 + x] = _mm512_shuffle_i32x4(odd0, odd1, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// op(A) (m×k; stored k×m when trans) into rows of kp bfloat16, mp rows (zeros beyond m and k).
OKADFA_AMX_TARGET void pack_rows(bool trans, const float* a, int64_t lda, int64_t m, int64_t k, int64_t mp,
                                 int64_t kp, uint16_t* out) {
  if (!trans) {
    for (int64_t i = 0; i < mp; ++i)
      for (int64_t k0 = 0; k0 < kp; k0 += 32)
        _mm512_storeu_si512(out + i * kp + k0, i < m ? round32(a + i * lda + k0, k - k0) : _mm512_setzero_si512());
    return;
  }
  // Stored rows k0 + 2p and k0 + 2p + 1 give the pairs of column p of a 16-row block: transposed.
  __m512i block[16];
  for (int64_t i0 = 0; i0 < mp; i0 += 16)
    for (int64_t k0 = 0; k0 < kp; k0 += 32) {
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t kk = k0 + 2 * p;
        block[p] = kk < k ? round_pairs(a + kk * lda + i0, kk + 1 < k ? a + (kk + 1) * lda + i0 : nullptr, m - i0)
                          : _mm512_setzero_si512();
      }
      transpose16(block);
      for (int64_t t = 0; t < 16; ++t) _mm512_storeu_si512(out + (i0 + t) * kp + k0, block[t]);
    }
}

// op(B) (k×n; stored n×k when trans) VNNI-packed: kp/2 rows of np pairs (zeros beyond k and n).
OKADFA_AMX_TARGET void pack_pairs(bool trans, const float* b, int64_t ldb, int64_t k, int64_t n, int64_t kp,
                                  int64_t np, uint16_t* out) {
  auto* out32 = reinterpret_cast<int*>(out);
  if (!trans) {
    for (int64_t k0 = 0; k0 < kp; k0 += 2) {
      const float* x0 = k0 < k ? b + k0 * ldb : nullptr;
      const float* x1 = k0 + 1 < k ? b + (k0 + 1) * ldb : nullptr;
      for (int64_t j0 = 0; j0 < np; j0 += 16)
        _mm512_storeu_si512(out32 + (k0 / 2) * np + j0,
                            x0 ? round_pairs(x0 + j0, x1 ? x1 + j0 : nullptr, n - j0) : _mm512_setzero_si512());
    }
    return;
  }
  // Stored row j holds the pairs of column j, already adjacent: 16 rows at a time, transposed.
  __m512i block[16];
  for (int64_t j0 = 0; j0 < np; j0 += 16)
    for (int64_t k0 = 0; k0 < kp; k0 += 32) {
      for (int64_t t = 0; t < 16; ++t)
        block[t] = j0 + t < n ? round32(b + (j0 + t) * ldb + k0, k - k0) : _mm512_setzero_si512();
      transpose16(block);
      for (int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(out32 + (k0 / 2 + p) * np + j0, block[p]);
    }
}

// c[i, j] = alpha·acc[i, j] + beta·c[i, j] for i < mi, j < nj (acc: 32×32, beta 0: c not read).
OKADFA_AMX_TARGET void store_block(const float* acc, int64_t mi, int64_t nj, float alpha, float beta, float* c,
                                   int64_t ldc) {
  for (int64_t i = 0; i < mi; ++i) {
    const __mmask16 lo = nj >= 16 ? 0xffff : static_cast<__mmask16>((1u << nj) - 1);
    const __mmask16 hi = nj >= 32 ? 0xffff : nj <= 16 ? 0 : static_cast<__mmask16>((1u << (nj - 16)) - 1);
    for (int half = 0; half < 2; ++half) {
      const __mmask16 mask = half ? hi : lo;
      float* row = c + i * ldc + 16 * half;
      __m512 x = _mm512_mul_ps(_mm512_set1_ps(alpha), _mm512_loadu_ps(acc + i * 32 + 16 * half));
      if (beta != 0.0f) x = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, row), x);
      _mm512_mask_storeu_ps(row, mask, x);
    }
  }
}

// C blocks of 32×32 from the packed operands: tiles 0–3 accumulate, 4–5 hold A, 6–7 hold B.
OKADFA_AMX_TARGET void multiply(const uint16_t* pa, const uint16_t* pb, int64_t m, int64_t n, int64_t mp,
                                int64_t np, int64_t kp, float alpha, float beta, float* c, int64_t ldc) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float acc[32 * 32];
  const int64_t a_stride = kp * 2, b_stride = np * 4;   // bytes
  for (int64_t i0 = 0; i0 < mp; i0 += 32) {
    const bool two_rows = i0 + 16 < mp;
    for (int64_t j0 = 0; j0 < np; j0 += 32) {
      const bool two_cols = j0 + 16 < np;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < kp; k0 += 32) {
        _tile_loadd(4, pa + i0 * kp + k0, a_stride);
        _tile_loadd(6, pb + (k0 / 2) * np * 2 + j0 * 2, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        if (two_cols) {
          _tile_loadd(7, pb + (k0 / 2) * np * 2 + (j0 + 16) * 2, b_stride);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
          _tile_loadd(5, pa + (i0 + 16) * kp + k0, a_stride);
          _tile_dpbf16ps(2, 5, 6);
          if (two_cols) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, acc, 128);
      _tile_stored(1, acc + 16, 128);
      _tile_stored(2, acc + 16 * 32, 128);
      _tile_stored(3, acc + 16 * 32 + 16, 128);
      store_block(acc, std::min<int64_t>(32, m - i0), std::min<int64_t>(32, n - j0), alpha, beta, c + i0 * ldc + j0,
                  ldc);
    }
  }
  _tile_release();
}

}  // namespace

void amx_pack_b(bool tb, int64_t k, int64_t n, const float* b, int64_t ldb, c10::BFloat16* out) {
  pack_pairs(tb, b, ldb, k, n, pad32(k), pad16(n), reinterpret_cast<uint16_t*>(out));
}

void gemm_amx(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const c10::BFloat16* packed_b, float beta, float* c, int64_t ldc, c10::BFloat16* scratch) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(m, n, beta, c, ldc);
  auto* pa = reinterpret_cast<uint16_t*>(scratch);
  pack_rows(ta, a, lda, m, k, pad16(m), pad32(k), pa);
  multiply(pa, reinterpret_cast<const uint16_t*>(packed_b), m, n, pad16(m), pad16(n), pad32(k), alpha, beta, c, ldc);
}

void gemm_amx(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc, c10::BFloat16* scratch) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(m, n, beta, c, ldc);
  c10::BFloat16* pb = scratch + amx_packed_size(m, k);
  amx_pack_b(tb, k, n, b, ldb, pb);
  gemm_amx(ta, m, n, k, alpha, a, lda, pb, beta, c, ldc, scratch);
}

#else

bool amx_enable() { return false; }

[[noreturn]] void no_amx() { TORCH_CHECK(false, "okadfa: AMX GEMMs are only built for x86-64 Linux"); }
void amx_pack_b(bool, int64_t, int64_t, const float*, int64_t, c10::BFloat16*) { no_amx(); }
void gemm_amx(bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const c10::BFloat16*, float, float*,
              int64_t, c10::BFloat16*) {
  no_amx();
}
void gemm_amx(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
              float*, int64_t, c10::BFloat16*) {
  no_amx();
}

#endif

}  // namespace okadfa::cpu
