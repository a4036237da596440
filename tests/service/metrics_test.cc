#include "server/metrics/metrics.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(Metrics, RpcChildrenAreCreatedOnceAndCountByCode) {
  Metrics m("1.2.3", "abcdef12");
  const Metrics::RpcMethodMetrics* a = m.RpcMethod("GetStats");
  EXPECT_EQ(m.RpcMethod("GetStats"), a);
  a->Record(0, 0.001);
  a->Record(0, 0.002);
  a->Record(5, 0.003);
  a->Record(99, 0.003);  // out of range counts as UNKNOWN
  const std::string text = m.Serialize();
  EXPECT_THAT(text, HasSubstr("icecache_rpc_requests_total{code=\"OK\",method=\"GetStats\"} 2"));
  EXPECT_THAT(text,
              HasSubstr("icecache_rpc_requests_total{code=\"NOT_FOUND\",method=\"GetStats\"} 1"));
  EXPECT_THAT(text,
              HasSubstr("icecache_rpc_requests_total{code=\"UNKNOWN\",method=\"GetStats\"} 1"));
  EXPECT_THAT(text, HasSubstr("icecache_rpc_latency_seconds_count{method=\"GetStats\"} 4"));
  EXPECT_THAT(text, HasSubstr("icecache_build_info{commit=\"abcdef12\",version=\"1.2.3\"} 1"));
}

TEST(Metrics, CallbacksAreReadAtScrapeTime) {
  Metrics m("v", "c");
  double value = 3;
  m.AddCallback("icecache_test_value_bytes", "help", prometheus::MetricType::Gauge,
                [&value] { return value; });
  EXPECT_THAT(m.Serialize(), HasSubstr("icecache_test_value_bytes 3"));
  value = 42;
  EXPECT_THAT(m.Serialize(), HasSubstr("icecache_test_value_bytes 42"));
  EXPECT_THAT(m.Serialize(), HasSubstr("# TYPE icecache_test_value_bytes gauge"));
}

TEST(Metrics, StatusCodeNames) {
  EXPECT_STREQ(StatusCodeName(0), "OK");
  EXPECT_STREQ(StatusCodeName(8), "RESOURCE_EXHAUSTED");
  EXPECT_STREQ(StatusCodeName(16), "UNAUTHENTICATED");
  EXPECT_STREQ(StatusCodeName(17), "UNKNOWN");
  EXPECT_STREQ(StatusCodeName(-1), "UNKNOWN");
}

TEST(Metrics, ExposerReportsItsPortAndRefusesABusyOne) {
  Metrics a("v", "c");
  ASSERT_OK(a.StartExposer("127.0.0.1:0"));
  const int port = a.exposer_port();
  EXPECT_GT(port, 0);
  Metrics b("v", "c");
  EXPECT_THAT(b.StartExposer("127.0.0.1:" + std::to_string(port)),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("cannot serve metrics")));
  EXPECT_EQ(b.exposer_port(), 0);
  a.StopExposer();
  EXPECT_EQ(a.exposer_port(), 0);
}

}  // namespace
}  // namespace icecache
