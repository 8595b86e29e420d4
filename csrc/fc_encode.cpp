// The CPU soft-encoding of a tile of pixels (backend "cpp"): the search of kernels/fc_math.cuh
// (fastcolor/gamut.py's three rules), vectorised (encode_tile_body below). Called by
// soft_encode and by the fused loss's on-the-fly encoding (csrc/fc_cpu.cpp), so both give the
// same bins.
//
// This translation unit is compiled with -ffp-contract=off (CMakeLists.txt): GCC would
// otherwise fuse da * da + db * db into an FMA in the AVX2/AVX-512 variants, and the bins of a
// near-tie would depend on the instruction set (and differ from the GPU's, which uses the _rn
// intrinsics, and from numba's). Nothing else lives here, so the loss loops keep their FMAs.
#if !defined(FC_FP_CONTRACT_OFF)
#error "csrc/fc_encode.cpp must be compiled with -ffp-contract=off -DFC_FP_CONTRACT_OFF (see CMakeLists.txt)"
#endif

// As in csrc/fc_cpu.cpp: lets GCC if-convert the selects into blends (no trapping FP here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <string.h>

#include "fc_cpu.h"
#include "fc_math.cuh"

namespace fc {
namespace cpu {
namespace {

// bins[e] of the int16 candidate list, read as the aligned 32-bit word that holds it and shifted:
// GCC has no 16-bit gather, so a direct int16 load would keep the distance loop scalar, while
// this vectorises into a 32-bit gather. The word never leaves the tensor's allocation (the
// bindings check that it is 4-byte aligned). Little-endian: entry 2m is the word's low half.
typedef int32_t __attribute__((may_alias)) Word;
FC_INLINE int bin_at(const Word* words, int e) { return (int16_t)(words[e >> 1] >> ((e & 1) << 4)); }

// GCC vector extensions: 8 lanes (AVX2: one register; the AVX-512 build runs them as well).
typedef float V8F __attribute__((vector_size(32)));
typedef int32_t V8I __attribute__((vector_size(32)));

// Rule 1 for one pixel with a list of L <= 8 * NV candidates starting at bins[off], ranked
// instead of inserted: the L float32 distances (dist2_f32, padded with inf) fill NV vectors;
// the rank of entry e is the number of entries nearer than it, plus those as near and earlier
// in the list (the list ascends in bin index: the strict-"<" insertion's order, ties to the
// lower index); entries of rank < k are the k nearest, in order. Branch-free, no sorted list
// to shift; the candidates' bins land in tq[r][i].
template <int NV>
FC_INLINE void rank_pixel(float a, float b, int off, int L, const Word* bins, const float* centres, int k,
                          int32_t (*tq)[TP], int i) {
  constexpr int LP = 8 * NV;
  alignas(32) float dl[LP];
  alignas(32) int32_t ql[LP];
  for (int e = 0; e < LP; ++e) {
    const bool has = e < L;
    const int q = bin_at(bins, off + (has ? e : 0));
    ql[e] = q;
    const float d = dist2_f32(a, b, centres[2 * q], centres[2 * q + 1]);
    dl[e] = has ? d : kInf;
  }
  V8F dv[NV];
  memcpy(dv, dl, sizeof(dv));
  const V8I iota = {0, 1, 2, 3, 4, 5, 6, 7};
  int32_t sel[K_MAX + 1];  // sel[k]: where the entries of rank >= k go
  for (int e = 0; e < L; ++e) {
    const float de = dl[e];
    V8I acc = {};
    for (int v = 0; v < NV; ++v) acc += (dv[v] < de) | ((dv[v] == de) & ((iota + 8 * v) < e));  // -1: before e
    const int r = -(acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7]);
    sel[r < k ? r : k] = ql[e];
  }
  for (int j = 0; j < k; ++j) tq[j][i] = sel[j];
}

// Soft-encode a tile. VEC (AVX2/AVX-512 builds): rule 1 by rank_pixel, the weights vectorised
// across the tile's pixels (a loop per j < k over the pixels: gathers of the chosen bins'
// centres, the float64 exponent, exp_); pixels outside the box (rules 2 and 3, rare) and lists
// longer than 32 (not with gamut.py's table: at most 26, for k = 16) are redone by the scalar
// soft_encode_pixel. The same float operations as soft_encode_pixel, so both give the same
// bins and weights bit for bit. The baseline build (SSE2: no gathers, no wide blends) runs
// soft_encode_pixel for every pixel, which is faster there.
// Measured (indicative, shared 2-core AMD EPYC, 1 thread, 40 x 64 x 64 ab uniform in
// [-100, 100]^2, ms): k = 5: 27 scalar / 17 tile-wide insertion / 16 rank; k = 10: 52 / 40 / 27;
// k = 16: 95 / 73 / 38; the previous window search: 34, 70, 166.
template <bool VEC>
FC_INLINE void encode_tile_body(const float* a, const float* b, int np, const EncodeSpec& S, int32_t (*tq)[TP],
                                float (*tw)[TP]) {
  const GamutTable& T = S.table;
  if (!VEC) {
    for (int i = 0; i < np; ++i) soft_encode_pixel(a[i], b[i], S, T.centres, &tq[0][i], &tw[0][i], TP);
    return;
  }
  const int k = S.k;
  const int32_t* offsets = T.offsets;
  const Word* bins = reinterpret_cast<const Word*>(T.bins);
  const float* centres = T.centres;
  alignas(64) float as[TP];
  alignas(64) float bs[TP];
  alignas(64) int32_t off[TP];
  alignas(64) int32_t len[TP];

  int redo = 0;
  for (int i = 0; i < np; ++i) {
    const bool in = in_box(a[i], b[i], T);
    as[i] = in ? a[i] : T.lo;  // a pixel outside the box is redone (len 0)
    bs[i] = in ? b[i] : T.lo;
    const int c = sub_cell(as[i], bs[i], T);
    off[i] = offsets[c];
    const int l = offsets[c + 1] - off[i];
    len[i] = in && l <= 32 ? l : 0;
    redo += len[i] == 0 ? 1 : 0;
  }
  for (int i = 0; i < np; ++i) {
    const int L = len[i];
    if (L == 0) {  // redone below; bin 0 keeps the weights' gathers in bounds
      for (int j = 0; j < k; ++j) tq[j][i] = 0;
    } else if (L <= 8) {
      rank_pixel<1>(as[i], bs[i], off[i], L, bins, centres, k, tq, i);
    } else if (L <= 16) {
      rank_pixel<2>(as[i], bs[i], off[i], L, bins, centres, k, tq, i);
    } else if (L <= 24) {
      rank_pixel<3>(as[i], bs[i], off[i], L, bins, centres, k, tq, i);
    } else {
      rank_pixel<4>(as[i], bs[i], off[i], L, bins, centres, k, tq, i);
    }
  }

  // Weights, as soft_encode_pixel computes them (split into gather, float64 and exp loops:
  // GCC vectorises each, not their fusion).
  alignas(64) double d0[TP];
  alignas(64) float ga[TP];
  alignas(64) float gb[TP];
  alignas(64) float sum[TP];
  for (int i = 0; i < np; ++i) {
    ga[i] = centres[2 * tq[0][i]];
    gb[i] = centres[2 * tq[0][i] + 1];
  }
  for (int i = 0; i < np; ++i) {
    d0[i] = dist2_f64(as[i], bs[i], ga[i], gb[i]);
    sum[i] = 0.0f;
  }
  for (int j = 0; j < k; ++j) {
    for (int i = 0; i < np; ++i) {
      ga[i] = centres[2 * tq[j][i]];
      gb[i] = centres[2 * tq[j][i] + 1];
    }
    for (int i = 0; i < np; ++i) ga[i] = weight_exponent(as[i], bs[i], ga[i], gb[i], d0[i], S.neg_inv_2s2);
    for (int i = 0; i < np; ++i) {
      tw[j][i] = exp_(ga[i]);
      sum[i] += tw[j][i];
    }
  }
  for (int i = 0; i < np; ++i) sum[i] = 1.0f / sum[i];
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < np; ++i) tw[j][i] *= sum[i];
  if (redo)
    for (int i = 0; i < np; ++i)
      if (len[i] == 0) soft_encode_pixel(a[i], b[i], S, centres, &tq[0][i], &tw[0][i], TP);
}

// The bodies are always_inline, so each wrapper compiles them with its own ISA.
void encode_default(const float* a, const float* b, int np, const EncodeSpec& S, int32_t (*tq)[TP], float (*tw)[TP]) {
  encode_tile_body<false>(a, b, np, S, tq, tw);
}
#if FC_X86
FC_TARGET_AVX2 void encode_avx2(const float* a, const float* b, int np, const EncodeSpec& S, int32_t (*tq)[TP],
                                float (*tw)[TP]) {
  encode_tile_body<true>(a, b, np, S, tq, tw);
}
FC_TARGET_AVX512 void encode_avx512(const float* a, const float* b, int np, const EncodeSpec& S, int32_t (*tq)[TP],
                                    float (*tw)[TP]) {
  encode_tile_body<true>(a, b, np, S, tq, tw);
}
#endif

}  // namespace

void encode_tile(int variant, const float* a, const float* b, int np, const EncodeSpec& enc, int32_t (*tq)[TP],
                 float (*tw)[TP]) {
#if FC_X86
  if (variant == 2) return encode_avx512(a, b, np, enc, tq, tw);
  if (variant == 1) return encode_avx2(a, b, np, enc, tq, tw);
#endif
  (void)variant;
  encode_default(a, b, np, enc, tq, tw);
}

}  // namespace cpu
}  // namespace fc
