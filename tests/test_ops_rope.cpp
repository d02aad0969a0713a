// Tests: rope_inv_freq (default, linear, llama3, yarn, dynamic scaling, per-frequency factors) and
// rope_attention_factor against hand-computed values; tf::cpu
// rope against the reference in both layouts; the layouts agree up to a permutation; rotations
// preserve norms and backward undoes forward; the backward against float64 finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/ref/rope.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::random_floats;
using test::rel_norm_error;

// One f32 rounding is 2^-24 relative; the bounds below count roundings in units of this.
constexpr double kUlp = 5.96e-8;

std::vector<int32_t> random_positions(size_t n, uint64_t seed, int32_t max_pos) {
  Philox rng(seed, 0x905);
  std::vector<int32_t> pos(n);
  for (size_t i = 0; i < n; ++i) pos[i] = int32_t(rng.u32(i) % uint32_t(max_pos));
  return pos;
}

std::vector<float> inv_freq_for(int head_dim, float theta) {
  RopeParams p;
  p.head_dim = head_dim;
  p.theta = theta;
  std::vector<float> f(size_t(head_dim / 2));
  rope_inv_freq(p, f.data());
  return f;
}

// powf is correctly rounded or within an ulp, and 2i/d is exact for power-of-two d, so each
// frequency is within 2 ulps of 1 / theta^(2i/d) evaluated in double.
TEST(RopeInvFreq, DefaultMatchesFormula) {
  for (const int d : {64, 128}) {
    const std::vector<float> f = inv_freq_for(d, 10000.0f);
    for (int i = 0; i < d / 2; ++i) {
      const double want = 1.0 / std::pow(10000.0, 2.0 * i / d);
      EXPECT_NEAR(f[size_t(i)], want, 2 * kUlp * want) << "d " << d << " i " << i;
    }
  }
}

TEST(RopeInvFreq, LinearDividesByFactor) {
  RopeParams p;
  p.head_dim = 64;
  p.scaling = RopeScalingType::Linear;
  p.factor = 3.0f;
  std::vector<float> scaled(32);
  rope_inv_freq(p, scaled.data());
  const std::vector<float> plain = inv_freq_for(64, p.theta);
  for (size_t i = 0; i < 32; ++i) EXPECT_EQ(scaled[i], plain[i] / 3.0f) << i;
}

// Llama 3.1: theta 500000, factor 8, low 1, high 4, original 8192, head_dim 128. Expected values
// computed by hand from HF's _compute_llama3_parameters in double precision: indices 0..28 keep
// their frequency (wavelength < 2048), 35..63 are divided by 8 (wavelength > 8192), 29..34 are
// blended. The f32 computation rounds powf, the reciprocal and the blend (about ten roundings,
// the blend's 1 - smooth included), so 16 ulps bounds it; a regime or formula mistake is off by
// far more (at least 2% at the blend's edges).
TEST(RopeInvFreq, Llama3MatchesHandComputedValues) {
  RopeParams p;
  p.theta = 500000.0f;
  p.head_dim = 128;
  p.scaling = RopeScalingType::Llama3;
  p.factor = 8.0f;
  p.low_freq_factor = 1.0f;
  p.high_freq_factor = 4.0f;
  p.original_max_positions = 8192;
  std::vector<float> f(64);
  rope_inv_freq(p, f.data());
  const struct {
    int i;
    double want;
  } expected[] = {
      {0, 1.0},
      {20, 0.016560440080994446},
      {28, 0.0032114459947525913},
      {29, 0.002166570763503359},
      {31, 0.0008567514129196321},
      {34, 0.00017850781276799638},
      {35, 9.556212353964683e-05},
      {63, 3.068925988914511e-07},
  };
  for (const auto& e : expected) EXPECT_NEAR(f[size_t(e.i)], e.want, 16 * kUlp * e.want) << "index " << e.i;
}

// Qwen2.5's yarn: theta 1e6, head_dim 128, factor 4, original 32768, beta_fast 32, beta_slow 1.
// Expected values from HF's _compute_yarn_parameters evaluated in double by hand: the correction
// bounds are 23.6 and 39.7, truncated to 23 and 40, so dimensions up to 23 keep their frequency,
// 40 on are divided by 4 and the 16 between blend along the ramp (i - 23) / 17. About ten f32
// roundings (powf, two reciprocals, the blend): 16 ulps; a ramp off by one dimension moves a
// blended frequency by 6% or more.
TEST(RopeInvFreq, YarnMatchesHandComputedValues) {
  RopeParams p;
  p.theta = 1e6f;
  p.head_dim = 128;
  p.scaling = RopeScalingType::Yarn;
  p.factor = 4.0f;
  p.original_max_positions = 32768;
  std::vector<float> f(64);
  rope_inv_freq(p, f.data());
  const struct {
    int i;
    double want;
  } expected[] = {
      {0, 1.0},
      {23, 0.006978305848598663},
      {24, 0.005375321490790102},
      {31, 0.0008029597275452302},
      {39, 6.490394320837028e-05},
      {40, 4.445698525097307e-05},
      {63, 3.102344401879299e-07},
  };
  for (const auto& e : expected) EXPECT_NEAR(f[size_t(e.i)], e.want, 16 * kUlp * e.want) << "index " << e.i;
  // HF's get_mscale: 0.1 ln(factor) + 1, unless attention_factor (or mscale / mscale_all_dim) says.
  EXPECT_NEAR(rope_attention_factor(p), 1.138629436111989, 1e-7);
  p.mscale = 1.0f;
  p.mscale_all_dim = 1.0f;
  EXPECT_EQ(rope_attention_factor(p), 1.0f);
  p.attention_factor = 1.25f;
  EXPECT_EQ(rope_attention_factor(p), 1.25f);
  p.scaling = RopeScalingType::Linear;
  EXPECT_EQ(rope_attention_factor(p), 1.0f);
}

// llama.cpp's rope_freqs: theta_i = pos * base^(-2i/d) / factor_i, a division after the scaling.
TEST(RopeInvFreq, FreqFactorsDivideEachFrequency) {
  RopeParams p;
  p.head_dim = 8;
  p.freq_factors = {1.0f, 2.0f, 8.0f, 0.5f};
  std::vector<float> scaled(4);
  rope_inv_freq(p, scaled.data());
  const std::vector<float> plain = inv_freq_for(8, p.theta);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(scaled[i], plain[i] / p.freq_factors[i]) << i;
  p.freq_factors = {1.0f, 2.0f};
  EXPECT_THROW(rope_inv_freq(p, scaled.data()), Error);
  p.freq_factors = {1.0f, 2.0f, 0.0f, 1.0f};
  EXPECT_THROW(rope_inv_freq(p, scaled.data()), Error);
}

TEST(RopeInvFreq, DynamicKeepsTheDefaultFrequencies) {
  RopeParams p;
  p.head_dim = 64;
  p.scaling = RopeScalingType::Dynamic;
  p.factor = 4.0f;
  std::vector<float> f(32);
  rope_inv_freq(p, f.data());
  EXPECT_EQ(f, inv_freq_for(64, p.theta));
}

TEST(RopeInvFreq, RejectsBadParameters) {
  std::vector<float> f(64);
  RopeParams p;
  p.head_dim = 7;
  EXPECT_THROW(rope_inv_freq(p, f.data()), Error);
  p.head_dim = 64;
  p.scaling = RopeScalingType::Llama3;
  p.low_freq_factor = 4.0f;
  p.high_freq_factor = 4.0f;
  EXPECT_THROW(rope_inv_freq(p, f.data()), Error);
}

struct RopeCase {
  int64_t tokens;
  int heads, head_dim;
};

// Fast and reference evaluate the same f32 angle, cos and sin; the rotation itself may be
// contracted into FMAs differently, which moves each element by at most an ulp or two of its
// operands: 4 ulps of relative norm error.
TEST(Rope, FastMatchesReference) {
  for (const RopeCase c :
       {RopeCase{1, 3, 32}, RopeCase{7, 3, 64}, RopeCase{33, 2, 80}, RopeCase{100, 4, 128}}) {
    const std::vector<float> inv_freq = inv_freq_for(c.head_dim, 500000.0f);
    const size_t n = size_t(c.tokens) * size_t(c.heads * c.head_dim);
    const std::vector<int32_t> pos = random_positions(size_t(c.tokens), 11, 131072);
    for (const RopeLayout layout : {RopeLayout::SplitHalf, RopeLayout::Interleaved}) {
      const std::vector<float> x = random_floats(n, 12);
      std::vector<float> fast = x, want = x;
      cpu::rope_forward(fast.data(), pos.data(), inv_freq.data(), c.tokens, c.heads, c.head_dim, layout);
      ref::rope_forward(want.data(), pos.data(), inv_freq.data(), c.tokens, c.heads, c.head_dim, layout);
      EXPECT_LE(rel_norm_error(fast, want), 4 * kUlp) << c.tokens << " " << c.head_dim;
      EXPECT_GT(rel_norm_error(fast, x), 0.1) << "the rotation must move x";
      cpu::rope_backward(fast.data(), pos.data(), inv_freq.data(), c.tokens, c.heads, c.head_dim, layout);
      ref::rope_backward(want.data(), pos.data(), inv_freq.data(), c.tokens, c.heads, c.head_dim, layout);
      EXPECT_LE(rel_norm_error(fast, want), 8 * kUlp) << c.tokens << " " << c.head_dim;
      // Backward rotates by the opposite angle: it undoes forward up to the roundings of both.
      EXPECT_LE(rel_norm_error(fast, x), 8 * kUlp) << c.tokens << " " << c.head_dim;
    }
  }
}

// Interleaved pair (2i, 2i+1) is split-half pair (i, i + d/2): permuting the head dimension maps
// one layout onto the other, with the same angles, so the results agree to rounding.
TEST(Rope, LayoutsAgreeAfterPermutation) {
  const int64_t tokens = 33;
  const int heads = 3, d = 64, half = d / 2;
  const std::vector<float> inv_freq = inv_freq_for(d, 10000.0f);
  const std::vector<int32_t> pos = random_positions(size_t(tokens), 21, 4096);
  const std::vector<float> split = random_floats(size_t(tokens) * heads * d, 22);
  std::vector<float> inter(split.size());
  for (size_t row = 0; row < size_t(tokens) * heads; ++row) {
    for (int i = 0; i < half; ++i) {
      inter[row * d + 2 * size_t(i)] = split[row * d + size_t(i)];
      inter[row * d + 2 * size_t(i) + 1] = split[row * d + size_t(i + half)];
    }
  }
  std::vector<float> split_out = split, inter_out = inter;
  cpu::rope_forward(split_out.data(), pos.data(), inv_freq.data(), tokens, heads, d, RopeLayout::SplitHalf);
  cpu::rope_forward(inter_out.data(), pos.data(), inv_freq.data(), tokens, heads, d, RopeLayout::Interleaved);
  std::vector<float> inter_as_split(split.size());
  for (size_t row = 0; row < size_t(tokens) * heads; ++row) {
    for (int i = 0; i < half; ++i) {
      inter_as_split[row * d + size_t(i)] = inter_out[row * d + 2 * size_t(i)];
      inter_as_split[row * d + size_t(i + half)] = inter_out[row * d + 2 * size_t(i) + 1];
    }
  }
  EXPECT_LE(rel_norm_error(inter_as_split, split_out), 4 * kUlp);
}

// Each head vector keeps its norm: cos^2 + sin^2 is 1 to within 2 ulps and each rotated element
// adds two more roundings, so 8 ulps of relative change bounds it.
TEST(Rope, PreservesNorms) {
  const int64_t tokens = 50;
  const int heads = 2, d = 128;
  const std::vector<float> inv_freq = inv_freq_for(d, 500000.0f);
  const std::vector<int32_t> pos = random_positions(size_t(tokens), 31, 131072);
  for (const RopeLayout layout : {RopeLayout::SplitHalf, RopeLayout::Interleaved}) {
    const std::vector<float> x = random_floats(size_t(tokens) * heads * d, 32);
    std::vector<float> y = x;
    cpu::rope_forward(y.data(), pos.data(), inv_freq.data(), tokens, heads, d, layout);
    for (size_t row = 0; row < size_t(tokens) * heads; ++row) {
      double nx = 0, ny = 0;
      for (size_t i = 0; i < size_t(d); ++i) {
        nx += double(x[row * d + i]) * x[row * d + i];
        ny += double(y[row * d + i]) * y[row * d + i];
      }
      EXPECT_NEAR(std::sqrt(ny), std::sqrt(nx), 8 * kUlp * std::sqrt(nx)) << row;
    }
  }
}

// L = sum(rope(x) * w) in double; the backward applied to w must equal dL/dx. The loss is linear,
// so central differences are exact up to float64 rounding (about 1e-10 relative with h = 1e-6).
TEST(Rope, ReferenceBackwardMatchesFiniteDifferences) {
  const int64_t tokens = 4;
  const int heads = 2, d = 6;
  const std::vector<int32_t> pos = {0, 3, 17, 1000};
  const std::vector<double> inv_freq = {1.0, 0.1, 0.01};
  for (const RopeLayout layout : {RopeLayout::SplitHalf, RopeLayout::Interleaved}) {
    std::vector<double> x = test::to_double(random_floats(size_t(tokens) * heads * d, 41));
    const std::vector<double> w = test::to_double(random_floats(x.size(), 42));
    auto loss = [&] {
      std::vector<double> y = x;
      ref::rope_rotate<double>(y.data(), pos.data(), inv_freq.data(), tokens, heads, d, layout, +1);
      double l = 0;
      for (size_t i = 0; i < y.size(); ++i) l += y[i] * w[i];
      return l;
    };
    std::vector<double> grad = w;
    ref::rope_rotate<double>(grad.data(), pos.data(), inv_freq.data(), tokens, heads, d, layout, -1);
    EXPECT_LT(rel_norm_error(grad, test::numeric_gradient(x, loss)), 1e-8);
  }
}

}  // namespace
}  // namespace tf
