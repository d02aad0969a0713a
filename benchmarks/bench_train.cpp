// Training throughput of a ~100M-parameter Llama config on the CPU backend, reported against the
// machine's sgemm rate measured in the same run.
//
//   build/benchmarks/bench_train [--steps N] [--seq S] [--batch B] [--threads T] [--checkpoint none|block]
//
// Prints tokens/s, achieved GFLOP/s (useful model FLOPs: forward plus the input-gradient half of
// backward through frozen weights, plus LoRA; recomputation is not counted), the sgemm GFLOP/s on
// the model's own GEMM shapes, and their ratio.
#include <cblas.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "benchmarks/bench_models.h"
#include "kernels/ops.h"
#include "src/core/rng.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"

using namespace tf;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// sgemm rate over the GEMM shapes one training step runs: tokens x in -> out forward (B
// transposed, as nn.Linear) and the input gradient tokens x out -> in (B plain), each the best of
// 5 calls so that thread start-up and first-touch paging are not counted against the baseline.
double measure_sgemm_gflops(int64_t tokens, const LlamaConfig& c) {
  const int64_t shapes[][2] = {{c.hidden, c.q_dim()}, {c.hidden, c.intermediate}, {c.intermediate, c.hidden}};
  double flops = 0, secs = 0;
  for (const auto& s : shapes) {
    for (const bool forward : {true, false}) {
      const int64_t K = forward ? s[0] : s[1], N = forward ? s[1] : s[0];
      std::vector<float> A(size_t(tokens * K), 0.01f), B(size_t(N * K), 0.02f), C(size_t(tokens * N));
      double best = 1e30;
      for (int rep = 0; rep < 5; ++rep) {
        const auto t0 = Clock::now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, forward ? CblasTrans : CblasNoTrans, int(tokens), int(N),
                    int(K), 1.0f, A.data(), int(K), B.data(), forward ? int(K) : int(N), 0.0f, C.data(),
                    int(N));
        best = std::min(best, seconds_since(t0));
      }
      flops += 2.0 * double(tokens) * double(N) * double(K);
      secs += best;
    }
  }
  return flops / secs / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 3, seq = 512, batch = 2, threads = 0;
  CheckpointPolicy policy = CheckpointPolicy::None;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
        std::exit(1);
      }
      return argv[++i];
    };
    if (a == "--steps")
      steps = std::atoi(next());
    else if (a == "--seq")
      seq = std::atoi(next());
    else if (a == "--batch")
      batch = std::atoi(next());
    else if (a == "--threads")
      threads = std::atoi(next());
    else if (a == "--checkpoint")
      policy = std::strcmp(next(), "block") == 0 ? CheckpointPolicy::PerBlock : CheckpointPolicy::None;
    else {
      std::fprintf(stderr, "error: unknown option %s\n", a.c_str());
      return 1;
    }
  }
  cpu::set_num_threads(threads);

  // ~100M parameters: a SmolLM/Llama-shaped model with tied embeddings.
  LlamaConfig c;
  c.hidden = 768;
  c.intermediate = 2048;
  c.n_layers = 12;
  c.n_heads = 12;
  c.n_kv_heads = 4;
  c.head_dim = 64;
  c.vocab = 32000;
  c.tie_embeddings = true;
  c.rope.head_dim = 64;
  c.max_positions = 4096;
  LoraConfig l;
  l.rank = 16;
  l.alpha = 32;

  const int64_t tokens = int64_t(batch) * seq;
  LlamaModel model(init_random_weights(c, DType::BF16, 1), l, policy, tokens);
  TrainConfig tc;
  tc.lr.total_steps = steps + 1;
  Trainer trainer(model, tc);

  const auto n = static_cast<size_t>(tokens);
  std::vector<int32_t> ids(n), targets(n), pos(n);
  const Philox rng(3, 0);
  for (int64_t i = 0; i < tokens; ++i) {
    ids[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(c.vocab));
    pos[size_t(i)] = int32_t(i % seq);
  }
  for (int64_t i = 0; i < tokens; ++i)
    targets[size_t(i)] = (i + 1) % seq == 0 ? kIgnoreIndex : ids[size_t(i + 1)];
  const Batch b{batch, seq, ids.data(), targets.data(), pos.data(), nullptr};

  trainer.step({&b, 1});  // warm-up: page in weights, spin up threads
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) trainer.step({&b, 1});
  const double secs = seconds_since(t0);
  const double sgemm = measure_sgemm_gflops(tokens, c);

  const double tok_s = double(tokens) * steps / secs;
  const double gflops = bench::train_flops_per_token(c, l, seq) * tok_s / 1e9;
  std::printf(
      "model: %.1fM params (hidden %d, %d layers, vocab %d, bf16 weights), LoRA r=%d on all 7 projections\n",
      double(c.n_params()) / 1e6, c.hidden, c.n_layers, c.vocab, l.rank);
  std::printf("run: %d steps of %d x %d tokens, threads %d, checkpointing %s\n", steps, batch, seq,
              cpu::num_threads(), policy == CheckpointPolicy::None ? "none" : "per block");
  std::printf("step time        %8.3f s\n", secs / steps);
  std::printf("tokens/s         %8.1f\n", tok_s);
  std::printf("train GFLOP/s    %8.1f\n", gflops);
  std::printf("sgemm GFLOP/s    %8.1f  (OpenBLAS, same shapes, same run)\n", sgemm);
  std::printf("ratio            %8.1f %%\n", 100.0 * gflops / sgemm);
  return 0;
}
