// float32 inner loops with run-time ISA selection (csrc/cpu/simd_loops.cpp).
// y may alias the first input (x / x_adv): every element is read before it is written.
#pragma once

#include <cstdint>

namespace fastmask {
namespace cpu {

// The instruction set of every SIMD path on this CPU (the element loops below and the
// Philox kernels of philox_cpu.cpp): the widest the CPU has, capped by the environment
// variable FASTMASK_CPU_ISA=avx512|avx2|scalar; read once, at the first call.
enum class Isa { scalar, avx2, avx512 };
Isa cpu_isa();

// The kernels call these under `if constexpr (std::is_same_v<scalar_t, float>)` inside
// AT_DISPATCH lambdas, where the other branch is still compiled: f32 makes the pointer
// types agree (it is only reached for float).
template <typename S>
inline const float* f32(const S* p) { return reinterpret_cast<const float*>(p); }
template <typename S>
inline float* f32(S* p) { return reinterpret_cast<float*>(p); }

void fgsm_f32(const float* x, const float* g, float* y, int64_t n, float eps, float lo, float hi);
void pgd_inf_f32(const float* xa, const float* xn, const float* g, float* y, int64_t n,
                 float alpha, float eps, float lo, float hi);
void random_start_inf_f32(const float* x, const uint32_t* w, float* y, int64_t n, float eps,
                          float lo, float hi);
void mask_pixel_f32(const float* x, const uint32_t* w, float* y, int64_t n, uint32_t threshold,
                    float fill);
// Blur masking of one plane of n = H * W pixels (row length W): p[k] is pixel k, with
// zeros at p[-W - 1 .. -1] and p[n .. n + W]; left[k] / right[k] all ones where pixel k
// has a left / right neighbour, else 0; cnt[k] = blur_count of pixel k. y must not overlap p.
void mask_blur_plane_f32(const float* p, const uint32_t* left, const uint32_t* right, const float* cnt,
                         const uint32_t* w, float* y, int64_t n, int64_t W, uint32_t threshold);
// learned mask: y[k] = x[k] * s[k]; acc[k] += (double)g[k] * (double)x[k] (fastmask/learned_mask.h).
void learned_mask_row_f32(const float* x, const float* s, float* y, int64_t n);
void learned_mask_accum_f32(const float* g, const float* x, double* acc, int64_t n);
// out[j] = box_muller_f32(words[2j], words[2j + 1]), 0 <= j < n.
void box_muller_words_f32(const uint32_t* words, int64_t n, float* out);

}  // namespace cpu
}  // namespace fastmask
