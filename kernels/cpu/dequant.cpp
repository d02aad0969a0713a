// defines: the reference dequantizers of kernels/cpu/dequant.h, one per GGUF block format
#include "kernels/cpu/dequant.h"

#include <cstring>

#include "src/core/dtype.h"
#include "src/core/error.h"

namespace tf::ref {
namespace {

// Products and sums are separate statements on purpose: a compiler allowed to contract within an
// expression (clang's default) would otherwise fuse d * q - m into an FMA with one rounding instead
// of two, and the results would no longer equal ggml's bit for bit.

void block_q8_0(const BlockQ8_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int j = 0; j < kQK0; ++j) y[j] = float(b.qs[j]) * d;
}

void block_q4_0(const BlockQ4_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int j = 0; j < kQK0 / 2; ++j) {
    y[j] = float((b.qs[j] & 0xF) - 8) * d;
    y[j + kQK0 / 2] = float((b.qs[j] >> 4) - 8) * d;
  }
}

void block_q4_1(const BlockQ4_1& b, float* y) {
  const float d = f16_to_f32(b.d);
  const float m = f16_to_f32(b.m);
  for (int j = 0; j < kQK0 / 2; ++j) {
    const float lo = float(b.qs[j] & 0xF) * d;
    const float hi = float(b.qs[j] >> 4) * d;
    y[j] = lo + m;
    y[j + kQK0 / 2] = hi + m;
  }
}

// A Q5 block's qh as the little-endian 32-bit word whose bit j is element j's fifth bit.
uint32_t q5_high_bits(const uint8_t qh[4]) {
  return uint32_t(qh[0]) | uint32_t(qh[1]) << 8 | uint32_t(qh[2]) << 16 | uint32_t(qh[3]) << 24;
}

void block_q5_0(const BlockQ5_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  const uint32_t qh = q5_high_bits(b.qh);
  for (int j = 0; j < kQK0 / 2; ++j) {
    const int lo = int((b.qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
    const int hi = int((b.qs[j] >> 4) | (((qh >> (j + kQK0 / 2)) & 1) << 4)) - 16;
    y[j] = float(lo) * d;
    y[j + kQK0 / 2] = float(hi) * d;
  }
}

void block_q5_1(const BlockQ5_1& b, float* y) {
  const float d = f16_to_f32(b.d);
  const float m = f16_to_f32(b.m);
  const uint32_t qh = q5_high_bits(b.qh);
  for (int j = 0; j < kQK0 / 2; ++j) {
    const float lo = float((b.qs[j] & 0xF) | (((qh >> j) & 1) << 4)) * d;
    const float hi = float((b.qs[j] >> 4) | (((qh >> (j + kQK0 / 2)) & 1) << 4)) * d;
    y[j] = lo + m;
    y[j + kQK0 / 2] = hi + m;
  }
}

void block_q2_k(const BlockQ2_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  const float dmin = f16_to_f32(b.dmin);
  for (int e = 0; e < kQKK; ++e) {
    const uint8_t sc = b.scales[e / 16];
    const float dl = d * float(sc & 0xF);
    const float ml = dmin * float(sc >> 4);
    const int q = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    const float p = dl * float(q);
    y[e] = p - ml;
  }
}

void block_q3_k(const BlockQ3_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int e = 0; e < kQKK; ++e) {
    const int s = e / 16;
    const int sc =
        ((b.scales[s % 8] >> (4 * (s / 8))) & 0xF) | (((b.scales[8 + s % 4] >> (2 * (s / 4))) & 3) << 4);
    const float dl = d * float(sc - 32);
    const int low = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    const int q = low - (((b.hmask[e % 32] >> (e / 32)) & 1) ? 0 : 4);
    y[e] = dl * float(q);
  }
}

void block_q4_k(const BlockQ4_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  const float dmin = f16_to_f32(b.dmin);
  const uint8_t* q = b.qs;
  for (int s = 0; s < 8; s += 2, q += 32) {
    uint8_t sc0, mn0, sc1, mn1;
    k_scale_min(b.scales, s, sc0, mn0);
    k_scale_min(b.scales, s + 1, sc1, mn1);
    const float d0 = d * float(sc0), m0 = dmin * float(mn0);
    const float d1 = d * float(sc1), m1 = dmin * float(mn1);
    for (int l = 0; l < 32; ++l) {
      const float v = d0 * float(q[l] & 0xF);
      *y++ = v - m0;
    }
    for (int l = 0; l < 32; ++l) {
      const float v = d1 * float(q[l] >> 4);
      *y++ = v - m1;
    }
  }
}

void block_q5_k(const BlockQ5_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  const float dmin = f16_to_f32(b.dmin);
  const uint8_t* q = b.qs;
  uint8_t bit0 = 1, bit1 = 2;
  for (int s = 0; s < 8; s += 2, q += 32, bit0 = uint8_t(bit0 << 2), bit1 = uint8_t(bit1 << 2)) {
    uint8_t sc0, mn0, sc1, mn1;
    k_scale_min(b.scales, s, sc0, mn0);
    k_scale_min(b.scales, s + 1, sc1, mn1);
    const float d0 = d * float(sc0), m0 = dmin * float(mn0);
    const float d1 = d * float(sc1), m1 = dmin * float(mn1);
    for (int l = 0; l < 32; ++l) {
      const int v = (q[l] & 0xF) + ((b.qh[l] & bit0) ? 16 : 0);
      const float p = d0 * float(v);
      *y++ = p - m0;
    }
    for (int l = 0; l < 32; ++l) {
      const int v = (q[l] >> 4) + ((b.qh[l] & bit1) ? 16 : 0);
      const float p = d1 * float(v);
      *y++ = p - m1;
    }
  }
}

void block_q6_k(const BlockQ6_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  // Two halves of 128 elements; in each, byte l of ql (and l + 32) and of qh feed the four
  // elements l, l + 32, l + 64, l + 96.
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b.ql + 64 * half;
    const uint8_t* qh = b.qh + 32 * half;
    const int8_t* sc = b.scales + 8 * half;
    float* out = y + 128 * half;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      out[l] = d * float(sc[is + 0]) * float(q1);
      out[l + 32] = d * float(sc[is + 2]) * float(q2);
      out[l + 64] = d * float(sc[is + 4]) * float(q3);
      out[l + 96] = d * float(sc[is + 6]) * float(q4);
    }
  }
}

template <typename Block, int kElems, void (*kBlockFn)(const Block&, float*)>
void run_blocks(const Block* src, int64_t n, float* dst, const char* name) {
  TF_CHECK(n >= 0 && n % kElems == 0, "dequantize ", name, ": ", n, " elements is not a multiple of ",
           kElems);
  for (int64_t i = 0; i < n / kElems; ++i) kBlockFn(src[i], dst + i * kElems);
}

// Blocks inside a GGUF file need not be aligned for their struct (general.alignment may be 1), so
// each is copied out before it is read.
template <typename Block, int kElems, void (*kBlockFn)(const Block&, float*)>
void run_unaligned(const void* src, int64_t n, float* dst, const char* name) {
  TF_CHECK(n >= 0 && n % kElems == 0, "dequantize ", name, ": ", n, " elements is not a multiple of ",
           kElems);
  const auto* bytes = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n / kElems; ++i) {
    Block b;
    std::memcpy(&b, bytes + i * int64_t(sizeof(Block)), sizeof(Block));
    kBlockFn(b, dst + i * kElems);
  }
}

}  // namespace

void dequantize_q8_0(const BlockQ8_0* src, int64_t n, float* dst) {
  run_blocks<BlockQ8_0, kQK0, block_q8_0>(src, n, dst, "Q8_0");
}
void dequantize_q4_0(const BlockQ4_0* src, int64_t n, float* dst) {
  run_blocks<BlockQ4_0, kQK0, block_q4_0>(src, n, dst, "Q4_0");
}
void dequantize_q4_1(const BlockQ4_1* src, int64_t n, float* dst) {
  run_blocks<BlockQ4_1, kQK0, block_q4_1>(src, n, dst, "Q4_1");
}
void dequantize_q5_0(const BlockQ5_0* src, int64_t n, float* dst) {
  run_blocks<BlockQ5_0, kQK0, block_q5_0>(src, n, dst, "Q5_0");
}
void dequantize_q5_1(const BlockQ5_1* src, int64_t n, float* dst) {
  run_blocks<BlockQ5_1, kQK0, block_q5_1>(src, n, dst, "Q5_1");
}
void dequantize_q2_k(const BlockQ2_K* src, int64_t n, float* dst) {
  run_blocks<BlockQ2_K, kQKK, block_q2_k>(src, n, dst, "Q2_K");
}
void dequantize_q3_k(const BlockQ3_K* src, int64_t n, float* dst) {
  run_blocks<BlockQ3_K, kQKK, block_q3_k>(src, n, dst, "Q3_K");
}
void dequantize_q4_k(const BlockQ4_K* src, int64_t n, float* dst) {
  run_blocks<BlockQ4_K, kQKK, block_q4_k>(src, n, dst, "Q4_K");
}
void dequantize_q5_k(const BlockQ5_K* src, int64_t n, float* dst) {
  run_blocks<BlockQ5_K, kQKK, block_q5_k>(src, n, dst, "Q5_K");
}
void dequantize_q6_k(const BlockQ6_K* src, int64_t n, float* dst) {
  run_blocks<BlockQ6_K, kQKK, block_q6_k>(src, n, dst, "Q6_K");
}

void dequantize_rows(GgmlType type, const void* src, int64_t n, float* dst) {
  TF_CHECK(n >= 0, "dequantize: negative element count ", n);
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case GgmlType::F16:
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        dst[i] = type == GgmlType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
      return;
    case GgmlType::Q8_0: return run_unaligned<BlockQ8_0, kQK0, block_q8_0>(src, n, dst, "Q8_0");
    case GgmlType::Q4_0: return run_unaligned<BlockQ4_0, kQK0, block_q4_0>(src, n, dst, "Q4_0");
    case GgmlType::Q4_1: return run_unaligned<BlockQ4_1, kQK0, block_q4_1>(src, n, dst, "Q4_1");
    case GgmlType::Q5_0: return run_unaligned<BlockQ5_0, kQK0, block_q5_0>(src, n, dst, "Q5_0");
    case GgmlType::Q5_1: return run_unaligned<BlockQ5_1, kQK0, block_q5_1>(src, n, dst, "Q5_1");
    case GgmlType::Q2_K: return run_unaligned<BlockQ2_K, kQKK, block_q2_k>(src, n, dst, "Q2_K");
    case GgmlType::Q3_K: return run_unaligned<BlockQ3_K, kQKK, block_q3_k>(src, n, dst, "Q3_K");
    case GgmlType::Q4_K: return run_unaligned<BlockQ4_K, kQKK, block_q4_k>(src, n, dst, "Q4_K");
    case GgmlType::Q5_K: return run_unaligned<BlockQ5_K, kQKK, block_q5_k>(src, n, dst, "Q5_K");
    case GgmlType::Q6_K: return run_unaligned<BlockQ6_K, kQKK, block_q6_k>(src, n, dst, "Q6_K");
    default: break;
  }
  const GgmlTypeInfo info = ggml_type_info(uint32_t(type));
  TF_FAIL("dequantize: ggml type ", info.name ? info.name : "unknown", " (id ", uint32_t(type),
          ") is not supported");
}

std::string dequantizable_type_names() {
  std::string names;
  for (uint32_t id = 0; id <= uint32_t(GgmlType::MXFP4); ++id) {
    const GgmlTypeInfo info = ggml_type_info(id);
    if (info.supported) names += (names.empty() ? "" : ", ") + std::string(info.name);
  }
  return names;
}

}  // namespace tf::ref
