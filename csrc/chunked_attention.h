// Chunked normalised linear attention on the CPU, shared by favor_attention
// (feature map fused: φ computed from q, k and the projection inside each chunk)
// and linear_attention (features given). See okadfa/reference/attention.py for
// the same algorithm in plain PyTorch and docs/design.md §3 for the math.
//
// Notation for one (batch, head) and one chunk of n <= C positions:
//   fq  [n, M]  query features, stabilised per row: exp(lq - max_m lq)
//   lk  [n, M]  key logits √s·k·w_m - s‖k‖²/2 ;  c_s = max(P, max_{s'<=s} max_m lk_s')
//   fk  [n, M]  exp(lk_s - c_s) <= 1 (a running maximum: nothing depends on later keys)
//   vx  [n, W]  the values with a ones column appended (the normaliser rides along)
// Key padding (key_mask, 1 = a real key): a masked key's logits are −inf (given features: 0),
// so it leaves every sum and the running maximum, and its values are read as 0; c is floored
// at kKeyFloor (okadfa/reference/attention.py's KEY_FLOOR), so rows before the first real key
// keep finite shifts. Query rows at masked positions output 0 with lognorm −inf (the underflow
// guard's row: no gradient).
//   S   [M, W]  carried state Σ_s exp(lk_s - P) vx_sᵀ at reference P (the running max)
// The weight of key s for query t is fq_t·fk_s·exp(c_s - c_t): the true weight
// times a factor that depends on t alone, which cancels in the normalisation.
// Backward recomputes features from q, k (memory stays linear in T) and uses the
// saved log-normaliser: lognorm_t = log(den'_t) + aq_t + c_t.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace okadfa::cpu {

template <typename T>
struct AttentionProblem {
  const T* q;        // [BH, Tn, Dq]   Dq = Dk (fused) or M (features given)
  const T* k;        // [BH, Tn, Dq]
  const T* v;        // [BH, Tn, Dv]
  const T* w;        // [M, Dk] projection (fused only)
  const uint8_t* key_mask;   // [BH, Tn], 1 = a real key; nullptr: every key is real
  int64_t bh, tn, dq, m, dv;
  bool fused, causal;
  T sqrt_scale;      // √scale, fused only
  int64_t chunk;
};

// T: the compute type (float, double). G: the type of the GEMM operands: T, or bfloat16, whose
// GEMMs (on AMX tiles or through oneDNN, cpu_math.h's half_gemm_path) accumulate in float32;
// every other step (exponentials, maxima, states, normalisers) stays in T. The feature logits
// √s·x·wᵀ join the bfloat16 GEMMs only on AMX: there the operands are the bfloat16 inputs
// themselves (exact) and the sums stay float32, while oneDNN rounds each logit to bfloat16, off
// by up to |logit|·2⁻⁹, an error exp turns into a relative error of the feature.
template <typename T, typename G = T>
class ChunkedAttention {
  static constexpr bool kHalfGemm = !std::is_same_v<G, T>;

 public:
  explicit ChunkedAttention(const AttentionProblem<T>& p)
      : p_(p), amx_(kHalfGemm && half_gemm_path(at::kBFloat16).engine == HalfGemm::kAmx) {}

  // out [BH, Tn, Dv], lognorm [BH, Tn].
  void forward(T* out, T* lognorm) const {
    const int64_t split = column_split();
    at::parallel_for(0, p_.bh * split, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(p_, /*states=*/false);
      for (int64_t task = begin; task < end; ++task) {
        const auto [d0, d1] = columns(task % split, split);
        forward_task(task / split, d0, d1, ws, out, lognorm);
      }
    });
  }

  // Gradients: dq, dk [BH, Tn, Dq], dv [BH, Tn, Dv], dw [M, Dk] (or nullptr).
  void backward(const T* dout, const T* out, const T* lognorm, T* dq, T* dk, T* dv, T* dw) const {
    const int64_t split = column_split();
    const int64_t nthreads = at::get_num_threads();
    // Column tasks of one head add partial dq/dk; each split index owns a slab.
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const int64_t qsize = p_.bh * p_.tn * p_.dq;
    at::Tensor dq_parts, dk_parts, dw_parts;
    if (split > 1) {
      dq_parts = at::empty({split * qsize}, opts);
      dk_parts = at::empty({split * qsize}, opts);
    }
    if (dw) dw_parts = at::zeros({nthreads * p_.m * p_.dq}, opts);
    at::parallel_for(0, p_.bh * split, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(p_, /*states=*/p_.causal);
      T* dw_local = dw ? dw_parts.data_ptr<T>() + at::get_thread_num() * p_.m * p_.dq : nullptr;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t part = task % split;
        const auto [d0, d1] = columns(part, split);
        T* dq_out = split > 1 ? dq_parts.data_ptr<T>() + part * qsize : dq;
        T* dk_out = split > 1 ? dk_parts.data_ptr<T>() + part * qsize : dk;
        backward_task(task / split, d0, d1, part == 0, ws, dout, out, lognorm, dq_out, dk_out,
                      dv, dw_local);
      }
    });
    if (split > 1) {
      const T* dqp = dq_parts.data_ptr<T>();
      const T* dkp = dk_parts.data_ptr<T>();
      at::parallel_for(0, qsize, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T sq = 0, sk = 0;
          for (int64_t s = 0; s < split; ++s) {
            sq += dqp[s * qsize + i];
            sk += dkp[s * qsize + i];
          }
          dq[i] = sq;
          dk[i] = sk;
        }
      });
    }
    if (dw) {
      const int64_t wsize = p_.m * p_.dq;
      for (int64_t i = 0; i < wsize; ++i) {
        T s = 0;
        for (int64_t th = 0; th < nthreads; ++th) s += dw_parts.data_ptr<T>()[th * wsize + i];
        dw[i] = s;
      }
    }
  }

 private:
  // A view of part of a workspace tensor (torch's allocator owns the memory, so
  // memory profilers see it).
  struct Span {
    T* p = nullptr;
    int64_t n = 0;
    T* data() const { return p; }
    T& operator[](int64_t i) const { return p[i]; }
    T* begin() const { return p; }
    T* end() const { return p + n; }
  };

  struct Workspace {
    at::Tensor storage, half_storage;
    Span fq, fk, dfq, dfk, a, b, vx, e, f, dv1, dv2, s, r, states, pstate, aq, c, rmax;
    G* half_a = nullptr;   // the GEMM operands rounded to G and their product (half GEMMs only)
    G* half_b = nullptr;
    G* half_c = nullptr;
    Workspace(const AttentionProblem<T>& p, bool states_needed) {
      const int64_t C = p.chunk, M = p.m, W = p.dv + 1;
      const int64_t nchunks = states_needed ? (p.tn + C - 1) / C : 0;
      std::vector<std::pair<Span*, int64_t>> parts = {
          {&fq, C * M}, {&fk, C * M}, {&dfq, C * M}, {&dfk, C * M}, {&a, C * C}, {&b, C * C},
          {&vx, C * W}, {&e, C * W}, {&f, C * W}, {&dv1, C * p.dv}, {&dv2, C * p.dv}, {&s, M * W},
          {&r, M * W}, {&aq, C}, {&c, C}, {&rmax, C}, {&states, nchunks * M * W},
          {&pstate, nchunks + 1}};
      int64_t total = 0;
      for (auto& part : parts) total += (part.second + 15) / 16 * 16;  // 64-byte aligned pieces
      storage = at::empty({total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
      T* base = storage.data_ptr<T>();
      for (auto& part : parts) {
        *part.first = Span{base, part.second};
        base += (part.second + 15) / 16 * 16;
      }
      if (kHalfGemm) {   // every operand and product fits in side² (AMX: packed A and B, padded)
        const int64_t side = (std::max({C, M, W, p.dq}) + 31) / 32 * 32;
        half_storage = at::empty({3 * side * side}, at::TensorOptions().dtype(c10::CppTypeToScalarType<G>::value));
        half_a = half_storage.data_ptr<G>();
        half_b = half_a + side * side;
        half_c = half_b + side * side;
      }
    }
  };

  // Below this many multiply-adds a GEMM stays in T: oneDNN's per-call cost (~5–10 µs) outweighs
  // its speed, and tiny problems keep T's exact cancellations (dq = 0 at T = 1).
  static constexpr int64_t kHalfGemmMin = 64 * 64 * 64;

  // C = alpha·op(A)·op(B) + beta·C (cpu_math.h's gemm) with the operands in G when G is a half
  // type: packed on AMX tiles, or rounded into the workspace for oneDNN (A is m×k, or k×m when
  // ta; B likewise).
  void mm(Workspace& ws, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) const {
    if constexpr (kHalfGemm) {
      if (m * n * k >= kHalfGemmMin) {
        if (amx_) return gemm_amx(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ws.half_a);
        round_to(a, ta ? k : m, ta ? m : k, lda, ws.half_a);
        round_to(b, tb ? n : k, tb ? k : n, ldb, ws.half_b);
        return gemm(ta, tb, m, n, k, alpha, ws.half_a, ta ? m : k, ws.half_b, tb ? k : n, beta, c, ldc, ws.half_c);
      }
    }
    gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  // out = √s·x·wᵀ for n rows of x (the feature logits; see the class comment for their GEMM).
  void logits(const T* x, int64_t n, T* out, Workspace& ws) const {
    if (amx_) return mm(ws, false, true, n, p_.m, p_.dq, p_.sqrt_scale, x, p_.dq, p_.w, p_.dq, T(0), out, p_.m);
    gemm(false, true, n, p_.m, p_.dq, p_.sqrt_scale, x, p_.dq, p_.w, p_.dq, T(0), out, p_.m);
  }

  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  static constexpr T kKeyFloor = T(-1e30);
  // min_normal^0.8: ~1e-31 (float32), ~1e-246 (float64). Above it, 1/den' leaves
  // the backward enough headroom not to overflow.
  static inline const T kTiny = std::pow(std::numeric_limits<T>::min(), T(0.8));

  // Heads are the unit of parallel work; when there are fewer heads than threads,
  // the value columns are split too (each task recomputes the features).
  int64_t column_split() const {
    const int64_t nthreads = at::get_num_threads();
    if (p_.bh == 0 || p_.bh >= nthreads || at::in_parallel_region()) return 1;
    const int64_t want = (nthreads + p_.bh - 1) / p_.bh;
    return std::max<int64_t>(1, std::min<int64_t>(want, p_.dv / 16));
  }
  std::pair<int64_t, int64_t> columns(int64_t part, int64_t split) const {
    return {p_.dv * part / split, p_.dv * (part + 1) / split};
  }

  // fq = exp(√s·q Wᵀ - rowmax) (fused) or the given features; aq = the row shift.
  void query_features(const T* q, int64_t n, Workspace& ws) const {
    if (p_.fused) {
      logits(q, n, ws.fq.data(), ws);
      row_max(ws.fq.data(), n, p_.m, p_.m, ws.aq.data());
      exp_shift_rows(ws.fq.data(), n, p_.m, p_.m, ws.aq.data());
    } else {
      std::memcpy(ws.fq.data(), q, sizeof(T) * n * p_.m);
      std::fill_n(ws.aq.data(), n, T(0));
    }
  }

  // Key features relative to a per-row shift c: causal c_s = max(P, running max),
  // otherwise the chunk's new state reference max(P, chunk max) for every row.
  // Returns the new state reference (c of the last row).
  // mask: the chunk's key_mask entries (nullptr: none masked).
  T key_features(const T* k, const uint8_t* mask, int64_t n, T pref, bool running, Workspace& ws) const {
    if (!p_.fused) {
      std::memcpy(ws.fk.data(), k, sizeof(T) * n * p_.m);
      for (int64_t i = 0; mask && i < n; ++i)
        if (!mask[i]) std::fill_n(ws.fk.data() + i * p_.m, p_.m, T(0));
      std::fill_n(ws.c.data(), n, T(0));
      return T(0);
    }
    T* lk = ws.fk.data();
    logits(k, n, lk, ws);
    const T half_scale = p_.sqrt_scale * p_.sqrt_scale / 2;
    for (int64_t i = 0; i < n; ++i) {
      T sq = 0;
      for (int64_t j = 0; j < p_.dq; ++j) sq += k[i * p_.dq + j] * k[i * p_.dq + j];
      const T shift = half_scale * sq;
      for (int64_t j = 0; j < p_.m; ++j) lk[i * p_.m + j] -= shift;
      if (mask && !mask[i]) std::fill_n(lk + i * p_.m, p_.m, kNegInf);
    }
    row_max(lk, n, p_.m, p_.m, ws.rmax.data());
    T run = std::max(pref, kKeyFloor);
    for (int64_t i = 0; i < n; ++i) {
      run = std::max(run, ws.rmax[i]);
      ws.c[i] = run;
    }
    if (!running) std::fill_n(ws.c.data(), n, run);
    exp_shift_rows(lk, n, p_.m, p_.m, ws.c.data());
    return run;
  }

  // vx = [v[:, d0:d1], 1 (if with_ones)], masked keys' values 0
  void load_values(const T* v, const uint8_t* mask, int64_t n, int64_t d0, int64_t d1, bool with_ones,
                   Workspace& ws) const {
    const int64_t W = d1 - d0 + (with_ones ? 1 : 0);
    for (int64_t i = 0; i < n; ++i) {
      if (mask && !mask[i])
        std::fill_n(ws.vx.data() + i * W, d1 - d0, T(0));
      else
        std::memcpy(ws.vx.data() + i * W, v + i * p_.dv + d0, sizeof(T) * (d1 - d0));
      if (with_ones) ws.vx[i * W + W - 1] = T(1);
    }
  }

  // rows[i, :] *= exp(sign·(c[i] - ref))
  static void scale_rows(T* rows, int64_t n, int64_t width, const T* c, T ref, T sign = T(1)) {
    for (int64_t i = 0; i < n; ++i) {
      if (c[i] == ref) continue;
      const T f = exp_scalar(sign * (c[i] - ref));
      for (int64_t j = 0; j < width; ++j) rows[i * width + j] *= f;
    }
  }

  // S = exp(P - Pnew)·S + fkᵀ·diag(exp(c - Pnew))·vx ; fk rows are rescaled in place.
  void update_state(int64_t n, int64_t W, T pref, T pnew, Workspace& ws) const {
    scale_rows(ws.fk.data(), n, p_.m, ws.c.data(), pnew);
    if (pref != pnew) {
      const T f = exp_scalar(pref - pnew);
      for (auto& x : ws.s) x *= f;
    }
    mm(ws, true, false, p_.m, W, n, T(1), ws.fk.data(), p_.m, ws.vx.data(), W, T(1), ws.s.data(), W);
  }

  T initial_reference() const { return p_.fused ? kNegInf : T(0); }

  void forward_task(int64_t b, int64_t d0, int64_t d1, Workspace& ws, T* out, T* lognorm) const {
    const int64_t C = p_.chunk, M = p_.m, W = d1 - d0 + 1;
    const T* q = p_.q + b * p_.tn * p_.dq;
    const T* k = p_.k + b * p_.tn * p_.dq;
    const T* v = p_.v + b * p_.tn * p_.dv;
    T* o = out + b * p_.tn * p_.dv;
    T* ln = lognorm + b * p_.tn;
    const uint8_t* mask = p_.key_mask ? p_.key_mask + b * p_.tn : nullptr;
    auto at = [mask](int64_t t0) { return mask ? mask + t0 : nullptr; };   // the chunk's mask entries
    std::fill(ws.s.begin(), ws.s.end(), T(0));
    T pref = initial_reference();
    T* num = ws.e.data();
    if (!p_.causal) {
      for (int64_t t0 = 0; t0 < p_.tn; t0 += C) {
        const int64_t n = std::min(C, p_.tn - t0);
        const T pnew = key_features(k + t0 * p_.dq, at(t0), n, pref, false, ws);
        load_values(v + t0 * p_.dv, at(t0), n, d0, d1, true, ws);
        update_state(n, W, pref, pnew, ws);
        pref = pnew;
      }
      for (int64_t t0 = 0; t0 < p_.tn; t0 += C) {
        const int64_t n = std::min(C, p_.tn - t0);
        query_features(q + t0 * p_.dq, n, ws);
        mm(ws, false, false, n, W, M, T(1), ws.fq.data(), M, ws.s.data(), W, T(0), num, W);
        std::fill_n(ws.c.data(), n, pref);
        finish_rows(n, t0, d0, d1, at(t0), ws, o, d0 == 0 ? ln : nullptr);
      }
      return;
    }
    for (int64_t t0 = 0; t0 < p_.tn; t0 += C) {
      const int64_t n = std::min(C, p_.tn - t0);
      query_features(q + t0 * p_.dq, n, ws);
      const T pnew = key_features(k + t0 * p_.dq, at(t0), n, pref, true, ws);
      load_values(v + t0 * p_.dv, at(t0), n, d0, d1, true, ws);
      // intra-chunk: (fq fkᵀ ⊙ decay) vx
      mm(ws, false, true, n, n, M, T(1), ws.fq.data(), M, ws.fk.data(), M, T(0), ws.a.data(), n);
      causal_decay(ws.a.data(), n, n, ws.c.data(), !p_.fused);
      lower_product(n, W, ws, num);
      // carried state: exp(P - c_t) fq_t S
      if (pref != kNegInf) {
        const Span& fq = ws.fq;
        for (int64_t i = 0; i < n; ++i) {
          if (ws.c[i] == pref) continue;
          const T f = exp_scalar(pref - ws.c[i]);
          for (int64_t j = 0; j < M; ++j) fq[i * M + j] *= f;
        }
        mm(ws, false, false, n, W, M, T(1), fq.data(), M, ws.s.data(), W, T(1), num, W);
      }
      finish_rows(n, t0, d0, d1, at(t0), ws, o, d0 == 0 ? ln : nullptr);
      update_state(n, W, pref, pnew, ws);
      pref = pnew;
    }
  }

  // num = A vx for the lower-triangular A (n × n) and vx (n × W), row i reading only the values of
  // rows j ≤ i: in the plain product a later row's NaN/Inf times its exact-0 weight is NaN and
  // would reach row i. When the chunk has non-finite values, its finite values go through the
  // product and the non-finite ones are summed in down the rows (as a product with positive
  // weights sums them), so rows before them are untouched (reference.attention.lower_product).
  void lower_product(int64_t n, int64_t W, Workspace& ws, T* num) const {
    const T* vx = ws.vx.data();
    if (std::all_of(vx, vx + n * W, [](T x) { return std::isfinite(x); })) {
      mm(ws, false, false, n, W, n, T(1), ws.a.data(), n, vx, W, T(0), num, W);
      return;
    }
    T* finite = ws.f.data();   // free in the forward pass
    for (int64_t i = 0; i < n * W; ++i) finite[i] = std::isfinite(vx[i]) ? vx[i] : T(0);
    mm(ws, false, false, n, W, n, T(1), ws.a.data(), n, finite, W, T(0), num, W);
    for (int64_t j = 0; j < W; ++j) {
      T bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(vx[i * W + j])) bad += vx[i * W + j];
        num[i * W + j] += bad;
      }
    }
  }

  // out = num[:, :-1] / num[:, -1]; lognorm = log(den') + aq + c. The guard: a
  // row whose stabilised normaliser den' fell below kTiny (only for inputs so
  // large that the weights leave the dtype's range) is 0 with lognorm = -inf.
  // Given features are not rescaled, so there only an exact 0 counts. Masked query rows
  // (mask: the chunk's key_mask entries) are such rows too.
  void finish_rows(int64_t n, int64_t t0, int64_t d0, int64_t d1, const uint8_t* mask, const Workspace& ws, T* o,
                   T* ln) const {
    const int64_t W = d1 - d0 + 1;
    const T* num = ws.e.data();
    for (int64_t i = 0; i < n; ++i) {
      const T den = num[i * W + W - 1];
      const bool underflow = (mask && !mask[i]) || (p_.fused ? den < kTiny : den == T(0));
      for (int64_t j = 0; j < d1 - d0; ++j)
        o[(t0 + i) * p_.dv + d0 + j] = underflow ? T(0) : num[i * W + j] / den;
      if (ln) ln[t0 + i] = underflow ? kNegInf : std::log(den) + ws.aq[i] + ws.c[i];
    }
  }

  // dext = [g'[:, d0:d1], -δ' (if with_ones)], g' = dout / den', δ' = g'·out (all columns).
  void load_output_grads(const T* dout, const T* o, const T* ln, int64_t n, int64_t d0, int64_t d1,
                         bool with_ones, Workspace& ws) const {
    const int64_t W = d1 - d0 + (with_ones ? 1 : 0);
    for (int64_t i = 0; i < n; ++i) {
      // A row that hit the underflow guard is constant 0: no gradient flows through it.
      const bool underflow = ln[i] == kNegInf;
      const T den = underflow ? T(1) : std::exp(ln[i] - ws.aq[i] - ws.c[i]);
      const T* g = dout + i * p_.dv;
      T delta = 0;
      for (int64_t j = 0; j < p_.dv; ++j) delta += g[j] * o[i * p_.dv + j];
      for (int64_t j = 0; j < d1 - d0; ++j) ws.e[i * W + j] = underflow ? T(0) : g[d0 + j] / den;
      if (with_ones) ws.e[i * W + W - 1] = underflow ? T(0) : -delta / den;
    }
  }

  // From feature gradients df to input gradients. Fused: dlogit = f ⊙ df,
  // dx = √s·dlogit W (- s·Σ_m dlogit·x for keys: the -s‖k‖²/2 term), dW += √s·dlogitᵀx.
  // The query norm term and the row shifts drop out: Σ_m dlogit_q = 0 exactly. Masked rows
  // (mask: the chunk's key_mask entries) get none: their features were set, not computed.
  void features_backward(const T* x, const uint8_t* mask, const T* f, T* df, int64_t n, bool key, T* dx, T* dw,
                         Workspace& ws) const {
    const int64_t M = p_.m, D = p_.dq;
    for (int64_t i = 0; mask && i < n; ++i)
      if (!mask[i]) std::fill_n(df + i * M, M, T(0));
    if (!p_.fused) {
      for (int64_t i = 0; i < n * M; ++i) dx[i] += df[i];
      return;
    }
    for (int64_t i = 0; i < n * M; ++i) df[i] *= f[i];
    mm(ws, false, false, n, D, M, p_.sqrt_scale, df, M, p_.w, D, T(1), dx, D);
    if (key) {
      const T s = p_.sqrt_scale * p_.sqrt_scale;
      for (int64_t i = 0; i < n; ++i) {
        T sum = 0;
        for (int64_t j = 0; j < M; ++j) sum += df[i * M + j];
        for (int64_t j = 0; j < D; ++j) dx[i * D + j] -= s * sum * x[i * D + j];
      }
    }
    if (dw) mm(ws, true, false, M, D, n, p_.sqrt_scale, df, M, x, D, T(1), dw, D);
  }

  void backward_task(int64_t b, int64_t d0, int64_t d1, bool owner, Workspace& ws, const T* dout,
                     const T* out, const T* lognorm, T* dq, T* dk, T* dv, T* dw) const {
    const int64_t C = p_.chunk, M = p_.m, W = d1 - d0 + (owner ? 1 : 0), w = d1 - d0;
    const int64_t off = b * p_.tn;
    const T* q = p_.q + off * p_.dq;
    const T* k = p_.k + off * p_.dq;
    const T* v = p_.v + off * p_.dv;
    const T* o = out + off * p_.dv;
    const T* g = dout + off * p_.dv;
    const T* ln = lognorm + off;
    T* dqb = dq + off * p_.dq;
    T* dkb = dk + off * p_.dq;
    T* dvb = dv + off * p_.dv;
    const uint8_t* mask = p_.key_mask ? p_.key_mask + off : nullptr;
    auto at = [mask](int64_t t0) { return mask ? mask + t0 : nullptr; };   // the chunk's mask entries
    std::fill_n(dqb, p_.tn * p_.dq, T(0));
    std::fill_n(dkb, p_.tn * p_.dq, T(0));
    const int64_t nchunks = (p_.tn + C - 1) / C;

    // Pass 1 (ascending): the key state S; causal keeps the state at every chunk start.
    std::fill(ws.s.begin(), ws.s.end(), T(0));
    T pref = initial_reference();
    for (int64_t j = 0; j < nchunks; ++j) {
      const int64_t t0 = j * C, n = std::min(C, p_.tn - t0);
      if (p_.causal) {
        std::copy_n(ws.s.data(), M * W, ws.states.data() + j * M * W);
        ws.pstate[j] = pref;
      }
      const T pnew = key_features(k + t0 * p_.dq, at(t0), n, pref, false, ws);
      load_values(v + t0 * p_.dv, at(t0), n, d0, d1, owner, ws);
      update_state(n, W, pref, pnew, ws);
      pref = pnew;
    }
    std::fill(ws.r.begin(), ws.r.end(), T(0));
    T* r = ws.r.data();

    if (!p_.causal) {
      const T cref = pref;
      // Pass 2: queries. dfq = dext Sᵀ ; R = Σ_t fq_tᵀ dext_t.
      for (int64_t t0 = 0; t0 < p_.tn; t0 += C) {
        const int64_t n = std::min(C, p_.tn - t0);
        query_features(q + t0 * p_.dq, n, ws);
        std::fill_n(ws.c.data(), n, cref);
        load_output_grads(g + t0 * p_.dv, o + t0 * p_.dv, ln + t0, n, d0, d1, owner, ws);
        mm(ws, false, true, n, M, W, T(1), ws.e.data(), W, ws.s.data(), W, T(0), ws.dfq.data(), M);
        mm(ws, true, false, M, W, n, T(1), ws.fq.data(), M, ws.e.data(), W, T(1), r, W);
        features_backward(q + t0 * p_.dq, at(t0), ws.fq.data(), ws.dfq.data(), n, false, dqb + t0 * p_.dq, dw, ws);
      }
      // Pass 3: keys. dfk = vx Rᵀ ; dv = fk R[:, :w].
      for (int64_t t0 = 0; t0 < p_.tn; t0 += C) {
        const int64_t n = std::min(C, p_.tn - t0);
        key_features(k + t0 * p_.dq, at(t0), n, cref, false, ws);
        load_values(v + t0 * p_.dv, at(t0), n, d0, d1, owner, ws);
        mm(ws, false, true, n, M, W, T(1), ws.vx.data(), W, r, W, T(0), ws.dfk.data(), M);
        mm(ws, false, false, n, w, M, T(1), ws.fk.data(), M, r, W, T(0), ws.dv1.data(), w);
        store_dv(n, t0, d0, w, ws.dv1.data(), dvb);
        features_backward(k + t0 * p_.dq, at(t0), ws.fk.data(), ws.dfk.data(), n, true, dkb + t0 * p_.dq, dw, ws);
      }
      return;
    }

    // Pass 2 (descending). R_j = Σ_{t after chunk j} exp(P_{j+1} - c_t) fq_t dext_tᵀ.
    T rref = pref;  // P_{j+1}: the reference of R (c at the end of chunk j)
    for (int64_t j = nchunks - 1; j >= 0; --j) {
      const int64_t t0 = j * C, n = std::min(C, p_.tn - t0);
      const T pj = ws.pstate[j];
      const T* sj = ws.states.data() + j * M * W;
      query_features(q + t0 * p_.dq, n, ws);
      key_features(k + t0 * p_.dq, at(t0), n, pj, true, ws);
      load_values(v + t0 * p_.dv, at(t0), n, d0, d1, owner, ws);
      load_output_grads(g + t0 * p_.dv, o + t0 * p_.dv, ln + t0, n, d0, d1, owner, ws);
      T* A = ws.a.data();
      T* B = ws.b.data();
      mm(ws, false, true, n, n, M, T(1), ws.fq.data(), M, ws.fk.data(), M, T(0), A, n);
      mm(ws, false, true, n, n, W, T(1), ws.e.data(), W, ws.vx.data(), W, T(0), B, n);
      causal_decay(A, n, n, ws.c.data(), !p_.fused);
      causal_decay(B, n, n, ws.c.data(), !p_.fused);
      // dfq = B fk + diag(exp(P_j - c)) dext S_jᵀ
      mm(ws, false, false, n, M, n, T(1), B, n, ws.fk.data(), M, T(0), ws.dfq.data(), M);
      T* E = ws.f.data();  // diag(exp(P_j - c)) dext
      std::copy_n(ws.e.data(), n * W, E);
      scale_rows(E, n, W, ws.c.data(), pj, T(-1));
      if (pj != kNegInf)
        mm(ws, false, true, n, M, W, T(1), E, W, sj, W, T(1), ws.dfq.data(), M);
      // dfk = Bᵀ fq + diag(exp(c - P_{j+1})) vx R_jᵀ ; dv = Aᵀ g' + diag(exp(c - P_{j+1})) fk R_j[:, :w]
      mm(ws, true, false, n, M, n, T(1), B, n, ws.fq.data(), M, T(0), ws.dfk.data(), M);
      scale_rows(ws.vx.data(), n, W, ws.c.data(), rref);
      mm(ws, false, true, n, M, W, T(1), ws.vx.data(), W, r, W, T(1), ws.dfk.data(), M);
      mm(ws, true, false, n, w, n, T(1), A, n, ws.e.data(), W, T(0), ws.dv1.data(), w);
      mm(ws, false, false, n, w, M, T(1), ws.fk.data(), M, r, W, T(0), ws.dv2.data(), w);
      scale_rows(ws.dv2.data(), n, w, ws.c.data(), rref);
      for (int64_t i = 0; i < n * w; ++i) ws.dv1[i] += ws.dv2[i];
      store_dv(n, t0, d0, w, ws.dv1.data(), dvb);
      features_backward(k + t0 * p_.dq, at(t0), ws.fk.data(), ws.dfk.data(), n, true, dkb + t0 * p_.dq, dw, ws);
      // R_{j-1} = exp(P_j - P_{j+1}) R_j + fqᵀ diag(exp(P_j - c)) dext  (zero at j = 0)
      if (j > 0) {
        if (pj != rref) {
          const T f = exp_scalar(pj - rref);
          for (int64_t i = 0; i < M * W; ++i) r[i] *= f;
        }
        mm(ws, true, false, M, W, n, T(1), ws.fq.data(), M, E, W, T(1), r, W);
      }
      features_backward(q + t0 * p_.dq, at(t0), ws.fq.data(), ws.dfq.data(), n, false, dqb + t0 * p_.dq, dw, ws);
      rref = pj;
    }
  }

  void store_dv(int64_t n, int64_t t0, int64_t d0, int64_t w, const T* src, T* dvb) const {
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(dvb + (t0 + i) * p_.dv + d0, src + i * w, sizeof(T) * w);
  }

  AttentionProblem<T> p_;
  bool amx_;   // half GEMMs on AMX tiles (else oneDNN)
};

}  // namespace okadfa::cpu
