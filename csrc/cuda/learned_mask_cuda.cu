// CUDA kernels: learned_mask_apply and learned_mask_apply_backward (docs/ops.md).
//
// The product is a grid-stride loop over the elements; the logits' gradient gives one thread
// each feature, which adds its batch column in order n = 0, 1, ... in float64 (the CPU's and the
// reference's order: the same bits; consecutive threads read consecutive features, coalesced).
#include "cuda_common.cuh"
#include "fastmask/learned_mask.h"

namespace fastmask {
namespace cuda {
namespace {

template <typename scalar_t, typename T>
__global__ void learned_mask_kernel(const scalar_t* x, const scalar_t* s, scalar_t* y, int64_t n,
                                    int64_t F) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x)
    y[i] = (scalar_t)learned_mask_elem<T>((T)x[i], (T)s[i % F]);
}

template <typename scalar_t, typename T>
__global__ void learned_mask_logit_grad_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* s,
                                               scalar_t* out, int64_t N, int64_t F) {
  for (int64_t f = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; f < F;
       f += (int64_t)blockDim.x * gridDim.x) {
    double acc = 0.0;
    for (int64_t n = 0; n < N; ++n) acc = acc + learned_mask_grad_term<T>((T)g[n * F + f], (T)x[n * F + f]);
    out[f] = (scalar_t)learned_mask_logit_grad<T>(acc, (T)s[f]);
  }
}

at::Tensor learned_mask_apply_cuda(const at::Tensor& x_in, const at::Tensor& logits) {
  check_learned_mask_args(x_in, logits);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  at::Tensor s = at::sigmoid(logits).contiguous();  // ATen's kernel: the reference's bits
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel(), F = s.numel();
  if (n == 0) return y;
  FASTMASK_CUDA_DISPATCH(x.scalar_type(), "fastmask_learned_mask_apply_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    learned_mask_kernel<scalar_t, T><<<grid_for(n), kThreads, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor learned_mask_apply_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                            const at::Tensor& logits) {
  check_learned_mask_args(x_in, logits);
  check_like(x_in, "x", grad_in, "grad");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor g = grad_in.contiguous(), x = x_in.contiguous();
  at::Tensor s = at::sigmoid(logits).contiguous();
  at::Tensor out = at::empty_like(s, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(0), F = s.numel();
  if (F == 0) return out;
  FASTMASK_CUDA_DISPATCH(x.scalar_type(), "fastmask_learned_mask_apply_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    learned_mask_logit_grad_kernel<scalar_t, T><<<grid_for(F), kThreads, 0, stream()>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), N, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("learned_mask_apply", &fastmask::cuda::learned_mask_apply_cuda);
  m.impl("learned_mask_apply_backward", &fastmask::cuda::learned_mask_apply_backward_cuda);
}
