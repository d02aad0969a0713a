// defines: tf::ref::dequantize_rows and the per-format dequantize_{q8_0,q4_0,q4_1,q5_0,q5_1,q2_k,q3_k,
//          q4_k,q5_k,q6_k}, dequantizable_type_names
//          (reference dequantization of GGUF tensor data to f32)
#pragma once

#include <cstdint>
#include <string>

#include "kernels/quant_blocks.h"

namespace tf::ref {

// Each converts n consecutive elements (n a multiple of the format's block size) stored as blocks
// at `src` to f32 at `dst`. The arithmetic is ggml's reference order in f32, one rounding per
// operation, so results are bit-for-bit those of ggml's dequantize_row_* and of gguf-py.
void dequantize_q8_0(const BlockQ8_0* src, int64_t n, float* dst);
void dequantize_q4_0(const BlockQ4_0* src, int64_t n, float* dst);
void dequantize_q4_1(const BlockQ4_1* src, int64_t n, float* dst);
void dequantize_q5_0(const BlockQ5_0* src, int64_t n, float* dst);
void dequantize_q5_1(const BlockQ5_1* src, int64_t n, float* dst);
void dequantize_q2_k(const BlockQ2_K* src, int64_t n, float* dst);
void dequantize_q3_k(const BlockQ3_K* src, int64_t n, float* dst);
void dequantize_q4_k(const BlockQ4_K* src, int64_t n, float* dst);
void dequantize_q5_k(const BlockQ5_K* src, int64_t n, float* dst);
void dequantize_q6_k(const BlockQ6_K* src, int64_t n, float* dst);

// Dispatches on the type; also converts F32 / F16 / BF16. `src` is n elements of `type` (any
// alignment: blocks are copied out before use). Throws tf::Error for a type that is not supported
// or an n that is not a multiple of the type's block size.
void dequantize_rows(GgmlType type, const void* src, int64_t n, float* dst);

// The names of the types dequantize_rows converts, in id order: "F32, F16, Q4_0, ...".
std::string dequantizable_type_names();

}  // namespace tf::ref
