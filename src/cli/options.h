// defines: tf::cli::FinetuneOptions (every finetune option with its default), their JSON form,
// the expansion of --config files, and the checks of option values shared by the subcommands
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace tf::cli {

// The most optimizer steps a run may have, given as --steps or worked out from --epochs: far beyond
// any real run, it keeps the step arithmetic clear of overflow.
constexpr int64_t kMaxSteps = 1'000'000'000;

struct FinetuneOptions {
  std::string model, data, eval_data, out;
  std::string quant = "keep";  // how base weights are stored: io::QuantMode's names
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
  bool overlap_grad_sum = true;  // over several ranks: sum each block's gradients during the backward
  // Over several ranks: each holds 1/N of the per-layer weights, a block all-gathered before use
  // (offload::WeightTier::Shard). Changes where bytes live, not the numbers.
  bool shard_weights = false;
  // --micro-batch as given on the command line ("auto" or a count; empty: micro_batch as set). With
  // auto the planner splits the step's batch_size sequences into the micro-batch its cost model
  // predicts fastest among those that fit, and grad_accum follows.
  std::string micro_batch_arg;
  bool micro_batch_auto = false;
  int batch_size = 0;  // sequences per optimizer step; 0: micro_batch x grad_accum (auto: 4 x grad_accum)
  bool pack = true;
  std::string template_name = "auto";
  std::string think = "keep";  // reasoning blocks in the model template's assistant turns: keep, strip
  std::string train_on = "completion";
  bool mask_history = false;          // loss only on the last assistant turn
  std::string train_on_eos = "turn";  // which end-of-turn markers count: turn, last, all, none
  bool skip_bad_lines = false;
  uint64_t seed = 42;
  // Run
  int save_every = 50;
  int keep = 3;
  int eval_every = 0;  // 0: only at the end
  std::string checkpointing = "auto";
  std::string device = "auto";
  std::string attention = "auto";  // the device backend's attention kernel: auto, flash, plain, cudnn
  // The cpu's products with bf16 / quantized base matrices (--matmul): auto, f32, bf16
  std::string matmul = "auto";
  std::string matmul_chosen;  // what --matmul runs on this machine (f32, bf16), once the model is loaded
  // Memory (the planner): where per-layer base weights live (auto, resident, host, disk) and the
  // budgets of the backend's memory and of host memory (auto: the device's memory, the host's
  // available memory; or a size such as 8GiB, 512MiB, 2.5GB).
  std::string weights = "auto";
  // Rows of tokens the MLP runs at a time (ModelLayout::mlp_chunk): auto (all rows, else the
  // largest halving of them down to kMinMlpChunk that fits the budgets) or a count.
  std::string mlp_chunk = "auto";
  // Rows of tokens per call of the loss (ModelLayout::loss_rows): auto (the whole micro-batch, else
  // the first of kLossChunks that fits) or a count.
  std::string loss_chunk = "auto";
  // Where the embedding table lives on a device backend (ModelLayout::host_embedding): auto (placed,
  // else in host memory when that is what fits), device or host.
  std::string embedding = "auto";
  std::string max_mem = "auto";
  std::string max_host_mem = "auto";
  // Where a base converted at load (--quant) is written to be streamed under --weights disk: empty,
  // the run directory (<out>/base-spill.bin); else a file of a name of its own in that directory.
  std::string spill_dir;
  // tightfit bench's --json results whose cpu rates the planner's auto choices use (--rates); empty:
  // its nominal rates. Not in config.json: it changes where bytes live and how, not what is trained.
  std::string rates;
  int threads = 0;
  bool resume = false;
  // Time every op of the training steps (kernels/profile.h): RUN/profile.json and a table at the end.
  // Not in config.json: it changes no result.
  bool profile = false;
  // Processes of a data-parallel launch (mpirun -np N): set by finetune from its communicator, not an
  // option; config.json records it when above 1, and a resume must keep it.
  int ranks = 1;
};

// Resolves --micro-batch and --batch-size into micro_batch, grad_accum and batch_size (sequences per
// step): "auto" sets micro_batch_auto, a count is checked against --batch-size, which it must divide
// (and then sets grad_accum). Throws tf::Error naming the option.
void resolve_batching(FinetuneOptions& o);

// The resolved options as written to RUN/config.json.
nlohmann::json to_json(const FinetuneOptions& o);
// The options a resumed run must share with the run it continues (everything that changes the
// numbers: model, data, LoRA, optimisation, batching, seed), as canonical JSON, and its hash.
nlohmann::json resume_relevant(const FinetuneOptions& o);
std::string config_hash(const nlohmann::json& relevant);

// Expands each `--config FILE` among `args` (the arguments of subcommand `cmd`) into command-line
// tokens placed before the user's own, so explicit options override the files, and a later file an
// earlier one. A file is a JSON object of `cmd`'s option names (with '-' or '_') to values of the
// option's kind: a boolean for a flag (false for a flag with no --no- form leaves it unset), an
// integer or a number with an integral value (1e3) for an integer option, a number for a real one,
// a string for the rest. Throws tf::Error naming the file and the key.
std::vector<std::string> expand_config_files(const CLI::App& cmd, const std::vector<std::string>& args);

// Refuses a `path` given to `option` that does not exist or is a directory, saying what was
// `expected` ("a JSONL file"): checked before a model loads, so a wrong path costs no loading time.
void check_input_file(const std::string& option, const std::string& path, const std::string& expected);

// Bytes of a size option `option` (such as --max-mem): a number with an optional unit, B, KiB,
// MiB, GiB, TiB (powers of 1024; K, M, G, T the same) or KB, MB, GB, TB (powers of 1000). Throws
// naming the option for anything else, zero, or a size past 2^62 bytes.
uint64_t parse_size(const std::string& option, const std::string& text);

// Refuses a negative --threads (0 is one per hardware thread); returns a warning line when it asks
// for more threads than the machine has, else "".
std::string check_threads(int threads);

}  // namespace tf::cli
