// Scoring kernels: dot products of fp32 vectors with key rows stored as fp32, fp16 or bf16,
// converted on the fly. AVX2+FMA+F16C when the CPU has them (chosen once at startup), a
// portable scalar path otherwise; both give the same results within float rounding.
//
// Thread safety: all functions are pure; SetSimdLevel is for tests and benchmarks and must
// not race with scoring.
#pragma once

#include <cstdint>

#include "server/index/rows.h"

namespace icecache::index {

enum class SimdLevel : uint8_t { kScalar = 0, kAvx2 = 1 };

// The best level this CPU supports.
SimdLevel DetectSimdLevel();
// The level in use (DetectSimdLevel() unless overridden).
SimdLevel ActiveSimdLevel();
// Forces a level (clamped to what the CPU supports); returns the level now in use.
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
// stride (a page) or anywhere.
void DotStridedMulti(const float* xs, uint32_t nq, const void* base, uint64_t stride, uint32_t n,
                     ElemType type, uint32_t dim, float* out, uint32_t out_stride);
void DotGatherMulti(const float* xs, uint32_t nq, const void* const* rows, uint32_t n,
                    ElemType type, uint32_t dim, float* out, uint32_t out_stride);
// Nearest parents in the lifted metric, the build's heavy loop: for each child i in
// [0, nc), over parents j in [0, np):
//   v = children[i] . parent_j + child_lift[i] * parent_lift[j]
// and where v > best_v[i], best_v[i] = v and best_j[i] = j (ties keep the lower j).
// children: [nc][dim] fp32 dense; parents_t: [dim][np_pad] fp32 (parents transposed, np_pad
// a multiple of 16, padding columns ignored); parent_lift: [np_pad].
void BestLiftedParents(const float* children, uint32_t nc, const float* child_lift,
                       const float* parents_t, const float* parent_lift, uint32_t np,
                       uint32_t np_pad, uint32_t dim, float* best_v, uint32_t* best_j);

// x[i] = exp(x[i]) for i in [0, n); inputs below -87 give 0. Relative error below 2e-7
// (a polynomial on AVX2; std::exp on the scalar path).
void ExpInPlace(float* x, uint32_t n);
// |row|^2.
float SquaredNorm(const void* row, ElemType type, uint32_t dim);
// dst[0..dim) = row as fp32.
void ToFloat(const void* row, ElemType type, uint32_t dim, float* dst);

}  // namespace icecache::index
