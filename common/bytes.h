// Byte quantities as users type them ("64GiB", "512MiB", "1.5G", "4096") and print them.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace icecache {

// Parses a non-negative byte count: an integer or decimal number followed by an optional
// unit. Binary units: KiB, MiB, GiB, TiB (and K, M, G, T, which also mean powers of 1024).
// Decimal units: KB, MB, GB, TB (powers of 1000). "B" or no unit: bytes. Units are
// case-insensitive; whitespace between number and unit is allowed.
// Errors: INVALID_ARGUMENT for an empty string, a negative or malformed number, an unknown
// unit, a fractional byte count, or a value above 2^63 - 1.
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);

// "0 B", "512 B", "1.50 KiB", "64.00 GiB": binary units, two decimals above bytes.
std::string FormatBytes(uint64_t bytes);

// A flag type for absl::Flags: --memory-limit=64GiB.
struct ByteSize {
  uint64_t bytes = 0;
};
bool AbslParseFlag(absl::string_view text, ByteSize* out, std::string* error);
std::string AbslUnparseFlag(ByteSize value);

}  // namespace icecache
