// defines: tf::DType, is_quantized, dtype_size, dtype_block_elems, dtype_block_bytes, dtype_bytes,
//          dtype_name, bf16/f16 <-> f32 conversion
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace tf {

// Storage types of tensors. F32..I32 are elements of fixed size. The others are quantized block
// formats of frozen base weights, computed with as they are stored (kernels/quant_blocks.h holds
// their layouts): ggml's Q4_0..Q6_K, whose blocks lie along each row, and bitsandbytes' NF4 and
// tightfit's linear INT8, whose codes run over the flattened tensor with their per-block scales kept
// in separate arrays (tf::QuantScales).
enum class DType : uint8_t {
  F32,
  BF16,
  F16,
  I32,
  Q4_0,
  Q4_1,
  Q5_0,
  Q5_1,
  Q8_0,
  Q2_K,
  Q3_K,
  Q4_K,
  Q5_K,
  Q6_K,
  NF4,
  INT8
};

constexpr bool is_quantized(DType t) {
  return t >= DType::Q4_0;
}

// Bytes per element of an element type; 0 for a quantized type (see dtype_block_*).
constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    default: return 0;
  }
}

// Elements per block (1 for element types). A ggml-format row holds whole blocks; an NF4 / INT8
// tensor's last block may be partial.
constexpr int64_t dtype_block_elems(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q8_0: return 32;
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K: return 256;
    case DType::NF4:
    case DType::INT8: return 64;
    default: return 1;
  }
}

// Bytes per block of a ggml-format type, scales included (asserted against the block structs of
// kernels/quant_blocks.h); for NF4 and INT8, the bytes of the codes alone (32 and 64).
constexpr int64_t dtype_block_bytes(DType t) {
  switch (t) {
    case DType::Q4_0: return 18;
    case DType::Q4_1: return 20;
    case DType::Q5_0: return 22;
    case DType::Q5_1: return 24;
    case DType::Q8_0: return 34;
    case DType::Q2_K: return 84;
    case DType::Q3_K: return 110;
    case DType::Q4_K: return 144;
    case DType::Q5_K: return 176;
    case DType::Q6_K: return 210;
    case DType::NF4: return 32;
    case DType::INT8: return 64;
    default: return int64_t(dtype_size(t));
  }
}

// Bytes that n elements of `t` occupy in `data` (for ggml types n is a multiple of the block; NF4
// packs two codes per byte, rounding up). Scale arrays of NF4 / INT8 are not included.
constexpr int64_t dtype_bytes(DType t, int64_t n) {
  if (t == DType::NF4) return (n + 1) / 2;
  if (t == DType::INT8) return n;
  return n / dtype_block_elems(t) * dtype_block_bytes(t);
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::I32: return "i32";
    case DType::Q4_0: return "q4_0";
    case DType::Q4_1: return "q4_1";
    case DType::Q5_0: return "q5_0";
    case DType::Q5_1: return "q5_1";
    case DType::Q8_0: return "q8_0";
    case DType::Q2_K: return "q2_k";
    case DType::Q3_K: return "q3_k";
    case DType::Q4_K: return "q4_k";
    case DType::Q5_K: return "q5_k";
    case DType::Q6_K: return "q6_k";
    case DType::NF4: return "nf4";
    case DType::INT8: return "int8";
  }
  return "?";
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as PyTorch does; NaN stays NaN (quiet bit forced).
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace tf
