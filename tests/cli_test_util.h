// defines: the CLI tests' harness: running the tightfit binary with captured output, the Cli
// fixture (a per-test directory, a tiny model and dataset, the finetune arguments of a short run)
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace tf::test {

namespace fs = std::filesystem;

struct Result {
  int status = -1;  // exit status, or 128 + signal
  std::string out, err;
};

// Runs the binary with `args`, capturing stdout and stderr into the files `out` and `err`; in the
// working directory `cwd` when one is given.
inline pid_t spawn(const std::vector<std::string>& args, const fs::path& out, const fs::path& err,
                   const fs::path& cwd = {}) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (!cwd.empty() && chdir(cwd.c_str()) != 0) _exit(125);
    std::vector<char*> argv;
    std::string bin = TIGHTFIT_BINARY;
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (!freopen(out.c_str(), "w", stdout) || !freopen(err.c_str(), "w", stderr)) _exit(126);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

inline std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), {}};
}

inline int wait_status(pid_t pid) {
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tightfit-cli-" + std::to_string(getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  Result run(const std::vector<std::string>& args, const fs::path& cwd = {}) {
    const pid_t pid = spawn(args, dir_ / "stdout", dir_ / "stderr", cwd);
    Result r;
    r.status = wait_status(pid);
    r.out = slurp(dir_ / "stdout");
    r.err = slurp(dir_ / "stderr");
    return r;
  }

  // A tiny random model and a small dataset of text and chat records.
  void make_model_and_data() {
    ASSERT_EQ(run({"init", "--config", "tiny", "--out", (dir_ / "model").string(), "--seed", "3"}).status, 0);
    std::ofstream data(dir_ / "train.jsonl");
    for (int i = 0; i < 40; ++i) {
      data << nlohmann::json{{"text",
                              "the quick brown fox " + std::to_string(i) + " jumps over the lazy dog"}}
                  .dump()
           << "\n";
      data << nlohmann::json{{"messages",
                              {{{"role", "user"}, {"content", "count to " + std::to_string(i % 7)}},
                               {{"role", "assistant"}, {"content", "1 2 3 " + std::to_string(i)}}}}}
                  .dump()
           << "\n";
    }
  }

  std::vector<std::string> finetune_args(const std::string& out, int steps) {
    return {"finetune",
            "--model",
            (dir_ / "model").string(),
            "--data",
            (dir_ / "train.jsonl").string(),
            "--out",
            (dir_ / out).string(),
            "--steps",
            std::to_string(steps),
            "--seq-len",
            "48",
            "--micro-batch",
            "2",
            "--lr",
            "5e-3",
            "--warmup",
            "2",
            "--lora-rank",
            "4",
            "--lora-dropout",
            "0.1",
            "--save-every",
            "1",
            "--keep",
            "2",
            "--threads",
            "1"};
  }

  // Sets `option`'s value in `args` (appending the option when it is not there yet).
  static void set_option(std::vector<std::string>& args, const std::string& option,
                         const std::string& value) {
    const auto it = std::find(args.begin(), args.end(), option);
    if (it != args.end() && it + 1 != args.end()) {
      *(it + 1) = value;
    } else {
      args.push_back(option);
      args.push_back(value);
    }
  }

  static std::vector<double> losses(const fs::path& metrics) {
    std::vector<double> l;
    std::ifstream in(metrics);
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("loss")) l.push_back(j["loss"].get<double>());
    }
    return l;
  }

  // Trains `steps` steps at `threads` threads uninterrupted (in "straight") and again (in "killed"),
  // SIGKILLs the second once a few steps are logged, mid-step or mid-checkpoint wherever it is,
  // resumes it, and expects the losses of the uninterrupted run bit for bit. Returns the resume.
  // `device` is the --device value of both runs, `extra` more options of both.
  Result expect_killed_run_resumes_bit_for_bit(int steps, const std::string& threads,
                                               const std::string& device = "cpu",
                                               const std::vector<std::string>& extra = {}) {
    std::vector<std::string> straight = finetune_args("straight", steps),
                             killed = finetune_args("killed", steps);
    for (std::vector<std::string>* args : {&straight, &killed}) {
      set_option(*args, "--threads", threads);
      set_option(*args, "--device", device);
      args->insert(args->end(), extra.begin(), extra.end());
    }
    Result r = run(straight);
    EXPECT_EQ(r.status, 0) << r.err;
    const std::vector<double> want = losses(dir_ / "straight" / "metrics.jsonl");
    EXPECT_EQ(want.size(), size_t(steps));

    const pid_t pid = spawn(killed, dir_ / "k.out", dir_ / "k.err");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (losses(dir_ / "killed" / "metrics.jsonl").size() < 4 &&
           std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    kill(pid, SIGKILL);
    EXPECT_EQ(wait_status(pid), 128 + SIGKILL);
    EXPECT_LT(losses(dir_ / "killed" / "metrics.jsonl").size(), size_t(steps))
        << "the run finished before the kill";

    killed.push_back("--resume");
    r = run(killed);
    EXPECT_EQ(r.status, 0) << r.err;
    const std::vector<double> got = losses(dir_ / "killed" / "metrics.jsonl");
    EXPECT_EQ(got.size(), want.size());
    for (size_t i = 0; i < std::min(want.size(), got.size()); ++i) EXPECT_EQ(got[i], want[i]) << "step " << i;
    return r;
  }

  fs::path dir_;
};

}  // namespace tf::test
