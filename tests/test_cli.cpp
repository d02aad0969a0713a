// The tightfit binary end to end: exit codes and error lines, a run killed with SIGKILL and resumed
// reproducing the uninterrupted losses bit for bit, SIGTERM stopping cleanly, checkpoint rotation,
// resume refusing a changed config, and the exports; that exports and init replace only what
// tightfit wrote unless told to.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "src/io/gguf.h"
#include "src/io/safetensors.h"
#include "tests/cli_test_util.h"

namespace fs = std::filesystem;

using namespace tf::test;

TEST_F(Cli, UserErrorsExitOneWithOneErrorLine) {
  make_model_and_data();
  const std::vector<std::vector<std::string>> cases = {
      {"finetune", "--data", "x.jsonl", "--out", "r"},  // missing --model
      {"finetune", "--model", "/nonexistent", "--data", "x", "--out", (dir_ / "r1").string()},
      {"generate", "--model", (dir_ / "model").string()},  // missing --prompt
      {"inspect", (dir_ / "train.jsonl").string()},        // not a model
      {"bogus-subcommand"},
      {"finetune", "--model", (dir_ / "model").string(), "--data", (dir_ / "train.jsonl").string(), "--out",
       (dir_ / "r2").string(), "--lora-targets", "q,nonsense"},
      {"export", "--run", (dir_ / "nothing").string(), "--out", (dir_ / "x").string()},
  };
  for (const auto& args : cases) {
    const Result r = run(args);
    EXPECT_EQ(r.status, 1) << args[0] << " " << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // A malformed dataset line is named by file and line.
  std::ofstream(dir_ / "bad.jsonl") << "{\"text\": \"fine\"}\n{\"text\": 5}\n";
  const Result r = run({"finetune", "--model", (dir_ / "model").string(), "--data",
                        (dir_ / "bad.jsonl").string(), "--out", (dir_ / "r3").string(), "--steps", "1"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("bad.jsonl:2"), std::string::npos) << r.err;
}

TEST_F(Cli, KilledRunResumesToTheSameLossesBitForBit) {
  make_model_and_data();
  constexpr int kSteps = 10;
  ASSERT_EQ(run(finetune_args("straight", kSteps)).status, 0) << slurp(dir_ / "stderr");
  const std::vector<double> want = losses(dir_ / "straight" / "metrics.jsonl");
  ASSERT_EQ(want.size(), size_t(kSteps));

  // Kill with SIGKILL once a few steps are logged: mid-step or mid-checkpoint, wherever it is.
  const pid_t pid = spawn(finetune_args("killed", kSteps), dir_ / "k.out", dir_ / "k.err");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (losses(dir_ / "killed" / "metrics.jsonl").size() < 4 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kill(pid, SIGKILL);
  EXPECT_EQ(wait_status(pid), 128 + SIGKILL);
  ASSERT_LT(losses(dir_ / "killed" / "metrics.jsonl").size(), size_t(kSteps))
      << "the run finished before the kill";

  std::vector<std::string> resume = finetune_args("killed", kSteps);
  resume.push_back("--resume");
  const Result r = run(resume);
  ASSERT_EQ(r.status, 0) << r.err;
  const std::vector<double> got = losses(dir_ / "killed" / "metrics.jsonl");
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], want[i]) << "step " << i;

  // Rotation kept the newest --keep checkpoints only.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir_ / "killed" / "checkpoints"))
    names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"step-10", "step-9"}));
}

TEST_F(Cli, SigtermStopsAfterTheStepWithACheckpoint) {
  make_model_and_data();
  std::vector<std::string> args = finetune_args("term", 400);
  args[args.size() - 5] = "0";  // --save-every 0: the only checkpoint is the one the signal makes
  const pid_t pid = spawn(args, dir_ / "t.out", dir_ / "t.err");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (losses(dir_ / "term" / "metrics.jsonl").size() < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kill(pid, SIGTERM);
  EXPECT_EQ(wait_status(pid), 0) << slurp(dir_ / "t.err");
  const size_t done = losses(dir_ / "term" / "metrics.jsonl").size();
  EXPECT_TRUE(fs::exists(dir_ / "term" / "checkpoints" / ("step-" + std::to_string(done)))) << done;
  EXPECT_NE(slurp(dir_ / "t.out").find("--resume"), std::string::npos);
}

TEST_F(Cli, ResumeRefusesAChangedConfig) {
  make_model_and_data();
  ASSERT_EQ(run(finetune_args("run", 2)).status, 0);
  std::vector<std::string> changed = finetune_args("run", 2);
  changed.push_back("--resume");
  changed.push_back("--lr");
  changed.push_back("1e-2");
  const Result r = run(changed);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("lr"), std::string::npos) << r.err;
  // Starting a new run over an existing one is refused too.
  EXPECT_EQ(run(finetune_args("run", 2)).status, 1);
}

TEST_F(Cli, ConfigFileSuppliesOptionsAndRunWritesItsFiles) {
  make_model_and_data();
  std::ofstream(dir_ / "run.json") << nlohmann::json{
      {"model", (dir_ / "model").string()},
      {"data", (dir_ / "train.jsonl").string()},
      {"steps", 3},
      {"seq_len", 48},
      {"micro_batch", 2},
      {"lora_rank", 4},
      {"pack", false},
      {"threads", 1}}.dump();
  const Result r = run({"finetune", "--config", (dir_ / "run.json").string(), "--out",
                        (dir_ / "cfg").string(), "--lora-rank", "2"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto cfg = nlohmann::json::parse(slurp(dir_ / "cfg" / "config.json"));
  EXPECT_EQ(cfg["steps"], 3);
  EXPECT_EQ(cfg["lora_rank"], 2);  // the command line overrides the file
  EXPECT_EQ(cfg["pack"], false);
  for (const char* f :
       {"metrics.jsonl", "report.html", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"})
    EXPECT_TRUE(fs::exists(dir_ / "cfg" / f)) << f;
  EXPECT_NE(slurp(dir_ / "cfg" / "report.html").find("<svg"), std::string::npos);
}

TEST_F(Cli, ExportsRoundTripThroughOurReaders) {
  make_model_and_data();
  ASSERT_EQ(run(finetune_args("run", 2)).status, 0);
  ASSERT_EQ(
      run({"export", "--run", (dir_ / "run").string(), "--format", "peft", "--out", (dir_ / "peft").string()})
          .status,
      0);
  const auto peft = tf::io::SafetensorsFile::open((dir_ / "peft" / "adapter_model.safetensors").string());
  const auto& a = peft.get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{4, 64}));
  const auto& b = peft.get("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
  EXPECT_EQ(b.shape, (std::vector<int64_t>{64, 4}));

  ASSERT_EQ(run({"export", "--run", (dir_ / "run").string(), "--format", "gguf", "--out",
                 (dir_ / "a.gguf").string()})
                .status,
            0);
  const auto g = tf::io::GgufFile::open((dir_ / "a.gguf").string());
  EXPECT_EQ(g.get_string("general.type"), "adapter");
  EXPECT_EQ(g.get_string("adapter.type"), "lora");
  EXPECT_NE(g.find_tensor("blk.1.ffn_down.weight.lora_b"), nullptr);

  ASSERT_EQ(run({"export", "--run", (dir_ / "run").string(), "--format", "merged", "--out",
                 (dir_ / "merged").string()})
                .status,
            0);
  const Result gen_merged = run(
      {"generate", "--model", (dir_ / "merged").string(), "--prompt", "the quick", "--max-new-tokens", "8"});
  const Result gen_adapter = run({"generate", "--model", (dir_ / "model").string(), "--adapter",
                                  (dir_ / "run").string(), "--prompt", "the quick", "--max-new-tokens", "8"});
  ASSERT_EQ(gen_merged.status, 0) << gen_merged.err;
  ASSERT_EQ(gen_adapter.status, 0) << gen_adapter.err;
  // Merging W + scale*B*A is exact up to f32 rounding; greedy tokens of a tiny model agree.
  EXPECT_EQ(gen_merged.out, gen_adapter.out);
}

namespace {

// Every file under `root` (relative path -> size and hash of its bytes) and every directory
// (relative path -> "<dir>").
std::map<std::string, std::string> tree(const fs::path& root) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    const std::string rel = fs::relative(e.path(), root).string();
    if (e.is_directory()) {
      out[rel] = "<dir>";
    } else {
      const std::string bytes = slurp(e.path());
      out[rel] =
          std::to_string(bytes.size()) + " bytes, hash " + std::to_string(std::hash<std::string>()(bytes));
    }
  }
  return out;
}

std::set<std::string> names(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

void write_notes(const fs::path& dir) {
  fs::create_directories(dir);
  std::ofstream(dir / "notes.txt") << "my notes\n";
}

}  // namespace

TEST_F(Cli, ExportsReplaceOnlyTheirOwnPreviousOutput) {
  make_model_and_data();
  ASSERT_EQ(run(finetune_args("run", 2)).status, 0);
  const auto export_to = [&](const std::string& format, const fs::path& out, bool force) {
    std::vector<std::string> a = {"export", "--run",     (dir_ / "run").string(), "--format", format,
                                  "--out",  out.string()};
    if (force) a.push_back("--force");
    return run(a);
  };
  for (const std::string format : {"peft", "merged"}) {
    const fs::path out = dir_ / format;
    write_notes(out);
    Result r = export_to(format, out, false);
    EXPECT_EQ(r.status, 1) << format;
    EXPECT_NE(r.err.find("notes.txt"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
    EXPECT_EQ(names(out), std::set<std::string>{"notes.txt"}) << format;
    // --force replaces the directory whole; a previous export is replaced without it.
    r = export_to(format, out, true);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_FALSE(fs::exists(out / "notes.txt")) << format;
    r = export_to(format, out, false);
    EXPECT_EQ(r.status, 0) << r.err;
  }
  EXPECT_TRUE(fs::exists(dir_ / "peft" / "adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(dir_ / "merged" / "model.safetensors"));

  const fs::path gguf = dir_ / "a.gguf";
  std::ofstream(gguf) << "my file\n";
  Result r = export_to("gguf", gguf, false);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  EXPECT_EQ(slurp(gguf), "my file\n");
  r = export_to("gguf", gguf, true);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(tf::io::GgufFile::open(gguf.string()).get_string("general.type"), "adapter");
  r = export_to("gguf", gguf, false);
  EXPECT_EQ(r.status, 0) << r.err;

  // No temporary is left beside the outputs.
  for (const std::string& n : names(dir_)) EXPECT_NE(n[0], '.') << n;
}

TEST_F(Cli, InitRefusesADirectoryThatIsNotEmpty) {
  make_model_and_data();
  const fs::path model = dir_ / "model";
  const auto before = tree(model);
  const std::vector<std::string> init = {"init", "--config", "tiny", "--out", model.string(), "--seed", "4"};
  Result r = run(init);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  EXPECT_EQ(tree(model), before);

  std::ofstream(model / "notes.txt") << "mine\n";
  std::vector<std::string> forced = init;
  forced.push_back("--force");
  r = run(forced);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(tree(model).at("model.safetensors"), before.at("model.safetensors"));
  EXPECT_FALSE(fs::exists(model / "notes.txt"));  // replaced whole

  fs::create_directories(dir_ / "empty");
  EXPECT_EQ(run({"init", "--config", "tiny", "--out", (dir_ / "empty").string()}).status, 0);
}
