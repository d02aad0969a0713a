// defines: tests of eval and generate with the per-layer weights streamed (--weights disk): the
// same loss and the same tokens as with them resident, the refusals of a bad --weights, and
// --weights auto choosing the tier that fits the budget.
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

// Under --weights auto (the default) eval takes resident weights when they fit and streams them
// from the file when only that fits the budget (the same loss), the KV cache of its completions
// counted against it; what fits under no choice is refused before anything loads. The model has
// eight layers of f32 weights (24 MB), of which streaming keeps two blocks: 17 MiB less at the peak.
TEST_F(StreamInference, AutoWeightsTakeWhatFitsTheBudget) {
  std::ofstream(dir_ / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 8, "num_attention_heads": 8,
      "num_key_value_heads": 4, "vocab_size": 320, "rms_norm_eps": 1e-05, "max_position_embeddings": 4096,
      "tie_word_embeddings": true})";
  ASSERT_EQ(run({"init", "--config", (dir_ / "config.json").string(), "--out", (dir_ / "small").string(),
                 "--seed", "3"})
                .status,
            0);
  std::ofstream(dir_ / "few.jsonl") << R"({"text": "the quick brown fox jumps over the lazy dog again"})"
                                    << "\n";
  const std::vector<std::string> eval = {"eval",
                                         "--model",
                                         (dir_ / "small").string(),
                                         "--data",
                                         (dir_ / "few.jsonl").string(),
                                         "--seq-len",
                                         "64",
                                         "--device",
                                         "cpu",
                                         "--max-new-tokens",
                                         "2"};
  auto with = [&](const std::string& max_mem) {
    std::vector<std::string> args = eval;
    args.insert(args.end(), {"--max-mem", max_mem});
    return run(args);
  };
  const test::Result roomy = with("1TiB");
  ASSERT_EQ(roomy.status, 0) << roomy.err;
  EXPECT_NE(roomy.out.find("plan        weights resident (auto:"), std::string::npos) << roomy.out;
  const std::string peak = line_of("\n" + roomy.out, "plan        predicted peak host ");
  ASSERT_FALSE(peak.empty()) << roomy.out;
  const double mib = std::stod(peak.substr(std::string("plan        predicted peak host ").size()));
  ASSERT_NE(peak.find(" MiB of "), std::string::npos) << peak;

  const test::Result tight = with(std::to_string(int(mib) - 8) + "MiB");
  ASSERT_EQ(tight.status, 0) << tight.err;
  EXPECT_NE(tight.out.find("plan        weights disk (auto:"), std::string::npos) << tight.out;
  EXPECT_NE(tight.out.find("weights     streamed from the model file"), std::string::npos) << tight.out;
  EXPECT_EQ(line_of("\n" + tight.out, "loss"), line_of("\n" + roomy.out, "loss"));

  // generate's KV cache, counted for a prompt of 1500 bytes, 128 template tokens and 1 new token
  // (2 x 1629 x 8 layers x 128 x 4 bytes: 13 MiB), does not fit beside resident weights in 6 MiB above
  // eval's resident peak, and does beside streamed ones.
  const test::Result gen =
      run({"generate", "--model", (dir_ / "small").string(), "--prompt", std::string(1500, 'a'),
           "--max-new-tokens", "1", "--device", "cpu", "--max-mem", std::to_string(int(mib) + 6) + "MiB"});
  ASSERT_EQ(gen.status, 0) << gen.err;
  EXPECT_NE(gen.err.find("plan: weights disk (auto:"), std::string::npos) << gen.err;
  EXPECT_NE(gen.err.find("less 13 MiB for the KV cache"), std::string::npos) << gen.err;

  const test::Result refused = with("2MiB");
  EXPECT_EQ(refused.status, 1);
  EXPECT_NE(refused.err.find("does not fit its memory budget with the weights resident or streamed"),
            std::string::npos)
      << refused.err;
  EXPECT_NE(refused.err.find("besides a KV cache of 1 MiB"), std::string::npos) << refused.err;
}

}  // namespace
}  // namespace tf
