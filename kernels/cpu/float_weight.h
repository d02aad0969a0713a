// defines: tf::cpu::with_float_weight (a small f32 / bf16 / f16 weight read through one loader per
//          dtype, for the fast ops that take norms and biases)
#pragma once

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::cpu {

// Calls fn(load) with load(i) returning element i of `w` (which must hold n elements) as f32; one
// instantiation per storage dtype keeps the inner loops free of a per-element switch. `what`
// names the weight in errors ("rmsnorm weight").
template <typename Fn>
void with_float_weight(const char* what, const WeightRef& w, int64_t n, Fn&& fn) {
  TF_CHECK(w.rows * w.cols == n, what, " has ", w.rows, "x", w.cols, " elements, expected ", n);
  switch (w.dtype) {
    case DType::F32: {
      const float* p = static_cast<const float*>(w.data);
      return fn([p](int64_t i) { return p[i]; });
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data);
      return fn([p](int64_t i) { return bf16_to_f32(p[i]); });
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data);
      return fn([p](int64_t i) { return f16_to_f32(p[i]); });
    }
    default: break;
  }
  TF_FAIL(what, " dtype ", dtype_name(w.dtype), " is not a float type (f32, bf16, f16)");
}

}  // namespace tf::cpu
