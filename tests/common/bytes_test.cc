#include "common/bytes.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(ParseByteSize, PlainAndBinaryUnits) {
  EXPECT_EQ(*ParseByteSize("0"), 0u);
  EXPECT_EQ(*ParseByteSize("4096"), 4096u);
  EXPECT_EQ(*ParseByteSize("12B"), 12u);
  EXPECT_EQ(*ParseByteSize("1KiB"), 1024u);
  EXPECT_EQ(*ParseByteSize("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseByteSize("64GiB"), 64ull << 30);
  EXPECT_EQ(*ParseByteSize("2TiB"), 2ull << 40);
  EXPECT_EQ(*ParseByteSize("64G"), 64ull << 30);
  EXPECT_EQ(*ParseByteSize("64 gib"), 64ull << 30);
  EXPECT_EQ(*ParseByteSize(" 3m "), 3ull << 20);
}

TEST(ParseByteSize, DecimalUnitsAndFractions) {
  EXPECT_EQ(*ParseByteSize("1KB"), 1000u);
  EXPECT_EQ(*ParseByteSize("5GB"), 5'000'000'000u);
  EXPECT_EQ(*ParseByteSize("1.5GiB"), 3ull << 29);
  EXPECT_EQ(*ParseByteSize("0.5KiB"), 512u);
}

TEST(ParseByteSize, RejectsBadInput) {
  EXPECT_THAT(ParseByteSize(""), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(ParseByteSize("-1GiB"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-negative number")));
  EXPECT_THAT(ParseByteSize("GiB"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseByteSize("12 parsecs"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown unit 'parsecs'")));
  EXPECT_THAT(ParseByteSize("1.2.3G"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseByteSize("0.3B"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("whole number")));
  EXPECT_THAT(ParseByteSize("99999999999TiB"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
  EXPECT_THAT(ParseByteSize("99999999999999999999999"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
}

TEST(FormatBytes, BinaryUnitsTwoDecimals) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.00 KiB");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_EQ(FormatBytes(64ull << 30), "64.00 GiB");
}

TEST(ByteSizeFlag, RoundTripsThroughUnparse) {
  ByteSize v;
  std::string err;
  ASSERT_TRUE(AbslParseFlag("48GiB", &v, &err)) << err;
  EXPECT_EQ(v.bytes, 48ull << 30);
  EXPECT_EQ(AbslUnparseFlag(v), "48GiB");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{1000}), "1000");
  EXPECT_EQ(AbslUnparseFlag(ByteSize{0}), "0");
  EXPECT_FALSE(AbslParseFlag("lots", &v, &err));
  EXPECT_THAT(err, HasSubstr("must start with a non-negative number"));
  EXPECT_EQ(v.bytes, 48ull << 30);  // unchanged on error
}

}  // namespace
}  // namespace icecache
