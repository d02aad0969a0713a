// defines: tests of the cost model's cpu rates calibrated from tightfit bench's JSON (--rates):
// CostRates::calibrated reproduces the measured rate at the measured rows; plan and finetune take
// the file a real `tightfit bench --json` wrote and say which rates they used; files that are not
// such results, a device bench and a bench at another thread count are refused by name.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "offload/cost_model.h"
#include "tests/plan_test_util.h"

namespace tf::test {
namespace {

TEST(CostRates, CalibratedRunsTheMeasuredRateAtTheMeasuredRows) {
  const offload::CostRates nominal = offload::CostRates::cpu(2);
  for (double rows : {1.0, 64.0, 2048.0}) {
    offload::CostRates::Measured m;
    m.flops_s = 30e9;
    m.rows = rows;
    m.memory_bytes_s = 12e9;
    m.op_overhead_s = 3e-6;
    m.disk_bytes_s = 0.4e9;
    const offload::CostRates r = nominal.calibrated(m, "bench");
    const double at_rows = r.flops * rows / (rows + r.half_rate_rows);
    // One division and one multiplication: within a few ulps of the measured rate.
    EXPECT_NEAR(at_rows, 30e9, 30e9 * 1e-14) << rows;
    EXPECT_EQ(r.half_rate_rows, nominal.half_rate_rows);
    EXPECT_EQ(r.memory_bytes_s, 12e9);
    EXPECT_EQ(r.op_overhead_s, 3e-6);
    EXPECT_EQ(r.disk_bytes_s, 0.4e9);
    EXPECT_EQ(r.describe().rfind("bench: ", 0), 0u) << r.describe();
  }
  // What was not measured stays nominal.
  const offload::CostRates r = nominal.calibrated({30e9, 64, 0, 0, 0}, "x");
  EXPECT_EQ(r.memory_bytes_s, nominal.memory_bytes_s);
  EXPECT_EQ(r.op_overhead_s, nominal.op_overhead_s);
  EXPECT_EQ(r.disk_bytes_s, nominal.disk_bytes_s);
  EXPECT_EQ(nominal.describe().rfind("nominal: ", 0), 0u) << nominal.describe();
}

class PlanRates : public PlanCli {};

TEST_F(PlanRates, PlanAndFinetuneUseTheRatesBenchMeasured) {
  ASSERT_NO_FATAL_FAILURE(make_model_and_data());
  const std::string bench = (dir_ / "bench.json").string();
  const Result b =
      run({"bench", "--config", "tiny", "--seq", "32", "--steps", "1", "--threads", "1", "--json", bench});
  ASSERT_EQ(b.status, 0) << b.err;
  const nlohmann::json measured = nlohmann::json::parse(slurp(bench));
  const double rate = measured["train"]["rate"].get<double>();
  const double rows = measured["tokens_per_micro_batch"].get<double>();
  char want[64];
  std::snprintf(want, sizeof want, ": %.1f GFLOP/s (half of it at 32 rows)",
                rate * (rows + offload::CostRates::cpu(1).half_rate_rows) / rows / 1e9);

  const std::string model = (dir_ / "model").string();
  const nlohmann::json j =
      plan_json({"--model", model, "--device", "cpu", "--threads", "1", "--rates", bench});
  const std::string rates = j["predicted_step"]["rates"].get<std::string>();
  EXPECT_EQ(rates.rfind(
                "measured by tightfit bench (" + bench + ", a training step of 32 rows, the per-op cost", 0),
            0u)
      << rates;
  EXPECT_NE(rates.find(", the disk nominal)"), std::string::npos) << rates;
  if (!measured["op_cost"]["seconds_per_op"].is_null()) {
    char op[32];
    std::snprintf(op, sizeof op, " %.0f us per op",
                  measured["op_cost"]["seconds_per_op"].get<double>() * 1e6);
    EXPECT_NE(rates.find(op), std::string::npos) << rates << " wants " << op;
  }
  EXPECT_NE(rates.find(want), std::string::npos) << rates << " wants " << want;
  const nlohmann::json nominal = plan_json({"--model", model, "--device", "cpu", "--threads", "1"});
  EXPECT_EQ(nominal["predicted_step"]["rates"].get<std::string>().rfind("nominal: ", 0), 0u);

  std::vector<std::string> args = finetune_args("run", 1);
  args.insert(args.end(), {"--rates", bench});
  const Result f = run(args);
  ASSERT_EQ(f.status, 0) << f.err;
  EXPECT_NE(f.out.find("plan: step times predicted at rates measured by tightfit bench (" + bench),
            std::string::npos)
      << f.out;

  // A bench of the model file measures the disk it streams from, and the plan prices reads from it so.
  const std::string model_bench = (dir_ / "model-bench.json").string();
  const Result mb = run(
      {"bench", "--model", model, "--seq", "32", "--steps", "1", "--threads", "1", "--json", model_bench});
  ASSERT_EQ(mb.status, 0) << mb.err;
  const nlohmann::json disk = nlohmann::json::parse(slurp(model_bench))["disk"];
  ASSERT_TRUE(disk.is_object()) << disk;
  char disk_rate[32];
  std::snprintf(disk_rate, sizeof disk_rate, "disk %.1f GB/s", disk["rate"].get<double>() / 1e9);
  const std::string from_disk = plan_json({"--model", model, "--device", "cpu", "--threads", "1", "--rates",
                                           model_bench})["predicted_step"]["rates"]
                                    .get<std::string>();
  EXPECT_NE(from_disk.find(", the disk reading " + disk["file"].get<std::string>() + ")"), std::string::npos)
      << from_disk;
  EXPECT_NE(from_disk.find(disk_rate), std::string::npos) << from_disk << " wants " << disk_rate;

  // Refusals, each naming the file and what is wrong with it.
  const auto refused = [&](const std::vector<std::string>& extra, const std::string& needle) {
    std::vector<std::string> a = {"plan", "--model", model, "--device", "cpu", "--threads", "1"};
    a.insert(a.end(), extra.begin(), extra.end());
    const Result r = run(a);
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  };
  const std::string garbage = (dir_ / "garbage.json").string();
  std::ofstream(garbage) << "{\"train\": ";
  refused({"--rates", garbage}, garbage + ": not JSON");
  const std::string other = (dir_ / "other.json").string();
  std::ofstream(other) << nlohmann::json{{"results", 1}}.dump();
  refused({"--rates", other}, other + ": no \"machine\", \"train\" and \"memory\"");
  nlohmann::json edited = measured;
  edited["train"]["rate"] = -1;
  const std::string negative = (dir_ / "negative.json").string();
  std::ofstream(negative) << edited.dump();
  refused({"--rates", negative}, "\"rate\" is -1; a rate must be positive");
  edited = measured;
  edited["disk"] = {{"file", "m.gguf"}, {"rate", 0}};
  const std::string no_disk = (dir_ / "no-disk.json").string();
  std::ofstream(no_disk) << edited.dump();
  refused({"--rates", no_disk}, no_disk + ": disk: \"rate\" is 0; a rate must be positive");
  edited = measured;
  edited["op_cost"] = {{"seconds_per_op", "fast"}};
  const std::string bad_op = (dir_ / "bad-op.json").string();
  std::ofstream(bad_op) << edited.dump();
  refused({"--rates", bad_op}, bad_op + ": op_cost: no number \"seconds_per_op\"");
  edited = measured;
  edited["memory"]["tier"] = "device";
  const std::string device = (dir_ / "device.json").string();
  std::ofstream(device) << edited.dump();
  refused({"--rates", device}, device + ": a bench of a device backend");
  std::vector<std::string> two = {"--rates", bench};
  two.insert(two.end(), {"--threads", "2"});
  refused(two, bench + ": measured at 1 threads, but this run uses 2");
  refused({"--rates", (dir_ / "missing.json").string()}, "missing.json: cannot open");
}

}  // namespace
}  // namespace tf::test
