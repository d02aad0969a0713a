// Tests: the elementwise ops (add_inplace, add_bias, fill, scale_inplace, copy, sum_squares,
// dropout_forward): tf::cpu against tf::ref at sizes on both sides of the parallel threshold.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/ops.h"
#include "op_test_util.h"
#include "src/core/error.h"
#include "src/core/parallel.h"
#include "src/core/rng.h"

using namespace tf;
using namespace tf::test;

namespace {

// Odd sizes reach loop tails; the large ones the parallel loops and several sum chunks.
const int64_t kSizes[] = {1, 7, 63, 64, 65, kMinParallelElems + 3, 5 * kOrderedSumChunk + 11};

}  // namespace

// Each is one rounding per element in both versions, so they agree bit for bit.
TEST(Elementwise, AddScaleFillCopyMatchReferenceBitForBit) {
  for (int64_t n : kSizes) {
    const std::vector<float> x = random_floats(size_t(n), 1), y0 = random_floats(size_t(n), 2);
    std::vector<float> a = y0, b = y0;
    cpu::add_inplace(a.data(), x.data(), n);
    ref::add_inplace(b.data(), x.data(), n);
    ASSERT_EQ(a, b) << n;
    EXPECT_NE(a, y0);
    cpu::scale_inplace(a.data(), 0.37f, n);
    ref::scale_inplace(b.data(), 0.37f, n);
    ASSERT_EQ(a, b) << n;
    cpu::copy(a.data(), x.data(), n);
    ASSERT_EQ(a, x) << n;
    cpu::fill(a.data(), -2.5f, n);
    ref::fill(b.data(), -2.5f, n);
    ASSERT_EQ(a, b) << n;
    EXPECT_EQ(a.back(), -2.5f);
  }
}

TEST(Elementwise, AddBiasMatchesReferenceForEveryFloatType) {
  for (const auto& [rows, width] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {7, 33}, {300, 129}}) {
    const std::vector<float> bias = random_floats(size_t(width), 3);
    const std::vector<uint16_t> b16 = to_bf16(bias);
    std::vector<uint16_t> h16(bias.size());
    for (size_t i = 0; i < bias.size(); ++i) h16[i] = f32_to_f16(bias[i]);
    const WeightRef refs[] = {WeightRef(bias.data(), DType::F32, 1, width),
                              WeightRef(b16.data(), DType::BF16, 1, width),
                              WeightRef(h16.data(), DType::F16, 1, width)};
    for (const WeightRef& w : refs) {
      const std::vector<float> y0 = random_floats(size_t(rows * width), 4);
      std::vector<float> a = y0, b = y0;
      cpu::add_bias(a.data(), w, rows, width);
      ref::add_bias(b.data(), w, rows, width);
      ASSERT_EQ(a, b) << dtype_name(w.dtype) << " " << rows << " x " << width;
      // Every row moved by the bias as stored: bias[c] widened exactly, one rounding in the add.
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < width; ++c) {
          const float add = w.dtype == DType::F32    ? bias[size_t(c)]
                            : w.dtype == DType::BF16 ? bf16_to_f32(b16[size_t(c)])
                                                     : f16_to_f32(h16[size_t(c)]);
          ASSERT_EQ(a[size_t(r * width + c)], y0[size_t(r * width + c)] + add) << r << ", " << c;
        }
    }
  }
  const std::vector<float> y(8), bias(4);
  std::vector<float> out = y;
  EXPECT_THROW(cpu::add_bias(out.data(), WeightRef(bias.data(), DType::F32, 1, 4), 1, 8), Error);
  EXPECT_THROW(cpu::add_bias(out.data(), WeightRef(bias.data(), DType::Q8_0, 1, 8), 1, 8), Error);
}

// The chunked sum differs from the sequential reference only by the order of double additions of
// non-negative terms: a relative 1e-15 per addition, far below the 1e-12 allowed. At any thread
// count the chunks are the same, so the bits are too.
TEST(Elementwise, SumSquaresIsTheReferenceAndIndependentOfThreads) {
  for (int64_t n : kSizes) {
    const std::vector<float> x = random_floats(size_t(n), 5);
    const double want = ref::sum_squares(x.data(), n);
    cpu::set_num_threads(1);
    const double one = cpu::sum_squares(x.data(), n);
    cpu::set_num_threads(2);
    const double two = cpu::sum_squares(x.data(), n);
    cpu::set_num_threads(0);
    EXPECT_NEAR(one, want, 1e-12 * want) << n;
    EXPECT_EQ(one, two) << n;
  }
  EXPECT_EQ(cpu::sum_squares(nullptr, 0), 0.0);
  const std::vector<float> inf = {1.0f, std::numeric_limits<float>::infinity()};
  EXPECT_TRUE(std::isinf(cpu::sum_squares(inf.data(), 2)));
}

// Element i's mask is Philox(seed, stream).uniform(first + i), so the fast version must drop exactly
// the reference's elements, from offsets inside and on the edge of its groups of 64 words too; kept
// ones are scaled by one rounding in both.
TEST(Elementwise, DropoutMatchesReferenceBitForBit) {
  for (int64_t n : kSizes) {
    const std::vector<float> x = random_floats(size_t(n), 6);
    std::vector<float> a(x.size()), b(x.size());
    for (uint64_t first : {uint64_t(0), uint64_t(5), uint64_t(64), uint64_t(1000003)}) {
      cpu::dropout_forward(a.data(), x.data(), n, 0.25f, 77, (uint64_t(3) << 40) | 9, first);
      ref::dropout_forward(b.data(), x.data(), n, 0.25f, 77, (uint64_t(3) << 40) | 9, first);
      ASSERT_EQ(a, b) << n << " from " << first;
    }
    if (n > 10000) {
      int64_t dropped = 0;
      for (float v : a) dropped += v == 0.0f;
      EXPECT_NEAR(double(dropped) / double(n), 0.25, 0.01);
    }
  }
  std::vector<float> a(64), x(64, 1.0f);
  cpu::dropout_forward(a.data(), x.data(), 64, 0.0f, 1, 1, 0);
  EXPECT_EQ(a, x);
  EXPECT_THROW(cpu::dropout_forward(a.data(), x.data(), 64, 1.0f, 1, 1, 0), Error);
}

// The AVX2 mask (whole groups of 64 in registers, the partial groups at either end one by one) drops
// the reference's elements bit for bit: at p whose threshold p 2^24 is an integer (0.25, 2^-24) and
// not (0.05, 1/3); in place, as the backward runs it; and across the counter's 32-bit boundary
// (block 2^32 - 3 onwards, element 2^34 - 12).
TEST(Elementwise, DropoutVectorMaskMatchesReference) {
  const uint64_t wrap = (uint64_t(1) << 34) - 12;
  for (const float p : {0.05f, 0.25f, 1.0f / 3.0f, 5.9604645e-8f, 0.999f}) {
    for (const int64_t n : {int64_t(1), int64_t(64), int64_t(200), int64_t(kMinParallelElems + 77)}) {
      for (const uint64_t first : {uint64_t(0), uint64_t(3), uint64_t(64), uint64_t(131), wrap - 70, wrap}) {
        const std::vector<float> x = random_floats(size_t(n), 9);
        std::vector<float> fast(x), want(x.size());
        cpu::dropout_forward(fast.data(), fast.data(), n, p, 0x0123456789abcdefull, (uint64_t(2) << 56) | 77,
                             first);
        ref::dropout_forward(want.data(), x.data(), n, p, 0x0123456789abcdefull, (uint64_t(2) << 56) | 77,
                             first);
        ASSERT_EQ(fast, want) << "p " << p << " n " << n << " first " << first;
        if (n > 1) {
          std::vector<float> portable(x.size());
          {
            const cpu::ScopedPortableKernels scalar;
            cpu::dropout_forward(portable.data(), x.data(), n, p, 0x0123456789abcdefull,
                                 (uint64_t(2) << 56) | 77, first);
          }
          ASSERT_EQ(portable, want) << "portable p " << p << " n " << n << " first " << first;
        }
      }
    }
  }
}

// dropout_backward is, bit for bit, dropout_forward of the incoming gradient added to dx and then
// dropout_forward of x into the gradient's buffer, from one draw of the mask: the reference's
// definition, the AVX2 path and the portable one, at the same awkward p, lengths and offsets; dx
// holds -0.0 where the sum's rounding of a dropped element shows (x + 0 is +0 for x = -0).
TEST(Elementwise, DropoutBackwardIsTheForwardOfTheGradientAddedAndOfTheInput) {
  const uint64_t seed = 0x0123456789abcdefull, stream = (uint64_t(2) << 56) | 78;
  for (const float p : {0.05f, 0.25f, 1.0f / 3.0f, 0.999f}) {
    for (const int64_t n : {int64_t(1), int64_t(64), int64_t(200), int64_t(kMinParallelElems + 77)}) {
      for (const uint64_t first : {uint64_t(0), uint64_t(3), uint64_t(131), (uint64_t(1) << 34) - 12}) {
        SCOPED_TRACE("p " + std::to_string(p) + " n " + std::to_string(n) + " first " +
                     std::to_string(first));
        const std::vector<float> x = random_floats(size_t(n), 10), g = random_floats(size_t(n), 11);
        std::vector<float> dx0 = random_floats(size_t(n), 12);
        dx0[0] = -0.0f;
        std::vector<float> want_dx(dx0), want_g(x.size()), masked(x.size());
        ref::dropout_forward(masked.data(), g.data(), n, p, seed, stream, first);
        ref::add_inplace(want_dx.data(), masked.data(), n);
        ref::dropout_forward(want_g.data(), x.data(), n, p, seed, stream, first);
        std::vector<float> ref_dx(dx0), ref_g(g);
        ref::dropout_backward(ref_dx.data(), ref_g.data(), x.data(), n, p, seed, stream, first);
        ASSERT_EQ(0, std::memcmp(ref_dx.data(), want_dx.data(), size_t(n) * 4)) << "ref's dx";
        ASSERT_EQ(ref_g, want_g) << "ref's g";
        for (const bool portable : {false, true}) {
          std::vector<float> dx(dx0), gg(g);
          if (portable) {
            const cpu::ScopedPortableKernels scalar;
            cpu::dropout_backward(dx.data(), gg.data(), x.data(), n, p, seed, stream, first);
          } else {
            cpu::dropout_backward(dx.data(), gg.data(), x.data(), n, p, seed, stream, first);
          }
          ASSERT_EQ(0, std::memcmp(dx.data(), want_dx.data(), size_t(n) * 4)) << "dx, portable " << portable;
          ASSERT_EQ(gg, want_g) << "g, portable " << portable;
        }
      }
    }
  }
  std::vector<float> dx(64), g(64), x(64);
  EXPECT_THROW(cpu::dropout_backward(dx.data(), g.data(), x.data(), 64, 1.0f, 1, 1, 0), Error);
  EXPECT_THROW(ref::dropout_backward(dx.data(), g.data(), x.data(), 64, -0.5f, 1, 1, 0), Error);
}

// The vector path compares raw words with an integer threshold instead of uniform(i) < p: at p a
// hair above an element's uniform value (the next float up) it must drop that element, and at p
// equal to it keep it. Random p could never land there (a chance of 2^-24 per element).
TEST(Elementwise, DropoutThresholdIsExactAtTheBoundary) {
  const int64_t n = 256;
  const uint64_t seed = 5, stream = 6;
  const std::vector<float> x(size_t(n), 1.0f);
  const Philox rng(seed, stream);
  std::vector<float> out(x.size());
  for (const int64_t i : {int64_t(70), int64_t(131), int64_t(200)}) {
    const float u = rng.uniform(uint64_t(i));
    cpu::dropout_forward(out.data(), x.data(), n, u, seed, stream, 0);
    EXPECT_NE(out[size_t(i)], 0.0f) << "element " << i << " at p = its uniform " << u;
    cpu::dropout_forward(out.data(), x.data(), n, std::nextafter(u, 1.0f), seed, stream, 0);
    EXPECT_EQ(out[size_t(i)], 0.0f) << "element " << i << " at p just above its uniform " << u;
  }
}

// A chunk of rows starting at `first` draws the same mask as those elements of the whole input.
TEST(Elementwise, DropoutOfAPartIsThatPartOfTheWhole) {
  const int64_t n = 1000;
  const std::vector<float> x = random_floats(size_t(n), 8);
  std::vector<float> whole(x.size()), part(x.size());
  cpu::dropout_forward(whole.data(), x.data(), n, 0.5f, 3, 4, 0);
  for (int64_t first : {int64_t(0), int64_t(1), int64_t(63), int64_t(64), int64_t(333)}) {
    const int64_t m = std::min<int64_t>(257, n - first);
    cpu::dropout_forward(part.data(), x.data() + first, m, 0.5f, 3, 4, uint64_t(first));
    for (int64_t i = 0; i < m; ++i) ASSERT_EQ(part[size_t(i)], whole[size_t(first + i)]) << first << " " << i;
  }
}
