// fastcolor per-pixel maths, written once and compiled twice: by g++ into the CPU
// loops (csrc/fc_cpu.cpp) and by nvcc into the CUDA kernels (kernels/fc_kernels.cu).
//
// Everything here is a small inline function on scalars. The CPU code calls them
// inside loops over contiguous pixels so that GCC vectorises them (no libm calls in
// the hot loops: fc::exp_ and fc::log_ are branch-free polynomials); the CUDA code
// calls them once per (thread, class) with the fast hardware exp.
//
// Spec of every function: fastcolor/reference.py (float64); here arithmetic is float32.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__
#define FC_INLINE __forceinline__
#define FC_UNROLL _Pragma("unroll")
#else
#define FC_HD
#define FC_INLINE inline __attribute__((always_inline))
#define FC_UNROLL _Pragma("GCC unroll 16")
#endif

namespace fc {

// ----------------------------------------------------------------------------- gamut
// The 313 bins (fastcolor/gamut.py): a grid of spacing 10, a = -90 + 10 ia (ia = 0..19),
// b = -110 + 10 ib (ib = 0..21). Column ia holds the rows ib = kBLo[ia]..kBHi[ia]; bin
// indices run column after column (ordered by (a, b)), starting at kQStart[ia].
// tests/test_compiled_backend.py checks these tables against gamut.AB_BINS (via _C.gamut_bins).
constexpr int Q = 313;
constexpr int A_CELLS = 20;
constexpr int B_CELLS = 22;
constexpr float A_MIN = -90.0f;
constexpr float B_MIN = -110.0f;
constexpr float GRID = 10.0f;
constexpr int K_MAX = 16;

#define FC_B_LO_INIT {16, 13, 11, 9, 8, 7, 6, 6, 5, 4, 3, 3, 2, 1, 1, 0, 0, 0, 0, 2}
#define FC_B_HI_INIT {20, 20, 20, 20, 21, 21, 21, 21, 21, 21, 20, 20, 20, 20, 19, 19, 19, 18, 18, 11}
#define FC_Q_START_INIT {0, 5, 13, 23, 35, 49, 64, 80, 96, 113, 131, 149, 167, 186, 206, 225, 245, 265, 284, 303}

static constexpr signed char kBLo[A_CELLS] = FC_B_LO_INIT;
static constexpr signed char kBHi[A_CELLS] = FC_B_HI_INIT;
static constexpr short kQStart[A_CELLS] = FC_Q_START_INIT;
#if defined(__CUDACC__)
static __constant__ signed char dBLo[A_CELLS] = FC_B_LO_INIT;
static __constant__ signed char dBHi[A_CELLS] = FC_B_HI_INIT;
static __constant__ short dQStart[A_CELLS] = FC_Q_START_INIT;
#endif

FC_HD FC_INLINE int col_b_lo(int ia) {
#if defined(__CUDA_ARCH__)
  return dBLo[ia];
#else
  return kBLo[ia];
#endif
}
FC_HD FC_INLINE int col_b_hi(int ia) {
#if defined(__CUDA_ARCH__)
  return dBHi[ia];
#else
  return kBHi[ia];
#endif
}
FC_HD FC_INLINE int col_q_start(int ia) {
#if defined(__CUDA_ARCH__)
  return dQStart[ia];
#else
  return kQStart[ia];
#endif
}

FC_HD FC_INLINE float fmin_(float a, float b) { return a < b ? a : b; }
FC_HD FC_INLINE float fmax_(float a, float b) { return a > b ? a : b; }
FC_HD FC_INLINE int imin_(int a, int b) { return a < b ? a : b; }
FC_HD FC_INLINE int imax_(int a, int b) { return a > b ? a : b; }

FC_HD FC_INLINE uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
FC_HD FC_INLINE float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

constexpr float kInf = __builtin_huge_valf();

// ----------------------------------------------------------------------------- exp / log
// exp_(x): float32 exp, |rel err| < 2 ulp on [-87, 88]; exp_(-inf) = 0, exp_(NaN) = NaN,
// 0 below -87 (values < 1.7e-38 do not matter for softmax weights), inf above 88.7.
// CPU: Cephes polynomial written branch-free (selects only) so loops over pixels
// vectorise at -O3 with any ISA; round-to-nearest by the 1.5*2^23 trick (no roundps in SSE2).
FC_HD FC_INLINE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx: 2 ulp + tiny absolute error, ample for softmax
#else
  const float xc = fmin_(fmax_(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;          // round(xc / ln 2)
  const int32_t ni = (int32_t)(f2u(t) - f2u(shifter));
  float r = xc - n * 0.693359375f;      // Cody-Waite: ln 2 = C1 + C2
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  float y = p * u2f((uint32_t)(ni + 127) << 23);
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.0f ? kInf : y;
  return x != x ? x : y;
#endif
}

// log_(x): float32 natural log (Cephes logf), ~1 ulp; log_(0) = -inf, log_(x < 0) = NaN,
// log_(inf) = inf, log_(NaN) = NaN, subnormals handled. Branch-free on the CPU.
FC_HD FC_INLINE float log_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  const bool sub = x < 1.17549435e-38f;  // subnormal, zero, negative
  const float xs = sub ? x * 8388608.0f : x;
  const uint32_t u = f2u(xs);
  int32_t e = (int32_t)((u >> 23) & 0xff) - 126 - (sub ? 23 : 0);
  float m = u2f((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool lo = m < 0.707106781186547524f;
  e = lo ? e - 1 : e;
  m = lo ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float ef = (float)e;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = m + y + ef * 0.693359375f;
  r = x == 0.0f ? -kInf : r;
  r = x < 0.0f ? u2f(0x7fc00000u) : r;
  r = x == kInf ? kInf : r;
  return x != x ? x : r;
#endif
}

// ----------------------------------------------------------------------------- half types (CPU)
// Bit conversions for float16 / bfloat16 storage on the CPU (CUDA uses cuda_fp16/cuda_bf16).
// Round-to-nearest-even, subnormals, inf and NaN handled; branch-free so they vectorise.
FC_HD FC_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t shifted = em << 13;
  const float normal = u2f(shifted) * 5.192296858534828e+33f;  // 2^112: rebias (also subnormals)
  const uint32_t bits = em >= 0x7c00u ? (shifted | 0x7f800000u) : f2u(normal);
  return u2f(bits | sign);
}

FC_HD FC_INLINE uint16_t float_to_half_bits(float f) {
  // M. Maratyszcza's FP16 library (MIT), fp16_ieee_from_fp32_value.
  const float scale_to_inf = 5.192296858534828e+33f;   // 2^112
  const float scale_to_zero = 7.703719777548943e-34f;  // 2^-110
  const uint32_t w = f2u(f);
  const float af = u2f(w & 0x7fffffffu);
  float base = (af * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

FC_HD FC_INLINE float bf16_bits_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }

FC_HD FC_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)(f != f ? ((u >> 16) | 0x40u) : rounded);
}

// ----------------------------------------------------------------------------- soft-encoding
// The k nearest bins of (a, b) by squared Euclidean distance (float32), ties -> lower bin
// index, ordered nearest first, with Gaussian weights normalised to 1 (reference.soft_encode).
//
// Exact pruned search on the grid (no window to outgrow, so no fallback scan): the bins
// form columns (one per a), each a contiguous run of rows (b). Columns are visited outward
// from the one nearest to a, alternating sides; in a column, rows outward from the one
// nearest to b, alternating directions. Along each of these four walks the distance only
// grows, so a walk stops at the first candidate farther than the current k-th best (thr):
// a column is skipped when its a-term alone exceeds thr, a row walk when a + b terms do
// (a_term / b_term: the squared distance, reduced for ab outside the bins' box).
// The comparisons use the very same float32 operations as the distances themselves
// (monotone in |a - c|), so pruning never drops a bin that a full scan would keep; an
// equal distance is still visited, and the (distance, index) order settles ties exactly.
// Far-off ab visits a handful of bins; in-gamut ab about 15-25 for k = 5.
// Non-finite ab gives bins 0..k-1 with NaN weights, as the reference does (all its
// distances are NaN/inf and tie).

// The k best so far, sorted; CAP >= k is the compile-time capacity (the GPU keeps the
// list in registers, so a smaller CAP for small k means fewer registers and instructions).
template <int CAP>
struct TopK {
  float d[CAP];
  int q[CAP];
};

constexpr int kNoBin = 0x7fffffff;

template <int CAP>
FC_HD FC_INLINE void topk_reset(TopK<CAP>& t) {
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    t.d[j] = kInf;
    t.q[j] = kNoBin;
  }
}

// Nearest grid column / row of a, b, clamped to the grid (far-off ab lands on the edge).
FC_HD FC_INLINE int nearest_ia(float a) {
  return (int)fmin_(fmax_((a - A_MIN) * (1.0f / GRID) + 0.5f, 0.0f), (float)(A_CELLS - 1));
}
FC_HD FC_INLINE int nearest_ib(float b, int lo, int hi) {
  return (int)fmin_(fmax_((b - B_MIN) * (1.0f / GRID) + 0.5f, (float)lo), (float)hi);
}
// Squared distances, reduced: d = a_term + b_term equals |ab - c|^2 minus the squared distance
// from ab to the box of all bin centres ([-90, 100] x [-110, 100]), a constant per pixel, so
// neither the order of the bins nor the weights change; inside the box it is exactly
// da^2 + db^2. With x outside the box by e (x = clamp + e) and r = clamp - c (r has e's sign):
// (e + r)^2 - e^2 = r (2 e + r). Far-off ab (1e6, 0) then compares terms of ~1e8, not 1e12
// whose float32 ulp (65536) would tie a whole column of bins.
// Each term is non-decreasing in |x - c| along a walk away from the nearest grid line
// (float rounding is monotone), which the pruned search and the window bound rely on.
FC_HD FC_INLINE float axis_term(float x, float lo, float hi, float c) {
  const float xc = fmin_(fmax_(x, lo), hi);
  const float e = x - xc;
  const float r = xc - c;
  return r * (2.0f * e + r);
}
FC_HD FC_INLINE float a_term(float a, int ia) {
  return axis_term(a, A_MIN, A_MIN + GRID * (float)(A_CELLS - 1), A_MIN + GRID * (float)ia);
}
FC_HD FC_INLINE float b_term(float b, int ib) {
  return axis_term(b, B_MIN, B_MIN + GRID * (float)(B_CELLS - 1), B_MIN + GRID * (float)ib);
}

// Window bound (the CPU's vectorised encoder, csrc/fc_cpu.cpp, searches the (2R+1)^2 cells
// around the nearest grid point (ia0, ib0) for many pixels at once): a bin outside the
// window, clipped to the grid, has a (reduced) distance of at least the returned bound (sides
// at the grid's edge have no bins beyond them): the term of the first column or row outside.
// If the k-th best distance found is < bound, the window's answer is the exact search's.
FC_HD FC_INLINE float window_bound(float a, float b, int ia0, int ib0, int R) {
  const int ia_lo = imax_(ia0 - R, 0), ia_hi = imin_(ia0 + R, A_CELLS - 1);
  const int ib_lo = imax_(ib0 - R, 0), ib_hi = imin_(ib0 + R, B_CELLS - 1);
  float bound = kInf;
  bound = ia_lo > 0 ? fmin_(bound, a_term(a, ia_lo - 1)) : bound;
  bound = ia_hi < A_CELLS - 1 ? fmin_(bound, a_term(a, ia_hi + 1)) : bound;
  bound = ib_lo > 0 ? fmin_(bound, b_term(b, ib_lo - 1)) : bound;
  bound = ib_hi < B_CELLS - 1 ? fmin_(bound, b_term(b, ib_hi + 1)) : bound;
  return bound;
}

// Gaussian weight of a neighbour at squared distance d, relative to the nearest at d0.
FC_HD FC_INLINE float gauss_weight(float d, float d0, float neg_inv_2s2) { return exp_((d - d0) * neg_inv_2s2); }

// (d1, q1) before (d2, q2): nearer, or as near with a lower bin index.
FC_HD FC_INLINE bool before(float d1, int q1, float d2, int q2) { return d1 < d2 || (d1 == d2 && q1 < q2); }

// Insert (d, q) into the sorted list of the k best; thr / thr_q mirror its k-th entry
// (scalars, so the GPU needs no dynamic indexing).
template <int CAP>
FC_HD FC_INLINE void topk_insert(TopK<CAP>& t, int k, float d, int q, float& thr, int& thr_q) {
  if (!before(d, q, thr, thr_q)) return;
#if defined(__CUDA_ARCH__)
  // Fully unrolled with static indices: the list stays in registers.
  bool moving = true;
  FC_UNROLL
  for (int j = CAP - 1; j >= 0; --j) {
    if (j < k && moving) {
      if (j > 0 && before(d, q, t.d[j > 0 ? j - 1 : 0], t.q[j > 0 ? j - 1 : 0])) {
        t.d[j] = t.d[j > 0 ? j - 1 : 0];
        t.q[j] = t.q[j > 0 ? j - 1 : 0];
      } else {
        t.d[j] = d;
        t.q[j] = q;
        moving = false;
      }
      if (j == k - 1) {
        thr = t.d[j];
        thr_q = t.q[j];
      }
    }
  }
#else
  int j = k - 1;
  while (j > 0 && before(d, q, t.d[j - 1], t.q[j - 1])) {
    t.d[j] = t.d[j - 1];
    t.q[j] = t.q[j - 1];
    --j;
  }
  t.d[j] = d;
  t.q[j] = q;
  thr = t.d[k - 1];
  thr_q = t.q[k - 1];
#endif
}

// Visit the rows of column ia (da2 = its a_term) outward from the row nearest to b.
template <int CAP>
FC_HD FC_INLINE void search_column(float b, int ia, float da2, int k, TopK<CAP>& t, float& thr, int& thr_q) {
  const int lo = col_b_lo(ia), hi = col_b_hi(ia);
  const int q0 = col_q_start(ia) - lo;
  const int ibc = nearest_ib(b, lo, hi);  // nearest row of this column
  bool up = true, down = ibc > lo;
  for (int s = 0; up || down; ++s) {
    if (up) {
      const int ib = ibc + s;
      const float d = da2 + b_term(b, ib);
      if (d > thr) {
        up = false;
      } else {
        topk_insert(t, k, d, q0 + ib, thr, thr_q);
        up = ib < hi;
      }
    }
    if (down) {
      const int ib = ibc - 1 - s;
      const float d = da2 + b_term(b, ib);
      if (d > thr) {
        down = false;
      } else {
        topk_insert(t, k, d, q0 + ib, thr, thr_q);
        down = ib > lo;
      }
    }
  }
}

// Encode one pixel. Writes idx[j * stride], w[j * stride] for j < k (1 <= k <= CAP <= K_MAX).
// neg_inv_2s2 = -1 / (2 sigma^2). Returns the nearest bin.
template <int CAP = K_MAX, typename IdxT>
FC_HD FC_INLINE int soft_encode_pixel(float a, float b, int k, float neg_inv_2s2, IdxT* idx, float* w,
                                      int64_t stride) {
  TopK<CAP> t;
  topk_reset(t);
  float thr = kInf;
  int thr_q = kNoBin;
  const bool finite = (a - a == 0.0f) && (b - b == 0.0f);
  if (finite) {
    const int iac = nearest_ia(a);  // far-off ab starts at the grid's edge
    bool right = true, left = iac > 0;
    for (int s = 0; right || left; ++s) {
      if (right) {
        const int ia = iac + s;
        const float da2 = a_term(a, ia);
        if (da2 > thr) {
          right = false;
        } else {
          search_column(b, ia, da2, k, t, thr, thr_q);
          right = ia < A_CELLS - 1;
        }
      }
      if (left) {
        const int ia = iac - 1 - s;
        const float da2 = a_term(a, ia);
        if (da2 > thr) {
          left = false;
        } else {
          search_column(b, ia, da2, k, t, thr, thr_q);
          left = ia > 0;
        }
      }
    }
  }
  // Gaussian weights relative to the nearest distance (stays finite for far-off ab).
  // Non-finite ab (or reduced distances overflowing float32, |ab| > 1e35): bins 0..k-1, NaN weights.
  const float nan = u2f(0x7fc00000u);
  float e[CAP] = {};
  float sum = 0.0f;
  const float d0 = t.d[0];
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    if (j < k) {
      const bool ok = finite && t.q[j] < Q;
      e[j] = ok ? gauss_weight(t.d[j], d0, neg_inv_2s2) : nan;
      sum += e[j];
    }
  }
  const float inv = 1.0f / sum;
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    if (j < k) {
      const bool ok = finite && t.q[j] < Q;
      idx[j * stride] = (IdxT)(ok ? t.q[j] : j);
      w[j * stride] = e[j] * inv;
    }
  }
  return (finite && t.q[0] < Q) ? t.q[0] : 0;
}

// ----------------------------------------------------------------------------- small helpers
// Bin centre coordinates by index (annealed mean). Host: computed tables; device: the
// CUDA code keeps its own __constant__ copy filled from the same function.
struct BinCoords {
  float a[Q];
  float b[Q];
};

constexpr BinCoords make_bin_coords() {
  BinCoords c{};
  const signed char lo[A_CELLS] = FC_B_LO_INIT;
  const signed char hi[A_CELLS] = FC_B_HI_INIT;
  int q = 0;
  for (int ia = 0; ia < A_CELLS; ++ia)
    for (int ib = lo[ia]; ib <= hi[ia]; ++ib, ++q) {
      c.a[q] = A_MIN + GRID * (float)ia;
      c.b[q] = B_MIN + GRID * (float)ib;
    }
  return c;
}

// Bin index of every grid cell, padded by 3 cells on each side (-1: no bin), for window
// lookups without bounds checks: index (ia + 3) * kCellStride + (ib + 3), -3 <= ia, ib.
constexpr int kCellPad = 3;
constexpr int kCellStride = B_CELLS + 2 * kCellPad;
struct CellTable {
  int q[(A_CELLS + 2 * kCellPad) * kCellStride];
};

constexpr CellTable make_cell_table() {
  CellTable c{};
  for (int i = 0; i < (A_CELLS + 2 * kCellPad) * kCellStride; ++i) c.q[i] = -1;
  const signed char lo[A_CELLS] = FC_B_LO_INIT;
  const signed char hi[A_CELLS] = FC_B_HI_INIT;
  int q = 0;
  for (int ia = 0; ia < A_CELLS; ++ia)
    for (int ib = lo[ia]; ib <= hi[ia]; ++ib, ++q) c.q[(ia + kCellPad) * kCellStride + ib + kCellPad] = q;
  return c;
}

}  // namespace fc
