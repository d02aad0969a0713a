// defines: golden tests of Qwen2, Qwen3, Gemma 2 and 3, Phi-3 and of every rope scaling type against
// transformers + PEFT, each model in both of its forms: the HF directory and the GGUF llama.cpp's
// convert_hf_to_gguf.py wrote of it (tools/make_arch_golden.py, tests/fixtures/arch_golden/).
// Logits, loss and every LoRA gradient must be the float64 reference's within the bounds of
// tests/test_golden.cpp.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "op_test_util.h"
#include "src/io/gguf.h"
#include "src/io/gguf_lora.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "src/io/model_loader.h"
#include "src/io/peft.h"
#include "src/model/llama.h"

using namespace tf;

namespace {

const std::string kDir = std::string(TIGHTFIT_FIXTURES) + "/arch_golden/";

struct Expected {
  std::shared_ptr<const io::SafetensorsModel> file;
  LoraConfig lora;
  int batch = 0, seq = 0;
  int64_t n_targets = 0;
};

Expected load_expected(const std::string& name) {
  Expected e;
  e.file = std::make_shared<const io::SafetensorsModel>(io::SafetensorsModel::open(kDir + name));
  const auto& meta = e.file->shards().at(0).metadata();
  e.lora.rank = std::stoi(meta.at("lora_r"));
  e.lora.alpha = std::stof(meta.at("lora_alpha"));
  e.lora.targets = parse_lora_targets(meta.at("lora_targets"));
  e.n_targets = std::stoi(meta.at("n_targets"));
  const io::SafetensorsTensor& ids = e.file->get("input_ids");
  e.batch = int(ids.shape[0]);
  e.seq = int(ids.shape[1]);
  return e;
}

const float* f32(const Expected& e, const std::string& name) {
  return static_cast<const float*>(e.file->view(name).data);
}

std::string lora_name(int layer, LoraTarget t, const char* which) {
  const bool attn = t == LoraTarget::Q || t == LoraTarget::K || t == LoraTarget::V || t == LoraTarget::O;
  return "model.layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + lora_target_name(t) +
         ".lora_" + which + ".weight";
}

// The reference's q/k rows are HF's; a model whose stored rows are permuted for the interleaved
// rotation (a llama GGUF) needs B's rows, and gives dB's, in that order.
bool permuted_rows(const LlamaConfig& c, LoraTarget t) {
  return c.rope_layout == RopeLayout::Interleaved && (t == LoraTarget::Q || t == LoraTarget::K);
}

// Loads the reference adapter into `model` and checks logits, loss and gradients.
void check(LlamaModel& model, const Expected& e, const std::string& what) {
  const LlamaConfig& c = model.config();
  LoraState& lora = model.lora();
  for (int l = 0; l < c.n_layers; ++l)
    for (int t = 0; t < kLoraTargetCount; ++t) {
      LoraAdapter& a = lora.at(l, LoraTarget(t));
      std::copy_n(f32(e, lora_name(l, LoraTarget(t), "A")), int64_t(a.rank) * a.in, a.A);
      const float* b = f32(e, lora_name(l, LoraTarget(t), "B"));
      if (permuted_rows(c, LoraTarget(t)))
        io::permute_qk_rows(a.B, b, a.out, a.rank, c.head_dim, true);
      else
        std::copy_n(b, int64_t(a.rank) * a.out, a.B);
    }
  const auto* tokens = static_cast<const int32_t*>(e.file->view("input_ids").data);
  const auto* labels = static_cast<const int32_t*>(e.file->view("labels").data);
  std::vector<int32_t> targets, positions;
  for (int b = 0; b < e.batch; ++b)
    for (int t = 0; t < e.seq; ++t) {
      targets.push_back(t + 1 < e.seq ? labels[b * e.seq + t + 1] : kIgnoreIndex);  // HF shifts labels
      positions.push_back(t);
    }
  const Batch batch{e.batch, e.seq, tokens, targets.data(), positions.data(), nullptr};

  // As tests/test_golden.cpp: the reference is float64 rounded to f32, ours f32 throughout (HF's
  // own f32 run is ~5e-7 from float64 on logits, ~1e-6 on gradients), so 1e-5 and 1e-4 leave a 10x
  // margin, while a dropped bias, a wrong frequency or a missing attention factor moves the
  // logits by 1e-1 or more (the script measures each: 2.8, 0.13, 0.21).
  const size_t n_logits = size_t(e.batch) * e.seq * size_t(c.vocab);
  std::vector<float> logits(n_logits);
  model.forward_logits(batch, logits.data());
  EXPECT_LT(test::rel_norm_error(logits.data(), f32(e, "logits"), n_logits), 1e-5) << what;

  lora.zero_grads();
  const LossSum loss = model.forward_backward(batch, 1.0f / float(e.n_targets), 0);
  ASSERT_EQ(loss.n_valid, e.n_targets) << what;
  const double want = f32(e, "loss")[0];
  EXPECT_LT(std::abs(loss.mean() - want) / want, 1e-5) << what << " loss " << loss.mean() << " vs " << want;

  for (int l = 0; l < c.n_layers; ++l)
    for (int t = 0; t < kLoraTargetCount; ++t) {
      const LoraAdapter& a = lora.at(l, LoraTarget(t));
      const std::string na = lora_name(l, LoraTarget(t), "A"), nb = lora_name(l, LoraTarget(t), "B");
      std::vector<float> db(a.dB, a.dB + size_t(a.rank) * a.out);
      if (permuted_rows(c, LoraTarget(t)))
        io::permute_qk_rows(db.data(), a.dB, a.out, a.rank, c.head_dim, false);
      EXPECT_LT(test::rel_norm_error(a.dA, f32(e, na + ".grad"), size_t(a.rank) * a.in), 1e-4)
          << what << " " << na;
      EXPECT_LT(test::rel_norm_error(db.data(), f32(e, nb + ".grad"), db.size()), 1e-4) << what << " " << nb;
    }
}

// An HF directory with one of its config variants (config.json, config_yarn.json, ...).
LlamaWeights hf_weights(const std::string& dir, const std::string& config) {
  auto file = std::make_shared<const io::SafetensorsModel>(io::SafetensorsModel::open(kDir + dir));
  return io::weights_from_safetensors(file, io::read_hf_config(kDir + dir + "/" + config));
}

LlamaWeights gguf_weights(const std::string& name) {
  return io::load_model(kDir + name, true, io::QuantMode::Keep).weights;
}

void golden(LlamaWeights w, const std::string& expected, const std::string& what,
            CheckpointPolicy policy = CheckpointPolicy::None, const ModelLayout& layout = {},
            offload::WeightTier tier = offload::WeightTier::Resident) {
  const Expected e = load_expected(expected);
  LlamaModel model(std::move(w), e.lora, policy, int64_t(e.batch) * e.seq, cpu_backend(), tier, layout);
  check(model, e, what);
}

}  // namespace

TEST(GoldenArch, Qwen2HfDirectory) {
  const LlamaWeights w = hf_weights("qwen2", "config.json");
  EXPECT_EQ(w.config.n_heads, 3 * w.config.n_kv_heads);
  EXPECT_NE(w.config.head_dim, w.config.hidden / w.config.n_heads);
  golden(hf_weights("qwen2", "config.json"), "qwen2_expected.safetensors", "qwen2 HF");
}

TEST(GoldenArch, Qwen2Gguf) {
  const io::LoadedModel m = io::load_model(kDir + "qwen2.gguf", true, io::QuantMode::Keep);
  EXPECT_EQ(m.weights.config.architecture, "qwen2");
  EXPECT_TRUE(m.weights.config.attention_bias);
  EXPECT_FALSE(m.weights.config.tie_embeddings);
  EXPECT_EQ(m.weights.config.rope_layout, RopeLayout::SplitHalf);  // the converter keeps HF's q/k rows
  ASSERT_NE(m.tokenizer, nullptr);
  golden(gguf_weights("qwen2.gguf"), "qwen2_expected.safetensors", "qwen2 GGUF");
  golden(gguf_weights("qwen2.gguf"), "qwen2_expected.safetensors", "qwen2 GGUF per-block checkpointing",
         CheckpointPolicy::PerBlock);
}

TEST(GoldenArch, Qwen2TiedPaddedVocabulary) {
  const io::LoadedModel m = io::load_model(kDir + "qwen2_tied.gguf", true, io::QuantMode::Keep);
  EXPECT_TRUE(m.weights.config.tie_embeddings);
  EXPECT_EQ(m.weights.config.vocab, 320);
  ASSERT_NE(m.tokenizer, nullptr);
  golden(hf_weights("qwen2_tied", "config.json"), "qwen2_tied_expected.safetensors", "qwen2 tied HF");
  golden(gguf_weights("qwen2_tied.gguf"), "qwen2_tied_expected.safetensors", "qwen2 tied GGUF");
}

TEST(GoldenArch, Qwen3HfAndGguf) {
  const LlamaWeights hf = hf_weights("qwen3", "config.json");
  EXPECT_EQ(hf.config.architecture, "qwen3");
  EXPECT_TRUE(hf.config.qk_norm);
  EXPECT_TRUE(hf.config.tie_embeddings);
  EXPECT_EQ(hf.config.n_heads, 3 * hf.config.n_kv_heads);
  EXPECT_NE(hf.config.head_dim, hf.config.hidden / hf.config.n_heads);
  golden(hf_weights("qwen3", "config.json"), "qwen3_expected.safetensors", "qwen3 HF");
  const io::LoadedModel m = io::load_model(kDir + "qwen3.gguf", true, io::QuantMode::Keep);
  EXPECT_EQ(m.weights.config.architecture, "qwen3");
  EXPECT_TRUE(m.weights.config.qk_norm);
  EXPECT_FALSE(m.weights.config.attention_bias);
  EXPECT_EQ(m.weights.config.rope_layout, RopeLayout::SplitHalf);  // neox: HF's q/k rows
  ASSERT_NE(m.tokenizer, nullptr);
  golden(gguf_weights("qwen3.gguf"), "qwen3_expected.safetensors", "qwen3 GGUF");
  // The backward of a recomputed block needs the pre-norm q and k and their rstd again.
  golden(gguf_weights("qwen3.gguf"), "qwen3_expected.safetensors", "qwen3 GGUF per-block checkpointing",
         CheckpointPolicy::PerBlock);
}

TEST(GoldenArch, Gemma3HfAndGguf) {
  const LlamaWeights hf = hf_weights("gemma3", "config.json");
  const LlamaConfig& c = hf.config;
  EXPECT_EQ(c.architecture, "gemma3");
  EXPECT_TRUE(c.qk_norm && c.sandwich_norms && c.tie_embeddings);
  EXPECT_EQ(c.activation, MlpActivation::GeluTanh);
  EXPECT_EQ(c.embed_scale, std::sqrt(32.0f));
  EXPECT_EQ(c.n_heads, 2 * c.n_kv_heads);
  EXPECT_NE(c.head_dim, c.hidden / c.n_heads);
  // Layers 0-4 slide over 4 keys with rope base 100; layer 5 attends everything with base 10000
  // and linear scaling by 8.
  EXPECT_EQ(c.window(0), 4);
  EXPECT_EQ(c.window(4), 4);
  EXPECT_EQ(c.window(5), 0);
  EXPECT_EQ(c.rope_of(0).theta, 100.0f);
  EXPECT_EQ(c.rope_of(5).theta, 10000.0f);
  EXPECT_EQ(c.rope_of(5).scaling, RopeScalingType::Linear);
  EXPECT_EQ(c.rope_of(0).scaling, RopeScalingType::None);
  // The norms hold 1 + w, w as the file stores it.
  auto file = io::SafetensorsModel::open(kDir + "gemma3");
  const TensorView stored = file.view("model.layers.2.post_feedforward_layernorm.weight");
  EXPECT_EQ(hf.blocks[2].post_mlp_norm.dtype, DType::F32);
  EXPECT_EQ(static_cast<const float*>(hf.blocks[2].post_mlp_norm.data)[3],
            1.0f + bf16_to_f32(static_cast<const uint16_t*>(stored.data)[3]));
  golden(hf_weights("gemma3", "config.json"), "gemma3_expected.safetensors", "gemma3 HF");

  const io::LoadedModel m = io::load_model(kDir + "gemma3.gguf", true, io::QuantMode::Keep);
  const LlamaConfig& g = m.weights.config;
  EXPECT_EQ(g.architecture, "gemma3");
  EXPECT_EQ(g.sliding_layers, c.sliding_layers);
  EXPECT_EQ(g.sliding_window, c.sliding_window);
  EXPECT_EQ(g.rope_local.theta, c.rope_local.theta);
  EXPECT_EQ(g.rope.factor, c.rope.factor);
  EXPECT_EQ(g.attention_scale(0), c.attention_scale(0));
  EXPECT_EQ(g.rope_layout, RopeLayout::SplitHalf);
  ASSERT_NE(m.tokenizer, nullptr);
  golden(gguf_weights("gemma3.gguf"), "gemma3_expected.safetensors", "gemma3 GGUF");
  // Recomputed blocks, and the MLP in chunks of 8 rows: the post-MLP norm's backward forms each
  // chunk's down output again.
  golden(gguf_weights("gemma3.gguf"), "gemma3_expected.safetensors", "gemma3 GGUF per-block checkpointing",
         CheckpointPolicy::PerBlock);
  golden(gguf_weights("gemma3.gguf"), "gemma3_expected.safetensors", "gemma3 GGUF MLP in chunks",
         CheckpointPolicy::PerBlock, ModelLayout{.mlp_chunk = 8});
  golden(hf_weights("gemma3", "config.json"), "gemma3_expected.safetensors", "gemma3 HF MLP in chunks",
         CheckpointPolicy::None, ModelLayout{.mlp_chunk = 8});
  // Blocks read from the file a layer at a time: the norms the loader made (1 + w) come from host
  // memory beside the file's matrices.
  golden(hf_weights("gemma3", "config.json"), "gemma3_expected.safetensors", "gemma3 HF weights from disk",
         CheckpointPolicy::PerBlock, {}, offload::WeightTier::Disk);
}

TEST(GoldenArch, Gemma3DecodeWithKvCacheMatchesReference) {
  // Decoding runs the embedding scale, the local rope of the sliding layers and their window on
  // the cache: each decoded token's logits equal the reference's at its position.
  const Expected e = load_expected("gemma3_expected.safetensors");
  LlamaModel model(gguf_weights("gemma3.gguf"), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "gemma3 GGUF before decoding");
  const LlamaConfig& c = model.config();
  KvCache cache = model.make_kv_cache(e.seq);
  const auto* tokens = static_cast<const int32_t*>(e.file->view("input_ids").data);
  std::vector<float> logits(size_t(c.vocab));
  for (int t = 0; t < e.seq; ++t) {
    model.decode(cache, tokens + t, 1, logits.data());
    EXPECT_LT(test::rel_norm_error(logits.data(), f32(e, "logits") + size_t(t) * c.vocab, size_t(c.vocab)),
              1e-5)
        << "decoded position " << t;
  }
}

// Gemma 3 with its optional final soft cap (config_capped.json: 2, below the largest logits of
// about 4, so tanh bends some and saturates none; the script measures 2.2 of logit change without
// it). The loss in calls of 8 rows caps each call's logits.
TEST(GoldenArch, Gemma3WithTheFinalCap) {
  const LlamaWeights hf = hf_weights("gemma3", "config_capped.json");
  EXPECT_EQ(hf.config.final_softcap, 2.0f);
  EXPECT_EQ(hf.config.attn_softcap, 0.0f);
  golden(hf_weights("gemma3", "config_capped.json"), "gemma3_capped_expected.safetensors",
         "gemma3 HF capped");
  golden(hf_weights("gemma3", "config_capped.json"), "gemma3_capped_expected.safetensors",
         "gemma3 HF capped, loss in chunks", CheckpointPolicy::PerBlock, ModelLayout{.loss_rows = 8});
}

// Gemma 2: Gemma 3's block without q/k norms, one rope base, the even layers sliding, and its
// attention scores and final logits soft-capped (at 3 and 2 in the fixture, which its scores and
// logits exceed by far: the script measures 4.0 and 11 of logit change without each cap).
TEST(GoldenArch, Gemma2HfAndGguf) {
  const LlamaWeights hf = hf_weights("gemma2", "config.json");
  const LlamaConfig& c = hf.config;
  EXPECT_EQ(c.architecture, "gemma2");
  EXPECT_TRUE(c.sandwich_norms && c.tie_embeddings);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_FALSE(c.has_local_rope());
  EXPECT_EQ(c.activation, MlpActivation::GeluTanh);
  EXPECT_EQ(c.embed_scale, std::sqrt(32.0f));
  EXPECT_EQ(c.attn_softcap, 3.0f);
  EXPECT_EQ(c.final_softcap, 2.0f);
  EXPECT_EQ(c.window(0), 4);
  EXPECT_EQ(c.window(1), 0);
  EXPECT_EQ(c.window(2), 4);
  EXPECT_EQ(c.window(3), 0);
  golden(hf_weights("gemma2", "config.json"), "gemma2_expected.safetensors", "gemma2 HF");

  const io::LoadedModel m = io::load_model(kDir + "gemma2.gguf", true, io::QuantMode::Keep);
  const LlamaConfig& g = m.weights.config;
  EXPECT_EQ(g.architecture, "gemma2");
  EXPECT_FALSE(g.qk_norm);
  EXPECT_FALSE(g.has_local_rope());
  EXPECT_EQ(g.sliding_layers, c.sliding_layers);
  EXPECT_EQ(g.sliding_window, c.sliding_window);
  EXPECT_EQ(g.attn_softcap, c.attn_softcap);
  EXPECT_EQ(g.final_softcap, c.final_softcap);
  EXPECT_EQ(g.attention_scale(0), c.attention_scale(0));
  EXPECT_EQ(g.rope_layout, RopeLayout::SplitHalf);
  ASSERT_NE(m.tokenizer, nullptr);
  golden(gguf_weights("gemma2.gguf"), "gemma2_expected.safetensors", "gemma2 GGUF");
  // Recomputed blocks (the capped softmax again from the saved block input), the MLP in chunks and
  // the loss in calls of 8 rows (each call caps its own logits).
  golden(gguf_weights("gemma2.gguf"), "gemma2_expected.safetensors", "gemma2 GGUF per-block checkpointing",
         CheckpointPolicy::PerBlock);
  golden(hf_weights("gemma2", "config.json"), "gemma2_expected.safetensors",
         "gemma2 HF MLP and loss in chunks", CheckpointPolicy::PerBlock,
         ModelLayout{.mlp_chunk = 8, .loss_rows = 8});
}

TEST(GoldenArch, Gemma2DecodeWithKvCacheMatchesReference) {
  // Decoding caps the cached attention's scores in the layers that slide and in those that do not,
  // and the logits it returns: each decoded token's logits equal the reference's at its position.
  const Expected e = load_expected("gemma2_expected.safetensors");
  LlamaModel model(gguf_weights("gemma2.gguf"), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "gemma2 GGUF before decoding");
  const LlamaConfig& c = model.config();
  KvCache cache = model.make_kv_cache(e.seq);
  const auto* tokens = static_cast<const int32_t*>(e.file->view("input_ids").data);
  std::vector<float> logits(size_t(c.vocab));
  for (int t = 0; t < e.seq; ++t) {
    model.decode(cache, tokens + t, 1, logits.data());
    EXPECT_LT(test::rel_norm_error(logits.data(), f32(e, "logits") + size_t(t) * c.vocab, size_t(c.vocab)),
              1e-5)
        << "decoded position " << t;
  }
}

TEST(GoldenArch, LlamaDefaultRope) {
  golden(hf_weights("llama", "config.json"), "llama_default_expected.safetensors", "llama default");
}

TEST(GoldenArch, Llama3RopeHfAndRopeFreqsGguf) {
  golden(hf_weights("llama", "config_llama3.json"), "llama_llama3_expected.safetensors", "llama3 HF");
  const LlamaWeights w = gguf_weights("llama_llama3.gguf");
  EXPECT_EQ(w.config.rope.scaling, RopeScalingType::None);
  EXPECT_EQ(w.config.rope.freq_factors.size(), size_t(w.config.head_dim / 2));
  golden(gguf_weights("llama_llama3.gguf"), "llama_llama3_expected.safetensors", "llama3 GGUF rope_freqs");
}

TEST(GoldenArch, YarnRopeHfAndGguf) {
  golden(hf_weights("llama", "config_yarn.json"), "llama_yarn_expected.safetensors", "yarn HF");
  const LlamaWeights w = gguf_weights("llama_yarn.gguf");
  EXPECT_EQ(w.config.rope.scaling, RopeScalingType::Yarn);
  golden(gguf_weights("llama_yarn.gguf"), "llama_yarn_expected.safetensors", "yarn GGUF");
}

TEST(GoldenArch, LinearRope) {
  golden(hf_weights("llama", "config_linear.json"), "llama_linear_expected.safetensors", "linear HF");
}

TEST(GoldenArch, DynamicRopeWithinItsLengthIsDefault) {
  // transformers' dynamic NTK keeps the default frequencies up to max_position_embeddings (16 here,
  // the batch's length); the script asserts its logits equal the default rope's.
  golden(hf_weights("llama", "config_dynamic.json"), "llama_default_expected.safetensors", "dynamic HF");
}

TEST(GoldenArch, DynamicRopeRefusesPositionsPastItsLength) {
  LlamaModel model(hf_weights("llama", "config_dynamic.json"), LoraConfig{}, CheckpointPolicy::None, 17);
  std::vector<int32_t> tokens(17, 3), positions(17);
  for (int i = 0; i < 17; ++i) positions[size_t(i)] = i;
  std::vector<float> logits(size_t(17) * size_t(model.config().vocab));
  const Batch b{1, 17, tokens.data(), nullptr, positions.data(), nullptr};
  try {
    model.forward_logits(b, logits.data());
    FAIL() << "position 16 of a dynamic rope model with max_position_embeddings 16 ran";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("dynamic (NTK) rope"), std::string::npos) << err.what();
  }
}

TEST(GoldenArch, YarnDecodeWithKvCacheMatchesReference) {
  // The KV-cache decode must scale scores by the attention factor too: each decoded token's logits
  // equal the reference's at its position (the adapter loaded, row 0 of the batch).
  const Expected e = load_expected("llama_yarn_expected.safetensors");
  LlamaModel model(gguf_weights("llama_yarn.gguf"), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "yarn GGUF before decoding");
  const LlamaConfig& c = model.config();
  KvCache cache = model.make_kv_cache(e.seq);
  const auto* tokens = static_cast<const int32_t*>(e.file->view("input_ids").data);
  std::vector<float> logits(size_t(c.vocab));
  for (int t = 0; t < e.seq; ++t) {
    model.decode(cache, tokens + t, 1, logits.data());
    EXPECT_LT(test::rel_norm_error(logits.data(), f32(e, "logits") + size_t(t) * c.vocab, size_t(c.vocab)),
              1e-5)
        << "decoded position " << t;
  }
}

namespace {

std::string temp_path(const std::string& name) {
  const std::string dir = testing::TempDir() + "arch_golden_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  return dir + "/" + name;
}

// Logits [batch * seq, vocab] of `w` without an adapter (LoRA B starts at zero) on the reference batch.
std::vector<float> plain_logits(LlamaWeights w, const Expected& e) {
  LlamaModel model(std::move(w), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  std::vector<int32_t> positions;
  for (int b = 0; b < e.batch; ++b)
    for (int t = 0; t < e.seq; ++t) positions.push_back(t);
  const auto* tokens = static_cast<const int32_t*>(e.file->view("input_ids").data);
  std::vector<float> logits(size_t(e.batch) * e.seq * size_t(model.config().vocab));
  model.forward_logits(Batch{e.batch, e.seq, tokens, nullptr, positions.data(), nullptr}, logits.data());
  return logits;
}

// A merge stores the merged weights in the base's bf16: each weight rounds by up to 2^-9 of itself,
// which moved these logits by 3.7e-3 (relative norm); without the adapter they are over 5e-2 away.
constexpr double kMergedBound = 1e-2;

}  // namespace

TEST(GoldenArch, Qwen2GgufExportsAdapterAndMerge) {
  const Expected e = load_expected("qwen2_expected.safetensors");
  const io::LoadedModel base = io::load_model(kDir + "qwen2.gguf", true, io::QuantMode::Keep);
  LlamaModel model(gguf_weights("qwen2.gguf"), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "qwen2 GGUF");
  const LlamaConfig& c = model.config();

  // The adapter names the base's architecture, and B keeps the base's (HF's) q/k rows.
  const std::string adapter = temp_path("qwen2_lora.gguf");
  io::export_gguf_lora(adapter, model.lora(), c);
  const io::GgufFile a = io::GgufFile::open(adapter);
  EXPECT_EQ(a.get_string("general.architecture"), "qwen2");
  const LoraAdapter& q = model.lora().at(1, LoraTarget::Q);
  const io::GgufTensorInfo& b = a.tensor(io::gguf_lora_tensor_name(1, LoraTarget::Q, true));
  ASSERT_EQ(b.n_bytes, size_t(q.out) * q.rank * sizeof(float));
  EXPECT_EQ(std::memcmp(b.data, q.B, b.n_bytes), 0);

  // The merged GGUF without an adapter computes the adapted model's logits.
  const std::string merged = temp_path("qwen2_merged.gguf");
  io::export_merged_gguf(merged, *base.gguf, model.lora(), c.rope_layout, io::MergedGgufOptions{});
  const size_t n = size_t(e.batch) * e.seq * size_t(c.vocab);
  const std::vector<float> got = plain_logits(io::load_model(merged, true, io::QuantMode::Keep).weights, e);
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), n), kMergedBound);
  const std::vector<float> unadapted = plain_logits(gguf_weights("qwen2.gguf"), e);
  EXPECT_GT(test::rel_norm_error(unadapted.data(), f32(e, "logits"), n), 5 * kMergedBound);
  std::filesystem::remove_all(std::filesystem::path(merged).parent_path());
}

TEST(GoldenArch, RopeFreqsGgufMergesIntoAnHfDirectoryWithLlama3Scaling) {
  const Expected e = load_expected("llama_llama3_expected.safetensors");
  LlamaModel model(gguf_weights("llama_llama3.gguf"), e.lora, CheckpointPolicy::None,
                   int64_t(e.batch) * e.seq);
  check(model, e, "llama3 GGUF");
  const std::string dir = temp_path("llama3_merged");
  io::export_merged_hf(dir, model.weights(), model.lora());
  // config.json spells the factors as the llama3 parameters of config_llama3.json.
  const LlamaConfig merged = io::read_hf_config(dir + "/config.json");
  const LlamaConfig want = io::read_hf_config(kDir + "llama/config_llama3.json");
  EXPECT_EQ(merged.rope.scaling, RopeScalingType::Llama3);
  EXPECT_EQ(merged.rope.factor, want.rope.factor);
  EXPECT_EQ(merged.rope.low_freq_factor, want.rope.low_freq_factor);
  EXPECT_EQ(merged.rope.high_freq_factor, want.rope.high_freq_factor);
  EXPECT_EQ(merged.rope.original_max_positions, want.rope.original_max_positions);
  const std::vector<float> got = plain_logits(io::load_hf_model(dir, io::QuantMode::Keep), e);
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), got.size()), kMergedBound);
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}

TEST(GoldenArch, Gemma3ExportsPeftGgufLoraAndMergedHfWithTheFilesNorms) {
  const Expected e = load_expected("gemma3_expected.safetensors");
  LlamaModel model(hf_weights("gemma3", "config.json"), e.lora, CheckpointPolicy::None,
                   int64_t(e.batch) * e.seq);
  check(model, e, "gemma3 HF");
  const LlamaConfig& c = model.config();

  // PEFT names the projections as for Llama; the GGUF adapter names llama.cpp's gemma3 tensors and
  // keeps HF's q/k rows (neox rope).
  EXPECT_EQ(io::peft_tensor_name(5, LoraTarget::Q, false),
            "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight");
  const std::string adapter = temp_path("gemma3_lora.gguf");
  io::export_gguf_lora(adapter, model.lora(), c);
  const io::GgufFile a = io::GgufFile::open(adapter);
  EXPECT_EQ(a.get_string("general.architecture"), "gemma3");
  const LoraAdapter& k = model.lora().at(5, LoraTarget::K);
  const io::GgufTensorInfo& b = a.tensor(io::gguf_lora_tensor_name(5, LoraTarget::K, true));
  EXPECT_EQ(b.name, "blk.5.attn_k.weight.lora_b");
  ASSERT_EQ(b.n_bytes, size_t(k.out) * k.rank * sizeof(float));
  EXPECT_EQ(std::memcmp(b.data, k.B, b.n_bytes), 0);

  // The merged directory holds w where the model holds 1 + w: every norm as the file stores it.
  const std::string dir = temp_path("gemma3_merged");
  io::export_merged_hf(dir, model.weights(), model.lora());
  const io::SafetensorsModel merged = io::SafetensorsModel::open(dir);
  const io::SafetensorsModel original = io::SafetensorsModel::open(kDir + "gemma3");
  int norms = 0;
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    if (!is_norm_slot(s)) return;
    const std::string name = hf_weight_name(c, s, layer);
    const io::SafetensorsTensor &got = merged.get(name), &want = original.get(name);
    ASSERT_EQ(got.dtype, want.dtype) << name;
    ASSERT_EQ(got.bytes.size(), want.bytes.size()) << name;
    EXPECT_EQ(std::memcmp(got.bytes.data(), want.bytes.data(), got.bytes.size()), 0) << name;
    ++norms;
  });
  EXPECT_EQ(norms, 6 * 6 + 1);  // input, q, k, post-attention, pre- and post-feedforward; final
  const LlamaConfig back = io::read_hf_config(dir + "/config.json");
  EXPECT_EQ(back.architecture, "gemma3");
  EXPECT_EQ(back.sliding_layers, c.sliding_layers);
  EXPECT_EQ(back.sliding_window, c.sliding_window);
  EXPECT_EQ(back.rope_local.theta, c.rope_local.theta);
  EXPECT_EQ(back.rope.theta, c.rope.theta);
  EXPECT_EQ(back.rope.scaling, c.rope.scaling);
  EXPECT_EQ(back.rope.factor, c.rope.factor);
  EXPECT_EQ(back.attention_scale(0), c.attention_scale(0));
  const std::vector<float> got = plain_logits(io::load_hf_model(dir, io::QuantMode::Keep), e);
  // The merged weights round to bf16 as in kMergedBound's case, over six layers: these logits moved
  // by 2.1e-2 (relative norm), where without the adapter they are 0.67 away.
  const double bound = 5e-2;
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), got.size()), bound);
  const std::vector<float> unadapted = plain_logits(hf_weights("gemma3", "config.json"), e);
  EXPECT_GT(test::rel_norm_error(unadapted.data(), f32(e, "logits"), got.size()), 5 * bound);
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}

TEST(GoldenArch, Gemma2ExportsGgufLoraAndMergedHfWithItsCaps) {
  const Expected e = load_expected("gemma2_expected.safetensors");
  LlamaModel model(hf_weights("gemma2", "config.json"), e.lora, CheckpointPolicy::None,
                   int64_t(e.batch) * e.seq);
  check(model, e, "gemma2 HF");
  const LlamaConfig& c = model.config();

  // llama.cpp's gemma2 names, B in HF's q/k rows (neox rope).
  const std::string adapter = temp_path("gemma2_lora.gguf");
  io::export_gguf_lora(adapter, model.lora(), c);
  const io::GgufFile a = io::GgufFile::open(adapter);
  EXPECT_EQ(a.get_string("general.architecture"), "gemma2");
  const LoraAdapter& q = model.lora().at(3, LoraTarget::Q);
  const io::GgufTensorInfo& b = a.tensor(io::gguf_lora_tensor_name(3, LoraTarget::Q, true));
  ASSERT_EQ(b.n_bytes, size_t(q.out) * q.rank * sizeof(float));
  EXPECT_EQ(std::memcmp(b.data, q.B, b.n_bytes), 0);

  // The merged directory: w where the model holds 1 + w, and a Gemma2Config with the caps and the
  // layers' kinds, which loads back as the model it was.
  const std::string dir = temp_path("gemma2_merged");
  io::export_merged_hf(dir, model.weights(), model.lora());
  const io::SafetensorsModel merged = io::SafetensorsModel::open(dir);
  const io::SafetensorsModel original = io::SafetensorsModel::open(kDir + "gemma2");
  int norms = 0;
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    if (!is_norm_slot(s)) return;
    const std::string name = hf_weight_name(c, s, layer);
    const io::SafetensorsTensor &got = merged.get(name), &want = original.get(name);
    ASSERT_EQ(got.bytes.size(), want.bytes.size()) << name;
    EXPECT_EQ(std::memcmp(got.bytes.data(), want.bytes.data(), got.bytes.size()), 0) << name;
    ++norms;
  });
  EXPECT_EQ(norms, 4 * 4 + 1);  // input, post-attention, pre- and post-feedforward; final
  const LlamaConfig back = io::read_hf_config(dir + "/config.json");
  EXPECT_EQ(back.architecture, "gemma2");
  EXPECT_EQ(back.sliding_layers, c.sliding_layers);
  EXPECT_EQ(back.sliding_window, c.sliding_window);
  EXPECT_EQ(back.attn_softcap, c.attn_softcap);
  EXPECT_EQ(back.final_softcap, c.final_softcap);
  EXPECT_EQ(back.attention_scale(0), c.attention_scale(0));
  const std::vector<float> got = plain_logits(io::load_hf_model(dir, io::QuantMode::Keep), e);
  // The merged weights round to bf16 (kMergedBound's case) over four layers; without the adapter
  // the logits are far further away, which the second check pins.
  const double bound = 5e-2;
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), got.size()), bound);
  const std::vector<float> unadapted = plain_logits(hf_weights("gemma2", "config.json"), e);
  EXPECT_GT(test::rel_norm_error(unadapted.data(), f32(e, "logits"), got.size()), 5 * bound);
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}

TEST(GoldenArch, Qwen3ExportsGgufLoraAndMergesInBothForms) {
  const Expected e = load_expected("qwen3_expected.safetensors");
  const io::LoadedModel base = io::load_model(kDir + "qwen3.gguf", true, io::QuantMode::Keep);
  LlamaModel model(gguf_weights("qwen3.gguf"), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "qwen3 GGUF");
  const LlamaConfig& c = model.config();

  // llama.cpp's qwen3 names, and B in HF's q/k rows (neox rope: no permutation).
  const std::string adapter = temp_path("qwen3_lora.gguf");
  io::export_gguf_lora(adapter, model.lora(), c);
  const io::GgufFile a = io::GgufFile::open(adapter);
  EXPECT_EQ(a.get_string("general.architecture"), "qwen3");
  const LoraAdapter& q = model.lora().at(1, LoraTarget::Q);
  const io::GgufTensorInfo& b = a.tensor(io::gguf_lora_tensor_name(1, LoraTarget::Q, true));
  ASSERT_EQ(b.n_bytes, size_t(q.out) * q.rank * sizeof(float));
  EXPECT_EQ(std::memcmp(b.data, q.B, b.n_bytes), 0);

  // Both merges, loaded without an adapter, compute the adapted model's logits; they keep the q/k
  // norms (as the GGUF's attn_q_norm / attn_k_norm and the HF directory's q_norm / k_norm).
  const size_t n = size_t(e.batch) * e.seq * size_t(c.vocab);
  const std::string merged = temp_path("qwen3_merged.gguf");
  io::export_merged_gguf(merged, *base.gguf, model.lora(), c.rope_layout, io::MergedGgufOptions{});
  const LlamaWeights from_gguf = io::load_model(merged, true, io::QuantMode::Keep).weights;
  EXPECT_TRUE(from_gguf.config.qk_norm);
  std::vector<float> got = plain_logits(io::load_model(merged, true, io::QuantMode::Keep).weights, e);
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), n), kMergedBound);
  const std::string dir = temp_path("qwen3_merged_hf");
  io::export_merged_hf(dir, model.weights(), model.lora());
  const LlamaConfig hf = io::read_hf_config(dir + "/config.json");
  EXPECT_EQ(hf.architecture, "qwen3");
  EXPECT_TRUE(hf.qk_norm);
  EXPECT_EQ(hf.head_dim, c.head_dim);
  got = plain_logits(io::load_hf_model(dir, io::QuantMode::Keep), e);
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), n), kMergedBound);
  const std::vector<float> unadapted = plain_logits(gguf_weights("qwen3.gguf"), e);
  EXPECT_GT(test::rel_norm_error(unadapted.data(), f32(e, "logits"), n), 5 * kMergedBound);
  std::filesystem::remove_all(std::filesystem::path(merged).parent_path());
}

TEST(GoldenArch, Gemma3GgufMergesWithItsStoredNorms) {
  // llama.cpp's file holds 1 + w, as the model does: a merged GGUF copies the norms as they are.
  const Expected e = load_expected("gemma3_expected.safetensors");
  const io::LoadedModel base = io::load_model(kDir + "gemma3.gguf", true, io::QuantMode::Keep);
  LlamaModel model(gguf_weights("gemma3.gguf"), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "gemma3 GGUF");
  const std::string merged = temp_path("gemma3_merged.gguf");
  io::export_merged_gguf(merged, *base.gguf, model.lora(), model.config().rope_layout,
                         io::MergedGgufOptions{});
  const io::GgufFile f = io::GgufFile::open(merged);
  for (const char* name : {"blk.3.post_ffw_norm.weight", "blk.5.attn_q_norm.weight", "output_norm.weight"}) {
    const io::GgufTensorInfo &got = f.tensor(name), &want = base.gguf->tensor(name);
    ASSERT_EQ(got.n_bytes, want.n_bytes) << name;
    EXPECT_EQ(std::memcmp(got.data, want.data, got.n_bytes), 0) << name;
  }
  const std::vector<float> got = plain_logits(io::load_model(merged, true, io::QuantMode::Keep).weights, e);
  // As the merged HF directory's bound (GoldenArch.Gemma3Exports...): bf16 rounding over six layers.
  EXPECT_LT(test::rel_norm_error(got.data(), f32(e, "logits"), got.size()), 5e-2);
  std::filesystem::remove_all(std::filesystem::path(merged).parent_path());
}

// Gemma3ForConditionalGeneration: the fixture's text model under either prefix, with a vision
// tensor beside it and its config as text_config (Gemma3TextConfig's defaults filling the rest),
// loads as the text model and computes its logits, loss and gradients.
TEST(GoldenArch, Gemma3ConditionalGenerationLoadsItsTextModel) {
  const io::SafetensorsModel text = io::SafetensorsModel::open(kDir + "gemma3");
  nlohmann::json cfg;
  std::ifstream(kDir + "gemma3/config.json") >> cfg;
  cfg.erase("architectures");
  const std::vector<float> vision(16, 0.5f);
  for (const std::string prefix : {"language_model.model.", "model.language_model."}) {
    SCOPED_TRACE(prefix);
    const std::string dir = temp_path("gemma3_multimodal");
    std::filesystem::create_directories(dir);
    std::vector<io::SafetensorsWriteTensor> tensors;
    for (const std::string& name : text.names())
      tensors.push_back(io::SafetensorsWriteTensor::from_view(text.view(name), prefix + name.substr(6)));
    tensors.push_back({"vision_tower.vision_model.post_layernorm.weight",
                       io::StDType::F32,
                       {16},
                       std::as_bytes(std::span(vision))});
    io::write_safetensors(dir + "/model.safetensors", tensors);
    const nlohmann::json top = {{"architectures", {"Gemma3ForConditionalGeneration"}},
                                {"model_type", "gemma3"},
                                {"text_config", cfg},
                                {"vision_config", {{"model_type", "siglip_vision_model"}}}};
    std::ofstream(dir + "/config.json") << top.dump(2);
    const LlamaWeights w = io::load_hf_model(dir, io::QuantMode::Keep);
    EXPECT_EQ(w.config.architecture, "gemma3");
    EXPECT_EQ(w.config.sliding_layers, hf_weights("gemma3", "config.json").config.sliding_layers);
    golden(io::load_hf_model(dir, io::QuantMode::Keep), "gemma3_expected.safetensors", "gemma3 multimodal");
    std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
  }
  // What the shipped configs leave out is Gemma3TextConfig's default.
  const LlamaConfig sparse = io::llama_config_from_hf(
      {{"architectures", {"Gemma3ForConditionalGeneration"}},
       {"text_config", {{"hidden_size", 2560}, {"intermediate_size", 10240}, {"num_hidden_layers", 34}}}},
      "config.json");
  EXPECT_EQ(sparse.n_heads, 8);
  EXPECT_EQ(sparse.n_kv_heads, 4);
  EXPECT_EQ(sparse.head_dim, 256);
  EXPECT_EQ(sparse.vocab, 262208);
  EXPECT_EQ(sparse.sliding_window, 4096);
  EXPECT_EQ(sparse.window(5), 0);
}
