// Reference dequantization of the GGUF block formats: hand-built blocks with values known in
// closed form, and a fixture written by gguf-py (tools/make_gguf_fixture.py) with its expected f32.
//
// Every comparison is exact. Dequantization is a fixed sequence of f32 operations (f16 -> f32 is
// exact; then one or two products and at most one subtraction, each rounded once), performed in
// the same order as ggml and gguf-py, so the same inputs give the same bits; any difference is a
// layout or formula error, which is exactly what these tests are for.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/io/gguf.h"

namespace tf {
namespace {

// Packs eight 6-bit scales and mins the way k_scale_min unpacks them (the inverse of the layout).
void pack_k_scales(const int sc[8], const int mn[8], uint8_t out[12]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = uint8_t((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    out[j + 4] = uint8_t((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    out[j + 8] = uint8_t((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
}

TEST(Dequant, Q8_0KnownValues) {
  BlockQ8_0 b{};
  b.d = f32_to_f16(0.5f);
  for (int j = 0; j < 32; ++j) b.qs[j] = int8_t(j * 8 - 128);
  std::vector<float> y(32);
  ref::dequantize_q8_0(&b, 32, y.data());
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], 0.5f * float(j * 8 - 128)) << j;
}

TEST(Dequant, Q4_0KnownValues) {
  BlockQ4_0 b{};
  b.d = f32_to_f16(1.0f);
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | ((15 - j) << 4));
  std::vector<float> y(32);
  ref::dequantize_q4_0(&b, 32, y.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], float(j - 8)) << j;
    EXPECT_EQ(y[j + 16], float(7 - j)) << j;
  }
}

TEST(Dequant, Q4_1KnownValues) {
  BlockQ4_1 b{};
  b.d = f32_to_f16(2.0f);
  b.m = f32_to_f16(-1.0f);
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | ((15 - j) << 4));
  std::vector<float> y(32);
  ref::dequantize_q4_1(&b, 32, y.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 2.0f * float(j) - 1.0f) << j;
    EXPECT_EQ(y[j + 16], 2.0f * float(15 - j) - 1.0f) << j;
  }
}

// The fifth bits as one little-endian word: element j's is bit j.
constexpr uint32_t kQ5High = 0xA5C3F00Fu;

void set_q5_high(uint8_t qh[4]) {
  for (int i = 0; i < 4; ++i) qh[i] = uint8_t(kQ5High >> (8 * i));
}

TEST(Dequant, Q5_0KnownValues) {
  BlockQ5_0 b{};
  b.d = f32_to_f16(0.5f);
  set_q5_high(b.qh);
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | ((15 - j) << 4));
  std::vector<float> y(32);
  ref::dequantize_q5_0(&b, 32, y.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * float(j + 16 * int((kQ5High >> j) & 1) - 16)) << j;
    EXPECT_EQ(y[j + 16], 0.5f * float(15 - j + 16 * int((kQ5High >> (j + 16)) & 1) - 16)) << j;
  }
}

TEST(Dequant, Q5_1KnownValues) {
  BlockQ5_1 b{};
  b.d = f32_to_f16(2.0f);
  b.m = f32_to_f16(-1.0f);
  set_q5_high(b.qh);
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | ((15 - j) << 4));
  std::vector<float> y(32);
  ref::dequantize_q5_1(&b, 32, y.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 2.0f * float(j + 16 * int((kQ5High >> j) & 1)) - 1.0f) << j;
    EXPECT_EQ(y[j + 16], 2.0f * float(15 - j + 16 * int((kQ5High >> (j + 16)) & 1)) - 1.0f) << j;
  }
}

// Element e of a Q2_K / Q3_K super-block keeps its low two bits in qs byte 32 * (e / 128) + e % 32,
// at bit 2 * ((e % 128) / 32).
void put_2bit(uint8_t qs[64], int e, int v) {
  qs[32 * (e / 128) + e % 32] = uint8_t(qs[32 * (e / 128) + e % 32] | (v << (2 * ((e % 128) / 32))));
}

TEST(Dequant, Q2_KKnownValues) {
  BlockQ2_K b{};
  b.d = f32_to_f16(0.5f);
  b.dmin = f32_to_f16(0.25f);
  for (int s = 0; s < 16; ++s) b.scales[s] = uint8_t(((s * 5 + 2) & 0xF) | (((s * 3 + 1) & 0xF) << 4));
  for (int e = 0; e < 256; ++e) put_2bit(b.qs, e, (e * 7 + e / 5) % 4);
  std::vector<float> y(256);
  ref::dequantize_q2_k(&b, 256, y.data());
  for (int e = 0; e < 256; ++e) {
    const int s = e / 16;
    const float sc = float((s * 5 + 2) & 0xF), mn = float((s * 3 + 1) & 0xF);
    EXPECT_EQ(y[e], 0.5f * sc * float((e * 7 + e / 5) % 4) - 0.25f * mn) << e;
  }
}

TEST(Dequant, Q3_KKnownValues) {
  // 6-bit scales that use both high bits: the low nibble of scale s goes to byte s % 8 (high
  // nibble for s >= 8), its top two bits to byte 8 + s % 4 at bit 2 * (s / 4).
  BlockQ3_K b{};
  b.d = f32_to_f16(0.25f);
  const auto scale = [](int s) { return (s * 23 + 7) % 64; };
  for (int s = 0; s < 16; ++s) {
    b.scales[s % 8] = uint8_t(b.scales[s % 8] | ((scale(s) & 0xF) << (4 * (s / 8))));
    b.scales[8 + s % 4] = uint8_t(b.scales[8 + s % 4] | ((scale(s) >> 4) << (2 * (s / 4))));
  }
  // The third bit of element e is bit e / 32 of hmask[e % 32]; when clear, 4 is subtracted.
  const auto high = [](int e) { return (e * 5 + e / 7) % 3 == 0; };
  for (int e = 0; e < 256; ++e) {
    put_2bit(b.qs, e, (e * 3 + e / 11) % 4);
    if (high(e)) b.hmask[e % 32] = uint8_t(b.hmask[e % 32] | (1 << (e / 32)));
  }
  std::vector<float> y(256);
  ref::dequantize_q3_k(&b, 256, y.data());
  for (int e = 0; e < 256; ++e) {
    const int q = (e * 3 + e / 11) % 4 - (high(e) ? 0 : 4);
    EXPECT_EQ(y[e], 0.25f * float(scale(e / 16) - 32) * float(q)) << e;
  }
}

// Scales and mins that use all six bits, so the split storage of sub-blocks 4-7 matters.
const int kSc[8] = {1, 17, 33, 63, 5, 40, 62, 48};
const int kMn[8] = {63, 2, 31, 16, 47, 9, 60, 33};

TEST(Dequant, Q4_KKnownValues) {
  BlockQ4_K b{};
  b.d = f32_to_f16(0.5f);
  b.dmin = f32_to_f16(0.25f);
  pack_k_scales(kSc, kMn, b.scales);
  for (int i = 0; i < 128; ++i) b.qs[i] = uint8_t((i * 7) & 0xF) | uint8_t(((i * 3 + 1) & 0xF) << 4);
  std::vector<float> y(256);
  ref::dequantize_q4_k(&b, 256, y.data());
  for (int e = 0; e < 256; ++e) {
    const int sub = e / 32, l = e % 32, byte = (sub / 2) * 32 + l;
    const int q = sub % 2 == 0 ? (byte * 7) & 0xF : (byte * 3 + 1) & 0xF;
    EXPECT_EQ(y[e], 0.5f * float(kSc[sub]) * float(q) - 0.25f * float(kMn[sub])) << e;
  }
}

TEST(Dequant, Q5_KKnownValues) {
  BlockQ5_K b{};
  b.d = f32_to_f16(0.5f);
  b.dmin = f32_to_f16(0.25f);
  pack_k_scales(kSc, kMn, b.scales);
  for (int i = 0; i < 128; ++i) b.qs[i] = uint8_t((i * 5) & 0xF) | uint8_t(((i * 11 + 3) & 0xF) << 4);
  for (int l = 0; l < 32; ++l) b.qh[l] = uint8_t(l * 37 + 11);
  std::vector<float> y(256);
  ref::dequantize_q5_k(&b, 256, y.data());
  for (int e = 0; e < 256; ++e) {
    const int sub = e / 32, l = e % 32, byte = (sub / 2) * 32 + l;
    const int lo = sub % 2 == 0 ? (byte * 5) & 0xF : (byte * 11 + 3) & 0xF;
    const int hi = ((uint8_t(l * 37 + 11) >> sub) & 1) << 4;
    EXPECT_EQ(y[e], 0.5f * float(kSc[sub]) * float(lo + hi) - 0.25f * float(kMn[sub])) << e;
  }
}

TEST(Dequant, Q6_KKnownValues) {
  // Element e's 6-bit value is (e * 13 + 5) mod 64; scatter it into ql/qh by the documented layout.
  BlockQ6_K b{};
  b.d = f32_to_f16(0.25f);
  for (int s = 0; s < 16; ++s) b.scales[s] = int8_t(s * 9 - 70);
  for (int e = 0; e < 256; ++e) {
    const int v = (e * 13 + 5) % 64, half = e / 128, r = e % 128, quarter = r / 32, l = r % 32;
    const int ql_index = 64 * half + l + (quarter % 2) * 32;
    const int shift = quarter < 2 ? 0 : 4;
    b.ql[ql_index] = uint8_t(b.ql[ql_index] | ((v & 0xF) << shift));
    b.qh[32 * half + l] = uint8_t(b.qh[32 * half + l] | ((v >> 4) << (2 * quarter)));
  }
  std::vector<float> y(256);
  ref::dequantize_q6_k(&b, 256, y.data());
  for (int e = 0; e < 256; ++e) {
    const int v = (e * 13 + 5) % 64;
    EXPECT_EQ(y[e], 0.25f * float(b.scales[e / 16]) * float(v - 32)) << e;
  }
}

TEST(Dequant, RejectsPartialBlocksAndUnsupportedTypes) {
  std::vector<uint8_t> raw(256, 0);
  std::vector<float> y(256);
  EXPECT_THROW(ref::dequantize_rows(GgmlType::Q8_0, raw.data(), 31, y.data()), Error);
  EXPECT_THROW(ref::dequantize_rows(GgmlType::Q3_K, raw.data(), 128, y.data()), Error);
  for (GgmlType type : {GgmlType::IQ4_NL, GgmlType::TQ2_0}) {
    const char* name = ggml_type_info(uint32_t(type)).name;
    try {
      ref::dequantize_rows(type, raw.data(), 256, y.data());
      FAIL() << name << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("ggml type ") + name), std::string::npos) << e.what();
    }
  }
}

const char* const kFixtureTypes[] = {"F32",  "F16",  "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                     "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"};

TEST(Dequant, MatchesGgufPyFixtureBitForBit) {
  const io::GgufFile f = io::GgufFile::open(std::string(TIGHTFIT_FIXTURES) + "/gguf_dequant.gguf");
  for (const char* type : kFixtureTypes) {
    SCOPED_TRACE(type);
    const io::GgufTensorInfo& t = f.tensor(std::string("t.") + type);
    const io::GgufTensorInfo& want = f.tensor(std::string("t.") + type + ".expected");
    EXPECT_STREQ(ggml_type_info(uint32_t(t.type)).name, type);
    ASSERT_EQ(t.shape(), want.shape());
    ASSERT_EQ(want.type, GgmlType::F32);
    std::vector<float> got(size_t(t.n_elements));
    // Row by row, as callers dequantize: each row starts on a block boundary.
    for (int64_t r = 0; r < t.n_rows(); ++r) {
      ref::dequantize_rows(t.type, t.data + uint64_t(r) * t.row_bytes(), t.row_length(),
                           got.data() + r * t.row_length());
    }
    ASSERT_EQ(std::memcmp(got.data(), want.data, want.n_bytes), 0) << "dequantized bits differ";
  }
}

TEST(Dequant, TypedFunctionsAgreeWithDispatch) {
  const io::GgufFile f = io::GgufFile::open(std::string(TIGHTFIT_FIXTURES) + "/gguf_dequant.gguf");
  const auto check = [&](const char* name, auto fn, auto block_tag) {
    using Block = decltype(block_tag);
    const io::GgufTensorInfo& t = f.tensor(name);
    std::vector<Block> blocks(t.n_bytes / sizeof(Block));
    std::memcpy(blocks.data(), t.data, t.n_bytes);
    std::vector<float> a(size_t(t.n_elements)), b(size_t(t.n_elements));
    fn(blocks.data(), t.n_elements, a.data());
    ref::dequantize_rows(t.type, t.data, t.n_elements, b.data());
    EXPECT_EQ(a, b) << name;
  };
  check("t.Q8_0", ref::dequantize_q8_0, BlockQ8_0{});
  check("t.Q4_0", ref::dequantize_q4_0, BlockQ4_0{});
  check("t.Q4_1", ref::dequantize_q4_1, BlockQ4_1{});
  check("t.Q5_0", ref::dequantize_q5_0, BlockQ5_0{});
  check("t.Q5_1", ref::dequantize_q5_1, BlockQ5_1{});
  check("t.Q2_K", ref::dequantize_q2_k, BlockQ2_K{});
  check("t.Q3_K", ref::dequantize_q3_k, BlockQ3_K{});
  check("t.Q4_K", ref::dequantize_q4_k, BlockQ4_K{});
  check("t.Q5_K", ref::dequantize_q5_k, BlockQ5_K{});
  check("t.Q6_K", ref::dequantize_q6_k, BlockQ6_K{});
}

}  // namespace
}  // namespace tf
