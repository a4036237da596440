// The one matrix product the index needs, through Debian's OpenBLAS (single-threaded: the
// index parallelises over heads itself).
#pragma once

#include <cstddef>

namespace icecache::index {

// c[m x n] = a[m x k] * b[n x k]^T, all row-major fp32.
void Sgemm(size_t m, size_t n, size_t k, const float* a, const float* b, float* c);

}  // namespace icecache::index
