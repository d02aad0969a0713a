// Loading base weights under every QuantMode: a GGUF file with a tensor of each ggml type (blocks
// taken from tests/fixtures/gguf_dequant.gguf), HF directories of f32/bf16/f16 tensors, and the
// bitsandbytes 4-bit checkpoint of tests/fixtures/bnb4bit (tools/make_bnb4bit_fixture.py: saved by
// transformers' save_pretrained of a model loaded with load_in_4bit on the CPU).
//
// Comparisons of stored values are exact: keep and none read the file's bytes or ref's
// dequantization of them, and bf16 / int8 / nf4 must be exactly the tf::ref conversion of those f32
// values, whatever the chunking.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "model_test_util.h"
#include "op_test_util.h"
#include "src/io/bnb4bit.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "src/io/model_loader.h"
#include "src/io/safetensors.h"
#include "test_util.h"

namespace tf {
namespace {

using io::QuantMode;
using nlohmann::json;

const std::string kFixtures = TIGHTFIT_FIXTURES;
constexpr QuantMode kModes[] = {QuantMode::Keep, QuantMode::None, QuantMode::Bf16, QuantMode::Int8,
                                QuantMode::Nf4,  QuantMode::Q8_0, QuantMode::Q4_0, QuantMode::Q4_1,
                                QuantMode::Q5_0, QuantMode::Q5_1};
constexpr QuantMode kGgmlModes[] = {QuantMode::Q8_0, QuantMode::Q4_0, QuantMode::Q4_1, QuantMode::Q5_0,
                                    QuantMode::Q5_1};

// The f32 values of a stored weight; a double-quantized NF4 one through the quantize references,
// which round the absmax product before adding the offset, as bitsandbytes does.
std::vector<float> values_of(const WeightRef& w) {
  const int64_t n = w.rows * w.cols;
  std::vector<float> y(static_cast<size_t>(n));
  if (w.dtype == DType::NF4 && w.scales.nested) {
    std::vector<float> absmax(static_cast<size_t>(ref::quant_blocks(n, kNf4Block)));
    ref::dequantize_double_absmax(static_cast<const uint8_t*>(w.scales.absmax), w.scales.nested,
                                  w.scales.offset, int64_t(absmax.size()), absmax.data());
    ref::dequantize_nf4(static_cast<const uint8_t*>(w.data), absmax.data(), n, y.data());
  } else {
    ref::dequantize_weight_tile(y.data(), w.cols, w, 0, w.rows, 0, w.cols);
  }
  return y;
}

bool same_bits(const void* a, const void* b, size_t bytes) {
  return std::memcmp(a, b, bytes) == 0;
}

// `got` is exactly what `mode` makes of the f32 values x; a float source that the mode keeps was
// checked by the caller (it must be in place).
void expect_converted(const WeightRef& got, const std::vector<float>& x, QuantMode mode,
                      const std::string& what) {
  SCOPED_TRACE(what + " as " + std::string(io::quant_mode_name(mode)));
  const int64_t n = int64_t(x.size());
  ASSERT_EQ(got.rows * got.cols, n);
  switch (mode) {
    case QuantMode::Keep:
    case QuantMode::None: {
      const std::vector<float> v = values_of(got);
      EXPECT_TRUE(same_bits(v.data(), x.data(), x.size() * 4)) << "not the exact dequantization";
      return;
    }
    case QuantMode::Bf16: {
      ASSERT_EQ(got.dtype, DType::BF16);
      std::vector<uint16_t> want(x.size());
      for (size_t i = 0; i < x.size(); ++i) want[i] = f32_to_bf16(x[i]);
      EXPECT_TRUE(same_bits(got.data, want.data(), want.size() * 2)) << "not round-to-nearest-even bf16";
      return;
    }
    case QuantMode::Int8: {
      ASSERT_EQ(got.dtype, DType::INT8);
      std::vector<int8_t> codes(x.size());
      std::vector<float> absmax(size_t(ref::quant_blocks(n, kInt8Block)));
      ref::quantize_int8(x.data(), n, codes.data(), absmax.data());
      EXPECT_TRUE(same_bits(got.data, codes.data(), codes.size())) << "int8 codes";
      ASSERT_NE(got.scales.absmax, nullptr);
      EXPECT_EQ(got.scales.nested, nullptr);
      EXPECT_TRUE(same_bits(got.scales.absmax, absmax.data(), absmax.size() * 4)) << "int8 absmax";
      return;
    }
    case QuantMode::Nf4: {
      ASSERT_EQ(got.dtype, DType::NF4);
      const int64_t blocks = ref::quant_blocks(n, kNf4Block);
      std::vector<uint8_t> codes(size_t(ref::nf4_packed_bytes(n)));
      std::vector<float> absmax(static_cast<size_t>(blocks));
      ref::quantize_nf4(x.data(), n, codes.data(), absmax.data());
      std::vector<uint8_t> qabs(static_cast<size_t>(blocks));
      std::vector<float> nested(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)));
      const float offset = ref::double_quantize_absmax(absmax.data(), blocks, qabs.data(), nested.data());
      EXPECT_TRUE(same_bits(got.data, codes.data(), codes.size())) << "nf4 codes";
      ASSERT_NE(got.scales.nested, nullptr) << "nf4 is always double-quantized";
      EXPECT_TRUE(same_bits(got.scales.absmax, qabs.data(), qabs.size())) << "absmax codes";
      EXPECT_TRUE(same_bits(got.scales.nested, nested.data(), nested.size() * 4)) << "nested absmax";
      EXPECT_EQ(got.scales.offset, offset);
      return;
    }
    case QuantMode::Q8_0:
    case QuantMode::Q4_0:
    case QuantMode::Q4_1:
    case QuantMode::Q5_0:
    case QuantMode::Q5_1: {
      // ggml's reference quantizer of the exact f32 values, byte for byte: the blocks a GGUF file
      // of this type made from the same values holds.
      const GgmlType type = *io::ggml_type_of(mode);
      ASSERT_EQ(got.dtype, *dtype_of_ggml(type));
      std::vector<uint8_t> want(size_t(dtype_bytes(got.dtype, n)));
      ref::quantize_rows_ggml(type, x.data(), n, want.data());
      EXPECT_TRUE(same_bits(got.data, want.data(), want.size())) << "not ggml's reference blocks";
      EXPECT_EQ(got.scales.absmax, nullptr) << "ggml blocks hold their scales";
      return;
    }
  }
}

// ---- GGUF ----------------------------------------------------------------------------------

LlamaConfig gguf_config() {
  LlamaConfig c;
  c.hidden = 256;  // the k-quants need rows of whole 256-element super-blocks
  c.intermediate = 512;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 64;
  c.vocab = 64;
  return c;
}

// Every type tightfit reads, spread over the slots (norms are f32 as llama.cpp writes them).
GgmlType gguf_type(io::GgufLlamaRole role, int layer) {
  using R = io::GgufLlamaRole;
  switch (role) {
    case R::TokenEmbd: return GgmlType::Q8_0;
    case R::Output: return GgmlType::Q6_K;
    case R::AttnNorm:
    case R::FfnNorm:
    case R::OutputNorm: return GgmlType::F32;
    default: break;
  }
  static constexpr GgmlType l0[] = {GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,
                                    GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K};
  static constexpr GgmlType l1[] = {GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::F16, GgmlType::BF16,
                                    GgmlType::F32,  GgmlType::Q8_0, GgmlType::Q4_K};
  static constexpr R order[] = {R::AttnQ,   R::AttnK, R::AttnV,  R::AttnOutput,
                                R::FfnGate, R::FfnUp, R::FfnDown};
  const size_t i = size_t(std::find(std::begin(order), std::end(order), role) - std::begin(order));
  return layer == 0 ? l0[i] : l1[i];
}

std::vector<io::GgufLlamaTensor> gguf_tensors(const LlamaConfig& c) {
  using R = io::GgufLlamaRole;
  std::vector<io::GgufLlamaTensor> t = {{R::TokenEmbd, -1}, {R::OutputNorm, -1}};
  if (!c.tie_embeddings) t.push_back({R::Output, -1});
  for (int l = 0; l < c.n_layers; ++l)
    for (R r : {R::AttnNorm, R::AttnQ, R::AttnK, R::AttnV, R::AttnOutput, R::FfnNorm, R::FfnGate, R::FfnUp,
                R::FfnDown})
      t.push_back({r, l});
  return t;
}

std::pair<int64_t, int64_t> role_shape(const LlamaConfig& c, io::GgufLlamaRole r) {
  using R = io::GgufLlamaRole;
  switch (r) {
    case R::TokenEmbd:
    case R::Output: return {c.vocab, c.hidden};
    case R::AttnNorm:
    case R::FfnNorm:
    case R::OutputNorm: return {1, c.hidden};
    case R::AttnQ: return {c.q_dim(), c.hidden};
    case R::AttnK:
    case R::AttnV: return {c.kv_dim(), c.hidden};
    case R::AttnOutput: return {c.hidden, c.q_dim()};
    case R::AttnQBias: return {1, c.q_dim()};
    case R::AttnKBias:
    case R::AttnVBias: return {1, c.kv_dim()};
    case R::FfnGate:
    case R::FfnUp: return {c.intermediate, c.hidden};
    case R::FfnDown: return {c.hidden, c.intermediate};
    case R::AttnQNorm:
    case R::AttnKNorm: return {1, c.head_dim};
    case R::AttnPostNorm:
    case R::FfnPostNorm: return {1, c.hidden};
    case R::AttnQkv: return {c.q_dim() + 2 * c.kv_dim(), c.hidden};
  }
  return {0, 0};
}

// Writes a GGUF llama file whose quantized tensors repeat the blocks of the gguf-py fixture's
// tensor of the same type (finite scales, every bit pattern of the codes) and whose float tensors
// are seeded normals.
void write_typed_gguf(const LlamaConfig& c, const std::string& path) {
  const io::GgufFile blocks = io::GgufFile::open(kFixtures + "/gguf_dequant.gguf");
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.embedding_length", uint32_t(c.hidden));
  w.add_u32("llama.feed_forward_length", uint32_t(c.intermediate));
  w.add_u32("llama.block_count", uint32_t(c.n_layers));
  w.add_u32("llama.attention.head_count", uint32_t(c.n_heads));
  w.add_u32("llama.attention.head_count_kv", uint32_t(c.n_kv_heads));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_string_array("tokenizer.ggml.tokens", std::vector<std::string>(size_t(c.vocab), "t"));
  std::vector<std::vector<uint8_t>> data;
  uint64_t seed = 0;
  for (const io::GgufLlamaTensor& t : gguf_tensors(c)) {
    const auto [rows, cols] = role_shape(c, t.role);
    const GgmlType type = gguf_type(t.role, t.layer);
    const GgmlTypeInfo info = ggml_type_info(uint32_t(type));
    const int64_t n = rows * cols;
    std::vector<uint8_t>& d = data.emplace_back(size_t(n / info.block_elems * info.block_bytes));
    if (info.block_elems == 1) {
      const std::vector<float> x = test::random_floats(size_t(n), ++seed, 0.05f);
      for (int64_t i = 0; i < n; ++i) {
        if (type == GgmlType::F32) std::memcpy(&d[size_t(i) * 4], &x[size_t(i)], 4);
        const uint16_t h = type == GgmlType::F16 ? f32_to_f16(x[size_t(i)]) : f32_to_bf16(x[size_t(i)]);
        if (type != GgmlType::F32) std::memcpy(&d[size_t(i) * 2], &h, 2);
      }
    } else {
      const io::GgufTensorInfo& src = blocks.tensor(std::string("t.") + info.name);
      for (size_t off = 0; off < d.size(); off += src.n_bytes)
        std::memcpy(&d[off], src.data, std::min(size_t(src.n_bytes), d.size() - off));
    }
    const std::vector<int64_t> ne = rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{cols, rows};
    w.add_tensor(io::gguf_llama_tensor_name(t), type, ne, d.data(), d.size());
  }
  w.write(path);
}

WeightSlot slot_of(io::GgufLlamaRole r) {
  using R = io::GgufLlamaRole;
  switch (r) {
    case R::TokenEmbd: return WeightSlot::Embed;
    case R::AttnNorm: return WeightSlot::AttnNorm;
    case R::AttnQ: return WeightSlot::Q;
    case R::AttnK: return WeightSlot::K;
    case R::AttnV: return WeightSlot::V;
    case R::AttnQBias: return WeightSlot::QBias;
    case R::AttnKBias: return WeightSlot::KBias;
    case R::AttnVBias: return WeightSlot::VBias;
    case R::AttnOutput: return WeightSlot::O;
    case R::FfnNorm: return WeightSlot::MlpNorm;
    case R::FfnGate: return WeightSlot::Gate;
    case R::FfnUp: return WeightSlot::Up;
    case R::FfnDown: return WeightSlot::Down;
    case R::AttnQNorm: return WeightSlot::QNorm;
    case R::AttnKNorm: return WeightSlot::KNorm;
    case R::AttnPostNorm: return WeightSlot::PostAttnNorm;
    case R::FfnPostNorm: return WeightSlot::PostMlpNorm;
    case R::OutputNorm: return WeightSlot::FinalNorm;
    case R::Output: return WeightSlot::LmHead;
    case R::AttnQkv: return WeightSlot::Q;  // the fused matrix's first rows
  }
  return WeightSlot::Embed;
}

class GgufQuantLoad : public ::testing::Test {
 protected:
  void SetUp() override { write_typed_gguf(cfg_, path_); }
  test::TempDir tmp_;
  LlamaConfig cfg_ = gguf_config();
  std::string path_ = tmp_.str() + "/typed.gguf";
};

TEST(QuantMode, NamesRoundTrip) {
  for (QuantMode m : kModes) EXPECT_EQ(io::parse_quant_mode(io::quant_mode_name(m)), m);
  EXPECT_EQ(io::quant_mode_name(QuantMode::Nf4), "nf4");
  EXPECT_EQ(io::parse_quant_mode("keep"), QuantMode::Keep);
  EXPECT_FALSE(io::parse_quant_mode("NF4").has_value());
  EXPECT_EQ(io::parse_quant_mode("q4_0"), QuantMode::Q4_0);
  EXPECT_EQ(io::ggml_type_of(QuantMode::Q5_1), GgmlType::Q5_1);
  EXPECT_FALSE(io::ggml_type_of(QuantMode::Nf4).has_value());
  // The k-quants' reference quantizers search their scales and are not reproduced: not a mode.
  EXPECT_FALSE(io::parse_quant_mode("q4_k").has_value());
  EXPECT_FALSE(io::parse_quant_mode("Q8_0").has_value());
  EXPECT_EQ(io::quant_mode_names(), "keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0, q5_1");
  EXPECT_FALSE(io::parse_quant_mode("").has_value());
}

TEST_F(GgufQuantLoad, EveryModeStoresEveryTypeAsItSays) {
  for (QuantMode mode : kModes) {
    const io::LoadedModel m = io::load_model(path_, true, mode);
    for (const io::GgufLlamaTensor& t : gguf_tensors(cfg_)) {
      const std::string name = io::gguf_llama_tensor_name(t);
      SCOPED_TRACE(name + " under " + std::string(io::quant_mode_name(mode)));
      const io::GgufTensorInfo& info = m.gguf->tensor(name);
      const WeightSlot slot = slot_of(t.role);
      const WeightRef& got = m.weights.slot(slot, std::max(t.layer, 0));
      const DType stored = *dtype_of_ggml(info.type);
      std::vector<float> x(size_t(info.n_elements));
      ref::dequantize_rows(info.type, info.data, info.n_elements, x.data());
      const bool matrix = io::is_matrix_slot(slot);
      // Which modes use the file's bytes as they are: keep always, none and bf16 for their own
      // types, a ggml mode for its own type.
      const bool in_place = !matrix ? !is_quantized(stored)
                                    : mode == QuantMode::Keep ||
                                          (mode == QuantMode::None && !is_quantized(stored)) ||
                                          (mode == QuantMode::Bf16 && stored == DType::BF16) ||
                                          io::stored_dtype(stored, mode) == stored;
      if (in_place) {
        EXPECT_EQ(got.data, info.data) << "not in place in the mapping";
        EXPECT_EQ(got.dtype, stored);
        EXPECT_EQ(got.rows * got.cols, info.n_elements);
        continue;
      }
      EXPECT_NE(got.data, static_cast<const void*>(info.data));
      if (mode == QuantMode::None) {
        EXPECT_EQ(got.dtype, DType::F32);
      }
      expect_converted(got, x, matrix ? mode : QuantMode::None, name);
    }
  }
}

// Under nf4 the loader owns exactly the NF4 storage at the end, never held more Weights memory on
// the way, and its scratch stayed within one chunk of f32 plus the largest tensor's absmax.
TEST_F(GgufQuantLoad, Nf4LoadHoldsOnlyABoundedChunkOfScratch) {
  MemTracker& mt = MemTracker::instance();
  const size_t weights0 = mt.current(MemTag::Weights), scratch0 = mt.current(MemTag::Workspace);
  mt.reset_peaks();
  const io::LoadedModel m = io::load_model(path_, true, QuantMode::Nf4);
  const io::WeightMemory mem = io::weight_memory(m.weights);
  int64_t nf4_bytes = 0, largest = 0;
  for (const auto& e : mem.by_dtype)
    if (e.dtype == DType::NF4) nf4_bytes = e.bytes;
  LlamaWeights::for_each_slot(m.weights.config, [&](WeightSlot s, int l) {
    const WeightRef& r = m.weights.slot(s, l);
    largest = std::max(largest, r.rows * r.cols);
  });
  EXPECT_EQ(int64_t(mt.current(MemTag::Weights) - weights0), nf4_bytes);
  EXPECT_EQ(mt.peak(MemTag::Weights) - weights0, mt.current(MemTag::Weights) - weights0);
  const size_t bound = size_t(io::kWeightChunkElems) * 4 + size_t(ref::quant_blocks(largest, kNf4Block)) * 4;
  EXPECT_LE(mt.peak(MemTag::Workspace) - scratch0, bound);
  // The whole model in f32 would be 8x the NF4 bytes; the bound above is far below that.
  EXPECT_LT(bound, size_t(largest) * 4);
}

TEST_F(GgufQuantLoad, WeightMemoryCountsCodesAndScales) {
  const io::LoadedModel keep = io::load_model(path_, true, QuantMode::Keep);
  const io::WeightMemory k = io::weight_memory(keep.weights);
  int64_t file_bytes = 0, params = 0;
  for (const io::GgufLlamaTensor& t : gguf_tensors(cfg_)) {
    file_bytes += int64_t(keep.gguf->tensor(io::gguf_llama_tensor_name(t)).n_bytes);
    params += keep.gguf->tensor(io::gguf_llama_tensor_name(t)).n_elements;
  }
  EXPECT_EQ(k.bytes(), file_bytes) << "keep stores exactly the file's tensors";
  EXPECT_EQ(k.params(), params);
  EXPECT_EQ(k.by_dtype.size(), 13u) << "every type of the file: " << k.summary();

  const io::WeightMemory n = io::weight_memory(io::load_model(path_, true, QuantMode::Nf4).weights);
  EXPECT_EQ(n.params(), params);
  ASSERT_EQ(n.by_dtype.size(), 2u) << n.summary();
  EXPECT_EQ(n.by_dtype[0].dtype, DType::F32);  // the norms
  EXPECT_EQ(n.by_dtype[0].params, cfg_.hidden * (2 * cfg_.n_layers + 1));
  EXPECT_EQ(n.by_dtype[1].dtype, DType::NF4);
  // Every matrix here is a whole number of 256 blocks, so the bits are exactly 4 + 8/64 + 32/16384.
  const double bits = 8.0 * double(n.by_dtype[1].bytes) / double(n.by_dtype[1].params);
  EXPECT_DOUBLE_EQ(bits, ref::bits_per_param(ref::QuantFormat::Nf4DoubleQuant));
  EXPECT_NEAR(bits, 4.127, 0.001);
  EXPECT_NE(n.summary().find("nf4 "), std::string::npos) << n.summary();
  EXPECT_NE(n.summary().find("bits per parameter"), std::string::npos) << n.summary();

  const io::WeightMemory i8 = io::weight_memory(io::load_model(path_, true, QuantMode::Int8).weights);
  EXPECT_DOUBLE_EQ(8.0 * double(i8.by_dtype[1].bytes) / double(i8.by_dtype[1].params), 8.5);
  const io::WeightMemory none = io::weight_memory(io::load_model(path_, true, QuantMode::None).weights);
  EXPECT_GT(none.bytes(), 6 * n.bytes()) << none.summary();
}

// ---- store_weight directly: chunk boundaries at awkward shapes -------------------------------

TEST(StoreWeight, ChunkedConversionEqualsTheWholeTensorAtAwkwardShapes) {
  // 40 columns: chunks of 8 rows (320 elements, whole blocks) and a partial last block; 41 columns:
  // chunks of 64 rows and an odd element count (the last low nibble unused).
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{37, 40}, {131, 41}, {1, 7}}) {
    const std::vector<float> x = test::random_floats(size_t(rows * cols), uint64_t(rows * cols), 0.3f);
    std::vector<uint16_t> x16(x.size());
    for (size_t i = 0; i < x.size(); ++i) x16[i] = f32_to_f16(x[i]);
    std::vector<float> x16f(x.size());
    for (size_t i = 0; i < x.size(); ++i) x16f[i] = f16_to_f32(x16[i]);
    for (QuantMode mode : {QuantMode::Bf16, QuantMode::Int8, QuantMode::Nf4}) {
      for (int64_t chunk : {int64_t(100), io::kWeightChunkElems}) {
        const std::string what =
            std::to_string(rows) + "x" + std::to_string(cols) + " chunk " + std::to_string(chunk);
        LlamaWeights w;
        expect_converted(io::store_weight(WeightRef{x.data(), DType::F32, rows, cols}, mode, w, "t", chunk),
                         x, mode, "f32 " + what);
        expect_converted(io::store_weight(WeightRef{x16.data(), DType::F16, rows, cols}, mode, w, "t", chunk),
                         x16f, mode, "f16 " + what);
      }
    }
    // From NF4 and INT8 sources, read a chunk at a time as well.
    for (QuantMode from : {QuantMode::Nf4, QuantMode::Int8}) {
      LlamaWeights w;
      const WeightRef q = io::store_weight(WeightRef{x.data(), DType::F32, rows, cols}, from, w, "t");
      const std::vector<float> qx = values_of(q);
      for (QuantMode to :
           {QuantMode::None, QuantMode::Bf16, from == QuantMode::Nf4 ? QuantMode::Int8 : QuantMode::Nf4})
        expect_converted(
            io::store_weight(q, to, w, "t", 100), qx, to,
            std::string(io::quant_mode_name(from)) + " " + std::to_string(rows) + "x" + std::to_string(cols));
    }
    LlamaWeights w;
    const WeightRef f32{x.data(), DType::F32, rows, cols};
    EXPECT_EQ(io::store_weight(f32, QuantMode::None, w, "t").data, x.data());
    EXPECT_EQ(io::store_weight(f32, QuantMode::Keep, w, "t").data, x.data());
    EXPECT_TRUE(w.keepalive.empty()) << "kept tensors are not copied";
  }
}

// ggml's modes quantize whole rows a chunk at a time; any chunking gives the blocks of the whole
// tensor, from float sources and from quantized ones (dequantized exactly first).
TEST(StoreWeight, GgmlModesEqualTheReferenceQuantizerOfTheWholeTensor) {
  // 96 columns: chunks of 2 rows under chunk 100 (3 blocks a row); 37 and 131 rows leave a partial
  // last chunk.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{37, 64}, {131, 96}, {1, 32}}) {
    const std::vector<float> x = test::random_floats(size_t(rows * cols), uint64_t(rows + cols), 0.3f);
    std::vector<uint16_t> bf(x.size());
    std::vector<float> bff(x.size());
    for (size_t i = 0; i < x.size(); ++i) bff[i] = bf16_to_f32(bf[i] = f32_to_bf16(x[i]));
    for (QuantMode mode : kGgmlModes) {
      for (int64_t chunk : {int64_t(100), io::kWeightChunkElems}) {
        const std::string what =
            std::to_string(rows) + "x" + std::to_string(cols) + " chunk " + std::to_string(chunk);
        LlamaWeights w;
        expect_converted(io::store_weight(WeightRef{x.data(), DType::F32, rows, cols}, mode, w, "t", chunk),
                         x, mode, "f32 " + what);
        expect_converted(io::store_weight(WeightRef{bf.data(), DType::BF16, rows, cols}, mode, w, "t", chunk),
                         bff, mode, "bf16 " + what);
      }
      // From another ggml type and from NF4: the exact dequantization, quantized again.
      LlamaWeights w;
      const QuantMode from = mode == QuantMode::Q8_0 ? QuantMode::Q4_1 : QuantMode::Q8_0;
      for (QuantMode src_mode : {from, QuantMode::Nf4}) {
        const WeightRef q = io::store_weight(WeightRef{x.data(), DType::F32, rows, cols}, src_mode, w, "t");
        expect_converted(io::store_weight(q, mode, w, "t", 100), values_of(q), mode,
                         std::string(io::quant_mode_name(src_mode)) + " source");
      }
      const WeightRef same = io::store_weight(WeightRef{x.data(), DType::F32, rows, cols}, mode, w, "t");
      EXPECT_EQ(io::store_weight(same, mode, w, "t").data, same.data) << "its own type is kept in place";
    }
  }
}

// ggml's blocks lie along rows: a row that is not whole blocks is refused by name, before anything
// is allocated; nf4 and int8 store the same shape.
TEST(StoreWeight, GgmlModesRefuseRowsOfPartialBlocksByName) {
  const std::vector<float> x(size_t(8 * 40), 0.25f);
  for (QuantMode mode : kGgmlModes) {
    LlamaWeights w;
    const std::string e = test::error_of([&] {
      io::store_weight(WeightRef{x.data(), DType::F32, 8, 40}, mode, w, "model.layers.0.mlp.up_proj.weight");
    });
    EXPECT_NE(e.find("model.layers.0.mlp.up_proj.weight: rows of 40 elements cannot be quantized to " +
                     std::string(io::quant_mode_name(mode))),
              std::string::npos)
        << e;
    EXPECT_NE(e.find("whole blocks"), std::string::npos) << e;
    EXPECT_TRUE(w.keepalive.empty());
  }
  LlamaWeights w;
  EXPECT_EQ(io::store_weight(WeightRef{x.data(), DType::F32, 8, 40}, QuantMode::Nf4, w, "t").dtype,
            DType::NF4);
}

TEST(StoreWeight, ANonFiniteWeightIsNamedWhereItIs) {
  std::vector<float> x(20 * 32, 0.5f);
  x[size_t(13 * 32 + 5)] = std::numeric_limits<float>::quiet_NaN();
  for (QuantMode mode : {QuantMode::Int8, QuantMode::Nf4, QuantMode::Q4_0}) {
    LlamaWeights w;
    const std::string e = test::error_of([&] {
      io::store_weight(WeightRef{x.data(), DType::F32, 20, 32}, mode, w, "blk.3.ffn_up.weight", 64);
    });
    EXPECT_NE(e.find("blk.3.ffn_up.weight: element [13, 5] is nan"), std::string::npos) << e;
    EXPECT_NE(e.find(io::quant_mode_name(mode)), std::string::npos) << e;
  }
}

// ---- HF directories ------------------------------------------------------------------------

DType hf_dtype(int i) {
  return i % 3 == 0 ? DType::F32 : i % 3 == 1 ? DType::BF16 : DType::F16;
}

// A model directory whose tensors are f32, bf16 and f16 in turn; returns the f32 values of each as
// stored.
std::map<std::string, std::vector<float>> write_hf_dir(const LlamaConfig& cfg, const std::string& dir) {
  std::filesystem::create_directories(dir);
  const LlamaWeights src = init_random_weights(cfg, DType::F32, 3, 0.1f);
  std::map<std::string, std::vector<float>> values;
  std::vector<std::vector<std::byte>> bytes;
  std::vector<io::SafetensorsWriteTensor> tensors;
  int i = 0;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    const WeightRef& r = src.slot(slot, layer);
    const DType dt = hf_dtype(i++);
    const int64_t n = r.rows * r.cols;
    std::vector<std::byte>& b = bytes.emplace_back(size_t(n) * dtype_size(dt));
    std::vector<float>& v = values[hf_weight_name(slot, layer)];
    for (int64_t k = 0; k < n; ++k) {
      const float f = static_cast<const float*>(r.data)[k];
      const uint16_t h = dt == DType::BF16 ? f32_to_bf16(f) : f32_to_f16(f);
      v.push_back(dt == DType::F32 ? f : dt == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h));
      if (dt == DType::F32)
        std::memcpy(&b[size_t(k) * 4], &f, 4);
      else
        std::memcpy(&b[size_t(k) * 2], &h, 2);
    }
    const std::vector<int64_t> shape =
        r.rows == 1 ? std::vector<int64_t>{r.cols} : std::vector<int64_t>{r.rows, r.cols};
    tensors.push_back({hf_weight_name(slot, layer), io::to_st_dtype(dt), shape, b});
  });
  io::write_safetensors(dir + "/model.safetensors", tensors);
  std::ofstream(dir + "/config.json") << io::hf_config_json(cfg, DType::F32).dump(2);
  return values;
}

TEST(HfQuantLoad, EveryModeStoresEveryFloatTypeAsItSays) {
  const test::TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const auto values = write_hf_dir(cfg, tmp.str() + "/m");
  auto file = std::make_shared<const io::SafetensorsModel>(io::SafetensorsModel::open(tmp.str() + "/m"));
  for (QuantMode mode : kModes) {
    const LlamaWeights w = io::weights_from_safetensors(file, cfg, mode);
    LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
      const std::string name = hf_weight_name(slot, layer);
      SCOPED_TRACE(name + " under " + std::string(io::quant_mode_name(mode)));
      const WeightRef& got = w.slot(slot, layer);
      const TensorView stored = file->view(name);
      const bool in_place = !io::is_matrix_slot(slot) || mode == QuantMode::Keep || mode == QuantMode::None ||
                            (mode == QuantMode::Bf16 && stored.dtype == DType::BF16);
      if (in_place) {
        EXPECT_EQ(got.data, stored.data) << "not in place in the mapping";
        EXPECT_EQ(got.dtype, stored.dtype);
      } else {
        EXPECT_NE(got.data, stored.data);
        expect_converted(got, values.at(name), mode, name);
      }
    });
  }
  // The same through the directory loader.
  EXPECT_EQ(io::load_model(tmp.str() + "/m", true, QuantMode::Nf4).weights.blocks[1].down.dtype, DType::NF4);
}

// A tensor converted at load leaves the process once converted: the pages wholly inside its
// source are dropped from the mapping (they would otherwise stay resident beside the converted
// copy), while a tensor computed with in place keeps its pages once read.
TEST(HfQuantLoad, TheSourcePagesOfConvertedTensorsAreDropped) {
  const test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config();
  cfg.hidden = 256;
  cfg.intermediate = 1024;
  cfg.head_dim = 64;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.rope.head_dim = 64;
  write_hf_dir(cfg, tmp.str() + "/m");
  for (QuantMode mode : {QuantMode::Nf4, QuantMode::Keep}) {
    SCOPED_TRACE(std::string(io::quant_mode_name(mode)));
    const io::LoadedModel m = io::load_model(tmp.str() + "/m", true, mode);
    // Where the loader's mapping holds the source: its offset in the data section, read from a
    // second mapping of the file, from the start of the loader's window on that section.
    const io::SafetensorsModel second = io::SafetensorsModel::open(tmp.str() + "/m");
    const TensorView view = second.view(hf_weight_name(WeightSlot::Up, 0));
    const std::byte* section = second.shards().front().tensors().front().bytes.data();
    ASSERT_EQ(m.weights.files.size(), 1u);
    struct {
      const void* data;
    } source{m.weights.files[0].begin + (static_cast<const std::byte*>(view.data) - section)};
    const size_t bytes = view.nbytes();
    const size_t droppable = io::droppable_bytes(source.data, bytes) / size_t(sysconf(_SC_PAGESIZE));
    ASSERT_GT(droppable, 8u);
    if (mode == QuantMode::Keep) {
      volatile const unsigned char* p = static_cast<const unsigned char*>(source.data);
      unsigned sum = 0;
      for (size_t i = 0; i < bytes; i += 512) sum += p[i];
      (void)sum;
      EXPECT_GE(test::present_pages(source.data, bytes), droppable);
    } else {
      // Only the pages it shares with its neighbours may stay.
      EXPECT_LE(test::present_pages(source.data, bytes), 2u);
    }
  }
}

TEST(HfQuantLoad, ATiedEmbeddingIsQuantizedOnceAndStaysTied) {
  const test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config();
  cfg.tie_embeddings = true;
  write_hf_dir(cfg, tmp.str() + "/m");
  for (QuantMode mode : {QuantMode::Bf16, QuantMode::Int8, QuantMode::Nf4}) {
    const LlamaWeights w = io::load_hf_model(tmp.str() + "/m", mode);
    EXPECT_EQ(w.lm_head.data, w.embed.data);
    EXPECT_EQ(w.lm_head.scales.absmax, w.embed.scales.absmax);
    const io::WeightMemory mem = io::weight_memory(w);
    int64_t params = 0;
    LlamaWeights::for_each_slot(
        cfg, [&](WeightSlot s, int l) { params += w.slot(s, l).rows * w.slot(s, l).cols; });
    EXPECT_EQ(mem.params(), params) << "the tied lm_head is counted once";
  }
}

// ---- bitsandbytes 4-bit ----------------------------------------------------------------------

const std::string kBnbDir = kFixtures + "/bnb4bit";

LoraConfig inert_lora() {
  LoraConfig l;
  l.rank = 1;
  l.targets = parse_lora_targets("q");
  return l;
}

TEST(Bnb4bit, LoadsStraightIntoNf4InPlace) {
  auto file = std::make_shared<const io::SafetensorsModel>(io::SafetensorsModel::open(kBnbDir));
  const LlamaConfig cfg = io::read_hf_config(kBnbDir + "/config.json");
  const LlamaWeights w = io::weights_from_safetensors(file, cfg, QuantMode::Keep, true);
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    const std::string name = hf_weight_name(slot, layer);
    SCOPED_TRACE(name);
    const WeightRef& got = w.slot(slot, layer);
    EXPECT_EQ(static_cast<const void*>(got.data), static_cast<const void*>(file->get(name).bytes.data()));
    const bool quantized = is_layer_slot(slot) && io::is_matrix_slot(slot);
    if (!quantized) {
      EXPECT_EQ(got.dtype, DType::F32);
      return;
    }
    EXPECT_EQ(got.dtype, DType::NF4);
    EXPECT_EQ(got.scales.absmax, static_cast<const void*>(file->get(name + ".absmax").bytes.data()));
    EXPECT_EQ(static_cast<const void*>(got.scales.nested),
              static_cast<const void*>(file->get(name + ".nested_absmax").bytes.data()));
  });
  const io::WeightMemory mem = io::weight_memory(w);
  ASSERT_EQ(mem.by_dtype.size(), 2u) << mem.summary();
  EXPECT_EQ(mem.by_dtype[1].dtype, DType::NF4);
  // The MLP matrices have 272 absmax blocks: their second nested block holds only 16.
  EXPECT_NEAR(8.0 * double(mem.by_dtype[1].bytes) / double(mem.by_dtype[1].params), 4.127, 0.01);
}

TEST(Bnb4bit, DequantizedWeightsAreBitsandbytes) {
  const auto expected = io::SafetensorsFile::open(kBnbDir + "/expected.safetensors");
  const io::LoadedModel m = io::load_model(kBnbDir, true, QuantMode::Keep);
  const std::vector<float> k = values_of(m.weights.blocks[1].k);
  const TensorView want = expected.view("dequant.model.layers.1.self_attn.k_proj.weight");
  ASSERT_EQ(int64_t(k.size()), want.numel());
  EXPECT_TRUE(same_bits(k.data(), want.data, k.size() * 4)) << "dequantize_4bit differs";

  const WeightRef& down = m.weights.blocks[1].down;
  const TensorView absmax = expected.view("absmax.model.layers.1.mlp.down_proj.weight");
  const int64_t blocks = ref::quant_blocks(down.rows * down.cols, kNf4Block);
  ASSERT_EQ(blocks, absmax.numel());
  ASSERT_EQ(blocks, 272);
  std::vector<float> got(static_cast<size_t>(blocks));
  ref::dequantize_double_absmax(static_cast<const uint8_t*>(down.scales.absmax), down.scales.nested,
                                down.scales.offset, blocks, got.data());
  EXPECT_TRUE(same_bits(got.data(), absmax.data, got.size() * 4)) << "double-quantized absmax differ";

  // none: the same values as an f32 copy.
  const io::LoadedModel none = io::load_model(kBnbDir, true, QuantMode::None);
  ASSERT_EQ(none.weights.blocks[1].k.dtype, DType::F32);
  EXPECT_TRUE(same_bits(none.weights.blocks[1].k.data, want.data, k.size() * 4));
}

// transformers ran the same f32 maths on the same dequantized weights (the fixture script checks
// that bitsandbytes' own Linear4bit gives identical logits); only the summation order differs,
// ~1e-6 relative over sums of at most 272 terms through two blocks, where a wrong code, nibble
// order or absmax moves logits by O(1e-1).
TEST(Bnb4bit, LogitsAreThoseOfTheDequantizedModel) {
  const auto expected = io::SafetensorsFile::open(kBnbDir + "/expected.safetensors");
  const TensorView ids = expected.view("input_ids");
  const int batch = int(ids.dim(0)), seq = int(ids.dim(1));
  std::vector<int32_t> pos;
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < seq; ++t) pos.push_back(t);
  for (QuantMode mode : {QuantMode::Keep, QuantMode::None}) {
    SCOPED_TRACE(io::quant_mode_name(mode));
    LlamaModel model(io::load_hf_model(kBnbDir, mode), inert_lora(), CheckpointPolicy::None,
                     int64_t(batch) * seq);
    EXPECT_EQ(model.weights().blocks[0].q.dtype, mode == QuantMode::Keep ? DType::NF4 : DType::F32);
    std::vector<float> logits(size_t(batch * seq * model.config().vocab));
    model.forward_logits(Batch{batch, seq, ids.as<int32_t>(), nullptr, pos.data(), nullptr}, logits.data());
    EXPECT_LT(test::rel_norm_error(logits.data(), expected.view("logits").as<float>(), logits.size()), 1e-5);
  }
}

TEST(Bnb4bit, OtherModesDequantizeOrKeepTheNf4) {
  auto file = std::make_shared<const io::SafetensorsModel>(io::SafetensorsModel::open(kBnbDir));
  const LlamaConfig cfg = io::read_hf_config(kBnbDir + "/config.json");
  const LlamaWeights keep = io::weights_from_safetensors(file, cfg, QuantMode::Keep, true);
  const LlamaWeights bf16 = io::weights_from_safetensors(file, cfg, QuantMode::Bf16, true);
  const LlamaWeights nf4 = io::weights_from_safetensors(file, cfg, QuantMode::Nf4, true);
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    if (!io::is_matrix_slot(slot)) return;
    SCOPED_TRACE(hf_weight_name(slot, layer));
    const WeightRef& k = keep.slot(slot, layer);
    expect_converted(bf16.slot(slot, layer), values_of(k), QuantMode::Bf16, "bf16");
    if (k.dtype == DType::NF4) {
      EXPECT_EQ(nf4.slot(slot, layer).data, k.data) << "bitsandbytes NF4 is used as stored";
      EXPECT_EQ(nf4.slot(slot, layer).scales.absmax, k.scales.absmax);
    } else {
      expect_converted(nf4.slot(slot, layer), values_of(k), QuantMode::Nf4, "float under nf4");
    }
  });
  const std::string e = test::error_of([] { io::load_model(kBnbDir, true, QuantMode::Int8); });
  EXPECT_NE(e.find("config.json: a bitsandbytes 4-bit checkpoint cannot be quantized to int8"),
            std::string::npos)
      << e;
  // Nor to ggml's types: NF4 is already 4 bits, and quantizing it again rounds it twice.
  const std::string q = test::error_of([] { io::load_model(kBnbDir, true, QuantMode::Q4_0); });
  EXPECT_NE(q.find("config.json: a bitsandbytes 4-bit checkpoint cannot be quantized to q4_0"),
            std::string::npos)
      << q;
}

// A copy of the fixture's tensors, edited and written to a new model directory.
struct BnbCopy {
  struct Stored {
    io::StDType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> bytes;
  };
  std::map<std::string, Stored> tensors;
  json config;

  BnbCopy() {
    const auto f = io::SafetensorsFile::open(kBnbDir + "/model.safetensors");
    for (const io::SafetensorsTensor& t : f.tensors())
      tensors[t.name] = {t.dtype, t.shape, std::vector<std::byte>(t.bytes.begin(), t.bytes.end())};
    std::ifstream in(kBnbDir + "/config.json");
    config = json::parse(in);
  }
  json state(const std::string& w) const {
    const auto& b = tensors.at(w + ".quant_state.bitsandbytes__nf4").bytes;
    return json::parse(reinterpret_cast<const char*>(b.data()),
                       reinterpret_cast<const char*>(b.data()) + b.size());
  }
  void set_state_text(const std::string& w, const std::string& text) {
    Stored& s = tensors.at(w + ".quant_state.bitsandbytes__nf4");
    s.bytes.assign(reinterpret_cast<const std::byte*>(text.data()),
                   reinterpret_cast<const std::byte*>(text.data()) + text.size());
    s.shape = {int64_t(text.size())};
  }
  void set_state(const std::string& w, const json& j) { set_state_text(w, j.dump()); }
  // The error of loading the edited copy under keep.
  std::string load_error(const test::TempDir& tmp) const {
    const std::string dir = tmp.str() + "/bad";
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::vector<io::SafetensorsWriteTensor> out;
    for (const auto& [name, t] : tensors) out.push_back({name, t.dtype, t.shape, t.bytes});
    io::write_safetensors(dir + "/model.safetensors", out);
    std::ofstream(dir + "/config.json") << config.dump();
    return test::error_of([&] { io::load_model(dir, true, QuantMode::Keep); });
  }
};

TEST(Bnb4bit, EveryMalformedPieceIsANamedError) {
  const test::TempDir tmp;
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  const std::string down = "model.layers.0.mlp.down_proj.weight";
  struct Case {
    const char* what;
    std::function<void(BnbCopy&)> edit;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"unedited", [](BnbCopy&) {}, {"(no error)"}},
      {"missing absmax",
       [&](BnbCopy& c) { c.tensors.erase(q + ".absmax"); },
       {"model.safetensors: tensor " + q, "companion tensor " + q + ".absmax is missing"}},
      {"missing quant_map",
       [&](BnbCopy& c) { c.tensors.erase(q + ".quant_map"); },
       {q + ".quant_map is missing"}},
      {"missing nested_absmax",
       [&](BnbCopy& c) { c.tensors.erase(q + ".nested_absmax"); },
       {q + ".nested_absmax is missing"}},
      {"missing nested_quant_map",
       [&](BnbCopy& c) { c.tensors.erase(q + ".nested_quant_map"); },
       {q + ".nested_quant_map is missing"}},
      {"missing quant_state",
       [&](BnbCopy& c) { c.tensors.erase(q + ".quant_state.bitsandbytes__nf4"); },
       {q + ".quant_state.bitsandbytes__nf4 is missing"}},
      {"truncated codes",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at(q);
         t.bytes.resize(t.bytes.size() - 1);
         t.shape = {int64_t(t.bytes.size()), 1};
       },
       {"tensor " + q + " has dtype U8 and shape [2047, 1], expected U8 [2048, 1] for the [64, 64] weight"}},
      {"codes 1-D",
       [&](BnbCopy& c) { c.tensors.at(q).shape = {2048}; },
       {"tensor " + q + " has dtype U8 and shape [2048], expected U8 [2048, 1]"}},
      {"truncated absmax",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at(down + ".absmax");
         t.bytes.resize(100);
         t.shape = {100};
       },
       {down + ".absmax has dtype U8 and shape [100], expected U8 [272]"}},
      {"absmax I8",
       [&](BnbCopy& c) { c.tensors.at(q + ".absmax").dtype = io::StDType::I8; },
       {q + ".absmax has dtype I8 and shape [64], expected U8 [64]"}},
      {"f32 absmax beside a nested absmax",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at(q + ".absmax");
         t.dtype = io::StDType::F32;
         t.bytes.resize(t.bytes.size() * 4);
       },
       {q + ".absmax is f32 but " + q + ".nested_absmax exists"}},
      {"nested_absmax of the wrong size",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at(down + ".nested_absmax");
         t.bytes.resize(4);
         t.shape = {1};
       },
       {down + ".nested_absmax has dtype F32 and shape [1], expected F32 [2]"}},
      {"quant_map F16",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at(q + ".quant_map");
         t.dtype = io::StDType::F16;
         t.bytes.resize(32);
       },
       {q + ".quant_map has dtype F16 and shape [16], expected F32 [16]"}},
      {"quant_map off by one bit",
       [&](BnbCopy& c) { c.tensors.at(q + ".quant_map").bytes[20] ^= std::byte{1}; },
       {"tensor " + q + ".quant_map is not the NF4 codebook"}},
      {"fp4 quant_map",
       [&](BnbCopy& c) {
         auto& b = c.tensors.at(q + ".quant_map").bytes;
         std::reverse(b.begin(), b.end());
       },
       {q + ".quant_map is not the NF4 codebook"}},
      {"nested_quant_map off by one bit",
       [&](BnbCopy& c) { c.tensors.at(q + ".nested_quant_map").bytes[4 * 200] ^= std::byte{1}; },
       {"tensor " + q + ".nested_quant_map is not the signed dynamic map"}},
      {"quant_state not JSON",
       [&](BnbCopy& c) { c.set_state_text(q, "{\"quant_type\": \"nf4\", \"blocks"); },
       {"tensor " + q + ".quant_state.bitsandbytes__nf4 is not a JSON object"}},
      {"quant_state a list", [&](BnbCopy& c) { c.set_state_text(q, "[1, 2]"); }, {"is not a JSON object"}},
      {"quant_state huge",
       [&](BnbCopy& c) { c.set_state_text(q, std::string(70000, ' ') + c.state(q).dump()); },
       {q + ".quant_state.bitsandbytes__nf4 is 70", "a quant_state JSON can plausibly be"}},
      {"quant_state dtype F32",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at(q + ".quant_state.bitsandbytes__nf4");
         t.dtype = io::StDType::F32;
         t.bytes.resize(t.bytes.size() / 4 * 4);
         t.shape = {int64_t(t.bytes.size() / 4)};
       },
       {q + ".quant_state.bitsandbytes__nf4 has dtype F32", "expected U8 bytes of JSON"}},
      {"blocksize 128",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["blocksize"] = 128;
         c.set_state(q, j);
       },
       {q + ".quant_state.bitsandbytes__nf4: \"blocksize\" is 128, expected 64"}},
      {"no blocksize",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j.erase("blocksize");
         c.set_state(q, j);
       },
       {q + ".quant_state.bitsandbytes__nf4 has no \"blocksize\""}},
      {"nested blocksize 128",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["nested_blocksize"] = 128;
         c.set_state(q, j);
       },
       {"\"nested_blocksize\" is 128, expected 256"}},
      {"quant_type fp4 in the state",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["quant_type"] = "fp4";
         c.set_state(q, j);
       },
       {"\"quant_type\" is \"fp4\", expected \"nf4\""}},
      {"shape not the config's",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["shape"] = {32, 64};
         c.set_state(q, j);
       },
       {"\"shape\" is [32,64], but the model config makes " + q + " [64, 64]"}},
      {"shape with the config's rows",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["shape"] = {64, 128};
         c.set_state(q, j);
       },
       {"\"shape\" is [64,128], but the model config makes " + q + " [64, 64]"}},
      {"nested_offset a string",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["nested_offset"] = "0.1";
         c.set_state(q, j);
       },
       {"\"nested_offset\" is \"0.1\", expected a finite f32 number"}},
      {"nested_offset past f32",
       [&](BnbCopy& c) {
         json j = c.state(q);
         j["nested_offset"] = 1e300;
         c.set_state(q, j);
       },
       {"\"nested_offset\" is 1e+300, expected a finite f32 number"}},
      {"fp4 weight",
       [&](BnbCopy& c) {
         auto node = c.tensors.extract(q + ".quant_state.bitsandbytes__nf4");
         node.key() = q + ".quant_state.bitsandbytes__fp4";
         c.tensors.insert(std::move(node));
       },
       {"tensor " + q + " is a bitsandbytes fp4 weight; tightfit reads nf4 4-bit weights only"}},
      {"a U8 norm",
       [&](BnbCopy& c) {
         auto& t = c.tensors.at("model.layers.0.input_layernorm.weight");
         t.dtype = io::StDType::U8;
         t.shape = {256};
       },
       {"tensor model.layers.0.input_layernorm.weight is U8, but norms and biases must be F32, BF16 or F16"}},
      {"no quantization_config",
       [](BnbCopy& c) { c.config.erase("quantization_config"); },
       {"model.safetensors: tensor model.layers.0.self_attn.q_proj.weight is U8 (a bitsandbytes 4-bit "
        "weight?) "
        "but config.json has no bitsandbytes quantization_config"}},
      {"fp4 config",
       [](BnbCopy& c) { c.config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"; },
       {"config.json: quantization_config.bnb_4bit_quant_type is \"fp4\"; tightfit reads nf4 4-bit weights "
        "only"}},
      {"quant type left to bitsandbytes' default",
       [](BnbCopy& c) { c.config["quantization_config"].erase("bnb_4bit_quant_type"); },
       {"bnb_4bit_quant_type is \"fp4 (its default)\""}},
      {"8-bit config",
       [](BnbCopy& c) {
         c.config["quantization_config"]["load_in_8bit"] = true;
         c.config["quantization_config"]["load_in_4bit"] = false;
       },
       {"config.json: quantization_config: 8-bit bitsandbytes (LLM.int8) checkpoints are not supported"}},
      {"gptq",
       [](BnbCopy& c) {
         c.config["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
       },
       {"config.json: quantization_config.quant_method is \"gptq\"; tightfit reads only bitsandbytes 4-bit"}},
      {"bf16 storage",
       [](BnbCopy& c) { c.config["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16"; },
       {"bnb_4bit_quant_storage is \"bfloat16\"; tightfit reads 4-bit codes stored as uint8 only"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    BnbCopy copy;
    c.edit(copy);
    const std::string e = copy.load_error(tmp);
    for (const std::string& needle : c.needles) EXPECT_NE(e.find(needle), std::string::npos) << e;
  }
}

// Without double quantization (bnb_4bit_use_double_quant=False) the absmax are f32 and used in place.
TEST(Bnb4bit, PlainAbsmaxWithoutDoubleQuantization) {
  const test::TempDir tmp;
  BnbCopy copy;
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  const io::LoadedModel ref_model = io::load_model(kBnbDir, true, QuantMode::Keep);
  const WeightRef& dq = ref_model.weights.blocks[0].q;
  std::vector<float> absmax(64);
  ref::dequantize_double_absmax(static_cast<const uint8_t*>(dq.scales.absmax), dq.scales.nested,
                                dq.scales.offset, 64, absmax.data());
  auto& t = copy.tensors.at(q + ".absmax");
  t.dtype = io::StDType::F32;
  t.bytes.resize(absmax.size() * 4);
  std::memcpy(t.bytes.data(), absmax.data(), t.bytes.size());
  copy.tensors.erase(q + ".nested_absmax");
  copy.tensors.erase(q + ".nested_quant_map");
  json j = copy.state(q);
  for (const char* k : {"nested_blocksize", "nested_dtype", "nested_offset"}) j.erase(k);
  copy.set_state(q, j);
  ASSERT_EQ(copy.load_error(tmp), "(no error)");
  const io::LoadedModel m = io::load_model(tmp.str() + "/bad", true, QuantMode::Keep);
  const WeightRef& got = m.weights.blocks[0].q;
  EXPECT_EQ(got.dtype, DType::NF4);
  EXPECT_EQ(got.scales.nested, nullptr);
  EXPECT_EQ(values_of(got), values_of(dq));
}

}  // namespace
}  // namespace tf
