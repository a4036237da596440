// Scoring kernels: dot products of fp32 vectors with key rows stored as fp32, fp16 or bf16,
// converted on the fly, and integer dot products of int8 queries with 1-bit sketch codes.
// The level is chosen once at startup from cpuid (and the OS's saved register state):
// AVX-512 (F+BW) with or without AVX-512 VNNI, AVX2 with or without AVX-VNNI, or a portable
// scalar path. Float kernels agree with the scalar path within float rounding; the sketch
// kernel is integer arithmetic and agrees exactly at every level.
//
// Thread safety: all functions are pure; SetSimdLevel is for tests and benchmarks and must
// not race with scoring.
#pragma once

#include <cstdint>
#include <cstring>

#include "server/index/rows.h"

namespace icecache::index {

// Levels in order of preference. Every level from kAvx2 up also uses AVX2+FMA+F16C;
// kAvxVnni adds the VEX-encoded VNNI dot product (AVX-VNNI: Alder Lake, Sapphire Rapids, Zen 5);
// kAvx512 is AVX-512 F+BW (Skylake-SP, Zen 4); kAvx512Vnni adds AVX-512 VNNI (Cascade Lake,
// Ice Lake, Sapphire Rapids, Zen 4). A CPU may have kAvx512Vnni without kAvxVnni.
enum class SimdLevel : uint8_t {
  kScalar = 0,
  kAvx2 = 1,
  kAvxVnni = 2,
  kAvx512 = 3,
  kAvx512Vnni = 4,
};

// Whether this CPU (and OS) can run `level`.
bool SimdLevelSupported(SimdLevel level);
// The best level this CPU supports.
SimdLevel DetectSimdLevel();
// The level in use (DetectSimdLevel() unless overridden).
SimdLevel ActiveSimdLevel();
// Forces a level: the highest supported level at or below `level`; returns the level now in
// use.
SimdLevel SetSimdLevel(SimdLevel level);
const char* SimdLevelName(SimdLevel level);

// x . row over `dim` elements; x is fp32, row of `type`.
float Dot(const float* x, const void* row, ElemType type, uint32_t dim);
// out[i] = x . (base + i * stride) for i in [0, n): rows at a fixed stride (a page).
void DotStrided(const float* x, const void* base, uint64_t stride, uint32_t n, ElemType type,
                uint32_t dim, float* out);
// out[i] = x . rows[i] for i in [0, n): rows anywhere.
void DotGather(const float* x, const void* const* rows, uint32_t n, ElemType type, uint32_t dim,
               float* out);
// Several queries against the same rows, each row read once: out[j * out_stride + i] =
// xs[j * dim ..] . row_i for queries j in [0, nq) and rows i in [0, n). Rows at a fixed
// stride (a page) or anywhere. With nq >= 2 a row's results are the same floats wherever the
// row sits in the call, strided or gathered, alone or among others (at every level).
void DotStridedMulti(const float* xs, uint32_t nq, const void* base, uint64_t stride, uint32_t n,
                     ElemType type, uint32_t dim, float* out, uint32_t out_stride);
void DotGatherMulti(const float* xs, uint32_t nq, const void* const* rows, uint32_t n,
                    ElemType type, uint32_t dim, float* out, uint32_t out_stride);
// Weighted sums of rows at a fixed stride for several weight vectors, each row read once:
//   out[j * dim + c] += sum over i of weights[j * w_stride + i] * row_i[c]
// for j in [0, nq), rows i in [0, n) at base + i * stride, c in [0, dim). Accumulates into
// out (fp32, [nq][dim]). The attention's "probabilities times values" over rows (the tail
// estimate's page summaries). Agrees with the scalar path within float rounding.
void WeightedSumStridedMulti(const float* weights, uint32_t nq, uint64_t w_stride, const void* base,
                             uint64_t stride, uint32_t n, ElemType type, uint32_t dim, float* out);
// Nearest parents in the lifted metric, the build's heavy loop: for each child i in
// [0, nc), over parents j in [0, np):
//   v = children[i] . parent_j + child_lift[i] * parent_lift[j]
// and where v > best_v[i], best_v[i] = v and best_j[i] = j (ties keep the lower j).
// children: [nc][dim] fp32 dense; parents_t: [dim][np_pad] fp32 (parents transposed, np_pad
// a multiple of 16, padding columns ignored); parent_lift: [np_pad].
void BestLiftedParents(const float* children, uint32_t nc, const float* child_lift,
                       const float* parents_t, const float* parent_lift, uint32_t np,
                       uint32_t np_pad, uint32_t dim, float* best_v, uint32_t* best_j);

// Integer dot products of int8 queries with 1-bit codes (sketch.h): for queries j in [0, nq)
// and codes i in [0, n),
//   out[j * out_stride + i] = sum of q8[j * bits + b] over the bits b set in code i,
// where code i is bits / 8 bytes at codes + i * bits / 8 and bit b is bit (b % 8) of byte
// b / 8. `bits` is a multiple of 64. Exact (integer) at every level.
void SketchDots(const int8_t* q8, uint32_t nq, uint32_t bits, const uint8_t* codes, uint32_t n,
                int32_t* out, uint32_t out_stride);

// The fast-scan layout of the same codes (FAISS / RaBitQ "fast scan", transposed): keys in
// blocks of 16, each block bits * 2 bytes (the last block padded with zero codes). Block b
// holds, for each code byte p (bits 8p..8p+7: the 4-bit groups 2p and 2p+1), the 16 keys'
// bytes p contiguously: packed[b * bits * 2 + p * 16 + j] = byte p of the code of key
// 16 b + j. A 256-bit register thus holds code bytes p and p + 1 of 16 keys (one per lane),
// and one pshufb per nibble half looks up 4 groups of all 16 keys at once.
constexpr uint32_t kSketchBlockKeys = 16;
inline uint64_t PackedSketchBytes(uint32_t n, uint32_t bits) {
  return uint64_t{(n + kSketchBlockKeys - 1) / kSketchBlockKeys} * bits * 2;
}
// Row-major codes[n][bits / 8] -> packed[PackedSketchBytes(n, bits)], and back.
void PackSketchCodes(const uint8_t* codes, uint32_t n, uint32_t bits, uint8_t* packed);
void UnpackSketchCodes(const uint8_t* packed, uint32_t n, uint32_t bits, uint8_t* codes);
// In place, O(bytes after idx): a code inserted as key idx of n (keys idx.. move up one; packed
// holds PackedSketchBytes(n, bits) bytes, the padding after key n - 1 zero before and after).
// Equal to unpacking, inserting the row and packing again.
void InsertPackedSketchCode(uint8_t* packed, uint32_t n, uint32_t bits, uint32_t idx,
                            const uint8_t* code);
// Per-query lookup tables of the fast-scan kernel: for each 4-bit group g of the code (bits
// 4g..4g+3) and nibble v, the table entry of (g, v) is (sum of q8[4g + i] over the bits i set
// in v) - (sum of the negative q8[4g + i]), in [0, 4 * kSketchLutQueryMax]; *bias = the sum
// of the subtracted minima. The 16-entry table of group g sits at luts + SketchLutOffset(g)
// (arranged for the AVX2 kernel's registers: per pair of code bytes, the two low-nibble
// tables, then the two high-nibble tables). Requires |q8[b]| <= kSketchLutQueryMax (so that
// an entry fits a byte). luts has bits * 4 bytes.
inline uint32_t SketchLutOffset(uint32_t g) {
  const uint32_t p = g / 2, h = g % 2;  // code byte, nibble half
  return (p / 2) * 64 + h * 32 + (p % 2) * 16;
}
constexpr int kSketchLutQueryMax = 63;
void BuildSketchLuts(const int8_t* q8, uint32_t bits, uint8_t* luts, int32_t* bias);
// SketchDots over the packed layout, from the queries' tables: luts[j * bits * 4 ..] and
// bias[j] of query j (BuildSketchLuts), codes packed[PackedSketchBytes(n, bits)]; the same
// integers as SketchDots on the row-major codes with the same q8, at every level. The AVX2
// kernel (also used at the AVX-VNNI and AVX-512 levels) accumulates in uint16 and needs
// bits <= 1024; longer codes use the scalar kernel. (A 512-bit version, one pshufb per two code
// bytes, measured no faster on a Sapphire Rapids Xeon: docs/index.md.)
void SketchDotsPacked(const uint8_t* luts, const int32_t* bias, uint32_t nq, uint32_t bits,
                      const uint8_t* packed, uint32_t n, int32_t* out, uint32_t out_stride);

// The bits of a float as an unsigned integer in the floats' order (-0 taken as +0, as float
// comparisons have them; a NaN gets a place of its own), and back (+0 for -0).
inline uint32_t OrderedFloatBits(float v) {
  v += 0.0f;  // -0 + 0 = +0
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
}
inline float FromOrderedFloatBits(uint32_t b) {
  b = (b & 0x80000000u) != 0 ? (b & 0x7fffffffu) : ~b;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// A (value, id) pair as one integer ranked by one unsigned comparison: the larger key has the
// larger value, or between equal values the lower id (a sketch candidate: its estimate and
// token; a page in the search's lists: its score and id). Both halves come back.
inline uint64_t RankKey(float value, uint32_t id) {
  return uint64_t{OrderedFloatBits(value)} << 32 | uint32_t{~id};
}
inline float RankKeyValue(uint64_t key) {
  return FromOrderedFloatBits(static_cast<uint32_t>(key >> 32));
}
inline uint32_t RankKeyId(uint64_t key) { return ~static_cast<uint32_t>(key); }

// The sketch estimates of n keys for one query, and the candidates among them: with
//   est_i = base + (half_to_float(fac[i]) * scale) * float(2 * dots[i] - sum)
// (ResidualSketch::Estimate plus the cell's q.r; fac is fp16), RankKey(est_i,
// tok[i]) for each i with est_i > floor, written to out[] in ascending i; returns their
// count. out has room for n; nothing past the count is written. The SIMD paths may fuse the
// multiply-add (estimates within a few ulp of the scalar path's).
uint32_t SketchCandidatesAbove(const int32_t* dots, const uint16_t* fac, const uint32_t* tok,
                               uint32_t n, float base, float scale, int32_t sum, float floor,
                               uint64_t* out);

// x[i] = exp(x[i]) for i in [0, n); inputs below -87 give 0. Relative error below 2e-7
// (a polynomial on AVX2; std::exp on the scalar path).
void ExpInPlace(float* x, uint32_t n);

// The tail estimate's page logits (server/core/sequence_kv.cc): out[i] = logs[i] + scale *
// dots[i], plus min(half_scale_sq * vars[i], cap) where vars is not null; out may be dots.
// Returns the largest out[i] (-inf for n == 0). logs[i] = -inf gives -inf (a page left out);
// the other inputs must be finite, vars[i] >= 0. The AVX2 path may fuse the multiply-adds
// (within a few ulp of the scalar path).
float TailLogits(const float* logs, const float* dots, const float* vars, float scale,
                 float half_scale_sq, float cap, uint32_t n, float* out);
// |row|^2.
float SquaredNorm(const void* row, ElemType type, uint32_t dim);

// The sketch's rotation (sketch.h): y[i] = x[i] * signs[i] for i < dim, 0 up to n, then the
// in-place fast Walsh-Hadamard transform of y[n] (n a power of two, at least 8), then
// y *= scale. Only additions, subtractions and products, element by element in the same
// order at every level: the results are bit-identical at every level.
void SignedFwht(const float* x, const float* signs, uint32_t dim, uint32_t n, float scale,
                float* y);
// The 1-bit code of y[n] (n a multiple of 8): bit i % 8 of code[i / 8] is set where y[i] > 0
// (bit-identical at every level); returns sum |y[i]| and sum y[i]^2 (float lanes, within
// float rounding of the float64 sums).
void SignCode(const float* y, uint32_t n, uint8_t* code, float* l1, float* sq);
// dst[0..dim) = row as fp32.
void ToFloat(const void* row, ElemType type, uint32_t dim, float* dst);

}  // namespace icecache::index
