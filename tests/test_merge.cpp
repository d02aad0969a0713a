// Tests: merge_lora_delta against a hand computation; the merged HF export (a merged model's logits
// equal the adapted model's; dtypes, config.json and tokenizer files; sharding with an index; a
// GGUF-ordered base comes out in HF order) read back by load_hf_model / SafetensorsModel; the
// merged GGUF export (metadata copied, untouched tensors byte-identical, merged q/k in GGUF row
// order, a quantized tensor merged as F16 within f16 rounding, the summary line) read back by
// GgufFile; a GGUF-ordered base written as f16 is its f32 export rounded once.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "src/core/error.h"
#include "src/io/gguf_lora.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
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

}  // namespace
}  // namespace tf::io
