// defines: tf::kMinParallelElems (the size below which elementwise loops stay on one thread)
#pragma once

#include <cstdint>

namespace tf {

// Elementwise loops over fewer elements run on the calling thread: starting and joining an OpenMP
// region costs microseconds, more than such a loop, and decoding runs thousands of them per token.
constexpr int64_t kMinParallelElems = int64_t(1) << 15;

}  // namespace tf
