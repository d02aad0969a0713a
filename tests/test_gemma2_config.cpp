// Tests: a Gemma 2 config.json as a LlamaConfig (io::llama_config_from_hf): transformers'
// Gemma2Config defaults for what a config leaves out (caps 50 and 30, window 4096 on the even
// layers, head_dim 256, tied), layer_types and null caps read as written, and the refusals by name
// of what tightfit does not run (the first Gemma, a bidirectional Gemma 2, a capped Gemma 3).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "src/core/error.h"
#include "src/io/hf_model.h"
#include "src/model/config.h"

namespace tf {
namespace {

using nlohmann::json;

json gemma2_config() {
  return {{"architectures", {"Gemma2ForCausalLM"}},
          {"hidden_size", 64},
          {"intermediate_size", 128},
          {"num_hidden_layers", 5},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"vocab_size", 100}};
}

std::string refusal(const json& j) {
  try {
    io::llama_config_from_hf(j, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Gemma2Config, DefaultsAreGemma2Configs) {
  const LlamaConfig c = io::llama_config_from_hf(gemma2_config(), "config.json");
  EXPECT_EQ(c.architecture, "gemma2");
  EXPECT_EQ(c.attn_softcap, 50.0f);
  EXPECT_EQ(c.final_softcap, 30.0f);
  EXPECT_EQ(c.head_dim, 256);
  EXPECT_TRUE(c.tie_embeddings && c.sandwich_norms);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_FALSE(c.has_local_rope());
  EXPECT_EQ(c.activation, MlpActivation::GeluTanh);
  EXPECT_EQ(c.embed_scale, 8.0f);
  EXPECT_EQ(c.query_pre_attn_scalar, 256.0f);
  EXPECT_EQ(c.rope.theta, 10000.0f);
  // transformers: layer i slides when (i + 1) % 2 is 1.
  for (int l = 0; l < 5; ++l) EXPECT_EQ(c.window(l), l % 2 == 0 ? 4096 : 0) << l;
}

TEST(Gemma2Config, ReadsLayerTypesNullCapsAndTheModelType) {
  json j = gemma2_config();
  j.erase("architectures");
  j["model_type"] = "gemma2";
  j["layer_types"] = {"full_attention", "sliding_attention", "sliding_attention", "full_attention",
                      "full_attention"};
  j["sliding_window"] = 7;
  j["attn_logit_softcapping"] = nullptr;
  j["final_logit_softcapping"] = 12.5;
  const LlamaConfig c = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(c.architecture, "gemma2");
  EXPECT_EQ(c.attn_softcap, 0.0f);
  EXPECT_EQ(c.final_softcap, 12.5f);
  const int want[] = {0, 7, 7, 0, 0};
  for (int l = 0; l < 5; ++l) EXPECT_EQ(c.window(l), want[l]) << l;
}

TEST(Gemma2Config, RefusesWhatItDoesNotRunByName) {
  json j = gemma2_config();
  j["attn_logit_softcapping"] = -1.0;
  EXPECT_NE(refusal(j).find("\"attn_logit_softcapping\" must be positive or null"), std::string::npos)
      << refusal(j);
  j = gemma2_config();
  j["use_bidirectional_attention"] = true;
  EXPECT_NE(refusal(j).find("use_bidirectional_attention is set"), std::string::npos) << refusal(j);
  j = gemma2_config();
  j["architectures"] = {"GemmaForCausalLM"};
  EXPECT_NE(refusal(j).find("\"GemmaForCausalLM\" (the first Gemma) is not supported"), std::string::npos)
      << refusal(j);
  j = gemma2_config();
  j["architectures"] = {"Gemma3ForCausalLM"};
  j["attn_logit_softcapping"] = 50.0;
  EXPECT_NE(refusal(j).find("\"attn_logit_softcapping\" is set"), std::string::npos) << refusal(j);
}

}  // namespace
}  // namespace tf
