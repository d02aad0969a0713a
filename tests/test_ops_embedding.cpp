// Tests: tf::cpu::embedding_forward / embedding_backward against tf::ref (f32, bf16, f16 tables,
// repeated tokens), the backward against float64 finite differences, and out-of-range token ids.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/cpu/ref/embedding.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;

namespace {

std::vector<int32_t> make_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Philox rng(seed, 0xe3);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(vocab));
  return t;
}

TEST(Embedding, ForwardFastMatchesReferenceExactly) {
  // Widening bf16/f16 to f32 is exact, so both versions must give the same bits.
  const int64_t vocab = 1025, dim = 33, n = 100;
  const std::vector<float> values = random_floats(size_t(vocab * dim), 1);
  const std::vector<uint16_t> bf16 = test::to_bf16(values);
  std::vector<uint16_t> f16(values.size());
  for (size_t i = 0; i < values.size(); ++i) f16[i] = f32_to_f16(values[i]);
  const std::vector<int32_t> tokens = make_tokens(n, vocab, 2);
  const WeightRef tables[] = {{values.data(), DType::F32, vocab, dim},
                              {bf16.data(), DType::BF16, vocab, dim},
                              {f16.data(), DType::F16, vocab, dim}};
  for (const WeightRef& table : tables) {
    SCOPED_TRACE(std::string(dtype_name(table.dtype)));
    std::vector<float> fast(size_t(n * dim), -1.0f), want(size_t(n * dim), -2.0f);
    cpu::embedding_forward(fast.data(), tokens.data(), n, table);
    ref::embedding_forward(want.data(), tokens.data(), n, table);
    EXPECT_EQ(fast, want);
    // Spot-check the reference itself: row 7 is the table row of tokens[7].
    for (int64_t d = 0; d < dim; ++d) {
      const size_t src = size_t(tokens[7] * dim + d);
      const float expect = table.dtype == DType::F32    ? values[src]
                           : table.dtype == DType::BF16 ? bf16_to_f32(bf16[src])
                                                        : f16_to_f32(f16[src]);
      EXPECT_EQ(want[size_t(7 * dim + d)], expect);
    }
  }
}

TEST(Embedding, BackwardFastMatchesReferenceWithRepeatedTokens) {
  // 1025 tokens over a vocabulary of 33: every id repeats ~30 times, so the scatter-add must not
  // race. dim 100 spans two column blocks, and the size crosses the parallel threshold. Each
  // element sums its tokens in order in both versions, so the bits agree. Only the .threads2 run
  // of this test has two threads that could race, and a race need not show on every run.
  const int64_t vocab = 33, dim = 100, n = 1025;
  const std::vector<int32_t> tokens = make_tokens(n, vocab, 3);
  const std::vector<float> d_out = random_floats(size_t(n * dim), 4);
  const std::vector<float> start = random_floats(size_t(vocab * dim), 5);
  std::vector<float> fast = start, want = start;
  cpu::embedding_backward(fast.data(), d_out.data(), tokens.data(), n, vocab, dim);
  ref::embedding_backward(want.data(), d_out.data(), tokens.data(), n, vocab, dim);
  EXPECT_EQ(fast, want);
  EXPECT_GT(test::rel_norm_error(want, start), 1.0);  // the gradients really were added
}

TEST(Embedding, BackwardMatchesFiniteDifferences) {
  const int64_t vocab = 7, dim = 5, n = 9;
  std::vector<double> table = test::to_double(random_floats(size_t(vocab * dim), 6));
  const std::vector<double> g = test::to_double(random_floats(size_t(n * dim), 7));
  std::vector<int32_t> tokens = make_tokens(n, vocab, 8);
  tokens[4] = tokens[1];  // a repeated id accumulates two rows
  const auto read = [&table, dim](int64_t v, int64_t d) { return table[size_t(v * dim + d)]; };
  // L = sum G * out: its gradient with respect to the table is embedding_backward(G).
  const auto loss = [&] {
    std::vector<double> out(size_t(n * dim));
    ref::embedding_forward_loops(out.data(), tokens.data(), n, read, vocab, dim);
    double l = 0;
    for (size_t i = 0; i < out.size(); ++i) l += g[i] * out[i];
    return l;
  };
  std::vector<double> grad(table.size(), 0.0);
  ref::embedding_backward<double>(grad.data(), g.data(), tokens.data(), n, vocab, dim);
  // L is linear in the table: central differences are exact up to ~1e-16 * |L| / h rounding.
  EXPECT_LE(test::rel_norm_error(grad, test::numeric_gradient(table, loss)), 1e-8);
}

TEST(Embedding, RejectsOutOfRangeTokenIds) {
  const int64_t vocab = 10, dim = 4;
  const std::vector<float> table(size_t(vocab * dim), 1.0f);
  std::vector<float> out(size_t(3 * dim)), d_table(table.size());
  for (int32_t bad : {10, -1, -100}) {
    const std::vector<int32_t> tokens = {0, 9, bad};
    const auto expect_error = [bad](const auto& call) {
      try {
        call();
        ADD_FAILURE() << "token id " << bad << " was accepted";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("token id " + std::to_string(bad)), std::string::npos) << msg;
        EXPECT_NE(msg.find("position 2"), std::string::npos) << msg;
      }
    };
    const WeightRef w{table.data(), DType::F32, vocab, dim};
    expect_error([&] { cpu::embedding_forward(out.data(), tokens.data(), 3, w); });
    expect_error([&] { ref::embedding_forward(out.data(), tokens.data(), 3, w); });
    expect_error([&] { cpu::embedding_backward(d_table.data(), out.data(), tokens.data(), 3, vocab, dim); });
    expect_error([&] { ref::embedding_backward(d_table.data(), out.data(), tokens.data(), 3, vocab, dim); });
  }
  EXPECT_EQ(d_table, std::vector<float>(table.size(), 0.0f));  // nothing written before the check
}

}  // namespace
