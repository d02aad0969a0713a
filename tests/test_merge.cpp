// Tests: merge_lora_delta against a hand computation; the merged HF export (a merged model's logits
// equal the adapted model's; dtypes, config.json and tokenizer files; sharding with an index; a
// GGUF-ordered base comes out in HF order) read back by load_hf_model / SafetensorsModel; a base
// with quantized matrices of every storage dtype merges exactly as its f32 dequantization, at any
// tile size; the NF4 export is bitsandbytes' quantization of the f16 export, byte for byte, and
// loads back as NF4; the merged GGUF export (metadata copied, untouched tensors byte-identical,
// merged q/k in GGUF row order, a quantized tensor merged as F16 within f16 rounding, the summary
// line) read back by GgufFile; re-quantized to Q8_0 / Q4_0 or kept in the base's types with
// ggml's quantizer, and refused for base types that cannot be kept; a GGUF-ordered base written
// as f16 is its f32 export rounded once.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "src/core/error.h"
#include "src/io/gguf_lora.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "src/io/quantize_weights.h"
#include "src/io/safetensors.h"
#include "src/model/llama.h"
#include "tests/gguf_test_util.h"
#include "tests/model_test_util.h"
#include "tests/op_test_util.h"
#include "tests/test_util.h"

namespace tf::io {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

LoraConfig lora_config() {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8.0f;
  c.rslora = true;  // scale 8 / sqrt(4) = 4, not alpha / r = 2: a wrong scale shows
  return c;
}

std::vector<float> logits_of(LlamaModel& m, const test::BatchData& data) {
  std::vector<float> out(size_t(data.batch * data.seq * m.config().vocab));
  m.forward_logits(data.view(), out.data());
  return out;
}

// W + scale * B A for one element, in double.
double merged_element(const WeightRef& w, const LoraAdapter& a, float scale, int64_t o, int64_t i) {
  double d = 0;
  for (int r = 0; r < a.rank; ++r) d += double(a.B[o * a.rank + r]) * double(a.A[r * a.in + i]);
  float base = 0;
  ref::dequantize_rows(w.dtype == DType::F32    ? GgmlType::F32
                       : w.dtype == DType::BF16 ? GgmlType::BF16
                                                : GgmlType::F16,
                       static_cast<const char*>(w.data) + (o * w.cols + i) * int64_t(dtype_size(w.dtype)), 1,
                       &base);
  return double(base) + double(scale) * d;
}

TEST(Merge, DeltaMatchesHandComputation) {
  // B [3, 2], A [2, 2], scale 0.5: W += 0.5 * B A.
  float A[] = {1, 2, 3, 4};
  float B[] = {1, 0, 0, 1, 2, -1};
  LoraAdapter a;
  a.A = A;
  a.B = B;
  a.in = 2;
  a.out = 3;
  a.rank = 2;
  float w[] = {10, 20, 30, 40, 50, 60};
  merge_lora_delta(w, a, 0.5f);
  // B A = [[1, 2], [3, 4], [2*1-3, 2*2-4]] = [[1, 2], [3, 4], [-1, 0]]
  const float want[] = {10.5f, 21, 31.5f, 42, 49.5f, 60};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(w[i], want[i]) << i;
}

TEST(MergedHf, LogitsEqualTheAdaptedModelAndShardsReadBack) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const test::BatchData data = test::synthetic_batch(2, 12, cfg.vocab, 3);
  LlamaModel adapted(init_random_weights(cfg, DType::F32, 7), lora_config(), CheckpointPolicy::None, 24);
  test::fill_lora_params(adapted.lora(), 1, 5, 0.1f);
  const std::vector<float> want = logits_of(adapted, data);

  const fs::path one = tmp.dir / "merged", sharded = tmp.dir / "sharded";
  export_merged_hf(one.string(), adapted.weights(), adapted.lora());
  // About 8 KiB per projection here: 16 KiB shards force several files and an index.
  export_merged_hf(sharded.string(), adapted.weights(), adapted.lora(), {"", 16 << 10, {}});
  EXPECT_TRUE(fs::exists(one / "model.safetensors"));
  EXPECT_FALSE(fs::exists(one / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(sharded / "model.safetensors.index.json"));

  const auto single = std::make_shared<SafetensorsModel>(SafetensorsModel::open(one.string()));
  const SafetensorsModel split = SafetensorsModel::open(sharded.string());
  EXPECT_GT(split.shards().size(), size_t(1));
  ASSERT_EQ(split.names(), single->names());
  for (const std::string& name : single->names()) {
    const SafetensorsTensor& a = single->get(name);
    const SafetensorsTensor& b = split.get(name);
    EXPECT_EQ(a.shape, b.shape) << name;
    EXPECT_EQ(a.dtype, StDType::F32) << name;
    EXPECT_TRUE(std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end())) << name;
  }
  EXPECT_EQ(single->get("model.layers.1.self_attn.k_proj.weight").shape,
            (std::vector<int64_t>{cfg.kv_dim(), cfg.hidden}));

  // A few elements against W + scale * B A in double; one f32 rounding of the sum and the
  // r = 4 products accumulated in f32 stay within 1e-6 of these O(0.1) values.
  const LlamaWeights merged_w = load_hf_model(one.string());
  const float scale = adapted.lora().config.scale();
  EXPECT_EQ(scale, 4.0f);
  const BlockWeights& base1 = adapted.weights().blocks[1];
  const BlockWeights& got1 = merged_w.blocks[1];
  for (auto [base, got, t] :
       {std::tuple{base1.q, got1.q, LoraTarget::Q}, {base1.down, got1.down, LoraTarget::Down}}) {
    for (int64_t o : {int64_t(0), base.rows - 1})
      for (int64_t i : {int64_t(0), int64_t(5), base.cols - 1}) {
        const double w = merged_element(base, adapted.lora().at(1, t), scale, o, i);
        EXPECT_NEAR(static_cast<const float*>(got.data)[o * got.cols + i], w, 1e-6) << lora_target_name(t);
      }
  }

  // The merged model with a zero adapter (B = 0 at init) against the adapted model. Both compute
  // in f32; they differ only in where the low-rank product is rounded (merged into W, or as a
  // separate branch), a few ulps per projection, which the layers carry forward to relative errors
  // of order 1e-6 in the logits; 1e-5 keeps a margin while the adapter itself moves the logits by
  // far more (checked below).
  LlamaModel merged(load_hf_model(sharded.string()), lora_config(), CheckpointPolicy::None, 24);
  const std::vector<float> got = logits_of(merged, data);
  EXPECT_LT(test::rel_norm_error(got, want), 1e-5);
  LlamaModel plain(init_random_weights(cfg, DType::F32, 7), lora_config(), CheckpointPolicy::None, 24);
  EXPECT_GT(test::rel_norm_error(logits_of(plain, data), want), 1e-2);
}

TEST(MergedHf, KeepsBf16AndCopiesConfigAndTokenizerFromTheBase) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const LlamaWeights random = init_random_weights(cfg, DType::BF16, 9);
  // The base directory: the random weights merged with a zero adapter are the weights unchanged.
  const fs::path base_dir = tmp.dir / "base";
  LoraState zero(cfg, lora_config());
  std::memset(zero.params.data(), 0, zero.params.bytes());
  export_merged_hf(base_dir.string(), random, zero);
  nlohmann::json config = nlohmann::json::parse(slurp(base_dir / "config.json"));
  EXPECT_EQ(config.at("torch_dtype"), "bfloat16");
  config["bos_token_id"] = 1;  // a field tightfit does not model must survive the merge
  std::ofstream(base_dir / "config.json") << config.dump(1);
  std::ofstream(base_dir / "tokenizer.json") << "{\"model\": {}}";
  std::ofstream(base_dir / "tokenizer_config.json") << "{}";

  const LlamaWeights base = load_hf_model(base_dir.string());
  LoraState lora(cfg, lora_config());
  test::fill_lora_params(lora, 2, 5, 0.1f);
  const fs::path out = tmp.dir / "merged";
  export_merged_hf(out.string(), base, lora, {base_dir.string(), int64_t(2) << 30, {}});
  EXPECT_EQ(slurp(out / "config.json"), slurp(base_dir / "config.json"));
  EXPECT_EQ(slurp(out / "tokenizer.json"), slurp(base_dir / "tokenizer.json"));
  EXPECT_TRUE(fs::exists(out / "tokenizer_config.json"));
  EXPECT_FALSE(fs::exists(out / "tokenizer.model"));

  // Merged in f32, stored as bf16: each element is the bf16 rounding of W + scale * B A, within
  // half a bf16 ulp (bf16 keeps 8 significant bits: at most 2^-8 relative) plus the f32 error of
  // the sum (far smaller).
  const LlamaWeights merged = load_hf_model(out.string());
  const WeightRef v = merged.blocks[0].v;
  EXPECT_EQ(v.dtype, DType::BF16);
  EXPECT_EQ(merged.embed.dtype, DType::BF16);
  EXPECT_EQ(std::memcmp(merged.embed.data, base.embed.data, size_t(cfg.vocab * cfg.hidden) * 2), 0);
  const float scale = lora.config.scale();
  for (int64_t o : {int64_t(0), int64_t(7), v.rows - 1})
    for (int64_t i : {int64_t(0), int64_t(3), v.cols - 1}) {
      const double want = merged_element(base.blocks[0].v, lora.at(0, LoraTarget::V), scale, o, i);
      const double got = bf16_to_f32(static_cast<const uint16_t*>(v.data)[o * v.cols + i]);
      EXPECT_NEAR(got, want, std::fabs(want) * (1.0 / 256) + 1e-7) << o << "," << i;
    }
}

// The base as a GGUF file would hold it: q/k rows interleaved, and an adapter trained on it.
struct GgufOrdered {
  LlamaWeights w;
  std::vector<std::vector<float>> qk;  // permuted q/k copies the views point into
  LoraState lora;
};

GgufOrdered to_gguf_order(const LlamaWeights& hf, const LoraState& hf_lora) {
  const LlamaConfig& cfg = hf.config;
  GgufOrdered g{init_random_weights(cfg, DType::F32, 1), {}, LoraState(cfg, hf_lora.config)};
  g.w.config.rope_layout = RopeLayout::Interleaved;
  g.w.embed = hf.embed;
  g.w.final_norm = hf.final_norm;
  g.w.lm_head = hf.lm_head;
  std::memcpy(g.lora.params.data(), hf_lora.params.data(), hf_lora.params.bytes());
  for (int l = 0; l < cfg.n_layers; ++l) {
    g.w.blocks[size_t(l)] = hf.blocks[size_t(l)];
    for (WeightRef* ref : {&g.w.blocks[size_t(l)].q, &g.w.blocks[size_t(l)].k}) {
      g.qk.emplace_back(size_t(ref->rows * ref->cols));
      permute_qk_rows(g.qk.back().data(), static_cast<const float*>(ref->data), ref->rows, ref->cols,
                      cfg.head_dim, true);
      ref->data = g.qk.back().data();
    }
    for (LoraTarget t : {LoraTarget::Q, LoraTarget::K}) {
      const LoraAdapter& a = hf_lora.at(l, t);
      permute_qk_rows(g.lora.at(l, t).B, a.B, a.out, a.rank, cfg.head_dim, true);
    }
  }
  return g;
}

TEST(MergedHf, GgufOrderedBaseComesOutInHfOrder) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const LlamaWeights hf = init_random_weights(cfg, DType::F32, 4);
  LoraState lora(cfg, lora_config());
  test::fill_lora_params(lora, 3, 5, 0.1f);
  const GgufOrdered g = to_gguf_order(hf, lora);

  export_merged_hf((tmp.dir / "from_hf").string(), hf, lora);
  export_merged_hf((tmp.dir / "from_gguf").string(), g.w, g.lora);
  // No HF config came with the GGUF-ordered base: one is written that describes it.
  const LlamaConfig back = read_hf_config((tmp.dir / "from_gguf" / "config.json").string());
  EXPECT_EQ(back.rope_layout, RopeLayout::SplitHalf);
  EXPECT_EQ(back.n_kv_heads, cfg.n_kv_heads);
  EXPECT_EQ(back.head_dim, cfg.head_dim);
  EXPECT_EQ(back.tie_embeddings, cfg.tie_embeddings);

  const SafetensorsModel a = SafetensorsModel::open((tmp.dir / "from_hf").string());
  const SafetensorsModel b = SafetensorsModel::open((tmp.dir / "from_gguf").string());
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& name : a.names()) {
    const TensorView va = a.view(name), vb = b.view(name);
    // The same products summed per element; only BLAS's blocking of the rank-4 sum may differ.
    EXPECT_LT(test::rel_norm_error(vb.as<const float>(), va.as<const float>(), size_t(va.numel())), 1e-6)
        << name;
  }

  // As f16 (what a GGUF base with quantized tensors is written as): every tensor is the f32
  // export's values rounded once to f16, and config.json says so.
  export_merged_hf((tmp.dir / "from_gguf_f16").string(), g.w, g.lora, {"", int64_t(2) << 30, DType::F16});
  const SafetensorsModel h = SafetensorsModel::open((tmp.dir / "from_gguf_f16").string());
  ASSERT_EQ(h.names(), b.names());
  for (const std::string& name : b.names()) {
    ASSERT_EQ(h.get(name).dtype, StDType::F16) << name;
    const TensorView vf = b.view(name), vh = h.view(name);
    const float* f = vf.as<const float>();
    const uint16_t* half = vh.as<const uint16_t>();
    for (int64_t i = 0; i < vf.numel(); ++i) ASSERT_EQ(half[i], f32_to_f16(f[i])) << name << " " << i;
  }
  const nlohmann::json config = nlohmann::json::parse(slurp(tmp.dir / "from_gguf_f16" / "config.json"));
  EXPECT_EQ(config["torch_dtype"], "float16");
}

// A base whose matrices are stored in every quantized dtype an export may meet (q NF4 with
// double-quantized absmax, k Q8_0, v Q4_1, o INT8, gate Q5_0, up Q4_0, down Q5_1, the embedding
// Q8_0), and the same base with each of those matrices dequantized back to f32: the two hold the
// same values, so anything merged from them must be the same.
struct QuantizedBase {
  LlamaWeights quant, f32;
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<std::vector<float>> floats;

  explicit QuantizedBase(const LlamaConfig& cfg)
      : quant(init_random_weights(cfg, DType::F32, 21)), f32(init_random_weights(cfg, DType::F32, 21)) {
    store(quant.embed, f32.embed, DType::Q8_0);
    for (size_t l = 0; l < quant.blocks.size(); ++l) {
      BlockWeights &q = quant.blocks[l], &f = f32.blocks[l];
      store(q.q, f.q, DType::NF4);
      store(q.k, f.k, DType::Q8_0);
      store(q.v, f.v, DType::Q4_1);
      store(q.o, f.o, DType::INT8);
      store(q.gate, f.gate, DType::Q5_0);
      store(q.up, f.up, DType::Q4_0);
      store(q.down, f.down, DType::Q5_1);
    }
  }

  // q (f32) becomes `dtype` and f its dequantization.
  void store(WeightRef& q, WeightRef& f, DType dtype) {
    const auto* x = static_cast<const float*>(q.data);
    const int64_t n = q.rows * q.cols, blocks = ref::quant_blocks(n, kNf4Block);
    QuantScales scales;
    if (dtype == DType::NF4) {
      std::vector<float> absmax(static_cast<size_t>(blocks));
      bytes.emplace_back(size_t(ref::nf4_packed_bytes(n)));
      ref::quantize_nf4(x, n, bytes.back().data(), absmax.data());
      const void* codes = bytes.back().data();
      bytes.emplace_back(size_t(blocks));
      floats.emplace_back(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)));
      scales = {
          bytes.back().data(), floats.back().data(),
          ref::double_quantize_absmax(absmax.data(), blocks, bytes.back().data(), floats.back().data())};
      q = WeightRef(codes, dtype, q.rows, q.cols, scales);
    } else if (dtype == DType::INT8) {
      bytes.emplace_back(size_t(n));
      floats.emplace_back(size_t(blocks));
      ref::quantize_int8(x, n, reinterpret_cast<int8_t*>(bytes.back().data()), floats.back().data());
      q = WeightRef(bytes.back().data(), dtype, q.rows, q.cols, {floats.back().data()});
    } else {
      bytes.emplace_back(size_t(dtype_bytes(dtype, n)));
      ref::quantize_rows_ggml(*ggml_of_dtype(dtype), x, n, bytes.back().data());
      q = WeightRef(bytes.back().data(), dtype, q.rows, q.cols);
    }
    floats.emplace_back(size_t(n));
    ref::dequantize_weight_tile(floats.back().data(), q.cols, q, 0, q.rows, 0, q.cols);
    f = WeightRef(floats.back().data(), DType::F32, q.rows, q.cols);
  }
};

TEST(MergedHf, AQuantizedBaseMergesExactlyAsItsF32DequantizationAtAnyTileSize) {
  TempDir tmp;
  LlamaConfig cfg = test::tiny_config();
  cfg.rope_layout = RopeLayout::Interleaved;  // q/k rows are permuted back a tile at a time too
  const QuantizedBase qb(cfg);
  LoraState lora(cfg, lora_config());
  test::fill_lora_params(lora, 4, 5, 0.1f);
  for (const bool nf4 : {false, true}) {
    const std::string suffix = nf4 ? "-nf4" : "";
    const fs::path a = tmp.dir / ("quant" + suffix), b = tmp.dir / ("f32" + suffix),
                   c = tmp.dir / ("tiles" + suffix);
    export_merged_hf(a.string(), qb.quant, lora, {"", int64_t(2) << 30, DType::F16, nf4});
    export_merged_hf(b.string(), qb.f32, lora, {"", int64_t(2) << 30, DType::F16, nf4});
    // Tiles of 100 elements: a few rows of each matrix (at least a head, or a 64-element block).
    export_merged_hf(c.string(), qb.quant, lora, {"", int64_t(2) << 30, DType::F16, nf4, 100});
    const std::string want = slurp(b / "model.safetensors");
    EXPECT_EQ(slurp(a / "model.safetensors"), want) << suffix;
    EXPECT_EQ(slurp(c / "model.safetensors"), want) << suffix;
    EXPECT_EQ(slurp(a / "config.json"), slurp(b / "config.json")) << suffix;
  }
  // Without a dtype, quantized tensors are written as f16 (the embedding is quantized too) and
  // float ones keep theirs.
  export_merged_hf((tmp.dir / "own").string(), qb.quant, lora);
  const SafetensorsModel own = SafetensorsModel::open((tmp.dir / "own").string());
  EXPECT_EQ(own.get("model.layers.0.self_attn.q_proj.weight").dtype, StDType::F16);
  EXPECT_EQ(own.get("model.embed_tokens.weight").dtype, StDType::F16);
  EXPECT_EQ(own.get("model.norm.weight").dtype, StDType::F32);
}

TEST(MergedHf, Nf4IsBitsandbytesQuantizationOfTheF16ExportAndLoadsBackAsNf4) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const LlamaWeights base = init_random_weights(cfg, DType::BF16, 9);
  LoraConfig lc = lora_config();
  lc.targets = parse_lora_targets("q,v,down");  // untouched matrices are quantized too
  LoraState lora(cfg, lc);
  test::fill_lora_params(lora, 2, 5, 0.1f);
  const fs::path plain = tmp.dir / "plain", nf4 = tmp.dir / "nf4";
  export_merged_hf(plain.string(), base, lora);
  export_merged_hf(nf4.string(), base, lora, {"", int64_t(2) << 30, {}, true});

  const SafetensorsModel p = SafetensorsModel::open(plain.string());
  const SafetensorsModel q = SafetensorsModel::open(nf4.string());
  const auto bytes_of = [](const SafetensorsTensor& t) {
    std::vector<uint8_t> v(t.bytes.size());
    std::memcpy(v.data(), t.bytes.data(), v.size());
    return v;
  };
  int matrices = 0;
  for (const std::string& name : p.names()) {
    const SafetensorsTensor& t = p.get(name);
    const bool matrix = name.find("_proj.weight") != std::string::npos;
    if (!matrix) {
      // Embedding and norms: bf16 as in the plain export.
      EXPECT_EQ(q.get(name).dtype, StDType::BF16) << name;
      EXPECT_EQ(bytes_of(q.get(name)), bytes_of(t)) << name;
      continue;
    }
    ++matrices;
    // bitsandbytes quantizes what the plain export stores (bf16), as ref::quantize_nf4 does byte
    // for byte (tests/test_quant_nf4.cpp), then double-quantizes the absmax.
    const TensorView v = p.view(name);
    const int64_t n = v.numel(), blocks = ref::quant_blocks(n, kNf4Block);
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = bf16_to_f32(v.as<const uint16_t>()[i]);
    std::vector<uint8_t> codes(size_t(ref::nf4_packed_bytes(n))), absmax_codes(static_cast<size_t>(blocks));
    std::vector<float> absmax(static_cast<size_t>(blocks)),
        nested(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)));
    ref::quantize_nf4(x.data(), n, codes.data(), absmax.data());
    const float offset =
        ref::double_quantize_absmax(absmax.data(), blocks, absmax_codes.data(), nested.data());
    EXPECT_EQ(q.get(name).dtype, StDType::U8) << name;
    EXPECT_EQ(q.get(name).shape, (std::vector<int64_t>{n / 2, 1})) << name;
    EXPECT_EQ(bytes_of(q.get(name)), codes) << name;
    EXPECT_EQ(bytes_of(q.get(name + ".absmax")), absmax_codes) << name;
    const auto floats_of = [&](const std::string& key) {
      const SafetensorsTensor& s = q.get(key);
      EXPECT_EQ(s.dtype, StDType::F32) << key;
      std::vector<float> f(s.bytes.size() / 4);
      std::memcpy(f.data(), s.bytes.data(), s.bytes.size());
      return f;
    };
    EXPECT_EQ(floats_of(name + ".nested_absmax"), nested) << name;
    EXPECT_EQ(floats_of(name + ".quant_map"), std::vector<float>(kNf4Code, kNf4Code + 16)) << name;
    EXPECT_EQ(floats_of(name + ".nested_quant_map"),
              std::vector<float>(ref::dynamic_map(), ref::dynamic_map() + 256))
        << name;
    const std::vector<uint8_t> state = bytes_of(q.get(name + ".quant_state.bitsandbytes__nf4"));
    const nlohmann::json j = nlohmann::json::parse(state.begin(), state.end());
    EXPECT_EQ(j, nlohmann::json::parse(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
        "shape": [)" + std::to_string(t.shape[0]) +
                                       ", " + std::to_string(t.shape[1]) +
                                       R"(], "nested_blocksize": 256, "nested_dtype": "float32",
        "nested_offset": )" + nlohmann::json(double(offset)).dump() +
                                       "}"))
        << name;
  }
  EXPECT_EQ(matrices, 7 * cfg.n_layers);
  const nlohmann::json config = nlohmann::json::parse(slurp(nf4 / "config.json"));
  EXPECT_EQ(config.at("quantization_config"), bnb4bit_quantization_config(DType::BF16));
  EXPECT_EQ(config["quantization_config"]["bnb_4bit_compute_dtype"], "bfloat16");
  EXPECT_EQ(config["quantization_config"]["bnb_4bit_use_double_quant"], true);

  // tightfit's bitsandbytes loader keeps the codes as NF4, equal to what was written.
  const LlamaWeights back = load_hf_model(nf4.string(), QuantMode::Keep);
  const WeightRef down = back.blocks[1].down;
  ASSERT_EQ(down.dtype, DType::NF4);
  EXPECT_EQ(down.rows, cfg.hidden);
  EXPECT_EQ(back.embed.dtype, DType::BF16);
  const std::vector<uint8_t> file_codes = bytes_of(q.get("model.layers.1.mlp.down_proj.weight"));
  EXPECT_EQ(std::memcmp(down.data, file_codes.data(), file_codes.size()), 0);
}

TEST(MergedHf, TheBasesConfigGainsOrLosesQuantizationConfigAndKeepsTheRest) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const fs::path base_dir = tmp.dir / "base";
  LoraState zero(cfg, lora_config());
  std::memset(zero.params.data(), 0, zero.params.bytes());
  const LlamaWeights random = init_random_weights(cfg, DType::F16, 3);
  export_merged_hf(base_dir.string(), random, zero);
  nlohmann::ordered_json config = nlohmann::ordered_json::parse(slurp(base_dir / "config.json"));
  config["bos_token_id"] = 1;
  std::ofstream(base_dir / "config.json") << config.dump(1);
  const LlamaWeights base = load_hf_model(base_dir.string());
  LoraState lora(cfg, lora_config());
  test::fill_lora_params(lora, 2, 5, 0.1f);

  const fs::path nf4 = tmp.dir / "nf4";
  export_merged_hf(nf4.string(), base, lora, {base_dir.string(), int64_t(2) << 30, {}, true});
  nlohmann::ordered_json want = config;
  want["quantization_config"] = bnb4bit_quantization_config(DType::F16);
  EXPECT_EQ(nlohmann::ordered_json::parse(slurp(nf4 / "config.json")), want);

  // Merged again from the NF4 directory without nf4: its quantization_config describes weights
  // this export no longer has.
  const LlamaWeights quantized = load_hf_model(nf4.string(), QuantMode::Keep);
  ASSERT_EQ(quantized.blocks[0].q.dtype, DType::NF4);
  const fs::path plain = tmp.dir / "plain";
  export_merged_hf(plain.string(), quantized, zero, {nf4.string(), int64_t(2) << 30, {}});
  EXPECT_EQ(nlohmann::ordered_json::parse(slurp(plain / "config.json")), config);
  EXPECT_EQ(SafetensorsModel::open(plain.string()).get("model.layers.0.self_attn.q_proj.weight").dtype,
            StDType::F16);
}

TEST(MergedHf, RefusesAnAdapterOfAnotherShape) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  LlamaConfig wider = cfg;
  wider.intermediate = 96;
  const LoraState lora(wider, lora_config());
  const std::string out = (tmp.dir / "m").string();
  try {
    export_merged_hf(out, init_random_weights(cfg, DType::F32, 1), lora);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gate_proj of layer 0 is [96 x 32] but the base's is [64 x 32]"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
}

TEST(MergedGguf, CopiesMetadataAndUntouchedTensorsAndMergesInGgufOrder) {
  TempDir tmp;
  const LlamaConfig hf_cfg = test::tiny_config();
  const test::GgufBase built(hf_cfg, (tmp.dir / "base.gguf").string());
  const GgufFile base = GgufFile::open(built.path);
  const LlamaConfig cfg = llama_config_from_gguf(base);
  LoraConfig lc = lora_config();
  lc.targets = (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::V)) | (1u << int(LoraTarget::Down));
  LoraState lora(cfg, lc);  // in HF row order: trained on the HF original
  test::fill_lora_params(lora, 6, 5, 0.1f);
  const std::string out = (tmp.dir / "merged.gguf").string();
  const MergedGgufSummary summary = export_merged_gguf(out, base, lora, RopeLayout::SplitHalf);
  // q and v are F32 in this base and stay so; the Q8_0 ffn_down of both layers becomes F16.
  EXPECT_EQ(describe(summary),
            "4 adapted tensors written as F32 (were F32); 2 adapted tensors written as F16 (were Q8_0); " +
                std::to_string(base.tensors().size() - 6) + " tensors copied as they are");

  const GgufFile m = GgufFile::open(out);
  // Every key of the base in order, then the mark of a tightfit export.
  ASSERT_EQ(m.metadata().size(), base.metadata().size() + 1);
  for (size_t i = 0; i < base.metadata().size(); ++i)
    EXPECT_EQ(m.metadata()[i].first, base.metadata()[i].first);
  EXPECT_EQ(m.get_string(kGgufExportKey), "merged");
  EXPECT_EQ(m.get_string("general.name"), "tiny");
  EXPECT_EQ(m.get_string_array("tokenizer.ggml.tokens").size(), size_t(cfg.vocab));
  ASSERT_EQ(m.tensors().size(), base.tensors().size());
  int untouched = 0;
  for (const GgufTensorInfo& a : base.tensors()) {
    const GgufTensorInfo& b = m.tensor(a.name);
    const bool adapted = a.name.find("attn_q.") != std::string::npos ||
                         a.name.find("attn_v.") != std::string::npos ||
                         a.name.find("ffn_down.") != std::string::npos;
    if (adapted) continue;
    ++untouched;
    EXPECT_EQ(b.type, a.type) << a.name;
    EXPECT_TRUE(std::equal(a.bytes().begin(), a.bytes().end(), b.bytes().begin(), b.bytes().end())) << a.name;
  }
  EXPECT_EQ(untouched, int(base.tensors().size()) - 6);

  const float scale = lora.config.scale();
  // q: merged in GGUF row order, i.e. GGUF row r is HF row gguf_qk_row_source(r) of W + scale B A.
  const GgufTensorInfo& q = m.tensor("blk.1.attn_q.weight");
  EXPECT_EQ(q.type, GgmlType::F32);
  const WeightRef hf_q = built.hf.blocks[1].q;
  for (int64_t r : {int64_t(0), int64_t(1), int64_t(9), q.ne[1] - 1})
    for (int64_t i : {int64_t(0), q.ne[0] - 1}) {
      const double want =
          merged_element(hf_q, lora.at(1, LoraTarget::Q), scale, gguf_qk_row_source(r, cfg.head_dim), i);
      EXPECT_NEAR(reinterpret_cast<const float*>(q.data)[r * q.ne[0] + i], want, 1e-6) << r << "," << i;
    }
  // down: a Q8_0 base is dequantized, merged in f32 and stored as F16. The f32 merge is within
  // 1e-6 of the double sum (as q above); rounding to f16 adds at most half an ulp, 2^-11 of the
  // value for normal halves and 2^-25 for subnormal ones.
  const GgufTensorInfo& down = m.tensor("blk.0.ffn_down.weight");
  ASSERT_EQ(down.type, GgmlType::F16);
  std::vector<float> base_down(size_t(base.tensor("blk.0.ffn_down.weight").n_elements));
  ref::dequantize_rows(GgmlType::Q8_0, base.tensor("blk.0.ffn_down.weight").data, int64_t(base_down.size()),
                       base_down.data());
  const WeightRef deq{base_down.data(), DType::F32, down.ne[1], down.ne[0]};
  const auto* half = reinterpret_cast<const uint16_t*>(down.data);
  for (int64_t o = 0; o < down.ne[1]; ++o)
    for (int64_t i = 0; i < down.ne[0]; ++i) {
      const double want = merged_element(deq, lora.at(0, LoraTarget::Down), scale, o, i);
      const double bound = 1e-6 + (std::fabs(want) + 1e-6) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25);
      ASSERT_NEAR(f16_to_f32(half[o * down.ne[0] + i]), want, bound) << o << "," << i;
    }

  // The same adapter already in GGUF row order (trained on the GGUF base) gives the same file.
  LoraState gguf_rows(cfg, lc);
  std::memcpy(gguf_rows.params.data(), lora.params.data(), lora.params.bytes());
  for (int l = 0; l < cfg.n_layers; ++l) {
    const LoraAdapter& a = lora.at(l, LoraTarget::Q);
    permute_qk_rows(gguf_rows.at(l, LoraTarget::Q).B, a.B, a.out, a.rank, cfg.head_dim, true);
  }
  const std::string out2 = (tmp.dir / "merged2.gguf").string();
  export_merged_gguf(out2, base, gguf_rows, RopeLayout::Interleaved);
  EXPECT_EQ(slurp(out2), slurp(out));
}

TEST(MergedGguf, RequantizesTheMergedTensorsAsAskedOrKeepsTheBaseTypes) {
  TempDir tmp;
  const test::GgufBase built(test::tiny_config(), (tmp.dir / "base.gguf").string());
  const GgufFile base = GgufFile::open(built.path);
  const LlamaConfig cfg = llama_config_from_gguf(base);
  LoraConfig lc = lora_config();
  lc.targets = parse_lora_targets("v,down");
  LoraState lora(cfg, lc);
  test::fill_lora_params(lora, 6, 5, 0.1f);
  const int copied = int(base.tensors().size()) - 4;

  // The merged f32 rows the exports quantize: the base dequantized plus scale * B A.
  const auto merged_f32 = [&](const std::string& name, LoraTarget t) {
    const GgufTensorInfo& ti = base.tensor(name);
    std::vector<float> w(size_t(ti.n_elements));
    ref::dequantize_rows(ti.type, ti.data, ti.n_elements, w.data());
    merge_lora_delta(w.data(), lora.at(0, t), lora.config.scale());
    return w;
  };
  const auto quantized = [](GgmlType type, const std::vector<float>& w) {
    std::vector<uint8_t> q(w.size() / kQK0 * size_t(ggml_type_info(uint32_t(type)).block_bytes));
    ref::quantize_rows_ggml(type, w.data(), int64_t(w.size()), q.data());
    return q;
  };
  const auto bytes_of = [](const GgufTensorInfo& t) {
    return std::vector<uint8_t>(t.data, t.data + t.n_bytes);
  };
  const std::vector<float> v = merged_f32("blk.0.attn_v.weight", LoraTarget::V);
  const std::vector<float> down = merged_f32("blk.0.ffn_down.weight", LoraTarget::Down);

  for (const GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0}) {
    const std::string name = ggml_type_info(uint32_t(type)).name;
    const std::string out = (tmp.dir / (name + ".gguf")).string();
    const MergedGgufSummary s = export_merged_gguf(out, base, lora, RopeLayout::SplitHalf, {type});
    EXPECT_EQ(describe(s), "4 adapted tensors written as " + name + " (were 2 F32, 2 Q8_0); " +
                               std::to_string(copied) + " tensors copied as they are");
    const GgufFile m = GgufFile::open(out);
    EXPECT_EQ(m.tensor("blk.0.attn_v.weight").type, type);
    EXPECT_EQ(bytes_of(m.tensor("blk.0.attn_v.weight")), quantized(type, v)) << name;
    EXPECT_EQ(bytes_of(m.tensor("blk.0.ffn_down.weight")), quantized(type, down)) << name;
    EXPECT_EQ(bytes_of(m.tensor("blk.0.attn_q.weight")), bytes_of(base.tensor("blk.0.attn_q.weight")));
    // A tile of one row at a time gives the same file.
    const std::string rows = (tmp.dir / (name + "-rows.gguf")).string();
    export_merged_gguf(rows, base, lora, RopeLayout::SplitHalf, {type, false, 1});
    EXPECT_EQ(slurp(rows), slurp(out)) << name;
  }

  const std::string kept = (tmp.dir / "keep.gguf").string();
  EXPECT_EQ(describe(export_merged_gguf(kept, base, lora, RopeLayout::SplitHalf, {GgmlType::F16, true})),
            "2 adapted tensors written as F32 (were F32); 2 adapted tensors written as Q8_0 (were Q8_0); " +
                std::to_string(copied) + " tensors copied as they are");
  const GgufFile k = GgufFile::open(kept);
  EXPECT_EQ(bytes_of(k.tensor("blk.0.ffn_down.weight")), quantized(GgmlType::Q8_0, down));
  const GgufTensorInfo& kv = k.tensor("blk.0.attn_v.weight");
  ASSERT_EQ(kv.type, GgmlType::F32);
  EXPECT_EQ(std::memcmp(kv.data, v.data(), v.size() * 4), 0);

  try {
    export_merged_gguf((tmp.dir / "q4k.gguf").string(), base, lora, RopeLayout::SplitHalf, {GgmlType::Q4_K});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("merged tensors are written as F16 or Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, not "
                                   "Q4_K"),
        std::string::npos)
        << e.what();
  }
}

TEST(MergedGguf, KeepingTypesTightfitCannotQuantizeToIsRefusedBeforeWriting) {
  TempDir tmp;
  LlamaConfig hf_cfg = test::tiny_config();
  hf_cfg.intermediate = 256;  // ffn_down rows of one k-quant block
  const test::GgufBase built(hf_cfg, (tmp.dir / "q8.gguf").string());
  // The same file with both ffn_down tensors as Q4_K (zero blocks).
  const std::string path = (tmp.dir / "base.gguf").string();
  std::vector<uint8_t> zeros(size_t(hf_cfg.hidden) * sizeof(BlockQ4_K));
  {
    const GgufFile f = GgufFile::open(built.path);
    GgufWriter w;
    for (const auto& [key, value] : f.metadata())
      if (key != "general.alignment") w.add_value(key, value);
    for (const GgufTensorInfo& t : f.tensors()) {
      const std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
      if (t.type == GgmlType::Q8_0)
        w.add_tensor(t.name, GgmlType::Q4_K, ne, zeros.data(), zeros.size());
      else
        w.add_tensor(t.name, t.type, ne, t.data, size_t(t.n_bytes));
    }
    w.write(path);
  }
  const GgufFile base = GgufFile::open(path);
  const LlamaConfig cfg = llama_config_from_gguf(base);
  LoraState lora(cfg, lora_config());
  test::fill_lora_params(lora, 6, 5, 0.1f);
  const std::string out = (tmp.dir / "keep.gguf").string();
  try {
    export_merged_gguf(out, base, lora, RopeLayout::SplitHalf, {GgmlType::F16, true});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(
        std::string(e.what()).find(path + ": the adapted tensors cannot all keep their type: tightfit "
                                          "quantizes to Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, not Q4_K (2 tensors); "
                                          "write them as F16 or one of those types"),
        std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  // F16 (the default) dequantizes the Q4_K blocks instead.
  EXPECT_NE(describe(export_merged_gguf(out, base, lora, RopeLayout::SplitHalf))
                .find("; 2 adapted tensors written as F16 (were Q4_K); "),
            std::string::npos);
}

}  // namespace
}  // namespace tf::io
