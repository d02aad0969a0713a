// Tests: the PEFT export (names, shapes, adapter_config.json; q/k rows of a GGUF-based model written
// in HF order, checked against the HF model's logits) and import (bit-exact round trips, half
// precision, refusals of adapters tightfit cannot apply).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <list>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/io/gguf_lora.h"
#include "src/io/model_loader.h"
#include "src/io/peft.h"
#include "src/io/safetensors.h"
#include "src/model/llama.h"
#include "tests/gguf_test_util.h"
#include "tests/model_test_util.h"
#include "tests/op_test_util.h"
#include "tests/test_util.h"

namespace tf::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::error_of;
using test::TempDir;

constexpr uint32_t kQVDown =
    (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::V)) | (1u << int(LoraTarget::Down));

LoraState make_lora(const LlamaConfig& model, uint64_t seed) {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8.5f;
  c.rslora = true;
  c.dropout = 0.05f;
  c.targets = kQVDown;
  LoraState s(model, c);
  test::fill_lora_params(s, seed, 3);
  return s;
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

void write_json(const fs::path& p, const json& j) {
  std::ofstream(p, std::ios::trunc) << j.dump(2);
}

TEST(Peft, ExportWritesPeftNamesShapesAndConfig) {
  TempDir tmp;
  const LlamaConfig model = test::tiny_config();
  const LoraState lora = make_lora(model, 1);
  const fs::path out = tmp.dir / "adapter";
  export_peft(out.string(), lora, model, "HuggingFaceTB/SmolLM2-135M");

  const json cfg = read_json(out / "adapter_config.json");
  EXPECT_EQ(cfg.at("peft_type"), "LORA");
  EXPECT_EQ(cfg.at("task_type"), "CAUSAL_LM");
  EXPECT_EQ(cfg.at("r"), 4);
  EXPECT_EQ(cfg.at("lora_alpha").get<float>(), 8.5f);
  EXPECT_EQ(cfg.at("lora_dropout").get<float>(), 0.05f);
  EXPECT_EQ(cfg.at("use_rslora"), true);
  EXPECT_EQ(cfg.at("bias"), "none");
  EXPECT_EQ(cfg.at("fan_in_fan_out"), false);
  EXPECT_EQ(cfg.at("use_dora"), false);
  EXPECT_EQ(cfg.at("inference_mode"), true);
  EXPECT_TRUE(cfg.at("modules_to_save").is_null());
  EXPECT_TRUE(cfg.at("layers_to_transform").is_null());
  EXPECT_EQ(cfg.at("base_model_name_or_path"), "HuggingFaceTB/SmolLM2-135M");
  EXPECT_EQ(cfg.at("target_modules"), json({"q_proj", "v_proj", "down_proj"}));

  const SafetensorsFile f = SafetensorsFile::open((out / "adapter_model.safetensors").string());
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.tensors().size(), size_t(model.n_layers) * 3 * 2);
  const auto& qa = f.get("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(qa.shape, (std::vector<int64_t>{4, model.hidden}));
  const auto& vb = f.get("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight");
  EXPECT_EQ(vb.shape, (std::vector<int64_t>{model.kv_dim(), 4}));
  const auto& da = f.get("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight");
  EXPECT_EQ(da.shape, (std::vector<int64_t>{4, model.intermediate}));
  EXPECT_EQ(da.dtype, StDType::F32);
  EXPECT_EQ(std::memcmp(da.bytes.data(), lora.at(1, LoraTarget::Down).A, da.bytes.size()), 0);
  // Nothing but the adapter directory is left in its parent.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(tmp.dir)) ++entries;
  EXPECT_EQ(entries, 1);
}

TEST(Peft, RoundTripIsBitExactAndReplacesAnOldAdapter) {
  TempDir tmp;
  const LlamaConfig model = test::tiny_config();
  const fs::path out = tmp.dir / "adapter";
  export_peft(out.string(), make_lora(model, 1), model, "base-a");
  std::ofstream(out / "stale.txt") << "from the old export";
  const LoraState lora = make_lora(model, 2);
  export_peft(out.string() + "/", lora, model, "base-b");
  EXPECT_FALSE(fs::exists(out / "stale.txt"));

  const PeftAdapter back = import_peft(out.string(), model);
  EXPECT_EQ(back.base_model_name_or_path, "base-b");
  EXPECT_EQ(back.lora.config.rank, 4);
  EXPECT_EQ(back.lora.config.alpha, 8.5f);
  EXPECT_EQ(back.lora.config.rslora, true);
  EXPECT_EQ(back.lora.config.dropout, 0.05f);
  EXPECT_EQ(back.lora.config.targets, kQVDown);
  ASSERT_EQ(back.lora.n_params, lora.n_params);
  EXPECT_EQ(std::memcmp(back.lora.params.data(), lora.params.data(), lora.params.bytes()), 0);
}

TEST(Peft, ReadsHalfPrecisionAdapters) {
  TempDir tmp;
  const LlamaConfig model = test::tiny_config();
  const fs::path out = tmp.dir / "adapter";
  const LoraState lora = make_lora(model, 3);
  export_peft(out.string(), lora, model, "base");
  // Re-store every tensor as bf16, as adapters trained in bf16 often are.
  const SafetensorsFile f32 = SafetensorsFile::open((out / "adapter_model.safetensors").string());
  std::vector<std::vector<uint16_t>> halves;
  std::vector<SafetensorsWriteTensor> tensors;
  for (const auto& t : f32.tensors()) {
    std::vector<uint16_t> h(size_t(t.numel()));
    for (size_t i = 0; i < h.size(); ++i) {
      float v;
      std::memcpy(&v, t.bytes.data() + 4 * i, 4);
      h[i] = f32_to_bf16(v);
    }
    halves.push_back(std::move(h));
    tensors.push_back(
        {t.name, StDType::BF16, t.shape, std::as_bytes(std::span<const uint16_t>(halves.back()))});
  }
  const fs::path bf = tmp.dir / "bf16.safetensors";
  write_safetensors(bf.string(), tensors);
  fs::rename(bf, out / "adapter_model.safetensors");
  const PeftAdapter back = import_peft(out.string(), model);
  const LoraAdapter& a = back.lora.at(0, LoraTarget::Q);
  const LoraAdapter& want = lora.at(0, LoraTarget::Q);
  for (int64_t i = 0; i < int64_t(a.rank) * a.in; ++i) EXPECT_EQ(a.A[i], bf16_to_f32(f32_to_bf16(want.A[i])));
}

std::vector<float> logits_of(LlamaModel& m, const test::BatchData& data) {
  std::vector<float> out(size_t(data.batch * data.seq * m.config().vocab));
  m.forward_logits(data.view(), out.data());
  return out;
}

// PEFT adapters apply to HF checkpoints, so one trained on a GGUF base (q/k rows in interleaved
// order) is written in HF row order: with it the HF model the GGUF was converted from gives the
// GGUF model's logits, and importing it into the GGUF model restores the adapter bit for bit.
TEST(Peft, AdapterOfAGgufBaseIsWrittenInHfRowOrder) {
  TempDir tmp;
  const LlamaConfig cfg = test::tiny_config();
  const test::GgufBase built(cfg, (tmp.dir / "base.gguf").string(), /*quantize_down=*/false);
  LoadedModel loaded = load_model(built.path);
  ASSERT_EQ(loaded.weights.config.rope_layout, RopeLayout::Interleaved);
  LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8.0f;
  LlamaModel gguf(std::move(loaded.weights), lc, CheckpointPolicy::None, 24);
  test::fill_lora_params(gguf.lora(), 4, 9, 0.1f);
  const test::BatchData data = test::synthetic_batch(2, 12, cfg.vocab, 5);
  const std::vector<float> want = logits_of(gguf, data);

  const fs::path out = tmp.dir / "adapter";
  export_peft(out.string(), gguf.lora(), gguf.config(), built.path);

  // Row r of q's and k's B (GGUF order) is HF row gguf_qk_row_source(r) in the file; v's rows
  // are not reordered.
  const SafetensorsFile f = SafetensorsFile::open((out / "adapter_model.safetensors").string());
  for (LoraTarget t : {LoraTarget::Q, LoraTarget::K, LoraTarget::V}) {
    const LoraAdapter& a = gguf.lora().at(1, t);
    const SafetensorsTensor& b = f.get(peft_tensor_name(1, t, true));
    const size_t row_bytes = size_t(a.rank) * sizeof(float);
    for (int64_t r = 0; r < a.out; ++r) {
      const int64_t hf_row = t == LoraTarget::V ? r : gguf_qk_row_source(r, cfg.head_dim);
      EXPECT_EQ(std::memcmp(b.bytes.data() + size_t(hf_row) * row_bytes, a.B + r * a.rank, row_bytes), 0)
          << lora_target_name(t) << " row " << r;
    }
  }

  // Both models do the same f32 arithmetic on the same values except for order: q/k rows come
  // out of the projections permuted (each element the same dot product), rope rotates the same
  // pairs by the same angles, and q.k sums a head's products in another order. That is a few ulps
  // (~1e-7 relative) per operation, carried through two blocks to ~1e-6 in the logits; 1e-5
  // keeps a margin. An adapter applied to the wrong q/k rows changes the logits by an amount of
  // the order of the adapter's own effect, which is checked to be far larger.
  const PeftAdapter hf_adapter = import_peft(out.string(), cfg);
  LlamaModel hf(init_random_weights(cfg, DType::F32, test::GgufBase::kSeed), hf_adapter.lora.config,
                CheckpointPolicy::None, 24);
  ASSERT_EQ(hf.lora().n_params, hf_adapter.lora.n_params);
  std::memcpy(hf.lora().params.data(), hf_adapter.lora.params.data(), hf_adapter.lora.params.bytes());
  EXPECT_LT(test::rel_norm_error(logits_of(hf, data), want), 1e-5);
  LlamaModel hf_base(init_random_weights(cfg, DType::F32, test::GgufBase::kSeed), lc, CheckpointPolicy::None,
                     24);
  EXPECT_GT(test::rel_norm_error(logits_of(hf_base, data), want), 1e-2);

  const PeftAdapter back = import_peft(out.string(), gguf.config());
  ASSERT_EQ(back.lora.n_params, gguf.lora().n_params);
  EXPECT_EQ(std::memcmp(back.lora.params.data(), gguf.lora().params.data(), gguf.lora().params.bytes()), 0);
}

// Each case edits a freshly exported adapter and expects an error containing `needle`.
class PeftBadInput : public ::testing::Test {
 protected:
  TempDir tmp;
  LlamaConfig model = test::tiny_config();
  fs::path out = tmp.dir / "adapter";
  void SetUp() override { export_peft(out.string(), make_lora(model, 1), model, "base"); }
  void edit_config(const std::function<void(json&)>& fn) {
    json cfg = read_json(out / "adapter_config.json");
    fn(cfg);
    write_json(out / "adapter_config.json", cfg);
  }
  // Rewrites the weights with `fn` applied to the list of tensors (copied to owned storage).
  void edit_tensors(const std::function<void(std::vector<SafetensorsWriteTensor>&)>& fn) {
    std::vector<SafetensorsWriteTensor> tensors;
    {
      const SafetensorsFile f = SafetensorsFile::open((out / "adapter_model.safetensors").string());
      for (const auto& t : f.tensors()) {
        storage_.emplace_back(t.bytes.begin(), t.bytes.end());
        tensors.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(storage_.back())});
      }
    }
    fn(tensors);
    write_safetensors((out / "adapter_model.safetensors").string(), tensors);
  }
  void expect_error(const std::string& needle) {
    const std::string msg = error_of([&] { import_peft(out.string(), model); });
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
  std::list<std::vector<std::byte>> storage_;
};

TEST_F(PeftBadInput, MissingConfig) {
  fs::remove(out / "adapter_config.json");
  expect_error("adapter_config.json: missing");
}

TEST_F(PeftBadInput, MalformedConfig) {
  std::ofstream(out / "adapter_config.json", std::ios::trunc) << "{\"peft_type\": ";
  expect_error("adapter_config.json: not valid JSON");
}

TEST_F(PeftBadInput, WrongPeftType) {
  edit_config([](json& c) { c["peft_type"] = "PREFIX_TUNING"; });
  expect_error("peft_type is 'PREFIX_TUNING'; only LORA");
}

TEST_F(PeftBadInput, UnsupportedOptions) {
  edit_config([](json& c) { c["use_dora"] = true; });
  expect_error("use_dora = true (DoRA) is not supported");
  edit_config([](json& c) {
    c["use_dora"] = false;
    c["rank_pattern"] = {{"q_proj", 8}};
  });
  expect_error("rank_pattern");
  edit_config([](json& c) {
    c["rank_pattern"] = json::object();
    c["bias"] = "all";
  });
  expect_error("bias = 'all'");
}

TEST_F(PeftBadInput, UnknownTargetModule) {
  edit_config([](json& c) { c["target_modules"] = {"q_proj", "lm_head"}; });
  expect_error("target module 'lm_head' is not a projection");
  edit_config([](json& c) { c["target_modules"] = "all-linear"; });
  expect_error("target_modules must be a non-empty list");
}

TEST_F(PeftBadInput, RankMismatch) {
  edit_config([](json& c) { c["r"] = 8; });
  expect_error("has rank 4 but");
}

TEST_F(PeftBadInput, ShapeMismatch) {
  model.intermediate = 96;  // down_proj's A no longer fits
  expect_error("mlp.down_proj.lora_A.weight has shape [4, 64] but the model needs [4, 96]");
}

TEST_F(PeftBadInput, MissingTensor) {
  edit_tensors([](std::vector<SafetensorsWriteTensor>& t) {
    std::erase_if(t, [](const auto& x) {
      return x.name.find("layers.1.self_attn.v_proj.lora_B") != std::string::npos;
    });
  });
  expect_error("tensor base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight is missing");
}

TEST_F(PeftBadInput, UnexpectedTensors) {
  edit_tensors([](std::vector<SafetensorsWriteTensor>& t) {
    SafetensorsWriteTensor extra = t[0];
    extra.name = "base_model.model.lm_head.lora_A.weight";
    t.push_back(extra);
  });
  expect_error("unexpected tensor base_model.model.lm_head.lora_A.weight");
  edit_tensors([](std::vector<SafetensorsWriteTensor>& t) {
    std::erase_if(t, [](const auto& x) { return x.name.find("lm_head") != std::string::npos; });
    SafetensorsWriteTensor extra = t[0];
    extra.name = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    t.push_back(extra);
  });
  expect_error("adapts k_proj, which is not in target_modules");
  edit_tensors([](std::vector<SafetensorsWriteTensor>& t) {
    std::erase_if(t, [](const auto& x) { return x.name.find("k_proj") != std::string::npos; });
    SafetensorsWriteTensor extra = t[0];
    extra.name = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight";
    t.push_back(extra);
  });
  expect_error("is for layer 7 but the model has 2 layers");
}

TEST_F(PeftBadInput, MissingOrTruncatedWeights) {
  const fs::path w = out / "adapter_model.safetensors";
  fs::resize_file(w, fs::file_size(w) - 5);
  const std::string msg = error_of([&] { import_peft(out.string(), model); });
  EXPECT_NE(msg.find("adapter_model.safetensors"), std::string::npos) << msg;
  fs::remove(w);
  expect_error("adapter_model.safetensors: missing");
}

}  // namespace
}  // namespace tf::io
