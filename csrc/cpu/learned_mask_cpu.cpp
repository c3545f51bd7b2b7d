// CPU kernels: learned_mask_apply and learned_mask_apply_backward (docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>

#include "cpu_ops.h"
#include "simd_loops.h"
#include "fastmask/learned_mask.h"

namespace fastmask {
namespace cpu {

#define FASTMASK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

constexpr int64_t kFeatureBlock = 256;  // features summed together: one row of doubles in L1

at::Tensor learned_mask_apply(const at::Tensor& x_in, const at::Tensor& logits) {
  check_learned_mask_args(x_in, logits);
  at::Tensor x = x_in.contiguous();
  at::Tensor s = at::sigmoid(logits).contiguous();  // ATen's kernel: the reference's bits
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(0), F = s.numel();
  if (y.numel() == 0) return y;
  FASTMASK_DISPATCH(x.scalar_type(), "learned_mask_apply", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / F), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const scalar_t* xr = xp + n * F;
        scalar_t* yr = yp + n * F;
        if constexpr (std::is_same_v<scalar_t, float>) {
          learned_mask_row_f32(f32(xr), f32(sp), f32(yr), F);
        } else {
          for (int64_t f = 0; f < F; ++f) yr[f] = (scalar_t)learned_mask_elem<T>((T)xr[f], (T)sp[f]);
        }
      }
    });
  });
  return y;
}

// The logits' gradient: per feature, the batch sum in float64 in the order n = 0, 1, ...
// (features in parallel, never the batch), so the bits do not depend on the thread count.
at::Tensor learned_mask_apply_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                       const at::Tensor& logits) {
  check_learned_mask_args(x_in, logits);
  check_like(x_in, "x", grad_in, "grad");
  at::Tensor g = grad_in.contiguous(), x = x_in.contiguous();
  at::Tensor s = at::sigmoid(logits).contiguous();
  at::Tensor out = at::empty_like(s, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(0), F = s.numel();
  if (F == 0) return out;
  FASTMASK_DISPATCH(x.scalar_type(), "learned_mask_apply_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t blocks = (F + kFeatureBlock - 1) / kFeatureBlock;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N * kFeatureBlock));
    at::parallel_for(0, blocks, grain, [&](int64_t bb, int64_t be) {
      double acc[kFeatureBlock];
      for (int64_t blk = bb; blk < be; ++blk) {
        const int64_t f0 = blk * kFeatureBlock, len = std::min(kFeatureBlock, F - f0);
        for (int64_t j = 0; j < len; ++j) acc[j] = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* gr = gp + n * F + f0;
          const scalar_t* xr = xp + n * F + f0;
          if constexpr (std::is_same_v<scalar_t, float>) {
            learned_mask_accum_f32(f32(gr), f32(xr), acc, len);
          } else {
            for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + learned_mask_grad_term<T>((T)gr[j], (T)xr[j]);
          }
        }
        for (int64_t j = 0; j < len; ++j)
          op[f0 + j] = (scalar_t)learned_mask_logit_grad<T>(acc[j], (T)sp[f0 + j]);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("learned_mask_apply", &fastmask::cpu::learned_mask_apply);
  m.impl("learned_mask_apply_backward", &fastmask::cpu::learned_mask_apply_backward);
}
