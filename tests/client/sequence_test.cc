// The client's Sequence on the CPU backend against the in-process fake daemon (the real page
// store and index, no sockets): what it attends, when it hands window pages over, how it
// handles full request slots and failed daemon operations.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/decoder.h"
#include "client/sequence_impl.h"
#include "selection/tail.h"
#include "tests/integration/client_data.h"
#include "tests/support/fake_daemon.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

class SequenceTest : public ::testing::Test {
 protected:
  void SetUp() override { backend_ = client_internal::CreateCpuBackend(2); }

  std::unique_ptr<Sequence> Make(FakeDaemon* daemon, const Data& data, uint32_t budget,
                                 uint32_t full_kv_layers,
                                 SelectionMode selection = SelectionMode::kSync,
                                 float drift_threshold = 0.9f,
                                 std::optional<selection::TailMode> tail = std::nullopt) {
    GeometrySpec spec;
    spec.num_layers = data.layers;
    spec.num_q_heads = data.q_heads();
    spec.num_kv_heads = data.kv;
    spec.head_dim = data.d;
    spec.dtype = data.dtype;
    spec.max_tokens = data.tokens;
    spec.budget_tokens = budget;
    spec.page_size = 16;  // the positions and counts below are in pages of 16 (2 sink, 2 window)
    spec.full_kv_layers = full_kv_layers;
    spec.tail = tail;
    absl::StatusOr<client_internal::SequenceContext> c =
        daemon->CreateSequence(spec, backend_.get());
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return nullptr;
    c->selection = selection;
    c->drift_threshold = drift_threshold;
    auto s = client_internal::SequenceFactory::Create(*c);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  std::unique_ptr<client_internal::Backend> backend_;
};

// A budget above the context attends every token: the output is float64 full attention, in
// the full-KV layer and in the offloaded one; the window hands a page over every 16 steps.
TEST_F(SequenceTest, FullBudgetEqualsFullAttentionAndHandsPagesOver) {
  constexpr uint32_t kPrompt = 300, kSteps = 40;
  const Data data = MakeData(2, 2, 2, 64, kPrompt + kSteps, DType::kFP16);
  FakeDaemon daemon;
  auto seq = Make(&daemon, data, 1024, 1);
  ASSERT_NE(seq, nullptr);
  for (uint32_t l = 0; l < 2; ++l) ASSERT_OK(seq->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  // One prefill op: the offloaded layer's [32, 269).
  EXPECT_EQ(daemon.requests(abi::kOpPrefill), 1u);
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    for (uint32_t l = 0; l < 2; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK(seq->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out.data()));
      EXPECT_EQ(seq->last_decode().attended_tokens, (pos + 1) * data.kv) << "step " << step;
      for (uint32_t qh = 0; qh < data.q_heads(); ++qh) {
        const std::vector<double> want = Attend(data, l, q, qh, Iota(pos + 1));
        for (uint32_t i = 0; i < data.d; ++i) {
          ASSERT_NEAR(data.ToFloat(out[size_t{qh} * data.d + i]), want[i],
                      Tolerance(data.dtype, want[i]))
              << "layer " << l << " step " << step << " head " << qh << " dim " << i;
        }
      }
    }
  }
  // Window pages [269, 285), [285, 301), [301, 317) handed over at positions 300, 316, 332.
  EXPECT_THAT(daemon.append_positions(), ::testing::ElementsAre(269, 285, 301));
  EXPECT_EQ(seq->tokens(0), kPrompt + kSteps);
  EXPECT_EQ(seq->tokens(1), kPrompt + kSteps);
  // KV kept client-side: the full layer's [2][340] rows, the offloaded layer's sink (32),
  // ring (48) and page cache (2 x 60 pages of 16) rows, K and V, 128-byte rows.
  EXPECT_EQ(seq->kv_device_bytes(), 2u * 128 * 2 * (340 + 32 + 48 + 2 * 60 * 16));
  ASSERT_OK(seq->Drop());
  EXPECT_FALSE(daemon.has_sequence(seq->handle()));
  EXPECT_THAT(seq->Drop(), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(daemon.staging_bytes_in_use(), 0u);
}

// A prefill that fails after its layer's buffers were allocated (no staging buffer) can be
// made again: the retry reallocates the layer, and the device bytes counted are one layer's,
// not two (they were counted again at each try).
TEST_F(SequenceTest, APrefillRetriedAfterAFailedStageCountsItsBuffersOnce) {
  constexpr uint32_t kPrompt = 300;
  const Data data = MakeData(2, 2, 2, 64, kPrompt + 40, DType::kFP16);
  FakeDaemon daemon;
  auto seq = Make(&daemon, data, 1024, 1);
  ASSERT_NE(seq, nullptr);
  ASSERT_OK(seq->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  daemon.FailNext(abi::kOpStage, absl::ResourceExhaustedError("no staging room"));
  EXPECT_THAT(seq->Prefill(1, data.K(1, 0), data.V(1, 0), kPrompt),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("no staging room")));
  ASSERT_OK(seq->Prefill(1, data.K(1, 0), data.V(1, 0), kPrompt));
  EXPECT_EQ(daemon.requests(abi::kOpPrefill), 1u);
  EXPECT_EQ(seq->kv_device_bytes(), 2u * 128 * 2 * (340 + 32 + 48 + 2 * 60 * 16));
  // And the retried layer decodes as a layer prefilled once: full attention.
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  const std::vector<uint16_t> q = data.Query(1, 0);
  ASSERT_OK(
      seq->Decode(0, data.Query(0, 0).data(), data.K(0, kPrompt), data.V(0, kPrompt), out.data()));
  ASSERT_OK(seq->Decode(1, q.data(), data.K(1, kPrompt), data.V(1, kPrompt), out.data()));
  for (uint32_t qh = 0; qh < data.q_heads(); ++qh) {
    const std::vector<double> want = Attend(data, 1, q, qh, Iota(kPrompt + 1));
    for (uint32_t i = 0; i < data.d; ++i) {
      ASSERT_NEAR(data.ToFloat(out[size_t{qh} * data.d + i]), want[i],
                  Tolerance(data.dtype, want[i]))
          << "head " << qh << " dim " << i;
    }
  }
  ASSERT_OK(seq->Drop());
  EXPECT_EQ(daemon.staging_bytes_in_use(), 0u);
}

// The float64 attention of query head qh over the rows the last Decode of `layer` attended
// for its KV head, merged with the tail partial `tail` ([2 + d], may be empty) by the
// reference formula (selection::MergeTail).
std::vector<double> AttendedWithTail(const Sequence& seq, const Data& data, uint32_t layer,
                                     const std::vector<uint16_t>& q, uint32_t qh,
                                     const float* tail) {
  const uint32_t d = data.d;
  absl::StatusOr<Sequence::AttendedRows> rows = seq.LastAttended(layer, qh / data.group);
  EXPECT_TRUE(rows.ok()) << rows.status();
  if (!rows.ok()) return {};
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> s(rows->count);
  double mx = -INFINITY;
  for (uint32_t j = 0; j < rows->count; ++j) {
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) {
      dot += double{data.ToFloat(q[size_t{qh} * d + i])} * data.ToFloat(rows->k[size_t{j} * d + i]);
    }
    s[j] = dot * scale;
    mx = std::max(mx, s[j]);
  }
  double sum = 0;
  std::vector<double> acc(d, 0.0);
  for (uint32_t j = 0; j < rows->count; ++j) {
    const double w = std::exp(s[j] - mx);
    sum += w;
    for (uint32_t i = 0; i < d; ++i) acc[i] += w * data.ToFloat(rows->v[size_t{j} * d + i]);
  }
  std::vector<float> out(d);
  for (uint32_t i = 0; i < d; ++i) out[i] = static_cast<float>(acc[i] / sum);
  if (tail != nullptr) {
    selection::MergeTail(tail, static_cast<float>(mx), static_cast<float>(sum), d, out.data());
  }
  return std::vector<double>(out.begin(), out.end());
}

// Tail estimation: a sequence whose geometry keeps one gets tail partials with every select
// and its attention merges them. With a small budget the output is the float64 attention over
// exactly what was attended merged with the answer's partials (selection::MergeTail), and it
// differs from the same sequence without a tail estimate; with a budget covering every token
// nothing is unselected, the partials are empty and the outputs equal kNone's bit for bit.
TEST_F(SequenceTest, TailEstimateMergesTheUnselectedPages) {
  constexpr uint32_t kPrompt = 600, kSteps = 6;
  const Data data = MakeData(2, 2, 2, 64, kPrompt + kSteps, DType::kFP16);
  for (uint32_t budget : {128u, 1024u}) {
    FakeDaemon daemon;
    auto none =
        Make(&daemon, data, budget, 1, SelectionMode::kSync, 0.9f, selection::TailMode::kNone);
    auto mean =
        Make(&daemon, data, budget, 1, SelectionMode::kSync, 0.9f, selection::TailMode::kMean);
    auto var = Make(&daemon, data, budget, 1, SelectionMode::kSync, 0.9f,
                    selection::TailMode::kMeanVariance);
    ASSERT_NE(none, nullptr);
    ASSERT_NE(mean, nullptr);
    ASSERT_NE(var, nullptr);
    EXPECT_EQ(none->geometry().tail_estimate, TailEstimate::kNone);
    EXPECT_EQ(mean->geometry().tail_estimate, TailEstimate::kMean);
    EXPECT_EQ(var->geometry().tail_estimate, TailEstimate::kMeanVariance);
    EXPECT_FLOAT_EQ(var->geometry().softmax_scale, 0.125f);
    for (Sequence* s : {none.get(), mean.get(), var.get()}) {
      for (uint32_t l = 0; l < 2; ++l)
        ASSERT_OK(s->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
    }
    const size_t row = 2 + data.d;
    std::vector<uint16_t> out_none(size_t{data.q_heads()} * data.d), out(out_none.size());
    uint64_t differing = 0, merged_heads = 0;
    for (uint32_t step = 0; step < kSteps; ++step) {
      const uint32_t pos = kPrompt + step;
      for (uint32_t l = 0; l < 2; ++l) {
        const std::vector<uint16_t> q = data.Query(l, step);
        ASSERT_OK(none->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_none.data()));
        if (l == 1) {
          EXPECT_TRUE(daemon.last_answer(none->handle()).tail.empty());
        }
        for (Sequence* s : {mean.get(), var.get()}) {
          ASSERT_OK(s->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out.data()));
          if (l == 0) {  // full-KV layer: no select, no tail
            ASSERT_EQ(out, out_none) << "step " << step;
            continue;
          }
          const std::vector<float> tail = daemon.last_answer(s->handle()).tail;
          ASSERT_EQ(tail.size(), data.q_heads() * row);
          if (budget == 1024) {
            for (size_t qh = 0; qh < data.q_heads(); ++qh) EXPECT_EQ(tail[qh * row + 1], 0.f);
            ASSERT_EQ(out, out_none) << "step " << step;
            continue;
          }
          for (uint32_t qh = 0; qh < data.q_heads(); ++qh) {
            merged_heads += tail[qh * row + 1] > 0;
            const std::vector<double> want =
                AttendedWithTail(*s, data, l, q, qh, tail.data() + qh * row);
            for (uint32_t i = 0; i < data.d; ++i) {
              const size_t at = size_t{qh} * data.d + i;
              ASSERT_NEAR(data.ToFloat(out[at]), want[i], Tolerance(data.dtype, want[i]))
                  << TailEstimateName(s->geometry().tail_estimate) << " step " << step << " head "
                  << qh << " dim " << i;
              differing += out[at] != out_none[at];
            }
          }
        }
      }
    }
    if (budget == 128) {
      EXPECT_EQ(merged_heads, 2u * kSteps * data.q_heads());  // every head, every step
      EXPECT_GT(differing, 2u * kSteps * data.q_heads() * data.d / 2);
    }
  }
}

// One step ahead (kAsync), the tail partials come with the prefetched pages: those of the
// previous step's query. A query that does not move makes them the same as the synchronous
// mode's, so the outputs are equal; the answers did carry partials.
TEST_F(SequenceTest, AsyncTailPartialsComeWithThePrefetchedPages) {
  constexpr uint32_t kPrompt = 600, kSteps = 10;
  const Data data = MakeData(1, 2, 2, 64, kPrompt + kSteps, DType::kBF16);
  FakeDaemon daemon;
  auto sync =
      Make(&daemon, data, 128, 0, SelectionMode::kSync, 0.9f, selection::TailMode::kMeanVariance);
  auto async =
      Make(&daemon, data, 128, 0, SelectionMode::kAsync, 0.9f, selection::TailMode::kMeanVariance);
  auto none = Make(&daemon, data, 128, 0, SelectionMode::kAsync, 0.9f, selection::TailMode::kNone);
  ASSERT_NE(sync, nullptr);
  ASSERT_NE(async, nullptr);
  ASSERT_NE(none, nullptr);
  for (Sequence* s : {sync.get(), async.get(), none.get()}) {
    ASSERT_OK(s->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  }
  std::vector<uint16_t> out_s(size_t{data.q_heads()} * data.d), out_a(out_s.size()),
      out_n(out_s.size());
  const std::vector<uint16_t> q = data.Query(0, 0);
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    ASSERT_OK(sync->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_s.data()));
    ASSERT_OK(async->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_a.data()));
    ASSERT_OK(none->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_n.data()));
    EXPECT_EQ(async->last_decode().prefetched, step > 0);
    ASSERT_EQ(out_a, out_s) << "step " << step;
    EXPECT_NE(out_a, out_n) << "step " << step;
    const std::vector<float> tail = daemon.last_answer(async->handle()).tail;
    ASSERT_EQ(tail.size(), size_t{data.q_heads()} * (2 + data.d));
    EXPECT_GT(tail[1], 0.f);
  }
}

// Answers that come late (the daemon still building when the first decode needs the layer)
// are waited for, in the order the layers need them.
TEST_F(SequenceTest, DeferredAnswersAreWaitedFor) {
  constexpr uint32_t kPrompt = 500;
  const Data data = MakeData(3, 1, 2, 64, kPrompt + 20, DType::kBF16);
  FakeDaemon daemon;
  daemon.set_deferred(true);
  auto seq = Make(&daemon, data, 128, 0);
  ASSERT_NE(seq, nullptr);
  for (uint32_t l = 0; l < 3; ++l) ASSERT_OK(seq->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  EXPECT_EQ(daemon.outstanding(), 3u);  // three builds not answered yet
  daemon.Answer(3);                     // the last layer's build answers first
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t step = 0; step < 20; ++step) {
    for (uint32_t l = 0; l < 3; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK(seq->Decode(l, q.data(), data.K(l, kPrompt + step), data.V(l, kPrompt + step),
                            out.data()));
      EXPECT_EQ(seq->last_decode().selected_pages, 4u);  // (128 - 64) / 16 pages, 1 head
    }
  }
}

// With two request slots, three layers' prefills still go through: the third waits for the
// oldest pending operation instead of failing.
TEST_F(SequenceTest, FullSlotsFinishTheOldestPendingOperation) {
  constexpr uint32_t kPrompt = 400;
  const Data data = MakeData(3, 1, 2, 64, kPrompt + 4, DType::kBF16);
  FakeDaemon daemon(FakeDaemon::Options{.slots = 2});
  daemon.set_deferred(true);
  auto seq = Make(&daemon, data, 128, 0);
  ASSERT_NE(seq, nullptr);
  for (uint32_t l = 0; l < 3; ++l) ASSERT_OK(seq->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  EXPECT_EQ(daemon.requests(abi::kOpPrefill), 3u);
  EXPECT_LE(daemon.outstanding(), 2u);
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t l = 0; l < 3; ++l) {
    const std::vector<uint16_t> q = data.Query(l, 0);
    ASSERT_OK(seq->Decode(l, q.data(), data.K(l, kPrompt), data.V(l, kPrompt), out.data()));
  }
}

// A daemon operation that fails fails its layer, with the daemon's message and the layer's
// number; the staging buffer goes back; other layers go on.
TEST_F(SequenceTest, AFailedAppendFailsItsLayer) {
  constexpr uint32_t kPrompt = 200;
  const Data data = MakeData(2, 1, 2, 64, kPrompt + 40, DType::kBF16);
  FakeDaemon daemon;
  daemon.set_deferred(true);
  auto seq = Make(&daemon, data, 128, 0);
  ASSERT_NE(seq, nullptr);
  for (uint32_t l = 0; l < 2; ++l) ASSERT_OK(seq->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  auto decode = [&](uint32_t l, uint32_t step) {
    const std::vector<uint16_t> q = data.Query(l, step);
    return seq->Decode(l, q.data(), data.K(l, kPrompt + step), data.V(l, kPrompt + step),
                       out.data());
  };
  // Step 0 of layer 0 hands its first window page over; that append will fail.
  daemon.FailNext(abi::kOpAppend, absl::DataLossError("the disk is on fire"));
  ASSERT_OK(decode(0, 0));
  ASSERT_OK(decode(1, 0));
  EXPECT_THAT(decode(0, 1),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("layer 0: the disk is on fire")));
  EXPECT_THAT(decode(0, 1),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("layer 0 failed earlier")));
  ASSERT_OK(decode(1, 1));  // the other layer is fine
  EXPECT_EQ(daemon.requests(abi::kOpRelease), 1u) << "the failed append's staging went back";
}

// The worst error of `out` beyond the tolerance against float64 full attention at `pos`
// (0 when every element is within it).
double ErrorBeyondFullAttention(const Data& data, uint32_t l, const std::vector<uint16_t>& q,
                                uint32_t pos, const std::vector<uint16_t>& out) {
  double worst = 0;
  for (uint32_t qh = 0; qh < data.q_heads(); ++qh) {
    const std::vector<double> want = Attend(data, l, q, qh, Iota(pos + 1));
    for (uint32_t i = 0; i < data.d; ++i) {
      const double e = std::fabs(data.ToFloat(out[size_t{qh} * data.d + i]) - want[i]);
      if (e > Tolerance(data.dtype, want[i])) worst = std::max(worst, e);
    }
  }
  return worst;
}

// A step whose select fails changes nothing, as the error says: the token is decoded again and
// the window hands the same page over. (Before, the failed step's Append stayed: a page handed
// over by it never reached the index and, 16 steps later, every step failed "the window ring
// is full".)
TEST_F(SequenceTest, ARetryAfterAFailedSelectHandsTheSamePageOver) {
  for (SelectionMode mode : {SelectionMode::kSync, SelectionMode::kAsync}) {
    SCOPED_TRACE(mode == SelectionMode::kSync ? "sync" : "async");
    constexpr uint32_t kPrompt = 300, kSteps = 40;
    const Data data = MakeData(1, 2, 2, 64, kPrompt + kSteps, DType::kFP16);
    FakeDaemon daemon;
    auto seq = Make(&daemon, data, 1024, 0, mode);  // the budget covers every token
    ASSERT_NE(seq, nullptr);
    ASSERT_OK(seq->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
    std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
    for (uint32_t step = 0; step < kSteps; ++step) {
      const uint32_t pos = kPrompt + step;
      const std::vector<uint16_t> q = data.Query(0, step);
      if (step == 16) {  // the step that hands a window page over
        daemon.FailNext(abi::kOpSelectBatch, absl::UnavailableError("transient"));
        EXPECT_THAT(seq->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out.data()),
                    StatusIs(absl::StatusCode::kUnavailable, HasSubstr("transient")));
        EXPECT_EQ(seq->tokens(0), pos);
      }
      ASSERT_OK(seq->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out.data()))
          << "step " << step;
      EXPECT_EQ(seq->tokens(0), pos + 1);
      EXPECT_EQ(seq->last_decode().attended_tokens, (pos + 1) * data.kv) << "step " << step;
      EXPECT_EQ(ErrorBeyondFullAttention(data, 0, q, pos, out), 0.0) << "step " << step;
    }
    // Every page went to the index once, in order, none skipped.
    const std::vector<uint32_t>& appends = daemon.append_positions();
    ASSERT_GE(appends.size(), 2u);
    for (size_t i = 1; i < appends.size(); ++i) EXPECT_EQ(appends[i], appends[i - 1] + 16);
  }
}

// A step that fails in its plan, after it placed some pages in the layer's cache, leaves none
// there as resident: their gather never ran. (Before, the retry and every later step counted
// them as hits and attended whatever their cache slots held.)
TEST_F(SequenceTest, APlanThatFailsLeavesNoUnfetchedPageInTheCache) {
  constexpr uint32_t kPrompt = 300, kSteps = 6;
  const Data data = MakeData(1, 2, 2, 64, kPrompt + kSteps, DType::kFP16);
  FakeDaemon daemon;
  auto seq = Make(&daemon, data, 1024, 0);
  ASSERT_NE(seq, nullptr);
  ASSERT_OK(seq->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    const std::vector<uint16_t> q = data.Query(0, step);
    if (step == 1) {
      daemon.SpoilNextSelect();
      EXPECT_THAT(seq->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out.data()),
                  StatusIs(absl::StatusCode::kInternal, HasSubstr("valid count")));
    }
    ASSERT_OK(seq->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out.data()))
        << "step " << step;
    const DecodeBreakdown& b = seq->last_decode();
    if (step <= 1) {
      EXPECT_EQ(b.hits, 0u) << "step " << step << ": nothing cached is trusted";
    } else {
      EXPECT_EQ(b.misses, 0u) << "step " << step;
    }
    EXPECT_EQ(b.attended_tokens, (pos + 1) * data.kv) << "step " << step;
    EXPECT_EQ(ErrorBeyondFullAttention(data, 0, q, pos, out), 0.0) << "step " << step;
  }
}

// A select sent ahead that finds no scratch buffer (the memory quota) does not fail the step
// it follows, which is done: the next step of the layer searches synchronously instead.
// (Before, Decode returned the error for a step it had kept, and a retry was "a step ahead".)
TEST_F(SequenceTest, NoScratchForTheSelectAheadDoesNotFailTheStep) {
  constexpr uint32_t kPrompt = 300;
  const Data data = MakeData(2, 2, 2, 64, kPrompt + 8, DType::kFP16);
  FakeDaemon daemon;
  auto seq = Make(&daemon, data, 128, 0, SelectionMode::kAsync);
  ASSERT_NE(seq, nullptr);
  for (uint32_t l = 0; l < 2; ++l) ASSERT_OK(seq->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  auto decode = [&](uint32_t l, uint32_t step) {
    const std::vector<uint16_t> q = data.Query(l, step);
    return seq->Decode(l, q.data(), data.K(l, kPrompt + step), data.V(l, kPrompt + step),
                       out.data());
  };
  for (uint32_t l = 0; l < 2; ++l) ASSERT_OK(decode(l, 0));
  daemon.FailNextPrepare(absl::ResourceExhaustedError("no scratch within the quota"));
  ASSERT_OK(decode(0, 1));
  EXPECT_EQ(seq->tokens(0), kPrompt + 2);
  ASSERT_OK(decode(1, 1));
  EXPECT_TRUE(seq->last_decode().prefetched) << "layer 1's select ahead was not affected";
  ASSERT_OK(decode(0, 2));
  EXPECT_FALSE(seq->last_decode().prefetched) << "nothing was sent ahead after step 1";
  ASSERT_OK(decode(1, 2));
  ASSERT_OK(decode(0, 3));
  EXPECT_TRUE(seq->last_decode().prefetched) << "step 2 sent its select ahead again";
  EXPECT_EQ(seq->tokens(0), kPrompt + 4);
  EXPECT_EQ(seq->tokens(1), kPrompt + 3);
}

// One step ahead, with a query that does not move: every step after the first uses the
// prefetched pages, no head falls back, and the outputs equal the synchronous mode's exactly.
TEST_F(SequenceTest, AsyncEqualsSyncWhenTheQueryDoesNotMove) {
  constexpr uint32_t kPrompt = 600, kSteps = 40;
  const Data data = MakeData(2, 2, 2, 64, kPrompt + kSteps, DType::kBF16);
  FakeDaemon daemon;
  auto sync = Make(&daemon, data, 128, 0, SelectionMode::kSync);
  auto async = Make(&daemon, data, 128, 0, SelectionMode::kAsync);
  ASSERT_NE(sync, nullptr);
  ASSERT_NE(async, nullptr);
  for (uint32_t l = 0; l < 2; ++l) {
    ASSERT_OK(sync->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
    ASSERT_OK(async->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  }
  std::vector<uint16_t> out_s(size_t{data.q_heads()} * data.d), out_a(out_s.size());
  uint32_t prefetched = 0;
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    for (uint32_t l = 0; l < 2; ++l) {
      const std::vector<uint16_t> q = data.Query(l, 0);  // the same query every step
      ASSERT_OK(sync->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_s.data()));
      ASSERT_OK(async->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_a.data()));
      ASSERT_EQ(out_a, out_s) << "layer " << l << " step " << step;
      const DecodeBreakdown& b = async->last_decode();
      EXPECT_EQ(b.prefetched, step > 0) << "step " << step;
      EXPECT_EQ(b.drift_fallback_heads, 0u);
      if (b.prefetched) {
        ++prefetched;
        EXPECT_EQ(b.select_us, 0.0) << "no synchronous search";
      }
    }
  }
  EXPECT_EQ(prefetched, 2 * (kSteps - 1));
  // The hand-overs are the same in both modes: pages of the two sequences, each layer.
  const std::vector<uint32_t>& appended = daemon.append_positions();
  EXPECT_EQ(std::count(appended.begin(), appended.end(), 569u), 4);
  EXPECT_EQ(std::count(appended.begin(), appended.end(), 585u), 4);
  EXPECT_EQ(daemon.masked_selects(), 0u);
}

// A query that moves every step in one KV head: that head falls back to a synchronous search
// of its own (a head-masked select), the other keeps its prefetched pages, and the outputs
// equal the synchronous mode's. With the threshold at -1 nothing falls back.
TEST_F(SequenceTest, DriftedHeadsAreSearchedAgain) {
  constexpr uint32_t kPrompt = 600, kSteps = 12;
  const Data data = MakeData(1, 2, 2, 64, kPrompt + kSteps, DType::kFP16);
  for (float threshold : {0.9f, -1.0f}) {
    FakeDaemon daemon;
    auto sync = Make(&daemon, data, 128, 0, SelectionMode::kSync);
    auto async = Make(&daemon, data, 128, 0, SelectionMode::kAsync, threshold);
    ASSERT_OK(sync->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
    ASSERT_OK(async->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
    std::vector<uint16_t> out_s(size_t{data.q_heads()} * data.d), out_a(out_s.size());
    for (uint32_t step = 0; step < kSteps; ++step) {
      const uint32_t pos = kPrompt + step;
      // KV head 0's queries alternate with their negation (cosine -1 between consecutive
      // steps); KV head 1's stay.
      std::vector<uint16_t> q = data.Query(0, 0);
      if (step % 2 == 1) {
        for (size_t i = 0; i < size_t{data.group} * data.d; ++i) {
          q[i] = data.FromFloat(-data.ToFloat(q[i]));
        }
      }
      ASSERT_OK(sync->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_s.data()));
      ASSERT_OK(async->Decode(0, q.data(), data.K(0, pos), data.V(0, pos), out_a.data()));
      const DecodeBreakdown& b = async->last_decode();
      if (step == 0) continue;
      if (threshold > 0) {
        EXPECT_EQ(b.drift_fallback_heads, 1u) << "step " << step;
        EXPECT_GT(b.select_us, 0.0);
        EXPECT_EQ(out_a, out_s) << "step " << step;
      } else {
        EXPECT_EQ(b.drift_fallback_heads, 0u);
      }
    }
    if (threshold > 0) {
      EXPECT_EQ(daemon.masked_selects(), kSteps - 1);
      EXPECT_EQ(daemon.masked_heads(), kSteps - 1);
    } else {
      EXPECT_EQ(daemon.masked_selects(), 0u);
    }
  }
}

// The daemon answers late and out of order (deferred answers, newest first, so the second
// layer's prefetch before the first's): the outputs are those of a daemon that answers at
// once.
TEST_F(SequenceTest, AsyncToleratesLateAndReorderedAnswers) {
  constexpr uint32_t kPrompt = 500, kSteps = 40;
  const Data data = MakeData(2, 1, 2, 64, kPrompt + kSteps, DType::kBF16);
  FakeDaemon prompt_daemon, late_daemon;
  late_daemon.set_deferred(true);
  auto prompt = Make(&prompt_daemon, data, 128, 0, SelectionMode::kAsync);
  auto late = Make(&late_daemon, data, 128, 0, SelectionMode::kAsync);
  for (uint32_t l = 0; l < 2; ++l) {
    ASSERT_OK(prompt->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
    ASSERT_OK(late->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
  }
  std::vector<uint16_t> out_p(size_t{data.q_heads()} * data.d), out_l(out_p.size());
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t pos = kPrompt + step;
    for (client_internal::Ticket t = 400; t > 0; --t) late_daemon.Answer(t);
    for (uint32_t l = 0; l < 2; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      ASSERT_OK(prompt->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_p.data()));
      ASSERT_OK(late->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_l.data()));
      ASSERT_EQ(out_l, out_p) << "layer " << l << " step " << step;
      EXPECT_EQ(late->last_decode().prefetched, prompt->last_decode().prefetched);
    }
  }
  EXPECT_TRUE(late->last_decode().prefetched);
  EXPECT_GT(prompt_daemon.batch_selects(), 0u);
  // Nothing is left waiting once the sequence goes.
  ASSERT_OK(late->Drop());
  EXPECT_EQ(late_daemon.outstanding(), 0u);
  EXPECT_EQ(late_daemon.staging_bytes_in_use(), 0u);
}

// Dropped with a prefetched select and a hand-over in flight: both are answered and freed.
TEST_F(SequenceTest, DropWithASpeculativeSelectInFlight) {
  constexpr uint32_t kPrompt = 500;
  const Data data = MakeData(1, 1, 2, 64, kPrompt + 4, DType::kBF16);
  FakeDaemon daemon;
  daemon.set_deferred(true);
  auto async = Make(&daemon, data, 128, 0, SelectionMode::kAsync);
  ASSERT_OK(async->Prefill(0, data.K(0, 0), data.V(0, 0), kPrompt));
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  const std::vector<uint16_t> q = data.Query(0, 0);
  // Position 500 completes the window: a hand-over and a prefetch are submitted at the end.
  ASSERT_OK(async->Decode(0, q.data(), data.K(0, kPrompt), data.V(0, kPrompt), out.data()));
  EXPECT_EQ(daemon.outstanding(), 2u);
  EXPECT_THAT(daemon.append_positions(), ::testing::ElementsAre(469));
  ASSERT_OK(async->Drop());
  EXPECT_EQ(daemon.outstanding(), 0u);
  EXPECT_EQ(daemon.staging_bytes_in_use(), 0u);
  EXPECT_FALSE(daemon.has_sequence(async->handle()));
}

// ---- batches (Client::DecodeBatch's decoder)

// Data for a batch: one Data per sequence (different lengths), the batch's tensors laid out
// as [batch][heads][dim].
struct BatchRun {
  std::vector<Data> data;
  std::vector<uint32_t> prompt;
};

std::vector<uint16_t> Stack(const std::vector<const uint16_t*>& rows, size_t elems) {
  std::vector<uint16_t> out;
  for (const uint16_t* r : rows) out.insert(out.end(), r, r + elems);
  return out;
}

// Four sequences of different prompt lengths, budgets, windows and selection modes decoded as
// one batch give, step by step, exactly the outputs of the same sequences decoded one by one;
// each step of the batch is one batch select.
TEST_F(SequenceTest, BatchEqualsSingleSequences) {
  constexpr uint32_t kSteps = 40;
  const std::vector<uint32_t> prompts = {700, 333, 1200, 96};
  const std::vector<uint32_t> budgets = {128, 256, 128, 512};
  std::vector<Data> data;
  for (size_t i = 0; i < prompts.size(); ++i) {
    data.push_back(MakeData(2, 2, 2, 64, prompts[i] + kSteps, DType::kBF16, 11 + i));
  }
  FakeDaemon batch_daemon, single_daemon;
  std::vector<std::unique_ptr<Sequence>> batch, single;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const SelectionMode mode = i % 2 == 0 ? SelectionMode::kSync : SelectionMode::kAsync;
    batch.push_back(Make(&batch_daemon, data[i], budgets[i], 1, mode));
    single.push_back(Make(&single_daemon, data[i], budgets[i], 1, mode));
    ASSERT_NE(batch.back(), nullptr);
    ASSERT_NE(single.back(), nullptr);
    for (uint32_t l = 0; l < 2; ++l) {
      ASSERT_OK(batch[i]->Prefill(l, data[i].K(l, 0), data[i].V(l, 0), prompts[i]));
      ASSERT_OK(single[i]->Prefill(l, data[i].K(l, 0), data[i].V(l, 0), prompts[i]));
    }
  }
  client_internal::Decoder* decoder = batch_daemon.decoder();
  std::vector<Sequence::Impl*> impls;
  for (auto& s : batch) impls.push_back(client_internal::SequenceFactory::ImplOf(s.get()));
  const size_t q_elems = size_t{data[0].q_heads()} * data[0].d;
  const size_t kv_elems = size_t{data[0].kv} * data[0].d;
  for (uint32_t step = 0; step < kSteps; ++step) {
    for (uint32_t l = 0; l < 2; ++l) {
      std::vector<std::vector<uint16_t>> q(batch.size());
      std::vector<const uint16_t*> qp, kp, vp;
      for (size_t i = 0; i < batch.size(); ++i) {
        q[i] = data[i].Query(l, step);
        qp.push_back(q[i].data());
        kp.push_back(data[i].K(l, prompts[i] + step));
        vp.push_back(data[i].V(l, prompts[i] + step));
      }
      const std::vector<uint16_t> qb = Stack(qp, q_elems), kb = Stack(kp, kv_elems),
                                  vb = Stack(vp, kv_elems);
      std::vector<uint16_t> out(batch.size() * q_elems);
      std::vector<absl::Status> statuses;
      const uint64_t before = batch_daemon.batch_selects();
      ASSERT_OK(decoder->DecodeBatch(l, impls, qb.data(), kb.data(), vb.data(), out.data(), nullptr,
                                     &statuses));
      ASSERT_EQ(statuses.size(), batch.size());
      // One synchronous batch select at most (sync sequences' searches and drifted heads) and
      // one sent ahead for the async ones.
      EXPECT_LE(batch_daemon.batch_selects() - before, 2u) << "step " << step;
      for (size_t i = 0; i < batch.size(); ++i) {
        ASSERT_OK(statuses[i]);
        std::vector<uint16_t> one(q_elems);
        ASSERT_OK(single[i]->Decode(l, q[i].data(), kp[i], vp[i], one.data()));
        ASSERT_TRUE(std::equal(one.begin(), one.end(), out.begin() + i * q_elems))
            << "sequence " << i << " layer " << l << " step " << step;
        EXPECT_EQ(batch[i]->last_decode().attended_tokens,
                  single[i]->last_decode().attended_tokens);
      }
    }
  }
  EXPECT_EQ(batch_daemon.largest_batch(), 4u);
}

// Sequences join and leave between steps (continuous batching), a sequence that is out of step
// fails alone with its name in the error (its rows are zeros), and a batch of mismatched
// geometries is refused before anything changes.
TEST_F(SequenceTest, BatchMembershipChangesAndFailuresStayAlone) {
  const Data a = MakeData(1, 2, 2, 64, 900, DType::kFP16, 3);
  const Data b = MakeData(1, 2, 2, 64, 900, DType::kFP16, 4);
  const Data other = MakeData(1, 2, 2, 128, 900, DType::kFP16, 5);
  FakeDaemon daemon;
  auto sa = Make(&daemon, a, 128, 0);
  auto sb = Make(&daemon, b, 128, 0);
  auto so = Make(&daemon, other, 128, 0);
  ASSERT_OK(sa->Prefill(0, a.K(0, 0), a.V(0, 0), 800));
  ASSERT_OK(sb->Prefill(0, b.K(0, 0), b.V(0, 0), 800));
  ASSERT_OK(so->Prefill(0, other.K(0, 0), other.V(0, 0), 800));
  client_internal::Decoder* decoder = daemon.decoder();
  auto impl = [](const std::unique_ptr<Sequence>& s) {
    return client_internal::SequenceFactory::ImplOf(s.get());
  };
  const size_t q_elems = size_t{a.q_heads()} * a.d, kv_elems = size_t{a.kv} * a.d;
  // Step 0: a alone. Step 1: a and b (b joins). Step 2: b, a (another order).
  std::vector<uint16_t> out(2 * q_elems);
  ASSERT_OK(decoder->DecodeBatch(0, {impl(sa)}, a.Query(0, 0).data(), a.K(0, 800), a.V(0, 800),
                                 out.data(), nullptr, nullptr));
  {
    const std::vector<uint16_t> q = Stack({a.Query(0, 1).data(), b.Query(0, 0).data()}, q_elems);
    const std::vector<uint16_t> k = Stack({a.K(0, 801), b.K(0, 800)}, kv_elems);
    const std::vector<uint16_t> v = Stack({a.V(0, 801), b.V(0, 800)}, kv_elems);
    ASSERT_OK(decoder->DecodeBatch(0, {impl(sa), impl(sb)}, q.data(), k.data(), v.data(),
                                   out.data(), nullptr, nullptr));
  }
  EXPECT_EQ(sa->tokens(0), 802u);
  EXPECT_EQ(sb->tokens(0), 801u);
  // Step 2: b and a, with a dropped meanwhile: a fails alone.
  ASSERT_OK(sa->Drop());
  {
    const std::vector<uint16_t> q = Stack({b.Query(0, 1).data(), a.Query(0, 2).data()}, q_elems);
    const std::vector<uint16_t> k = Stack({b.K(0, 801), a.K(0, 802)}, kv_elems);
    const std::vector<uint16_t> v = Stack({b.V(0, 801), a.V(0, 802)}, kv_elems);
    std::fill(out.begin(), out.end(), uint16_t{0x3c00});
    std::vector<absl::Status> statuses;
    const absl::Status st = decoder->DecodeBatch(0, {impl(sb), impl(sa)}, q.data(), k.data(),
                                                 v.data(), out.data(), nullptr, &statuses);
    EXPECT_THAT(st, StatusIs(absl::StatusCode::kFailedPrecondition,
                             HasSubstr(absl::StrCat("sequence ", sa->handle()))));
    ASSERT_EQ(statuses.size(), 2u);
    ASSERT_OK(statuses[0]);
    EXPECT_THAT(statuses[1], StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("dropped")));
    EXPECT_EQ(sb->tokens(0), 802u);
    // The failed sequence's rows are zeros; the other's are an attention output.
    EXPECT_TRUE(std::all_of(out.begin() + q_elems, out.end(), [](uint16_t x) { return x == 0; }));
    EXPECT_FALSE(std::all_of(out.begin(), out.begin() + q_elems,
                             [](uint16_t x) { return x == 0 || x == 0x3c00; }));
  }
  // Mismatched geometry (head_dim 128 beside 64), a sequence twice, an empty batch: refused,
  // nothing changed.
  {
    std::vector<uint16_t> q(q_elems * 2 * 2), k(kv_elems * 2 * 2), v(k.size()), o(q.size());
    EXPECT_THAT(decoder->DecodeBatch(0, {impl(sb), impl(so)}, q.data(), k.data(), v.data(),
                                     o.data(), nullptr, nullptr),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("head_dim")));
    EXPECT_THAT(decoder->DecodeBatch(0, {impl(sb), impl(sb)}, q.data(), k.data(), v.data(),
                                     o.data(), nullptr, nullptr),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("twice")));
    EXPECT_THAT(
        decoder->DecodeBatch(0, {}, q.data(), k.data(), v.data(), o.data(), nullptr, nullptr),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
    EXPECT_THAT(decoder->DecodeBatch(0, {impl(sb)}, nullptr, k.data(), v.data(), o.data(), nullptr,
                                     nullptr),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_EQ(sb->tokens(0), 802u);
    EXPECT_EQ(so->tokens(0), 800u);
  }
}

TEST_F(SequenceTest, BadCalls) {
  const Data data = MakeData(2, 1, 2, 64, 300, DType::kBF16);
  FakeDaemon daemon;
  auto seq = Make(&daemon, data, 128, 0);
  ASSERT_NE(seq, nullptr);
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  const std::vector<uint16_t> q = data.Query(0, 0);
  EXPECT_THAT(seq->Decode(0, q.data(), data.K(0, 0), data.V(0, 0), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("prefilled")));
  EXPECT_THAT(seq->Prefill(2, data.K(0, 0), data.V(0, 0), 100),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
  EXPECT_THAT(seq->Prefill(0, nullptr, data.V(0, 0), 100),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(seq->Prefill(0, data.K(0, 0), data.V(0, 0), 301),
              StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_OK(seq->Prefill(0, data.K(0, 0), data.V(0, 0), 100));
  EXPECT_THAT(seq->Prefill(0, data.K(0, 0), data.V(0, 0), 100),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("prefilled already")));
  EXPECT_THAT(seq->Prefill(1, data.K(1, 0), data.V(1, 0), 90),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("same length")));
  ASSERT_OK(seq->Prefill(1, data.K(1, 0), data.V(1, 0), 100));
  ASSERT_OK(seq->Decode(0, q.data(), data.K(0, 100), data.V(0, 100), out.data()));
  EXPECT_THAT(seq->Decode(0, q.data(), data.K(0, 101), data.V(0, 101), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("a step ahead")));
  EXPECT_THAT(seq->Decode(1, nullptr, data.K(1, 100), data.V(1, 100), out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(seq->LastAttended(1, 0).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not decoded")));
  EXPECT_THAT(seq->LastAttended(0, 1).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache::testing
