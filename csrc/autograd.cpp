// Autograd for mask_apply (and, for double backward, mask_apply_backward) and learned_mask_apply,
// autograd functions on the Autograd dispatch key, for every device (the torchvision
// ops/autograd pattern). The mask is never stored: backward regenerates it from
// (seed, offset) through mask_apply_backward, whose own backward (linear in grad) is
// mask_apply with fill 0. The forward redispatches below autograd to the CPU / CUDA /
// fake kernel, so torch.compile and opcheck trace straight through it.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

#include "op_calls.h"

namespace fastmask {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The mask arguments, kept on the autograd context (scalars and strings only).
void save_mask_args(AutogradContext* ctx, double ratio, int64_t seed, int64_t offset,
                    c10::string_view mode, c10::string_view scope, c10::string_view channels) {
  ctx->saved_data["ratio"] = ratio;
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["offset"] = offset;
  ctx->saved_data["mode"] = std::string(mode);
  ctx->saved_data["scope"] = std::string(scope);
  ctx->saved_data["channels"] = std::string(channels);
}

struct MaskArgs {
  double ratio;
  int64_t seed, offset;
  std::string mode, scope, channels;
};

MaskArgs load_mask_args(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return {d["ratio"].toDouble(),       d["seed"].toInt(),         d["offset"].toInt(),
          d["mode"].toStringRef(),     d["scope"].toStringRef(),  d["channels"].toStringRef()};
}

class MaskApplyBackwardFn : public torch::autograd::Function<MaskApplyBackwardFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, double ratio, int64_t seed,
                            int64_t offset, c10::string_view mode, c10::string_view scope,
                            c10::string_view channels) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_mask_args(ctx, ratio, seed, offset, mode, scope, channels);
    return call_mask_apply_backward(g, ratio, seed, offset, mode, scope, channels);
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const MaskArgs a = load_mask_args(ctx);
    at::Tensor ggrad = call_mask_apply(gg[0], a.ratio, a.seed, a.offset, a.mode, a.scope,
                                       a.channels, 0.0);
    return {ggrad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class MaskApplyFn : public torch::autograd::Function<MaskApplyFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double ratio, int64_t seed,
                            int64_t offset, c10::string_view mode, c10::string_view scope,
                            c10::string_view channels, double fill) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_mask_args(ctx, ratio, seed, offset, mode, scope, channels);
    return call_mask_apply(x, ratio, seed, offset, mode, scope, channels, fill);
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const MaskArgs a = load_mask_args(ctx);
    // through the dispatcher (not the kernel): differentiable again for double backward
    at::Tensor gx = MaskApplyBackwardFn::apply(g[0], a.ratio, a.seed, a.offset, a.mode, a.scope,
                                               a.channels);
    return {gx,          at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether autograd has nothing to record for an op on these inputs: the condition under which
// Function::apply builds no graph (grad mode off or no input needing a gradient), and no
// forward-mode tangent (which Function::apply rejects with an error we keep).
bool nothing_to_record(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return true;
  for (const at::Tensor* t : inputs) {
    if (t->requires_grad() || t->_fw_grad(/*level=*/0).defined()) return false;
  }
  return true;
}

// A training step masks an input that needs no gradient. Function::apply would still build
// a node and its saved strings, which is most of a small call's cost inside a training loop
// (benchmarks/RESULTS.md): go straight below autograd instead. The result is the same tensor
// without a grad_fn, as apply gives.
at::Tensor mask_apply_autograd(const at::Tensor& x, double ratio, int64_t seed, int64_t offset,
                               c10::string_view mode, c10::string_view scope,
                               c10::string_view channels, double fill) {
  if (nothing_to_record({&x})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_mask_apply(x, ratio, seed, offset, mode, scope, channels, fill);
  }
  return MaskApplyFn::apply(x, ratio, seed, offset, mode, scope, channels, fill);
}

at::Tensor mask_apply_backward_autograd(const at::Tensor& g, double ratio, int64_t seed,
                                        int64_t offset, c10::string_view mode,
                                        c10::string_view scope, c10::string_view channels) {
  return MaskApplyBackwardFn::apply(g, ratio, seed, offset, mode, scope, channels);
}

// learned_mask_apply: y = x * sigmoid(logits). d/dx is the op itself applied to the incoming
// gradient (differentiable again); d/dlogits is learned_mask_apply_backward (first order only).
// Each is computed only when its input needs it (training: the logits; attacks: x).
class LearnedMaskApplyFn : public torch::autograd::Function<LearnedMaskApplyFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, logits});
    return call_learned_mask_apply(x, logits);
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor gx, gl;
    if (ctx->needs_input_grad(0)) gx = call_learned_mask_apply(g[0], saved[1]);
    if (ctx->needs_input_grad(1)) {
      TORCH_CHECK(!at::GradMode::is_enabled(), "learned_mask_apply: the logits' gradient has no "
                  "derivative (double backward through the logits is not implemented)");
      gl = call_learned_mask_apply_backward(g[0], saved[0], saved[1]);
    }
    return {gx, gl};
  }
};

at::Tensor learned_mask_apply_autograd(const at::Tensor& x, const at::Tensor& logits) {
  if (nothing_to_record({&x, &logits})) {  // evaluation: a fixed learned mask
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_learned_mask_apply(x, logits);
  }
  return LearnedMaskApplyFn::apply(x, logits);
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, Autograd, m) {
  m.impl("mask_apply", &fastmask::mask_apply_autograd);
  m.impl("mask_apply_backward", &fastmask::mask_apply_backward_autograd);
  m.impl("learned_mask_apply", &fastmask::learned_mask_apply_autograd);
}
