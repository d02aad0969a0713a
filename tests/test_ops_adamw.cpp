// Tests: tf::ref / tf::cpu adamw_update against a hand-computed two-step AdamW sequence in double,
// fast == reference bit for bit, and a bad step count.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/ref/adamw.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;

namespace {

// AdamW as the textbook (Loshchilov & Hutter, and torch.optim.AdamW's documentation) writes it,
// in double, for one element: decay, moments, bias-corrected moments, update.
struct DoubleAdamW {
  double p, m = 0, v = 0;
  void step(double g, const AdamWParams& h) {
    const double t = double(h.step);
    p = p * (1.0 - double(h.lr) * double(h.weight_decay));
    m = double(h.beta1) * m + (1.0 - double(h.beta1)) * g;
    v = double(h.beta2) * v + (1.0 - double(h.beta2)) * g * g;
    const double m_hat = m / (1.0 - std::pow(double(h.beta1), t));
    const double v_hat = v / (1.0 - std::pow(double(h.beta2), t));
    p -= double(h.lr) * m_hat / (std::sqrt(v_hat) + double(h.eps));
  }
};

TEST(AdamW, TwoStepsMatchHandComputedDouble) {
  const int64_t n = 37;
  const std::vector<float> p0 = random_floats(size_t(n), 1);
  // Gradients of varied size, including tiny ones where eps matters in the denominator.
  std::vector<float> g1 = random_floats(size_t(n), 2, 0.1f), g2 = random_floats(size_t(n), 3, 0.1f);
  g1[0] = 1e-9f;
  g2[0] = -3e-9f;
  AdamWParams h;
  h.lr = 1e-2f;
  h.weight_decay = 0.1f;
  std::vector<DoubleAdamW> want;
  for (float p : p0) want.push_back({double(p)});
  for (int backend = 0; backend < 2; ++backend) {
    std::vector<float> p = p0, m(size_t(n), 0.0f), v(size_t(n), 0.0f);
    const auto update = [&](const std::vector<float>& g, int64_t step) {
      h.step = step;
      if (backend == 0) {
        ref::adamw_update(p.data(), g.data(), m.data(), v.data(), n, h);
      } else {
        cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, h);
      }
    };
    update(g1, 1);
    update(g2, 2);
    std::vector<DoubleAdamW> expect = want;
    for (int64_t i = 0; i < n; ++i) {
      h.step = 1;
      expect[size_t(i)].step(g1[size_t(i)], h);
      h.step = 2;
      expect[size_t(i)].step(g2[size_t(i)], h);
    }
    for (int64_t i = 0; i < n; ++i) {
      const DoubleAdamW& e = expect[size_t(i)];
      // About six f32 roundings per element per step, none amplified (each step's update is a
      // bounded lr-sized move): 16 eps of each quantity's size covers two steps. The update
      // itself is checked to 1e-4 * lr, far inside the O(lr) move Adam's normalised step makes.
      const double eps = std::numeric_limits<float>::epsilon();
      EXPECT_NEAR(p[size_t(i)], e.p, 16 * eps * std::abs(e.p) + 1e-4 * h.lr) << "element " << i;
      EXPECT_NEAR(m[size_t(i)], e.m, 16 * eps * std::abs(e.m)) << "element " << i;
      EXPECT_NEAR(v[size_t(i)], e.v, 16 * eps * std::abs(e.v)) << "element " << i;
    }
  }
}

TEST(AdamW, FastMatchesReferenceBitForBit) {
  // Same operations in the same order per element; n crosses the parallel threshold.
  const int64_t n = 100003;
  const std::vector<float> g = random_floats(size_t(n), 4, 0.01f);
  std::vector<float> p_ref = random_floats(size_t(n), 5), m_ref = random_floats(size_t(n), 6, 0.01f);
  std::vector<float> v_ref(size_t(n), 1e-4f);
  std::vector<float> p_fast = p_ref, m_fast = m_ref, v_fast = v_ref;
  AdamWParams h;
  h.lr = 3e-4f;
  h.weight_decay = 0.01f;
  h.step = 7;
  ref::adamw_update(p_ref.data(), g.data(), m_ref.data(), v_ref.data(), n, h);
  cpu::adamw_update(p_fast.data(), g.data(), m_fast.data(), v_fast.data(), n, h);
  EXPECT_EQ(p_fast, p_ref);
  EXPECT_EQ(m_fast, m_ref);
  EXPECT_EQ(v_fast, v_ref);
}

TEST(AdamW, RejectsStepZero) {
  float p = 1, g = 1, m = 0, v = 0;
  AdamWParams h;
  h.step = 0;
  EXPECT_THROW(cpu::adamw_update(&p, &g, &m, &v, 1, h), Error);
  EXPECT_THROW(ref::adamw_update(&p, &g, &m, &v, 1, h), Error);
}

}  // namespace
