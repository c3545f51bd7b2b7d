// Per-element math of learned_mask_apply and its backward (docs/ops.md), shared by the CPU
// kernels (csrc/cpu/learned_mask_cpu.cpp) and the CUDA kernels (csrc/cuda/learned_mask_cuda.cu).
// No ATen types. T is the opmath type; s = sigmoid(logits[f]) comes from ATen's own sigmoid
// kernel (the one the reference calls), so the mask has the same bits everywhere.
#pragma once

#include "fastmask/philox.h"  // FASTMASK_HD

namespace fastmask {

// y[n, f] = x[n, f] * s[f] (and the x gradient, grad[n, f] * s[f]).
template <typename T>
FASTMASK_HD T learned_mask_elem(T x, T s) {
  return x * s;
}

// One term of the batch sum of the logits' gradient, in float64: a float32/16 product is exact
// there, so only the order of the additions can change the sum.
template <typename T>
FASTMASK_HD double learned_mask_grad_term(T g, T x) {
  return (double)g * (double)x;
}

// d logits[f] = sum_n grad[n, f] x[n, f] times the sigmoid's derivative s (1 - s), in ATen's
// sigmoid_backward order: (gsum * (1 - s)) * s, gsum rounded to T first.
template <typename T>
FASTMASK_HD T learned_mask_logit_grad(double gsum, T s) {
  return ((T)gsum * ((T)1 - s)) * s;
}

}  // namespace fastmask
