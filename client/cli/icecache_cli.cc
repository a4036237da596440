// icecache: the operator CLI of an icecached daemon.
//
//   icecache [--socket=PATH | --address=HOST:PORT] [--json] [--timeout=5s] COMMAND [ARGS]
//
// Commands: status, sequences, stats, config, drop HANDLE. Exit status: 0 success, 1 the
// daemon is unreachable or answered with an error (or is not healthy, for status), 2 usage.
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "common/build_info.h"
#include "common/bytes.h"
#include "common/flags_compat.h"
#include "common/paths.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"

ABSL_FLAG(std::string, socket, icecache::DefaultSocketPath(),
          "Unix socket of the daemon (same default as icecached).");
ABSL_FLAG(std::string, address, "",
          "Talk to the daemon over TCP at host:port instead of the unix socket.");
ABSL_FLAG(bool, json, false, "Print JSON (one object) instead of text, for scripts.");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(5), "Deadline of each call to the daemon.");
ABSL_FLAG(uint32_t, limit, 0, "sequences: list at most this many (0: all).");

namespace {

namespace v1 = ::icecache::v1;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr const char* kUsage =
    "Operator CLI of the IceCache daemon.\n"
    "Usage: icecache [--socket=PATH | --address=HOST:PORT] [--json] [--timeout=5s] COMMAND\n"
    "Commands:\n"
    "  status          health, version, uptime, memory and sequences of the daemon\n"
    "  sequences       a table of live sequences (operator attach: unix socket only)\n"
    "  stats           daemon counters\n"
    "  config          the configuration in force and the geometry limits\n"
    "  drop HANDLE     drop a sequence and free its memory";

class Cli {
 public:
  Cli(std::string target, absl::Duration timeout, bool json, std::string socket)
      : target_(std::move(target)), timeout_(timeout), json_(json), socket_(std::move(socket)) {
    channel_ = grpc::CreateChannel(target_, grpc::InsecureChannelCredentials());
    stub_ = v1::IceCache::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }

  int Status();
  int Sequences(uint32_t limit);
  int Stats();
  int Config();
  int Drop(const std::string& handle);

 private:
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout_));
    if (operator_ != nullptr)
      ctx->AddMetadata(icecache::abi::kTokenMetadataKey, operator_->token());
    return ctx;
  }

  // Sequences belong to clients; seeing and dropping them takes an operator attachment
  // (granted to the daemon's operator uids over the attach socket). Returns exit status 1
  // with a message when that is not possible.
  int AttachAsOperator() {
    if (socket_.empty()) {
      std::fprintf(stderr,
                   "icecache: listing and dropping sequences needs the daemon's unix socket "
                   "(operator attach); --address (TCP) serves status, stats and config only\n");
      return 1;
    }
    icecache::Attachment::Options o;
    o.socket = socket_;
    o.as_operator = true;
    o.timeout = timeout_;
    absl::StatusOr<std::unique_ptr<icecache::Attachment>> a = icecache::Attachment::Attach(o);
    if (!a.ok()) {
      std::fprintf(stderr, "icecache: cannot attach as an operator: %s\n",
                   std::string(a.status().message()).c_str());
      return 1;
    }
    operator_ = std::move(*a);
    return 0;
  }

  // Prints the failure of a call and returns exit status 1.
  int Error(const char* what, const grpc::Status& s) const {
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
        s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      std::fprintf(stderr, "icecache: cannot reach icecached at %s: %s\n", target_.c_str(),
                   s.error_message().c_str());
    } else {
      std::fprintf(stderr, "icecache: %s failed: %s: %s\n", what, CodeName(s.error_code()).c_str(),
                   s.error_message().c_str());
    }
    return 1;
  }

  static std::string CodeName(grpc::StatusCode code) {
    static const char* kNames[] = {"OK",
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
                                   "UNAUTHENTICATED"};
    const int c = static_cast<int>(code);
    return (c >= 0 && c < 17) ? kNames[c] : absl::StrCat(c);
  }

  static std::string Json(const google::protobuf::Message& m) {
    std::string out;
    google::protobuf::util::JsonPrintOptions opts;
    opts.preserve_proto_field_names = true;
    opts.always_print_primitive_fields = true;
    opts.add_whitespace = false;
    (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
    return out;
  }

  static std::string Duration(double seconds) {
    const int64_t s = static_cast<int64_t>(seconds);
    if (s < 60) return absl::StrCat(s, "s");
    if (s < 3600) return absl::StrFormat("%dm %02ds", s / 60, s % 60);
    if (s < 86400) return absl::StrFormat("%dh %02dm %02ds", s / 3600, s % 3600 / 60, s % 60);
    return absl::StrFormat("%dd %02dh %02dm", s / 86400, s % 86400 / 3600, s % 3600 / 60);
  }

  static const char* DTypeName(v1::DType d) {
    return d == v1::DTYPE_BF16 ? "bf16" : d == v1::DTYPE_FP16 ? "fp16" : "?";
  }

  std::string target_;
  absl::Duration timeout_;
  bool json_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::IceCache::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::string socket_;
  std::unique_ptr<icecache::Attachment> operator_;
};

int Cli::Status() {
  HealthCheckRequest hreq;
  hreq.set_service("icecache.v1.IceCache");
  HealthCheckResponse hresp;
  grpc::Status hs = health_->Check(Context().get(), hreq, &hresp);
  if (!hs.ok()) return Error("health check", hs);
  const bool serving = hresp.status() == HealthCheckResponse::SERVING;
  const std::string health = HealthCheckResponse::ServingStatus_Name(hresp.status());

  v1::GetStatsResponse stats;
  grpc::Status ss = stub_->GetStats(Context().get(), v1::GetStatsRequest(), &stats);
  if (!ss.ok()) return Error("GetStats", ss);

  if (json_) {
    std::printf("{\"target\":\"%s\",\"healthy\":%s,\"health\":\"%s\",\"stats\":%s}\n",
                target_.c_str(), serving ? "true" : "false", health.c_str(), Json(stats).c_str());
  } else {
    const double pct = stats.memory_limit_bytes() == 0
                           ? 0.0
                           : 100.0 * static_cast<double>(stats.memory_used_bytes()) /
                                 static_cast<double>(stats.memory_limit_bytes());
    std::printf("icecached   %s\n", target_.c_str());
    std::printf("health      %s\n", health.c_str());
    std::printf("version     %s\n", stats.version().c_str());
    std::printf("uptime      %s\n", Duration(stats.uptime_seconds()).c_str());
    std::printf("memory      %s used of %s limit (%.1f%%)\n",
                icecache::FormatBytes(stats.memory_used_bytes()).c_str(),
                icecache::FormatBytes(stats.memory_limit_bytes()).c_str(), pct);
    std::printf("sequences   %llu\n", static_cast<unsigned long long>(stats.num_sequences()));
  }
  return serving ? 0 : 1;
}

int Cli::Sequences(uint32_t limit) {
  if (int rc = AttachAsOperator(); rc != 0) return rc;
  v1::ListSequencesResponse all;
  std::string token;
  do {
    v1::ListSequencesRequest req;
    req.set_page_size(1000);
    req.set_page_token(token);
    v1::ListSequencesResponse page;
    grpc::Status s = stub_->ListSequences(Context().get(), req, &page);
    if (!s.ok()) return Error("ListSequences", s);
    for (const v1::Sequence& seq : page.sequences()) {
      if (limit != 0 && static_cast<uint32_t>(all.sequences_size()) >= limit) break;
      *all.add_sequences() = seq;
    }
    all.set_total_size(page.total_size());
    token = page.next_page_token();
  } while (!token.empty() && (limit == 0 || static_cast<uint32_t>(all.sequences_size()) < limit));

  if (json_) {
    std::printf("%s\n", Json(all).c_str());
    return 0;
  }
  if (all.sequences_size() == 0) {
    std::printf("no sequences\n");
    return 0;
  }
  const absl::Time now = absl::Now();
  std::printf("%-36s  %-16s %6s %7s %4s %5s %4s %6s %17s %11s %9s\n", "HANDLE", "LABEL", "LAYERS",
              "Q/KV", "DIM", "DTYPE", "PAGE", "BUDGET", "TOKENS/MAX", "KV BYTES", "AGE");
  for (const v1::Sequence& s : all.sequences()) {
    const v1::SequenceGeometry& g = s.geometry();
    const absl::Time created = absl::FromUnixNanos(
        google::protobuf::util::TimeUtil::TimestampToNanoseconds(s.create_time()));
    std::printf("%-36s  %-16.16s %6u %7s %4u %5s %4u %6u %17s %11s %9s\n", s.handle().c_str(),
                s.label().c_str(), g.num_layers(),
                absl::StrCat(g.num_q_heads(), "/", g.num_kv_heads()).c_str(), g.head_dim(),
                DTypeName(g.dtype()), g.page_size(), g.budget_tokens(),
                absl::StrCat(s.num_tokens(), "/", g.max_tokens()).c_str(),
                icecache::FormatBytes(s.kv_bytes()).c_str(),
                Duration(absl::ToDoubleSeconds(now - created)).c_str());
  }
  if (static_cast<uint64_t>(all.sequences_size()) < all.total_size()) {
    std::printf("(%d of %llu shown)\n", all.sequences_size(),
                static_cast<unsigned long long>(all.total_size()));
  }
  return 0;
}

int Cli::Stats() {
  v1::GetStatsResponse stats;
  grpc::Status s = stub_->GetStats(Context().get(), v1::GetStatsRequest(), &stats);
  if (!s.ok()) return Error("GetStats", s);
  if (json_) {
    std::printf("%s\n", Json(stats).c_str());
    return 0;
  }
  auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("version                  %s\n", stats.version().c_str());
  std::printf("uptime_seconds           %.1f\n", stats.uptime_seconds());
  std::printf("memory_used_bytes        %llu (%s)\n", u(stats.memory_used_bytes()),
              icecache::FormatBytes(stats.memory_used_bytes()).c_str());
  std::printf("memory_limit_bytes       %llu (%s)\n", u(stats.memory_limit_bytes()),
              icecache::FormatBytes(stats.memory_limit_bytes()).c_str());
  std::printf("sequences                %llu\n", u(stats.num_sequences()));
  std::printf("sequences_created_total  %llu\n", u(stats.sequences_created_total()));
  std::printf("sequences_dropped_total  %llu\n", u(stats.sequences_dropped_total()));
  std::printf("memory_rejections_total  %llu\n", u(stats.memory_rejections_total()));
  return 0;
}

int Cli::Config() {
  v1::GetConfigResponse config;
  grpc::Status s = stub_->GetConfig(Context().get(), v1::GetConfigRequest(), &config);
  if (!s.ok()) return Error("GetConfig", s);
  if (json_) {
    std::printf("%s\n", Json(config).c_str());
    return 0;
  }
  std::printf("version           %s\n", config.version().c_str());
  std::printf("socket            %s\n", config.socket_path().c_str());
  std::printf("tcp               %s\n",
              config.tcp_address().empty() ? "off" : config.tcp_address().c_str());
  std::printf("metrics port      %s\n",
              config.metrics_port() == 0 ? "off" : absl::StrCat(config.metrics_port()).c_str());
  std::printf("memory limit      %s\n", icecache::FormatBytes(config.memory_limit_bytes()).c_str());
  std::printf("log level         %s\n", config.log_level().c_str());
  std::printf("shutdown grace    %.1fs\n", config.shutdown_grace_seconds());
  const v1::GeometryLimits& l = config.geometry_limits();
  std::string dims, pages;
  for (uint32_t d : l.head_dims()) absl::StrAppend(&dims, dims.empty() ? "" : ",", d);
  for (uint32_t p : l.page_sizes()) absl::StrAppend(&pages, pages.empty() ? "" : ",", p);
  std::printf("head dims         %s\n", dims.c_str());
  std::printf("page sizes        %s\n", pages.c_str());
  std::printf("max tokens        %llu\n", static_cast<unsigned long long>(l.max_tokens()));
  return 0;
}

int Cli::Drop(const std::string& handle) {
  if (int rc = AttachAsOperator(); rc != 0) return rc;
  v1::DropSequenceRequest req;
  req.set_handle(handle);
  v1::DropSequenceResponse resp;
  grpc::Status s = stub_->DropSequence(Context().get(), req, &resp);
  if (!s.ok()) return Error("drop", s);
  if (json_) {
    std::printf("{\"handle\":\"%s\",\"freed_bytes\":%llu}\n", handle.c_str(),
                static_cast<unsigned long long>(resp.freed_bytes()));
  } else {
    std::printf("dropped %s (freed %s)\n", handle.c_str(),
                icecache::FormatBytes(resp.freed_bytes()).c_str());
  }
  return 0;
}

int Usage(const std::string& problem) {
  std::fprintf(stderr, "icecache: %s\n%s\n", problem.c_str(), kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.version_string = [] { return "icecache " + icecache::VersionString() + "\n"; };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(kUsage);
  std::vector<std::string> args = icecache::NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = icecache::ArgvPointers(args);
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  if (positional.size() < 2) return Usage("missing command");
  const std::string command = positional[1];
  const size_t nargs = positional.size() - 2;
  static const char* kCommands[] = {"status", "sequences", "stats", "config", "drop"};
  if (std::find(std::begin(kCommands), std::end(kCommands), command) == std::end(kCommands)) {
    return Usage(absl::StrCat("unknown command '", command, "'"));
  }
  if (command == "drop" && nargs != 1) return Usage("drop takes exactly one HANDLE");
  if (command != "drop" && nargs != 0) return Usage(absl::StrCat(command, " takes no arguments"));

  std::string target, socket_path;
  const std::string address = absl::GetFlag(FLAGS_address);
  if (!address.empty()) {
    target = address;
  } else {
    const std::string socket = absl::GetFlag(FLAGS_socket);
    struct stat st;
    if (::stat(socket.c_str(), &st) != 0) {
      std::fprintf(stderr,
                   "icecache: no icecached at unix:%s (the socket does not exist); start "
                   "icecached or pass --socket=PATH\n",
                   socket.c_str());
      return 1;
    }
    target = "unix:" + socket;
    socket_path = socket;
  }
  Cli cli(target, absl::GetFlag(FLAGS_timeout), absl::GetFlag(FLAGS_json), socket_path);
  if (command == "drop") return cli.Drop(positional[2]);
  if (command == "status") return cli.Status();
  if (command == "sequences") return cli.Sequences(absl::GetFlag(FLAGS_limit));
  if (command == "stats") return cli.Stats();
  return cli.Config();
}
