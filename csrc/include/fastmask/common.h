// Host-side helpers shared by the CPU kernels, the CUDA launchers and the op
// registration: argument parsing and validation (messages mirror fastmask/ops.py:
// ValueError / TypeError naming the argument and its value), and the launcher table
// through which the tensor-less ops (philox, mask_generate) reach the CUDA code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "fastmask/mask.h"

namespace fastmask {

// Seeds and offsets cross the schema as int64; reinterpret as uint64 (two's complement).
inline uint64_t as_u64(int64_t v) { return (uint64_t)v; }

struct MaskSpec {
  MaskMode mode;
  bool per_sample;  // scope "sample" (else "fixed")
  bool separate;    // channels "separate" (else "shared")
};

inline MaskSpec parse_mask_spec(std::string_view mode, std::string_view scope,
                                std::string_view channels) {
  MaskSpec s{};
  if (mode == "pixel") s.mode = MaskMode::Pixel;
  else if (mode == "blur") s.mode = MaskMode::Blur;
  else if (mode == "block") s.mode = MaskMode::Block;
  else TORCH_CHECK_VALUE(false, "mode must be 'pixel', 'blur' or 'block', got '", mode, "'");
  TORCH_CHECK_VALUE(scope == "sample" || scope == "fixed",
                    "scope must be 'sample' or 'fixed', got '", scope, "'");
  TORCH_CHECK_VALUE(channels == "shared" || channels == "separate",
                    "channels must be 'shared' or 'separate', got '", channels, "'");
  s.per_sample = scope == "sample";
  s.separate = channels == "separate";
  return s;
}

// Returns true for norm "2", false for "inf".
inline bool parse_norm_is_l2(std::string_view norm) {
  TORCH_CHECK_VALUE(norm == "inf" || norm == "2", "norm must be 'inf' or '2', got '", norm, "'");
  return norm == "2";
}

inline void check_ratio(double ratio) {
  TORCH_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "ratio must be in [0, 1], got ", ratio);
}
inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
}
inline void check_alpha(double alpha) {
  TORCH_CHECK_VALUE(alpha > 0.0, "alpha must be > 0, got ", alpha);
}
inline void check_bounds(double lo, double hi) {
  TORCH_CHECK_VALUE(lo <= hi, "lo must be <= hi, got lo=", lo, ", hi=", hi);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

// `t` (named `name`) must match `ref` (named `ref_name`) in shape, dtype and device.
// With same_shape = false only the device is compared.
inline void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name, bool same_shape = true) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  if (same_shape) {
    TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                      ref.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ",
                     ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name,
                    " (", ref.device(), "), got ", t.device());
}

// An in-place output must not overlap itself (an expanded tensor): checked for every
// tensor of a list before anything is written, so a refused call leaves all of them as they were.
inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " has internally overlapping memory (e.g. an expanded tensor, stride ",
                    t.strides(), ") and cannot be written in place; pass a .clone()");
}

// `out` of an out= variant: like x (shape, dtype, device) and writable.
inline void check_out(const at::Tensor& x, const at::Tensor& out) {
  check_like(x, "x", out, "out");
  check_writable(out, "out");
}

inline void check_4d(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", x.sizes());
}

// ---- whole-op argument checks (shared by the CPU kernels and the CUDA launchers) ----

inline void check_fgsm_args(const at::Tensor& x, const at::Tensor& grad, double eps, double lo,
                            double hi) {
  check_floating(x, "x");
  check_like(x, "x", grad, "grad");
  check_eps(eps);
  check_bounds(lo, hi);
}

// Returns true for norm "2".
inline bool check_pgd_args(const at::Tensor& x_adv, const at::Tensor& x_nat,
                           const at::Tensor& grad, double alpha, double eps, double lo,
                           double hi, std::string_view norm) {
  check_floating(x_adv, "x_adv");
  check_like(x_adv, "x_adv", x_nat, "x_nat");
  check_like(x_adv, "x_adv", grad, "grad");
  check_alpha(alpha);
  check_eps(eps);
  check_bounds(lo, hi);
  bool l2 = parse_norm_is_l2(norm);
  TORCH_CHECK_VALUE(!l2 || x_adv.dim() >= 1,
                    "x_adv must have a batch dimension (dim >= 1) for norm '2', got shape ",
                    x_adv.sizes());
  return l2;
}

// Returns true for norm "2".
inline bool check_random_start_args(const at::Tensor& x, double eps, std::string_view norm,
                                    double lo, double hi) {
  check_floating(x, "x");
  check_eps(eps);
  check_bounds(lo, hi);
  bool l2 = parse_norm_is_l2(norm);
  TORCH_CHECK_VALUE(!l2 || x.dim() >= 1,
                    "x must have a batch dimension (dim >= 1) for norm '2', got shape ",
                    x.sizes());
  return l2;
}

// learned_mask_apply: x is N x F... (any F, dim >= 1), logits has the shape F of one sample and
// x's dtype and device; grad (the backward's) is like x.
inline void check_learned_mask_args(const at::Tensor& x, const at::Tensor& logits) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have a batch dimension (dim >= 1), got a 0-d tensor");
  check_like(x, "x", logits, "logits", /*same_shape=*/false);
  TORCH_CHECK_VALUE(logits.sizes() == x.sizes().slice(1), "logits must have the shape of one sample of x ",
                    x.sizes().slice(1), ", got ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == x.scalar_type(), "logits must have the dtype of x (",
                   x.scalar_type(), "), got ", logits.scalar_type());
}

// project_linf: t and w N x D of one shape, b N values, one dtype and device, lo <= hi.
inline void check_project_linf_args(const at::Tensor& t, const at::Tensor& w, const at::Tensor& b, double lo,
                                    double hi) {
  TORCH_CHECK(t.dim() == 2, "t must be N x D, got shape ", t.sizes());
  TORCH_CHECK(w.sizes() == t.sizes(), "w must have t's shape ", t.sizes(), ", got ", w.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == t.size(0), "b must have shape (", t.size(0), "), got ", b.sizes());
  TORCH_CHECK(w.scalar_type() == t.scalar_type() && b.scalar_type() == t.scalar_type(),
              "t, w and b must have one dtype, got ", t.scalar_type(), ", ", w.scalar_type(), ", ",
              b.scalar_type());
  check_like(t, "t", w, "w", /*same_shape=*/false);
  check_like(t, "t", b, "b", /*same_shape=*/false);
  TORCH_CHECK(lo <= hi, "lo must be <= hi, got lo=", lo, " hi=", hi);
}

inline void check_grad_clip_noise_args(at::TensorList grads, std::optional<double> max_norm,
                                       double noise_std, std::optional<double> clip_value,
                                       std::optional<double> smoothing, at::TensorList state) {
  if (max_norm.has_value())
    TORCH_CHECK_VALUE(*max_norm > 0.0, "max_norm must be > 0, got ", *max_norm);
  TORCH_CHECK_VALUE(noise_std >= 0.0, "noise_std must be >= 0, got ", noise_std);
  if (clip_value.has_value())
    TORCH_CHECK_VALUE(*clip_value > 0.0, "clip_value must be > 0, got ", *clip_value);
  if (smoothing.has_value()) {
    TORCH_CHECK_VALUE(*smoothing >= 0.0 && *smoothing < 1.0,
                      "smoothing must be in [0, 1), got ", *smoothing);
    TORCH_CHECK_VALUE(state.size() == grads.size(), "state must hold one tensor per grad (",
                      grads.size(), "), got ", state.size());
  } else {
    TORCH_CHECK_VALUE(state.empty(), "state must be empty when smoothing is None, got ",
                      state.size(), " tensors");
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    std::string name = "grads[" + std::to_string(i) + "]";
    check_floating(grads[i], name.c_str());
    check_writable(grads[i], name.c_str());
    if (i > 0) check_like(grads[0], "grads[0]", grads[i], name.c_str(), /*same_shape=*/false);
    if (!state.empty()) {
      std::string sname = "state[" + std::to_string(i) + "]";
      check_like(grads[i], name.c_str(), state[i], sname.c_str());
      check_writable(state[i], sname.c_str());
    }
  }
}

// Everything a mask kernel needs, resolved on the host.
struct MaskParams {
  int64_t N, C, H, W;
  double ratio;
  uint64_t seed, offset;
  MaskSpec spec;
  uint32_t threshold;  // keep threshold T(ratio) (pixel, blur)
  int64_t area;        // block area A (block)
};

inline MaskParams make_mask_params(at::IntArrayRef shape, double ratio, int64_t seed,
                                   int64_t offset, std::string_view mode,
                                   std::string_view scope, std::string_view channels) {
  check_ratio(ratio);
  MaskParams p{};
  p.spec = parse_mask_spec(mode, scope, channels);
  p.N = shape[0]; p.C = shape[1]; p.H = shape[2]; p.W = shape[3];
  p.ratio = ratio;
  p.seed = as_u64(seed);
  p.offset = as_u64(offset);
  p.threshold = keep_threshold(ratio);
  p.area = block_area(ratio, p.H, p.W);
  return p;
}

// The tensor-less ops are CompositeExplicitAutograd kernels that allocate on `device`
// and call a per-device launcher; csrc/cuda fills cuda_launchers() at static-init time.
using PhiloxLauncher = void (*)(const at::Tensor& out, uint64_t seed, uint64_t offset);
using MaskGenerateLauncher = void (*)(const at::Tensor& out, const MaskParams& p);

struct DeviceLaunchers {
  PhiloxLauncher philox = nullptr;              // out: int64 [n], word k at out[k]
  MaskGenerateLauncher mask_generate = nullptr;  // out: bool N x C x H x W, contiguous
};

DeviceLaunchers& cuda_launchers();  // defined in csrc/register.cpp

}  // namespace fastmask
