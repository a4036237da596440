// Estimating the attention of the tokens a step does not fetch (the "tail").
//
// A decode step attends exactly to what it fetched (sink, window, selected pages). The pages
// it did not fetch still hold softmax mass; dropping it renormalises the output over the
// fetched tokens only. Tail estimation keeps a small summary per page (token count, mean key,
// per-dimension key variance, mean value) and adds, per unfetched page, one virtual token:
//
//   logit  = log(count) + scale * q.mean_key [+ scale^2 / 2 * sum_i q_i^2 var_i]
//   value  = mean_value
//
// i.e. sum_t exp(scale q.k_t) over the page is estimated by count * exp(scale q.mean) (the
// mean key; a lower bound by Jensen), optionally times the log-normal correction
// exp(scale^2 q^T diag(var) q / 2) (exact when the page's scores are Gaussian with the keys'
// diagonal covariance). Both are exact when every page holds one token (variance 0).
//
// The result of either side is a partial softmax (running max, sum of exponentials, and the
// unnormalised output), so the exact part and the estimated tail merge like two blocks of a
// flash-attention pass, in any order.
//
// Thread safety: value types and pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace icecache::selection {

enum class TailMode : uint8_t {
  kNone = 0,          // drop the unfetched pages (the paper)
  kMean = 1,          // count * exp(q . mean key)
  kMeanVariance = 2,  // ... times the log-normal correction of the keys' diagonal variance
};

std::string_view TailModeName(TailMode mode);
absl::StatusOr<TailMode> ParseTailMode(const std::string& name);  // "none", "mean", "mean-var"

// The log-normal correction is capped at this many nats per page: a page whose keys spread
// far along q is not Gaussian in its scores, and an uncapped exp() of its variance would let
// one page outweigh the whole context.
inline constexpr float kTailVarianceCap = 2.0f;

// Running softmax state over some tokens: max logit m, l = sum exp(s - m), acc = sum exp(s -
// m) v (dim floats, unnormalised). Empty (l == 0) until something is added.
struct SoftmaxPartial {
  float max = 0;
  double sum = 0;
  std::vector<double> acc;

  explicit SoftmaxPartial(uint32_t dim = 0) : acc(dim, 0.0) {}
  bool empty() const { return sum == 0; }
  // Adds one token (or virtual token) of logit s and value v[dim].
  void Add(float s, const float* v);
  // Merges another partial over disjoint tokens (same dim).
  void Merge(const SoftmaxPartial& other);
  // acc / sum into out[dim] (zeros when empty).
  void Output(float* out) const;
};

// One page's summary, as stored: means and variances in fp32, dim floats each.
struct PageSummaryView {
  uint32_t count = 0;
  const float* key_mean = nullptr;
  const float* key_var = nullptr;  // may be null: kMeanVariance then acts as kMean
  const float* value_mean = nullptr;
};

// The virtual token's logit for query q[dim] (already unscaled; scale applied here).
float TailLogit(TailMode mode, const float* q, uint32_t dim, float scale,
                const PageSummaryView& page);

// Adds every page of `pages` with count > 0 to `partial` as one virtual token each.
void AddTail(TailMode mode, const float* q, uint32_t dim, float scale,
             const std::vector<PageSummaryView>& pages, SoftmaxPartial* partial);

// Vectors of dim floats in a page summary as the daemon stores it: the mean key, the key
// variance and the mean value (in three planes of [page][dim], server/core/sequence_kv.cc).
inline constexpr uint32_t kSummaryVectors = 3;

// Merges a tail partial (max, sum, acc[dim]) into `out` [dim], the attention output normalised
// over the fetched tokens whose own max logit and sum of exp(s - max) were fetched_max and
// fetched_sum. An empty partial (sum 0) leaves out unchanged; fetched_sum 0 (nothing fetched)
// makes out the tail's own output.
void MergeTail(const float* tail, float fetched_max, float fetched_sum, uint32_t dim, float* out);

// Accumulates a page summary from rows (count, sums, sums of squares in float64) and writes
// the fp32 means and variances.
class SummaryBuilder {
 public:
  explicit SummaryBuilder(uint32_t dim) : dim_(dim), ks_(dim), kq_(dim), vs_(dim) {}
  void Add(const float* key, const float* value);
  uint32_t count() const { return count_; }
  // key_mean, key_var, value_mean: dim floats each (key_var may be null).
  void Finish(float* key_mean, float* key_var, float* value_mean) const;

 private:
  uint32_t dim_;
  uint32_t count_ = 0;
  std::vector<double> ks_, kq_, vs_;
};

}  // namespace icecache::selection
