// CUDA fallback of the DFA kernels (torch-free: raw pointers, launched by
// bindings.cpp): the feedback projection g_p = e B_pᵀ for every point in one
// launch, with B stored or regenerated in the kernel from (seed, p, i, j) by
// csrc/philox.h, and the row-wise softmax cross-entropy of the fused head.
// okadfa/reference/dfa.py is the ground truth.
//
// Build note: no --use_fast_math here; the seeded entries use logf/cosf and must
// match the reference (materialize_feedback) to a few float32 ulps.
#include <cmath>

#include "../philox.h"
#include "common.cuh"
#include "launchers.h"

namespace okadfa::cuda {
namespace {

// Operand B of the projection GEMM, B(p, kk, j) = B_p[j, kk] (j < dim, kk < E), seeded.
template <typename T>
struct SeededFeedback {
  uint64_t seed;
  int64_t E;
  float sqrt_e;
  int dist;
  bool shared;
  int64_t p0;   // point of batch index 0 (launches cover at most 65535 points)
  __device__ __forceinline__ T operator()(int64_t p, int64_t kk, int64_t j) const {
    const uint32_t point = shared ? 0u : static_cast<uint32_t>(p0 + p);
    return static_cast<T>(feedback_entry(seed, point, static_cast<uint64_t>(j) * static_cast<uint64_t>(E) +
                                                          static_cast<uint64_t>(kk),
                                         sqrt_e, dist));
  }
  __device__ __forceinline__ bool col_fast() const { return false; }
};

template <typename T>
__device__ __forceinline__ T block_sum(T x, T* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < warps ? red[lane] : T(0);
    x = warp_sum(x);
    if (lane == 0) red[0] = x;
  }
  __syncthreads();
  const T r = red[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ __forceinline__ T block_max(T x, T* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_max(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < warps ? red[lane] : static_cast<T>(-INFINITY);
    x = warp_max(x);
    if (lane == 0) red[0] = x;
  }
  __syncthreads();
  const T r = red[0];
  __syncthreads();
  return r;
}

// One block per row: logp = (y − max) − log Σ exp(y − max) (as torch.log_softmax);
// loss_row = −logp[t]; dy = (exp(logp) − onehot(t)) / max(Nv, 1), 0 for ignored rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_xent_kernel(T* logits, int64_t V, const int64_t* targets,
                                                                int64_t ignore_index, const int64_t* n_valid,
                                                                T* loss_rows) {
  __shared__ T red[kThreads / 32];
  const int64_t r = blockIdx.x;
  T* y = logits + r * V;
  const int64_t t = targets[r];
  const bool valid = t != ignore_index, in_range = t >= 0 && t < V;
  T mx = static_cast<T>(-INFINITY);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = max(mx, y[j]);
  mx = block_max(mx, red);
  T sum = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) sum += dev_exp(y[j] - mx);
  const T log_sum = dev_log(block_sum(sum, red));
  if (threadIdx.x == 0)
    loss_rows[r] = !valid ? T(0) : in_range ? -((y[t] - mx) - log_sum) : static_cast<T>(NAN);
  __syncthreads();   // y[t] is read above before it is overwritten below
  const T nv = static_cast<T>(*n_valid > 1 ? *n_valid : 1);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    T d = dev_exp((y[j] - mx) - log_sum);
    if (j == t) d -= T(1);
    y[j] = valid ? d / nv : T(0);
  }
}

}  // namespace

template <typename T>
cudaError_t dfa_project(const T* e, int64_t rows, int64_t E, const T* stored, int64_t points, int64_t dim,
                        uint64_t seed, int dist, bool shared, T* out, int64_t out_stride, cudaStream_t stream) {
  if (rows == 0 || points == 0 || dim == 0) return cudaGetLastError();
  const Strided<T> a{e, E, 0, false};
  const int64_t computed = (stored || !shared) ? points : 1;   // shared seeded: point 0, then copies
  constexpr int64_t kMaxBatch = 65535;                          // gridDim.z
  for (int64_t p0 = 0; p0 < computed; p0 += kMaxBatch) {
    const int64_t np = std::min(kMaxBatch, computed - p0);
    if (stored)   // B(p, kk, j) = stored[p·dim·E + j·E + kk]
      gemm<T>(stream, np, rows, dim, E, T(1), a, Strided<T>{stored + p0 * dim * E, E, dim * E, true}, T(0),
              out + p0 * out_stride, dim, out_stride);
    else
      gemm<T>(stream, np, rows, dim, E, T(1), a,
              SeededFeedback<T>{seed, E, std::sqrt(static_cast<float>(E)), dist, shared, p0}, T(0),
              out + p0 * out_stride, dim, out_stride);
  }
  cudaError_t err = cudaGetLastError();
  for (int64_t p = computed; p < points && err == cudaSuccess; ++p)
    err = cudaMemcpyAsync(out + p * out_stride, out, sizeof(T) * rows * dim, cudaMemcpyDeviceToDevice, stream);
  return err;
}

template <typename T>
cudaError_t softmax_xent(T* logits, int64_t rows, int64_t V, const int64_t* targets, int64_t ignore_index,
                         const int64_t* n_valid, T* loss_rows, cudaStream_t stream) {
  if (rows == 0) return cudaGetLastError();
  softmax_xent_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, V, targets, ignore_index,
                                                                               n_valid, loss_rows);
  return cudaGetLastError();
}

#define OKADFA_INSTANTIATE(T)                                                                                    \
  template cudaError_t dfa_project<T>(const T*, int64_t, int64_t, const T*, int64_t, int64_t, uint64_t, int, bool, \
                                      T*, int64_t, cudaStream_t);                                                \
  template cudaError_t softmax_xent<T>(T*, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, T*,         \
                                       cudaStream_t);
OKADFA_INSTANTIATE(float)
OKADFA_INSTANTIATE(double)
#undef OKADFA_INSTANTIATE

}  // namespace okadfa::cuda
