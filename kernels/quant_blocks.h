// defines: tf::GgmlType (ggml tensor type ids), tf::ggml_type_info, the quantized block layouts
//          BlockQ8_0, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ2_K, BlockQ3_K, BlockQ4_K,
//          BlockQ5_K, BlockQ6_K (ggml's formats), dtype_of_ggml / ggml_of_dtype; the NF4 / int8 block
//          sizes and kNf4Code
//
// One definition for host and device code: plain structs of fixed-size arrays, half-precision
// scales kept as their uint16_t bit patterns (no host/device half type needed), sizes asserted so
// that a struct can be laid over the bytes of a GGUF tensor directly.
#pragma once

#include <cstdint>
#include <optional>

#include "src/core/dtype.h"

// Lets the small helpers below be called from CUDA kernels as well as host code.
#if defined(__CUDACC__)
#define TF_QUANT_HOST_DEVICE __host__ __device__
#else
#define TF_QUANT_HOST_DEVICE
#endif

namespace tf {

// ggml's tensor type ids as stored in GGUF tensor infos. Ids 4, 5, 31-33 and 36-38 were removed
// formats and are never valid; the list ends at MXFP4, the newest type this project knows.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
};

constexpr int kQK0 = 32;          // elements per block of the 32-element formats (Q8_0, Q4_*, Q5_*)
constexpr int kQKK = 256;         // elements per super-block of the k-quants
constexpr int kKScaleBytes = 12;  // Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins

// x = d * q
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK0];
};

// x[j] = d * ((qs[j] & 15) - 8), x[j + 16] = d * ((qs[j] >> 4) - 8)
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK0 / 2];
};

// x[j] = d * (qs[j] & 15) + m, x[j + 16] = d * (qs[j] >> 4) + m
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK0 / 2];
};

// The fifth bit of element j is bit j of qh (read as a little-endian uint32):
// x[j] = d * ((qs[j] & 15 | bit j << 4) - 16), x[j + 16] = d * ((qs[j] >> 4 | bit (j + 16) << 4) - 16)
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[kQK0 / 2];
};

// As Q5_0 with an offset instead of the - 16: x = d * q + m
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK0 / 2];
};

// Sixteen sub-blocks of 16, each with a 4-bit scale (low nibble of scales[s]) and 4-bit min (high
// nibble): x = d * sc * q - dmin * mn. Each 32 bytes of qs hold 128 elements as four 2-bit planes:
// element 32 * p + l of that group is bits 2p..2p+1 of byte l.
struct BlockQ2_K {
  uint8_t scales[kQKK / 16];
  uint8_t qs[kQKK / 4];
  uint16_t d;
  uint16_t dmin;
};

// Sixteen sub-blocks of 16 with 6-bit scales offset by 32 (low nibbles in bytes 0-7, two high bits
// each in bytes 8-11); 2-bit values in qs laid out as in Q2_K, and a third bit, bit e / 32 of
// hmask[e % 32], that when clear subtracts 4: x = d * (sc - 32) * (q - (bit ? 0 : 4)).
struct BlockQ3_K {
  uint8_t hmask[kQKK / 8];
  uint8_t qs[kQKK / 4];
  uint8_t scales[kKScaleBytes];
  uint16_t d;
};

// Eight sub-blocks of 32; sub-block s has scale d * sc[s] and min dmin * mn[s], with the 6-bit
// sc/mn packed in `scales`. Each 32 bytes of qs hold two sub-blocks: low nibbles then high ones.
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qs[kQKK / 2];
};

// Q4_K plus a fifth bit per element: bit (2i) / (2i + 1) of qh[l] belongs to the low / high nibble
// sub-block of the i-th 32-byte chunk of qs.
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qh[kQKK / 8];
  uint8_t qs[kQKK / 2];
};

// Sixteen sub-blocks of 16 with signed 8-bit scales; 6-bit values (low 4 bits in ql, high 2 in
// qh) offset by 32: x = d * scales[s] * (q - 32).
struct BlockQ6_K {
  uint8_t ql[kQKK / 2];
  uint8_t qh[kQKK / 4];
  int8_t scales[kQKK / 16];
  uint16_t d;
};

static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes per 32 elements");
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block is 18 bytes per 32 elements");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block is 20 bytes per 32 elements");
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block is 22 bytes per 32 elements");
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 block is 24 bytes per 32 elements");
static_assert(sizeof(BlockQ2_K) == 84, "Q2_K block is 84 bytes per 256 elements");
static_assert(sizeof(BlockQ3_K) == 110, "Q3_K block is 110 bytes per 256 elements");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block is 144 bytes per 256 elements");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block is 176 bytes per 256 elements");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block is 210 bytes per 256 elements");

static_assert(sizeof(BlockQ8_0) == dtype_block_bytes(DType::Q8_0) &&
                  sizeof(BlockQ4_0) == dtype_block_bytes(DType::Q4_0) &&
                  sizeof(BlockQ4_1) == dtype_block_bytes(DType::Q4_1) &&
                  sizeof(BlockQ5_0) == dtype_block_bytes(DType::Q5_0) &&
                  sizeof(BlockQ5_1) == dtype_block_bytes(DType::Q5_1) &&
                  sizeof(BlockQ2_K) == dtype_block_bytes(DType::Q2_K) &&
                  sizeof(BlockQ3_K) == dtype_block_bytes(DType::Q3_K) &&
                  sizeof(BlockQ4_K) == dtype_block_bytes(DType::Q4_K) &&
                  sizeof(BlockQ5_K) == dtype_block_bytes(DType::Q5_K) &&
                  sizeof(BlockQ6_K) == dtype_block_bytes(DType::Q6_K),
              "tf::DType's block sizes are the block structs' sizes");

// The tf::DType that computes with a ggml type's data as it is stored; nullopt for the types
// tightfit cannot use (IQ*, TQ*, MXFP4, Q8_1, Q8_K, integer and f64 tensors).
constexpr std::optional<DType> dtype_of_ggml(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return DType::F32;
    case GgmlType::F16: return DType::F16;
    case GgmlType::BF16: return DType::BF16;
    case GgmlType::Q4_0: return DType::Q4_0;
    case GgmlType::Q4_1: return DType::Q4_1;
    case GgmlType::Q5_0: return DType::Q5_0;
    case GgmlType::Q5_1: return DType::Q5_1;
    case GgmlType::Q8_0: return DType::Q8_0;
    case GgmlType::Q2_K: return DType::Q2_K;
    case GgmlType::Q3_K: return DType::Q3_K;
    case GgmlType::Q4_K: return DType::Q4_K;
    case GgmlType::Q5_K: return DType::Q5_K;
    case GgmlType::Q6_K: return DType::Q6_K;
    default: return std::nullopt;
  }
}

// The ggml type storing a DType's data the same way; nullopt for I32, NF4 and INT8.
constexpr std::optional<GgmlType> ggml_of_dtype(DType t) {
  for (uint32_t id = 0; id <= uint32_t(GgmlType::MXFP4); ++id)
    if (dtype_of_ggml(GgmlType(id)) == t) return GgmlType(id);
  return std::nullopt;
}

// Storage geometry of a type: a row of n elements (n a multiple of block_elems) takes
// n / block_elems * block_bytes bytes. `supported` marks the types tightfit can dequantize; the
// others are known so that a file holding them still opens (and can be inspected) and errors can
// name them.
struct GgmlTypeInfo {
  const char* name;
  int block_elems;
  int block_bytes;
  bool supported;
};

// Returns {nullptr, 0, 0, false} for an id that is not a ggml type.
TF_QUANT_HOST_DEVICE constexpr GgmlTypeInfo ggml_type_info(uint32_t id) {
  switch (GgmlType(id)) {
    case GgmlType::F32: return {"F32", 1, 4, true};
    case GgmlType::F16: return {"F16", 1, 2, true};
    case GgmlType::BF16: return {"BF16", 1, 2, true};
    case GgmlType::Q8_0: return {"Q8_0", kQK0, int(sizeof(BlockQ8_0)), true};
    case GgmlType::Q4_0: return {"Q4_0", kQK0, int(sizeof(BlockQ4_0)), true};
    case GgmlType::Q4_1: return {"Q4_1", kQK0, int(sizeof(BlockQ4_1)), true};
    case GgmlType::Q4_K: return {"Q4_K", kQKK, int(sizeof(BlockQ4_K)), true};
    case GgmlType::Q5_K: return {"Q5_K", kQKK, int(sizeof(BlockQ5_K)), true};
    case GgmlType::Q6_K: return {"Q6_K", kQKK, int(sizeof(BlockQ6_K)), true};
    case GgmlType::Q5_0: return {"Q5_0", kQK0, int(sizeof(BlockQ5_0)), true};
    case GgmlType::Q5_1: return {"Q5_1", kQK0, int(sizeof(BlockQ5_1)), true};
    case GgmlType::Q2_K: return {"Q2_K", kQKK, int(sizeof(BlockQ2_K)), true};
    case GgmlType::Q3_K: return {"Q3_K", kQKK, int(sizeof(BlockQ3_K)), true};
    case GgmlType::Q8_1: return {"Q8_1", kQK0, 36, false};
    case GgmlType::Q8_K: return {"Q8_K", kQKK, 292, false};
    case GgmlType::IQ2_XXS: return {"IQ2_XXS", kQKK, 66, false};
    case GgmlType::IQ2_XS: return {"IQ2_XS", kQKK, 74, false};
    case GgmlType::IQ3_XXS: return {"IQ3_XXS", kQKK, 98, false};
    case GgmlType::IQ1_S: return {"IQ1_S", kQKK, 50, false};
    case GgmlType::IQ4_NL: return {"IQ4_NL", kQK0, 18, false};
    case GgmlType::IQ3_S: return {"IQ3_S", kQKK, 110, false};
    case GgmlType::IQ2_S: return {"IQ2_S", kQKK, 82, false};
    case GgmlType::IQ4_XS: return {"IQ4_XS", kQKK, 136, false};
    case GgmlType::I8: return {"I8", 1, 1, false};
    case GgmlType::I16: return {"I16", 1, 2, false};
    case GgmlType::I32: return {"I32", 1, 4, false};
    case GgmlType::I64: return {"I64", 1, 8, false};
    case GgmlType::F64: return {"F64", 1, 8, false};
    case GgmlType::IQ1_M: return {"IQ1_M", kQKK, 56, false};
    case GgmlType::TQ1_0: return {"TQ1_0", kQKK, 54, false};
    case GgmlType::TQ2_0: return {"TQ2_0", kQKK, 66, false};
    case GgmlType::MXFP4: return {"MXFP4", kQK0, 17, false};
  }
  return {nullptr, 0, 0, false};
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block: sub-blocks 0-3 keep
// theirs in the low 6 bits of bytes j and j + 4; sub-blocks 4-7 split theirs into a low nibble in
// byte j + 4 and the two spare top bits of bytes j - 4 (scale) and j (min).
TF_QUANT_HOST_DEVICE constexpr void k_scale_min(const uint8_t* scales, int j, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = uint8_t(scales[j] & 63);
    mn = uint8_t(scales[j + 4] & 63);
  } else {
    sc = uint8_t((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4));
    mn = uint8_t((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
  }
}

// ---- bitsandbytes' NF4 (QLoRA) and our linear int8, the formats of quantized base weights.
// Unlike the GGML blocks above these keep codes and scales in separate arrays (as bitsandbytes
// stores them), and a vector's last block may be partial.

constexpr int kNf4Block = 64;         // elements per NF4 absmax (bitsandbytes' default blocksize)
constexpr int kNf4NestedBlock = 256;  // absmax values per nested absmax in double quantization
constexpr int kInt8Block = 64;        // elements per int8 absmax

// The 16 NormalFloat values of the QLoRA paper (Dettmers et al. 2023, appendix E), the float32
// constants of bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], with
// an exact zero. Code k (0..15) stands for kNf4Code[k] * absmax.
inline constexpr float kNf4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

}  // namespace tf
