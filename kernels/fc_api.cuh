// Parameter structs and entry points of the fastcolor kernels, shared by the pybind11 bindings
// (csrc/fc_bindings.cpp, which fill the structs from the Python call), the CPU loops
// (csrc/fc_cpu.cpp, csrc/fc_encode.cpp) and the CUDA launchers (kernels/fc_kernels.cu).
// Plain C++: no CUDA or pybind11 types, so g++ and nvcc both include it.
//
// Layout (the backend contract, fastcolor/backends/contract.py): contiguous (N, C, P), class
// stride P, image stride C * P; every offset is computed in int64. Every number of the gamut
// (bin centres, candidate lists, the table's geometry) arrives here from fastcolor/gamut.py at
// run time, through fastcolor/backends/_tables.py; the kernels hold no copy of it.
#pragma once

#include <stdint.h>

namespace fc {

// Bins of the gamut: the length of the class axis (the bindings check the bin-centre table
// passed in against it) and the largest k of the soft-encoding (gamut.K_MAX).
constexpr int Q = 313;
constexpr int K_MAX = 16;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// The candidate table of one k (fastcolor.gamut.candidate_table(k), uploaded by
// _tables.device_table) and the bin centres (_tables.bin_centres), on the call's device.
struct GamutTable {
  const int32_t* offsets;  // (n * n + 1,): sub-cell c lists bins[offsets[c] .. offsets[c + 1])
  const int16_t* bins;     // candidate bins, ascending within each sub-cell
  const float* centres;    // (Q, 2) bin centres (a, b), float32
  float lo;                // the table's box is lo <= a, b < hi (both axes)
  float hi;                // lo + n * cell
  float cell;              // side of a sub-cell
  int n;                   // sub-cells per axis
  int max_len;             // longest candidate list
};

// One soft-encoding: the k nearest bins and their Gaussian weights (gamut.py's three rules).
struct EncodeSpec {
  GamutTable table;   // candidate table for this k, and the bin centres
  int k;              // bins per pixel, 1..K_MAX
  double neg_inv_2s2;  // -1 / (2 sigma^2): the weights' exponent (rule 1, in the box)
  double two_s2;       // 2 sigma^2: float64 weights (rule 2, finite ab outside the box)
};

// soft_encode: ab -> (indices, weights).
struct EncodeParams {
  const float* ab;  // (N, 2, P) float32 ab
  int32_t* idx;     // (N, k, P) out: bins, nearest first (ties: lower index)
  float* w;         // (N, k, P) out: weights, summing to 1
  int64_t N;        // images
  int64_t P;        // pixels per image
  EncodeSpec enc;   // k, sigma, table
};

// ce_forward: the fused class-rebalanced cross-entropy, per-pixel loss and gradient.
struct LossParams {
  const void* logits;   // (N, Q, P) logits of `dtype`
  int dtype;            // DType of logits and grad
  const float* ab;      // (N, 2, P) target ab, encoded on the fly with `enc`; or null
  const int32_t* idx;   // (N, k, P) precomputed target bins; or null (then ab is given)
  const float* w;       // (N, k, P) precomputed target weights; null iff idx is
  const float* cw;      // (Q,) class weights v; null means v = 1
  const float* mask;    // (N,) image factor m; null means m = 1
  const float* pscale;  // (N, P) pixel factor s; null means s = 1
  float* loss;          // (N, P) out: s m v sum_j w_j (lse - x_j)
  void* grad;           // (N, Q, P) out of `dtype`: grad_scale s m v (softmax - Z); null: none
  int64_t N;            // images
  int64_t P;            // pixels per image
  int k;                // target bins per pixel
  float grad_scale;     // factor of the gradient only
  EncodeSpec enc;       // the search, when ab is given (enc.k == k)
};

// annealed_mean: (N, Q, P) logits or probabilities -> (N, 2, P) ab.
struct AnnealParams {
  const void* x;         // (N, Q, P) of `dtype`
  int dtype;             // DType of x
  const float* centres;  // (Q, 2) bin centres (a, b)
  float* out;            // (N, 2, P) out, float32
  int64_t N;             // images
  int64_t P;             // pixels per image
  float inv_T;           // 1 / T
  bool is_probs;         // x holds probabilities (log taken first), else logits
};

// The fused loss's backward on CUDA: grad *= *factor in place (factor: grad_output, a float32 on
// the device, read by the kernel; when it is 1 every block returns at once: no data moves, and the
// host never read it).
struct ScaleParams {
  void* grad;            // (n,) of `dtype`, contiguous
  int dtype;             // DType of grad
  const float* factor;   // (1,) float32
  int64_t n;             // elements
};

namespace cpu {
// nthreads <= 0: OpenMP's default. Release the GIL before calling.
void soft_encode(const EncodeParams& p, int nthreads);
void ce_forward(const LossParams& p, int nthreads);
void annealed_mean(const AnnealParams& p, int nthreads);
// exp_ / log_ of kernels/fc_math.cuh over n floats, with the current instruction set (tests).
void exp_array(const float* in, float* out, int64_t n);
void log_array(const float* in, float* out, int64_t n);
// The instruction set of the CPU loops: "avx512", "avx2" or "default" (portable baseline).
const char* isa();
// Force an instruction set (tests); returns false if this CPU cannot run it.
bool set_isa(const char* name);
}  // namespace cpu

namespace cuda {
// Asynchronous on `stream` of `device`; return nullptr or a CUDA error message.
// ce_forward takes precomputed targets only (p.ab == nullptr): run soft_encode first.
const char* soft_encode(int device, void* stream, const EncodeParams& p);
const char* ce_forward(int device, void* stream, const LossParams& p);
const char* annealed_mean(int device, void* stream, const AnnealParams& p);
const char* scale(int device, void* stream, const ScaleParams& p);
// Launch-bounds variant of the loss and annealed-mean kernels: minimum blocks per SM
// 4 (the default) or 0 (no minimum). Benchmarking knob; false if invalid.
bool set_min_blocks(int min_blocks);
// The __global__ kernels compiled into this module (null-terminated list).
const char* const* kernel_names();
}  // namespace cuda

}  // namespace fc
