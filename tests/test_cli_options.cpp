// The options and messages of the tightfit binary: numbers out of range refused naming the option,
// --config files checked against each option's kind and merged in order, unknown subcommands named,
// directories and endless lines given as data refused, long examples reported as truncated or
// dropped, and --help and the device line saying only what exists.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "tests/cli_test_util.h"

namespace fs = std::filesystem;

using namespace tf::test;

namespace {

class CliOptions : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    make_model_and_data();
  }

  // A one-step run into RUN/`out` with `extra` appended (a repeated option takes its last value).
  std::vector<std::string> args_with(const std::vector<std::string>& extra, const std::string& out = "run") {
    std::vector<std::string> args = finetune_args(out, 1);
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  // Runs `args` and expects exit status 1 with a single "error: " line holding every `needle`.
  void expect_refused(const std::vector<std::string>& args, const std::vector<std::string>& needles) {
    const Result r = run(args);
    std::string cmd;
    for (const auto& a : args) cmd += a + " ";
    EXPECT_EQ(r.status, 1) << cmd << "\n" << r.out << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << cmd << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << cmd << "\n" << r.err;
    for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << cmd << "\n" << r.err;
    // Refused before any training; and a case wrongly accepted must not make the next one fail for
    // another reason ("already holds a run").
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] != "--out") continue;
      EXPECT_FALSE(fs::exists(fs::path(args[i + 1]) / "metrics.jsonl")) << cmd;
      fs::remove_all(args[i + 1]);
    }
  }

  nlohmann::json run_config(const std::string& out = "run") {
    return nlohmann::json::parse(slurp(dir_ / out / "config.json"));
  }
};

TEST_F(CliOptions, EpochsAreBoundedToAFiniteStepCount) {
  const std::string limit = "more than the limit of 1000000000";
  for (const char* epochs : {"1e300", "1e18"})
    expect_refused(args_with({"--steps", "0", "--epochs", epochs}), {"--epochs", limit});
  for (const char* epochs : {"inf", "nan"})
    expect_refused(args_with({"--steps", "0", "--epochs", epochs}), {"--epochs must be a finite number"});
  for (const char* epochs : {"-1", "0"})
    expect_refused(args_with({"--steps", "0", "--epochs", epochs}), {"--epochs must be positive"});
  expect_refused(args_with({"--steps", "1000000001"}), {"--steps must be in [0, 1000000000]"});
}

TEST_F(CliOptions, DataWithoutLineEndsStopsAtTheLineLimit) {
  expect_refused(args_with({"--data", "/dev/zero"}), {"/dev/zero:1: line is longer than 67108864 bytes"});
}

TEST_F(CliOptions, DirectoriesSayWhatWasExpected) {
  const std::string dir = dir_.string();
  expect_refused(args_with({"--data", dir}), {"--data " + dir + ": is a directory, expected a JSONL file"});
  expect_refused(args_with({"--eval-data", dir}),
                 {"--eval-data " + dir + ": is a directory, expected a JSONL file"});
  expect_refused(args_with({"--config", dir}),
                 {"--config " + dir + ": is a directory, expected a JSON config file"});
}

TEST_F(CliOptions, ConfigValuesMustFitTheirOptions) {
  struct Case {
    std::string body;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {R"({"steps": true})", {"\"steps\" (--steps) must be an integer, not true"}},
      {R"({"steps": 2.5})", {"\"steps\" (--steps) must be an integer, not 2.5"}},
      {R"({"steps": 1e12})", {"\"steps\" (--steps) is out of range"}},
      {R"({"seed": -1})", {"\"seed\" (--seed) must be a non-negative integer, not -1"}},
      {R"({"pack": 1})", {"\"pack\" (--pack) is a flag: give true or false, not 1"}},
      {R"({"lr": "fast"})", {"\"lr\" (--lr) must be a number, not \"fast\""}},
      {R"({"model": 5})", {"\"model\" (--model) must be a string, not 5"}},
      {R"({"bogus": 1})", {"unknown option \"bogus\""}},
      {R"({"help": true})", {"unknown option \"help\""}},
      {R"({"config": "other.json"})", {"\"config\": a config file cannot name another one"}},
      {R"({"lora_rank": 4, "lora-rank": 5})", {"both set --lora-rank"}},
      {R"([1])", {"a config file must be a JSON object"}},
      {R"({"steps": )", {"not valid JSON"}},
  };
  const std::string path = (dir_ / "bad.json").string();
  for (const Case& c : cases) {
    std::ofstream(path) << c.body;
    std::vector<std::string> needles = c.needles;
    needles.push_back(path + ": ");
    expect_refused(args_with({"--config", path}), needles);
  }
  expect_refused(args_with({"--config", (dir_ / "none.json").string()}), {"none.json: no such file"});
}

TEST_F(CliOptions, ConfigFilesMergeInOrderUnderTheCommandLine) {
  std::ofstream(dir_ / "a.json") << R"({"steps": 3, "lora_rank": 8, "pack": false, "seed": 7, "lr": 1e-3})";
  // 2e0 is an integer written as JSON writers often do; "resume": false means no --resume.
  std::ofstream(dir_ / "b.json") << R"({"steps": 2e0, "lora-rank": 6, "resume": false, "seed": 9})";
  const Result r = run({"finetune", "--config", (dir_ / "a.json").string(),
                        "--config=" + (dir_ / "b.json").string(), "--model", (dir_ / "model").string(),
                        "--data", (dir_ / "train.jsonl").string(), "--out", (dir_ / "run").string(),
                        "--seq-len", "48", "--micro-batch", "2", "--threads", "1", "--lora-rank", "2"});
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json cfg = run_config();
  EXPECT_EQ(cfg["steps"], 2);      // b over a
  EXPECT_EQ(cfg["seed"], 9);       // b over a
  EXPECT_EQ(cfg["lora_rank"], 2);  // the command line over both
  EXPECT_EQ(cfg["pack"], false);   // a alone
  EXPECT_NEAR(cfg["lr"].get<double>(), 1e-3, 1e-9);
  EXPECT_EQ(losses(dir_ / "run" / "metrics.jsonl").size(), 2u);
}

TEST_F(CliOptions, UnknownSubcommandIsNamed) {
  const Result r = run({"foo", "--model", "x"});
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(
      r.err.rfind(
          "error: unknown subcommand 'foo'; subcommands: finetune, plan, init, inspect, generate, eval, "
          "export",
          0),
      0u)
      << r.err;
}

TEST_F(CliOptions, LongExamplesAreReportedAsTruncatedOrDropped) {
  // At 24 tokens the text records are cut, and the chat records lose their whole assistant reply.
  const Result r = run(args_with({"--seq-len", "24"}));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(
      r.out.find("train.jsonl: 40 examples longer than --seq-len 24 tokens were truncated to their first "
                 "24 tokens\n"),
      std::string::npos)
      << r.out;
  EXPECT_NE(
      r.out.find("train.jsonl: 40 examples longer than --seq-len 24 tokens were dropped: their first 24 "
                 "tokens hold no completion or assistant token to train on\n"),
      std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("data: 40 training examples"), std::string::npos) << r.out;
}

TEST_F(CliOptions, SeqLenAboveTheModelsPositionsWarns) {
  const fs::path config = dir_ / "model" / "config.json";
  nlohmann::json c = nlohmann::json::parse(slurp(config));
  c["max_position_embeddings"] = 32;
  std::ofstream(config) << c.dump();
  const Result r = run(args_with({}));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("warning: --seq-len 48 is above the model's max_position_embeddings 32;"),
            std::string::npos)
      << r.out;
  const Result within = run(args_with({"--seq-len", "32"}, "run2"));
  ASSERT_EQ(within.status, 0) << within.err;
  EXPECT_EQ(within.out.find("max_position_embeddings"), std::string::npos) << within.out;
}

TEST_F(CliOptions, NumbersOutOfRangeAreRefusedNamingTheOption) {
  struct Case {
    std::string option, value, needle;
  };
  const std::vector<Case> cases = {
      {"--seed", "-1", "--seed: must not be negative, got -1"},
      {"--steps", "0x10", "--steps: must be a decimal integer, got 0x10"},
      {"--clip", "-1", "--clip must be positive, or 0 for no clipping, got -1"},
      {"--threads", "-1", "--threads must be 0 (one per hardware thread) or more, got -1"},
      {"--lr", "-0.001", "--lr must be positive, got -0.001"},
      {"--lr", "0", "--lr must be positive, got 0"},
      {"--lr", "nan", "--lr must be positive, got nan"},
      {"--lora-rank", "0", "--lora-rank must be in [1, 4096], got 0"},
      {"--lora-rank", "100000", "--lora-rank must be in [1, 4096], got 100000"},
      {"--lora-alpha", "0", "--lora-alpha must be positive, got 0"},
      {"--lora-dropout", "1", "--lora-dropout must be in [0, 1), got 1"},
      {"--lora-dropout", "-0.1", "--lora-dropout must be in [0, 1), got -0.1"},
      {"--weight-decay", "-1", "--weight-decay must not be negative, got -1"},
      {"--weight-decay", "inf", "--weight-decay must not be negative, got inf"},
      {"--warmup", "-1", "--warmup must not be negative, got -1"},
      {"--grad-accum", "0", "--grad-accum must be in [1, 4096], got 0"},
      {"--micro-batch", "0", "--micro-batch must be in [1, 4096], got 0"},
      {"--seq-len", "4", "--seq-len must be in [8, 1048576], got 4"},
      {"--keep", "0", "--keep must be at least 1, got 0"},
      {"--save-every", "-1", "--save-every must not be negative"},
      {"--eval-every", "-1", "--eval-every must not be negative"},
      {"--schedule", "bogus", "unknown learning-rate schedule 'bogus'"},
      {"--template", "bogus", "unknown prompt template 'bogus'"},
  };
  for (const Case& c : cases) expect_refused(args_with({c.option, c.value}), {c.needle});
  expect_refused({"generate", "--model", (dir_ / "model").string(), "--prompt", "hi", "--seed", "-1"},
                 {"--seed: must not be negative"});
  expect_refused({"eval", "--model", (dir_ / "model").string(), "--data", (dir_ / "train.jsonl").string(),
                  "--threads", "-2"},
                 {"--threads must be 0 (one per hardware thread) or more, got -2"});

  // A leading zero is decimal, not octal.
  ASSERT_EQ(run(args_with({"--keep", "010"})).status, 0);
  EXPECT_EQ(run_config()["keep"], 10);
}

TEST_F(CliOptions, ThreadsBeyondTheMachineWarn) {
  const unsigned hardware = std::thread::hardware_concurrency();
  if (hardware == 0) GTEST_SKIP() << "the machine does not say how many hardware threads it has";
  const std::string asked = std::to_string(hardware + 1);
  const Result r = run(args_with({"--threads", asked}));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("warning: --threads " + asked + " is more than the " + std::to_string(hardware) +
                       " hardware threads of this machine"),
            std::string::npos)
      << r.err;
}

TEST_F(CliOptions, HelpAndDeviceSayOnlyWhatExists) {
  const Result help = run({"--help"});
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("LoRA fine-tuning of Llama-family models on the CPU"), std::string::npos)
      << help.out;
  for (const char* claim : {"QLoRA", "memory budget"})
    EXPECT_EQ(help.out.find(claim), std::string::npos) << claim << "\n" << help.out;
  EXPECT_NE(run({"finetune", "--help"}).out.find("simt (the CUDA backend on the built-in GPU simulator"),
            std::string::npos);

  // auto says what it picked and why; this machine has no GPU.
  const Result picked = run(args_with({}));
  ASSERT_EQ(picked.status, 0) << picked.err;
  EXPECT_NE(picked.out.find("\ndevice: cpu (--device auto: "), std::string::npos) << picked.out;
  const Result asked = run(args_with({"--device", "cpu"}, "run2"));
  ASSERT_EQ(asked.status, 0) << asked.err;
  EXPECT_NE(asked.out.find("\ndevice: cpu\n"), std::string::npos) << asked.out;
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:123456", "CPU"})
    expect_refused(
        args_with({"--device", bad}, "run3"),
        {"--device must be auto, cpu, simt, cuda or cuda:N (N a GPU index), got '" + std::string(bad) + "'"});
}

// --attention picks a kernel of the CUDA backend: a misspelling, a choice the chosen device cannot run
// and a head dimension the flash kernels do not take are refused by name; simt reports its choice.
TEST_F(CliOptions, AttentionKernelsAreRefusedWhereTheyCannotRun) {
  expect_refused(args_with({"--attention", "fast"}),
                 {"--attention must be auto, flash, plain or cudnn, got 'fast'"});
  expect_refused(
      args_with({"--attention", "flash", "--device", "cpu"}),
      {"--attention flash chooses a kernel of the CUDA backend (--device simt or cuda); the cpu backend "
       "has one attention kernel"});
  expect_refused(args_with({"--attention", "plain"}),
                 {"--attention plain chooses a kernel of the CUDA backend, but --device auto found no GPU"});
  expect_refused(
      args_with({"--attention", "cudnn", "--device", "simt"}),
      {"--attention cudnn runs cuDNN's fused attention on a GPU (--device cuda); the simt simulator "
       "does not run cuDNN"});
  expect_refused(args_with({"--attention", "flash", "--device", "simt"}),
                 {"--attention flash takes head dimensions 64, 80, 96 and 128; this model's is 16"});
  expect_refused({"eval", "--model", (dir_ / "model").string(), "--data", (dir_ / "train.jsonl").string(),
                  "--attention", "flash"},
                 {"--attention flash chooses a kernel of the CUDA backend, but --device auto found no GPU"});
  const Result plain = run(args_with({"--attention", "plain", "--device", "simt", "--steps", "1"}, "run4"));
  ASSERT_EQ(plain.status, 0) << plain.err;
  EXPECT_NE(plain.out.find("\ndevice: simt (SIMT simulator"), std::string::npos) << plain.out;
  EXPECT_NE(plain.out.find("; attention: plain\n"), std::string::npos) << plain.out;
}

}  // namespace

// --quant is checked before the model loads, stored in the run's config (it changes the numbers, so
// a resume must keep it), and each mode prints how the base is stored.
TEST_F(CliOptions, QuantModesStoreTheBaseAsAsked) {
  expect_refused(
      args_with({"--quant", "nf5"}),
      {"--quant must be one of keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0, q5_1, got 'nf5'"});
  expect_refused(
      {"eval", "--model", (dir_ / "model").string(), "--data", (dir_ / "train.jsonl").string(), "--quant",
       "q4"},
      {"--quant must be one of keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0, q5_1, got 'q4'"});
  const std::vector<std::pair<std::string, std::string>> modes = {
      {"keep", "f32"}, {"bf16", "bf16"}, {"int8", "int8"}, {"nf4", "nf4"}};
  for (const auto& [mode, dtype] : modes) {
    const Result r = run(args_with({"--quant", mode}, mode));
    ASSERT_EQ(r.status, 0) << mode << "\n" << r.err;
    EXPECT_NE(r.out.find("base weights (--quant " + mode + "): "), std::string::npos) << r.out;
    // Matrices take the mode's dtype; the f32 norms stay f32 in every mode.
    const size_t line = r.out.find("base weights");
    const std::string summary = r.out.substr(line, r.out.find('\n', line) - line);
    EXPECT_NE(summary.find(dtype + " "), std::string::npos) << summary;
    EXPECT_EQ(run_config(mode)["quant"], mode);
  }
  std::vector<std::string> resume = args_with({"--quant", "int8", "--resume"}, "nf4");
  set_option(resume, "--steps", "2");
  const Result r = run(resume);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("quant: \"nf4\" -> \"int8\""), std::string::npos) << r.err;

  // A run written before --quant existed computed with an f32 base: it resumes under none only.
  nlohmann::json old = run_config("keep");
  old.erase("quant");
  std::ofstream(dir_ / "keep" / "config.json") << old.dump(2);
  std::vector<std::string> old_resume = args_with({"--resume"}, "keep");
  const Result refused = run(old_resume);
  EXPECT_EQ(refused.status, 1);
  EXPECT_NE(refused.err.find("quant: \"none\" -> \"keep\""), std::string::npos) << refused.err;
  set_option(old_resume, "--quant", "none");
  const Result resumed = run(old_resume);
  EXPECT_EQ(resumed.status, 0) << resumed.err;
}

// ggml's block types at load: the tiny model's MLP rows of 176 are not whole blocks of 32, so the
// plan refuses the run by name before anything loads; the small model's rows are, and it trains
// with its matrices as Q4_1 blocks, whose bytes the plan predicted from the headers exactly.
TEST_F(CliOptions, GgmlQuantModesTakeWholeBlocksAndNameTheRowsThatAreNot) {
  expect_refused(args_with({"--quant", "q8_0"}),
                 {"model.layers.0.mlp.down_proj.weight: rows of 176 elements cannot be quantized to q8_0",
                  "nf4 and int8"});
  ASSERT_EQ(run({"init", "--config", "small", "--out", (dir_ / "small").string(), "--seed", "3"}).status, 0);
  std::vector<std::string> args = args_with({"--quant", "q4_1"}, "q41");
  set_option(args, "--model", (dir_ / "small").string());
  const Result r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  // small: 4 layers of q, o (256 x 256), k, v (128 x 256), gate, up, down (704 x 256), and the tied
  // embedding (320 x 256); 20 bytes per 32 weights.
  const int64_t params = 4 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 704 * 256) + 320 * 256;
  EXPECT_NE(r.out.find("base weights (--quant q4_1): "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("q4_1 1.8 MiB"), std::string::npos) << r.out;
  EXPECT_EQ(run_config("q41")["quant"], "q4_1");
  const nlohmann::json plan = nlohmann::json::parse(slurp(dir_ / "q41" / "plan.json"));
  int64_t converted = -1;
  for (const nlohmann::json& i : plan["items"])
    if (i["component"] == "base weights converted at load") converted = i["bytes"].get<int64_t>();
  EXPECT_EQ(converted, params / 32 * 20) << plan.dump();
}
