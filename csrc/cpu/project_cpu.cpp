// CPU kernel: project_linf, FAB's L-inf projection (docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_ops.h"
#include "fastmask/project.h"

namespace fastmask {
namespace cpu {

at::Tensor project_linf(const at::Tensor& t_in, const at::Tensor& w_in, const at::Tensor& b_in, double lo,
                        double hi) {
  check_project_linf_args(t_in, w_in, b_in, lo, hi);
  at::Tensor t = t_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  at::Tensor d = at::empty_like(t, at::MemoryFormat::Contiguous);
  const int64_t N = t.size(0), D = t.size(1);
  if (d.numel() == 0) return d;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "project_linf", [&] {
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* dp = d.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / D), [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> room((size_t)D);
      std::vector<int64_t> cand((size_t)D);
      for (int64_t r = r0; r < r1; ++r)
        project_linf_row<scalar_t>(tp + r * D, wp + r * D, bp[r], (scalar_t)lo, (scalar_t)hi, D, dp + r * D,
                                   room.data(), cand.data());
    });
  });
  return d;
}

}  // namespace cpu
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("project_linf", &fastmask::cpu::project_linf);
}
