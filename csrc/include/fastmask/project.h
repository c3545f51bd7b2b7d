// FAB's L-inf projection of one row onto a hyperplane inside a box (docs/ops.md,
// project_linf), for the CPU kernel (csrc/cpu/project_cpu.cpp) and the CUDA kernel
// (csrc/cuda/project_cuda.cu).
// No ATen types. lam, the L-inf size of the step, is found by selection (three-way
// partitions around a pivot, expected O(D) per row) instead of fastmask.reference's full
// sort of the breakpoints, and the sums are float64: the same lam up to rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastmask/philox.h"  // FASTMASK_HD

namespace fastmask {

// d (D values): the L-inf-smallest step with <w, t + d> = b and lo <= t + d <= hi; with
// c = <w, t> - b >= 0 (else w and c flipped), d_i = -sign(w_i) min(lam, room_i), room_i the
// distance from t_i to the face that lowers <w, x>, lam the least with
// f(lam) = sum_i |w_i| min(lam, room_i) >= c (infinite when f never reaches c: d goes to
// the corner). room (D values) and cand (D indices) are scratch.
template <typename T>
FASTMASK_HD void project_linf_row(const T* t, const T* w, T b, T lo, T hi, int64_t D, T* d, T* room,
                                  int64_t* cand) {
  double c = 0.0;
  for (int64_t i = 0; i < D; ++i) c += (double)w[i] * (double)t[i];
  c -= (double)b;
  const T s = c < 0 ? (T)-1 : (T)1;
  c = c < 0 ? -c : c;
  int64_t m = 0;
  for (int64_t i = 0; i < D; ++i) {
    const T wi = s * w[i];
    const T r = wi > 0 ? t[i] - lo : hi - t[i];
    room[i] = r > 0 ? r : (T)0;
    if (wi != 0 && room[i] > 0) cand[m++] = i;  // the others add nothing to f at any lam
  }
  // invariant: f(lam) = below + lam * above + (the terms of cand[a, e)), lam in their span
  double below = 0.0, above = 0.0;
  int64_t a = 0, e = m;
  while (a < e) {
    const T p = room[cand[a + (e - a) / 2]];
    // three-way partition of cand[a, e): [a, lt) room < p, [lt, gt) room == p, [gt, e) room > p
    int64_t lt = a, i = a, gt = e;
    double mass_lt = 0.0, aw_eq = 0.0, aw_gt = 0.0;
    while (i < gt) {
      const int64_t k = cand[i];
      const double aw = w[k] < 0 ? -(double)w[k] : (double)w[k];
      if (room[k] < p) {
        mass_lt += aw * (double)room[k];
        cand[i++] = cand[lt];
        cand[lt++] = k;
      } else if (room[k] > p) {
        aw_gt += aw;
        cand[i] = cand[--gt];
        cand[gt] = k;
      } else {
        aw_eq += aw;
        ++i;
      }
    }
    if (below + mass_lt + (double)p * (above + aw_eq + aw_gt) >= c) {  // lam <= p
      above += aw_eq + aw_gt;
      e = lt;
    } else {
      below += mass_lt + (double)p * aw_eq;
      a = gt;
    }
  }
  // above == 0: every candidate lies below lam; f stops at below (infinite lam unless c is reached)
  const T lam = above > 0 ? (T)((c - below) / above) : (c > below ? (T)HUGE_VAL : (T)0);
  for (int64_t i = 0; i < D; ++i) {
    const T wi = s * w[i];
    const T sg = (T)((wi > 0) - (wi < 0));
    const T step = lam < room[i] ? lam : room[i];
    d[i] = -sg * step;
  }
}

}  // namespace fastmask
