// The tightfit binary end to end: exit codes and error lines, a run killed with SIGKILL and resumed
// reproducing the uninterrupted losses bit for bit, SIGTERM stopping cleanly, checkpoint rotation,
// resume refusing a changed config, and the exports; that no command replaces or deletes files it
// did not write (run directories, checkpoints, adapters, exports, init), one process per run
// directory, runs stopped before their first checkpoint, paths stored absolute, diverging runs.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
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
  expect_killed_run_resumes_bit_for_bit(10, "1");

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
  const Result gen_adapter =
      run({"generate", "--model", (dir_ / "model").string(), "--adapter", (dir_ / "run").string(), "--prompt",
           "the quick", "--max-new-tokens", "8", "--stats"});
  ASSERT_EQ(gen_merged.status, 0) << gen_merged.err;
  ASSERT_EQ(gen_adapter.status, 0) << gen_adapter.err;
  // --stats reports on stderr, leaving the text on stdout as it is.
  EXPECT_TRUE(std::regex_search(gen_adapter.err, std::regex("prompt +[1-9][0-9]* tokens in [0-9.]+ s")))
      << gen_adapter.err;
  std::smatch counts;
  ASSERT_TRUE(std::regex_search(gen_adapter.err, counts,
                                std::regex("generated +([0-9]+) tokens; the ([0-9]+) after")))
      << gen_adapter.err;
  EXPECT_GE(std::stoi(counts[1]), 1);
  EXPECT_EQ(std::stoi(counts[2]), std::stoi(counts[1]) - 1);
  EXPECT_EQ(gen_merged.err.find("generated"), std::string::npos) << "--stats is off by default";
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

// Makes a finished run look as if it had been killed right after writing checkpoint `step`.
void unfinish(const fs::path& run, int step) {
  fs::remove_all(run / "adapter");
  fs::remove(run / "report.html");
  for (const auto& e : fs::directory_iterator(run / "checkpoints")) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step-", 0) == 0 && std::stoi(name.substr(5)) > step) fs::remove_all(e.path());
  }
}

void write_notes(const fs::path& dir) {
  fs::create_directories(dir);
  std::ofstream(dir / "notes.txt") << "my notes\n";
}

}  // namespace

TEST_F(Cli, FreshRunRefusesADirectoryThatIsNotARunAndTouchesNothing) {
  make_model_and_data();
  const fs::path mine = dir_ / "mine";
  write_notes(mine / "adapter");
  write_notes(mine / "checkpoints" / "step-1");
  std::ofstream(mine / "report.html") << "<p>my report</p>\n";
  std::ofstream(mine / "metrics.jsonl") << "{\"mine\": 1}\n";
  const auto before = tree(mine);
  const Result r = run(finetune_args("mine", 2));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("not a tightfit run"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("adapter"), std::string::npos) << r.err;  // what is there
  EXPECT_NE(r.err.find("empty or new --out"), std::string::npos) << r.err;
  EXPECT_EQ(tree(mine), before);

  // A model directory has a config.json too, but not a run's.
  const auto model = tree(dir_ / "model");
  const Result m = run(finetune_args("model", 2));
  EXPECT_EQ(m.status, 1);
  EXPECT_NE(m.err.find("not a tightfit run"), std::string::npos) << m.err;
  EXPECT_EQ(tree(dir_ / "model"), model);

  fs::create_directories(dir_ / "empty");
  EXPECT_EQ(run(finetune_args("empty", 2)).status, 0);
}

TEST_F(Cli, ResumedRunTouchesOnlyFilesItWrote) {
  make_model_and_data();
  std::vector<std::string> args = finetune_args("run", 4);
  set_option(args, "--keep", "10");
  ASSERT_EQ(run(args).status, 0);
  const fs::path runp = dir_ / "run", ck = runp / "checkpoints";
  unfinish(runp, 2);
  for (const char* d : {"step-0", "step-9", ".tmp-notes", "step-3"}) write_notes(ck / d);
  write_notes(runp / "adapter");
  std::vector<std::string> resume = args;
  set_option(resume, "--keep", "1");
  resume.push_back("--resume");
  const auto without_lock = [&] {
    auto t = tree(runp);
    t.erase(".lock");
    return t;
  };

  // An adapter/ the run did not write is refused before any work.
  const auto before = without_lock();
  Result r = run(resume);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("adapter"), std::string::npos) << r.err;
  EXPECT_EQ(without_lock(), before);
  fs::remove_all(runp / "adapter");

  // So is a step-3 folder of someone else's where this run's next checkpoint goes.
  r = run(resume);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("step-3"), std::string::npos) << r.err;
  EXPECT_EQ(slurp(ck / "step-3" / "notes.txt"), "my notes\n");
  fs::remove_all(ck / "step-3");

  // Rotation (--keep 1) removes the run's own older checkpoints only.
  r = run(resume);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(names(ck), (std::set<std::string>{".tmp-notes", "step-0", "step-4", "step-9"}));
  for (const char* d : {"step-0", "step-9", ".tmp-notes"})
    EXPECT_EQ(slurp(ck / d / "notes.txt"), "my notes\n") << d;
  EXPECT_TRUE(fs::exists(runp / "adapter" / "adapter_model.safetensors"));
}

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

TEST_F(Cli, OneProcessPerRunDirectory) {
  make_model_and_data();
  constexpr int kSteps = 60;
  const std::vector<std::string> args = finetune_args("run", kSteps);
  const pid_t a = spawn(args, dir_ / "a.out", dir_ / "a.err");
  const pid_t b = spawn(args, dir_ / "b.out", dir_ / "b.err");
  // While one of them trains, a --resume of the directory is refused as well.
  const fs::path metrics = dir_ / "run" / "metrics.jsonl";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (losses(metrics).empty() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::vector<std::string> resume = args;
  resume.push_back("--resume");
  const Result c = run(resume);

  const int sa = wait_status(a), sb = wait_status(b);
  ASSERT_EQ(std::min(sa, sb), 0) << slurp(dir_ / "a.err") << slurp(dir_ / "b.err");
  ASSERT_EQ(std::max(sa, sb), 1) << slurp(dir_ / "a.err") << slurp(dir_ / "b.err");
  const std::string holder = "pid " + std::to_string(sa == 0 ? a : b);
  const std::string loser = slurp(sa == 0 ? dir_ / "b.err" : dir_ / "a.err");
  EXPECT_NE(loser.find(holder), std::string::npos) << loser;
  EXPECT_EQ(c.status, 1);
  EXPECT_NE(c.err.find(holder), std::string::npos) << c.err;

  // Only the winner wrote metrics: every step once, in order.
  std::vector<int64_t> steps;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("step")) steps.push_back(j["step"].get<int64_t>());
  }
  ASSERT_EQ(steps.size(), size_t(kSteps));
  for (int i = 0; i < kSteps; ++i) EXPECT_EQ(steps[size_t(i)], i);
}

// The moment between a starting run's lock and its config.json: the directory holds only .lock and
// config.json's temporary. A second process must be told who holds the run, not that the directory
// is someone else's.
TEST_F(Cli, ARunBeingStartedIsReportedAsInUse) {
  make_model_and_data();
  fs::create_directories(dir_ / "run");
  const int fd = ::open((dir_ / "run" / ".lock").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  const std::string pid = std::to_string(::getpid());
  ASSERT_EQ(::write(fd, pid.data(), pid.size()), ssize_t(pid.size()));
  std::ofstream(dir_ / "run" / ".config.json.tmp.Ab12Cd") << "{";
  const Result r = run(finetune_args("run", 2));
  ::close(fd);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("in use by another tightfit process (pid " + pid + ")"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "run" / "config.json"));
}

TEST_F(Cli, RunStoppedBeforeItsFirstCheckpointResumes) {
  make_model_and_data();
  // SIGTERM during the evaluation before training (a long one: 1000 examples).
  {
    std::ofstream eval(dir_ / "eval.jsonl");
    for (int i = 0; i < 1000; ++i)
      eval << nlohmann::json{{"text", "a held-out sentence number " + std::to_string(i)}}.dump() << "\n";
  }
  std::vector<std::string> args = finetune_args("eval", 3);
  set_option(args, "--eval-data", (dir_ / "eval.jsonl").string());
  // The header ("data: ...") is printed right before the evaluation.
  const auto wait_for = [&](const fs::path& file, const std::string& text) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (slurp(file).find(text) == std::string::npos && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  };
  const pid_t pid = spawn(args, dir_ / "t.out", dir_ / "t.err");
  wait_for(dir_ / "t.out", "\ndata: ");
  kill(pid, SIGTERM);
  EXPECT_EQ(wait_status(pid), 0) << slurp(dir_ / "t.err");
  const std::string out = slurp(dir_ / "t.out");
  EXPECT_NE(out.find("nothing was trained yet"), std::string::npos) << out;
  EXPECT_NE(out.find("--resume"), std::string::npos) << out;
  EXPECT_TRUE(losses(dir_ / "eval" / "metrics.jsonl").empty());
  EXPECT_FALSE(fs::exists(dir_ / "eval" / "checkpoints"));
  args.push_back("--resume");
  Result r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(losses(dir_ / "eval" / "metrics.jsonl").size(), 3u);

  // A second signal, once the first is acknowledged, stops at once.
  std::vector<std::string> twice = finetune_args("twice", 3);
  set_option(twice, "--eval-data", (dir_ / "eval.jsonl").string());
  const pid_t p2 = spawn(twice, dir_ / "t2.out", dir_ / "t2.err");
  wait_for(dir_ / "t2.out", "\ndata: ");
  kill(p2, SIGTERM);
  wait_for(dir_ / "t2.err", "a second signal stops at once");
  kill(p2, SIGTERM);
  EXPECT_EQ(wait_status(p2), 128 + SIGTERM) << slurp(dir_ / "t2.out");

  // SIGKILL before the first checkpoint (--save-every 0): --resume starts again from step 0 and
  // writes what an uninterrupted run writes.
  constexpr int kSteps = 200;
  std::vector<std::string> straight = finetune_args("straight", kSteps);
  set_option(straight, "--save-every", "0");
  ASSERT_EQ(run(straight).status, 0);
  const std::vector<double> want = losses(dir_ / "straight" / "metrics.jsonl");
  std::vector<std::string> killed = finetune_args("killed", kSteps);
  set_option(killed, "--save-every", "0");
  const pid_t k = spawn(killed, dir_ / "k.out", dir_ / "k.err");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (losses(dir_ / "killed" / "metrics.jsonl").size() < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  kill(k, SIGKILL);
  EXPECT_EQ(wait_status(k), 128 + SIGKILL);
  ASSERT_FALSE(fs::exists(dir_ / "killed" / "adapter")) << "the run finished before the kill";
  killed.push_back("--resume");
  r = run(killed);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(losses(dir_ / "killed" / "metrics.jsonl"), want);

  // Resuming a finished run says so and changes nothing.
  auto before = tree(dir_ / "killed");
  before.erase(".lock");
  r = run(killed);
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("finished"), std::string::npos) << r.out;
  auto after = tree(dir_ / "killed");
  after.erase(".lock");
  EXPECT_EQ(after, before);
}

TEST_F(Cli, RunsStoreAbsolutePathsAndResumeByFileIdentity) {
  make_model_and_data();
  const std::vector<std::string> rel = {
      "finetune", "--model",     "model", "--data",       "train.jsonl", "--out",
      "run",      "--steps",     "4",     "--seq-len",    "48",          "--micro-batch",
      "2",        "--lora-rank", "4",     "--save-every", "1",           "--keep",
      "10",       "--threads",   "1"};
  ASSERT_EQ(run(rel, dir_).status, 0) << slurp(dir_ / "stderr");
  const fs::path canon = fs::weakly_canonical(dir_);
  const auto cfg = nlohmann::json::parse(slurp(dir_ / "run" / "config.json"));
  EXPECT_EQ(cfg["model"], (canon / "model").string());
  EXPECT_EQ(cfg["data"], (canon / "train.jsonl").string());
  EXPECT_EQ(cfg["out"], (canon / "run").string());

  // Exported from another working directory.
  const fs::path elsewhere = dir_ / "elsewhere";
  fs::create_directories(elsewhere);
  Result r =
      run({"export", "--run", (dir_ / "run").string(), "--format", "peft", "--out", "peft"}, elsewhere);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::exists(elsewhere / "peft" / "adapter_model.safetensors"));

  // Resumed, from elsewhere, with absolute paths to the same files.
  std::vector<std::string> abs = rel;
  set_option(abs, "--model", (dir_ / "model").string());
  set_option(abs, "--data", (dir_ / "train.jsonl").string());
  set_option(abs, "--out", (dir_ / "run").string());
  abs.push_back("--resume");
  unfinish(dir_ / "run", 2);
  r = run(abs, elsewhere);
  ASSERT_EQ(r.status, 0) << r.err;

  // Older versions stored the paths as given, relative to where the run was started, and hashed
  // them so into every checkpoint (FNV-1a 64 of the config's JSON text, in hex). Such a run still
  // resumes from there, given absolute paths to the same files.
  const auto old_style = [](nlohmann::json& c) {
    c["model"] = "model";
    c["data"] = "train.jsonl";
  };
  auto old_cfg = cfg;
  old_style(old_cfg);
  old_cfg["out"] = "run";
  std::ofstream(dir_ / "run" / "config.json") << old_cfg.dump(2) << "\n";
  for (const auto& e : fs::directory_iterator(dir_ / "run" / "checkpoints")) {
    auto state = nlohmann::json::parse(slurp(e.path() / "state.json"));
    old_style(state["config"]);
    uint64_t h = 1469598103934665603ull;
    for (unsigned char ch : state["config"].dump()) {
      h ^= ch;
      h *= 1099511628211ull;
    }
    std::ostringstream hex;
    hex << std::hex << h;
    state["config_hash"] = hex.str();
    std::ofstream(e.path() / "state.json") << state.dump(2) << "\n";
  }
  unfinish(dir_ / "run", 2);
  r = run(abs, dir_);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("resuming from"), std::string::npos) << r.out;
}

TEST_F(Cli, DivergingRunFailsAndKeepsItsLastFiniteCheckpoint) {
  make_model_and_data();
  std::vector<std::string> args = finetune_args("huge", 3);
  set_option(args, "--lr", "1e30");
  Result r = run(args);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("diverged at step 1"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "huge" / "adapter"));
  EXPECT_FALSE(fs::exists(dir_ / "huge" / "checkpoints" / "step-1"));

  // A run that diverges a few steps in keeps the checkpoints from before, all finite.
  args = finetune_args("late", 8);
  set_option(args, "--lr", "4e17");
  set_option(args, "--keep", "10");
  r = run(args);
  EXPECT_EQ(r.status, 1);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.err, m, std::regex("diverged at step ([0-9]+)"))) << r.err;
  const int failed = std::stoi(m[1]);
  EXPECT_GE(failed, 2) << r.err;
  std::set<std::string> want;
  for (int s = 1; s < failed; ++s) want.insert("step-" + std::to_string(s));
  EXPECT_EQ(names(dir_ / "late" / "checkpoints"), want);
  for (const std::string& name : want) {
    const auto f =
        tf::io::SafetensorsFile::open((dir_ / "late" / "checkpoints" / name / "lora.safetensors").string());
    for (const auto& t : f.tensors()) {
      const auto* v = reinterpret_cast<const float*>(t.bytes.data());
      for (size_t i = 0; i < t.bytes.size() / sizeof(float); ++i)
        ASSERT_TRUE(std::isfinite(v[i])) << name << " " << t.name;
    }
  }
  EXPECT_FALSE(fs::exists(dir_ / "late" / "adapter"));
}
