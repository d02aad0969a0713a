// Tests: tf::cpu::matmul / matmul_backward against tf::ref (f32, bf16, f16 operands, all transpose
// combinations, padded leading dimensions, alpha / beta), the reference backward against float64
// finite differences, bad operands, and tf::cpu::set_num_threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/ref/matmul.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;
using tf::test::rel_norm_error;

namespace {

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();

// f32 tolerance for a length-K dot product against the reference, which sums in double and rounds
// once. Rounding errors of the K products and partial sums add like a random walk, so the relative
// norm error of C grows as sqrt(K) * eps, plus one eps for rounding alpha * sum + beta * C
// (measured: 5-10x below this bound). Narrow operands add nothing: bf16 and f16 widen exactly.
double gemm_tolerance(int64_t K) {
  return (std::sqrt(double(K)) + 1.0) * kEpsF32;
}

// A stored operand in one dtype, with its f32 values kept for building the reference.
struct StoredMatrix {
  std::vector<float> values;
  std::vector<uint16_t> narrow;
  DType dtype = DType::F32;
  int64_t ld = 0;

  StoredMatrix(int64_t rows, int64_t cols, int64_t pad, DType dt, uint64_t seed) : dtype(dt), ld(cols + pad) {
    values = random_floats(size_t(rows * ld), seed);
    if (dt == DType::F32) return;
    narrow.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      narrow[i] = dt == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
      values[i] = dt == DType::BF16 ? bf16_to_f32(narrow[i]) : f16_to_f32(narrow[i]);
    }
  }
  MatOperand operand(bool trans) const {
    const void* data = dtype == DType::F32 ? static_cast<const void*>(values.data()) : narrow.data();
    return MatOperand{data, dtype, ld, trans};
  }
};

struct GemmCase {
  int64_t M, N, K;
  bool trans_a, trans_b;
  DType a_dtype, b_dtype;
  int64_t pad;  // added to every leading dimension
  float alpha, beta;
};

std::string describe(const GemmCase& c) {
  return "M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) +
         " ta=" + std::to_string(c.trans_a) + " tb=" + std::to_string(c.trans_b) +
         " A=" + std::string(dtype_name(c.a_dtype)) + " B=" + std::string(dtype_name(c.b_dtype)) +
         " pad=" + std::to_string(c.pad) + " alpha=" + std::to_string(c.alpha) +
         " beta=" + std::to_string(c.beta);
}

void check_fast_matches_reference(const GemmCase& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const StoredMatrix a(c.trans_a ? c.K : c.M, c.trans_a ? c.M : c.K, c.pad, c.a_dtype, seed);
  const StoredMatrix b(c.trans_b ? c.N : c.K, c.trans_b ? c.K : c.N, c.pad, c.b_dtype, seed + 1);
  const int64_t ldc = c.N + c.pad;
  // With beta == 0 the old C must not be read: NaN there would poison the result.
  std::vector<float> c_init = c.beta == 0.0f ? std::vector<float>(size_t(c.M * ldc), std::nanf(""))
                                             : random_floats(size_t(c.M * ldc), seed + 2);
  std::vector<float> fast = c_init, want = c_init;
  cpu::matmul(fast.data(), ldc, a.operand(c.trans_a), b.operand(c.trans_b), c.M, c.N, c.K, c.alpha, c.beta);
  ref::matmul(want.data(), ldc, a.operand(c.trans_a), b.operand(c.trans_b), c.M, c.N, c.K, c.alpha, c.beta);
  std::vector<float> got_valid, want_valid;
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      const size_t at = size_t(i * ldc + j);
      if (j < c.N) {
        got_valid.push_back(fast[at]);
        want_valid.push_back(want[at]);
      } else {
        // The padding between rows of C belongs to someone else.
        ASSERT_TRUE(std::memcmp(&fast[at], &c_init[at], sizeof(float)) == 0)
            << "padding written at " << i << "," << j;
      }
    }
  }
  EXPECT_LE(rel_norm_error(got_valid, want_valid), gemm_tolerance(c.K));
}

TEST(Matmul, FastMatchesReferenceAcrossShapesTransposesAndDtypes) {
  // Shapes mix 1, 7, 33, 100 and 1025: single rows/columns, sizes off SIMD multiples, and (1025)
  // sizes that split a widened bf16/f16 operand into several tiles along N or K.
  const int64_t shapes[][3] = {{1, 1, 1},      {7, 33, 100},   {33, 7, 1025},
                               {100, 1025, 7}, {1, 1025, 100}, {7, 1025, 1025}};
  const DType b_dtypes[] = {DType::F32, DType::BF16, DType::F16};
  uint64_t seed = 1;
  for (const auto& s : shapes) {
    for (int t = 0; t < 4; ++t) {
      for (DType bd : b_dtypes) {
        GemmCase c{s[0], s[1], s[2], bool(t & 1), bool(t & 2), DType::F32, bd, 0, 1.0f, 0.0f};
        check_fast_matches_reference(c, seed++);
      }
    }
  }
}

TEST(Matmul, NarrowLeftOperandAndBothNarrow) {
  const DType dts[] = {DType::BF16, DType::F16};
  uint64_t seed = 100;
  for (int t = 0; t < 4; ++t) {
    for (DType ad : dts) {
      check_fast_matches_reference({1025, 7, 1025, bool(t & 1), bool(t & 2), ad, DType::F32, 0, 1.0f, 0.0f},
                                   seed++);
      check_fast_matches_reference({33, 1025, 100, bool(t & 1), bool(t & 2), ad, DType::BF16, 0, 1.0f, 0.0f},
                                   seed++);
    }
  }
}

TEST(Matmul, PaddedLeadingDimensionsAlphaBeta) {
  uint64_t seed = 200;
  for (int t = 0; t < 4; ++t) {
    for (DType bd : {DType::F32, DType::BF16}) {
      check_fast_matches_reference({33, 100, 1025, bool(t & 1), bool(t & 2), DType::F32, bd, 5, 1.5f, 0.5f},
                                   seed++);
      // N = K = 1025 splits an untransposed bf16 B along K: beta must apply to the first chunk only.
      check_fast_matches_reference(
          {7, 1025, 1025, bool(t & 1), bool(t & 2), DType::F32, bd, 3, -0.25f, 0.75f}, seed++);
    }
  }
}

TEST(Matmul, EmptyInnerDimensionScalesC) {
  std::vector<float> c = {1.0f, 2.0f, 3.0f, 4.0f};
  const float dummy = 0.0f;
  cpu::matmul(c.data(), 2, {&dummy, DType::F32, 1, false}, {&dummy, DType::F32, 2, false}, 2, 2, 0, 1.0f,
              0.5f);
  EXPECT_EQ(c, (std::vector<float>{0.5f, 1.0f, 1.5f, 2.0f}));
}

TEST(Matmul, RejectsBadOperands) {
  std::vector<float> a(64), b(64), c(64);
  // lda 3 < K = 4 for an untransposed A.
  EXPECT_THROW(cpu::matmul(c.data(), 4, {a.data(), DType::F32, 3, false}, {b.data(), DType::F32, 4, false}, 4,
                           4, 4, 1.0f, 0.0f),
               Error);
  // ldb 2 < K = 4 for a transposed B [N, K].
  EXPECT_THROW(cpu::matmul(c.data(), 4, {a.data(), DType::F32, 4, false}, {b.data(), DType::BF16, 2, true}, 4,
                           4, 4, 1.0f, 0.0f),
               Error);
  EXPECT_THROW(cpu::matmul(c.data(), 4, {a.data(), DType::I32, 4, false}, {b.data(), DType::F32, 4, false}, 4,
                           4, 4, 1.0f, 0.0f),
               Error);
  EXPECT_THROW(cpu::matmul(c.data(), 3, {a.data(), DType::F32, 4, false}, {b.data(), DType::F32, 4, false}, 4,
                           4, 4, 1.0f, 0.0f),
               Error);
}

// op(X)[r, c] of a double matrix stored with leading dimension ld.
struct DoubleReader {
  const std::vector<double>* x;
  int64_t ld;
  bool trans;
  double operator()(int64_t r, int64_t c) const { return (*x)[size_t(trans ? c * ld + r : r * ld + c)]; }
};

TEST(MatmulBackward, ReferenceMatchesFiniteDifferences) {
  const int64_t M = 7, N = 9, K = 5, pad = 2;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    SCOPED_TRACE("ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
    const int64_t lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    std::vector<double> a = test::to_double(random_floats(size_t((ta ? K : M) * lda), 11 + t));
    std::vector<double> b = test::to_double(random_floats(size_t((tb ? N : K) * ldb), 21 + t));
    const std::vector<double> g = test::to_double(random_floats(size_t(M * ldc), 31 + t));
    // L = sum_ij G_ij C_ij, so dL/dA and dL/dB are exactly the backward's outputs for dC = G.
    const auto loss = [&] {
      std::vector<double> c(size_t(M * ldc), 0.0);
      ref::matmul_loops(c.data(), ldc, DoubleReader{&a, lda, ta}, DoubleReader{&b, ldb, tb}, M, N, K, 1.0,
                        0.0);
      double l = 0;
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) l += g[size_t(i * ldc + j)] * c[size_t(i * ldc + j)];
      }
      return l;
    };
    std::vector<double> da(a.size(), 0.0), db(b.size(), 0.0);
    ref::matmul_backward_loops(da.data(), lda, ta, db.data(), ldb, tb, g.data(), ldc,
                               DoubleReader{&a, lda, ta}, DoubleReader{&b, ldb, tb}, M, N, K);
    // L is bilinear, so central differences are exact up to rounding: ~1e-16 * |L| / h = 1e-10
    // relative (padding entries have zero gradient on both sides).
    EXPECT_LE(rel_norm_error(da, test::numeric_gradient(a, loss)), 1e-8);
    EXPECT_LE(rel_norm_error(db, test::numeric_gradient(b, loss)), 1e-8);
  }
}

TEST(MatmulBackward, FastMatchesReference) {
  // (M, N, K) as in a linear layer's backward: tokens x out x in, with odd sizes.
  const int64_t M = 33, N = 100, K = 1025;
  uint64_t seed = 300;
  for (int t = 0; t < 4; ++t) {
    for (DType bd : {DType::F32, DType::BF16}) {
      const bool ta = t & 1, tb = t & 2;
      SCOPED_TRACE("ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) +
                   " B=" + std::string(dtype_name(bd)));
      const int64_t pad = 3;
      const StoredMatrix a(ta ? K : M, ta ? M : K, pad, DType::F32, seed++);
      const StoredMatrix b(tb ? N : K, tb ? K : N, pad, bd, seed++);
      const int64_t ldc = N + pad;
      const std::vector<float> dc = random_floats(size_t(M * ldc), seed++);
      // Start from nonzero gradients: backward accumulates.
      const std::vector<float> da0 = random_floats(a.values.size(), seed++);
      const std::vector<float> db0 = random_floats(b.values.size(), seed++);
      std::vector<float> da_fast = da0, db_fast = db0, da_ref = da0, db_ref = db0;
      cpu::matmul_backward(da_fast.data(), db_fast.data(), dc.data(), ldc, a.operand(ta), b.operand(tb), M, N,
                           K);
      ref::matmul_backward(da_ref.data(), db_ref.data(), dc.data(), ldc, a.operand(ta), b.operand(tb), M, N,
                           K);
      // dA sums over N, dB over M: the same sqrt(length) * eps argument as the forward.
      EXPECT_LE(rel_norm_error(da_fast, da_ref), gemm_tolerance(N));
      EXPECT_LE(rel_norm_error(db_fast, db_ref), gemm_tolerance(M));
      // Only dA requested (frozen base weight): dB's buffer is not needed.
      std::vector<float> da_only = da0;
      cpu::matmul_backward(da_only.data(), nullptr, dc.data(), ldc, a.operand(ta), b.operand(tb), M, N, K);
      EXPECT_EQ(da_only, da_fast);
    }
  }
}

TEST(Threads, SetsOpenMPCountAndRejectsNegative) {
  const int before = cpu::num_threads();
  cpu::set_num_threads(1);
  EXPECT_EQ(cpu::num_threads(), 1);
  cpu::set_num_threads(0);
  EXPECT_EQ(cpu::num_threads(), omp_get_num_procs());
  EXPECT_THROW(cpu::set_num_threads(-1), Error);
  cpu::set_num_threads(before);
}

}  // namespace
