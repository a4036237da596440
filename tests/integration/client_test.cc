// The client library end to end in CPU mode: the real icecached as a subprocess, the real
// Client over its sockets and shared memory, every output checked against float64 attention
// computed here from the same K/V.
#include "icecache/client.h"

#include <signal.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/client_data.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

namespace v1 = ::icecache::v1;
using ::testing::HasSubstr;

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DaemonConfig config;
    config.extra_args = {"--recall-sample-every=0"};
    auto d = DaemonProcess::Start(dir_.path(), config);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
  }

  std::unique_ptr<Client> Connect(ClientOptions o = {}) {
    o.socket = daemon_->socket_path();
    if (o.mode == ExecutionMode::kAuto) o.mode = ExecutionMode::kCpu;
    auto c = Client::Attach(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  static SequenceOptions Options(const Data& data, uint32_t budget, uint32_t full_kv_layers) {
    SequenceOptions o;
    o.num_layers = data.layers;
    o.num_q_heads = data.q_heads();
    o.num_kv_heads = data.kv;
    o.head_dim = data.d;
    o.dtype = data.dtype;
    o.max_tokens = data.tokens;
    o.page_size = 16;
    o.sink_tokens = 16;
    o.window_tokens = 32;
    o.budget_tokens = budget;
    o.full_kv_layers = full_kv_layers;
    o.label = "client-test";
    return o;
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
};

// ---- with a budget covering every token, the output is full attention

struct FullCase {
  DType dtype;
  uint32_t prompt;
};

class ClientFullBudgetTest : public ClientTest, public ::testing::WithParamInterface<FullCase> {};

TEST_P(ClientFullBudgetTest, EveryStepEqualsFullAttention) {
  const FullCase c = GetParam();
  constexpr uint32_t kSteps = 40;  // crosses three window hand-overs per layer
  const Data data = MakeData(3, 2, 2, 64, c.prompt + kSteps, c.dtype);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_EQ(client->mode(), ExecutionMode::kCpu);
  auto seq = client->CreateSequence(Options(data, 2048, 1));
  ASSERT_TRUE(seq.ok()) << seq.status();
  Sequence& s = **seq;
  EXPECT_EQ(s.geometry().selected_pages(), (2048u - 16 - 32) / 16);
  for (uint32_t l = 0; l < data.layers; ++l) {
    ASSERT_OK(s.Prefill(l, data.K(l, 0), data.V(l, 0), c.prompt));
  }
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  double worst = 0;
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = c.prompt + step;
    for (uint32_t l = 0; l < data.layers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      std::fill(out.begin(), out.end(), 0x7fff);  // poison
      ASSERT_OK(s.Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out.data()))
          << "step " << step << " layer " << l;
      EXPECT_EQ(s.last_decode().attended_tokens, (pos + 1) * data.kv)
          << "step " << step << " layer " << l;
      EXPECT_EQ(s.last_decode().full_kv, l == 0);
      for (uint32_t qh = 0; qh < data.q_heads(); ++qh) {
        const std::vector<double> ref = Attend(data, l, q, qh, Iota(pos + 1));
        for (uint32_t i = 0; i < data.d; ++i) {
          const double got = data.ToFloat(out[size_t{qh} * data.d + i]);
          ASSERT_NEAR(got, ref[i], Tolerance(c.dtype, ref[i]))
              << "step " << step << " layer " << l << " q head " << qh << " dim " << i;
          worst = std::max(worst, std::fabs(got - ref[i]));
        }
      }
    }
    EXPECT_EQ(s.tokens(0), pos + 1);
  }
  const ClientCounters counters = client->counters();
  EXPECT_EQ(counters.decode_steps, uint64_t{kSteps} * data.layers);
  if (c.prompt > 32) {
    EXPECT_GT(counters.cache_hits, 0u);
    EXPECT_GT(counters.cache_misses, 0u);
  }
  EXPECT_EQ(counters.fetched_bytes, counters.cache_misses * 2 * 16 * data.d * 2);
  RecordProperty("worst_abs_error", absl::StrCat(worst));
}

INSTANTIATE_TEST_SUITE_P(Prompts, ClientFullBudgetTest,
                         ::testing::Values(FullCase{DType::kBF16, 500}, FullCase{DType::kFP16, 500},
                                           FullCase{DType::kBF16, 10},  // shorter than the sink
                                           FullCase{DType::kFP16,
                                                    60}),  // sink + 31 window + 13 offloaded
                         [](const ::testing::TestParamInfo<FullCase>& p) {
                           return absl::StrCat(DTypeName(p.param.dtype), "_prompt", p.param.prompt);
                         });

// ---- with a small budget: attention over exactly what was selected, error bounded by recall

TEST_F(ClientTest, SmallBudgetAttendsSinkWindowAndSelectedPagesOnly) {
  constexpr uint32_t kPrompt = 2000, kSteps = 24, kBudget = 128;
  const Data data = MakeData(2, 2, 4, 64, kPrompt + kSteps, DType::kBF16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  SequenceOptions o = Options(data, kBudget, 0);
  o.tail_estimate = TailEstimate::kNone;  // the paper's attention: the attended rows only
  auto seq = client->CreateSequence(o);
  ASSERT_TRUE(seq.ok()) << seq.status();
  Sequence& s = **seq;
  EXPECT_EQ(s.geometry().tail_estimate, TailEstimate::kNone);
  const uint32_t k_sel = s.geometry().selected_pages();
  ASSERT_EQ(k_sel, 5u);
  for (uint32_t l = 0; l < data.layers; ++l) {
    ASSERT_OK(s.Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  }
  // Key row bytes -> position, per (layer, head), to identify the attended rows.
  std::vector<std::vector<std::unordered_map<std::string, uint32_t>>> where(data.layers);
  for (uint32_t l = 0; l < data.layers; ++l) {
    where[l].resize(data.kv);
    for (uint32_t t = 0; t < data.tokens; ++t) {
      for (uint32_t h = 0; h < data.kv; ++h) {
        const char* row = reinterpret_cast<const char*>(data.K(l, t) + size_t{h} * data.d);
        where[l][h].emplace(std::string(row, data.d * 2), t);
      }
    }
  }
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  double mass_sum = 0, streaming_sum = 0;
  uint64_t mass_n = 0;
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    for (uint32_t l = 0; l < data.layers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK(s.Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out.data()));
      const DecodeBreakdown& b = s.last_decode();
      EXPECT_EQ(b.selected_pages, k_sel * data.kv);
      EXPECT_EQ(b.hits + b.misses, b.selected_pages);
      uint32_t attended_rows = 0;
      for (uint32_t h = 0; h < data.kv; ++h) {
        auto rows = s.LastAttended(l, h);
        ASSERT_TRUE(rows.ok()) << rows.status();
        attended_rows += rows->count;
        ASSERT_LE(rows->count, kBudget);
        std::set<uint32_t> attended;
        std::vector<uint32_t> positions;
        for (uint32_t r = 0; r < rows->count; ++r) {
          const std::string key(reinterpret_cast<const char*>(&rows->k[size_t{r} * data.d]),
                                data.d * 2);
          auto it = where[l][h].find(key);
          ASSERT_NE(it, where[l][h].end()) << "an attended K row is no token's key";
          const uint32_t p = it->second;
          ASSERT_LE(p, pos) << "a future token was attended";
          ASSERT_EQ(std::memcmp(&rows->v[size_t{r} * data.d], data.V(l, p) + size_t{h} * data.d,
                                data.d * 2),
                    0)
              << "the V row of position " << p << " does not match its key";
          ASSERT_TRUE(attended.insert(p).second) << "position " << p << " attended twice";
          positions.push_back(p);
        }
        for (uint32_t p = 0; p < 16; ++p) EXPECT_EQ(attended.count(p), 1u) << "sink " << p;
        // The window holds the last 17 to 32 positions.
        for (uint32_t p = pos - 16; p <= pos; ++p) {
          EXPECT_EQ(attended.count(p), 1u) << "window " << p;
        }
        std::sort(positions.begin(), positions.end());
        const std::vector<uint32_t> all = Iota(pos + 1);
        for (uint32_t g = 0; g < data.group; ++g) {
          const uint32_t qh = h * data.group + g;
          const std::vector<double> restricted = Attend(data, l, q, qh, positions);
          const std::vector<double> full = Attend(data, l, q, qh, all);
          const double mass = Mass(data, l, q, qh, all, attended);
          mass_sum += mass;
          ++mass_n;
          // StreamingLLM's share: sink and window alone.
          std::set<uint32_t> streaming;
          for (uint32_t p = 0; p < 16; ++p) streaming.insert(p);
          for (uint32_t p = pos - 31; p <= pos; ++p) streaming.insert(p);
          streaming_sum += Mass(data, l, q, qh, all, streaming);
          double vmax = 0;
          for (uint32_t t = 0; t <= pos; ++t) {
            for (uint32_t i = 0; i < data.d; ++i) {
              vmax = std::max(
                  vmax, std::fabs(double{data.ToFloat(data.V(l, t)[size_t{h} * data.d + i])}));
            }
          }
          for (uint32_t i = 0; i < data.d; ++i) {
            const double got = data.ToFloat(out[size_t{qh} * data.d + i]);
            // Exactly the attention over the attended rows...
            ASSERT_NEAR(got, restricted[i], Tolerance(data.dtype, restricted[i]))
                << "step " << step << " layer " << l << " q head " << qh;
            // ...and away from full attention by at most what the missed mass allows:
            // |o - o_A| = (1 - m) |o_rest - o_A| <= 2 (1 - m) max|v|.
            EXPECT_LE(std::fabs(got - full[i]),
                      2 * (1 - mass) * vmax + Tolerance(data.dtype, full[i]));
          }
        }
      }
      EXPECT_EQ(attended_rows, b.attended_tokens);
    }
  }
  const double mean_mass = mass_sum / static_cast<double>(mass_n);
  const double mean_streaming = streaming_sum / static_cast<double>(mass_n);
  RecordProperty("mean_attended_mass", absl::StrCat(mean_mass));
  RecordProperty("mean_streaming_mass", absl::StrCat(mean_streaming));
  // The selected pages (5 per head, ~4% of the tokens) must carry far more than their share
  // of the mass: sink + a 32-token window alone (the StreamingLLM baseline, at least the
  // window the client keeps) capture much less.
  EXPECT_GT(mean_mass, mean_streaming + 0.25) << "streaming " << mean_streaming;
  EXPECT_LE(mean_mass, 1.0);
}

// ---- the tail estimate (the daemon's default): the unselected pages' estimated share

// Two sequences over the same tokens and queries, through a real daemon, at the same small
// budget: the default (MEAN_VAR tail estimate) and none. Both attend the same rows; the one
// with the estimate adds the unselected pages' estimated contribution, so its output is
// closer to full attention on every layer, summed over the steps.
TEST_F(ClientTest, TheTailEstimateBringsTheOutputCloserToFullAttention) {
  constexpr uint32_t kPrompt = 2000, kSteps = 12, kBudget = 128;
  const Data data = MakeData(2, 2, 4, 64, kPrompt + kSteps, DType::kFP16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  auto with = client->CreateSequence(Options(data, kBudget, 0));
  ASSERT_TRUE(with.ok()) << with.status();
  SequenceOptions o = Options(data, kBudget, 0);
  o.tail_estimate = TailEstimate::kNone;
  auto without = client->CreateSequence(o);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_EQ((*with)->geometry().tail_estimate, TailEstimate::kMeanVariance);
  for (uint32_t l = 0; l < data.layers; ++l) {
    ASSERT_OK((*with)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
    ASSERT_OK((*without)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  }
  std::vector<uint16_t> a(size_t{data.q_heads()} * data.d), b(a.size());
  std::vector<double> err_with(data.layers, 0.0), err_without(data.layers, 0.0);
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    const std::vector<uint32_t> all = Iota(pos + 1);
    for (uint32_t l = 0; l < data.layers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK((*with)->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), a.data()));
      ASSERT_OK((*without)->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), b.data()));
      for (uint32_t qh = 0; qh < data.q_heads(); ++qh) {
        const std::vector<double> full = Attend(data, l, q, qh, all);
        for (uint32_t i = 0; i < data.d; ++i) {
          const size_t at = size_t{qh} * data.d + i;
          err_with[l] += std::fabs(data.ToFloat(a[at]) - full[i]);
          err_without[l] += std::fabs(data.ToFloat(b[at]) - full[i]);
        }
      }
    }
  }
  for (uint32_t l = 0; l < data.layers; ++l) {
    RecordProperty(absl::StrCat("l1_error_layer", l, "_with_tail"), absl::StrCat(err_with[l]));
    RecordProperty(absl::StrCat("l1_error_layer", l, "_without"), absl::StrCat(err_without[l]));
    EXPECT_LT(err_with[l], err_without[l]) << "layer " << l;
  }
}

// ---- the page cache: a page resident at the same version is not moved again

TEST_F(ClientTest, RepeatedQueryHitsTheCacheAndTheDaemonExportsTheCounters) {
  constexpr uint32_t kPrompt = 1500;
  const Data data = MakeData(1, 2, 2, 64, kPrompt + 8, DType::kFP16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  auto seq = client->CreateSequence(Options(data, 256, 0));
  ASSERT_TRUE(seq.ok()) << seq.status();
  Sequence& s = **seq;
  ASSERT_OK(s.Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  const std::vector<uint16_t> q = data.Query(0, 0);
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  const uint32_t k_sel = s.geometry().selected_pages();
  ASSERT_OK(s.Decode(0, q.data(), data.K(0, kPrompt), data.V(0, kPrompt), out.data()));
  EXPECT_EQ(s.last_decode().misses, k_sel * data.kv);
  EXPECT_EQ(s.last_decode().hits, 0u);
  EXPECT_EQ(client->counters().fetched_bytes, uint64_t{k_sel} * data.kv * 2 * 16 * 64 * 2);
  // The first step filled the window and handed its oldest page over; the second finishes
  // that insert (which may rewrite pages: new versions are refetched). Then 14 steps go by
  // without an insert: the same query selects the same pages, all resident.
  ASSERT_OK(s.Decode(0, q.data(), data.K(0, kPrompt + 1), data.V(0, kPrompt + 1), out.data()));
  const ClientCounters warm = client->counters();
  EXPECT_EQ(warm.cache_hits + warm.cache_misses, 2u * k_sel * data.kv);
  for (uint32_t step = 2; step < 7; ++step) {
    ASSERT_OK(
        s.Decode(0, q.data(), data.K(0, kPrompt + step), data.V(0, kPrompt + step), out.data()));
    EXPECT_EQ(s.last_decode().hits, k_sel * data.kv) << "step " << step;
    EXPECT_EQ(s.last_decode().misses, 0u) << "step " << step;
  }
  const ClientCounters c = client->counters();
  EXPECT_EQ(c.fetched_bytes, warm.fetched_bytes);
  EXPECT_EQ(c.cache_hits, warm.cache_hits + 5u * k_sel * data.kv);
  EXPECT_EQ(c.cache_misses, warm.cache_misses);
  EXPECT_EQ(c.decode_steps, 7u);
  EXPECT_GT(c.hit_rate(), 5.0 / 7.0 - 1e-9);

  // A real scrape of the daemon sees what the client published.
  double hits = -1, steps = -1;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline) {
    auto body = HttpGet(daemon_->metrics_port(), "/metrics");
    ASSERT_TRUE(body.ok()) << body.status();
    hits = MetricValue(*body, "icecache_client_cache_hits_total");
    steps = MetricValue(*body, "icecache_client_decode_steps_total");
    if (hits == static_cast<double>(c.cache_hits) && steps == 7) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(hits, static_cast<double>(c.cache_hits));
  EXPECT_EQ(steps, 7.0);
}

// ---- more layers than request slots: prefills wait for a slot instead of failing

TEST_F(ClientTest, PrefillOfMoreLayersThanRequestSlots) {
  constexpr uint32_t kLayers = 80, kPrompt = 100;
  const Data data = MakeData(kLayers, 1, 2, 64, kPrompt + 1, DType::kBF16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  auto seq = client->CreateSequence(Options(data, 64, 2));
  ASSERT_TRUE(seq.ok()) << seq.status();
  Sequence& s = **seq;
  for (uint32_t l = 0; l < kLayers; ++l) {
    ASSERT_OK(s.Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt)) << "layer " << l;
  }
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t l = 0; l < kLayers; ++l) {
    const std::vector<uint16_t> q = data.Query(l, 0);
    ASSERT_OK(s.Decode(l, q.data(), data.K(l, kPrompt), data.V(l, kPrompt), out.data()))
        << "layer " << l;
  }
  EXPECT_EQ(s.tokens(kLayers - 1), kPrompt + 1);
}

// ---- bad calls get their codes and change nothing

TEST_F(ClientTest, BadCallsGetClearErrors) {
  const Data data = MakeData(2, 2, 2, 64, 300, DType::kBF16);
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  const std::vector<uint16_t> q = data.Query(0, 0);

  ClientOptions bad;
  bad.socket = daemon_->socket_path();
  bad.cache_factor = 0.5;
  EXPECT_THAT(Client::Attach(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  ClientOptions nowhere;
  nowhere.socket = dir_.path() + "/nobody.sock";
  nowhere.mode = ExecutionMode::kCpu;
  EXPECT_THAT(Client::Attach(nowhere).status(), StatusIs(absl::StatusCode::kUnavailable));
  ClientOptions cuda;
  cuda.socket = daemon_->socket_path();
  cuda.mode = ExecutionMode::kCuda;
  cuda.device = 4096;  // no machine has it
  EXPECT_THAT(Client::Attach(cuda).status(), StatusIs(absl::StatusCode::kFailedPrecondition));

  auto client = Connect();
  ASSERT_NE(client, nullptr);
  SequenceOptions no_heads = Options(data, 256, 0);
  no_heads.num_kv_heads = 0;
  EXPECT_THAT(client->CreateSequence(no_heads).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_kv_heads")));

  auto seq = client->CreateSequence(Options(data, 256, 1));
  ASSERT_TRUE(seq.ok()) << seq.status();
  Sequence& s = **seq;
  EXPECT_FALSE(s.handle().empty());
  EXPECT_THAT(s.Decode(0, q.data(), data.K(0, 0), data.V(0, 0), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("prefilled")));
  EXPECT_THAT(s.Prefill(2, data.K(0, 0), data.V(0, 0), 100),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
  EXPECT_THAT(s.Prefill(0, nullptr, data.V(0, 0), 100),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s.Prefill(0, data.K(0, 0), data.V(0, 0), 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s.Prefill(0, data.K(0, 0), data.V(0, 0), 301),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("max_tokens")));
  ASSERT_OK(s.Prefill(0, data.K(0, 0), data.V(0, 0), 299));
  EXPECT_THAT(s.Prefill(0, data.K(0, 0), data.V(0, 0), 299),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("already")));
  EXPECT_THAT(s.Prefill(1, data.K(1, 0), data.V(1, 0), 200),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("same length")));
  ASSERT_OK(s.Prefill(1, data.K(1, 0), data.V(1, 0), 299));
  EXPECT_THAT(s.Decode(0, nullptr, data.K(0, 299), data.V(0, 299), out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(s.Decode(0, q.data(), data.K(0, 299), data.V(0, 299), out.data()));
  EXPECT_THAT(s.Decode(0, q.data(), data.K(0, 299), data.V(0, 299), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("step ahead")));
  ASSERT_OK(s.Decode(1, q.data(), data.K(1, 299), data.V(1, 299), out.data()));
  // max_tokens (300) reached.
  EXPECT_THAT(s.Decode(0, q.data(), data.K(0, 299), data.V(0, 299), out.data()),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("max_tokens")));
  EXPECT_EQ(s.tokens(0), 300u);

  // Drop frees the daemon's sequence; later calls fail cleanly.
  const std::string handle = s.handle();
  ASSERT_OK(s.Drop());
  v1::GetSequenceRequest get;
  get.set_handle(handle);
  v1::GetSequenceResponse got;
  EXPECT_THAT(
      daemon_->stub().GetSequence(ContextWithToken(client->attachment().token()).get(), get, &got),
      GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(s.Decode(1, q.data(), data.K(1, 0), data.V(1, 0), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("dropped")));
  EXPECT_THAT(s.Drop(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(ClientTest, DestroyingASequenceDropsIt) {
  const Data data = MakeData(1, 1, 2, 64, 200, DType::kBF16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  std::string handle;
  {
    auto seq = client->CreateSequence(Options(data, 64, 0));
    ASSERT_TRUE(seq.ok()) << seq.status();
    handle = (*seq)->handle();
    ASSERT_OK((*seq)->Prefill(0, data.K(0, 0), data.V(0, 0), 150));
  }
  v1::GetSequenceRequest get;
  get.set_handle(handle);
  v1::GetSequenceResponse got;
  EXPECT_THAT(
      daemon_->stub().GetSequence(ContextWithToken(client->attachment().token()).get(), get, &got),
      GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
}

// ---- batches through the real daemon

// A batch of sequences of different lengths and budgets, in both selection modes, gives the
// same outputs as each sequence decoded alone (bitwise), and with a budget covering every
// token, float64 full attention.
TEST_F(ClientTest, DecodeBatchEqualsSingleSequencesAndFullAttention) {
  constexpr uint32_t kSteps = 24;
  const std::vector<uint32_t> prompts = {900, 300, 1500};
  const std::vector<uint32_t> budgets = {128, 2048, 256};
  std::vector<Data> data;
  for (size_t i = 0; i < prompts.size(); ++i) {
    data.push_back(MakeData(2, 2, 4, 64, prompts[i] + kSteps, DType::kBF16, 21 + i));
  }
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  std::vector<std::unique_ptr<Sequence>> batch, single;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SequenceOptions so = Options(data[i], budgets[i], 1);
    so.selection = i == 1 ? SelectionMode::kSync : SelectionMode::kAsync;
    auto a = client->CreateSequence(so);
    auto b = client->CreateSequence(so);
    ASSERT_TRUE(a.ok() && b.ok());
    batch.push_back(std::move(*a));
    single.push_back(std::move(*b));
    for (uint32_t l = 0; l < 2; ++l) {
      ASSERT_OK(batch[i]->Prefill(l, data[i].K(l, 0), data[i].V(l, 0), prompts[i]));
      ASSERT_OK(single[i]->Prefill(l, data[i].K(l, 0), data[i].V(l, 0), prompts[i]));
    }
  }
  std::vector<Sequence*> members;
  for (auto& s : batch) members.push_back(s.get());
  const size_t q_elems = size_t{data[0].q_heads()} * data[0].d;
  const size_t kv_elems = size_t{data[0].kv} * data[0].d;
  for (uint32_t step = 0; step < kSteps; ++step) {
    for (uint32_t l = 0; l < 2; ++l) {
      std::vector<uint16_t> q, k, v;
      std::vector<std::vector<uint16_t>> qs;
      for (size_t i = 0; i < batch.size(); ++i) {
        qs.push_back(data[i].Query(l, step));
        q.insert(q.end(), qs[i].begin(), qs[i].end());
        const uint16_t* kr = data[i].K(l, prompts[i] + step);
        const uint16_t* vr = data[i].V(l, prompts[i] + step);
        k.insert(k.end(), kr, kr + kv_elems);
        v.insert(v.end(), vr, vr + kv_elems);
      }
      std::vector<uint16_t> out(q.size());
      std::vector<absl::Status> statuses;
      ASSERT_OK(client->DecodeBatch(l, members, q.data(), k.data(), v.data(), out.data(), nullptr,
                                    &statuses));
      for (size_t i = 0; i < batch.size(); ++i) {
        ASSERT_OK(statuses[i]);
        std::vector<uint16_t> one(q_elems);
        ASSERT_OK(single[i]->Decode(l, qs[i].data(), data[i].K(l, prompts[i] + step),
                                    data[i].V(l, prompts[i] + step), one.data()));
        ASSERT_TRUE(std::equal(one.begin(), one.end(), out.begin() + i * q_elems))
            << "sequence " << i << " layer " << l << " step " << step;
      }
      // Sequence 1's budget (2048) covers its whole context: full attention.
      const uint32_t pos = prompts[1] + step;
      for (uint32_t qh = 0; qh < data[1].q_heads(); ++qh) {
        const std::vector<double> want = Attend(data[1], l, qs[1], qh, Iota(pos + 1));
        for (uint32_t i = 0; i < data[1].d; ++i) {
          ASSERT_NEAR(data[1].ToFloat(out[q_elems + size_t{qh} * data[1].d + i]), want[i],
                      Tolerance(DType::kBF16, want[i]))
              << "layer " << l << " step " << step << " head " << qh;
        }
      }
    }
  }
}

// ---- selection one step ahead (SelectionMode::kAsync) through the real daemon

// With a query that does not move, the pages searched one step ahead are the pages a
// synchronous search finds: the outputs are equal, step by step, in every layer, and every step
// after the first is served by the prefetched select.
TEST_F(ClientTest, AsyncEqualsSyncWhenTheQueryDoesNotMove) {
  constexpr uint32_t kPrompt = 1500, kSteps = 48;
  const Data data = MakeData(3, 2, 4, 64, kPrompt + kSteps, DType::kBF16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  SequenceOptions so = Options(data, 128, 1);
  so.selection = SelectionMode::kSync;
  auto sync = client->CreateSequence(so);
  so.selection = SelectionMode::kAsync;
  auto async = client->CreateSequence(so);
  ASSERT_TRUE(sync.ok() && async.ok());
  for (uint32_t l = 0; l < data.layers; ++l) {
    ASSERT_OK((*sync)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
    ASSERT_OK((*async)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  }
  std::vector<uint16_t> out_s(size_t{data.q_heads()} * data.d), out_a(out_s.size());
  const ClientCounters before = client->counters();
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    for (uint32_t l = 0; l < data.layers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, 0);
      ASSERT_OK((*sync)->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_s.data()));
      ASSERT_OK((*async)->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_a.data()));
      ASSERT_EQ(out_a, out_s) << "layer " << l << " step " << step;
      const DecodeBreakdown& b = (*async)->last_decode();
      if (l > 0) {
        EXPECT_EQ(b.prefetched, step > 0) << "layer " << l << " step " << step;
      }
      EXPECT_EQ(b.drift_fallback_heads, 0u);
    }
  }
  const ClientCounters after = client->counters();
  EXPECT_EQ(after.prefetched_selects - before.prefetched_selects, 2u * (kSteps - 1));
  EXPECT_EQ(after.drift_fallback_heads, before.drift_fallback_heads);
}

// A query that turns around every step: each KV head is searched again with its new query,
// and the output is the synchronous mode's.
TEST_F(ClientTest, AsyncSearchesDriftedHeadsAgain) {
  constexpr uint32_t kPrompt = 1200, kSteps = 10;
  const Data data = MakeData(1, 2, 2, 64, kPrompt + kSteps, DType::kFP16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  SequenceOptions so = Options(data, 128, 0);
  auto sync = client->CreateSequence(so);
  so.selection = SelectionMode::kAsync;
  so.drift_threshold = 0.5f;
  auto async = client->CreateSequence(so);
  ASSERT_TRUE(sync.ok() && async.ok());
  ASSERT_OK((*sync)->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  ASSERT_OK((*async)->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  std::vector<uint16_t> out_s(size_t{data.q_heads()} * data.d), out_a(out_s.size());
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    std::vector<uint16_t> q = data.Query(0, 0);
    if (step % 2 == 1) {
      for (uint16_t& x : q) x = data.FromFloat(-data.ToFloat(x));
    }
    ASSERT_OK((*sync)->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_s.data()));
    ASSERT_OK((*async)->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_a.data()));
    ASSERT_EQ(out_a, out_s) << "step " << step;
    if (step > 0) {
      EXPECT_EQ((*async)->last_decode().drift_fallback_heads, 2u) << step;
    }
  }
  EXPECT_EQ(client->counters().drift_fallback_heads, 2u * (kSteps - 1));
}

// The daemon forgets `handle` within two seconds (an operator lists every client's sequences).
bool SequenceGone(DaemonProcess& daemon, const std::string& handle) {
  auto op = daemon.Attach(/*as_operator=*/true);
  if (!op.ok()) return false;
  for (int i = 0; i < 200; ++i) {
    v1::ListSequencesResponse resp;
    if (!daemon.stub()
             .ListSequences(ContextWithToken((*op)->token()).get(), v1::ListSequencesRequest(),
                            &resp)
             .ok()) {
      return false;
    }
    if (std::none_of(resp.sequences().begin(), resp.sequences().end(),
                     [&](const v1::Sequence& s) { return s.handle() == handle; })) {
      return true;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

// A sequence dropped while a select sent one step ahead and a window hand-over are in flight:
// both are answered and the daemon holds nothing for it.
TEST_F(ClientTest, AsyncDropWithASpeculativeSelectInFlight) {
  constexpr uint32_t kPrompt = 1000;
  const Data data = MakeData(2, 2, 2, 64, kPrompt + 40, DType::kBF16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  SequenceOptions so = Options(data, 128, 0);
  so.selection = SelectionMode::kAsync;
  auto seq = client->CreateSequence(so);
  ASSERT_TRUE(seq.ok()) << seq.status();
  for (uint32_t l = 0; l < 2; ++l)
    ASSERT_OK((*seq)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t step = 0; step <= 16; ++step) {  // steps 0 and 16 hand a page over
    for (uint32_t l = 0; l < 2; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK((*seq)->Decode(l, q.data(), data.K(l, kPrompt + step), data.V(l, kPrompt + step),
                               out.data()));
    }
  }
  const std::string handle = (*seq)->handle();
  ASSERT_OK((*seq)->Drop());
  EXPECT_TRUE(SequenceGone(*daemon_, handle));
}

// A client process killed while a select sent one step ahead and a hand-over are in flight:
// the daemon reaps its sequence and serves the next client.
TEST_F(ClientTest, AsyncClientKilledWithASpeculativeSelectInFlight) {
  auto p = Subprocess::Start(
      {TestClientBinary(), "--socket=" + daemon_->socket_path(), "--mode=async-decode"},
      dir_.path());
  ASSERT_TRUE(p.ok()) << p.status();
  std::string handle;
  for (int i = 0; i < 3000 && handle.empty(); ++i) {
    const std::string out = p->Stdout();
    const size_t at = out.find("in-flight ");
    if (at != std::string::npos && out.find('\n', at) != std::string::npos) {
      handle = out.substr(at + 10, out.find('\n', at) - at - 10);
    } else {
      ASSERT_TRUE(p->Running()) << p->Stdout() << p->Stderr();
      absl::SleepFor(absl::Milliseconds(10));
    }
  }
  ASSERT_FALSE(handle.empty()) << "the client never got there: " << p->Stderr();
  ASSERT_TRUE(p->Signal(SIGKILL));
  ASSERT_TRUE(p->Wait(absl::Seconds(5)).has_value());
  EXPECT_TRUE(SequenceGone(*daemon_, handle));
  // The daemon goes on serving.
  const Data data = MakeData(1, 1, 2, 64, 300, DType::kBF16);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  auto seq = client->CreateSequence(Options(data, 64, 0));
  ASSERT_TRUE(seq.ok()) << seq.status();
  ASSERT_OK((*seq)->Prefill(0, data.K(0, 0), data.V(0, 0), 200));
}

// ---- a long generation stays within what its sequence was promised

// A prompt, then three times as many generated tokens through a real daemon with small
// segments. The prefill's staging segment stays held (the window pages' buffers go to it); the
// page frames the generation adds must still fit the sequence's promise: no segment is added
// beyond it, and the arena keeps a handful of segments (before the fix, the frames ran out of
// room by the staging segment's size and then took one segment per insert until a long run
// used all 256 and failed with RESOURCE_EXHAUSTED).
TEST_F(ClientTest, ALongGenerationStaysWithinItsPromiseInFewSegments) {
  constexpr uint32_t kPrompt = 1024, kSteps = 3072, kBudget = 256;
  const Data data = MakeData(4, 3, 3, 64, kPrompt + kSteps, DType::kFP16);
  daemon_.reset();
  DaemonConfig config;
  config.extra_args = {"--recall-sample-every=0", "--segment-size=4MiB"};
  auto d = DaemonProcess::Start(dir_.path(), config);
  ASSERT_TRUE(d.ok()) << d.status();
  daemon_ = std::move(*d);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  auto seq = client->CreateSequence(Options(data, kBudget, 0));
  ASSERT_TRUE(seq.ok()) << seq.status();
  Sequence& s = **seq;
  for (uint32_t l = 0; l < data.layers; ++l) {
    ASSERT_OK(s.Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  }
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    for (uint32_t l = 0; l < data.layers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK(s.Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out.data()))
          << "step " << step << " layer " << l;
    }
  }
  EXPECT_EQ(s.tokens(0), kPrompt + kSteps);
  auto metrics = HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_EQ(MetricValue(*metrics, "icecache_arena_beyond_promise_segments"), 0);
  const double segments = MetricValue(*metrics, "icecache_arena_segments_max");
  RecordProperty("segments", absl::StrCat(segments));
  // Control + one staging segment + the page frames' ~29 MiB in 4 MiB segments.
  EXPECT_GE(segments, 3);
  EXPECT_LE(segments, 12);
}

}  // namespace
}  // namespace icecache::testing
