#include "common/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace icecache {
namespace {

std::atomic<int> g_min_severity{static_cast<int>(LogSeverity::kInfo)};

char SeverityLetter(LogSeverity s) {
  switch (s) {
    case LogSeverity::kDebug:
      return 'D';
    case LogSeverity::kInfo:
      return 'I';
    case LogSeverity::kWarning:
      return 'W';
    case LogSeverity::kError:
      return 'E';
    case LogSeverity::kFatal:
      return 'F';
  }
  return '?';
}

const char* Basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

}  // namespace

void SetMinLogSeverity(LogSeverity severity) {
  g_min_severity.store(static_cast<int>(severity), std::memory_order_relaxed);
}

LogSeverity MinLogSeverity() {
  return static_cast<LogSeverity>(g_min_severity.load(std::memory_order_relaxed));
}

bool ParseLogSeverity(absl::string_view text, LogSeverity* out) {
  if (text == "debug") {
    *out = LogSeverity::kDebug;
  } else if (text == "info") {
    *out = LogSeverity::kInfo;
  } else if (text == "warning") {
    *out = LogSeverity::kWarning;
  } else if (text == "error") {
    *out = LogSeverity::kError;
  } else {
    return false;
  }
  return true;
}

namespace internal {

LogMessage::LogMessage(const char* file, int line, LogSeverity severity)
    : file_(file), line_(line), severity_(severity) {}

LogMessage::~LogMessage() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const long micros = static_cast<long>(
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() %
      1000000);
  std::tm tm_utc;
  gmtime_r(&secs, &tm_utc);
  char stamp[64];
  std::snprintf(stamp, sizeof(stamp), "%c%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ %s:%d] ",
                SeverityLetter(severity_), tm_utc.tm_year + 1900, tm_utc.tm_mon + 1, tm_utc.tm_mday,
                tm_utc.tm_hour, tm_utc.tm_min, tm_utc.tm_sec, micros, Basename(file_), line_);
  std::string text = stamp;
  text += stream_.str();
  text += '\n';
  // One write(2) per line: lines from concurrent threads do not interleave.
  size_t off = 0;
  while (off < text.size()) {
    const ssize_t n = ::write(STDERR_FILENO, text.data() + off, text.size() - off);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
  if (severity_ == LogSeverity::kFatal) std::abort();
}

}  // namespace internal
}  // namespace icecache
