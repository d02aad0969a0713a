# Finds tightfit's dependencies on a machine that may have none of their -dev packages nor even
# pkg-config (a GPU machine with only the CUDA toolkit), in the system first and then in
# TIGHTFIT_BUNDLE: an unpacked tools/gpu-bundle.sh archive, which tools/gpu-check.sh passes. Included
# by CMakeLists.txt before it looks for any dependency; a package the system has is taken from it.
file(REAL_PATH ${TIGHTFIT_BUNDLE} TIGHTFIT_BUNDLE BASE_DIRECTORY ${CMAKE_BINARY_DIR})
if(NOT EXISTS ${TIGHTFIT_BUNDLE}/NEEDS)
  message(FATAL_ERROR "TIGHTFIT_BUNDLE=${TIGHTFIT_BUNDLE} is not an unpacked tools/gpu-bundle.sh bundle (no NEEDS file)")
endif()
# After the system's prefixes, so that every find_* below and find_package(nlohmann_json) try the
# system first.
list(APPEND CMAKE_SYSTEM_PREFIX_PATH ${TIGHTFIT_BUNDLE})

# OpenBLAS's OpenMP build: the system's where it has one (the path CMakeLists.txt looks in), else
# the bundle's, with the cblas.h of the same library (it declares openblas_set_num_threads).
find_library(TIGHTFIT_OPENBLAS_OPENMP openblas
  PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp ${TIGHTFIT_BUNDLE}/lib NO_DEFAULT_PATH)
string(FIND "${TIGHTFIT_OPENBLAS_OPENMP}" "${TIGHTFIT_BUNDLE}/" at)
if(at EQUAL 0)
  find_path(CBLAS_INCLUDE_DIR cblas.h PATHS ${TIGHTFIT_BUNDLE}/include NO_DEFAULT_PATH REQUIRED)
endif()

# CLI11 is header-only and CMakeLists.txt takes it from the compiler's default include path.
find_path(TIGHTFIT_CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED)
include_directories(SYSTEM ${TIGHTFIT_CLI11_INCLUDE_DIR})

# PCRE2, sentencepiece and utf8proc without pkg-config, as the targets CMakeLists.txt's
# pkg_check_modules would make, so that the targets linking them read the same either way.
foreach(dep PCRE2:pcre2.h:pcre2-8 SENTENCEPIECE:sentencepiece_processor.h:sentencepiece UTF8PROC:utf8proc.h:utf8proc)
  string(REPLACE ":" ";" dep ${dep})
  list(GET dep 0 name)
  list(GET dep 1 header)
  list(GET dep 2 lib)
  find_path(TIGHTFIT_${name}_INCLUDE_DIR ${header} REQUIRED)
  find_library(TIGHTFIT_${name}_LIBRARY ${lib} REQUIRED)
  add_library(PkgConfig::${name} INTERFACE IMPORTED)
  set_target_properties(PkgConfig::${name} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${TIGHTFIT_${name}_INCLUDE_DIR}
                                                      INTERFACE_LINK_LIBRARIES ${TIGHTFIT_${name}_LIBRARY})
  message(STATUS "tightfit: ${name} ${TIGHTFIT_${name}_LIBRARY}")
endforeach()
