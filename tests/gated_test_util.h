// defines: tf::test::GatedOps and the checks every gated MLP activation's op pair (SwiGLU, GeGLU)
// passes: the fast cpu versions against the reference, the saturated tails, accumulation in the
// backward, and the reference backward against float64 finite differences
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tests/op_test_util.h"

namespace tf::test {

// out = act(gate) * up and its backward, fast (cpu) and reference (float and double).
struct GatedOps {
  void (*forward)(float* out, const float* gate, const float* up, int64_t n);
  void (*backward)(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                   int64_t n);
  void (*ref_forward)(float*, const float*, const float*, int64_t);
  void (*ref_backward)(float*, float*, const float*, const float*, const float*, int64_t);
  void (*ref_forward64)(double*, const double*, const double*, int64_t);
  void (*ref_backward64)(double*, double*, const double*, const double*, const double*, int64_t);
};

// Elementwise: the fast and naive f32 versions round the same handful of operations, possibly
// contracted into FMAs differently. 4x the naive f32 error against float64 (or a floor of a few f32
// ulps, 4 * 2^-24) covers that; a wrong formula is off by order 1. Sizes include the parallel path
// (>= 32k elements) and gates in [-12, 12), deep into both saturated tails.
inline void expect_fast_matches_reference(const GatedOps& op) {
  constexpr double kF32Floor = 4 * 5.96e-8;
  for (const int64_t n : {1, 7, 33, 100, 100003}) {
    const size_t N = static_cast<size_t>(n);
    const std::vector<float> gate = random_floats(N, 1, 12.0f), up = random_floats(N, 2, 2.0f),
                             g = random_floats(N, 3);
    std::vector<float> out(N), d_gate(N), d_up(N);
    op.forward(out.data(), gate.data(), up.data(), n);
    op.backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);
    const std::vector<double> gate64 = to_double(gate), up64 = to_double(up), g64 = to_double(g);
    std::vector<double> out64(N), d_gate64(N), d_up64(N);
    op.ref_forward64(out64.data(), gate64.data(), up64.data(), n);
    op.ref_backward64(d_gate64.data(), d_up64.data(), g64.data(), gate64.data(), up64.data(), n);
    std::vector<float> out32(N), d_gate32(N), d_up32(N);
    op.ref_forward(out32.data(), gate.data(), up.data(), n);
    op.ref_backward(d_gate32.data(), d_up32.data(), g.data(), gate.data(), up.data(), n);
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

// Both activations saturate to 0 and x (derivatives 0 and 1, and 1/2 at 0) for large |gate|, never
// NaN; the caller's comment says why the values are exact there.
inline void expect_saturates_without_nan(const GatedOps& op) {
  const std::vector<float> gate = {-1000.0f, -100.0f, 0.0f, 100.0f, 1000.0f};
  const std::vector<float> up(gate.size(), 1.5f), g(gate.size(), 1.0f);
  std::vector<float> out(gate.size()), d_gate(gate.size()), d_up(gate.size());
  const int64_t n = int64_t(gate.size());
  op.forward(out.data(), gate.data(), up.data(), n);
  op.backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);
  const std::vector<float> want_out = {0.0f, 0.0f, 0.0f, 150.0f, 1500.0f};
  const std::vector<float> want_d_gate = {0.0f, 0.0f, 0.75f, 1.5f, 1.5f};
  const std::vector<float> want_d_up = {0.0f, 0.0f, 0.0f, 100.0f, 1000.0f};
  for (size_t i = 0; i < gate.size(); ++i) {
    EXPECT_EQ(out[i], want_out[i]) << gate[i];
    EXPECT_EQ(d_gate[i], want_d_gate[i]) << gate[i];
    EXPECT_EQ(d_up[i], want_d_up[i]) << gate[i];
  }
}

// The backward accumulates: start + gradient, one f32 addition per element, so within an ulp of the
// operands (2^-23 of |start| + |gradient|).
inline void expect_backward_accumulates(const GatedOps& op) {
  const int64_t n = 50;
  const size_t N = static_cast<size_t>(n);
  const std::vector<float> gate = random_floats(N, 1, 4.0f), up = random_floats(N, 2),
                           g = random_floats(N, 3);
  std::vector<float> d_gate(N), d_up(N);
  op.backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);
  const std::vector<float> dg0 = random_floats(N, 4), du0 = random_floats(N, 5);
  std::vector<float> dg = dg0, du = du0;
  op.backward(dg.data(), du.data(), g.data(), gate.data(), up.data(), n);
  for (size_t i = 0; i < N; ++i) {
    EXPECT_NEAR(dg[i], dg0[i] + d_gate[i], 1.2e-7 * (std::abs(dg0[i]) + std::abs(d_gate[i]))) << i;
    EXPECT_NEAR(du[i], du0[i] + d_up[i], 1.2e-7 * (std::abs(du0[i]) + std::abs(d_up[i]))) << i;
  }
}

// L = sum(out * W) in double, gates in [-gate_scale, gate_scale). Central differences are accurate to
// about 1e-10 relative; 1e-7 is far above that and far below the error of any wrong term.
inline void expect_reference_backward_matches_finite_differences(const GatedOps& op, float gate_scale) {
  const int64_t n = 12;
  const size_t N = static_cast<size_t>(n);
  std::vector<double> gate = to_double(random_floats(N, 1, gate_scale));
  std::vector<double> up = to_double(random_floats(N, 2));
  const std::vector<double> w = to_double(random_floats(N, 3));
  auto loss = [&] {
    std::vector<double> out(N);
    op.ref_forward64(out.data(), gate.data(), up.data(), n);
    double l = 0;
    for (size_t i = 0; i < N; ++i) l += out[i] * w[i];
    return l;
  };
  std::vector<double> d_gate(N), d_up(N);
  op.ref_backward64(d_gate.data(), d_up.data(), w.data(), gate.data(), up.data(), n);
  EXPECT_LT(rel_norm_error(d_gate, numeric_gradient(gate, loss)), 1e-7);
  EXPECT_LT(rel_norm_error(d_up, numeric_gradient(up, loss)), 1e-7);
}

}  // namespace tf::test
