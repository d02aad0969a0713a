// libFuzzer target: tf::fuzz::run_jinja (fuzz/entry_points.h) over arbitrary bytes.
// Build and run: tools/fuzz.sh jinja [seconds]
#include <cstddef>
#include <cstdint>

#include "fuzz/entry_points.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tf::fuzz::run_jinja(data, size);
  return 0;
}
