// defines: tf::ref::quantize_rows_ggml and ggml_quantizable (ggml's reference quantizers
//          quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref, byte for byte), quantizable_ggml_type_names
#pragma once

#include <cstdint>
#include <string>

#include "kernels/quant_blocks.h"

namespace tf::ref {

// The ggml types quantize_rows_ggml writes: Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, whose reference
// quantizers are closed-form per block of 32. The k-quants' reference quantizers search for their
// scales iteratively and are not reproduced here.
constexpr bool ggml_quantizable(GgmlType t) {
  return t == GgmlType::Q8_0 || t == GgmlType::Q4_0 || t == GgmlType::Q4_1 || t == GgmlType::Q5_0 ||
         t == GgmlType::Q5_1;
}

// Their names, in ggml_quantizable's order: "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1".
std::string quantizable_ggml_type_names();

// Quantizes n f32 values (n a multiple of 32) into n / 32 blocks of `type` at `dst`, as ggml's
// quantize_row_*_ref (what llama-quantize writes without an importance matrix, and what gguf-py's
// quants.quantize computes): per block, Q8_0 takes d = absmax / 127 and q = roundf(x / d) (half
// away from zero); Q4_0 / Q5_0 take d = -v / 8 (/ 16) for the v of largest magnitude (the first
// one on a tie) and q = min(15 (31), trunc(x / d + 8.5 (16.5))); Q4_1 / Q5_1 take
// d = (max - min) / 15 (31), m = min and q = min(15 (31), trunc((x - min) / d + 0.5)). Every
// x / d is x * (1 / d) in f32, and 1 / d is 0 for d = 0; d and m are stored as f16 rounded to
// nearest even. Throws tf::Error for a type ggml_quantizable refuses, an n that is not whole
// blocks, or a non-finite value (naming its index).
void quantize_rows_ggml(GgmlType type, const float* x, int64_t n, void* dst);

}  // namespace tf::ref
