// defines: what the tests of quantized weights share: tf::test::f16_fields, the byte offsets of a
// ggml block's f16 scales (so that tests can write random finite scales into random blocks)
#pragma once

#include <cstddef>
#include <vector>

#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"

namespace tf::test {

// Byte offsets of the f16 scales inside one block of a ggml type (none for other types).
inline std::vector<size_t> f16_fields(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q5_0:
    case DType::Q8_0: return {0};
    case DType::Q4_1:
    case DType::Q5_1:
    case DType::Q4_K:
    case DType::Q5_K: return {0, 2};
    case DType::Q2_K: return {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)};
    case DType::Q3_K: return {offsetof(BlockQ3_K, d)};
    case DType::Q6_K: return {offsetof(BlockQ6_K, d)};
    default: return {};
  }
}

}  // namespace tf::test
