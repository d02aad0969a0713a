// Tests: tf::cpu::attention_cached_forward (KV-cache decoding) against its plain reference, and
// against the training op: prefill then one token at a time reproduces attention_forward over the
// whole sequence, row for row; both with and without a sliding window, decoding past its end.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/ops.h"
#include "tests/attention_test_util.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::random_floats;
using test::rel_norm_error;

// Floor for the error bounds when the naive f32 error happens to be tiny: a relative norm error of
// a few f32 ulps (4 * 2^-24) is what any change of summation order gives.
constexpr double kF32Floor = 4 * 5.96e-8;

// Guard values after out: an op that writes beyond n_new rows is seen (the cache holds NaN past its
// valid rows, so one that reads beyond them turns its output into NaN).
constexpr int64_t kGuardFloats = 16;
constexpr float kGuard = 12345.0f;

using Case = test::CachedCase;
using test::CachedInputs;

// The fast op's output, checking that the guard after it is untouched.
std::vector<float> run_cpu(const CachedInputs& in) {
  std::vector<float> out(in.out_size() + kGuardFloats, kGuard);
  cpu::attention_cached_forward(out.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), in.c.n_past,
                                in.c.n_new, in.c.heads, in.c.kv_heads, in.c.head_dim, in.scale, in.c.window);
  for (int64_t i = 0; i < kGuardFloats; ++i)
    EXPECT_EQ(out[in.out_size() + size_t(i)], kGuard) << "guard " << i;
  out.resize(in.out_size());
  return out;
}

template <typename T>
std::vector<T> run_ref(const CachedInputs& in) {
  const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k_cache.begin(), in.k_cache.end()),
      v(in.v_cache.begin(), in.v_cache.end());
  std::vector<T> out(in.out_size());
  ref::attention_cached_forward<T>(out.data(), q.data(), k.data(), v.data(), in.c.n_past, in.c.n_new,
                                   in.c.heads, in.c.kv_heads, in.c.head_dim, in.scale, in.c.window);
  return out;
}

class AttentionCachedVsRef : public ::testing::TestWithParam<Case> {};

// The fast op's error against the float64 reference is bounded by a small multiple of the naive
// f32 reference's own error: both round the same dot products and exponentials; the fast one adds
// the online-softmax rescaling (a few more roundings per row) and sums in another order. 4x that
// error (or of kF32Floor), as for attention_forward, leaves room for those roundings yet fails on
// any masking or indexing mistake, whose errors are of order 1.
TEST_P(AttentionCachedVsRef, MatchesReference) {
  const Case c = GetParam();
  const CachedInputs in(c, 4321 + uint64_t(c.n_past * 7 + c.n_new));
  const std::vector<float> fast = run_cpu(in);
  const std::vector<double> exact = run_ref<double>(in);
  const std::vector<float> naive = run_ref<float>(in);
  for (float x : fast) ASSERT_TRUE(std::isfinite(x)) << "read past the valid cache rows";
  const double err = rel_norm_error(fast, exact), naive_err = rel_norm_error(naive, exact);
  EXPECT_LE(err, 4.0 * std::max(naive_err, kF32Floor)) << "fast " << err << ", naive f32 " << naive_err;
}

std::vector<Case> vs_ref_cases() {
  std::vector<Case> cases;
  for (int64_t n_past : {0, 1, 37, 1000}) {
    for (int64_t n_new : {1, 5, 33}) {
      cases.push_back({n_past, n_new, 6, 6, 64});  // no GQA
      cases.push_back({n_past, n_new, 6, 2, 80});  // groups of 3
    }
  }
  // Two and three positions take the in-place scoring path with several rows; 70 positions with
  // one kv head make query blocks of 21 and a ragged last block.
  cases.push_back({37, 2, 4, 1, 64});
  cases.push_back({100, 3, 3, 3, 80});
  cases.push_back({5, 70, 3, 1, 64});
  // Sliding windows, decoding past their end: of one key, two, one inside a 64-key tile and one
  // over three tiles, with GQA 3; a prefill whose rows' windows start in different tiles; a window
  // longer than the cache.
  for (const int window : {1, 2, 17, 130}) {
    cases.push_back({1000, 1, 6, 2, 80, window});
    cases.push_back({200, 5, 6, 2, 64, window});
  }
  cases.push_back({37, 70, 3, 1, 64, 17});
  cases.push_back({37, 5, 6, 2, 64, 500});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCachedVsRef, ::testing::ValuesIn(vs_ref_cases()),
                         [](const ::testing::TestParamInfo<Case>& p) { return test::cached_name(p.param); });

// The training op over a whole sequence of T tokens, and the cached op run as a decoder runs it
// (prefill of P tokens, then one token at a time, each step's queries against the cache of the
// sequence so far), give the same rows.
class AttentionCachedVsTraining : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionCachedVsTraining, PrefillThenStepsMatchTrainingForward) {
  const Case c = GetParam();  // n_past: prefill length P; n_new: tokens decoded after it
  const int64_t T = c.n_past + c.n_new, D = c.head_dim;
  AttentionShape s;
  s.seq = int(T);
  s.n_heads = c.heads;
  s.n_kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.scale = 1.0f / std::sqrt(float(D));
  s.window = c.window;
  const CachedInputs in(Case{0, T, c.heads, c.kv_heads, c.head_dim, c.window}, 777 + uint64_t(T));
  const size_t q_row = size_t(c.heads) * size_t(D);

  std::vector<float> train(in.out_size()), lse(size_t(T) * size_t(c.heads));
  cpu::attention_forward(train.data(), lse.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), nullptr,
                         s);
  std::vector<float> train_ref(in.out_size()), lse_ref(lse.size());
  ref::attention_forward<float>(train_ref.data(), lse_ref.data(), in.q.data(), in.k_cache.data(),
                                in.v_cache.data(), nullptr, s);

  std::vector<float> cached(in.out_size()), cached_ref(in.out_size());
  auto step = [&](int64_t n_past, int64_t n_new) {
    const size_t at = size_t(n_past) * q_row;
    cpu::attention_cached_forward(cached.data() + at, in.q.data() + at, in.k_cache.data(), in.v_cache.data(),
                                  n_past, n_new, c.heads, c.kv_heads, c.head_dim, s.scale, c.window);
    ref::attention_cached_forward<float>(cached_ref.data() + at, in.q.data() + at, in.k_cache.data(),
                                         in.v_cache.data(), n_past, n_new, c.heads, c.kv_heads, c.head_dim,
                                         s.scale, c.window);
  };
  step(0, c.n_past);
  for (int64_t pos = c.n_past; pos < T; ++pos) step(pos, 1);

  // The references run the same loops in the same order for each row (see
  // ref::attention_cached_forward), so any difference at all is an indexing mistake.
  EXPECT_EQ(0, std::memcmp(cached_ref.data(), train_ref.data(), train_ref.size() * sizeof(float)));

  // Each fast op is within 4x the naive f32 error of the exact result (the vs-reference tests of
  // both ops), so by the triangle inequality they are within 8x of each other. Checked per
  // position, so that a mistake in one decoding step is not averaged away over the sequence.
  const std::vector<double> exact = run_ref<double>(in);
  for (int64_t pos = 0; pos < T; ++pos) {
    const size_t at = size_t(pos) * q_row;
    const double naive_err = rel_norm_error(train_ref.data() + at, exact.data() + at, q_row);
    const double diff = rel_norm_error(cached.data() + at, train.data() + at, q_row);
    EXPECT_LE(diff, 8.0 * std::max(naive_err, kF32Floor))
        << "position " << pos << ", naive f32 " << naive_err;
  }
}

INSTANTIATE_TEST_SUITE_P(Sequences, AttentionCachedVsTraining,
                         ::testing::Values(Case{1, 40, 4, 4, 64}, Case{37, 60, 6, 2, 80},
                                           Case{130, 70, 3, 1, 64}, Case{64, 65, 6, 3, 80},
                                           Case{30, 100, 6, 2, 64, 17}, Case{70, 30, 3, 1, 80, 1},
                                           Case{5, 90, 6, 3, 64, 70}),
                         [](const ::testing::TestParamInfo<Case>& p) { return test::cached_name(p.param); });

// Every output row is owned by one task whose arithmetic does not depend on the other rows of
// that task, so 1, 2, 3 and 5 threads (which split a kv group's heads differently) give the same
// bits, in decoding and in prefill.
TEST(AttentionCached, BitIdenticalAcrossThreadCounts) {
  const int saved = omp_get_max_threads();
  for (const Case c : {Case{300, 1, 6, 2, 64}, Case{40, 45, 6, 2, 64}}) {
    const CachedInputs in(c, 99);
    omp_set_num_threads(1);
    const std::vector<float> one = run_cpu(in);
    for (int threads : {2, 3, 5}) {
      omp_set_num_threads(threads);
      const std::vector<float> many = run_cpu(in);
      EXPECT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(float)))
          << test::cached_name(c) << " " << threads;
    }
  }
  omp_set_num_threads(saved);
}

TEST(AttentionCached, NoNewTokensWritesNothing) {
  const CachedInputs in(Case{10, 0, 2, 1, 8}, 5);
  std::vector<float> out(kGuardFloats, kGuard);
  cpu::attention_cached_forward(out.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), 10, 0, 2, 1, 8,
                                0.5f, 0);
  for (float x : out) EXPECT_EQ(x, kGuard);
}

TEST(AttentionCached, RejectsBadShapes) {
  // Room for every shape below (at most 3 heads x head_dim 4): GCC's bounds check follows the
  // inlined reference past a shape check it does not see always throwing, and flags a 1-float x.
  float xs[16] = {};
  float* x = xs;
  EXPECT_THROW(cpu::attention_cached_forward(x, x, x, x, 0, 1, 3, 2, 4, 0.5f, 0), Error);
  EXPECT_THROW(cpu::attention_cached_forward(x, x, x, x, 0, 1, 2, 2, 0, 0.5f, 0), Error);
  EXPECT_THROW(cpu::attention_cached_forward(x, x, x, x, -1, 1, 2, 2, 4, 0.5f, 0), Error);
  EXPECT_THROW(cpu::attention_cached_forward(x, x, x, x, 0, -1, 2, 2, 4, 0.5f, 0), Error);
  EXPECT_THROW(ref::attention_cached_forward<float>(x, x, x, x, 0, 1, 3, 2, 4, 0.5f, 0), Error);
  EXPECT_THROW(cpu::attention_cached_forward(x, x, x, x, 0, 1, 2, 2, 4, 0.5f, -1), Error);
}

}  // namespace
}  // namespace tf
