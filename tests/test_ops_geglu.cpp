// Tests: tf::cpu geglu against the reference, saturation without NaN, accumulation, and the
// reference backward against float64 finite differences and against torch's gelu(approximate="tanh").
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/ref/geglu.h"
#include "kernels/ops.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::random_floats;
using test::rel_norm_error;

// Floor for the bounds when the naive f32 error happens to be tiny: a few f32 ulps (4 * 2^-24).
constexpr double kF32Floor = 4 * 5.96e-8;

// Elementwise: the fast and naive f32 versions round the same handful of operations (a tanh, the
// cubic, a few products and sums), possibly contracted into FMAs differently. 4x the naive f32 error
// against float64 (or kF32Floor) covers that; a wrong formula is off by order 1. Sizes include the
// parallel path (>= 32k elements) and gates in [-12, 12), deep into both saturated tails.
TEST(GeGlu, FastMatchesReference) {
  for (const int64_t n : {1, 7, 33, 100, 100003}) {
    const std::vector<float> gate = random_floats(size_t(n), 1, 12.0f),
                             up = random_floats(size_t(n), 2, 2.0f), g = random_floats(size_t(n), 3);
    std::vector<float> out(static_cast<size_t>(n)), d_gate(static_cast<size_t>(n)),
        d_up(static_cast<size_t>(n));
    cpu::geglu_forward(out.data(), gate.data(), up.data(), n);
    cpu::geglu_backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);

    const std::vector<double> gate64 = test::to_double(gate), up64 = test::to_double(up),
                              g64 = test::to_double(g);
    std::vector<double> out64(static_cast<size_t>(n)), d_gate64(static_cast<size_t>(n)),
        d_up64(static_cast<size_t>(n));
    ref::geglu_forward<double>(out64.data(), gate64.data(), up64.data(), n);
    ref::geglu_backward<double>(d_gate64.data(), d_up64.data(), g64.data(), gate64.data(), up64.data(), n);
    std::vector<float> out32(static_cast<size_t>(n)), d_gate32(static_cast<size_t>(n)),
        d_up32(static_cast<size_t>(n));
    ref::geglu_forward(out32.data(), gate.data(), up.data(), n);
    ref::geglu_backward(d_gate32.data(), d_up32.data(), g.data(), gate.data(), up.data(), n);

    auto check = [&](const char* what, const std::vector<float>& got, const std::vector<float>& naive,
                     const std::vector<double>& want) {
      const double err = rel_norm_error(got, want), naive_err = rel_norm_error(naive, want);
      EXPECT_LE(err, 4 * std::max(naive_err, kF32Floor))
          << what << " n " << n << ": fast " << err << ", naive " << naive_err;
    };
    check("out", out, out32, out64);
    check("d_gate", d_gate, d_gate32, d_gate64);
    check("d_up", d_up, d_up32, d_up64);
  }
}

// torch.nn.functional.gelu(x, approximate="tanh") in float64 at a few points (printed by torch
// 2.15): the formula's constants are transformers' gelu_pytorch_tanh.
TEST(GeGlu, ReferenceIsTorchsTanhGelu) {
  const double x[] = {-3.0, -1.0, -0.25, 0.5, 2.0};
  const double want[] = {-0.0036373920817729943, -0.15880800939172324, -0.100324649298315,
                         0.34571400982514394, 1.954597694087775};
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(ref::gelu_tanh(x[i]), want[i], 1e-15) << x[i];
}

// tanh saturates to +-1 for large |x| (the cubic overflows nothing below 1e12): gelu must become
// 0 and x, with derivatives 0 and 1, never NaN.
TEST(GeGlu, SaturatesWithoutNaN) {
  const std::vector<float> gate = {-1000.0f, -100.0f, 0.0f, 100.0f, 1000.0f};
  const std::vector<float> up(gate.size(), 1.5f), g(gate.size(), 1.0f);
  std::vector<float> out(gate.size()), d_gate(gate.size()), d_up(gate.size());
  const int64_t n = int64_t(gate.size());
  cpu::geglu_forward(out.data(), gate.data(), up.data(), n);
  cpu::geglu_backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);
  const std::vector<float> want_out = {0.0f, 0.0f, 0.0f, 150.0f, 1500.0f};
  const std::vector<float> want_d_gate = {0.0f, 0.0f, 0.75f, 1.5f, 1.5f};
  const std::vector<float> want_d_up = {0.0f, 0.0f, 0.0f, 100.0f, 1000.0f};
  for (size_t i = 0; i < gate.size(); ++i) {
    // Exact: tanh of an argument past 9 is 1 in f32, so 1 - t^2 is 0, and every product is exact.
    EXPECT_EQ(out[i], want_out[i]) << gate[i];
    EXPECT_EQ(d_gate[i], want_d_gate[i]) << gate[i];
    EXPECT_EQ(d_up[i], want_d_up[i]) << gate[i];
  }
}

// Backward accumulates: start + gradient, one f32 addition per element, so within an ulp of the
// operands (2^-23 of |start| + |gradient|).
TEST(GeGlu, BackwardAccumulates) {
  const int64_t n = 50;
  const std::vector<float> gate = random_floats(size_t(n), 1, 4.0f), up = random_floats(size_t(n), 2),
                           g = random_floats(size_t(n), 3);
  std::vector<float> d_gate(static_cast<size_t>(n)), d_up(static_cast<size_t>(n));
  cpu::geglu_backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);
  const std::vector<float> dg0 = random_floats(size_t(n), 4), du0 = random_floats(size_t(n), 5);
  std::vector<float> dg = dg0, du = du0;
  cpu::geglu_backward(dg.data(), du.data(), g.data(), gate.data(), up.data(), n);
  for (size_t i = 0; i < size_t(n); ++i) {
    EXPECT_NEAR(dg[i], dg0[i] + d_gate[i], 1.2e-7 * (std::abs(dg0[i]) + std::abs(d_gate[i]))) << i;
    EXPECT_NEAR(du[i], du0[i] + d_up[i], 1.2e-7 * (std::abs(du0[i]) + std::abs(d_up[i]))) << i;
  }
}

// L = sum(out * W) in double. Central differences are accurate to about 1e-10 relative; 1e-7 is
// far above that and far below the error of any wrong term.
TEST(GeGlu, ReferenceBackwardMatchesFiniteDifferences) {
  const int64_t n = 12;
  std::vector<double> gate = test::to_double(random_floats(size_t(n), 1, 4.0f));
  std::vector<double> up = test::to_double(random_floats(size_t(n), 2));
  const std::vector<double> w = test::to_double(random_floats(size_t(n), 3));
  auto loss = [&] {
    std::vector<double> out(static_cast<size_t>(n));
    ref::geglu_forward<double>(out.data(), gate.data(), up.data(), n);
    double l = 0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * w[i];
    return l;
  };
  std::vector<double> d_gate(static_cast<size_t>(n)), d_up(static_cast<size_t>(n));
  ref::geglu_backward<double>(d_gate.data(), d_up.data(), w.data(), gate.data(), up.data(), n);
  EXPECT_LT(rel_norm_error(d_gate, test::numeric_gradient(gate, loss)), 1e-7);
  EXPECT_LT(rel_norm_error(d_up, test::numeric_gradient(up, loss)), 1e-7);
}

}  // namespace
}  // namespace tf
