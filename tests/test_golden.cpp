// The model against PyTorch + PEFT: tools/make_golden.py ran a tiny LlamaForCausalLM with a LoRA
// adapter on all seven projections in float64 and stored weights, inputs, logits, loss and every
// LoRA gradient (rounded to f32). Our f32 forward and backward must reproduce them.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "op_test_util.h"
#include "src/io/hf_model.h"
#include "src/model/llama.h"

using namespace tf;

namespace {

struct Golden {
  std::shared_ptr<const io::SafetensorsModel> file;
  LlamaConfig config;
  LoraConfig lora;
};

Golden load(const std::string& name) {
  Golden g;
  g.file = std::make_shared<const io::SafetensorsModel>(
      io::SafetensorsModel::open(std::string(TIGHTFIT_FIXTURES) + "/" + name));
  const auto& meta = g.file->shards().at(0).metadata();
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
  g.lora.rank = std::stoi(meta.at("lora_r"));
  g.lora.alpha = std::stof(meta.at("lora_alpha"));
  g.lora.targets = parse_lora_targets(meta.at("lora_targets"));
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

void run_golden(const std::string& fixture, CheckpointPolicy policy) {
  const Golden g = load(fixture);
  const io::SafetensorsTensor& ids = g.file->get("input_ids");
  const int batch = int(ids.shape[0]), seq = int(ids.shape[1]);
  LlamaModel model(io::weights_from_safetensors(g.file, g.config), g.lora, policy, int64_t(batch) * seq);
  LoraState& lora = model.lora();
  for (int l = 0; l < g.config.n_layers; ++l)
    for (int t = 0; t < kLoraTargetCount; ++t) {
      LoraAdapter& a = lora.at(l, LoraTarget(t));
      std::copy_n(f32(g, lora_name(l, LoraTarget(t), "A")), int64_t(a.rank) * a.in, a.A);
      std::copy_n(f32(g, lora_name(l, LoraTarget(t), "B")), int64_t(a.rank) * a.out, a.B);
    }

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
