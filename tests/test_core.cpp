#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <set>

#include "src/core/alloc.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/core/tensor.h"

using namespace tf;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);
  // 1 + 3 * 2^-8 is a tie between 1+2^-7 (odd) and 1+2^-6 (even).
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-3.5f)), -3.5f);
}

TEST(DType, F16RoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t x = uint16_t(h);
    const float f = f16_to_f32(x);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), x) << "half 0x" << std::hex << h;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds up past the largest half: inf
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
}

TEST(Philox, MatchesPublishedKnownAnswers) {
  // Known-answer vectors of Philox4x32-10 from the Random123 distribution.
  auto z = philox4x32({0, 0, 0, 0}, {0, 0});
  EXPECT_EQ(z[0], 0x6627e8d5u);
  EXPECT_EQ(z[1], 0xe169c58du);
  EXPECT_EQ(z[2], 0xbc57ac4cu);
  EXPECT_EQ(z[3], 0x9b00dbd8u);
  auto f = philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu});
  EXPECT_EQ(f[0], 0x408f276du);
  EXPECT_EQ(f[1], 0x41c83b0eu);
  EXPECT_EQ(f[2], 0xa20bc7c6u);
  EXPECT_EQ(f[3], 0x6d5451fdu);
}

// The batched blocks are the scalar ones, including where the 32-bit counter carries into its high
// word and for a stream with both halves set.
TEST(Philox, BatchedBlocksAreTheScalarBlocks) {
  const Philox rng(0x123456789abcdefull, (uint64_t(7) << 40) | 5);
  for (const uint64_t first : {uint64_t(0), uint64_t(3), uint64_t(0xFFFFFFF8u), uint64_t(1) << 40}) {
    uint32_t words[4][Philox::kBatch];
    rng.blocks(first, words);
    for (int b = 0; b < Philox::kBatch; ++b) {
      const std::array<uint32_t, 4> want = rng.block(first + uint64_t(b));
      for (int w = 0; w < 4; ++w)
        ASSERT_EQ(words[w][b], want[size_t(w)]) << "block " << first + b << " word " << w;
    }
  }
}

TEST(Philox, StreamsAreIndependentAndUniform) {
  Philox a(42, 1), b(42, 2), a2(42, 1);
  double sum = 0, sum_sq = 0;
  const int n = 100000;
  std::set<uint32_t> seen;
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(a.u32(uint64_t(i)), a2.u32(uint64_t(i)));
    if (i < 1000) seen.insert(a.u32(uint64_t(i)) ^ b.u32(uint64_t(i)));
    const float u = a.uniform(uint64_t(i));
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
    sum_sq += double(a.normal(uint64_t(i))) * a.normal(uint64_t(i));
  }
  EXPECT_GT(seen.size(), 990u);  // streams 1 and 2 differ almost everywhere
  // Mean of n uniforms has std 0.289/sqrt(n) ~ 0.0009; 5 sigma.
  EXPECT_NEAR(sum / n, 0.5, 0.0046);
  // Variance of the normals: the sample variance has std sqrt(2/n) ~ 0.0045; 5 sigma.
  EXPECT_NEAR(sum_sq / n, 1.0, 0.023);
}

TEST(MemTracker, CountsCurrentAndPeakPerTag) {
  auto& t = MemTracker::instance();
  const size_t base = t.current(MemTag::Lora);
  t.reset_peaks();
  {
    Buffer a(1000, MemTag::Lora);
    Buffer b(500, MemTag::Lora);
    EXPECT_EQ(t.current(MemTag::Lora), base + 1500);
  }
  EXPECT_EQ(t.current(MemTag::Lora), base);
  EXPECT_EQ(t.peak(MemTag::Lora), base + 1500);
  Buffer moved(64, MemTag::Grads);
  Buffer target = std::move(moved);
  EXPECT_EQ(moved.bytes(), 0u);
  EXPECT_EQ(target.bytes(), 64u);
}

TEST(Tensor, ContiguousViewAndErrors) {
  Tensor t(DType::BF16, {3, 5}, MemTag::Weights, "w");
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.view.nbytes(), 30u);
  EXPECT_EQ(t.view.strides[0], 5);
  EXPECT_TRUE(t.view.is_contiguous());
  EXPECT_EQ(t.view.shape_str(), "[3, 5]");
  EXPECT_THROW(TensorView::contiguous(nullptr, DType::F32, {1, 2, 3, 4, 5}, "x"), Error);
  try {
    TF_CHECK(false, "tensor ", "w", " is bad");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor w is bad (test_core.cpp:"), std::string::npos);
  }
}
