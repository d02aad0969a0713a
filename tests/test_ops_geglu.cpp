// Tests: tf::cpu geglu against the reference, saturation without NaN, accumulation, and the
// reference backward against float64 finite differences and against torch's gelu(approximate="tanh").
#include <gtest/gtest.h>

#include "kernels/cpu/ref/geglu.h"
#include "kernels/ops.h"
#include "tests/gated_test_util.h"

namespace tf {
namespace {

const test::GatedOps kGeGlu{cpu::geglu_forward,         cpu::geglu_backward,
                            ref::geglu_forward<float>,  ref::geglu_backward<float>,
                            ref::geglu_forward<double>, ref::geglu_backward<double>};

TEST(GeGlu, FastMatchesReference) {
  test::expect_fast_matches_reference(kGeGlu);
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
// Exact: tanh of an argument past 9 is 1 in f32, so 1 - t^2 is 0, and every product is exact.
TEST(GeGlu, SaturatesWithoutNaN) {
  test::expect_saturates_without_nan(kGeGlu);
}

TEST(GeGlu, BackwardAccumulates) {
  test::expect_backward_accumulates(kGeGlu);
}

TEST(GeGlu, ReferenceBackwardMatchesFiniteDifferences) {
  test::expect_reference_backward_matches_finite_differences(kGeGlu, 4.0f);
}

}  // namespace
}  // namespace tf
