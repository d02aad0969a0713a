// defines: ggml's reference quantizers of kernels/cpu/ref/quantize_ggml.h
#include "kernels/cpu/ref/quantize_ggml.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "src/core/error.h"

namespace tf::ref {
namespace {

// The value of largest magnitude, the first one on a tie (ggml keeps it with a strict `<`).
float signed_absmax(const float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQK0; ++j)
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  return max;
}

// Codes of a symmetric block (Q4_0, Q5_0): d = max / -half_range, q = min(2 half_range - 1,
// trunc(x / d + half_range + 0.5)).
float symmetric_codes(const float* x, int half_range, uint8_t* q) {
  const float d = signed_absmax(x) / float(-half_range);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < kQK0; ++j)
    q[j] = uint8_t(std::min(2 * half_range - 1, int(int8_t(x[j] * id + (float(half_range) + 0.5f)))));
  return d;
}

// Codes of a block with an offset (Q4_1, Q5_1): d = (max - min) / levels, q = min(levels,
// trunc((x - min) / d + 0.5)); returns d and sets min.
float offset_codes(const float* x, int levels, uint8_t* q, float& min) {
  min = FLT_MAX;
  float max = -FLT_MAX;
  for (int j = 0; j < kQK0; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / float(levels);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < kQK0; ++j) q[j] = uint8_t(std::min(levels, int(int8_t((x[j] - min) * id + 0.5f))));
  return d;
}

// Element j in the low nibble of byte j, element j + 16 in the high one.
void pack_nibbles(const uint8_t* q, uint8_t* qs) {
  for (int j = 0; j < kQK0 / 2; ++j) qs[j] = uint8_t((q[j] & 0x0F) | ((q[j + kQK0 / 2] & 0x0F) << 4));
}

// The fifth bit of element j is bit j of qh, read as a little-endian uint32.
void pack_high_bits(const uint8_t* q, uint8_t* qh) {
  uint32_t bits = 0;
  for (int j = 0; j < kQK0; ++j) bits |= uint32_t((q[j] >> 4) & 1u) << j;
  for (int b = 0; b < 4; ++b) qh[b] = uint8_t(bits >> (8 * b));
}

}  // namespace

std::string quantizable_ggml_type_names() {
  std::string names;
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1})
    names += std::string(names.empty() ? "" : ", ") + ggml_type_info(uint32_t(t)).name;
  return names;
}

void quantize_rows_ggml(GgmlType type, const float* x, int64_t n, void* dst) {
  const GgmlTypeInfo info = ggml_type_info(uint32_t(type));
  TF_CHECK(ggml_quantizable(type), "quantize_rows_ggml: cannot quantize to ", info.name ? info.name : "?",
           "; tightfit quantizes to ", quantizable_ggml_type_names());
  TF_CHECK(n >= 0 && n % kQK0 == 0, "quantize_rows_ggml: ", n, " values are not whole blocks of ", kQK0,
           " for ", info.name);
  for (int64_t i = 0; i < n; ++i)
    TF_CHECK(std::isfinite(x[i]), "quantize_rows_ggml: element ", i, " is not finite (", x[i], ")");
  auto* out = static_cast<uint8_t*>(dst);
  uint8_t q[kQK0];
  for (int64_t b = 0; b < n / kQK0; ++b, x += kQK0, out += info.block_bytes) {
    // Assembled in a struct and copied, since `dst` need not be aligned for one.
    switch (type) {
      case GgmlType::Q8_0: {
        BlockQ8_0 blk;
        float amax = 0.0f;
        for (int j = 0; j < kQK0; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        blk.d = f32_to_f16(d);
        for (int j = 0; j < kQK0; ++j) blk.qs[j] = int8_t(std::round(x[j] * id));
        std::memcpy(out, &blk, sizeof blk);
        break;
      }
      case GgmlType::Q4_0: {
        BlockQ4_0 blk;
        blk.d = f32_to_f16(symmetric_codes(x, 8, q));
        pack_nibbles(q, blk.qs);
        std::memcpy(out, &blk, sizeof blk);
        break;
      }
      case GgmlType::Q5_0: {
        BlockQ5_0 blk;
        blk.d = f32_to_f16(symmetric_codes(x, 16, q));
        pack_high_bits(q, blk.qh);
        pack_nibbles(q, blk.qs);
        std::memcpy(out, &blk, sizeof blk);
        break;
      }
      case GgmlType::Q4_1: {
        BlockQ4_1 blk;
        float min = 0.0f;
        blk.d = f32_to_f16(offset_codes(x, 15, q, min));
        blk.m = f32_to_f16(min);
        pack_nibbles(q, blk.qs);
        std::memcpy(out, &blk, sizeof blk);
        break;
      }
      default: {
        BlockQ5_1 blk;
        float min = 0.0f;
        blk.d = f32_to_f16(offset_codes(x, 31, q, min));
        blk.m = f32_to_f16(min);
        pack_high_bits(q, blk.qh);
        pack_nibbles(q, blk.qs);
        std::memcpy(out, &blk, sizeof blk);
        break;
      }
    }
  }
}

}  // namespace tf::ref
