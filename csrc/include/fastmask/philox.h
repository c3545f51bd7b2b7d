// Philox4x32-10 counter-based RNG (Salmon et al., SC'11; as in Random123), exactly
// as specified in docs/ops.md. Header-only, usable from host C++ and CUDA device code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTMASK_HD __host__ __device__ __forceinline__
#else
#define FASTMASK_HD inline
#endif

namespace fastmask {

struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr double kTwoPow24 = 16777216.0;
constexpr double kTwoPowM24 = 1.0 / 16777216.0;

// Block b of the stream (seed, offset): key = (seed lo, seed hi),
// counter = (b lo, b hi, offset lo, offset hi), 10 rounds.
FASTMASK_HD Philox4 philox_block(uint64_t seed, uint64_t offset, uint64_t block) {
  uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32);
  uint32_t c2 = (uint32_t)offset, c3 = (uint32_t)(offset >> 32);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint64_t p0 = (uint64_t)kPhiloxM0 * c0;
    uint64_t p1 = (uint64_t)kPhiloxM1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = (uint32_t)p0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
  }
  Philox4 out;
  out.v[0] = c0; out.v[1] = c1; out.v[2] = c2; out.v[3] = c3;
  return out;
}

// Word k of the stream: lane k % 4 of block k / 4.
FASTMASK_HD uint32_t philox_word(uint64_t seed, uint64_t offset, uint64_t k) {
  return philox_block(seed, offset, k >> 2).v[k & 3];
}

// u(w) = (w >> 8) * 2^-24 in [0, 1); exact in float and double.
template <typename T>
FASTMASK_HD T philox_uniform(uint32_t w) {
  return (T)(w >> 8) * (T)kTwoPowM24;
}

// Keep threshold T(r) = ceil(r * 2^24), r in [0, 1] (exact in float64). Host side.
inline uint32_t keep_threshold(double ratio) {
  return (uint32_t)std::ceil(ratio * kTwoPow24);
}

// keep iff (w >> 8) >= T(r): r = 0 keeps everything, r = 1 keeps nothing.
FASTMASK_HD bool philox_keep(uint32_t w, uint32_t threshold) {
  return (w >> 8) >= threshold;
}

// ---- Gaussian: float32 Box-Muller, bit for bit on every platform (docs/ops.md) ----
// Only IEEE float32 +, -, *, / and sqrt (correctly rounded everywhere) and exact
// integer / bit operations, in a fixed order; no table look-ups and no branches (the
// selects vectorize). Needs no FMA contraction: -ffp-contract=off (CPU), --fmad=false
// (nvcc). fastmask/reference.py performs the same operations on tensors.

FASTMASK_HD uint32_t fm_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FASTMASK_HD float fm_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ln(x) for a positive normal float x; max error 0.83 ulp on x = k 2^-24, k = 1..2^24.
// fdlibm/musl logf: x = 2^k (1 + f), 1 + f in [sqrt(2)/2, sqrt(2)) by integer
// operations on the bits, s = f / (2 + f), ln(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)).
FASTMASK_HD float fm_logf(float x) {
  const float Lg1 = 0x1.555554p-1f, Lg2 = 0x1.999c26p-2f, Lg3 = 0x1.23d3dcp-2f,
              Lg4 = 0x1.f13c4cp-3f, ln2_hi = 0x1.62e3p-1f, ln2_lo = 0x1.2fefa2p-17f;
  const uint32_t ix = fm_float_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = (float)((int32_t)(ix >> 23) - 0x7f);
  const float f = fm_bits_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (Lg2 + w * Lg4);
  const float t2 = z * (Lg1 + w * Lg3);
  const float R = t2 + t1;
  const float hfsq = (0.5f * f) * f;
  return ((((s * (hfsq + R)) + k * ln2_lo) - hfsq) + f) + k * ln2_hi;
}

// cos(2 pi j 2^-24) for j in [0, 2^24); max error 1.95 ulp, exact 0 and +-1 at the
// quarter turns. Quadrant q = j >> 22, r = j mod 2^22; with r' = min(r, 2^22 - r) the
// angle x = r' (pi/2) 2^-22 is in [0, pi/4], where Cephes' sinf / cosf polynomials
// apply; cos(2 pi u) = cos x, -sin x, -cos x, sin x (q = 0..3), sin <-> cos if r' != r.
FASTMASK_HD float fm_cos2pi_q24(uint32_t j) {
  const float S1 = -0x1.9943f2p-13f, S2 = 0x1.11073cp-7f, S3 = -0x1.555546p-3f;
  const float C1 = 0x1.99eb9cp-16f, C2 = -0x1.6c0c34p-10f, C3 = 0x1.55554ap-5f;
  const float pi_2pm23 = 0x1.921fb6p+1f * 0x1p-23f;  // float(pi) 2^-23, exact
  const uint32_t q = j >> 22, r = j & 0x3fffffu;
  const uint32_t swap = (uint32_t)(r > 0x200000u);  // 0 or 1
  const uint32_t rr = swap ? 0x400000u - r : r;
  const float x = (float)(int32_t)rr * pi_2pm23;
  const float z = x * x;
  const float sn = ((((S1 * z + S2) * z + S3) * z) * x) + x;
  const float cs = (((((C1 * z + C2) * z + C3) * z) * z) - 0.5f * z) + 1.0f;
  // Selects on the bits (a float ?: is not if-converted under -ftrapping-math, which
  // would block vectorization): sin where (q ^ swap) is odd, negated where q is 1 or 2.
  const uint32_t use_sin = 0u - ((q ^ swap) & 1u);  // all ones or 0
  const uint32_t neg = ((q + 1u) >> 1) & 1u;
  const uint32_t v = (fm_float_bits(sn) & use_sin) | (fm_float_bits(cs) & ~use_sin);
  return fm_bits_float(v ^ (neg << 31));
}

// Box-Muller from the two words (a, b) of Gaussian element k, in float32:
// u1 = ((a >> 8) + 1) 2^-24 in (0, 1], z = sqrt(-2 ln u1) cos(2 pi (b >> 8) 2^-24).
FASTMASK_HD float box_muller_f32(uint32_t a, uint32_t b) {
  const float u1 = (float)(int32_t)((a >> 8) + 1u) * 0x1p-24f;  // exact
  return ::sqrtf(-2.0f * fm_logf(u1)) * fm_cos2pi_q24(b >> 8);
}

// The same Gaussian as a double (exact conversion of the float32 value).
FASTMASK_HD double box_muller(uint32_t a, uint32_t b) {
  return (double)box_muller_f32(a, b);
}

// Gaussian element k of the stream: words 2k, 2k+1 (half of block k / 2).
FASTMASK_HD double philox_normal(uint64_t seed, uint64_t offset, uint64_t k) {
  Philox4 r = philox_block(seed, offset, k >> 1);
  int lane = (int)(k & 1) * 2;
  return box_muller(r.v[lane], r.v[lane + 1]);
}

}  // namespace fastmask
