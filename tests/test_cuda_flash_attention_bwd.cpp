// Tests: the bf16 tensor-core flash attention backward (kernels/cuda/flash_attention_bwd.cu) on the
// SIMT simulator (tf::simt::flash_attention_backward): dq, dk and dv against the float64 reference
// gradient of the bf16-rounded inputs within a per-element bound derived below, at head dims 64,
// 80, 96 and 128, ragged tiles, GQA ratios 1, 2 and 4, batches of two and packed documents (one of
// length 1 included); accumulation into nonzero gradients; the same bits for any thread order;
// rejected shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/ops.h"
#include "kernels/sim/sim.h"
#include "src/core/dtype.h"
#include "tests/attention_test_util.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::Guarded;

enum class Layout { None, Packed, Interleaved, Singletons, Long };

struct Case {
  int batch, seq, heads, kv_heads, head_dim;
  Layout docs;
  int window = 0;
};

std::string case_name(const Case& c) {
  const char* docs[] = {"nodocs", "packed", "interleaved", "singletons", "long"};
  return "b" + std::to_string(c.batch) + "_s" + std::to_string(c.seq) + "_h" + std::to_string(c.heads) +
         "_kv" + std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) + "_" + docs[int(c.docs)] +
         (c.window > 0 ? "_w" + std::to_string(c.window) : "");
}

// Singletons: documents of lengths 1, 1, 13, 1, 40, repeated, so that one-token documents sit at a
// sequence's start and inside tiles, and boundaries fall mid-tile. Long: 150, 1, 333, 541, so that
// in a sequence of 1025 whole tiles lie inside one document (unmasked), whole tiles see none of
// another's keys (skipped) and tiles below the diagonal cross a boundary (masked).
std::vector<int32_t> doc_ids(const Case& c, uint64_t seed) {
  std::vector<int> lengths;
  switch (c.docs) {
    case Layout::None: return {};
    case Layout::Packed: return test::make_doc_ids(c.batch, c.seq, test::Docs::Packed, seed);
    case Layout::Interleaved: return test::make_doc_ids(c.batch, c.seq, test::Docs::Interleaved, seed);
    case Layout::Singletons: lengths = {1, 1, 13, 1, 40}; break;
    case Layout::Long: lengths = {150, 1, 333, 541}; break;
  }
  std::vector<int32_t> ids;
  for (int b = 0; b < c.batch; ++b) {
    int32_t id = 100 * b;
    for (int i = 0, doc = 0, left = lengths[0]; i < c.seq; ++i, --left) {
      if (left == 0) {
        ++id;
        left = lengths[size_t(++doc) % lengths.size()];
      }
      ids.push_back(id);
    }
  }
  return ids;
}

AttentionShape make_shape(const Case& c) {
  AttentionShape s;
  s.batch = c.batch;
  s.seq = c.seq;
  s.n_heads = c.heads;
  s.n_kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.scale = 1.0f / std::sqrt(float(c.head_dim));
  s.window = c.window;
  return s;
}

std::vector<double> rounded_to_bf16(const std::vector<float>& x) {
  std::vector<double> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return r;
}

// One problem: f32 inputs (the kernel rounds them to bf16 itself), their bf16 values in double,
// out and lse of the float64 forward on those values rounded to f32 (what a forward would have
// saved), and the float64 gradient of the bf16 values.
struct Problem {
  AttentionShape s;
  std::vector<float> q, k, v, d_out, out, lse;
  std::vector<int32_t> doc;
  std::vector<double> qr, kr, vr, dor, dq, dk, dv;

  Problem(const Case& c, uint64_t seed) : s(make_shape(c)) {
    const size_t tokens = size_t(c.batch) * size_t(c.seq);
    const size_t q_size = tokens * size_t(c.heads * c.head_dim),
                 kv_size = tokens * size_t(c.kv_heads * c.head_dim);
    // q and k in [-2, 2): scores of a few units, rows far from uniform.
    q = test::random_floats(q_size, seed, 2.0f);
    k = test::random_floats(kv_size, seed + 1, 2.0f);
    v = test::random_floats(kv_size, seed + 2);
    d_out = test::random_floats(q_size, seed + 3);
    doc = doc_ids(c, seed + 4);
    qr = rounded_to_bf16(q);
    kr = rounded_to_bf16(k);
    vr = rounded_to_bf16(v);
    dor = rounded_to_bf16(d_out);
    std::vector<double> out64(q_size), lse64(tokens * size_t(c.heads));
    ref::attention_forward<double>(out64.data(), lse64.data(), qr.data(), kr.data(), vr.data(), docs(), s);
    out.assign(out64.begin(), out64.end());
    lse.assign(lse64.begin(), lse64.end());
    dq.assign(q_size, 0.0);
    dk.assign(kv_size, 0.0);
    dv.assign(kv_size, 0.0);
    ref::attention_backward<double>(dq.data(), dk.data(), dv.data(), dor.data(), qr.data(), kr.data(),
                                    vr.data(), docs(), s);
  }
  const int32_t* docs() const { return doc.empty() ? nullptr : doc.data(); }
};

// ---- the error bound -------------------------------------------------------------------------------
//
// test::flash_backward_bounds (tests/attention_test_util.h) derives it: the kernel against the exact
// gradient of its bf16 inputs given the saved out and lse.
test::GradBounds error_bounds(const Problem& pr) {
  return test::flash_backward_bounds(pr.s, pr.qr, pr.kr, pr.vr, pr.dor, pr.out, pr.lse, pr.doc);
}

// ---- the launcher on the simulator -----------------------------------------------------------------

struct Grads {
  std::vector<float> dq, dk, dv;
};

Grads zero_grads(const Problem& pr) {
  return {std::vector<float>(pr.q.size()), std::vector<float>(pr.k.size()), std::vector<float>(pr.k.size())};
}

// flash_attention_backward adding into start; a test failure when it writes outside an output.
Grads simt_backward(const Problem& pr, const Grads& start) {
  Guarded<float> q(pr.q, "q"), k(pr.k, "k"), v(pr.v, "v"), d_out(pr.d_out, "d_out"), out(pr.out, "out"),
      lse(pr.lse, "lse");
  Guarded<int32_t> doc(pr.doc, "doc_ids");
  Guarded<float> dq(start.dq, "dq"), dk(start.dk, "dk"), dv(start.dv, "dv");
  simt::flash_attention_backward(dq.get(), dk.get(), dv.get(), d_out.get(), q.get(), k.get(), v.get(),
                                 out.get(), lse.get(), pr.doc.empty() ? nullptr : doc.get(), pr.s);
  EXPECT_TRUE(dq.guards_intact() && dk.guards_intact() && dv.guards_intact())
      << "a write outside dq, dk or dv";
  return {dq.download(), dk.download(), dv.download()};
}

// |got - want| <= bound for every element (NaN fails); reports the first few misses and the
// largest error as a fraction of its bound.
void expect_within(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                   const std::vector<double>& bound) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(double(got[i]) - want[i]);
    if (bound[i] > 0) worst = std::max(worst, diff / bound[i]);
    if (!(diff <= bound[i]) && bad++ < 3)
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << want[i] << " within "
                    << bound[i];
  }
  EXPECT_EQ(bad, 0) << what << ": elements out of bounds";
  ::testing::Test::RecordProperty(std::string(what) + "_max_error_of_bound", std::to_string(worst));
}

class SimtFlashBackward : public ::testing::TestWithParam<Case> {};

TEST_P(SimtFlashBackward, MatchesTheFloat64GradientOfTheBf16Inputs) {
  const Case c = GetParam();
  const Problem pr(c, 4242 + uint64_t(c.seq) * 7 + uint64_t(c.head_dim));
  const Grads got = simt_backward(pr, zero_grads(pr));
  const test::GradBounds bd = error_bounds(pr);
  expect_within("dq", got.dq, pr.dq, bd.dq);
  expect_within("dk", got.dk, pr.dk, bd.dk);
  expect_within("dv", got.dv, pr.dv, bd.dv);
}

// Sequences of 97 (a full tile and a ragged one), 20 (less than one tile), 160 (a full tile wholly
// below the diagonal: the unmasked path) and 1025 (seventeen tiles, one a single row, with long
// documents); every head dim taken; GQA groups of 1, 2 and 4; batches of two; documents packed,
// interleaved (every tile masked), of length 1 and long.
INSTANTIATE_TEST_SUITE_P(
    Shapes, SimtFlashBackward,
    ::testing::Values(Case{2, 97, 4, 2, 64, Layout::Packed}, Case{1, 97, 4, 1, 80, Layout::None},
                      Case{2, 97, 2, 2, 96, Layout::Interleaved}, Case{2, 20, 2, 1, 80, Layout::Packed},
                      Case{1, 160, 2, 1, 128, Layout::None}, Case{2, 70, 2, 1, 128, Layout::Singletons},
                      Case{1, 1025, 2, 1, 64, Layout::Long},
                      // Sliding windows (GQA 3): one key; one ending inside a 64-row tile, with
                      // documents; one over two tiles, so that tiles are skipped, masked and not.
                      Case{1, 97, 6, 2, 64, Layout::None, 1}, Case{1, 97, 6, 2, 64, Layout::Packed, 17},
                      Case{1, 200, 3, 1, 64, Layout::None, 70}),
    [](const ::testing::TestParamInfo<Case>& p) { return case_name(p.param); });

// The backward adds into its outputs: from nonzero starts the result is start + gradient, within
// the one rounding of that addition (and one more where it is fused with the scaling): 2^-23 of
// |start| + |gradient|.
TEST(SimtFlashBackwardOnce, Accumulates) {
  const Problem pr(Case{2, 70, 4, 2, 64, Layout::Packed}, 77);
  const Grads zero_start = simt_backward(pr, zero_grads(pr));
  const Grads start{test::random_floats(pr.q.size(), 5), test::random_floats(pr.k.size(), 6),
                    test::random_floats(pr.k.size(), 7)};
  const Grads got = simt_backward(pr, start);
  test::expect_accumulated("dq", got.dq, start.dq, zero_start.dq);
  test::expect_accumulated("dk", got.dk, start.dk, zero_start.dk);
  test::expect_accumulated("dv", got.dv, start.dv, zero_start.dv);
}

// Each output element is summed by one lane of one block in a fixed order, so the simulator's
// thread order (its seed) does not change a bit.
TEST(SimtFlashBackwardOnce, SameBitsForAnyThreadOrder) {
  const Problem pr(Case{1, 80, 4, 2, 64, Layout::Packed}, 99);
  const uint64_t saved_seed = sim::seed();
  sim::set_seed(1);
  const Grads g1 = simt_backward(pr, zero_grads(pr));
  sim::set_seed(2);
  const Grads g2 = simt_backward(pr, zero_grads(pr));
  sim::set_seed(saved_seed);
  EXPECT_EQ(test::first_difference(g1.dq, g2.dq), -1);
  EXPECT_EQ(test::first_difference(g1.dk, g2.dk), -1);
  EXPECT_EQ(test::first_difference(g1.dv, g2.dv), -1);
}

TEST(SimtFlashBackwardOnce, RejectsShapesItDoesNotTake) {
  AttentionShape s = make_shape(Case{1, 16, 2, 1, 72, Layout::None});
  auto run = [&] {
    simt::flash_attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                   nullptr, nullptr, s);
  };
  const std::string wrong_dim = test::error_of(run);
  EXPECT_NE(wrong_dim.find("head_dim 72"), std::string::npos) << wrong_dim;
  s.head_dim = 64;
  s.n_heads = 3;
  s.n_kv_heads = 2;
  const std::string wrong_heads = test::error_of(run);
  EXPECT_NE(wrong_heads.find("n_heads (3)"), std::string::npos) << wrong_heads;
  s.n_heads = 2;
  s.seq = 0;
  EXPECT_EQ(test::error_of(run), "") << "no tokens: nothing to launch";
}

}  // namespace
}  // namespace tf
