// defines: pieces shared by the subcommands: opening a model with an optional adapter, choosing
// the chat template, tokenising a dataset, evaluation loss, greedy generation, progress output
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "offload/plan.h"
#include "offload/weight_store.h"
#include "src/data/batcher.h"
#include "src/data/chat_template.h"
#include "src/data/dataset.h"
#include "src/data/model_template.h"
#include "src/dist/comm.h"
#include "src/io/model_loader.h"
#include "src/model/generate.h"
#include "src/model/llama.h"

namespace tf::cli {

// A loaded base model, its tokenizer, the backend it runs on and a LlamaModel ready to run with
// LoRA attached.
// The ranks of a data-parallel run as the weight store's exchange of shares (--shard-weights): its
// all-gathers run on the communicator's thread, behind the compute, where it has one.
class CommExchange final : public offload::BlockExchange {
 public:
  explicit CommExchange(dist::Communicator& comm) : comm_(comm) {}
  int rank() const override { return comm_.rank(); }
  int size() const override { return comm_.size(); }
  uint64_t start_gather(std::span<const std::byte> mine, std::span<std::byte> all) override {
    return comm_.start_gather(mine, all);
  }
  void wait(uint64_t ticket) override { comm_.wait(ticket); }

 private:
  dist::Communicator& comm_;
};

struct Session {
  io::LoadedModel loaded;
  std::unique_ptr<Backend> backend;
  std::string device_note;  // what --device auto picked and why; empty otherwise
  std::string attention;    // the attention kernel the model runs (Backend::attention_kernel): cpu on the cpu
  std::unique_ptr<LlamaModel> model;
  const tok::Tokenizer& tokenizer() const;
};

// The spill file of a run: in `spill_dir` (a --spill-dir) a name of its own; else, for a run
// directory `run_dir`, its base-spill.bin, which a run killed before it removed it may have left
// (the directory's lock keeps out every other run), or rank r's base-spill-rank<r>.bin for a rank
// `rank` of a data-parallel run (each rank converts the base for itself); else a name of its own
// in the temporary directory (TMPDIR, or /tmp).
io::SpillOptions spill_options(const std::string& spill_dir, const std::string& run_dir = {}, int rank = -1);

// Opens `model_path` with LoRA `lora` (fresh adapters, B = 0) sized for `max_tokens` per
// micro-batch, with the checkpointing `policy` chooses for the model's config. With `adapter` (a
// run directory or a PEFT adapter directory), the adapter's configuration and weights replace
// `lora`. The model runs on the backend `device` (a --device value) names, with the attention
// kernel `attention` (an --attention value) names.
// `backend`, when given, is the backend to run on (made from `device` and `attention` by the
// caller, with `device_note` saying what auto chose), and `tier` says where the model's per-layer
// weights live, `layout` how the model lays out its working memory. Under WeightTier::Disk the
// per-layer tensors `quant` converts are written to the spill file `spill` says (spill_options),
// streamed from there and removed with the session.
Session open_session(const std::string& model_path, LoraConfig lora, int64_t max_tokens,
                     const std::function<CheckpointPolicy(const LlamaConfig&)>& policy,
                     const std::string& adapter = {}, io::QuantMode quant = io::QuantMode::Keep,
                     const std::string& device = "cpu", const std::string& attention = "auto",
                     std::unique_ptr<Backend> backend = nullptr, const std::string& device_note = {},
                     offload::WeightTier tier = offload::WeightTier::Resident, const ModelLayout& layout = {},
                     const io::SpillOptions& spill = spill_options({}));

// The QuantMode named by a --quant value, or tf::Error listing the choices.
io::QuantMode quant_option(const std::string& name);

// --weights of eval and generate: resident, host or disk (the weight store refuses what the model or
// backend cannot stream when the model is built).
offload::WeightTier weight_tier_option(const std::string& name);

// "auto" renders with the model's own Jinja chat template (plain when it has none; one tightfit
// cannot render is an error naming the construct and the built-in formats); otherwise a name.
// `think` is --think (keep, strip) for the model's template.
data::ChatTemplate choose_template(const std::string& name, const io::LoadedModel& m,
                                   const std::string& think = "keep");

// The tokenisation of --seq-len with the loss options --train-on (completion or all),
// --mask-history and --train-on-eos (turn, last, all, none), checked: a bad value or combination
// is a tf::Error naming the option.
data::TokenizeOptions tokenize_options(int seq_len, const std::string& train_on, bool mask_history,
                                       const std::string& train_on_eos);

// Mean token loss over every example of `data`, in unshuffled micro-batches.
LossSum evaluate_loss(LlamaModel& model, const data::TokenizedDataset& data, int micro_batch, int seq_len,
                      int32_t pad_id);

Batch batch_view(const data::TokenBatch& b);
std::string format_bytes(double bytes);
bool stdout_is_terminal();

// --matmul (auto, f32, bf16): sets the precision of the cpu's products with the base's bf16 and
// quantized matrices (tf::cpu::resolve_matmul on this CPU, the weights' projections and a bf16 or
// quantized lm_head) and returns the line the run's log shows, "bf16 (auto: ...)". A device backend
// multiplies them in bf16 already: there only auto is taken, the cpu's precision stays f32, and the
// line is empty.
std::string apply_matmul_option(const std::string& option, const Backend& be, const LlamaWeights& w);
// The checks of apply_matmul_option that need no model (the spelling; bf16 on a CPU without
// avx512_bf16; a choice other than auto on a device), for refusing before a model loads.
void check_matmul_option(const std::string& option, const std::string& device);

}  // namespace tf::cli
