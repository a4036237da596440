#include "bench/decode_workload.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/half.h"

namespace icecache::bench {

absl::StatusOr<ExecutionMode> ParseExecutionMode(absl::string_view name) {
  if (name == "auto") return ExecutionMode::kAuto;
  if (name == "cpu") return ExecutionMode::kCpu;
  if (name == "cuda") return ExecutionMode::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("--mode must be auto, cpu or cuda, not '", name, "'"));
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

// CPU seconds (user + system) of a process so far.
double ProcessCpuSeconds(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  std::getline(f, line);
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::vector<std::string> fields = absl::StrSplit(line.substr(close + 2), ' ');
  // Fields after the command: state is [0]; utime [11], stime [12] (stat fields 14 and 15).
  if (fields.size() < 13) return 0;
  double utime = 0, stime = 0;
  (void)absl::SimpleAtod(fields[11], &utime);
  (void)absl::SimpleAtod(fields[12], &stime);
  return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

LayerData MakeLayer(uint32_t tokens, uint32_t layer, uint32_t queries) {
  eval::SyntheticOptions o;
  o.num_tokens = tokens;
  o.head_dim = kDim;
  o.num_layers = 1;
  o.num_kv_heads = kKvHeads;
  o.group_size = kGroup;
  o.num_queries = queries;
  o.num_clusters = std::max<uint32_t>(96, tokens / 256);
  o.kv_type = index::ElemType::kBF16;
  o.seed = 1000 + layer;
  LayerData d;
  d.trace = eval::GenerateSynthetic(o);
  d.k.resize(size_t{tokens} * kKvHeads * kDim);
  d.v.resize(d.k.size());
  for (uint32_t h = 0; h < kKvHeads; ++h) {
    const index::RowView kr = d.trace.Keys(0, h), vr = d.trace.Values(0, h);
    for (uint32_t t = 0; t < tokens; ++t) {
      std::memcpy(&d.k[(size_t{t} * kKvHeads + h) * kDim], kr.row(t), kDim * 2);
      std::memcpy(&d.v[(size_t{t} * kKvHeads + h) * kDim], vr.row(t), kDim * 2);
    }
  }
  return d;
}

std::vector<std::vector<uint16_t>> Queries(const LayerData& d, uint32_t steps, double cosine) {
  const uint32_t nq = static_cast<uint32_t>(d.trace.query_positions.size());
  const uint32_t heads = kKvHeads * kGroup;
  std::vector<std::vector<float>> prev(heads);
  std::vector<std::vector<uint16_t>> out(steps, std::vector<uint16_t>(size_t{heads} * kDim));
  const double sine = std::sqrt(std::max(0.0, 1.0 - cosine * cosine));
  for (uint32_t step = 0; step < steps; ++step) {
    for (uint32_t h = 0; h < heads; ++h) {
      const float* fresh = d.trace.Query(0, h, step % nq);
      double nf = 0;
      for (uint32_t i = 0; i < kDim; ++i) nf += double{fresh[i]} * fresh[i];
      nf = std::sqrt(nf);
      std::vector<float> q(fresh, fresh + kDim);
      if (step > 0 && nf > 0) {
        // The fresh query's part orthogonal to the previous one, then the turn.
        const std::vector<float>& p = prev[h];
        double np = 0, dot = 0;
        for (uint32_t i = 0; i < kDim; ++i) {
          np += double{p[i]} * p[i];
          dot += double{p[i]} * fresh[i];
        }
        np = std::sqrt(np);
        std::vector<double> ortho(kDim);
        double no = 0;
        for (uint32_t i = 0; i < kDim; ++i) {
          ortho[i] = fresh[i] - dot / (np * np) * p[i];
          no += ortho[i] * ortho[i];
        }
        no = std::sqrt(no);
        for (uint32_t i = 0; i < kDim; ++i) {
          q[i] = static_cast<float>(nf * (cosine * p[i] / np + sine * ortho[i] / no));
        }
      }
      prev[h] = q;
      for (uint32_t i = 0; i < kDim; ++i) out[step][size_t{h} * kDim + i] = FloatToBf16(q[i]);
    }
  }
  return out;
}

}  // namespace icecache::bench
