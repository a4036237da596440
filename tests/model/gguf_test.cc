// GGUF reader and writer: metadata and tensor round trips through real files, and malformed
// files (truncated anywhere, bad headers, huge counts, bad tensor infos, random corruption)
// that must give INVALID_ARGUMENT and never crash. An optional test opens the real model
// when ICECACHE_MODEL_GGUF names it.
#include "model/io/gguf.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/io/quant.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"

namespace icecache::model {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::icecache::testing::TempDir;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

void WriteBytes(const std::string& path, const uint8_t* data, size_t n) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (n > 0) {
    ASSERT_EQ(std::fwrite(data, 1, n, f), n);
  }
  ASSERT_EQ(std::fclose(f), 0);
}

absl::StatusOr<std::unique_ptr<GgufFile>> OpenBytes(const TempDir& dir,
                                                    const std::vector<uint8_t>& bytes,
                                                    size_t n = std::string::npos) {
  const std::string path = dir.path() + "/f.gguf";
  WriteBytes(path, bytes.data(), std::min(n, bytes.size()));
  return GgufFile::Open(path);
}

// Hand-assembled GGUF bytes, for files the writer refuses to produce.
class RawGguf {
 public:
  RawGguf& Magic(const char* m = "GGUF") {
    bytes_.insert(bytes_.end(), m, m + 4);
    return *this;
  }
  RawGguf& U8(uint8_t v) { return Put(v); }
  RawGguf& U32(uint32_t v) { return Put(v); }
  RawGguf& U64(uint64_t v) { return Put(v); }
  RawGguf& Str(const std::string& s) {
    U64(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  // Header with version 3.
  RawGguf& Header(uint64_t tensors, uint64_t kvs) { return Magic().U32(3).U64(tensors).U64(kvs); }
  // A tensor info.
  RawGguf& TensorInfo(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
                      uint64_t offset) {
    Str(name).U32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) U64(d);
    return U32(type).U64(offset);
  }
  RawGguf& PadTo(size_t alignment) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(0);
    return *this;
  }
  RawGguf& Zeros(size_t n) {
    bytes_.resize(bytes_.size() + n, 0);
    return *this;
  }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  template <typename T>
  RawGguf& Put(T v) {
    const size_t at = bytes_.size();
    bytes_.resize(at + sizeof(T));
    std::memcpy(bytes_.data() + at, &v, sizeof(T));
    return *this;
  }
  std::vector<uint8_t> bytes_;
};

std::vector<float> Ramp(size_t n, float scale = 0.01f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * (static_cast<float>(i % 97) - 48.0f);
  return v;
}

// ------------------------------------------------------------------------------- types

TEST(GgmlTypeTest, BlockGeometry) {
  const std::vector<std::tuple<GgmlType, const char*, uint32_t, uint32_t>> expected = {
      {GgmlType::kF32, "f32", 1, 4},     {GgmlType::kF16, "f16", 1, 2},
      {GgmlType::kQ4_0, "q4_0", 32, 18}, {GgmlType::kQ4_1, "q4_1", 32, 20},
      {GgmlType::kQ5_0, "q5_0", 32, 22}, {GgmlType::kQ5_1, "q5_1", 32, 24},
      {GgmlType::kQ8_0, "q8_0", 32, 34},
  };
  for (const auto& [type, name, elements, bytes] : expected) {
    EXPECT_STREQ(GgmlTypeName(type), name);
    EXPECT_EQ(GgmlBlockElements(type), elements) << name;
    EXPECT_EQ(GgmlBlockBytes(type), bytes) << name;
    EXPECT_TRUE(IsSupportedGgmlType(static_cast<uint32_t>(type))) << name;
  }
  for (uint32_t raw : {4u, 5u, 9u, 10u, 12u, 14u, 30u, 1000u}) {
    EXPECT_FALSE(IsSupportedGgmlType(raw)) << raw;
  }
}

// ------------------------------------------------------------------------------- round trips

TEST(GgufTest, MetadataRoundTripEveryType) {
  TempDir dir;
  GgufWriter w;
  w.AddUint8("t.u8", 200);
  w.AddInt8("t.i8", -100);
  w.AddUint16("t.u16", 60000);
  w.AddInt16("t.i16", -30000);
  w.AddUint32("t.u32", 4000000000u);
  w.AddInt32("t.i32", -2000000000);
  w.AddUint64("t.u64", (uint64_t{1} << 63) + 5);
  w.AddInt64("t.i64", -(int64_t{1} << 62));
  w.AddFloat32("t.f32", 1.5f);
  w.AddFloat64("t.f64", -2.25);
  w.AddBool("t.bool", true);
  w.AddBool("t.false", false);
  const std::string binary("h\xc3\xa9llo\0world\xff", 13);
  w.AddString("t.str", binary);
  w.AddString("t.empty", "");
  w.AddStringArray("t.strs", {"a", "", "Ġthe", binary});
  w.AddInt32Array("t.i32s", {1, -2, 2147483647});
  w.AddFloat32Array("t.f32s", {0.5f, -1.25f});
  w.AddFloat64Array("t.f64s", {1e300, -0.125});
  w.AddBoolArray("t.bools", {true, false, true});
  w.AddInt32Array("t.none", {});
  const std::vector<std::pair<GgufValueType, std::vector<int64_t>>> int_arrays = {
      {GgufValueType::kUint8, {0, 255}},
      {GgufValueType::kInt8, {-128, 127}},
      {GgufValueType::kUint16, {0, 65535}},
      {GgufValueType::kInt16, {-32768, 32767}},
      {GgufValueType::kUint32, {0, 4294967295}},
      {GgufValueType::kInt32, {-2147483648, 2147483647}},
      {GgufValueType::kUint64, {0, std::numeric_limits<int64_t>::max()}},
      {GgufValueType::kInt64, {std::numeric_limits<int64_t>::min(), 7}},
  };
  for (const auto& [type, values] : int_arrays) {
    ASSERT_OK(w.AddIntArray(absl::StrCat("a.", GgufValueTypeName(type)), type, values));
  }
  const std::string path = dir.path() + "/meta.gguf";
  ASSERT_OK(w.Write(path));

  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(path));
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_TRUE(f->tensors().empty());
  const std::vector<std::string> keys = f->Keys();
  ASSERT_EQ(keys.size(), 20u + int_arrays.size());
  EXPECT_EQ(keys[0], "t.u8");  // file order
  EXPECT_EQ(keys[12], "t.str");
  EXPECT_TRUE(f->Has("t.f64"));
  EXPECT_FALSE(f->Has("t.missing"));

  EXPECT_EQ(*f->GetUint("t.u8"), 200u);
  EXPECT_EQ(*f->GetInt("t.i8"), -100);
  EXPECT_EQ(*f->GetUint("t.u16"), 60000u);
  EXPECT_EQ(*f->GetInt("t.i16"), -30000);
  EXPECT_EQ(*f->GetUint("t.u32"), 4000000000u);
  EXPECT_EQ(*f->GetInt("t.u32"), 4000000000);
  EXPECT_EQ(*f->GetInt("t.i32"), -2000000000);
  EXPECT_EQ(*f->GetUint("t.u64"), (uint64_t{1} << 63) + 5);
  EXPECT_EQ(*f->GetInt("t.i64"), -(int64_t{1} << 62));
  EXPECT_EQ(*f->GetFloat("t.f32"), 1.5);
  EXPECT_EQ(*f->GetFloat("t.f64"), -2.25);
  EXPECT_EQ(*f->GetFloat("t.i32"), -2e9);  // integers widen to floats
  EXPECT_EQ(*f->GetBool("t.bool"), true);
  EXPECT_EQ(*f->GetBool("t.false"), false);
  EXPECT_EQ(*f->GetString("t.str"), binary);
  EXPECT_EQ(*f->GetString("t.empty"), "");
  EXPECT_THAT(*f->GetStringArray("t.strs"), ElementsAre("a", "", "Ġthe", binary));
  EXPECT_THAT(*f->GetIntArray("t.i32s"), ElementsAre(1, -2, 2147483647));
  EXPECT_THAT(*f->GetFloatArray("t.f32s"), ElementsAre(0.5, -1.25));
  EXPECT_THAT(*f->GetFloatArray("t.f64s"), ElementsAre(1e300, -0.125));
  EXPECT_THAT(*f->GetFloatArray("t.i32s"), ElementsAre(1.0, -2.0, 2147483647.0));
  EXPECT_TRUE(f->GetIntArray("t.none")->empty());
  for (const auto& [type, values] : int_arrays) {
    const std::string key = absl::StrCat("a.", GgufValueTypeName(type));
    EXPECT_EQ(*f->GetIntArray(key), values) << key;
    ASSERT_OK_AND_ASSIGN(auto info, f->ArrayInfo(key));
    EXPECT_EQ(info.first, type);
    EXPECT_EQ(info.second, values.size());
  }
  EXPECT_EQ(*f->TypeOf("t.bools"), GgufValueType::kArray);
  EXPECT_EQ(f->ArrayInfo("t.bools")->first, GgufValueType::kBool);
  EXPECT_EQ(*f->TypeOf("t.u16"), GgufValueType::kUint16);

  // Absent keys and type mismatches, with the key and the actual type in the message.
  EXPECT_THAT(f->GetString("t.missing"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(f->GetUint("t.missing"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(f->GetIntArray("t.missing"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(f->GetString("t.u32"), StatusIs(absl::StatusCode::kInvalidArgument,
                                              AllOf(HasSubstr("t.u32"), HasSubstr("u32"))));
  EXPECT_THAT(f->GetUint("t.i8"), StatusIs(absl::StatusCode::kInvalidArgument,
                                           AllOf(HasSubstr("t.i8"), HasSubstr("negative"))));
  EXPECT_THAT(f->GetInt("t.u64"), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("t.u64")));
  EXPECT_THAT(f->GetUint("t.f32"), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("f32")));
  EXPECT_THAT(f->GetFloat("t.str"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("string")));
  EXPECT_THAT(f->GetBool("t.u8"), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("u8")));
  EXPECT_THAT(f->GetInt("t.strs"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("array of string")));
  EXPECT_THAT(f->GetIntArray("t.strs"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("array of string")));
  EXPECT_THAT(f->GetIntArray("t.f32s"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("array of f32")));
  EXPECT_THAT(f->GetIntArray("t.bools"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("array of bool")));
  EXPECT_THAT(f->GetStringArray("t.i32s"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("array of i32")));
  EXPECT_THAT(f->GetStringArray("t.str"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("string")));
  EXPECT_THAT(f->ArrayInfo("t.u8"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(f->GetIntArray("a.u64"), IsOk());  // INT64_MAX still fits
}

TEST(GgufTest, TensorsOfEverySupportedTypeRoundTrip) {
  for (uint64_t alignment : {32u, 64u, 1u}) {
    SCOPED_TRACE(alignment);
    TempDir dir;
    GgufWriter w(alignment);
    w.AddString("general.architecture", "llama");
    struct Spec {
      std::string name;
      GgmlType type;
      std::vector<uint64_t> dims;
    };
    const std::vector<Spec> specs = {
        {"f32.vec", GgmlType::kF32, {7}},        {"f16.mat", GgmlType::kF16, {5, 3}},
        {"q4_0.mat", GgmlType::kQ4_0, {64, 3}},  {"q4_1.mat", GgmlType::kQ4_1, {32, 2, 2}},
        {"q5_0.mat", GgmlType::kQ5_0, {96, 1}},  {"q5_1.mat", GgmlType::kQ5_1, {32, 1, 1, 3}},
        {"q8_0.mat", GgmlType::kQ8_0, {128, 2}},
    };
    std::map<std::string, std::vector<uint8_t>> data;
    for (const Spec& s : specs) {
      uint64_t n = 1;
      for (uint64_t d : s.dims) n *= d;
      const std::vector<float> x = Ramp(n);
      data[s.name] = Quantize(s.type, x.data(), n);
      ASSERT_OK(w.AddTensor(s.name, s.type, s.dims, data[s.name]));
    }
    const std::string path = dir.path() + "/t.gguf";
    ASSERT_OK(w.Write(path));

    ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(path));
    EXPECT_EQ(f->alignment(), alignment);
    EXPECT_EQ(f->Has("general.alignment"), alignment != 32);
    EXPECT_EQ(*f->GetString("general.architecture"), "llama");
    ASSERT_EQ(f->tensors().size(), specs.size());
    EXPECT_EQ(f->data_offset() % alignment, 0u);
    for (size_t i = 0; i < specs.size(); ++i) {
      const GgufTensor& t = f->tensors()[i];
      SCOPED_TRACE(t.name);
      EXPECT_EQ(t.name, specs[i].name);
      EXPECT_EQ(t.type, specs[i].type);
      EXPECT_EQ(t.dims, specs[i].dims);
      EXPECT_EQ(t.offset % alignment, 0u);
      EXPECT_EQ(t.row_elements(), specs[i].dims[0]);
      EXPECT_EQ(t.rows() * t.row_elements(), t.elements());
      ASSERT_EQ(t.bytes, data[t.name].size());
      EXPECT_EQ(std::memcmp(t.data, data[t.name].data(), t.bytes), 0);
      EXPECT_EQ(f->FindTensor(t.name), &t);
    }
    EXPECT_EQ(f->FindTensor("nope"), nullptr);
    const GgufTensor* q = f->FindTensor("q5_1.mat");
    EXPECT_EQ(q->rows(), 3u);
    EXPECT_EQ(q->elements(), 96u);
  }
}

TEST(GgufTest, WriterRejectsBadTensorsAndDuplicates) {
  GgufWriter w;
  std::vector<uint8_t> q4(18 * 2);
  EXPECT_THAT(w.AddTensor("short", GgmlType::kQ4_0, {64}, std::vector<uint8_t>(35)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("36 bytes")));
  EXPECT_THAT(w.AddTensor("rowlen", GgmlType::kQ4_0, {48}, q4),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple of")));
  EXPECT_THAT(w.AddTensor("dims", GgmlType::kF32, {1, 1, 1, 1, 1}, std::vector<uint8_t>(4)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(w.AddTensor("nodims", GgmlType::kF32, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(w.AddTensor("k", static_cast<GgmlType>(12), {256}, std::vector<uint8_t>(144)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("12")));
  EXPECT_THAT(w.AddTensor("huge", GgmlType::kF32, {uint64_t{1} << 40, uint64_t{1} << 40}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflow")));
  EXPECT_THAT(w.AddIntArray("x", GgufValueType::kUint8, {256}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(w.AddIntArray("x", GgufValueType::kString, {1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(w.AddTensor("ok", GgmlType::kQ4_0, {64}, q4));
  EXPECT_OK(w.Serialize());
  ASSERT_OK(w.AddTensor("ok", GgmlType::kQ4_0, {64}, q4));
  EXPECT_THAT(w.Serialize(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("ok")));

  GgufWriter keys;
  keys.AddUint32("a", 1);
  keys.AddString("a", "again");
  EXPECT_THAT(keys.Serialize(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("\"a\"")));
  EXPECT_THAT(GgufWriter(48).Serialize(), StatusIs(absl::StatusCode::kInvalidArgument));
  GgufWriter align(64);
  align.AddUint32("general.alignment", 32);
  EXPECT_THAT(align.Serialize(), StatusIs(absl::StatusCode::kInvalidArgument));
  GgufWriter align_ok(64);
  align_ok.AddUint32("general.alignment", 64);
  EXPECT_OK(align_ok.Serialize());
}

// ------------------------------------------------------------------------------- bad files

TEST(GgufTest, MissingFileIsNotFound) {
  TempDir dir;
  EXPECT_THAT(GgufFile::Open(dir.path() + "/absent.gguf"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(GgufFile::Open(dir.path() + "/no/such/dir.gguf"),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(GgufFile::Open(dir.path()), StatusIs(absl::StatusCode::kInvalidArgument));
}

// A small but complete file: metadata of several kinds and two tensors.
std::vector<uint8_t> SmallFile() {
  GgufWriter w;
  w.AddString("general.name", "tiny");
  w.AddUint32("n", 3);
  w.AddStringArray("toks", {"a", "bc"});
  w.AddFloat32Array("fs", {1.0f, 2.0f});
  const std::vector<float> x = Ramp(64);
  ICECACHE_CHECK_OK(
      w.AddTensor("w", GgmlType::kQ8_0, {32, 2}, Quantize(GgmlType::kQ8_0, x.data(), 64)));
  ICECACHE_CHECK_OK(w.AddTensor("b", GgmlType::kF32, {3}, Quantize(GgmlType::kF32, x.data(), 3)));
  auto bytes = w.Serialize();
  ICECACHE_CHECK_OK(bytes.status());
  return *bytes;
}

TEST(GgufTest, TruncationAtEveryPositionIsInvalidArgument) {
  TempDir dir;
  const std::vector<uint8_t> bytes = SmallFile();
  ASSERT_OK_AND_ASSIGN(auto full, OpenBytes(dir, bytes));
  // The writer pads after the last tensor; a file cut in that padding is still complete.
  const GgufTensor& last = full->tensors().back();
  const size_t needed = full->data_offset() + last.offset + last.bytes;
  ASSERT_LE(needed, bytes.size());
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto f = OpenBytes(dir, bytes, n);
    if (n < needed) {
      EXPECT_THAT(f, StatusIs(absl::StatusCode::kInvalidArgument)) << "length " << n;
    } else {
      EXPECT_OK(f) << "length " << n;
    }
  }
}

TEST(GgufTest, BadHeadersAreInvalidArgument) {
  TempDir dir;
  EXPECT_THAT(OpenBytes(dir, RawGguf().Magic("GGUG").U32(3).U64(0).U64(0).bytes()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  EXPECT_THAT(OpenBytes(dir, RawGguf().Magic("GGML").U32(3).U64(0).U64(0).bytes()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  for (uint32_t version : {0u, 1u, 4u, 0x03000000u}) {
    EXPECT_THAT(OpenBytes(dir, RawGguf().Magic().U32(version).U64(0).U64(0).bytes()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version")))
        << version;
  }
  ASSERT_OK_AND_ASSIGN(auto v2, OpenBytes(dir, RawGguf().Magic().U32(2).U64(0).U64(0).bytes()));
  EXPECT_EQ(v2->version(), 2u);
  EXPECT_THAT(OpenBytes(dir, {}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GgufTest, HugeCountsAndLengthsAreInvalidArgument) {
  TempDir dir;
  const uint64_t huge = uint64_t{1} << 62;
  const std::vector<std::pair<std::string, std::vector<uint8_t>>> cases = {
      {"tensor count", RawGguf().Header(huge, 0).bytes()},
      {"kv count", RawGguf().Header(0, huge).bytes()},
      {"kv count max", RawGguf().Header(0, ~uint64_t{0}).bytes()},
      {"key length", RawGguf().Header(0, 1).U64(huge).U32(4).U32(0).bytes()},
      {"key length max", RawGguf().Header(0, 1).U64(~uint64_t{0}).U32(4).U32(0).bytes()},
      {"string length", RawGguf().Header(0, 1).Str("k").U32(8).U64(huge).bytes()},
      {"u8 array", RawGguf().Header(0, 1).Str("k").U32(9).U32(0).U64(~uint64_t{0}).bytes()},
      {"u64 array", RawGguf().Header(0, 1).Str("k").U32(9).U32(10).U64(huge).U64(0).bytes()},
      {"string array",
       RawGguf().Header(0, 1).Str("k").U32(9).U32(8).U64(huge).U64(0).U64(0).bytes()},
      {"string in array", RawGguf().Header(0, 1).Str("k").U32(9).U32(8).U64(1).U64(huge).bytes()},
      {"tensor name", RawGguf().Header(1, 0).U64(huge).Zeros(64).bytes()},
  };
  for (const auto& [what, bytes] : cases) {
    EXPECT_THAT(OpenBytes(dir, bytes), StatusIs(absl::StatusCode::kInvalidArgument)) << what;
  }
}

TEST(GgufTest, BadMetadataIsInvalidArgument) {
  TempDir dir;
  EXPECT_THAT(OpenBytes(dir, RawGguf().Header(0, 1).Str("k").U32(13).U32(0).bytes()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("value type 13")));
  EXPECT_THAT(
      OpenBytes(dir, RawGguf().Header(0, 1).Str("k").U32(9).U32(9).U64(1).U32(4).U64(0).bytes()),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("nested")));
  EXPECT_THAT(OpenBytes(dir, RawGguf().Header(0, 1).Str("k").U32(9).U32(77).U64(0).bytes()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      OpenBytes(dir, RawGguf().Header(0, 2).Str("k").U32(4).U32(1).Str("k").U32(4).U32(2).bytes()),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate")));
  EXPECT_THAT(
      OpenBytes(dir, RawGguf().Header(0, 1).Str("general.alignment").U32(10).U64(32).bytes()),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("u32")));
  for (uint32_t a : {0u, 3u, 48u}) {
    EXPECT_THAT(
        OpenBytes(dir, RawGguf().Header(0, 1).Str("general.alignment").U32(4).U32(a).bytes()),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("power of two")))
        << a;
  }
}

TEST(GgufTest, BadTensorInfosAreInvalidArgument) {
  TempDir dir;
  auto file_with = [](const std::string& name, std::vector<uint64_t> dims, uint32_t type,
                      uint64_t offset, size_t data_bytes) {
    RawGguf r;
    r.Header(1, 0).TensorInfo(name, std::move(dims), type, offset).PadTo(32).Zeros(data_bytes);
    return r.bytes();
  };
  // A valid one first, to show the helper builds good files.
  ASSERT_OK_AND_ASSIGN(auto good, OpenBytes(dir, file_with("w", {32, 2}, 8, 0, 68)));
  EXPECT_EQ(good->tensors()[0].bytes, 68u);

  EXPECT_THAT(
      OpenBytes(dir, file_with("blk.7.ffn_up.weight", {256, 2}, 12, 0, 4096)),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr("blk.7.ffn_up.weight"), HasSubstr("type 12"), HasSubstr("q4_K"))));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32}, 30, 0, 64)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("type 30")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32}, 0xffffffffu, 0, 64)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("4294967295")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32, 1, 1, 1, 1}, 0, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("5 dims")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {}, 0, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("0 dims")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {uint64_t{1} << 63}, 0, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {uint64_t{1} << 32, uint64_t{1} << 32}, 0, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflow")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {uint64_t{1} << 61, 2}, 0, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflow")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {48}, 2, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple of")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32}, 0, 16, 256)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("alignment")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32}, 0, 0, 127)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("past the end")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32}, 0, 64, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("past the end")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {32}, 0, ~uint64_t{31}, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("past the end")));
  EXPECT_THAT(OpenBytes(dir, file_with("t", {uint64_t{1} << 40}, 0, 0, 128)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("past the end")));
  {  // no data section at all
    RawGguf r;
    r.Header(1, 0).TensorInfo("t", {1}, 0, 0);
    EXPECT_THAT(OpenBytes(dir, r.bytes()), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  {  // duplicate tensor names
    RawGguf r;
    r.Header(2, 0).TensorInfo("t", {8}, 0, 0).TensorInfo("t", {8}, 0, 32).PadTo(32).Zeros(64);
    EXPECT_THAT(OpenBytes(dir, r.bytes()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate")));
  }
}

// Random corruption of a valid file: every outcome is allowed except a crash; a file that
// still opens must have its metadata readable and its tensor data inside the mapping.
TEST(GgufTest, RandomCorruptionNeverCrashes) {
  TempDir dir;
  const std::vector<uint8_t> original = SmallFile();
  std::mt19937 rng(1234);
  int opened = 0;
  for (int iter = 0; iter < 1500; ++iter) {
    std::vector<uint8_t> bytes = original;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<uint8_t>(rng());
          break;
        case 1:
          bytes[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
          break;
        default:
          bytes[at] = (rng() % 2) ? 0xff : 0x00;
      }
    }
    auto f = OpenBytes(dir, bytes);
    if (!f.ok()) {
      EXPECT_THAT(f, StatusIs(absl::StatusCode::kInvalidArgument));
      continue;
    }
    ++opened;
    for (const std::string& key : (*f)->Keys()) {
      (void)(*f)->GetString(key);
      (void)(*f)->GetInt(key);
      (void)(*f)->GetUint(key);
      (void)(*f)->GetFloat(key);
      (void)(*f)->GetBool(key);
      (void)(*f)->GetStringArray(key);
      (void)(*f)->GetIntArray(key);
      (void)(*f)->GetFloatArray(key);
    }
    for (const GgufTensor& t : (*f)->tensors()) {
      ASSERT_NE(t.data, nullptr);
      std::vector<float> out(t.elements());
      EXPECT_OK(Dequantize(t.type, t.data, t.elements(), out.data()));
    }
  }
  EXPECT_GT(opened, 0);  // some corruptions (in values or tensor data) stay well-formed
}

// ------------------------------------------------------------------------------- real model

// Runs when ICECACHE_MODEL_GGUF, or else ICECACHE_MODEL (which the test command exports), names
// SmolLM2-135M-Instruct.Q4_1.gguf.
TEST(GgufRealModelTest, SmolLM2Structure) {
  const char* path = std::getenv("ICECACHE_MODEL_GGUF");
  if (path == nullptr || *path == '\0') path = std::getenv("ICECACHE_MODEL");
  if (path == nullptr || *path == '\0') {
    GTEST_SKIP() << "neither ICECACHE_MODEL_GGUF nor ICECACHE_MODEL is set";
  }
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(path));
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(*f->GetString("general.architecture"), "llama");
  EXPECT_EQ(*f->GetUint("llama.block_count"), 30u);
  EXPECT_EQ(*f->GetUint("llama.embedding_length"), 576u);
  EXPECT_EQ(*f->GetUint("llama.attention.head_count"), 9u);
  EXPECT_EQ(*f->GetUint("llama.attention.head_count_kv"), 3u);
  EXPECT_EQ(*f->GetUint("llama.feed_forward_length"), 1536u);
  EXPECT_EQ(*f->GetFloat("llama.rope.freq_base"), 100000.0);
  EXPECT_NEAR(*f->GetFloat("llama.attention.layer_norm_rms_epsilon"), 1e-5, 1e-12);
  EXPECT_EQ(f->ArrayInfo("tokenizer.ggml.tokens")->second, 49152u);

  ASSERT_EQ(f->tensors().size(), 272u);
  std::map<GgmlType, int> by_type;
  for (const GgufTensor& t : f->tensors()) ++by_type[t.type];
  EXPECT_EQ(by_type[GgmlType::kQ4_1], 210);
  EXPECT_EQ(by_type[GgmlType::kF32], 61);
  EXPECT_EQ(by_type[GgmlType::kQ8_0], 1);
  EXPECT_EQ(f->FindTensor("output.weight"), nullptr);  // tied embeddings

  const GgufTensor* embd = f->FindTensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, GgmlType::kQ8_0);
  EXPECT_EQ(embd->dims, (std::vector<uint64_t>{576, 49152}));
  EXPECT_EQ(embd->rows(), 49152u);
  // Reference values from the Python gguf package (gguf 0.19.0,
  // gguf.quants.dequantize(tensor.data, tensor.tensor_type)); our dequantization agreed with
  // it bit for bit on all 134,515,008 elements of this file.
  std::vector<float> row(576);
  ASSERT_OK(Dequantize(embd->type, embd->data + 1000 * (576 / 32 * 34), 576, row.data()));
  EXPECT_EQ(row[0], -0.1119384765625f);
  EXPECT_EQ(row[1], -0.0739593505859375f);
  EXPECT_EQ(row[2], 0.0379791259765625f);
  EXPECT_EQ(row[3], -0.0179901123046875f);
  const GgufTensor* q = f->FindTensor("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::kQ4_1);
  ASSERT_OK(Dequantize(q->type, q->data, 576, row.data()));
  EXPECT_EQ(row[0], -0.0963134765625f);
  EXPECT_EQ(row[1], 0.1573486328125f);
  EXPECT_EQ(row[3], -0.73046875f);
  const GgufTensor* norm = f->FindTensor("output_norm.weight");
  ASSERT_NE(norm, nullptr);
  EXPECT_EQ(reinterpret_cast<const float*>(norm->data)[0], 1.7578125f);

  // Every tensor dequantizes to finite values.
  std::vector<float> buf;
  for (const GgufTensor& t : f->tensors()) {
    buf.resize(t.elements());
    ASSERT_OK(Dequantize(t.type, t.data, t.elements(), buf.data()));
    for (float v : buf) ASSERT_TRUE(std::isfinite(v)) << t.name;
  }
}

}  // namespace
}  // namespace icecache::model
