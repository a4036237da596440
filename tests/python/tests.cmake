# The Python test suites (pytest), run by ctest like the C++ ones: label "python" (every
# suite), "unit"-like speed for test_client and test_operator, and the real model's checks in
# test_hf (label "model"; it skips itself where the model has not been fetched). Included by
# python/CMakeLists.txt when the package is built.
add_executable(icecache_model_reference "${CMAKE_CURRENT_LIST_DIR}/model_reference.cc")
set_target_properties(icecache_model_reference PROPERTIES OUTPUT_NAME icecache-model-reference)
target_link_libraries(icecache_model_reference PRIVATE icecache::model icecache::selection
                      absl::flags absl::flags_parse icecache_warnings)

set(_pytest_env
  "PYTHONPATH=${ICECACHE_PYTHON_DIR}"
  "ICECACHE_ICECACHED_BIN=$<TARGET_FILE:icecached>"
  "ICECACHE_MODEL_REFERENCE_BIN=$<TARGET_FILE:icecache_model_reference>"
  "ICECACHE_PYTHON_OVERHEAD_BIN=${CMAKE_BINARY_DIR}/bench/python_overhead"
  "GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS=100"
  "PYTHONDONTWRITEBYTECODE=1")
foreach(_suite client operator hf)
  add_test(NAME python_${_suite}
           COMMAND "${Python_EXECUTABLE}" -m pytest -q -p no:cacheprovider
                   "${CMAKE_CURRENT_LIST_DIR}/test_${_suite}.py"
           WORKING_DIRECTORY "${CMAKE_CURRENT_LIST_DIR}")
  set(_labels python)
  set(_timeout 300)
  if(_suite STREQUAL "hf")
    list(APPEND _labels model)
    set(_timeout 1200)
  endif()
  set_tests_properties(python_${_suite} PROPERTIES LABELS "${_labels}" TIMEOUT ${_timeout}
                       ENVIRONMENT "${_pytest_env}")
endforeach()
