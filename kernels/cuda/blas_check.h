// defines: tf::blas_check (the argument checks and operand extents both builds of blas::gemm share:
// cuBLASLt in kernels/cuda/blas.cu and the simulator's stand-in in kernels/sim/blas.cpp), so a
// bad call fails with the same message on a GPU as in simulation
#pragma once

#include <cstddef>
#include <cstdint>

#include "src/core/error.h"

namespace tf::blas_check {

template <typename E>
size_t elem_bytes(E type) {
  return type == E::F32 ? 4 : 2;
}

// One stored matrix of a product: rows x width elements, row-major with leading dimension ld,
// repeated `batch` times every `stride` elements.
struct Extent {
  const void* base;
  int64_t rows, width, ld, batch, stride;
  size_t elem;
  // Bytes from base to one past the last element the product touches (0 when empty).
  size_t span_bytes() const {
    if (rows == 0 || width == 0) return 0;
    return size_t((batch - 1) * stride + (rows - 1) * ld + width) * elem;
  }
  // Bytes from the start of one batch's matrix to one past its last element.
  size_t matrix_bytes() const { return rows == 0 || width == 0 ? 0 : size_t((rows - 1) * ld + width) * elem; }
};

template <typename G>
Extent extent_a(const G& g) {
  return {g.a, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda, g.batch, g.stride_a, elem_bytes(g.type)};
}
template <typename G>
Extent extent_b(const G& g) {
  return {g.b, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb, g.batch, g.stride_b, elem_bytes(g.type)};
}
template <typename G>
Extent extent_c(const G& g) {
  return {g.c, g.m, g.n, g.ldc, g.batch, g.stride_c, 4};
}

inline bool overlap(const Extent& x, const Extent& y) {
  const auto x0 = reinterpret_cast<uintptr_t>(x.base), y0 = reinterpret_cast<uintptr_t>(y.base);
  const size_t xn = x.span_bytes(), yn = y.span_bytes();
  return xn && yn && x0 < y0 + yn && y0 < x0 + xn;
}

inline void check_operand(const char* name, const Extent& x) {
  TF_CHECK(x.ld >= (x.width > 1 ? x.width : 1), "blas::gemm: ", name, " has leading dimension ", x.ld,
           " but its stored rows hold ", x.width, " elements");
  TF_CHECK(x.base != nullptr || x.rows == 0 || x.width == 0, "blas::gemm: ", name, " is null");
  TF_CHECK(x.batch == 1 || x.stride >= 0, "blas::gemm: ", name, " has a negative batch stride ", x.stride);
}

// Every check a call must pass before anything runs: sizes, the element type, leading dimensions,
// strides, null operands, and C neither overlapping itself across the batch nor A or B (the
// product would read what it is writing).
template <typename G>
void check_gemm(const G& g) {
  TF_CHECK(g.m >= 0 && g.n >= 0 && g.k >= 0 && g.batch >= 1, "blas::gemm: bad shape m=", g.m, " n=", g.n,
           " k=", g.k, " batch=", g.batch);
  using E = decltype(g.type);
  TF_CHECK(g.type == E::F32 || g.type == E::BF16 || g.type == E::F16, "blas::gemm: element type ",
           int(g.type), " is not f32, bf16 or f16");
  const Extent a = extent_a(g), b = extent_b(g), c = extent_c(g);
  check_operand("C", c);
  if (g.k > 0) {
    check_operand("A", a);
    check_operand("B", b);
  }
  TF_CHECK(g.batch == 1 || g.m == 0 || g.n == 0 || g.stride_c >= int64_t(c.matrix_bytes() / 4),
           "blas::gemm: C's batch stride ", g.stride_c, " is smaller than one ", g.m, " x ", g.n,
           " matrix with leading dimension ", g.ldc, ", so the products would overwrite each other");
  if (g.k > 0) {
    TF_CHECK(!overlap(a, c), "blas::gemm: C overlaps A");
    TF_CHECK(!overlap(b, c), "blas::gemm: C overlaps B");
  }
}

}  // namespace tf::blas_check
