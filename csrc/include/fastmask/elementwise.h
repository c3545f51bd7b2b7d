// Per-element math of the attack-step and gradient ops (docs/ops.md), shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). No ATen types: plain
// scalars. T is the opmath type (float for float16/bfloat16/float32, double for
// float64); callers convert loads to T and round the result to the storage type once.
#pragma once

#include "fastmask/philox.h"

namespace fastmask {

// sign(g) = (g > 0) - (g < 0): sign(0) = sign(NaN) = 0. Written as selects (no
// branches) so that loops over it vectorize.
template <typename T>
FASTMASK_HD T fm_sign(T g) {
  return (g > (T)0 ? (T)1 : (T)0) - (g < (T)0 ? (T)1 : (T)0);
}

// NaN-propagating min/max/clamp (like torch.minimum / torch.maximum / torch.clamp):
// NaN if either operand is NaN (which NaN is unspecified).
template <typename T>
FASTMASK_HD T fm_min(T a, T b) {
  T m = b < a ? b : a;  // a if a is NaN
  return b != b ? b : m;
}

template <typename T>
FASTMASK_HD T fm_max(T a, T b) {
  T m = b > a ? b : a;  // a if a is NaN
  return b != b ? b : m;
}

template <typename T>
FASTMASK_HD T fm_clamp(T x, T lo, T hi) {
  return fm_min(fm_max(x, lo), hi);
}

// fgsm: clamp(x + eps * sign(grad), lo, hi).
template <typename T>
FASTMASK_HD T fgsm_elem(T x, T g, T eps, T lo, T hi) {
  return fm_clamp(x + eps * fm_sign(g), lo, hi);
}

// pgd L-inf: clamp(min(max(x_adv + alpha*sign(g), x_nat - eps), x_nat + eps), lo, hi).
template <typename T>
FASTMASK_HD T pgd_inf_elem(T x_adv, T x_nat, T g, T alpha, T eps, T lo, T hi) {
  T v = x_adv + alpha * fm_sign(g);
  T below = x_nat - eps;
  T above = x_nat + eps;
  return fm_clamp(fm_min(fm_max(v, below), above), lo, hi);
}

// pgd L2, per element, given the per-sample scales computed from float64 norms:
// d = (x_adv + g * gscale) - x_nat, with gscale = alpha / max(||g_n||, 1e-12).
template <typename T>
FASTMASK_HD T pgd_l2_delta(T x_adv, T x_nat, T g, T gscale) {
  return (x_adv + g * gscale) - x_nat;
}

// y = clamp(x_nat + d * dscale, lo, hi), dscale = min(1, eps / max(||d_n||, 1e-12)).
template <typename T>
FASTMASK_HD T pgd_l2_finish(T x_nat, T d, T dscale, T lo, T hi) {
  return fm_clamp(x_nat + d * dscale, lo, hi);
}

// random start L-inf: y = clamp(x + eps * (2u - 1), lo, hi), u = u(word k).
template <typename T>
FASTMASK_HD T random_start_inf_elem(T x, uint32_t w, T eps, T lo, T hi) {
  T u = philox_uniform<T>(w);
  return fm_clamp(x + eps * ((T)2 * u - (T)1), lo, hi);
}

// random start L2: y = clamp(x + z * f_n, lo, hi), z the float64 Gaussian of the
// element and f_n = r_n / max(||z_n||, 1e-12) (float64); z * f_n rounded to T.
template <typename T>
FASTMASK_HD T random_start_l2_elem(T x, double z, double f, T lo, T hi) {
  return fm_clamp(x + (T)(z * f), lo, hi);
}

// Radius of the L2 random start of sample n: eps * u(word 2*numel + n)^(1/D).
FASTMASK_HD double random_start_l2_radius(uint64_t seed, uint64_t offset, uint64_t numel,
                                          uint64_t n, uint64_t D, double eps) {
  double u = philox_uniform<double>(philox_word(seed, offset, 2 * numel + n));
  return eps * ::pow(u, 1.0 / (double)D);
}

// grad_clip_noise_ steps 2-4 for one element (step 5, smoothing, is grad_smooth_elem).
// scale = min(1, max_norm / (norm + 1e-6)) or 1; clip = clip_value or <= 0 for none;
// noise = noise_std * z_k (float64, 0 when noise is off).
template <typename T>
FASTMASK_HD T grad_clip_noise_elem(T g, T scale, bool do_scale, T clip, bool do_clip,
                                   double noise, bool do_noise) {
  if (do_scale) g = g * scale;
  if (do_clip) g = fm_clamp(g, -clip, clip);
  if (do_noise) g = g + (T)noise;
  return g;
}

// smoothing: s <- beta * s + (1 - beta) * g; the new g is s.
template <typename T>
FASTMASK_HD T grad_smooth_elem(T s, T g, T beta) {
  return beta * s + ((T)1 - beta) * g;
}

}  // namespace fastmask
