// defines: tf::GgmlType (ggml tensor type ids), tf::ggml_type_info, the quantized block layouts
//          BlockQ8_0, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_K, BlockQ6_K (ggml's formats)
//
// One definition for host and device code: plain structs of fixed-size arrays, half-precision
// scales kept as their uint16_t bit patterns (no host/device half type needed), sizes asserted so
// that a struct can be laid over the bytes of a GGUF tensor directly.
#pragma once

#include <cstdint>

// Lets the small helpers below be called from CUDA kernels as well as host code.
#if defined(__CUDACC__)
#define TF_QUANT_HOST_DEVICE __host__ __device__
#else
#define TF_QUANT_HOST_DEVICE
#endif

namespace tf {

// ggml's tensor type ids as stored in GGUF tensor infos. Ids 4 and 5 were removed formats and are
// never valid; the list ends at BF16, the newest type this project knows.
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
  BF16 = 30,
};

constexpr int kQK0 = 32;          // elements per block of the 32-element formats (Q8_0, Q4_0, Q4_1)
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
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block is 144 bytes per 256 elements");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block is 176 bytes per 256 elements");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block is 210 bytes per 256 elements");

// Storage geometry of a type: a row of n elements (n a multiple of block_elems) takes
// n / block_elems * block_bytes bytes. `supported` marks the types tightfit can dequantize; the
// others are known only so that errors can name them.
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
    case GgmlType::Q5_0: return {"Q5_0", kQK0, 22, false};
    case GgmlType::Q5_1: return {"Q5_1", kQK0, 24, false};
    case GgmlType::Q8_1: return {"Q8_1", kQK0, 36, false};
    case GgmlType::Q2_K: return {"Q2_K", kQKK, 84, false};
    case GgmlType::Q3_K: return {"Q3_K", kQKK, 110, false};
    case GgmlType::Q8_K: return {"Q8_K", kQKK, 292, false};
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

}  // namespace tf
