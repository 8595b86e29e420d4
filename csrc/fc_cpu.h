// Internal to the CPU loops (csrc/fc_cpu.cpp, csrc/fc_encode.cpp): tiles, instruction-set
// variants, and the tile encoder that both soft_encode and the fused loss call.
#pragma once

#include <stdint.h>

#include "fc_api.cuh"

namespace fc {
namespace cpu {

constexpr int TP = 128;  // pixels per tile: 313 x 128 x 4 B = 160 KB of buffer per thread (L2)

// Instruction-set variants: each tile function is compiled for the portable baseline, for
// AVX2+FMA+F16C and for AVX-512 (GCC target attributes); index 0, 1, 2.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FC_X86 1
#define FC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))
#define FC_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt,prefer-vector-width=512")))
constexpr int kNumVariants = 3;
#else
#define FC_X86 0
constexpr int kNumVariants = 1;
#endif

// Soft-encode np <= TP pixels (a[i], b[i]) with instruction-set variant `variant`:
// tq[j][i], tw[j][i] for j < enc.k (csrc/fc_encode.cpp).
void encode_tile(int variant, const float* a, const float* b, int np, const EncodeSpec& enc, int32_t (*tq)[TP],
                 float (*tw)[TP]);

}  // namespace cpu
}  // namespace fc
