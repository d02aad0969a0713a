// Tests: tf::cpu attention (tiled, online softmax) against the plain reference, with and without a
// sliding window; the reference backward against float64 finite differences; the reference's window
// rule against full attention over the keys it names; determinism across thread counts; the
// backward's single pass against its two passes; no S x S buffer.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/ref/attention.h"
#include "kernels/ops.h"
#include "src/core/alloc.h"
#include "tests/attention_test_util.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::Docs;
using test::make_doc_ids;
using test::random_floats;
using test::rel_norm_error;
using test::to_double;

// Floor for the error bounds when the naive f32 error happens to be tiny: a relative norm error of
// a few f32 ulps (4 * 2^-24) is what any change of summation order gives.
constexpr double kF32Floor = 4 * 5.96e-8;

using test::make_shape;

struct Inputs {
  AttentionShape shape;
  std::vector<float> q, k, v, d_out;
  std::vector<int32_t> doc;
  const int32_t* doc_ptr() const { return doc.empty() ? nullptr : doc.data(); }
  size_t q_size() const {
    return size_t(shape.batch) * size_t(shape.seq) * size_t(shape.n_heads * shape.head_dim);
  }
  size_t kv_size() const {
    return size_t(shape.batch) * size_t(shape.seq) * size_t(shape.n_kv_heads * shape.head_dim);
  }
  size_t lse_size() const { return size_t(shape.batch) * size_t(shape.seq) * size_t(shape.n_heads); }
};

// q and k in [-2, 2) make scores of a few units after scaling, so softmax rows are far from
// uniform and a wrong mask or a lost rescale shows up.
Inputs make_inputs(const AttentionShape& s, Docs docs, uint64_t seed) {
  Inputs in;
  in.shape = s;
  in.q = random_floats(in.q_size(), seed, 2.0f);
  in.k = random_floats(in.kv_size(), seed + 1, 2.0f);
  in.v = random_floats(in.kv_size(), seed + 2);
  in.d_out = random_floats(in.q_size(), seed + 3);
  if (docs != Docs::None) in.doc = make_doc_ids(s.batch, s.seq, docs, seed + 4);
  return in;
}

struct Outputs {
  std::vector<float> out, lse, dq, dk, dv;
};

Outputs run_cpu(const Inputs& in) {
  Outputs o{std::vector<float>(in.q_size()), std::vector<float>(in.lse_size()),
            std::vector<float>(in.q_size()), std::vector<float>(in.kv_size()),
            std::vector<float>(in.kv_size())};
  cpu::attention_forward(o.out.data(), o.lse.data(), in.q.data(), in.k.data(), in.v.data(), in.doc_ptr(),
                         in.shape);
  cpu::attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.d_out.data(), in.q.data(), in.k.data(),
                          in.v.data(), o.out.data(), o.lse.data(), in.doc_ptr(), in.shape);
  return o;
}

// The reference forward and backward in precision T.
template <typename T>
struct RefOutputs {
  std::vector<T> out, lse, dq, dk, dv;
};

template <typename T>
RefOutputs<T> run_ref(const Inputs& in) {
  const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()), v(in.v.begin(), in.v.end()),
      d_out(in.d_out.begin(), in.d_out.end());
  RefOutputs<T> o{std::vector<T>(in.q_size()), std::vector<T>(in.lse_size()), std::vector<T>(in.q_size()),
                  std::vector<T>(in.kv_size()), std::vector<T>(in.kv_size())};
  ref::attention_forward<T>(o.out.data(), o.lse.data(), q.data(), k.data(), v.data(), in.doc_ptr(), in.shape);
  ref::attention_backward<T>(o.dq.data(), o.dk.data(), o.dv.data(), d_out.data(), q.data(), k.data(),
                             v.data(), in.doc_ptr(), in.shape);
  return o;
}

struct Case {
  int batch, seq, heads, kv_heads, head_dim;
  Docs docs;
  int window = 0;
};

std::string case_name(const Case& c) {
  const char* docs[] = {"nodocs", "packed", "interleaved"};
  return "b" + std::to_string(c.batch) + "_s" + std::to_string(c.seq) + "_h" + std::to_string(c.heads) +
         "_kv" + std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) + "_" + docs[int(c.docs)] +
         (c.window > 0 ? "_w" + std::to_string(c.window) : "");
}

class AttentionVsRef : public ::testing::TestWithParam<Case> {};

// The fast kernel's error against the float64 reference is bounded by a small multiple of the
// naive f32 reference's own error: both round the same dot products and exponentials, the tiled
// version adds the online-softmax rescaling (a few more roundings per row), sums in a different
// order and its backward takes dO.O from the rounded output (measured: up to 2.8x the naive
// error, in dq). 4x that error (or of kF32Floor) leaves room for those extra roundings yet fails
// on any masking or indexing mistake, whose errors are of order 1.
TEST_P(AttentionVsRef, ForwardAndBackwardMatchReference) {
  const Case c = GetParam();
  AttentionShape s = make_shape(c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
  s.window = c.window;
  const Inputs in = make_inputs(s, c.docs, 1234 + c.seq + c.window);
  const Outputs fast = run_cpu(in);
  const RefOutputs<double> exact = run_ref<double>(in);
  const RefOutputs<float> naive = run_ref<float>(in);

  const double d_out_norm =
      std::sqrt(std::inner_product(in.d_out.begin(), in.d_out.end(), in.d_out.begin(), 0.0));
  auto check = [&](const char* what, const std::vector<float>& got, const std::vector<float>& naive_f32,
                   const std::vector<double>& want) {
    const double want_norm = std::sqrt(std::inner_product(want.begin(), want.end(), want.begin(), 0.0));
    if (want_norm < 1e-12 * d_out_norm) {
      // The exact gradient vanishes (a query alone in its document: its softmax is constant), and
      // what remains is the cancellation in dP - dO.O of two f32 dot products of length head_dim
      // (<= 80 * 2^-24 = 5e-6 relative to |dO||v|), times scale * |k| <= 1.
      const double got_norm = std::sqrt(std::inner_product(got.begin(), got.end(), got.begin(), 0.0));
      EXPECT_LE(got_norm, 1e-5 * d_out_norm) << what;
      return;
    }
    const double err = rel_norm_error(got, want);
    const double naive_err = rel_norm_error(naive_f32, want);
    EXPECT_LE(err, 4.0 * std::max(naive_err, kF32Floor))
        << what << ": fast " << err << ", naive f32 " << naive_err;
  };
  check("out", fast.out, naive.out, exact.out);
  check("lse", fast.lse, naive.lse, exact.lse);
  check("dq", fast.dq, naive.dq, exact.dq);
  check("dk", fast.dk, naive.dk, exact.dk);
  check("dv", fast.dv, naive.dv, exact.dv);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionVsRef,
    ::testing::Values(Case{2, 1, 4, 2, 32, Docs::None}, Case{2, 1, 4, 2, 32, Docs::Packed},
                      Case{2, 7, 4, 4, 80, Docs::None}, Case{2, 7, 4, 4, 80, Docs::Packed},
                      Case{2, 33, 8, 2, 64, Docs::None}, Case{2, 33, 8, 2, 64, Docs::Packed},
                      Case{2, 100, 4, 1, 32, Docs::None}, Case{2, 100, 4, 1, 32, Docs::Packed},
                      Case{2, 100, 2, 2, 64, Docs::Interleaved}, Case{1, 1025, 2, 1, 64, Docs::None},
                      Case{1, 1025, 2, 1, 64, Docs::Packed},
                      // Sliding windows: one key, two, one that ends inside a 64-key tile, one
                      // spanning three tiles, and windows at and past the sequence; GQA 3 and 2.
                      Case{2, 150, 6, 2, 32, Docs::None, 1}, Case{2, 150, 6, 2, 32, Docs::Packed, 2},
                      Case{2, 150, 6, 2, 32, Docs::None, 17}, Case{2, 150, 6, 2, 32, Docs::Packed, 17},
                      Case{1, 200, 4, 2, 16, Docs::Interleaved, 17}, Case{1, 200, 4, 2, 16, Docs::None, 130},
                      Case{2, 33, 6, 2, 64, Docs::Packed, 33}, Case{2, 33, 6, 2, 64, Docs::None, 50}),
    [](const ::testing::TestParamInfo<Case>& p) { return case_name(p.param); });

// Backward ops accumulate: starting from nonzero gradients gives start + gradient. Each element
// receives one addition of the same scaled value, which may be fused with the scaling (one
// rounding instead of two), so the sums agree to within an ulp of the operands (2^-23 of
// |start| + |gradient|).
TEST(Attention, BackwardAccumulates) {
  const Inputs in = make_inputs(make_shape(2, 70, 4, 2, 32), Docs::Packed, 77);
  const Outputs zero_start = run_cpu(in);
  const std::vector<float> dq0 = random_floats(in.q_size(), 5), dk0 = random_floats(in.kv_size(), 6),
                           dv0 = random_floats(in.kv_size(), 7);
  std::vector<float> dq = dq0, dk = dk0, dv = dv0;
  cpu::attention_backward(dq.data(), dk.data(), dv.data(), in.d_out.data(), in.q.data(), in.k.data(),
                          in.v.data(), zero_start.out.data(), zero_start.lse.data(), in.doc_ptr(), in.shape);
  auto check = [](const char* what, const std::vector<float>& got, const std::vector<float>& start,
                  const std::vector<float>& grad) {
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = start[i] + grad[i];
      ASSERT_NEAR(got[i], want, 1.2e-7 * (std::abs(start[i]) + std::abs(grad[i]))) << what << "[" << i << "]";
    }
  };
  check("dq", dq, dq0, zero_start.dq);
  check("dk", dk, dk0, zero_start.dk);
  check("dv", dv, dv0, zero_start.dv);
}

// Every output element is owned by one task that sums in a fixed order, so 1, 2 and 3 threads
// give the same bits.
TEST(Attention, BitIdenticalAcrossThreadCounts) {
  const Inputs in = make_inputs(make_shape(2, 150, 4, 2, 64), Docs::Packed, 99);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Outputs one = run_cpu(in);
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const Outputs many = run_cpu(in);
    EXPECT_EQ(0, std::memcmp(one.out.data(), many.out.data(), one.out.size() * sizeof(float))) << threads;
    EXPECT_EQ(0, std::memcmp(one.lse.data(), many.lse.data(), one.lse.size() * sizeof(float))) << threads;
    EXPECT_EQ(0, std::memcmp(one.dq.data(), many.dq.data(), one.dq.size() * sizeof(float))) << threads;
    EXPECT_EQ(0, std::memcmp(one.dk.data(), many.dk.data(), one.dk.size() * sizeof(float))) << threads;
    EXPECT_EQ(0, std::memcmp(one.dv.data(), many.dv.data(), one.dv.size() * sizeof(float))) << threads;
  }
  omp_set_num_threads(saved);
}

// The backward's single pass (a task per batch and kv head) adds every tile in the order of the two
// passes it replaces where tasks are too few for the threads, so the two give the same bits: GQA
// 1, 2 and 3, packed and interleaved documents, windows, sequences ending inside a tile.
TEST(Attention, BackwardSinglePassGivesTheTwoPassesBits) {
  const int saved = omp_get_max_threads();
  struct Shape {
    AttentionShape s;
    Docs docs;
  };
  std::vector<Shape> shapes = {{make_shape(2, 150, 4, 2, 64), Docs::Packed},
                               {make_shape(1, 200, 6, 2, 16), Docs::Interleaved},
                               {make_shape(2, 130, 3, 3, 32), Docs::None},
                               {make_shape(1, 65, 2, 1, 80), Docs::None}};
  shapes[1].s.window = 17;
  shapes[3].s.window = 64;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(sh.s.batch * 1000 + sh.s.seq);
    const Inputs in = make_inputs(sh.s, sh.docs, 41);
    ASSERT_TRUE(cpu::attention_backward_single_pass(sh.s, 1));
    omp_set_num_threads(1);
    const Outputs one = run_cpu(in);
    // The fewest threads that make the backward take two passes.
    int threads = 2;
    while (cpu::attention_backward_single_pass(sh.s, threads)) ++threads;
    omp_set_num_threads(threads);
    const Outputs two = run_cpu(in);
    EXPECT_EQ(0, std::memcmp(one.dq.data(), two.dq.data(), one.dq.size() * sizeof(float))) << threads;
    EXPECT_EQ(0, std::memcmp(one.dk.data(), two.dk.data(), one.dk.size() * sizeof(float))) << threads;
    EXPECT_EQ(0, std::memcmp(one.dv.data(), two.dv.data(), one.dv.size() * sizeof(float))) << threads;
  }
  omp_set_num_threads(saved);
}

// A single pass of equal tasks is kept while their rounds cost less than two passes' seven products a
// tile against its five: 6 tasks on 2 threads (3 rounds), 3 on 2 (2 rounds: 10 against 10.5), but
// not 1 task on 2 threads or 6 on 16.
TEST(Attention, BackwardSinglePassWhenItsRoundsCostLessThanTwoPasses) {
  EXPECT_TRUE(cpu::attention_backward_single_pass(make_shape(2, 512, 9, 3, 64), 2));
  EXPECT_TRUE(cpu::attention_backward_single_pass(make_shape(1, 2048, 9, 3, 64), 2));
  EXPECT_FALSE(cpu::attention_backward_single_pass(make_shape(1, 512, 4, 1, 64), 2));
  EXPECT_FALSE(cpu::attention_backward_single_pass(make_shape(2, 512, 9, 3, 64), 16));
  EXPECT_TRUE(cpu::attention_backward_single_pass(make_shape(4, 512, 32, 8, 128), 16));
}

// The tiled kernels' scratch is per-thread tiles (in the backward's single pass, which one thread
// takes here, the keys, values and their gradients of one sequence: 4 x seq x head_dim floats) plus
// one float per (token, head): far below the seq x seq score matrix a naive implementation would
// allocate.
TEST(Attention, NoSeqBySeqWorkspace) {
  const int seq = 2049;
  const Inputs in = make_inputs(make_shape(1, seq, 2, 1, 64), Docs::None, 3);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  MemTracker::instance().reset_peaks();
  const size_t before = MemTracker::instance().current(MemTag::Workspace);
  run_cpu(in);
  const size_t used = MemTracker::instance().peak(MemTag::Workspace) - before;
  omp_set_num_threads(saved);
  EXPECT_GT(used, 0u);
  EXPECT_LT(used, size_t(seq) * seq * sizeof(float) / 4);
}

// The double-precision reference backward against central differences of the double-precision
// reference forward, for L = sum(out * W). The finite differences are accurate to about 1e-10
// relative (see numeric_gradient); 1e-7 is far above that and far below the error of any wrong
// term in the backward.
TEST(Attention, ReferenceBackwardMatchesFiniteDifferences) {
  for (const auto& [docs, window] : {std::pair{Docs::None, 0}, std::pair{Docs::Packed, 0},
                                     std::pair{Docs::None, 2}, std::pair{Docs::Packed, 3}}) {
    SCOPED_TRACE(window);
    AttentionShape s = make_shape(2, 6, 4, 2, 3);
    s.window = window;
    const Inputs in = make_inputs(s, docs, 555);
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

// The window rule, pinned independently of the reference's own loops: with window W, row i of the
// windowed reference equals the last row of full causal attention over positions i - W + 1 .. i
// alone (transformers' `kv_idx > q_idx - sliding_window`: W keys, the query's own included). In
// double precision the two sum the same terms in the same order, so they agree to rounding.
TEST(Attention, WindowedRowIsFullAttentionOverItsLastWindowKeys) {
  const int S = 12, H = 3, KV = 1, D = 4;
  for (const int window : {1, 2, 5}) {
    SCOPED_TRACE(window);
    AttentionShape s = make_shape(1, S, H, KV, D);
    s.window = window;
    const Inputs in = make_inputs(s, Docs::None, 808);
    const std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
    std::vector<double> out(in.q_size()), lse(in.lse_size());
    ref::attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), nullptr, s);
    for (int i = 0; i < S; ++i) {
      const int first = std::max(0, i - window + 1), n = i - first + 1;
      const AttentionShape sub = make_shape(1, n, H, KV, D);
      std::vector<double> sub_out(size_t(n) * H * D), sub_lse(size_t(n) * H);
      ref::attention_forward<double>(sub_out.data(), sub_lse.data(), q.data() + size_t(first) * H * D,
                                     k.data() + size_t(first) * KV * D, v.data() + size_t(first) * KV * D,
                                     nullptr, sub);
      for (int e = 0; e < H * D; ++e)
        ASSERT_NEAR(out[size_t(i) * H * D + e], sub_out[size_t(n - 1) * H * D + e], 1e-12) << i;
    }
  }
}

// A window at least as long as the sequence leaves every key in reach: the same bits as none.
TEST(Attention, WindowAsLongAsTheSequenceIsFullAttention) {
  AttentionShape s = make_shape(2, 150, 4, 2, 32);
  const Inputs full = make_inputs(s, Docs::Packed, 41);
  Inputs windowed = full;
  windowed.shape.window = 150;
  const Outputs a = run_cpu(full), b = run_cpu(windowed);
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.lse, b.lse);
  EXPECT_EQ(a.dq, b.dq);
  EXPECT_EQ(a.dk, b.dk);
  EXPECT_EQ(a.dv, b.dv);
}

TEST(Attention, RejectsBadShapes) {
  float x = 0;
  AttentionShape s = make_shape(1, 1, 3, 2, 4);
  EXPECT_THROW(cpu::attention_forward(&x, &x, &x, &x, &x, nullptr, s), Error);
  s = make_shape(1, 1, 2, 2, 0);
  EXPECT_THROW(cpu::attention_forward(&x, &x, &x, &x, &x, nullptr, s), Error);
  s = make_shape(1, 1, 2, 2, 4);
  s.window = -1;
  EXPECT_THROW(cpu::attention_forward(&x, &x, &x, &x, &x, nullptr, s), Error);
}

}  // namespace
}  // namespace tf
