// Tests: checkpoints of a run: bit-exact round trips, rotation, crashes inside a save (through the
// fault hook), damaged checkpoints, and refused resumes.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/train/checkpoint.h"
#include "tests/model_test_util.h"
#include "tests/test_util.h"

namespace tf {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::TempDir;

LoraConfig lora_cfg(int rank = 4, uint32_t targets = (1u << kLoraTargetCount) - 1) {
  LoraConfig c;
  c.rank = rank;
  c.targets = targets;
  c.seed = 7;
  return c;
}

// Distinct values in all three buffers, so a swap of params and moments or of two adapters shows.
void fill(LoraState& s, uint64_t seed) {
  DeviceMem* bufs[3] = {&s.params, &s.adam_m, &s.adam_v};
  for (int b = 0; b < 3; ++b) {
    const Philox rng(seed, uint64_t(b));
    float* p = bufs[b]->as<float>();
    for (int64_t i = 0; i < s.n_params; ++i) p[i] = rng.normal(uint64_t(i));
  }
}

bool same_bits(const LoraState& a, const LoraState& b) {
  return a.n_params == b.n_params && std::memcmp(a.params.data(), b.params.data(), a.params.bytes()) == 0 &&
         std::memcmp(a.adam_m.data(), b.adam_m.data(), a.adam_m.bytes()) == 0 &&
         std::memcmp(a.adam_v.data(), b.adam_v.data(), a.adam_v.bytes()) == 0;
}

CheckpointMeta meta(const std::string& hash = "h1",
                    const std::string& config = R"({"lr":0.001,"lora_rank":4})") {
  CheckpointMeta m;
  m.config_hash = hash;
  m.config_json = config;
  m.data_cursor = R"({"epoch":1,"position":17})";
  m.seed = 1234;
  return m;
}

TrainerState trainer_at(int64_t step) {
  return TrainerState{step, step - 1, 1, 0};
}

TEST(Checkpoint, RoundTripIsBitExact) {
  TempDir run;
  const LlamaConfig model = test::tiny_config();
  LoraState saved(model, lora_cfg());
  fill(saved, 1);
  const std::string path = save_checkpoint(run.str(), saved, trainer_at(12), meta(), 3);
  EXPECT_EQ(fs::path(path).filename(), "step-12");

  LoraState loaded(model, lora_cfg());
  ASSERT_FALSE(same_bits(saved, loaded));
  const LoadedCheckpoint ck = load_checkpoint(path, "h1", meta().config_json, loaded);
  EXPECT_TRUE(same_bits(saved, loaded));
  EXPECT_EQ(ck.trainer.step, 12);
  EXPECT_EQ(ck.trainer.adam_steps, 11);
  EXPECT_EQ(ck.trainer.skipped_total, 1);
  EXPECT_EQ(ck.trainer.consecutive_skips, 0);
  EXPECT_EQ(ck.seed, 1234u);
  EXPECT_EQ(nlohmann::json::parse(ck.data_cursor), nlohmann::json::parse(meta().data_cursor));

  const auto latest = latest_checkpoint(run.str());
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 12);
  // Nothing of the write is left beside it.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(run.dir / "checkpoints")) ++entries;
  EXPECT_EQ(entries, 1);
}

TEST(Checkpoint, KeepsTheNewest) {
  TempDir run;
  LoraState s(test::tiny_config(), lora_cfg());
  for (int64_t step : {10, 20, 30, 40}) {
    fill(s, uint64_t(step));
    save_checkpoint(run.str(), s, trainer_at(step), meta(), 2);
  }
  const auto all = list_checkpoints(run.str());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].step, 30);
  EXPECT_EQ(all[1].step, 40);
  // Resuming from 30 and saving at 35 supersedes 40, which belonged to the abandoned continuation.
  save_checkpoint(run.str(), s, trainer_at(35), meta(), 2);
  const auto after = list_checkpoints(run.str());
  ASSERT_EQ(after.size(), 2u);
  EXPECT_EQ(after[0].step, 30);
  EXPECT_EQ(after[1].step, 35);
  EXPECT_EQ(latest_checkpoint(run.str())->step, 35);
  EXPECT_NE(error_of([&] { save_checkpoint(run.str(), s, trainer_at(36), meta(), 0); }).find("at least 1"),
            std::string::npos);
}

// Every file of a directory, name -> bytes.
std::map<std::string, std::string> contents(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    out[e.path().filename().string()] = {std::istreambuf_iterator<char>(in),
                                         std::istreambuf_iterator<char>()};
  }
  return out;
}

// A crash inside save_checkpoint at the named stage, through the fault hook; the hook is unset again
// when the guard goes.
struct CrashAt {
  static inline std::string stage;
  explicit CrashAt(std::string s) {
    stage = std::move(s);
    checkpoint_fault_hook = [](const char* at) {
      if (stage == at) throw std::runtime_error(std::string("simulated crash at ") + at);
    };
  }
  ~CrashAt() { checkpoint_fault_hook = nullptr; }
  CrashAt(const CrashAt&) = delete;
  CrashAt& operator=(const CrashAt&) = delete;
};

TEST(Checkpoint, CrashMidSaveLeavesThePreviousOneUsable) {
  TempDir run;
  const LlamaConfig model = test::tiny_config();
  LoraState at10(model, lora_cfg()), at20(model, lora_cfg()), later(model, lora_cfg());
  fill(at10, 1);
  fill(at20, 2);
  fill(later, 3);
  const fs::path ckpts = run.dir / "checkpoints";
  save_checkpoint(run.str(), at10, trainer_at(10), meta(), 5);
  save_checkpoint(run.str(), at20, trainer_at(20), meta(), 5);
  const auto step20 = contents(ckpts / "step-20");

  const auto expect_resumes_from = [&](int64_t step, const LoraState& want, const std::string& what) {
    const auto latest = latest_checkpoint(run.str());
    ASSERT_TRUE(latest.has_value()) << what;
    EXPECT_EQ(latest->step, step) << what;
    LoraState resumed(model, lora_cfg());
    load_checkpoint(latest->path, "h1", meta().config_json, resumed);
    EXPECT_TRUE(same_bits(want, resumed)) << what;
  };
  for (const char* stage : {"tensors written", "state written"}) {
    // A new step: nothing of it may appear under its name.
    {
      CrashAt crash(stage);
      EXPECT_THROW(save_checkpoint(run.str(), later, trainer_at(30), meta(), 1), std::runtime_error);
    }
    EXPECT_FALSE(fs::exists(ckpts / "step-30")) << stage;
    expect_resumes_from(20, at20, stage);
    // A step that exists (a continuation abandoned after resuming from 10 saves step 20 again): the
    // old one must survive whole until the new one replaces it.
    {
      CrashAt crash(stage);
      EXPECT_THROW(save_checkpoint(run.str(), later, trainer_at(20), meta(), 1), std::runtime_error);
    }
    EXPECT_TRUE(contents(ckpts / "step-20") == step20) << stage << ": step-20 was changed";
    expect_resumes_from(20, at20, stage);
    EXPECT_TRUE(fs::exists(ckpts / "step-10")) << stage;
  }
  const auto entries = [&] {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(ckpts)) names.insert(e.path().filename().string());
    return names;
  };
  EXPECT_EQ(entries().size(), 3u) << "the crashed save's temporary directory is left";

  // Once renamed, the new checkpoint is the one picked, and older ones are removed only after that.
  // This save also clears the temporary directory the crashed one left.
  {
    CrashAt crash("committed");
    EXPECT_THROW(save_checkpoint(run.str(), later, trainer_at(30), meta(), 1), std::runtime_error);
  }
  expect_resumes_from(30, later, "committed");
  EXPECT_EQ(entries(), (std::set<std::string>{"step-10", "step-20", "step-30"}));

  save_checkpoint(run.str(), later, trainer_at(40), meta(), 1);
  EXPECT_EQ(entries(), std::set<std::string>{"step-40"});

  // A crash while rotation removes an old checkpoint (a kill -9 in the middle of remove_all): what
  // is left is no step-N, so nothing half-deleted is ever listed, and the next save removes it.
  {
    CrashAt crash("retired");
    EXPECT_THROW(save_checkpoint(run.str(), later, trainer_at(50), meta(), 1), std::runtime_error);
  }
  expect_resumes_from(50, later, "retired");
  EXPECT_EQ(list_checkpoints(run.str()).size(), 1u);
  EXPECT_EQ(entries().size(), 2u) << "the checkpoint being removed is kept under a temporary name";
  save_checkpoint(run.str(), later, trainer_at(60), meta(), 1);
  EXPECT_EQ(entries(), std::set<std::string>{"step-60"});
}

TEST(Checkpoint, DamagedCheckpointsAreNeverPicked) {
  TempDir run;
  const LlamaConfig model = test::tiny_config();
  LoraState good(model, lora_cfg());
  fill(good, 1);
  save_checkpoint(run.str(), good, trainer_at(10), meta(), 5);
  LoraState later(model, lora_cfg());
  fill(later, 2);
  const fs::path ckpts = run.dir / "checkpoints";

  // Damage after the commit (a disk fault, a copy cut short): truncated tensors, a flipped byte, no
  // state.json.
  save_checkpoint(run.str(), later, trainer_at(20), meta(), 5);
  const fs::path t20 = ckpts / "step-20" / "lora.safetensors";
  fs::resize_file(t20, fs::file_size(t20) / 2);
  save_checkpoint(run.str(), later, trainer_at(30), meta(), 5);
  {
    std::fstream f(ckpts / "step-30" / "lora.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  save_checkpoint(run.str(), later, trainer_at(40), meta(), 5);
  fs::remove(ckpts / "step-40" / "state.json");

  std::vector<std::string> rejected;
  const auto latest = latest_checkpoint(run.str(), &rejected);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 10);
  ASSERT_EQ(rejected.size(), 3u);
  EXPECT_NE(rejected[0].find("state.json: missing"), std::string::npos) << rejected[0];
  EXPECT_NE(rejected[1].find("checksum mismatch"), std::string::npos) << rejected[1];
  EXPECT_NE(rejected[2].find("truncated"), std::string::npos) << rejected[2];

  LoraState resumed(model, lora_cfg());
  load_checkpoint(latest->path, "h1", meta().config_json, resumed);
  EXPECT_TRUE(same_bits(good, resumed));
  // Loading a damaged one directly is refused too.
  EXPECT_NE(
      error_of([&] { load_checkpoint((ckpts / "step-30").string(), "h1", "", resumed); }).find("checksum"),
      std::string::npos);
  EXPECT_TRUE(same_bits(good, resumed));

  // The next save of step 20 replaces the damaged one.
  save_checkpoint(run.str(), later, trainer_at(20), meta(), 5);
  EXPECT_EQ(latest_checkpoint(run.str())->step, 20);
  LoraState again(model, lora_cfg());
  load_checkpoint((ckpts / "step-20").string(), "h1", "", again);
  EXPECT_TRUE(same_bits(later, again));
}

TEST(Checkpoint, ConfigChangeIsRefusedNamingTheOption) {
  TempDir run;
  const LlamaConfig model = test::tiny_config();
  LoraState s(model, lora_cfg());
  fill(s, 1);
  const std::string path = save_checkpoint(run.str(), s, trainer_at(5), meta(), 1);
  LoraState other(model, lora_cfg());
  fill(other, 2);
  const std::string msg =
      error_of([&] { load_checkpoint(path, "h2", R"({"lr":0.002,"lora_rank":4,"pack":true})", other); });
  EXPECT_NE(msg.find("configuration changed"), std::string::npos) << msg;
  EXPECT_NE(msg.find("lr: 0.001 -> 0.002"), std::string::npos) << msg;
  EXPECT_NE(msg.find("pack: (absent) -> true"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("lora_rank"), std::string::npos) << msg;
  // Without a config JSON the message still says what differs.
  const std::string bare = error_of([&] { load_checkpoint(path, "h2", "", other); });
  EXPECT_NE(bare.find("config hash h1 -> h2"), std::string::npos) << bare;
  LoraState untouched(model, lora_cfg());
  fill(untouched, 2);
  EXPECT_TRUE(same_bits(other, untouched));
}

TEST(Checkpoint, LayoutChangeIsRefused) {
  TempDir run;
  const LlamaConfig model = test::tiny_config();
  LoraState s(model, lora_cfg(4));
  fill(s, 1);
  const std::string path = save_checkpoint(run.str(), s, trainer_at(5), meta(), 1);

  LoraState rank8(model, lora_cfg(8));
  const std::string rank_msg = error_of([&] { load_checkpoint(path, "h1", "", rank8); });
  EXPECT_NE(rank_msg.find("LoRA rank 4 but this run uses rank 8"), std::string::npos) << rank_msg;

  LoraState qv(model, lora_cfg(4, (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::V))));
  const std::string tgt_msg = error_of([&] { load_checkpoint(path, "h1", "", qv); });
  EXPECT_NE(tgt_msg.find("[\"q_proj\",\"v_proj\"]"), std::string::npos) << tgt_msg;

  LlamaConfig deeper = model;
  deeper.n_layers = 3;
  LoraState deep(deeper, lora_cfg(4));
  const std::string layer_msg = error_of([&] { load_checkpoint(path, "h1", "", deep); });
  EXPECT_NE(layer_msg.find("2 layers, this one has 3"), std::string::npos) << layer_msg;

  LlamaConfig wider = model;
  wider.intermediate = 96;
  LoraState wide(wider, lora_cfg(4));
  const std::string shape_msg = error_of([&] { load_checkpoint(path, "h1", "", wide); });
  EXPECT_NE(shape_msg.find("gate_proj.B is F32 [64, 4] but this run's layout needs F32 [96, 4]"),
            std::string::npos)
      << shape_msg;
}

TEST(Checkpoint, BadInputsAreRefused) {
  TempDir run;
  LoraState s(test::tiny_config(), lora_cfg());
  CheckpointMeta bad = meta();
  bad.data_cursor = "{not json";
  EXPECT_NE(error_of([&] { save_checkpoint(run.str(), s, trainer_at(1), bad, 1); }).find("data cursor"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_checkpoint(run.str(), "h1", "", s); }).find("expected a name step-N"),
            std::string::npos);
  EXPECT_FALSE(latest_checkpoint(run.str()).has_value());
}

}  // namespace
}  // namespace tf
