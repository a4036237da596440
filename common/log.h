// Minimal logging and invariant-check shim (Debian's Abseil 20220623 has no absl/log).
//
// Two kinds of failure, two mechanisms (CONVENTIONS 4/5):
//   - caller mistakes return absl::Status (never a CHECK);
//   - a broken internal invariant stops the process loudly: ICECACHE_CHECK(cond) << "context".
//
// Thread safety: every function here may be called from any thread; one log line is written
// with a single write(2) so lines from different threads never interleave.
#pragma once

#include <sstream>

#include "absl/strings/string_view.h"

namespace icecache {

enum class LogSeverity : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

// Lines below this severity are dropped. Default kInfo. Safe to call at any time.
void SetMinLogSeverity(LogSeverity severity);
LogSeverity MinLogSeverity();
// Parses "debug" | "info" | "warning" | "error" (case-sensitive). Returns false if unknown.
bool ParseLogSeverity(absl::string_view text, LogSeverity* out);

namespace internal {

// Accumulates one log line and emits it on destruction; kFatal aborts after writing.
class LogMessage {
 public:
  LogMessage(const char* file, int line, LogSeverity severity);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  const char* file_;
  int line_;
  LogSeverity severity_;
  std::ostringstream stream_;
};

// Lets `cond ? (void)0 : Voidify() & LogMessage(...).stream() << ...` type-check.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace icecache

#define ICECACHE_LOG_SEVERITY_DEBUG ::icecache::LogSeverity::kDebug
#define ICECACHE_LOG_SEVERITY_INFO ::icecache::LogSeverity::kInfo
#define ICECACHE_LOG_SEVERITY_WARNING ::icecache::LogSeverity::kWarning
#define ICECACHE_LOG_SEVERITY_ERROR ::icecache::LogSeverity::kError
#define ICECACHE_LOG_SEVERITY_FATAL ::icecache::LogSeverity::kFatal

// ICECACHE_LOG(INFO) << "text";
#define ICECACHE_LOG(sev)                                                                     \
  (ICECACHE_LOG_SEVERITY_##sev < ::icecache::MinLogSeverity())                                \
      ? (void)0                                                                               \
      : ::icecache::internal::Voidify() &                                                     \
            ::icecache::internal::LogMessage(__FILE__, __LINE__, ICECACHE_LOG_SEVERITY_##sev) \
                .stream()

// Invariant check: aborts with file, line and the condition text when `cond` is false.
#define ICECACHE_CHECK(cond)                                                                      \
  (cond)                                                                                          \
      ? (void)0                                                                                   \
      : ::icecache::internal::Voidify() &                                                         \
            ::icecache::internal::LogMessage(__FILE__, __LINE__, ::icecache::LogSeverity::kFatal) \
                    .stream()                                                                     \
                << "Check failed: " #cond " "

#define ICECACHE_CHECK_OK(expr)                                                       \
  do {                                                                                \
    const ::absl::Status _icecache_check_status = (expr);                             \
    ICECACHE_CHECK(_icecache_check_status.ok()) << _icecache_check_status.ToString(); \
  } while (0)

#ifdef NDEBUG
#define ICECACHE_DCHECK(cond) \
  while (false) ICECACHE_CHECK(cond)
#else
#define ICECACHE_DCHECK(cond) ICECACHE_CHECK(cond)
#endif
