// CPU kernels: fgsm, pgd_step, pgd_step_, random_start (docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>

#include "cpu_ops.h"
#include "simd_loops.h"
#include "fastmask/elementwise.h"

namespace fastmask {
namespace cpu {

#define FASTMASK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// y = fgsm(x, g) into the contiguous y (y may be x itself).
static void fgsm_into(const at::Tensor& x, const at::Tensor& g, const at::Tensor& y, double eps,
                      double lo, double hi) {
  FASTMASK_DISPATCH(x.scalar_type(), "fgsm", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const T e = (T)eps, l = (T)lo, h = (T)hi;
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        fgsm_f32(f32(xp) + b, f32(gp) + b, f32(yp) + b, end - b, e, l, h);
      } else {
        for (int64_t k = b; k < end; ++k)
          yp[k] = (scalar_t)fgsm_elem<T>((T)xp[k], (T)gp[k], e, l, h);
      }
    });
  });
}

at::Tensor fgsm(const at::Tensor& x_in, const at::Tensor& g_in, double eps, double lo, double hi) {
  check_fgsm_args(x_in, g_in, eps, lo, hi);
  at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  fgsm_into(x, g, y, eps, lo, hi);
  return y;
}

void fgsm_out(const at::Tensor& x_in, const at::Tensor& g_in, double eps, double lo, double hi,
              const at::Tensor& out) {
  check_fgsm_args(x_in, g_in, eps, lo, hi);
  check_out(x_in, out);
  if (out.numel() == 0) return;
  at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  write_out(out, x, true, {g}, [&](const at::Tensor& y) { fgsm_into(x, g, y, eps, lo, hi); });
}

// L2 step per sample (rows of length D), in three passes over the data: ||g_n||,
// ||d_n|| (d recomputed, never stored), then y. y may alias x_adv (pgd_step_).
template <typename scalar_t>
static void pgd_l2_kernel(const scalar_t* xa, const scalar_t* xn, const scalar_t* g, scalar_t* y,
                          int64_t N, int64_t D, double alpha, double eps, double lo, double hi) {
  using T = at::opmath_type<scalar_t>;
  std::vector<double> gn2 = row_sums(N, D, [&](int64_t r, int64_t b, int64_t e) {
    const scalar_t* gr = g + r * D;
    return lane_sum(b, e, [&](int64_t k) { double v = (double)(T)gr[k]; return v * v; });
  });
  std::vector<T> gscale(N), dscale(N);
  for (int64_t n = 0; n < N; ++n)
    gscale[n] = (T)(alpha / fm_max(std::sqrt(gn2[n]), 1e-12));
  std::vector<double> dn2 = row_sums(N, D, [&](int64_t r, int64_t b, int64_t e) {
    const int64_t o = r * D;
    const T s = gscale[r];
    return lane_sum(b, e, [&](int64_t k) {
      double d = (double)pgd_l2_delta<T>((T)xa[o + k], (T)xn[o + k], (T)g[o + k], s);
      return d * d;
    });
  });
  for (int64_t n = 0; n < N; ++n)
    dscale[n] = (T)fm_min(1.0, eps / fm_max(std::sqrt(dn2[n]), 1e-12));
  const T l = (T)lo, h = (T)hi;
  at::parallel_for(0, N * D, kGrain, [&](int64_t b, int64_t end) {
    for (int64_t k = b; k < end;) {
      int64_t r = k / D, stop = std::min(end, (r + 1) * D);
      const T gs = gscale[r], ds = dscale[r];
      for (; k < stop; ++k) {
        T d = pgd_l2_delta<T>((T)xa[k], (T)xn[k], (T)g[k], gs);
        y[k] = (scalar_t)pgd_l2_finish<T>((T)xn[k], d, ds, l, h);
      }
    }
  });
}

// Writes the step into y (contiguous, may be x_adv itself).
static void pgd_into(const at::Tensor& xa, const at::Tensor& xn, const at::Tensor& g,
                     const at::Tensor& y, double alpha, double eps, double lo, double hi,
                     bool l2) {
  if (xa.numel() == 0) return;
  FASTMASK_DISPATCH(xa.scalar_type(), "pgd_step", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* ap = xa.const_data_ptr<scalar_t>();
    const scalar_t* np = xn.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (l2) {
      int64_t N = xa.size(0);
      pgd_l2_kernel<scalar_t>(ap, np, gp, yp, N, xa.numel() / N, alpha, eps, lo, hi);
      return;
    }
    const T a = (T)alpha, e = (T)eps, l = (T)lo, h = (T)hi;
    at::parallel_for(0, xa.numel(), kGrain, [&](int64_t b, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        pgd_inf_f32(f32(ap) + b, f32(np) + b, f32(gp) + b, f32(yp) + b, end - b, a, e, l, h);
      } else {
        for (int64_t k = b; k < end; ++k)
          yp[k] = (scalar_t)pgd_inf_elem<T>((T)ap[k], (T)np[k], (T)gp[k], a, e, l, h);
      }
    });
  });
}

at::Tensor pgd_step(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                    double alpha, double eps, double lo, double hi, std::string_view norm) {
  bool l2 = check_pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm);
  at::Tensor xa = x_adv.contiguous();
  at::Tensor y = at::empty_like(xa, at::MemoryFormat::Contiguous);
  pgd_into(xa, x_nat.contiguous(), grad.contiguous(), y, alpha, eps, lo, hi, l2);
  return y;
}

void pgd_step_(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
               double alpha, double eps, double lo, double hi, std::string_view norm) {
  bool l2 = check_pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm);
  at::Tensor xn = x_nat.contiguous(), g = grad.contiguous();
  if (x_adv.is_contiguous()) {
    pgd_into(x_adv, xn, g, x_adv, alpha, eps, lo, hi, l2);
  } else {
    at::Tensor tmp = x_adv.contiguous();
    pgd_into(tmp, xn, g, tmp, alpha, eps, lo, hi, l2);
    x_adv.copy_(tmp);
  }
}

// L2 random start: z_k Gaussian (float32 Box-Muller, used as float64) of element k, per sample
// f_n = eps * u(word 2*numel + n)^(1/D) / max(||z_n||, 1e-12); y = clamp(x + z f_n).
template <typename scalar_t>
static void random_start_l2_kernel(const scalar_t* x, scalar_t* y, int64_t N, int64_t D,
                                   double eps, uint64_t seed, uint64_t offset, double lo,
                                   double hi) {
  using T = at::opmath_type<scalar_t>;
  std::vector<float> z((size_t)(N * D));  // generated once, used by both passes
  std::vector<double> zn2 = row_sums(N, D, [&](int64_t r, int64_t b, int64_t e) {
    float* zp = z.data() + r * D;
    philox_normals(seed, offset, (uint64_t)(r * D + b), e - b, zp + b);
    return lane_sum(b, e, [&](int64_t k) { double v = (double)zp[k]; return v * v; });
  });
  const uint64_t numel = (uint64_t)(N * D);
  std::vector<double> f(N);
  for (int64_t n = 0; n < N; ++n)
    f[n] = random_start_l2_radius(seed, offset, numel, (uint64_t)n, (uint64_t)D, eps) /
           fm_max(std::sqrt(zn2[n]), 1e-12);
  const T l = (T)lo, h = (T)hi;
  const float* zp = z.data();
  at::parallel_for(0, N * D, kGrain, [&](int64_t b, int64_t end) {
    for (int64_t k = b; k < end;) {
      int64_t r = k / D, stop = std::min(end, (r + 1) * D);
      const double fr = f[r];
      for (; k < stop; ++k) y[k] = (scalar_t)random_start_l2_elem<T>((T)x[k], zp[k], fr, l, h);
    }
  });
}

// y = random_start(x) into the contiguous y (y may be x itself).
static void random_start_into(const at::Tensor& x, const at::Tensor& y, double eps, int64_t seed,
                              int64_t offset, bool l2, double lo, double hi) {
  if (x.numel() == 0) return;
  const uint64_t s = as_u64(seed), o = as_u64(offset);
  FASTMASK_DISPATCH(x.scalar_type(), "random_start", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (l2) {
      int64_t N = x.size(0);
      random_start_l2_kernel<scalar_t>(xp, yp, N, x.numel() / N, eps, s, o, lo, hi);
      return;
    }
    const T e = (T)eps, l = (T)lo, h = (T)hi;
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        random_start_stream_f32(s, o, (uint64_t)b, end - b, f32(xp) + b, f32(yp) + b, e, l, h);
        return;
      }
      uint32_t words[kWordChunk];
      for (int64_t k = b; k < end; k += kWordChunk) {
        int64_t len = std::min(kWordChunk, end - k);
        philox_words(s, o, (uint64_t)k, len, words);
        for (int64_t t = 0; t < len; ++t)
          yp[k + t] = (scalar_t)random_start_inf_elem<T>((T)xp[k + t], words[t], e, l, h);
      }
    });
  });
}

at::Tensor random_start(const at::Tensor& x_in, double eps, int64_t seed, int64_t offset,
                        std::string_view norm, double lo, double hi) {
  bool l2 = check_random_start_args(x_in, eps, norm, lo, hi);
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  random_start_into(x, y, eps, seed, offset, l2, lo, hi);
  return y;
}

void random_start_out(const at::Tensor& x_in, double eps, int64_t seed, int64_t offset,
                      std::string_view norm, double lo, double hi, const at::Tensor& out) {
  bool l2 = check_random_start_args(x_in, eps, norm, lo, hi);
  check_out(x_in, out);
  at::Tensor x = x_in.contiguous();
  write_out(out, x, true, {}, [&](const at::Tensor& y) {
    random_start_into(x, y, eps, seed, offset, l2, lo, hi);
  });
}

}  // namespace cpu
}  // namespace fastmask

// Registration at the foot of the file that defines the kernels (torchvision's convention;
// the schemas are in csrc/register.cpp).
#include <torch/library.h>

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("fgsm", &fastmask::cpu::fgsm);
  m.impl("pgd_step", &fastmask::cpu::pgd_step);
  m.impl("pgd_step_", &fastmask::cpu::pgd_step_);
  m.impl("random_start", &fastmask::cpu::random_start);
  m.impl("fgsm_out", &fastmask::cpu::fgsm_out);
  m.impl("random_start_out", &fastmask::cpu::random_start_out);
}
