// Op schemas (exactly docs/ops.md), the device-independent kernels (the tensor-less ops,
// the out= fall-backs) and the Python module `fastmask._C` (importing it registers the
// ops as torch.ops.fastmask.*). Each backend file registers its own kernels at its foot.
//
// philox and mask_generate take no tensor, so the dispatcher has no device to go by.
// They are CompositeExplicitAutograd kernels that validate, allocate on `device`
// (default CPU) and call that device's launcher: the CPU one directly, the CUDA one
// through cuda_launchers(), which csrc/cuda fills at static-init time. A meta device
// gets an empty tensor of the right shape. Fake kernels live in fastmask/ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <limits>
#include <mutex>
#include <set>
#include <thread>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor in pybind11
#include <torch/library.h>

#include "cpu/cpu_ops.h"
#include "fastmask/common.h"
#include "op_calls.h"

#ifndef FASTMASK_TORCH_VERSION
#define FASTMASK_TORCH_VERSION "unknown"
#endif

namespace fastmask {

DeviceLaunchers& cuda_launchers() {
  static DeviceLaunchers table;
  return table;
}

static at::Device target_device(const std::optional<at::Device>& device) {
  return device.has_value() ? *device : at::Device(at::kCPU);
}

at::Tensor philox(int64_t seed, int64_t offset, int64_t n, std::optional<at::Device> device) {
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  at::Device dev = target_device(device);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(dev));
  if (n == 0 || dev.is_meta()) return out;
  if (dev.is_cpu()) {
    cpu::philox_fill(out, as_u64(seed), as_u64(offset));
  } else if (dev.is_cuda()) {
    TORCH_CHECK(cuda_launchers().philox != nullptr,
                "philox: device ", dev, " requested but fastmask was built without CUDA");
    cuda_launchers().philox(out, as_u64(seed), as_u64(offset));
  } else {
    TORCH_CHECK(false, "philox: unsupported device ", dev);
  }
  return out;
}

at::Tensor mask_generate(at::IntArrayRef shape, double ratio, int64_t seed, int64_t offset,
                         c10::string_view mode, c10::string_view scope,
                         c10::string_view channels, std::optional<at::Device> device) {
  TORCH_CHECK_VALUE(shape.size() == 4, "shape must have 4 entries (N, C, H, W), got ", shape);
  for (int64_t s : shape) TORCH_CHECK_VALUE(s >= 0, "shape must be non-negative, got ", shape);
  MaskParams p = make_mask_params(shape, ratio, seed, offset, mode, scope, channels);
  at::Device dev = target_device(device);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kBool).device(dev));
  if (out.numel() == 0 || dev.is_meta()) return out;
  if (dev.is_cpu()) {
    cpu::mask_generate_fill(out, p);
  } else if (dev.is_cuda()) {
    TORCH_CHECK(cuda_launchers().mask_generate != nullptr, "mask_generate: device ", dev,
                " requested but fastmask was built without CUDA");
    cuda_launchers().mask_generate(out, p);
  } else {
    TORCH_CHECK(false, "mask_generate: unsupported device ", dev);
  }
  return out;
}

// An empty list has no tensor to dispatch on: this CompositeExplicitAutograd kernel
// answers it (norm 0) and reports devices that have no kernel.
at::Tensor grad_clip_noise_any(at::TensorList grads, std::optional<double> max_norm,
                               double noise_std, int64_t seed, int64_t offset,
                               std::optional<double> clip_value, std::optional<double> smoothing,
                               at::TensorList state) {
  check_grad_clip_noise_args(grads, max_norm, noise_std, clip_value, smoothing, state);
  TORCH_CHECK(grads.empty(), "grad_clip_noise_: no kernel for grads on device ",
              grads[0].device(), " (was fastmask built with CUDA?)");
  return at::zeros({}, at::kFloat);
}

void mask_apply_out_any(const at::Tensor& x, double ratio, int64_t seed, int64_t offset,
                        c10::string_view mode, c10::string_view scope, c10::string_view channels,
                        double fill, const at::Tensor& out) {
  check_out(x, out);
  out.copy_(call_mask_apply(x, ratio, seed, offset, mode, scope, channels, fill));
}

void fgsm_out_any(const at::Tensor& x, const at::Tensor& grad, double eps, double lo, double hi,
                  const at::Tensor& out) {
  check_out(x, out);
  out.copy_(call_fgsm(x, grad, eps, lo, hi));
}

void random_start_out_any(const at::Tensor& x, double eps, int64_t seed, int64_t offset,
                          c10::string_view norm, double lo, double hi, const at::Tensor& out) {
  check_out(x, out);
  out.copy_(call_random_start(x, eps, seed, offset, norm, lo, hi));
}

// A pybind11 function's c10 errors as the Python exceptions torch.ops would raise (ValueError,
// TypeError, RuntimeError), with the message only: pybind11 alone gives every one as a
// RuntimeError with the C++ backtrace in its text.
template <typename F>
auto python_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    throw pybind11::type_error(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

}  // namespace fastmask

TORCH_LIBRARY(fastmask, m) {
  m.def("philox(int seed, int offset, int n, Device? device=None) -> Tensor");
  m.def("mask_generate(int[] shape, float ratio, int seed, int offset, str mode, str scope, "
        "str channels, Device? device=None) -> Tensor");
  m.def("mask_apply(Tensor x, float ratio, int seed, int offset, str mode, str scope, "
        "str channels, float fill) -> Tensor");
  m.def("mask_apply_backward(Tensor grad, float ratio, int seed, int offset, str mode, "
        "str scope, str channels) -> Tensor");
  m.def("fgsm(Tensor x, Tensor grad, float eps, float lo, float hi) -> Tensor");
  m.def("pgd_step(Tensor x_adv, Tensor x_nat, Tensor grad, float alpha, float eps, float lo, "
        "float hi, str norm) -> Tensor");
  m.def("pgd_step_(Tensor(a!) x_adv, Tensor x_nat, Tensor grad, float alpha, float eps, "
        "float lo, float hi, str norm) -> ()");
  m.def("random_start(Tensor x, float eps, int seed, int offset, str norm, float lo, "
        "float hi) -> Tensor");
  // `mask_mode`, not `mode`: torch's functionalization of mutating ops passes its own
  // `mode` argument and breaks on an op argument of that name (torch.compile, opcheck).
  m.def("mask_apply_out(Tensor x, float ratio, int seed, int offset, str mask_mode, str scope, "
        "str channels, float fill, Tensor(a!) out) -> ()");
  m.def("fgsm_out(Tensor x, Tensor grad, float eps, float lo, float hi, Tensor(a!) out) -> ()");
  m.def("random_start_out(Tensor x, float eps, int seed, int offset, str norm, float lo, "
        "float hi, Tensor(a!) out) -> ()");
  m.def("learned_mask_apply(Tensor x, Tensor logits) -> Tensor");
  m.def("learned_mask_apply_backward(Tensor grad, Tensor x, Tensor logits) -> Tensor");
  m.def("project_linf(Tensor t, Tensor w, Tensor b, float lo, float hi) -> Tensor");
  m.def("grad_clip_noise_(Tensor(a!)[] grads, float? max_norm, float noise_std, int seed, "
        "int offset, float? clip_value, float? smoothing, Tensor(b!)[] state) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmask, CompositeExplicitAutograd, m) {
  m.impl("philox", &fastmask::philox);
  m.impl("mask_generate", &fastmask::mask_generate);
  m.impl("grad_clip_noise_", &fastmask::grad_clip_noise_any);
  // out= variants on devices without a dedicated kernel (CUDA, meta): the functional
  // op, then a copy. On CUDA the caching allocator makes the extra output cheap.
  m.impl("mask_apply_out", &fastmask::mask_apply_out_any);
  m.impl("fgsm_out", &fastmask::fgsm_out_any);
  m.impl("random_start_out", &fastmask::random_start_out_any);
}

// The device kernels register themselves at the foot of the file that defines them
// (torchvision's convention): csrc/cpu/{mask,attack,grad}_cpu.cpp for CPU,
// csrc/cuda/{mask,attack,grad}_cuda.cu for CUDA. Here: the schemas above and the
// device-independent kernels.

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmask C++ ops (registered as torch.ops.fastmask.*)";
  m.def("cuda_compiled", []() {
#ifdef FASTMASK_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True if the CUDA kernels were compiled in.");
  // Test hook: words [start, start + n) of the stream from the CPU path in use
  // (FASTMASK_CPU_ISA caps it), at any start, e.g. where the block counter carries
  // into its high word (2^34 words in), which no op reaches at test sizes.
  m.def("_philox_words", [](uint64_t seed, uint64_t offset, uint64_t start, int64_t n) {
    std::vector<uint32_t> w((size_t)std::max<int64_t>(n, 0));
    fastmask::cpu::philox_words(seed, offset, start, (int64_t)w.size(), w.data());
    return w;
  }, "Philox words [start, start + n) from the CPU kernels (test hook).");
  // Test hook: how many threads at::parallel_for over [0, n) ran on. The kernels' loops are
  // at::parallel_for, a header template: it only splits work if this module was compiled
  // with the parallel backend torch uses (OpenMP in the pip wheels).
  m.def("_parallel_threads", [](int64_t n, int64_t grain) {
    std::mutex mu;
    std::set<std::thread::id> ids;
    at::parallel_for(0, n, grain, [&](int64_t, int64_t) {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    });
    return (int64_t)ids.size();
  }, "Threads at::parallel_for(0, n, grain) used in this module (test hook).");
  // FeatureMask's training draw in one call (fastmask/nn.py). The offset comes from its int64
  // counter: step + (stream << 40); step / redraw for one mask per `redraw` calls (drawn at
  // scope "fixed"); 2^64 - 1 (FIXED_OFFSET) for scope "fixed". Then mask_apply through the
  // dispatcher (autograd, every device), the counter advanced by one, the inverted-dropout
  // scale. Inside a training step every call from Python costs more than its work
  // (benchmarks/RESULTS.md): this is one call where the module made four (the counter's read
  // and add_, the op, the scale).
  m.def("_mask_step", [](const at::Tensor& x, double ratio, int64_t seed, at::Tensor& step,
                         int64_t stream, int64_t redraw, const std::string& mode,
                         const std::string& scope, const std::string& channels, double fill,
                         double scale) {
    return fastmask::python_errors([&]() -> at::Tensor {
      TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kLong && step.dim() == 0,
                  "FeatureMask: the step counter must be a 0-d int64 CPU tensor, got ",
                  step.toString(), " of shape ", step.sizes());
      TORCH_CHECK_VALUE(redraw >= 0 && stream >= 0 && stream < (int64_t(1) << 24),
                        "FeatureMask: redraw (0: none) must be >= 0 and stream in [0, 2**24), got ",
                        redraw, " and ", stream);
      int64_t* p = step.data_ptr<int64_t>();
      const int64_t v = *p;
      TORCH_CHECK_VALUE(v >= 0 && v < std::numeric_limits<int64_t>::max(),
                        "FeatureMask: the step counter must be in [0, 2**63 - 1), got ", v);
      const bool fixed = scope == "fixed";  // the paper's fixed mask: FIXED_OFFSET = 2^64 - 1
      const uint64_t offset = fixed        ? ~uint64_t(0)
                              : redraw > 0 ? (uint64_t)(v / redraw)
                                           : (uint64_t)v + ((uint64_t)stream << 40);
      const at::Tensor y = fastmask::call_mask_apply(x, ratio, seed, (int64_t)offset, mode,
                                                     redraw > 0 ? std::string("fixed") : scope,
                                                     channels, fill);
      *p = v + 1;  // after the op: a call that raises leaves the counter as it was
      step.unsafeGetTensorImpl()->bump_version();  // as add_ would: the buffer was written
      return scale == 1.0 ? y : y.mul_(scale);
    });
  }, "FeatureMask's training draw: offset from the counter, mask_apply, counter + 1, scale.");
  m.def("build_info", []() {
    pybind11::dict d;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef FASTMASK_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    // philox / mask_generate reach CUDA through this table (filled by csrc/cuda).
    d["cuda_launchers"] = fastmask::cuda_launchers().philox != nullptr &&
                          fastmask::cuda_launchers().mask_generate != nullptr;
    d["torch"] = FASTMASK_TORCH_VERSION;
    d["cxx_standard"] = (long)__cplusplus;
    d["compiler"] = __VERSION__;
    // The ISA of the Philox-bound CPU paths (masks, random_start, noise), picked at
    // load time and capped by FASTMASK_CPU_ISA; the target_clones element loops
    // (csrc/cpu/simd_loops.cpp) follow the CPU alone.
    d["cpu_isa"] = fastmask::cpu::philox_isa();
    return d;
  }, "Build information: cuda, torch version, C++ standard, compiler, cpu_isa.");
}
