// defines: tf::ref::dequantize_weight_tile (any WeightRef dtype to f32, element by element through
//          the per-format reference dequantizers)
#include <vector>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/element.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::ref {
namespace {

// The absmax of NF4 / INT8 block b, through the double quantization when there is one.
float block_absmax(const QuantScales& s, int64_t b) {
  if (!s.nested) return static_cast<const float*>(s.absmax)[b];
  const uint8_t code = static_cast<const uint8_t*>(s.absmax)[b];
  return dynamic_map()[code] * s.nested[b / kNf4NestedBlock] + s.offset;
}

}  // namespace

void dequantize_weight_tile(float* dst, int64_t ld_dst, WeightRef W, int64_t r0, int64_t n_rows, int64_t c0,
                            int64_t n_cols) {
  TF_CHECK(r0 >= 0 && n_rows >= 0 && r0 + n_rows <= W.rows && c0 >= 0 && n_cols >= 0 && c0 + n_cols <= W.cols,
           "dequantize_weight_tile: rows [", r0, ", ", r0 + n_rows, ") x cols [", c0, ", ", c0 + n_cols,
           ") outside a ", W.rows, " x ", W.cols, " weight");
  TF_CHECK(ld_dst >= n_cols, "dequantize_weight_tile: ld_dst ", ld_dst, " < ", n_cols, " columns");
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) {
    TF_CHECK(W.scales.absmax, "dequantize_weight_tile: ", dtype_name(W.dtype), " weight without its absmax");
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t c = 0; c < n_cols; ++c) {
        const int64_t i = (r0 + r) * W.cols + c0 + c;
        const float absmax = block_absmax(W.scales, i / dtype_block_elems(W.dtype));
        float v;
        if (W.dtype == DType::NF4) {
          const uint8_t byte = static_cast<const uint8_t*>(W.data)[i / 2];
          v = kNf4Code[i % 2 == 0 ? byte >> 4 : byte & 0x0F] * absmax;
        } else {
          v = float(static_cast<const int8_t*>(W.data)[i]) * (absmax / 127.0f);
        }
        dst[r * ld_dst + c] = v;
      }
    return;
  }
  if (!is_quantized(W.dtype)) {
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t c = 0; c < n_cols; ++c)
        dst[r * ld_dst + c] = element_f32(W.data, W.dtype, (r0 + r) * W.cols + c0 + c);
    return;
  }
  const int64_t block = dtype_block_elems(W.dtype);
  TF_CHECK(W.cols % block == 0, "dequantize_weight_tile: ", dtype_name(W.dtype), " rows of ", W.cols,
           " elements are not whole blocks of ", block);
  TF_CHECK(c0 % block == 0 && (n_cols % block == 0 || c0 + n_cols == W.cols),
           "dequantize_weight_tile: columns [", c0, ", ", c0 + n_cols, ") of a ", dtype_name(W.dtype),
           " weight do not start and end on blocks of ", block);
  const GgmlType type = *ggml_of_dtype(W.dtype);
  const int64_t row_bytes = dtype_bytes(W.dtype, W.cols);
  std::vector<float> row(static_cast<size_t>(n_cols));
  for (int64_t r = 0; r < n_rows; ++r) {
    const auto* src = static_cast<const uint8_t*>(W.data) + (r0 + r) * row_bytes + dtype_bytes(W.dtype, c0);
    dequantize_rows(type, src, n_cols, row.data());
    for (int64_t c = 0; c < n_cols; ++c) dst[r * ld_dst + c] = row[size_t(c)];
  }
}

}  // namespace tf::ref
