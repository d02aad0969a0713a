// Tests: tf::cpu swiglu against the reference, saturation without NaN, accumulation, and the
// reference backward against float64 finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/exp_f32.h"
#include "kernels/cpu/isa.h"
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

// Inputs across exp's whole range (every 2^-10 from -110 to 95, through the subnormal results below
// -87.3 and the overflow past 88.72) and the specials.
std::vector<float> exp_inputs() {
  std::vector<float> x;
  for (int i = -110 * 1024; i <= 95 * 1024; ++i) x.push_back(float(i) / 1024.0f + 0.000123f);
  const float inf = std::numeric_limits<float>::infinity();
  for (const float v : {0.0f, -0.0f, 1.0f, -1.0f, 88.72f, 88.7228f, 89.0f, -87.33f, -103.97f, -104.0f, 1e-30f,
                        -1e-30f, inf, -inf, std::numeric_limits<float>::quiet_NaN()})
    x.push_back(v);
  return x;
}

// exp_f32 against e^x in double rounded to f32, in ulps of the exact result (2^-149 for a
// subnormal one): at most one anywhere; the specials exactly.
TEST(ExpF32, WithinOneUlpOfTheExponential) {
  double worst = 0;
  float worst_at = 0;
  for (const float x : exp_inputs()) {
    if (std::isnan(x)) continue;
    const double exact = std::exp(double(x));
    const float got = cpu::exp_f32(x);
    if (exact > double(std::numeric_limits<float>::max())) {
      EXPECT_EQ(got, std::numeric_limits<float>::infinity()) << x;
      continue;
    }
    const float nearest = float(exact);
    const float ulp = nearest == 0.0f || std::fpclassify(nearest) == FP_SUBNORMAL
                          ? std::numeric_limits<float>::denorm_min()
                          : std::nextafter(nearest, std::numeric_limits<float>::infinity()) - nearest;
    const double err = std::abs(double(got) - exact) / double(ulp);
    if (err > worst) worst = err, worst_at = x;
  }
  EXPECT_LE(worst, 1.0) << "at x = " << worst_at;
  EXPECT_EQ(cpu::exp_f32(0.0f), 1.0f);
  EXPECT_EQ(cpu::exp_f32(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(cpu::exp_f32(-104.0f), 0.0f);
  EXPECT_TRUE(std::isnan(cpu::exp_f32(std::numeric_limits<float>::quiet_NaN())));
}

#if defined(TF_HAVE_AVX512_KERNELS)
__attribute__((target("avx2,fma"))) void exp_lanes(float* out, const float* x, size_t n) {
  for (size_t i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, cpu::exp_f32x8(_mm256_loadu_ps(x + i)));
}

// The eight lanes give the scalar function's bits on every input, NaN's included.
TEST(ExpF32, EightLanesGiveTheScalarBits) {
  if (!cpu::use_avx2()) GTEST_SKIP() << "this CPU has no AVX2 and FMA: the eight-lane exp cannot run here";
  std::vector<float> x = exp_inputs();
  x.resize(x.size() / 8 * 8);
  std::vector<float> lanes(x.size());
  exp_lanes(lanes.data(), x.data(), x.size());
  size_t differ = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float one = cpu::exp_f32(x[i]);
    if (std::memcmp(&one, &lanes[i], sizeof one) != 0 && differ++ == 0)
      ADD_FAILURE() << "x = " << x[i] << ": lanes " << lanes[i] << ", scalar " << one;
  }
  EXPECT_EQ(differ, 0u);
}
#endif

// got[i] has the bits of want[i], or both are NaN (which NaN an operation on NaNs returns, IEEE 754
// leaves to the implementation, and the compiler may swap a product's operands).
void expect_same_bits(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                      const std::vector<float>& gate) {
  size_t differ = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if ((std::isnan(got[i]) && std::isnan(want[i])) || std::memcmp(&got[i], &want[i], sizeof(float)) == 0)
      continue;
    if (differ++ == 0)
      ADD_FAILURE() << what << "[" << i << "] (gate " << gate[i] << "): " << got[i] << ", portable "
                    << want[i];
  }
  EXPECT_EQ(differ, 0u) << what;
}

// The vector loops (eight at a time, the tail one by one) give the bits of the portable loop, on a
// length that is not a multiple of eight, with saturated, infinite and NaN gates.
TEST(SwiGlu, VectorLanesGiveThePortableBits) {
  if (!cpu::use_avx2()) GTEST_SKIP() << "this CPU has no AVX2 and FMA: only the portable loop runs here";
  const int64_t n = 100003;
  std::vector<float> gate = test::random_floats(size_t(n), 1, 12.0f);
  const float inf = std::numeric_limits<float>::infinity();
  const float specials[] = {-1000.0f, -100.0f, -88.8f, 0.0f, -0.0f,
                            88.8f,    100.0f,  inf,    -inf, std::numeric_limits<float>::quiet_NaN()};
  std::copy(std::begin(specials), std::end(specials), gate.begin() + 3);
  const std::vector<float> up = test::random_floats(size_t(n), 2, 2.0f),
                           g = test::random_floats(size_t(n), 3);
  const std::vector<float> dg0 = test::random_floats(size_t(n), 4), du0 = test::random_floats(size_t(n), 5);
  std::vector<float> out(static_cast<size_t>(n)), dg = dg0, du = du0, out_p(static_cast<size_t>(n)),
                                                  dg_p = dg0, du_p = du0;
  cpu::swiglu_forward(out.data(), gate.data(), up.data(), n);
  cpu::swiglu_backward(dg.data(), du.data(), g.data(), gate.data(), up.data(), n);
  {
    cpu::ScopedPortableKernels portable;
    cpu::swiglu_forward(out_p.data(), gate.data(), up.data(), n);
    cpu::swiglu_backward(dg_p.data(), du_p.data(), g.data(), gate.data(), up.data(), n);
  }
  expect_same_bits("out", out, out_p, gate);
  expect_same_bits("d_gate", dg, dg_p, gate);
  expect_same_bits("d_up", du, du_p, gate);
}

}  // namespace
}  // namespace tf
