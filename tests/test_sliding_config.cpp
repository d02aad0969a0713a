// Tests: the attention fields of a config.json (io::llama_config_from_hf): each layer's sliding
// window as transformers 5 builds it for Mistral and Qwen2 (defaults, null, use_sliding_window,
// max_window_layers, layer_types) and of a GGUF's `<arch>.attention.sliding_window`; the merged
// export's config.json carrying them back; the fields tightfit cannot honour refused by name.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "tests/test_util.h"

using namespace tf;

namespace {

nlohmann::json config(const char* arch, int layers) {
  return {{"architectures", {arch}},  {"hidden_size", 64},
          {"intermediate_size", 128}, {"num_hidden_layers", layers},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2},
          {"vocab_size", 256}};
}

std::vector<int> windows(const nlohmann::json& j) {
  const LlamaConfig c = io::llama_config_from_hf(j, "config.json");
  std::vector<int> w;
  for (int l = 0; l < c.n_layers; ++l) w.push_back(c.window(l));
  return w;
}

std::string error_of(const nlohmann::json& j) {
  try {
    io::llama_config_from_hf(j, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted";
}

TEST(SlidingConfig, MistralSlidesEveryLayerWithTransformersDefault) {
  nlohmann::json j = config("MistralForCausalLM", 3);
  EXPECT_EQ(windows(j), (std::vector<int>{4096, 4096, 4096}));  // absent: MistralConfig's 4096
  j["sliding_window"] = 100;
  EXPECT_EQ(windows(j), (std::vector<int>{100, 100, 100}));
  j["sliding_window"] = nullptr;  // Mistral v0.2 and later
  EXPECT_EQ(windows(j), (std::vector<int>{0, 0, 0}));
}

TEST(SlidingConfig, Qwen2SlidesFromMaxWindowLayersOnlyWhenEnabled) {
  nlohmann::json j = config("Qwen2ForCausalLM", 4);
  j["sliding_window"] = 32;
  j["max_window_layers"] = 2;
  EXPECT_EQ(windows(j), (std::vector<int>{0, 0, 0, 0}));  // use_sliding_window defaults to false
  j["use_sliding_window"] = true;
  EXPECT_EQ(windows(j), (std::vector<int>{0, 0, 32, 32}));
  j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention", "full_attention"};
  EXPECT_EQ(windows(j), (std::vector<int>{32, 0, 32, 0}));  // layer_types wins over max_window_layers
}

TEST(SlidingConfig, LlamaHasNone) {
  nlohmann::json j = config("LlamaForCausalLM", 2);
  EXPECT_EQ(windows(j), (std::vector<int>{0, 0}));
}

TEST(SlidingConfig, ReadsAttentionDropout) {
  nlohmann::json j = config("LlamaForCausalLM", 2);
  j["attention_dropout"] = 0.1;
  EXPECT_FLOAT_EQ(io::llama_config_from_hf(j, "config.json").attention_dropout, 0.1f);
}

TEST(SlidingConfig, RefusesWhatItCannotHonourByName) {
  auto expect = [](const nlohmann::json& j, const std::string& needle) {
    const std::string e = error_of(j);
    EXPECT_NE(e.find(needle), std::string::npos) << e;
    EXPECT_NE(e.find("config.json"), std::string::npos) << e;
  };
  nlohmann::json j = config("LlamaForCausalLM", 2);
  j["attn_logit_softcapping"] = 50.0;
  expect(j, "\"attn_logit_softcapping\" is set (50.0)");
  j = config("LlamaForCausalLM", 2);
  j["attention_chunk_size"] = 8192;
  expect(j, "\"attention_chunk_size\" is set (8192)");

  j = config("Qwen2ForCausalLM", 2);
  j["use_sliding_window"] = true;
  j["layer_types"] = {"full_attention"};
  expect(j, "one attention kind for each of the 2 layers");
  j["layer_types"] = {"full_attention", "chunked_attention"};
  expect(j, "\"chunked_attention\" is not one tightfit runs");
  j = config("Qwen2ForCausalLM", 2);
  j["layer_types"] = {"full_attention", "sliding_attention"};
  expect(j, "sliding_attention layers but the config sets no sliding window");

  j = config("MistralForCausalLM", 2);
  j["sliding_window"] = 16;
  j["layer_types"] = {"full_attention", "sliding_attention"};
  expect(j, "MistralForCausalLM slides its window in every layer");
  j = config("MistralForCausalLM", 2);
  j["sliding_window"] = 0;
  expect(j, "sliding_window must be positive or null");
}

// The config.json a merged export writes reads back with the same windows, for each architecture
// (an absent sliding_window would read as 4096 in transformers).
TEST(SlidingConfig, MergedConfigKeepsTheWindows) {
  nlohmann::json m = config("MistralForCausalLM", 2);
  for (const nlohmann::json& window : {nlohmann::json(nullptr), nlohmann::json(16)}) {
    m["sliding_window"] = window;
    const LlamaConfig c = io::llama_config_from_hf(m, "config.json");
    const nlohmann::json back = nlohmann::json::parse(io::hf_config_json(c, DType::F32).dump());
    EXPECT_EQ(windows(back), windows(m)) << window;
  }
  nlohmann::json q = config("Qwen2ForCausalLM", 3);
  q["use_sliding_window"] = true;
  q["sliding_window"] = 8;
  q["max_window_layers"] = 1;
  const LlamaConfig c = io::llama_config_from_hf(q, "config.json");
  const nlohmann::json back = nlohmann::json::parse(io::hf_config_json(c, DType::F32).dump());
  EXPECT_EQ(windows(back), (std::vector<int>{0, 8, 8}));
  EXPECT_EQ(windows(back), windows(q));
}

// A tiny llama GGUF's header with the given extra metadata, read back as a config.
LlamaConfig gguf_config(const test::TempDir& dir, const std::function<void(io::GgufWriter&)>& add) {
  std::vector<uint16_t> embd(64 * 16);
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.embedding_length", 16);
  w.add_u32("llama.feed_forward_length", 40);
  w.add_u32("llama.block_count", 2);
  w.add_u32("llama.attention.head_count", 4);
  w.add_u32("llama.attention.head_count_kv", 2);
  w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
  w.add_tensor("token_embd.weight", GgmlType::F16, {16, 64}, embd.data(), embd.size() * 2);
  add(w);
  const std::string path = dir.str() + "/tiny.gguf";
  w.write(path);
  return io::llama_config_from_gguf(io::GgufFile::open(path));
}

TEST(SlidingConfig, GgufSlidingWindowAppliesToEveryLayer) {
  const test::TempDir dir;
  EXPECT_EQ(gguf_config(dir, [](io::GgufWriter&) {}).sliding_window, 0);
  const LlamaConfig c =
      gguf_config(dir, [](io::GgufWriter& w) { w.add_u32("llama.attention.sliding_window", 9); });
  EXPECT_EQ(c.window(0), 9);
  EXPECT_EQ(c.window(1), 9);
  EXPECT_EQ(
      gguf_config(dir, [](io::GgufWriter& w) { w.add_u32("llama.attention.sliding_window", 0); }).window(0),
      0);
  const std::string e = test::error_of([&] {
    gguf_config(dir, [](io::GgufWriter& w) {
      w.add_u32("llama.attention.sliding_window", 9);
      w.add_u32("llama.attention.sliding_window_pattern", 2);
    });
  });
  EXPECT_NE(e.find("llama.attention.sliding_window_pattern (sliding and full attention layers mixed) is not "
                   "supported"),
            std::string::npos)
      << e;
}

}  // namespace
