// CPU kernels: philox, mask_generate, mask_apply, mask_apply_backward (docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cpu_ops.h"
#include "simd_loops.h"

#include <type_traits>

namespace fastmask {
namespace cpu {

void philox_fill(const at::Tensor& out, uint64_t seed, uint64_t offset) {
  int64_t n = out.numel();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    uint32_t words[kWordChunk];
    for (int64_t s = begin; s < end; s += kWordChunk) {
      int64_t len = std::min(kWordChunk, end - s);
      philox_words(seed, offset, (uint64_t)s, len, words);
      for (int64_t t = 0; t < len; ++t) o[s + t] = (int64_t)words[t];
    }
  });
}

// Walks the N*C*H*W elements [begin, end) in pieces that stay inside one (n, c) plane
// and hold at most kWordChunk elements: fn(plane, unit, j, len) with j the offset of
// the piece inside the plane and unit the mask unit of the plane.
template <typename Fn>
static void for_each_piece(const MaskParams& p, int64_t begin, int64_t end, const Fn& fn) {
  const int64_t HW = p.H * p.W;
  for (int64_t e = begin; e < end;) {
    int64_t plane = e / HW, j = e % HW;
    int64_t len = std::min({end - e, HW - j, kWordChunk});
    int64_t unit = mask_unit(plane / p.C, plane % p.C, p.C, p.spec.per_sample, p.spec.separate);
    fn(plane, unit, j, len);
    e += len;
  }
}

// Block mode over the piece [j, j + len) of one plane, row by row: masked columns of
// row h are [mb, me) (empty outside the rectangle's rows), so each row is three plain
// loops: keep(w) for w < mb, masked(w) for mb <= w < me, keep(w) after.
template <typename KeepFn, typename MaskFn>
static void block_piece(const BlockRect& r, int64_t W, int64_t j, int64_t len,
                        const KeepFn& keep, const MaskFn& masked) {
  for (int64_t k = j; k < j + len;) {
    const int64_t h = k / W, wb = k % W, we = std::min(W, wb + (j + len - k));
    int64_t mb = we, me = we;
    if (h >= r.top && h < r.top + r.h) {
      mb = std::clamp(r.left, wb, we);
      me = std::clamp(r.left + r.w, wb, we);
    }
    int64_t w = wb;
    for (; w < mb; ++w) keep(h * W + w);
    for (; w < me; ++w) masked(h * W + w);
    for (; w < we; ++w) keep(h * W + w);
    k += we - wb;
  }
}

// Scope "fixed" (pixel, blur): the words of every mask unit (C*H*W at most), generated
// once per call and shared by all N images. Empty otherwise.
static std::vector<uint32_t> fixed_words(const MaskParams& p) {
  if (p.spec.per_sample || p.spec.mode == MaskMode::Block || p.N * p.C * p.H * p.W == 0) return {};
  std::vector<uint32_t> w((size_t)(mask_units(p.N, p.C, false, p.spec.separate) * p.H * p.W));
  philox_words(p.seed, p.offset, 0, (int64_t)w.size(), w.data());
  return w;
}

// Words of mask indices [i, i + len): from `fixed` if given, else generated into buf.
static const uint32_t* mask_words(const MaskParams& p, const std::vector<uint32_t>& fixed,
                                  int64_t i, int64_t len, uint32_t* buf) {
  if (!fixed.empty()) return fixed.data() + i;
  philox_words(p.seed, p.offset, (uint64_t)i, len, buf);
  return buf;
}

void mask_generate_fill(const at::Tensor& out, const MaskParams& p) {
  bool* o = out.data_ptr<bool>();
  const int64_t HW = p.H * p.W, total = out.numel();
  if (p.ratio == 0.0) {
    out.fill_(true);
    return;
  }
  const std::vector<uint32_t> fixed = fixed_words(p);
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    uint32_t buf[kWordChunk];
    for_each_piece(p, begin, end, [&](int64_t plane, int64_t unit, int64_t j, int64_t len) {
      bool* op = o + plane * HW;
      if (p.spec.mode == MaskMode::Block) {
        BlockRect r = block_rect(p.seed, p.offset, unit, p.area, p.H, p.W);
        block_piece(r, p.W, j, len, [&](int64_t k) { op[k] = true; },
                    [&](int64_t k) { op[k] = false; });
      } else {
        const uint32_t* words = mask_words(p, fixed, unit * HW + j, len, buf);
        for (int64_t t = 0; t < len; ++t) op[j + t] = philox_keep(words[t], p.threshold);
      }
    });
  });
}

// Blur forward, one whole (n, c) plane per step: its keep words, a copy of the plane in
// opmath with a zero row above and below (so the only checks left are the column flags,
// the same for every plane and made once), then one flat loop over the plane computes
// every pixel's mean (blur_sum_rows: blur_at's bits) and selects. Reading the copy, y may
// be x.
template <typename scalar_t>
static void blur_forward_kernel(const scalar_t* x, scalar_t* y, const MaskParams& p) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H, W = p.W, HW = H * W;
  const std::vector<uint32_t> fixed = fixed_words(p);
  std::vector<uint32_t> left(HW), right(HW);  // all ones where the neighbour exists
  std::vector<T> cnt(HW);
  for (int64_t k = 0; k < HW; ++k) {
    left[k] = k % W > 0 ? ~0u : 0u;
    right[k] = k % W + 1 < W ? ~0u : 0u;
    cnt[k] = (T)blur_count(H, W, k / W, k % W);
  }
  at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, kGrain / HW), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> buf(fixed.empty() ? HW : 0);
    std::vector<T> padded(HW + 2 * (W + 1), (T)0);  // the zero rows stay +0
    T* pl = padded.data() + W + 1;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t unit = mask_unit(plane / p.C, plane % p.C, p.C, p.spec.per_sample, p.spec.separate);
      const uint32_t* words = mask_words(p, fixed, unit * HW, HW, buf.data());
      const scalar_t* xp = x + plane * HW;
      scalar_t* yp = y + plane * HW;
      if constexpr (std::is_same_v<scalar_t, float>) {
        std::copy(xp, xp + HW, pl);
        mask_blur_plane_f32(pl, left.data(), right.data(), cnt.data(), words, yp, HW, W, p.threshold);
      } else {
        for (int64_t k = 0; k < HW; ++k) pl[k] = (T)xp[k];
        for (int64_t k = 0; k < HW; ++k) {
          const bool l = left[k] != 0, r = right[k] != 0;
          const auto L = [l](T v) { return l ? v : (T)0; };
          const auto R = [r](T v) { return r ? v : (T)0; };
          yp[k] = philox_keep(words[k], p.threshold)
                      ? xp[k]
                      : (scalar_t)(blur_sum_rows<T>(pl + k, W, L, R) / cnt[k]);
        }
      }
    }
  });
}

// Pixel and block modes: y = x where kept, fill where masked (blur: blur_forward_kernel).
template <typename scalar_t>
static void mask_apply_kernel(const scalar_t* x, scalar_t* y, const MaskParams& p,
                              double fill) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t fill_s = (scalar_t)(opmath_t)fill;
  const int64_t HW = p.H * p.W, total = p.N * p.C * HW;
  const std::vector<uint32_t> fixed = fixed_words(p);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (p.spec.mode == MaskMode::Pixel && p.spec.per_sample) {
      // Per-sample pixel masks: mask index i = n*HW + j (n the mask unit) serves `planes`
      // channel planes at stride HW: 1 where the mask index is the element index, else the
      // C shared channels of sample n. Each word is made once, in registers; with one plane
      // one stream runs over each thread's whole range (per-plane pieces' ragged ends cost
      // a third of a 28x28 plane). Element n*planes*HW + j is where index i's planes start.
      const int64_t planes = mask_index_is_element(true, p.spec.separate, p.C) ? 1 : p.C;
      at::parallel_for(0, total / planes, std::max<int64_t>(1, kGrain / planes), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end;) {
          const int64_t n = i / HW, j = i % HW, e = n * planes * HW + j;  // e == i for one plane
          const int64_t len = planes == 1 ? end - i : std::min(end - i, HW - j);
          mask_pixel_stream_f32(p.seed, p.offset, (uint64_t)i, len, f32(x) + e, f32(y) + e, p.threshold,
                                (float)fill_s, planes, HW);
          i += len;
        }
      });
      return;
    }
  }
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    uint32_t buf[kWordChunk];
    for_each_piece(p, begin, end, [&](int64_t plane, int64_t unit, int64_t j, int64_t len) {
      const scalar_t* xp = x + plane * HW;
      scalar_t* yp = y + plane * HW;
      if (p.spec.mode == MaskMode::Block) {
        BlockRect r = block_rect(p.seed, p.offset, unit, p.area, p.H, p.W);
        block_piece(r, p.W, j, len, [&](int64_t k) { yp[k] = xp[k]; },
                    [&](int64_t k) { yp[k] = fill_s; });
        return;
      }
      const uint32_t* words = mask_words(p, fixed, unit * HW + j, len, buf);
      const scalar_t* xj = xp + j;
      scalar_t* yj = yp + j;
      const scalar_t f = fill_s;
      const uint32_t thr = p.threshold;
      if constexpr (std::is_same_v<scalar_t, float>) {
        mask_pixel_f32(f32(xj), words, f32(yj), len, thr, (float)f);
      } else {
        for (int64_t t = 0; t < len; ++t) {
          const scalar_t xv = xj[t];  // unconditional load: the select vectorizes
          yj[t] = philox_keep(words[t], thr) ? xv : f;
        }
      }
    });
  });
}

// Blur backward: gx[q] = keep_q g_q + sum_{masked neighbours p} g_p / cnt_p. Per piece,
// the keep bits and the zero-padded spread plane (g_p / cnt_p where masked, else 0) of
// the rows it touches, plus one row each side, are computed once; then every output is
// a 3x3 box sum over the spread plane (blur_spread / box_sum3x3 in fastmask/mask.h).
template <typename scalar_t>
static void blur_backward_kernel(const scalar_t* g, scalar_t* gx, const MaskParams& p) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H, W = p.W, HW = H * W, total = p.N * p.C * HW, ld = W + 2;
  const std::vector<uint32_t> fixed = fixed_words(p);
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> buf;
    std::vector<uint8_t> keep;
    std::vector<T> spread;
    for_each_piece(p, begin, end, [&](int64_t plane, int64_t unit, int64_t j, int64_t len) {
      const int64_t h0 = j / W, h1 = (j + len - 1) / W;  // rows of the piece
      const int64_t r0 = std::max<int64_t>(0, h0 - 1), r1 = std::min<int64_t>(H, h1 + 2);
      const int64_t nk = (r1 - r0) * W;
      buf.resize(fixed.empty() ? nk : 0);
      keep.resize(nk);
      spread.assign((r1 - r0 + 2) * ld, (T)0);
      const uint32_t* words = mask_words(p, fixed, unit * HW + r0 * W, nk, buf.data());
      const scalar_t* gp = g + plane * HW;
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* kr = keep.data() + (r - r0) * W;
        T* sr = spread.data() + (r - r0 + 1) * ld + 1;
        const uint32_t* wr = words + (r - r0) * W;
        for (int64_t w = 0; w < W; ++w) {
          kr[w] = philox_keep(wr[w], p.threshold);
          sr[w] = blur_spread<T>((T)gp[r * W + w], blur_count(H, W, r, w), kr[w] != 0);
        }
      }
      scalar_t* op = gx + plane * HW;
      for (int64_t h = h0; h <= h1; ++h) {
        const int64_t wb = h == h0 ? j % W : 0, we = h == h1 ? (j + len - 1) % W + 1 : W;
        const uint8_t* kr = keep.data() + (h - r0) * W;
        const T* sr = spread.data() + (h - r0 + 1) * ld + 1;
        for (int64_t w = wb; w < we; ++w)
          op[h * W + w] = (scalar_t)((kr[w] ? (T)gp[h * W + w] : (T)0) + box_sum3x3<T>(sr + w, ld));
      }
    });
  });
}

static MaskParams mask_params_for(const at::Tensor& x, const char* name, double ratio,
                                  int64_t seed, int64_t offset, std::string_view mode,
                                  std::string_view scope, std::string_view channels) {
  check_floating(x, name);
  check_4d(x, name);
  return make_mask_params(x.sizes(), ratio, seed, offset, mode, scope, channels);
}

static void mask_apply_into(const at::Tensor& x, const at::Tensor& y, const MaskParams& p,
                            double fill) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mask_apply", [&] {
    if (p.spec.mode == MaskMode::Blur)
      blur_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p);
    else
      mask_apply_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p, fill);
  });
}

at::Tensor mask_apply(const at::Tensor& x_in, double ratio, int64_t seed, int64_t offset,
                      std::string_view mode, std::string_view scope,
                      std::string_view channels, double fill) {
  MaskParams p = mask_params_for(x_in, "x", ratio, seed, offset, mode, scope, channels);
  at::Tensor x = x_in.contiguous();
  if (ratio == 0.0 || x.numel() == 0) return x.clone(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  mask_apply_into(x, y, p, fill);
  return y;
}

void mask_apply_out(const at::Tensor& x_in, double ratio, int64_t seed, int64_t offset,
                    std::string_view mode, std::string_view scope, std::string_view channels,
                    double fill, const at::Tensor& out) {
  MaskParams p = mask_params_for(x_in, "x", ratio, seed, offset, mode, scope, channels);
  check_out(x_in, out);
  if (out.numel() == 0) return;
  if (ratio == 0.0) {
    if (!out.is_same(x_in)) out.copy_(x_in);
    return;
  }
  at::Tensor x = x_in.contiguous();
  // blur reads the 3x3 neighbourhood of x, so it never writes over x
  write_out(out, x, p.spec.mode != MaskMode::Blur, {},
            [&](const at::Tensor& y) { mask_apply_into(x, y, p, fill); });
}

at::Tensor mask_apply_backward(const at::Tensor& grad_in, double ratio, int64_t seed,
                               int64_t offset, std::string_view mode, std::string_view scope,
                               std::string_view channels) {
  MaskParams p = mask_params_for(grad_in, "grad", ratio, seed, offset, mode, scope, channels);
  at::Tensor g = grad_in.contiguous();
  if (ratio == 0.0 || g.numel() == 0) return g.clone(at::MemoryFormat::Contiguous);
  at::Tensor gx = at::empty_like(g, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mask_apply_backward", [&] {
    if (p.spec.mode == MaskMode::Blur)
      blur_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), p);
    else  // pixel / block: grad where kept, 0 elsewhere
      mask_apply_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), p, 0.0);
  });
  return gx;
}

}  // namespace cpu
}  // namespace fastmask

// Registration at the foot of the file that defines the kernels (torchvision's convention;
// the schemas are in csrc/register.cpp).
#include <torch/library.h>

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("mask_apply", &fastmask::cpu::mask_apply);
  m.impl("mask_apply_backward", &fastmask::cpu::mask_apply_backward);
  m.impl("mask_apply_out", &fastmask::cpu::mask_apply_out);
}
