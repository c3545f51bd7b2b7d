// CUDA kernel: project_linf, FAB's L-inf projection (docs/ops.md).
//
// One thread per row runs the row function the CPU kernel runs (fastmask/project.h: the
// selection of lam with float64 sums), so a row gets the same step on either device up to the
// order of those sums, which is the CPU's. FAB projects 2 x (still-robust points) rows of
// D = pixels each step: a few hundred to a few thousand threads, each O(D); the scratch
// (rooms and candidate indices) is one N x D buffer of each, in global memory.
#include "cuda_common.cuh"
#include "fastmask/project.h"

namespace fastmask {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void project_linf_kernel(const scalar_t* t, const scalar_t* w, const scalar_t* b, scalar_t lo,
                                    scalar_t hi, int64_t N, int64_t D, scalar_t* d, scalar_t* room,
                                    int64_t* cand) {
  for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < N; r += (int64_t)blockDim.x * gridDim.x)
    project_linf_row<scalar_t>(t + r * D, w + r * D, b[r], lo, hi, D, d + r * D, room + r * D, cand + r * D);
}

at::Tensor project_linf_cuda(const at::Tensor& t_in, const at::Tensor& w_in, const at::Tensor& b_in, double lo,
                             double hi) {
  check_project_linf_args(t_in, w_in, b_in, lo, hi);
  c10::cuda::CUDAGuard guard(t_in.device());
  at::Tensor t = t_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  at::Tensor d = at::empty_like(t, at::MemoryFormat::Contiguous);
  const int64_t N = t.size(0), D = t.size(1);
  if (d.numel() == 0) return d;
  at::Tensor room = at::empty_like(d);
  at::Tensor cand = at::empty({N, D}, t.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fastmask_project_linf_cuda", [&] {
    project_linf_kernel<scalar_t><<<grid_for(N, 128), 128, 0, stream()>>>(
        t.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), (scalar_t)lo,
        (scalar_t)hi, N, D, d.data_ptr<scalar_t>(), room.data_ptr<scalar_t>(), cand.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

}  // namespace
}  // namespace cuda
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("project_linf", &fastmask::cuda::project_linf_cuda);
}
