// CPU implementations of the fastmask ops (each registered at the foot of its .cpp) and the
// small CPU helpers they share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <vector>

#include "fastmask/common.h"

namespace fastmask {
namespace cpu {

// Entry points (schemas in docs/ops.md).
void philox_fill(const at::Tensor& out, uint64_t seed, uint64_t offset);
void mask_generate_fill(const at::Tensor& out, const MaskParams& p);
at::Tensor mask_apply(const at::Tensor& x, double ratio, int64_t seed, int64_t offset,
                      std::string_view mode, std::string_view scope,
                      std::string_view channels, double fill);
at::Tensor mask_apply_backward(const at::Tensor& grad, double ratio, int64_t seed,
                               int64_t offset, std::string_view mode, std::string_view scope,
                               std::string_view channels);
at::Tensor fgsm(const at::Tensor& x, const at::Tensor& grad, double eps, double lo, double hi);
at::Tensor pgd_step(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                    double alpha, double eps, double lo, double hi, std::string_view norm);
void pgd_step_(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
               double alpha, double eps, double lo, double hi, std::string_view norm);
at::Tensor random_start(const at::Tensor& x, double eps, int64_t seed, int64_t offset,
                        std::string_view norm, double lo, double hi);
// out= variants: the result written into `out` (shape, dtype and device of x). out may
// be x itself; any other overlap with an input goes through a temporary.
void mask_apply_out(const at::Tensor& x, double ratio, int64_t seed, int64_t offset,
                    std::string_view mode, std::string_view scope, std::string_view channels,
                    double fill, const at::Tensor& out);
void fgsm_out(const at::Tensor& x, const at::Tensor& grad, double eps, double lo, double hi,
              const at::Tensor& out);
void random_start_out(const at::Tensor& x, double eps, int64_t seed, int64_t offset,
                      std::string_view norm, double lo, double hi, const at::Tensor& out);
at::Tensor learned_mask_apply(const at::Tensor& x, const at::Tensor& logits);
at::Tensor learned_mask_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& logits);
at::Tensor grad_clip_noise_(at::TensorList grads, std::optional<double> max_norm,
                            double noise_std, int64_t seed, int64_t offset,
                            std::optional<double> clip_value, std::optional<double> smoothing,
                            at::TensorList state);

// ---- helpers ----

// Calls write(y) with y = out itself when out is contiguous and shares no memory with
// the inputs, or is exactly x (`x_ok`: the kernel reads element k of x before writing
// element k of y); otherwise with a fresh contiguous y, copied into out afterwards.
template <typename F>
inline void write_out(const at::Tensor& out, const at::Tensor& x, bool x_ok,
                      std::initializer_list<at::Tensor> others, const F& write) {
  bool direct = out.is_contiguous();
  if (direct) {
    const at::MemOverlapStatus sx = at::get_overlap_status(out, x);
    direct = sx == at::MemOverlapStatus::No ||
             (x_ok && sx == at::MemOverlapStatus::Full && x.is_contiguous());
  }
  for (const at::Tensor& t : others)
    direct = direct && at::get_overlap_status(out, t) == at::MemOverlapStatus::No;
  if (direct) {
    write(out);
  } else {
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    write(y);
    out.copy_(y);
  }
}

constexpr int64_t kGrain = 16384;     // elements per parallel task (at least)
constexpr int64_t kWordChunk = 1024;  // Philox words buffered per inner loop
constexpr int64_t kSumChunk = 4096;   // fixed reduction chunk: results never depend
                                      // on the number of threads

// out[j] = word (start + j) of the stream (seed, offset), 0 <= j < n; SIMD Philox
// (AVX-512 / AVX2, picked at run time) in csrc/cpu/philox_cpu.cpp.
void philox_words(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, uint32_t* out);

// out[j] = Gaussian element (start + j) of the stream (words 2k, 2k+1; float32
// Box-Muller, fastmask/philox.h), 0 <= j < n.
void philox_normals(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, float* out);

// y[t + c stride] = philox_keep(word start + t, thr) ? x[t + c stride] : fill for t < n and
// c < planes (float32 pixel masks; y may be x; planes > 1: channel planes sharing a mask):
// Philox and the select in one pass on AVX-512 and AVX2, philox_words + mask_pixel_f32 otherwise.
void mask_pixel_stream_f32(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, const float* x,
                           float* y, uint32_t thr, float fill, int64_t planes = 1, int64_t stride = 0);

// y[t] = random_start_inf_elem(x[t], word start + t, eps, lo, hi), 0 <= t < n (float32, y may
// be x): Philox and the step in one pass on AVX-512 and AVX2, philox_words + random_start_inf_f32
// otherwise.
void random_start_stream_f32(uint64_t seed, uint64_t offset, uint64_t start, int64_t n, const float* x,
                             float* y, float eps, float lo, float hi);

// The instruction set philox_words uses: "avx512", "avx2" or "scalar".
const char* philox_isa();

// Sum of f(k) for k in [begin, end) in float64, in a fixed order (8 lanes, then a
// fixed pairwise combination), so the compiler may vectorize without reassociating.
template <typename F>
inline double lane_sum(int64_t begin, int64_t end, const F& f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = begin;
  for (; k + 8 <= end; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += f(k + l);
  for (int l = 0; k < end; ++k, ++l) acc[l] += f(k);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Per-row sums for `rows` rows of length `len`: every row is cut into fixed chunks of
// kSumChunk; partial(row, begin, end) -> double is evaluated in parallel, then the
// partials of a row are added in chunk order. Deterministic for any thread count.
template <typename F>
inline std::vector<double> row_sums(int64_t rows, int64_t len, const F& partial) {
  std::vector<double> sums(rows, 0.0);
  if (rows == 0 || len == 0) return sums;
  int64_t nchunks = (len + kSumChunk - 1) / kSumChunk;
  std::vector<double> parts(rows * nchunks);
  int64_t grain = std::max<int64_t>(1, kGrain / std::min(len, kSumChunk));
  at::parallel_for(0, rows * nchunks, grain, [&](int64_t b, int64_t e) {
    for (int64_t id = b; id < e; ++id) {
      int64_t r = id / nchunks, ch = id % nchunks;
      parts[id] = partial(r, ch * kSumChunk, std::min(len, (ch + 1) * kSumChunk));
    }
  });
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t ch = 0; ch < nchunks; ++ch) sums[r] += parts[r * nchunks + ch];
  return sums;
}

}  // namespace cpu
}  // namespace fastmask
