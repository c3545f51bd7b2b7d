// Per-element math of mask_apply / mask_generate (docs/ops.md), shared by the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). No ATen types.
#pragma once

#include "fastmask/philox.h"

namespace fastmask {

enum class MaskMode : int { Pixel = 0, Blur = 1, Block = 2 };

// Mask unit of the (n, c) plane of an N x C x H x W input: n (sample/shared),
// n*C + c (sample/separate), 0 (fixed/shared), c (fixed/separate). The mask index of
// element (n, c, h, w) is unit * H * W + h * W + w (the table in docs/ops.md).
FASTMASK_HD int64_t mask_unit(int64_t n, int64_t c, int64_t C, bool per_sample, bool separate) {
  return per_sample ? (separate ? n * C + c : n) : (separate ? c : 0);
}

// True when the mask index of every element is its own linear index (unit * H*W + j == i):
// per-sample masks with separate channels or one channel. Pixel kernels then draw word i
// for element i with no index arithmetic (one stream over a whole range).
FASTMASK_HD bool mask_index_is_element(bool per_sample, bool separate, int64_t C) {
  return per_sample && (separate || C == 1);
}

// Number of mask units (block mode) / the mask index space is units * H * W.
FASTMASK_HD int64_t mask_units(int64_t N, int64_t C, bool per_sample, bool separate) {
  return (per_sample ? N : 1) * (separate ? C : 1);
}

// Keep decision of mask index i (pixel and blur modes).
FASTMASK_HD bool keep_index(uint64_t seed, uint64_t offset, uint64_t i, uint32_t threshold) {
  return philox_keep(philox_word(seed, offset, i), threshold);
}

// Block mode: masked area A = floor(ratio * (H*W) + 0.5), in float64.
FASTMASK_HD int64_t block_area(double ratio, int64_t H, int64_t W) {
  return (int64_t)::floor(ratio * (double)(H * W) + 0.5);
}

// The masked rectangle of one unit; rows [top, top + h), columns [left, left + w).
struct BlockRect {
  int64_t top, left, h, w;
};

// Rectangle of mask unit `unit` for area A (0 <= A <= H*W): words = Philox block `unit`.
FASTMASK_HD BlockRect block_rect(uint64_t seed, uint64_t offset, uint64_t unit, int64_t A,
                                 int64_t H, int64_t W) {
  BlockRect r = {0, 0, 0, 0};
  if (A <= 0 || H <= 0 || W <= 0) return r;
  Philox4 p = philox_block(seed, offset, unit);
  int64_t hmin = (A + W - 1) / W;
  int64_t hmax = H < A ? H : A;
  r.h = hmin + (int64_t)((uint64_t)p.v[0] % (uint64_t)(hmax - hmin + 1));
  int64_t wd = (2 * A + r.h) / (2 * r.h);
  r.w = W < wd ? W : wd;
  r.top = (int64_t)((uint64_t)p.v[1] % (uint64_t)(H - r.h + 1));
  r.left = (int64_t)((uint64_t)p.v[2] % (uint64_t)(W - r.w + 1));
  return r;
}

// (& rather than &&: no branches, so loops over it vectorize.)
FASTMASK_HD bool block_masked(const BlockRect& r, int64_t h, int64_t w) {
  return (h >= r.top) & (h < r.top + r.h) & (w >= r.left) & (w < r.left + r.w);
}

// Number of in-bounds pixels of the 3x3 neighbourhood of (h, w).
FASTMASK_HD int blur_count(int64_t H, int64_t W, int64_t h, int64_t w) {
  int rows = 1 + (h > 0) + (h + 1 < H);
  int cols = 1 + (w > 0) + (w + 1 < W);
  return rows * cols;
}

// Mean of the 3x3 neighbourhood of (h, w) in one H x W plane, summed in opmath T in
// exactly the order of docs/ops.md (dh outer, dw inner, both -1, 0, 1).
template <typename T, typename scalar_t>
FASTMASK_HD T blur_at(const scalar_t* plane, int64_t H, int64_t W, int64_t h, int64_t w) {
  T s = (T)0;
  int cnt = 0;
  for (int dh = -1; dh <= 1; ++dh) {
    int64_t hh = h + dh;
    if (hh < 0 || hh >= H) continue;
    for (int dw = -1; dw <= 1; ++dw) {
      int64_t ww = w + dw;
      if (ww < 0 || ww >= W) continue;
      s = s + (T)plane[hh * W + ww];
      ++cnt;
    }
  }
  return s / (T)cnt;
}

// Adjoint of blur-masking (docs/ops.md) via a zero-padded "spread" plane:
// spread[p] = g_p / cnt_p if p is masked, else +0; then
// gx[q] = (g_q if kept, else 0) + box_sum3x3(&spread[q], row stride of the padded plane).
template <typename T>
FASTMASK_HD T blur_spread(T g, int cnt, bool kept) {
  return kept ? (T)0 : g / (T)cnt;
}

// Sum of the 3x3 window centred at c (row stride ld) from 0 in the blur order. With
// zero padding this equals skipping out-of-bounds terms bit for bit: the running sum
// starts at +0 and so is never -0, and adding +0 to it changes nothing.
template <typename T>
FASTMASK_HD T box_sum3x3(const T* c, int64_t ld) {
  T s = (T)0;
  s = s + c[-ld - 1]; s = s + c[-ld]; s = s + c[-ld + 1];
  s = s + c[-1];      s = s + c[0];   s = s + c[1];
  s = s + c[ld - 1];  s = s + c[ld];  s = s + c[ld + 1];
  return s;
}

// blur_at's sum for the element at c of a plane stored row after row (row stride ld) with
// a zero row above and below it: left(v) / right(v) return the left / right column's term
// v, or +0 where that column is outside the plane (w == 0 / w == W - 1). The same
// additions in the same order as blur_at (the skipped terms become +0 and adding +0
// changes nothing, as in box_sum3x3), so the same bits; a NaN of the neighbouring row
// stays out. The kernels choose how to zero (a select, or a bit mask that vectorizes).
template <typename T, typename Left, typename Right>
FASTMASK_HD T blur_sum_rows(const T* c, int64_t ld, const Left& left, const Right& right) {
  T s = (T)0;
  s = s + left(c[-ld - 1]); s = s + c[-ld]; s = s + right(c[-ld + 1]);
  s = s + left(c[-1]);      s = s + c[0];   s = s + right(c[1]);
  s = s + left(c[ld - 1]);  s = s + c[ld];  s = s + right(c[ld + 1]);
  return s;
}

}  // namespace fastmask
