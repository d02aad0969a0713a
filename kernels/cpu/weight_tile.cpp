// defines: tf::cpu::dequantize_weight_tile (any WeightRef dtype to f32, row by row in parallel, by the
//          AVX-512, AVX2 or portable decoders; the same bits as tf::ref::dequantize_weight_tile) and
//          tf::cpu::dequantize_weight_tile_bf16 (those values rounded to bf16)

#include <algorithm>
#include <cstring>

#include "kernels/cpu/avx2_blocks.h"
#include "kernels/cpu/avx512_blocks.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/dequant.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/parallel.h"
#include "src/core/pool.h"

namespace tf::cpu {
namespace {

void check_tile(const WeightRef& W, int64_t ld_dst, int64_t r0, int64_t n_rows, int64_t c0, int64_t n_cols) {
  TF_CHECK(r0 >= 0 && n_rows >= 0 && r0 + n_rows <= W.rows && c0 >= 0 && n_cols >= 0 && c0 + n_cols <= W.cols,
           "dequantize_weight_tile: rows [", r0, ", ", r0 + n_rows, ") x cols [", c0, ", ", c0 + n_cols,
           ") outside a ", W.rows, " x ", W.cols, " weight");
  TF_CHECK(ld_dst >= n_cols, "dequantize_weight_tile: ld_dst ", ld_dst, " < ", n_cols, " columns");
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) {
    TF_CHECK(W.scales.absmax, "dequantize_weight_tile: ", dtype_name(W.dtype), " weight without its absmax");
  } else if (is_quantized(W.dtype)) {
    const int64_t block = dtype_block_elems(W.dtype);
    TF_CHECK(W.cols % block == 0, "dequantize_weight_tile: ", dtype_name(W.dtype), " rows of ", W.cols,
             " elements are not whole blocks of ", block);
    TF_CHECK(c0 % block == 0 && (n_cols % block == 0 || c0 + n_cols == W.cols),
             "dequantize_weight_tile: columns [", c0, ", ", c0 + n_cols, ") of a ", dtype_name(W.dtype),
             " weight do not start and end on blocks of ", block);
  } else {
    TF_CHECK(W.dtype == DType::F32 || W.dtype == DType::BF16 || W.dtype == DType::F16,
             "dequantize_weight_tile: a weight cannot be stored as ", dtype_name(W.dtype));
  }
}

// Elements [i0, i0 + n) of the flattened NF4 / INT8 tensor, one scale block at a time.
void portable_flat(float* dst, const WeightRef& W, int64_t i0, int64_t n) {
  const int64_t block = dtype_block_elems(W.dtype);
  for (int64_t i = i0; i < i0 + n;) {
    const int64_t b = i / block;
    const int64_t end = std::min(i0 + n, (b + 1) * block);
    const float absmax = flat_block_absmax(W.scales, b);
    if (W.dtype == DType::NF4) {
      const auto* codes = static_cast<const uint8_t*>(W.data);
      for (; i < end; ++i) {
        const uint8_t byte = codes[i / 2];
        dst[i - i0] = kNf4Code[i % 2 == 0 ? byte >> 4 : byte & 0x0F] * absmax;
      }
    } else {
      const auto* codes = static_cast<const int8_t*>(W.data);
      const float scale = absmax / 127.0f;
      for (; i < end; ++i) dst[i - i0] = float(codes[i]) * scale;
    }
  }
}

// Columns [c0, c0 + n_cols) of row r.
void portable_row(float* dst, const WeightRef& W, int64_t r, int64_t c0, int64_t n_cols) {
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) return portable_flat(dst, W, r * W.cols + c0, n_cols);
  const auto* src = static_cast<const uint8_t*>(W.data);
  if (W.dtype == DType::F16) {
    const auto* h = reinterpret_cast<const uint16_t*>(src) + r * W.cols + c0;
    for (int64_t c = 0; c < n_cols; ++c) dst[c] = f16_to_f32(h[c]);
    return;
  }
  const GgmlType type = *ggml_of_dtype(W.dtype);
  ref::dequantize_rows(type, src + dtype_bytes(W.dtype, r * W.cols) + dtype_bytes(W.dtype, c0), n_cols, dst);
}

#if defined(TF_HAVE_AVX512_KERNELS)
TF_AVX512_BEGIN

struct StoreSink {
  float* dst;
  void operator()(int j, __m512 v) const { _mm512_storeu_ps(dst + 16 * j, v); }
  void operator()(int64_t o, __m512 v, __mmask16 mask) const { _mm512_mask_storeu_ps(dst + o, mask, v); }
};

template <DType D>
void avx512_blocks(float* dst, const uint8_t* src, int64_t n) {
  constexpr int64_t kElems = dtype_block_elems(D), kBytes = dtype_block_bytes(D);
  for (int64_t b = 0; b < n / kElems; ++b) {
    StoreSink sink{dst + b * kElems};
    avx512::decode_block<D>(src + b * kBytes, sink);
  }
}

void avx512_flat(float* dst, const WeightRef& W, int64_t i0, int64_t n) {
  StoreSink sink{dst};
  avx512::flat_segments(W, i0, i0 + n, sink, [&](int64_t i) { sink.dst = dst + (i - i0); });
}

// bf16 is the top half of an f32. F16C's conversion quiets a signalling NaN that the reference keeps,
// so a run of 16 holding a NaN goes through the reference's conversion.
void avx512_elements(float* dst, const void* src, DType dtype, int64_t n) {
  if (dtype == DType::F32) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
    return;
  }
  const auto* h = static_cast<const uint16_t*>(src);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 mask = __mmask16((1u << (n - c < 16 ? n - c : 16)) - 1);
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, h + c);
    if (dtype == DType::BF16) {
      _mm512_mask_storeu_ps(dst + c, mask,
                            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
      continue;
    }
    const __m512 v = _mm512_cvtph_ps(bits);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) == 0) {
      _mm512_mask_storeu_ps(dst + c, mask, v);
    } else {
      for (int64_t k = c; k < std::min(n, c + 16); ++k) dst[k] = f16_to_f32(h[k]);
    }
  }
}

void avx512_row(float* dst, const WeightRef& W, int64_t r, int64_t c0, int64_t n_cols) {
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) return avx512_flat(dst, W, r * W.cols + c0, n_cols);
  const auto* src =
      static_cast<const uint8_t*>(W.data) + dtype_bytes(W.dtype, r * W.cols) + dtype_bytes(W.dtype, c0);
  switch (W.dtype) {
    case DType::Q4_0: return avx512_blocks<DType::Q4_0>(dst, src, n_cols);
    case DType::Q4_1: return avx512_blocks<DType::Q4_1>(dst, src, n_cols);
    case DType::Q5_0: return avx512_blocks<DType::Q5_0>(dst, src, n_cols);
    case DType::Q5_1: return avx512_blocks<DType::Q5_1>(dst, src, n_cols);
    case DType::Q8_0: return avx512_blocks<DType::Q8_0>(dst, src, n_cols);
    case DType::Q2_K: return avx512_blocks<DType::Q2_K>(dst, src, n_cols);
    case DType::Q3_K: return avx512_blocks<DType::Q3_K>(dst, src, n_cols);
    case DType::Q4_K: return avx512_blocks<DType::Q4_K>(dst, src, n_cols);
    case DType::Q5_K: return avx512_blocks<DType::Q5_K>(dst, src, n_cols);
    case DType::Q6_K: return avx512_blocks<DType::Q6_K>(dst, src, n_cols);
    default: return avx512_elements(dst, src, W.dtype, n_cols);
  }
}

TF_AVX512_END

TF_AVX2_BEGIN

struct StoreSink8 {
  float* dst;
  void operator()(int j, __m256 v) const { _mm256_storeu_ps(dst + 8 * j, v); }
  void one(int64_t o, float v) const { dst[o] = v; }
};

template <DType D>
void avx2_blocks(float* dst, const uint8_t* src, int64_t n) {
  constexpr int64_t kElems = dtype_block_elems(D), kBytes = dtype_block_bytes(D);
  for (int64_t b = 0; b < n / kElems; ++b) {
    StoreSink8 sink{dst + b * kElems};
    avx2::decode_block<D>(src + b * kBytes, sink);
  }
}

// The quantized dtypes by the AVX2 decoders, the element dtypes by the portable loops.
void avx2_row(float* dst, const WeightRef& W, int64_t r, int64_t c0, int64_t n_cols) {
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) {
    StoreSink8 sink{dst};
    const int64_t i0 = r * W.cols + c0;
    return avx2::flat_segments(W, i0, i0 + n_cols, sink, [&](int64_t i) { sink.dst = dst + (i - i0); });
  }
  const auto* src =
      static_cast<const uint8_t*>(W.data) + dtype_bytes(W.dtype, r * W.cols) + dtype_bytes(W.dtype, c0);
  switch (W.dtype) {
    case DType::Q4_0: return avx2_blocks<DType::Q4_0>(dst, src, n_cols);
    case DType::Q4_1: return avx2_blocks<DType::Q4_1>(dst, src, n_cols);
    case DType::Q5_0: return avx2_blocks<DType::Q5_0>(dst, src, n_cols);
    case DType::Q5_1: return avx2_blocks<DType::Q5_1>(dst, src, n_cols);
    case DType::Q8_0: return avx2_blocks<DType::Q8_0>(dst, src, n_cols);
    case DType::Q2_K: return avx2_blocks<DType::Q2_K>(dst, src, n_cols);
    case DType::Q3_K: return avx2_blocks<DType::Q3_K>(dst, src, n_cols);
    case DType::Q4_K: return avx2_blocks<DType::Q4_K>(dst, src, n_cols);
    case DType::Q5_K: return avx2_blocks<DType::Q5_K>(dst, src, n_cols);
    case DType::Q6_K: return avx2_blocks<DType::Q6_K>(dst, src, n_cols);
    default: return portable_row(dst, W, r, c0, n_cols);
  }
}

TF_AVX2_END
#endif  // TF_HAVE_AVX512_KERNELS

enum class Decoders { Avx512, Avx2, Portable };

Decoders decoders() {
  if (use_avx512()) return Decoders::Avx512;
  if (use_avx2()) return Decoders::Avx2;
  return Decoders::Portable;
}

// Columns [c0, c0 + n_cols) of row r as f32, by the decoders `d` names.
void decode_row(float* dst, const WeightRef& W, int64_t r, int64_t c0, int64_t n_cols, Decoders d) {
#if defined(TF_HAVE_AVX512_KERNELS)
  if (d == Decoders::Avx512) return avx512_row(dst, W, r, c0, n_cols);
  if (d == Decoders::Avx2) return avx2_row(dst, W, r, c0, n_cols);
#endif
  (void)d;
  portable_row(dst, W, r, c0, n_cols);
}

// A bf16 tile's row is decoded to f32 this many columns at a time (a multiple of every block, so each
// run starts on a block) and rounded from the stack, in cache.
constexpr int64_t kBf16Run = 256;

}  // namespace

void dequantize_weight_tile(float* dst, int64_t ld_dst, WeightRef W, int64_t r0, int64_t n_rows, int64_t c0,
                            int64_t n_cols) {
  check_tile(W, ld_dst, r0, n_rows, c0, n_cols);
  const Decoders how = decoders();
  // Callers that already split their rows over threads call this inside their parallel region.
  parallel_for_if(n_rows * n_cols >= kMinParallelElems && !in_parallel_work(), n_rows,
                  [&](int64_t r) { decode_row(dst + r * ld_dst, W, r0 + r, c0, n_cols, how); });
}

void dequantize_weight_tile_bf16(uint16_t* dst, int64_t ld_dst, WeightRef W, int64_t r0, int64_t n_rows,
                                 int64_t c0, int64_t n_cols) {
  check_tile(W, ld_dst, r0, n_rows, c0, n_cols);
  const Decoders how = decoders();
  parallel_for_if(n_rows * n_cols >= kMinParallelElems && !in_parallel_work(), n_rows, [&](int64_t r) {
    uint16_t* out = dst + r * ld_dst;
    if (W.dtype == DType::BF16) {
      std::memcpy(out, static_cast<const uint16_t*>(W.data) + (r0 + r) * W.cols + c0, size_t(n_cols) * 2);
      return;
    }
    float run[kBf16Run];
    for (int64_t c = 0; c < n_cols; c += kBf16Run) {
      const int64_t n = std::min(kBf16Run, n_cols - c);
      decode_row(run, W, r0 + r, c0 + c, n, how);
      round_to_bf16(out + c, run, n);
    }
  });
}

}  // namespace tf::cpu
