// Tests: tf::cpu rmsnorm against the reference (f32, bf16 and f16 weights, awkward shapes), the
// reference backward against float64 finite differences, accumulation, determinism of d_weight
// across thread counts, bad weights.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "kernels/cpu/ref/rmsnorm.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::random_floats;
using test::rel_norm_error;

// Floor for the bounds when the naive f32 error happens to be tiny: a few f32 ulps (4 * 2^-24)
// of relative norm error is what any change of summation order gives.
constexpr double kF32Floor = 4 * 5.96e-8;

// A weight in one storage dtype plus its exact f32 values (bf16 and f16 widen exactly).
struct Weight {
  std::vector<float> f32;
  std::vector<uint16_t> half;
  WeightRef ref;
};

Weight make_weight(int64_t dim, DType dtype, uint64_t seed) {
  Weight w;
  // Around 1, as trained norm weights are, with enough spread to matter.
  w.f32 = random_floats(size_t(dim), seed, 0.5f);
  for (float& x : w.f32) x += 1.0f;
  if (dtype != DType::F32) {
    w.half.resize(w.f32.size());
    for (size_t i = 0; i < w.f32.size(); ++i) {
      w.half[i] = dtype == DType::BF16 ? f32_to_bf16(w.f32[i]) : f32_to_f16(w.f32[i]);
      w.f32[i] = dtype == DType::BF16 ? bf16_to_f32(w.half[i]) : f16_to_f32(w.half[i]);
    }
  }
  w.ref = {dtype == DType::F32 ? static_cast<const void*>(w.f32.data()) : w.half.data(), dtype, 1, dim};
  return w;
}

// The fast version sums squares and the backward's dot product with a different order (SIMD
// lanes) than the naive loop; each adds a relative error of order dim * 2^-24 at worst and far
// less on average, as the naive f32 version's does. Bounded by 4x the naive f32 error against
// float64 (or kF32Floor); a wrong formula is off by order 1.
TEST(RmsNorm, FastMatchesReference) {
  const float eps = 1e-5f;
  for (const DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    for (const int64_t rows : {1, 7, 33, 100}) {
      for (const int64_t dim : {1, 32, 80, 1000}) {
        const Weight w = make_weight(dim, dtype, 3);
        const size_t n = size_t(rows * dim);
        const std::vector<float> x = random_floats(n, 1, 3.0f), g = random_floats(n, 2);
        std::vector<float> out(n), rstd(static_cast<size_t>(rows)), dx(n), dw(static_cast<size_t>(dim));
        cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.ref, rows, dim, eps);
        cpu::rmsnorm_backward(dx.data(), dw.data(), g.data(), x.data(), w.ref, rstd.data(), rows, dim);

        const std::vector<double> xd = test::to_double(x), gd = test::to_double(g),
                                  wd = test::to_double(w.f32);
        std::vector<double> out64(n), rstd64(static_cast<size_t>(rows)), dx64(n),
            dw64(static_cast<size_t>(dim));
        ref::rmsnorm_forward<double>(out64.data(), rstd64.data(), xd.data(), wd.data(), rows, dim, eps);
        ref::rmsnorm_backward<double>(dx64.data(), dw64.data(), gd.data(), xd.data(), wd.data(),
                                      rstd64.data(), rows, dim);
        std::vector<float> out32(n), rstd32(static_cast<size_t>(rows)), dx32(n),
            dw32(static_cast<size_t>(dim));
        ref::rmsnorm_forward(out32.data(), rstd32.data(), x.data(), w.ref, rows, dim, eps);
        ref::rmsnorm_backward(dx32.data(), dw32.data(), g.data(), x.data(), w.ref, rstd32.data(), rows, dim);

        auto check = [&](const char* what, const std::vector<float>& got, const std::vector<float>& naive,
                         const std::vector<double>& want) {
          const double err = rel_norm_error(got, want), naive_err = rel_norm_error(naive, want);
          EXPECT_LE(err, 4 * std::max(naive_err, kF32Floor))
              << what << " " << dtype_name(dtype) << " rows " << rows << " dim " << dim << ": fast " << err
              << ", naive " << naive_err;
        };
        check("out", out, out32, out64);
        check("rstd", rstd, rstd32, rstd64);
        check("dx", dx, dx32, dx64);
        check("d_weight", dw, dw32, dw64);
      }
    }
  }
}

// HF LlamaRMSNorm on an f32 input is (x * rsqrt(mean(x^2) + eps)) * weight, all in f32: for a
// row where that arithmetic is exact (x = 2 everywhere, eps 0: mean 4, rsqrt 0.5), the output is
// exactly weight.
TEST(RmsNorm, MatchesHfFormulaOnExactRow) {
  const int64_t dim = 48;
  const Weight w = make_weight(dim, DType::BF16, 9);
  const std::vector<float> x(size_t(dim), 2.0f);
  std::vector<float> out(static_cast<size_t>(dim)), rstd(1);
  cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.ref, 1, dim, 0.0f);
  EXPECT_EQ(rstd[0], 0.5f);
  for (size_t i = 0; i < size_t(dim); ++i) EXPECT_EQ(out[i], w.f32[i]) << i;
}

// Backward accumulates into dx and d_weight, and a null d_weight is allowed: one f32 addition per
// element, so start + gradient to within an ulp of the operands (2^-23 of |start| + |gradient|).
TEST(RmsNorm, BackwardAccumulates) {
  const int64_t rows = 9, dim = 40;
  const Weight w = make_weight(dim, DType::F32, 4);
  const size_t n = size_t(rows * dim);
  const std::vector<float> x = random_floats(n, 5), g = random_floats(n, 6);
  std::vector<float> out(n), rstd(static_cast<size_t>(rows));
  cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.ref, rows, dim, 1e-6f);
  std::vector<float> dx(n), dw(static_cast<size_t>(dim));
  cpu::rmsnorm_backward(dx.data(), dw.data(), g.data(), x.data(), w.ref, rstd.data(), rows, dim);
  const std::vector<float> dx0 = random_floats(n, 7), dw0 = random_floats(size_t(dim), 8);
  std::vector<float> dx_acc = dx0, dw_acc = dw0;
  cpu::rmsnorm_backward(dx_acc.data(), dw_acc.data(), g.data(), x.data(), w.ref, rstd.data(), rows, dim);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(dx_acc[i], dx0[i] + dx[i], 1.2e-7 * (std::abs(dx0[i]) + std::abs(dx[i]))) << i;
  }
  for (size_t i = 0; i < size_t(dim); ++i) {
    ASSERT_NEAR(dw_acc[i], dw0[i] + dw[i], 1.2e-7 * (std::abs(dw0[i]) + std::abs(dw[i]))) << i;
  }
  std::vector<float> dx_only = dx0;
  cpu::rmsnorm_backward(dx_only.data(), nullptr, g.data(), x.data(), w.ref, rstd.data(), rows, dim);
  EXPECT_EQ(dx_only, dx_acc);
}

// d_weight is reduced over rows by column blocks, each summed in row order by one thread.
TEST(RmsNorm, WeightGradientBitIdenticalAcrossThreadCounts) {
  const int64_t rows = 300, dim = 200;
  const Weight w = make_weight(dim, DType::F32, 4);
  const size_t n = size_t(rows * dim);
  const std::vector<float> x = random_floats(n, 5), g = random_floats(n, 6);
  std::vector<float> out(n), rstd(static_cast<size_t>(rows));
  cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.ref, rows, dim, 1e-6f);
  const int saved = omp_get_max_threads();
  std::vector<float> first;
  for (const int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> dx(n), dw(static_cast<size_t>(dim));
    cpu::rmsnorm_backward(dx.data(), dw.data(), g.data(), x.data(), w.ref, rstd.data(), rows, dim);
    if (first.empty()) first = dw;
    EXPECT_EQ(0, std::memcmp(first.data(), dw.data(), dw.size() * sizeof(float))) << threads;
  }
  omp_set_num_threads(saved);
}

// The double-precision reference backward against central differences of the double-precision
// reference forward, for L = sum(out * W). The differences are accurate to about 1e-10 relative;
// 1e-7 is far above that and far below the error of any wrong term.
TEST(RmsNorm, ReferenceBackwardMatchesFiniteDifferences) {
  const int64_t rows = 3, dim = 5;
  const double eps = 1e-5;
  std::vector<double> x = test::to_double(random_floats(size_t(rows * dim), 11, 2.0f));
  std::vector<double> w = test::to_double(random_floats(size_t(dim), 12));
  const std::vector<double> g = test::to_double(random_floats(size_t(rows * dim), 13));
  std::vector<double> out(x.size()), rstd(static_cast<size_t>(rows));
  auto loss = [&] {
    ref::rmsnorm_forward<double>(out.data(), rstd.data(), x.data(), w.data(), rows, dim, eps);
    double l = 0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * g[i];
    return l;
  };
  loss();
  std::vector<double> dx(x.size()), dw(w.size());
  ref::rmsnorm_backward<double>(dx.data(), dw.data(), g.data(), x.data(), w.data(), rstd.data(), rows, dim);
  EXPECT_LT(rel_norm_error(dx, test::numeric_gradient(x, loss)), 1e-7);
  EXPECT_LT(rel_norm_error(dw, test::numeric_gradient(w, loss)), 1e-7);
}

TEST(RmsNorm, RejectsBadWeights) {
  std::vector<float> x(8, 1.0f), out(8), rstd(1);
  const std::vector<int32_t> ints(8, 1);
  EXPECT_THROW(cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(),
                                    WeightRef{ints.data(), DType::I32, 1, 8}, 1, 8, 1e-6f),
               Error);
  EXPECT_THROW(cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), WeightRef{x.data(), DType::F32, 1, 7},
                                    1, 8, 1e-6f),
               Error);
}

}  // namespace
}  // namespace tf
