// defines: tests of --profile: `finetune --profile` on the tiny model writes RUN/profile.json with
// the ops its steps ran, as many calls as its layers make (times >= 0, shares summing to 1) and prints
// the table; a run without it writes none; a bad value is refused naming the option; `bench
// --profile` prints the training run's per-op table and puts it in its JSON
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "tests/cli_test_util.h"

namespace tf {
namespace {

class Profile : public test::Cli {
 protected:
  int layers() {
    std::ifstream in(dir_ / "model" / "config.json");
    return nlohmann::json::parse(in)["num_hidden_layers"].get<int>();
  }
};

namespace fs = std::filesystem;
using Calls = std::map<std::pair<std::string, std::string>, int64_t>;

// Every entry's calls by op and role, after checking that its time is not negative and that the
// shares add up to 1 (each is its op's time over their sum).
Calls calls_of(const nlohmann::json& profile) {
  Calls c;
  double share = 0;
  for (const nlohmann::json& op : profile["ops"]) {
    EXPECT_GE(op["seconds"].get<double>(), 0) << op;
    share += op["share"].get<double>();
    c[{op["op"].get<std::string>(), op["role"].get<std::string>()}] = op["calls"].get<int64_t>();
  }
  if (profile["op_seconds"].get<double>() > 0) {
    EXPECT_NEAR(share, 1.0, 1e-12);
  }
  return c;
}

TEST_F(Profile, FinetuneWritesAndPrintsTheOpsOfItsSteps) {
  make_model_and_data();
  const int steps = 2, L = layers();
  std::vector<std::string> args = finetune_args("run", steps);
  set_option(args, "--checkpointing", "none");
  args.push_back("--profile");
  const test::Result r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("per-op profile of this run's 2 steps"), std::string::npos) << r.out;
  for (const char* text : {"attention_backward", "linear_forward", "q_proj lora", "GFLOP/s", "ops "})
    EXPECT_NE(r.out.find(text), std::string::npos) << text << "\n" << r.out;

  std::ifstream in(dir_ / "run" / "profile.json");
  const nlohmann::json p = nlohmann::json::parse(in);
  EXPECT_EQ(p["steps"], steps);
  EXPECT_GE(p["step_seconds"].get<double>(), p["op_seconds"].get<double>());
  const Calls c = calls_of(p);
  // Per step: each block's forward and backward once (no recomputation), LoRA with dropout on
  // every projection (finetune_args), one loss call for the micro-batch, one optimizer update.
  const Calls want = {{{"attention_forward", ""}, steps * L},
                      {{"attention_backward", ""}, steps * L},
                      {{"rope_forward", ""}, steps * 2 * L},
                      {{"rmsnorm_forward", ""}, steps * (2 * L + 1)},
                      {{"linear_forward", "q_proj"}, steps * L},
                      {{"linear_backward_input", "down_proj"}, steps * L},
                      {{"matmul", "v_proj lora"}, steps * 6 * L},
                      {{"dropout_forward", "gate_proj lora"}, steps * L},
                      {{"dropout_backward", "gate_proj lora"}, steps * L},
                      {{"lm_head_cross_entropy", ""}, steps},
                      {{"embedding_forward", ""}, steps},
                      {{"adamw_update", ""}, steps}};
  for (const auto& [key, n] : want) {
    const auto it = c.find(key);
    ASSERT_NE(it, c.end()) << key.first << " [" << key.second << "]";
    EXPECT_EQ(it->second, n) << key.first << " [" << key.second << "]";
  }
  for (const nlohmann::json& op : p["ops"])
    if (op["op"] == "linear_forward" || op["op"] == "attention_forward") {
      EXPECT_EQ(op["unit"], "FLOP/s") << op;
      EXPECT_GT(op["flops"].get<double>(), 0) << op;
    }

  // Without --profile there is no profile and no table.
  const test::Result plain = run(finetune_args("plain", 1));
  ASSERT_EQ(plain.status, 0) << plain.err;
  EXPECT_FALSE(fs::exists(dir_ / "plain" / "profile.json"));
  EXPECT_EQ(plain.out.find("per-op profile"), std::string::npos) << plain.out;
}

TEST_F(Profile, ABadValueIsRefusedNamingTheOption) {
  make_model_and_data();
  std::vector<std::string> args = finetune_args("run", 1);
  args.push_back("--profile=sometimes");
  test::Result r = run(args);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--profile"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "run"));

  std::ofstream(dir_ / "options.json") << R"({"profile": "yes"})";
  std::vector<std::string> with_file = finetune_args("run", 1);
  with_file.insert(with_file.begin() + 1, {"--config", (dir_ / "options.json").string()});
  r = run(with_file);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("\"profile\" (--profile) is a flag"), std::string::npos) << r.err;
}

TEST_F(Profile, BenchPrintsTheTrainingRunsOps) {
  const std::string json_path = (dir_ / "bench.json").string();
  const test::Result r = run({"bench", "--config", "tiny", "--device", "cpu", "--seq", "16", "--steps", "2",
                              "--lora-rank", "2", "--threads", "1", "--profile", "--json", json_path});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("profile   the training step's ops over 2 more steps"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("linear_backward_input"), std::string::npos) << r.out;
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in);
  ASSERT_TRUE(j.contains("profile")) << j;
  EXPECT_EQ(j["profile"]["steps"], 2);
  const Calls c = calls_of(j["profile"]);
  // bench trains LoRA on every projection, as the plan checkpoints (tiny: nothing recomputed).
  const int64_t L = j["model"]["layers"].get<int64_t>();
  EXPECT_EQ(c.at({"attention_backward", ""}), 2 * L);
  EXPECT_EQ(c.at({"linear_backward_input", "up_proj"}), 2 * L);
  EXPECT_EQ(c.at({"adamw_update", ""}), 2);
}

}  // namespace
}  // namespace tf
