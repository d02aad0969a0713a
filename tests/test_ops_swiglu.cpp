// Tests: tf::cpu swiglu against the reference, saturation without NaN, accumulation, and the
// reference backward against float64 finite differences.
#include <gtest/gtest.h>

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
// Exact: e^100 already overflows f32, so sigmoid(-100) is 0, and every product is exact.
TEST(SwiGlu, SaturatesWithoutNaN) {
  test::expect_saturates_without_nan(kSwiGlu);
}

TEST(SwiGlu, BackwardAccumulates) {
  test::expect_backward_accumulates(kSwiGlu);
}

TEST(SwiGlu, ReferenceBackwardMatchesFiniteDifferences) {
  test::expect_reference_backward_matches_finite_differences(kSwiGlu, 6.0f);
}

}  // namespace
}  // namespace tf
