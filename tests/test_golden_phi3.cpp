// defines: golden tests of Phi-3 against transformers + PEFT (tools/make_arch_golden.py group
// "phi3", tests/fixtures/arch_golden/phi3*): the HF directory and the GGUF llama.cpp's converter
// wrote of it must give the reference's logits, loss and every gradient of the four fused-module
// adapters (qkv_proj, o_proj, gate_up_proj, down_proj), within the bounds of
// tests/test_golden_arch.cpp; the PEFT, GGUF LoRA and merged exports must name, shape and merge
// what PEFT and llama.cpp do.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "op_test_util.h"
#include "src/core/dtype.h"
#include "src/io/gguf.h"
#include "src/io/gguf_lora.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "src/io/model_loader.h"
#include "src/io/peft.h"
#include "src/io/safetensors.h"
#include "src/model/llama.h"

using namespace tf;

namespace {

const std::string kDir = std::string(TIGHTFIT_FIXTURES) + "/arch_golden/";

struct Expected {
  std::shared_ptr<const io::SafetensorsModel> file;
  LoraConfig lora;
  int batch = 0, seq = 0;
  int64_t n_targets = 0;
  const std::string& meta(const std::string& key) const { return file->shards().at(0).metadata().at(key); }
  const float* f32(const std::string& name) const { return static_cast<const float*>(file->view(name).data); }
};

Expected load_expected() {
  Expected e;
  e.file = std::make_shared<const io::SafetensorsModel>(
      io::SafetensorsModel::open(kDir + "phi3_expected.safetensors"));
  e.lora.rank = std::stoi(e.meta("lora_r"));
  e.lora.alpha = std::stof(e.meta("lora_alpha"));
  e.lora.targets = parse_lora_targets(e.meta("lora_targets"));
  e.n_targets = std::stoi(e.meta("n_targets"));
  const io::SafetensorsTensor& ids = e.file->get("input_ids");
  e.batch = int(ids.shape[0]);
  e.seq = int(ids.shape[1]);
  return e;
}

// The expected file's PEFT names without "base_model.model.".
std::string module_name(int layer, const LoraModule& m, const char* which) {
  return io::peft_tensor_name(layer, m, std::string(which) == "B")
      .substr(std::string("base_model.model.").size());
}

Batch reference_batch(const Expected& e, std::vector<int32_t>& targets, std::vector<int32_t>& positions) {
  const auto* labels = static_cast<const int32_t*>(e.file->view("labels").data);
  for (int b = 0; b < e.batch; ++b)
    for (int t = 0; t < e.seq; ++t) {
      targets.push_back(t + 1 < e.seq ? labels[b * e.seq + t + 1] : kIgnoreIndex);  // HF shifts labels
      positions.push_back(t);
    }
  return Batch{
      e.batch,          e.seq,  static_cast<const int32_t*>(e.file->view("input_ids").data), targets.data(),
      positions.data(), nullptr};
}

// Loads the reference adapter into `model` and checks logits, loss and every module's gradients.
void check(LlamaModel& model, const Expected& e, const std::string& what) {
  const LlamaConfig& c = model.config();
  LoraState& lora = model.lora();
  for (int l = 0; l < c.n_layers; ++l)
    for (const LoraModule& m : lora_modules(c)) {
      const LoraAdapter a = lora.module(l, m);
      std::copy_n(e.f32(module_name(l, m, "A")), int64_t(a.rank) * a.in, a.A);
      std::copy_n(e.f32(module_name(l, m, "B")), int64_t(a.rank) * a.out, a.B);
    }
  std::vector<int32_t> targets, positions;
  const Batch batch = reference_batch(e, targets, positions);
  // tests/test_golden_arch.cpp's bounds: the reference is float64 rounded to f32, ours f32 (HF's f32
  // run is ~5e-7 off on logits, ~1e-6 on gradients); the script measures what the window, longrope,
  // its short factors and its attention factor each move the logits by: 3.2, 0.59, 0.28, 0.55.
  const size_t n_logits = size_t(e.batch) * e.seq * size_t(c.vocab);
  std::vector<float> logits(n_logits);
  model.forward_logits(batch, logits.data());
  EXPECT_LT(test::rel_norm_error(logits.data(), e.f32("logits"), n_logits), 1e-5) << what;
  lora.zero_grads();
  const LossSum loss = model.forward_backward(batch, 1.0f / float(e.n_targets), 0);
  ASSERT_EQ(loss.n_valid, e.n_targets) << what;
  const double want = e.f32("loss")[0];
  EXPECT_LT(std::abs(loss.mean() - want) / want, 1e-5) << what << " loss " << loss.mean() << " vs " << want;
  for (int l = 0; l < c.n_layers; ++l)
    for (const LoraModule& m : lora_modules(c)) {
      const LoraAdapter a = lora.module(l, m);
      const std::string na = module_name(l, m, "A"), nb = module_name(l, m, "B");
      EXPECT_LT(test::rel_norm_error(a.dA, e.f32(na + ".grad"), size_t(a.rank) * a.in), 1e-4)
          << what << " " << na;
      EXPECT_LT(test::rel_norm_error(a.dB, e.f32(nb + ".grad"), size_t(a.rank) * a.out), 1e-4)
          << what << " " << nb;
    }
}

LlamaWeights hf_weights() {
  return io::load_hf_model(kDir + "phi3", io::QuantMode::Keep);
}

LlamaWeights gguf_weights() {
  return io::load_model(kDir + "phi3.gguf", true, io::QuantMode::Keep).weights;
}

std::string temp_path(const std::string& name) {
  const std::string dir = testing::TempDir() + "golden_phi3_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  return dir + "/" + name;
}

std::set<std::string> split(const std::string& list) {
  std::set<std::string> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) out.insert(item);
  return out;
}

// A bf16 base stores the merged weights rounded to bf16: each element moves by up to 2^-9 of itself,
// so the relative norm of the difference stays below 2^-9 = 2e-3; an adapter merged into the wrong
// rows, or not at all, is off by the delta's own size (over 5e-2 here).
constexpr double kBf16Merge = 2.5e-3;

}  // namespace

TEST(GoldenPhi3, HfDirectory) {
  const LlamaWeights w = hf_weights();
  EXPECT_EQ(w.config.architecture, "phi3");
  EXPECT_TRUE(w.config.fused_qkv && w.config.fused_gate_up);
  EXPECT_EQ(w.config.window(1), 6);
  EXPECT_EQ(w.config.n_heads, 3 * w.config.n_kv_heads);
  const Expected e = load_expected();
  LlamaModel model(hf_weights(), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "phi3 HF");
  // Per-block recomputation and the MLP in chunks go through the fused modules' shared intermediate.
  LlamaModel chunked(hf_weights(), e.lora, CheckpointPolicy::PerBlock, int64_t(e.batch) * e.seq,
                     cpu_backend(), offload::WeightTier::Resident, ModelLayout{.mlp_chunk = 10});
  check(chunked, e, "phi3 HF per-block, MLP in chunks of 10 rows");
}

TEST(GoldenPhi3, Gguf) {
  const io::LoadedModel m = io::load_model(kDir + "phi3.gguf", true, io::QuantMode::Keep);
  const LlamaConfig& c = m.weights.config;
  EXPECT_EQ(c.architecture, "phi3");
  EXPECT_TRUE(c.fused_qkv && c.fused_gate_up);
  EXPECT_EQ(c.rope_layout, RopeLayout::SplitHalf);  // phi3 rotates neox-style: no q/k permutation
  EXPECT_EQ(c.rope.scaling, RopeScalingType::LongRope);
  EXPECT_EQ(c.rope.original_max_positions, 64);
  EXPECT_EQ(c.rope.freq_factors.size(), 8u);
  EXPECT_NEAR(rope_attention_factor(c.rope), std::sqrt(1 + std::log(4.0) / std::log(64.0)), 1e-6);
  EXPECT_EQ(c.window(0), 6);
  const Expected e = load_expected();
  LlamaModel model(gguf_weights(), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "phi3 GGUF");
  // The disk tier reads each projection's rows of the fused tensors from the file by offset.
  LlamaModel disk(gguf_weights(), e.lora, CheckpointPolicy::PerBlock, int64_t(e.batch) * e.seq, cpu_backend(),
                  offload::WeightTier::Disk);
  check(disk, e, "phi3 GGUF, weights read from the file");
}

TEST(GoldenPhi3, PeftExportNamesWhatPeftSaves) {
  const Expected e = load_expected();
  LlamaModel model(hf_weights(), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "phi3 HF");
  const std::string dir = temp_path("peft");
  io::export_peft(dir, model.lora(), model.config(), "phi3");
  const io::SafetensorsFile f = io::SafetensorsFile::open(dir + "/adapter_model.safetensors");
  std::set<std::string> names;
  for (const io::SafetensorsTensor& t : f.tensors()) {
    names.insert(t.name);
    const io::SafetensorsTensor& want = e.file->get(t.name.substr(std::string("base_model.model.").size()));
    EXPECT_EQ(t.shape, want.shape) << t.name;
  }
  EXPECT_EQ(names, split(e.meta("peft_names")));
  std::ifstream cfg(dir + "/adapter_config.json");
  const nlohmann::json j = nlohmann::json::parse(cfg);
  std::set<std::string> modules;
  for (const auto& m : j.at("target_modules")) modules.insert(m.get<std::string>());
  EXPECT_EQ(modules, split(e.meta("peft_target_modules")));
  // And back: the same parameters.
  io::PeftAdapter back = io::import_peft(dir, model.config());
  ASSERT_EQ(back.lora.n_params, model.lora().n_params);
  EXPECT_TRUE(std::equal(back.lora.param_data(), back.lora.param_data() + back.lora.n_params,
                         model.lora().param_data()));
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}

TEST(GoldenPhi3, GgufLoraNamesLlamaCppsFusedTensors) {
  const Expected e = load_expected();
  LlamaModel model(gguf_weights(), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "phi3 GGUF");
  const std::string path = temp_path("phi3_lora.gguf");
  io::export_gguf_lora(path, model.lora(), model.config());
  const io::GgufFile a = io::GgufFile::open(path);
  EXPECT_EQ(a.get_string("general.architecture"), "phi3");
  std::set<std::string> names;
  for (const io::GgufTensorInfo& t : a.tensors()) names.insert(t.name);
  const LlamaConfig& c = model.config();
  for (int l = 0; l < c.n_layers; ++l)
    for (const char* base : {"attn_qkv", "attn_output", "ffn_up", "ffn_down"})
      for (const char* ab : {"lora_a", "lora_b"})
        EXPECT_TRUE(names.count("blk." + std::to_string(l) + "." + base + ".weight." + ab))
            << base << " " << ab;
  EXPECT_EQ(names.size(), size_t(8 * c.n_layers));
  // llama.cpp's ne: B of attn_qkv is [r, q + 2 kv], of ffn_up [r, 2 intermediate], rows in HF's order.
  const io::GgufTensorInfo& qkv = a.tensor("blk.1.attn_qkv.weight.lora_b");
  EXPECT_EQ(qkv.ne[1], c.q_dim() + 2 * c.kv_dim());
  EXPECT_EQ(a.tensor("blk.1.ffn_up.weight.lora_b").ne[1], 2 * c.intermediate);
  const LoraAdapter b = model.lora().module(1, lora_modules(c)[0]);
  EXPECT_EQ(std::memcmp(qkv.data, b.B, qkv.n_bytes), 0);
  const LoraState back = io::import_gguf_lora(path, c);
  ASSERT_EQ(back.n_params, model.lora().n_params);
  EXPECT_TRUE(std::equal(back.params.as<float>(), back.params.as<float>() + back.n_params,
                         model.lora().params.as<float>()));
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());
}

TEST(GoldenPhi3, MergedExportsWriteTheFusedMatricesAsMergeAndUnload) {
  const Expected e = load_expected();
  LlamaModel model(hf_weights(), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(model, e, "phi3 HF");
  const std::string qkv = "model.layers.1.self_attn.qkv_proj.weight",
                    gate_up = "model.layers.1.mlp.gate_up_proj.weight";
  // HF: the fused tensors under their own names, equal to transformers' merge_and_unload.
  const std::string dir = temp_path("merged");
  io::export_merged_hf(dir, model.weights(), model.lora());
  const io::SafetensorsModel merged = io::SafetensorsModel::open(dir);
  for (const std::string& name : {qkv, gate_up}) {
    const TensorView v = merged.view(name);
    ASSERT_EQ(v.dtype, DType::BF16) << name;
    const io::SafetensorsTensor& want = e.file->get("merged." + name);
    ASSERT_EQ(merged.get(name).shape, want.shape) << name;
    std::vector<float> got(size_t(want.numel()));
    for (size_t i = 0; i < got.size(); ++i) got[i] = bf16_to_f32(static_cast<const uint16_t*>(v.data)[i]);
    EXPECT_LT(test::rel_norm_error(got.data(), e.f32("merged." + name), got.size()), kBf16Merge) << name;
  }
  EXPECT_THROW(merged.get("model.layers.1.self_attn.q_proj.weight"), Error);
  const LlamaConfig back = io::read_hf_config(dir + "/config.json");
  EXPECT_EQ(back.architecture, "phi3");
  EXPECT_EQ(back.rope.scaling, RopeScalingType::LongRope);
  EXPECT_EQ(back.rope.freq_factors, model.config().rope.freq_factors);
  EXPECT_EQ(back.window(0), 6);

  // GGUF: blk.1.attn_qkv and ffn_up merged, in llama.cpp's (unpermuted) rows.
  LlamaModel g(gguf_weights(), e.lora, CheckpointPolicy::None, int64_t(e.batch) * e.seq);
  check(g, e, "phi3 GGUF");
  const io::LoadedModel base = io::load_model(kDir + "phi3.gguf", true, io::QuantMode::Keep);
  const std::string path = temp_path("merged.gguf");
  io::export_merged_gguf(path, *base.gguf, g.lora(), g.config().rope_layout, io::MergedGgufOptions{});
  const io::GgufFile f = io::GgufFile::open(path);
  for (const auto& [name, hf] :
       {std::pair{"blk.1.attn_qkv.weight", qkv}, std::pair{"blk.1.ffn_up.weight", gate_up}}) {
    const io::GgufTensorInfo& t = f.tensor(name);
    std::vector<float> got(size_t(t.n_elements));
    ASSERT_EQ(t.type, GgmlType::BF16) << name;
    for (size_t i = 0; i < got.size(); ++i)
      got[i] = bf16_to_f32(reinterpret_cast<const uint16_t*>(t.data)[i]);
    EXPECT_LT(test::rel_norm_error(got.data(), e.f32("merged." + hf), got.size()), kBf16Merge) << name;
  }
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}
