// Tests: a finetune run on two threads, killed with SIGKILL after a few checkpoints and resumed on
// two threads, writes the losses of an uninterrupted two-thread run bit for bit; a resume at another
// thread count is noted.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/cli_test_util.h"

using namespace tf::test;

// finetune_args() runs on one thread, where no loop is split and no reduction order can vary.
TEST_F(Cli, KilledTwoThreadRunResumesToTheSameLossesBitForBit) {
  make_model_and_data();
  const Result r = expect_killed_run_resumes_bit_for_bit(10, "2");
  EXPECT_NE(r.out.find("2 threads"), std::string::npos) << r.out;

  // Another thread count is accepted, with a note that the last bits can differ.
  std::vector<std::string> other = finetune_args("straight", 10);
  other.push_back("--resume");
  const Result note = run(other);
  EXPECT_EQ(note.status, 0) << note.err;
  EXPECT_NE(note.out.find("note: --threads 1 differs from the run's 2"), std::string::npos) << note.out;
}
