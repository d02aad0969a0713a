// defines: the tightfit binary end to end on a Phi-3 model (a tiny random one, its q/k/v and gate/up
// fused as Phi3ForCausalLM stores them, with longrope): --lora-targets refusing part of a fused
// module, a run past longrope's pretraining length, the residual-dropout refusal, a run resumed from a
// checkpoint to the same losses, and the PEFT, GGUF and merged exports naming the fused modules.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/io/gguf.h"
#include "src/io/safetensors.h"
#include "tests/cli_test_util.h"

namespace fs = std::filesystem;

using namespace tf::test;

namespace {

// Rewrites `init --config tiny`'s Llama directory as Phi-3's: qkv_proj and gate_up_proj hold the
// projections' rows one after the other, and the config is Phi3ForCausalLM's with longrope over
// a pretraining length of 64.
void make_phi3(const fs::path& dir) {
  const tf::io::SafetensorsFile llama = tf::io::SafetensorsFile::open((dir / "model.safetensors").string());
  std::vector<std::vector<std::byte>> fused;
  std::vector<tf::io::SafetensorsWriteTensor> out;
  fused.reserve(64);
  auto concat = [&](const std::string& name, const std::vector<std::string>& parts) {
    std::vector<std::byte>& bytes = fused.emplace_back();
    int64_t rows = 0, cols = 0;
    for (const std::string& p : parts) {
      const tf::io::SafetensorsTensor& t = llama.get(p);
      bytes.insert(bytes.end(), t.bytes.begin(), t.bytes.end());
      rows += t.shape[0];
      cols = t.shape[1];
    }
    out.push_back({name, tf::io::StDType::F32, {rows, cols}, std::span<const std::byte>(bytes)});
  };
  for (const tf::io::SafetensorsTensor& t : llama.tensors()) {
    const auto at = [&](const char* s) { return t.name.find(s) != std::string::npos; };
    if (at(".q_proj.")) {
      const std::string attn = t.name.substr(0, t.name.find(".q_proj."));
      concat(attn + ".qkv_proj.weight", {t.name, attn + ".k_proj.weight", attn + ".v_proj.weight"});
    } else if (at(".gate_proj.")) {
      const std::string mlp = t.name.substr(0, t.name.find(".gate_proj."));
      concat(mlp + ".gate_up_proj.weight", {t.name, mlp + ".up_proj.weight"});
    } else if (!at(".k_proj.") && !at(".v_proj.") && !at(".up_proj.")) {
      out.push_back({t.name, t.dtype, t.shape, t.bytes});
    }
  }
  const std::string weights = (dir / "model.safetensors.new").string();
  tf::io::write_safetensors(weights, out, {{"format", "pt"}});
  fs::rename(weights, dir / "model.safetensors");

  std::ifstream in(dir / "config.json");
  nlohmann::json c = nlohmann::json::parse(in);
  c["architectures"] = {"Phi3ForCausalLM"};
  c["model_type"] = "phi3";
  c.erase("head_dim");  // Phi3Config derives it: 64 / 4
  c["original_max_position_embeddings"] = 64;
  c["sliding_window"] = nullptr;
  c["resid_pdrop"] = 0.0;
  c["embd_pdrop"] = 0.0;
  std::vector<double> short_f, long_f;
  for (int i = 0; i < 8; ++i) {
    short_f.push_back(1.0 + 0.5 * i);
    long_f.push_back(8.0 + i);
  }
  c["rope_scaling"] = {{"type", "longrope"}, {"short_factor", short_f}, {"long_factor", long_f}};
  std::ofstream(dir / "config.json") << c.dump(2) << "\n";
}

}  // namespace

TEST_F(Cli, Phi3TrainsResumesAndExportsItsFusedModules) {
  make_model_and_data();
  make_phi3(dir_ / "model");
  const std::string model = (dir_ / "model").string();

  std::vector<std::string> args = finetune_args("partial", 2);
  set_option(args, "--lora-targets", "q,k,o");
  Result r = run(args);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("name q_proj, k_proj but not v_proj: phi3 stores them as one matrix, qkv_proj"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("target qkv_proj instead"), std::string::npos) << r.err;
  // Past original_max_position_embeddings the batches rotate with the long factors, which the
  // model has: the run trains (the switch itself is checked in test_phi3).
  args = finetune_args("long", 2);
  set_option(args, "--seq-len", "96");
  r = run(args);
  EXPECT_EQ(r.status, 0) << r.err;

  // A run, and the same run stopped after its checkpoint of step 2 and resumed: the same losses.
  args = finetune_args("run", 3);
  set_option(args, "--lora-targets", "qkv_proj,o_proj,gate_up_proj,down_proj");
  r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  std::vector<std::string> resumed = finetune_args("resumed", 3);
  set_option(resumed, "--lora-targets", "qkv_proj,o_proj,gate_up_proj,down_proj");
  ASSERT_EQ(run(resumed).status, 0);
  const fs::path rd = dir_ / "resumed";
  fs::remove_all(rd / "adapter");
  fs::remove(rd / "report.html");
  fs::remove_all(rd / "checkpoints" / "step-3");
  resumed.push_back("--resume");
  r = run(resumed);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(losses(rd / "metrics.jsonl"), losses(dir_ / "run" / "metrics.jsonl"));
  EXPECT_EQ(losses(rd / "metrics.jsonl").size(), 3u);

  // PEFT's names and shapes: one A [r, hidden] and one B [q + 2 kv, r] for qkv_proj.
  ASSERT_EQ(
      run({"export", "--run", (dir_ / "run").string(), "--format", "peft", "--out", (dir_ / "peft").string()})
          .status,
      0);
  const auto peft = tf::io::SafetensorsFile::open((dir_ / "peft" / "adapter_model.safetensors").string());
  EXPECT_EQ(peft.get("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight").shape,
            (std::vector<int64_t>{4, 64}));
  EXPECT_EQ(peft.get("base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight").shape,
            (std::vector<int64_t>{128, 4}));
  EXPECT_EQ(peft.get("base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight").shape,
            (std::vector<int64_t>{352, 4}));
  EXPECT_EQ(peft.tensors().size(), 16u);
  std::ifstream cfg(dir_ / "peft" / "adapter_config.json");
  EXPECT_EQ(nlohmann::json::parse(cfg).at("target_modules"),
            nlohmann::json({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}));

  ASSERT_EQ(run({"export", "--run", (dir_ / "run").string(), "--format", "gguf", "--out",
                 (dir_ / "a.gguf").string()})
                .status,
            0);
  const auto g = tf::io::GgufFile::open((dir_ / "a.gguf").string());
  EXPECT_EQ(g.get_string("general.architecture"), "phi3");
  EXPECT_NE(g.find_tensor("blk.1.attn_qkv.weight.lora_b"), nullptr);
  EXPECT_NE(g.find_tensor("blk.0.ffn_up.weight.lora_a"), nullptr);
  EXPECT_EQ(g.find_tensor("blk.0.attn_q.weight.lora_a"), nullptr);

  // The merged directory holds the fused tensors and generates what the base with the adapter does.
  ASSERT_EQ(run({"export", "--run", (dir_ / "run").string(), "--format", "merged", "--out",
                 (dir_ / "merged").string()})
                .status,
            0);
  const auto merged = tf::io::SafetensorsFile::open((dir_ / "merged" / "model.safetensors").string());
  EXPECT_NE(merged.find("model.layers.0.self_attn.qkv_proj.weight"), nullptr);
  EXPECT_EQ(merged.find("model.layers.0.self_attn.q_proj.weight"), nullptr);
  const Result gen_merged = run(
      {"generate", "--model", (dir_ / "merged").string(), "--prompt", "the quick", "--max-new-tokens", "8"});
  const Result gen_adapter = run({"generate", "--model", model, "--adapter", (dir_ / "run").string(),
                                  "--prompt", "the quick", "--max-new-tokens", "8"});
  ASSERT_EQ(gen_merged.status, 0) << gen_merged.err;
  ASSERT_EQ(gen_adapter.status, 0) << gen_adapter.err;
  EXPECT_EQ(gen_merged.out, gen_adapter.out);

  // Phi-3's residual dropout is refused by name, as attention dropout is.
  std::ifstream in(dir_ / "model" / "config.json");
  nlohmann::json c = nlohmann::json::parse(in);
  c["resid_pdrop"] = 0.1;
  std::ofstream(dir_ / "model" / "config.json") << c.dump(2) << "\n";
  r = run(finetune_args("dropout", 2));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("sets resid_pdrop 0.1"), std::string::npos) << r.err;
}
