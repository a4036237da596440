#include "server/core/sequence_kv.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "eval/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "selection/tail.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

class CountingObserver : public KvObserver {
 public:
  void OnBuild(double, uint64_t tokens) override { built += tokens; }
  void OnInsert(double, uint64_t tokens) override { inserted += tokens; }
  void OnSelect(double) override { ++selects; }
  void OnRecallSample(double recall) override {
    absl::MutexLock lock(&mu);
    recalls.push_back(recall);
  }
  std::atomic<uint64_t> built{0}, inserted{0}, selects{0};
  absl::Mutex mu;
  std::vector<double> recalls;
};

class SequenceKvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    eval::SyntheticOptions so;
    so.num_tokens = 2000;
    so.num_layers = 3;
    so.num_kv_heads = 2;
    so.group_size = 2;
    so.num_queries = 2;
    trace_ = eval::GenerateSynthetic(so);
    geometry_ = *ResolveGeometry(Spec());
    ArenaOptions ao;
    ao.slots = 8;
    ao.slot_payload = 4096;
    ao.page_segment_bytes = 1 << 20;
    arena_ = std::shared_ptr<Arena>(*Arena::Create(1, ao, 256 << 20, &global_, nullptr));
    kv_ = std::make_unique<SequenceKv>(geometry_, *selection::Preset(selection::kPaperPreset),
                                       arena_, &pool_, &observer_);
  }

  // The fixture's geometry: 3 layers (the first full-KV), 4 query / 2 KV heads of 64, fp16.
  static GeometrySpec Spec() {
    GeometrySpec spec;
    spec.num_layers = 3;
    spec.num_q_heads = 4;
    spec.num_kv_heads = 2;
    spec.head_dim = 64;
    spec.dtype = DType::kFP16;
    spec.max_tokens = 2000;
    spec.full_kv_layers = 1;
    spec.page_size = 16;  // the counts below are in pages of 16 (sink and window: 2 pages each)
    return spec;
  }

  // K then V rows [head][n][64] of tokens [begin, begin + n) of `layer` of the trace, in
  // `dtype` (the trace's fp16 rows, rounded to bf16 for kBF16).
  std::vector<uint8_t> Staged(uint32_t layer, uint32_t begin, uint32_t n,
                              DType dtype = DType::kFP16) {
    const uint64_t row = 128;
    std::vector<uint8_t> buf(2 * 2 * n * row);
    for (uint32_t h = 0; h < 2; ++h) {
      std::memcpy(buf.data() + h * n * row, trace_.Keys(layer, h).row(begin), n * row);
      std::memcpy(buf.data() + (2 + h) * n * row, trace_.Values(layer, h).row(begin), n * row);
    }
    if (dtype == DType::kBF16) {
      for (size_t i = 0; i + 1 < buf.size(); i += 2) {
        uint16_t x;
        std::memcpy(&x, &buf[i], 2);
        x = FloatToBf16(HalfToFloat(x));
        std::memcpy(&buf[i], &x, 2);
      }
    }
    return buf;
  }
  std::vector<float> Queries(uint32_t layer, uint32_t qi) {
    std::vector<float> q(4 * 64);
    for (uint32_t h = 0; h < 4; ++h)
      std::copy_n(trace_.Query(layer, h, qi), 64, q.begin() + h * 64);
    return q;
  }

  eval::Trace trace_;
  Geometry geometry_;
  MemoryAccountant global_{1ull << 30};
  std::shared_ptr<Arena> arena_;
  ThreadPool pool_{2};
  CountingObserver observer_;
  std::unique_ptr<SequenceKv> kv_;
};

TEST_F(SequenceKvTest, PrefillAppendSelectRoundTrip) {
  std::vector<uint8_t> p = Staged(1, 0, 1984);
  ASSERT_OK(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 1984, 0));
  EXPECT_EQ(kv_->layer_state(1), SequenceKv::LayerState::kReady);
  EXPECT_EQ(kv_->tokens(1), 1984u);
  EXPECT_EQ(observer_.built.load(), 2u * 1984);
  std::vector<uint8_t> a = Staged(1, 1984, 16);
  ASSERT_OK(kv_->Append(1, a.data(), a.data() + a.size() / 2, 16, 1984));
  EXPECT_EQ(kv_->tokens(1), 2000u);
  std::vector<abi::SelectedPageRef> out;
  std::vector<float> q = Queries(1, 1);
  ASSERT_OK_AND_ASSIGN(uint32_t k, kv_->Select(1, q.data(), 0, &out, false));
  EXPECT_EQ(k, geometry_.selected_pages());  // the geometry's 12
  ASSERT_EQ(out.size(), 2u * k);
  // Every selected frame holds real rows of this layer and head; valid counts in range.
  for (uint32_t h = 0; h < 2; ++h) {
    for (uint32_t i = 0; i < k; ++i) {
      const abi::SelectedPageRef& r = out[h * k + i];
      ASSERT_NE(r.segment, abi::kNoSegment);
      ASSERT_GE(r.valid, 1u);
      ASSERT_LE(r.valid, 16u);
      const uint8_t* frame = arena_->FrameAddress({r.segment, r.frame});
      bool found = false;
      for (uint32_t t = 0; t < 2000 && !found; ++t) {
        found = std::memcmp(frame, trace_.Keys(1, h).row(t), 128) == 0;
      }
      EXPECT_TRUE(found) << "head " << h << " page " << i;
    }
  }
  EXPECT_GT(kv_->pages(), 2u * 2000 / 16);
}

TEST_F(SequenceKvTest, ACancelledBuildStopsFailsTheLayerAndReturnsItsFrames) {
  std::vector<uint8_t> p = Staged(1, 0, 1984);
  std::atomic<bool> cancel{true};
  EXPECT_THAT(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 1984, 0, &cancel),
              StatusIs(absl::StatusCode::kCancelled));
  EXPECT_EQ(kv_->layer_state(1), SequenceKv::LayerState::kFailed);
  EXPECT_EQ(kv_->pages(), 0u);
  EXPECT_EQ(arena_->frames_in_use(), 0u);
  // Another layer builds normally with a flag that stays false.
  cancel.store(false);
  ASSERT_OK(kv_->Prefill(2, p.data(), p.data() + p.size() / 2, 1984, 0, &cancel));
  EXPECT_EQ(kv_->layer_state(2), SequenceKv::LayerState::kReady);
}

TEST_F(SequenceKvTest, LayerRulesAndBadInput) {
  std::vector<uint8_t> p = Staged(1, 0, 100);
  std::vector<float> q = Queries(1, 0);
  std::vector<abi::SelectedPageRef> out;
  EXPECT_THAT(kv_->Prefill(0, p.data(), p.data() + p.size() / 2, 100, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("full-KV layer")));
  EXPECT_THAT(kv_->Prefill(3, p.data(), p.data(), 100, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
  EXPECT_THAT(kv_->Prefill(1, p.data(), p.data(), 0, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(kv_->Select(1, q.data(), 0, &out, false),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not built")));
  EXPECT_THAT(kv_->Append(1, p.data(), p.data(), 16, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("prefill it")));
  // Non-finite keys: refused, and the layer stays empty (it can still be prefilled).
  std::vector<uint8_t> bad = p;
  bad[130] = 0x00;
  bad[131] = 0x7e;  // fp16 NaN in head 0, row 1
  EXPECT_THAT(kv_->Prefill(1, bad.data(), bad.data() + bad.size() / 2, 100, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("KV head 0")));
  EXPECT_EQ(kv_->layer_state(1), SequenceKv::LayerState::kEmpty);
  ASSERT_OK(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 100, 0));
  EXPECT_THAT(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 100, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("already built")));
  EXPECT_THAT(kv_->Append(1, p.data(), p.data(), 17, 100),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("1..page_size")));
  EXPECT_THAT(kv_->Select(1, q.data(), 5000, &out, false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // k above the pages of a small layer returns what there is (the rest unused).
  ASSERT_OK_AND_ASSIGN(uint32_t k, kv_->Select(1, q.data(), 40, &out, false));
  uint32_t used = 0;
  for (uint32_t i = 0; i < k; ++i) used += out[i].segment != abi::kNoSegment;
  EXPECT_LT(used, 40u);
  EXPECT_GE(used, 100u / 16);
}

TEST_F(SequenceKvTest, MaxTokensBoundsAppends) {
  std::vector<uint8_t> p = Staged(2, 0, 1990);
  ASSERT_OK(kv_->Prefill(2, p.data(), p.data() + p.size() / 2, 1990, 0));
  std::vector<uint8_t> a = Staged(2, 1984, 16);
  EXPECT_THAT(kv_->Append(2, a.data(), a.data() + a.size() / 2, 16, 1990),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("max_tokens")));
  EXPECT_EQ(kv_->tokens(2), 1990u);
}

TEST_F(SequenceKvTest, RecallSamplesScoreTheReturnedPages) {
  std::vector<uint8_t> p = Staged(1, 0, 2000);
  ASSERT_OK(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 2000, 0));
  std::vector<float> q = Queries(1, 1);
  std::vector<abi::SelectedPageRef> out;
  ASSERT_OK(kv_->Select(1, q.data(), 0, &out, /*sample_recall=*/true).status());
  kv_->WaitForSamples();
  // k above the page count returns every page: recall 1 for every query head.
  ASSERT_OK(kv_->Select(1, q.data(), 4000, &out, /*sample_recall=*/true).status());
  kv_->WaitForSamples();
  absl::MutexLock lock(&observer_.mu);
  ASSERT_EQ(observer_.recalls.size(), 8u);  // 2 selects x 4 query heads
  for (int i = 0; i < 4; ++i) {
    EXPECT_GT(observer_.recalls[i], 0.0);
    EXPECT_LE(observer_.recalls[i], 1.0 + 1e-9);
  }
  for (int i = 4; i < 8; ++i) EXPECT_NEAR(observer_.recalls[i], 1.0, 1e-6);
}

// A select's last reference can go on a pool worker (the daemon runs a select queued behind
// an append there, and the client may drop the sequence meanwhile). With a recall sample
// queued behind it on the same pool, the destructor must not wait for that sample: on a pool
// of one worker it would wait for good. Here the only worker runs the select and drops the
// only reference; the sample then runs, reports, and frees the sequence.
TEST_F(SequenceKvTest, ALastReferenceDroppedOnAPoolWorkerDoesNotWaitForItsQueuedSample) {
  ThreadPool one(1);
  auto kv = std::make_shared<SequenceKv>(geometry_, *selection::Preset(selection::kPaperPreset),
                                         arena_, &one, &observer_);
  std::vector<uint8_t> p = Staged(1, 0, 500);
  ASSERT_OK(kv->Prefill(1, p.data(), p.data() + p.size() / 2, 500, 0));
  ASSERT_GT(arena_->frames_in_use(), 0u);
  const std::vector<float> q = Queries(1, 1);
  absl::Notification dropped;
  std::atomic<bool> selected{false};
  one.Schedule([kv = std::move(kv), &q, &dropped, &selected]() mutable {
    std::vector<abi::SelectedPageRef> out;
    selected = kv->Select(1, q.data(), 0, &out, /*sample_recall=*/true).ok();
    kv.reset();  // the last reference, on the only worker, the sample queued behind this task
    dropped.Notify();
  });
  if (!dropped.WaitForNotificationWithTimeout(absl::Seconds(30))) {
    // The worker is stuck in the destructor for good: nothing here can end cleanly.
    std::fprintf(stderr, "FAILED: the destructor waits on the pool's only worker\n");
    std::_Exit(1);
  }
  EXPECT_TRUE(selected.load());
  const absl::Time until = absl::Now() + absl::Seconds(30);
  while (arena_->frames_in_use() != 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(arena_->frames_in_use(), 0u);  // the sample's reference was the last
  absl::MutexLock lock(&observer_.mu);
  ASSERT_EQ(observer_.recalls.size(), 4u);  // the sample ran: one recall per query head
  for (double r : observer_.recalls) {
    EXPECT_GT(r, 0.0);
    EXPECT_LE(r, 1.0 + 1e-9);
  }
}

TEST_F(SequenceKvTest, DestructionReturnsEveryFrame) {
  std::vector<uint8_t> p = Staged(1, 0, 500);
  ASSERT_OK(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 500, 0));
  EXPECT_GT(arena_->frames_in_use(), 0u);
  kv_.reset();
  EXPECT_EQ(arena_->frames_in_use(), 0u);
}

// Frame tags (abi::FrameTag) name every stored token: after a prefill and appends, each
// position of each (layer, KV head) is in exactly one frame tagged with the sequence's
// durable id, and the frames the tags name hold those tokens' keys (copy on write frees the
// old copies, whose tags are cleared).
TEST_F(SequenceKvTest, FrameTagsNameEveryTokenOnceAfterPrefillAndAppends) {
  kv_->set_durable_id(0xfeedface);
  std::vector<uint8_t> p = Staged(1, 0, 1500);
  ASSERT_OK(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 1500, 0));
  for (uint32_t first = 1500; first < 1980; first += 16) {
    std::vector<uint8_t> a = Staged(1, first, 16);
    ASSERT_OK(kv_->Append(1, a.data(), a.data() + a.size() / 2, 16, first));
  }
  EXPECT_EQ(kv_->in_place_changes(), 0u);
  std::vector<std::vector<int>> seen(2, std::vector<int>(2000, 0));
  uint64_t tagged = 0;
  for (const Arena::TagCopy& tag : arena_->Tags()) {
    const uint64_t owner = tag.owner;
    if (owner == 0) continue;
    ASSERT_EQ(owner, 0xfeedfaceu);
    ASSERT_EQ(tag.layer, 1u);
    ASSERT_LT(tag.kv_head, 2u);
    ASSERT_GE(tag.count, 1u);
    ASSERT_LE(tag.count, 16u);
    ++tagged;
    const uint8_t* frame = arena_->FrameAddress(tag.frame);
    for (uint32_t slot = 0; slot < tag.count; ++slot) {
      const uint32_t pos = tag.positions[slot];
      ASSERT_LT(pos, 2000u);
      ++seen[tag.kv_head][pos];
      ASSERT_EQ(std::memcmp(frame + slot * 128, trace_.Keys(1, tag.kv_head).row(pos), 128), 0)
          << "head " << tag.kv_head << " position " << pos;
    }
  }
  EXPECT_EQ(tagged, kv_->pages());
  for (uint32_t h = 0; h < 2; ++h) {  // the prompt and 30 appends of 16: positions 0..1979
    for (uint32_t t = 0; t < 1980; ++t) ASSERT_EQ(seen[h][t], 1) << "head " << h << " pos " << t;
    for (uint32_t t = 1980; t < 2000; ++t) ASSERT_EQ(seen[h][t], 0) << "head " << h << " pos " << t;
  }
}

// Tail estimate (selection/tail.h): a select's tail partial of each query head is the
// estimate over exactly the head's pages it did not return, each summarised from the rows its
// frame tag names, checked against a float64 reference built from the trace's rows, with the
// summaries rounded to the K/V's type as the daemon stores them; for fp16 and bf16 K/V.
TEST_F(SequenceKvTest, TailPartialsEstimateEveryUnselectedPageFromTheRowsItHolds) {
  ASSERT_EQ(geometry_.tail, selection::TailMode::kMeanVariance);  // the default
  uint64_t owner = 0xabc;
  for (DType dtype : {DType::kFP16, DType::kBF16}) {
    SCOPED_TRACE(dtype == DType::kFP16 ? "fp16" : "bf16");
    GeometrySpec spec = Spec();
    spec.dtype = dtype;
    SequenceKv kv(*ResolveGeometry(spec), *selection::Preset(selection::kPaperPreset), arena_,
                  &pool_, nullptr);
    kv.set_durable_id(++owner);
    std::vector<uint8_t> p = Staged(1, 0, 1500, dtype);
    ASSERT_OK(kv.Prefill(1, p.data(), p.data() + p.size() / 2, 1500, 0));
    for (uint32_t first = 1500; first < 1660; first += 16) {
      std::vector<uint8_t> a = Staged(1, first, 16, dtype);
      ASSERT_OK(kv.Append(1, a.data(), a.data() + a.size() / 2, 16, first));
    }
    const bool fp16 = dtype == DType::kFP16;
    // A row as the daemon holds it, and a summary value as it stores it.
    auto held = [&](uint16_t trace_half) {
      const float x = HalfToFloat(trace_half);
      return fp16 ? x : Bf16ToFloat(FloatToBf16(x));
    };
    auto stored = [&](float x) {
      return fp16 ? HalfToFloat(FloatToHalf(x)) : Bf16ToFloat(FloatToBf16(x));
    };
    const uint8_t mask[2] = {1, 0};  // the second KV head is not searched: empty partials
    for (uint32_t qi = 0; qi < 2; ++qi) {
      std::vector<abi::SelectedPageRef> out;
      std::vector<float> tail;
      std::vector<float> q = Queries(1, qi);
      ASSERT_OK_AND_ASSIGN(uint32_t k, kv.Select(1, q.data(), 0, &out, false, mask, &tail));
      ASSERT_EQ(tail.size(), 4u * (2 + 64));
      // Reference: every tagged frame of head 0 not among the returned entries.
      std::vector<std::vector<float>> store;
      std::vector<selection::PageSummaryView> pages;
      store.reserve(arena_->Tags().size());
      uint32_t unselected = 0;
      for (const Arena::TagCopy& tag : arena_->Tags()) {
        if (tag.owner != owner || tag.kv_head != 0) continue;
        bool picked = false;
        for (uint32_t i = 0; i < k; ++i) {
          picked |= out[i].segment == tag.frame.segment && out[i].frame == tag.frame.frame;
        }
        if (picked) continue;
        ++unselected;
        selection::SummaryBuilder b(64);
        std::vector<float> key(64), value(64);
        for (uint32_t slot = 0; slot < tag.count; ++slot) {
          const auto* kr =
              reinterpret_cast<const uint16_t*>(trace_.Keys(1, 0).row(tag.positions[slot]));
          const auto* vr =
              reinterpret_cast<const uint16_t*>(trace_.Values(1, 0).row(tag.positions[slot]));
          for (int i = 0; i < 64; ++i) {
            key[i] = held(kr[i]);
            value[i] = held(vr[i]);
          }
          b.Add(key.data(), value.data());
        }
        store.emplace_back(3 * 64);
        b.Finish(store.back().data(), store.back().data() + 64, store.back().data() + 128);
        for (float& x : store.back()) x = stored(x);
        pages.push_back(
            {b.count(), store.back().data(), store.back().data() + 64, store.back().data() + 128});
      }
      ASSERT_GT(unselected, 50u);
      for (uint32_t j = 0; j < 4; ++j) {
        const float* got = &tail[j * 66];
        if (j >= 2) {  // query heads of the masked KV head
          EXPECT_EQ(got[1], 0.0f) << "query head " << j;
          continue;
        }
        selection::SoftmaxPartial ref(64);
        selection::AddTail(selection::TailMode::kMeanVariance, &q[j * 64], 64,
                           geometry_.softmax_scale, pages, &ref);
        ASSERT_GT(got[1], 0.0f);
        // Same log-sum-exp and the same normalised value.
        EXPECT_NEAR(got[0] + std::log(got[1]), ref.max + std::log(ref.sum), 1e-4) << j;
        for (int i = 0; i < 64; ++i) {
          EXPECT_NEAR(got[2 + i] / got[1], ref.acc[i] / ref.sum, 1e-4) << j << " " << i;
        }
      }
    }
  }
}

// With a k that returns every page there is nothing to estimate; a sequence created without a
// tail estimate answers none.
TEST_F(SequenceKvTest, TailPartialsAreEmptyWhenEverythingIsSelectedOrTheEstimateIsOff) {
  std::vector<uint8_t> p = Staged(1, 0, 320);
  ASSERT_OK(kv_->Prefill(1, p.data(), p.data() + p.size() / 2, 320, 0));
  std::vector<abi::SelectedPageRef> out;
  std::vector<float> tail;
  std::vector<float> q = Queries(1, 0);
  ASSERT_OK(kv_->Select(1, q.data(), 4000, &out, false, nullptr, &tail));
  ASSERT_EQ(tail.size(), 4u * 66);
  for (uint32_t j = 0; j < 4; ++j) EXPECT_EQ(tail[j * 66 + 1], 0.0f) << j;

  GeometrySpec spec = Spec();
  spec.tail = selection::TailMode::kNone;
  SequenceKv off(*ResolveGeometry(spec), *selection::Preset(selection::kPaperPreset), arena_,
                 &pool_, nullptr);
  ASSERT_OK(off.Prefill(1, p.data(), p.data() + p.size() / 2, 320, 0));
  tail.assign(5, 1.0f);
  ASSERT_OK(off.Select(1, q.data(), 0, &out, false, nullptr, &tail));
  EXPECT_TRUE(tail.empty());
}

// Rows from the trace, as a restore's source.
class TraceRows final : public SequenceKv::RowSource {
 public:
  explicit TraceRows(const eval::Trace* trace) : trace_(trace) {}
  absl::Status Gather(uint32_t layer, const std::vector<uint32_t>& positions, uint8_t* k_out,
                      uint8_t* v_out) const override {
    const uint64_t n = positions.size();
    for (uint32_t h = 0; h < 2; ++h) {
      for (uint64_t i = 0; i < n; ++i) {
        if (positions[i] >= 2000) return absl::DataLossError("no such token");
        std::memcpy(k_out + (h * n + i) * 128, trace_->Keys(layer, h).row(positions[i]), 128);
        std::memcpy(v_out + (h * n + i) * 128, trace_->Values(layer, h).row(positions[i]), 128);
      }
    }
    return absl::OkStatus();
  }

 private:
  const eval::Trace* trace_;
};

// A restore replays the acknowledged history: the restored layer selects, for every query,
// pages with the same valid counts and the same rows as the layer it replaces.
TEST_F(SequenceKvTest, RestoreReplaysTheHistoryIntoTheIdenticalIndex) {
  SequenceKv::LayerJournal journal;
  journal.layer = 2;
  journal.prefill_first = 0;
  journal.prefill_tokens = 1200;
  std::vector<uint8_t> p = Staged(2, 0, 1200);
  ASSERT_OK(kv_->Prefill(2, p.data(), p.data() + p.size() / 2, 1200, 0));
  for (uint32_t first = 1200; first + 16 <= 2000; first += 16) {
    std::vector<uint8_t> a = Staged(2, first, 16);
    ASSERT_OK(kv_->Append(2, a.data(), a.data() + a.size() / 2, 16, first));
    // One run per append, as a client's history before it is merged into runs.
    journal.appends.push_back(SequenceKv::AppendRun{first, 16, 1});
  }
  SequenceKv restored(geometry_, *selection::Preset(selection::kPaperPreset), arena_, &pool_,
                      nullptr);
  TraceRows rows(&trace_);
  ASSERT_OK(restored.Restore(journal, rows));
  EXPECT_EQ(restored.tokens(2), 2000u);
  EXPECT_EQ(restored.pages(), kv_->pages());
  for (uint32_t qi = 0; qi < 2; ++qi) {
    std::vector<float> q = Queries(2, qi);
    std::vector<abi::SelectedPageRef> a, b;
    ASSERT_OK_AND_ASSIGN(uint32_t k, kv_->Select(2, q.data(), 0, &a, false));
    ASSERT_OK(restored.Select(2, q.data(), 0, &b, false).status());
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i].valid, b[i].valid) << "query " << qi << " entry " << i;
      // K rows of the valid slots (then V rows, half a page further on).
      const uint8_t* fa = arena_->FrameAddress({a[i].segment, a[i].frame});
      const uint8_t* fb = arena_->FrameAddress({b[i].segment, b[i].frame});
      const uint64_t half = geometry_.page_bytes() / 2, used = uint64_t{a[i].valid} * 128;
      ASSERT_EQ(std::memcmp(fa, fb, used), 0) << "query " << qi << " entry " << i << " of " << k;
      ASSERT_EQ(std::memcmp(fa + half, fb + half, used), 0) << "query " << qi << " entry " << i;
    }
  }
  // The same history as one run of 50 appends restores the same layer.
  SequenceKv::LayerJournal merged = journal;
  merged.appends = {SequenceKv::AppendRun{1200, 16, 50}};
  SequenceKv from_runs(geometry_, *selection::Preset(selection::kPaperPreset), arena_, &pool_,
                       nullptr);
  ASSERT_OK(from_runs.Restore(merged, rows));
  EXPECT_EQ(from_runs.tokens(2), 2000u);
  EXPECT_EQ(from_runs.pages(), kv_->pages());
  // A history naming a token the source lacks: DATA_LOSS, reported as such.
  SequenceKv short_of_rows(geometry_, *selection::Preset(selection::kPaperPreset), arena_, &pool_,
                           nullptr);
  SequenceKv::LayerJournal beyond = journal;
  beyond.prefill_first = 1990;  // rows to 2005: the source has 2000
  beyond.prefill_tokens = 16;
  beyond.appends.clear();
  EXPECT_THAT(short_of_rows.Restore(beyond, rows), StatusIs(absl::StatusCode::kDataLoss));
  // Counts the geometry cannot hold are refused before a row is read: more tokens than
  // max_tokens, a prefill of none, appends of more than a page or of none.
  beyond = journal;
  beyond.appends.push_back(SequenceKv::AppendRun{2000, 16, 1});
  EXPECT_THAT(short_of_rows.Restore(beyond, rows),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("more than max_tokens")));
  beyond = journal;
  beyond.prefill_tokens = 0;
  EXPECT_THAT(short_of_rows.Restore(beyond, rows),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("a prefill of 0 tokens")));
  for (const SequenceKv::AppendRun bad :
       {SequenceKv::AppendRun{1200, 17, 1}, SequenceKv::AppendRun{1200, 16, 0},
        SequenceKv::AppendRun{0xFFFFFFF0u, 16, 1}}) {
    beyond = journal;
    beyond.appends = {bad};
    EXPECT_THAT(short_of_rows.Restore(beyond, rows),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("a run of")))
        << bad.first_position << " " << bad.tokens << " " << bad.count;
  }
  EXPECT_EQ(short_of_rows.tokens(2), 0u);
}

// A source that sets a flag during its n-th Gather (the cancellation arriving mid-restore).
class CancellingRows final : public SequenceKv::RowSource {
 public:
  CancellingRows(const eval::Trace* trace, int on_call, std::atomic<bool>* flag)
      : rows_(trace), on_call_(on_call), flag_(flag) {}
  absl::Status Gather(uint32_t layer, const std::vector<uint32_t>& positions, uint8_t* k_out,
                      uint8_t* v_out) const override {
    if (++calls_ == on_call_) flag_->store(true);
    return rows_.Gather(layer, positions, k_out, v_out);
  }

 private:
  TraceRows rows_;
  const int on_call_;
  std::atomic<bool>* const flag_;
  mutable int calls_ = 0;
};

// A restore stops with CANCELLED once its flag is set: before it reads a row, inside the
// prefill's build (the layer then fails), or before its next append; the source is only read,
// so another restore of the same history succeeds.
TEST_F(SequenceKvTest, ARestoreStopsOnceCancelled) {
  SequenceKv::LayerJournal journal;
  journal.layer = 2;
  journal.prefill_first = 0;
  journal.prefill_tokens = 1968;
  journal.appends = {SequenceKv::AppendRun{1968, 16, 2}};
  const selection::IndexSpec spec = *selection::Preset(selection::kPaperPreset);
  TraceRows rows(&trace_);
  std::atomic<bool> cancel{true};
  SequenceKv early(geometry_, spec, arena_, &pool_, nullptr);
  EXPECT_THAT(early.Restore(journal, rows, &cancel),
              StatusIs(absl::StatusCode::kCancelled, HasSubstr("the restore was cancelled")));
  EXPECT_EQ(early.tokens(2), 0u);
  EXPECT_EQ(early.pages(), 0u);
  // Set while the prefill's rows are read: its build stops, the layer fails.
  cancel = false;
  CancellingRows during_prefill(&trace_, 1, &cancel);
  SequenceKv built(geometry_, spec, arena_, &pool_, nullptr);
  EXPECT_THAT(built.Restore(journal, during_prefill, &cancel),
              StatusIs(absl::StatusCode::kCancelled, HasSubstr("index build was cancelled")));
  EXPECT_EQ(built.tokens(2), 0u);
  std::vector<uint8_t> a = Staged(2, 1968, 16);
  EXPECT_THAT(built.Append(2, a.data(), a.data() + a.size() / 2, 16, 1968),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // Set while the first append's rows are read: that append is made, the second is not.
  cancel = false;
  CancellingRows during_append(&trace_, 2, &cancel);
  SequenceKv appended(geometry_, spec, arena_, &pool_, nullptr);
  EXPECT_THAT(appended.Restore(journal, during_append, &cancel),
              StatusIs(absl::StatusCode::kCancelled, HasSubstr("the restore was cancelled")));
  EXPECT_EQ(appended.tokens(2), 1984u);
  SequenceKv whole(geometry_, spec, arena_, &pool_, nullptr);
  ASSERT_OK(whole.Restore(journal, rows));
  EXPECT_EQ(whole.tokens(2), 2000u);
}

}  // namespace
}  // namespace icecache
