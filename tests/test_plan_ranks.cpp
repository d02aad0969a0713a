// defines: tests of `tightfit plan --ranks N`: one rank's table of a data-parallel run, the whole
// model per rank plus the gradient sum's buffers, on the cpu and on a device, from a config alone,
// and with --shard-weights 1/N of the layers per rank
#include <gtest/gtest.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "offload/cost_model.h"
#include "src/dist/device_sum.h"
#include "tests/plan_test_util.h"

namespace tf {
namespace {

using test::PlanCli;
using test::Result;

// Plans differ in what each measured of its own process at startup.
constexpr uint64_t kStartupSlack = uint64_t(8) << 20;

const char* const kGathered = "gradient sum: the ranks' gradients gathered";
const char* const kHostCopy = "gradient sum: LoRA gradients copied to the host";

bool has_item(const nlohmann::json& plan, const std::string& component) {
  for (const auto& i : plan["items"])
    if (i["component"] == component) return true;
  return false;
}

// The items of `plan` other than the gradient sum's, as "component/tier bytes" lines.
std::vector<std::string> model_items(const nlohmann::json& plan) {
  std::vector<std::string> v;
  for (const auto& i : plan["items"]) {
    const std::string c = i["component"];
    if (c.rfind("gradient sum:", 0) == 0 || c == "process at startup") continue;
    v.push_back(c + "/" + i["tier"].get<std::string>() + " " + std::to_string(i["bytes"].get<uint64_t>()));
  }
  return v;
}

class PlanRanks : public PlanCli {
 protected:
  nlohmann::json plan_of(const std::string& model, const std::string& device, int ranks) {
    std::vector<std::string> args = {
        "--model",        model,  "--device",      device,     "--quant",         "nf4",
        "--seq-len",      "2048", "--micro-batch", "1",        "--max-mem",       "1TiB",
        "--max-host-mem", "1TiB", "--weights",     "resident", "--checkpointing", "block"};
    if (ranks > 0) {
      args.push_back("--ranks");
      args.push_back(std::to_string(ranks));
    }
    return plan_json(args);
  }
};

// Llama-3.1-8B's adapters have more than 2^20 parameters, so each sum gathers in rounds of 2^20
// floats from every rank: ranks x 4 MiB, live only while summing. Everything else is what one
// process plans, since every rank holds the whole model.
TEST_F(PlanRanks, EachRankPlansTheWholeModelAndTheSumsGatherBuffer) {
  const std::string model = config("Llama-3.1-8B.json");
  const nlohmann::json one = plan_of(model, "cpu", 0);
  EXPECT_EQ(one["ranks"], 1);
  EXPECT_EQ(one["per_rank"], false);
  EXPECT_FALSE(has_item(one, kGathered));
  for (int ranks : {2, 4}) {
    const nlohmann::json j = plan_of(model, "cpu", ranks);
    EXPECT_EQ(j["ranks"], ranks);
    EXPECT_EQ(j["per_rank"], true);
    EXPECT_EQ(item(j, kGathered), uint64_t(ranks) * (uint64_t(1) << 20) * sizeof(float)) << ranks;
    // The cpu backend sums its gradients where they are: no host copy.
    EXPECT_FALSE(has_item(j, kHostCopy));
    EXPECT_EQ(model_items(j), model_items(one)) << ranks;
    // The plans measure their own process at startup, which moves by some KiB between them.
    EXPECT_GE(j["peak"]["host"].get<uint64_t>() + kStartupSlack, one["peak"]["host"].get<uint64_t>());
  }
}

// On a device the gradients are gathered by NCCL into a device buffer where NCCL is built, else
// copied to the host for the sum, a copy as large as the device's LoRA gradients, kept for the run.
TEST_F(PlanRanks, ADeviceRankPlansTheBuffersOfItsGradientSum) {
  const std::string model = config("Llama-3.1-70B.json");
  const nlohmann::json one = plan_of(model, "cuda", 0);
  const nlohmann::json two = plan_of(model, "cuda", 2);
  EXPECT_FALSE(has_item(one, kHostCopy));
  uint64_t device_grads = 0;
  for (const auto& i : two["items"])
    if (i["component"] == "LoRA gradients" && i["tier"] == "device") device_grads = i["bytes"];
  ASSERT_GT(device_grads, 0u);
  const uint64_t round = 2 * (uint64_t(1) << 20) * sizeof(float);
  if (dist::nccl_built()) {
    EXPECT_EQ(item(two, "gradient sum: the ranks' gradients gathered by NCCL"), round);
    EXPECT_FALSE(has_item(two, kHostCopy));
    EXPECT_EQ(two["peak"]["device"].get<uint64_t>(), one["peak"]["device"].get<uint64_t>() + round);
    EXPECT_NEAR(double(two["peak"]["host"].get<uint64_t>()), double(one["peak"]["host"].get<uint64_t>()),
                double(kStartupSlack));
  } else {
    EXPECT_EQ(item(two, kHostCopy), device_grads);
    EXPECT_EQ(item(two, kGathered), round);
    EXPECT_EQ(two["peak"]["device"], one["peak"]["device"]);
    EXPECT_GE(two["peak"]["host"].get<uint64_t>() + kStartupSlack,
              one["peak"]["host"].get<uint64_t>() + device_grads);
  }
  EXPECT_EQ(model_items(two), model_items(one));
}

// A tiny model's adapters fit one round: the buffer is every rank's whole gradient.
TEST_F(PlanRanks, ASmallAdaptersSumGathersEveryRanksWholeGradient) {
  const std::string model = std::string(TIGHTFIT_FIXTURES) + "/hf_tiny_llama/config.json";
  const nlohmann::json j = plan_of(model, "cpu", 3);
  const uint64_t grads = item(j, "LoRA gradients");
  ASSERT_LT(grads / sizeof(float), uint64_t(1) << 20);
  EXPECT_EQ(item(j, kGathered), 3 * grads);
}

// --shard-weights: each rank's host memory holds 1/N of the layers' weights (its shares) instead of
// all of them, and the device holds what --weights host gives it, two block slots; Llama-3.1-70B's
// NF4 layers are about 35 GiB.
TEST_F(PlanRanks, ShardedWeightsHoldOneNthOfTheLayersOnEachRank) {
  const std::string model = config("Llama-3.1-70B.json");
  const auto plan = [&](int ranks, bool shard) {
    std::vector<std::string> a = {
        "--model",        model,  "--device",        "cuda",  "--quant",   "nf4",
        "--seq-len",      "2048", "--micro-batch",   "1",     "--max-mem", "1TiB",
        "--max-host-mem", "1TiB", "--checkpointing", "block", "--ranks",   std::to_string(ranks)};
    if (shard)
      a.push_back("--shard-weights");
    else
      a.insert(a.end(), {"--weights", "host"});
    return plan_json(a);
  };
  const nlohmann::json host = plan(2, false);
  const uint64_t layers = item(host, "base weights converted at load");
  ASSERT_GT(layers, uint64_t(30) << 30);
  for (int ranks : {2, 4}) {
    const nlohmann::json j = plan(ranks, true), whole = plan(ranks, false);
    EXPECT_EQ(j["weights"], "shard");
    const uint64_t share = item(j, "base weights: this rank's share of the layers");
    // The layers' bytes (less the globals converted at load, under 3 GiB) over the ranks, rounded up
    // per part to 64 bytes.
    EXPECT_GT(share, (layers - (uint64_t(3) << 30)) / uint64_t(ranks)) << ranks;
    EXPECT_LT(share, layers / uint64_t(ranks) + (uint64_t(1) << 20)) << ranks;
    EXPECT_EQ(j["peak"]["device"], whole["peak"]["device"]) << ranks;
    EXPECT_LT(j["peak"]["host"].get<uint64_t>(), whole["peak"]["host"].get<uint64_t>() - layers / 3) << ranks;
    // The step's copies are those of --weights host (each block to the device) and the gathers of
    // the other ranks' shares, twice a micro-batch at the nominal rate of MPI on one machine.
    const double gathers = 2.0 * double(share) * (ranks - 1) / offload::CostRates::device().gather_bytes_s;
    const double accum = j["grad_accum"].get<double>();
    ASSERT_EQ(j["grad_accum"], whole["grad_accum"]);
    EXPECT_NEAR(j["predicted_step"]["copy_s"].get<double>(),
                whole["predicted_step"]["copy_s"].get<double>() + accum * gathers, accum * gathers * 1e-9)
        << ranks;
  }
  // The table of alternatives shows the shard tier beside the others.
  bool shown = false;
  for (const auto& a : host["alternatives"]) shown = shown || a["weights"] == "shard";
  EXPECT_TRUE(shown) << host["alternatives"].dump();
}

TEST_F(PlanRanks, ShardedWeightsNeedSeveralRanksAndNoOtherTier) {
  Result r = run({"plan", "--model", config("Llama-3.1-8B.json"), "--shard-weights"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--shard-weights splits the per-layer weights"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--ranks N"), std::string::npos) << r.err;
  r = run({"plan", "--model", config("Llama-3.1-8B.json"), "--shard-weights", "--ranks", "2", "--weights",
           "disk"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("leave --weights out"), std::string::npos) << r.err;
}

TEST_F(PlanRanks, RefusesANumberOfRanksBelowOne) {
  const Result r = run({"plan", "--model", config("Llama-3.1-8B.json"), "--ranks", "0"});
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("--ranks"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace tf
