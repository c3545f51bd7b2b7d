// CUDA kernel: grad_clip_noise_ over a list of tensors (docs/ops.md), as a
// multi-tensor apply (like apex's multi_tensor_apply and torch's _foreach kernels):
// the tensors are cut into chunks of kChunk elements and each launch carries, in its
// kernel arguments, the pointers of up to kMaxTensors tensors and the (tensor, chunk)
// of each of up to kMaxBlocks thread blocks.
//   1. sumsq_kernel: one block per chunk writes the chunk's float64 sum of squares to
//      parts[global chunk id] (chunk ids in list order: a fixed layout).
//   2. norm_kernel: one block adds the partials in a fixed order -> norm, on the device.
//   3. apply_kernel: scale (computed on the device from the norm), clip, noise,
//      smoothing. Each thread takes one Philox block = the Gaussians of the global
//      elements 2q and 2q+1.
// Nothing is read back to the host: no synchronisation.
#include "cuda_common.cuh"

#include <algorithm>
#include <vector>

namespace fastmask {
namespace cuda {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;

struct ChunkArgs {
  void* g[kMaxTensors];
  void* s[kMaxTensors];          // smoothing state (nullptr when off)
  int64_t numel[kMaxTensors];
  int64_t base[kMaxTensors];     // global index of the tensor's first element
  int64_t chunk0[kMaxTensors];   // global id of the tensor's first chunk
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};
static_assert(sizeof(ChunkArgs) <= 3840, "kernel arguments must stay under 4 KB");

struct ApplyParams {
  bool do_scale, do_clip, do_noise, smooth;
  double max_norm, clip, noise_std, beta;
  uint64_t seed, offset;
};

template <typename scalar_t>
__global__ void sumsq_kernel(ChunkArgs a, double* parts) {
  using T = at::opmath_type<scalar_t>;
  const int slot = a.block_tensor[blockIdx.x];
  const int64_t c = a.block_chunk[blockIdx.x];
  const scalar_t* g = static_cast<const scalar_t*>(a.g[slot]);
  const int64_t b = c * kChunk, e = b + kChunk < a.numel[slot] ? b + kChunk : a.numel[slot];
  double acc = 0.0;
  for (int64_t k = b + threadIdx.x; k < e; k += blockDim.x) {
    double v = (double)(T)g[k];
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) parts[a.chunk0[slot] + c] = acc;
}

// One block: norm = sqrt(sum of parts), into norm64[0] and the returned 0-d tensor.
__global__ void norm_kernel(const double* parts, int64_t nparts, double* norm64, float* out32,
                            double* out64) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) acc += parts[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const double norm = ::sqrt(acc);
    norm64[0] = norm;
    if (out32) out32[0] = (float)norm;
    if (out64) out64[0] = norm;
  }
}

template <typename scalar_t>
__global__ void apply_kernel(ChunkArgs a, const double* norm64, ApplyParams p) {
  using T = at::opmath_type<scalar_t>;
  const int slot = a.block_tensor[blockIdx.x];
  const int64_t c = a.block_chunk[blockIdx.x];
  scalar_t* g = static_cast<scalar_t*>(a.g[slot]);
  scalar_t* s = static_cast<scalar_t*>(a.s[slot]);
  const int64_t base = a.base[slot];
  const int64_t b = c * kChunk, e = b + kChunk < a.numel[slot] ? b + kChunk : a.numel[slot];
  const T scale = (T)(p.do_scale ? fm_min(1.0, p.max_norm / (norm64[0] + 1e-6)) : 1.0);
  const T clip = (T)p.clip, beta = (T)p.beta;
  // Global pairs q cover elements 2q, 2q+1; this chunk holds global [base+b, base+e).
  const int64_t q0 = (base + b) >> 1, q1 = (base + e - 1) >> 1;
  for (int64_t q = q0 + threadIdx.x; q <= q1; q += blockDim.x) {
    Philox4 w = {{0, 0, 0, 0}};
    if (p.do_noise) w = philox_block(p.seed, p.offset, (uint64_t)q);
#pragma unroll
    for (int l = 0; l < 2; ++l) {
      const int64_t k = 2 * q + l - base;  // local index
      if (k < b || k >= e) continue;
      const double z = p.do_noise ? p.noise_std * box_muller(l ? w.v[2] : w.v[0], l ? w.v[3] : w.v[1])
                                  : 0.0;
      T v = grad_clip_noise_elem<T>((T)g[k], scale, p.do_scale, clip, p.do_clip, z, p.do_noise);
      if (p.smooth) {
        v = grad_smooth_elem<T>((T)s[k], v, beta);
        s[k] = (scalar_t)v;
      }
      g[k] = (scalar_t)v;
    }
  }
}

// Calls launch(args, nblocks) for the chunks of tensors idx (one dtype), in list order.
template <typename Launch>
void for_each_launch(const std::vector<int64_t>& idx, const std::vector<at::Tensor>& g,
                     const std::vector<at::Tensor>& s, const std::vector<int64_t>& base,
                     const std::vector<int64_t>& chunk0, const Launch& launch) {
  ChunkArgs a{};
  int nt = 0, nb = 0;
  auto flush = [&] {
    if (nb > 0) launch(a, nb);
    nt = nb = 0;
  };
  for (int64_t i : idx) {
    const int64_t numel = g[i].numel(), chunks = (numel + kChunk - 1) / kChunk;
    int slot = -1;
    for (int64_t c = 0; c < chunks; ++c) {
      if (slot < 0) {  // the tensor enters the current launch
        if (nt == kMaxTensors) flush();
        slot = nt++;
        a.g[slot] = g[i].data_ptr();
        a.s[slot] = s.empty() ? nullptr : s[i].data_ptr();
        a.numel[slot] = numel;
        a.base[slot] = base[i];
        a.chunk0[slot] = chunk0[i];
      }
      a.block_tensor[nb] = (uint8_t)slot;
      a.block_chunk[nb] = (int32_t)c;
      if (++nb == kMaxBlocks) {
        flush();
        slot = -1;
      }
    }
  }
  flush();
}

at::Tensor grad_clip_noise_cuda(at::TensorList grads, std::optional<double> max_norm,
                                double noise_std, int64_t seed, int64_t offset,
                                std::optional<double> clip_value, std::optional<double> smoothing,
                                at::TensorList state) {
  check_grad_clip_noise_args(grads, max_norm, noise_std, clip_value, smoothing, state);
  if (grads.empty()) return at::zeros({}, at::kFloat);
  c10::cuda::CUDAGuard guard(grads[0].device());
  const int64_t n = (int64_t)grads.size();
  const bool smooth = smoothing.has_value();
  std::vector<at::Tensor> g(n), s(smooth ? n : 0);
  std::vector<int64_t> base(n), chunk0(n);
  int64_t total = 0, nchunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = grads[i].contiguous();
    if (smooth) s[i] = state[i].contiguous();
    TORCH_CHECK((g[i].numel() + kChunk - 1) / kChunk < INT32_MAX, "grads[", i, "] is too large");
    base[i] = total;
    chunk0[i] = nchunks;
    total += g[i].numel();
    nchunks += (g[i].numel() + kChunk - 1) / kChunk;
  }
  // Tensors grouped by dtype (one kernel instantiation per launch), list order inside.
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (int64_t i = 0; i < n; ++i) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& gr) { return gr.first == g[i].scalar_type(); });
    if (it == groups.end()) {
      groups.push_back({g[i].scalar_type(), {}});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }

  const auto dev = g[0].options();
  at::Tensor parts = at::empty({nchunks > 0 ? nchunks : 1}, dev.dtype(at::kDouble));
  at::Tensor norm64 = at::empty({1}, dev.dtype(at::kDouble));
  const bool out_double = grads[0].scalar_type() == at::kDouble;
  at::Tensor out = at::empty({}, dev.dtype(out_double ? at::kDouble : at::kFloat));

  for (const auto& gr : groups) {
    FASTMASK_CUDA_DISPATCH(gr.first, "fastmask_grad_sumsq_cuda", [&] {
      for_each_launch(gr.second, g, s, base, chunk0, [&](const ChunkArgs& a, int nb) {
        sumsq_kernel<scalar_t><<<nb, kRedThreads, 0, stream()>>>(a, parts.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  norm_kernel<<<1, 1024, 0, stream()>>>(parts.const_data_ptr<double>(), nchunks,
                                        norm64.data_ptr<double>(),
                                        out_double ? nullptr : out.data_ptr<float>(),
                                        out_double ? out.data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  ApplyParams p{};
  p.do_scale = max_norm.has_value();
  p.do_clip = clip_value.has_value();
  p.do_noise = noise_std > 0.0;
  p.smooth = smooth;
  p.max_norm = max_norm.value_or(0.0);
  p.clip = clip_value.value_or(0.0);
  p.noise_std = noise_std;
  p.beta = smoothing.value_or(0.0);
  p.seed = as_u64(seed);
  p.offset = as_u64(offset);
  if (!(p.do_scale || p.do_clip || p.do_noise || p.smooth)) return out;
  for (const auto& gr : groups) {
    FASTMASK_CUDA_DISPATCH(gr.first, "fastmask_grad_apply_cuda", [&] {
      for_each_launch(gr.second, g, s, base, chunk0, [&](const ChunkArgs& a, int nb) {
        apply_kernel<scalar_t><<<nb, kRedThreads, 0, stream()>>>(a, norm64.const_data_ptr<double>(), p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (int64_t i = 0; i < n; ++i) {  // non-contiguous inputs were worked on in copies
    if (!grads[i].is_same(g[i])) grads[i].copy_(g[i]);
    if (smooth && !state[i].is_same(s[i])) state[i].copy_(s[i]);
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("grad_clip_noise_", &fastmask::cuda::grad_clip_noise_cuda);
}
