// The three ways the AVX-512 sketch estimates could write the indices of the keys above the floor,
// side by side in one process: a compress with a memory destination (vpcompressd m512{k}, what
// it ran before), a compress into a register and a full store, and a compress into a register
// and a store masked to the count (what it runs now: nothing past the count is written).
// Estimates of N(0, 1) in blocks of 128 (a cell), floors that pass 0.1% to 50% of the keys;
// 9 rounds alternating the three, medians of ns per key. Build and run from anywhere (results:
// bench/results/zen4_compress/compress_store.txt):
//   g++ -std=c++20 -O2 -o /tmp/compress_store bench/experiments/compress_store.cc
//   /tmp/compress_store
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr uint32_t kCell = 128;

enum Way { kMemoryCompress, kRegisterFullStore, kRegisterMaskedStore };
const char* const kNames[] = {"compress to memory", "compress, full store",
                              "compress, masked store"};

template <Way W>
__attribute__((target("avx512f"), noinline)) uint32_t Above(const float* e, float floor,
                                                            uint32_t* above) {
  const __m512 vf = _mm512_set1_ps(floor);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  uint32_t m = 0;
  for (uint32_t i = 0; i < kCell; i += 16) {
    const __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(e + i), vf, _CMP_GT_OQ);
    if (k != 0) {
      const uint32_t c = static_cast<uint32_t>(__builtin_popcount(k));
      if constexpr (W == kMemoryCompress) {
        _mm512_mask_compressstoreu_epi32(above + m, k, idx);
      } else if constexpr (W == kRegisterFullStore) {
        _mm512_storeu_si512(above + m, _mm512_maskz_compress_epi32(k, idx));
      } else {
        _mm512_mask_storeu_epi32(above + m, static_cast<__mmask16>((1u << c) - 1u),
                                 _mm512_maskz_compress_epi32(k, idx));
      }
      m += c;
    }
    idx = _mm512_add_epi32(idx, step);
  }
  return m;
}

using Fn = uint32_t (*)(const float*, float, uint32_t*);

double NsPerKey(Fn fn, const std::vector<float>& est, float floor, uint64_t* hits) {
  std::vector<uint32_t> above(kCell + 16);
  const uint32_t cells = static_cast<uint32_t>(est.size() / kCell);
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t h = 0;
  for (int rep = 0; rep < 50; ++rep) {
    for (uint32_t c = 0; c < cells; ++c)
      h += fn(est.data() + uint64_t{c} * kCell, floor, above.data());
  }
  const double ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  *hits = h;
  return ns / (50.0 * est.size());
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("this CPU has no AVX-512 F\n");
    return 0;
  }
  std::vector<float> est(kCell * 2000);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& x : est) x = normal(rng);
  const Fn fns[] = {Above<kMemoryCompress>, Above<kRegisterFullStore>, Above<kRegisterMaskedStore>};
  std::printf("%-8s %-10s %22s %22s %22s\n", "floor", "above", kNames[0], kNames[1], kNames[2]);
  for (float floor : {3.0f, 2.0f, 1.0f, 0.0f}) {
    std::vector<double> t[3];
    uint64_t hits = 0;
    for (int round = 0; round < 9; ++round) {
      for (int w = 0; w < 3; ++w) t[w].push_back(NsPerKey(fns[w], est, floor, &hits));
    }
    std::printf("%-8.1f %-10.4f", floor, double(hits) / (50.0 * est.size()));
    for (auto& v : t) {
      std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
      std::printf(" %19.3f ns", v[v.size() / 2]);
    }
    std::printf("\n");
  }
  return 0;
}
