// CUDA kernels of fastcolor (backend "cuda"): soft-encoding, the fused class-rebalanced
// cross-entropy (loss + gradient in one kernel) and the annealed mean.
// The per-pixel maths is kernels/fc_math.cuh, shared with the CPU loops (csrc/fc_cpu.cpp).
//
// Memory design (the loss and the annealed mean are bandwidth-bound: 313 values per pixel,
// a few dozen flops each):
//
// * A block is 32 consecutive pixels x 8 class groups = 256 threads. Thread (lane, g) owns
//   classes q = g, g + 8, ..., (40 of them) of pixel `lane`, and holds their values in
//   registers. For a fixed class, a warp's 32 lanes read 32 consecutive pixels: 128 B
//   (float32) or 64 B (16-bit) per request, fully coalesced, every sector used.
// * All 40 loads of a thread are independent and issued up front: a block has 40 KB (f32)
//   in flight, a few blocks per SM hide HBM latency (~20-30 KB per SM are needed to reach
//   the ~3.3-4.8 TB/s of an H100/H200).
// * Max and sum over the 313 classes: registers, then one 8-way exchange through shared
//   memory. Because the values stay in registers, the logits are read from HBM ONCE and the
//   gradient is written ONCE (streaming stores): 8 B per class and pixel for float32,
//   4 B for 16-bit -- the minimum. (A thread-per-pixel online softmax would have to read the
//   logits twice: its 313 x 4 B per pixel cannot be cached in registers, and the working set
//   of all resident threads, ~300 MB, is far beyond the 50 MB L2.)
// * The k targets of a pixel (precomputed, or soft-encoded from ab by soft_encode_kernel
//   just before: one thread per pixel, the candidate-table search of fc_math.cuh) are read by warp 0
//   while the loads fly, and shared through shared memory. The
//   gradient is first written as c * softmax for all classes; after a barrier warp 0
//   rewrites the k target entries as c * (softmax - Z) (same block, so the barrier orders
//   the two stores). The loss needs x at the k targets: re-read from global memory (L1/L2
//   hits: the block has just read them).
// Measured on an H200 (first version, 40 x 313 x 64 x 64 float32): loss + gradient 0.19 ms
// = 2.1 TB/s (a plain copy of the logits: 3.7 TB/s), annealed mean 0.10 ms = 2.1 TB/s
// reading; at 64 x 313 x 128 x 128: 2.5 and 2.6 TB/s (copy 4.1). G = 16 (more threads,
// fewer registers each) is there to try for higher occupancy, 16-bit logits in particular.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "fc_api.cuh"
#include "fc_math.cuh"

namespace fc {
namespace cuda {
namespace {

constexpr int kLanes = 32;  // pixels per block
constexpr int kGroups = 8;                         // class groups per pixel
constexpr int kCPT = (Q + kGroups - 1) / kGroups;  // 40 classes per thread
constexpr int kThreads = kLanes * kGroups;         // 256
// MINB: minimum resident blocks per SM asked of ptxas. 4 (the default) caps registers at 64
// (no spills, 32 warps per SM); 0 leaves ptxas free (~78 registers, 3 blocks per SM).
// On an H200, 4 was 2-20% faster (loss: 0.166 vs 0.175 ms f32, 0.126 vs 0.147 ms bf16 at
// 40 x 313 x 64 x 64). A 16-group variant (512 threads of 20 values) was slower than both.
constexpr int kEncodeThreads = 128;

template <int DT>
struct Dev;
template <>
struct Dev<kF32> {
  using T = float;
  static __device__ __forceinline__ float load(const T* p) { return __ldg(p); }
  static __device__ __forceinline__ T cvt(float f) { return f; }
};
template <>
struct Dev<kF16> {
  using T = __half;
  static __device__ __forceinline__ float load(const T* p) { return __half2float(__ldg(p)); }
  static __device__ __forceinline__ T cvt(float f) { return __float2half_rn(f); }
};
template <>
struct Dev<kBF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float load(const T* p) { return __bfloat162float(__ldg(p)); }
  static __device__ __forceinline__ T cvt(float f) { return __float2bfloat16_rn(f); }
};

// ---------------------------------------------------------------------------- soft-encode
// One thread per pixel: soft_encode_pixel (fc_math.cuh), the three rules of gamut.py. The
// candidate lists are read through the read-only cache (k = 5: 70 KB of int16, L1/L2-resident);
// the bin centres, gathered by bin index, are staged in shared memory (2.5 KB) per block.
template <int CAP>  // top-k capacity >= k: fewer registers for small k
__global__ void __launch_bounds__(kEncodeThreads) soft_encode_kernel(EncodeParams A) {
  __shared__ float s_centres[2 * Q];
  for (int i = threadIdx.x; i < 2 * Q; i += kEncodeThreads) s_centres[i] = __ldg(A.enc.table.centres + i);
  __syncthreads();
  const int64_t pix = (int64_t)blockIdx.x * kEncodeThreads + threadIdx.x;
  if (pix >= A.N * A.P) return;
  const int64_t n = pix / A.P, p = pix - n * A.P;
  const float* ab = A.ab + n * 2 * A.P + p;
  const int64_t o = n * A.enc.k * A.P + p;
  soft_encode_pixel<CAP>(__ldg(ab), __ldg(ab + A.P), A.enc, s_centres, A.idx + o, A.w + o, A.P);
}

// ---------------------------------------------------------------------------- fused loss
// Warp 0: the pixel's k targets into shared memory; returns c = s m v (NaN for bad indices).
// Targets are always precomputed: ce_forward() runs soft_encode_kernel first when given ab
// (k * 8 bytes per pixel written and read back, ~3% of the loss kernel's traffic). Encoding
// inside this kernel was measured slower on an H200 (0.61 vs 0.35 ms at 40 x 313 x 64 x 64):
// one warp of eight encodes while the others wait, and the top-k list in registers on top
// of the 40 logits drops occupancy to one or two blocks per SM.
__device__ __forceinline__ float ce_targets(const LossParams& A, int64_t n, int64_t p, int lane, int (*s_q)[kLanes],
                                            float (*s_w)[kLanes]) {
  const int64_t P = A.P;
  bool ok = true;
  const int32_t* ip = A.idx + n * A.k * P + p;
  const float* wp = A.w + n * A.k * P + p;
  for (int j = 0; j < A.k; ++j) {
    const int32_t q = __ldg(ip + j * P);
    const bool in = q >= 0 && q < Q;  // out-of-range indices: NaN loss, no crash
    ok = ok && in;
    s_q[j][lane] = in ? q : 0;
    s_w[j][lane] = __ldg(wp + j * P);
  }
  const int nearest = s_q[0][lane];
  const float cv = A.cw ? __ldg(A.cw + nearest) : 1.0f;
  const float m = A.mask ? __ldg(A.mask + n) : 1.0f;
  const float sc = A.pscale ? __ldg(A.pscale + n * P + p) : 1.0f;
  return ok ? sc * (m * cv) : __int_as_float(0x7fc00000);
}

template <int DT, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) ce_forward_kernel(LossParams A) {
  using D = Dev<DT>;
  using T = typename D::T;
  __shared__ int s_q[K_MAX][kLanes];
  __shared__ float s_w[K_MAX][kLanes];
  __shared__ float s_red[kGroups][kLanes];
  __shared__ float s_c[kLanes];

  const int lane = threadIdx.x, g = threadIdx.y;
  const int64_t P = A.P;
  const int64_t pix = (int64_t)blockIdx.x * kLanes + lane;
  const bool valid = pix < A.N * P;
  const int64_t n = valid ? pix / P : 0;
  const int64_t p = valid ? pix - n * P : 0;
  const T* x = static_cast<const T*>(A.logits) + n * Q * P + p;

  // 1. Issue every load of this thread (40 independent requests).
  float v[kCPT];
#pragma unroll
  for (int s = 0; s < kCPT; ++s) {
    const int q = g + kGroups * s;
    v[s] = (valid && (s < kCPT - 1 || q < Q)) ? D::load(x + q * P) : -kInf;
  }

  // 2. Warp 0: the pixel's k targets and its factor c = s m v, while the loads fly.
  if (g == 0) s_c[lane] = valid ? ce_targets(A, n, p, lane, s_q, s_w) : 0.0f;

  // 3. Max over the 313 classes.
  float mloc = -kInf;
#pragma unroll
  for (int s = 0; s < kCPT; ++s) mloc = fmaxf(mloc, v[s]);
  s_red[g][lane] = mloc;
  __syncthreads();
  float M = s_red[0][lane];
#pragma unroll
  for (int j = 1; j < kGroups; ++j) M = fmaxf(M, s_red[j][lane]);
  __syncthreads();

  // 4. exp (kept in registers) and sum.
  float sloc = 0.0f;
#pragma unroll
  for (int s = 0; s < kCPT; ++s) {
    v[s] = exp_(v[s] - M);
    sloc += v[s];
  }
  s_red[g][lane] = sloc;
  __syncthreads();
  float S = 0.0f;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) S += s_red[j][lane];
  const float c = s_c[lane];
  const float inv = 1.0f / S;
  const float sc = A.grad_scale * c * inv;
  T* gp = static_cast<T*>(A.grad) + n * Q * P + p;

  // 5. Gradient c * softmax for every class (streaming stores: written once, never re-read).
  if (A.grad) {
    if (valid) {
#pragma unroll
      for (int s = 0; s < kCPT; ++s) {
        const int q = g + kGroups * s;
        if (s < kCPT - 1 || q < Q) __stcs(gp + q * P, D::cvt(sc * v[s]));
      }
    }
    __syncthreads();  // the fix-ups below overwrite some of these stores
  }

  // 6. Warp 0: loss, and the gradient at the k targets: c * (softmax - sum of their weights).
  if (g == 0 && valid) {
    const float ls = logf(S);  // the loss from the shifted logits (csrc/fc_cpu.cpp, "loss")
    float acc = 0.0f;
    for (int j = 0; j < A.k; ++j) {
      const int q = s_q[j][lane];
      const float xj = D::load(x + q * P);
      acc += s_w[j][lane] * (ls - (xj - M));
      if (A.grad) {
        float wsum = 0.0f;
        for (int i = 0; i < A.k; ++i) wsum += s_q[i][lane] == q ? s_w[i][lane] : 0.0f;
        gp[q * P] = D::cvt(sc * (exp_(xj - M) - wsum * S));
      }
    }
    A.loss[pix] = c * acc;
  }
}

// ---------------------------------------------------------------------------- annealed mean
template <int DT, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) annealed_mean_kernel(AnnealParams A) {
  using D = Dev<DT>;
  using T = typename D::T;
  __shared__ float s_red[3][kGroups][kLanes];

  const int lane = threadIdx.x, g = threadIdx.y;
  const int64_t P = A.P;
  const int64_t pix = (int64_t)blockIdx.x * kLanes + lane;
  const bool valid = pix < A.N * P;
  const int64_t n = valid ? pix / P : 0;
  const int64_t p = valid ? pix - n * P : 0;
  const T* x = static_cast<const T*>(A.x) + n * Q * P + p;

  float v[kCPT];
#pragma unroll
  for (int s = 0; s < kCPT; ++s) {
    const int q = g + kGroups * s;
    v[s] = (valid && (s < kCPT - 1 || q < Q)) ? D::load(x + q * P) : -kInf;
  }
  float mloc = -kInf;
#pragma unroll
  for (int s = 0; s < kCPT; ++s) {
    if (A.is_probs) v[s] = v[s] == -kInf ? -kInf : logf(v[s]);  // padding stays -inf
    v[s] *= A.inv_T;
    mloc = fmaxf(mloc, v[s]);
  }
  s_red[0][g][lane] = mloc;
  __syncthreads();
  float M = s_red[0][0][lane];
#pragma unroll
  for (int j = 1; j < kGroups; ++j) M = fmaxf(M, s_red[0][j][lane]);
  __syncthreads();

  float s0 = 0.0f, sa = 0.0f, sb = 0.0f;
#pragma unroll
  for (int s = 0; s < kCPT; ++s) {
    const int q = g + kGroups * s;
    if (s < kCPT - 1 || q < Q) {
      const float e = exp_(v[s] - M);
      s0 += e;
      sa += e * __ldg(A.centres + 2 * q);  // q is warp-uniform: one broadcast load
      sb += e * __ldg(A.centres + 2 * q + 1);
    }
  }
  s_red[0][g][lane] = s0;
  s_red[1][g][lane] = sa;
  s_red[2][g][lane] = sb;
  __syncthreads();
  if (g == 0 && valid) {
    float t0 = 0.0f, ta = 0.0f, tb = 0.0f;
#pragma unroll
    for (int j = 0; j < kGroups; ++j) {
      t0 += s_red[0][j][lane];
      ta += s_red[1][j][lane];
      tb += s_red[2][j][lane];
    }
    float* out = A.out + n * 2 * P + p;
    out[0] = ta / t0;
    out[P] = tb / t0;
  }
}

// ---------------------------------------------------------------------------- launching
// Launch on `device` (restoring the caller's current device) and `stream`.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (device >= 0 && device != prev_) err_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev_ >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }

 private:
  int prev_ = -1;
  cudaError_t err_ = cudaSuccess;
};

const char* status(cudaError_t err) {
  if (err == cudaSuccess) err = cudaGetLastError();
  else (void)cudaGetLastError();  // clear the sticky-free error state
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

bool grid_for(int64_t items, int per_block, unsigned& blocks) {
  const int64_t b = (items + per_block - 1) / per_block;
  if (b > INT_MAX) return false;
  blocks = (unsigned)b;
  return true;
}

const char* kTooLarge = "input too large for one launch (more than 2^31 - 1 blocks)";

// ---------------------------------------------------------------------------- scale (backward)
// grad *= f, f read on the device: a plain loss.backward() passes 1 and then nothing moves (each
// block reads the 4-byte factor and returns). kScaleItems elements per thread, strided by the
// block, so that every load and store of a warp is one coalesced 128-byte line (float32).
constexpr int kScaleThreads = 256;
constexpr int kScaleItems = 4;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int DT>
__global__ void scale_kernel(ScaleParams a) {
  const float f = *a.factor;
  if (f == 1.0f) return;
  using T = typename Dev<DT>::T;
  T* g = static_cast<T*>(a.grad);
  const int64_t base = (int64_t)blockIdx.x * kScaleThreads * kScaleItems + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kScaleItems; ++j) {
    const int64_t i = base + (int64_t)j * kScaleThreads;
    if (i < a.n) g[i] = Dev<DT>::cvt(to_f32(g[i]) * f);  // (no __ldg: this kernel writes g)
  }
}

int g_min_blocks = 4;  // launch-bounds variant (set_min_blocks)

template <int DT>
void launch_ce(unsigned blocks, cudaStream_t s, const LossParams& a) {
  const dim3 block(kLanes, kGroups);
  if (g_min_blocks == 4)
    ce_forward_kernel<DT, 4><<<blocks, block, 0, s>>>(a);
  else
    ce_forward_kernel<DT, 0><<<blocks, block, 0, s>>>(a);
}

template <int DT>
void launch_am(unsigned blocks, cudaStream_t s, const AnnealParams& a) {
  const dim3 block(kLanes, kGroups);
  if (g_min_blocks == 4)
    annealed_mean_kernel<DT, 4><<<blocks, block, 0, s>>>(a);
  else
    annealed_mean_kernel<DT, 0><<<blocks, block, 0, s>>>(a);
}

}  // namespace

const char* soft_encode(int device, void* stream, const EncodeParams& a) {
  unsigned blocks;
  if (a.N * a.P == 0) return nullptr;
  if (!grid_for(a.N * a.P, kEncodeThreads, blocks)) return kTooLarge;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return status(guard.error());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.enc.k <= 8)
    soft_encode_kernel<8><<<blocks, kEncodeThreads, 0, s>>>(a);
  else if (a.enc.k <= 10)  // k = 10: the authors' released code
    soft_encode_kernel<10><<<blocks, kEncodeThreads, 0, s>>>(a);
  else
    soft_encode_kernel<K_MAX><<<blocks, kEncodeThreads, 0, s>>>(a);
  return status(cudaSuccess);
}

const char* ce_forward(int device, void* stream, const LossParams& a) {
  unsigned blocks;
  if (a.ab) return "ce_forward: soft-encode ab first (soft_encode), then pass indices and weights";
  if (a.N * a.P == 0) return nullptr;
  if (!grid_for(a.N * a.P, kLanes, blocks)) return kTooLarge;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return status(guard.error());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: launch_ce<kF32>(blocks, s, a); break;
    case kF16: launch_ce<kF16>(blocks, s, a); break;
    default: launch_ce<kBF16>(blocks, s, a); break;
  }
  return status(cudaSuccess);
}

const char* annealed_mean(int device, void* stream, const AnnealParams& a) {
  unsigned blocks;
  if (a.N * a.P == 0) return nullptr;
  if (!grid_for(a.N * a.P, kLanes, blocks)) return kTooLarge;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return status(guard.error());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: launch_am<kF32>(blocks, s, a); break;
    case kF16: launch_am<kF16>(blocks, s, a); break;
    default: launch_am<kBF16>(blocks, s, a); break;
  }
  return status(cudaSuccess);
}

const char* scale(int device, void* stream, const ScaleParams& a) {
  unsigned blocks;
  if (a.n == 0) return nullptr;
  if (!grid_for((a.n + kScaleItems - 1) / kScaleItems, kScaleThreads, blocks)) return kTooLarge;
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return status(guard.error());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: scale_kernel<kF32><<<blocks, kScaleThreads, 0, s>>>(a); break;
    case kF16: scale_kernel<kF16><<<blocks, kScaleThreads, 0, s>>>(a); break;
    default: scale_kernel<kBF16><<<blocks, kScaleThreads, 0, s>>>(a); break;
  }
  return status(cudaSuccess);
}

bool set_min_blocks(int min_blocks) {
  if (min_blocks != 0 && min_blocks != 4) return false;
  g_min_blocks = min_blocks;
  return true;
}

const char* const* kernel_names() {
  static const char* const names[] = {"soft_encode_kernel<top-k capacity 8|10|16>",
                                      "ce_forward_kernel<f32|f16|bf16, min blocks 4|0>",
                                      "annealed_mean_kernel<f32|f16|bf16, min blocks 4|0>",
                                      "scale_kernel<f32|f16|bf16>", nullptr};
  return names;
}

}  // namespace cuda
}  // namespace fc
