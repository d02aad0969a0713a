// defines: tf::cli::RunPlan, plan_run (the planner: the byte model of a finetune run per tier, the
// choice of the options left on auto within the budgets, and the changes that would make a run
// fit), run_plan (the plan subcommand)
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "offload/cost_model.h"
#include "offload/plan.h"
#include "src/cli/options.h"
#include "src/io/describe.h"
#include "src/model/llama.h"

namespace tf::cli {

// The plan item of this rank's share of the per-layer weights under --shard-weights.
inline constexpr const char* kShardsItem = "base weights: this rank's share of the layers";

// A finetune run as planned: its byte model, the checkpoint policy, weight tier and micro-batch it
// runs with (what auto chose, or what was asked), the step time the cost model predicts at its
// nominal rates, the budgets and whether the peaks fit them.
struct RunPlan {
  offload::Plan plan;
  CheckpointPolicy policy = CheckpointPolicy::None;
  offload::WeightTier tier = offload::WeightTier::Resident;
  int micro_batch = 1;
  int grad_accum = 1;
  ModelLayout layout;  // the MLP's chunks and where the embedding table lives
  offload::StepCost cost;
  offload::CostRates rates;
  offload::Budget budget;
  std::string backend;               // the backend whose placement rules were applied
  std::vector<std::string> choices;  // what each auto option chose and why
  bool fits = true;
  uint64_t startup_rss = 0;  // the process's memory when planning began, before the model's headers
  int ranks = 1;             // the data-parallel ranks each of which the plan is for (--ranks)
  nlohmann::json to_json() const;
};

// The LoRA configuration finetune's options give.
LoraConfig lora_config(const FinetuneOptions& o);
// The --checkpointing value of a policy: none, block or offload.
const char* policy_option(CheckpointPolicy p);

// The budgets of `o` on `be`: --max-mem bounds the backend's memory (the host's on cpu), --max-host-mem
// host memory; auto is the device's memory (a GPU) and the host's available memory (MemAvailable).
offload::Budget resolve_budget(const FinetuneOptions& o, const Backend& be);

// The byte model of finetune `o` on `be` (a backend, or one with the same placement rules) for the
// model `d`, with the checkpoint policy and weight tier given; `startup_rss` is the process's
// resident memory before the model's headers were read (its binary, libraries and backend).
offload::Plan byte_model(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                         CheckpointPolicy policy, offload::WeightTier tier, uint64_t startup_rss,
                         const ModelLayout& layout = {});

// The smallest chunk of rows --mlp-chunk auto runs the MLP in: below it, each chunk's products are
// too short for a GEMM to keep a device busy, and the chunk is already a small part of the peak.
inline constexpr int64_t kMinMlpChunk = 256;
// The rows per call of the loss --loss-chunk auto tries when nothing else fits, below the kernels'
// own chunks (64 rows on the cpu, 128 on a device): each saves that many rows of logits.
inline constexpr int64_t kLossChunks[] = {32, 16};
// The layouts of the model's memory a plan of `o` at `max_tokens` rows per micro-batch on `be` tries,
// in order: the MLP on all rows with the embedding table placed, then in host memory (auto, on a
// device backend, a table lm_head does not share), then the MLP in halvings of the rows down to
// kMinMlpChunk (auto), with the last table placement, then (auto) that with the loss in calls of
// each of kLossChunks' rows, unless lm_head is quantized on the cpu, whose kernel keeps no logits per
// row. --mlp-chunk N, --loss-chunk N and --embedding device|host fix theirs; a value that is none of
// these, or a table in host memory where it cannot be, is an error.
std::vector<ModelLayout> model_layouts(const FinetuneOptions& o, int64_t max_tokens, const Backend& be,
                                       const LlamaConfig& c, DType lm_head_dtype);

// The cost model's prediction of an optimizer step of `o` (its micro_batch and grad_accum) run with
// `policy`, `tier` and `layout`, whose byte model is `plan`, at the nominal rates of `be`'s kind.
offload::StepCost predict_step(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                               CheckpointPolicy policy, offload::WeightTier tier, const offload::Plan& plan,
                               const ModelLayout& layout);

// Plans `o`: the checkpointing, weights and micro-batch options left on auto take, among the
// combinations that fit the budgets, the one whose step the cost model predicts fastest
// (recomputing a block costs its forward again; offloaded inputs and streamed weights cost copies
// that hide behind compute only on a device and only when the link keeps up; a small micro-batch
// runs its products at a lower rate and pays the per-op costs more often). Candidates are tried
// resident weights first, then streamed from host (device backends) and from disk; no recomputation,
// then per block, then per block with the kept inputs in host memory (device backends); the
// largest micro-batch first; a later one is taken only when it is predicted at least 3% faster.
// A choice that was given is kept, fitting or not.
RunPlan plan_run(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                 const offload::Budget& budget, uint64_t startup_rss);

// An eval or generate run as the planner sees it: micro-batches of `micro_batch` x `seq_len` tokens
// and, for generation, a KV cache of `kv_tokens` tokens (0: none).
struct InferenceRun {
  std::string model, quant, device, attention, weights, max_mem, max_host_mem, data;
  int micro_batch = 1, seq_len = 0;
  int64_t kv_tokens = 0;
};

// Where an eval or generate run keeps its weights and how it lays out its memory, on the backend
// it makes (`device`). With `weights` auto, plan_run chooses them from the model's headers: a
// forward pass allocates what a training step of a rank-1 adapter under per-block checkpointing
// does (the device's backward scratch makes its prediction an upper bound), and the KV cache,
// sized by its prompt and so outside the model's plan, comes off the budget of the memory the model
// runs in. A run that fits under no choice is refused with its peak. A tier given is taken as it is.
struct InferencePlan {
  std::unique_ptr<Backend> backend;
  std::string device_note;
  offload::WeightTier tier = offload::WeightTier::Resident;
  ModelLayout layout;
  std::vector<std::string> choices;  // what auto chose and why, then the predicted peak; a line each
  RunPlan run;                       // auto's plan (budgets without the KV cache); empty otherwise
};
InferencePlan plan_inference(const InferenceRun& r);

// The peaks of a plan against its budget: "device 7.52 GiB of 8.00 GiB, host 3.10 GiB of 22.1 GiB".
std::string peaks_text(const offload::Plan& p, const offload::Budget& b);

// For a plan that does not fit: its largest components, and single changes of the options (rank,
// checkpointing, micro-batch, sequence length, where the weights live, a 4-bit base) with the peak
// each would give, fitting ones first. One line each.
std::vector<std::string> refusal_lines(const FinetuneOptions& o, const io::ModelDescription& d,
                                       const Backend& be, const RunPlan& plan);

// The plan subcommand: prints the table per tier, the predicted peaks against the budgets and, for
// each weight tier and checkpoint policy, the peak that is the smallest budget it fits (or JSON).
// Returns the exit status: 0 when the plan fits, 2 when it does not.
int run_plan(const FinetuneOptions& o, bool json);

}  // namespace tf::cli
