// defines: tests of ggml's reference quantizers (kernels/cpu/ref/quantize_ggml.h): bytes against
//          gguf-py's quants.quantize, round-trip error bounds, and the refusals
//
// The fixture (tools/make_ggml_quant_fixture.py) holds what gguf-py 0.19 made of three vectors:
// normal, heavy-tailed, and one block per edge of the formulas (magnitude ties, codes exactly on
// rounding and truncation boundaries, constant and zero blocks, a subnormal f16 scale). The
// comparisons with it are exact.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "src/core/error.h"
#include "src/io/safetensors.h"

namespace tf {
namespace {

struct Format {
  const char* name;  // the fixture's suffix
  GgmlType type;
};

constexpr Format kFormats[] = {{"q8_0", GgmlType::Q8_0},
                               {"q4_0", GgmlType::Q4_0},
                               {"q4_1", GgmlType::Q4_1},
                               {"q5_0", GgmlType::Q5_0},
                               {"q5_1", GgmlType::Q5_1}};

template <typename T>
std::vector<T> fixture_array(const io::SafetensorsFile& f, const std::string& name) {
  const io::SafetensorsTensor& t = f.get(name);
  std::vector<T> v(t.bytes.size() / sizeof(T));
  EXPECT_EQ(v.size() * sizeof(T), t.bytes.size()) << name;
  std::memcpy(v.data(), t.bytes.data(), v.size() * sizeof(T));
  return v;
}

std::vector<uint8_t> quantize(GgmlType type, const std::vector<float>& x) {
  std::vector<uint8_t> out(x.size() / kQK0 * size_t(ggml_type_info(uint32_t(type)).block_bytes));
  ref::quantize_rows_ggml(type, x.data(), int64_t(x.size()), out.data());
  return out;
}

class QuantGgmlFixture : public ::testing::TestWithParam<const char*> {};

TEST_P(QuantGgmlFixture, MatchesGgufPyByteForByte) {
  const io::SafetensorsFile f =
      io::SafetensorsFile::open(std::string(TIGHTFIT_FIXTURES) + "/ggml_quant.safetensors");
  const std::string c = GetParam();
  const std::vector<float> x = fixture_array<float>(f, c + ".input");
  for (const Format& fmt : kFormats) {
    const std::vector<uint8_t> got = quantize(fmt.type, x);
    const std::vector<uint8_t> want = fixture_array<uint8_t>(f, c + "." + fmt.name);
    ASSERT_EQ(got.size(), want.size()) << c << " " << fmt.name;
    const auto diff = std::mismatch(got.begin(), got.end(), want.begin());
    EXPECT_EQ(diff.first, got.end()) << c << " " << fmt.name << ": first differing byte "
                                     << (diff.first - got.begin()) << " (block "
                                     << (diff.first - got.begin()) /
                                            ggml_type_info(uint32_t(fmt.type)).block_bytes
                                     << ")";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, QuantGgmlFixture,
                         ::testing::Values("normal", "heavy", "edges", "contraction"));

// Dequantized, every value is within the format's step of the input. Per block of amax a (min m,
// max M): Q8_0 rounds to the nearest of steps d = a / 127 (half a step) and stores d as f16 (up to
// 127 steps of 2^-11 d more); Q4_0 / Q5_0 truncate x / d + 8.5 (16.5), half a step of d = a / 8
// (a / 16), except the value opposite the largest one, which the top code clips by a whole step;
// Q4_1 / Q5_1 half a step of (M - m) / 15 (31) plus the f16 roundings of d and m. The slack covers
// the f32 roundings of each formula.
double step_bound(GgmlType type, const float* x) {
  float a = 0, lo = x[0], hi = x[0];
  for (int j = 0; j < kQK0; ++j) {
    a = std::max(a, std::fabs(x[j]));
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
  }
  const double f16 = std::ldexp(1.0, -11);
  switch (type) {
    case GgmlType::Q8_0: return a / 127.0 * (0.5 + 127 * f16);
    case GgmlType::Q4_0: return a / 8.0 * (1 + 8 * f16);
    case GgmlType::Q5_0: return a / 16.0 * (1 + 16 * f16);
    case GgmlType::Q4_1: return (hi - lo) / 15.0 * (0.5 + 15 * f16) + std::fabs(lo) * f16;
    default: return (hi - lo) / 31.0 * (0.5 + 31 * f16) + std::fabs(lo) * f16;
  }
}

TEST(QuantGgml, RoundTripsWithinAStep) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::student_t_distribution<float> heavy(2.0f);
  std::vector<float> x(32 * 64);
  for (size_t i = 0; i < x.size(); ++i) x[i] = i < x.size() / 2 ? normal(rng) : heavy(rng);
  for (const Format& fmt : kFormats) {
    const std::vector<uint8_t> q = quantize(fmt.type, x);
    std::vector<float> y(x.size());
    ref::dequantize_rows(fmt.type, q.data(), int64_t(x.size()), y.data());
    double worst = 0;  // the largest error as a fraction of its bound
    for (size_t b = 0; b < x.size() / kQK0; ++b) {
      const double bound = step_bound(fmt.type, &x[b * kQK0]) * (1 + 1e-5) + 1e-12;
      for (size_t j = b * kQK0; j < (b + 1) * kQK0; ++j) {
        ASSERT_LE(std::fabs(double(y[j]) - double(x[j])), bound) << fmt.name << " element " << j;
        worst = std::max(worst, std::fabs(double(y[j]) - double(x[j])) / bound);
      }
    }
    // The bound is not loose by orders of magnitude: some element comes within a factor 3 of it.
    EXPECT_GT(worst, 0.3) << fmt.name;
  }
}

TEST(QuantGgml, RefusesOtherTypesPartialBlocksAndNonFiniteValues) {
  std::vector<float> x(64, 0.5f);
  std::vector<uint8_t> out(1024);
  const auto message = [&](GgmlType t, int64_t n) {
    try {
      ref::quantize_rows_ggml(t, x.data(), n, out.data());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(GgmlType::Q4_K, 64)
                .find("cannot quantize to Q4_K; tightfit quantizes to Q8_0, Q4_0, "
                      "Q4_1, Q5_0, Q5_1"),
            std::string::npos)
      << message(GgmlType::Q4_K, 64);
  EXPECT_NE(message(GgmlType::Q8_0, 40).find("40 values are not whole blocks of 32 for Q8_0"),
            std::string::npos)
      << message(GgmlType::Q8_0, 40);
  x[37] = std::nanf("");
  EXPECT_NE(message(GgmlType::Q4_0, 64).find("element 37 is not finite"), std::string::npos)
      << message(GgmlType::Q4_0, 64);
}

}  // namespace
}  // namespace tf
