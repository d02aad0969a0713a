// Tests: tf::cpu::lm_head_cross_entropy against tf::ref (f32, bf16, f16 weights, several chunks,
// ignored targets, large logits; quantized NF4 / INT8 / Q8_0 / Q4_K weights over several vocabulary
// tiles and token chunks, also against the dense path on their dequantized values), d_h against
// float64 finite differences of the double-precision reference, and out-of-range targets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/ref/cross_entropy.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;
using tf::test::rel_norm_error;

namespace {

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();

// Absolute error of one f32 logit: a length-dim dot product of terms of size <= h_scale * w_scale
// (h and W are uniform in [-h_scale, h_scale] and [-w_scale, w_scale]), whose rounding errors add
// like a random walk.
double logit_error(int64_t dim, double h_scale, double w_scale = 1.0) {
  return std::sqrt(double(dim)) * kEpsF32 * h_scale * w_scale;
}

// A row's loss, lse(z) - z[target], moves by at most twice the largest logit error, plus about one
// eps for the f32 exponentials (their sum is accumulated in double).
double loss_tolerance(int64_t n_valid, int64_t dim, double h_scale, double w_scale = 1.0) {
  return double(n_valid) * 2.0 * (logit_error(dim, h_scale, w_scale) + kEpsF32);
}

// The softmax turns an absolute logit error into a relative error of dlogits (dp/p = dz - E[dz]),
// at most twice the logit error; the product dlogits * W over the vocabulary adds the usual
// sqrt(vocab) * eps of a dot product.
double dh_tolerance(int64_t vocab, int64_t dim, double h_scale, double w_scale = 1.0) {
  return 2.0 * logit_error(dim, h_scale, w_scale) + (std::sqrt(double(vocab)) + 1.0) * kEpsF32;
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

// W [vocab, dim] in a quantized dtype with values in about [-1, 1]: NF4 and INT8 quantize uniform
// values with the reference quantizers, Q8_0 takes d = absmax / 127 per block, and Q4_K gets random
// codes under scales d, dmin <= 1 / (63 * 15). `values` holds what it dequantizes to.
struct QuantWeight {
  std::vector<uint8_t> data;
  std::vector<float> absmax;
  std::vector<uint8_t> absmax_codes;
  std::vector<float> nested;
  std::vector<float> values;
  WeightRef ref;
  double w_scale = 0;

  QuantWeight(int64_t vocab, int64_t dim, DType dt, uint64_t seed) {
    const int64_t n = vocab * dim;
    const std::vector<float> x = random_floats(size_t(n), seed);
    data.resize(size_t(dtype_bytes(dt, n)));
    QuantScales scales;
    if (dt == DType::NF4) {
      ref::quantize_nf4(x.data(), n, data.data(),
                        (absmax = std::vector<float>(size_t(ref::quant_blocks(n, 64)))).data());
      const int64_t blocks = int64_t(absmax.size());
      absmax_codes.resize(size_t(blocks));
      nested.resize(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)));
      const float offset =
          ref::double_quantize_absmax(absmax.data(), blocks, absmax_codes.data(), nested.data());
      scales = QuantScales{absmax_codes.data(), nested.data(), offset};
    } else if (dt == DType::INT8) {
      absmax.resize(size_t(ref::quant_blocks(n, 64)));
      ref::quantize_int8(x.data(), n, reinterpret_cast<int8_t*>(data.data()), absmax.data());
      scales = QuantScales{absmax.data(), nullptr, 0.0f};
    } else if (dt == DType::Q8_0) {
      for (int64_t b = 0; b < n / kQK0; ++b) {
        BlockQ8_0 block;
        float amax = 0;
        for (int j = 0; j < kQK0; ++j) amax = std::max(amax, std::abs(x[size_t(b * kQK0 + j)]));
        const float d = amax / 127.0f;
        block.d = f32_to_f16(d);
        for (int j = 0; j < kQK0; ++j)
          block.qs[j] = int8_t(d == 0.0f ? 0.0f : std::round(x[size_t(b * kQK0 + j)] / d));
        std::memcpy(data.data() + b * sizeof(BlockQ8_0), &block, sizeof(BlockQ8_0));
      }
    } else {
      Philox rng(seed, 0x4b);
      for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
      for (int64_t b = 0; b < n / kQKK; ++b) {
        BlockQ4_K block;
        std::memcpy(&block, data.data() + b * sizeof(BlockQ4_K), sizeof(BlockQ4_K));
        block.d = f32_to_f16(x[size_t(2 * b)] / (63.0f * 15.0f));
        block.dmin = f32_to_f16(x[size_t(2 * b + 1)] / (63.0f * 15.0f));
        std::memcpy(data.data() + b * sizeof(BlockQ4_K), &block, sizeof(BlockQ4_K));
      }
    }
    ref = WeightRef{data.data(), dt, vocab, dim, scales};
    values.resize(size_t(n));
    ref::dequantize_weight_tile(values.data(), dim, ref, 0, vocab, 0, dim);
    for (float v : values) w_scale = std::max(w_scale, double(std::abs(v)));
  }
};

TEST(LmHeadCrossEntropy, QuantizedWeightsMatchReferenceAndDensePath) {
  // A quantized W goes through vocabulary tiles of at most 4096 rows and token chunks of 256, with
  // an online softmax. 5000 and 4200 rows take two tiles, the last partial; 600 tokens take three
  // chunks, and rows 256..511 are all ignored, so the middle chunk is skipped. h_scale 30 gives
  // logits in the hundreds. The same h and targets through the dense path on an f32 copy of the
  // dequantized values must agree within the same bounds (both are f32 computations of one sum).
  const CeCase cases[] = {{600, 5000, 33, DType::NF4, 1.0f},
                          {130, 1025, 64, DType::INT8, 1.0f},
                          {70, 4200, 256, DType::Q4_K, 1.0f},
                          {33, 1025, 96, DType::Q8_0, 30.0f},
                          {1, 7, 32, DType::Q8_0, 1.0f}};
  uint64_t seed = 300;
  for (const CeCase& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n_tokens) + " vocab=" + std::to_string(c.vocab) +
                 " dim=" + std::to_string(c.dim) + " " + std::string(dtype_name(c.dtype)) +
                 " scale=" + std::to_string(c.h_scale));
    const QuantWeight w(c.vocab, c.dim, c.dtype, seed++);
    const WeightRef dense{w.values.data(), DType::F32, c.vocab, c.dim};
    const std::vector<float> h = random_floats(size_t(c.n_tokens * c.dim), seed++, c.h_scale);
    std::vector<int32_t> targets = make_targets(c.n_tokens, c.vocab, seed++);
    int64_t expect_valid = 0;
    for (int64_t i = 0; i < c.n_tokens; ++i) {
      if (i % 5 == 3 || (i >= 256 && i < 512)) targets[size_t(i)] = kIgnoreIndex;
      expect_valid += targets[size_t(i)] != kIgnoreIndex;
    }
    const float grad_scale = 1.0f / float(expect_valid);
    const std::vector<float> dh0 = random_floats(h.size(), seed++, 0.01f);
    std::vector<float> dh_fast = dh0, dh_ref = dh0, dh_dense = dh0;
    int64_t valid_fast = -1, valid_ref = -1, valid_dense = -1;
    const double loss_fast = cpu::lm_head_cross_entropy(dh_fast.data(), &valid_fast, h.data(), w.ref,
                                                        targets.data(), c.n_tokens, grad_scale);
    const double loss_ref = ref::lm_head_cross_entropy(dh_ref.data(), &valid_ref, h.data(), w.ref,
                                                       targets.data(), c.n_tokens, grad_scale);
    const double loss_dense = cpu::lm_head_cross_entropy(dh_dense.data(), &valid_dense, h.data(), dense,
                                                         targets.data(), c.n_tokens, grad_scale);
    EXPECT_EQ(valid_fast, expect_valid);
    EXPECT_EQ(valid_ref, expect_valid);
    EXPECT_EQ(valid_dense, expect_valid);
    const double loss_tol = loss_tolerance(expect_valid, c.dim, c.h_scale, w.w_scale);
    const double dh_tol = dh_tolerance(c.vocab, c.dim, c.h_scale, w.w_scale);
    EXPECT_LE(std::abs(loss_fast - loss_ref), loss_tol);
    EXPECT_LE(rel_norm_error(dh_fast, dh_ref), dh_tol);
    EXPECT_LE(std::abs(loss_fast - loss_dense), loss_tol);
    EXPECT_LE(rel_norm_error(dh_fast, dh_dense), dh_tol);

    // Without d_h the loss is the same sum, and a second call repeats it bit for bit.
    int64_t valid_loss_only = -1;
    const double loss_only = cpu::lm_head_cross_entropy(nullptr, &valid_loss_only, h.data(), w.ref,
                                                        targets.data(), c.n_tokens, grad_scale);
    EXPECT_EQ(valid_loss_only, expect_valid);
    EXPECT_EQ(loss_only, loss_fast);
  }
}

TEST(LmHeadCrossEntropy, QuantizedAllIgnoredAndMissingAbsmax) {
  const QuantWeight w(100, 64, DType::NF4, 17);
  const std::vector<float> h = random_floats(size_t(5 * 64), 18);
  const std::vector<int32_t> none(5, kIgnoreIndex);
  std::vector<float> dh(h.size(), 0.25f);
  int64_t n_valid = -1;
  EXPECT_EQ(cpu::lm_head_cross_entropy(dh.data(), &n_valid, h.data(), w.ref, none.data(), 5, 1.0f), 0.0);
  EXPECT_EQ(n_valid, 0);
  EXPECT_EQ(dh, std::vector<float>(h.size(), 0.25f));

  WeightRef no_absmax = w.ref;
  no_absmax.scales.absmax = nullptr;
  const std::vector<int32_t> targets = {1, 2, 3, 4, 5};
  for (int backend = 0; backend < 2; ++backend) {
    try {
      if (backend == 0) {
        cpu::lm_head_cross_entropy(dh.data(), &n_valid, h.data(), no_absmax, targets.data(), 5, 1.0f);
      } else {
        ref::lm_head_cross_entropy(dh.data(), &n_valid, h.data(), no_absmax, targets.data(), 5, 1.0f);
      }
      ADD_FAILURE() << "accepted an NF4 weight without its absmax";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("lm_head_cross_entropy: nf4 weight without its absmax"),
                std::string::npos)
          << e.what();
    }
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
