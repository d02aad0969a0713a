// defines: tf::cli::FinetuneOptions (every finetune option with its default), their JSON form,
// and the --config file expansion shared by all subcommands
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tf::cli {

struct FinetuneOptions {
  std::string model, data, eval_data, out;
  // LoRA
  int lora_rank = 16;
  float lora_alpha = 32.0f;
  float lora_dropout = 0.05f;
  std::string lora_targets = "all";
  bool rslora = false;
  // Optimisation
  float lr = 2e-4f;
  float weight_decay = 0.0f;
  float clip = 1.0f;
  int warmup = 10;
  std::string schedule = "cosine";
  int steps = 0;        // 0: derived from --epochs
  double epochs = 1.0;  // used when --steps is 0
  // Data
  int seq_len = 512;
  int micro_batch = 4;
  int grad_accum = 1;
  bool pack = true;
  std::string template_name = "auto";
  std::string train_on = "completion";
  bool skip_bad_lines = false;
  uint64_t seed = 42;
  // Run
  int save_every = 50;
  int keep = 3;
  int eval_every = 0;  // 0: only at the end
  std::string checkpointing = "auto";
  std::string device = "auto";
  int threads = 0;
  bool resume = false;
};

// The resolved options as written to RUN/config.json.
nlohmann::json to_json(const FinetuneOptions& o);
// The options a resumed run must share with the run it continues (everything that changes the
// numbers: model, data, LoRA, optimisation, batching, seed), as canonical JSON, and its hash.
nlohmann::json resume_relevant(const FinetuneOptions& o);
std::string config_hash(const nlohmann::json& relevant);

// Expands `--config FILE` (a JSON object of option names to values) into command-line tokens
// placed before the user's own, so explicit options override the file. Keys may use '-' or '_';
// true/false become --name / --no-name. Throws tf::Error naming the file and key.
std::vector<std::string> expand_config_file(const std::vector<std::string>& args);

}  // namespace tf::cli
