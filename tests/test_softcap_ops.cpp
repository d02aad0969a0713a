// Tests: logit soft-capping (Gemma 2), c * tanh(x / c), in the cpu ops: attention's scores
// (tf::cpu::attention_forward / backward / attention_cached_forward against the plain reference),
// the lm_head's logits in the fused cross-entropy (dense and quantized weights against the
// reference), both references' backwards against float64 finite differences, and that a cap
// bounds what it caps (the tests' inputs push scores and logits far past the caps, so tanh
// saturates for some and an ignored cap shows).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cpu/ref/cross_entropy.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/attention_test_util.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::Docs;
using test::make_doc_ids;
using test::make_shape;
using test::random_floats;
using test::rel_norm_error;
using test::to_double;

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();
// The relative error of a few f32 roundings, the floor under a bound taken from the naive f32
// reference when that one happens to be almost exact.
constexpr double kF32Floor = 4 * 5.96e-8;

// ---- attention ----------------------------------------------------------------------------------

struct AttnInputs {
  AttentionShape s;
  std::vector<float> q, k, v, d_out;
  std::vector<int32_t> doc;
  const int32_t* doc_ptr() const { return doc.empty() ? nullptr : doc.data(); }
  size_t q_size() const { return size_t(s.batch) * size_t(s.seq) * size_t(s.n_heads) * size_t(s.head_dim); }
  size_t kv_size() const {
    return size_t(s.batch) * size_t(s.seq) * size_t(s.n_kv_heads) * size_t(s.head_dim);
  }
  size_t lse_size() const { return size_t(s.batch) * size_t(s.seq) * size_t(s.n_heads); }
};

// q and k in [-3, 3) with scale 1/sqrt(head_dim) make scores of up to about 9 sqrt(head_dim / 3):
// far past the caps of 1 to 3 used here, so tanh saturates for many scores and not for others.
AttnInputs attn_inputs(const AttentionShape& s, Docs docs, uint64_t seed) {
  AttnInputs in;
  in.s = s;
  in.q = random_floats(in.q_size(), seed, 3.0f);
  in.k = random_floats(in.kv_size(), seed + 1, 3.0f);
  in.v = random_floats(in.kv_size(), seed + 2);
  in.d_out = random_floats(in.q_size(), seed + 3);
  if (docs != Docs::None) in.doc = make_doc_ids(s.batch, s.seq, docs, seed + 4);
  return in;
}

template <typename T>
struct AttnOut {
  std::vector<T> out, lse, dq, dk, dv;
};

template <typename T>
AttnOut<T> run_ref(const AttnInputs& in) {
  const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()), v(in.v.begin(), in.v.end()),
      d_out(in.d_out.begin(), in.d_out.end());
  AttnOut<T> o{std::vector<T>(in.q_size()), std::vector<T>(in.lse_size()), std::vector<T>(in.q_size()),
               std::vector<T>(in.kv_size()), std::vector<T>(in.kv_size())};
  ref::attention_forward<T>(o.out.data(), o.lse.data(), q.data(), k.data(), v.data(), in.doc_ptr(), in.s);
  ref::attention_backward<T>(o.dq.data(), o.dk.data(), o.dv.data(), d_out.data(), q.data(), k.data(),
                             v.data(), in.doc_ptr(), in.s);
  return o;
}

AttnOut<float> run_cpu(const AttnInputs& in) {
  AttnOut<float> o{std::vector<float>(in.q_size()), std::vector<float>(in.lse_size()),
                   std::vector<float>(in.q_size()), std::vector<float>(in.kv_size()),
                   std::vector<float>(in.kv_size())};
  cpu::attention_forward(o.out.data(), o.lse.data(), in.q.data(), in.k.data(), in.v.data(), in.doc_ptr(),
                         in.s);
  cpu::attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.d_out.data(), in.q.data(), in.k.data(),
                          in.v.data(), o.out.data(), o.lse.data(), in.doc_ptr(), in.s);
  return o;
}

// The double reference's backward against central differences of its forward, for
// L = sum(out * W), with the cap saturating many scores (tanh' near 0 there, near 1 elsewhere).
// Central differences of a smooth double function with step 1e-6 are good to about 1e-10
// relative; 1e-7 is far above that and far below a missing or wrong 1 - tanh^2 factor.
TEST(SoftcapAttention, ReferenceBackwardMatchesFiniteDifferences) {
  for (const auto& [docs, window, cap] :
       {std::tuple{Docs::None, 0, 1.0f}, std::tuple{Docs::Packed, 0, 2.0f}, std::tuple{Docs::None, 3, 1.5f},
        std::tuple{Docs::Packed, 2, 0.5f}}) {
    SCOPED_TRACE("window " + std::to_string(window) + " cap " + std::to_string(cap));
    AttentionShape s = make_shape(2, 7, 4, 2, 3);
    s.window = window;
    s.softcap = cap;
    const AttnInputs in = attn_inputs(s, docs, 91);
    std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v),
                        w = to_double(in.d_out);
    std::vector<double> out(in.q_size()), lse(in.lse_size());
    auto loss = [&] {
      ref::attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), in.doc_ptr(), s);
      double l = 0;
      for (size_t i = 0; i < out.size(); ++i) l += out[i] * w[i];
      return l;
    };
    std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
    ref::attention_backward<double>(dq.data(), dk.data(), dv.data(), w.data(), q.data(), k.data(), v.data(),
                                    in.doc_ptr(), s);
    EXPECT_LT(rel_norm_error(dq, test::numeric_gradient(q, loss)), 1e-7);
    EXPECT_LT(rel_norm_error(dk, test::numeric_gradient(k, loss)), 1e-7);
    EXPECT_LT(rel_norm_error(dv, test::numeric_gradient(v, loss)), 1e-7);
  }
}

// Capped scores lie in (-c, c), so a row over n keys has lse in (ln n - c, ln n + c): the reference
// and the fast kernel both keep it there, while the same inputs uncapped leave that range in some
// row (the inputs' scores reach several times the cap), so the test sees a cap that is ignored.
TEST(SoftcapAttention, CappedScoresBoundTheLogSumExp) {
  AttentionShape s = make_shape(1, 70, 2, 1, 16);
  s.window = 20;
  s.softcap = 1.0f;
  const AttnInputs in = attn_inputs(s, Docs::None, 17);
  const AttnOut<double> exact = run_ref<double>(in);
  const AttnOut<float> fast = run_cpu(in);
  AttnInputs uncapped = in;
  uncapped.s.softcap = 0.0f;
  const AttnOut<double> plain = run_ref<double>(uncapped);
  bool plain_leaves = false;
  for (int64_t i = 0; i < s.seq; ++i) {
    const double ln_n = std::log(double(std::min<int64_t>(i + 1, s.window)));
    for (int h = 0; h < s.n_heads; ++h) {
      const size_t r = size_t(i * s.n_heads + h);
      EXPECT_LT(std::abs(exact.lse[r] - ln_n), s.softcap) << "row " << i << " head " << h;
      // f32: a few roundings of values below ln 20 + 1.
      EXPECT_LT(std::abs(fast.lse[r] - ln_n), s.softcap + 1e-5) << "row " << i << " head " << h;
      plain_leaves = plain_leaves || std::abs(plain.lse[r] - ln_n) > s.softcap;
    }
  }
  EXPECT_TRUE(plain_leaves) << "the inputs do not reach the cap: the test would not see it ignored";
}

struct Case {
  int batch, seq, heads, kv_heads, head_dim;
  Docs docs;
  int window;
  float cap;
};

// The fast kernel against the float64 reference, bounded by 4x the naive f32 reference's own error
// (or kF32Floor), as test_ops_attention does: both round the same dot products, caps (c tanh(x / c):
// a division, tanh to an ulp and a product, each relative 2^-24 of a value below c) and exponentials;
// the tiled kernel adds the online softmax's rescales and another summation order. A cap applied in
// the wrong place (after the mask, to the unscaled score, not at all) or a wrong derivative is off
// by order 1.
TEST(SoftcapAttention, FastMatchesReference) {
  const Case cases[] = {{2, 33, 4, 2, 32, Docs::None, 0, 2.0f},
                        {2, 100, 6, 2, 32, Docs::Packed, 0, 1.0f},
                        {1, 150, 4, 1, 64, Docs::None, 17, 3.0f},
                        {2, 70, 4, 4, 16, Docs::Interleaved, 0, 1.5f},
                        {1, 130, 3, 1, 32, Docs::Packed, 65, 2.0f}};
  for (const Case& c : cases) {
    SCOPED_TRACE("seq " + std::to_string(c.seq) + " window " + std::to_string(c.window) + " cap " +
                 std::to_string(c.cap));
    AttentionShape s = make_shape(c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
    s.window = c.window;
    s.softcap = c.cap;
    const AttnInputs in = attn_inputs(s, c.docs, 300 + uint64_t(c.seq));
    const AttnOut<float> fast = run_cpu(in);
    const AttnOut<double> exact = run_ref<double>(in);
    const AttnOut<float> naive = run_ref<float>(in);
    auto check = [](const char* what, const std::vector<float>& got, const std::vector<float>& naive_f32,
                    const std::vector<double>& want) {
      const double err = rel_norm_error(got, want), naive_err = rel_norm_error(naive_f32, want);
      EXPECT_LE(err, 4.0 * std::max(naive_err, kF32Floor))
          << what << ": fast " << err << ", naive " << naive_err;
    };
    check("out", fast.out, naive.out, exact.out);
    check("lse", fast.lse, naive.lse, exact.lse);
    check("dq", fast.dq, naive.dq, exact.dq);
    check("dk", fast.dk, naive.dk, exact.dk);
    check("dv", fast.dv, naive.dv, exact.dv);
  }
}

// Decoding with a cap: the cpu's cached kernel against the float64 cached reference (bounded as
// above), and the cached reference's rows against the training reference's rows of the same
// sequence, which sum the same terms in the same order in double (1e-12: rounding only).
TEST(SoftcapAttention, CachedDecodeMatchesReferenceAndTraining) {
  for (const auto& [n_past, n_new, window] :
       {std::tuple{int64_t(40), int64_t(1), 0}, std::tuple{int64_t(70), int64_t(5), 16},
        std::tuple{int64_t(0), int64_t(9), 0}}) {
    SCOPED_TRACE("past " + std::to_string(n_past) + " new " + std::to_string(n_new));
    const int H = 6, KV = 2, D = 32;
    AttentionShape s = make_shape(1, int(n_past + n_new), H, KV, D);
    s.window = window;
    s.softcap = 2.0f;
    const AttnInputs in = attn_inputs(s, Docs::None, 500 + uint64_t(n_past));
    const size_t q_row = size_t(H) * D, first = size_t(n_past) * q_row, n_out = size_t(n_new) * q_row;
    const std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
    std::vector<double> cached(n_out);
    ref::attention_cached_forward<double>(cached.data(), q.data() + first, k.data(), v.data(), n_past, n_new,
                                          H, KV, D, s.scale, window, s.softcap);
    const AttnOut<double> train = run_ref<double>(in);
    for (size_t e = 0; e < n_out; ++e) ASSERT_NEAR(cached[e], train.out[first + e], 1e-12) << e;

    std::vector<float> fast(n_out), naive(n_out);
    cpu::attention_cached_forward(fast.data(), in.q.data() + first, in.k.data(), in.v.data(), n_past, n_new,
                                  H, KV, D, s.scale, window, s.softcap);
    ref::attention_cached_forward<float>(naive.data(), in.q.data() + first, in.k.data(), in.v.data(), n_past,
                                         n_new, H, KV, D, s.scale, window, s.softcap);
    const double err = rel_norm_error(fast, cached), naive_err = rel_norm_error(naive, cached);
    EXPECT_LE(err, 4.0 * std::max(naive_err, kF32Floor)) << "fast " << err << ", naive " << naive_err;
  }
}

TEST(SoftcapAttention, RejectsNegativeOrNonFiniteCaps) {
  float x = 0;
  for (const float cap : {-1.0f, std::numeric_limits<float>::infinity(), std::nanf("")}) {
    AttentionShape s = make_shape(1, 1, 2, 2, 4);
    s.softcap = cap;
    EXPECT_THROW(cpu::attention_forward(&x, &x, &x, &x, &x, nullptr, s), Error);
    EXPECT_THROW(cpu::attention_cached_forward(&x, &x, &x, &x, 0, 1, 2, 2, 4, 0.5f, 0, cap), Error);
  }
}

// ---- cross-entropy -------------------------------------------------------------------------------

std::vector<int32_t> make_targets(int64_t n, int64_t vocab, uint64_t seed) {
  const Philox rng(seed, 0x7a);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(vocab));
  return t;
}

// d_h of the double reference against central differences of its loss, with h in [-3, 3) and W in
// [-1, 1) over dim 7: logits of up to about 20, several times the caps, so tanh saturates for some
// and not for others. Bound as for the uncapped test: 1e-7, far above the differences' 1e-10.
TEST(SoftcapCrossEntropy, ReferenceGradientMatchesFiniteDifferences) {
  const int64_t n = 6, vocab = 11, dim = 7;
  const double grad_scale = 0.37;
  for (const double cap : {2.0, 5.0}) {
    SCOPED_TRACE(cap);
    std::vector<double> h = to_double(random_floats(size_t(n * dim), 41, 3.0f));
    const std::vector<double> wd = to_double(random_floats(size_t(vocab * dim), 42));
    std::vector<int32_t> targets = make_targets(n, vocab, 43);
    targets[2] = kIgnoreIndex;
    const auto w = [&wd](int64_t v, int64_t d) { return wd[size_t(v * dim + d)]; };
    int64_t n_valid = 0;
    const auto loss = [&] {
      return grad_scale * ref::lm_head_cross_entropy_loops<double>(nullptr, &n_valid, h.data(), w, vocab, dim,
                                                                   targets.data(), n, 1.0, cap);
    };
    std::vector<double> dh(h.size(), 0.0);
    ref::lm_head_cross_entropy_loops(dh.data(), &n_valid, h.data(), w, vocab, dim, targets.data(), n,
                                     grad_scale, cap);
    EXPECT_EQ(n_valid, n - 1);
    EXPECT_LE(rel_norm_error(dh, test::numeric_gradient(h, loss)), 1e-7);
  }
}

// A capped logit lies in (-c, c), so a row's loss is below ln(vocab) + 2c; the same rows uncapped
// exceed it (their logits reach several times the cap), so the bound tells a cap that is ignored.
TEST(SoftcapCrossEntropy, CappedLogitsBoundTheLoss) {
  const int64_t n = 40, vocab = 50, dim = 16;
  const float cap = 2.0f;
  const std::vector<float> h = random_floats(size_t(n * dim), 7, 4.0f),
                           w = random_floats(size_t(vocab * dim), 8);
  const std::vector<int32_t> targets = make_targets(n, vocab, 9);
  const WeightRef W{w.data(), DType::F32, vocab, dim};
  const double bound = std::log(double(vocab)) + 2 * cap;
  double worst_capped = 0, worst_plain = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t valid = 0;
    worst_capped = std::max(worst_capped, cpu::lm_head_cross_entropy(nullptr, &valid, h.data() + i * dim, W,
                                                                     targets.data() + i, 1, 1.0f, cap));
    worst_plain = std::max(worst_plain, cpu::lm_head_cross_entropy(nullptr, &valid, h.data() + i * dim, W,
                                                                   targets.data() + i, 1, 1.0f));
  }
  EXPECT_LT(worst_capped, bound);
  EXPECT_GT(worst_plain, bound) << "the inputs do not reach the cap: the test would not see it ignored";
}

// The fast version (dense f32 and bf16 W over several 64-row chunks with ignored rows, and an INT8 W
// on the quantized path's vocabulary tiles) against the double reference. A capped logit is off by
// at most the raw logit's error (tanh' <= 1), sqrt(dim) eps |h| |W| for an f32 dot product, plus
// three roundings of a value below the cap (the division, tanh, the product): e = sqrt(dim) eps
// h_scale + 3 eps cap. A row's loss moves by at most 2e plus an eps for the exponentials; d_h's
// relative error is at most 2e from the softmax, 2 eps for the cap's derivative 1 - (z / c)^2
// (z / c < 1: its rounding relative to 1), and sqrt(vocab) eps for the product with W.
TEST(SoftcapCrossEntropy, FastMatchesReference) {
  struct CeCase {
    int64_t n, vocab, dim;
    DType dtype;
    float h_scale, cap;
  };
  const CeCase cases[] = {{130, 300, 33, DType::F32, 3.0f, 5.0f},
                          {70, 1025, 24, DType::BF16, 4.0f, 2.0f},
                          {33, 200, 64, DType::INT8, 3.0f, 3.0f}};
  uint64_t seed = 11;
  for (const CeCase& c : cases) {
    SCOPED_TRACE(std::string(dtype_name(c.dtype)) + " cap " + std::to_string(c.cap));
    std::vector<float> wv = random_floats(size_t(c.vocab * c.dim), seed++);
    std::vector<uint16_t> narrow;
    std::vector<int8_t> codes;
    std::vector<float> absmax;
    WeightRef W{wv.data(), DType::F32, c.vocab, c.dim};
    if (c.dtype == DType::BF16) {
      narrow.resize(wv.size());
      for (size_t i = 0; i < wv.size(); ++i) narrow[i] = f32_to_bf16(wv[i]);
      W = WeightRef{narrow.data(), DType::BF16, c.vocab, c.dim};
    } else if (c.dtype == DType::INT8) {
      const int64_t n_elems = c.vocab * c.dim;
      codes.resize(size_t(n_elems));
      absmax.resize(size_t(ref::quant_blocks(n_elems, 64)));
      ref::quantize_int8(wv.data(), n_elems, codes.data(), absmax.data());
      W = WeightRef{codes.data(), DType::INT8, c.vocab, c.dim, QuantScales{absmax.data()}};
    }
    const std::vector<float> h = random_floats(size_t(c.n * c.dim), seed++, c.h_scale);
    std::vector<int32_t> targets = make_targets(c.n, c.vocab, seed++);
    int64_t valid_want = 0;
    for (int64_t i = 0; i < c.n; ++i) {
      if (i % 7 == 2) targets[size_t(i)] = kIgnoreIndex;
      valid_want += targets[size_t(i)] != kIgnoreIndex;
    }
    const float grad_scale = 1.0f / float(valid_want);
    std::vector<float> dh_fast(h.size(), 0.0f), dh_ref(h.size(), 0.0f);
    int64_t valid_fast = 0, valid_ref = 0;
    const double loss_fast = cpu::lm_head_cross_entropy(dh_fast.data(), &valid_fast, h.data(), W,
                                                        targets.data(), c.n, grad_scale, c.cap);
    const double loss_ref = ref::lm_head_cross_entropy(dh_ref.data(), &valid_ref, h.data(), W, targets.data(),
                                                       c.n, grad_scale, c.cap);
    EXPECT_EQ(valid_fast, valid_want);
    EXPECT_EQ(valid_ref, valid_want);
    const double e = std::sqrt(double(c.dim)) * kEpsF32 * c.h_scale + 3 * kEpsF32 * c.cap;
    EXPECT_LE(std::abs(loss_fast - loss_ref), double(valid_want) * (2 * e + kEpsF32));
    EXPECT_LE(rel_norm_error(dh_fast, dh_ref),
              2 * e + 2 * kEpsF32 + (std::sqrt(double(c.vocab)) + 1) * kEpsF32);
    // The loss alone (no d_h) is the same computation.
    int64_t valid_only = 0;
    EXPECT_EQ(
        cpu::lm_head_cross_entropy(nullptr, &valid_only, h.data(), W, targets.data(), c.n, grad_scale, c.cap),
        loss_fast);
  }
}

TEST(SoftcapCrossEntropy, RejectsNegativeCaps) {
  const std::vector<float> h(4, 0.5f), w(12, 0.25f);
  const std::vector<int32_t> targets = {1};
  int64_t valid = 0;
  try {
    cpu::lm_head_cross_entropy(nullptr, &valid, h.data(), WeightRef{w.data(), DType::F32, 3, 4},
                               targets.data(), 1, 1.0f, -2.0f);
    ADD_FAILURE() << "a negative cap was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lm_head_cross_entropy: softcap must be non-negative"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace tf
