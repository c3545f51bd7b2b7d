// The fastmask ops called through the dispatcher (every key: autograd, device, fake),
// for C++ code that composes them: the autograd functions (csrc/autograd.cpp) and the
// out= fallbacks of devices without a dedicated kernel (csrc/register.cpp). Each
// operator handle is looked up once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace fastmask {

template <typename Fn>
inline c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

inline at::Tensor call_mask_apply(const at::Tensor& x, double ratio, int64_t seed, int64_t offset,
                                  c10::string_view mode, c10::string_view scope,
                                  c10::string_view channels, double fill) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, double, int64_t, int64_t, c10::string_view,
                                             c10::string_view, c10::string_view, double)>("fastmask::mask_apply");
  return op.call(x, ratio, seed, offset, mode, scope, channels, fill);
}

inline at::Tensor call_mask_apply_backward(const at::Tensor& g, double ratio, int64_t seed,
                                           int64_t offset, c10::string_view mode,
                                           c10::string_view scope, c10::string_view channels) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, double, int64_t, int64_t, c10::string_view,
                                             c10::string_view, c10::string_view)>(
      "fastmask::mask_apply_backward");
  return op.call(g, ratio, seed, offset, mode, scope, channels);
}

inline at::Tensor call_fgsm(const at::Tensor& x, const at::Tensor& grad, double eps, double lo,
                            double hi) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, double, double, double)>(
      "fastmask::fgsm");
  return op.call(x, grad, eps, lo, hi);
}

inline at::Tensor call_random_start(const at::Tensor& x, double eps, int64_t seed, int64_t offset,
                                    c10::string_view norm, double lo, double hi) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, double, int64_t, int64_t, c10::string_view,
                                             double, double)>("fastmask::random_start");
  return op.call(x, eps, seed, offset, norm, lo, hi);
}

inline at::Tensor call_learned_mask_apply(const at::Tensor& x, const at::Tensor& logits) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastmask::learned_mask_apply");
  return op.call(x, logits);
}

inline at::Tensor call_learned_mask_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                                   const at::Tensor& logits) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "fastmask::learned_mask_apply_backward");
  return op.call(grad, x, logits);
}

}  // namespace fastmask
