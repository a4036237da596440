// The daemon's Prometheus metrics: one object built in main and passed to whoever records
// (CONVENTIONS 14: no singleton). Families are registered once in the constructor;
// labelled children are created once and cached (RpcMethod), so the hot path only
// increments. Labels are low-cardinality (method, code); never a sequence or client id.
//
// Names follow icecache_<subsystem>_<noun>_<unit>[_total].
//
// Thread safety: all methods are thread-safe. Pointers returned by RpcMethod stay valid for
// the lifetime of the Metrics object.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_type.h"
#include "prometheus/registry.h"

namespace prometheus {
class Exposer;
}

namespace icecache {

// Name of a canonical status code as gRPC spells it ("OK", "INVALID_ARGUMENT", ...).
const char* StatusCodeName(int code);

class Metrics {
 public:
  static constexpr int kNumStatusCodes = 17;

  // Counters and latency histogram of one RPC method, one counter per status code.
  struct RpcMethodMetrics {
    std::array<prometheus::Counter*, kNumStatusCodes> requests{};
    prometheus::Histogram* latency = nullptr;
    // Records one finished call. `code` outside 0..16 is counted as UNKNOWN (2).
    void Record(int code, double seconds) const;
  };

  // A value read when Prometheus scrapes (for state the core owns, e.g. memory used).
  using ValueFn = std::function<double()>;

  Metrics(const std::string& version, const std::string& git_commit);
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;
  ~Metrics();

  // The cached children of `method` (created on first call: call it at startup).
  const RpcMethodMetrics* RpcMethod(absl::string_view method);

  // A labelled child of a counter or histogram family (the family is registered on first use
  // of its name). Call at startup and cache the pointer; the hot path only increments.
  prometheus::Counter* Counter(const std::string& name, const std::string& help,
                               const prometheus::Labels& labels);
  prometheus::Histogram* Histogram(const std::string& name, const std::string& help,
                                   const prometheus::Labels& labels,
                                   const prometheus::Histogram::BucketBoundaries& buckets);
  // Seconds, 25 us .. 10 s (the RPC latency buckets).
  static const prometheus::Histogram::BucketBoundaries& LatencyBuckets();

  // Registers a gauge or counter whose value is read at scrape time. `fn` must stay callable
  // until StopExposer() or destruction. Names must be unique.
  void AddCallback(const std::string& name, const std::string& help, prometheus::MetricType type,
                   ValueFn fn);

  // Serves GET /metrics on `bind_address` ("host:port"; port 0 picks a free port).
  // Errors: UNAVAILABLE when the address cannot be bound (in use, no permission).
  absl::Status StartExposer(const std::string& bind_address);
  // The bound port, or 0 when no exposer runs.
  int exposer_port() const;
  // Stops serving /metrics (idempotent).
  void StopExposer();

  // Text exposition of everything registered (what /metrics serves); used by tests.
  std::string Serialize() const;

  prometheus::Registry& registry() { return *registry_; }

 private:
  class CallbackCollectable;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<CallbackCollectable> callbacks_;
  prometheus::Family<prometheus::Counter>* rpc_requests_;
  prometheus::Family<prometheus::Histogram>* rpc_latency_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<RpcMethodMetrics>, std::less<>> methods_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, prometheus::Family<prometheus::Counter>*> counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, prometheus::Family<prometheus::Histogram>*> histograms_
      ABSL_GUARDED_BY(mu_);
  std::unique_ptr<prometheus::Exposer> exposer_ ABSL_GUARDED_BY(mu_);
  int exposer_port_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache
