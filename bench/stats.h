// Summary statistics the benchmarks report.
#pragma once

#include <algorithm>
#include <vector>

namespace icecache::bench {

// The median of v (the upper one of the middle two for an even count), 0 for an empty v.
inline double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

}  // namespace icecache::bench
