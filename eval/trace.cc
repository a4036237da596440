#include "eval/trace.h"

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace icecache::eval {
namespace {

constexpr char kMagic[8] = {'I', 'C', 'T', 'R', 'A', 'C', 'E', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kAlign = 64;

// The fixed 64-byte little-endian header.
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t num_layers;
  uint32_t num_kv_heads;
  uint32_t num_q_heads;
  uint32_t head_dim;
  uint32_t num_tokens;
  uint32_t num_queries;
  uint32_t kv_dtype;  // 0 fp32, 1 fp16, 2 bf16 (ElemType)
  uint32_t flags;     // bit 0: values present
  uint32_t description_bytes;
  uint32_t reserved[4];
};
static_assert(sizeof(Header) == 64);

uint64_t Padded(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

RowView Trace::Keys(uint32_t layer, uint32_t kv_head) const {
  RowView v;
  v.data = keys.data() + (uint64_t{layer} * num_kv_heads + kv_head) * HeadBytes();
  v.type = kv_type;
  v.dim = head_dim;
  v.rows = num_tokens;
  return v;
}

RowView Trace::Values(uint32_t layer, uint32_t kv_head) const {
  RowView v = Keys(layer, kv_head);
  v.data = has_values ? values.data() + (uint64_t{layer} * num_kv_heads + kv_head) * HeadBytes()
                      : nullptr;
  return v;
}

const float* Trace::Query(uint32_t layer, uint32_t q_head, uint32_t qi) const {
  return queries.data() +
         ((uint64_t{layer} * num_q_heads + q_head) * query_positions.size() + qi) * head_dim;
}

float* Trace::MutableQuery(uint32_t layer, uint32_t q_head, uint32_t qi) {
  return const_cast<float*>(Query(layer, q_head, qi));
}

void Trace::Allocate() {
  const uint64_t kv = uint64_t{num_layers} * num_kv_heads * HeadBytes();
  keys.assign(kv, 0);
  values.assign(has_values ? kv : 0, 0);
  queries.assign(uint64_t{num_layers} * num_q_heads * query_positions.size() * head_dim, 0.f);
}

absl::Status ValidateTrace(const Trace& t) {
  if (t.num_layers == 0 || t.num_kv_heads == 0 || t.num_q_heads == 0 || t.head_dim == 0 ||
      t.num_tokens == 0) {
    return absl::InvalidArgumentError("trace has an empty dimension");
  }
  if (t.num_q_heads % t.num_kv_heads != 0) {
    return absl::InvalidArgumentError("num_q_heads is not a multiple of num_kv_heads");
  }
  for (size_t i = 0; i < t.query_positions.size(); ++i) {
    if (t.query_positions[i] >= t.num_tokens ||
        (i > 0 && t.query_positions[i] <= t.query_positions[i - 1])) {
      return absl::InvalidArgumentError("query positions must ascend and lie below num_tokens");
    }
  }
  const uint64_t kv = uint64_t{t.num_layers} * t.num_kv_heads * t.HeadBytes();
  if (t.keys.size() != kv || t.values.size() != (t.has_values ? kv : 0) ||
      t.queries.size() !=
          uint64_t{t.num_layers} * t.num_q_heads * t.query_positions.size() * t.head_dim) {
    return absl::InvalidArgumentError("trace arrays do not match its header");
  }
  return absl::OkStatus();
}

absl::Status WriteTrace(const Trace& t, const std::string& path) {
  absl::Status valid = ValidateTrace(t);
  if (!valid.ok()) return valid;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out)
    return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.version = kVersion;
  h.num_layers = t.num_layers;
  h.num_kv_heads = t.num_kv_heads;
  h.num_q_heads = t.num_q_heads;
  h.head_dim = t.head_dim;
  h.num_tokens = t.num_tokens;
  h.num_queries = static_cast<uint32_t>(t.query_positions.size());
  h.kv_dtype = static_cast<uint32_t>(t.kv_type);
  h.flags = t.has_values ? 1u : 0u;
  h.description_bytes = static_cast<uint32_t>(t.description.size());
  const std::string zeros(kAlign, '\0');
  auto write_padded = [&](const void* data, uint64_t n) {
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    out.write(zeros.data(), static_cast<std::streamsize>(Padded(n) - n));
  };
  out.write(reinterpret_cast<const char*>(&h), sizeof(h));
  write_padded(t.description.data(), t.description.size());
  write_padded(t.query_positions.data(), t.query_positions.size() * sizeof(uint32_t));
  write_padded(t.keys.data(), t.keys.size());
  if (t.has_values) write_padded(t.values.data(), t.values.size());
  write_padded(t.queries.data(), t.queries.size() * sizeof(float));
  out.flush();
  if (!out) return absl::InternalError(absl::StrCat("short write to ", path));
  return absl::OkStatus();
}

absl::StatusOr<Trace> ReadTrace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open trace ", path));
  Header h{};
  if (!in.read(reinterpret_cast<char*>(&h), sizeof(h))) {
    return absl::DataLossError(absl::StrCat(path, ": shorter than a trace header"));
  }
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError(absl::StrCat(path, " is not an IceCache trace (bad magic)"));
  }
  if (h.version != kVersion) {
    return absl::DataLossError(absl::StrCat(path, ": trace version ", h.version,
                                            " is not supported (this build reads ", kVersion, ")"));
  }
  if (h.kv_dtype > 2 || h.description_bytes > (1u << 20) || h.num_queries > (1u << 24)) {
    return absl::DataLossError(absl::StrCat(path, ": malformed header"));
  }
  Trace t;
  t.num_layers = h.num_layers;
  t.num_kv_heads = h.num_kv_heads;
  t.num_q_heads = h.num_q_heads;
  t.head_dim = h.head_dim;
  t.num_tokens = h.num_tokens;
  t.kv_type = static_cast<ElemType>(h.kv_dtype);
  t.has_values = (h.flags & 1u) != 0;
  // Refuse absurd sizes before allocating (a corrupt header must not exhaust memory).
  // In double: exact enough for a 1 TiB sanity bound, and no overflow.
  const double kv =
      double(h.num_layers) * h.num_kv_heads * h.num_tokens * h.head_dim * ElemBytes(t.kv_type);
  const double q = double(h.num_layers) * h.num_q_heads * h.num_queries * h.head_dim * 4.0;
  if (kv > 1099511627776.0 || q > 1099511627776.0) {
    return absl::DataLossError(absl::StrCat(path, ": header describes more than 1 TiB"));
  }
  auto read_padded = [&](void* data, uint64_t n) -> bool {
    if (!in.read(static_cast<char*>(data), static_cast<std::streamsize>(n))) return false;
    in.ignore(static_cast<std::streamsize>(Padded(n) - n));
    return true;
  };
  t.description.resize(h.description_bytes);
  t.query_positions.resize(h.num_queries);
  t.Allocate();
  if (!read_padded(t.description.data(), t.description.size()) ||
      !read_padded(t.query_positions.data(), t.query_positions.size() * sizeof(uint32_t)) ||
      !read_padded(t.keys.data(), t.keys.size()) ||
      (t.has_values && !read_padded(t.values.data(), t.values.size())) ||
      !read_padded(t.queries.data(), t.queries.size() * sizeof(float))) {
    return absl::DataLossError(absl::StrCat(path, " is truncated"));
  }
  absl::Status valid = ValidateTrace(t);
  if (!valid.ok()) return absl::DataLossError(absl::StrCat(path, ": ", valid.message()));
  return t;
}

}  // namespace icecache::eval
