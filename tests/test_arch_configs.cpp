// Tests: the Qwen3 and Gemma 3 fields of a config.json (io::llama_config_from_hf) and of a GGUF's
// metadata (io::llama_config_from_gguf) as transformers and llama.cpp read them: Gemma 3's layer
// pattern, its two rope bases in either spelling, its attention scale; the architectures and fields
// tightfit does not run refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "offload/cost_model.h"
#include "src/core/error.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"
#include "src/model/llama.h"
#include "tests/test_util.h"

using namespace tf;

namespace {

// The text config of gemma-3-4b as it ships (an older transformers' spelling), 6 of its 34 layers.
nlohmann::json gemma3_4b() {
  return {{"architectures", {"Gemma3ForCausalLM"}},
          {"hidden_size", 2560},
          {"intermediate_size", 10240},
          {"num_hidden_layers", 6},
          {"num_attention_heads", 8},
          {"num_key_value_heads", 4},
          {"head_dim", 256},
          {"vocab_size", 262208},
          {"hidden_activation", "gelu_pytorch_tanh"},
          {"query_pre_attn_scalar", 256},
          {"rope_theta", 1000000.0},
          {"rope_local_base_freq", 10000.0},
          {"rope_scaling", {{"factor", 8.0}, {"rope_type", "linear"}}},
          {"sliding_window", 1024},
          {"sliding_window_pattern", 6},
          {"final_logit_softcapping", nullptr},
          {"attn_logit_softcapping", nullptr}};
}

std::string error_of(const nlohmann::json& j) {
  return test::error_of([&] { io::llama_config_from_hf(j, "config.json"); });
}

TEST(ArchConfigs, Gemma3ShippedSpellingSlidesFiveInSixWithTheLocalBaseUnscaled) {
  const LlamaConfig c = io::llama_config_from_hf(gemma3_4b(), "config.json");
  EXPECT_EQ(c.architecture, "gemma3");
  EXPECT_TRUE(c.tie_embeddings);  // Gemma3TextConfig's default
  EXPECT_EQ(c.activation, MlpActivation::GeluTanh);
  EXPECT_EQ(c.embed_scale, std::sqrt(2560.0f));
  for (int l = 0; l < 5; ++l) {
    EXPECT_EQ(c.window(l), 1024) << l;
    EXPECT_EQ(c.rope_of(l).theta, 10000.0f) << l;
    EXPECT_EQ(c.rope_of(l).scaling, RopeScalingType::None) << l;
  }
  EXPECT_EQ(c.window(5), 0);
  EXPECT_EQ(c.rope_of(5).theta, 1000000.0f);
  EXPECT_EQ(c.rope_of(5).scaling, RopeScalingType::Linear);
  EXPECT_EQ(c.rope_of(5).factor, 8.0f);
  EXPECT_EQ(c.attention_scale(0), 1.0f / 16.0f);
}

TEST(ArchConfigs, Gemma3QueryPreAttnScalarSetsTheScaleNotTheHeadDim) {
  nlohmann::json j = gemma3_4b();
  j["head_dim"] = 128;
  j["query_pre_attn_scalar"] = 168;  // gemma-3-27b: hidden / heads
  const LlamaConfig c = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(c.attention_scale(0), 1.0f / std::sqrt(168.0f));
  EXPECT_EQ(c.attention_scale(5), 1.0f / std::sqrt(168.0f));
}

TEST(ArchConfigs, Gemma3RopeParametersPerLayerType) {
  nlohmann::json j = gemma3_4b();
  j.erase("rope_theta");
  j.erase("rope_local_base_freq");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"full_attention", {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 5e5}}},
                          {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 20000.0}}}};
  const LlamaConfig c = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(c.rope_of(0).theta, 20000.0f);
  EXPECT_EQ(c.rope_of(5).theta, 5e5f);
  EXPECT_EQ(c.rope_of(5).factor, 4.0f);
  j["rope_parameters"]["chunked_attention"] = {{"rope_type", "default"}};
  EXPECT_NE(error_of(j).find("rope_parameters key \"chunked_attention\" is not one of Gemma 3's layer types"),
            std::string::npos)
      << error_of(j);
}

// Gemma3TextConfig's final cap is optional: null (the released checkpoints) or absent, none; set, it
// caps as Gemma 2's does, and must be positive. The attention cap, which transformers ignores, is refused.
TEST(ArchConfigs, Gemma3SoftCapsOnlyWhereTheConfigSetsThem) {
  const LlamaConfig plain = io::llama_config_from_hf(gemma3_4b(), "config.json");
  EXPECT_EQ(plain.attn_softcap, 0.0f);
  EXPECT_EQ(plain.final_softcap, 0.0f);
  nlohmann::json j = gemma3_4b();
  j.erase("attn_logit_softcapping");
  j["final_logit_softcapping"] = 30.0;
  const LlamaConfig capped = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(capped.attn_softcap, 0.0f);
  EXPECT_EQ(capped.final_softcap, 30.0f);
  j["final_logit_softcapping"] = 0.0;
  EXPECT_NE(error_of(j).find("\"final_logit_softcapping\" must be positive or null, got 0"),
            std::string::npos)
      << error_of(j);
  j["final_logit_softcapping"] = 30.0;
  j["attn_logit_softcapping"] = 50.0;
  EXPECT_NE(
      error_of(j).find("\"attn_logit_softcapping\" is set (50.0); tightfit soft-caps attention scores for "
                       "Gemma2ForCausalLM only (transformers' Gemma 3 ignores the field"),
      std::string::npos)
      << error_of(j);
}

TEST(ArchConfigs, RefusesWhatItDoesNotRunByName) {
  nlohmann::json j = gemma3_4b();
  j["hidden_activation"] = "gelu";
  EXPECT_NE(error_of(j).find("hidden activation \"gelu\" is not supported for Gemma 3"), std::string::npos);
  j = gemma3_4b();
  j["use_bidirectional_attention"] = true;
  EXPECT_NE(error_of(j).find("use_bidirectional_attention is set"), std::string::npos);
  for (const char* arch : {"GemmaForCausalLM", "Qwen3MoeForCausalLM"}) {
    j = gemma3_4b();
    j["architectures"] = {arch};
    const std::string e = error_of(j);
    EXPECT_NE(e.find(arch), std::string::npos) << e;
    EXPECT_EQ(e.find("(supported:"), std::string::npos) << arch << " is refused for what it is: " << e;
  }
  j = {{"model_type", "qwen3"},  {"hidden_size", 64},        {"intermediate_size", 128},
       {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
       {"vocab_size", 256}};
  const LlamaConfig q = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(q.architecture, "qwen3");
  EXPECT_TRUE(q.qk_norm);
  EXPECT_EQ(q.head_dim, 128);  // Qwen3Config's default, not hidden / heads
}

// A tiny GGUF of `arch` (4 layers) with the given extra metadata, read back as a config.
LlamaConfig gguf_config(const test::TempDir& dir, const std::string& arch,
                        const std::function<void(io::GgufWriter&)>& add) {
  std::vector<uint16_t> embd(64 * 16);
  io::GgufWriter w;
  w.add_string("general.architecture", arch);
  w.add_u32(arch + ".embedding_length", 16);
  w.add_u32(arch + ".feed_forward_length", 40);
  w.add_u32(arch + ".block_count", 4);
  w.add_u32(arch + ".attention.head_count", 2);
  w.add_u32(arch + ".attention.head_count_kv", 1);
  w.add_u32(arch + ".attention.key_length", 4);
  w.add_f32(arch + ".attention.layer_norm_rms_epsilon", 1e-6f);
  w.add_tensor("token_embd.weight", GgmlType::F16, {16, 64}, embd.data(), embd.size() * 2);
  add(w);
  const std::string path = dir.str() + "/tiny.gguf";
  w.write(path);
  return io::llama_config_from_gguf(io::GgufFile::open(path));
}

TEST(ArchConfigs, Gemma3GgufPatternAndLocalBaseAsLlamaCppReadsThem) {
  const test::TempDir dir;
  // No pattern key: llama.cpp's 6, so all four layers slide; rope.freq_base_swa absent: 10000.
  LlamaConfig c = gguf_config(dir, "gemma3", [](io::GgufWriter& w) {
    w.add_u32("gemma3.attention.sliding_window", 3);
    w.add_f32("gemma3.rope.freq_base", 1e6f);
  });
  EXPECT_EQ(c.sliding_layers, (std::vector<bool>{true, true, true, true}));
  EXPECT_EQ(c.rope_of(0).theta, 10000.0f);
  EXPECT_TRUE(c.qk_norm && c.sandwich_norms);
  EXPECT_EQ(c.attention_scale(0), 0.5f);  // 1 / sqrt(key_length 4)
  c = gguf_config(dir, "gemma3", [](io::GgufWriter& w) {
    w.add_u32("gemma3.attention.sliding_window", 3);
    w.add_u32("gemma3.attention.sliding_window_pattern", 2);
    w.add_f32("gemma3.rope.freq_base_swa", 500.0f);
  });
  EXPECT_EQ(c.sliding_layers, (std::vector<bool>{true, false, true, false}));
  EXPECT_EQ(c.window(1), 0);
  EXPECT_EQ(c.rope_of(0).theta, 500.0f);
  EXPECT_EQ(c.rope_of(1).theta, 10000.0f);  // rope.freq_base's default
  const uint8_t pattern[] = {0, 1, 1, 0};
  c = gguf_config(dir, "gemma3", [&](io::GgufWriter& w) {
    w.add_u32("gemma3.attention.sliding_window", 3);
    io::GgufValue v;
    v.type = io::GgufValueType::Array;
    v.elem_type = io::GgufValueType::Bool;
    v.count = 4;
    v.raw = pattern;
    w.add_value("gemma3.attention.sliding_window_pattern", v);
  });
  EXPECT_EQ(c.sliding_layers, (std::vector<bool>{false, true, true, false}));
  EXPECT_EQ(gguf_config(dir, "gemma3", [](io::GgufWriter&) {}).final_softcap, 0.0f);
  const LlamaConfig capped = gguf_config(dir, "gemma3", [](io::GgufWriter& w) {
    w.add_f32("gemma3.final_logit_softcapping", 30);
    w.add_f32("gemma3.attn_logit_softcapping", 0);
  });
  EXPECT_EQ(capped.final_softcap, 30.0f);
  EXPECT_EQ(capped.attn_softcap, 0.0f);
  const std::string e = test::error_of([&] {
    gguf_config(dir, "gemma3", [](io::GgufWriter& w) { w.add_f32("gemma3.final_logit_softcapping", -5); });
  });
  EXPECT_NE(e.find("'gemma3.final_logit_softcapping' must be a positive finite number, got -5"),
            std::string::npos)
      << e;
  const std::string attn = test::error_of([&] {
    gguf_config(dir, "gemma3", [](io::GgufWriter& w) { w.add_f32("gemma3.attn_logit_softcapping", 50); });
  });
  EXPECT_NE(attn.find("gemma3.attn_logit_softcapping is set"), std::string::npos) << attn;
  const std::string moe = test::error_of([&] { gguf_config(dir, "qwen3moe", [](io::GgufWriter&) {}); });
  EXPECT_NE(moe.find("'qwen3moe', a mixture of experts"), std::string::npos) << moe;
  EXPECT_TRUE(gguf_config(dir, "qwen3", [](io::GgufWriter&) {}).qk_norm);
}

// The cost model counts the norms Qwen3 and Gemma 3 add as ops (their FLOPs are negligible): four
// more per layer in the forward, twice with recomputation, and eight in the backward; the memory
// plan keeps their inputs and rstd, which the model's constructor checks its buffers against.
TEST(ArchConfigs, CostModelAndMemoryPlanCountTheExtraNorms) {
  const LlamaConfig gemma = io::llama_config_from_hf(gemma3_4b(), "config.json");
  LlamaConfig plain = gemma;
  plain.qk_norm = plain.sandwich_norms = false;
  offload::CostInputs in;
  in.config = plain;
  in.seq_len = 512;
  in.recompute = true;
  const offload::CostRates rates = offload::CostRates::cpu(1);
  const offload::StepCost a = offload::step_cost(in, rates);
  in.config = gemma;
  const offload::StepCost b = offload::step_cost(in, rates);
  EXPECT_EQ(a.compute_s, b.compute_s);
  EXPECT_NEAR(b.overhead_s - a.overhead_s, 6 * (4 * 2 + 8) * rates.op_overhead_s, 1e-12);

  LlamaConfig small = gemma;
  small.hidden = 64;
  small.intermediate = 128;
  small.head_dim = 16;
  small.vocab = 100;
  small.query_pre_attn_scalar = 16;
  small.rope.head_dim = small.rope_local.head_dim = 16;
  LlamaConfig small_plain = small;
  small_plain.qk_norm = small_plain.sandwich_norms = false;
  const int64_t N = 32, H = 64, Q = 8 * 16, KV = 4 * 16;
  const auto saved = [&](const LlamaConfig& c) {
    return LlamaModel::memory_plan(init_random_weights(c, DType::F32, 1), LoraConfig{},
                                   CheckpointPolicy::None, N, cpu_backend())
        .bytes(MemTag::Activations);
  };
  // Per layer and token: q and k before their norms and an rstd per head; the o and down outputs
  // before theirs and two rstd.
  EXPECT_EQ(saved(small) - saved(small_plain), size_t(6 * N * (Q + KV + 8 + 4 + 2 * H + 2)) * sizeof(float));
}

}  // namespace
