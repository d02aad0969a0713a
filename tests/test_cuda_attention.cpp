// Tests: the CUDA backend's attention launchers (kernels/cuda/attention.cu) run on the SIMT
// simulator (tf::simt) against tf::cpu at awkward shapes (odd head dims, ragged tiles, GQA ratios
// 1, 2 and 4, document ids, batches of two), within per-element error bounds derived below; the
// backward against float64 finite differences; NaN guards around every output; the same bits for
// any thread order; decoding against the training forward; rejected shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "kernels/sim/sim.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/attention_test_util.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

namespace rt = simt::rt;
using test::Docs;
using test::make_doc_ids;
using test::random_floats;

// Unit roundoff of f32.
constexpr double kU = 1.0 / (1 << 24);

// ---- device arrays with guards ------------------------------------------------------------------

// Floats on each side of an array, holding a NaN no arithmetic produces: a stray write next to an
// output changes their bits, which the simulator's bounds check (the allocation includes them)
// does not see.
constexpr size_t kGuardFloats = 16;
constexpr uint32_t kGuardBits = 0x7fc0dead;

// A device copy of a host array between two guards.
template <typename T>
class DeviceArray {
 public:
  DeviceArray(const std::vector<T>& host, const char* what) : n_(host.size()) {
    bytes_ = (n_ + 2 * kGuardFloats) * sizeof(T);
    base_ = static_cast<T*>(rt::device_alloc(bytes_, what));
    std::vector<T> all(n_ + 2 * kGuardFloats);
    for (size_t i = 0; i < kGuardFloats; ++i) {
      std::memcpy(&all[i], &kGuardBits, sizeof(T));
      std::memcpy(&all[kGuardFloats + n_ + i], &kGuardBits, sizeof(T));
    }
    std::copy(host.begin(), host.end(), all.begin() + kGuardFloats);
    rt::memcpy_h2d(base_, all.data(), bytes_, rt::current_stream());
  }
  ~DeviceArray() { rt::device_free(base_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() { return base_ + kGuardFloats; }
  // The array's contents; a test failure when a guard changed.
  std::vector<T> download(const char* what) const {
    std::vector<T> all(n_ + 2 * kGuardFloats);
    rt::memcpy_d2h(all.data(), base_, bytes_, rt::current_stream());
    rt::stream_synchronize(rt::current_stream());
    for (size_t i = 0; i < kGuardFloats; ++i) {
      uint32_t before, after;
      std::memcpy(&before, &all[i], sizeof before);
      std::memcpy(&after, &all[kGuardFloats + n_ + i], sizeof after);
      EXPECT_EQ(before, kGuardBits) << what << ": guard " << i << " before the array was written";
      EXPECT_EQ(after, kGuardBits) << what << ": guard " << i << " after the array was written";
    }
    return {all.begin() + kGuardFloats, all.begin() + std::ptrdiff_t(kGuardFloats + n_)};
  }

 private:
  size_t n_, bytes_ = 0;
  T* base_ = nullptr;
};

static_assert(sizeof(float) == sizeof(kGuardBits) && sizeof(int32_t) == sizeof(kGuardBits));

// ---- inputs -------------------------------------------------------------------------------------

using test::make_shape;

// q and k in [-2, 2) make scores of a few units after scaling, so softmax rows are far from
// uniform and a wrong mask or a lost rescale shows up.
struct Inputs {
  AttentionShape s;
  std::vector<float> q, k, v, d_out;
  std::vector<int32_t> doc;
  Inputs(const AttentionShape& shape, Docs docs, uint64_t seed) : s(shape) {
    q = random_floats(q_size(), seed, 2.0f);
    k = random_floats(kv_size(), seed + 1, 2.0f);
    v = random_floats(kv_size(), seed + 2);
    d_out = random_floats(q_size(), seed + 3);
    doc = make_doc_ids(s.batch, s.seq, docs, seed + 4);
  }
  size_t tokens() const { return size_t(s.batch) * size_t(s.seq); }
  size_t q_size() const { return tokens() * size_t(s.n_heads) * size_t(s.head_dim); }
  size_t kv_size() const { return tokens() * size_t(s.n_kv_heads) * size_t(s.head_dim); }
  size_t lse_size() const { return tokens() * size_t(s.n_heads); }
  const int32_t* doc_ptr() const { return doc.empty() ? nullptr : doc.data(); }
};

std::vector<float> nans(size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

// ---- the launchers on the simulator -------------------------------------------------------------

struct Forward {
  std::vector<float> out, lse;
};

// attention_forward into NaN-filled outputs, so an element it fails to write stays NaN.
Forward simt_forward(const Inputs& in) {
  DeviceArray<float> q(in.q, "q"), k(in.k, "k"), v(in.v, "v");
  DeviceArray<int32_t> doc(in.doc, "doc_ids");
  DeviceArray<float> out(nans(in.q_size()), "out"), lse(nans(in.lse_size()), "lse");
  simt::attention_forward(out.get(), lse.get(), q.get(), k.get(), v.get(),
                          in.doc.empty() ? nullptr : doc.get(), in.s);
  return {out.download("out"), lse.download("lse")};
}

struct Grads {
  std::vector<float> dq, dk, dv;
};

// attention_backward from the saved out and lse, adding into start.
Grads simt_backward(const Inputs& in, const Forward& saved, const Grads& start) {
  DeviceArray<float> q(in.q, "q"), k(in.k, "k"), v(in.v, "v"), d_out(in.d_out, "d_out");
  DeviceArray<float> out(saved.out, "out"), lse(saved.lse, "lse");
  DeviceArray<int32_t> doc(in.doc, "doc_ids");
  DeviceArray<float> dq(start.dq, "dq"), dk(start.dk, "dk"), dv(start.dv, "dv");
  simt::attention_backward(dq.get(), dk.get(), dv.get(), d_out.get(), q.get(), k.get(), v.get(), out.get(),
                           lse.get(), in.doc.empty() ? nullptr : doc.get(), in.s);
  return {dq.download("dq"), dk.download("dk"), dv.download("dv")};
}

Grads zero_grads(const Inputs& in) {
  return {std::vector<float>(in.q_size()), std::vector<float>(in.kv_size()),
          std::vector<float>(in.kv_size())};
}

Forward cpu_forward(const Inputs& in) {
  Forward f{std::vector<float>(in.q_size()), std::vector<float>(in.lse_size())};
  cpu::attention_forward(f.out.data(), f.lse.data(), in.q.data(), in.k.data(), in.v.data(), in.doc_ptr(),
                         in.s);
  return f;
}

Grads cpu_backward(const Inputs& in, const Forward& saved) {
  Grads g = zero_grads(in);
  cpu::attention_backward(g.dq.data(), g.dk.data(), g.dv.data(), in.d_out.data(), in.q.data(), in.k.data(),
                          in.v.data(), saved.out.data(), saved.lse.data(), in.doc_ptr(), in.s);
  return g;
}

// ---- error bounds -------------------------------------------------------------------------------
//
// Per-element bounds on how far one f32 implementation may be from the exact result of the same
// formulas, to first order in u = 2^-24; the tests allow twice that between the simulated kernels
// and tf::cpu, which differ in tiling and summation order only. The forward's is
// tests/attention_bounds.h's, with n allowed keys, scores s_j, A_j = scale sum_d |q_d k_jd| and
// D = head_dim as there.
//

using test::ForwardBounds;
using test::GradBounds;
using test::RowBound;

// The kernels' tiles hold 16 keys, which bounds the online softmax's rescales.
RowBound forward_row_bound(const float* qi, const float* kbase, const float* vbase, int64_t kv_row,
                           const std::vector<int64_t>& keys, int D, float scale) {
  return test::forward_row_bound(qi, kbase, vbase, kv_row, keys, D, scale, 16);
}

// The kernels' tiles hold 16 keys, which bounds the online softmax's rescales.
ForwardBounds forward_bounds(const Inputs& in) {
  return test::forward_bounds(in.s, in.q, in.k, in.v, in.doc, 16);
}
GradBounds backward_bounds(const Inputs& in, const Forward& saved) {
  return test::backward_bounds(in.s, in.q, in.k, in.v, in.d_out, saved.out, saved.lse, in.doc);
}
// |got - want| <= factor * bound for every element (NaN fails); reports the first few misses.
void expect_within(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                   const std::vector<double>& bound, double factor) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(double(got[i]) - double(want[i]));
    if (!(diff <= factor * bound[i]) && bad++ < 3)
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << want[i] << " within "
                    << factor * bound[i];
  }
  EXPECT_EQ(bad, 0) << what << ": elements out of bounds";
}

// ---- forward and backward against tf::cpu -------------------------------------------------------

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

class SimtAttentionVsCpu : public ::testing::TestWithParam<Case> {};

// Both backward implementations get tf::cpu's saved out and lse, so that each is compared on the
// same inputs and the bounds of one backward apply.
TEST_P(SimtAttentionVsCpu, ForwardAndBackwardMatchTheCpu) {
  const Case c = GetParam();
  AttentionShape s = make_shape(c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
  s.window = c.window;
  const Inputs in(s, c.docs, 1234 + uint64_t(c.seq));
  const Forward cpu_fwd = cpu_forward(in);
  const Forward sim_fwd = simt_forward(in);
  const ForwardBounds fb = forward_bounds(in);
  expect_within("out", sim_fwd.out, cpu_fwd.out, fb.out, 2.0);
  expect_within("lse", sim_fwd.lse, cpu_fwd.lse, fb.lse, 2.0);

  const Grads cpu_grads = cpu_backward(in, cpu_fwd);
  const Grads sim_grads = simt_backward(in, cpu_fwd, zero_grads(in));
  const GradBounds gb = backward_bounds(in, cpu_fwd);
  expect_within("dq", sim_grads.dq, cpu_grads.dq, gb.dq, 2.0);
  expect_within("dk", sim_grads.dk, cpu_grads.dk, gb.dk, 2.0);
  expect_within("dv", sim_grads.dv, cpu_grads.dv, gb.dv, 2.0);
}

// Sequences of one token, of less than one 16-row tile, of exactly one, of two and a bit; head
// dims 12, 20, 72 and 128; GQA groups of 1, 2 and 4.
INSTANTIATE_TEST_SUITE_P(
    Shapes, SimtAttentionVsCpu,
    ::testing::Values(Case{2, 1, 4, 2, 12, Docs::None}, Case{2, 1, 4, 2, 12, Docs::Packed},
                      Case{2, 7, 4, 4, 20, Docs::None}, Case{2, 7, 4, 4, 20, Docs::Packed},
                      Case{2, 16, 2, 1, 20, Docs::Packed}, Case{2, 33, 4, 1, 72, Docs::Packed},
                      Case{2, 40, 4, 2, 12, Docs::Interleaved}, Case{1, 37, 4, 2, 20, Docs::None},
                      Case{1, 17, 2, 1, 128, Docs::Packed},
                      // Sliding windows of one key, of less than a 16-key tile and of more, with
                      // GQA 3 and packed documents; one as long as the sequence.
                      Case{1, 40, 6, 2, 12, Docs::None, 1}, Case{2, 40, 6, 2, 12, Docs::Packed, 5},
                      Case{1, 40, 6, 2, 20, Docs::None, 17}, Case{1, 33, 4, 2, 12, Docs::Interleaved, 33}),
    [](const ::testing::TestParamInfo<Case>& p) { return case_name(p.param); });

// The f32 backward on the simulator against float64 central differences of the float64 reference
// forward, for L = sum(out * d_out), given the reference's out and lse rounded to f32. Their
// rounding is within the C and |lse| terms of the backward bound; the differences are accurate to
// about 1e-10 (see numeric_gradient), covered by the 1e-8 added.
TEST(SimtAttention, BackwardMatchesFiniteDifferences) {
  for (const Docs docs : {Docs::None, Docs::Packed}) {
    const Inputs in(make_shape(2, 6, 4, 2, 3), docs, 555);
    std::vector<double> q = test::to_double(in.q), k = test::to_double(in.k), v = test::to_double(in.v),
                        w = test::to_double(in.d_out);
    std::vector<double> out(in.q_size()), lse(in.lse_size());
    auto loss = [&] {
      ref::attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), in.doc_ptr(),
                                     in.s);
      double l = 0;
      for (size_t i = 0; i < out.size(); ++i) l += out[i] * w[i];
      return l;
    };
    loss();
    const Forward saved{std::vector<float>(out.begin(), out.end()),
                        std::vector<float>(lse.begin(), lse.end())};
    const Grads g = simt_backward(in, saved, zero_grads(in));
    const GradBounds gb = backward_bounds(in, saved);
    auto with_fd_error = [](std::vector<double> b) {
      for (double& x : b) x += 1e-8;
      return b;
    };
    auto as_float = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    // The differences are compared in double: rounding them to f32 adds u |gradient|.
    const std::vector<double> fd_q = test::numeric_gradient(q, loss), fd_k = test::numeric_gradient(k, loss),
                              fd_v = test::numeric_gradient(v, loss);
    auto check = [&](const char* what, const std::vector<float>& got, const std::vector<double>& fd,
                     const std::vector<double>& bound) {
      std::vector<double> b = with_fd_error(bound);
      for (size_t i = 0; i < b.size(); ++i) b[i] += kU * std::fabs(fd[i]);
      expect_within(what, got, as_float(fd), b, 1.0);
    };
    check("dq", g.dq, fd_q, gb.dq);
    check("dk", g.dk, fd_k, gb.dk);
    check("dv", g.dv, fd_v, gb.dv);
  }
}

// The backward adds into its outputs: from nonzero starts the result is start + gradient, within
// the one rounding of that addition (and one more where it is fused with the scaling): 2^-23 of
// |start| + |gradient|.
TEST(SimtAttention, BackwardAccumulates) {
  const Inputs in(make_shape(2, 20, 4, 2, 12), Docs::Packed, 77);
  const Forward saved = cpu_forward(in);
  const Grads zero_start = simt_backward(in, saved, zero_grads(in));
  const Grads start{random_floats(in.q_size(), 5), random_floats(in.kv_size(), 6),
                    random_floats(in.kv_size(), 7)};
  const Grads got = simt_backward(in, saved, start);
  test::expect_accumulated("dq", got.dq, start.dq, zero_start.dq);
  test::expect_accumulated("dk", got.dk, start.dk, zero_start.dk);
  test::expect_accumulated("dv", got.dv, start.dv, zero_start.dv);
}

// Each output element is summed by one thread in a fixed order, so the simulator's thread order
// (its seed) does not change a bit of any output.
TEST(SimtAttention, SameBitsForAnyThreadOrder) {
  const Inputs in(make_shape(2, 20, 4, 1, 12), Docs::Packed, 99);
  const uint64_t saved_seed = sim::seed();
  sim::set_seed(1);
  const Forward f1 = simt_forward(in);
  const Grads g1 = simt_backward(in, f1, zero_grads(in));
  sim::set_seed(2);
  const Forward f2 = simt_forward(in);
  const Grads g2 = simt_backward(in, f1, zero_grads(in));
  sim::set_seed(saved_seed);
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(f1.out, f2.out));
  EXPECT_TRUE(same(f1.lse, f2.lse));
  EXPECT_TRUE(same(g1.dq, g2.dq));
  EXPECT_TRUE(same(g1.dk, g2.dk));
  EXPECT_TRUE(same(g1.dv, g2.dv));
}

TEST(SimtAttention, EmptyBatchWritesNothing) {
  for (const AttentionShape& s : {make_shape(0, 5, 2, 1, 8), make_shape(2, 0, 2, 1, 8)}) {
    DeviceArray<float> guard_only(std::vector<float>(), "out");
    simt::attention_forward(guard_only.get(), guard_only.get(), guard_only.get(), guard_only.get(),
                            guard_only.get(), nullptr, s);
    simt::attention_backward(guard_only.get(), guard_only.get(), guard_only.get(), guard_only.get(),
                             guard_only.get(), guard_only.get(), guard_only.get(), guard_only.get(),
                             guard_only.get(), nullptr, s);
    guard_only.download("empty output");
  }
}

// The error names what is wrong: the same shape checks as tf::cpu, and a head_dim whose tiles do
// not fit in a block's shared memory.
TEST(SimtAttention, RejectsBadShapes) {
  DeviceArray<float> x(std::vector<float>(64), "x");
  float* p = x.get();
  auto message = [&](const AttentionShape& s) -> std::string {
    try {
      simt::attention_forward(p, p, p, p, p, nullptr, s);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(make_shape(1, 1, 3, 2, 4)).find("multiple of n_kv_heads"), std::string::npos);
  EXPECT_NE(message(make_shape(1, 1, 2, 2, 0)).find("head_dim must be positive"), std::string::npos);
  EXPECT_NE(message(make_shape(1, 1, 2, 2, 1000)).find("head_dim 1000 needs"), std::string::npos);
  EXPECT_THROW(simt::attention_backward(p, p, p, p, p, p, p, p, p, nullptr, make_shape(1, 1, 2, 2, 1000)),
               Error);
  EXPECT_THROW(simt::attention_cached_forward(p, p, p, p, 0, 1, 3, 2, 4, 0.5f, 0), Error);
  EXPECT_THROW(simt::attention_cached_forward(p, p, p, p, -1, 1, 2, 2, 4, 0.5f, 0), Error);
  x.download("x");
}

// ---- cached (decoding) forward ------------------------------------------------------------------

using test::cached_name;
using test::CachedCase;
using test::CachedInputs;

std::vector<float> simt_cached(const CachedInputs& in) {
  DeviceArray<float> q(in.q, "q"), k(in.k_cache, "k_cache"), v(in.v_cache, "v_cache");
  DeviceArray<float> out(nans(in.out_size()), "out");
  simt::attention_cached_forward(out.get(), q.get(), k.get(), v.get(), in.c.n_past, in.c.n_new, in.c.heads,
                                 in.c.kv_heads, in.c.head_dim, in.scale, in.c.window);
  return out.download("out");
}

class SimtAttentionCachedVsCpu : public ::testing::TestWithParam<CachedCase> {};

// The forward's bound (and factor 2) for query i against the cache rows its window holds.
TEST_P(SimtAttentionCachedVsCpu, MatchesTheCpu) {
  const CachedCase c = GetParam();
  const CachedInputs in(c, 4321 + uint64_t(c.n_past * 7 + c.n_new));
  const std::vector<float> got = simt_cached(in);
  std::vector<float> want(in.out_size());
  cpu::attention_cached_forward(want.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), c.n_past,
                                c.n_new, c.heads, c.kv_heads, c.head_dim, in.scale, c.window);
  const int64_t D = c.head_dim, group = c.heads / c.kv_heads;
  std::vector<double> bound(in.out_size());
  for (int64_t i = 0; i < c.n_new; ++i) {
    std::vector<int64_t> keys;
    for (int64_t j = ref::window_start(c.n_past + i, c.window); j <= c.n_past + i; ++j) keys.push_back(j);
    for (int64_t h = 0; h < c.heads; ++h) {
      const RowBound r =
          forward_row_bound(in.q.data() + (i * c.heads + h) * D, in.k_cache.data() + h / group * D,
                            in.v_cache.data() + h / group * D, c.kv_heads * D, keys, int(D), in.scale);
      std::copy(r.out.begin(), r.out.end(), bound.begin() + (i * c.heads + h) * D);
    }
  }
  expect_within("out", got, want, bound, 2.0);
}

// One token and a few after an empty, a one-row and a 37-row cache; a prefill of two tiles and a
// bit; GQA 1, 2 and 4; head dims 12, 20, 72 and 128.
INSTANTIATE_TEST_SUITE_P(Shapes, SimtAttentionCachedVsCpu,
                         ::testing::Values(CachedCase{0, 1, 4, 4, 12}, CachedCase{0, 5, 4, 2, 20},
                                           CachedCase{1, 1, 4, 1, 72}, CachedCase{37, 1, 4, 2, 20},
                                           CachedCase{37, 5, 4, 1, 12}, CachedCase{3, 33, 2, 2, 20},
                                           CachedCase{20, 3, 2, 1, 128}, CachedCase{60, 1, 6, 2, 12, 1},
                                           CachedCase{60, 3, 6, 2, 20, 5}, CachedCase{37, 5, 6, 2, 12, 17},
                                           CachedCase{3, 33, 6, 2, 20, 17}),
                         [](const ::testing::TestParamInfo<CachedCase>& p) { return cached_name(p.param); });

// A decoder's calls (a prefill of P tokens, then one token at a time against the cache so far)
// give exactly the training forward's rows: both run the one kernel over key tiles aligned to
// position 0, and a tile the mask hides from a row leaves its running sums unchanged (rescale 1,
// weights 0), so any difference is an indexing mistake. With and without a sliding window.
class SimtAttentionCachedWindow : public ::testing::TestWithParam<int> {};

TEST_P(SimtAttentionCachedWindow, PrefillThenStepsMatchTrainingForwardBitForBit) {
  const int64_t P = 18, T = 23;
  const int window = GetParam();
  const CachedInputs in(CachedCase{0, T, 4, 2, 20, window}, 777);
  const int64_t q_row = 4 * 20;
  AttentionShape s = make_shape(1, int(T), 4, 2, 20);
  s.window = window;
  Inputs train(s, Docs::None, 1);
  train.q = in.q;
  train.k.assign(in.k_cache.begin(), in.k_cache.begin() + T * 2 * 20);
  train.v.assign(in.v_cache.begin(), in.v_cache.begin() + T * 2 * 20);
  const Forward whole = simt_forward(train);

  DeviceArray<float> q(in.q, "q"), k(in.k_cache, "k_cache"), v(in.v_cache, "v_cache");
  DeviceArray<float> out(nans(in.out_size()), "out");
  auto step = [&](int64_t n_past, int64_t n_new) {
    simt::attention_cached_forward(out.get() + n_past * q_row, q.get() + n_past * q_row, k.get(), v.get(),
                                   n_past, n_new, 4, 2, 20, in.scale, window);
  };
  step(0, P);
  for (int64_t pos = P; pos < T; ++pos) step(pos, 1);
  const std::vector<float> cached = out.download("out");
  for (int64_t pos = 0; pos < T; ++pos) {
    EXPECT_EQ(0,
              std::memcmp(cached.data() + pos * q_row, whole.out.data() + pos * q_row, q_row * sizeof(float)))
        << "position " << pos;
  }
}

INSTANTIATE_TEST_SUITE_P(Windows, SimtAttentionCachedWindow, ::testing::Values(0, 5));

TEST(SimtAttentionCached, NoNewTokensWritesNothing) {
  const CachedInputs in(CachedCase{10, 0, 2, 1, 8}, 5);
  DeviceArray<float> k(in.k_cache, "k_cache"), v(in.v_cache, "v_cache"), out(std::vector<float>(), "out");
  simt::attention_cached_forward(out.get(), out.get(), k.get(), v.get(), 10, 0, 2, 1, 8, 0.5f, 0);
  out.download("out");
}

}  // namespace
}  // namespace tf
