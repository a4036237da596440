// The index's float kernels at every SIMD level this CPU runs, side by side in one run: the
// single-query dot products (the build's parent search, the PCA passes of the clustered
// pages), the group dot products (exact scan, tail logits) and the weighted row sums (the
// tail estimate's value pass, the PCA passes). Each (kernel, shape) is timed at every level in
// turn, `--reps` rounds, the median per call reported (upper median for an even --reps) with its
// ratio to the scalar path and to AVX2 in the same run.
//
//   build/bench/kernel_speed [--dim=128] [--rows=64,512,4096] [--reps=15] [--out=DIR]
//
// Writes DIR/kernel_speed.{csv,json}.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "bench/stats.h"
#include "common/half.h"
#include "server/index/simd.h"

ABSL_FLAG(uint32_t, dim, 128, "Row dimension (head dim).");
ABSL_FLAG(std::string, rows, "64,512,4096", "Row counts per call.");
ABSL_FLAG(int, reps, 15, "Timed rounds per (kernel, shape, level); the median is reported.");
ABSL_FLAG(std::string, out, "bench/results/kernel_speed", "Directory for JSON/CSV results.");

namespace {

using namespace icecache::index;
using Clock = std::chrono::steady_clock;

struct Row {
  std::string kernel, type;
  uint32_t rows = 0, nq = 0;
  std::vector<std::pair<SimdLevel, double>> us;  // median us per call, per level
};

using icecache::bench::Median;

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint32_t dim = absl::GetFlag(FLAGS_dim);
  const int reps = absl::GetFlag(FLAGS_reps);
  std::vector<uint32_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_rows), ',', absl::SkipEmpty())) {
    uint32_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v == 0) {
      std::fprintf(stderr, "kernel_speed: --rows: '%s' is not a positive integer\n",
                   std::string(s).c_str());
      return 2;
    }
    sizes.push_back(v);
  }
  if (dim == 0 || reps < 1 || sizes.empty()) {
    std::fprintf(stderr, "kernel_speed: --dim, --reps and --rows must be positive\n");
    return 2;
  }
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  icecache::bench::PrepareOutDir(out_dir, "kernel_speed");
  std::vector<SimdLevel> levels;
  for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (SimdLevelSupported(l)) levels.push_back(l);
  }
  const SimdLevel best = DetectSimdLevel();
  std::printf("kernel_speed: dim %u, levels up to %s, one core, median of %d rounds\n", dim,
              SimdLevelName(best), reps);

  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  std::vector<Row> results;
  for (uint32_t n : sizes) {
    for (ElemType type : {ElemType::kF32, ElemType::kBF16}) {
      const uint64_t row_bytes = uint64_t{dim} * ElemBytes(type);
      std::vector<uint8_t> data(n * row_bytes);
      std::vector<float> f(uint64_t{n} * dim);
      for (float& x : f) x = normal(gen);
      for (uint32_t i = 0; i < n; ++i) {
        for (uint32_t c = 0; c < dim; ++c) {
          const float v = f[uint64_t{i} * dim + c];
          if (type == ElemType::kF32) {
            std::memcpy(data.data() + i * row_bytes + c * 4, &v, 4);
          } else {
            const uint16_t b = icecache::FloatToBf16(v);
            std::memcpy(data.data() + i * row_bytes + c * 2, &b, 2);
          }
        }
      }
      std::vector<uint32_t> order(n);  // the gather's rows: every row once, shuffled
      for (uint32_t i = 0; i < n; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), gen);
      std::vector<const void*> ptrs(n);
      for (uint32_t i = 0; i < n; ++i) ptrs[i] = data.data() + uint64_t{order[i]} * row_bytes;
      std::vector<float> xs(4 * dim), w(4 * uint64_t{n}), out(4 * uint64_t{std::max(n, dim)});
      for (float& x : xs) x = normal(gen);
      for (float& x : w) x = normal(gen);
      struct Kernel {
        const char* name;
        uint32_t nq;
        std::function<void()> call;
      };
      const std::vector<Kernel> kernels = {
          {"dot_strided", 1,
           [&] { DotStrided(xs.data(), data.data(), row_bytes, n, type, dim, out.data()); }},
          {"dot_gather", 1, [&] { DotGather(xs.data(), ptrs.data(), n, type, dim, out.data()); }},
          {"dot_strided_multi", 4,
           [&] {
             DotStridedMulti(xs.data(), 4, data.data(), row_bytes, n, type, dim, out.data(), n);
           }},
          {"weighted_sum", 1,
           [&] {
             WeightedSumStridedMulti(w.data(), 1, n, data.data(), row_bytes, n, type, dim,
                                     out.data());
           }},
          {"weighted_sum_multi", 4,
           [&] {
             WeightedSumStridedMulti(w.data(), 4, n, data.data(), row_bytes, n, type, dim,
                                     out.data());
           }},
      };
      for (const Kernel& k : kernels) {
        Row row{k.name, ElemTypeName(type), n, k.nq, {}};
        std::vector<std::vector<double>> times(levels.size());
        const int inner =
            static_cast<int>(std::max<uint64_t>(1, 4'000'000 / (uint64_t{n} * dim * k.nq)));
        for (int r = 0; r < reps; ++r) {
          for (size_t l = 0; l < levels.size(); ++l) {  // levels in turn within each round
            SetSimdLevel(levels[l]);
            k.call();  // warm
            const auto t0 = Clock::now();
            for (int i = 0; i < inner; ++i) k.call();
            times[l].push_back(
                std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / inner);
          }
        }
        for (size_t l = 0; l < levels.size(); ++l) row.us.push_back({levels[l], Median(times[l])});
        results.push_back(row);
      }
    }
  }
  SetSimdLevel(best);

  auto level_us = [](const Row& r, SimdLevel l) {
    for (const auto& [lv, us] : r.us) {
      if (lv == l) return us;
    }
    return 0.0;
  };
  const std::string stem = out_dir + "/kernel_speed";
  std::ofstream csv(stem + ".csv"), json(stem + ".json");
  csv << "kernel,type,rows,nq,dim,level,us_per_call,ns_per_row,vs_scalar,vs_avx2\n";
  json << "{\"dim\": " << dim << ", \"reps\": " << reps << ", \"best_level\": \""
       << SimdLevelName(best) << "\", \"rows\": [";
  std::printf("%-19s %-5s %6s %3s", "kernel", "type", "rows", "nq");
  for (SimdLevel l : levels) std::printf(" %12s", SimdLevelName(l));
  std::printf("   best/avx2\n");
  bool first = true;
  for (const Row& r : results) {
    const double scalar = level_us(r, SimdLevel::kScalar), avx2 = level_us(r, SimdLevel::kAvx2);
    std::printf("%-19s %-5s %6u %3u", r.kernel.c_str(), r.type.c_str(), r.rows, r.nq);
    for (const auto& [l, us] : r.us) {
      std::printf(" %9.2f us", us);
      csv << r.kernel << ',' << r.type << ',' << r.rows << ',' << r.nq << ',' << dim << ','
          << SimdLevelName(l) << ',' << us << ',' << us * 1e3 / r.rows << ','
          << (us > 0 ? scalar / us : 0) << ',' << (us > 0 && avx2 > 0 ? avx2 / us : 0) << '\n';
      json << (first ? "" : ", ") << "{\"kernel\": \"" << r.kernel << "\", \"type\": \"" << r.type
           << "\", \"rows\": " << r.rows << ", \"nq\": " << r.nq << ", \"level\": \""
           << SimdLevelName(l) << "\", \"us_per_call\": " << us << "}";
      first = false;
    }
    const double best_us = r.us.back().second;
    std::printf("   %.2fx\n", avx2 > 0 && best_us > 0 ? avx2 / best_us : 0.0);
  }
  json << "]}\n";
  icecache::bench::CloseResult(csv, stem + ".csv", "kernel_speed");
  icecache::bench::CloseResult(json, stem + ".json", "kernel_speed");
  std::printf("wrote %s.{csv,json}\n", stem.c_str());
  return 0;
}
