#include "model/io/quant.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_format.h"
#include "common/half.h"

namespace icecache::model {

namespace {

constexpr uint32_t kBlock = 32;  // elements in every block-quantized type here
constexpr uint32_t kHalf = kBlock / 2;

inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof(v)); }

// The per-type kernels: `nb` blocks from `x` to `y`. The inner loops have fixed trip counts
// and no cross-iteration dependencies so that the compiler vectorizes them.
void DequantF16(const uint8_t* __restrict x, uint64_t n, float* __restrict y) {
  for (uint64_t i = 0; i < n; ++i) y[i] = HalfToFloatFast(LoadU16(x + 2 * i));
}

void DequantQ4_0(const uint8_t* __restrict x, uint64_t nb, float* __restrict y) {
  for (uint64_t i = 0; i < nb; ++i, x += 18, y += kBlock) {
    const float d = HalfToFloatFast(LoadU16(x));
    const uint8_t* qs = x + 2;
    for (uint32_t j = 0; j < kHalf; ++j) {
      y[j] = static_cast<float>(static_cast<int>(qs[j] & 0x0f) - 8) * d;
      y[j + kHalf] = static_cast<float>(static_cast<int>(qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantQ4_1(const uint8_t* __restrict x, uint64_t nb, float* __restrict y) {
  for (uint64_t i = 0; i < nb; ++i, x += 20, y += kBlock) {
    const float d = HalfToFloatFast(LoadU16(x));
    const float m = HalfToFloatFast(LoadU16(x + 2));
    const uint8_t* qs = x + 4;
    for (uint32_t j = 0; j < kHalf; ++j) {
      y[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
      y[j + kHalf] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  }
}

void DequantQ5_0(const uint8_t* __restrict x, uint64_t nb, float* __restrict y) {
  for (uint64_t i = 0; i < nb; ++i, x += 22, y += kBlock) {
    const float d = HalfToFloatFast(LoadU16(x));
    const uint32_t qh = LoadU32(x + 2);
    const uint8_t* qs = x + 6;
    for (uint32_t j = 0; j < kHalf; ++j) {
      const int lo = (qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + kHalf)) & 1u) << 4);
      y[j] = static_cast<float>(lo - 16) * d;
      y[j + kHalf] = static_cast<float>(hi - 16) * d;
    }
  }
}

void DequantQ5_1(const uint8_t* __restrict x, uint64_t nb, float* __restrict y) {
  for (uint64_t i = 0; i < nb; ++i, x += 24, y += kBlock) {
    const float d = HalfToFloatFast(LoadU16(x));
    const float m = HalfToFloatFast(LoadU16(x + 2));
    const uint32_t qh = LoadU32(x + 4);
    const uint8_t* qs = x + 8;
    for (uint32_t j = 0; j < kHalf; ++j) {
      const int lo = (qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + kHalf)) & 1u) << 4);
      y[j] = static_cast<float>(lo) * d + m;
      y[j + kHalf] = static_cast<float>(hi) * d + m;
    }
  }
}

void DequantQ8_0(const uint8_t* __restrict x, uint64_t nb, float* __restrict y) {
  for (uint64_t i = 0; i < nb; ++i, x += 34, y += kBlock) {
    const float d = HalfToFloatFast(LoadU16(x));
    const int8_t* qs = reinterpret_cast<const int8_t*>(x + 2);
    for (uint32_t j = 0; j < kBlock; ++j) y[j] = static_cast<float>(qs[j]) * d;
  }
}

// (int)v clamped to [lo, hi], NaN -> lo: ggml's MIN(hi, (int8_t)v) without its undefined
// behaviour on out-of-range input.
inline int TruncClamp(float v, int lo, int hi) {
  if (!(v > static_cast<float>(lo))) return lo;
  if (v >= static_cast<float>(hi)) return hi;
  return static_cast<int>(v);
}

// Q4_0 / Q5_0: symmetric, the value of largest magnitude maps to -2^(bits-1).
void QuantSymmetric(const float* x, uint8_t* out, int bits) {
  float amax = 0.0f, vmax = 0.0f;
  for (uint32_t j = 0; j < kBlock; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      vmax = x[j];
    }
  }
  const int levels = 1 << bits;  // 16 or 32
  const float d = vmax / static_cast<float>(-levels / 2);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreU16(out, FloatToHalf(d));
  const float bias = static_cast<float>(levels / 2) + 0.5f;
  uint8_t* qs = out + (bits == 5 ? 6 : 2);
  uint32_t qh = 0;
  for (uint32_t j = 0; j < kHalf; ++j) {
    const int q0 = TruncClamp(x[j] * id + bias, 0, levels - 1);
    const int q1 = TruncClamp(x[j + kHalf] * id + bias, 0, levels - 1);
    qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
    qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
    qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + kHalf);
  }
  if (bits == 5) std::memcpy(out + 2, &qh, sizeof(qh));
}

// Q4_1 / Q5_1: affine, min -> 0 and max -> 2^bits - 1.
void QuantAffine(const float* x, uint8_t* out, int bits) {
  float vmin = std::numeric_limits<float>::max();
  float vmax = -std::numeric_limits<float>::max();
  for (uint32_t j = 0; j < kBlock; ++j) {
    vmin = std::min(vmin, x[j]);
    vmax = std::max(vmax, x[j]);
  }
  const int top = (1 << bits) - 1;  // 15 or 31
  const float d = (vmax - vmin) / static_cast<float>(top);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreU16(out, FloatToHalf(d));
  StoreU16(out + 2, FloatToHalf(vmin));
  uint8_t* qs = out + (bits == 5 ? 8 : 4);
  uint32_t qh = 0;
  for (uint32_t j = 0; j < kHalf; ++j) {
    const int q0 = TruncClamp((x[j] - vmin) * id + 0.5f, 0, top);
    const int q1 = TruncClamp((x[j + kHalf] - vmin) * id + 0.5f, 0, top);
    qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
    qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
    qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + kHalf);
  }
  if (bits == 5) std::memcpy(out + 4, &qh, sizeof(qh));
}

void QuantQ8_0(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (uint32_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreU16(out, FloatToHalf(d));
  for (uint32_t j = 0; j < kBlock; ++j) {
    const float q = std::round(x[j] * id);
    out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f)));
  }
}

}  // namespace

float HalfToFloatFast(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // Normal numbers: shift into place and rebias the exponent by 127 - 15 = 112. Inf and NaN
  // (exponent 31) rebias to 255 instead, keeping the NaN payload.
  const uint32_t bits = (em << 13) + (em >= 0x7c00u ? (224u << 23) : (112u << 23));
  const float normal = std::bit_cast<float>(bits);
  // Zero and subnormals: em * 2^-24, exact in float.
  const float subnormal = static_cast<float>(em) * 5.9604644775390625e-8f;
  const float magnitude = em < 0x0400u ? subnormal : normal;
  return std::bit_cast<float>(std::bit_cast<uint32_t>(magnitude) | sign);
}

absl::Status Dequantize(GgmlType type, const uint8_t* data, uint64_t count, float* out) {
  if (!IsSupportedGgmlType(static_cast<uint32_t>(type))) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Dequantize: unsupported ggml type %u", static_cast<uint32_t>(type)));
  }
  const uint64_t block = GgmlBlockElements(type);
  if (count % block != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Dequantize: %u elements is not a multiple of %s's block of %u", count,
                        GgmlTypeName(type), block));
  }
  if (count == 0) return absl::OkStatus();
  const uint64_t nb = count / block;
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(out, data, count * sizeof(float));
      break;
    case GgmlType::kF16:
      DequantF16(data, count, out);
      break;
    case GgmlType::kQ4_0:
      DequantQ4_0(data, nb, out);
      break;
    case GgmlType::kQ4_1:
      DequantQ4_1(data, nb, out);
      break;
    case GgmlType::kQ5_0:
      DequantQ5_0(data, nb, out);
      break;
    case GgmlType::kQ5_1:
      DequantQ5_1(data, nb, out);
      break;
    case GgmlType::kQ8_0:
      DequantQ8_0(data, nb, out);
      break;
  }
  return absl::OkStatus();
}

std::vector<uint8_t> Quantize(GgmlType type, const float* x, uint64_t count) {
  if (!IsSupportedGgmlType(static_cast<uint32_t>(type))) return {};
  const uint64_t block = GgmlBlockElements(type);
  if (count % block != 0) return {};
  const uint64_t nb = count / block;
  const uint64_t bb = GgmlBlockBytes(type);
  std::vector<uint8_t> out(nb * bb);
  uint8_t* o = out.data();
  switch (type) {
    case GgmlType::kF32:
      if (count > 0) std::memcpy(o, x, count * sizeof(float));
      break;
    case GgmlType::kF16:
      for (uint64_t i = 0; i < count; ++i) StoreU16(o + 2 * i, FloatToHalf(x[i]));
      break;
    case GgmlType::kQ4_0:
      for (uint64_t i = 0; i < nb; ++i) QuantSymmetric(x + i * kBlock, o + i * bb, 4);
      break;
    case GgmlType::kQ4_1:
      for (uint64_t i = 0; i < nb; ++i) QuantAffine(x + i * kBlock, o + i * bb, 4);
      break;
    case GgmlType::kQ5_0:
      for (uint64_t i = 0; i < nb; ++i) QuantSymmetric(x + i * kBlock, o + i * bb, 5);
      break;
    case GgmlType::kQ5_1:
      for (uint64_t i = 0; i < nb; ++i) QuantAffine(x + i * kBlock, o + i * bb, 5);
      break;
    case GgmlType::kQ8_0:
      for (uint64_t i = 0; i < nb; ++i) QuantQ8_0(x + i * kBlock, o + i * bb);
      break;
  }
  return out;
}

}  // namespace icecache::model
