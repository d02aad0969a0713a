// defines: tests of `tightfit bench`: on a tiny random model (cpu, and the simulated device) it
// prints a table of every op with its rate and share of the GEMM ceiling, the training run and the
// peak memory beside the plan, writes the same as JSON, and refuses bad options by name
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/cpu/isa.h"
#include "tests/cli_test_util.h"

namespace tf {
namespace {

class Bench : public test::Cli {};

const std::vector<std::string> kOps = {"gemm f32 (up shape)",
                                       "gemm f32 (down shape)",
                                       "linear forward",
                                       "linear input grad",
                                       "attention forward",
                                       "attention backward",
                                       "loss: lm_head + cross-entropy",
                                       "rmsnorm forward"};

// The JSON holds every op of the table with a positive time and rate; the GEMMs' shares of the
// ceiling are at most 1 and the largest is 1 (the ceiling is the best of the run's products); the
// training run and the memory figures are there and positive.
void check_json(const nlohmann::json& j, const std::string& backend) {
  EXPECT_NE(j["machine"]["backend"].get<std::string>().find(backend), std::string::npos) << j["machine"];
  EXPECT_GT(j["machine"]["hardware_threads"].get<int>(), 0);
  EXPECT_GT(j["machine"]["memory_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["model"]["layers"], 2);
  EXPECT_EQ(j["model"]["hidden"], 64);
  ASSERT_EQ(j["ops"].size(), kOps.size());
  double largest = 0;
  for (size_t i = 0; i < kOps.size(); ++i) {
    const nlohmann::json& op = j["ops"][i];
    EXPECT_EQ(op["name"].get<std::string>().rfind(kOps[i], 0), 0u) << op;
    EXPECT_GT(op["seconds"].get<double>(), 0) << op;
    EXPECT_GT(op["rate"].get<double>(), 0) << op;
    if (op["unit"] == "FLOP/s") {
      EXPECT_LE(op["of_ceiling"].get<double>(), 1.0) << op;
      largest = std::max(largest, op["of_ceiling"].get<double>());
    } else {
      EXPECT_TRUE(op["of_ceiling"].is_null()) << op;
    }
  }
  EXPECT_DOUBLE_EQ(largest, 1.0);
  EXPECT_GT(j["ceiling_flops"].get<double>(), 0);
  EXPECT_GT(j["train"]["rate"].get<double>(), 0);
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0);
  EXPECT_GT(j["memory"]["measured_peak"].get<uint64_t>(), 0u);
  EXPECT_GT(j["memory"]["predicted_peak"].get<uint64_t>(), 0u);
  EXPECT_GT(j["memory"]["tracked_peak"].get<uint64_t>(), 0u);
  // The per-op cost: rmsnorm at r and 2r rows, the fixed part 2 t(r) - t(2r) where it is positive.
  const nlohmann::json& cost = j["op_cost"];
  ASSERT_EQ(cost["rows"].size(), 2u) << cost;
  EXPECT_EQ(cost["rows"][1].get<int64_t>(), 2 * cost["rows"][0].get<int64_t>()) << cost;
  const double small = cost["seconds"][0].get<double>(), large = cost["seconds"][1].get<double>();
  EXPECT_GT(small, 0) << cost;
  if (2 * small > large)
    EXPECT_DOUBLE_EQ(cost["seconds_per_op"].get<double>(), 2 * small - large) << cost;
  else
    EXPECT_TRUE(cost["seconds_per_op"].is_null()) << cost;
}

TEST_F(Bench, PrintsTheTableAndTheJsonOnTheCpu) {
  const std::string json_path = (dir_ / "bench.json").string();
  const test::Result r =
      run({"bench", "--config", "tiny", "--device", "cpu", "--seq", "32", "--micro-batch", "2", "--steps",
           "2", "--lora-rank", "4", "--threads", "1", "--json", json_path});
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* line : {"machine   ", "backend   cpu (no GPU in use", "model     tiny (random weights)",
                           "training  ", "memory    host peak "})
    EXPECT_NE(("\n" + r.out).find(std::string("\n") + line), std::string::npos) << line << "\n" << r.out;
  for (const std::string& op : kOps) EXPECT_NE(r.out.find(op), std::string::npos) << op << "\n" << r.out;
  EXPECT_NE(r.out.find("training step (LoRA r4, all projections)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("100%"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\nop cost   "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\ndisk      not measured: no model file (--model)"), std::string::npos) << r.out;
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in);
  check_json(j, "cpu");
  EXPECT_TRUE(j["disk"].is_null()) << j["disk"];
  // An f32 base: auto keeps every product f32, as finetune would.
  EXPECT_EQ(j["machine"]["matmul"], "f32");
  EXPECT_EQ(j["ops"][2]["name"], "linear forward (f32, f32 products)");
}

// The products run as finetune's --matmul would run them on this CPU: an int8 base's in bf16 where
// the CPU has avx512_bf16 (auto, and --matmul bf16), in f32 under --matmul f32; the table, the log
// line and the JSON say which. A device takes auto only.
TEST_F(Bench, RunsTheProductsInThePrecisionFinetuneWould) {
  const bool bf16 = cpu::cpu_has_avx512_bf16();
  for (const std::string matmul : {"auto", "f32", "bf16"}) {
    if (matmul == "bf16" && !bf16) continue;
    SCOPED_TRACE("--matmul " + matmul);
    const std::string json_path = (dir_ / ("bench-" + matmul + ".json")).string();
    const test::Result r =
        run({"bench", "--config", "tiny", "--quant", "int8", "--device", "cpu", "--seq", "16", "--steps", "1",
             "--lora-rank", "2", "--threads", "1", "--matmul", matmul, "--json", json_path});
    ASSERT_EQ(r.status, 0) << r.err;
    const std::string want = matmul == "f32" || !bf16 ? "f32" : "bf16";
    std::ifstream in(json_path);
    const nlohmann::json j = nlohmann::json::parse(in);
    EXPECT_EQ(j["machine"]["matmul"], want);
    EXPECT_EQ(j["ops"][2]["name"], "linear forward (int8, " + want + " products)");
    const std::string line = want + (matmul == "auto" ? " (auto: " : " (--matmul " + matmul);
    EXPECT_NE(r.out.find("\nmatmul    " + line), std::string::npos) << r.out;
  }
  const test::Result bad = run({"bench", "--config", "tiny", "--device", "cpu", "--matmul", "fast"});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("--matmul"), std::string::npos) << bad.err;
  const test::Result device = run({"bench", "--config", "tiny", "--device", "simt", "--matmul", "f32"});
  EXPECT_EQ(device.status, 1);
  EXPECT_NE(device.err.find("--matmul f32 applies to the cpu"), std::string::npos) << device.err;
}

// With a model file, its tensors' window is read through the direct reader for the disk rate: all of
// it (the file is far below the 1 GiB the read stops at), in the mode the reader chose.
TEST_F(Bench, ReadsTheModelFileForTheDiskRate) {
  ASSERT_EQ(run({"init", "--config", "tiny", "--out", (dir_ / "model").string(), "--seed", "3"}).status, 0);
  const std::string json_path = (dir_ / "bench.json").string();
  const test::Result r = run({"bench", "--model", (dir_ / "model").string(), "--device", "cpu", "--seq", "16",
                              "--steps", "1", "--lora-rank", "2", "--threads", "1", "--json", json_path});
  ASSERT_EQ(r.status, 0) << r.err;
  std::ifstream in(json_path);
  const nlohmann::json disk = nlohmann::json::parse(in)["disk"];
  ASSERT_TRUE(disk.is_object()) << disk;
  const std::string file = disk["file"].get<std::string>();
  EXPECT_EQ(test::fs::path(file).parent_path(), dir_ / "model") << file;
  const uint64_t size = test::fs::file_size(file);
  // The tensors' window: the file less its header, at most the 8-byte length and a page of JSON.
  EXPECT_LT(disk["bytes"].get<uint64_t>(), size);
  EXPECT_GT(disk["bytes"].get<uint64_t>(), size - 4096) << size;
  EXPECT_GT(disk["seconds"].get<double>(), 0);
  EXPECT_DOUBLE_EQ(disk["rate"].get<double>(), disk["bytes"].get<double>() / disk["seconds"].get<double>());
  const std::string mode = disk["mode"].get<std::string>();
  EXPECT_NE(mode.find("O_DIRECT") != std::string::npos, mode.find("buffered") != std::string::npos) << mode;
  EXPECT_NE(r.out.find("\ndisk      "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" of " + file + " (" + mode + ")"), std::string::npos) << r.out;
}

TEST_F(Bench, RunsOnTheSimulatedDevice) {
  const std::string json_path = (dir_ / "bench.json").string();
  const test::Result r = run({"bench", "--config", "tiny", "--device", "simt", "--seq", "16", "--steps", "1",
                              "--lora-rank", "2", "--json", json_path});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("memory    device peak "), std::string::npos) << r.out;
  std::ifstream in(json_path);
  check_json(nlohmann::json::parse(in), "simt");
}

TEST_F(Bench, RefusesBadOptionsByName) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--seq", "0"}, "--seq must be in [1, 1048576], got 0"},
      {{"--steps", "0"}, "--steps must be in [1, 1000], got 0"},
      {{"--micro-batch", "5000"}, "--micro-batch must be in [1, 4096], got 5000"},
      {{"--quant", "q3"},
       "--quant must be one of keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0, q5_1, got 'q3'"},
      {{"--config", (dir_ / "missing.json").string()}, "missing.json"},
  };
  for (const auto& [extra, want] : bad) {
    std::vector<std::string> args = {"bench", "--device", "cpu"};
    args.insert(args.end(), extra.begin(), extra.end());
    const test::Result r = run(args);
    EXPECT_EQ(r.status, 1) << want;
    EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace tf
