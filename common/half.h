// IEEE half and bfloat16 <-> float on the host, exact where the format allows (round to
// nearest even). Shared by the index, the kernels' CPU references and the client.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace icecache {

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0);
  }
  if (absx >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (absx < 0x38800000u) {                        // subnormal or zero in half
    const float af = std::fabs(f);
    // Scale so that the half subnormal unit (2^-24) becomes 1, then round to nearest even.
    const float scaled = af * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t mant_round = absx + 0xfffu + ((absx >> 13) & 1u);
  return sign | static_cast<uint16_t>((mant_round - 0x38000000u) >> 13);
}

inline uint16_t FloatToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float Bf16ToFloat(uint16_t b) {
  const uint32_t bits = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// A float stored in 16 bits of `fp16` (true) or bfloat16 (false) type, with finite values
// beyond the type's range saturated to its largest finite value instead of becoming infinite
// (NaN stays NaN). For stored statistics (the tail estimate's page summaries), where an
// infinity would turn a zero weight into NaN.
inline uint16_t FloatToStorage16Saturated(float f, bool fp16) {
  if (!std::isnan(f)) {
    const float max = fp16 ? 65504.0f : 3.3895313892515355e38f;  // 0x7bff, 0x7f7f
    f = std::fmin(std::fmax(f, -max), max);
  }
  return fp16 ? FloatToHalf(f) : FloatToBf16(f);
}

inline float Storage16ToFloat(uint16_t b, bool fp16) {
  return fp16 ? HalfToFloat(b) : Bf16ToFloat(b);
}

}  // namespace icecache
