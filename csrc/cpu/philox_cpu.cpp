// Wide Philox and Box-Muller for the CPU kernels. Philox4x32-10 is integer math, so
// the SIMD paths give the words of philox_block (fastmask/philox.h) bit for bit; they
// only differ in speed. The ISA is cpu_isa() (simd_loops.h: cpuid, capped by
// FASTMASK_CPU_ISA=avx512|avx2|scalar): AVX-512F (64 blocks per step), AVX2 (16
// blocks), else the scalar philox_block.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cpu_ops.h"
#include "simd_loops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMASK_X86_SIMD 1
#include <immintrin.h>
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastmask {
namespace cpu {
namespace {

// out[4 b + l] = lane l of block (first + b), 0 <= b < nb.
using BlocksFn = void (*)(uint64_t seed, uint64_t offset, uint64_t first, int64_t nb,
                          uint32_t* out);

void blocks_scalar(uint64_t seed, uint64_t offset, uint64_t first, int64_t nb, uint32_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    Philox4 r = philox_block(seed, offset, first + (uint64_t)b);
    std::memcpy(out + 4 * b, r.v, sizeof r.v);
  }
}

#if FASTMASK_X86_SIMD
// The rounds come from philox_simd.inc, included once per ISA below with its primitives.
// hi/lo of M * c per 32-bit lane: vpmuludq multiplies the even lanes to 64 bits, the odd
// lanes are shifted down first; the halves are put back in place with blends (AVX2) or
// two masked lane swaps (AVX-512: vpshufd with a merge mask).
namespace avx2 {
#define FASTMASK_TARGET __attribute__((target("avx2")))
using V = __m256i;
constexpr int L = 8;
FASTMASK_TARGET inline V set1(uint32_t u) { return _mm256_set1_epi32((int)u); }
FASTMASK_TARGET inline V iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
FASTMASK_TARGET inline V add(V a, V b) { return _mm256_add_epi32(a, b); }
FASTMASK_TARGET inline V xor2(V a, V b) { return _mm256_xor_si256(a, b); }
FASTMASK_TARGET inline V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
FASTMASK_TARGET inline V load(const uint32_t* p) { return _mm256_load_si256((const V*)p); }
FASTMASK_TARGET inline V mulhilo(V c, V m, V* lo) {
  const V pe = _mm256_mul_epu32(c, m);
  const V po = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
#include "philox_simd.inc"
#undef FASTMASK_TARGET
}  // namespace avx2

namespace avx512 {
#define FASTMASK_TARGET __attribute__((target("avx512f")))
using V = __m512i;
constexpr int L = 16;
FASTMASK_TARGET inline V set1(uint32_t u) { return _mm512_set1_epi32((int)u); }
FASTMASK_TARGET inline V iota() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
FASTMASK_TARGET inline V add(V a, V b) { return _mm512_add_epi32(a, b); }
FASTMASK_TARGET inline V xor2(V a, V b) { return _mm512_xor_si512(a, b); }
FASTMASK_TARGET inline V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
FASTMASK_TARGET inline V load(const uint32_t* p) { return _mm512_load_si512(p); }
FASTMASK_TARGET inline V mulhilo(V c, V m, V* lo) {
  const V pe = _mm512_mul_epu32(c, m);                         // (lo, hi) of even lanes
  const V po = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);  // (lo, hi) of odd lanes
  *lo = _mm512_mask_shuffle_epi32(pe, 0xAAAA, po, _MM_PERM_CDAB);
  return _mm512_mask_shuffle_epi32(po, 0x5555, pe, _MM_PERM_CDAB);
}
#include "philox_simd.inc"
#undef FASTMASK_TARGET
}  // namespace avx512

// The fused float32 kernels prefetch x and y this many floats (8 KB) ahead of the element
// they work on. In a training step the batch and the fresh output are not in the cache
// (the optimizer has just swept the weights and their moments), and without the prefetch
// the misses came on top of the Philox work instead of behind it (benchmarks/RESULTS.md).
// Prefetches never fault, so running past the end of the arrays is harmless.
constexpr int64_t kPrefetchAhead = 2048;
inline void prefetch_ahead(const float* x, float* y, int64_t e) {
  const uintptr_t ahead = sizeof(float) * (uintptr_t)(e + kPrefetchAhead);  // address math, no pointer past the end
  __builtin_prefetch((const void*)((uintptr_t)x + ahead), 0, 3);
  __builtin_prefetch((const void*)((uintptr_t)y + ahead), 1, 3);
}

// The 32 words of one AVX2 group in stream order: out[q] holds words 8 q .. 8 q + 7 (a 4 x 8
// transpose of the structure of arrays: blocks back to (c0, c1, c2, c3) order).
__attribute__((target("avx2"))) inline void transpose_avx2(__m256i c0, __m256i c1, __m256i c2, __m256i c3,
                                                           __m256i* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // 0 4, 1 5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // 2 6, 3 7
  out[0] = _mm256_permute2x128_si256(u0, u1, 0x20);
  out[1] = _mm256_permute2x128_si256(u2, u3, 0x20);
  out[2] = _mm256_permute2x128_si256(u0, u1, 0x31);
  out[3] = _mm256_permute2x128_si256(u2, u3, 0x31);
}

// The 32 G words of blocks b .. b + 8 G - 1 in stream order: w[q] = words 8 q .. 8 q + 7.
template <int G>
__attribute__((target("avx2"))) inline void words_avx2(uint64_t seed, uint64_t offset, uint64_t b, __m256i* w) {
  __m256i c0[G], c1[G], c2[G], c3[G];
  avx2::philox<G>(seed, offset, b, c0, c1, c2, c3);
  for (int i = 0; i < G; ++i) transpose_avx2(c0[i], c1[i], c2[i], c3[i], w + 4 * i);
}

// G groups of 8 blocks (nb a multiple of 8 G), words stored in stream order.
template <int G>
__attribute__((target("avx2"))) void blocks_avx2_g(uint64_t seed, uint64_t offset, uint64_t first,
                                                   int64_t nb, uint32_t* out) {
  for (int64_t g = 0; g < nb; g += 8 * G) {
    __m256i w[4 * G];
    words_avx2<G>(seed, offset, first + (uint64_t)g, w);
    for (int q = 0; q < 4 * G; ++q) _mm256_storeu_si256((__m256i*)(out + 4 * g + 8 * q), w[q]);
  }
}

// Pixel masking fused with G groups of 8 blocks (nb a multiple of 8 G), as
// mask_pixel_avx512_g: the words are transposed in the registers and never stored.
// (w >> 8) < 2^24 and thr <= 2^24, so the signed compare AVX2 has is exact:
// drop = thr > (w >> 8), i.e. not philox_keep; blendv takes fill there, x's bits elsewhere.
template <int G>
__attribute__((target("avx2"))) void mask_pixel_avx2_g(uint64_t seed, uint64_t offset, uint64_t first,
                                                       int64_t nb, const float* x, float* y, uint32_t thr,
                                                       float fill, int64_t planes, int64_t stride) {
  const __m256i T = _mm256_set1_epi32((int)thr);
  const __m256 F = _mm256_set1_ps(fill);
  for (int64_t g = 0; g < nb; g += 8 * G) {
    __m256i w[4 * G];
    words_avx2<G>(seed, offset, first + (uint64_t)g, w);
    for (int q = 0; q < 4 * G; ++q) {
      const __m256 drop = _mm256_castsi256_ps(_mm256_cmpgt_epi32(T, _mm256_srli_epi32(w[q], 8)));
      for (int64_t c = 0; c < planes; ++c) {
        const int64_t e = 4 * g + 8 * q + c * stride;
        if ((q & 1) == 0) prefetch_ahead(x, y, e);  // one 64-byte line per two vectors
        _mm256_storeu_ps(y + e, _mm256_blendv_ps(_mm256_loadu_ps(x + e), F, drop));
      }
    }
  }
}

// random_start (L-inf, float32) fused with G groups of 8 blocks (nb a multiple of 8 G): the
// operations of random_start_inf_avx512_g in the same order (max_ps / min_ps return their
// second operand when either is NaN, as on AVX-512).
template <int G>
__attribute__((target("avx2"))) void random_start_inf_avx2_g(uint64_t seed, uint64_t offset, uint64_t first,
                                                             int64_t nb, const float* x, float* y, float eps,
                                                             float lo, float hi) {
  const __m256 E = _mm256_set1_ps(eps), LO = _mm256_set1_ps(lo), HI = _mm256_set1_ps(hi);
  const __m256 S = _mm256_set1_ps(0x1p-23f), ONE = _mm256_set1_ps(1.0f);
  for (int64_t g = 0; g < nb; g += 8 * G) {
    __m256i w[4 * G];
    words_avx2<G>(seed, offset, first + (uint64_t)g, w);
    for (int q = 0; q < 4 * G; ++q) {
      const int64_t e = 4 * g + 8 * q;
      if ((q & 1) == 0) prefetch_ahead(x, y, e);  // one 64-byte line per two vectors
      const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w[q], 8)), S), ONE);
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + e), _mm256_mul_ps(E, t));
      _mm256_storeu_ps(y + e, _mm256_min_ps(HI, _mm256_max_ps(LO, v)));
    }
  }
}

// nb a multiple of 8: 16 blocks per step (2 interleaved groups), then 8.
void blocks_avx2(uint64_t seed, uint64_t offset, uint64_t first, int64_t nb, uint32_t* out) {
  const int64_t big = nb / 16 * 16;
  blocks_avx2_g<2>(seed, offset, first, big, out);
  blocks_avx2_g<1>(seed, offset, first + (uint64_t)big, nb - big, out + 4 * big);
}

// The 64 words of one group in stream order: out[q] holds words 16 q .. 16 q + 15 (a 4 x 16
// transpose of the structure of arrays).
__attribute__((target("avx512f"))) inline void transpose_avx512(__m512i c0, __m512i c1, __m512i c2,
                                                                __m512i c3, __m512i* out) {
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  // u0: blocks 0 4 8 12, u1: 1 5 9 13, u2: 2 6 10 14, u3: 3 7 11 15 (one per 128-bit lane)
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  out[0] = _mm512_shuffle_i32x4(v0, v1, 0x88);
  out[1] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
  out[2] = _mm512_shuffle_i32x4(v2, v3, 0x88);
  out[3] = _mm512_shuffle_i32x4(v2, v3, 0xDD);
}

// The 64 G words of blocks b .. b + 16 G - 1 in stream order: w[q] = words 16 q .. 16 q + 15.
template <int G>
__attribute__((target("avx512f"))) inline void words_avx512(uint64_t seed, uint64_t offset, uint64_t b,
                                                            __m512i* w) {
  __m512i c0[G], c1[G], c2[G], c3[G];
  avx512::philox<G>(seed, offset, b, c0, c1, c2, c3);
  for (int i = 0; i < G; ++i) transpose_avx512(c0[i], c1[i], c2[i], c3[i], w + 4 * i);
}

// G groups of 16 blocks (nb a multiple of 16 G), words stored in stream order.
template <int G>
__attribute__((target("avx512f"))) void blocks_avx512_g(uint64_t seed, uint64_t offset,
                                                        uint64_t first, int64_t nb, uint32_t* out) {
  for (int64_t g = 0; g < nb; g += 16 * G) {
    __m512i w[4 * G];
    words_avx512<G>(seed, offset, first + (uint64_t)g, w);
    for (int q = 0; q < 4 * G; ++q) _mm512_storeu_si512(out + 4 * g + 16 * q, w[q]);
  }
}

// Pixel masking fused with G groups of 16 blocks (nb a multiple of 16 G): y[k + c stride] =
// x[k + c stride] where word k of blocks first.. is kept, else fill, for each of `planes`
// planes c. The words never leave the registers: lane j of c_l is word 4 j + l, so the four
// 16-bit keep masks are interleaved bit by bit with pdep into one 64-bit mask over the 64
// elements (no transpose, no word buffer, no second pass).
template <int G>
__attribute__((target("avx512f,bmi2"))) void mask_pixel_avx512_g(uint64_t seed, uint64_t offset,
                                                                 uint64_t first, int64_t nb, const float* x,
                                                                 float* y, uint32_t thr, float fill,
                                                                 int64_t planes, int64_t stride) {
  constexpr int L = 16;
  const __m512i T = _mm512_set1_epi32((int)thr);
  const __m512 F = _mm512_set1_ps(fill);
  for (int64_t g = 0; g < nb; g += L * G) {
    __m512i c0[G], c1[G], c2[G], c3[G];
    avx512::philox<G>(seed, offset, first + (uint64_t)g, c0, c1, c2, c3);
    for (int i = 0; i < G; ++i) {  // philox_keep: (w >> 8) >= thr
      const uint64_t m =
          _pdep_u64(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(c0[i], 8), T), 0x1111111111111111ull) |
          _pdep_u64(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(c1[i], 8), T), 0x2222222222222222ull) |
          _pdep_u64(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(c2[i], 8), T), 0x4444444444444444ull) |
          _pdep_u64(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(c3[i], 8), T), 0x8888888888888888ull);
      for (int64_t c = 0; c < planes; ++c) {
        const int64_t e = 4 * (g + L * i) + c * stride;
        for (int q = 0; q < 4; ++q) prefetch_ahead(x, y, e + 16 * q);
        for (int q = 0; q < 4; ++q)
          _mm512_storeu_ps(y + e + 16 * q, _mm512_mask_loadu_ps(F, (__mmask16)(m >> (16 * q)), x + e + 16 * q));
      }
    }
  }
}

// random_start (L-inf, float32) fused with G groups of 16 blocks (nb a multiple of 16 G):
// y[k] = clamp(x[k] + eps (2 u(word k) - 1), lo, hi), the IEEE operations of
// random_start_inf_elem in its order: 2 u = (w >> 8) 2^-23 exactly, max_ps(lo, v) is
// fm_max(v, lo) and min_ps(hi, m) is fm_min(m, hi), NaN included (lo, hi are not NaN).
template <int G>
__attribute__((target("avx512f"))) void random_start_inf_avx512_g(uint64_t seed, uint64_t offset,
                                                                  uint64_t first, int64_t nb, const float* x,
                                                                  float* y, float eps, float lo, float hi) {
  const __m512 E = _mm512_set1_ps(eps), LO = _mm512_set1_ps(lo), HI = _mm512_set1_ps(hi);
  const __m512 S = _mm512_set1_ps(0x1p-23f), ONE = _mm512_set1_ps(1.0f);
  for (int64_t g = 0; g < nb; g += 16 * G) {
    __m512i w[4 * G];
    words_avx512<G>(seed, offset, first + (uint64_t)g, w);
    for (int q = 0; q < 4 * G; ++q) {
      const int64_t e = 4 * g + 16 * q;
      prefetch_ahead(x, y, e);
      const __m512 t = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w[q], 8)), S), ONE);
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(x + e), _mm512_mul_ps(E, t));
      _mm512_storeu_ps(y + e, _mm512_min_ps(HI, _mm512_max_ps(LO, v)));
    }
  }
}

// nb a multiple of 16: 64 blocks per step (4 interleaved groups), then 16.
void blocks_avx512(uint64_t seed, uint64_t offset, uint64_t first, int64_t nb, uint32_t* out) {
  const int64_t big = nb / 64 * 64;
  blocks_avx512_g<4>(seed, offset, first, big, out);
  blocks_avx512_g<1>(seed, offset, first + (uint64_t)big, nb - big, out + 4 * big);
}
#endif  // FASTMASK_X86_SIMD

struct WideBlocks {
  BlocksFn fn = blocks_scalar;
  int64_t step = 1;  // fn takes multiples of `step` blocks (at most 16)
  const char* isa = "scalar";
};

WideBlocks pick_blocks() {
  WideBlocks w;
#if FASTMASK_X86_SIMD
  if (cpu_isa() == Isa::avx512) {
    w = {blocks_avx512, 16, "avx512"};
  } else if (cpu_isa() == Isa::avx2) {
    w = {blocks_avx2, 8, "avx2"};
  }
#endif
  return w;
}

const WideBlocks& wide_blocks() {
  static const WideBlocks w = pick_blocks();
  return w;
}

}  // namespace

const char* philox_isa() { return wide_blocks().isa; }

void philox_words(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, uint32_t* out) {
  int64_t j = 0;
  if (n > 0 && (start & 3)) {  // head: the rest of a partial block
    Philox4 b = philox_block(seed, offset, start >> 2);
    for (; j < n && ((start + j) & 3); ++j) out[j] = b.v[(start + j) & 3];
  }
  const WideBlocks& w = wide_blocks();
  const uint64_t first = (start + j) >> 2;
  const int64_t full = (n - j) / 4;
  const int64_t wide = full / w.step * w.step;
  if (wide > 0) w.fn(seed, offset, first, wide, out + j);
  j += 4 * wide;
  const int64_t rest = n - j;  // words of fewer than `step` blocks, the last one maybe partial
  if (w.step > 1 && rest > 8) {
    // one more wide step into a buffer: cheaper than three or more scalar blocks
    uint32_t buf[4 * 16];
    w.fn(seed, offset, first + (uint64_t)wide, w.step, buf);
    std::memcpy(out + j, buf, sizeof(uint32_t) * (size_t)rest);
    return;
  }
  blocks_scalar(seed, offset, first + (uint64_t)wide, rest / 4, out + j);
  j += 4 * (rest / 4);
  if (j < n) {  // tail: the start of a block
    Philox4 b = philox_block(seed, offset, (start + j) >> 2);
    for (int l = 0; j < n; ++j, ++l) out[j] = b.v[l];
  }
}

namespace {

// Words start .. start + n - 1 of a float32 stream kernel: generic(j, len) runs the ragged
// ends, fused(isa, G, first, nb, j) the whole 64-word pieces between them (nb blocks from
// block `first`, element j on) with G interleaved groups of the ISA's width: AVX-512 G = 4
// then 1 (16 blocks a group), AVX2 G = 2 (8 blocks a group); isa is 512 or 2 as an
// integral_constant. Without AVX2, or for n < 128, generic(0, n) does all.
template <int kIsa, int kBlocks, int kBig, class Generic, class Fused>
void stream_groups(uint64_t start, int64_t n, Generic& generic, Fused& fused) {
  using Isa_ = std::integral_constant<int, kIsa>;
  const int64_t head = std::min<int64_t>(n, (int64_t)((64 - (start & 63)) & 63));
  generic(0, head);
  const uint64_t first = (start + (uint64_t)head) >> 2;  // a multiple of 16 blocks
  const int64_t nb = (n - head) / 64 * 16, big = nb / (kBlocks * kBig) * (kBlocks * kBig);
  fused(Isa_{}, std::integral_constant<int, kBig>{}, first, big, head);
  if (nb > big) fused(Isa_{}, std::integral_constant<int, 1>{}, first + (uint64_t)big, nb - big, head + 4 * big);
  const int64_t done = head + 4 * nb;
  generic(done, n - done);
}

template <class Generic, class Fused>
void stream_f32(uint64_t start, int64_t n, Generic generic, Fused fused) {
#if FASTMASK_X86_SIMD
  if (n >= 128 && cpu_isa() == Isa::avx512) return stream_groups<512, 16, 4>(start, n, generic, fused);
  if (n >= 128 && cpu_isa() == Isa::avx2) return stream_groups<2, 8, 2>(start, n, generic, fused);
#endif
  (void)fused;
  generic(0, n);
}

// body(words, j, len) over words start + j .. start + j + len - 1 in chunks of kWordChunk.
template <class Body>
void word_chunks(uint64_t seed, uint64_t offset, uint64_t start, int64_t j, int64_t len, Body body) {
  uint32_t words[kWordChunk];
  for (int64_t s = j; s < j + len; s += kWordChunk) {
    const int64_t l = std::min(kWordChunk, j + len - s);
    philox_words(seed, offset, start + (uint64_t)s, l, words);
    body(words, s, l);
  }
}

}  // namespace

// y[t + c stride] = philox_keep(word start + t, thr) ? x[t + c stride] : fill, 0 <= t < n,
// 0 <= c < planes (float32 pixel masks; y may be x; planes > 1: one word for the same pixel
// of several channel planes). With AVX-512 or AVX2 the whole 64-word pieces go through
// mask_pixel_avx512_g / mask_pixel_avx2_g, the ragged ends (and the scalar ISA) through
// philox_words + mask_pixel_f32: the same bits.
void mask_pixel_stream_f32(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, const float* x,
                           float* y, uint32_t thr, float fill, int64_t planes, int64_t stride) {
  stream_f32(
      start, n,
      [&](int64_t j, int64_t len) {
        word_chunks(seed, offset, start, j, len, [&](const uint32_t* w, int64_t s, int64_t l) {
          for (int64_t c = 0; c < planes; ++c)
            mask_pixel_f32(x + s + c * stride, w, y + s + c * stride, l, thr, fill);
        });
      },
      [&](auto isa, auto G, uint64_t first, int64_t nb, int64_t j) {
#if FASTMASK_X86_SIMD
        if constexpr (decltype(isa)::value == 512)
          mask_pixel_avx512_g<decltype(G)::value>(seed, offset, first, nb, x + j, y + j, thr, fill, planes,
                                                  stride);
        else
          mask_pixel_avx2_g<decltype(G)::value>(seed, offset, first, nb, x + j, y + j, thr, fill, planes,
                                                stride);
#endif
      });
}

// y[t] = random_start_inf_elem(x[t], word start + t, eps, lo, hi), 0 <= t < n (float32; y may
// be x): fused on AVX-512 and AVX2 (random_start_inf_avx512_g / _avx2_g), philox_words +
// random_start_inf_f32 on the scalar ISA and at the ragged ends.
void random_start_stream_f32(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, const float* x,
                             float* y, float eps, float lo, float hi) {
  stream_f32(
      start, n,
      [&](int64_t j, int64_t len) {
        word_chunks(seed, offset, start, j, len, [&](const uint32_t* w, int64_t s, int64_t l) {
          random_start_inf_f32(x + s, w, y + s, l, eps, lo, hi);
        });
      },
      [&](auto isa, auto G, uint64_t first, int64_t nb, int64_t j) {
#if FASTMASK_X86_SIMD
        if constexpr (decltype(isa)::value == 512)
          random_start_inf_avx512_g<decltype(G)::value>(seed, offset, first, nb, x + j, y + j, eps, lo, hi);
        else
          random_start_inf_avx2_g<decltype(G)::value>(seed, offset, first, nb, x + j, y + j, eps, lo, hi);
#endif
      });
}

void philox_normals(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, float* out) {
  uint32_t words[2 * kWordChunk];
  for (int64_t j = 0; j < n; j += kWordChunk) {
    const int64_t len = std::min(kWordChunk, n - j);
    philox_words(seed, offset, 2 * (start + (uint64_t)j), 2 * len, words);
    box_muller_words_f32(words, len, out + j);
  }
}

}  // namespace cpu
}  // namespace fastmask
