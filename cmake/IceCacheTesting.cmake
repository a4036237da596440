# icecache_add_test(NAME name SOURCES a.cc ... [LIBS lib ...] [LABELS label ...] [TIMEOUT s])
#
# One GoogleTest executable, its cases registered one by one with gtest_discover_tests so
# that ctest reports (and can filter) each case. LABELS lets CI pick "unit", "integration"
# and "gpu" subsets; each case gets TIMEOUT seconds (default 60).
include(GoogleTest)

function(icecache_add_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 60)
  endif()
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} icecache::test_support GTest::gmock
                                          GTest::gtest_main icecache_warnings)
  gtest_discover_tests(${T_NAME}
    DISCOVERY_TIMEOUT 60
    PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT}
               # An idle gRPC client answers the server's shutdown ping only from its backup
               # poller (every 5 s by default), which would make every daemon shutdown in
               # the integration tests wait that long.
               ENVIRONMENT "GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS=100")
endfunction()
