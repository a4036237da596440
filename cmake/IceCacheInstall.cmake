# What `cmake --install` puts in place for engines outside this tree:
#
#   bin/icecached, bin/icecache                      the daemon and the operator CLI
#   lib/libicecache_client.so(.0.1.0)                the client library, shared: everything it
#                                                    links of this project (common, proto,
#                                                    kernels, selection) is inside and hidden
#   include/icecache/{client,attachment,execution_mode}.h   the public API
#   include/icecache/deps/{common/dtype.h, proto/icecache/v1/abi.h}
#                                                    headers the public ones include by those
#                                                    paths today; include/icecache/deps is on
#                                                    the include path of icecache::client
#   lib/cmake/IceCache/                              find_package(IceCache) -> icecache::client
#   lib/pkgconfig/icecache-client.pc                 pkg-config --cflags --libs icecache-client
#   lib/python3.X/site-packages/icecache             the Python package (python/CMakeLists.txt)
#
# Consumers need Debian's Abseil (libabsl-dev): the public headers use absl::Status.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# The shared client library. The static archive of client/ and the project's static libraries
# it links go in whole (WHOLE_ARCHIVE for the client's own objects, so every public symbol is
# there); --exclude-libs keeps the internal archives' symbols (and the generated protobuf
# code's) out of the dynamic symbol table, so they cannot clash with an engine's own copies.
add_library(icecache_client_shared SHARED "${CMAKE_CURRENT_LIST_DIR}/empty.cc")
set_target_properties(icecache_client_shared PROPERTIES
  OUTPUT_NAME icecache_client
  VERSION "${PROJECT_VERSION}"
  SOVERSION "${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}"
  EXPORT_NAME client
  LIBRARY_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/lib"
  # libcudart lives outside the loader's default paths: keep its directory in the RUNPATH.
  INSTALL_RPATH_USE_LINK_PATH ON)
target_link_libraries(icecache_client_shared
  PRIVATE "$<LINK_LIBRARY:WHOLE_ARCHIVE,icecache_client>"
  PUBLIC absl::status absl::statusor absl::synchronization absl::time)
# (No --no-undefined: sanitizer and fuzzer builds leave their runtime's symbols to the
# executable.)
target_link_options(icecache_client_shared PRIVATE
  "LINKER:--exclude-libs,libicecache_common.a:libicecache_proto.a:libicecache_kernels.a:libicecache_selection.a")
target_include_directories(icecache_client_shared PUBLIC
  "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/client/include>"
  "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}>"
  "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>"
  "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}/icecache/deps>")
add_library(icecache::client_shared ALIAS icecache_client_shared)

install(TARGETS icecached icecache_cli RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}"
        COMPONENT runtime)
install(TARGETS icecache_client_shared EXPORT IceCacheTargets
        LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT client
        NAMELINK_COMPONENT client)
install(FILES
  "${PROJECT_SOURCE_DIR}/client/include/icecache/client.h"
  "${PROJECT_SOURCE_DIR}/client/include/icecache/attachment.h"
  "${PROJECT_SOURCE_DIR}/client/include/icecache/execution_mode.h"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/icecache" COMPONENT client)
install(FILES "${PROJECT_SOURCE_DIR}/common/dtype.h"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/icecache/deps/common" COMPONENT client)
install(FILES "${PROJECT_SOURCE_DIR}/proto/icecache/v1/abi.h"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/icecache/deps/proto/icecache/v1"
        COMPONENT client)

set(_cmake_dir "${CMAKE_INSTALL_LIBDIR}/cmake/IceCache")
install(EXPORT IceCacheTargets NAMESPACE icecache:: DESTINATION "${_cmake_dir}"
        COMPONENT client)
configure_package_config_file("${CMAKE_CURRENT_LIST_DIR}/IceCacheConfig.cmake.in"
  "${CMAKE_CURRENT_BINARY_DIR}/IceCacheConfig.cmake" INSTALL_DESTINATION "${_cmake_dir}"
  PATH_VARS CMAKE_INSTALL_INCLUDEDIR)
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/IceCacheConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/IceCacheConfig.cmake"
              "${CMAKE_CURRENT_BINARY_DIR}/IceCacheConfigVersion.cmake"
        DESTINATION "${_cmake_dir}" COMPONENT client)

# Relocatable: the prefix is found from the .pc file's own directory (cmake --install --prefix).
file(RELATIVE_PATH ICECACHE_PC_TO_PREFIX "/_/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/_")
configure_file("${CMAKE_CURRENT_LIST_DIR}/icecache-client.pc.in"
               "${CMAKE_CURRENT_BINARY_DIR}/icecache-client.pc" @ONLY)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/icecache-client.pc"
        DESTINATION "${CMAKE_INSTALL_LIBDIR}/pkgconfig" COMPONENT client)

# The installed tree against an outside project (tests/install/run.sh); not in sanitizer or
# fuzzer builds, whose library needs their runtime in the outside project too.
if(ICECACHE_BUILD_TESTS AND NOT ICECACHE_SANITIZE AND NOT ICECACHE_BUILD_FUZZERS)
  set(_install_test_python "")
  if(TARGET icecache_py_core)
    set(_install_test_python "${Python_EXECUTABLE}")
  endif()
  add_test(NAME install_tree
           COMMAND bash "${PROJECT_SOURCE_DIR}/tests/install/run.sh" "${CMAKE_BINARY_DIR}"
                   ${_install_test_python})
  set_tests_properties(install_tree PROPERTIES LABELS integration TIMEOUT 300)
endif()
