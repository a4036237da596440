#include "server/index/sketch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "server/index/simd.h"

namespace icecache::index {

static_assert(ResidualSketch::kQueryMax <= kSketchLutQueryMax,
              "a fast-scan table entry (4 coordinates) must fit a byte");

ResidualSketch::ResidualSketch(uint32_t dim, uint64_t seed) : dim_(dim) {
  bits_ = 64;
  while (bits_ < dim) bits_ *= 2;
  signs_.resize(bits_);
  std::mt19937_64 rng(seed ^ 0x5ca1ab1e5eedull);
  for (float& s : signs_) s = (rng() & 1) ? 1.f : -1.f;
}

void ResidualSketch::Rotate(const float* x, float* y) const {
  for (uint32_t i = 0; i < dim_; ++i) y[i] = x[i] * signs_[i];
  std::fill(y + dim_, y + bits_, 0.f);
  // In-place fast Walsh-Hadamard transform.
  for (uint32_t h = 1; h < bits_; h *= 2) {
    for (uint32_t i = 0; i < bits_; i += 2 * h) {
      for (uint32_t j = i; j < i + h; ++j) {
        const float a = y[j], b = y[j + h];
        y[j] = a + b;
        y[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(bits_));
  for (uint32_t i = 0; i < bits_; ++i) y[i] *= norm;
}

float ResidualSketch::Encode(const float* e, uint8_t* code, float* scratch) const {
  Rotate(e, scratch);
  std::memset(code, 0, code_bytes());
  double l1 = 0, sq = 0;
  for (uint32_t i = 0; i < bits_; ++i) {
    const float v = scratch[i];
    if (v > 0) code[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
    l1 += std::fabs(v);
    sq += double(v) * v;
  }
  return l1 > 0 ? static_cast<float>(sq / l1) : 0.f;
}

void ResidualSketch::Prepare(const float* q, Query* out, float* scratch) const {
  Rotate(q, scratch);
  float mx = 0;
  for (uint32_t i = 0; i < bits_; ++i) mx = std::max(mx, std::fabs(scratch[i]));
  out->q8.resize(bits_);
  out->scale = mx > 0 ? mx / static_cast<float>(kQueryMax) : 1.f;
  out->sum = 0;
  for (uint32_t i = 0; i < bits_; ++i) {
    const int v = static_cast<int>(std::lrint(scratch[i] / out->scale));
    out->q8[i] = static_cast<int8_t>(std::clamp(v, -kQueryMax, kQueryMax));
    out->sum += out->q8[i];
  }
  out->lut.resize(uint64_t{bits_} * 4);
  BuildSketchLuts(out->q8.data(), bits_, out->lut.data(), &out->lut_bias);
}

}  // namespace icecache::index
