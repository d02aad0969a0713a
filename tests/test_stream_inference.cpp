// defines: tests of eval and generate with the per-layer weights streamed (--weights disk): the
// same loss and the same tokens as with them resident, and the refusals of a bad --weights.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "tests/cli_test_util.h"

namespace tf {
namespace {

class StreamInference : public test::Cli {};

std::string line_of(const std::string& out, const std::string& key) {
  const size_t at = out.find("\n" + key);
  if (at == std::string::npos) return "";
  return out.substr(at + 1, out.find('\n', at + 1) - at - 1);
}

TEST_F(StreamInference, EvalAndGenerateFromDiskMatchTheResidentModel) {
  make_model_and_data();
  const std::string model = (dir_ / "model").string();
  {
    std::ifstream all(dir_ / "train.jsonl");
    std::ofstream few(dir_ / "few.jsonl");
    std::string line;
    for (int i = 0; i < 6 && std::getline(all, line); ++i) few << line << "\n";
  }
  const std::vector<std::string> eval = {
      "eval",      "--model", model,      "--data", (dir_ / "few.jsonl").string(),
      "--seq-len", "48",      "--device", "cpu",    "--max-new-tokens",
      "2"};
  test::Result resident = run(eval);
  ASSERT_EQ(resident.status, 0) << resident.err;
  std::vector<std::string> streamed_args = eval;
  streamed_args.insert(streamed_args.end(), {"--weights", "disk"});
  test::Result streamed = run(streamed_args);
  ASSERT_EQ(streamed.status, 0) << streamed.err;
  EXPECT_NE(streamed.out.find("weights     streamed from the model file"), std::string::npos) << streamed.out;
  const std::string loss = line_of("\n" + resident.out, "loss");
  ASSERT_FALSE(loss.empty()) << resident.out;
  EXPECT_EQ(line_of("\n" + streamed.out, "loss"), loss) << streamed.out;

  const std::vector<std::string> gen = {"generate", "--model",         model,
                                        "--prompt", "the quick brown", "--max-new-tokens",
                                        "12",       "--device",        "cpu"};
  resident = run(gen);
  ASSERT_EQ(resident.status, 0) << resident.err;
  std::vector<std::string> gen_disk = gen;
  gen_disk.insert(gen_disk.end(), {"--weights", "disk"});
  streamed = run(gen_disk);
  ASSERT_EQ(streamed.status, 0) << streamed.err;
  EXPECT_EQ(streamed.out, resident.out);

  // Host memory is the cpu's own: there is nothing to stream it from.
  gen_disk.back() = "host";
  streamed = run(gen_disk);
  EXPECT_EQ(streamed.status, 1);
  EXPECT_NE(streamed.err.find("--weights host"), std::string::npos) << streamed.err;
  gen_disk.back() = "nvme";
  streamed = run(gen_disk);
  EXPECT_EQ(streamed.status, 1);
  EXPECT_NE(streamed.err.find("--weights must be resident, host or disk, got 'nvme'"), std::string::npos)
      << streamed.err;
}

}  // namespace
}  // namespace tf
