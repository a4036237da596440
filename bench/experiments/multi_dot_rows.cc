// The multi-query AVX-512 dot kernels side by side in one process: each row reduced alone per
// query (DotRowMultiAvx512T, what DotStridedMulti ran for 2..8 queries before the four-row
// kernel) against four rows reduced jointly per query (DotRowsMultiAvx512T now), 41 rounds
// alternating, medians; rows of N(0, 1) values in fp32 / fp16 / bf16, cache-resident (512,
// 4,096 rows) and streamed (65,536). It includes simd.cc to reach both kernels. Build and run
// from the repository root (results: bench/results/multi_dot/multi_dot_rows.txt):
//   g++ -std=c++20 -O2 -mf16c -I. -o /tmp/multi_dot_rows bench/experiments/multi_dot_rows.cc
//   /tmp/multi_dot_rows
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "server/index/simd.cc"
namespace icecache::index {
namespace {
template <ElemType T, int NQ>
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) void OldRows(const float* xs,
                                                                       const uint8_t* base,
                                                                       uint64_t stride, uint32_t n,
                                                                       uint32_t dim, float* out) {
  for (uint32_t r = 0; r < n; ++r)
    DotRowMultiAvx512T<T, NQ>(xs, base + r * stride, dim, out + r, n);
}
template <ElemType T, int NQ>
void NewRows(const float* xs, const uint8_t* base, uint64_t stride, uint32_t n, uint32_t dim,
             float* out) {
  DotRowsMultiAvx512T<T, NQ>(xs, base, stride, nullptr, n, dim, out, n);
}
template <ElemType T, int NQ>
void Run(const char* tn, uint32_t dim, uint32_t n) {
  const uint64_t stride = uint64_t{dim} * (T == ElemType::kF32 ? 4 : 2);
  std::vector<uint8_t> data(stride * n);
  std::mt19937 g(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (uint32_t i = 0; i < n * dim; ++i) {
    const float v = nd(g);
    if constexpr (T == ElemType::kF32) {
      std::memcpy(data.data() + 4 * uint64_t{i}, &v, 4);
    } else if constexpr (T == ElemType::kF16) {
      const uint16_t h = _cvtss_sh(v, 0);
      std::memcpy(data.data() + 2 * uint64_t{i}, &h, 2);
    } else {
      uint32_t b;
      std::memcpy(&b, &v, 4);
      const uint16_t h = static_cast<uint16_t>(b >> 16);
      std::memcpy(data.data() + 2 * uint64_t{i}, &h, 2);
    }
  }
  std::vector<float> xs(NQ * dim), out(NQ * n);
  for (auto& x : xs) x = (g() % 1000) / 500.f - 1;
  std::vector<double> to, tn2;
  const int inner = std::max<int>(1, 2000000 / (n * dim));
  for (int rep = 0; rep < 41; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i)
      OldRows<T, NQ>(xs.data(), data.data(), stride, n, dim, out.data());
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i)
      NewRows<T, NQ>(xs.data(), data.data(), stride, n, dim, out.data());
    auto t2 = std::chrono::steady_clock::now();
    to.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / inner);
    tn2.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count() / inner);
  }
  std::vector<double> ratio;
  for (size_t i = 0; i < to.size(); ++i) ratio.push_back(to[i] / tn2[i]);
  auto med = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  std::printf(
      "%-5s dim %3u rows %6u nq %d: one-row %9.2f us  four-row %9.2f us  speed-up (median of "
      "per-round) %.2fx\n",
      tn, dim, n, NQ, med(to), med(tn2), med(ratio));
}
}  // namespace
}  // namespace icecache::index
int main() {
  using namespace icecache::index;
  if (!SimdLevelSupported(SimdLevel::kAvx512)) {
    std::fprintf(stderr, "multi_dot_rows: this CPU has no AVX-512 F+BW\n");
    return 2;
  }
  for (uint32_t dim : {64u, 128u}) {
    for (uint32_t n : {512u, 4096u, 65536u}) {
      Run<ElemType::kF32, 4>("fp32", dim, n);
      Run<ElemType::kF16, 4>("fp16", dim, n);
      Run<ElemType::kBF16, 4>("bf16", dim, n);
      Run<ElemType::kF16, 3>("fp16", dim, n);
    }
  }
}
