// Tests: the flash attention forward and decode launchers (kernels/cuda/flash_attention_fwd.cu) on
// the SIMT simulator (tf::simt): out and lse against a float64 reference computed from the
// bf16-rounded q, k, v within a derived bound (tests/attention_test_util.h), and against tf::cpu's
// f32 op within that bound plus the inputs' bf16 rounding; sequences of 97 and 1025 tokens, head
// dims 64, 80, 96 and 128, GQA ratios 1, 2 and 4, batches of two, packed documents (boundaries
// inside tiles, documents of one token, a document spanning whole tiles); cached decoding against
// the same references and bit for bit against the training forward; the same bits for any thread
// order; rejected shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "kernels/sim/sim.h"
#include "src/core/error.h"
#include "tests/attention_test_util.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"

namespace tf {
namespace {

using test::Guarded;
using test::random_floats;

constexpr int kKeyTile = 64;  // the kernel's keys per tile

std::vector<float> nans(size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

// ---- error bounds -------------------------------------------------------------------------------
//
// test::flash_forward_bounds (tests/attention_test_util.h) derives them: against the exact result
// on the bf16-rounded inputs, twice what a naive kernel of the same precisions (bf16 P, f32 sums)
// would incur, and against tf::cpu that plus the inputs' rounding and tf::cpu's own f32 bound.

// |got - want| <= bound for every element (NaN fails); reports the first few misses.
void expect_within(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                   const std::vector<double>& bound) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(double(got[i]) - want[i]);
    if (!(diff <= bound[i]) && bad++ < 3)
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << want[i] << " within "
                    << bound[i];
  }
  EXPECT_EQ(bad, 0) << what << ": elements out of bounds";
}

std::vector<double> as_double(const std::vector<float>& x) {
  return {x.begin(), x.end()};
}

// ---- training forward ---------------------------------------------------------------------------

// Short: documents of 1, 1, 10, 52, 1, 33, ... tokens (the list starts one entry later in each
// sequence), so boundaries fall inside key tiles, on a tile edge, and documents of one token sit
// between others. Long: 150, 1, 49: one document spans whole key tiles (unmasked below the
// diagonal) and later queries skip the tiles before their document.
enum class Layout { None, Packed, Interleaved, Short, Long };

std::vector<int32_t> doc_ids_of(Layout layout, int batch, int seq, uint64_t seed) {
  switch (layout) {
    case Layout::None: return {};
    case Layout::Packed: return test::make_doc_ids(batch, seq, test::Docs::Packed, seed);
    case Layout::Interleaved: return test::make_doc_ids(batch, seq, test::Docs::Interleaved, seed);
    case Layout::Short:
    case Layout::Long: break;
  }
  const std::vector<int> lengths = layout == Layout::Short ? std::vector<int>{1, 1, 10, 52, 1, 33, 2, 1, 40}
                                                           : std::vector<int>{150, 1, 49};
  std::vector<int32_t> ids;
  for (int b = 0; b < batch; ++b) {
    int32_t id = 100 * b;
    size_t next = size_t(b) % lengths.size();
    int left = lengths[next];
    for (int i = 0; i < seq; ++i) {
      if (left == 0) {
        next = (next + 1) % lengths.size();
        left = lengths[next];
        ++id;
      }
      ids.push_back(id);
      --left;
    }
  }
  return ids;
}

struct Case {
  int batch, seq, heads, kv_heads, head_dim;
  Layout layout;
  int window = 0;
};

std::string case_name(const Case& c) {
  const char* layouts[] = {"nodocs", "packed", "interleaved", "short", "long"};
  return "b" + std::to_string(c.batch) + "_s" + std::to_string(c.seq) + "_h" + std::to_string(c.heads) +
         "_kv" + std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) + "_" +
         layouts[int(c.layout)] + (c.window > 0 ? "_w" + std::to_string(c.window) : "");
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << case_name(c);
}

using test::make_shape;

// q and k in [-2, 2) make scores of a few units after scaling, so softmax rows are far from
// uniform and a wrong mask, head or lane shows.
struct Inputs {
  AttentionShape s;
  std::vector<float> q, k, v;
  std::vector<int32_t> doc;
  Inputs(const Case& c, uint64_t seed) : s(make_shape(c.batch, c.seq, c.heads, c.kv_heads, c.head_dim)) {
    s.window = c.window;
    const size_t tokens = size_t(c.batch) * size_t(c.seq);
    q = random_floats(tokens * size_t(c.heads * c.head_dim), seed, 2.0f);
    k = random_floats(tokens * size_t(c.kv_heads * c.head_dim), seed + 1, 2.0f);
    v = random_floats(tokens * size_t(c.kv_heads * c.head_dim), seed + 2);
    doc = doc_ids_of(c.layout, c.batch, c.seq, seed + 3);
  }
  const int32_t* doc_ptr() const { return doc.empty() ? nullptr : doc.data(); }
};

struct Forward {
  std::vector<float> out, lse;
};

// flash_attention_forward into NaN-filled outputs between guards, so an element it fails to write
// stays NaN and a stray write next to one shows.
Forward simt_flash(const Inputs& in) {
  Guarded<float> q(in.q, "q"), k(in.k, "k"), v(in.v, "v");
  Guarded<int32_t> doc(in.doc, "doc_ids");
  Guarded<float> out(nans(in.q.size()), "out"), lse(nans(in.q.size() / size_t(in.s.head_dim)), "lse");
  simt::flash_attention_forward(out.get(), lse.get(), q.get(), k.get(), v.get(),
                                in.doc.empty() ? nullptr : doc.get(), in.s);
  EXPECT_TRUE(out.guards_intact() && lse.guards_intact()) << "a write outside out or lse";
  return {out.download(), lse.download()};
}

struct Expected {
  std::vector<double> out_exact, lse_exact;  // float64 on the bf16-rounded inputs
  std::vector<float> out_cpu, lse_cpu;       // tf::cpu on the f32 inputs
  test::FlashBounds bounds;
};

Expected expected(const Inputs& in) {
  const AttentionShape& s = in.s;
  const std::vector<double> qd = as_double(test::bf16_rounded(in.q)),
                            kd = as_double(test::bf16_rounded(in.k)),
                            vd = as_double(test::bf16_rounded(in.v));
  const size_t n_rows = in.q.size() / size_t(s.head_dim);
  Expected e{std::vector<double>(in.q.size()), std::vector<double>(n_rows), std::vector<float>(in.q.size()),
             std::vector<float>(n_rows), test::flash_forward_bounds(s, in.q, in.k, in.v, in.doc, kKeyTile)};
  ref::attention_forward<double>(e.out_exact.data(), e.lse_exact.data(), qd.data(), kd.data(), vd.data(),
                                 in.doc_ptr(), s);
  cpu::attention_forward(e.out_cpu.data(), e.lse_cpu.data(), in.q.data(), in.k.data(), in.v.data(),
                         in.doc_ptr(), s);
  return e;
}

class SimtFlashForward : public ::testing::TestWithParam<Case> {};

TEST_P(SimtFlashForward, MatchesTheReferenceOnBf16InputsAndTheCpu) {
  const Case c = GetParam();
  const Inputs in(c, 2024 + uint64_t(c.seq * 7 + c.head_dim));
  const Forward got = simt_flash(in);
  const Expected want = expected(in);
  expect_within("out vs float64 on bf16 inputs", got.out, want.out_exact, want.bounds.exact.out);
  expect_within("lse vs float64 on bf16 inputs", got.lse, want.lse_exact, want.bounds.exact.lse);
  expect_within("out vs tf::cpu", got.out, as_double(want.out_cpu), want.bounds.vs_f32.out);
  expect_within("lse vs tf::cpu", got.lse, as_double(want.lse_cpu), want.bounds.vs_f32.lse);
}

// 97 and 200 tokens end mid-tile (97 rows per head, 194 or 388 packed rows per kv head); 1025 is
// one row past 16 tiles. GQA groups of 1, 2 and 4 with more than one kv head, so a query head
// reading another group's kv head shows.
INSTANTIATE_TEST_SUITE_P(
    Shapes, SimtFlashForward,
    ::testing::Values(Case{2, 97, 2, 2, 64, Layout::None}, Case{1, 97, 4, 2, 80, Layout::Packed},
                      Case{2, 97, 4, 1, 96, Layout::Short}, Case{1, 97, 8, 2, 128, Layout::Interleaved},
                      Case{2, 50, 8, 2, 128, Layout::Short}, Case{1, 200, 4, 2, 64, Layout::Long},
                      Case{2, 33, 6, 3, 80, Layout::None}, Case{1, 1025, 1, 1, 64, Layout::None},
                      // Sliding windows (GQA 3): of one key; ending inside a 64-key tile, with
                      // documents; spanning tiles, so some tiles are skipped, some masked, some not.
                      Case{1, 97, 6, 2, 64, Layout::None, 1}, Case{1, 97, 6, 2, 64, Layout::Short, 17},
                      Case{1, 200, 3, 1, 64, Layout::None, 70}),
    [](const ::testing::TestParamInfo<Case>& p) { return case_name(p.param); });

// Each output element is summed by one thread in a fixed order, so the simulator's thread order
// (its seed) does not change a bit.
TEST(SimtFlashForward, SameBitsForAnyThreadOrder) {
  const Inputs in(Case{2, 70, 4, 2, 64, Layout::Short}, 99);
  const uint64_t saved_seed = sim::seed();
  sim::set_seed(1);
  const Forward f1 = simt_flash(in);
  sim::set_seed(2);
  const Forward f2 = simt_flash(in);
  sim::set_seed(saved_seed);
  EXPECT_EQ(test::first_difference(f1.out, f2.out), -1);
  EXPECT_EQ(test::first_difference(f1.lse, f2.lse), -1);
}

TEST(SimtFlashForward, EmptyBatchWritesNothing) {
  for (const AttentionShape& s : {make_shape(0, 5, 2, 1, 64), make_shape(2, 0, 2, 1, 64)}) {
    Guarded<float> guard_only(std::vector<float>(), "empty");
    simt::flash_attention_forward(guard_only.get(), guard_only.get(), guard_only.get(), guard_only.get(),
                                  guard_only.get(), nullptr, s);
    EXPECT_TRUE(guard_only.guards_intact());
  }
}

TEST(SimtFlashForward, RejectsBadShapes) {
  Guarded<float> x(std::vector<float>(64), "x");
  float* p = x.get();
  auto forward = [&](const AttentionShape& s) {
    return test::error_of([&] { simt::flash_attention_forward(p, p, p, p, p, nullptr, s); });
  };
  EXPECT_NE(forward(make_shape(1, 1, 2, 2, 72))
                .find("flash_attention_forward takes head_dim 64, 80, 96 or 128, got 72"),
            std::string::npos);
  EXPECT_NE(forward(make_shape(1, 1, 3, 2, 64)).find("multiple of n_kv_heads"), std::string::npos);
  EXPECT_NE(forward(make_shape(1, -1, 2, 2, 64)).find("must be non-negative"), std::string::npos);
  auto cached = [&](int64_t n_past, int heads, int head_dim) {
    return test::error_of(
        [&] { simt::flash_attention_cached_forward(p, p, p, p, n_past, 1, heads, 1, head_dim, 0.5f, 0); });
  };
  EXPECT_NE(cached(0, 2, 32).find("flash_attention_cached_forward takes head_dim 64, 80, 96 or 128, got 32"),
            std::string::npos);
  EXPECT_NE(cached(-1, 2, 64).find("must be non-negative"), std::string::npos);
  EXPECT_TRUE(x.guards_intact());
}

// ---- cached (decoding) forward ------------------------------------------------------------------

using test::cached_name;
using test::CachedCase;
using test::CachedInputs;

std::vector<float> simt_cached(const CachedInputs& in) {
  Guarded<float> q(in.q, "q"), k(in.k_cache, "k_cache"), v(in.v_cache, "v_cache");
  Guarded<float> out(nans(in.out_size()), "out");
  simt::flash_attention_cached_forward(out.get(), q.get(), k.get(), v.get(), in.c.n_past, in.c.n_new,
                                       in.c.heads, in.c.kv_heads, in.c.head_dim, in.scale, in.c.window);
  EXPECT_TRUE(out.guards_intact()) << "a write outside out";
  return out.download();
}

class SimtFlashCached : public ::testing::TestWithParam<CachedCase> {};

// Query i against the cache rows its window holds, with the training forward's bounds.
TEST_P(SimtFlashCached, MatchesTheReferenceOnBf16InputsAndTheCpu) {
  const CachedCase c = GetParam();
  const CachedInputs in(c, 4321 + uint64_t(c.n_past * 7 + c.n_new));
  const std::vector<float> got = simt_cached(in);
  const std::vector<float> qr = test::bf16_rounded(in.q), kr = test::bf16_rounded(in.k_cache),
                           vr = test::bf16_rounded(in.v_cache);
  const std::vector<double> qd = as_double(qr), kd = as_double(kr), vd = as_double(vr);
  std::vector<double> exact(in.out_size());
  std::vector<float> cpu_out(in.out_size());
  ref::attention_cached_forward<double>(exact.data(), qd.data(), kd.data(), vd.data(), c.n_past, c.n_new,
                                        c.heads, c.kv_heads, c.head_dim, in.scale, c.window);
  cpu::attention_cached_forward(cpu_out.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), c.n_past,
                                c.n_new, c.heads, c.kv_heads, c.head_dim, in.scale, c.window);
  const int64_t D = c.head_dim, group = c.heads / c.kv_heads, kv_row = c.kv_heads * D;
  std::vector<double> bound_exact(in.out_size()), bound_cpu(in.out_size());
  for (int64_t i = 0; i < c.n_new; ++i) {
    std::vector<int64_t> keys;
    for (int64_t j = ref::window_start(c.n_past + i, c.window); j <= c.n_past + i; ++j) keys.push_back(j);
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t row = i * c.heads + h, kv0 = h / group * D;
      const test::FlashRowBound r = test::flash_forward_row_bound(
          in.q.data() + row * D, qr.data() + row * D, in.k_cache.data() + kv0, kr.data() + kv0,
          in.v_cache.data() + kv0, vr.data() + kv0, kv_row, keys, int(D), in.scale, kKeyTile);
      std::copy(r.out_exact.begin(), r.out_exact.end(), bound_exact.begin() + row * D);
      std::copy(r.out_vs_f32.begin(), r.out_vs_f32.end(), bound_cpu.begin() + row * D);
    }
  }
  expect_within("out vs float64 on bf16 inputs", got, exact, bound_exact);
  expect_within("out vs tf::cpu", got, as_double(cpu_out), bound_cpu);
}

// One token after an empty cache, after 37 rows (not a multiple of the 64-key tile) and after two
// tiles and a bit; several new tokens after 100 and 70 rows; a 40-token prefill; GQA 1, 2 and 4.
INSTANTIATE_TEST_SUITE_P(Shapes, SimtFlashCached,
                         ::testing::Values(CachedCase{0, 1, 4, 1, 64}, CachedCase{37, 1, 8, 2, 128},
                                           CachedCase{130, 1, 4, 4, 64}, CachedCase{100, 5, 4, 2, 80},
                                           CachedCase{70, 20, 2, 2, 96}, CachedCase{0, 40, 4, 1, 64},
                                           CachedCase{200, 1, 6, 2, 64, 17}, CachedCase{150, 3, 3, 1, 64, 70},
                                           CachedCase{10, 40, 6, 2, 64, 5}),
                         [](const ::testing::TestParamInfo<CachedCase>& p) { return cached_name(p.param); });

// A decoder's calls (a prefill of P tokens, then one token at a time against the cache so far)
// give exactly the training forward's rows: both walk key tiles from position 0 with the same
// bf16 operands, and a tile the causal mask hides from a row leaves its sums unchanged (factor 1,
// weights 0), so any difference is an indexing mistake.
TEST(SimtFlashCached, PrefillThenStepsMatchTrainingForwardBitForBit) {
  const int64_t P = 70, T = 80;
  const int H = 4, KV = 2, D = 64;
  const CachedInputs in(CachedCase{0, T, H, KV, D}, 777);
  const int64_t q_row = H * D;
  Inputs train(Case{1, int(T), H, KV, D, Layout::None}, 1);
  train.q = in.q;
  train.k.assign(in.k_cache.begin(), in.k_cache.begin() + T * KV * D);
  train.v.assign(in.v_cache.begin(), in.v_cache.begin() + T * KV * D);
  const Forward whole = simt_flash(train);

  Guarded<float> q(in.q, "q"), k(in.k_cache, "k_cache"), v(in.v_cache, "v_cache");
  Guarded<float> out(nans(in.out_size()), "out");
  auto step = [&](int64_t n_past, int64_t n_new) {
    simt::flash_attention_cached_forward(out.get() + n_past * q_row, q.get() + n_past * q_row, k.get(),
                                         v.get(), n_past, n_new, H, KV, D, in.scale, 0);
  };
  step(0, P);
  for (int64_t pos = P; pos < T; ++pos) step(pos, 1);
  const std::vector<float> cached = out.download();
  for (int64_t pos = 0; pos < T; ++pos) {
    const std::vector<float> a(cached.begin() + pos * q_row, cached.begin() + (pos + 1) * q_row),
        b(whole.out.begin() + pos * q_row, whole.out.begin() + (pos + 1) * q_row);
    EXPECT_EQ(test::first_difference(a, b), -1) << "position " << pos;
  }
}

TEST(SimtFlashCached, NoNewTokensWritesNothing) {
  const CachedInputs in(CachedCase{10, 0, 2, 1, 64}, 5);
  Guarded<float> k(in.k_cache, "k_cache"), v(in.v_cache, "v_cache"), out(std::vector<float>(), "out");
  simt::flash_attention_cached_forward(out.get(), out.get(), k.get(), v.get(), 10, 0, 2, 1, 64, 0.125f, 0);
  EXPECT_TRUE(out.guards_intact());
}

}  // namespace
}  // namespace tf
