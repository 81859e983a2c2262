// Device building blocks shared by the CUDA kernels (torch-free: nvcc compiles
// this anywhere). A tiled batched GEMM with pluggable operand loaders, warp
// reductions and launch helpers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace okadfa::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `n` items with `per_block` items per block.
inline unsigned grid_for(int64_t n, int64_t per_block = kThreads) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// A (batched) matrix in memory: element (b, r, c) = p[b·stride + r·ld + c], or
// p[b·stride + c·ld + r] when trans. col_fast: consecutive c are adjacent in memory.
template <typename T>
struct Strided {
  const T* p;
  int64_t ld, stride;
  bool trans;
  __device__ __forceinline__ T operator()(int64_t b, int64_t r, int64_t c) const {
    return trans ? p[b * stride + c * ld + r] : p[b * stride + r * ld + c];
  }
  __device__ __forceinline__ bool col_fast() const { return !trans; }
};

// GEMM tile sizes: a 64×64 output tile per block of 256 threads (4×4 each), K in steps of 16.
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;

// C[b] = alpha · A[b] B[b] (+ beta · C[b]) (⊙ mul[b] when mul is set: element-wise, same
// layout as C, may alias C). A: m×k via la(b, i, kk); B: k×n via lb(b, kk, j).
// Grid: (⌈m/64⌉, ⌈n/64⌉, batch); block: 256 threads. Accumulates in T.
template <typename T, typename LA, typename LB>
__global__ void __launch_bounds__(kThreads) gemm_kernel(int64_t m, int64_t n, int64_t k, T alpha, LA la, LB lb,
                                                        T beta, T* c, int64_t ldc, int64_t stride_c, const T* mul) {
  __shared__ T as[kTileK][kTileM + 1];
  __shared__ T bs[kTileK][kTileN + 1];
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileM, j0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool a_kfast = la.col_fast(), b_kfast = !lb.col_fast();
  T acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) acc[r][s] = T(0);
  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + r * kThreads;
      const int ai = a_kfast ? e / kTileK : e % kTileM, ak = a_kfast ? e % kTileK : e / kTileM;
      as[ak][ai] = (i0 + ai < m && k0 + ak < k) ? la(b, i0 + ai, k0 + ak) : T(0);
      const int bj = b_kfast ? e / kTileK : e % kTileN, bk = b_kfast ? e % kTileK : e / kTileN;
      bs[bk][bj] = (j0 + bj < n && k0 + bk < k) ? lb(b, k0 + bk, j0 + bj) : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      T av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = as[kk][ty + 16 * r];
#pragma unroll
      for (int s = 0; s < 4; ++s) bv[s] = bs[kk][tx + 16 * s];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int s = 0; s < 4; ++s) acc[r][s] += av[r] * bv[s];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    if (i >= m) continue;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t j = j0 + tx + 16 * s;
      if (j >= n) continue;
      const int64_t at = b * stride_c + i * ldc + j;
      T x = alpha * acc[r][s];
      if (beta != T(0)) x += beta * c[at];
      if (mul) x *= mul[at];
      c[at] = x;
    }
  }
}

template <typename T, typename LA, typename LB>
inline void gemm(cudaStream_t stream, int64_t batch, int64_t m, int64_t n, int64_t k, T alpha, LA la, LB lb, T beta,
                 T* c, int64_t ldc, int64_t stride_c, const T* mul = nullptr) {
  if (batch == 0 || m == 0 || n == 0) return;
  const dim3 grid(static_cast<unsigned>((m + kTileM - 1) / kTileM), static_cast<unsigned>((n + kTileN - 1) / kTileN),
                  static_cast<unsigned>(batch));
  gemm_kernel<T, LA, LB><<<grid, kThreads, 0, stream>>>(m, n, k, alpha, la, lb, beta, c, ldc, stride_c, mul);
}

}  // namespace okadfa::cuda
