// Helpers shared by the CUDA kernels of fastmask: launch sizes, 128-bit vector
// loads/stores, 64-bit division, deterministic block sums and per-row (per-sample)
// float64 reductions. The per-element math itself lives in csrc/include/fastmask/*.h
// (FASTMASK_HD functions shared with the CPU kernels).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastmask/common.h"
#include "fastmask/elementwise.h"
#include "fastmask/mask.h"
#include "fastmask/philox.h"

namespace fastmask {
namespace cuda {

#define FASTMASK_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

constexpr int kThreads = 256;     // threads per block of the element-wise kernels
constexpr int kRedThreads = 256;  // threads per block of the reductions (a multiple of 32)

// Blocks for `items` work items at kThreads per block, capped at a few waves: the
// kernels are grid-stride loops, so any grid covers any size (64-bit indices).
inline unsigned grid_for(int64_t items, int threads = kThreads) {
  static int sms[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (sms[dev] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev));
  int64_t want = (items + threads - 1) / threads;
  int64_t cap = (int64_t)sms[dev] * 8;
  if (want > cap) want = cap;
  return (unsigned)(want < 1 ? 1 : want);
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Elements per thread of the vectorized element-wise kernels: one 16-byte vector for
// 2-byte types (8) and float (4), two for double (4). Always a multiple of 4, so a
// thread's elements use whole Philox blocks when element k reads word k.
template <typename scalar_t>
constexpr int group_size() {
  return sizeof(scalar_t) >= 4 ? 4 : 16 / (int)sizeof(scalar_t);
}

inline bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// Grid-stride loop over groups of G consecutive elements of [0, n):
//   for (int64_t i0 = first_group<G>(); i0 < n; i0 += group_stride<G>())
// with group_count<G>(n, i0) valid elements in the group (G except at the tail).
template <int G>
__device__ __forceinline__ int64_t first_group() {
  return (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * G;
}
template <int G>
__device__ __forceinline__ int64_t group_stride() {
  return (int64_t)gridDim.x * blockDim.x * G;
}
template <int G>
__device__ __forceinline__ int group_count(int64_t n, int64_t i0) {
  return n - i0 < G ? (int)(n - i0) : G;
}

// G consecutive elements of one thread, 16-byte aligned so that it can be moved as
// whole 16-byte vectors.
template <typename T, int G>
struct alignas(16) Group {
  T v[G];
};

// Group loads/stores of G consecutive elements starting at i0 (cnt <= G of them
// valid): 16-byte vector accesses when `vec` (all pointers 16-byte aligned, so that
// i0 * sizeof(scalar_t) is too) and the group is full, scalar otherwise.
template <typename scalar_t, int G>
__device__ __forceinline__ void load_group(const scalar_t* p, int64_t i0, int cnt, bool vec,
                                           Group<scalar_t, G>& out) {
  static_assert((G * sizeof(scalar_t)) % 16 == 0, "group must be whole 16-byte vectors");
  if (vec && cnt == G) {
    const uint4* src = reinterpret_cast<const uint4*>(p + i0);
    uint4* dst = reinterpret_cast<uint4*>(out.v);
#pragma unroll
    for (int v = 0; v < (int)(G * sizeof(scalar_t) / 16); ++v) dst[v] = src[v];
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j)
      out.v[j] = j < cnt ? p[i0 + j] : scalar_t(0);
  }
}

template <typename scalar_t, int G>
__device__ __forceinline__ void store_group(scalar_t* p, int64_t i0, int cnt, bool vec,
                                            const Group<scalar_t, G>& in) {
  static_assert((G * sizeof(scalar_t)) % 16 == 0, "group must be whole 16-byte vectors");
  if (vec && cnt == G) {
    uint4* dst = reinterpret_cast<uint4*>(p + i0);
    const uint4* src = reinterpret_cast<const uint4*>(in.v);
#pragma unroll
    for (int v = 0; v < (int)(G * sizeof(scalar_t) / 16); ++v) dst[v] = src[v];
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j)
      if (j < cnt) p[i0 + j] = in.v[j];
  }
}

// Lane l of a Philox block without dynamic indexing (keeps the block in registers).
__device__ __forceinline__ uint32_t lane_of(const Philox4& b, int l) {
  return l == 0 ? b.v[0] : l == 1 ? b.v[1] : l == 2 ? b.v[2] : b.v[3];
}

// q = a / b, r = a % b for non-negative a, positive b; 32-bit when both fit.
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((uint64_t)a | (uint64_t)b) >> 32 == 0) {
    uint32_t qa = (uint32_t)a / (uint32_t)b;
    q = qa;
    r = (int64_t)((uint32_t)a - qa * (uint32_t)b);
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// Sum of one double per thread over the block, in a fixed order (warp shuffles, then
// the warp sums by warp 0): the same inputs give the same bits on every run. The
// result is valid in thread 0. blockDim.x must be a multiple of 32 (<= 1024).
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    v = lane < nwarps ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// ---- per-row float64 sums (the L2 norms of pgd_step and random_start) ----------
//
// Rows of length D are cut into fixed chunks of kRowChunk elements; block `blk` of
// row_partials_kernel sums chunk blk % P of row blk / P (P = chunks per row) with the
// functor f(row, k) -> double and writes parts[blk]. row_finish_kernel then adds the P
// partials of each row in a fixed order and maps the row's sum to a per-row scale.
// The layout depends only on (N, D), never on the device: deterministic everywhere.
constexpr int64_t kRowChunk = 16 * kRedThreads;

inline int64_t row_chunks(int64_t D) { return (D + kRowChunk - 1) / kRowChunk; }

template <typename F>
__global__ void row_partials_kernel(int64_t N, int64_t D, int64_t P, F f, double* parts) {
  for (int64_t blk = blockIdx.x; blk < N * P; blk += gridDim.x) {
    int64_t r, c;
    divmod(blk, P, r, c);
    const int64_t b = c * kRowChunk, e = b + kRowChunk < D ? b + kRowChunk : D;
    double acc = 0.0;
    for (int64_t k = b + threadIdx.x; k < e; k += blockDim.x) acc += f(r, k);
    acc = block_sum(acc);
    if (threadIdx.x == 0) parts[blk] = acc;
  }
}

// out[r] = g(r, sum of parts[r*P .. r*P+P)); one block per row.
template <typename G>
__global__ void row_finish_kernel(int64_t N, int64_t P, const double* parts, G g,
                                  double* out) {
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    double acc = 0.0;
    for (int64_t c = threadIdx.x; c < P; c += blockDim.x) acc += parts[r * P + c];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[r] = g(r, acc);
  }
}

// Per-row scales out[0..N) (float64, on the device): out[r] = g(r, sum_k f(r, k)).
template <typename F, typename G>
void row_scales(int64_t N, int64_t D, const F& f, const G& g, const at::Tensor& out) {
  const int64_t P = row_chunks(D);
  at::Tensor parts = at::empty({N * P}, out.options().dtype(at::kDouble));
  row_partials_kernel<F><<<grid_for(N * P, 1), kRedThreads, 0, stream()>>>(
      N, D, P, f, parts.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  row_finish_kernel<G><<<grid_for(N, 1), kRedThreads, 0, stream()>>>(
      N, P, parts.data_ptr<double>(), g, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastmask
