// defines: tf::cli::BenchOptions, run_bench (the bench subcommand: the op benchmarks and a short
// training run on the user's machine, each rate beside the GEMM ceiling measured in the same run,
// the peak memory beside the plan's prediction, and the machine)
#pragma once

#include <string>

namespace tf::cli {

struct BenchOptions {
  // The model benchmarked: a model file or directory (--model), else random weights of a named
  // config (init's: tiny, small, or an HF config.json).
  std::string model;
  std::string config = "tiny";
  std::string quant = "keep";  // as finetune's --quant
  std::string device = "auto";
  std::string attention = "auto";
  std::string matmul = "auto";  // as finetune's --matmul
  int seq = 512;
  int micro_batch = 1;
  int steps = 3;  // timed training steps, after one that is not timed
  int lora_rank = 16;
  int threads = 0;
  std::string json;      // when set: the same figures written to this file as JSON
  bool profile = false;  // the training run's ops, each timed, over --steps more steps
};

// Returns the exit status.
int run_bench(const BenchOptions& o);

}  // namespace tf::cli
