// CUDA kernels: philox, mask_generate, mask_apply, mask_apply_backward (docs/ops.md).
//
// pixel / block: one thread per group of G consecutive elements (16-byte vectors);
// the mask index of consecutive elements is consecutive inside a plane, so a group
// draws whole Philox blocks (one block per 4 elements when H*W % 4 == 0) and keeps
// the last block it drew. Block mode reads the rectangle of each mask unit from a
// small table computed first (block_rect, one thread per unit).
// blur: 32x32 output tiles per thread block with the zero-padded (32+2)^2 input tile
// in shared memory; the backward (adjoint) stages the spread g / cnt (masked) or 0 the
// same way. Both sum with box_sum3x3 from mask.h, like the CPU kernels.
#include "cuda_common.cuh"

namespace fastmask {
namespace cuda {
namespace {

// ---- philox ----

__global__ void philox_kernel(int64_t* out, int64_t n, uint64_t seed, uint64_t offset,
                              bool vec) {
  const int64_t nblocks = (n + 3) / 4;
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks;
       b += (int64_t)gridDim.x * blockDim.x) {
    const Philox4 r = philox_block(seed, offset, (uint64_t)b);
    const int64_t k = 4 * b;
    if (vec && k + 4 <= n) {
      longlong2* o = reinterpret_cast<longlong2*>(out + k);
      o[0] = make_longlong2(r.v[0], r.v[1]);
      o[1] = make_longlong2(r.v[2], r.v[3]);
    } else {
      for (int l = 0; l < 4 && k + l < n; ++l) out[k + l] = (int64_t)lane_of(r, l);
    }
  }
}

void philox_launch(const at::Tensor& out, uint64_t seed, uint64_t offset) {
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  philox_kernel<<<grid_for((n + 3) / 4), kThreads, 0, stream()>>>(
      out.data_ptr<int64_t>(), n, seed, offset, aligned16(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- pixel / block ----

__global__ void block_rect_kernel(MaskParams p, int64_t units, BlockRect* rects) {
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
       u += (int64_t)gridDim.x * blockDim.x)
    rects[u] = block_rect(p.seed, p.offset, (uint64_t)u, p.area, p.H, p.W);
}

// Keep decisions of G consecutive mask indices from 4 b0: G/4 whole Philox blocks.
template <int G>
__device__ __forceinline__ void blocks_keep(const MaskParams& p, uint64_t b0, bool (&keep)[G]) {
#pragma unroll
  for (int b = 0; b < G / 4; ++b) {
    const Philox4 w = philox_block(p.seed, p.offset, b0 + b);
#pragma unroll
    for (int l = 0; l < 4; ++l) keep[4 * b + l] = philox_keep(w.v[l], p.threshold);
  }
}

// Keep decisions of the cnt (<= G) consecutive elements from linear index i0 (a
// multiple of G). whole: H*W % G == 0, so a full group lies inside one plane. identity:
// pixel mode with mask_index_is_element, so a full group draws blocks i0/4 .. directly,
// without the two divmods per group that the general path spends on its mask index.
template <int G>
__device__ __forceinline__ void group_keep(const MaskParams& p, const BlockRect* rects,
                                           int64_t i0, int cnt, bool whole, bool identity,
                                           bool (&keep)[G]) {
  static_assert(G % 4 == 0, "a group must cover whole Philox blocks");
  if (identity && cnt == G) {
    blocks_keep<G>(p, (uint64_t)i0 >> 2, keep);
    return;
  }
  const int64_t HW = p.H * p.W;
  int64_t plane, j, n, c;
  divmod(i0, HW, plane, j);
  divmod(plane, p.C, n, c);
  int64_t unit = mask_unit(n, c, p.C, p.spec.per_sample, p.spec.separate);
  if (p.spec.mode == MaskMode::Block) {
    int64_t h, w;
    divmod(j, p.W, h, w);
    BlockRect r = rects[unit];
#pragma unroll
    for (int t = 0; t < G; ++t) {
      if (t >= cnt) break;
      if (t > 0 && ++w == p.W) {  // step to the next element
        w = 0;
        if (++h == p.H) {  // next plane
          h = 0;
          if (++c == p.C) { c = 0; ++n; }
          unit = mask_unit(n, c, p.C, p.spec.per_sample, p.spec.separate);
          r = rects[unit];
        }
      }
      keep[t] = !block_masked(r, h, w);
    }
  } else if (whole && cnt == G) {
    // Mask indices unit*HW + j .. + G-1 with j a multiple of G: G/4 whole Philox blocks.
    blocks_keep<G>(p, (uint64_t)(unit * HW + j) >> 2, keep);
  } else {  // a group across planes, or the tail: draw blocks as the indices need them
    uint64_t cached = ~0ull;
    Philox4 blk = {{0, 0, 0, 0}};
#pragma unroll
    for (int t = 0; t < G; ++t) {
      if (t >= cnt) break;
      if (t > 0 && ++j == HW) {  // next plane
        j = 0;
        if (++c == p.C) { c = 0; ++n; }
        unit = mask_unit(n, c, p.C, p.spec.per_sample, p.spec.separate);
      }
      const uint64_t m = (uint64_t)(unit * HW + j);
      if ((m >> 2) != cached) {
        cached = m >> 2;
        blk = philox_block(p.seed, p.offset, cached);
      }
      keep[t] = philox_keep(lane_of(blk, (int)(m & 3)), p.threshold);
    }
  }
}

// y = x where kept, fill elsewhere (pixel, block; the backward with fill 0).
template <typename scalar_t>
__global__ void mask_apply_kernel(const scalar_t* x, scalar_t* y, MaskParams p,
                                  const BlockRect* rects, scalar_t fill, bool vec, bool whole,
                                  bool identity) {
  constexpr int G = group_size<scalar_t>();
  const int64_t total = p.N * p.C * p.H * p.W;
  for (int64_t i0 = first_group<G>(); i0 < total; i0 += group_stride<G>()) {
    const int cnt = group_count<G>(total, i0);
    bool keep[G];
    Group<scalar_t, G> v;
    load_group<scalar_t, G>(x, i0, cnt, vec, v);  // issue the load first: Philox hides its latency
    group_keep<G>(p, rects, i0, cnt, whole, identity, keep);
#pragma unroll
    for (int t = 0; t < G; ++t) v.v[t] = keep[t] ? v.v[t] : fill;
    store_group<scalar_t, G>(y, i0, cnt, vec, v);
  }
}

// out = keep (bool), 16 elements per thread (one 16-byte store).
__global__ void mask_generate_kernel(bool* out, MaskParams p, const BlockRect* rects,
                                     bool vec, bool whole, bool identity) {
  constexpr int G = 16;
  const int64_t total = p.N * p.C * p.H * p.W;
  for (int64_t i0 = first_group<G>(); i0 < total; i0 += group_stride<G>()) {
    const int cnt = group_count<G>(total, i0);
    Group<bool, G> keep;
    group_keep<G>(p, rects, i0, cnt, whole, identity, keep.v);
    store_group<bool, G>(out, i0, cnt, vec, keep);
  }
}

// ---- blur ----

constexpr int kTile = 32;              // output tile is kTile x kTile
constexpr int kHalo = kTile + 2;       // input tile with its 1-pixel border
constexpr int kColsPerThread = 4;      // thread (tx, ty): row ty, 4 columns from 4 tx
constexpr int kTx = kTile / kColsPerThread;
static_assert(kTx * kTile == kThreads, "blur block must have kThreads threads");

struct TileIndex {
  int64_t plane, h0, w0;
};

__device__ __forceinline__ TileIndex tile_of(int64_t tile, const MaskParams& p) {
  const int64_t tiles_w = (p.W + kTile - 1) / kTile, tiles_h = (p.H + kTile - 1) / kTile;
  int64_t t, th, tw;
  TileIndex r;
  divmod(tile, tiles_h * tiles_w, r.plane, t);
  divmod(t, tiles_w, th, tw);
  r.h0 = th * kTile;
  r.w0 = tw * kTile;
  return r;
}

__device__ __forceinline__ int64_t plane_unit(int64_t plane, const MaskParams& p) {
  return mask_unit(plane / p.C, plane % p.C, p.C, p.spec.per_sample, p.spec.separate);
}

__device__ __forceinline__ int64_t tile_count(const MaskParams& p) {
  return p.N * p.C * ((p.H + kTile - 1) / kTile) * ((p.W + kTile - 1) / kTile);
}

// Keep decisions of the (up to) kColsPerThread columns w0.. of row h of a plane with
// mask unit `unit`: consecutive mask indices, so at most two Philox blocks.
__device__ __forceinline__ void row_keep(const MaskParams& p, int64_t unit, int64_t h,
                                         int64_t w0, bool (&keep)[kColsPerThread]) {
  const uint64_t m0 = (uint64_t)(unit * p.H * p.W + h * p.W + w0);
  uint64_t cached = ~0ull;
  Philox4 blk = {{0, 0, 0, 0}};
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    const uint64_t m = m0 + j;
    if ((m >> 2) != cached) {
      cached = m >> 2;
      blk = philox_block(p.seed, p.offset, cached);
    }
    keep[j] = philox_keep(lane_of(blk, (int)(m & 3)), p.threshold);
  }
}

// Masked elements get the mean of their 3x3 neighbourhood: box_sum3x3 over the
// zero-padded tile (mask.h; the same bits as skipping out-of-bounds terms) / cnt.
template <typename scalar_t>
__global__ void blur_forward_kernel(const scalar_t* x, scalar_t* y, MaskParams p) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T xs[kHalo][kHalo + 1];
  const int tx = threadIdx.x % kTx, ty = threadIdx.x / kTx;
  const int64_t H = p.H, W = p.W, HW = H * W, ntiles = tile_count(p);
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const TileIndex ti = tile_of(tile, p);
    const scalar_t* xp = x + ti.plane * HW;
    __syncthreads();  // the previous tile is done with xs
    for (int idx = threadIdx.x; idx < kHalo * kHalo; idx += blockDim.x) {
      const int r = idx / kHalo, c = idx % kHalo;
      const int64_t hh = ti.h0 - 1 + r, ww = ti.w0 - 1 + c;
      xs[r][c] = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? (T)xp[hh * W + ww] : (T)0;
    }
    __syncthreads();
    const int64_t h = ti.h0 + ty, wt = ti.w0 + tx * kColsPerThread;
    if (h >= H || wt >= W) continue;
    bool keep[kColsPerThread];
    row_keep(p, plane_unit(ti.plane, p), h, wt, keep);
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int col = tx * kColsPerThread + j;
      const int64_t w = wt + j;
      if (w >= W) break;
      const T out = keep[j] ? xs[ty + 1][col + 1]
                            : box_sum3x3<T>(&xs[ty + 1][col + 1], kHalo + 1) /
                                  (T)blur_count(H, W, h, w);
      y[ti.plane * HW + h * W + w] = (scalar_t)out;
    }
  }
}

// Exact adjoint (docs/ops.md): gx[q] = (g_q if kept, else 0) + box_sum3x3 of the
// zero-padded spread tile, spread[p] = blur_spread(g_p, cnt_p, kept_p) (mask.h).
template <typename scalar_t>
__global__ void blur_backward_kernel(const scalar_t* g, scalar_t* gx, MaskParams p) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T ss[kHalo][kHalo + 1];
  const int tx = threadIdx.x % kTx, ty = threadIdx.x / kTx;
  const int64_t H = p.H, W = p.W, HW = H * W, ntiles = tile_count(p);
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const TileIndex ti = tile_of(tile, p);
    const scalar_t* gp = g + ti.plane * HW;
    const int64_t unit = plane_unit(ti.plane, p);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kHalo * kHalo; idx += blockDim.x) {
      const int r = idx / kHalo, c = idx % kHalo;
      const int64_t hh = ti.h0 - 1 + r, ww = ti.w0 - 1 + c;
      T v = (T)0;
      if (hh >= 0 && hh < H && ww >= 0 && ww < W) {
        const bool kept = keep_index(p.seed, p.offset, (uint64_t)(unit * HW + hh * W + ww),
                                     p.threshold);
        v = blur_spread<T>((T)gp[hh * W + ww], blur_count(H, W, hh, ww), kept);
      }
      ss[r][c] = v;
    }
    __syncthreads();
    const int64_t h = ti.h0 + ty, wt = ti.w0 + tx * kColsPerThread;
    if (h >= H || wt >= W) continue;
    bool keep[kColsPerThread];
    row_keep(p, unit, h, wt, keep);
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int col = tx * kColsPerThread + j;
      const int64_t w = wt + j;
      if (w >= W) break;
      const T own = keep[j] ? (T)gp[h * W + w] : (T)0;
      gx[ti.plane * HW + h * W + w] =
          (scalar_t)(own + box_sum3x3<T>(&ss[ty + 1][col + 1], kHalo + 1));
    }
  }
}

// ---- launchers ----

// Rectangles of every mask unit (block mode), else an undefined tensor.
at::Tensor block_rects(const MaskParams& p, const at::Device& device) {
  if (p.spec.mode != MaskMode::Block) return at::Tensor();
  static_assert(sizeof(BlockRect) == 4 * sizeof(int64_t), "BlockRect is 4 int64");
  const int64_t units = mask_units(p.N, p.C, p.spec.per_sample, p.spec.separate);
  at::Tensor rects = at::empty({units, 4}, at::TensorOptions().dtype(at::kLong).device(device));
  block_rect_kernel<<<grid_for(units), kThreads, 0, stream()>>>(
      p, units, reinterpret_cast<BlockRect*>(rects.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rects;
}

bool pixel_identity(const MaskParams& p) {
  return p.spec.mode == MaskMode::Pixel && mask_index_is_element(p.spec.per_sample, p.spec.separate, p.C);
}

const BlockRect* rect_ptr(const at::Tensor& rects) {
  return rects.defined() ? reinterpret_cast<const BlockRect*>(rects.const_data_ptr<int64_t>())
                         : nullptr;
}

void mask_generate_launch(const at::Tensor& out, const MaskParams& p) {
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t total = out.numel();
  if (total == 0) return;
  if (p.ratio == 0.0) {  // keeps everything, no Philox call
    out.fill_(true);
    return;
  }
  at::Tensor rects = block_rects(p, out.device());
  mask_generate_kernel<<<grid_for((total + 15) / 16), kThreads, 0, stream()>>>(
      out.data_ptr<bool>(), p, rect_ptr(rects), aligned16(out.data_ptr()), (p.H * p.W) % 16 == 0,
      pixel_identity(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y = mask_apply(x) (backward = false) or the backward of it for grad x (fill 0).
at::Tensor mask_forward_or_backward(const at::Tensor& x_in, const char* name, double ratio,
                                    int64_t seed, int64_t offset, std::string_view mode,
                                    std::string_view scope, std::string_view channels,
                                    double fill, bool backward) {
  check_floating(x_in, name);
  check_4d(x_in, name);
  const MaskParams p = make_mask_params(x_in.sizes(), ratio, seed, offset, mode, scope, channels);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  if (ratio == 0.0 || x.numel() == 0) return x.clone(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t total = x.numel();
  FASTMASK_CUDA_DISPATCH(x.scalar_type(), "fastmask_mask_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (p.spec.mode == MaskMode::Blur) {
      const int64_t tiles = p.N * p.C * ((p.H + kTile - 1) / kTile) * ((p.W + kTile - 1) / kTile);
      const unsigned grid = grid_for(tiles, 1);
      if (backward)
        blur_backward_kernel<scalar_t><<<grid, kThreads, 0, stream()>>>(xp, yp, p);
      else
        blur_forward_kernel<scalar_t><<<grid, kThreads, 0, stream()>>>(xp, yp, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor rects = block_rects(p, x.device());
    constexpr int G = group_size<scalar_t>();
    const scalar_t fill_s = (scalar_t)(T)(backward ? 0.0 : fill);
    const bool vec = aligned16(xp) && aligned16(yp);
    mask_apply_kernel<scalar_t><<<grid_for((total + G - 1) / G), kThreads, 0, stream()>>>(
        xp, yp, p, rect_ptr(rects), fill_s, vec, (p.H * p.W) % G == 0, pixel_identity(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor mask_apply_cuda(const at::Tensor& x, double ratio, int64_t seed, int64_t offset,
                           std::string_view mode, std::string_view scope,
                           std::string_view channels, double fill) {
  return mask_forward_or_backward(x, "x", ratio, seed, offset, mode, scope, channels, fill,
                                  /*backward=*/false);
}

at::Tensor mask_apply_backward_cuda(const at::Tensor& grad, double ratio, int64_t seed,
                                    int64_t offset, std::string_view mode,
                                    std::string_view scope, std::string_view channels) {
  return mask_forward_or_backward(grad, "grad", ratio, seed, offset, mode, scope, channels,
                                  0.0, /*backward=*/true);
}

// The tensor-less ops reach these through cuda_launchers() (csrc/register.cpp).
struct RegisterLaunchers {
  RegisterLaunchers() {
    cuda_launchers().philox = &philox_launch;
    cuda_launchers().mask_generate = &mask_generate_launch;
  }
};
const RegisterLaunchers register_launchers;

}  // namespace
}  // namespace cuda
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("mask_apply", &fastmask::cuda::mask_apply_cuda);
  m.impl("mask_apply_backward", &fastmask::cuda::mask_apply_backward_cuda);
}
