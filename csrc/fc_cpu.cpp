// CPU loops of the fastcolor kernels (backend "cpp"): OpenMP over tiles of TP pixels of
// one image, vectorised inner loops over the tile's contiguous pixels.
//
// Layout (N, 313, P): a tile is 313 rows of TP contiguous values, P apart. Each tile is
// converted to float32 into a per-thread buffer of 313 x TP floats (160 KB for TP = 128,
// resident in L2), so the logits are read from memory once and the gradient written once:
//   pass 1  read + convert, running max per pixel
//   pass 2  e = exp(x - max) in place, sum per pixel (the buffer is hot in L2)
//   loss    s m v sum_j w_j (log(sum) - (x_j - max)) (x_j gathered before pass 2), from the
//           shifted logits: never x_j - (max + log sum), which rounds log(sum) away once |max| is
//           ~1e7 and loses it at 1e30; x_j - max only overflows to -inf (then the loss is +inf)
//   grad    e[target] -= w * sum, then grad = (grad_scale s m v / sum) * e, converted and stored
// The per-pixel maths (exp, log, half conversions) is kernels/fc_math.cuh, shared with the CUDA
// kernels; the soft-encoding of a tile (soft_encode, and the loss's targets from ab) is
// csrc/fc_encode.cpp.
//
// Instruction sets: the build is portable (no -march), so each tile function is compiled
// three times, for the baseline, AVX2+FMA+F16C and AVX-512 (GCC target attributes, csrc/fc_cpu.h), and
// the best one this CPU runs is picked at the first call (FASTCOLOR_CPU_ISA=default|avx2|
// avx512 overrides it; _C.cpu_set_isa() too, for the tests).

// Let GCC if-convert the selects of exp_/log_ into blends on SSE2/AVX2 too (without it only
// the AVX-512 variant vectorises them). Trapping floating-point exceptions are never enabled
// here, and NaN/inf results are unaffected.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#include <unistd.h>
#endif

#include "fc_cpu.h"
#include "fc_math.cuh"

namespace fc {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------- element access
template <int DT>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static FC_INLINE float load(T v) { return v; }
  static FC_INLINE T store(float f) { return f; }
};
template <>
struct Elem<kF16> {
  using T = uint16_t;
  static FC_INLINE float load(T v) { return half_bits_to_float(v); }
  static FC_INLINE T store(float f) { return float_to_half_bits(f); }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  static FC_INLINE float load(T v) { return bf16_bits_to_float(v); }
  static FC_INLINE T store(float f) { return float_to_bf16_bits(f); }
};

struct Tile {
  int64_t n, p0;
  int np;
};

FC_INLINE Tile tile_of(int64_t t, int64_t P) {
  const int64_t per_img = (P + TP - 1) / TP;
  Tile r;
  r.n = t / per_img;
  r.p0 = (t % per_img) * TP;
  r.np = (int)std::min<int64_t>(TP, P - r.p0);
  return r;
}

// ---------------------------------------------------------------------------- soft-encode
template <int V>
FC_INLINE void encode_tile_body(const EncodeParams& A, int64_t t, float*) {
  const Tile T = tile_of(t, A.P);
  alignas(64) int32_t tq[K_MAX][TP];
  alignas(64) float tw[K_MAX][TP];
  const float* a = A.ab + T.n * 2 * A.P + T.p0;
  encode_tile(V, a, a + A.P, T.np, A.enc, tq, tw);
  const int k = A.enc.k;
  int32_t* idx = A.idx + T.n * k * A.P + T.p0;
  float* w = A.w + T.n * k * A.P + T.p0;
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < T.np; ++i) {
      idx[j * A.P + i] = tq[j][i];
      w[j * A.P + i] = tw[j][i];
    }
}

// ---------------------------------------------------------------------------- fused loss
template <int DT, int V>
FC_INLINE void ce_tile_body(const LossParams& A, int64_t t, float* buf) {
  using E = Elem<DT>;
  using T = typename E::T;
  const Tile tl = tile_of(t, A.P);
  const int np = tl.np, k = A.k;
  const int64_t P = A.P;

  alignas(64) float mx[TP];
  alignas(64) float sum[TP];
  alignas(64) float cl[TP];
  alignas(64) float acc[TP];
  alignas(64) int32_t tq[K_MAX][TP];
  alignas(64) float tw[K_MAX][TP];
  alignas(64) float xt[K_MAX][TP];

  // Targets: the k (bin, weight) pairs and the pixel factor s * m * v.
  const float m = A.mask ? A.mask[tl.n] : 1.0f;
  const float nan = u2f(0x7fc00000u);
  if (A.ab) {
    const float* ab = A.ab + tl.n * 2 * P + tl.p0;
    encode_tile(V, ab, ab + P, np, A.enc, tq, tw);
  }
  for (int i = 0; i < np; ++i) {
    const int64_t p = tl.p0 + i;
    int nearest;
    bool ok = true;
    if (A.ab) {
      nearest = tq[0][i];
    } else {
      const int32_t* ip = A.idx + tl.n * k * P + p;
      const float* wp = A.w + tl.n * k * P + p;
      for (int j = 0; j < k; ++j) {
        const int32_t q = ip[j * P];
        const bool in = q >= 0 && q < Q;  // out-of-range indices: NaN loss, no crash
        ok = ok && in;
        tq[j][i] = in ? q : 0;
        tw[j][i] = wp[j * P];
      }
      nearest = tq[0][i];
    }
    const float v = A.cw ? A.cw[nearest] : 1.0f;
    const float s = A.pscale ? A.pscale[tl.n * P + p] : 1.0f;
    cl[i] = ok ? s * (m * v) : nan;
  }

  // Pass 1: read and convert the tile, running max.
  const T* x = static_cast<const T*>(A.logits) + tl.n * Q * P + tl.p0;
  for (int i = 0; i < TP; ++i) mx[i] = -kInf;
  for (int q = 0; q < Q; ++q) {
    const T* row = x + q * P;
    float* br = buf + q * TP;
    for (int i = 0; i < np; ++i) {
      const float v = E::load(row[i]);
      br[i] = v;
      mx[i] = v > mx[i] ? v : mx[i];
    }
  }
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < np; ++i) xt[j][i] = buf[tq[j][i] * TP + i];

  // Pass 2: exp and sum (in place when the gradient is wanted).
  for (int i = 0; i < TP; ++i) sum[i] = 0.0f;
  if (A.grad) {
    for (int q = 0; q < Q; ++q) {
      float* br = buf + q * TP;
      for (int i = 0; i < TP; ++i) {
        const float e = exp_(br[i] - mx[i]);
        br[i] = e;
        sum[i] += e;
      }
    }
  } else {
    for (int q = 0; q < Q; ++q) {
      const float* br = buf + q * TP;
      for (int i = 0; i < TP; ++i) sum[i] += exp_(br[i] - mx[i]);
    }
  }

  // Loss: s m v sum_j w_j (log(sum) - (x_j - max)), from the shifted logits.
  alignas(64) float lsum[TP];
  for (int i = 0; i < TP; ++i) {
    lsum[i] = log_(sum[i]);
    acc[i] = 0.0f;
  }
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < np; ++i) acc[i] += tw[j][i] * (lsum[i] - (xt[j][i] - mx[i]));
  float* loss = A.loss + tl.n * P + tl.p0;
  for (int i = 0; i < np; ++i) loss[i] = cl[i] * acc[i];

  if (!A.grad) return;
  // Gradient: grad_scale s m v (e / sum - Z); Z subtracted in the e domain (duplicates add up).
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < np; ++i) buf[tq[j][i] * TP + i] -= tw[j][i] * sum[i];
  for (int i = 0; i < TP; ++i) acc[i] = (A.grad_scale * cl[i]) / sum[i];
  T* g = static_cast<T*>(A.grad) + tl.n * Q * P + tl.p0;
  for (int q = 0; q < Q; ++q) {
    const float* br = buf + q * TP;
    T* row = g + q * P;
    for (int i = 0; i < np; ++i) row[i] = E::store(acc[i] * br[i]);
  }
}

// ---------------------------------------------------------------------------- annealed mean
template <int DT>
FC_INLINE void anneal_tile_body(const AnnealParams& A, int64_t t, float* buf) {
  using E = Elem<DT>;
  using T = typename E::T;
  const Tile tl = tile_of(t, A.P);
  const int np = tl.np;
  const int64_t P = A.P;
  const float invT = A.inv_T;
  alignas(64) float mx[TP];
  alignas(64) float s[TP];
  alignas(64) float sa[TP];
  alignas(64) float sb[TP];

  const T* x = static_cast<const T*>(A.x) + tl.n * Q * P + tl.p0;
  for (int i = 0; i < TP; ++i) mx[i] = -kInf;
  if (A.is_probs) {
    for (int q = 0; q < Q; ++q) {
      const T* row = x + q * P;
      float* br = buf + q * TP;
      for (int i = 0; i < np; ++i) {
        const float y = log_(E::load(row[i])) * invT;
        br[i] = y;
        mx[i] = y > mx[i] ? y : mx[i];
      }
    }
  } else {
    for (int q = 0; q < Q; ++q) {
      const T* row = x + q * P;
      float* br = buf + q * TP;
      for (int i = 0; i < np; ++i) {
        const float y = E::load(row[i]) * invT;
        br[i] = y;
        mx[i] = y > mx[i] ? y : mx[i];
      }
    }
  }
  for (int i = 0; i < TP; ++i) s[i] = sa[i] = sb[i] = 0.0f;
  for (int q = 0; q < Q; ++q) {
    const float ca = A.centres[2 * q], cb = A.centres[2 * q + 1];
    const float* br = buf + q * TP;
    for (int i = 0; i < TP; ++i) {
      const float e = exp_(br[i] - mx[i]);
      s[i] += e;
      sa[i] += e * ca;
      sb[i] += e * cb;
    }
  }
  float* out = A.out + tl.n * 2 * P + tl.p0;
  for (int i = 0; i < np; ++i) {
    out[i] = sa[i] / s[i];
    out[P + i] = sb[i] / s[i];
  }
}

// ---------------------------------------------------------------------------- ISA variants
// The bodies are always_inline, so each wrapper below compiles them with its own ISA.
#define FC_WRAP(NAME, ATTR, V)                                                                      \
  ATTR void encode_##NAME(const EncodeParams& a, int64_t t, float* b) { encode_tile_body<V>(a, t, b); } \
  template <int DT>                                                                                 \
  ATTR void ce_##NAME(const LossParams& a, int64_t t, float* b) {                                   \
    ce_tile_body<DT, V>(a, t, b);                                                                   \
  }                                                                                                 \
  template <int DT>                                                                                 \
  ATTR void anneal_##NAME(const AnnealParams& a, int64_t t, float* b) {                             \
    anneal_tile_body<DT>(a, t, b);                                                                  \
  }                                                                                                 \
  ATTR void exp_##NAME(const float* in, float* out, int64_t n) {                                    \
    for (int64_t i = 0; i < n; ++i) out[i] = exp_(in[i]);                                           \
  }                                                                                                 \
  ATTR void log_##NAME(const float* in, float* out, int64_t n) {                                    \
    for (int64_t i = 0; i < n; ++i) out[i] = log_(in[i]);                                           \
  }

FC_WRAP(default, , 0)
#if FC_X86
FC_WRAP(avx2, FC_TARGET_AVX2, 1)
FC_WRAP(avx512, FC_TARGET_AVX512, 2)
#endif

template <typename Args>
using TileFn = void (*)(const Args&, int64_t, float*);

using ArrayFn = void (*)(const float*, float*, int64_t);

struct Kernels {
  const char* name;
  TileFn<EncodeParams> encode;
  TileFn<LossParams> ce[3];
  TileFn<AnnealParams> anneal[3];
  ArrayFn exp, log;
};

#define FC_KERNELS(NAME)                                                        \
  Kernels {                                                                     \
    #NAME, encode_##NAME, {ce_##NAME<kF32>, ce_##NAME<kF16>, ce_##NAME<kBF16>}, \
        {anneal_##NAME<kF32>, anneal_##NAME<kF16>, anneal_##NAME<kBF16>},       \
        exp_##NAME, log_##NAME                                                  \
  }

const Kernels kVariants[] = {
    FC_KERNELS(default),
#if FC_X86
    FC_KERNELS(avx2),
    FC_KERNELS(avx512),
#endif
};
static_assert(sizeof(kVariants) / sizeof(kVariants[0]) == kNumVariants, "one Kernels per ISA variant");

bool cpu_runs(int v) {
#if FC_X86
  __builtin_cpu_init();
  if (v == 1)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  if (v == 2)
    return cpu_runs(1) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return v == 0;
}

int variant_by_name(const char* name) {
  for (int v = 0; v < kNumVariants; ++v)
    if (std::strcmp(kVariants[v].name, name) == 0) return v;
  return -1;
}

std::atomic<int> g_variant{-1};

const Kernels& kernels() {
  int v = g_variant.load(std::memory_order_relaxed);
  if (v < 0) {
    v = 0;
    for (int c = kNumVariants - 1; c > 0; --c)
      if (cpu_runs(c)) {
        v = c;
        break;
      }
    const char* env = std::getenv("FASTCOLOR_CPU_ISA");
    if (env && *env) {
      const int e = variant_by_name(env);
      if (e >= 0 && e < v) v = e;  // only ever downgrade
    }
    g_variant.store(v, std::memory_order_relaxed);
  }
  return kVariants[v];
}

#ifdef _OPENMP
// GNU OpenMP is not fork-safe: a child forked after the parent ran a parallel region (e.g. a
// DataLoader worker soft-encoding its targets) hangs in its next one. The process that
// started the thread pool is remembered; any other process runs the loops serially.
std::atomic<long> g_pool_pid{0};

bool parallel_allowed() {
  const long pid = (long)getpid();
  long owner = g_pool_pid.load(std::memory_order_relaxed);
  if (owner == 0 && g_pool_pid.compare_exchange_strong(owner, pid)) return true;
  return owner == 0 || owner == pid;
}
#endif

float* aligned64(std::vector<float>& v) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// Run fn(args, tile, buffer) over all tiles, in parallel when it pays.
template <typename Args>
void run_tiles(TileFn<Args> fn, const Args& a, int64_t tiles, int64_t work, bool need_buf, int nthreads) {
  if (tiles <= 0) return;
  const size_t buf_floats = need_buf ? (size_t)Q * TP : 0;
#ifdef _OPENMP
  if (nthreads <= 0) nthreads = omp_get_max_threads();
  // ~1/4 ms of work per thread at least; tiny inputs stay on the calling thread.
  const int64_t max_useful = std::max<int64_t>(1, std::min<int64_t>(tiles, work / (1 << 17)));
  nthreads = (int)std::min<int64_t>(nthreads, max_useful);
  if (nthreads > 1 && parallel_allowed()) {
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<float> buf(buf_floats + 16);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tiles; ++t) fn(a, t, aligned64(buf));
    }
    return;
  }
#endif
  (void)nthreads;
  std::vector<float> buf(buf_floats + 16);
  for (int64_t t = 0; t < tiles; ++t) fn(a, t, aligned64(buf));
}

int64_t num_tiles(int64_t N, int64_t P) { return P > 0 ? N * ((P + TP - 1) / TP) : 0; }

}  // namespace

void soft_encode(const EncodeParams& p, int nthreads) {
  run_tiles<EncodeParams>(kernels().encode, p, num_tiles(p.N, p.P), p.N * p.P * 64, false, nthreads);
}

void ce_forward(const LossParams& p, int nthreads) {
  run_tiles<LossParams>(kernels().ce[p.dtype], p, num_tiles(p.N, p.P), p.N * p.P * Q, true, nthreads);
}

void annealed_mean(const AnnealParams& p, int nthreads) {
  run_tiles<AnnealParams>(kernels().anneal[p.dtype], p, num_tiles(p.N, p.P), p.N * p.P * Q, true, nthreads);
}

void exp_array(const float* in, float* out, int64_t n) { kernels().exp(in, out, n); }

void log_array(const float* in, float* out, int64_t n) { kernels().log(in, out, n); }

const char* isa() { return kernels().name; }

bool set_isa(const char* name) {
  const int v = variant_by_name(name);
  if (v < 0 || !cpu_runs(v)) return false;
  g_variant.store(v, std::memory_order_relaxed);
  return true;
}

}  // namespace cpu
}  // namespace fc
