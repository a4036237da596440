#include "server/metrics/metrics.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/text_serializer.h"

namespace icecache {
namespace {}  // namespace

// Seconds: 25 us .. 10 s. Control RPCs and selects sit in the low buckets; builds higher.
const prometheus::Histogram::BucketBoundaries& Metrics::LatencyBuckets() {
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
      25e-3, 50e-3, 0.1,   0.25,   0.5,    1.0,    2.5,  5.0,    10.0, 30.0};
  return kBuckets;
}

prometheus::Counter* Metrics::Counter(const std::string& name, const std::string& help,
                                      const prometheus::Labels& labels) {
  absl::MutexLock lock(&mu_);
  auto& family = counters_[name];
  if (family == nullptr) {
    family = &prometheus::BuildCounter().Name(name).Help(help).Register(*registry_);
  }
  return &family->Add(labels);
}

prometheus::Histogram* Metrics::Histogram(const std::string& name, const std::string& help,
                                          const prometheus::Labels& labels,
                                          const prometheus::Histogram::BucketBoundaries& buckets) {
  absl::MutexLock lock(&mu_);
  auto& family = histograms_[name];
  if (family == nullptr) {
    family = &prometheus::BuildHistogram().Name(name).Help(help).Register(*registry_);
  }
  return &family->Add(labels, buckets);
}

const char* StatusCodeName(int code) {
  static constexpr const char* kNames[Metrics::kNumStatusCodes] = {
      "OK",
      "CANCELLED",
      "UNKNOWN",
      "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED",
      "NOT_FOUND",
      "ALREADY_EXISTS",
      "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION",
      "ABORTED",
      "OUT_OF_RANGE",
      "UNIMPLEMENTED",
      "INTERNAL",
      "UNAVAILABLE",
      "DATA_LOSS",
      "UNAUTHENTICATED",
  };
  if (code < 0 || code >= Metrics::kNumStatusCodes) return "UNKNOWN";
  return kNames[code];
}

// Families whose single value is read from a callback at scrape time.
class Metrics::CallbackCollectable final : public prometheus::Collectable {
 public:
  void Add(const std::string& name, const std::string& help, prometheus::MetricType type,
           ValueFn fn) {
    absl::MutexLock lock(&mu_);
    entries_.push_back(Entry{name, help, type, std::move(fn)});
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    absl::MutexLock lock(&mu_);
    std::vector<prometheus::MetricFamily> out;
    out.reserve(entries_.size());
    for (const Entry& e : entries_) {
      prometheus::MetricFamily family;
      family.name = e.name;
      family.help = e.help;
      family.type = e.type;
      prometheus::ClientMetric m;
      const double v = e.fn();
      if (e.type == prometheus::MetricType::Counter) {
        m.counter.value = v;
      } else {
        m.gauge.value = v;
      }
      family.metric.push_back(std::move(m));
      out.push_back(std::move(family));
    }
    return out;
  }

 private:
  struct Entry {
    std::string name;
    std::string help;
    prometheus::MetricType type;
    ValueFn fn;
  };
  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
};

void Metrics::RpcMethodMetrics::Record(int code, double seconds) const {
  if (code < 0 || code >= kNumStatusCodes) code = 2;
  requests[code]->Increment();
  latency->Observe(seconds);
}

Metrics::Metrics(const std::string& version, const std::string& git_commit)
    : registry_(std::make_shared<prometheus::Registry>()),
      callbacks_(std::make_shared<CallbackCollectable>()) {
  rpc_requests_ = &prometheus::BuildCounter()
                       .Name("icecache_rpc_requests_total")
                       .Help("Control-plane RPCs finished, by method and status code")
                       .Register(*registry_);
  rpc_latency_ = &prometheus::BuildHistogram()
                      .Name("icecache_rpc_latency_seconds")
                      .Help("Control-plane RPC handling time, by method")
                      .Register(*registry_);
  prometheus::BuildGauge()
      .Name("icecache_build_info")
      .Help("Always 1; labels carry the daemon's version and git commit")
      .Register(*registry_)
      .Add({{"version", version}, {"commit", git_commit}})
      .Set(1);
}

Metrics::~Metrics() { StopExposer(); }

const Metrics::RpcMethodMetrics* Metrics::RpcMethod(absl::string_view method) {
  absl::MutexLock lock(&mu_);
  auto it = methods_.find(method);
  if (it != methods_.end()) return it->second.get();
  auto m = std::make_unique<RpcMethodMetrics>();
  const std::string name(method);
  for (int code = 0; code < kNumStatusCodes; ++code) {
    m->requests[code] = &rpc_requests_->Add({{"method", name}, {"code", StatusCodeName(code)}});
  }
  m->latency = &rpc_latency_->Add({{"method", name}}, LatencyBuckets());
  const RpcMethodMetrics* out = m.get();
  methods_.emplace(name, std::move(m));
  return out;
}

void Metrics::AddCallback(const std::string& name, const std::string& help,
                          prometheus::MetricType type, ValueFn fn) {
  callbacks_->Add(name, help, type, std::move(fn));
}

absl::Status Metrics::StartExposer(const std::string& bind_address) {
  absl::MutexLock lock(&mu_);
  if (exposer_ != nullptr) return absl::FailedPreconditionError("metrics exposer already runs");
  try {
    auto exposer = std::make_unique<prometheus::Exposer>(bind_address, /*num_threads=*/2);
    exposer->RegisterCollectable(registry_);
    exposer->RegisterCollectable(callbacks_);
    const std::vector<int> ports = exposer->GetListeningPorts();
    exposer_port_ = ports.empty() ? 0 : ports.front();
    exposer_ = std::move(exposer);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", bind_address, ": ", e.what()));
  }
  return absl::OkStatus();
}

int Metrics::exposer_port() const {
  absl::MutexLock lock(&mu_);
  return exposer_port_;
}

void Metrics::StopExposer() {
  std::unique_ptr<prometheus::Exposer> exposer;
  {
    absl::MutexLock lock(&mu_);
    exposer = std::move(exposer_);
    exposer_port_ = 0;
  }
  // Destroyed outside the lock: the exposer joins its threads, which may be collecting.
}

std::string Metrics::Serialize() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::vector<prometheus::MetricFamily> more = callbacks_->Collect();
  families.insert(families.end(), more.begin(), more.end());
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace icecache
