#include "server/core/sequence_registry.h"

#include <set>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

GeometrySpec Small(uint64_t max_tokens = 1024) {
  GeometrySpec s;
  s.num_layers = 4;
  s.num_q_heads = 8;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.dtype = DType::kFP16;
  s.max_tokens = max_tokens;
  s.full_kv_layers = 0;
  return s;
}
// 4 layers x 2 heads x 256 pages x (4 x 64 x 2 x 2 = 1 KiB) = 2 MiB (default pages of 4).
constexpr uint64_t kSmallBytes = 4ull * 2 * 64 * 4096;

class SequenceRegistryTest : public ::testing::Test {
 protected:
  FakeClock clock_;
  MemoryAccountant accountant_{5 * kSmallBytes / 2};  // room for two, not three
  SequenceRegistry registry_{&accountant_, &clock_};
};

TEST_F(SequenceRegistryTest, CreateReturnsAnOpaqueHandleAndAccounts) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo info, registry_.Create(Small(), "req-1"));
  EXPECT_TRUE(SequenceRegistry::IsWellFormedHandle(info.handle)) << info.handle;
  EXPECT_EQ(info.kv_bytes, kSmallBytes);
  EXPECT_EQ(info.label, "req-1");
  EXPECT_EQ(info.create_time, clock_.Now());
  EXPECT_EQ(info.geometry.page_size, 4u);  // the default
  EXPECT_EQ(accountant_.used(), kSmallBytes);
  EXPECT_EQ(registry_.size(), 1u);
  EXPECT_EQ(registry_.created_total(), 1u);
}

TEST_F(SequenceRegistryTest, HandlesAreDistinct) {
  MemoryAccountant big(~uint64_t{0} >> 1);
  SequenceRegistry reg(&big, &clock_);
  std::set<std::string> handles;
  for (int i = 0; i < 200; ++i) {
    ASSERT_OK_AND_ASSIGN(SequenceInfo info, reg.Create(Small(16), ""));
    handles.insert(info.handle);
  }
  EXPECT_EQ(handles.size(), 200u);
}

TEST_F(SequenceRegistryTest, InvalidGeometryChangesNothing) {
  GeometrySpec bad = Small();
  bad.head_dim = 100;
  EXPECT_THAT(registry_.Create(bad, ""),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("geometry.head_dim")));
  EXPECT_THAT(registry_.Create(Small(), std::string(200, 'x')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("label")));
  EXPECT_EQ(registry_.size(), 0u);
  EXPECT_EQ(accountant_.used(), 0u);
  EXPECT_EQ(registry_.created_total(), 0u);
}

TEST_F(SequenceRegistryTest, OverTheLimitIsResourceExhaustedAndChangesNothing) {
  ASSERT_OK(registry_.Create(Small(), "a").status());
  ASSERT_OK(registry_.Create(Small(), "b").status());
  EXPECT_THAT(registry_.Create(Small(), "c"),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("memory limit")));
  EXPECT_EQ(registry_.size(), 2u);
  EXPECT_EQ(accountant_.used(), 2 * kSmallBytes);
  EXPECT_EQ(accountant_.rejections(), 1u);
}

TEST_F(SequenceRegistryTest, GetAndDrop) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo info, registry_.Create(Small(), "x"));
  ASSERT_OK_AND_ASSIGN(SequenceInfo got, registry_.Get(info.handle));
  EXPECT_EQ(got.handle, info.handle);
  EXPECT_EQ(got.geometry, info.geometry);

  ASSERT_OK_AND_ASSIGN(uint64_t freed, registry_.Drop(info.handle));
  EXPECT_EQ(freed, kSmallBytes);
  EXPECT_EQ(accountant_.used(), 0u);
  EXPECT_EQ(registry_.dropped_total(), 1u);
  EXPECT_THAT(registry_.Get(info.handle), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(registry_.Drop(info.handle), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(registry_.dropped_total(), 1u);
}

TEST_F(SequenceRegistryTest, MalformedHandlesAreInvalidArgument) {
  for (const std::string& h :
       {std::string(""), std::string("seq_123"), std::string("seq_") + std::string(32, 'G'),
        std::string("SEQ_") + std::string(32, 'a'), std::string(5000, 'a'),
        std::string("seq_\x01\x02")}) {
    EXPECT_THAT(registry_.Get(h), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("is not a sequence handle")));
    EXPECT_THAT(registry_.Drop(h), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  // Well formed but unknown.
  EXPECT_THAT(registry_.Get("seq_" + std::string(32, 'a')), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(SequenceRegistryTest, ListPagesInHandleOrder) {
  MemoryAccountant big(~uint64_t{0} >> 1);
  SequenceRegistry reg(&big, &clock_);
  std::set<std::string> created;
  for (int i = 0; i < 25; ++i) created.insert(reg.Create(Small(16), "")->handle);

  std::vector<std::string> seen;
  std::string token;
  int pages = 0;
  do {
    ASSERT_OK_AND_ASSIGN(SequencePage page, reg.List(10, token));
    EXPECT_EQ(page.total_size, 25u);
    for (const SequenceInfo& s : page.sequences) seen.push_back(s.handle);
    token = page.next_page_token;
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(seen, std::vector<std::string>(created.begin(), created.end()));

  ASSERT_OK_AND_ASSIGN(SequencePage all, reg.List(0, ""));
  EXPECT_EQ(all.sequences.size(), 25u);
  EXPECT_TRUE(all.next_page_token.empty());
  EXPECT_THAT(reg.List(1001, ""), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("page_size must be at most 1000")));
  EXPECT_THAT(reg.List(10, "garbage"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("page_token")));
}

TEST_F(SequenceRegistryTest, DestructionReleasesEverything) {
  {
    SequenceRegistry reg(&accountant_, &clock_);
    ASSERT_OK(reg.Create(Small(), "").status());
    EXPECT_EQ(accountant_.used(), kSmallBytes);
  }
  EXPECT_EQ(accountant_.used(), 0u);
}

}  // namespace
}  // namespace icecache
