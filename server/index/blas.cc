#include "server/index/blas.h"

#include <cblas.h>

#include <mutex>

extern "C" void openblas_set_num_threads(int num_threads);

namespace icecache::index {

void Sgemm(size_t m, size_t n, size_t k, const float* a, const float* b, float* c) {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a, static_cast<int>(k), b, static_cast<int>(k), 0.0f, c,
              static_cast<int>(n));
}

}  // namespace icecache::index
