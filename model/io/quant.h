// Dequantization of ggml tensor data to float, and reference quantizers for fixtures.
//
// Block layouts (ggml's legacy quantizations: 32 elements a block, little-endian, f16 scales;
// checked against ggml-quants.c): in every 4- and 5-bit type the low nibble of qs[j] holds
// element j (0..15) and the high nibble element j + 16; bit j of the 32-bit qh is the fifth
// bit of element j.
//   Q4_0 {f16 d; u8 qs[16]}                 x = (q - 8) * d
//   Q4_1 {f16 d; f16 m; u8 qs[16]}          x = q * d + m
//   Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}       x = (q - 16) * d,  q = nibble | bit << 4
//   Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]} x = q * d + m,    q = nibble | bit << 4
//   Q8_0 {f16 d; i8 qs[32]}                 x = q * d
// F32 is copied, F16 converted (IEEE half, subnormals, inf and NaN included).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "model/io/gguf.h"

namespace icecache::model {

// Converts `count` elements of `type` at `data` into `out`.
//   data: [count / GgmlBlockElements(type) * GgmlBlockBytes(type)] bytes, any alignment
//   out:  [count] float; must not overlap `data`
// INVALID_ARGUMENT when `type` is not supported or `count` is not a multiple of the type's
// block size (nothing is written then). Single pass, no allocation; thread-safe.
absl::Status Dequantize(GgmlType type, const uint8_t* data, uint64_t count, float* out);

// Reference quantizers, float -> blocks the way ggml's quantize_row_*_ref do:
//   Q4_0: d = v / -8 where v is the value of largest magnitude; q = min(15, (int)(x/d + 8.5))
//   Q4_1: d = (max - min) / 15, m = min; q = min(15, (int)((x - m)/d + 0.5))
//   Q5_0: d = v / -16; q = min(31, (int)(x/d + 16.5)), fifth bits gathered into qh
//   Q5_1: d = (max - min) / 31, m = min; q = min(31, (int)((x - m)/d + 0.5))
//   Q8_0: d = amax / 127; q = round(x/d)
// F32 is copied, F16 rounded to nearest even. Returns count / block * block-bytes bytes; empty
// when `type` is unsupported or `count` is not a multiple of the block size. Meant for test
// fixtures and tools (not optimized).
std::vector<uint8_t> Quantize(GgmlType type, const float* x, uint64_t count);

// IEEE half -> float, the same values as icecache::HalfToFloat (common/half.h) but written as
// straight-line integer arithmetic so that loops over it vectorize.
float HalfToFloatFast(uint16_t h);

}  // namespace icecache::model
