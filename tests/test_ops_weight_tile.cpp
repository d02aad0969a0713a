// Tests: tf::cpu::dequantize_weight_tile against tf::ref bit for bit for every storage dtype
// (AVX-512, AVX2 and portable paths, awkward tiles, NF4 / INT8 rows that start mid-block and mid-byte,
// every f16 bit pattern); tf::cpu::quant_gemv and quant_gemv_t against a dequantize-then-dot
// reference within a derived rounding bound, for 1..8 tokens and beta 0 / 1, with the same bits on
// one and two threads; their input errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/quant_gemv.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/op_test_util.h"
#include "tests/quant_test_util.h"

using namespace tf;

namespace {

constexpr DType kGgmlTypes[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                                DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K};

// A random finite f16 bit pattern: any sign, subnormals and the largest values included.
uint16_t random_finite_f16(Philox& rng, uint64_t i) {
  uint16_t h = uint16_t(rng.u32(i));
  if (((h >> 10) & 0x1f) == 0x1f) h = uint16_t(h & ~0x4000u);
  return h;
}

using tf::test::f16_fields;

// A rows x cols weight of any dtype: random codes, and random finite scales so that every value
// is a number and exact comparisons mean something.
struct TestWeight {
  DType dtype;
  int64_t rows, cols;
  bool nested = false;
  std::vector<uint8_t> data;
  std::vector<float> absmax;          // f32 absmax, or the nested scales with double quantization
  std::vector<uint8_t> absmax_codes;  // double quantization only
  float offset = 0.0f;

  TestWeight(DType t, int64_t r, int64_t c, uint64_t seed, bool double_quant = false)
      : dtype(t), rows(r), cols(c), nested(double_quant) {
    Philox rng(seed, 0x71e);
    const int64_t n = rows * cols;
    if (t == DType::F32 || t == DType::BF16 || t == DType::F16) {
      const std::vector<float> v = test::random_floats(size_t(n), seed, 3.0f);
      data.resize(size_t(n) * dtype_size(t));
      for (int64_t i = 0; i < n; ++i) {
        if (t == DType::F32) std::memcpy(&data[size_t(4 * i)], &v[size_t(i)], 4);
        const uint16_t h = t == DType::BF16 ? f32_to_bf16(v[size_t(i)]) : random_finite_f16(rng, uint64_t(i));
        if (t != DType::F32) std::memcpy(&data[size_t(2 * i)], &h, 2);
      }
      return;
    }
    data.resize(size_t(dtype_bytes(t, n)));
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i + (1u << 30)));
    if (t == DType::NF4 || t == DType::INT8) {
      const int64_t blocks = ref::quant_blocks(n, dtype_block_elems(t));
      absmax = test::random_floats(size_t(blocks), seed + 1, 2.0f);
      for (float& a : absmax) a = std::fabs(a) + 0.01f;
      if (nested) {
        for (int64_t b = 0; b < blocks; ++b)
          absmax_codes.push_back(uint8_t(rng.u32(uint64_t(b) + (1u << 31))));
        absmax = test::random_floats(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)), seed + 2, 0.5f);
        offset = 0.3125f + absmax[0];
      }
      return;
    }
    const int64_t block_bytes = dtype_block_bytes(t);
    for (int64_t b = 0; b < int64_t(data.size()) / block_bytes; ++b)
      for (size_t f : f16_fields(t)) {
        const uint16_t h = random_finite_f16(rng, uint64_t(b * 4 + int64_t(f)) + (1ull << 40));
        std::memcpy(&data[size_t(b * block_bytes) + f], &h, 2);
      }
  }

  WeightRef ref() const {
    QuantScales s;
    if (nested) {
      s.absmax = absmax_codes.data();
      s.nested = absmax.data();
      s.offset = offset;
    } else if (!absmax.empty()) {
      s.absmax = absmax.data();
    }
    return {data.data(), dtype, rows, cols, s};
  }
};

std::vector<uint32_t> bits_of(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// The tile [r0, r0 + n_rows) x [c0, c0 + n_cols) through the given implementation into a buffer
// with ld = n_cols + 3, whose padding must stay untouched.
template <typename Fn>
std::vector<float> tile(Fn&& fn, const WeightRef& W, int64_t r0, int64_t n_rows, int64_t c0, int64_t n_cols) {
  const int64_t ld = n_cols + 3;
  std::vector<float> out(size_t(n_rows * ld), -7.5f);
  fn(out.data(), ld, W, r0, n_rows, c0, n_cols);
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = n_cols; c < ld; ++c) EXPECT_EQ(out[size_t(r * ld + c)], -7.5f) << "padding written";
  return out;
}

// The decoders a test runs: the CPU's own (AVX-512 where it has it, else AVX2 where it has that),
// AVX2 in place of AVX-512, and the portable ones.
enum class Path { Default, Avx2, Portable };
constexpr Path kPaths[] = {Path::Default, Path::Avx2, Path::Portable};

const char* path_name(Path p) {
  return p == Path::Default ? "default path" : p == Path::Avx2 ? "avx2 path" : "portable path";
}

// Runs f with the decoders of path p.
template <class F>
void on_path(Path p, F&& f) {
  std::optional<cpu::ScopedAvx2Kernels> avx2;
  std::optional<cpu::ScopedPortableKernels> portable;
  if (p == Path::Avx2) avx2.emplace();
  if (p == Path::Portable) portable.emplace();
  f();
}

// Every path of cpu::dequantize_weight_tile (AVX-512 where the CPU has it, AVX2, the portable one)
// gives the reference's bits on the tile.
void expect_tile_matches_reference(const WeightRef& W, int64_t r0, int64_t n_rows, int64_t c0,
                                   int64_t n_cols) {
  SCOPED_TRACE(std::string(dtype_name(W.dtype)) + " " + std::to_string(W.rows) + "x" +
               std::to_string(W.cols) + " tile rows [" + std::to_string(r0) + ", +" + std::to_string(n_rows) +
               ") cols [" + std::to_string(c0) + ", +" + std::to_string(n_cols) + ")");
  const auto want = bits_of(tile(ref::dequantize_weight_tile, W, r0, n_rows, c0, n_cols));
  for (Path p : kPaths)
    on_path(p, [&] {
      EXPECT_EQ(bits_of(tile(cpu::dequantize_weight_tile, W, r0, n_rows, c0, n_cols)), want) << path_name(p);
    });
}

TEST(WeightTile, GgmlTypesMatchReferenceBitForBit) {
  if (!cpu::cpu_has_avx512()) std::printf("note: no AVX-512 on this CPU; the AVX2 and portable paths run\n");
  for (DType t : kGgmlTypes) {
    const int64_t block = dtype_block_elems(t);
    for (int64_t rows : {1, 7, 33, 1025}) {
      const int64_t cols = block == 32 ? 96 : 512;
      const TestWeight w(t, rows, cols, uint64_t(rows) * 31 + uint64_t(t));
      expect_tile_matches_reference(w.ref(), 0, rows, 0, cols);
      // Sub-ranges on block boundaries: a middle block, the last block, a run ending the row.
      expect_tile_matches_reference(w.ref(), rows / 2, (rows + 1) / 2, block, block);
      expect_tile_matches_reference(w.ref(), rows - 1, 1, cols - block, block);
      expect_tile_matches_reference(w.ref(), 0, rows, block, cols - block);
    }
  }
}

TEST(WeightTile, Nf4AndInt8MatchReferenceOnRowsThatStraddleBlocks) {
  // Odd row lengths make the scale blocks (64 elements of the flattened tensor) straddle rows, and
  // make every other NF4 row start on the low nibble of a byte.
  for (DType t : {DType::NF4, DType::INT8}) {
    for (int64_t rows : {1, 7, 33, 1025}) {
      for (int64_t cols : {1, 33, 97}) {
        const TestWeight w(t, rows, cols, uint64_t(rows * cols) + uint64_t(t));
        expect_tile_matches_reference(w.ref(), 0, rows, 0, cols);
        if (cols > 20) expect_tile_matches_reference(w.ref(), rows / 3, rows - rows / 3, 5, 17);
        expect_tile_matches_reference(w.ref(), rows - 1, 1, cols - 1, 1);
      }
    }
  }
}

TEST(WeightTile, Nf4DoubleQuantMatchesBitsandbytesTwoStepAbsmax) {
  // bitsandbytes dequantizes the nested absmax codes and then adds the offset: two roundings.
  // ref::dequantize_double_absmax + ref::dequantize_nf4 are that reference.
  for (int64_t rows : {1, 33, 1025}) {
    const int64_t cols = 97;
    const TestWeight w(DType::NF4, rows, cols, uint64_t(rows) + 5, true);
    const int64_t n = rows * cols, blocks = ref::quant_blocks(n, kNf4Block);
    std::vector<float> absmax(static_cast<size_t>(blocks)), want(static_cast<size_t>(n));
    ref::dequantize_double_absmax(w.absmax_codes.data(), w.absmax.data(), w.offset, blocks, absmax.data());
    ref::dequantize_nf4(w.data.data(), absmax.data(), n, want.data());
    for (Path p : kPaths) {
      SCOPED_TRACE(std::to_string(rows) + " rows, " + path_name(p));
      std::vector<float> got(static_cast<size_t>(n));
      on_path(p, [&] { cpu::dequantize_weight_tile(got.data(), cols, w.ref(), 0, rows, 0, cols); });
      EXPECT_EQ(bits_of(got), bits_of(want));
    }
  }
}

TEST(WeightTile, ElementTypesMatchReferenceOnEveryF16BitPattern) {
  // All 65536 f16 patterns (NaNs with payloads, infinities, subnormals) and bf16 patterns.
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  for (DType t : {DType::F16, DType::BF16}) {
    expect_tile_matches_reference({all.data(), t, 256, 256}, 0, 256, 0, 256);
    expect_tile_matches_reference({all.data(), t, 4096, 16}, 3, 1001, 1, 13);
  }
  const TestWeight w(DType::F32, 33, 35, 9);
  expect_tile_matches_reference(w.ref(), 1, 31, 2, 33);
}

TEST(WeightTile, NanScalesKeepTheirBits) {
  // A signalling-NaN f16 scale: F16C would quiet it; the reference keeps the payload.
  TestWeight w(DType::Q4_1, 3, 64, 11);
  const uint16_t snan = 0x7d01, neg_inf = 0xfc00;
  std::memcpy(&w.data[0], &snan, 2);
  std::memcpy(&w.data[20 + 2], &neg_inf, 2);
  expect_tile_matches_reference(w.ref(), 0, 3, 0, 64);
}

TEST(WeightTile, RejectsBadTiles) {
  const TestWeight q(DType::Q4_K, 4, 512, 1), nf4(DType::NF4, 4, 64, 2), q4(DType::Q4_0, 4, 64, 3);
  std::vector<float> out(4096);
  const auto expect_error = [&](const WeightRef& W, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                const std::string& needle) {
    for (bool portable : {false, true}) {
      try {
        if (portable) {
          cpu::ScopedPortableKernels force;
          cpu::dequantize_weight_tile(out.data(), 512, W, r0, nr, c0, nc);
        } else {
          cpu::dequantize_weight_tile(out.data(), 512, W, r0, nr, c0, nc);
        }
        ADD_FAILURE() << "accepted: " << needle;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    }
  };
  expect_error(q.ref(), 3, 2, 0, 256, "rows [3, 5) x cols [0, 256) outside a 4 x 512 weight");
  expect_error(q.ref(), 0, 1, 256, 512, "outside a 4 x 512 weight");
  expect_error(q.ref(), -1, 1, 0, 256, "outside");
  expect_error(q.ref(), 0, 1, 128, 256,
               "columns [128, 384) of a q4_k weight do not start and end on blocks of 256");
  expect_error(q4.ref(), 0, 1, 0, 16,
               "columns [0, 16) of a q4_0 weight do not start and end on blocks of 32");
  expect_error({q4.data.data(), DType::Q4_0, 1, 48}, 0, 1, 0, 32,
               "rows of 48 elements are not whole blocks of 32");
  expect_error({nf4.data.data(), DType::NF4, 4, 64}, 0, 1, 0, 64, "nf4 weight without its absmax");
  expect_error({nf4.data.data(), DType::INT8, 4, 64}, 0, 1, 0, 64, "int8 weight without its absmax");
  try {
    cpu::dequantize_weight_tile(out.data(), 10, q.ref(), 0, 1, 0, 256);
    ADD_FAILURE() << "a leading dimension below the tile width was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ld_dst 10 < 256 columns"), std::string::npos) << e.what();
  }
}

// ---- quant_gemv --------------------------------------------------------------------------------

// y = x W^T + beta y in double from the reference-dequantized W, and for each element the bound
// on the distance an f32 evaluation may have from it. Summing K products in f32 in any order is
// within (K - 1) u sum_k |x_k w_k| of the exact sum (Higham, Accuracy and Stability, eq. 3.5, with
// u = 2^-24), each product adds at most u |x_k w_k| when it is rounded (an FMA does not round it),
// and dot + beta * y rounds twice more, by at most u (|dot| + |beta y|) each. So
// |got - exact| <= (K + 2) u (sum_k |x_k w_k| + |beta y|), to first order in u; the test allows
// (K + 4) u times that sum for the second-order terms. The dequantized weights themselves carry no
// error: the kernels decode bit for bit the reference's values.
struct GemvReference {
  std::vector<double> y, bound;
};

GemvReference gemv_reference(const WeightRef& W, const std::vector<float>& x, const std::vector<float>& y0,
                             int64_t n_tokens, float beta) {
  std::vector<float> w(size_t(W.rows * W.cols));
  ref::dequantize_weight_tile(w.data(), W.cols, W, 0, W.rows, 0, W.cols);
  GemvReference g{std::vector<double>(size_t(n_tokens * W.rows)),
                  std::vector<double>(size_t(n_tokens * W.rows))};
  const double u = std::ldexp(1.0, -24);
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < W.rows; ++r) {
      double dot = 0, mag = 0;
      for (int64_t k = 0; k < W.cols; ++k) {
        const double p = double(x[size_t(t * W.cols + k)]) * double(w[size_t(r * W.cols + k)]);
        dot += p;
        mag += std::fabs(p);
      }
      const size_t i = size_t(t * W.rows + r);
      const double by = beta == 0.0f ? 0.0 : double(beta) * double(y0[i]);
      g.y[i] = dot + by;
      g.bound[i] = double(W.cols + 4) * u * (mag + std::fabs(by)) + 1e-30;
    }
  return g;
}

// dx = dy W + beta dx in double, and gemv_reference's bound for its sums over W.rows products.
GemvReference gemv_t_reference(const WeightRef& W, const std::vector<float>& dy,
                               const std::vector<float>& dx0, int64_t n_tokens, float beta) {
  std::vector<float> w(size_t(W.rows * W.cols));
  ref::dequantize_weight_tile(w.data(), W.cols, W, 0, W.rows, 0, W.cols);
  GemvReference g{std::vector<double>(size_t(n_tokens * W.cols)),
                  std::vector<double>(size_t(n_tokens * W.cols))};
  const double u = std::ldexp(1.0, -24);
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t k = 0; k < W.cols; ++k) {
      double dot = 0, mag = 0;
      for (int64_t r = 0; r < W.rows; ++r) {
        const double p = double(dy[size_t(t * W.rows + r)]) * double(w[size_t(r * W.cols + k)]);
        dot += p;
        mag += std::fabs(p);
      }
      const size_t i = size_t(t * W.cols + k);
      const double bx = beta == 0.0f ? 0.0 : double(beta) * double(dx0[i]);
      g.y[i] = dot + bx;
      g.bound[i] = double(W.rows + 4) * u * (mag + std::fabs(bx)) + 1e-30;
    }
  return g;
}

// Checks every element of `got` ([tokens, width]) against the reference bound.
void expect_within_bound(const std::vector<float>& got, const GemvReference& want, int64_t width) {
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want.y[i]);
    if (!(err <= want.bound[i]) && reported++ < 5)
      ADD_FAILURE() << "out[" << i / size_t(width) << ", " << i % size_t(width) << "] = " << got[i]
                    << ", want " << want.y[i] << " within " << want.bound[i];
  }
}

// Runs quant_gemv on y0 and checks every element against the reference bound.
void expect_gemv_within_bound(const WeightRef& W, const std::vector<float>& x, const std::vector<float>& y0,
                              int64_t n_tokens, float beta) {
  std::vector<float> y = y0;
  cpu::quant_gemv(y.data(), x.data(), W, n_tokens, beta);
  expect_within_bound(y, gemv_reference(W, x, y0, n_tokens, beta), W.rows);
}

// Runs quant_gemv_t on dx0 and checks every element against the reference bound.
void expect_gemv_t_within_bound(const WeightRef& W, const std::vector<float>& dy,
                                const std::vector<float>& dx0, int64_t n_tokens, float beta) {
  std::vector<float> dx = dx0;
  cpu::quant_gemv_t(dx.data(), dy.data(), W, n_tokens, beta);
  expect_within_bound(dx, gemv_t_reference(W, dy, dx0, n_tokens, beta), W.cols);
}

std::vector<TestWeight> gemv_weights(int64_t rows) {
  std::vector<TestWeight> ws;
  for (DType t : kGgmlTypes)
    ws.emplace_back(t, rows, dtype_block_elems(t) == 32 ? 160 : 512, uint64_t(rows) + 77);
  ws.emplace_back(DType::NF4, rows, 97, uint64_t(rows) + 78);
  ws.emplace_back(DType::NF4, rows, 576, uint64_t(rows) + 79, true);
  ws.emplace_back(DType::NF4, rows, 97, uint64_t(rows) + 82, true);
  ws.emplace_back(DType::INT8, rows, 97, uint64_t(rows) + 80);
  ws.emplace_back(DType::INT8, rows, 64, uint64_t(rows) + 81);
  return ws;
}

TEST(QuantGemv, MatchesDequantizedDotWithinRoundingBound) {
  for (int64_t rows : {1, 7, 33, 1025}) {
    for (const TestWeight& w : gemv_weights(rows)) {
      const std::vector<int64_t> token_counts =
          rows == 1025 ? std::vector<int64_t>{1, 3, 8} : std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8};
      for (int64_t n_tokens : token_counts) {
        const std::vector<float> x = test::random_floats(size_t(n_tokens * w.cols), uint64_t(n_tokens) + 3);
        std::vector<float> y0 = test::random_floats(size_t(n_tokens * rows), uint64_t(n_tokens) + 4, 5.0f);
        for (float beta : {0.0f, 1.0f}) {
          for (Path p : kPaths) {
            SCOPED_TRACE(std::string(dtype_name(w.dtype)) + (w.nested ? " nested" : "") + " " +
                         std::to_string(rows) + "x" + std::to_string(w.cols) + " tokens " +
                         std::to_string(n_tokens) + " beta " + std::to_string(beta) + " " + path_name(p));
            std::vector<float> start = y0;
            // beta 0 overwrites y: NaNs in it must not survive.
            if (beta == 0.0f) start.assign(start.size(), std::nanf(""));
            on_path(p, [&] { expect_gemv_within_bound(w.ref(), x, start, n_tokens, beta); });
          }
        }
      }
    }
  }
}

TEST(QuantGemv, SameBitsOnOneAndTwoThreads) {
  const int saved = cpu::num_threads();
  for (const TestWeight& w : gemv_weights(1025)) {
    SCOPED_TRACE(std::string(dtype_name(w.dtype)));
    const std::vector<float> x = test::random_floats(size_t(3 * w.cols), 12);
    for (Path p : kPaths) {
      std::vector<float> y1(size_t(3 * w.rows)), y2(y1.size());
      on_path(p, [&] {
        cpu::set_num_threads(1);
        cpu::quant_gemv(y1.data(), x.data(), w.ref(), 3, 0.0f);
        cpu::set_num_threads(2);
        cpu::quant_gemv(y2.data(), x.data(), w.ref(), 3, 0.0f);
      });
      EXPECT_EQ(bits_of(y1), bits_of(y2)) << path_name(p);
    }
  }
  cpu::set_num_threads(saved);
}

// Odd row lengths (97) make the NF4 / INT8 scale blocks straddle rows and the column ranges of the
// threads end mid-block; 1025 rows with 2 threads split each weight into several ranges, and 8
// tokens split the 576-column one on a single thread.
TEST(QuantGemvT, MatchesDequantizedDotWithinRoundingBound) {
  for (int64_t rows : {1, 7, 33, 1025}) {
    for (const TestWeight& w : gemv_weights(rows)) {
      for (int64_t n_tokens = 1; n_tokens <= cpu::kQuantGemvMaxTokens; ++n_tokens) {
        const std::vector<float> dy = test::random_floats(size_t(n_tokens * rows), uint64_t(n_tokens) + 5);
        const std::vector<float> dx0 =
            test::random_floats(size_t(n_tokens * w.cols), uint64_t(n_tokens) + 6, 5.0f);
        for (float beta : {0.0f, 1.0f}) {
          for (bool portable : {false, true}) {
            SCOPED_TRACE(std::string(dtype_name(w.dtype)) + (w.nested ? " nested" : "") + " " +
                         std::to_string(rows) + "x" + std::to_string(w.cols) + " tokens " +
                         std::to_string(n_tokens) + " beta " + std::to_string(beta) +
                         (portable ? " portable" : ""));
            std::vector<float> start = dx0;
            // beta 0 overwrites dx: NaNs in it must not survive.
            if (beta == 0.0f) start.assign(start.size(), std::nanf(""));
            if (portable) {
              cpu::ScopedPortableKernels force;
              expect_gemv_t_within_bound(w.ref(), dy, start, n_tokens, beta);
            } else {
              expect_gemv_t_within_bound(w.ref(), dy, start, n_tokens, beta);
            }
          }
        }
      }
    }
  }
}

TEST(QuantGemvT, SameBitsOnOneAndTwoThreads) {
  const int saved = cpu::num_threads();
  for (const TestWeight& w : gemv_weights(1025)) {
    for (int64_t n_tokens : {1, 3, 8}) {
      for (bool portable : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(w.dtype)) + (w.nested ? " nested " : " ") +
                     std::to_string(w.cols) + " cols, tokens " + std::to_string(n_tokens) +
                     (portable ? " portable" : ""));
        const std::vector<float> dy = test::random_floats(size_t(n_tokens * w.rows), 13);
        const std::vector<float> dx0 = test::random_floats(size_t(n_tokens * w.cols), 14);
        std::vector<float> dx1 = dx0, dx2 = dx0;
        std::optional<cpu::ScopedPortableKernels> force;
        if (portable) force.emplace();
        cpu::set_num_threads(1);
        cpu::quant_gemv_t(dx1.data(), dy.data(), w.ref(), n_tokens, 1.0f);
        cpu::set_num_threads(2);
        cpu::quant_gemv_t(dx2.data(), dy.data(), w.ref(), n_tokens, 1.0f);
        EXPECT_EQ(bits_of(dx1), bits_of(dx2));
      }
    }
  }
  cpu::set_num_threads(saved);
}

TEST(QuantGemv, RejectsBadInputs) {
  const TestWeight q(DType::Q4_0, 4, 64, 1), nf4(DType::NF4, 4, 64, 2);
  std::vector<float> x(9 * 64), y(9 * 4);
  const auto expect_error = [&](const WeightRef& W, int64_t n_tokens, const std::string& needle) {
    try {
      cpu::quant_gemv(y.data(), x.data(), W, n_tokens, 0.0f);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(q.ref(), 9, "quant_gemv: 9 tokens, expected 0 to 8");
  expect_error({q.data.data(), DType::Q4_0, 2, 48}, 1,
               "quant_gemv: q4_0 rows of 48 elements are not whole blocks");
  expect_error({nf4.data.data(), DType::NF4, 4, 64}, 1, "quant_gemv: nf4 weight without its absmax");
  const std::vector<float> f32(64 * 4);
  expect_error({f32.data(), DType::F32, 4, 64}, 1, "quant_gemv: weight dtype f32 is not quantized");
  const auto expect_t_error = [&](const WeightRef& W, int64_t n_tokens, const std::string& needle) {
    try {
      cpu::quant_gemv_t(x.data(), y.data(), W, n_tokens, 0.0f);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_t_error(q.ref(), 9, "quant_gemv_t: 9 tokens, expected 0 to 8");
  expect_t_error({q.data.data(), DType::Q4_0, 2, 48}, 1,
                 "quant_gemv_t: q4_0 rows of 48 elements are not whole blocks");
  expect_t_error({nf4.data.data(), DType::INT8, 4, 64}, 1, "quant_gemv_t: int8 weight without its absmax");
  expect_t_error({f32.data(), DType::F32, 4, 64}, 1, "quant_gemv_t: weight dtype f32 is not quantized");
}

}  // namespace
