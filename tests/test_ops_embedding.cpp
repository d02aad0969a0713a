// Tests: tf::cpu::embedding_forward / embedding_backward against tf::ref (f32, bf16, f16 tables,
// repeated tokens), quantized tables (every ggml type, NF4 / INT8 rows that start mid-block)
// against the whole table dequantized, the backward against float64 finite differences, and
// out-of-range token ids and malformed quantized tables.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/ref/embedding.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
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

// A quantized vocab x dim table of random codes with finite scales (f16 scales of every ggml block
// drawn from [-1, 1], positive f32 absmax), and the whole table dequantized by the per-format
// references of kernels/cpu/dequant.h and kernels/cpu/ref/quantize.h, independently of the tile
// dequantizer the embedding uses.
struct QuantTable {
  std::vector<uint8_t> codes;
  std::vector<float> absmax, nested;
  std::vector<uint8_t> absmax_codes;
  WeightRef ref;
  std::vector<float> full;

  QuantTable(DType t, int64_t vocab, int64_t dim, uint64_t seed, bool double_quant = false) {
    Philox rng(seed, 0xe4);
    const int64_t n = vocab * dim;
    codes.resize(size_t(dtype_bytes(t, n)));
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = uint8_t(rng.u32(i));
    full.resize(size_t(n));
    QuantScales s;
    if (t == DType::NF4 || t == DType::INT8) {
      const int64_t blocks = ref::quant_blocks(n, 64);
      absmax = random_floats(size_t(blocks), seed + 1);
      for (float& a : absmax) a = std::fabs(a) + 0.01f;
      if (double_quant) {
        absmax_codes.assign(codes.begin(), codes.begin() + blocks);
        nested = random_floats(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)), seed + 2);
        s = {absmax_codes.data(), nested.data(), 0.125f};
        ref::dequantize_double_absmax(absmax_codes.data(), nested.data(), 0.125f, blocks, absmax.data());
      } else {
        s.absmax = absmax.data();
      }
      if (t == DType::NF4) ref::dequantize_nf4(codes.data(), absmax.data(), n, full.data());
      if (t == DType::INT8)
        ref::dequantize_int8(reinterpret_cast<int8_t*>(codes.data()), absmax.data(), n, full.data());
    } else {
      const size_t d = t == DType::Q2_K   ? offsetof(BlockQ2_K, d)
                       : t == DType::Q3_K ? offsetof(BlockQ3_K, d)
                       : t == DType::Q6_K ? offsetof(BlockQ6_K, d)
                                          : 0;
      const bool has_min =
          t == DType::Q4_1 || t == DType::Q5_1 || t == DType::Q2_K || t == DType::Q4_K || t == DType::Q5_K;
      const int64_t bytes = dtype_block_bytes(t);
      for (int64_t b = 0; b < int64_t(codes.size()) / bytes; ++b)
        for (size_t f = 0; f < (has_min ? 2u : 1u); ++f) {
          const uint16_t h = f32_to_f16(2.0f * rng.uniform(uint64_t(2 * b + int64_t(f)) + (1u << 30)) - 1.0f);
          std::memcpy(&codes[size_t(b * bytes) + d + 2 * f], &h, 2);
        }
      ref::dequantize_rows(*ggml_of_dtype(t), codes.data(), n, full.data());
    }
    ref = WeightRef(codes.data(), t, vocab, dim, s);
  }
};

TEST(Embedding, QuantizedTablesGiveTheirDequantizedRows) {
  // Dequantization is exact arithmetic on the stored codes: every version must give the bits of the
  // whole-table dequantization. An odd dim makes NF4 / INT8 rows start inside a scale block and
  // every other NF4 row on the low nibble of a byte.
  const int64_t vocab = 37, n = 60;
  const std::vector<int32_t> tokens = make_tokens(n, vocab, 9);
  std::vector<QuantTable> tables;
  for (DType t : {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q2_K, DType::Q3_K,
                  DType::Q4_K, DType::Q5_K, DType::Q6_K})
    tables.emplace_back(t, vocab, 2 * dtype_block_elems(t), uint64_t(t));
  tables.emplace_back(DType::NF4, vocab, 33, 20);
  tables.emplace_back(DType::INT8, vocab, 33, 21);
  tables.emplace_back(DType::NF4, vocab, 576, 22);
  for (const QuantTable& table : tables) {
    const int64_t dim = table.ref.cols;
    SCOPED_TRACE(std::string(dtype_name(table.ref.dtype)) + " dim " + std::to_string(dim));
    std::vector<float> want(size_t(n * dim));
    for (int64_t i = 0; i < n; ++i)
      std::copy_n(table.full.begin() + tokens[size_t(i)] * dim, dim, want.begin() + i * dim);
    std::vector<float> got(want.size(), -1.0f);
    ref::embedding_forward(got.data(), tokens.data(), n, table.ref);
    EXPECT_EQ(got, want) << "reference";
    std::fill(got.begin(), got.end(), -1.0f);
    cpu::embedding_forward(got.data(), tokens.data(), n, table.ref);
    EXPECT_EQ(got, want) << "fast";
    cpu::ScopedPortableKernels portable;
    std::fill(got.begin(), got.end(), -1.0f);
    cpu::embedding_forward(got.data(), tokens.data(), n, table.ref);
    EXPECT_EQ(got, want) << "fast, portable kernels";
  }
}

TEST(Embedding, DoubleQuantizedNf4TableRoundsAsBitsandbytes) {
  // The nested absmax is dequantized and then offset, two roundings (ref::dequantize_double_absmax).
  const int64_t vocab = 300, dim = 65, n = 40;
  const QuantTable table(DType::NF4, vocab, dim, 23, true);
  const std::vector<int32_t> tokens = make_tokens(n, vocab, 10);
  std::vector<float> got(size_t(n * dim)), want(got.size());
  for (int64_t i = 0; i < n; ++i)
    std::copy_n(table.full.begin() + tokens[size_t(i)] * dim, dim, want.begin() + i * dim);
  cpu::embedding_forward(got.data(), tokens.data(), n, table.ref);
  EXPECT_EQ(got, want);
}

TEST(Embedding, RejectsMalformedQuantizedTables) {
  const QuantTable table(DType::Q4_0, 4, 64, 1);
  std::vector<float> out(4 * 64, 5.0f);
  const std::vector<int32_t> tokens = {1, 2};
  const auto expect_error = [&](const WeightRef& t, const std::string& needle) {
    for (bool fast : {true, false}) {
      try {
        fast ? cpu::embedding_forward(out.data(), tokens.data(), 2, t)
             : ref::embedding_forward(out.data(), tokens.data(), 2, t);
        ADD_FAILURE() << "accepted: " << needle;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    }
  };
  expect_error({table.codes.data(), DType::Q4_0, 8, 16},
               "q4_0 rows of 16 elements are not whole blocks of 32");
  expect_error({table.codes.data(), DType::NF4, 4, 64}, "nf4 weight without its absmax");
  expect_error({table.codes.data(), DType::I32, 4, 16}, "i32");
  EXPECT_EQ(out, std::vector<float>(out.size(), 5.0f));  // nothing written before the checks
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
