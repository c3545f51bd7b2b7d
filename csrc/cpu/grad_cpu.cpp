// CPU kernel: grad_clip_noise_ over a list of tensors (docs/ops.md), in two parallel
// passes over fixed chunks that span all tensors (like torch._foreach / apex
// multi_tensor_apply): per-chunk sums of squares, then scale, clip, noise, smoothing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>

#include "cpu_ops.h"
#include "fastmask/elementwise.h"

namespace fastmask {
namespace cpu {

#define FASTMASK_DISPATCH_GRAD(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "grad_clip_noise_", __VA_ARGS__)

namespace {
struct Chunk {
  int64_t t;     // tensor index
  int64_t b, e;  // element range [b, e) inside the tensor
};

template <typename T>
struct UpdateArgs {
  T scale, clip, beta;
  const T* noise;  // noise_std * z_k of the piece, already in the math type
};

// One piece of pass 2 with the steps fixed at compile time, so that the loop has no
// branches and vectorizes; the per-element math is grad_clip_noise_elem /
// grad_smooth_elem, as on CUDA.
template <typename scalar_t, typename T, bool kScale, bool kClip, bool kNoise, bool kSmooth>
void update_piece(scalar_t* p, scalar_t* sp, int64_t len, const UpdateArgs<T>& a) {
  for (int64_t t = 0; t < len; ++t) {
    T v = grad_clip_noise_elem<T>((T)p[t], a.scale, kScale, a.clip, kClip,
                                  kNoise ? (double)a.noise[t] : 0.0, kNoise);
    if constexpr (kSmooth) {
      v = grad_smooth_elem<T>((T)sp[t], v, a.beta);
      sp[t] = (scalar_t)v;
    }
    p[t] = (scalar_t)v;
  }
}

template <typename scalar_t, typename T>
using UpdateFn = void (*)(scalar_t*, scalar_t*, int64_t, const UpdateArgs<T>&);

template <typename scalar_t, typename T>
UpdateFn<scalar_t, T> pick_update(bool scale, bool clip, bool noise, bool smooth) {
  static constexpr UpdateFn<scalar_t, T> table[16] = {
#define FM_U(i) &update_piece<scalar_t, T, bool((i) & 8), bool((i) & 4), bool((i) & 2), bool((i) & 1)>
      FM_U(0), FM_U(1), FM_U(2),  FM_U(3),  FM_U(4),  FM_U(5),  FM_U(6),  FM_U(7),
      FM_U(8), FM_U(9), FM_U(10), FM_U(11), FM_U(12), FM_U(13), FM_U(14), FM_U(15)};
#undef FM_U
  return table[(scale ? 8 : 0) | (clip ? 4 : 0) | (noise ? 2 : 0) | (smooth ? 1 : 0)];
}
}  // namespace

at::Tensor grad_clip_noise_(at::TensorList grads, std::optional<double> max_norm,
                            double noise_std, int64_t seed, int64_t offset,
                            std::optional<double> clip_value, std::optional<double> smoothing,
                            at::TensorList state) {
  check_grad_clip_noise_args(grads, max_norm, noise_std, clip_value, smoothing, state);
  if (grads.empty()) return at::zeros({}, at::kFloat);
  const int64_t n = (int64_t)grads.size();
  const bool smooth = smoothing.has_value();
  std::vector<at::Tensor> g(n), s(smooth ? n : 0);
  std::vector<int64_t> base(n);  // global index of each tensor's first element
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = grads[i].contiguous();
    if (smooth) s[i] = state[i].contiguous();
    base[i] = total;
    for (int64_t b = 0; b < g[i].numel(); b += kSumChunk)
      chunks.push_back({i, b, std::min(g[i].numel(), b + kSumChunk)});
    total += g[i].numel();
  }
  const int64_t nchunks = (int64_t)chunks.size();
  const int64_t grain = total <= kGrain ? std::max<int64_t>(nchunks, 1) : kGrain / kSumChunk;

  // Pass 1: sum of squares per chunk (float64), added in chunk order.
  std::vector<double> parts(nchunks);
  at::parallel_for(0, nchunks, grain, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk ch = chunks[c];
      FASTMASK_DISPATCH_GRAD(g[ch.t].scalar_type(), [&] {
        using T = at::opmath_type<scalar_t>;
        const scalar_t* p = g[ch.t].const_data_ptr<scalar_t>();
        parts[c] = lane_sum(ch.b, ch.e, [&](int64_t k) { double v = (double)(T)p[k]; return v * v; });
      });
    }
  });
  double sumsq = 0.0;
  for (double v : parts) sumsq += v;
  const double norm = std::sqrt(sumsq);

  // Pass 2: scale, clip, noise, smoothing.
  const bool do_scale = max_norm.has_value(), do_clip = clip_value.has_value();
  const bool do_noise = noise_std > 0.0;
  const double scale = do_scale ? fm_min(1.0, *max_norm / (norm + 1e-6)) : 1.0;
  const double clip = do_clip ? *clip_value : 0.0, beta = smooth ? *smoothing : 0.0;
  const uint64_t sd = as_u64(seed), off = as_u64(offset);
  if (do_scale || do_clip || do_noise || smooth) {
    at::parallel_for(0, nchunks, grain, [&](int64_t cb, int64_t ce) {
      float z[kWordChunk];
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk ch = chunks[c];
        FASTMASK_DISPATCH_GRAD(g[ch.t].scalar_type(), [&] {
          using T = at::opmath_type<scalar_t>;
          T noise[kWordChunk];
          scalar_t* p = g[ch.t].data_ptr<scalar_t>();
          scalar_t* sp = smooth ? s[ch.t].data_ptr<scalar_t>() : nullptr;
          const UpdateArgs<T> a{(T)scale, (T)clip, (T)beta, noise};
          const UpdateFn<scalar_t, T> update = pick_update<scalar_t, T>(do_scale, do_clip, do_noise, smooth);
          for (int64_t k = ch.b; k < ch.e; k += kWordChunk) {
            int64_t len = std::min(kWordChunk, ch.e - k);
            if (do_noise) {
              philox_normals(sd, off, (uint64_t)(base[ch.t] + k), len, z);
              // noise_std * z in float64, rounded once to the math type (docs/ops.md)
              for (int64_t t = 0; t < len; ++t) noise[t] = (T)(noise_std * (double)z[t]);
            }
            update(p + k, sp ? sp + k : nullptr, len, a);
          }
        });
      }
    });
    for (int64_t i = 0; i < n; ++i) {
      if (!grads[i].is_same(g[i])) grads[i].copy_(g[i]);
      if (smooth && !state[i].is_same(s[i])) state[i].copy_(s[i]);
    }
  }
  auto dtype = grads[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // float64 tensor, then cast: a norm above FLT_MAX becomes inf (as in the reference) rather
  // than the "cannot be converted to type float without overflow" of a Scalar conversion.
  return at::scalar_tensor(norm, at::TensorOptions().dtype(at::kDouble)).to(grads[0].device(), dtype);
}

}  // namespace cpu
}  // namespace fastmask

// Registration at the foot of the file that defines the kernels (torchvision's convention;
// the schemas are in csrc/register.cpp).
#include <torch/library.h>

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("grad_clip_noise_", &fastmask::cpu::grad_clip_noise_);
}
