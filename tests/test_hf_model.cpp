// HF model directories saved by transformers (tools/make_hf_fixture.py): our loader and model give
// transformers' logits and greedy continuation; config.json parsing and its refusals.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "op_test_util.h"
#include "src/core/error.h"
#include "src/io/hf_model.h"
#include "src/io/safetensors.h"
#include "src/model/generate.h"

using namespace tf;

namespace {

LoraConfig inert_lora() {
  LoraConfig l;
  l.rank = 1;
  l.targets = parse_lora_targets("q");
  return l;
}

void check_against_transformers(const std::string& name) {
  const std::string dir = std::string(TIGHTFIT_FIXTURES) + "/hf_tiny_" + name;
  const auto expected = io::SafetensorsFile::open(dir + "_expected.safetensors");
  const auto* ids = static_cast<const int32_t*>(expected.view("input_ids").data);
  const int64_t n = expected.get("input_ids").shape[0];
  LlamaModel model(io::load_hf_model(dir), inert_lora(), CheckpointPolicy::None, n);
  const int vocab = model.config().vocab;

  std::vector<int32_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(i);
  std::vector<float> logits(size_t(n * vocab));
  model.forward_logits(Batch{1, int(n), ids, nullptr, pos.data(), nullptr}, logits.data());
  // transformers ran the same f32 maths; the summation order differs (~1e-6 relative), while a
  // wrong weight mapping, bias or rope moves logits by O(1).
  EXPECT_LT(test::rel_norm_error(logits.data(), static_cast<const float*>(expected.view("logits").data),
                                 logits.size()),
            1e-4)
      << name;

  const std::vector<int32_t> prompt(ids, ids + n);
  const std::vector<int32_t> got = generate_tokens(model, prompt, 16, /*stop_ids=*/{}, /*n_tokens=*/vocab);
  const auto* want = static_cast<const int32_t*>(expected.view("greedy").data);
  EXPECT_EQ(got, std::vector<int32_t>(want, want + 16)) << name;
}

nlohmann::json llama_json() {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"hidden_size", 64},
          {"intermediate_size", 128},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"vocab_size", 256}};
}

void expect_error(const nlohmann::json& j, const std::string& needle) {
  try {
    io::llama_config_from_hf(j, "config.json");
    ADD_FAILURE() << "accepted " << j.dump();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(HfModel, LlamaBf16TiedMatchesTransformers) {
  check_against_transformers("llama");
}
TEST(HfModel, Qwen2WithBiasesMatchesTransformers) {
  check_against_transformers("qwen2");
}

TEST(HfConfig, ReadsArchitecturesAndRopeSpellings) {
  nlohmann::json j = llama_json();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  j["rope_theta"] = 500000.0;
  LlamaConfig c = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(c.rope.scaling, RopeScalingType::Llama3);
  EXPECT_FLOAT_EQ(c.rope.theta, 500000.0f);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_FALSE(c.attention_bias);

  nlohmann::json q = llama_json();
  q["architectures"] = {"Qwen2ForCausalLM"};
  q["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  c = io::llama_config_from_hf(q, "config.json");
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FLOAT_EQ(c.rope.theta, 1e6f);
  EXPECT_EQ(c.architecture, "qwen2");

  nlohmann::json m = llama_json();
  m["architectures"] = {"MistralForCausalLM"};
  EXPECT_EQ(io::llama_config_from_hf(m, "config.json").architecture, "mistral");
}

TEST(HfConfig, ReadsEveryRopeScalingType) {
  nlohmann::json j = llama_json();
  j["max_position_embeddings"] = 4096;
  j["rope_scaling"] = {
      {"type", "yarn"},    {"factor", 4.0},           {"original_max_position_embeddings", 1024},
      {"beta_fast", 16.0}, {"attention_factor", 1.5}, {"truncate", false}};
  RopeParams r = io::llama_config_from_hf(j, "config.json").rope;
  EXPECT_EQ(r.scaling, RopeScalingType::Yarn);
  EXPECT_EQ(r.factor, 4.0f);
  EXPECT_EQ(r.original_max_positions, 1024);
  EXPECT_EQ(r.beta_fast, 16.0f);
  EXPECT_EQ(r.beta_slow, 1.0f);
  EXPECT_EQ(r.attention_factor, 1.5f);
  EXPECT_FALSE(r.truncate);
  EXPECT_EQ(rope_attention_factor(r), 1.5f);

  // HF's standardize_rope_params: without the field yarn's original length is the config's own
  // original_max_position_embeddings, else max_position_embeddings; no factor is their ratio.
  j["rope_scaling"] = {{"rope_type", "yarn"}};
  j["original_max_position_embeddings"] = 512;
  r = io::llama_config_from_hf(j, "config.json").rope;
  EXPECT_EQ(r.original_max_positions, 512);
  EXPECT_EQ(r.factor, 8.0f);
  j.erase("original_max_position_embeddings");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 2.0}};
  EXPECT_EQ(io::llama_config_from_hf(j, "config.json").rope.original_max_positions, 4096);

  j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  r = io::llama_config_from_hf(j, "config.json").rope;
  EXPECT_EQ(r.scaling, RopeScalingType::Dynamic);
  EXPECT_EQ(r.original_max_positions, 4096);  // transformers' dynamic NTK starts past max_position_embeddings
  EXPECT_EQ(rope_attention_factor(r), 1.0f);
}

TEST(HfConfig, RefusesWhatItCannotRun) {
  nlohmann::json j = llama_json();
  j["architectures"] = {"GPT2LMHeadModel"};
  expect_error(j, "GPT2LMHeadModel");
  j = llama_json();
  j.erase("hidden_size");
  expect_error(j, "hidden_size");
  j = llama_json();
  j["num_key_value_heads"] = 3;
  expect_error(j, "multiple of key/value heads");
  j = llama_json();
  j["vocab_size"] = "many";
  expect_error(j, "vocab_size");
  j = llama_json();
  j["rope_scaling"] = {{"rope_type", "longrope"}, {"long_factor", {1.0}}, {"short_factor", {1.0}}};
  expect_error(j, "short_factor must list 8 factors (head_dim / 2)");
  j = llama_json();
  j["rope_scaling"] = {{"rope_type", "ntk-by-parts"}, {"factor", 4.0}};
  expect_error(j, "rope type \"ntk-by-parts\" is not supported");
  j = llama_json();
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"low_freq_factor", 1.0}};
  expect_error(j, "field \"low_freq_factor\" of rope type \"linear\"");
  j = llama_json();
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"extrapolation_factor", 1.0}};
  expect_error(j, "field \"extrapolation_factor\" of rope type \"yarn\"");
  j = llama_json();
  j["rope_scaling"] = {{"rope_type", "default"}, {"partial_rotary_factor", 0.5}};
  expect_error(j, "partial rotary");
  j = llama_json();
  j["partial_rotary_factor"] = 0.25;
  expect_error(j, "partial_rotary_factor");
  j = llama_json();
  j["hidden_size"] = int64_t(1) << 40;
  expect_error(j, "hidden_size");
  j = llama_json();
  j["mlp_bias"] = true;
  expect_error(j, "mlp_bias");
  EXPECT_THROW(io::read_hf_config("/nonexistent/config.json"), Error);
}
