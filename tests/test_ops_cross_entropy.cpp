// Tests: tf::cpu::lm_head_cross_entropy against tf::ref (f32, bf16, f16 weights, several chunks,
// ignored targets, large logits), d_h against float64 finite differences of the double-precision
// reference, and out-of-range targets.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/ref/cross_entropy.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;
using tf::test::rel_norm_error;

namespace {

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();

// Absolute error of one f32 logit: a length-dim dot product of terms of size <= h_scale (h and W
// are uniform in [-h_scale, h_scale] and [-1, 1]), whose rounding errors add like a random walk.
double logit_error(int64_t dim, double h_scale) {
  return std::sqrt(double(dim)) * kEpsF32 * h_scale;
}

// A row's loss, lse(z) - z[target], moves by at most twice the largest logit error, plus about one
// eps for the f32 exponentials (their sum is accumulated in double).
double loss_tolerance(int64_t n_valid, int64_t dim, double h_scale) {
  return double(n_valid) * 2.0 * (logit_error(dim, h_scale) + kEpsF32);
}

// The softmax turns an absolute logit error into a relative error of dlogits (dp/p = dz - E[dz]),
// at most twice the logit error; the product dlogits * W over the vocabulary adds the usual
// sqrt(vocab) * eps of a dot product.
double dh_tolerance(int64_t vocab, int64_t dim, double h_scale) {
  return 2.0 * logit_error(dim, h_scale) + (std::sqrt(double(vocab)) + 1.0) * kEpsF32;
}

std::vector<int32_t> make_targets(int64_t n, int64_t vocab, uint64_t seed) {
  Philox rng(seed, 0x7a);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(vocab));
  return t;
}

// W [vocab, dim] stored as dtype, plus the f32 values it holds.
struct StoredWeight {
  std::vector<float> values;
  std::vector<uint16_t> narrow;
  WeightRef ref;

  StoredWeight(int64_t vocab, int64_t dim, DType dt, uint64_t seed)
      : values(random_floats(size_t(vocab * dim), seed)) {
    if (dt != DType::F32) {
      narrow.resize(values.size());
      for (size_t i = 0; i < values.size(); ++i) {
        narrow[i] = dt == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
        values[i] = dt == DType::BF16 ? bf16_to_f32(narrow[i]) : f16_to_f32(narrow[i]);
      }
    }
    ref =
        WeightRef{dt == DType::F32 ? static_cast<const void*>(values.data()) : narrow.data(), dt, vocab, dim};
  }
};

struct CeCase {
  int64_t n_tokens, vocab, dim;
  DType dtype;
  float h_scale;
};

TEST(LmHeadCrossEntropy, FastMatchesReference) {
  // 130 rows span three 64-row chunks (the last partial); rows 64..127 are all ignored, so one
  // chunk is skipped entirely. h_scale 30 gives logits in the hundreds: the log-softmax must be
  // the stable one.
  const CeCase cases[] = {{1, 7, 33, DType::F32, 1.0f},
                          {33, 1025, 100, DType::F32, 1.0f},
                          {130, 1025, 33, DType::BF16, 1.0f},
                          {130, 100, 7, DType::F16, 1.0f},
                          {33, 1025, 33, DType::BF16, 30.0f}};
  uint64_t seed = 1;
  for (const CeCase& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n_tokens) + " vocab=" + std::to_string(c.vocab) +
                 " dim=" + std::to_string(c.dim) + " " + std::string(dtype_name(c.dtype)) +
                 " scale=" + std::to_string(c.h_scale));
    const StoredWeight w(c.vocab, c.dim, c.dtype, seed++);
    const std::vector<float> h = random_floats(size_t(c.n_tokens * c.dim), seed++, c.h_scale);
    std::vector<int32_t> targets = make_targets(c.n_tokens, c.vocab, seed++);
    int64_t expect_valid = 0;
    for (int64_t i = 0; i < c.n_tokens; ++i) {
      if (i % 5 == 3 || (i >= 64 && i < 128)) targets[size_t(i)] = kIgnoreIndex;
      expect_valid += targets[size_t(i)] != kIgnoreIndex;
    }
    const float grad_scale = 1.0f / float(expect_valid);
    // d_h starts nonzero: the op accumulates.
    const std::vector<float> dh0 = random_floats(h.size(), seed++, 0.01f);
    std::vector<float> dh_fast = dh0, dh_ref = dh0;
    int64_t valid_fast = -1, valid_ref = -1;
    const double loss_fast = cpu::lm_head_cross_entropy(dh_fast.data(), &valid_fast, h.data(), w.ref,
                                                        targets.data(), c.n_tokens, grad_scale);
    const double loss_ref = ref::lm_head_cross_entropy(dh_ref.data(), &valid_ref, h.data(), w.ref,
                                                       targets.data(), c.n_tokens, grad_scale);
    EXPECT_EQ(valid_fast, expect_valid);
    EXPECT_EQ(valid_ref, expect_valid);
    EXPECT_LE(std::abs(loss_fast - loss_ref), loss_tolerance(expect_valid, c.dim, c.h_scale));
    EXPECT_LE(rel_norm_error(dh_fast, dh_ref), dh_tolerance(c.vocab, c.dim, c.h_scale));
  }
}

TEST(LmHeadCrossEntropy, LossOnlyAndAllIgnored) {
  const StoredWeight w(100, 33, DType::BF16, 7);
  const std::vector<float> h = random_floats(size_t(5 * 33), 8);
  const std::vector<int32_t> targets = {3, kIgnoreIndex, 99, 0, kIgnoreIndex};
  int64_t nv_fast = 0, nv_ref = 0;
  const double fast = cpu::lm_head_cross_entropy(nullptr, &nv_fast, h.data(), w.ref, targets.data(), 5, 1.0f);
  const double want = ref::lm_head_cross_entropy(nullptr, &nv_ref, h.data(), w.ref, targets.data(), 5, 1.0f);
  EXPECT_EQ(nv_fast, 3);
  EXPECT_EQ(nv_ref, 3);
  EXPECT_NEAR(fast, want, loss_tolerance(3, 33, 1.0));

  const std::vector<int32_t> none(5, kIgnoreIndex);
  std::vector<float> dh(h.size(), 0.25f);
  EXPECT_EQ(cpu::lm_head_cross_entropy(dh.data(), &nv_fast, h.data(), w.ref, none.data(), 5, 1.0f), 0.0);
  EXPECT_EQ(nv_fast, 0);
  EXPECT_EQ(dh, std::vector<float>(h.size(), 0.25f));
}

TEST(LmHeadCrossEntropy, GradientMatchesFiniteDifferences) {
  const int64_t n = 6, vocab = 11, dim = 7;
  const double grad_scale = 0.37;
  std::vector<double> h = test::to_double(random_floats(size_t(n * dim), 41, 2.0f));
  const std::vector<float> wf = random_floats(size_t(vocab * dim), 42);
  const std::vector<double> wd = test::to_double(wf);
  std::vector<int32_t> targets = make_targets(n, vocab, 43);
  targets[2] = kIgnoreIndex;
  const auto w = [&wd](int64_t v, int64_t d) { return wd[size_t(v * dim + d)]; };
  int64_t n_valid = 0;
  const auto loss = [&] {
    return grad_scale * ref::lm_head_cross_entropy_loops<double>(nullptr, &n_valid, h.data(), w, vocab, dim,
                                                                 targets.data(), n, 1.0);
  };
  std::vector<double> dh(h.size(), 0.0);
  ref::lm_head_cross_entropy_loops(dh.data(), &n_valid, h.data(), w, vocab, dim, targets.data(), n,
                                   grad_scale);
  EXPECT_EQ(n_valid, n - 1);
  const std::vector<double> numeric = test::numeric_gradient(h, loss);
  // Central differences of a smooth double function with h = 1e-6: truncation (~h^2 * f''')
  // and rounding (~1e-16 / h) errors are both ~1e-10 relative.
  EXPECT_LE(rel_norm_error(dh, numeric), 1e-7);
  for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(dh[size_t(2 * dim + d)], 0.0) << "ignored row got a gradient";

  // The fast f32 version against the same float64 gradient (h in [-2, 2]).
  const std::vector<float> hf(h.begin(), h.end());
  std::vector<float> dh_fast(h.size(), 0.0f);
  cpu::lm_head_cross_entropy(dh_fast.data(), &n_valid, hf.data(),
                             WeightRef{wf.data(), DType::F32, vocab, dim}, targets.data(), n,
                             float(grad_scale));
  EXPECT_LE(rel_norm_error(dh_fast, numeric), dh_tolerance(vocab, dim, 2.0));
}

TEST(LmHeadCrossEntropy, RejectsOutOfRangeTargets) {
  const StoredWeight w(10, 4, DType::F32, 9);
  const std::vector<float> h(size_t(4 * 4), 0.5f);
  for (int32_t bad : {10, -1, 1 << 30}) {
    const std::vector<int32_t> targets = {1, kIgnoreIndex, 2, bad};
    int64_t n_valid = 0;
    for (int backend = 0; backend < 2; ++backend) {
      try {
        if (backend == 0) {
          cpu::lm_head_cross_entropy(nullptr, &n_valid, h.data(), w.ref, targets.data(), 4, 1.0f);
        } else {
          ref::lm_head_cross_entropy(nullptr, &n_valid, h.data(), w.ref, targets.data(), 4, 1.0f);
        }
        ADD_FAILURE() << "target " << bad << " was accepted";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("target " + std::to_string(bad)), std::string::npos) << msg;
        EXPECT_NE(msg.find("row 3"), std::string::npos) << msg;
      }
    }
  }
}

}  // namespace
