// defines: tf::ref::element_f32 (one stored f32/bf16/f16 element, widened), tf::widen_to_f32 (a run
// of them, vectorised; used by the fast kernels to turn base-weight rows into f32 a tile at a time)
#pragma once

#include <cstdint>
#include <cstring>

#include "src/core/dtype.h"
#include "src/core/error.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace tf {

namespace ref {

// Element i of a row-major array of f32, bf16 or f16 values, as f32 (exact: both narrow types are
// subsets of f32).
inline float element_f32(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(data)[i]);
    default: break;
  }
  TF_FAIL("expected an f32, bf16 or f16 operand, got ", dtype_name(dtype));
}

}  // namespace ref

// dst[i] = src[i] widened to f32, for i < n. The loops are written so the compiler vectorises
// them: bf16 is the top half of an f32, f16 goes through the F16C conversion where the CPU has it.
inline void widen_to_f32(float* dst, const void* src, DType dtype, int64_t n) {
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, size_t(n) * sizeof(float)); return;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = uint32_t(s[i]) << 16;
        std::memcpy(dst + i, &bits, sizeof(float));
      }
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#if defined(__F16C__)
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
#endif
      for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    default: break;
  }
  TF_FAIL("expected an f32, bf16 or f16 operand, got ", dtype_name(dtype));
}

}  // namespace tf
