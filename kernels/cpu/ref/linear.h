// defines: tf::ref::check_linear (the argument checks every backend's linear_forward and
// linear_backward_input make before touching an output)
#pragma once

#include <climits>
#include <cstdint>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::ref {

// `op` names the caller in the message. `out` and `in` are the activation arrays, [n_tokens,
// W.rows] and [n_tokens, W.cols] when `forward`, the other way round otherwise: the pointers are
// all there is to check of them, the weight carries the shape.
inline void check_linear(const char* op, const float* out, const float* in, const WeightRef& W,
                         int64_t n_tokens, bool forward) {
  TF_CHECK(n_tokens >= 0 && W.rows >= 0 && W.cols >= 0 && n_tokens <= INT_MAX && W.rows <= INT_MAX &&
               W.cols <= INT_MAX,
           op, ": bad shape: ", n_tokens, " tokens through a ", W.rows, " x ", W.cols, " weight");
  TF_CHECK(W.dtype != DType::I32, op, ": a weight cannot be stored as ", dtype_name(W.dtype));
  TF_CHECK(W.data != nullptr || W.rows == 0 || W.cols == 0, op, ": the ", W.rows, " x ", W.cols, " ",
           dtype_name(W.dtype), " weight is null");
  const int64_t out_width = forward ? W.rows : W.cols, in_width = forward ? W.cols : W.rows;
  TF_CHECK(out != nullptr || n_tokens == 0 || out_width == 0, op, ": null output for ", n_tokens, " tokens");
  TF_CHECK(in != nullptr || n_tokens == 0 || in_width == 0, op, ": null input for ", n_tokens, " tokens");
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) {
    TF_CHECK(W.scales.absmax != nullptr || W.rows == 0 || W.cols == 0, op, ": ", dtype_name(W.dtype),
             " weight without its absmax");
  } else if (is_quantized(W.dtype)) {
    TF_CHECK(W.cols % dtype_block_elems(W.dtype) == 0, op, ": ", dtype_name(W.dtype), " weight rows of ",
             W.cols, " elements are not whole blocks of ", dtype_block_elems(W.dtype));
  }
}

}  // namespace tf::ref
