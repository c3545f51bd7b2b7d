// float32 inner loops of the element-wise CPU kernels, compiled for AVX-512F, AVX2 and
// baseline x86-64 (simd_loops.inc, once per ISA) and picked once at load time by
// cpu_isa(), since the wheel is built without -march. The same IEEE operations in the
// same order under every ISA (no FMA: -ffp-contract=off), so the results are identical.
// Other dtypes use the generic loops in the kernels.
#include "simd_loops.h"

#include <cstdlib>
#include <string>

#include "fastmask/elementwise.h"
#include "fastmask/learned_mask.h"
#include "fastmask/mask.h"
#include "fastmask/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMASK_X86_SIMD 1
#endif

namespace fastmask {
namespace cpu {

Isa pick_cpu_isa() {
#if FASTMASK_X86_SIMD
  const char* env = std::getenv("FASTMASK_CPU_ISA");
  const std::string cap = env ? env : "";
  __builtin_cpu_init();
  const bool allow512 = cap.empty() || cap == "avx512";
  const bool allow2 = allow512 || cap == "avx2";
  if (allow512 && __builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (allow2 && __builtin_cpu_supports("avx2")) return Isa::avx2;
#endif
  return Isa::scalar;
}

Isa cpu_isa() {
  static const Isa isa = pick_cpu_isa();
  return isa;
}

namespace base {
#define FASTMASK_TARGET
#include "simd_loops.inc"
#undef FASTMASK_TARGET
}  // namespace base

#if FASTMASK_X86_SIMD
namespace avx2 {
#define FASTMASK_TARGET __attribute__((target("avx2")))
#include "simd_loops.inc"
#undef FASTMASK_TARGET
}  // namespace avx2

namespace avx512 {
#define FASTMASK_TARGET __attribute__((target("avx512f")))
#include "simd_loops.inc"
#undef FASTMASK_TARGET
}  // namespace avx512

// The loop of the ISA cpu_isa() picked: a switch per call (one predictable branch, next
// to loops over thousands of elements) rather than a table of pointers to keep in sync.
#define FASTMASK_PICK(fn, ...)                              \
  switch (cpu_isa()) {                                      \
    case Isa::avx512: return avx512::fn(__VA_ARGS__);       \
    case Isa::avx2: return avx2::fn(__VA_ARGS__);           \
    default: return base::fn(__VA_ARGS__);                  \
  }
#else
#define FASTMASK_PICK(fn, ...) return base::fn(__VA_ARGS__);
#endif

void fgsm_f32(const float* x, const float* g, float* y, int64_t n, float eps, float lo, float hi) {
  FASTMASK_PICK(fgsm_f32, x, g, y, n, eps, lo, hi)
}

void pgd_inf_f32(const float* x, const float* xn, const float* g, float* y, int64_t n, float alpha,
                 float eps, float lo, float hi) {
  FASTMASK_PICK(pgd_inf_f32, x, xn, g, y, n, alpha, eps, lo, hi)
}

void random_start_inf_f32(const float* x, const uint32_t* w, float* y, int64_t n, float eps, float lo,
                          float hi) {
  FASTMASK_PICK(random_start_inf_f32, x, w, y, n, eps, lo, hi)
}

void mask_pixel_f32(const float* x, const uint32_t* w, float* y, int64_t n, uint32_t threshold,
                    float fill) {
  FASTMASK_PICK(mask_pixel_f32, x, w, y, n, threshold, fill)
}

void mask_blur_plane_f32(const float* p, const uint32_t* left, const uint32_t* right, const float* cnt,
                         const uint32_t* w, float* y, int64_t n, int64_t W, uint32_t threshold) {
  FASTMASK_PICK(mask_blur_plane_f32, p, left, right, cnt, w, y, n, W, threshold)
}

void box_muller_words_f32(const uint32_t* words, int64_t n, float* out) {
  FASTMASK_PICK(box_muller_words_f32, words, n, out)
}

void learned_mask_row_f32(const float* x, const float* s, float* y, int64_t n) {
  FASTMASK_PICK(learned_mask_row_f32, x, s, y, n)
}

void learned_mask_accum_f32(const float* g, const float* x, double* acc, int64_t n) {
  FASTMASK_PICK(learned_mask_accum_f32, g, x, acc, n)
}

#undef FASTMASK_PICK

}  // namespace cpu
}  // namespace fastmask
