// dfa_feedback on CUDA (torch-free: raw pointers, launched by dfa_feedback_binding.cpp and
// dfa_head_binding.cpp): the feedback projection g_p = e B_pᵀ for every point in one launch,
// with B stored or regenerated in the kernel from (seed, p, i, j) by csrc/philox.h, whose
// correctly rounded ln and cos (evaluated in double) make every entry equal the reference's
// (okadfa/feedback.py, materialize_feedback) bit for bit. okadfa/reference/dfa.py is the
// ground truth of the projection.
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

template cudaError_t dfa_project<float>(const float*, int64_t, int64_t, const float*, int64_t, int64_t, uint64_t, int,
                                        bool, float*, int64_t, cudaStream_t);
template cudaError_t dfa_project<double>(const double*, int64_t, int64_t, const double*, int64_t, int64_t, uint64_t,
                                         int, bool, double*, int64_t, cudaStream_t);

}  // namespace okadfa::cuda
