// fastcolor per-pixel maths, written once and compiled twice: by g++ into the CPU
// loops (csrc/fc_cpu.cpp) and by nvcc into the CUDA kernels (kernels/fc_kernels.cu).
//
// Everything here is a small inline function on scalars. The CPU code calls them
// inside loops over contiguous pixels so that GCC vectorises them (no libm calls in
// the hot loops: fc::exp_ and fc::log_ are branch-free polynomials); the CUDA code
// calls them once per (thread, class) with the fast hardware exp.
//
// Spec of every function: fastcolor/reference.py (float64); here arithmetic is float32,
// except the soft-encoding of far-off ab (rule 2 below), which is float64 like the reference.
#pragma once

#include <stdint.h>
#include <string.h>

#if !defined(__CUDA_ARCH__)
#include <cmath>  // exp (double) of rule 2
#endif

#include "fc_api.cuh"

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
// exp_(x), the rule shared by the CPU polynomial code of the numba and cpp backends
// (numba: fastcolor/backends/numba_backend/_math.py, fexp; tested by tests/test_compiled_backend.py,
// test_exp_log_rule, through _C.cpu_exp):
//   float32 exp(x): |rel err| <= 2 ulp on [-87, 88] (numba's, the same operations: 1.06 over
//   every float32 in [-88, 88]); below -87 exp(x) within 2 ulp of the subnormal spacing, down to
//   where x / ln 2 rounds to -127 (x < -87.68..), exactly +0 from there on (-inf included);
//   +inf for x > 88; NaN for NaN.
// CPU: branch-free (selects only) so loops over pixels vectorise at -O3 with any ISA; n =
// round(x / ln 2) by the 1.5*2^23 trick (no roundps in SSE2), r = x - n ln 2 (Cody-Waite), exp(r)
// by a degree-6 polynomial in Horner form fitted for relative error (Lawson's iteration,
// 2026-12-01: the same numbers as numba's), 2^n through the exponent bits: n = -127 makes them 0,
// which is how the result becomes exactly 0 with no select.
// CUDA keeps the hardware __expf (ex2.approx: 2 ulp + tiny absolute error, ample for softmax).
FC_HD FC_INLINE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float xc = fmin_(fmax_(x, -88.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;          // round(xc / ln 2), in [-127, 127]
  const int32_t ni = (int32_t)(f2u(t) - f2u(shifter));
  float r = xc - n * 0.693359375f;      // Cody-Waite: ln 2 = C1 + C2
  r = r - n * -2.12194440e-4f;
  float p = 0.001384360482916236f;
  p = p * r + 0.008374195545911789f;
  p = p * r + 0.04166800528764725f;
  p = p * r + 0.16666430234909058f;
  p = p * r + 0.4999999403953552f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  float y = p * u2f((uint32_t)(ni + 127) << 23);
  y = x > 88.0f ? kInf : y;
  return x != x ? x : y;
#endif
}

// log_(x), the shared rule (numba: _flog; tested with exp_):
//   float32 log(x): Cephes logf polynomial, ~1 ulp on normal numbers; subnormals handled exactly
//   like normals (scaled by 2^23 first: the log of the true value, within 2 ulp);
//   log(0) = log(-0) = -inf, log(x < 0) = NaN, log(+inf) = +inf, log(NaN) = NaN.
// Branch-free on the CPU. CUDA keeps logf.
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
// The k nearest bins of a pixel (a, b), nearest first, ties to the lower bin index, with
// Gaussian weights w_j = exp(-(d_j^2 - d_0^2) / (2 sigma^2)) normalised to 1: the one search
// of every fast backend, fastcolor/gamut.py ("k-nearest search"), in three cases:
//   1. lo <= a, b < hi (the candidate table's box): scan the pixel's sub-cell list in order,
//      d^2 in float32, keep the k smallest by insertion with a strict "<" (the list ascends
//      in bin index, so a tie keeps the lower index first); float32 weights, their exponent
//      from float64 differences (gauss_weight).
//   2. finite, outside the box: all Q bins in index order, d^2 in float64 from the float32
//      value, the same insertion; weights from float64 differences, cast to float32 at the end.
//   3. a NaN or infinite component: bins 0..k-1, NaN weights (the reference's stable sort of
//      all-NaN / all-infinite distances).
// The table and the bin centres come from gamut.py at run time (GamutTable, kernels/fc_api.cuh).
//
// No fused multiply-add in any distance, so that every device and instruction set gives the
// same bins: the device uses the _rn intrinsics (never contracted by nvcc); host code that
// includes this file and runs the search is compiled with -ffp-contract=off
// (csrc/fc_encode.cpp, see CMakeLists.txt), as GCC would otherwise contract
// da * da + db * db into an FMA on FMA-capable targets.

// float32 squared distance (rule 1): round(round(da^2) + round(db^2)).
FC_HD FC_INLINE float dist2_f32(float a, float b, float ca, float cb) {
  const float da = a - ca, db = b - cb;
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(da, da), __fmul_rn(db, db));
#else
  return da * da + db * db;
#endif
}

// float64 squared distance (rule 2), as the reference computes it.
FC_HD FC_INLINE double dist2_f64(double a, double b, double ca, double cb) {
  const double da = a - ca, db = b - cb;
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(da, da), __dmul_rn(db, db));
#else
  return da * da + db * db;
#endif
}

// Read-only table loads: through the read-only data cache on the device.
template <typename T>
FC_HD FC_INLINE T ldg_(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Rule 1's test: inside the table's box (false for NaN).
FC_HD FC_INLINE bool in_box(float a, float b, const GamutTable& t) {
  return t.lo <= a && a < t.hi && t.lo <= b && b < t.hi;
}

// The sub-cell of a pixel in the box: c = floor((a - lo) / cell) * n + floor((b - lo) / cell).
// Near a sub-cell's edge float32 rounding may pick the neighbour; the table's lists hold for
// every sub-cell grown by a slack (gamut._TABLE_SLACK), so either gives the same bins. The
// clamp covers a just below hi, where a - lo rounds up to hi - lo.
FC_HD FC_INLINE int sub_cell(float a, float b, const GamutTable& t) {
  const int ia = imin_((int)((a - t.lo) / t.cell), t.n - 1);
  const int ib = imin_((int)((b - t.lo) / t.cell), t.n - 1);
  return ia * t.n + ib;
}

// Gaussian weight of rule 1 for bin qj, the nearest bin being q0 (d0 = its float64 d^2):
// exp_(-(d_j^2 - d_0^2) / (2 sigma^2)) with the difference taken in float64, like rule 2's,
// from the float32 pixel; the exponent is then rounded to float32. (The difference of the two
// float32 d^2 the search compared would cancel: for a pixel far from the bins, still in the
// box, d^2 ~ 1000 carries errors of ~1e-4, i.e. ~2e-6 in a weight.)
FC_HD FC_INLINE float weight_exponent(float a, float b, float cja, float cjb, double d0, double neg_inv_2s2) {
  const double dj = dist2_f64(a, b, cja, cjb);
#if defined(__CUDA_ARCH__)
  return (float)__dmul_rn(__dadd_rn(dj, -d0), neg_inv_2s2);
#else
  return (float)((dj - d0) * neg_inv_2s2);
#endif
}
FC_HD FC_INLINE float gauss_weight(float a, float b, const float* centres, double d0, int qj, double neg_inv_2s2) {
  return exp_(weight_exponent(a, b, centres[2 * qj], centres[2 * qj + 1], d0, neg_inv_2s2));
}

// The k best so far, sorted by distance; CAP >= k is the compile-time capacity (the GPU keeps
// the list in registers, so a smaller CAP for small k means fewer registers).
template <typename T, int CAP>
struct TopK {
  T d[CAP];
  int q[CAP];
};

template <typename T, int CAP>
FC_HD FC_INLINE void topk_reset(TopK<T, CAP>& t, T inf) {
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    t.d[j] = inf;
    t.q[j] = j;  // rule 3: NaN / inf distances are never inserted, bins 0..k-1 remain
  }
}

// Insert (d, q) into the sorted list of the k best if d < the k-th distance (thr mirrors it,
// a scalar, so the GPU needs no dynamic indexing). Candidates arrive in ascending bin index:
// the strict "<" keeps an earlier (lower) bin ahead of a later one at the same distance.
template <typename T, int CAP>
FC_HD FC_INLINE void topk_insert(TopK<T, CAP>& t, int k, T d, int q, T& thr) {
  if (!(d < thr)) return;
#if defined(__CUDA_ARCH__)
  // Fully unrolled with static indices: the list stays in registers.
  bool moving = true;
  FC_UNROLL
  for (int j = CAP - 1; j >= 0; --j) {
    if (j < k && moving) {
      if (j > 0 && d < t.d[j > 0 ? j - 1 : 0]) {
        t.d[j] = t.d[j > 0 ? j - 1 : 0];
        t.q[j] = t.q[j > 0 ? j - 1 : 0];
      } else {
        t.d[j] = d;
        t.q[j] = q;
        moving = false;
      }
      if (j == k - 1) thr = t.d[j];
    }
  }
#else
  int j = k - 1;
  while (j > 0 && d < t.d[j - 1]) {
    t.d[j] = t.d[j - 1];
    t.q[j] = t.q[j - 1];
    --j;
  }
  t.d[j] = d;
  t.q[j] = q;
  thr = t.d[k - 1];
#endif
}

// Rule 1: scan the sub-cell's list (float32). `centres` may be a shared-memory copy.
template <int CAP>
FC_HD FC_INLINE void scan_table(float a, float b, const EncodeSpec& s, const float* centres, TopK<float, CAP>& t) {
  const GamutTable& g = s.table;
  const int c = sub_cell(a, b, g);
  const int end = ldg_(g.offsets + c + 1);
  float thr = kInf;
  for (int e = ldg_(g.offsets + c); e < end; ++e) {
    const int q = ldg_(g.bins + e);
    topk_insert(t, s.k, dist2_f32(a, b, centres[2 * q], centres[2 * q + 1]), q, thr);
  }
}

// Rule 2: every bin (float64).
template <int CAP>
FC_HD FC_INLINE void scan_all(float a, float b, const EncodeSpec& s, const float* centres, TopK<double, CAP>& t) {
  const double a64 = a, b64 = b;
  double thr = (double)kInf;
  for (int q = 0; q < Q; ++q)
    topk_insert(t, s.k, dist2_f64(a64, b64, centres[2 * q], centres[2 * q + 1]), q, thr);
}

// Rule 2's tail: float64 weights exp(-(d_j - d_0) / (2 sigma^2)), normalised, then float32.
template <int CAP, typename IdxT>
FC_HD FC_INLINE void write_far(const TopK<double, CAP>& t, const EncodeSpec& s, IdxT* idx, float* w, int64_t stride) {
  double e[CAP] = {};
  double sum = 0.0;
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    if (j < s.k) {
      e[j] = exp(-(t.d[j] - t.d[0]) / s.two_s2);
      sum += e[j];
    }
  }
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    if (j < s.k) {
      idx[j * stride] = (IdxT)t.q[j];
      w[j * stride] = (float)(e[j] / sum);
    }
  }
}

// Encode one pixel (any of the three rules). Writes idx[j * stride], w[j * stride] for j < k
// (1 <= k <= CAP <= K_MAX). Returns the nearest bin (0 for rule 3).
template <int CAP = K_MAX, typename IdxT>
FC_HD FC_INLINE int soft_encode_pixel(float a, float b, const EncodeSpec& s, const float* centres, IdxT* idx,
                                      float* w, int64_t stride) {
  const int k = s.k;
  if (in_box(a, b, s.table)) {  // rule 1
    TopK<float, CAP> t;
    topk_reset(t, kInf);
    scan_table<CAP>(a, b, s, centres, t);
    const double d0 = dist2_f64(a, b, centres[2 * t.q[0]], centres[2 * t.q[0] + 1]);
    float e[CAP] = {};
    float sum = 0.0f;
    FC_UNROLL
    for (int j = 0; j < CAP; ++j) {
      if (j < k) {
        e[j] = gauss_weight(a, b, centres, d0, t.q[j], s.neg_inv_2s2);
        sum += e[j];
      }
    }
    const float inv = 1.0f / sum;
    FC_UNROLL
    for (int j = 0; j < CAP; ++j) {
      if (j < k) {
        idx[j * stride] = (IdxT)t.q[j];
        w[j * stride] = e[j] * inv;
      }
    }
    return t.q[0];
  }
  if ((a - a == 0.0f) && (b - b == 0.0f)) {  // rule 2: finite, outside the box
    TopK<double, CAP> t;
    topk_reset(t, (double)kInf);
    scan_all<CAP>(a, b, s, centres, t);
    write_far<CAP>(t, s, idx, w, stride);
    return t.q[0];
  }
  const float nan = u2f(0x7fc00000u);  // rule 3: NaN or infinite component
  FC_UNROLL
  for (int j = 0; j < CAP; ++j) {
    if (j < k) {
      idx[j * stride] = (IdxT)j;
      w[j * stride] = nan;
    }
  }
  return 0;
}

}  // namespace fc
