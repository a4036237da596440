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
  SignedFwht(x, signs_.data(), dim_, bits_, 1.0f / std::sqrt(static_cast<float>(bits_)), y);
}

float ResidualSketch::Encode(const float* e, uint8_t* code, float* scratch) const {
  Rotate(e, scratch);
  float l1 = 0, sq = 0;
  SignCode(scratch, bits_, code, &l1, &sq);
  return l1 > 0 ? sq / l1 : 0.f;
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
