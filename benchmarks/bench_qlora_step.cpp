// QLoRA against LoRA on one backend: the time of a training step of a Llama-3.2-1B-shaped model with
// its frozen base stored as nf4 (or int8) against the same step on bf16 weights, measured in the
// same run, and each step's model FLOPs utilisation against the backend's bf16 GEMM rate, also
// measured in the same run (the backend's own matmul op on bf16 operands: cuBLASLt on cuda).
//
//   build/benchmarks/bench_qlora_step [--device cuda|simt|cpu] [--config 1b|tiny] [--seq S] [--batch B]
//                                     [--steps N] [--bases bf16,nf4,int8] [--checkpoint none|block]
//                                     [--attention auto|flash|plain|cudnn] [--weights resident,host]
//
// --weights host also times each base with its layers streamed from host memory (a block copied to
// the device on the copy stream while the one before computes), beside the resident step of the
// same run.
//
// --config tiny (hidden 64, 2 layers) is for checking the benchmark itself on the simulator; its
// figures mean nothing. Random weights and tokens: the step's work does not depend on the values.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "benchmarks/bench_models.h"
#include "kernels/backend.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/io/quantize_weights.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"

using namespace tf;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

LlamaConfig model_config(const std::string& name) {
  if (name == "1b") return bench::llama_1b_config(131072);
  TF_CHECK(name == "tiny", "--config must be 1b or tiny, got '", name, "'");
  LlamaConfig c;
  c.hidden = 64;
  c.intermediate = 128;
  c.n_layers = 2;
  c.n_heads = 1;
  c.n_kv_heads = 1;
  c.head_dim = 64;
  c.vocab = 256;
  c.tie_embeddings = true;
  c.rope.head_dim = c.head_dim;
  c.max_positions = 4096;
  return c;
}

// The bf16 GEMM rate of `be` in TFLOP/s on the model's projection shapes at `tokens` rows (the
// best of five calls per shape, after one warm-up), forward orientation (B transposed).
double gemm_tflops(Backend& be, const LlamaConfig& c, int64_t tokens) {
  const int64_t shapes[][2] = {{c.hidden, c.q_dim()}, {c.hidden, c.intermediate}, {c.intermediate, c.hidden}};
  double flops = 0, secs = 0;
  for (const auto& s : shapes) {
    const int64_t K = s[0], N = s[1];
    DeviceMem a = be.alloc(size_t(tokens * K) * 2, MemTag::Workspace, "gemm A");
    DeviceMem b = be.alloc(size_t(N * K) * 2, MemTag::Workspace, "gemm B");
    DeviceMem out = be.alloc(size_t(tokens * N) * 4, MemTag::Workspace, "gemm C");
    const std::vector<uint16_t> ones(size_t(std::max(tokens, N) * K), 0x3c00);  // bf16 0.0078125
    be.upload(a.data(), ones.data(), a.bytes());
    be.upload(b.data(), ones.data(), b.bytes());
    const MatOperand A{a.data(), DType::BF16, K, false}, B{b.data(), DType::BF16, K, true};
    be.matmul(out.as<float>(), N, A, B, tokens, N, K, 1.0f, 0.0f);
    be.synchronize();
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = Clock::now();
      be.matmul(out.as<float>(), N, A, B, tokens, N, K, 1.0f, 0.0f);
      be.synchronize();
      best = std::min(best, seconds_since(t0));
    }
    flops += 2.0 * double(tokens) * double(N) * double(K);
    secs += best;
  }
  return flops / secs / 1e12;
}

// The base stored as `base` ("bf16", "nf4", "int8"), from the same random bf16 weights.
LlamaWeights base_weights(const LlamaConfig& c, const std::string& base) {
  LlamaWeights w = init_random_weights(c, DType::BF16, 1);
  if (base == "bf16") return w;
  const std::optional<io::QuantMode> mode = io::parse_quant_mode(base);
  TF_CHECK(mode && (*mode == io::QuantMode::Nf4 || *mode == io::QuantMode::Int8),
           "--bases takes bf16, nf4 and int8, got '", base, "'");
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    if (!io::is_matrix_slot(s)) return;
    w.slot(s, layer) = io::store_weight(w.slot(s, layer), *mode, w, hf_weight_name(s, layer));
  });
  if (c.tie_embeddings) w.lm_head = w.embed;
  return w;
}

struct StepResult {
  double seconds = 0;
  double peak_gib = 0;
};

StepResult time_steps(const std::string& device, AttentionKernel attention, const LlamaConfig& c,
                      const std::string& base, CheckpointPolicy policy, offload::WeightTier tier, int batch,
                      int seq, int steps) {
  std::unique_ptr<Backend> be = make_backend(device, nullptr, attention);
  LlamaWeights w = base_weights(c, base);
  LoraConfig l;
  l.rank = 16;
  l.alpha = 32;
  const int64_t tokens = int64_t(batch) * seq;
  be->reserve(LlamaModel::memory_plan(w, l, policy, tokens, *be, tier).total);
  LlamaModel model(std::move(w), l, policy, tokens, *be, tier);
  TrainConfig tc;
  tc.lr.total_steps = steps + 1;
  Trainer trainer(model, tc);

  const auto n = size_t(tokens);
  std::vector<int32_t> ids(n), targets(n), pos(n);
  const Philox rng(3, 0);
  for (size_t i = 0; i < n; ++i) {
    ids[i] = int32_t(rng.u32(i) % uint32_t(c.vocab));
    pos[i] = int32_t(int64_t(i) % seq);
  }
  for (size_t i = 0; i < n; ++i) targets[i] = (int64_t(i) + 1) % seq == 0 ? kIgnoreIndex : ids[i + 1];
  const Batch b{batch, seq, ids.data(), targets.data(), pos.data(), nullptr};

  trainer.step({&b, 1});  // warm-up: library handles, algorithm choices, first-touch paging
  be->synchronize();
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) trainer.step({&b, 1});
  be->synchronize();
  StepResult r;
  r.seconds = seconds_since(t0) / steps;
  r.peak_gib = double(be->tracker().peak_total()) / double(1ull << 30);
  return r;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = std::min(s.find(',', at), s.size());
    out.push_back(s.substr(at, comma - at));
    at = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string device = "cuda", config = "1b", bases = "bf16,nf4,int8", attention = "auto",
              weights = "resident";
  int steps = 3, seq = 2048, batch = 1;
  CheckpointPolicy policy = CheckpointPolicy::PerBlock;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      TF_CHECK(i + 1 < argc, a, " needs a value");
      return argv[++i];
    };
    if (a == "--device")
      device = next();
    else if (a == "--config")
      config = next();
    else if (a == "--seq")
      seq = std::atoi(next().c_str());
    else if (a == "--batch")
      batch = std::atoi(next().c_str());
    else if (a == "--steps")
      steps = std::atoi(next().c_str());
    else if (a == "--bases")
      bases = next();
    else if (a == "--attention")
      attention = next();
    else if (a == "--weights")
      weights = next();
    else if (a == "--checkpoint")
      policy = next() == "none" ? CheckpointPolicy::None : CheckpointPolicy::PerBlock;
    else
      TF_FAIL("unknown option ", a, " (see the usage at the top of benchmarks/bench_qlora_step.cpp)");
  }
  TF_CHECK(seq > 0 && batch > 0 && steps > 0, "--seq, --batch and --steps must be positive");
  const LlamaConfig c = model_config(config);
  const AttentionKernel kernel = parse_attention(attention);

  LoraConfig l;
  l.rank = 16;
  const double flops_per_step = bench::train_flops_per_token(c, l, seq) * double(batch) * seq;
  double ceiling = 0;
  {
    std::unique_ptr<Backend> be = make_backend(device, nullptr, kernel);
    ceiling = gemm_tflops(*be, c, int64_t(batch) * seq);
    std::printf("device: %s\n", be->describe().c_str());
  }
  std::printf(
      "model: %s config, %.2fB params, LoRA r=16 on all 7 projections; %d x %d tokens per step, "
      "checkpointing %s, attention %s\n",
      config.c_str(), double(c.n_params()) / 1e9, batch, seq,
      policy == CheckpointPolicy::None ? "none" : "per block", attention.c_str());
  std::printf("bf16 GEMM ceiling  %8.2f TFLOP/s (the model's projection shapes, same run)\n", ceiling);
  std::vector<offload::WeightTier> tiers;
  for (const std::string& t : split_list(weights)) {
    TF_CHECK(t == "resident" || t == "host", "--weights takes resident and host, got '", t, "'");
    tiers.push_back(t == "host" ? offload::WeightTier::Host : offload::WeightTier::Resident);
  }
  std::printf("%-6s %-9s %12s %12s %12s %10s %10s %12s\n", "base", "weights", "step (s)", "vs bf16",
              "vs resident", "TFLOP/s", "MFU", "peak GiB");
  double bf16_seconds = 0;
  for (const std::string& base : split_list(bases)) {
    double resident_seconds = 0;
    for (offload::WeightTier tier : tiers) {
      const StepResult r = time_steps(device, kernel, c, base, policy, tier, batch, seq, steps);
      const bool resident = tier == offload::WeightTier::Resident;
      if (base == "bf16" && resident) bf16_seconds = r.seconds;
      if (resident) resident_seconds = r.seconds;
      const double tflops = flops_per_step / r.seconds / 1e12;
      char vs_bf16[32] = "-", vs_resident[32] = "-";
      if (bf16_seconds > 0 && resident)
        std::snprintf(vs_bf16, sizeof vs_bf16, "%.3fx", r.seconds / bf16_seconds);
      if (resident_seconds > 0 && !resident)
        std::snprintf(vs_resident, sizeof vs_resident, "%.3fx", r.seconds / resident_seconds);
      std::printf("%-6s %-9s %12.4f %12s %12s %10.2f %9.1f%% %12.2f\n", base.c_str(),
                  offload::weight_tier_name(tier), r.seconds, vs_bf16, vs_resident, tflops,
                  100.0 * tflops / ceiling, r.peak_gib);
      std::fflush(stdout);
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
