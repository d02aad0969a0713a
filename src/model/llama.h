// defines: tf::Batch, tf::CheckpointPolicy, tf::LossSum, tf::MemoryPlan, tf::LlamaModel (forward and
// backward of a Llama-family decoder with LoRA adapters on frozen base weights)
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "offload/activation_store.h"
#include "offload/plan.h"
#include "offload/weight_store.h"
#include "src/core/alloc.h"
#include "src/model/lora.h"
#include "src/model/weights.h"

namespace tf {

// A micro-batch of `batch` sequences of `seq` tokens each (token-major: n = batch * seq rows).
// targets[i] is the token that position i should predict, or kIgnoreIndex; positions restart at 0
// for every packed document; doc_ids (optional) keep attention inside each document.
struct Batch {
  int batch = 1;
  int seq = 0;
  const int32_t* tokens = nullptr;
  const int32_t* targets = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* doc_ids = nullptr;
  int64_t n_tokens() const { return int64_t(batch) * seq; }
};

// What the backward pass may recompute instead of keeping: None keeps every block's activations;
// PerBlock keeps only each block's input and recomputes the block during backward; PerBlockOffload
// is PerBlock with the kept inputs in host memory (offload::ActivationStore: a device backend only),
// the device holding a window of three of them.
enum class CheckpointPolicy : uint8_t { None, PerBlock, PerBlockOffload };

struct LossSum {
  double sum = 0;       // sum of token losses
  int64_t n_valid = 0;  // tokens that had a target
  double mean() const { return n_valid ? sum / double(n_valid) : 0.0; }
};

// Keys and values of the tokens seen so far in one sequence, per layer, for incremental decoding,
// in the memory of the model's backend: blocks of their own (Backend::alloc_unplanned), since a
// cache is sized by its prompt, which the model's memory plan cannot know.
struct KvCache {
  int64_t capacity = 0;  // tokens
  int64_t n_past = 0;    // tokens already in the cache
  DeviceMem k, v;        // [n_layers][capacity][kv_dim], keys after rope
};

// How a LlamaModel lays out its working memory, beyond the checkpoint policy, without changing what
// it computes per row.
struct ModelLayout {
  // Rows of tokens the MLP forms its [rows, intermediate] gate, up and activation, and their
  // gradients, at a time, in the forward, the recomputation and the backward (the MLP is
  // row-independent); the backward forms each chunk's gate, up and activation again from the kept
  // norm output instead of keeping them. 0, or at least max_tokens: every row at once, kept for the
  // backward as the block's other activations are.
  int64_t mlp_chunk = 0;
  // On a device backend, the embedding table stays in host memory, where the weights were loaded,
  // instead of being placed: each micro-batch's rows are gathered on the host (the cpu's lookup,
  // the device's values) and uploaded. A tied table stays placed, since lm_head reads it there;
  // on the cpu, whose memory is the host's, nothing changes.
  bool host_embedding = false;
  // Rows of tokens the loss takes per call of Backend::lm_head_cross_entropy, whose kernel forms
  // [min(rows, its own chunk), vocab] logits at a time (64 rows on the cpu, 128 on a device): fewer
  // rows bound that working memory, at the price of smaller lm_head products (and, on the cpu with
  // a quantized lm_head, of dequantizing the table once per call). 0: the whole micro-batch in one.
  int64_t loss_rows = 0;
  // WeightTier::Shard: the ranks the per-layer weights are split across, and (to build a model, not
  // to plan one) the all-gather between them, which must outlive the model.
  int shard_ranks = 1;
  offload::BlockExchange* exchange = nullptr;
};

// Every allocation a LlamaModel makes on its backend, in the order its constructor makes them:
// each placed base weight (with a streaming tier, only the embedding, final norm and lm_head, then
// the two streamed block buffers), the LoRA state, the rope table, the batch staging, the saved
// activations, the MLP's rows when it runs in chunks, the workspace and the logits rows.
struct MemoryPlan {
  std::vector<PlannedAlloc> allocs;
  size_t total = 0;  // bytes of the backend's memory they take (Backend::footprint of each, summed)
  // Host memory the model takes beside the backend's (a device backend's read buffers for --weights
  // disk, then the saved block inputs under PerBlockOffload), and the bytes of per-layer weights the
  // weight store brings in per pass over the layers.
  std::vector<PlannedAlloc> host;
  uint64_t streamed_bytes = 0;
  // Bytes requested by the allocations of `tag` (what the backend's tracker counts).
  size_t bytes(MemTag tag) const;
  size_t requested() const;
};

// The model runs on one backend: its weights (placed there at construction), LoRA state,
// activations and KV caches live in that backend's memory and every step is that backend's ops.
// Batches and results cross on the host side of the interface.
class LlamaModel {
 public:
  // All buffers are sized here for up to max_tokens tokens per micro-batch; no step allocates. A
  // base weight of a dtype the backend cannot run is an error here, before any step. `tier` says
  // where the per-layer weights live (offload::WeightStore): Resident places them all on the
  // backend; Host and Disk stream them a block at a time, with the results of Resident bit for bit.
  LlamaModel(LlamaWeights weights, const LoraConfig& lora, CheckpointPolicy policy, int64_t max_tokens,
             Backend& backend = cpu_backend(), offload::WeightTier tier = offload::WeightTier::Resident,
             const ModelLayout& layout = {});
  // What the constructor with these arguments allocates on `backend`; its total is what
  // Backend::reserve needs before the model is built. Computed from the same layout the
  // constructor allocates by, so the two cannot drift.
  static MemoryPlan memory_plan(const LlamaWeights& weights, const LoraConfig& lora, CheckpointPolicy policy,
                                int64_t max_tokens, const Backend& backend,
                                offload::WeightTier tier = offload::WeightTier::Resident,
                                const ModelLayout& layout = {});

  const LlamaConfig& config() const { return weights_.config; }
  // The base weights as loaded (host memory).
  const LlamaWeights& weights() const { return weights_; }
  // The same as the backend's ops read them: every tensor when resident, else the embedding, final
  // norm and lm_head only (the blocks stream).
  const LlamaWeights& placed_weights() const { return placed_; }
  Backend& backend() const { return *be_; }
  LoraState& lora() { return lora_; }
  CheckpointPolicy policy() const { return policy_; }
  offload::WeightTier weight_tier() const { return store_ ? store_->tier() : offload::WeightTier::Resident; }
  int64_t max_tokens() const { return max_tokens_; }
  // Rows of the MLP's chunks: max_tokens when it runs every row at once.
  int64_t mlp_rows() const { return mlp_rows_; }
  // Whether the embedding table is looked up in host memory (ModelLayout::host_embedding).
  bool host_embedding() const { return embed_rows_.data() != nullptr; }
  // Rows of tokens per call of the loss (ModelLayout::loss_rows): max_tokens for a single call.
  int64_t loss_rows() const { return loss_rows_; }

  // Forward and backward of one micro-batch. LoRA gradients ACCUMULATE: the caller zeroes them
  // once per optimizer step. Gradients are of grad_scale * (sum of token losses). `step` keys the
  // dropout masks.
  LossSum forward_backward(const Batch& b, float grad_scale, uint64_t step);
  // Called with l once block l's backward is done and no later work of this pass touches its LoRA
  // gradients (blocks go from the last to the first): a caller can start summing them early.
  using BlockGradsDone = std::function<void(int layer)>;
  LossSum forward_backward(const Batch& b, float grad_scale, uint64_t step, const BlockGradsDone& grads_done);
  // Loss without gradients or dropout.
  LossSum forward_loss(const Batch& b);
  // Full logits [n_tokens, vocab] (for tests and scoring; training never forms them), computed a
  // few rows at a time into the model's logits rows and downloaded.
  void forward_logits(const Batch& b, float* logits);

  // Incremental decoding of one sequence: runs `n` new tokens (n <= max_tokens) at positions
  // cache.n_past.., appends their keys and values to the cache, and writes the logits of the last
  // one into logits[vocab]. No dropout; the adapters apply.
  KvCache make_kv_cache(int64_t capacity) const;
  void decode(KvCache& cache, const int32_t* tokens, int64_t n, float* logits);

 private:
  // Element counts of the constructor's buffers besides weights and LoRA state.
  struct Layout {
    int64_t rope_floats, batch_ints, saved_floats, mlp_rows, mlp_floats, workspace_floats, logit_rows;
  };
  static Layout layout(const LlamaConfig& c, const LoraConfig& lora, CheckpointPolicy policy,
                       int64_t max_tokens, const ModelLayout& opt);
  struct BlockActs {
    float *rstd1, *h1, *q, *k, *v, *att, *lse, *x2, *rstd2, *h2, *gate, *up, *act;
    // With q/k norms: q and k as projected, and each head's rstd (q and k above are normed and rotated).
    float *q_pre = nullptr, *k_pre = nullptr, *q_rstd = nullptr, *k_rstd = nullptr;
    // With sandwich norms: the o and down projections' outputs before their norms (down's one chunk's
    // when the MLP runs in chunks) and the norms' rstd.
    float *o_out = nullptr, *rstd_o = nullptr, *down_out = nullptr, *rstd_down = nullptr;
    std::array<float*, kLoraTargetCount> lora_t;
  };
  BlockActs carve_block_acts(float*& cursor);
  void check_batch(const Batch& b) const;
  // Uploads the batch's arrays into batch_mem_; the returned Batch points there.
  Batch stage(const Batch& b);
  // Checks and stages the batch, then runs the stack: embedding, every block, final norm into
  // final_h_. Keeps activations when `training` and the policy says so. Returns the staged batch.
  Batch forward_stack(const Batch& b, bool training, uint64_t step, KvCache* cache = nullptr);
  // The weights of `layer`, with the layer used after it (-1: none) starting to load when they
  // stream; release_block says every op reading them has been queued.
  const BlockWeights& acquire_block(int layer, int next);
  void release_block(int layer);
  // The block reads its input x and writes its output into out; without `mlp` it stops at the MLP's
  // norm (a recomputation whose backward forms the MLP's chunks itself, leaving out unwritten).
  void block_forward(int layer, const BlockWeights& w, const Batch& b, BlockActs& a, const float* x,
                     float* out, bool training, uint64_t step, KvCache* cache = nullptr, bool mlp = true);
  void block_backward(int layer, const BlockWeights& w, const Batch& b, BlockActs& a, const float* x,
                      uint64_t step);
  // Block input r (0..n_layers) for reading, and for writing; done_with_inputs says every op using
  // them has been queued. With the inputs offloaded they go through store_, which `next` (the
  // input used after r, -1 none) starts bringing back, and written() copies a training pass's
  // inputs out.
  const float* input(int r, int next);
  float* output(int r);
  void written(int r, int64_t rows, bool training);
  void done_with_inputs();
  // x and y are rows row0 .. row0 + n - 1 of the projection's input and output: the adapter's
  // intermediate and dropout mask are those rows' part of the whole micro-batch's.
  void projection(float* y, const float* x, const WeightRef& w, const WeightRef* bias, int layer,
                  LoraTarget t, BlockActs& a, bool training, uint64_t step, int64_t n, int64_t row0 = 0);
  void projection_backward(float* dx, float beta, const float* dy, const float* x, const WeightRef& w,
                           int layer, LoraTarget t, const BlockActs& a, uint64_t step, int64_t n,
                           int64_t row0 = 0);
  // The gate, up and activation of rows row0 .. row0 + n - 1 into a.gate, a.up and a.act.
  void mlp_gate_up(int layer, const BlockWeights& w, BlockActs& a, int64_t row0, int64_t n, bool training,
                   uint64_t step);
  // The summed loss of the staged batch from final_h_, loss_rows_ rows per call, with d_h (when not
  // null) receiving grad_scale times its gradient.
  LossSum loss(const Batch& b, float* d_h, float grad_scale);
  LoraDropout dropout(int layer, LoraTarget t, bool training, uint64_t step, int64_t row0 = 0) const;
  // Layer l's rope table (a sliding layer's own under LlamaConfig::rope_local; the long factors'
  // while long_rope_ says so).
  const float* inv_freq(int layer) const;
  // Whether a batch rotates with longrope's long factors: as transformers decides per forward pass,
  // when its largest position reaches original_max_positions, for every token of the batch. The keys
  // a KV cache holds keep the rotation they were made with, as transformers' cache does.
  bool uses_long_factors(const Batch& b) const;
  // Rows row0.. of a block's down output before its norm (with sandwich norms).
  float* down_rows(const BlockActs& a, int64_t row0) const;

  Backend* be_;
  LlamaWeights weights_;
  std::vector<DeviceMem> weight_mem_;  // storage of placed_ on a backend with memory of its own
  LlamaWeights placed_;  // the same tensors as the backend's ops read them (globals only when streaming)
  std::unique_ptr<offload::WeightStore> store_;  // the per-layer weights, when they stream
  LoraState lora_;
  CheckpointPolicy policy_;
  int64_t max_tokens_;
  int64_t mlp_rows_;
  int64_t loss_rows_;
  // [head_dim / 2], then the sliding layers' [head_dim / 2] under rope_local, then longrope's long
  // factors' [head_dim / 2] where the model has them.
  DeviceMem inv_freq_;
  DeviceMem batch_mem_;  // tokens, targets, positions, doc ids: 4 x [max_tokens] int32
  DeviceMem logits_;     // [logit_rows_, vocab]: forward_logits and decode write here
  int64_t logit_rows_ = 0;
  std::vector<int32_t> decode_positions_;  // [max_tokens], filled by decode()
  bool long_rope_ = false;                 // the batch of the last forward_stack uses the long factors

  DeviceMem saved_;      // residual stream (n_layers + 1 block inputs) and kept block activations
  DeviceMem mlp_mem_;    // with the MLP in chunks, one chunk's gate, up and activation
  Buffer embed_rows_;    // with the embedding in host memory, [max_tokens, hidden] rows to upload
  DeviceMem workspace_;  // gradients in flight and scratch
  // [n_layers + 1] pointers of [max_tokens, hidden], or with the inputs offloaded the window of
  // store_'s device buffers.
  std::vector<float*> residual_;
  std::unique_ptr<offload::ActivationStore> act_store_;
  // One per layer (None) or one shared (PerBlock); with the MLP in chunks their gate, up and act
  // are one chunk's, the same for all.
  std::vector<BlockActs> acts_;
  // final_h_ shares d_res_'s memory and d_final_h_ and d_att_ d_h_'s: neither pair is live at once.
  float *final_h_, *final_rstd_, *d_final_h_, *d_res_, *d_h_, *d_att_, *d_q_, *d_k_, *d_v_, *d_act_, *d_gate_,
      *d_up_, *lora_dt_, *lora_xd_;
  float *d_q_pre_, *d_k_pre_;  // with q/k norms, the gradients of q and k as projected
  float* d_branch_;            // with sandwich norms, the gradient of the o or down output before its norm
};

}  // namespace tf
