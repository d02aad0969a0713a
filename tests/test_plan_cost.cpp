// defines: tests of the planner's cost model (offload/cost_model.h) and of the choices it drives:
// --micro-batch auto, --batch-size, and auto weights and checkpointing ranked by predicted step time.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "offload/cost_model.h"
#include "tests/cli_test_util.h"
#include "tests/plan_test_util.h"

namespace tf {
namespace {

using offload::CostInputs;
using offload::CostRates;
using offload::step_cost;

LlamaConfig tiny_config() {
  LlamaConfig c;
  c.hidden = 8;
  c.intermediate = 24;
  c.n_layers = 3;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.vocab = 50;
  return c;
}

// Rates at which a second is a FLOP (or a byte) and nothing else costs: the times are the counts.
CostRates unit_rates() {
  CostRates r;
  r.flops = 1;
  r.half_rate_rows = 0;
  r.op_overhead_s = 0;
  r.link_bytes_s = 1;
  r.disk_bytes_s = 1;
  r.gather_bytes_s = 1;
  r.memory_bytes_s = 1;
  return r;
}

// The arithmetic of a step, counted here from the shapes: every product 2 FLOPs per multiply-add;
// the forward's seven projections and their rank-r adapters, causal attention (half the score
// matrix, twice: q.k and the weights times v), the lm_head; the backward's input gradients of the
// frozen projections (one product each), the adapters' two products per forward one, attention's at
// 2.5 times its forward, and lm_head's input gradient.
TEST(CostModel, CountsTheArithmeticOfTheForwardBackwardAndRecomputation) {
  CostInputs in;
  in.config = tiny_config();
  in.lora.rank = 2;
  in.lora.targets = 1u << int(LoraTarget::Q) | 1u << int(LoraTarget::Down);
  in.micro_batch = 2;
  in.seq_len = 6;
  in.grad_accum = 3;
  const double T = 12;  // tokens of a micro-batch
  const double proj = 8 * 8 + 2 * (8 * 4) + 8 * 8 + 3 * (8 * 24);
  const double lora = 2 * (8 + 8) + 2 * (24 + 8);
  const double attention = 2 * (6 * 6) * 2 * 4 * 2;
  const double forward = 2 * T * (proj + lora) + attention;
  const double backward = 2 * T * proj + 4 * T * lora + 2.5 * attention;
  const double head = 2 * T * 50 * 8;
  const offload::StepCost plain = step_cost(in, unit_rates());
  EXPECT_DOUBLE_EQ(plain.compute_s, 3 * (3 * (forward + backward) + 2 * head));
  EXPECT_EQ(plain.recompute_s, 0);
  in.recompute = true;
  const offload::StepCost again = step_cost(in, unit_rates());
  EXPECT_DOUBLE_EQ(again.compute_s, plain.compute_s);
  EXPECT_DOUBLE_EQ(again.recompute_s, 3 * 3 * forward);
  EXPECT_DOUBLE_EQ(again.total_s - plain.total_s, again.recompute_s);
}

// A measured disk rate and per-op cost change the predicted step of a run streamed from the disk:
// its copies by the ratio of the rates, its per-op part by that of the costs.
TEST(CostModel, AMeasuredDiskRateAndOpCostPriceAStreamedStep) {
  CostInputs in;
  in.config = tiny_config();
  in.lora.rank = 4;
  in.micro_batch = 1;
  in.seq_len = 64;
  in.streamed_bytes = 64 << 20;
  in.streamed_from_disk = true;
  const CostRates nominal = CostRates::cpu(1);
  const CostRates slow = nominal.calibrated({nominal.flops * 64 / (64 + nominal.half_rate_rows), 64, 0,
                                             4 * nominal.op_overhead_s, nominal.disk_bytes_s / 8},
                                            "bench");
  const offload::StepCost a = step_cost(in, nominal), b = step_cost(in, slow);
  EXPECT_NEAR(b.compute_s, a.compute_s, a.compute_s * 1e-12);
  EXPECT_NEAR(b.copy_s, 8 * a.copy_s, a.copy_s * 1e-12);
  EXPECT_NEAR(b.overhead_s, 4 * a.overhead_s, a.overhead_s * 1e-12);
  EXPECT_GT(b.total_s, a.total_s);
}

// A chunked MLP forms its gate and up products again in the backward, lets recomputation stop at
// the MLP, and runs its products at the chunk's rows; an upload before the first block hides behind
// nothing.
TEST(CostModel, ChunkedMlpAndUploadedRowsCostWhatTheModelRuns) {
  CostInputs in;
  in.config = tiny_config();
  in.lora.targets = 0;
  in.micro_batch = 2;
  in.seq_len = 8;
  in.grad_accum = 2;
  const double T = 16;
  const double gate_up = 2 * 8 * 24, mlp = 3 * 8 * 24;
  const offload::StepCost whole = step_cost(in, unit_rates());
  in.mlp_chunk = 16;  // all rows: no chunking
  EXPECT_DOUBLE_EQ(step_cost(in, unit_rates()).compute_s, whole.compute_s);
  in.mlp_chunk = 4;
  const offload::StepCost chunked = step_cost(in, unit_rates());
  EXPECT_DOUBLE_EQ(chunked.compute_s - whole.compute_s, 2 * 3 * 2 * T * gate_up);
  in.recompute = true;
  const offload::StepCost recomputed = step_cost(in, unit_rates());
  in.mlp_chunk = 0;
  const offload::StepCost recomputed_whole = step_cost(in, unit_rates());
  EXPECT_DOUBLE_EQ(recomputed_whole.recompute_s - recomputed.recompute_s, 2 * 3 * 2 * T * mlp);

  CostRates r = unit_rates();
  r.half_rate_rows = 8;
  in.recompute = false;
  in.mlp_chunk = 0;
  const double at_all = step_cost(in, r).compute_s;
  in.mlp_chunk = 4;
  // The MLP's products at 4 rows run at a third of the rate; at 16 at two thirds.
  const double mlp_flops = 2 * 3 * (2 * T * mlp + 2 * T * mlp + 2 * T * gate_up);
  const double mlp_whole = 2 * 3 * (2 * T * mlp + 2 * T * mlp);
  EXPECT_NEAR(step_cost(in, r).compute_s - at_all, mlp_flops * 3 - mlp_whole * 1.5, 1e-6 * at_all);

  in.mlp_chunk = 0;
  in.uploaded_bytes = 50;
  const offload::StepCost up = step_cost(in, unit_rates());
  EXPECT_DOUBLE_EQ(up.exposed_copy_s, 2 * 50.0);
  EXPECT_DOUBLE_EQ(up.total_s - whole.total_s, 2 * 50.0);
}

// A product of few rows runs below the large-product rate, and every op pays its fixed cost once
// per micro-batch: the same sequences in larger micro-batches take less time.
TEST(CostModel, LargerMicroBatchesOfTheSameStepAreFaster) {
  CostInputs in;
  in.config = tiny_config();
  in.seq_len = 16;
  for (const CostRates& r : {CostRates::cpu(2), CostRates::device()}) {
    double last = 0;
    for (int m : {8, 4, 2, 1}) {
      in.micro_batch = m;
      in.grad_accum = 8 / m;
      const double t = step_cost(in, r).total_s;
      EXPECT_GT(t, last) << r.describe() << " micro-batch " << m;
      last = t;
    }
  }
}

// Copies beside compute hide behind it but for the first block's; where compute is shorter they
// show by the difference. Copies that take the compute's cores (the cpu) never hide.
TEST(CostModel, CopiesHideBehindComputeOnlyWhereTheyRunBesideIt) {
  CostInputs in;
  in.config = tiny_config();
  in.seq_len = 16;
  in.streamed_bytes = 300;
  CostRates r = unit_rates();
  const offload::StepCost s = step_cost(in, r);
  ASSERT_GT(s.compute_s, 2 * 300.0);
  EXPECT_DOUBLE_EQ(s.copy_s, 2 * 300.0);
  EXPECT_DOUBLE_EQ(s.exposed_copy_s, 2 * 300.0 / 3);

  in.streamed_bytes = uint64_t(s.compute_s);  // two passes: the copies take twice the compute
  const offload::StepCost slow = step_cost(in, r);
  EXPECT_DOUBLE_EQ(slow.exposed_copy_s, slow.copy_s - slow.compute_s + slow.copy_s / 3);

  in.streamed_bytes = 300;
  in.offloaded_bytes = 100;
  r.copies_overlap = false;
  const offload::StepCost serial = step_cost(in, r);
  EXPECT_DOUBLE_EQ(serial.copy_s, 2 * 300.0 + 2 * 100.0);
  EXPECT_DOUBLE_EQ(serial.exposed_copy_s, serial.copy_s);

  // From disk at a tenth of the link's rate.
  r.disk_bytes_s = 0.1;
  in.offloaded_bytes = 0;
  in.streamed_from_disk = true;
  EXPECT_DOUBLE_EQ(step_cost(in, r).copy_s, 2 * 300.0 / 0.1);

  // Sharded weights: the other ranks' shares gathered at their rate, for the forward and the
  // backward, before the copy to the device; beside compute they hide as the copies do.
  in.streamed_from_disk = false;
  r.gather_bytes_s = 0.5;
  in.gathered_bytes = 40;
  EXPECT_DOUBLE_EQ(step_cost(in, r).copy_s, 2 * 300.0 + 2 * 40.0 / 0.5);
  r.copies_overlap = true;
  const offload::StepCost hidden = step_cost(in, r);
  ASSERT_GT(hidden.compute_s, hidden.copy_s);
  EXPECT_DOUBLE_EQ(hidden.exposed_copy_s, hidden.copy_s / 3);
}

class PlanCost : public test::PlanCli {
 protected:
  std::vector<std::string> eight_b(const std::string& micro_batch) {
    return {"--model",        config("Llama-3.1-8B.json"),
            "--device",       "cuda",
            "--quant",        "nf4",
            "--seq-len",      "2048",
            "--micro-batch",  micro_batch,
            "--batch-size",   "8",
            "--max-host-mem", "1TiB"};
  }
};

// Under --micro-batch auto the plan splits --batch-size sequences into the largest micro-batch that
// fits (the cost model predicts larger ones faster), and a budget between two micro-batches' peaks
// takes the smaller.
TEST_F(PlanCost, AutoMicroBatchTakesTheFastestSplitThatFits) {
  // The memory layout fixed (the table on the device, the MLP on all rows), so that only the
  // micro-batch is left to choose.
  const std::vector<std::string> pinned = {"--weights",   "resident", "--checkpointing", "block",
                                           "--embedding", "device",   "--mlp-chunk",     "1000000"};
  std::vector<std::string> args = eight_b("auto");
  args.insert(args.end(), pinned.begin(), pinned.end());
  args.insert(args.end(), {"--max-mem", "1TiB"});
  nlohmann::json j = plan_json(args);
  EXPECT_EQ(j["micro_batch"], 8);
  EXPECT_EQ(j["grad_accum"], 1);
  const uint64_t peak8 = j["peak"]["device"];
  const double step8 = j["predicted_step"]["total_s"];

  std::vector<std::string> fixed = eight_b("4");
  fixed.insert(fixed.end(), pinned.begin(), pinned.end());
  fixed.insert(fixed.end(), {"--max-mem", "1TiB"});
  const nlohmann::json four = plan_json(fixed);
  EXPECT_EQ(four["micro_batch"], 4);
  EXPECT_EQ(four["grad_accum"], 2);
  const uint64_t peak4 = four["peak"]["device"];
  const double step4 = four["predicted_step"]["total_s"];
  ASSERT_LT(peak4, peak8);
  EXPECT_GT(step4, step8);

  args = eight_b("auto");
  args.insert(args.end(), pinned.begin(), pinned.end());
  args.insert(args.end(), {"--max-mem", std::to_string(peak8 - 1)});
  j = plan_json(args);
  EXPECT_EQ(j["micro_batch"], 4);
  EXPECT_EQ(j["grad_accum"], 2);
  EXPECT_EQ(j["peak"]["device"].get<uint64_t>(), peak4);
  bool said = false;
  for (const auto& c : j["choices"])
    said = said || c.get<std::string>().find("micro-batch 4 x grad-accum 2 (auto: 8 sequences per step") == 0;
  EXPECT_TRUE(said) << j["choices"].dump();

  // With the layout on auto too, micro-batch 8 fits under the same budget with the table in host
  // memory or the MLP in chunks, which cost copies and products again: the plan takes whichever is
  // predicted faster, never slower than micro-batch 4 as laid out above.
  args = eight_b("auto");
  args.insert(args.end(),
              {"--weights", "resident", "--checkpointing", "block", "--max-mem", std::to_string(peak8 - 1)});
  j = plan_json(args);
  EXPECT_LE(j["peak"]["device"].get<uint64_t>(), peak8 - 1);
  EXPECT_LE(j["predicted_step"]["total_s"].get<double>(), step4);
}

// With everything on auto, the plan can trade recomputation for a larger micro-batch: it takes
// whichever the cost model predicts faster, and says against what.
TEST_F(PlanCost, AutoWeighsRecomputationAgainstTheMicroBatch) {
  std::vector<std::string> args = eight_b("auto");
  args.insert(args.end(), {"--max-mem", "1TiB"});
  nlohmann::json j = plan_json(args);
  EXPECT_EQ(j["weights"], "resident");
  EXPECT_EQ(j["checkpointing"], "none");
  EXPECT_EQ(j["micro_batch"], 8);
  // 24 GiB: micro-batch 8 without recomputation does not fit; which of the others is faster is the
  // cost model's to say, and the plan takes it.
  args = eight_b("auto");
  args.insert(args.end(), {"--max-mem", "24GiB"});
  j = plan_json(args);
  ASSERT_EQ(j["fits"], true);
  EXPECT_LE(j["peak"]["device"].get<uint64_t>(), uint64_t(24) << 30);
  const double chosen = j["predicted_step"]["total_s"];
  int fitting = 0;
  bool recomputed_larger = false;
  for (const char* policy : {"none", "block"}) {
    for (int m : {1, 2, 4, 8}) {
      std::vector<std::string> fixed = eight_b(std::to_string(m));
      fixed.insert(fixed.end(), {"--weights", "resident", "--checkpointing", policy, "--max-mem", "24GiB"});
      const nlohmann::json alt = plan_json(fixed, -1);
      if (alt["fits"] != true) continue;
      ++fitting;
      recomputed_larger = recomputed_larger || (std::string(policy) == "block" && m > j["micro_batch"]);
      EXPECT_GE(alt["predicted_step"]["total_s"].get<double>(), 0.97 * chosen) << policy << " " << m;
    }
  }
  EXPECT_GE(fitting, 3);
  // The trade-off was there to make: recomputation would have allowed a larger micro-batch.
  if (j["checkpointing"] == "none") {
    EXPECT_TRUE(recomputed_larger);
  }
}

// The loss in calls of fewer rows saves logits but slows lm_head's products: --loss-chunk auto takes
// it only when nothing else fits, after the MLP's smallest chunks and the table in host memory.
TEST_F(PlanCost, AutoLossChunkIsTheLastResort) {
  std::vector<std::string> base = eight_b("1");
  base.insert(base.end(), {"--weights", "host", "--checkpointing", "offload", "--embedding", "host",
                           "--mlp-chunk", "256"});
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return plan_json(args);
  };
  const nlohmann::json whole = with({"--loss-chunk", "1000000", "--max-mem", "1TiB"});
  const nlohmann::json by32 = with({"--loss-chunk", "32", "--max-mem", "1TiB"});
  EXPECT_EQ(whole["loss_chunk"], 0);
  EXPECT_EQ(by32["loss_chunk"], 32);
  const uint64_t peak = whole["peak"]["device"], peak32 = by32["peak"]["device"];
  // The device's cross-entropy forms 128 rows of logits at a time; 32 rows save 96 of them, and a
  // little of the scratch of its products and per-row losses.
  const uint64_t logits96 = uint64_t(96) * 128256 * sizeof(float);
  EXPECT_GE(peak - peak32, logits96);
  EXPECT_LE(peak - peak32, logits96 + (uint64_t(1) << 20));
  EXPECT_GT(by32["predicted_step"]["total_s"].get<double>(),
            whole["predicted_step"]["total_s"].get<double>());

  nlohmann::json j = with({"--max-mem", "1TiB"});
  EXPECT_EQ(j["loss_chunk"], 0);
  j = with({"--max-mem", std::to_string(peak - 1)});
  EXPECT_EQ(j["loss_chunk"], 32);
  EXPECT_EQ(j["peak"]["device"].get<uint64_t>(), peak32);
  bool said = false;
  for (const auto& c : j["choices"])
    said = said || c.get<std::string>().find("loss in calls of 32 rows") == 0;
  EXPECT_TRUE(said) << j["choices"].dump();
  j = with({"--max-mem", std::to_string(peak32 - 1)});
  EXPECT_EQ(j["loss_chunk"], 16);

  const test::Result r = run({"plan", "--model", config("Llama-3.1-8B.json"), "--loss-chunk", "0"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--loss-chunk must be auto or a positive count of rows, got '0'"), std::string::npos)
      << r.err;
}

TEST_F(PlanCost, BatchSizeAndMicroBatchAreCheckedTogether) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--micro-batch", "3", "--batch-size", "8"}, "--batch-size 8 is not a multiple of --micro-batch 3"},
      {{"--micro-batch", "2", "--grad-accum", "3", "--batch-size", "8"},
       "--batch-size 8 differs from --micro-batch 2 x --grad-accum 3"},
      {{"--micro-batch", "2x"}, "--micro-batch must be a count or auto, got '2x'"},
      {{"--micro-batch", "0"}, "--micro-batch must be in [1, 4096]"},
      {{"--batch-size", "-1"}, "--batch-size must be in [0, 1048576]"},
  };
  for (const auto& [extra, want] : bad) {
    std::vector<std::string> args = {"plan", "--model", config("Llama-3.1-8B.json"), "--seq-len", "128"};
    args.insert(args.end(), extra.begin(), extra.end());
    const test::Result r = run(args);
    EXPECT_EQ(r.status, 1) << want;
    EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
  }
  // A --batch-size with a micro-batch sets the accumulation; a config file may say auto or a count.
  const auto dir = std::filesystem::path(::testing::TempDir()) / "plan_cost_configs";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "auto.json") << R"({"micro_batch": "auto", "batch_size": 6})";
  std::ofstream(dir / "count.json") << R"({"micro_batch": 2, "batch_size": 6})";
  nlohmann::json j = plan_json({"--model", config("Llama-3.1-8B.json"), "--seq-len", "128", "--device", "cpu",
                                "--config", (dir / "count.json").string(), "--max-mem", "1TiB"});
  EXPECT_EQ(j["micro_batch"], 2);
  EXPECT_EQ(j["grad_accum"], 3);
  j = plan_json({"--model", config("Llama-3.1-8B.json"), "--seq-len", "128", "--device", "cpu", "--config",
                 (dir / "auto.json").string(), "--max-mem", "1TiB"});
  EXPECT_EQ(j["micro_batch"], 6);
  EXPECT_EQ(j["grad_accum"], 1);
  std::filesystem::remove_all(dir);
}

// finetune --micro-batch auto records what it chose, and a resumed run keeps it whatever the budget
// now allows: the split of a step changes its sums.
TEST_F(PlanCost, FinetuneRecordsTheAutoMicroBatchAndAResumeKeepsIt) {
  make_model_and_data();
  std::vector<std::string> args = finetune_args("run", 2);
  set_option(args, "--device", "cpu");
  set_option(args, "--micro-batch", "auto");
  args.insert(args.end(), {"--batch-size", "4", "--save-every", "1"});
  test::Result r = run(args);
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("plan: micro-batch 4 x grad-accum 1 (auto: 4 sequences per step"), std::string::npos)
      << r.out;
  std::ifstream in(dir_ / "run" / "config.json");
  const nlohmann::json cfg = nlohmann::json::parse(in);
  EXPECT_EQ(cfg["micro_batch"], "auto");
  EXPECT_EQ(cfg["batch_size"], 4);
  EXPECT_EQ(cfg["micro_batch_chosen"], 4);
  EXPECT_EQ(cfg["grad_accum_chosen"], 1);

  // The finished run made resumable again (its adapter and report removed). Under a budget that
  // micro-batch 4 no longer fits, a fresh plan would take a smaller one; the resumed run refuses.
  std::ifstream plan_in(dir_ / "run" / "plan.json");
  const nlohmann::json plan = nlohmann::json::parse(plan_in);
  const uint64_t peak = plan["peak"]["host"];
  std::filesystem::remove_all(dir_ / "run" / "adapter");
  std::filesystem::remove(dir_ / "run" / "report.html");
  std::vector<std::string> resume = args;
  resume.insert(resume.end(), {"--resume", "--max-mem", std::to_string(peak - (uint64_t(1) << 20))});
  r = run(resume);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.err.find("the run does not fit its memory budget"), std::string::npos) << r.err;
  resume.back() = "auto";
  r = run(resume);
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("micro-batch 4 x grad-accum 1 (auto, as the run chose it when it started)"),
            std::string::npos)
      << r.out;
}

}  // namespace
}  // namespace tf
