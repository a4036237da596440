// The `icecache` CLI binary against a real daemon: text and JSON output, errors, exit codes.
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/bytes.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/daemon_process.h"

namespace icecache::testing {
namespace {

namespace v1 = ::icecache::v1;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DaemonConfig config;
    config.tcp = true;
    config.memory_limit = "4GiB";
    auto d = DaemonProcess::Start(dir_.path(), config);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
    auto a = daemon_->Attach();
    ASSERT_TRUE(a.ok()) << a.status();
    client_ = std::move(*a);
  }

  RunResult Cli(std::vector<std::string> args) {
    args.insert(args.begin(), {IcecacheCliBinary(), "--socket=" + daemon_->socket_path()});
    absl::StatusOr<RunResult> r = RunCommand(args, dir_.path());
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : RunResult{};
  }

  std::string CreateSequence(const std::string& label, uint64_t* kv_bytes = nullptr) {
    v1::CreateSequenceRequest req;
    v1::SequenceGeometry* g = req.mutable_geometry();
    g->set_num_layers(32);
    g->set_num_q_heads(32);
    g->set_num_kv_heads(8);
    g->set_head_dim(128);
    g->set_dtype(v1::DTYPE_BF16);
    g->set_max_tokens(2048);
    req.set_label(label);
    v1::CreateSequenceResponse resp;
    grpc::Status s =
        daemon_->stub().CreateSequence(ContextWithToken(client_->token()).get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    if (kv_bytes != nullptr) *kv_bytes = resp.sequence().kv_bytes();
    return resp.sequence().handle();
  }

  uint64_t MemoryUsed() {
    v1::GetStatsResponse r;
    EXPECT_TRUE(daemon_->stub().GetStats(ContextWithDeadline().get(), {}, &r).ok());
    return r.memory_used_bytes();
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Attachment> client_;  // owns the sequences the tests create
};

TEST_F(CliTest, StatusShowsHealthVersionMemoryAndSequences) {
  CreateSequence("one");
  RunResult r = Cli({"status"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("icecached   unix:" + daemon_->socket_path()));
  EXPECT_THAT(r.out, HasSubstr("health      SERVING"));
  EXPECT_THAT(r.out, HasSubstr("version     0."));
  EXPECT_THAT(r.out, MatchesRegex("(.|\n)*uptime      [0-9]+s(.|\n)*"));
  // The sequence's promise and the client's control segment, of a 4 GiB limit.
  const uint64_t used = MemoryUsed();
  EXPECT_THAT(r.out, HasSubstr(absl::StrFormat("memory      %s used of 4.00 GiB limit (%.1f%%)",
                                               FormatBytes(used), 100.0 * used / (4ull << 30))));
  EXPECT_THAT(r.out, HasSubstr("sequences   1"));
}

TEST_F(CliTest, StatusJsonIsOneObject) {
  RunResult r = Cli({"--json", "status"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, ::testing::StartsWith("{\"target\":\"unix:"));
  EXPECT_THAT(r.out, HasSubstr("\"healthy\":true"));
  EXPECT_THAT(r.out, HasSubstr("\"memory_limit_bytes\":\"4294967296\""));
  EXPECT_THAT(r.out, HasSubstr("\"num_sequences\":\"0\""));
}

TEST_F(CliTest, SequencesTableAndJson) {
  RunResult empty = Cli({"sequences"});
  EXPECT_EQ(empty.exit_code, 0);
  EXPECT_EQ(empty.out, "no sequences\n");

  uint64_t kv = 0;
  const std::string a = CreateSequence("llama-a", &kv);
  const std::string b = CreateSequence("llama-b");
  RunResult table = Cli({"sequences"});
  EXPECT_EQ(table.exit_code, 0) << table.err;
  EXPECT_THAT(table.out, HasSubstr("HANDLE"));
  EXPECT_THAT(table.out, HasSubstr("KV BYTES"));
  EXPECT_THAT(table.out, HasSubstr(a));
  EXPECT_THAT(table.out, HasSubstr(b));
  EXPECT_THAT(table.out, HasSubstr("llama-a"));
  EXPECT_THAT(table.out, HasSubstr(absl::StrCat("    32    32/8  128  bf16    4    256            "
                                                "0/2048  ",
                                                FormatBytes(kv))));

  RunResult json = Cli({"--json", "sequences"});
  EXPECT_EQ(json.exit_code, 0);
  EXPECT_THAT(json.out, HasSubstr(absl::StrCat("\"handle\":\"", a, "\"")));
  EXPECT_THAT(json.out, HasSubstr("\"total_size\":\"2\""));

  RunResult limited = Cli({"--limit=1", "sequences"});
  EXPECT_THAT(limited.out, HasSubstr("(1 of 2 shown)"));
}

TEST_F(CliTest, StatsAndConfig) {
  CreateSequence("x");
  RunResult stats = Cli({"stats"});
  EXPECT_EQ(stats.exit_code, 0);
  EXPECT_THAT(stats.out, HasSubstr("sequences_created_total  1"));
  EXPECT_THAT(stats.out, HasSubstr("memory_limit_bytes       4294967296 (4.00 GiB)"));
  RunResult config = Cli({"config"});
  EXPECT_EQ(config.exit_code, 0);
  EXPECT_THAT(config.out, HasSubstr("head dims         64,128,256"));
  EXPECT_THAT(config.out, HasSubstr("tcp               127.0.0.1:"));
}

TEST_F(CliTest, DropFreesAndReportsUnknownHandles) {
  uint64_t kv = 0;
  const std::string h = CreateSequence("gone", &kv);
  RunResult r = Cli({"drop", h});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "dropped " + h + " (freed " + FormatBytes(kv) + ")\n");
  RunResult again = Cli({"drop", h});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_THAT(again.err, HasSubstr("drop failed: NOT_FOUND: no sequence " + h));
  RunResult bad = Cli({"drop", "nonsense"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("INVALID_ARGUMENT"));
  RunResult json = Cli({"--json", "drop", CreateSequence("j")});
  EXPECT_THAT(json.out, HasSubstr(absl::StrCat("\"freed_bytes\":", kv)));
}

TEST_F(CliTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Cli({}).exit_code, 2);
  RunResult unknown = Cli({"frobnicate"});
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_THAT(unknown.err, HasSubstr("unknown command 'frobnicate'"));
  RunResult drop = Cli({"drop"});
  EXPECT_EQ(drop.exit_code, 2);
  EXPECT_THAT(drop.err, HasSubstr("drop takes exactly one HANDLE"));
  EXPECT_EQ(Cli({"status", "extra"}).exit_code, 2);
}

TEST_F(CliTest, TalksTcpWithAddress) {
  absl::StatusOr<RunResult> r = RunCommand(
      {IcecacheCliBinary(), "--address=" + daemon_->tcp_address(), "status"}, dir_.path());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit_code, 0) << r->err;
  EXPECT_THAT(r->out, HasSubstr("icecached   " + daemon_->tcp_address()));
}

TEST(CliNoDaemon, SaysClearlyThatNothingIsThere) {
  TempDir dir;
  absl::StatusOr<RunResult> r = RunCommand(
      {IcecacheCliBinary(), "--socket=" + dir.path() + "/none.sock", "status"}, dir.path());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit_code, 1);
  EXPECT_THAT(r->err, HasSubstr("no icecached at unix:" + dir.path() +
                                "/none.sock (the socket does not exist)"));
  // Nothing listens on this TCP port: a clear "cannot reach" within the timeout.
  absl::StatusOr<RunResult> tcp = RunCommand(
      {IcecacheCliBinary(), "--address=127.0.0.1:1", "--timeout=1s", "status"}, dir.path());
  ASSERT_TRUE(tcp.ok());
  EXPECT_EQ(tcp->exit_code, 1);
  EXPECT_THAT(tcp->err, HasSubstr("cannot reach icecached at 127.0.0.1:1"));
}

}  // namespace
}  // namespace icecache::testing
