// Tests: a finetune run on two threads, killed with SIGKILL after a few checkpoints and resumed on
// two threads, writes the losses of an uninterrupted two-thread run bit for bit.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "tests/cli_test_util.h"

using namespace tf::test;

namespace {

// finetune_args() runs on one thread, where no loop is split and no reduction order can vary.
std::vector<std::string> on_two_threads(std::vector<std::string> args) {
  const auto it = std::find(args.begin(), args.end(), "--threads");
  EXPECT_TRUE(it != args.end() && it + 1 != args.end()) << "finetune_args() has no --threads";
  if (it != args.end() && it + 1 != args.end()) *(it + 1) = "2";
  return args;
}

}  // namespace

TEST_F(Cli, KilledTwoThreadRunResumesToTheSameLossesBitForBit) {
  make_model_and_data();
  constexpr int kSteps = 10;
  ASSERT_EQ(run(on_two_threads(finetune_args("straight", kSteps))).status, 0) << slurp(dir_ / "stderr");
  const std::vector<double> want = losses(dir_ / "straight" / "metrics.jsonl");
  ASSERT_EQ(want.size(), size_t(kSteps));

  const pid_t pid = spawn(on_two_threads(finetune_args("killed", kSteps)), dir_ / "k.out", dir_ / "k.err");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (losses(dir_ / "killed" / "metrics.jsonl").size() < 4 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kill(pid, SIGKILL);
  EXPECT_EQ(wait_status(pid), 128 + SIGKILL);
  ASSERT_LT(losses(dir_ / "killed" / "metrics.jsonl").size(), size_t(kSteps))
      << "the run finished before the kill";

  std::vector<std::string> resume = on_two_threads(finetune_args("killed", kSteps));
  resume.push_back("--resume");
  const Result r = run(resume);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("2 threads"), std::string::npos) << r.out;
  const std::vector<double> got = losses(dir_ / "killed" / "metrics.jsonl");
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], want[i]) << "step " << i;
}
