// dfa_head on CUDA (torch-free, launched by dfa_head_binding.cpp): the row-wise softmax
// cross-entropy of the fused head, in place on a chunk of logits. The logit and gradient
// GEMMs are cuBLAS calls in the binding; the projection is dfa_feedback.cu's dfa_project.
// okadfa/reference/dfa.py is the ground truth.
#include <cmath>

#include "common.cuh"
#include "launchers.h"

namespace okadfa::cuda {
namespace {

// The block-wide maximum (kMax) or sum of x, every thread getting it; red: a shared slot per warp.
template <bool kMax, typename T>
__device__ __forceinline__ T block_reduce(T x, T* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  auto warp_reduce = [](T v) {
    if constexpr (kMax) return warp_max(v);
    else return warp_sum(v);
  };
  x = warp_reduce(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < warps ? red[lane] : (kMax ? static_cast<T>(-INFINITY) : T(0));
    x = warp_reduce(x);
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
  mx = block_reduce<true>(mx, red);
  T sum = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) sum += dev_exp(y[j] - mx);
  const T log_sum = dev_log(block_reduce<false>(sum, red));
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
cudaError_t softmax_xent(T* logits, int64_t rows, int64_t V, const int64_t* targets, int64_t ignore_index,
                         const int64_t* n_valid, T* loss_rows, cudaStream_t stream) {
  if (rows == 0) return cudaGetLastError();
  softmax_xent_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, V, targets, ignore_index,
                                                                               n_valid, loss_rows);
  return cudaGetLastError();
}

template cudaError_t softmax_xent<float>(float*, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, float*,
                                         cudaStream_t);
template cudaError_t softmax_xent<double>(double*, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, double*,
                                          cudaStream_t);

}  // namespace okadfa::cuda
