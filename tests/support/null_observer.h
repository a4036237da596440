// A data-plane observer that records nothing: for in-process data planes in tests and fuzz
// targets (subclass it to count the events a test looks at).
#pragma once

#include <cstdint>

#include "server/core/data_plane.h"

namespace icecache::testing {

class NullDataPlaneObserver : public DataPlaneObserver {
 public:
  void OnBuild(double, uint64_t) override {}
  void OnInsert(double, uint64_t) override {}
  void OnSelect(double) override {}
  void OnRecallSample(double) override {}
  void OnAttach(bool) override {}
  void OnDetach() override {}
  void OnRequest(uint32_t, int, double) override {}
  void OnProtocolError() override {}
  void OnClientEvicted() override {}
};

}  // namespace icecache::testing
