// defines: tf::cpu::dequantize_weight_tile (any WeightRef dtype to f32, row by row in parallel; the
//          same bits as tf::ref::dequantize_weight_tile)
#include <omp.h>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/parallel.h"

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

// The absmax of NF4 / INT8 block b. With double quantization the product is rounded on its own
// before the offset is added, as bitsandbytes does in two tensor operations; the volatile keeps a
// compiler from fusing the two into one FMA with a single rounding.
float block_absmax(const QuantScales& s, int64_t b) {
  if (!s.nested) return static_cast<const float*>(s.absmax)[b];
  const uint8_t code = static_cast<const uint8_t*>(s.absmax)[b];
  const volatile float scaled = ref::dynamic_map()[code] * s.nested[b / kNf4NestedBlock];
  return scaled + s.offset;
}

// Elements [i0, i0 + n) of the flattened NF4 / INT8 tensor, one scale block at a time.
void portable_flat(float* dst, const WeightRef& W, int64_t i0, int64_t n) {
  const int64_t block = dtype_block_elems(W.dtype);
  for (int64_t i = i0; i < i0 + n;) {
    const int64_t b = i / block;
    const int64_t end = std::min(i0 + n, (b + 1) * block);
    const float absmax = block_absmax(W.scales, b);
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

}  // namespace

void dequantize_weight_tile(float* dst, int64_t ld_dst, WeightRef W, int64_t r0, int64_t n_rows, int64_t c0,
                            int64_t n_cols) {
  check_tile(W, ld_dst, r0, n_rows, c0, n_cols);
  // Callers that already split their rows over threads call this inside their parallel region.
#pragma omp parallel for schedule(static) if (n_rows * n_cols >= kMinParallelElems && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) portable_row(dst + r * ld_dst, W, r0 + r, c0, n_cols);
}

}  // namespace tf::cpu
