// Tests: the CUDA backend's row-wise launchers (rmsnorm_forward / backward, rope_forward / backward
// in both layouts, embedding_forward / backward) run on the SIMT simulator (tf::simt) against
// tf::cpu, at awkward shapes, with NaN guards around every output and NaN / Inf inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/device_ops.h"
#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"

using namespace tf;
using namespace tf::test;

namespace {

constexpr double kU = 1.0 / (1 << 24);  // unit roundoff of f32
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr DType kFloatTypes[] = {DType::F32, DType::BF16, DType::F16};

// The 16-bit patterns of values in bf16 or f16 (unused for f32).
std::vector<uint16_t> narrow(const std::vector<float>& values, DType dtype) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i)
    out[i] = dtype == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
  return out;
}

// A [rows, cols] float weight stored as `dtype`, on the host (for tf::cpu) and in simulated device
// memory (for tf::simt).
struct StoredWeight {
  StoredWeight(const std::vector<float>& values, DType dtype_, int64_t rows, int64_t cols)
      : dtype(dtype_),
        f32(values),
        bits(narrow(values, dtype_)),
        dev32(f32, "weight f32"),
        dev16(bits, "weight 16-bit") {
    const bool wide = dtype == DType::F32;
    host = WeightRef(wide ? static_cast<const void*>(f32.data()) : bits.data(), dtype, rows, cols);
    device = WeightRef(wide ? static_cast<const void*>(dev32.get()) : dev16.get(), dtype, rows, cols);
  }
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> bits;
  Guarded<float> dev32;
  Guarded<uint16_t> dev16;
  WeightRef host, device;
};

// ---- rmsnorm ---------------------------------------------------------------------------------------

// Shapes: no rows, one element, dims below, at and above the 128-thread block with tails.
const std::pair<int64_t, int64_t> kNormShapes[] = {{0, 8}, {1, 1}, {3, 7}, {4, 128}, {5, 130}, {2, 300}};

// x with a NaN in row 1 and an Inf in row 2 (where they exist): each poisons its own row only.
std::vector<float> norm_input(int64_t rows, int64_t dim) {
  std::vector<float> x = random_floats(size_t(rows * dim), 21, 2.0f);
  if (rows > 1) x[size_t(dim + dim / 2)] = kNaN;
  if (rows > 2) x[size_t(2 * dim)] = kInf;
  return x;
}

// Forward, per side: sum(x^2) is dim rounded products and dim - 1 additions of non-negative terms,
// within dim u relative; the mean and + eps add u each, the square root halves that and adds u, the
// reciprocal adds u: rstd within (dim / 2 + 3) u. out = (x rstd) w adds two roundings. The two
// sides are then within (dim + 6) u relative for rstd and (dim + 10) u |x rstd w| for out.
TEST(CudaRmsnorm, ForwardMatchesCpuWithinTheSummationBound) {
  for (const auto& [rows, dim] : kNormShapes) {
    for (DType dt : kFloatTypes) {
      SCOPED_TRACE(testing::Message() << rows << " x " << dim << " " << dtype_name(dt));
      const std::vector<float> x = norm_input(rows, dim);
      StoredWeight w(random_floats(size_t(dim), 22, 1.5f), dt, 1, dim);
      Guarded<float> dx(x, "x"), dout(std::vector<float>(size_t(rows * dim)), "out");
      Guarded<float> drstd(std::vector<float>(size_t(rows)), "rstd");
      std::vector<float> want(x.size()), want_rstd(static_cast<size_t>(rows));
      simt::rmsnorm_forward(dout.get(), drstd.get(), dx.get(), w.device, rows, dim, 1e-5f);
      cpu::rmsnorm_forward(want.data(), want_rstd.data(), x.data(), w.host, rows, dim, 1e-5f);
      const std::vector<float> got = dout.download(), got_rstd = drstd.download();
      for (size_t r = 0; r < size_t(rows); ++r) {
        if (!std::isfinite(want_rstd[r])) {
          EXPECT_TRUE(same_value(got_rstd[r], want_rstd[r])) << r;
        } else {
          EXPECT_LE(std::abs(double(got_rstd[r]) - want_rstd[r]), double(dim + 6) * kU * want_rstd[r]) << r;
        }
      }
      for (size_t i = 0; i < x.size(); ++i) {
        if (!std::isfinite(want[i])) {
          EXPECT_TRUE(same_value(got[i], want[i])) << i;
          continue;
        }
        const double wi = double(want[i]);
        EXPECT_LE(std::abs(double(got[i]) - wi), double(dim + 10) * kU * std::abs(wi)) << i;
      }
      if (rows > 1) {
        EXPECT_TRUE(std::isnan(got[size_t(dim)]));  // row 1 holds a NaN
      }
      EXPECT_TRUE(dout.guards_intact());
      EXPECT_TRUE(drstd.guards_intact());
    }
  }
}

// Backward, per side, with A = |rstd w_i g_i| and B = |x_i| rstd^3 / dim sum_j |g_j w_j x_j|: the dot
// product is within (dim + 1) u sum |g w x|, c = rstd^3 / dim dot adds four roundings, and the
// update rstd w g - x c, its subtraction and the accumulation add three more: within
// 3u A + (dim + 7) u B + u |dx|. d_weight sums rows of g x rstd: within (rows + 1) u sum |g x rstd|
// + u |d_weight|. The two sides are within twice these of one another.
TEST(CudaRmsnorm, BackwardMatchesCpuWithinTheSummationBound) {
  for (const auto& [rows, dim] : kNormShapes) {
    for (DType dt : kFloatTypes) {
      for (bool with_dw : {true, false}) {
        SCOPED_TRACE(testing::Message()
                     << rows << " x " << dim << " " << dtype_name(dt) << " dw " << with_dw);
        const std::vector<float> x = random_floats(size_t(rows * dim), 23, 2.0f);
        std::vector<float> g = random_floats(size_t(rows * dim), 24);
        if (rows > 1)
          g[size_t(dim)] = kNaN;  // poisons row 1 of dx through its dot product, and column 0 of d_weight
        const std::vector<float> dx0 = random_floats(size_t(rows * dim), 25);
        const std::vector<float> dw0 = random_floats(size_t(dim), 26);
        StoredWeight w(random_floats(size_t(dim), 27, 1.5f), dt, dim, 1);
        std::vector<float> rstd(static_cast<size_t>(rows)), scratch(x.size());
        cpu::rmsnorm_forward(scratch.data(), rstd.data(), x.data(), w.host, rows, dim, 1e-5f);
        Guarded<float> d_x(x, "x"), d_g(g, "d_out"), d_rstd(rstd, "rstd"), d_dx(dx0, "dx"),
            d_dw(dw0, "d_weight");
        std::vector<float> want_dx = dx0, want_dw = dw0;
        simt::rmsnorm_backward(d_dx.get(), with_dw ? d_dw.get() : nullptr, d_g.get(), d_x.get(), w.device,
                               d_rstd.get(), rows, dim);
        cpu::rmsnorm_backward(want_dx.data(), with_dw ? want_dw.data() : nullptr, g.data(), x.data(), w.host,
                              rstd.data(), rows, dim);
        const std::vector<float> got_dx = d_dx.download(), got_dw = d_dw.download();
        const std::vector<float> wv = w.f32;
        for (int64_t r = 0; r < rows; ++r) {
          const double rs = rstd[size_t(r)];
          double abs_dot = 0;
          for (int64_t j = 0; j < dim; ++j) {
            const size_t k = size_t(r * dim + j);
            abs_dot += std::abs(double(g[k]) * wv[size_t(j)] * x[k]);
          }
          for (int64_t i = 0; i < dim; ++i) {
            const size_t k = size_t(r * dim + i);
            if (!std::isfinite(want_dx[k])) {
              ASSERT_TRUE(same_value(got_dx[k], want_dx[k])) << r << ", " << i;
              continue;
            }
            const double a = std::abs(rs * wv[size_t(i)] * g[k]);
            const double b = std::abs(double(x[k])) * rs * rs * rs / double(dim) * abs_dot;
            const double tol = 6 * kU * a + 2 * double(dim + 7) * kU * b + 2 * kU * std::abs(want_dx[k]);
            ASSERT_LE(std::abs(double(got_dx[k]) - want_dx[k]), tol) << r << ", " << i;
          }
        }
        for (int64_t i = 0; i < dim; ++i) {
          if (!with_dw || !std::isfinite(want_dw[size_t(i)])) {
            EXPECT_TRUE(same_value(got_dw[size_t(i)], with_dw ? want_dw[size_t(i)] : dw0[size_t(i)])) << i;
            continue;
          }
          double abs_sum = 0;
          for (int64_t r = 0; r < rows; ++r) {
            const size_t k = size_t(r * dim + i);
            abs_sum += std::abs(double(g[k]) * x[k] * rstd[size_t(r)]);
          }
          const double tol = 2 * double(rows + 1) * kU * abs_sum + 2 * kU * std::abs(want_dw[size_t(i)]);
          EXPECT_LE(std::abs(double(got_dw[size_t(i)]) - want_dw[size_t(i)]), tol) << i;
        }
        if (rows > 1) {
          EXPECT_TRUE(std::isnan(got_dx[size_t(dim + dim - 1)]));
          EXPECT_EQ(std::isnan(got_dw[0]), with_dw);
        }
        EXPECT_TRUE(d_dx.guards_intact());
        EXPECT_TRUE(d_dw.guards_intact());
      }
    }
  }
}

TEST(CudaRmsnorm, RefusesWrongSizesAndQuantizedWeights) {
  Guarded<float> buf(std::vector<float>(16), "buf");
  const std::string wrong_size = error_of([&] {
    simt::rmsnorm_forward(buf.get(), buf.get(), buf.get(), WeightRef(buf.get(), DType::F32, 1, 7), 2, 8,
                          1e-5f);
  });
  EXPECT_NE(wrong_size.find("rmsnorm weight has 1x7 elements, expected 8"), std::string::npos) << wrong_size;
  const std::string quantized = error_of([&] {
    simt::rmsnorm_backward(buf.get(), nullptr, buf.get(), buf.get(), WeightRef(buf.get(), DType::Q4_0, 1, 32),
                           buf.get(), 1, 32);
  });
  EXPECT_NE(quantized.find("rmsnorm weight dtype q4_0 is not a float type (f32, bf16, f16)"),
            std::string::npos)
      << quantized;
}

// ---- rope ------------------------------------------------------------------------------------------

// (n_tokens, n_heads, head_dim): head dims that are odd multiples of 2, one pair, and a full head.
const std::tuple<int64_t, int, int> kRopeShapes[] = {
    {1, 1, 2}, {3, 2, 6}, {5, 3, 10}, {2, 1, 14}, {4, 2, 64}};

// cosf / sinf are within 2 ulp under nvcc and 1 ulp on the host, so c and s differ by at most
// 3 ulp <= 6u relative; each side then rounds two products and a sum, within 2u (|a c| + |b s|).
// The outputs agree within 10u (|a| + |b|) of the pair they come from.
TEST(CudaRope, MatchesCpuInBothLayoutsAndDirections) {
  for (const auto& [n_tokens, n_heads, head_dim] : kRopeShapes) {
    for (RopeLayout layout : {RopeLayout::SplitHalf, RopeLayout::Interleaved}) {
      for (bool forward : {true, false}) {
        SCOPED_TRACE(testing::Message() << n_tokens << " x " << n_heads << " x " << head_dim << " layout "
                                        << int(layout) << (forward ? " forward" : " backward"));
        const int half = head_dim / 2;
        std::vector<float> x = random_floats(size_t(n_tokens * n_heads * head_dim), 31);
        if (x.size() > 9) x[9] = kNaN;
        std::vector<int32_t> pos(static_cast<size_t>(n_tokens));
        for (size_t t = 0; t < pos.size(); ++t) pos[t] = int32_t(t == 0 ? 0 : (t * 977) % 4096);
        RopeParams rp;
        rp.head_dim = head_dim;
        std::vector<float> inv_freq(static_cast<size_t>(half));
        rope_inv_freq(rp, inv_freq.data());
        Guarded<float> d_x(x, "x"), d_inv(inv_freq, "inv_freq");
        Guarded<int32_t> d_pos(pos, "pos");
        std::vector<float> want = x;
        if (forward) {
          simt::rope_forward(d_x.get(), d_pos.get(), d_inv.get(), n_tokens, n_heads, head_dim, layout);
          cpu::rope_forward(want.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim, layout);
        } else {
          simt::rope_backward(d_x.get(), d_pos.get(), d_inv.get(), n_tokens, n_heads, head_dim, layout);
          cpu::rope_backward(want.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim, layout);
        }
        const std::vector<float> got = d_x.download();
        for (size_t head = 0; head < size_t(n_tokens * n_heads); ++head) {
          for (int i = 0; i < half; ++i) {
            const bool split = layout == RopeLayout::SplitHalf;
            const size_t ia = head * size_t(head_dim) + size_t(split ? i : 2 * i);
            const size_t ib = head * size_t(head_dim) + size_t(split ? i + half : 2 * i + 1);
            const double tol = 10 * kU * (std::abs(double(x[ia])) + std::abs(double(x[ib])));
            for (size_t k : {ia, ib}) {
              if (!std::isfinite(want[k])) {
                EXPECT_TRUE(same_value(got[k], want[k])) << k;
              } else {
                EXPECT_LE(std::abs(double(got[k]) - want[k]), tol) << k;
              }
            }
          }
        }
        EXPECT_TRUE(d_x.guards_intact());
      }
    }
  }
  Guarded<float> buf(std::vector<float>(10), "x");
  Guarded<int32_t> p(std::vector<int32_t>(1), "pos");
  const std::string odd =
      error_of([&] { simt::rope_forward(buf.get(), p.get(), buf.get(), 1, 2, 5, RopeLayout::SplitHalf); });
  EXPECT_NE(odd.find("rope head_dim must be even and in [2, 1024], got 5"), std::string::npos) << odd;
}

// ---- embedding -------------------------------------------------------------------------------------

constexpr int64_t kVocab = 37;

// Token ids with repeats (0, the last row, and a few rows many times).
std::vector<int32_t> some_tokens(int64_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (size_t i = 0; i < t.size(); ++i) t[i] = int32_t(i % 3 == 0 ? kVocab - 1 : (i * 7) % 5 * 8);
  return t;
}

// Forward widens stored elements exactly; backward adds each element's tokens in token order on
// both sides: bit for bit.
TEST(CudaEmbedding, ForwardAndBackwardMatchCpuBitForBit) {
  for (int64_t dim : {int64_t(1), int64_t(5), int64_t(130)}) {
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(7), int64_t(131)}) {
      const std::vector<int32_t> tokens = some_tokens(n);
      Guarded<int32_t> d_tokens(tokens, "tokens");
      for (DType dt : kFloatTypes) {
        SCOPED_TRACE(testing::Message() << "dim " << dim << " n " << n << " " << dtype_name(dt));
        std::vector<float> values = random_floats(size_t(kVocab * dim), 41);
        values[size_t((kVocab - 1) * dim)] = kNaN;  // the last row, which the tokens repeat
        StoredWeight table(values, dt, kVocab, dim);
        Guarded<float> out(std::vector<float>(size_t(n * dim)), "out");
        std::vector<float> want(static_cast<size_t>(n * dim));
        simt::embedding_forward(out.get(), d_tokens.get(), n, table.device);
        cpu::embedding_forward(want.data(), tokens.data(), n, table.host);
        EXPECT_EQ(first_difference(out.download(), want), -1);
        EXPECT_TRUE(out.guards_intact());
      }
      SCOPED_TRACE(testing::Message() << "backward dim " << dim << " n " << n);
      const std::vector<float> d_out = random_floats(size_t(n * dim), 42);
      const std::vector<float> dt0 = random_floats(size_t(kVocab * dim), 43);
      Guarded<float> d_d_out(d_out, "d_out"), d_table(dt0, "d_table");
      std::vector<float> want = dt0;
      simt::embedding_backward(d_table.get(), d_d_out.get(), d_tokens.get(), n, kVocab, dim);
      cpu::embedding_backward(want.data(), d_out.data(), tokens.data(), n, kVocab, dim);
      const std::vector<float> got = d_table.download();
      EXPECT_EQ(first_difference(got, want), -1);
      if (n == 131) {
        EXPECT_NE(got, dt0);
      }
      EXPECT_TRUE(d_table.guards_intact());
    }
  }
}

// A bad id is reported with its position, the first one when there are several, before anything
// is written; a quantized table the device cannot decode (rows not a multiple of 8) is refused by name.
TEST(CudaEmbedding, NamesTheFirstBadTokenAndWritesNothing) {
  std::vector<int32_t> tokens = some_tokens(9);
  tokens[5] = int32_t(kVocab);
  tokens[7] = -1;
  Guarded<int32_t> d_tokens(tokens, "tokens");
  StoredWeight table(random_floats(size_t(kVocab * 4), 44), DType::F32, kVocab, 4);
  const std::vector<float> before = random_floats(size_t(9 * 4), 45);
  Guarded<float> out(before, "out");
  const std::string fwd =
      error_of([&] { simt::embedding_forward(out.get(), d_tokens.get(), 9, table.device); });
  EXPECT_NE(fwd.find("embedding_forward: token id 37 at position 5 is outside the vocabulary [0, 37)"),
            std::string::npos)
      << fwd;
  EXPECT_EQ(first_difference(out.download(), before), -1);

  const std::vector<float> dt0 = random_floats(size_t(kVocab * 4), 46);
  Guarded<float> d_table(dt0, "d_table");
  tokens[5] = 3;
  Guarded<int32_t> d_tokens2(tokens, "tokens");
  const std::string bwd =
      error_of([&] { simt::embedding_backward(d_table.get(), out.get(), d_tokens2.get(), 9, kVocab, 4); });
  EXPECT_NE(bwd.find("embedding_backward: token id -1 at position 7 is outside the vocabulary [0, 37)"),
            std::string::npos)
      << bwd;
  EXPECT_EQ(first_difference(d_table.download(), dt0), -1);

  tf::QuantScales absmax;
  absmax.absmax = table.device.data;
  const std::string quantized = error_of([&] {
    simt::embedding_forward(out.get(), d_tokens2.get(), 1,
                            WeightRef(table.device.data, DType::INT8, kVocab, 12, absmax));
  });
  EXPECT_NE(quantized.find("embedding_forward: table: the CUDA backend runs int8 weights whose rows are a "
                           "multiple of 8 elements; this one is 37 x 12"),
            std::string::npos)
      << quantized;
}

}  // namespace
