// Seeded DFA feedback entries, shared by the CPU and CUDA kernels (no torch
// headers, so nvcc compiles it anywhere). The definition is normative and lives in
// okadfa/feedback.py; this is the same computation:
//
//   idx = i·E + j;  counter = (idx & 0xffffffff, p, idx >> 32, 0);  key = (seed lo, seed hi)
//   (x0, x1, _, _) = Philox4x32-10(counter, key)   (Salmon et al., SC 2011)
//   u_a = ((x0 >> 8) + 1)·2⁻²⁴,  u_b = (x1 >> 8)·2⁻²⁴
//   normal:  √(−2 ln u_a)·cos(fl(2π)·u_b) / fl(√E);   uniform: (2·u_b − 1) / fl(√E)
//
// All float arithmetic is float32, one rounding per operation; ln and cos are the
// correctly rounded float32 values, evaluated in double and rounded (never logf/cosf,
// whose results differ between libraries). Compile without fast-math.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define OKADFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OKADFA_HOST_DEVICE inline
#endif

namespace okadfa {

enum FeedbackDist : int { kFeedbackNormal = 0, kFeedbackUniform = 1 };

// Philox4x32-10 on counter c (in place) with key (k0, k1).
OKADFA_HOST_DEVICE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;   // the last bump is unused: R rounds, R − 1 key bumps
    k1 += 0xBB67AE85u;
  }
}

// B[p, i, j] at flat index idx = i·E + j; sqrt_e = fl(√E) (sqrtf of E as a float).
OKADFA_HOST_DEVICE float feedback_entry(uint64_t seed, uint32_t p, uint64_t idx, float sqrt_e, int dist) {
  uint32_t c[4] = {static_cast<uint32_t>(idx), p, static_cast<uint32_t>(idx >> 32), 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u_b = static_cast<float>(c[1] >> 8) * 5.9604644775390625e-08f;   // 2⁻²⁴, exact
  if (dist == kFeedbackUniform) return (2.0f * u_b - 1.0f) / sqrt_e;
  const float u_a = static_cast<float>((c[0] >> 8) + 1u) * 5.9604644775390625e-08f;
  const float two_pi = 6.28318548202514648f;                                    // fl(2π)
  const float ln = static_cast<float>(log(static_cast<double>(u_a)));
  const float cs = static_cast<float>(cos(static_cast<double>(two_pi * u_b)));
  return sqrtf(-2.0f * ln) * cs / sqrt_e;
}

}  // namespace okadfa
