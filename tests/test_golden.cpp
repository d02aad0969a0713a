// The model against PyTorch + PEFT: tools/make_golden.py ran a tiny LlamaForCausalLM with a LoRA
// adapter on all seven projections in float64 and stored weights, inputs, logits, loss and every
// LoRA gradient (rounded to f32). Our f32 forward and backward must reproduce them.
// tools/make_sliding_golden.py did the same for a tiny MistralForCausalLM (window 5 in every layer)
// and Qwen2ForCausalLM (window 7 in layers 1 and 2 of 3) with GQA ratio 3 over 24 tokens, storing the
// config transformers wrote: training, recomputation and KV-cache decoding past the window must
// reproduce them (a window off by one key or ignored moves the logits by 1e-2 or more; the fixtures'
// window_max_logit_change is 1.6 and 2.8).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "op_test_util.h"
#include "src/io/hf_model.h"
#include "src/model/llama.h"

using namespace tf;

namespace {

struct Golden {
  std::shared_ptr<const io::SafetensorsModel> file;
  LlamaConfig config;
  LoraConfig lora;
  int batch = 0, seq = 0;
};

Golden load(const std::string& name) {
  Golden g;
  g.file = std::make_shared<const io::SafetensorsModel>(
      io::SafetensorsModel::open(std::string(TIGHTFIT_FIXTURES) + "/" + name));
  const auto& meta = g.file->shards().at(0).metadata();
  if (meta.count("config")) {
    // make_sliding_golden.py stores the config.json transformers wrote, read as a model directory's.
    g.config = io::llama_config_from_hf(nlohmann::json::parse(meta.at("config")), name);
  } else {
    nlohmann::json j;
    j["architectures"] = {"LlamaForCausalLM"};
    for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"})
      j[key] = std::stoi(meta.at(key));
    j["rms_norm_eps"] = std::stod(meta.at("rms_norm_eps"));
    j["rope_theta"] = std::stod(meta.at("rope_theta"));
    j["tie_word_embeddings"] = meta.at("tie_word_embeddings") == "true";
    if (meta.at("rope_scaling") != "none") j["rope_scaling"] = nlohmann::json::parse(meta.at("rope_scaling"));
    g.config = io::llama_config_from_hf(j, name);
  }
  g.lora.rank = std::stoi(meta.at("lora_r"));
  g.lora.alpha = std::stof(meta.at("lora_alpha"));
  g.lora.targets = parse_lora_targets(meta.at("lora_targets"));
  const io::SafetensorsTensor& ids = g.file->get("input_ids");
  g.batch = int(ids.shape[0]);
  g.seq = int(ids.shape[1]);
  return g;
}

std::string lora_name(int layer, LoraTarget t, const char* which) {
  const bool attn = t == LoraTarget::Q || t == LoraTarget::K || t == LoraTarget::V || t == LoraTarget::O;
  return "model.layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + lora_target_name(t) +
         ".lora_" + which + ".weight";
}

const float* f32(const Golden& g, const std::string& name) {
  return static_cast<const float*>(g.file->view(name).data);
}

// The model of the reference's weights with its adapters.
LlamaModel make_model(const Golden& g, CheckpointPolicy policy) {
  LlamaModel model(io::weights_from_safetensors(g.file, g.config), g.lora, policy, int64_t(g.batch) * g.seq);
  for (int l = 0; l < g.config.n_layers; ++l)
    for (int t = 0; t < kLoraTargetCount; ++t) {
      LoraAdapter& a = model.lora().at(l, LoraTarget(t));
      std::copy_n(f32(g, lora_name(l, LoraTarget(t), "A")), int64_t(a.rank) * a.in, a.A);
      std::copy_n(f32(g, lora_name(l, LoraTarget(t), "B")), int64_t(a.rank) * a.out, a.B);
    }
  return model;
}

void run_golden(const std::string& fixture, CheckpointPolicy policy) {
  const Golden g = load(fixture);
  const int batch = g.batch, seq = g.seq;
  LlamaModel model = make_model(g, policy);
  LoraState& lora = model.lora();

  const auto* tokens = static_cast<const int32_t*>(g.file->view("input_ids").data);
  const auto* labels = static_cast<const int32_t*>(g.file->view("labels").data);
  std::vector<int32_t> targets, positions;
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < seq; ++t) {
      targets.push_back(t + 1 < seq ? labels[b * seq + t + 1] : kIgnoreIndex);  // HF shifts labels by one
      positions.push_back(t);
    }
  const Batch batch_view{batch, seq, tokens, targets.data(), positions.data(), nullptr};

  // The reference is float64 rounded to f32; ours is f32 throughout. make_golden.py measured HF's
  // own f32 run at ~5e-7 (logits) and ~1e-6 (gradients) from float64, so 1e-5 and 1e-4 leave a 10x
  // margin for a different but equally valid f32 summation order, while any wrong term (a missing
  // norm weight, a rope pairing, a mask) moves the results by 1e-2 or more.
  const size_t n_logits = size_t(batch) * seq * size_t(g.config.vocab);
  std::vector<float> logits(n_logits);
  model.forward_logits(batch_view, logits.data());
  EXPECT_LT(test::rel_norm_error(logits.data(), f32(g, "logits"), n_logits), 1e-5) << fixture;

  lora.zero_grads();
  const int64_t n_targets = std::stoi(g.file->shards().at(0).metadata().at("n_targets"));
  const LossSum loss = model.forward_backward(batch_view, 1.0f / float(n_targets), 0);
  ASSERT_EQ(loss.n_valid, n_targets);
  const double want = f32(g, "loss")[0];
  EXPECT_LT(std::abs(loss.mean() - want) / want, 1e-5)
      << fixture << " loss " << loss.mean() << " vs " << want;

  for (int l = 0; l < g.config.n_layers; ++l)
    for (int t = 0; t < kLoraTargetCount; ++t) {
      const LoraAdapter& a = lora.at(l, LoraTarget(t));
      const std::string na = lora_name(l, LoraTarget(t), "A"), nb = lora_name(l, LoraTarget(t), "B");
      EXPECT_LT(test::rel_norm_error(a.dA, f32(g, na + ".grad"), size_t(a.rank) * a.in), 1e-4)
          << fixture << " " << na;
      EXPECT_LT(test::rel_norm_error(a.dB, f32(g, nb + ".grad"), size_t(a.rank) * a.out), 1e-4)
          << fixture << " " << nb;
    }
}

// Decoding each sequence with the KV cache (a 3-token prefill, then one token at a time, far past
// the window) gives transformers' logits at every position, within the training forward's bound
// per position.
void run_decode(const std::string& fixture) {
  const Golden g = load(fixture);
  LlamaModel model = make_model(g, CheckpointPolicy::None);
  const auto* tokens = static_cast<const int32_t*>(g.file->view("input_ids").data);
  const size_t V = size_t(g.config.vocab);
  std::vector<float> logits(V);
  for (int b = 0; b < g.batch; ++b) {
    KvCache cache = model.make_kv_cache(g.seq);
    const int prefill = 3;
    for (int t = prefill - 1; t < g.seq; ++t) {
      if (t == prefill - 1) {
        model.decode(cache, tokens + b * g.seq, prefill, logits.data());
      } else {
        model.decode(cache, tokens + b * g.seq + t, 1, logits.data());
      }
      const float* want = f32(g, "logits") + (size_t(b) * g.seq + t) * V;
      EXPECT_LT(test::rel_norm_error(logits.data(), want, V), 1e-5)
          << fixture << " sequence " << b << " position " << t;
    }
  }
}

}  // namespace

TEST(Golden, MatchesPytorchAndPeft) {
  run_golden("golden_tiny.safetensors", CheckpointPolicy::None);
}
TEST(Golden, MatchesWithCheckpointing) {
  run_golden("golden_tiny.safetensors", CheckpointPolicy::PerBlock);
}
TEST(Golden, MatchesWithLlama3RopeScaling) {
  run_golden("golden_tiny_llama3.safetensors", CheckpointPolicy::None);
}

TEST(GoldenSliding, MistralMatchesTransformers) {
  run_golden("golden_mistral_sliding.safetensors", CheckpointPolicy::None);
}
TEST(GoldenSliding, MistralMatchesWithCheckpointing) {
  run_golden("golden_mistral_sliding.safetensors", CheckpointPolicy::PerBlock);
}
TEST(GoldenSliding, MistralDecodesPastTheWindow) {
  run_decode("golden_mistral_sliding.safetensors");
}
TEST(GoldenSliding, Qwen2MatchesTransformers) {
  run_golden("golden_qwen2_sliding.safetensors", CheckpointPolicy::None);
}
TEST(GoldenSliding, Qwen2MatchesWithCheckpointing) {
  run_golden("golden_qwen2_sliding.safetensors", CheckpointPolicy::PerBlock);
}
TEST(GoldenSliding, Qwen2DecodesPastTheWindow) {
  run_decode("golden_qwen2_sliding.safetensors");
}

// The configs transformers wrote give the windows per layer its models use.
TEST(GoldenSliding, ConfigsGiveEachLayersWindow) {
  const Golden m = load("golden_mistral_sliding.safetensors");
  EXPECT_EQ(m.config.architecture, "mistral");
  EXPECT_EQ(m.config.window(0), 5);
  EXPECT_EQ(m.config.window(1), 5);
  const Golden q = load("golden_qwen2_sliding.safetensors");
  EXPECT_EQ(q.config.architecture, "qwen2");
  EXPECT_EQ(q.config.window(0), 0);
  EXPECT_EQ(q.config.window(1), 7);
  EXPECT_EQ(q.config.window(2), 7);
}
