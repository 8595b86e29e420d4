// Entry points of the fastcolor kernels, shared by the pybind11 bindings (csrc/fc_bindings.cpp),
// the CPU loops (csrc/fc_cpu.cpp) and the CUDA launchers (kernels/fc_kernels.cu).
// Plain C++: no CUDA or pybind11 types, so g++ and nvcc both include it.
//
// Layout (the backend contract, fastcolor/backends/__init__.py): contiguous (N, C, P),
// class stride P, image stride C * P; every offset is computed in int64.
#pragma once

#include <stdint.h>

namespace fc {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct EncodeArgs {
  const float* ab;  // (N, 2, P)
  int32_t* idx;     // (N, k, P)
  float* w;         // (N, k, P)
  int64_t N, P;
  int k;
  float neg_inv_2s2;  // -1 / (2 sigma^2)
};

struct CeArgs {
  const void* logits;   // (N, 313, P) of `dtype`
  int dtype;
  const float* ab;      // (N, 2, P) or null
  const int32_t* idx;   // (N, k, P) or null (then ab is given)
  const float* w;       // (N, k, P) or null
  const float* cw;      // (313,) class weights or null
  const float* mask;    // (N,) image mask or null
  const float* pscale;  // (N, P) per-pixel scale or null
  float* loss;          // (N, P)
  void* grad;           // (N, 313, P) of `dtype`, or null (no gradient)
  int64_t N, P;
  int k;
  float neg_inv_2s2;
  float grad_scale;
};

struct AnnealArgs {
  const void* x;  // (N, 313, P) of `dtype`
  int dtype;
  float* out;     // (N, 2, P)
  int64_t N, P;
  float inv_T;
  bool is_probs;
};

namespace cpu {
// nthreads <= 0: OpenMP's default. Release the GIL before calling.
void soft_encode(const EncodeArgs& a, int nthreads);
void ce_forward(const CeArgs& a, int nthreads);
void annealed_mean(const AnnealArgs& a, int nthreads);
// The instruction set of the CPU loops: "avx512", "avx2" or "default" (portable baseline).
const char* isa();
// Force an instruction set (tests); returns false if this CPU cannot run it.
bool set_isa(const char* name);
}  // namespace cpu

namespace cuda {
// Asynchronous on `stream` of `device`; return nullptr or a CUDA error message.
// ce_forward takes precomputed targets only (a.ab == nullptr): run soft_encode first.
const char* soft_encode(int device, void* stream, const EncodeArgs& a);
const char* ce_forward(int device, void* stream, const CeArgs& a);
const char* annealed_mean(int device, void* stream, const AnnealArgs& a);
// Launch-bounds variant of the loss and annealed-mean kernels: minimum blocks per SM
// 4 (the default) or 0 (no minimum). Benchmarking knob; false if invalid.
bool set_min_blocks(int min_blocks);
// The __global__ kernels compiled into this module (null-terminated list).
const char* const* kernel_names();
}  // namespace cuda

}  // namespace fc
