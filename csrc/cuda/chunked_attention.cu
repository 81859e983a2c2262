// CUDA fallback of favor_attention / linear_attention, forward and backward
// (torch-free: raw pointers, launched by favor_attention_binding.cpp /
// linear_attention_binding.cpp). Same algorithm and the
// same stabilisers as the CPU kernel (csrc/chunked_attention.h), so the outputs,
// lognorm and gradients agree with it up to rounding:
//
//   fq_t = exp(lq_t − aq_t)        lq = √s·q·Wᵀ, aq_t = max_m lq_t      (fused; given: q_feat, aq = 0)
//   fk_s = exp(lk_s − c_s)         lk = √s·k·Wᵀ − s‖k‖²/2, c = running max of max_m lk (causal)
//                                  or its global max (non-causal)     (given: k_feat, c = 0)
//   weight(t, s) = fq_t·fk_s·exp(c_s − c_t),  vx = [v, 1],  num_t = Σ_s weight·vx_s
//   out_t = num_t[:Dv] / den'_t,   den'_t = num_t[Dv],   lognorm_t = log den'_t + aq_t + c_t
//
// with the CPU's underflow guard (den' < min_normal^0.8 fused, den' = 0 given: row 0,
// lognorm −inf, no gradient) and its key padding (key_mask: masked keys' logits −inf, given
// features and values 0; c floored at kKeyFloor; masked query rows take the guard's 0 and −inf;
// masked rows get no feature gradient). Structure of one pass over a group of heads:
//   1. features: two GEMMs (q Wᵀ, k Wᵀ) and row kernels (one warp per row) for the
//      shifts; c by a warp scan per head. Features are kept per head (tn × M).
//   2. non-causal: everything is a batched GEMM over heads (S = fkᵀ vx, num = fq S, ...).
//      causal: one block per head walks the chunks of kChunk rows in order (forward,
//      dq) or in reverse (dk, dv) with the carried state S (or R) in global workspace;
//      the within-chunk kChunk × kChunk products are staged through shared memory.
//   3. fused backward: dq = √s dlq W, dk = √s dlk W − s(Σ_m dlk)k, dW per head then summed.
#include <cmath>
#include <limits>
#include <utility>

#include "common.cuh"
#include "launchers.h"

namespace okadfa::cuda {
namespace {

constexpr int kChunk = 32;   // rows per chunk in the causal kernels (kChunk² = 4·kThreads)
constexpr double kKeyFloor = -1e30;   // chunked_attention.h's kKeyFloor

__host__ __device__ __forceinline__ bool masked(const uint8_t* mask, int64_t r) { return mask && !mask[r]; }

template <typename T>
__host__ __device__ __forceinline__ T neg_inf() {
  return static_cast<T>(-INFINITY);
}

// exp(a − b), exactly 1 when a == b (as the CPU kernel: no NaN from −inf − −inf).
template <typename T>
__device__ __forceinline__ T rel_exp(T a, T b) {
  return a == b ? T(1) : dev_exp(a - b);
}

// ---------------------------------------------------------------- row kernels (one warp per row)

// fq = exp(lq − aq) in place, aq = row max.
template <typename T>
__global__ void query_rows_kernel(T* lq, T* aq, int64_t rows, int64_t m) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    T* x = lq + r * m;
    T mx = neg_inf<T>();
    for (int64_t j = lane; j < m; j += 32) mx = max(mx, x[j]);
    mx = warp_max(mx);
    for (int64_t j = lane; j < m; j += 32) x[j] = dev_exp(x[j] - mx);
    if (lane == 0) aq[r] = mx;
  }
}

// lk −= (s/2)‖k‖² in place (masked rows: −inf), rk = row max.
template <typename T>
__global__ void key_rows_kernel(T* lk, T* rk, const T* k, const uint8_t* mask, int64_t rows, int64_t m, int64_t dk,
                                T half_scale) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    T sq = 0;
    for (int64_t j = lane; j < dk; j += 32) sq += k[r * dk + j] * k[r * dk + j];
    const T shift = half_scale * warp_sum(sq);
    T* x = lk + r * m;
    T mx = neg_inf<T>();
    for (int64_t j = lane; j < m; j += 32) {
      const T y = masked(mask, r) ? neg_inf<T>() : x[j] - shift;
      x[j] = y;
      mx = max(mx, y);
    }
    mx = warp_max(mx);
    if (lane == 0) rk[r] = mx;
  }
}

// c = running max of rk along each head (causal) or its maximum (non-causal), floored at
// kKeyFloor. One warp per head.
template <typename T>
__global__ void key_reference_kernel(const T* rk, T* c, int64_t heads, int64_t tn, bool causal) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const T ninf = neg_inf<T>(), floor = static_cast<T>(kKeyFloor);
  for (int64_t h = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; h < heads; h += warps) {
    const T* x = rk + h * tn;
    T* y = c + h * tn;
    T carry = floor;
    for (int64_t t0 = 0; t0 < tn; t0 += 32) {
      const int64_t t = t0 + lane;
      T v = t < tn ? x[t] : ninf;
      if (causal) {
        for (int o = 1; o < 32; o <<= 1) {
          const T u = __shfl_up_sync(0xffffffffu, v, o);
          if (lane >= o) v = max(v, u);
        }
        v = max(v, carry);
        if (t < tn) y[t] = v;
        carry = __shfl_sync(0xffffffffu, v, 31);
      } else {
        carry = max(carry, warp_max(v));
      }
    }
    if (!causal)
      for (int64_t t = lane; t < tn; t += 32) y[t] = carry;
  }
}

// fk = exp(lk − c_row) in place.
template <typename T>
__global__ void key_exp_kernel(T* lk, const T* c, int64_t rows, int64_t m) {
  const int64_t n = rows * m;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    lk[e] = dev_exp(lk[e] - c[e / m]);
}

// vx = [v, 1], masked rows' values 0.
template <typename T>
__global__ void values_kernel(const T* v, T* vx, const uint8_t* mask, int64_t rows, int64_t dv) {
  const int64_t w = dv + 1, n = rows * w;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / w, j = e % w;
    vx[e] = j < dv ? (masked(mask, r) ? T(0) : v[r * dv + j]) : T(1);
  }
}

// dst = src with masked rows 0 (rows × width; dst may be src).
template <typename T>
__global__ void mask_rows_kernel(const T* src, T* dst, const uint8_t* mask, int64_t rows, int64_t width) {
  const int64_t n = rows * width;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[e] = masked(mask, e / width) ? T(0) : src[e];
}

// out = num[:, :Dv] / den', lognorm = log den' + aq + c, with the underflow guard (masked rows too).
template <typename T>
__global__ void finish_kernel(const T* num, const T* aq, const T* c, const uint8_t* mask, T* out, T* lognorm,
                              int64_t rows, int64_t dv, bool fused, T tiny) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32), w = dv + 1;
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const T den = num[r * w + dv];
    const bool underflow = masked(mask, r) || (fused ? den < tiny : den == T(0));
    for (int64_t j = lane; j < dv; j += 32) out[r * dv + j] = underflow ? T(0) : num[r * w + j] / den;
    if (lane == 0)
      lognorm[r] = underflow ? neg_inf<T>()
                             : dev_log(den) + (aq ? aq[r] : T(0)) + (c ? c[r] : T(0));
  }
}

// dext = [g / den', −(g·out) / den'] (0 for guarded rows, lognorm = −inf).
template <typename T>
__global__ void output_grads_kernel(const T* g, const T* out, const T* lognorm, const T* aq, const T* c, T* dext,
                                    int64_t rows, int64_t dv) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32), w = dv + 1;
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const T ln = lognorm[r];
    const bool underflow = ln == neg_inf<T>();
    const T den = underflow ? T(1) : dev_exp(ln - (aq ? aq[r] : T(0)) - (c ? c[r] : T(0)));
    T delta = 0;
    for (int64_t j = lane; j < dv; j += 32) {
      const T gj = g[r * dv + j];
      delta += gj * out[r * dv + j];
      dext[r * w + j] = underflow ? T(0) : gj / den;
    }
    delta = warp_sum(delta);
    if (lane == 0) dext[r * w + dv] = underflow ? T(0) : -delta / den;
  }
}

// dk[r, :] −= s·(Σ_m dlk[r, m])·k[r, :]  (the −s‖k‖²/2 term of the key logits).
template <typename T>
__global__ void key_norm_grad_kernel(const T* dlk, const T* k, T* dk, int64_t rows, int64_t m, int64_t d, T s) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    T sum = 0;
    for (int64_t j = lane; j < m; j += 32) sum += dlk[r * m + j];
    sum = warp_sum(sum);
    for (int64_t j = lane; j < d; j += 32) dk[r * d + j] -= s * sum * k[r * d + j];
  }
}

// dw[e] += Σ_h part[h·n + e].
template <typename T>
__global__ void sum_heads_kernel(const T* part, T* dw, int64_t heads, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T s = dw[e];
    for (int64_t h = 0; h < heads; ++h) s += part[h * n + e];
    dw[e] = s;
  }
}

// ---------------------------------------------------------------- causal chunk kernels (one block per head)


// out[i][j] = (Σ_w x[i, w]·y[j, w])·exp(cc[j] − cc[i]) for j ≤ i < n, 0 elsewhere (x, y: n rows,
// row stride ld, `width` columns, global memory, staged 32 columns at a time through xs, ys).
template <typename T>
__device__ void chunk_products(const T* x, const T* y, int64_t ld, int64_t width, int n, const T* cc, bool decay,
                               T (*out)[kChunk + 1], T (*xs)[kChunk + 1], T (*ys)[kChunk + 1]) {
  const int tid = threadIdx.x;
  T acc[4] = {T(0), T(0), T(0), T(0)};
  for (int64_t w0 = 0; w0 < width; w0 += kChunk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + r * kThreads, i = e / kChunk, ww = e % kChunk;
      const bool in = i < n && w0 + ww < width;
      xs[i][ww] = in ? x[i * ld + w0 + ww] : T(0);
      ys[i][ww] = in ? y[i * ld + w0 + ww] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + r * kThreads, i = e / kChunk, j = e % kChunk;
#pragma unroll 8
      for (int ww = 0; ww < kChunk; ++ww) acc[r] += xs[i][ww] * ys[j][ww];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int e = tid + r * kThreads, i = e / kChunk, j = e % kChunk;
    out[i][j] = (j <= i && i < n) ? (decay ? acc[r] * dev_exp(cc[j] - cc[i]) : acc[r]) : T(0);
  }
}

// Per chunk: cc = c of its rows, P = c before it, Pn = c at its last row; qf = exp(P − cc), kf = exp(cc − Pn).
template <typename T>
__device__ void chunk_shifts(const T* c, int64_t t0, int n, T* cc, T* qf, T* kf, T& P, T& Pn) {
  P = (c && t0 > 0) ? c[t0 - 1] : T(0);
  Pn = c ? c[t0 + n - 1] : T(0);
  const int tid = threadIdx.x;
  if (tid < kChunk) {
    const T ct = (c && tid < n) ? c[t0 + tid] : T(0);
    cc[tid] = ct;
    qf[tid] = rel_exp(P, ct);
    kf[tid] = rel_exp(ct, Pn);
  }
  __syncthreads();
}

// The causal prefix scan shared by the forward and the in-order backward pass. Per head and
// chunk of rows i (t = t0 + i), with the chunk's weights A = (X Yᵀ ⊙ within-chunk decay) from
// chunk_products:
//   out_t = [mult_t ⊙] (Σ_{j ≤ i} A_ij Z_j + qf_i · X_t S)        (DZ wide)
//   S     ← exp(P − P') S + Σ_j kf_j Y_jᵀ Z_j                      (state, DX × DZ per head)
// Forward: X = fq, Y = fk (DX = M), Z = vx (DZ = W), out = num, S = Σ fkᵀ vx.
// Backward dq: X = dext, Y = vx (DX = W), Z = fk (DZ = M), out = dfq (mult = fq when fused,
// giving the dlogits; out may alias mult), S = Σ vxᵀ fk.
template <typename T>
__global__ void __launch_bounds__(kThreads) causal_prefix_kernel(const T* X, const T* Y, const T* c, const T* Z,
                                                                 const T* mult, T* out, T* S, int64_t tn,
                                                                 int64_t DX, int64_t DZ) {
  __shared__ T A[kChunk][kChunk + 1], xs[kChunk][kChunk + 1], ys[kChunk][kChunk + 1];
  __shared__ T cc[kChunk], qf[kChunk], kf[kChunk];
  const int64_t h = blockIdx.x;
  X += h * tn * DX;
  Y += h * tn * DX;
  Z += h * tn * DZ;
  out += h * tn * DZ;
  if (mult) mult += h * tn * DZ;
  S += h * DX * DZ;
  if (c) c += h * tn;
  const int tid = threadIdx.x;
  for (int64_t t0 = 0; t0 < tn; t0 += kChunk) {
    const int n = static_cast<int>(tn - t0 < kChunk ? tn - t0 : kChunk);
    T P, Pn;
    chunk_shifts(c, t0, n, cc, qf, kf, P, Pn);
    chunk_products(X + t0 * DX, Y + t0 * DX, DX, DX, n, cc, c != nullptr, A, xs, ys);
    __syncthreads();
    for (int64_t e = tid; e < n * DZ; e += kThreads) {
      const int i = static_cast<int>(e / DZ);
      const int64_t z = e % DZ;
      T acc = 0;
      for (int j = 0; j <= i; ++j) acc += A[i][j] * Z[(t0 + j) * DZ + z];
      if (t0 > 0) {
        T carried = 0;
        const T* x = X + (t0 + i) * DX;
        for (int64_t d = 0; d < DX; ++d) carried += x[d] * S[d * DZ + z];
        acc += qf[i] * carried;
      }
      const int64_t at = (t0 + i) * DZ + z;
      out[at] = mult ? mult[at] * acc : acc;
    }
    __syncthreads();
    const T decay = rel_exp(P, Pn);
    for (int64_t e = tid; e < DX * DZ; e += kThreads) {
      const int64_t d = e / DZ, z = e % DZ;
      T acc = 0;
      for (int j = 0; j < n; ++j) acc += kf[j] * Y[(t0 + j) * DX + d] * Z[(t0 + j) * DZ + z];
      S[e] = t0 > 0 ? decay * S[e] + acc : acc;
    }
    __syncthreads();
  }
}

// One output block of the reverse pass, rows j < n of a chunk, `cols` columns:
//   out[j, x] = [mult[j, x] ·] (Σ_{i ≥ j} P[i][j]·src[i, x] + kf[j]·Σ_y rows[j, y]·R[x·r_col + y·r_row])
// the carried term (over y < len) only when has_r. src, rows, out, mult: row strides lds, len, ldo, ldo.
template <typename T>
__device__ void reverse_chunk_rows(T (*P)[kChunk + 1], const T* src, int64_t lds, int64_t cols, int n,
                                   const T* kf, bool has_r, const T* rows, int64_t len, const T* R, int64_t r_col,
                                   int64_t r_row, const T* mult, T* out, int64_t ldo) {
  for (int64_t e = threadIdx.x; e < n * cols; e += kThreads) {
    const int j = static_cast<int>(e / cols);
    const int64_t x = e % cols;
    T acc = 0;
    for (int i = j; i < n; ++i) acc += P[i][j] * src[i * lds + x];
    if (has_r) {
      T carried = 0;
      const T* row = rows + j * len;
      for (int64_t y = 0; y < len; ++y) carried += row[y] * R[x * r_col + y * r_row];
      acc += kf[j] * carried;
    }
    const int64_t at = j * ldo + x;
    out[at] = mult ? mult[at] * acc : acc;
  }
}

// Backward, causal, in reverse: dv (tn × Dv, W = Dv + 1) = Aᵀ g' + diag(kf) fk R[:, :Dv] and
// dfk (tn × M) = Bᵀ fq + diag(kf) vx Rᵀ (written as mult ⊙ dfk when mult is set; out may
// alias mult = fk: each chunk reads its fk rows before writing them). R: M × W per head,
// R = Σ_{t after the chunk} exp(Pn − c_t) fq_tᵀ dext_t.
template <typename T>
__global__ void __launch_bounds__(kThreads) causal_dk_kernel(const T* fq, const T* fk, const T* c, const T* vx,
                                                             const T* dext, const T* mult, T* out, T* dv, T* R,
                                                             int64_t tn, int64_t M, int64_t W) {
  __shared__ T A[kChunk][kChunk + 1], B[kChunk][kChunk + 1], xs[kChunk][kChunk + 1], ys[kChunk][kChunk + 1];
  __shared__ T cc[kChunk], qf[kChunk], kf[kChunk];
  const int64_t h = blockIdx.x, Dv = W - 1;
  fq += h * tn * M;
  fk += h * tn * M;
  vx += h * tn * W;
  dext += h * tn * W;
  out += h * tn * M;
  if (mult) mult += h * tn * M;
  dv += h * tn * Dv;
  R += h * M * W;
  if (c) c += h * tn;
  const int tid = threadIdx.x;
  bool has_r = false;
  for (int64_t t0 = (tn - 1) / kChunk * kChunk; t0 >= 0; t0 -= kChunk) {
    const int n = static_cast<int>(tn - t0 < kChunk ? tn - t0 : kChunk);
    T P, Pn;
    chunk_shifts(c, t0, n, cc, qf, kf, P, Pn);
    chunk_products(fq + t0 * M, fk + t0 * M, M, M, n, cc, c != nullptr, A, xs, ys);
    chunk_products(dext + t0 * W, vx + t0 * W, W, W, n, cc, c != nullptr, B, xs, ys);
    __syncthreads();
    // dv rows, then dfk rows: every read of this chunk's fk rows (dv's carried term) is done
    // before dfk may overwrite them (out aliasing mult = fk).
    reverse_chunk_rows<T>(A, dext + t0 * W, W, Dv, n, kf, has_r, fk + t0 * M, M, R, 1, W, nullptr, dv + t0 * Dv, Dv);
    __syncthreads();
    reverse_chunk_rows<T>(B, fq + t0 * M, M, M, n, kf, has_r, vx + t0 * W, W, R, W, 1, mult ? mult + t0 * M : nullptr,
                          out + t0 * M, M);
    __syncthreads();
    if (t0 > 0) {
      const T decay = rel_exp(P, Pn);
      for (int64_t e = tid; e < M * W; e += kThreads) {
        const int64_t m = e / W, w = e % W;
        T acc = 0;
        for (int i = 0; i < n; ++i) acc += qf[i] * fq[(t0 + i) * M + m] * dext[(t0 + i) * W + w];
        R[e] = has_r ? decay * R[e] + acc : acc;
      }
      has_r = true;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- host side

constexpr int64_t kAlign = 32;   // workspace pieces start at multiples of 32 elements
constexpr int64_t kBudgetBytes = int64_t(1) << 30;

int64_t aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int64_t per_head(const AttentionShape& s, bool backward) {
  const int64_t tm = s.tn * s.m, tw = s.tn * (s.dv + 1), mw = s.m * (s.dv + 1);
  const int64_t given_keys = !s.fused && s.key_mask ? tm : 0;   // the masked copy of the given key features
  if (!backward) return (s.fused ? 2 * tm + 3 * s.tn : given_keys) + 2 * tw + mw;
  return (s.fused ? 3 * tm + 3 * s.tn + (s.need_dw ? s.m * s.dq : 0) : given_keys) + 2 * tw + 2 * mw;
}

// Workspace carve-out, in the order of per_head().
template <typename T>
struct Work {
  T *fq = nullptr, *fk = nullptr, *dl = nullptr, *aq = nullptr, *c = nullptr, *rk = nullptr, *dwp = nullptr;
  T *vx = nullptr, *ext = nullptr, *S = nullptr, *R = nullptr;
  Work(const AttentionShape& s, bool backward, int64_t g, T* base) {
    auto take = [&](int64_t n) {
      T* p = base;
      base += aligned(n);
      return p;
    };
    const int64_t rows = g * s.tn, W = s.dv + 1;
    if (s.fused) {
      fq = take(rows * s.m);
      fk = take(rows * s.m);
      if (backward) dl = take(rows * s.m);
      aq = take(rows);
      c = take(rows);
      rk = take(rows);
      if (backward && s.need_dw) dwp = take(g * s.m * s.dq);
    } else if (s.key_mask) {
      fk = take(rows * s.m);
    }
    vx = take(rows * W);
    ext = take(rows * W);
    S = take(g * s.m * W);
    if (backward) R = take(g * s.m * W);
  }
};

template <typename T>
T tiny_normal() {
  return std::pow(std::numeric_limits<T>::min(), T(0.8));   // as chunked_attention.h's kTiny
}

// The inputs of `g` heads starting at q, k, v in the kernels' layout: vx = [v | 1] and the
// features (fq, fk): when fused computed from q, k and w (with aq and the key reference c, fk
// relative to c), otherwise q and k themselves (k with masked rows 0). mask: the group's key_mask.
template <typename T>
std::pair<const T*, const T*> prepare_group(const AttentionShape& s, int64_t g, const T* q, const T* k, const T* v,
                                            const T* w, const uint8_t* mask, Work<T>& ws, cudaStream_t stream) {
  const int64_t rows = g * s.tn;
  values_kernel<T><<<grid_for(rows * (s.dv + 1)), kThreads, 0, stream>>>(v, ws.vx, mask, rows, s.dv);
  if (!s.fused && !mask) return {q, k};
  if (!s.fused) {
    mask_rows_kernel<T><<<grid_for(rows * s.m), kThreads, 0, stream>>>(k, ws.fk, mask, rows, s.m);
    return {q, ws.fk};
  }
  const T ss = static_cast<T>(s.sqrt_scale);
  gemm<T>(stream, 1, rows, s.m, s.dq, ss, Strided<T>{q, s.dq, 0, false}, Strided<T>{w, s.dq, 0, true}, T(0), ws.fq,
          s.m, 0);
  gemm<T>(stream, 1, rows, s.m, s.dq, ss, Strided<T>{k, s.dq, 0, false}, Strided<T>{w, s.dq, 0, true}, T(0), ws.fk,
          s.m, 0);
  const unsigned row_grid = grid_for(rows, kThreads / 32);
  query_rows_kernel<T><<<row_grid, kThreads, 0, stream>>>(ws.fq, ws.aq, rows, s.m);
  key_rows_kernel<T><<<row_grid, kThreads, 0, stream>>>(ws.fk, ws.rk, k, mask, rows, s.m, s.dq, ss * ss / 2);
  key_reference_kernel<T><<<grid_for(g, kThreads / 32), kThreads, 0, stream>>>(ws.rk, ws.c, g, s.tn, s.causal);
  key_exp_kernel<T><<<grid_for(rows * s.m), kThreads, 0, stream>>>(ws.fk, ws.c, rows, s.m);
  return {ws.fq, ws.fk};
}

}  // namespace

int64_t attention_group(const AttentionShape& s, bool backward, int64_t elem_size) {
  const int64_t each = std::max<int64_t>(1, per_head(s, backward)) * elem_size;
  const int64_t g = std::max<int64_t>(1, kBudgetBytes / each);
  return std::max<int64_t>(1, std::min<int64_t>({g, s.bh, 65535}));
}

int64_t attention_workspace(const AttentionShape& s, bool backward, int64_t g) {
  return per_head(s, backward) * g + 16 * kAlign;
}

template <typename T>
cudaError_t attention_forward(const AttentionShape& s, const T* q, const T* k, const T* v, const T* w, T* out,
                              T* lognorm, T* workspace, int64_t group, cudaStream_t stream) {
  if (s.bh == 0 || s.tn == 0) return cudaGetLastError();
  const int64_t W = s.dv + 1, M = s.m;
  for (int64_t h0 = 0; h0 < s.bh; h0 += group) {
    const int64_t g = std::min(group, s.bh - h0), rows = g * s.tn;
    Work<T> ws(s, false, g, workspace);
    const uint8_t* mask = s.key_mask ? s.key_mask + h0 * s.tn : nullptr;
    const auto [fq, fk] = prepare_group(s, g, q + h0 * s.tn * s.dq, k + h0 * s.tn * s.dq, v + h0 * s.tn * s.dv, w,
                                        mask, ws, stream);
    T* num = ws.ext;
    if (s.causal) {
      causal_prefix_kernel<T><<<static_cast<unsigned>(g), kThreads, 0, stream>>>(fq, fk, ws.c, ws.vx, nullptr, num,
                                                                                 ws.S, s.tn, M, W);
    } else {
      gemm<T>(stream, g, M, W, s.tn, T(1), Strided<T>{fk, M, s.tn * M, true}, Strided<T>{ws.vx, W, s.tn * W, false},
              T(0), ws.S, W, M * W);
      gemm<T>(stream, g, s.tn, W, M, T(1), Strided<T>{fq, M, s.tn * M, false}, Strided<T>{ws.S, W, M * W, false},
              T(0), num, W, s.tn * W);
    }
    finish_kernel<T><<<grid_for(rows, kThreads / 32), kThreads, 0, stream>>>(
        num, ws.aq, ws.c, mask, out + h0 * s.tn * s.dv, lognorm + h0 * s.tn, rows, s.dv, s.fused, tiny_normal<T>());
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t attention_backward(const AttentionShape& s, const T* grad_out, const T* q, const T* k, const T* v,
                               const T* w, const T* out, const T* lognorm, T* dq, T* dk, T* dv, T* dw, T* workspace,
                               int64_t group, cudaStream_t stream) {
  const bool want_dw = s.fused && s.need_dw && dw != nullptr;
  if (want_dw) {
    const cudaError_t err = cudaMemsetAsync(dw, 0, sizeof(T) * s.m * s.dq, stream);
    if (err != cudaSuccess) return err;
  }
  if (s.bh == 0 || s.tn == 0) return cudaGetLastError();
  const int64_t W = s.dv + 1, M = s.m, D = s.dq;
  const T ss = static_cast<T>(s.sqrt_scale);
  for (int64_t h0 = 0; h0 < s.bh; h0 += group) {
    const int64_t g = std::min(group, s.bh - h0), rows = g * s.tn;
    const int64_t qoff = h0 * s.tn * D, voff = h0 * s.tn * s.dv;
    const T* qh = q + qoff;
    const T* kh = k + qoff;
    Work<T> ws(s, true, g, workspace);
    const uint8_t* mask = s.key_mask ? s.key_mask + h0 * s.tn : nullptr;
    const auto [fq, fk] = prepare_group(s, g, qh, kh, v + voff, w, mask, ws, stream);
    output_grads_kernel<T><<<grid_for(rows, kThreads / 32), kThreads, 0, stream>>>(
        grad_out + voff, out + voff, lognorm + h0 * s.tn, ws.aq, ws.c, ws.ext, rows, s.dv);
    // Feature gradients: fused → dlogits (f ⊙ df) in dlq/dlk; given features → dq, dk directly.
    T* dlq = s.fused ? (s.causal ? ws.dl : ws.fq) : dq + qoff;
    T* dlk = s.fused ? ws.fk : dk + qoff;
    if (s.causal) {
      causal_prefix_kernel<T><<<static_cast<unsigned>(g), kThreads, 0, stream>>>(
          ws.ext, ws.vx, ws.c, fk, s.fused ? fq : nullptr, dlq, ws.S, s.tn, W, M);
      causal_dk_kernel<T><<<static_cast<unsigned>(g), kThreads, 0, stream>>>(
          fq, fk, ws.c, ws.vx, ws.ext, s.fused ? fk : nullptr, dlk, dv + voff, ws.R, s.tn, M, W);
    } else {
      // S = fkᵀ vx, R = fqᵀ dext (M × W per head); dv = fk R[:, :Dv]; dfk = vx Rᵀ; dfq = dext Sᵀ.
      gemm<T>(stream, g, M, W, s.tn, T(1), Strided<T>{fk, M, s.tn * M, true}, Strided<T>{ws.vx, W, s.tn * W, false},
              T(0), ws.S, W, M * W);
      gemm<T>(stream, g, M, W, s.tn, T(1), Strided<T>{fq, M, s.tn * M, true}, Strided<T>{ws.ext, W, s.tn * W, false},
              T(0), ws.R, W, M * W);
      gemm<T>(stream, g, s.tn, s.dv, M, T(1), Strided<T>{fk, M, s.tn * M, false}, Strided<T>{ws.R, W, M * W, false},
              T(0), dv + voff, s.dv, s.tn * s.dv);
      gemm<T>(stream, g, s.tn, M, W, T(1), Strided<T>{ws.vx, W, s.tn * W, false}, Strided<T>{ws.R, W, M * W, true},
              T(0), dlk, M, s.tn * M, s.fused ? fk : nullptr);
      gemm<T>(stream, g, s.tn, M, W, T(1), Strided<T>{ws.ext, W, s.tn * W, false}, Strided<T>{ws.S, W, M * W, true},
              T(0), dlq, M, s.tn * M, s.fused ? fq : nullptr);
    }
    if (!s.fused && mask)   // a masked key's given features were set to 0: they get no gradient
      mask_rows_kernel<T><<<grid_for(rows * M), kThreads, 0, stream>>>(dlk, dlk, mask, rows, M);
    if (s.fused) {
      // dq = √s dlq W ; dk = √s dlk W − s(Σ_m dlk) k ; dW += √s (dlqᵀ q + dlkᵀ k).
      gemm<T>(stream, 1, rows, D, M, ss, Strided<T>{dlq, M, 0, false}, Strided<T>{w, D, 0, false}, T(0), dq + qoff, D,
              0);
      gemm<T>(stream, 1, rows, D, M, ss, Strided<T>{dlk, M, 0, false}, Strided<T>{w, D, 0, false}, T(0), dk + qoff, D,
              0);
      key_norm_grad_kernel<T><<<grid_for(rows, kThreads / 32), kThreads, 0, stream>>>(dlk, kh, dk + qoff, rows, M, D,
                                                                                      ss * ss);
      if (want_dw) {
        gemm<T>(stream, g, M, D, s.tn, ss, Strided<T>{dlq, M, s.tn * M, true}, Strided<T>{qh, D, s.tn * D, false},
                T(0), ws.dwp, D, M * D);
        gemm<T>(stream, g, M, D, s.tn, ss, Strided<T>{dlk, M, s.tn * M, true}, Strided<T>{kh, D, s.tn * D, false},
                T(1), ws.dwp, D, M * D);
        sum_heads_kernel<T><<<grid_for(M * D), kThreads, 0, stream>>>(ws.dwp, dw, g, M * D);
      }
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

#define OKADFA_INSTANTIATE(T)                                                                                       \
  template cudaError_t attention_forward<T>(const AttentionShape&, const T*, const T*, const T*, const T*, T*, T*,  \
                                            T*, int64_t, cudaStream_t);                                             \
  template cudaError_t attention_backward<T>(const AttentionShape&, const T*, const T*, const T*, const T*,         \
                                             const T*, const T*, const T*, T*, T*, T*, T*, T*, int64_t,             \
                                             cudaStream_t);
OKADFA_INSTANTIATE(float)
OKADFA_INSTANTIATE(double)
#undef OKADFA_INSTANTIATE

}  // namespace okadfa::cuda
