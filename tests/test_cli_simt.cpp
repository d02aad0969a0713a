// The tightfit binary on --device simt (the CUDA backend on the simulator): finetune, eval and
// generate run and agree with --device cpu, and a run killed with SIGKILL resumes to the
// uninterrupted losses bit for bit, as on the cpu.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/cli_test_util.h"

namespace tf::test {
namespace {

class CliSimt : public Cli {
 protected:
  // The "loss" line of eval's output.
  static double eval_loss(const Result& r) {
    const size_t at = r.out.find("\nloss ");
    EXPECT_NE(at, std::string::npos) << r.out;
    return at == std::string::npos ? NAN : std::stod(r.out.substr(at + 6));
  }
};

TEST_F(CliSimt, FinetuneEvalAndGenerateRunAndFollowTheCpu) {
  make_model_and_data();
  std::vector<std::string> sim = finetune_args("sim", 3), cpu = finetune_args("cpu", 3);
  set_option(sim, "--device", "simt");
  set_option(cpu, "--device", "cpu");
  const Result rs = run(sim);
  ASSERT_EQ(rs.status, 0) << rs.err;
  EXPECT_NE(rs.out.find("\ndevice: simt (SIMT simulator"), std::string::npos) << rs.out;
  ASSERT_EQ(run(cpu).status, 0);
  const std::vector<double> ls = losses(dir_ / "sim" / "metrics.jsonl"),
                            lc = losses(dir_ / "cpu" / "metrics.jsonl");
  ASSERT_EQ(ls.size(), 3u);
  ASSERT_EQ(lc.size(), 3u);
  // The f32 model is stored as bf16 on the device: weights and GEMM inputs round to 8 significant
  // bits (2^-8 relative) on a 2-layer model whose losses are ~5.7 (ln 320); a wrong op is off by O(1).
  for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(ls[i], lc[i], 0.05 * lc[i]) << "step " << i;

  const std::vector<std::string> eval = {"eval",
                                         "--model",
                                         (dir_ / "model").string(),
                                         "--adapter",
                                         (dir_ / "sim").string(),
                                         "--data",
                                         (dir_ / "train.jsonl").string(),
                                         "--seq-len",
                                         "48",
                                         "--max-new-tokens",
                                         "2",
                                         "--threads",
                                         "1"};
  std::vector<std::string> es = eval, ec = eval;
  es.insert(es.end(), {"--device", "simt"});
  ec.insert(ec.end(), {"--device", "cpu"});
  const Result rse = run(es), rce = run(ec);
  ASSERT_EQ(rse.status, 0) << rse.err;
  ASSERT_EQ(rce.status, 0) << rce.err;
  EXPECT_NE(rse.out.find("device      simt"), std::string::npos) << rse.out;
  EXPECT_NEAR(eval_loss(rse), eval_loss(rce), 0.05 * eval_loss(rce));

  const Result g =
      run({"generate", "--model", (dir_ / "model").string(), "--adapter", (dir_ / "sim").string(), "--prompt",
           "the quick", "--max-new-tokens", "4", "--device", "simt", "--threads", "1"});
  EXPECT_EQ(g.status, 0) << g.err;
  EXPECT_FALSE(g.out.empty());
}

TEST_F(CliSimt, KilledRunResumesToTheSameLossesBitForBit) {
  make_model_and_data();
  expect_killed_run_resumes_bit_for_bit(8, "1", "simt");
}

}  // namespace
}  // namespace tf::test
