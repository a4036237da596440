// gMock matchers for absl::Status, absl::StatusOr<T> and grpc::Status (Debian's Abseil ships
// none). Usage:
//   EXPECT_THAT(registry.Get(h), StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("head_dim")));
//   EXPECT_THAT(grpc_status, GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
//   ASSERT_OK(status_or);  ASSERT_OK_AND_ASSIGN(auto v, MakeV());
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace icecache::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER_P(StatusIs, code,
          std::string(negation ? "has a status code other than " : "has status code ") +
              absl::StatusCodeToString(code)) {
  const absl::Status& s = ::icecache::testing::GetStatus(arg);
  *result_listener << "whose status is " << s;
  return s.code() == code;
}

MATCHER_P2(StatusIs, code, message_matcher,
           std::string("has status code ") + absl::StatusCodeToString(code) +
               " and a matching message") {
  const absl::Status& s = ::icecache::testing::GetStatus(arg);
  *result_listener << "whose status is " << s;
  return s.code() == code && ::testing::Matches(message_matcher)(std::string(s.message()));
}

MATCHER(IsOk, negation ? "is not OK" : "is OK") {
  const absl::Status& s = ::icecache::testing::GetStatus(arg);
  *result_listener << "whose status is " << s;
  return s.ok();
}

MATCHER_P(GrpcStatusIs, code, "") {
  *result_listener << "whose status is " << static_cast<int>(arg.error_code()) << ": "
                   << arg.error_message();
  return arg.error_code() == code;
}

MATCHER_P2(GrpcStatusIs, code, message_matcher, "") {
  *result_listener << "whose status is " << static_cast<int>(arg.error_code()) << ": "
                   << arg.error_message();
  return arg.error_code() == code && ::testing::Matches(message_matcher)(arg.error_message());
}

}  // namespace icecache::testing

#define ICECACHE_TEST_CONCAT_INNER(a, b) a##b
#define ICECACHE_TEST_CONCAT(a, b) ICECACHE_TEST_CONCAT_INNER(a, b)

#define ASSERT_OK(expr) ASSERT_THAT((expr), ::icecache::testing::IsOk())
#define EXPECT_OK(expr) EXPECT_THAT((expr), ::icecache::testing::IsOk())
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL(ICECACHE_TEST_CONCAT(_statusor_, __LINE__), lhs, expr)
#define ASSERT_OK_AND_ASSIGN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  ASSERT_TRUE(tmp.ok()) << tmp.status();          \
  lhs = std::move(tmp).value()
