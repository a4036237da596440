#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>

#include "eval/quality.h"
#include "eval/synthetic.h"
#include "eval/trace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"

namespace icecache::eval {
namespace {

using ::icecache::testing::StatusIs;
using ::icecache::testing::TempDir;
using ::testing::HasSubstr;

Trace Small() {
  SyntheticOptions o;
  o.num_tokens = 300;
  o.head_dim = 64;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.group_size = 3;
  o.num_queries = 5;
  return GenerateSynthetic(o);
}

TEST(Trace, WriteThenReadRoundTripsExactly) {
  TempDir dir;
  const Trace t = Small();
  const std::string path = dir.path() + "/t.ictrace";
  ASSERT_OK(WriteTrace(t, path));
  ASSERT_OK_AND_ASSIGN(Trace r, ReadTrace(path));
  EXPECT_EQ(r.description, t.description);
  EXPECT_EQ(r.num_layers, 2u);
  EXPECT_EQ(r.num_q_heads, 6u);
  EXPECT_EQ(r.group_size(), 3u);
  EXPECT_EQ(r.query_positions, t.query_positions);
  EXPECT_EQ(r.keys, t.keys);
  EXPECT_EQ(r.values, t.values);
  EXPECT_EQ(r.queries, t.queries);
  EXPECT_EQ(std::memcmp(r.Keys(1, 1).row(7), t.Keys(1, 1).row(7), 128), 0);
}

TEST(Trace, BadFilesGetClearErrors) {
  TempDir dir;
  EXPECT_THAT(ReadTrace(dir.path() + "/missing"), StatusIs(absl::StatusCode::kNotFound));
  const std::string junk = dir.path() + "/junk";
  std::ofstream(junk) << std::string(200, 'x');
  EXPECT_THAT(ReadTrace(junk), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("bad magic")));
  std::ofstream(dir.path() + "/short") << "IC";
  EXPECT_THAT(ReadTrace(dir.path() + "/short"), StatusIs(absl::StatusCode::kDataLoss));
  const std::string path = dir.path() + "/t";
  ASSERT_OK(WriteTrace(Small(), path));
  std::string bytes = ::icecache::testing::ReadFile(path);
  std::ofstream(path + ".cut", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  EXPECT_THAT(ReadTrace(path + ".cut"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("truncated")));
  bytes[8] = 9;  // version
  std::ofstream(path + ".ver", std::ios::binary) << bytes;
  EXPECT_THAT(ReadTrace(path + ".ver"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("version 9")));
  Trace bad = Small();
  bad.keys.pop_back();
  EXPECT_THAT(WriteTrace(bad, path), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(Quality, RecallAndOutputErrorOfSimpleCases) {
  // Two keys, the query aligned with the first; values distinct.
  const float keys[2][4] = {{4, 0, 0, 0}, {0, 4, 0, 0}};
  const float values[2][4] = {{1, 0, 0, 0}, {0, 1, 0, 0}};
  const float q[4] = {1, 0, 0, 0};
  RowView k{keys, ElemType::kF32, 4, 2, 0}, v{values, ElemType::kF32, 4, 2, 0};
  FullAttention full;
  ComputeFullAttention(q, k, &v, 2, &full);
  // logits 4/2 = 2 and 0: p0 = e^2 / (e^2 + 1).
  const double p0 = std::exp(2.0) / (std::exp(2.0) + 1);
  EXPECT_NEAR(full.probs[0], p0, 1e-9);
  EXPECT_NEAR(AttentionRecall(full, {0}), p0, 1e-9);
  EXPECT_NEAR(AttentionRecall(full, {0, 1}), 1.0, 1e-12);
  EXPECT_NEAR(OutputError(full, v, {0, 1}), 0.0, 1e-12);
  // Only token 0: output (1,0) against (p0, 1-p0).
  const double expected =
      std::sqrt((1 - p0) * (1 - p0) * 2) / std::sqrt(p0 * p0 + (1 - p0) * (1 - p0));
  EXPECT_NEAR(OutputError(full, v, {0}), expected, 1e-9);
}

TEST(Synthetic, IsDeterministicAndShaped) {
  const Trace a = Small(), b = Small();
  EXPECT_EQ(a.keys, b.keys);
  EXPECT_EQ(a.queries, b.queries);
  EXPECT_EQ(a.query_positions, (std::vector<uint32_t>{295, 296, 297, 298, 299}));
  EXPECT_OK(ValidateTrace(a));
  SyntheticOptions o;
  o.num_tokens = 300;
  o.seed = 2;
  EXPECT_NE(GenerateSynthetic(o).keys, a.keys);
}

TEST(Rope, RotatesPairsByPositionTimesFrequency) {
  float x[4] = {1, 0, 1, 0};
  ApplyRope(x, 4, 3, 10000.f);
  EXPECT_NEAR(x[0], std::cos(3.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(3.0), 1e-6);
  EXPECT_NEAR(x[2], std::cos(3.0 / 100), 1e-6);  // 10000^(-2/4) = 1/100
  EXPECT_NEAR(x[3], std::sin(3.0 / 100), 1e-6);
}

}  // namespace
}  // namespace icecache::eval
