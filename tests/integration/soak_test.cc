// The soak: the real daemon under churn for a while. 8 healthy client processes keep attaching,
// running the workload on 4 sequences and detaching; meanwhile 2 more client processes are
// started and SIGKILLed at random moments (mid-prefill, mid-select, mid-attach). The healthy
// clients must see no error at all, and once everything has stopped the daemon must be back
// where it started: no client, no sequence, no memory accounted, no arena, the same open
// descriptors, and resident memory within a bound.
//
// ICECACHE_SOAK_SECONDS sets the length (default 20 s, the test command's); the test prints
// the figures (cycles, clients killed, descriptors and resident memory before and after).
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/daemon_process.h"

namespace icecache::testing {
namespace {

namespace v1 = ::icecache::v1;

int OpenFds(pid_t pid) {
  int n = 0;
  DIR* d = ::opendir(absl::StrCat("/proc/", pid, "/fd").c_str());
  if (d == nullptr) return -1;
  while (struct dirent* e = ::readdir(d)) n += e->d_name[0] != '.' ? 1 : 0;
  ::closedir(d);
  return n;
}

double SoakSeconds() {
  const char* s = std::getenv("ICECACHE_SOAK_SECONDS");
  double v = 20;
  if (s != nullptr) (void)absl::SimpleAtod(s, &v);
  return v;
}

TEST(Soak, ChurnAndKilledClientsLeaveNoTraceAndHealthyClientsNoError) {
  TempDir dir;
  DaemonConfig config;
  config.memory_limit = "4GiB";
  auto d = DaemonProcess::Start(dir.path(), config);
  ASSERT_TRUE(d.ok()) << d.status();
  DaemonProcess& daemon = **d;
  const pid_t pid = daemon.process().pid();
  auto stats = [&] {
    v1::GetStatsResponse r;
    EXPECT_TRUE(daemon.stub().GetStats(ContextWithDeadline().get(), {}, &r).ok());
    return r;
  };
  // Baseline once the daemon has served one client (lazy initialisation done).
  { ASSERT_TRUE(daemon.Attach().ok()); }
  absl::SleepFor(absl::Milliseconds(300));
  (void)stats();
  const int fds_before = OpenFds(pid);
  const uint64_t rss_before = ResidentBytes(pid);

  const double seconds = SoakSeconds();
  auto client = [&](double run_seconds, uint64_t seed) {
    return Subprocess::Start({TestClientBinary(), "--socket=" + daemon.socket_path(),
                              "--mode=churn", absl::StrCat("--seconds=", run_seconds),
                              "--sequences=4", "--tokens=1200", absl::StrCat("--seed=", seed)},
                             dir.path());
  };
  std::vector<Subprocess> healthy;
  for (int c = 0; c < 8; ++c) {
    absl::StatusOr<Subprocess> p = client(seconds, 1000 * (c + 1));
    ASSERT_TRUE(p.ok()) << p.status();
    healthy.push_back(std::move(*p));
  }
  // Victims: started, then killed at a random moment (0.05..2 s later), two at a time.
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> life_ms(50, 2000);
  int killed = 0;
  const absl::Time until = absl::Now() + absl::Seconds(seconds);
  struct Victim {
    Subprocess p;
    absl::Time death;
  };
  std::vector<Victim> victims;
  while (absl::Now() < until) {
    while (victims.size() < 2) {
      absl::StatusOr<Subprocess> p = client(3600, 99999 + killed);
      ASSERT_TRUE(p.ok());
      victims.push_back({std::move(*p), absl::Now() + absl::Milliseconds(life_ms(rng))});
    }
    for (auto it = victims.begin(); it != victims.end();) {
      if (absl::Now() >= it->death) {
        it->p.Signal(SIGKILL);
        it->p.Wait(absl::Seconds(5));
        ++killed;
        it = victims.erase(it);
      } else {
        ++it;
      }
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  for (Victim& v : victims) {
    v.p.Signal(SIGKILL);
    v.p.Wait(absl::Seconds(5));
    ++killed;
  }
  uint64_t cycles = 0;
  for (Subprocess& p : healthy) {
    std::optional<int> st = p.Wait(absl::Seconds(seconds + 120));
    ASSERT_TRUE(st.has_value()) << "a healthy client hung: " << p.Stdout();
    EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << p.Stdout() << p.Stderr();
    const std::string out = p.Stdout();
    EXPECT_THAT(out, ::testing::HasSubstr(" errors 0")) << out;
    const size_t at = out.rfind("cycles ");
    uint64_t n = 0;
    if (at != std::string::npos) {
      (void)absl::SimpleAtoi(out.substr(at + 7, out.find(' ', at + 7) - at - 7), &n);
    }
    cycles += n;
  }
  // Back to the baseline: accounting exactly, descriptors exactly (after gRPC closes the
  // healthy clients' connections), resident memory within a bound.
  v1::GetStatsResponse after;
  int fds_after = 0;
  const absl::Time settle = absl::Now() + absl::Seconds(10);
  do {
    absl::SleepFor(absl::Milliseconds(100));
    after = stats();
    fds_after = OpenFds(pid);
  } while ((after.num_clients() != 0 || after.arena_bytes() != 0 || fds_after != fds_before) &&
           absl::Now() < settle);
  const uint64_t rss_after = ResidentBytes(pid);
  std::printf(
      "soak %.0f s: %llu healthy cycles (x4 sequences), %d clients killed; clients %llu, "
      "sequences %llu, memory %llu B, arena %llu B; fds %d -> %d; RSS %.1f -> %.1f MiB\n",
      seconds, static_cast<unsigned long long>(cycles), killed,
      static_cast<unsigned long long>(after.num_clients()),
      static_cast<unsigned long long>(after.num_sequences()),
      static_cast<unsigned long long>(after.memory_used_bytes()),
      static_cast<unsigned long long>(after.arena_bytes()), fds_before, fds_after,
      rss_before / 1048576.0, rss_after / 1048576.0);
  EXPECT_GT(cycles, 0u);
  EXPECT_GT(killed, 0);
  EXPECT_EQ(after.num_clients(), 0u);
  EXPECT_EQ(after.num_sequences(), 0u);
  EXPECT_EQ(after.memory_used_bytes(), 0u);
  EXPECT_EQ(after.arena_bytes(), 0u);
  EXPECT_EQ(fds_after, fds_before);
  // Freed memory the allocator keeps for reuse is not a leak; growth beyond this bound is.
  EXPECT_LT(rss_after, rss_before + (uint64_t{96} << 20));
  EXPECT_TRUE(daemon.process().Running());
}

}  // namespace
}  // namespace icecache::testing
