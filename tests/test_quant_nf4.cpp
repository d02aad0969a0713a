// defines: tests of the NF4 / dynamic-map / int8 quantize and dequantize references
//          (kernels/cpu/ref/quantize.h): bytes against bitsandbytes, and round-trip error bounds
//
// The fixture (tools/make_nf4_fixture.py) holds what bitsandbytes 0.50.2 made on the CPU from five
// vectors; the comparisons with it are exact. The round-trip bounds follow from the formats:
// absmax is the exact block maximum, so |x / absmax| <= 1 and the nearest code value is at most
// half the widest codebook gap away; the slack covers the few f32 roundings on the way.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ref/quantize.h"
#include "src/io/safetensors.h"
#include "tests/test_util.h"

namespace tf {
namespace {

template <typename T>
std::vector<T> fixture_array(const io::SafetensorsFile& f, const std::string& name) {
  const io::SafetensorsTensor& t = f.get(name);
  std::vector<T> v(t.bytes.size() / sizeof(T));
  EXPECT_EQ(v.size() * sizeof(T), t.bytes.size()) << name;
  std::memcpy(v.data(), t.bytes.data(), v.size() * sizeof(T));
  return v;
}

// Bitwise equality of float vectors, reporting the first differing element.
void expect_same_bits(const std::vector<float>& got, const std::vector<float>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    uint32_t a, b;
    std::memcpy(&a, &got[i], 4);
    std::memcpy(&b, &want[i], 4);
    ASSERT_EQ(a, b) << what << " element " << i << ": " << got[i] << " vs " << want[i];
  }
}

io::SafetensorsFile open_fixture() {
  return io::SafetensorsFile::open(std::string(TIGHTFIT_FIXTURES) + "/nf4_bnb.safetensors");
}

TEST(QuantNf4, CodebooksAreBitsandbytes) {
  const io::SafetensorsFile f = open_fixture();
  expect_same_bits(std::vector<float>(kNf4Code, kNf4Code + 16), fixture_array<float>(f, "nf4_code"),
                   "nf4 code");
  expect_same_bits(std::vector<float>(ref::dynamic_map(), ref::dynamic_map() + 256),
                   fixture_array<float>(f, "dynamic_map"), "dynamic map");
}

class QuantNf4Fixture : public ::testing::TestWithParam<const char*> {};

TEST_P(QuantNf4Fixture, MatchesBitsandbytesByteForByte) {
  const io::SafetensorsFile f = open_fixture();
  const std::string c = GetParam();
  const std::vector<float> x = fixture_array<float>(f, c + ".input");
  const int64_t n = int64_t(x.size());
  const int64_t blocks = ref::quant_blocks(n, kNf4Block);

  std::vector<uint8_t> codes(size_t(ref::nf4_packed_bytes(n)));
  std::vector<float> absmax(static_cast<size_t>(blocks));
  ref::quantize_nf4(x.data(), n, codes.data(), absmax.data());
  EXPECT_EQ(codes, fixture_array<uint8_t>(f, c + ".codes"));
  expect_same_bits(absmax, fixture_array<float>(f, c + ".absmax"), c + ".absmax");

  std::vector<float> y(x.size());
  ref::dequantize_nf4(codes.data(), absmax.data(), n, y.data());
  expect_same_bits(y, fixture_array<float>(f, c + ".dequant"), c + ".dequant");

  std::vector<uint8_t> qabsmax(static_cast<size_t>(blocks));
  std::vector<float> nested(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)));
  const float offset = ref::double_quantize_absmax(absmax.data(), blocks, qabsmax.data(), nested.data());
  expect_same_bits({offset}, fixture_array<float>(f, c + ".absmax_offset"), c + ".absmax_offset");
  EXPECT_EQ(qabsmax, fixture_array<uint8_t>(f, c + ".absmax_codes"));
  expect_same_bits(nested, fixture_array<float>(f, c + ".absmax_nested"), c + ".absmax_nested");

  std::vector<float> absmax_dq(static_cast<size_t>(blocks));
  ref::dequantize_double_absmax(qabsmax.data(), nested.data(), offset, blocks, absmax_dq.data());
  expect_same_bits(absmax_dq, fixture_array<float>(f, c + ".absmax_dequant"), c + ".absmax_dequant");
}

INSTANTIATE_TEST_SUITE_P(Cases, QuantNf4Fixture,
                         ::testing::Values("big", "len7", "len65", "heavy1025", "rounding"));

enum class Dist { Normal, StudentT, Outliers };

std::vector<float> sample(Dist d, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::student_t_distribution<float> t(2.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = d == Dist::StudentT ? t(rng) : normal(rng) * 0.02f;
  if (d == Dist::Outliers) {
    std::uniform_int_distribution<int64_t> at(0, n - 1);
    for (int k = 0; k < 1 + int(n / 100); ++k) x[size_t(at(rng))] *= 300.0f;
  }
  return x;
}

float widest_gap(const float* code, int count) {
  float g = 0.0f;
  for (int k = 0; k + 1 < count; ++k) g = std::max(g, code[k + 1] - code[k]);
  return g;
}

// A few f32 roundings of quantities at most absmax in size.
double slack(float absmax) {
  return 1e-6 * double(absmax);
}

const int64_t kLengths[] = {1, 7, 63, 64, 65, 1025};
const Dist kDists[] = {Dist::Normal, Dist::StudentT, Dist::Outliers};

TEST(QuantNf4, RoundTripPicksTheNearestCodeValue) {
  const double half_gap = widest_gap(kNf4Code, 16) / 2.0;
  for (Dist d : kDists) {
    for (int64_t n : kLengths) {
      SCOPED_TRACE("dist " + std::to_string(int(d)) + " n " + std::to_string(n));
      const std::vector<float> x = sample(d, n, uint32_t(n) * 3 + uint32_t(d));
      std::vector<uint8_t> codes(size_t(ref::nf4_packed_bytes(n)));
      std::vector<float> absmax(size_t(ref::quant_blocks(n, kNf4Block)));
      ref::quantize_nf4(x.data(), n, codes.data(), absmax.data());
      std::vector<float> y(x.size());
      ref::dequantize_nf4(codes.data(), absmax.data(), n, y.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = i / kNf4Block;
        float am = 0.0f;
        for (int64_t j = b * kNf4Block; j < std::min(n, (b + 1) * kNf4Block); ++j)
          am = std::max(am, std::fabs(x[j]));
        ASSERT_EQ(absmax[size_t(b)], am) << "block " << b;
        double nearest = INFINITY;
        for (float c : kNf4Code) nearest = std::min(nearest, std::fabs(double(x[i]) - double(c) * am));
        const double err = std::fabs(double(x[i]) - double(y[i]));
        ASSERT_LE(err, nearest + slack(am)) << "element " << i;
        ASSERT_LE(err, half_gap * am + slack(am)) << "element " << i;
        if (std::fabs(x[i]) == am) {
          ASSERT_EQ(y[i], x[i]) << "the block's extreme is exact, element " << i;
        }
      }
      if (n % 2 == 1) {
        EXPECT_EQ(codes.back() & 0x0F, 7) << "odd length pads with the code of 0";
      }
    }
  }
}

TEST(QuantNf4, AValueOnAMidpointTakesTheLowerCode) {
  for (int k = 0; k < 15; ++k) {
    const float mid = (kNf4Code[k] + kNf4Code[k + 1]) / 2.0f;
    const float x[3] = {1.0f, mid, std::nextafter(mid, 2.0f)};
    uint8_t codes[2];
    float absmax;
    ref::quantize_nf4(x, 3, codes, &absmax);
    EXPECT_EQ(codes[0] & 0x0F, k) << "midpoint " << k;
    EXPECT_EQ(codes[1] >> 4, k + 1) << "just above midpoint " << k;
  }
}

TEST(QuantNf4, ZeroBlockDecodesToZero) {
  std::vector<float> x(65, 0.0f);
  x[64] = -2.0f;
  std::vector<uint8_t> codes(33);
  std::vector<float> absmax(2), y(65);
  ref::quantize_nf4(x.data(), 65, codes.data(), absmax.data());
  EXPECT_EQ(absmax[0], 0.0f);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(codes[size_t(j)], 0x77) << j;
  EXPECT_EQ(codes[32], 0x07);  // -2 is -1.0 * absmax: code 0, then the padding nibble
  ref::dequantize_nf4(codes.data(), absmax.data(), 65, y.data());
  EXPECT_EQ(y, x);
}

TEST(QuantNf4, DoubleQuantizedAbsmaxWithinHalfTheWidestMapGap) {
  const double half_gap = widest_gap(ref::dynamic_map(), 256) / 2.0;
  for (int64_t blocks : {int64_t(1), int64_t(7), int64_t(255), int64_t(256), int64_t(257), int64_t(600)}) {
    for (Dist d : kDists) {
      SCOPED_TRACE("blocks " + std::to_string(blocks) + " dist " + std::to_string(int(d)));
      // Absmax values are positive: the magnitudes of samples, as a block's maximum would be.
      std::vector<float> absmax = sample(d, blocks, uint32_t(blocks) + 11u * uint32_t(d));
      for (float& a : absmax) a = std::fabs(a) + 1e-3f;
      std::vector<uint8_t> q(static_cast<size_t>(blocks));
      std::vector<float> nested(size_t(ref::quant_blocks(blocks, kNf4NestedBlock))),
          back(static_cast<size_t>(blocks));
      const float offset = ref::double_quantize_absmax(absmax.data(), blocks, q.data(), nested.data());
      ref::dequantize_double_absmax(q.data(), nested.data(), offset, blocks, back.data());
      for (int64_t b = 0; b < blocks; ++b) {
        const float nb = nested[size_t(b / kNf4NestedBlock)];
        const double err = std::fabs(double(absmax[size_t(b)]) - double(back[size_t(b)]));
        ASSERT_LE(err, half_gap * nb + slack(nb) + slack(std::fabs(offset))) << "absmax " << b;
      }
    }
  }
}

TEST(QuantNf4, BitsPerParam) {
  EXPECT_EQ(ref::bits_per_param(ref::QuantFormat::Nf4), 4.5);
  EXPECT_EQ(ref::bits_per_param(ref::QuantFormat::Nf4DoubleQuant), 4.0 + 0.125 + 1.0 / 512.0);
  EXPECT_NEAR(ref::bits_per_param(ref::QuantFormat::Nf4DoubleQuant), 4.127, 0.0005);
  EXPECT_EQ(ref::bits_per_param(ref::QuantFormat::Int8), 8.5);
}

TEST(QuantInt8, RoundTripWithinHalfAStep) {
  for (Dist d : kDists) {
    for (int64_t n : kLengths) {
      SCOPED_TRACE("dist " + std::to_string(int(d)) + " n " + std::to_string(n));
      const std::vector<float> x = sample(d, n, uint32_t(n) * 5 + uint32_t(d));
      std::vector<int8_t> codes(static_cast<size_t>(n));
      std::vector<float> absmax(size_t(ref::quant_blocks(n, kInt8Block))), y(static_cast<size_t>(n));
      ref::quantize_int8(x.data(), n, codes.data(), absmax.data());
      ref::dequantize_int8(codes.data(), absmax.data(), n, y.data());
      for (int64_t i = 0; i < n; ++i) {
        const float am = absmax[size_t(i / kInt8Block)];
        ASSERT_GE(codes[size_t(i)], -127) << i;
        ASSERT_LE(std::fabs(double(x[i]) - double(y[i])), double(am) / 254.0 + slack(am)) << "element " << i;
        if (std::fabs(x[i]) == am) {
          ASSERT_EQ(std::abs(int(codes[size_t(i)])), 127) << i;
        }
      }
    }
  }
}

TEST(QuantInt8, KnownCodes) {
  // absmax 2: one step is 2/127; 1.0 is 63.5 steps (ties to even: 64), -0.5 is -31.75 steps.
  const float x[] = {2.0f, 1.0f, -0.5f, 0.0f, -2.0f};
  int8_t codes[5];
  float absmax;
  ref::quantize_int8(x, 5, codes, &absmax);
  EXPECT_EQ(absmax, 2.0f);
  const int8_t want[] = {127, 64, -32, 0, -127};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(codes[i], want[i]) << i;
}

TEST(QuantNf4, NonFiniteInputIsRefused) {
  std::vector<float> x(70, 1.0f);
  x[66] = NAN;
  std::vector<uint8_t> codes(35);
  std::vector<int8_t> codes8(70);
  std::vector<float> absmax(2);
  EXPECT_NE(test::error_of([&] {
              ref::quantize_nf4(x.data(), 70, codes.data(), absmax.data());
            }).find("quantize_nf4: element 66 is not finite"),
            std::string::npos);
  x[66] = INFINITY;
  EXPECT_NE(test::error_of([&] {
              ref::quantize_int8(x.data(), 70, codes8.data(), absmax.data());
            }).find("quantize_int8: element 66 is not finite"),
            std::string::npos);
}

}  // namespace
}  // namespace tf
