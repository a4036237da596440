#include "model/io/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace icecache::model {

// The reader and writer copy little-endian scalars straight from and to memory.
static_assert(std::endian::native == std::endian::little, "GGUF I/O assumes a little-endian host");

namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint32_t kMaxDims = 4;
constexpr char kAlignmentKey[] = "general.alignment";
// Smallest possible encodings, used to reject counts before anything is allocated:
// a key/value pair is at least a key length (8), a value type (4) and a 1-byte value; a tensor
// info at least a name length (8), n_dims (4), one dim (8), a type (4) and an offset (8).
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;

bool IsValueType(uint32_t raw) { return raw <= static_cast<uint32_t>(GgufValueType::kFloat64); }

// Bytes of a fixed-size value type; 0 for string and array.
uint64_t FixedSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      return 0;
  }
  return 0;
}

bool IsInteger(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

bool IsFloat(GgufValueType t) {
  return t == GgufValueType::kFloat32 || t == GgufValueType::kFloat64;
}

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Integer value of type `t` (an integer type) at `p`, as a signed 64-bit value. False when it
// does not fit (a u64 above INT64_MAX).
bool LoadSigned(GgufValueType t, const uint8_t* p, int64_t* out) {
  switch (t) {
    case GgufValueType::kUint8:
      *out = Load<uint8_t>(p);
      return true;
    case GgufValueType::kInt8:
      *out = Load<int8_t>(p);
      return true;
    case GgufValueType::kUint16:
      *out = Load<uint16_t>(p);
      return true;
    case GgufValueType::kInt16:
      *out = Load<int16_t>(p);
      return true;
    case GgufValueType::kUint32:
      *out = Load<uint32_t>(p);
      return true;
    case GgufValueType::kInt32:
      *out = Load<int32_t>(p);
      return true;
    case GgufValueType::kInt64:
      *out = Load<int64_t>(p);
      return true;
    case GgufValueType::kUint64: {
      const uint64_t u = Load<uint64_t>(p);
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
      *out = static_cast<int64_t>(u);
      return true;
    }
    default:
      return false;
  }
}

// Integer value of type `t` at `p` as an unsigned value. False when it is negative.
bool LoadUnsigned(GgufValueType t, const uint8_t* p, uint64_t* out) {
  if (t == GgufValueType::kUint64) {
    *out = Load<uint64_t>(p);
    return true;
  }
  int64_t s;
  if (!LoadSigned(t, p, &s) || s < 0) return false;
  *out = static_cast<uint64_t>(s);
  return true;
}

// A float or integer value as a double (integers above 2^53 round).
bool LoadDouble(GgufValueType t, const uint8_t* p, double* out) {
  if (t == GgufValueType::kFloat32) {
    *out = Load<float>(p);
    return true;
  }
  if (t == GgufValueType::kFloat64) {
    *out = Load<double>(p);
    return true;
  }
  if (t == GgufValueType::kUint64) {
    *out = static_cast<double>(Load<uint64_t>(p));
    return true;
  }
  int64_t s;
  if (!LoadSigned(t, p, &s)) return false;
  *out = static_cast<double>(s);
  return true;
}

// Names of the ggml types this reader does not support, for error messages.
const char* UnsupportedGgmlTypeName(uint32_t raw) {
  switch (raw) {
    case 4:
      return "q4_2 (removed)";
    case 5:
      return "q4_3 (removed)";
    case 9:
      return "q8_1";
    case 10:
      return "q2_K";
    case 11:
      return "q3_K";
    case 12:
      return "q4_K";
    case 13:
      return "q5_K";
    case 14:
      return "q6_K";
    case 15:
      return "q8_K";
    case 16:
      return "iq2_xxs";
    case 17:
      return "iq2_xs";
    case 18:
      return "iq3_xxs";
    case 19:
      return "iq1_s";
    case 20:
      return "iq4_nl";
    case 21:
      return "iq3_s";
    case 22:
      return "iq2_s";
    case 23:
      return "iq4_xs";
    case 24:
      return "i8";
    case 25:
      return "i16";
    case 26:
      return "i32";
    case 27:
      return "i64";
    case 28:
      return "f64";
    case 29:
      return "iq1_m";
    case 30:
      return "bf16";
    default:
      return "unknown";
  }
}

// A bounds-checked little-endian cursor over untrusted bytes.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  const uint8_t* here() const { return data_ + pos_; }

  absl::Status Skip(uint64_t n, absl::string_view what) {
    if (n > remaining()) return Truncated(n, what);
    pos_ += n;
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status Read(T* out, absl::string_view what) {
    if (sizeof(T) > remaining()) return Truncated(sizeof(T), what);
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  // A GGUF string (u64 length, bytes); the view points into the buffer.
  absl::Status ReadString(absl::string_view* out, absl::string_view what) {
    uint64_t len = 0;
    ICECACHE_RETURN_IF_ERROR(Read(&len, what));
    if (len > remaining()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: length %u at byte %u exceeds the %u bytes left in the file", what,
                          len, pos_ - 8, remaining()));
    }
    *out = absl::string_view(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return absl::OkStatus();
  }

 private:
  absl::Status Truncated(uint64_t n, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrFormat(
        "truncated: %s needs %u bytes at byte %u, the file has %u", what, n, pos_, size_));
  }

  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// Overflow-checked a * b.
bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

uint64_t AlignUp(uint64_t v, uint64_t alignment) {
  return (v + alignment - 1) / alignment * alignment;
}

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Bytes of a tensor of `type` (supported) with `dims`; INVALID_ARGUMENT naming `name` when the
// row length is not a multiple of the block or the size overflows.
absl::StatusOr<uint64_t> TensorBytes(absl::string_view name, GgmlType type,
                                     const std::vector<uint64_t>& dims) {
  const uint64_t block = GgmlBlockElements(type);
  if (dims[0] % block != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor \"%s\": row length %u is not a multiple of %s's block of %u elements", name,
        dims[0], GgmlTypeName(type), block));
  }
  uint64_t elements = 1;
  for (uint64_t d : dims) {
    if (MulOverflows(elements, d, &elements) ||
        elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tensor \"%s\": element count overflows", name));
    }
  }
  uint64_t bytes;
  if (MulOverflows(elements / block, GgmlBlockBytes(type), &bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat("tensor \"%s\": byte size overflows", name));
  }
  return bytes;
}

std::string DimsString(const std::vector<uint64_t>& dims) {
  std::string s = "{";
  for (size_t i = 0; i < dims.size(); ++i) absl::StrAppend(&s, i ? ", " : "", dims[i]);
  return s + "}";
}

}  // namespace

// -------------------------------------------------------------------------------- types

const char* GgmlTypeName(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return "f32";
    case GgmlType::kF16:
      return "f16";
    case GgmlType::kQ4_0:
      return "q4_0";
    case GgmlType::kQ4_1:
      return "q4_1";
    case GgmlType::kQ5_0:
      return "q5_0";
    case GgmlType::kQ5_1:
      return "q5_1";
    case GgmlType::kQ8_0:
      return "q8_0";
  }
  return "?";
}

uint32_t GgmlBlockElements(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
    case GgmlType::kF16:
      return 1;
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
    case GgmlType::kQ8_0:
      return 32;
  }
  return 0;
}

uint32_t GgmlBlockBytes(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return 4;
    case GgmlType::kF16:
      return 2;
    case GgmlType::kQ4_0:
      return 18;  // f16 d, u8 qs[16]
    case GgmlType::kQ4_1:
      return 20;  // f16 d, f16 m, u8 qs[16]
    case GgmlType::kQ5_0:
      return 22;  // f16 d, u8 qh[4], u8 qs[16]
    case GgmlType::kQ5_1:
      return 24;  // f16 d, f16 m, u8 qh[4], u8 qs[16]
    case GgmlType::kQ8_0:
      return 34;  // f16 d, i8 qs[32]
  }
  return 0;
}

bool IsSupportedGgmlType(uint32_t raw) {
  switch (raw) {
    case 0:
    case 1:
    case 2:
    case 3:
    case 6:
    case 7:
    case 8:
      return true;
    default:
      return false;
  }
}

const char* GgufValueTypeName(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
      return "u8";
    case GgufValueType::kInt8:
      return "i8";
    case GgufValueType::kUint16:
      return "u16";
    case GgufValueType::kInt16:
      return "i16";
    case GgufValueType::kUint32:
      return "u32";
    case GgufValueType::kInt32:
      return "i32";
    case GgufValueType::kFloat32:
      return "f32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "u64";
    case GgufValueType::kInt64:
      return "i64";
    case GgufValueType::kFloat64:
      return "f64";
  }
  return "?";
}

uint64_t GgufTensor::elements() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;  // cannot overflow: checked when the file was opened
  return n;
}

uint64_t GgufTensor::rows() const {
  uint64_t n = 1;
  for (size_t i = 1; i < dims.size(); ++i) n *= dims[i];
  return n;
}

// -------------------------------------------------------------------------------- reader

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat(path, ": ", std::strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(msg);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::InternalError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ > 0) {
    void* p = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      file->size_ = 0;
      return absl::InternalError(absl::StrCat(path, ": mmap: ", std::strerror(err)));
    }
    file->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file open
  if (absl::Status s = file->Parse(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return file;
}

GgufFile::~GgufFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

absl::Status GgufFile::Parse() {
  static const uint8_t kEmpty = 0;
  Cursor c(base_ != nullptr ? base_ : &kEmpty, size_);

  // Header.
  char magic[4] = {};
  ICECACHE_RETURN_IF_ERROR(c.Read(&magic, "the magic"));
  if (std::memcmp(magic, kMagic, 4) != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("not a GGUF file: magic %02x %02x %02x %02x, expected \"GGUF\"",
                        static_cast<uint8_t>(magic[0]), static_cast<uint8_t>(magic[1]),
                        static_cast<uint8_t>(magic[2]), static_cast<uint8_t>(magic[3])));
  }
  ICECACHE_RETURN_IF_ERROR(c.Read(&version_, "the version"));
  if (version_ != 2 && version_ != 3) {
    if ((version_ & 0xffffu) == 0 && version_ != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "GGUF version %u read little-endian: big-endian files are not supported", version_));
    }
    return absl::InvalidArgumentError(
        absl::StrFormat("unsupported GGUF version %u (2 and 3 are supported)", version_));
  }
  uint64_t tensor_count = 0, kv_count = 0;
  ICECACHE_RETURN_IF_ERROR(c.Read(&tensor_count, "the tensor count"));
  ICECACHE_RETURN_IF_ERROR(c.Read(&kv_count, "the key/value count"));
  if (kv_count > c.remaining() / kMinKvBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "key/value count %u cannot fit in the %u bytes left in the file", kv_count, c.remaining()));
  }
  if (tensor_count > c.remaining() / kMinTensorInfoBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor count %u cannot fit in the %u bytes left in the file", tensor_count,
                        c.remaining()));
  }

  // Key/value pairs.
  entries_.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    const std::string what = absl::StrCat("key/value pair ", i);
    absl::string_view key;
    ICECACHE_RETURN_IF_ERROR(c.ReadString(&key, what + " key"));
    const std::string where = absl::StrCat("key \"", key, "\"");
    uint32_t raw_type = 0;
    ICECACHE_RETURN_IF_ERROR(c.Read(&raw_type, where + " type"));
    if (!IsValueType(raw_type)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s has unknown value type %u", where, raw_type));
    }
    Entry e{};
    e.key = std::string(key);
    e.type = static_cast<GgufValueType>(raw_type);
    if (e.type == GgufValueType::kString) {
      absl::string_view v;
      ICECACHE_RETURN_IF_ERROR(c.ReadString(&v, where + " value"));
      e.value = reinterpret_cast<const uint8_t*>(v.data());
      e.size = v.size();
    } else if (e.type == GgufValueType::kArray) {
      uint32_t raw_elem = 0;
      ICECACHE_RETURN_IF_ERROR(c.Read(&raw_elem, where + " array element type"));
      if (!IsValueType(raw_elem)) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: array of unknown value type %u", where, raw_elem));
      }
      e.elem_type = static_cast<GgufValueType>(raw_elem);
      if (e.elem_type == GgufValueType::kArray) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: nested arrays are not supported", where));
      }
      ICECACHE_RETURN_IF_ERROR(c.Read(&e.count, where + " array length"));
      e.value = c.here();
      const uint64_t start = c.pos();
      if (e.elem_type == GgufValueType::kString) {
        if (e.count > c.remaining() / 8) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s: array of %u strings cannot fit in the %u bytes left", where,
                              e.count, c.remaining()));
        }
        for (uint64_t j = 0; j < e.count; ++j) {
          absl::string_view s;
          ICECACHE_RETURN_IF_ERROR(c.ReadString(&s, where + " array element"));
        }
      } else {
        const uint64_t elem = FixedSize(e.elem_type);
        if (e.count > c.remaining() / elem) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s: array of %u %s cannot fit in the %u bytes left", where, e.count,
                              GgufValueTypeName(e.elem_type), c.remaining()));
        }
        ICECACHE_RETURN_IF_ERROR(c.Skip(e.count * elem, where + " array"));
      }
      e.size = c.pos() - start;
    } else {
      e.value = c.here();
      e.size = FixedSize(e.type);
      ICECACHE_RETURN_IF_ERROR(c.Skip(e.size, where + " value"));
    }
    if (!entry_index_.emplace(e.key, entries_.size()).second) {
      return absl::InvalidArgumentError(absl::StrFormat("duplicate %s", where));
    }
    entries_.push_back(std::move(e));
  }

  if (auto it = entry_index_.find(kAlignmentKey); it != entry_index_.end()) {
    const Entry& e = entries_[it->second];
    if (e.type != GgufValueType::kUint32) {
      return absl::InvalidArgumentError(absl::StrFormat("%s must be a u32, the file has a %s",
                                                        kAlignmentKey, GgufValueTypeName(e.type)));
    }
    alignment_ = Load<uint32_t>(e.value);
    if (!IsPowerOfTwo(alignment_)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s = %u is not a power of two", kAlignmentKey, alignment_));
    }
  } else {
    alignment_ = kDefaultAlignment;
  }

  // Tensor infos.
  tensors_.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensor t;
    absl::string_view name;
    ICECACHE_RETURN_IF_ERROR(c.ReadString(&name, absl::StrCat("tensor info ", i, " name")));
    t.name = std::string(name);
    const std::string where = absl::StrCat("tensor \"", t.name, "\"");
    uint32_t n_dims = 0;
    ICECACHE_RETURN_IF_ERROR(c.Read(&n_dims, where + " dim count"));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s has %u dims (1 to %u are supported)", where, n_dims, kMaxDims));
    }
    t.dims.resize(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      ICECACHE_RETURN_IF_ERROR(c.Read(&t.dims[d], where + " dims"));
      if (t.dims[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: dim %u = %u is out of range", where, d, t.dims[d]));
      }
    }
    uint32_t raw_type = 0;
    ICECACHE_RETURN_IF_ERROR(c.Read(&raw_type, where + " type"));
    if (!IsSupportedGgmlType(raw_type)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has ggml type %u (%s), which is not supported (f32, f16, q4_0, q4_1, q5_0, "
          "q5_1, q8_0 are)",
          where, raw_type, UnsupportedGgmlTypeName(raw_type)));
    }
    t.type = static_cast<GgmlType>(raw_type);
    ICECACHE_RETURN_IF_ERROR(c.Read(&t.offset, where + " offset"));
    ICECACHE_ASSIGN_OR_RETURN(t.bytes, TensorBytes(t.name, t.type, t.dims));
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) {
      return absl::InvalidArgumentError(absl::StrFormat("duplicate %s", where));
    }
    tensors_.push_back(std::move(t));
  }

  // Tensor data: the section starts at the next multiple of the alignment.
  data_offset_ = AlignUp(c.pos(), alignment_);
  for (GgufTensor& t : tensors_) {
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tensor \"%s\": offset %u is not a multiple of the alignment %u", t.name,
                          t.offset, alignment_));
    }
    const uint64_t avail = data_offset_ <= size_ ? size_ - data_offset_ : 0;
    if (t.offset > avail || t.bytes > avail - t.offset) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor \"%s\" (%s %s, %u bytes at data offset %u) extends past the end of the file "
          "(%u bytes of data)",
          t.name, GgmlTypeName(t.type), DimsString(t.dims), t.bytes, t.offset, avail));
    }
    t.data = base_ + data_offset_ + t.offset;
  }
  return absl::OkStatus();
}

const GgufTensor* GgufFile::FindTensor(absl::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

bool GgufFile::Has(absl::string_view key) const { return entry_index_.contains(key); }

std::vector<std::string> GgufFile::Keys() const {
  std::vector<std::string> keys;
  keys.reserve(entries_.size());
  for (const Entry& e : entries_) keys.push_back(e.key);
  return keys;
}

absl::StatusOr<const GgufFile::Entry*> GgufFile::Find(absl::string_view key) const {
  auto it = entry_index_.find(key);
  if (it == entry_index_.end()) {
    return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  }
  return &entries_[it->second];
}

namespace {

std::string TypeDescription(GgufValueType type, GgufValueType elem_type) {
  if (type == GgufValueType::kArray) {
    return absl::StrCat("array of ", GgufValueTypeName(elem_type));
  }
  return GgufValueTypeName(type);
}

absl::Status Mismatch(absl::string_view key, GgufValueType type, GgufValueType elem_type,
                      absl::string_view wanted) {
  return absl::InvalidArgumentError(absl::StrCat(
      "GGUF key \"", key, "\" has type ", TypeDescription(type, elem_type), ", not ", wanted));
}

}  // namespace

absl::StatusOr<const GgufFile::Entry*> GgufFile::FindArray(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  if (e->type != GgufValueType::kArray) return Mismatch(key, e->type, e->elem_type, "an array");
  return e;
}

absl::StatusOr<GgufValueType> GgufFile::TypeOf(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  return e->type;
}

absl::StatusOr<std::pair<GgufValueType, uint64_t>> GgufFile::ArrayInfo(
    absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, FindArray(key));
  return std::make_pair(e->elem_type, e->count);
}

absl::StatusOr<std::string> GgufFile::GetString(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  if (e->type != GgufValueType::kString) return Mismatch(key, e->type, e->elem_type, "string");
  return std::string(reinterpret_cast<const char*>(e->value), e->size);
}

absl::StatusOr<uint64_t> GgufFile::GetUint(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  if (!IsInteger(e->type)) return Mismatch(key, e->type, e->elem_type, "an integer");
  uint64_t v;
  if (!LoadUnsigned(e->type, e->value, &v)) {
    int64_t s = 0;
    LoadSigned(e->type, e->value, &s);
    return absl::InvalidArgumentError(absl::StrCat("GGUF key \"", key, "\" (",
                                                   GgufValueTypeName(e->type), ") = ", s,
                                                   " is negative, an unsigned value is needed"));
  }
  return v;
}

absl::StatusOr<int64_t> GgufFile::GetInt(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  if (!IsInteger(e->type)) return Mismatch(key, e->type, e->elem_type, "an integer");
  int64_t v;
  if (!LoadSigned(e->type, e->value, &v)) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF key \"", key,
                                                   "\" (u64) = ", Load<uint64_t>(e->value),
                                                   " does not fit a signed 64-bit integer"));
  }
  return v;
}

absl::StatusOr<double> GgufFile::GetFloat(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  double v;
  if (!(IsFloat(e->type) || IsInteger(e->type)) || !LoadDouble(e->type, e->value, &v)) {
    return Mismatch(key, e->type, e->elem_type, "a number");
  }
  return v;
}

absl::StatusOr<bool> GgufFile::GetBool(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, Find(key));
  if (e->type != GgufValueType::kBool) return Mismatch(key, e->type, e->elem_type, "bool");
  return e->value[0] != 0;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, FindArray(key));
  if (e->elem_type != GgufValueType::kString) {
    return Mismatch(key, e->type, e->elem_type, "an array of strings");
  }
  std::vector<std::string> out;
  out.reserve(e->count);
  const uint8_t* p = e->value;
  for (uint64_t i = 0; i < e->count; ++i) {  // lengths were bounds-checked by Parse()
    const uint64_t len = Load<uint64_t>(p);
    out.emplace_back(reinterpret_cast<const char*>(p + 8), len);
    p += 8 + len;
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, FindArray(key));
  if (!IsInteger(e->elem_type)) {
    return Mismatch(key, e->type, e->elem_type, "an array of integers");
  }
  const uint64_t elem = FixedSize(e->elem_type);
  std::vector<int64_t> out(e->count);
  for (uint64_t i = 0; i < e->count; ++i) {
    if (!LoadSigned(e->elem_type, e->value + i * elem, &out[i])) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF key \"", key, "\": element ", i,
                                                     " does not fit a signed 64-bit integer"));
    }
  }
  return out;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(absl::string_view key) const {
  ICECACHE_ASSIGN_OR_RETURN(const Entry* e, FindArray(key));
  if (!IsInteger(e->elem_type) && !IsFloat(e->elem_type)) {
    return Mismatch(key, e->type, e->elem_type, "an array of numbers");
  }
  const uint64_t elem = FixedSize(e->elem_type);
  std::vector<double> out(e->count);
  for (uint64_t i = 0; i < e->count; ++i) LoadDouble(e->elem_type, e->value + i * elem, &out[i]);
  return out;
}

// -------------------------------------------------------------------------------- writer

namespace {

template <typename T>
void Put(std::vector<uint8_t>* out, T v) {
  const size_t at = out->size();
  out->resize(at + sizeof(T));
  std::memcpy(out->data() + at, &v, sizeof(T));
}

void PutString(std::vector<uint8_t>* out, absl::string_view s) {
  Put<uint64_t>(out, s.size());
  out->insert(out->end(), s.begin(), s.end());
}

bool FitsInteger(GgufValueType t, int64_t v) {
  switch (t) {
    case GgufValueType::kUint8:
      return v >= 0 && v <= std::numeric_limits<uint8_t>::max();
    case GgufValueType::kInt8:
      return v >= std::numeric_limits<int8_t>::min() && v <= std::numeric_limits<int8_t>::max();
    case GgufValueType::kUint16:
      return v >= 0 && v <= std::numeric_limits<uint16_t>::max();
    case GgufValueType::kInt16:
      return v >= std::numeric_limits<int16_t>::min() && v <= std::numeric_limits<int16_t>::max();
    case GgufValueType::kUint32:
      return v >= 0 && v <= std::numeric_limits<uint32_t>::max();
    case GgufValueType::kInt32:
      return v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
    case GgufValueType::kUint64:
      return v >= 0;
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

void PutInteger(std::vector<uint8_t>* out, GgufValueType t, int64_t v) {
  switch (t) {
    case GgufValueType::kUint8:
      Put(out, static_cast<uint8_t>(v));
      break;
    case GgufValueType::kInt8:
      Put(out, static_cast<int8_t>(v));
      break;
    case GgufValueType::kUint16:
      Put(out, static_cast<uint16_t>(v));
      break;
    case GgufValueType::kInt16:
      Put(out, static_cast<int16_t>(v));
      break;
    case GgufValueType::kUint32:
      Put(out, static_cast<uint32_t>(v));
      break;
    case GgufValueType::kInt32:
      Put(out, static_cast<int32_t>(v));
      break;
    case GgufValueType::kUint64:
      Put(out, static_cast<uint64_t>(v));
      break;
    case GgufValueType::kInt64:
      Put(out, v);
      break;
    default:
      break;
  }
}

std::vector<uint8_t> ArrayHeader(GgufValueType elem, uint64_t count) {
  std::vector<uint8_t> v;
  Put(&v, static_cast<uint32_t>(elem));
  Put(&v, count);
  return v;
}

}  // namespace

GgufWriter::GgufWriter(uint64_t alignment) : alignment_(alignment) {}

void GgufWriter::AddScalar(std::string key, GgufValueType type, const void* bytes, size_t n) {
  const auto* p = static_cast<const uint8_t*>(bytes);
  kvs_.push_back({std::move(key), type, std::vector<uint8_t>(p, p + n)});
}

void GgufWriter::AddUint8(std::string key, uint8_t v) {
  AddScalar(std::move(key), GgufValueType::kUint8, &v, sizeof(v));
}
void GgufWriter::AddInt8(std::string key, int8_t v) {
  AddScalar(std::move(key), GgufValueType::kInt8, &v, sizeof(v));
}
void GgufWriter::AddUint16(std::string key, uint16_t v) {
  AddScalar(std::move(key), GgufValueType::kUint16, &v, sizeof(v));
}
void GgufWriter::AddInt16(std::string key, int16_t v) {
  AddScalar(std::move(key), GgufValueType::kInt16, &v, sizeof(v));
}
void GgufWriter::AddUint32(std::string key, uint32_t v) {
  AddScalar(std::move(key), GgufValueType::kUint32, &v, sizeof(v));
}
void GgufWriter::AddInt32(std::string key, int32_t v) {
  AddScalar(std::move(key), GgufValueType::kInt32, &v, sizeof(v));
}
void GgufWriter::AddUint64(std::string key, uint64_t v) {
  AddScalar(std::move(key), GgufValueType::kUint64, &v, sizeof(v));
}
void GgufWriter::AddInt64(std::string key, int64_t v) {
  AddScalar(std::move(key), GgufValueType::kInt64, &v, sizeof(v));
}
void GgufWriter::AddFloat32(std::string key, float v) {
  AddScalar(std::move(key), GgufValueType::kFloat32, &v, sizeof(v));
}
void GgufWriter::AddFloat64(std::string key, double v) {
  AddScalar(std::move(key), GgufValueType::kFloat64, &v, sizeof(v));
}
void GgufWriter::AddBool(std::string key, bool v) {
  const uint8_t b = v ? 1 : 0;
  AddScalar(std::move(key), GgufValueType::kBool, &b, 1);
}

void GgufWriter::AddString(std::string key, std::string v) {
  std::vector<uint8_t> bytes;
  PutString(&bytes, v);
  kvs_.push_back({std::move(key), GgufValueType::kString, std::move(bytes)});
}

void GgufWriter::AddStringArray(std::string key, std::vector<std::string> v) {
  std::vector<uint8_t> bytes = ArrayHeader(GgufValueType::kString, v.size());
  for (const std::string& s : v) PutString(&bytes, s);
  kvs_.push_back({std::move(key), GgufValueType::kArray, std::move(bytes)});
}

void GgufWriter::AddInt32Array(std::string key, std::vector<int32_t> v) {
  std::vector<uint8_t> bytes = ArrayHeader(GgufValueType::kInt32, v.size());
  for (int32_t x : v) Put(&bytes, x);
  kvs_.push_back({std::move(key), GgufValueType::kArray, std::move(bytes)});
}

void GgufWriter::AddFloat32Array(std::string key, std::vector<float> v) {
  std::vector<uint8_t> bytes = ArrayHeader(GgufValueType::kFloat32, v.size());
  for (float x : v) Put(&bytes, x);
  kvs_.push_back({std::move(key), GgufValueType::kArray, std::move(bytes)});
}

void GgufWriter::AddFloat64Array(std::string key, std::vector<double> v) {
  std::vector<uint8_t> bytes = ArrayHeader(GgufValueType::kFloat64, v.size());
  for (double x : v) Put(&bytes, x);
  kvs_.push_back({std::move(key), GgufValueType::kArray, std::move(bytes)});
}

void GgufWriter::AddBoolArray(std::string key, std::vector<bool> v) {
  std::vector<uint8_t> bytes = ArrayHeader(GgufValueType::kBool, v.size());
  for (bool x : v) Put<uint8_t>(&bytes, x ? 1 : 0);
  kvs_.push_back({std::move(key), GgufValueType::kArray, std::move(bytes)});
}

absl::Status GgufWriter::AddIntArray(std::string key, GgufValueType elem_type,
                                     std::vector<int64_t> v) {
  if (!IsInteger(elem_type)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AddIntArray(\"", key, "\"): ", GgufValueTypeName(elem_type), " is not an integer type"));
  }
  std::vector<uint8_t> bytes = ArrayHeader(elem_type, v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (!FitsInteger(elem_type, v[i])) {
      return absl::InvalidArgumentError(absl::StrCat("AddIntArray(\"", key, "\"): element ", i,
                                                     " = ", v[i], " does not fit ",
                                                     GgufValueTypeName(elem_type)));
    }
    PutInteger(&bytes, elem_type, v[i]);
  }
  kvs_.push_back({std::move(key), GgufValueType::kArray, std::move(bytes)});
  return absl::OkStatus();
}

absl::Status GgufWriter::AddTensor(std::string name, GgmlType type, std::vector<uint64_t> dims,
                                   std::vector<uint8_t> data) {
  if (!IsSupportedGgmlType(static_cast<uint32_t>(type))) {
    return absl::InvalidArgumentError(absl::StrFormat("tensor \"%s\": unsupported ggml type %u",
                                                      name, static_cast<uint32_t>(type)));
  }
  if (dims.empty() || dims.size() > kMaxDims) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor \"%s\" has %u dims (1 to %u are supported)", name, dims.size(), kMaxDims));
  }
  ICECACHE_ASSIGN_OR_RETURN(const uint64_t bytes, TensorBytes(name, type, dims));
  if (data.size() != bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor \"%s\" (%s %s) needs %u bytes, %u were given", name,
                        GgmlTypeName(type), DimsString(dims), bytes, data.size()));
  }
  tensors_.push_back({std::move(name), type, std::move(dims), std::move(data)});
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> GgufWriter::Serialize() const {
  if (!IsPowerOfTwo(alignment_) || alignment_ > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF alignment ", alignment_, " is not a u32 power of two"));
  }
  absl::flat_hash_set<absl::string_view> keys;
  bool has_alignment_key = false;
  for (const Kv& kv : kvs_) {
    if (!keys.insert(kv.key).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate GGUF key \"", kv.key, "\""));
    }
    if (kv.key == kAlignmentKey) {
      if (kv.type != GgufValueType::kUint32 || Load<uint32_t>(kv.value.data()) != alignment_) {
        return absl::InvalidArgumentError(absl::StrCat(kAlignmentKey, " must be the u32 ",
                                                       alignment_, " the writer was built with"));
      }
      has_alignment_key = true;
    }
  }
  absl::flat_hash_set<absl::string_view> names;
  for (const Tensor& t : tensors_) {
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name \"", t.name, "\""));
    }
  }
  const bool add_alignment_key = alignment_ != kDefaultAlignment && !has_alignment_key;

  std::vector<uint8_t> out;
  out.insert(out.end(), kMagic, kMagic + 4);
  Put<uint32_t>(&out, 3);
  Put<uint64_t>(&out, tensors_.size());
  Put<uint64_t>(&out, kvs_.size() + (add_alignment_key ? 1 : 0));
  if (add_alignment_key) {
    PutString(&out, kAlignmentKey);
    Put(&out, static_cast<uint32_t>(GgufValueType::kUint32));
    Put(&out, static_cast<uint32_t>(alignment_));
  }
  for (const Kv& kv : kvs_) {
    PutString(&out, kv.key);
    Put(&out, static_cast<uint32_t>(kv.type));
    out.insert(out.end(), kv.value.begin(), kv.value.end());
  }
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    PutString(&out, t.name);
    Put(&out, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) Put(&out, d);
    Put(&out, static_cast<uint32_t>(t.type));
    Put(&out, offset);
    offset = AlignUp(offset + t.data.size(), alignment_);
  }
  if (!tensors_.empty()) {
    out.resize(AlignUp(out.size(), alignment_), 0);
    for (const Tensor& t : tensors_) {
      out.insert(out.end(), t.data.begin(), t.data.end());
      out.resize(AlignUp(out.size(), alignment_), 0);
    }
  }
  return out;
}

absl::Status GgufWriter::Write(const std::string& path) const {
  ICECACHE_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, Serialize());
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::InternalError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  const bool wrote = bytes.empty() || std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int err = errno;
  if (std::fclose(f) != 0 || !wrote) {
    return absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace icecache::model
