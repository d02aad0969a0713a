// Tests: tf::cpu swiglu against the reference, saturation without NaN, accumulation, and the
// reference backward against float64 finite differences.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/cpu/ref/swiglu.h"
#include "kernels/ops.h"
#include "tests/gated_test_util.h"

namespace tf {
namespace {

const test::GatedOps kSwiGlu{cpu::swiglu_forward,         cpu::swiglu_backward,
                             ref::swiglu_forward<float>,  ref::swiglu_backward<float>,
                             ref::swiglu_forward<double>, ref::swiglu_backward<double>};

TEST(SwiGlu, FastMatchesReference) {
  test::expect_fast_matches_reference(kSwiGlu);
}

// exp(-gate) overflows to inf for gate below about -88: sigmoid must become 0, not NaN, and the
// large positive side must give silu(x) = x with derivative 1.
TEST(SwiGlu, SaturatesWithoutNaN) {
  const std::vector<float> gate = {-1000.0f, -100.0f, 0.0f, 100.0f, 1000.0f};
  const std::vector<float> up(gate.size(), 1.5f), g(gate.size(), 1.0f);
  std::vector<float> out(gate.size()), d_gate(gate.size()), d_up(gate.size());
  const int64_t n = int64_t(gate.size());
  cpu::swiglu_forward(out.data(), gate.data(), up.data(), n);
  cpu::swiglu_backward(d_gate.data(), d_up.data(), g.data(), gate.data(), up.data(), n);
  const std::vector<float> want_out = {0.0f, 0.0f, 0.0f, 150.0f, 1500.0f};
  const std::vector<float> want_d_gate = {0.0f, 0.0f, 0.75f, 1.5f, 1.5f};
  const std::vector<float> want_d_up = {0.0f, 0.0f, 0.0f, 100.0f, 1000.0f};
  for (size_t i = 0; i < gate.size(); ++i) {
    // Exact: e^100 already overflows f32, so sigmoid(-100) is 0, and every product is exact.
    EXPECT_EQ(out[i], want_out[i]) << gate[i];
    EXPECT_EQ(d_gate[i], want_d_gate[i]) << gate[i];
    EXPECT_EQ(d_up[i], want_d_up[i]) << gate[i];
  }
}

TEST(SwiGlu, BackwardAccumulates) {
  test::expect_backward_accumulates(kSwiGlu);
}

TEST(SwiGlu, ReferenceBackwardMatchesFiniteDifferences) {
  test::expect_reference_backward_matches_finite_differences(kSwiGlu, 6.0f);
}

}  // namespace
}  // namespace tf
