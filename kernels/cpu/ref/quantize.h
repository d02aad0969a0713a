// defines: tf::ref quantize / dequantize references for bitsandbytes' NF4 (with double quantization
//          of its absmax through the signed dynamic map) and our linear absmax int8; dynamic_map,
//          quant_blocks, nf4_packed_bytes, QuantFormat, bits_per_param
#pragma once

#include <cstdint>

#include "kernels/quant_blocks.h"

namespace tf::ref {

// Scale blocks of n elements at `block` elements each; the last one may be partial.
constexpr int64_t quant_blocks(int64_t n, int64_t block) {
  return (n + block - 1) / block;
}
// Bytes of n NF4 codes, two per byte; an odd n leaves the last low nibble as the code of 0.
constexpr int64_t nf4_packed_bytes(int64_t n) {
  return (n + 1) / 2;
}

// NF4 as bitsandbytes' quantize_4bit(quant_type="nf4", blocksize=64) makes it on the CPU:
// absmax[b] = max |x| over block b, and element i gets the code of the nearest kNf4Code value
// to x / absmax, compared against the float32 midpoints between neighbouring values (a value on a
// midpoint takes the lower code). Element 2j goes to the high nibble of codes[j], 2j + 1 to the
// low one. codes holds nf4_packed_bytes(n), absmax quant_blocks(n, kNf4Block). Throws on a
// non-finite element, naming its index.
void quantize_nf4(const float* x, int64_t n, uint8_t* codes, float* absmax);
// y[i] = kNf4Code[code of i] * absmax[i / kNf4Block].
void dequantize_nf4(const uint8_t* codes, const float* absmax, int64_t n, float* y);

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), ascending:
// 256 float32 values in [-0.993, 1], seven decades of 1e-6..1 with more steps in the larger ones.
const float* dynamic_map();

// bitsandbytes' blockwise 8-bit quantization to the dynamic map, as its CUDA kernel and torch
// backend do it: absmax[b] = max |x| over the `block` elements of block b; element i gets the
// index of the map value nearest to x / absmax, by the f32 midpoints as in quantize_nf4. (Its
// native CPU kernel's binary search sometimes lands on a neighbour of the nearest value; we do
// not reproduce that.) codes holds n bytes, absmax quant_blocks(n, block). Throws on a
// non-finite element, naming its index.
void quantize_dynamic8(const float* x, int64_t n, int64_t block, uint8_t* codes, float* absmax);
// y[i] = dynamic_map()[codes[i]] * absmax[i / block].
void dequantize_dynamic8(const uint8_t* codes, const float* absmax, int64_t n, int64_t block, float* y);

// Double quantization of `blocks` NF4 absmax values (quantize_4bit(compress_statistics=True)):
// returns the offset, their mean (summed in double, rounded to f32 and divided by the count in
// f32, which reproduces torch's float mean), and quantizes absmax - offset with
// quantize_dynamic8 in blocks of kNf4NestedBlock. codes holds `blocks` bytes, nested
// quant_blocks(blocks, kNf4NestedBlock) floats. Throws when blocks < 1.
float double_quantize_absmax(const float* absmax, int64_t blocks, uint8_t* codes, float* nested);
// absmax[b] = dynamic_map()[codes[b]] * nested[b / kNf4NestedBlock] + offset.
void dequantize_double_absmax(const uint8_t* codes, const float* nested, float offset, int64_t blocks,
                              float* absmax);

// Our int8 (not bitsandbytes', whose blockwise 8-bit is the dynamic map above): linear and
// symmetric per block of kInt8Block, codes[i] = round_half_even(x * (127 / absmax)) in [-127, 127]
// and y = codes[i] * (absmax / 127). A block of zeros has absmax 0 and codes 0. Throws on a
// non-finite element, naming its index.
void quantize_int8(const float* x, int64_t n, int8_t* codes, float* absmax);
void dequantize_int8(const int8_t* codes, const float* absmax, int64_t n, float* y);

enum class QuantFormat { Nf4, Nf4DoubleQuant, Int8 };

// Storage per element of a long vector (partial blocks and the one offset ignored): NF4 4 + 32/64
// = 4.5, with double quantization 4 + 8/64 + 32/(64*256) ~ 4.127, int8 8 + 32/64 = 8.5.
double bits_per_param(QuantFormat format);

}  // namespace tf::ref
