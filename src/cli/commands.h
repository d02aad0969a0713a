// defines: the subcommands other than finetune: init, inspect, generate, eval, export
#pragma once

#include <string>

#include "src/model/config.h"

namespace tf::cli {

struct InitOptions {
  std::string config = "tiny";  // tiny | small | path to an HF config.json
  std::string out;
  uint64_t seed = 0;
  bool force = false;  // replace a non-empty --out
};
int run_init(const InitOptions& o);
// The architecture of init's random models: tiny, small, or an HF config.json's.
LlamaConfig named_config(const std::string& name);

int run_inspect(const std::string& model, bool all_tensors);

struct GenerateOptions {
  std::string model, adapter, prompt;
  std::string quant = "keep";
  int max_new_tokens = 64;
  float temperature = 0.0f;
  uint64_t seed = 0;
  bool chat = false;  // wrap the prompt as a user turn of the model's chat template
  std::string template_name = "auto";
  std::string device = "auto";
  std::string attention = "auto";
  // Where the per-layer weights live: auto (the planner's choice within the budgets), resident, host
  // or disk; the budgets as finetune's --max-mem and --max-host-mem.
  std::string weights = "auto";
  std::string max_mem = "auto", max_host_mem = "auto";
  std::string spill_dir;  // where --weights disk writes a base converted at load (empty: TMPDIR)
  int threads = 0;
  bool stats = false;  // print the prompt's and the decoding's token rates to stderr
};
// Rows of tokens generate's model runs at a time (its prompt is fed in pieces of this many).
inline constexpr int kGenerateRows = 256;
int run_generate(const GenerateOptions& o);

struct EvalOptions {
  std::string model, adapter, data;
  std::string quant = "keep";
  std::string template_name = "auto";
  int seq_len = 512;
  int micro_batch = 4;
  int max_new_tokens = 64;
  std::string device = "auto";
  std::string attention = "auto";
  std::string weights = "auto";  // as GenerateOptions::weights, and its budgets
  std::string max_mem = "auto", max_host_mem = "auto";
  std::string spill_dir;  // as GenerateOptions::spill_dir
  int threads = 0;
  // When set: the full logits of the first `logits_examples` examples (each run alone, unpacked)
  // are written to this safetensors file as logits.<i> [tokens, vocab] and input_ids.<i>, for
  // comparing with other implementations.
  std::string logits_out;
  int logits_examples = 4;
};
int run_eval(const EvalOptions& o);

struct ExportOptions {
  std::string run, format = "peft", out;
  // merged only: "nf4" (an HF directory in bitsandbytes 4-bit), or for a .gguf --out the type of
  // the merged tensors: "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1" or "keep"; empty for the
  // default (f16 / bf16)
  std::string quant;
  bool force = false;  // replace an --out that is not a previous tightfit export
};
int run_export(const ExportOptions& o);

}  // namespace tf::cli
