// 1-bit sketches of key residuals, for estimating q.k without reading the key (RaBitQ-style,
// Gao & Long, SIGMOD 2024). A key k of a cell with reference point r is e = k - r; the sketch
// keeps the signs of P e, where P is a fixed random rotation (random signs, then a
// Walsh-Hadamard transform, over D = max(64, next power of two >= dim) coordinates), and one
// float, fac = |e|^2 / |P e|_1. The estimate
//     q.e ~= fac * <P q, sign(P e)>
// is unbiased over the rotation, with an error of about 0.75 |q| |e| / sqrt(D) (one standard
// deviation). <P q, sign> is computed in integers: P q is quantized to 7 bits (|q8| <= 63, a
// per-query scale), and SketchDots (simd.h, row-major codes) or SketchDotsPacked (the
// fast-scan layout, through the query's 16-entry tables) sums the coordinates under the set
// bits; both give the same integers. The query's rounding moves the estimate by at most
// fac * scale / 2 * D (each coordinate by at most scale / 2), far below the 1-bit error
// (tested against a float64 reference): 7 bits instead of 8 so that a table entry (the sum of
// 4 coordinates, offset by the negative ones) fits a byte.
//
// Memory: D / 8 bytes + 2 (fp16 fac) per key in the tree (18 bytes at dim 128).
// Thread safety: immutable after construction; every method is const and reentrant.
#pragma once

#include <cstdint>
#include <vector>

namespace icecache::index {

class ResidualSketch {
 public:
  ResidualSketch(uint32_t dim, uint64_t seed);

  uint32_t dim() const { return dim_; }
  // D: code length in bits (a multiple of 64).
  uint32_t bits() const { return bits_; }
  uint32_t code_bytes() const { return bits_ / 8; }

  // Writes the code of residual e[dim] to code[code_bytes()] and returns its fac (0 when e is
  // zero). `scratch` holds at least bits() floats.
  float Encode(const float* e, uint8_t* code, float* scratch) const;

  // A query prepared for SketchDots: q8[bits()] = round(P q / scale) in [-63, 63], and
  // sum(q8); for SketchDotsPacked: lut[bits() * 4] and lut_bias (BuildSketchLuts).
  static constexpr int kQueryMax = 63;
  struct Query {
    std::vector<int8_t> q8;
    float scale = 0;
    int32_t sum = 0;
    std::vector<uint8_t> lut;
    int32_t lut_bias = 0;
  };
  void Prepare(const float* q, Query* out, float* scratch) const;

  // The estimate of q.e from SketchDots' output `dots` (the sum of q8 under the set bits).
  static float Estimate(const Query& q, float fac, int32_t dots) {
    return fac * q.scale * static_cast<float>(2 * dots - q.sum);
  }

  uint64_t MemoryBytes() const { return signs_.capacity() * sizeof(float); }

  // y[bits] = P x = H (s * pad(x)) / sqrt(bits) (public for tests' float64 references).
  void Rotate(const float* x, float* y) const;

 private:
  uint32_t dim_;
  uint32_t bits_;
  std::vector<float> signs_;  // [bits] of +-1
};

}  // namespace icecache::index
