// Philox4x32-10 counter-based RNG (Salmon et al., SC'11; as in Random123), exactly
// as specified in docs/ops.md. Header-only, usable from host C++ and CUDA device code.
#pragma once

#include <cmath>
#include <cstdint>

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

// Box-Muller from the two words (a, b) of Gaussian element k, in float64.
FASTMASK_HD double box_muller(uint32_t a, uint32_t b) {
  double u1 = ((double)(a >> 8) + 1.0) * kTwoPowM24;  // (0, 1]
  double u2 = (double)(b >> 8) * kTwoPowM24;          // [0, 1)
  return ::sqrt(-2.0 * ::log(u1)) * ::cos(2.0 * 3.141592653589793 * u2);
}

// Gaussian element k of the stream: words 2k, 2k+1 (half of block k / 2).
FASTMASK_HD double philox_normal(uint64_t seed, uint64_t offset, uint64_t k) {
  Philox4 r = philox_block(seed, offset, k >> 1);
  int lane = (int)(k & 1) * 2;
  return box_muller(r.v[lane], r.v[lane + 1]);
}

}  // namespace fastmask
