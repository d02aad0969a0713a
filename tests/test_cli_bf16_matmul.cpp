// Tests: finetune's --matmul: refused values before the model loads, the line the run's log shows and
// the choice recorded in the run's config for an f32 and a quantized base, each as resolve_matmul says
// for this CPU, and a bf16 run's losses beside an f32 run's (different bits, within bf16's bound).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/isa.h"
#include "tests/cli_test_util.h"

using namespace tf;
using namespace tf::test;

namespace {

class CliMatmul : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    make_model_and_data();
  }

  std::vector<std::string> args(const std::string& out, const std::vector<std::string>& extra) {
    std::vector<std::string> a = finetune_args(out, 2);
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  // The "matmul: ..." line of a run's log ("" when there is none).
  static std::string matmul_line(const std::string& out) {
    const size_t at = out.find("\nmatmul: ");
    if (at == std::string::npos) return {};
    return out.substr(at + 9, out.find('\n', at + 1) - at - 9);
  }

  nlohmann::json config(const std::string& out) {
    return nlohmann::json::parse(slurp(dir_ / out / "config.json"));
  }
};

TEST_F(CliMatmul, BadValuesAreRefusedBeforeLoading) {
  for (const auto& [extra, needle] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--matmul", "fp16"}, "--matmul must be auto, f32 or bf16, got 'fp16'"},
           {{"--matmul", "f32", "--device", "simt"},
            "--matmul f32 applies to the cpu; --device simt multiplies"}}) {
    const Result r = run(args("refused", extra));
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("loading "), std::string::npos) << "refused after loading:\n" << r.out;
  }
  if (!cpu::cpu_has_avx512_bf16()) {
    const Result r = run(args("refused", {"--matmul", "bf16"}));
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("--matmul bf16 needs a CPU with avx512_bf16"), std::string::npos) << r.err;
  }
}

TEST_F(CliMatmul, AutoFollowsTheCpuAndTheBaseAndIsRecorded) {
  const bool bf16 = cpu::cpu_has_avx512_bf16();
  const struct {
    std::string quant;
    DType dtype;
  } bases[] = {{"keep", DType::F32}, {"int8", DType::INT8}};
  for (const auto& b : bases) {
    SCOPED_TRACE("--quant " + b.quant);
    const Result r = run(args(b.quant, {"--quant", b.quant}));
    ASSERT_EQ(r.status, 0) << r.err;
    const cpu::MatmulResolution want = cpu::resolve_matmul(cpu::MatmulChoice::Auto, bf16, {b.dtype});
    EXPECT_EQ(matmul_line(r.out), want.why) << r.out;
    const nlohmann::json c = config(b.quant);
    EXPECT_EQ(c["matmul"], "auto");
    EXPECT_EQ(c["matmul_chosen"], cpu::matmul_precision_name(want.precision));
  }
  // The tiny model's f32 base is f32 under auto; int8 is bf16 exactly where the CPU has avx512_bf16.
  EXPECT_EQ(cpu::resolve_matmul(cpu::MatmulChoice::Auto, bf16, {DType::INT8}).precision,
            bf16 ? cpu::MatmulPrecision::BF16 : cpu::MatmulPrecision::F32);
}

TEST_F(CliMatmul, Bf16ChangesTheLossesWithinItsBound) {
  if (!cpu::cpu_has_avx512_bf16()) GTEST_SKIP() << "this CPU has no avx512_bf16";
  const Result f32 = run(args("f32", {"--quant", "int8", "--matmul", "f32"}));
  const Result bf16 = run(args("bf16", {"--quant", "int8", "--matmul", "bf16"}));
  ASSERT_EQ(f32.status, 0) << f32.err;
  ASSERT_EQ(bf16.status, 0) << bf16.err;
  EXPECT_EQ(matmul_line(f32.out), "f32 (--matmul f32)");
  EXPECT_EQ(matmul_line(bf16.out), "bf16 (--matmul bf16; int8 weights)");
  EXPECT_EQ(config("bf16")["matmul_chosen"], "bf16");
  const std::vector<double> a = losses(dir_ / "f32" / "metrics.jsonl"),
                            b = losses(dir_ / "bf16" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  // The first step's loss is the forward of the same weights: bf16 rounds the activations and
  // weights of every projection (2^-8 relative each) and the errors of a few layers stay well under
  // 1% of a loss near ln(vocab); the second follows one update from slightly different gradients.
  EXPECT_NE(a[0], b[0]) << "--matmul bf16 computed what f32 did";
  for (size_t i = 0; i < 2; ++i) EXPECT_LT(std::abs(a[i] - b[i]), 1e-2 * std::abs(a[i])) << "step " << i + 1;
}

}  // namespace
