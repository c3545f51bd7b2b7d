// float32 inner loops of the element-wise CPU kernels, compiled for several ISAs
// (AVX-512F, AVX2, baseline) and picked at load time (GCC target_clones), since the
// wheel is built without -march. They only loop over the per-element functions of
// fastmask/elementwise.h and fastmask/philox.h: the same IEEE operations in the same
// order under every ISA (no FMA: -ffp-contract=off), so the results are identical.
// Other dtypes use the generic loops in the kernels.
#include "simd_loops.h"

#include "fastmask/elementwise.h"
#include "fastmask/philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMASK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTMASK_CLONES
#endif

namespace fastmask {
namespace cpu {

// ELEM(src) is the output element k computed from input element src[k]. In place
// (y == x) the loop names one pointer, so it vectorizes without an overlap check.
#define FASTMASK_LOOP(ELEM)                                 \
  if (y == x) {                                             \
    for (int64_t k = 0; k < n; ++k) y[k] = ELEM(y);         \
  } else {                                                  \
    for (int64_t k = 0; k < n; ++k) y[k] = ELEM(x);         \
  }

FASTMASK_CLONES
void fgsm_f32(const float* x, const float* __restrict g, float* y, int64_t n, float eps,
              float lo, float hi) {
#define E(src) fgsm_elem<float>(src[k], g[k], eps, lo, hi)
  FASTMASK_LOOP(E)
#undef E
}

FASTMASK_CLONES
void pgd_inf_f32(const float* x, const float* __restrict xn, const float* __restrict g,
                 float* y, int64_t n, float alpha, float eps, float lo, float hi) {
#define E(src) pgd_inf_elem<float>(src[k], xn[k], g[k], alpha, eps, lo, hi)
  FASTMASK_LOOP(E)
#undef E
}

FASTMASK_CLONES
void random_start_inf_f32(const float* x, const uint32_t* __restrict w, float* y, int64_t n,
                          float eps, float lo, float hi) {
#define E(src) random_start_inf_elem<float>(src[k], w[k], eps, lo, hi)
  FASTMASK_LOOP(E)
#undef E
}

// Unconditional load of x[k], then a select: the select vectorizes.
FASTMASK_CLONES
void mask_pixel_f32(const float* x, const uint32_t* __restrict w, float* y, int64_t n,
                    uint32_t threshold, float fill) {
  if (y == x) {
    for (int64_t k = 0; k < n; ++k) {
      const float v = y[k];
      y[k] = philox_keep(w[k], threshold) ? v : fill;
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const float v = x[k];
      y[k] = philox_keep(w[k], threshold) ? v : fill;
    }
  }
}

#undef FASTMASK_LOOP

}  // namespace cpu
}  // namespace fastmask
