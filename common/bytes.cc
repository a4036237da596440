#include "common/bytes.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace icecache {
namespace {

bool UnitMultiplier(std::string unit, uint64_t* mult) {
  unit = absl::AsciiStrToLower(unit);
  struct Unit {
    const char* name;
    uint64_t mult;
  };
  static constexpr Unit kUnits[] = {
      {"", 1},
      {"b", 1},
      {"k", 1ull << 10},
      {"kib", 1ull << 10},
      {"m", 1ull << 20},
      {"mib", 1ull << 20},
      {"g", 1ull << 30},
      {"gib", 1ull << 30},
      {"t", 1ull << 40},
      {"tib", 1ull << 40},
      {"kb", 1000ull},
      {"mb", 1000ull * 1000},
      {"gb", 1000ull * 1000 * 1000},
      {"tb", 1000ull * 1000 * 1000 * 1000},
  };
  for (const Unit& u : kUnits) {
    if (unit == u.name) {
      *mult = u.mult;
      return true;
    }
  }
  return false;
}

}  // namespace

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  if (s.empty()) return absl::InvalidArgumentError("empty byte size");
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  const absl::string_view number = s.substr(0, i);
  const std::string unit(absl::StripAsciiWhitespace(s.substr(i)));
  if (number.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("byte size '", text, "' must start with a non-negative number"));
  }
  uint64_t mult = 0;
  if (!UnitMultiplier(unit, &mult)) {
    return absl::InvalidArgumentError(
        absl::StrCat("byte size '", text, "' has unknown unit '", unit,
                     "' (use B, KiB, MiB, GiB, TiB, K, M, G, T, KB, MB, GB or TB)"));
  }
  if (number.find('.') == absl::string_view::npos) {
    uint64_t n = 0;
    if (!absl::SimpleAtoi(number, &n)) {
      return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' is out of range"));
    }
    constexpr uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (n != 0 && n > kMax / mult) {
      return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' is out of range"));
    }
    return n * mult;
  }
  double d = 0;
  if (!absl::SimpleAtod(number, &d) || !std::isfinite(d)) {
    return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' is malformed"));
  }
  const long double total = static_cast<long double>(d) * static_cast<long double>(mult);
  if (total > static_cast<long double>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' is out of range"));
  }
  if (total != std::floor(total)) {
    return absl::InvalidArgumentError(
        absl::StrCat("byte size '", text, "' is not a whole number of bytes"));
  }
  return static_cast<uint64_t>(total);
}

std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f %s", v, kUnits[u]);
  return buf;
}

bool AbslParseFlag(absl::string_view text, ByteSize* out, std::string* error) {
  absl::StatusOr<uint64_t> parsed = ParseByteSize(text);
  if (!parsed.ok()) {
    *error = std::string(parsed.status().message());
    return false;
  }
  out->bytes = *parsed;
  return true;
}

std::string AbslUnparseFlag(ByteSize value) {
  // Exact and re-parseable: the largest binary unit that divides the value.
  static constexpr struct {
    uint64_t mult;
    const char* name;
  } kUnits[] = {{1ull << 40, "TiB"}, {1ull << 30, "GiB"}, {1ull << 20, "MiB"}, {1ull << 10, "KiB"}};
  if (value.bytes != 0) {
    for (const auto& u : kUnits) {
      if (value.bytes % u.mult == 0) return absl::StrCat(value.bytes / u.mult, u.name);
    }
  }
  return absl::StrCat(value.bytes);
}

}  // namespace icecache
