// tightfit: fine-tune Llama-family models with LoRA on small machines. Subcommands: finetune, plan,
// init, inspect, generate, eval, export, data. A user error exits 1 with one line "error: ..." on stderr.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "kernels/cpu/threads.h"
#include "src/cli/bench.h"
#include "src/cli/commands.h"
#include "src/cli/data.h"
#include "src/cli/finetune.h"
#include "src/cli/options.h"
#include "src/cli/plan.h"
#include "src/core/error.h"
#include "src/core/pool.h"
#include "src/core/process_memory.h"

namespace {

using namespace tf::cli;

constexpr const char* kDeviceHelp =
    "Where the model runs: auto (a GPU when one is present, else the CPU), cpu, cuda, cuda:N, or simt "
    "(the CUDA backend on the built-in GPU simulator: slow, for checking)";
// libgomp's wait policy is chosen as tightfit starts (kernels/cpu/threads.h); --help says what it is.
std::string threads_help() {
  return std::string(
             "Worker threads (0: one per hardware thread). Idle OpenMP threads sleep at once "
             "(OMP_WAIT_POLICY=") +
         tf::cpu::kDefaultWaitPolicy +
         "), so that threads waiting at a barrier leave the cores to the ones they wait for on a busy "
         "machine; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment choose otherwise. Decoding's "
         "few-token products and cached attention run on tightfit's own pool, whose threads check for work " +
         std::to_string(tf::kPoolSpinMicros) +
         " us before they sleep and take only the CPUs other programs leave free";
}

constexpr const char* kAttentionHelp =
    "Attention kernel of the CUDA backend: auto (flash where the head dimension is 64, 80, 96 or 128, "
    "else plain), flash (bf16 on tensor cores), plain (the tiled f32 reference kernels) or cudnn "
    "(cuDNN's fused attention, on a GPU)";

constexpr const char* kMatmulHelp =
    "Precision of the cpu's products with the base's bf16 and quantized matrices: auto (bf16 where the CPU "
    "has avx512_bf16 and the base has such matrices, else f32), f32 (matrices widened to f32, OpenBLAS "
    "sgemm) or bf16 (activations rounded to bf16, sums in f32, oneDNN; as PyTorch's bf16). LoRA stays f32";

constexpr const char* kWeightsHelp =
    "Where the base model's layers live while training: auto (resident when the plan fits the budgets, "
    "else streamed), resident, host (in host memory, each layer copied to the device just before use) or "
    "disk (read a layer at a time, around the page cache, from the model file, or from a spill file of "
    "the layers --quant converts: see --spill-dir)";

constexpr const char* kSpillDirHelp =
    "With --weights disk and a --quant that converts the base at load: the directory its converted layers "
    "are written to, one at a time, and streamed from (default: the run directory, as base-spill.bin); the "
    "file is removed when the run ends";
constexpr const char* kInferenceSpillDirHelp =
    "With --weights disk and a --quant that converts the base at load: the directory its converted layers "
    "are written to, one at a time, and streamed from (default: TMPDIR, or /tmp); the file is removed "
    "when the run ends";

constexpr const char* kInferenceWeightsHelp =
    "Where the base model's layers live: auto (resident when the plan fits the budgets with the KV cache, "
    "else streamed), resident, host (in host memory, each layer copied to the device just before use) or "
    "disk (read a layer at a time, around the page cache, from the model file, or from a spill file of "
    "the layers --quant converts: see --spill-dir)";
constexpr const char* kInferenceMaxMemHelp =
    "Budget of the memory the model runs in, for --weights auto: a GPU's, or the host's on the cpu (auto: "
    "the GPU's memory; the host's available memory). A size: 8GiB, 512MiB, 2.5GB";
constexpr const char* kInferenceMaxHostMemHelp =
    "Budget of host memory, for --weights auto (auto: the host's available memory)";

constexpr const char* kMaskHistoryHelp =
    "Loss only on the last assistant turn of each conversation (a turn's own \"train\"/\"weight\" flag still "
    "wins)";
constexpr const char* kTrainOnEosHelp =
    "Which end-of-turn markers (<|im_end|>, <|eot_id|>, EOS) count in the loss: turn (each trained turn's), "
    "last (the last trained turn's only), all (every turn's, trained or not), none";

// `training` false: the options as the plan subcommand takes them, which needs no data or run
// directory.
void add_finetune_options(CLI::App& c, FinetuneOptions& o, bool training = true) {
  CLI::Option* model =
      c.add_option("--model", o.model,
                   training ? "Base model: an HF directory or a .gguf file"
                            : "Base model: an HF directory, a .gguf file or a config.json alone");
  model->required();
  CLI::Option* data = c.add_option("--data", o.data,
                                   "Training data (JSONL: text, prompt/completion, messages or instruction)");
  if (training) data->required();
  c.add_option("--eval-data", o.eval_data,
               "Held-out JSONL evaluated before and after training (and every --eval-every steps)");
  CLI::Option* out =
      c.add_option("--out", o.out, "Run directory (config, metrics, checkpoints, adapter, report)");
  if (training) out->required();
  c.add_option("--quant", o.quant,
               "Base weights: keep (compute with the file's own storage, quantized GGUF blocks included), "
               "none (f32), bf16, int8 or nf4 (quantized at load, QLoRA), or ggml's q8_0, q4_0, q4_1, q5_0, "
               "q5_1 (quantized at load as llama.cpp's quantizer does)")
      ->capture_default_str();
  c.add_option("--lora-rank", o.lora_rank, "LoRA rank r")->capture_default_str();
  c.add_option("--lora-alpha", o.lora_alpha, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --rslora)")
      ->capture_default_str();
  c.add_option("--lora-dropout", o.lora_dropout, "Dropout on the LoRA input")->capture_default_str();
  c.add_option("--lora-targets", o.lora_targets,
               "Projections to adapt: all, or a list of q,k,v,o,gate,up,down (a fused model's as PEFT names "
               "its modules: Phi-3's qkv_proj,o_proj,gate_up_proj,down_proj)")
      ->capture_default_str();
  c.add_flag("--rslora,!--no-rslora", o.rslora, "Rank-stabilised scaling alpha/sqrt(r)");
  c.add_option("--lr", o.lr, "Peak learning rate")->capture_default_str();
  c.add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  c.add_option("--clip", o.clip, "Global gradient-norm clip (0 disables)")->capture_default_str();
  c.add_option("--warmup", o.warmup, "Linear warmup steps")->capture_default_str();
  c.add_option("--schedule", o.schedule, "LR schedule after warmup: cosine, linear or constant")
      ->capture_default_str();
  c.add_option("--steps", o.steps, "Optimizer steps, at most 1e9 (0: derive from --epochs)")
      ->capture_default_str();
  c.add_option("--epochs", o.epochs, "Passes over the data when --steps is 0")->capture_default_str();
  c.add_option(
       "--seq-len", o.seq_len,
       "Tokens per sequence (a longer example keeps its first --seq-len tokens; it is dropped when no "
       "completion token is left)")
      ->capture_default_str();
  c.add_option(
       "--micro-batch", o.micro_batch_arg,
       "Sequences per forward/backward, or auto (the plan splits --batch-size into the micro-batch its "
       "cost model predicts fastest among those that fit)")
      ->type_name("INT|auto")
      ->default_str(std::to_string(o.micro_batch));
  c.add_option("--grad-accum", o.grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  c.add_flag("--overlap-grad-sum,!--no-overlap-grad-sum", o.overlap_grad_sum,
             "Over several ranks (mpirun), sum each block's LoRA gradients while the backward of the blocks "
             "below it runs (default on; the same bits either way)");
  c.add_flag("--shard-weights", o.shard_weights,
             "Over several ranks (mpirun -np N), each rank holds 1/N of the base model's layers in host "
             "memory and all-gathers a layer's block from the others just before it runs (the same bits "
             "as whole weights)");
  c.add_option("--batch-size", o.batch_size,
               "Sequences per optimizer step (0: --micro-batch x --grad-accum; with --micro-batch auto, 4 x "
               "--grad-accum); given with a --micro-batch count, it sets --grad-accum")
      ->capture_default_str();
  c.add_flag("--pack,!--no-pack", o.pack, "Pack several examples per sequence (default on)");
  c.add_option("--template", o.template_name,
               "Prompt format: auto (the model's own chat template, plain without one), chatml, llama3, "
               "llama2, mistral, gemma, alpaca or plain")
      ->capture_default_str();
  c.add_option("--think", o.think,
               "<think>...</think> blocks in assistant turns rendered with the model's own template: keep "
               "(train on them as the template renders them) or strip (remove them before rendering)")
      ->capture_default_str();
  c.add_option("--train-on", o.train_on, "Loss on the completion/assistant tokens or on all tokens")
      ->capture_default_str();
  c.add_flag("--mask-history,!--no-mask-history", o.mask_history, kMaskHistoryHelp);
  c.add_option("--train-on-eos", o.train_on_eos, kTrainOnEosHelp)->capture_default_str();
  c.add_flag("--skip-bad-lines,!--no-skip-bad-lines", o.skip_bad_lines,
             "Skip and count malformed JSONL records instead of failing (a line over 64 MiB still fails)");
  c.add_option("--seed", o.seed, "Seed of LoRA init, dropout and data order")->capture_default_str();
  c.add_option("--save-every", o.save_every, "Checkpoint every N steps (0: only at the end)")
      ->capture_default_str();
  c.add_option("--keep", o.keep, "Checkpoints kept")->capture_default_str();
  c.add_option("--eval-every", o.eval_every, "Evaluate every N steps (0: before and after only)")
      ->capture_default_str();
  c.add_option(
       "--checkpointing", o.checkpointing,
       "Activation checkpointing: auto (the plan's choice: per block when keeping every block's activations "
       "does not fit the budgets, then per block with the kept block inputs in host memory), none, block "
       "(recompute each block from its kept input) or offload (as block, the inputs kept in host memory and "
       "copied back one block ahead of the backward; not on the cpu)")
      ->capture_default_str();
  c.add_option("--device", o.device, kDeviceHelp)->capture_default_str();
  c.add_option("--attention", o.attention, kAttentionHelp)->capture_default_str();
  c.add_option("--matmul", o.matmul, kMatmulHelp)->capture_default_str();
  c.add_option("--weights", o.weights, kWeightsHelp)->capture_default_str();
  c.add_option("--spill-dir", o.spill_dir, kSpillDirHelp);
  c.add_option("--rates", o.rates,
               "JSON of `tightfit bench --json` on this machine: the planner's auto choices use the cpu "
               "rates it measured instead of nominal ones");
  c.add_option(
       "--mlp-chunk", o.mlp_chunk,
       "Rows of tokens the MLP forms its [rows, intermediate] activations for at a time, in the forward "
       "and the backward, which forms them again instead of keeping them: auto (all rows when the run "
       "fits, else the largest halving of them, down to 256 rows, that does) or a count")
      ->capture_default_str();
  c.add_option(
       "--loss-chunk", o.loss_chunk,
       "Rows of tokens per call of the loss, whose [rows, vocab] logits are formed at most 64 (cpu) or "
       "128 (device) rows at a time: auto (the whole micro-batch, else 32 or 16 rows when nothing "
       "else fits) or a count")
      ->capture_default_str();
  c.add_option("--embedding", o.embedding,
               "Where the embedding table lives on a device: auto (on the device, else in host memory when "
               "that is what fits), device or host (each micro-batch's rows looked up on the host and "
               "uploaded)")
      ->capture_default_str();
  c.add_option("--max-mem", o.max_mem,
               "Budget of the memory the model runs in: a GPU's, or the host's on the cpu (auto: the GPU's "
               "memory; the host's available memory). A size: 8GiB, 512MiB, 2.5GB")
      ->capture_default_str();
  c.add_option("--max-host-mem", o.max_host_mem, "Budget of host memory (auto: the host's available memory)")
      ->capture_default_str();
  c.add_option("--threads", o.threads, threads_help())->capture_default_str();
  if (training) {
    c.add_flag("--resume", o.resume, "Continue the run in --out from its newest complete checkpoint");
    c.add_flag("--profile", o.profile,
               "Time each op of the training steps (the backend waits for each one): calls, time, share and "
               "GFLOP/s or GB/s per op and projection, written to RUN/profile.json and printed at the end");
  }
}

// CLI11 reads integers with strtoll / strtoull in base 0: "010" would be 8, "0x10" 16, and "-1"
// would wrap to 2^64 - 1 in an unsigned option. Here integers are decimal.
void require_decimal_integers(CLI::App& app) {
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    for (CLI::Option* opt : sub->get_options()) {
      const std::string type = opt->get_type_name();
      if (type != "INT" && type != "UINT") continue;
      const bool is_unsigned = type == "UINT";
      opt->transform(CLI::Validator(
          [is_unsigned](std::string& s) -> std::string {
            const size_t digits = s.starts_with("-") || s.starts_with("+") ? 1 : 0;
            if (is_unsigned && s.starts_with("-")) return "must not be negative, got " + s;
            if (digits == s.size() || s.find_first_not_of("0123456789", digits) != std::string::npos)
              return "must be a decimal integer, got " + s;
            const size_t lead = std::min(s.find_first_not_of('0', digits), s.size() - 1);
            s.erase(digits, lead - digits);  // leading zeros, which base 0 would read as octal
            return {};
          },
          ""));
    }
  }
}

int run(int argc, char** argv) {
  CLI::App app{"tightfit: LoRA fine-tuning of Llama-family models on the CPU", "tightfit"};
  app.require_subcommand(1);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.set_version_flag("--version", "tightfit 0.1.0");

  FinetuneOptions ft;
  CLI::App* finetune = app.add_subcommand("finetune", "Train a LoRA adapter");
  finetune->add_option("--config",
                       "JSON file of options; repeatable: a later file overrides an earlier one, and options "
                       "given here override both");
  add_finetune_options(*finetune, ft);

  FinetuneOptions planned;
  bool plan_json = false;
  CLI::App* plan = app.add_subcommand(
      "plan", "Predict a finetune run's memory per tier, choose what auto leaves open, say whether it fits");
  plan->add_option("--config", "JSON file of finetune options; repeatable, as for finetune");
  add_finetune_options(*plan, planned, false);
  plan->add_flag("--json", plan_json, "Print the plan as JSON");
  plan->add_option("--ranks", planned.ranks,
                   "Plan one rank of a data-parallel run of N processes (mpirun -np N): each rank's table "
                   "and peak, with the buffers of the gradient sum over the ranks")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();

  InitOptions init;
  CLI::App* init_cmd =
      app.add_subcommand("init", "Write a random model as an HF directory (for tests and demos)");
  init_cmd->add_option("--config", init.config, "tiny, small, or an HF config.json")->capture_default_str();
  init_cmd->add_option("--out", init.out, "Output directory")->required();
  init_cmd->add_option("--seed", init.seed, "Seed of the random weights")->capture_default_str();
  init_cmd->add_flag("--force", init.force,
                     "Replace --out even if it is not empty (everything in it is deleted)");

  std::string inspect_model;
  bool all_tensors = false;
  CLI::App* inspect =
      app.add_subcommand("inspect", "Show a model's architecture, tensors, tokenizer and template");
  inspect->add_option("model", inspect_model, "HF directory or .gguf file")->required();
  inspect->add_flag("--all-tensors", all_tensors, "List every tensor");

  GenerateOptions gen;
  CLI::App* generate = app.add_subcommand("generate", "Continue a prompt (greedy by default)");
  generate->add_option("--model", gen.model, "HF directory or .gguf file")->required();
  generate->add_option("--adapter", gen.adapter, "A run directory or a PEFT adapter directory");
  generate
      ->add_option("--quant", gen.quant,
                   "Base weights: keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0 or q5_1")
      ->capture_default_str();
  generate->add_option("--prompt", gen.prompt, "Text to continue")->required();
  generate->add_option("--max-new-tokens", gen.max_new_tokens, "Tokens to generate at most")
      ->capture_default_str();
  generate->add_option("--temperature", gen.temperature, "0 is greedy")->capture_default_str();
  generate->add_option("--seed", gen.seed, "Sampling seed")->capture_default_str();
  generate->add_flag("--chat", gen.chat, "Send the prompt as a user turn of the chat template");
  generate->add_flag("--stats", gen.stats,
                     "Print to stderr the prompt's and the decoding's tokens/s (decoding: the tokens after "
                     "the first over the time from the first to the last)");
  generate->add_option("--template", gen.template_name, "Template for --chat")->capture_default_str();
  generate->add_option("--device", gen.device, kDeviceHelp)->capture_default_str();
  generate->add_option("--attention", gen.attention, kAttentionHelp)->capture_default_str();
  generate->add_option("--weights", gen.weights, kInferenceWeightsHelp)->capture_default_str();
  generate->add_option("--spill-dir", gen.spill_dir, kInferenceSpillDirHelp);
  generate->add_option("--max-mem", gen.max_mem, kInferenceMaxMemHelp)->capture_default_str();
  generate->add_option("--max-host-mem", gen.max_host_mem, kInferenceMaxHostMemHelp)->capture_default_str();
  generate->add_option("--threads", gen.threads, threads_help())->capture_default_str();

  EvalOptions ev;
  CLI::App* eval = app.add_subcommand("eval", "Loss, perplexity and exact-match accuracy on a JSONL set");
  eval->add_option("--model", ev.model, "HF directory or .gguf file")->required();
  eval->add_option("--adapter", ev.adapter, "A run directory or a PEFT adapter directory");
  eval->add_option("--quant", ev.quant,
                   "Base weights: keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0 or q5_1")
      ->capture_default_str();
  eval->add_option("--data", ev.data, "JSONL data")->required();
  eval->add_option("--template", ev.template_name, "Prompt format")->capture_default_str();
  eval->add_option("--seq-len", ev.seq_len, "Tokens per sequence")->capture_default_str();
  eval->add_option("--micro-batch", ev.micro_batch, "Sequences per forward")->capture_default_str();
  eval->add_option("--max-new-tokens", ev.max_new_tokens, "Greedy completion length for exact match")
      ->capture_default_str();
  eval->add_option("--device", ev.device, kDeviceHelp)->capture_default_str();
  eval->add_option("--attention", ev.attention, kAttentionHelp)->capture_default_str();
  eval->add_option("--weights", ev.weights, kInferenceWeightsHelp)->capture_default_str();
  eval->add_option("--spill-dir", ev.spill_dir, kInferenceSpillDirHelp);
  eval->add_option("--max-mem", ev.max_mem, kInferenceMaxMemHelp)->capture_default_str();
  eval->add_option("--max-host-mem", ev.max_host_mem, kInferenceMaxHostMemHelp)->capture_default_str();
  eval->add_option("--threads", ev.threads, threads_help())->capture_default_str();
  eval->add_option("--logits-out", ev.logits_out,
                   "Write the first examples' full logits to this safetensors file");
  eval->add_option("--logits-examples", ev.logits_examples, "Examples whose logits --logits-out writes")
      ->capture_default_str();

  ExportOptions ex;
  CLI::App* export_cmd =
      app.add_subcommand("export", "Export a run's adapter: peft, gguf (llama.cpp LoRA) or merged");
  export_cmd->add_option("--run", ex.run, "Run directory")->required();
  export_cmd->add_option("--format", ex.format, "peft, gguf or merged")->capture_default_str();
  export_cmd->add_option("--out", ex.out, "Output directory (peft, merged HF) or file (gguf, merged GGUF)")
      ->required();
  export_cmd->add_option(
      "--quant", ex.quant,
      "merged only: nf4 for an HF directory (bitsandbytes 4-bit); for a .gguf --out the merged "
      "tensors' type: f16 (default), q8_0, q4_0, q4_1, q5_0, q5_1, or keep (the base's)");
  export_cmd->add_flag("--force", ex.force,
                       "Replace --out even if tightfit did not write it (a directory is replaced whole)");

  DataOptions dat;
  CLI::App* data_cmd = app.add_subcommand(
      "data",
      "Show a dataset as training sees it: examples rendered with their loss tokens marked, token counts, "
      "what --seq-len drops or truncates, packing efficiency");
  data_cmd
      ->add_option("--model", dat.model,
                   "HF directory or .gguf file (only its tokenizer and template are read)")
      ->required();
  data_cmd->add_option("--data", dat.data, "JSONL data")->required();
  data_cmd->add_option("--template", dat.template_name, "Prompt format")->capture_default_str();
  data_cmd
      ->add_option("--think", dat.think,
                   "<think>...</think> blocks with the model's own template: keep or strip")
      ->capture_default_str();
  data_cmd->add_option("--seq-len", dat.seq_len, "Tokens per sequence")->capture_default_str();
  data_cmd->add_option("--micro-batch", dat.micro_batch, "Sequences per batch, for the packing efficiency")
      ->capture_default_str();
  data_cmd->add_option("--train-on", dat.train_on, "Loss on the completion/assistant tokens or on all tokens")
      ->capture_default_str();
  data_cmd->add_flag("--mask-history,!--no-mask-history", dat.mask_history, kMaskHistoryHelp);
  data_cmd->add_option("--train-on-eos", dat.train_on_eos, kTrainOnEosHelp)->capture_default_str();
  data_cmd->add_option("-n,--examples", dat.examples, "Examples shown rendered, from the start of the file")
      ->capture_default_str();
  data_cmd->add_flag("--json", dat.json, "Print one JSON object");

  BenchOptions bn;
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Measure this machine: the op benchmarks and a short training run on a model's shapes, each rate "
      "beside "
      "the GEMM ceiling measured in the same run, the peak memory beside the plan's prediction");
  bench->add_option("--model", bn.model, "HF directory or .gguf file (default: random weights of --config)");
  bench->add_option("--config", bn.config, "Random model without --model: tiny, small or an HF config.json")
      ->capture_default_str();
  bench
      ->add_option("--quant", bn.quant,
                   "Base weights: keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0 or q5_1")
      ->capture_default_str();
  bench->add_option("--device", bn.device, kDeviceHelp)->capture_default_str();
  bench->add_option("--attention", bn.attention, kAttentionHelp)->capture_default_str();
  bench->add_option("--matmul", bn.matmul, kMatmulHelp)->capture_default_str();
  bench->add_option("--seq", bn.seq, "Tokens per sequence")->capture_default_str();
  bench->add_option("--micro-batch", bn.micro_batch, "Sequences per micro-batch")->capture_default_str();
  bench->add_option("--steps", bn.steps, "Timed training steps (after one untimed)")->capture_default_str();
  bench->add_option("--lora-rank", bn.lora_rank, "LoRA rank of the training run")->capture_default_str();
  bench->add_option("--threads", bn.threads, threads_help())->capture_default_str();
  bench->add_option("--json", bn.json, "Also write the figures to this file as JSON");
  bench->add_flag("--profile", bn.profile,
                  "After the timed training steps, as many more with each op timed (the backend waits for "
                  "each one): the per-op table, and in --json");

  require_decimal_integers(app);
  // The subcommands whose --config names a JSON file of options (init's names a model preset).
  const std::vector<const CLI::App*> config_file_commands = {finetune, plan};

  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && !args[0].starts_with("-")) {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      names += (names.empty() ? "" : ", ") + sub->get_name();
      known = known || sub->get_name() == args[0];
    }
    TF_CHECK(known, "unknown subcommand '", args[0], "'; subcommands: ", names);
    for (const CLI::App* cmd : config_file_commands) {
      if (cmd->get_name() != args[0]) continue;
      const std::vector<std::string> rest = expand_config_files(*cmd, {args.begin() + 1, args.end()});
      args.resize(1);
      args.insert(args.end(), rest.begin(), rest.end());
    }
  }
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "error: %s (see tightfit %s--help)\n", e.what(),
                 app.get_subcommands().empty() ? "" : (app.get_subcommands()[0]->get_name() + " ").c_str());
    return 1;
  }

  const std::string threads_warning = check_threads(*finetune   ? ft.threads
                                                    : *plan     ? planned.threads
                                                    : *generate ? gen.threads
                                                    : *eval     ? ev.threads
                                                    : *bench    ? bn.threads
                                                                : 0);
  if (!threads_warning.empty()) std::fprintf(stderr, "%s\n", threads_warning.c_str());

  if (*finetune) return run_finetune(ft);
  if (*plan) return run_plan(planned, plan_json);
  if (*init_cmd) return run_init(init);
  if (*inspect) return run_inspect(inspect_model, all_tensors);
  if (*generate) return run_generate(gen);
  if (*eval) return run_eval(ev);
  if (*data_cmd) return run_data(dat);
  if (*bench) return run_bench(bn);
  return run_export(ex);
}

}  // namespace

int main(int argc, char** argv) {
  // Before anything else: libgomp's wait policy can only be chosen by starting again.
  tf::cpu::apply_default_wait_policy(argv);
  // Before anything allocates: the allocator policy that keeps the process's memory what its plan says.
  tf::set_memory_policy();
  try {
    return run(argc, argv);
  } catch (const tf::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
