// The head dims the kernels are instantiated for: the one closed set that every sequence
// geometry is checked against (server/core/geometry.h), and the one dispatch from a run-time
// head dim to a compile-time one (CONVENTIONS 8). Plain C++, usable from .cu launchers.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace icecache {

inline constexpr std::array<uint32_t, 3> kSupportedHeadDims = {64, 128, 256};

constexpr bool IsSupportedHeadDim(uint32_t d) {
  for (uint32_t s : kSupportedHeadDims) {
    if (s == d) return true;
  }
  return false;
}

// Calls f(std::integral_constant<uint32_t, D>{}) for the supported D equal to `d` and returns
// its result; returns `unsupported` for any other d.
template <typename R, typename F>
R DispatchHeadDim(uint32_t d, R unsupported, F&& f) {
  switch (d) {
    case 64:
      return f(std::integral_constant<uint32_t, 64>{});
    case 128:
      return f(std::integral_constant<uint32_t, 128>{});
    case 256:
      return f(std::integral_constant<uint32_t, 256>{});
  }
  return unsupported;
}
static_assert(kSupportedHeadDims.size() == 3, "DispatchHeadDim lists every supported head dim");

}  // namespace icecache
