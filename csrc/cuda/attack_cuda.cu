// CUDA kernels: fgsm, pgd_step, pgd_step_, random_start (docs/ops.md).
//
// Element-wise steps: one thread per group of G consecutive elements, moved as 16-byte
// vectors when every pointer is 16-byte aligned (scalar otherwise and for the tail).
// L2 variants: per-sample float64 norms by block reductions in a fixed layout
// (row_scales in cuda_common.cuh), then the element-wise pass with the per-sample scales.
#include "cuda_common.cuh"

namespace fastmask {
namespace cuda {
namespace {

template <typename scalar_t, typename T>
__global__ void fgsm_kernel(const scalar_t* x, const scalar_t* g, scalar_t* y, int64_t n,
                            T eps, T lo, T hi, bool vec) {
  constexpr int G = group_size<scalar_t>();
  for (int64_t i0 = first_group<G>(); i0 < n; i0 += group_stride<G>()) {
    const int cnt = group_count<G>(n, i0);
    Group<scalar_t, G> xv, gv;
    load_group<scalar_t, G>(x, i0, cnt, vec, xv);
    load_group<scalar_t, G>(g, i0, cnt, vec, gv);
#pragma unroll
    for (int t = 0; t < G; ++t) xv.v[t] = (scalar_t)fgsm_elem<T>((T)xv.v[t], (T)gv.v[t], eps, lo, hi);
    store_group<scalar_t, G>(y, i0, cnt, vec, xv);
  }
}

// y may alias xa (pgd_step_): each element is read before it is written, by one thread.
template <typename scalar_t, typename T>
__global__ void pgd_inf_kernel(const scalar_t* xa, const scalar_t* xn, const scalar_t* g,
                               scalar_t* y, int64_t n, T alpha, T eps, T lo, T hi, bool vec) {
  constexpr int G = group_size<scalar_t>();
  for (int64_t i0 = first_group<G>(); i0 < n; i0 += group_stride<G>()) {
    const int cnt = group_count<G>(n, i0);
    Group<scalar_t, G> av, nv, gv;
    load_group<scalar_t, G>(xa, i0, cnt, vec, av);
    load_group<scalar_t, G>(xn, i0, cnt, vec, nv);
    load_group<scalar_t, G>(g, i0, cnt, vec, gv);
#pragma unroll
    for (int t = 0; t < G; ++t)
      av.v[t] = (scalar_t)pgd_inf_elem<T>((T)av.v[t], (T)nv.v[t], (T)gv.v[t], alpha, eps, lo, hi);
    store_group<scalar_t, G>(y, i0, cnt, vec, av);
  }
}

// ---- pgd L2 ----

template <typename scalar_t>
struct GradSq {  // g_k^2 of row r
  const scalar_t* g;
  int64_t D;
  __device__ double operator()(int64_t r, int64_t k) const {
    using T = at::opmath_type<scalar_t>;
    double v = (double)(T)g[r * D + k];
    return v * v;
  }
};

template <typename scalar_t>
struct DeltaSq {  // d_k^2 of row r, d = (x_adv + g * gscale_r) - x_nat in opmath
  const scalar_t *xa, *xn, *g;
  const double* gscale;
  int64_t D;
  __device__ double operator()(int64_t r, int64_t k) const {
    using T = at::opmath_type<scalar_t>;
    const int64_t o = r * D + k;
    double d = (double)pgd_l2_delta<T>((T)xa[o], (T)xn[o], (T)g[o], (T)gscale[r]);
    return d * d;
  }
};

struct GradScale {  // alpha / max(||g_n||, 1e-12)
  double alpha;
  __device__ double operator()(int64_t, double sumsq) const {
    return alpha / fm_max(::sqrt(sumsq), 1e-12);
  }
};

struct DeltaScale {  // min(1, eps / max(||d_n||, 1e-12))
  double eps;
  __device__ double operator()(int64_t, double sumsq) const {
    return fm_min(1.0, eps / fm_max(::sqrt(sumsq), 1e-12));
  }
};

template <typename scalar_t, typename T>
__global__ void pgd_l2_kernel(const scalar_t* xa, const scalar_t* xn, const scalar_t* g,
                              scalar_t* y, int64_t n, int64_t D, const double* gscale,
                              const double* dscale, T lo, T hi, bool vec) {
  constexpr int G = group_size<scalar_t>();
  for (int64_t i0 = first_group<G>(); i0 < n; i0 += group_stride<G>()) {
    const int cnt = group_count<G>(n, i0);
    Group<scalar_t, G> av, nv, gv;
    load_group<scalar_t, G>(xa, i0, cnt, vec, av);
    load_group<scalar_t, G>(xn, i0, cnt, vec, nv);
    load_group<scalar_t, G>(g, i0, cnt, vec, gv);
    int64_t r, k;
    divmod(i0, D, r, k);
    int64_t row_end = i0 - k + D;  // first index of the next row
    T gs = (T)gscale[r], ds = (T)dscale[r];
#pragma unroll
    for (int t = 0; t < G; ++t) {
      if (t >= cnt) break;
      if (i0 + t == row_end) {  // D >= 1, so at most one new row per element
        ++r;
        row_end += D;
        gs = (T)gscale[r];
        ds = (T)dscale[r];
      }
      T d = pgd_l2_delta<T>((T)av.v[t], (T)nv.v[t], (T)gv.v[t], gs);
      av.v[t] = (scalar_t)pgd_l2_finish<T>((T)nv.v[t], d, ds, lo, hi);
    }
    store_group<scalar_t, G>(y, i0, cnt, vec, av);
  }
}

// Writes the step into y (contiguous; may be xa itself).
void pgd_into(const at::Tensor& xa, const at::Tensor& xn, const at::Tensor& g,
              const at::Tensor& y, double alpha, double eps, double lo, double hi, bool l2) {
  const int64_t n = xa.numel();
  if (n == 0) return;
  FASTMASK_CUDA_DISPATCH(xa.scalar_type(), "fastmask_pgd_step_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int G = group_size<scalar_t>();
    const scalar_t* ap = xa.const_data_ptr<scalar_t>();
    const scalar_t* np = xn.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const bool vec = aligned16(ap) && aligned16(np) && aligned16(gp) && aligned16(yp);
    const unsigned grid = grid_for((n + G - 1) / G);
    if (!l2) {
      pgd_inf_kernel<scalar_t, T><<<grid, kThreads, 0, stream()>>>(
          ap, np, gp, yp, n, (T)alpha, (T)eps, (T)lo, (T)hi, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t N = xa.size(0), D = n / N;
    at::Tensor scales = at::empty({2, N}, xa.options().dtype(at::kDouble));
    at::Tensor gscale = scales[0], dscale = scales[1];
    row_scales(N, D, GradSq<scalar_t>{gp, D}, GradScale{alpha}, gscale);
    row_scales(N, D, DeltaSq<scalar_t>{ap, np, gp, gscale.const_data_ptr<double>(), D},
               DeltaScale{eps}, dscale);
    pgd_l2_kernel<scalar_t, T><<<grid, kThreads, 0, stream()>>>(
        ap, np, gp, yp, n, D, gscale.const_data_ptr<double>(), dscale.const_data_ptr<double>(),
        (T)lo, (T)hi, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                         double alpha, double eps, double lo, double hi, std::string_view norm) {
  const bool l2 = check_pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm);
  c10::cuda::CUDAGuard guard(x_adv.device());
  at::Tensor xa = x_adv.contiguous();
  at::Tensor y = at::empty_like(xa, at::MemoryFormat::Contiguous);
  pgd_into(xa, x_nat.contiguous(), grad.contiguous(), y, alpha, eps, lo, hi, l2);
  return y;
}

void pgd_step__cuda(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                    double alpha, double eps, double lo, double hi, std::string_view norm) {
  const bool l2 = check_pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm);
  c10::cuda::CUDAGuard guard(x_adv.device());
  at::Tensor xn = x_nat.contiguous(), g = grad.contiguous();
  if (x_adv.is_contiguous()) {
    pgd_into(x_adv, xn, g, x_adv, alpha, eps, lo, hi, l2);
  } else {
    at::Tensor tmp = x_adv.contiguous();
    pgd_into(tmp, xn, g, tmp, alpha, eps, lo, hi, l2);
    x_adv.copy_(tmp);
  }
}

// ---- random_start ----

// L-inf: element k uses word k; a group of G (a multiple of 4) uses G/4 whole blocks.
template <typename scalar_t, typename T>
__global__ void random_start_inf_kernel(const scalar_t* x, scalar_t* y, int64_t n,
                                        uint64_t seed, uint64_t offset, T eps, T lo, T hi,
                                        bool vec) {
  constexpr int G = group_size<scalar_t>();
  static_assert(G % 4 == 0, "groups must be whole Philox blocks");
  for (int64_t i0 = first_group<G>(); i0 < n; i0 += group_stride<G>()) {
    const int cnt = group_count<G>(n, i0);
    Group<scalar_t, G> xv;
    load_group<scalar_t, G>(x, i0, cnt, vec, xv);
#pragma unroll
    for (int b = 0; b < G / 4; ++b) {
      if (4 * b >= cnt) break;
      const Philox4 w = philox_block(seed, offset, (uint64_t)(i0 / 4 + b));
#pragma unroll
      for (int l = 0; l < 4; ++l)
        xv.v[4 * b + l] = (scalar_t)random_start_inf_elem<T>((T)xv.v[4 * b + l], w.v[l], eps, lo, hi);
    }
    store_group<scalar_t, G>(y, i0, cnt, vec, xv);
  }
}

struct NormalSq {  // z_k^2 of row r (Gaussian element r*D + k)
  uint64_t seed, offset;
  int64_t D;
  __device__ double operator()(int64_t r, int64_t k) const {
    double z = philox_normal(seed, offset, (uint64_t)(r * D + k));
    return z * z;
  }
};

struct StartScale {  // f_n = eps * u(word 2*numel + n)^(1/D) / max(||z_n||, 1e-12)
  uint64_t seed, offset, numel;
  int64_t D;
  double eps;
  __device__ double operator()(int64_t r, double sumsq) const {
    return random_start_l2_radius(seed, offset, numel, (uint64_t)r, (uint64_t)D, eps) /
           fm_max(::sqrt(sumsq), 1e-12);
  }
};

// L2: one thread per Philox block q = Gaussian elements 2q and 2q+1 (both lanes pairs).
template <typename scalar_t, typename T>
__global__ void random_start_l2_kernel(const scalar_t* x, scalar_t* y, int64_t n, int64_t D,
                                       uint64_t seed, uint64_t offset, const double* f, T lo,
                                       T hi) {
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; 2 * q < n;
       q += (int64_t)gridDim.x * blockDim.x) {
    const Philox4 w = philox_block(seed, offset, (uint64_t)q);
    int64_t r, k;
    divmod(2 * q, D, r, k);
    y[2 * q] = (scalar_t)random_start_l2_elem<T>((T)x[2 * q], box_muller(w.v[0], w.v[1]), f[r], lo, hi);
    if (2 * q + 1 < n) {
      if (k + 1 == D) ++r;
      y[2 * q + 1] = (scalar_t)random_start_l2_elem<T>((T)x[2 * q + 1], box_muller(w.v[2], w.v[3]),
                                                       f[r], lo, hi);
    }
  }
}

at::Tensor random_start_cuda(const at::Tensor& x_in, double eps, int64_t seed, int64_t offset,
                             std::string_view norm, double lo, double hi) {
  const bool l2 = check_random_start_args(x_in, eps, norm, lo, hi);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const uint64_t s = as_u64(seed), o = as_u64(offset);
  FASTMASK_CUDA_DISPATCH(x.scalar_type(), "fastmask_random_start_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int G = group_size<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (!l2) {
      const bool vec = aligned16(xp) && aligned16(yp);
      random_start_inf_kernel<scalar_t, T><<<grid_for((n + G - 1) / G), kThreads, 0, stream()>>>(
          xp, yp, n, s, o, (T)eps, (T)lo, (T)hi, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t N = x.size(0), D = n / N;
    at::Tensor f = at::empty({N}, x.options().dtype(at::kDouble));
    row_scales(N, D, NormalSq{s, o, D}, StartScale{s, o, (uint64_t)n, D, eps}, f);
    random_start_l2_kernel<scalar_t, T><<<grid_for((n + 1) / 2), kThreads, 0, stream()>>>(
        xp, yp, n, D, s, o, f.const_data_ptr<double>(), (T)lo, (T)hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ---- fgsm ----

at::Tensor fgsm_cuda(const at::Tensor& x_in, const at::Tensor& g_in, double eps, double lo,
                     double hi) {
  check_fgsm_args(x_in, g_in, eps, lo, hi);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  FASTMASK_CUDA_DISPATCH(x.scalar_type(), "fastmask_fgsm_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int G = group_size<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && aligned16(gp) && aligned16(yp);
    fgsm_kernel<scalar_t, T><<<grid_for((n + G - 1) / G), kThreads, 0, stream()>>>(
        xp, gp, yp, n, (T)eps, (T)lo, (T)hi, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace
}  // namespace cuda
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("fgsm", &fastmask::cuda::fgsm_cuda);
  m.impl("pgd_step", &fastmask::cuda::pgd_step_cuda);
  m.impl("pgd_step_", &fastmask::cuda::pgd_step__cuda);
  m.impl("random_start", &fastmask::cuda::random_start_cuda);
}
