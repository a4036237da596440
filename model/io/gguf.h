// GGUF model files: a bounds-checked, memory-mapped reader and a writer for fixtures and tools.
//
// Layout (GGUF v2/v3, little-endian; v1 and big-endian files are rejected):
//   "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kv_count x {string key | u32 value_type | value}
//     (an array value: u32 elem_type | u64 n | n x element)
//   tensor_count x {string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset}
//   padding to `general.alignment` (u32, default 32) | tensor data (each offset aligned)
// A string is u64 length + bytes (no terminator). ne[0] is the fastest-varying dimension.
//
// The reader treats the file as untrusted input: every count and length is checked against
// the bytes that remain before anything is allocated or dereferenced, so a truncated or
// fuzzed file gives INVALID_ARGUMENT and never a crash or a huge allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace icecache::model {

// Tensor element types, with ggml's numbering. Only these are supported: a file holding any
// other type (K-quants, IQ*, BF16, ...) is rejected by GgufFile::Open, naming the tensor and
// the type number ("fail loudly" rather than misread weights).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
};

// "f32", "f16", "q4_0", ... ("?" for a value outside the enum).
const char* GgmlTypeName(GgmlType type);
// Elements per block: 1 for F32/F16, 32 for the block-quantized types (0 outside the enum).
uint32_t GgmlBlockElements(GgmlType type);
// Bytes per block: 4, 2, 18 (Q4_0), 20 (Q4_1), 22 (Q5_0), 24 (Q5_1), 34 (Q8_0); 0 outside the enum.
uint32_t GgmlBlockBytes(GgmlType type);
// True when `raw` (a ggml type number read from a file) is one of the supported types.
bool IsSupportedGgmlType(uint32_t raw);

// Metadata value types, with GGUF's numbering.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
// "u8", "i8", ..., "string", "array" ("?" outside the enum).
const char* GgufValueTypeName(GgufValueType type);

// One tensor of a GgufFile. `data` points into the file's mapping and lives as long as the
// GgufFile; `bytes` = elements / GgmlBlockElements(type) * GgmlBlockBytes(type).
struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<uint64_t> dims;  // ne[0] first: the fastest-varying (row length); 1 to 4 dims
  uint64_t offset = 0;         // from the start of the data section, a multiple of alignment
  uint64_t bytes = 0;
  const uint8_t* data = nullptr;

  uint64_t elements() const;  // product of dims
  uint64_t row_elements() const { return dims[0]; }
  uint64_t rows() const;  // product of dims[1..] (1 for a vector)
};

// A GGUF file, memory-mapped read-only.
// Thread safety: immutable after Open; every const method may be called concurrently.
class GgufFile {
 public:
  // Maps the file. NOT_FOUND when `path` does not exist, PERMISSION_DENIED when it cannot be
  // read, INVALID_ARGUMENT for anything malformed: bad magic, a version other than 2 or 3,
  // truncation anywhere, counts or lengths larger than the file, nested arrays, duplicate
  // keys or tensor names, a general.alignment that is not a u32 power of two, more than 4
  // dims, an element count that overflows, a row length that is not a multiple of the block
  // size, an unsupported tensor type (the message names the tensor and the type number),
  // misaligned tensor offsets, tensor data outside the file.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }  // general.alignment, default 32
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }  // file offset of the data section

  // In file order.
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* FindTensor(absl::string_view name) const;  // nullptr if absent

  bool Has(absl::string_view key) const;
  std::vector<std::string> Keys() const;  // in file order
  // The stored type of `key` (kArray for arrays); NOT_FOUND if absent.
  absl::StatusOr<GgufValueType> TypeOf(absl::string_view key) const;
  // The element type and length of array `key`; NOT_FOUND if absent, INVALID_ARGUMENT if it
  // is not an array.
  absl::StatusOr<std::pair<GgufValueType, uint64_t>> ArrayInfo(absl::string_view key) const;

  // Typed metadata. NOT_FOUND if the key is absent; INVALID_ARGUMENT naming the key and its
  // actual type on a mismatch (or a value out of the result's range).
  //   GetUint: any integer type holding a non-negative value.
  //   GetInt: any integer type (a u64 above INT64_MAX is out of range).
  //   GetFloat: f32, f64 or any integer type.
  //   GetBool: bool only. GetString: string only (bytes as stored; UTF-8 is not checked).
  //   Arrays: GetIntArray takes arrays of any integer type, GetFloatArray arrays of
  //   f32/f64/integers, GetStringArray arrays of strings.
  absl::StatusOr<std::string> GetString(absl::string_view key) const;
  absl::StatusOr<uint64_t> GetUint(absl::string_view key) const;
  absl::StatusOr<int64_t> GetInt(absl::string_view key) const;
  absl::StatusOr<double> GetFloat(absl::string_view key) const;
  absl::StatusOr<bool> GetBool(absl::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(absl::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(absl::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(absl::string_view key) const;

 private:
  // One key/value pair, validated at Open; `value` points into the mapping at the value's
  // bytes (for arrays: at the first element, after the element type and count).
  struct Entry {
    std::string key;
    GgufValueType type;
    GgufValueType elem_type;  // arrays only
    uint64_t count;           // arrays only
    const uint8_t* value;
    uint64_t size;  // bytes of the value (for arrays: of the elements)
  };

  GgufFile() = default;
  absl::Status Parse();
  absl::StatusOr<const Entry*> Find(absl::string_view key) const;
  absl::StatusOr<const Entry*> FindArray(absl::string_view key) const;

  const uint8_t* base_ = nullptr;  // the mapping (nullptr for an empty file)
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<Entry> entries_;
  absl::flat_hash_map<std::string, size_t> entry_index_;
  std::vector<GgufTensor> tensors_;
  absl::flat_hash_map<std::string, size_t> tensor_index_;
};

// Builds a GGUF v3 file: for test fixtures and tools. Values are serialized when added; keys
// and tensors are written in the order they were added, tensor data aligned to `alignment`.
// When alignment != 32 a u32 general.alignment is written first (unless the caller added
// one; Write() then checks it agrees).
// Thread safety: none (a builder owned by one thread).
class GgufWriter {
 public:
  explicit GgufWriter(uint64_t alignment = 32);

  void AddUint8(std::string key, uint8_t v);
  void AddInt8(std::string key, int8_t v);
  void AddUint16(std::string key, uint16_t v);
  void AddInt16(std::string key, int16_t v);
  void AddUint32(std::string key, uint32_t v);
  void AddInt32(std::string key, int32_t v);
  void AddUint64(std::string key, uint64_t v);
  void AddInt64(std::string key, int64_t v);
  void AddFloat32(std::string key, float v);
  void AddFloat64(std::string key, double v);
  void AddBool(std::string key, bool v);
  void AddString(std::string key, std::string v);
  void AddStringArray(std::string key, std::vector<std::string> v);
  void AddInt32Array(std::string key, std::vector<int32_t> v);
  void AddFloat32Array(std::string key, std::vector<float> v);
  void AddFloat64Array(std::string key, std::vector<double> v);
  void AddBoolArray(std::string key, std::vector<bool> v);
  // An array of any integer element type. INVALID_ARGUMENT (nothing added) when `elem_type`
  // is not an integer type or a value does not fit it.
  absl::Status AddIntArray(std::string key, GgufValueType elem_type, std::vector<int64_t> v);

  // `data` is the raw bytes of the tensor in `type`'s layout. INVALID_ARGUMENT (nothing
  // added) when the type is unsupported, dims has not 1 to 4 entries, dims[0] is not a
  // multiple of the block size, the element count overflows, or data.size() is not the
  // size the type and dims imply.
  absl::Status AddTensor(std::string name, GgmlType type, std::vector<uint64_t> dims,
                         std::vector<uint8_t> data);

  // The file's bytes. INVALID_ARGUMENT for an alignment that is not a power of two,
  // duplicate keys or tensor names, or a caller-added general.alignment that disagrees.
  absl::StatusOr<std::vector<uint8_t>> Serialize() const;
  // Serialize() written to `path` (replaced if it exists). INTERNAL on an I/O error.
  absl::Status Write(const std::string& path) const;

 private:
  struct Kv {
    std::string key;
    GgufValueType type;
    std::vector<uint8_t> value;  // serialized: for arrays elem type, count and elements
  };
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<uint64_t> dims;
    std::vector<uint8_t> data;
  };
  void AddScalar(std::string key, GgufValueType type, const void* bytes, size_t n);

  uint64_t alignment_;
  std::vector<Kv> kvs_;
  std::vector<Tensor> tensors_;
};

}  // namespace icecache::model
