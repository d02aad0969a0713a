// defines: tf::LlamaModel (its memory layout and plan, the forward and backward of each block, the
// loss, logits and KV-cache decoding), MemoryPlan
#include "src/model/llama.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf {

// The config is consistent and there are weights for each of its layers.
static void check_weights(const LlamaWeights& w) {
  w.config.validate("model config");
  TF_CHECK(int64_t(w.blocks.size()) == w.config.n_layers, "model has ", w.blocks.size(),
           " blocks of weights but its config says ", w.config.n_layers, " layers");
}

// Whether the embedding table is looked up in host memory (ModelLayout::host_embedding).
static bool embedding_on_host(const LlamaConfig& c, const Backend& be, const ModelLayout& opt) {
  return opt.host_embedding && !be.host_memory() && !c.tie_embeddings;
}

// Whether a slot's weights are placed on the backend (per-layer ones stream under another tier).
static bool placed_slot(WeightSlot s, offload::WeightTier tier, bool host_embedding) {
  if (s == WeightSlot::Embed && host_embedding) return false;
  return tier == offload::WeightTier::Resident || !is_layer_slot(s);
}

// Every dtype is checked before any weight is placed, and the weights are placed before the LoRA
// state is laid out, so an unsupported dtype, or weights the tier cannot stream, are reported before
// anything is allocated on the backend.
static LlamaWeights place_weights(const LlamaWeights& w, Backend& be, std::vector<DeviceMem>& storage,
                                  offload::WeightTier tier, bool host_embedding, int shard_ranks) {
  const LlamaConfig& c = w.config;
  check_weights(w);
  if (tier != offload::WeightTier::Resident) offload::WeightStore::footprint(w, tier, be, shard_ranks);
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    const DType dtype = w.slot(s, layer).dtype;
    TF_CHECK(be.supports_weight(dtype), "the ", be.name(), " backend does not run ", dtype_name(dtype),
             " base weights (tensor ", hf_weight_name(c, s, layer),
             "); store the base as bf16 or f32 (finetune --quant bf16)");
  });
  LlamaWeights placed;
  placed.config = c;
  placed.blocks.resize(w.blocks.size());
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    if (placed_slot(s, tier, host_embedding))
      placed.slot(s, layer) = be.place_weight(w.slot(s, layer), hf_weight_name(c, s, layer), storage);
  });
  if (c.tie_embeddings) placed.lm_head = placed.embed;
  return placed;
}

// The dropped-out input of a projection's adapter, [rows, in] for the widest input (the MLP's
// down projection one chunk of rows at a time); nothing without dropout, whose adapters read their
// input as it is.
static int64_t dropout_floats(const LlamaConfig& c, const LoraConfig& lora, int64_t mlp_rows, int64_t N) {
  if (lora.dropout <= 0) return 0;
  return std::max(N * std::max(c.hidden, c.q_dim()), mlp_rows * c.intermediate);
}

// Logits are formed this many rows at a time: enough rows for a GEMM to be worth launching, few
// enough that a large vocabulary costs little memory (128k entries: 8 MiB).
constexpr int64_t kLogitRows = 16;

LlamaModel::Layout LlamaModel::layout(const LlamaConfig& c, const LoraConfig& lora, CheckpointPolicy policy,
                                      int64_t max_tokens, const ModelLayout& opt) {
  TF_CHECK(opt.mlp_chunk >= 0, "the MLP's chunk of rows must be positive (or 0: all rows), got ",
           opt.mlp_chunk);
  TF_CHECK(opt.loss_rows >= 0, "the loss's rows per call must be positive (or 0: all rows), got ",
           opt.loss_rows);
  const int64_t N = max_tokens, H = c.hidden, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate;
  const int64_t C = opt.mlp_chunk > 0 ? std::min(opt.mlp_chunk, N) : N;
  const bool chunked = C < N;
  int64_t lora_rows = 0;
  // One intermediate dropout(x) A^T per module: a fused module's projections share it.
  for (const LoraModule& m : lora_modules(c)) lora_rows += lora.has(m.first) ? lora.rank : 0;
  const int64_t kept_mlp = chunked ? 0 : 3 * I;
  // q and k before their norms, and the norms' rstd per head.
  const int64_t qk_norm = c.qk_norm ? Q + KV + c.n_heads + c.n_kv_heads : 0;
  // Sandwich norms: the o and down projections' outputs before their norms, and the norms' rstd (the
  // down output in the MLP's chunk when it runs in chunks).
  const int64_t sandwich = c.sandwich_norms ? 2 + H + (chunked ? 0 : H) : 0;
  const int64_t block_floats =
      N * (2 + 3 * H + 2 * Q + 2 * KV + c.n_heads + kept_mlp + lora_rows + qk_norm + sandwich);
  const int64_t n_sets = policy == CheckpointPolicy::None ? c.n_layers : 1;
  const int64_t n_inputs =
      policy == CheckpointPolicy::PerBlockOffload ? offload::ActivationStore::kWindow : c.n_layers + 1;
  Layout L{};
  L.rope_floats = c.head_dim / 2 * (1 + (c.has_local_rope() ? 1 : 0) + (c.rope.has_long_factors() ? 1 : 0));
  L.batch_ints = 4 * N;
  L.saved_floats = N * H * n_inputs + block_floats * n_sets;
  L.mlp_rows = C;
  L.mlp_floats = chunked ? C * (3 * I + (c.sandwich_norms ? H : 0)) : 0;
  L.workspace_floats = N * (1 + H + std::max(H, Q) + Q + 2 * KV + lora.rank + (c.qk_norm ? Q + KV : 0) +
                            (c.sandwich_norms ? H : 0)) +
                       3 * C * I + dropout_floats(c, lora, C, N);
  L.logit_rows = std::min(N, kLogitRows);
  return L;
}

size_t MemoryPlan::bytes(MemTag tag) const {
  size_t n = 0;
  for (const PlannedAlloc& a : allocs) n += a.tag == tag ? a.bytes : 0;
  return n;
}

size_t MemoryPlan::requested() const {
  size_t n = 0;
  for (const PlannedAlloc& a : allocs) n += a.bytes;
  return n;
}

MemoryPlan LlamaModel::memory_plan(const LlamaWeights& w, const LoraConfig& lora, CheckpointPolicy policy,
                                   int64_t max_tokens, const Backend& be, offload::WeightTier tier,
                                   const ModelLayout& opt) {
  const LlamaConfig& c = w.config;
  check_weights(w);
  TF_CHECK(max_tokens > 0, "max tokens per micro-batch must be positive, got ", max_tokens);
  if (policy == CheckpointPolicy::PerBlockOffload) offload::ActivationStore::check_backend(be);
  MemoryPlan plan;
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    const size_t bytes = be.placed_weight_bytes(w.slot(s, layer));
    if (bytes && placed_slot(s, tier, embedding_on_host(c, be, opt)))
      plan.allocs.push_back({hf_weight_name(c, s, layer), MemTag::Weights, bytes});
  });
  if (tier != offload::WeightTier::Resident) {
    offload::StoreFootprint store = offload::WeightStore::footprint(w, tier, be, opt.shard_ranks);
    for (PlannedAlloc& a : store.backend) plan.allocs.push_back(std::move(a));
    plan.host = std::move(store.host);
    plan.streamed_bytes = store.streamed_bytes;
  }
  for (PlannedAlloc& a : LoraState::memory_plan(c, lora)) plan.allocs.push_back(std::move(a));
  const Layout L = layout(c, lora, policy, max_tokens, opt);
  plan.allocs.push_back({"rope frequencies", MemTag::Workspace, size_t(L.rope_floats) * sizeof(float)});
  plan.allocs.push_back({"batch tokens", MemTag::Activations, size_t(L.batch_ints) * sizeof(int32_t)});
  plan.allocs.push_back({"saved activations", MemTag::Activations, size_t(L.saved_floats) * sizeof(float)});
  if (L.mlp_floats)
    plan.allocs.push_back({"MLP chunk", MemTag::Activations, size_t(L.mlp_floats) * sizeof(float)});
  plan.allocs.push_back(
      {"activation gradients", MemTag::Workspace, size_t(L.workspace_floats) * sizeof(float)});
  plan.allocs.push_back({"logits", MemTag::Workspace, size_t(L.logit_rows * c.vocab) * sizeof(float)});
  if (embedding_on_host(c, be, opt))
    plan.host.push_back(
        {"embedding rows", MemTag::Activations, size_t(max_tokens * c.hidden) * sizeof(float)});
  if (policy == CheckpointPolicy::PerBlockOffload)
    plan.host.push_back({"saved block inputs", MemTag::Activations,
                         offload::ActivationStore::host_bytes(c.n_layers, max_tokens, c.hidden)});
  for (const PlannedAlloc& a : plan.allocs) plan.total += be.footprint(a.bytes);
  return plan;
}

LlamaModel::LlamaModel(LlamaWeights weights, const LoraConfig& lora, CheckpointPolicy policy,
                       int64_t max_tokens, Backend& backend, offload::WeightTier tier, const ModelLayout& opt)
    : be_(&backend),
      weights_(std::move(weights)),
      placed_(place_weights(weights_, backend, weight_mem_, tier,
                            embedding_on_host(weights_.config, backend, opt), opt.shard_ranks)),
      store_(tier == offload::WeightTier::Resident
                 ? nullptr
                 : std::make_unique<offload::WeightStore>(weights_, tier, backend, opt.exchange)),
      lora_(weights_.config, lora, backend),
      policy_(policy),
      max_tokens_(max_tokens) {
  const LlamaConfig& c = weights_.config;
  TF_CHECK(max_tokens > 0, "max tokens per micro-batch must be positive, got ", max_tokens);
  if (policy == CheckpointPolicy::PerBlockOffload) offload::ActivationStore::check_backend(backend);
  // The shares hold this rank's part of every block: the whole blocks it was cut from go.
  if (tier == offload::WeightTier::Shard) store_->release_sources(weights_);
  const Layout L = layout(c, lora, policy, max_tokens, opt);
  mlp_rows_ = L.mlp_rows;
  loss_rows_ = opt.loss_rows > 0 ? std::min(opt.loss_rows, max_tokens) : max_tokens;
  if (embedding_on_host(c, backend, opt))
    embed_rows_ = Buffer(size_t(max_tokens * c.hidden) * sizeof(float), MemTag::Activations, false);
  std::vector<float> inv_freq(size_t(L.rope_floats));
  rope_inv_freq(c.rope, inv_freq.data());
  if (c.has_local_rope()) rope_inv_freq(c.rope_local, inv_freq.data() + c.head_dim / 2);
  if (c.rope.has_long_factors()) {
    RopeParams long_rope = c.rope;
    long_rope.freq_factors = c.rope.long_factors;
    rope_inv_freq(long_rope, inv_freq.data() + (L.rope_floats - c.head_dim / 2));
  }
  inv_freq_ = be_->alloc(inv_freq.size() * sizeof(float), MemTag::Workspace, "rope frequencies");
  be_->upload_n(inv_freq_.as<float>(), inv_freq.data(), inv_freq.size());
  batch_mem_ = be_->alloc(size_t(L.batch_ints) * sizeof(int32_t), MemTag::Activations, "batch tokens");
  decode_positions_.resize(size_t(max_tokens));

  const int64_t N = max_tokens, H = c.hidden, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate;
  saved_ = be_->alloc(size_t(L.saved_floats) * sizeof(float), MemTag::Activations, "saved activations");
  float* cursor = saved_.as<float>();
  const bool offloaded = policy == CheckpointPolicy::PerBlockOffload;
  const int n_inputs = offloaded ? offload::ActivationStore::kWindow : c.n_layers + 1;
  for (int r = 0; r < n_inputs; ++r, cursor += N * H) residual_.push_back(cursor);
  if (offloaded) {
    std::array<float*, offload::ActivationStore::kWindow> window{};
    std::copy(residual_.begin(), residual_.end(), window.begin());
    act_store_ = std::make_unique<offload::ActivationStore>(*be_, c.n_layers, N, H, window);
  }
  if (L.mlp_floats)
    mlp_mem_ = be_->alloc(size_t(L.mlp_floats) * sizeof(float), MemTag::Activations, "MLP chunk");
  const size_t n_sets = policy == CheckpointPolicy::None ? size_t(c.n_layers) : 1;
  for (size_t s = 0; s < n_sets; ++s) acts_.push_back(carve_block_acts(cursor));
  TF_CHECK(cursor == saved_.as<float>() + L.saved_floats, "saved activations: the layout has ",
           L.saved_floats, " floats but the blocks take ", cursor - saved_.as<float>());

  workspace_ =
      be_->alloc(size_t(L.workspace_floats) * sizeof(float), MemTag::Workspace, "activation gradients");
  float* w = workspace_.as<float>();
  auto take = [&w](int64_t n) { return std::exchange(w, w + n); };
  final_rstd_ = take(N);
  // final_h_ is read last by the loss, before d_res_ is first written; d_final_h_ is read last by
  // the final norm's backward, before any block's, and d_att_ lives between the MLP's backward, done
  // with d_h_, and the q, k and v projections', which write it again.
  d_res_ = take(N * H);
  final_h_ = d_res_;
  d_h_ = take(N * std::max(H, Q));
  d_final_h_ = d_h_;
  d_att_ = d_h_;
  d_q_ = take(N * Q);
  d_k_ = take(N * KV);
  d_v_ = take(N * KV);
  d_q_pre_ = c.qk_norm ? take(N * Q) : nullptr;
  d_k_pre_ = c.qk_norm ? take(N * KV) : nullptr;
  d_branch_ = c.sandwich_norms ? take(N * H) : nullptr;
  const int64_t C = mlp_rows_;
  d_act_ = take(C * I);
  d_gate_ = take(C * I);
  d_up_ = take(C * I);
  lora_dt_ = take(N * lora.rank);
  lora_xd_ = take(dropout_floats(c, lora, C, N));
  TF_CHECK(w == workspace_.as<float>() + L.workspace_floats, "activation gradients: the layout has ",
           L.workspace_floats, " floats but the buffers take ", w - workspace_.as<float>());
  logit_rows_ = L.logit_rows;
  logits_ = be_->alloc(size_t(logit_rows_ * c.vocab) * sizeof(float), MemTag::Workspace, "logits");
}

LlamaModel::BlockActs LlamaModel::carve_block_acts(float*& cursor) {
  const LlamaConfig& c = weights_.config;
  const int64_t N = max_tokens_;
  auto take = [&cursor](int64_t n) { return std::exchange(cursor, cursor + n); };
  BlockActs a{};
  a.rstd1 = take(N);
  a.h1 = take(N * c.hidden);
  a.q = take(N * c.q_dim());
  a.k = take(N * c.kv_dim());
  a.v = take(N * c.kv_dim());
  a.att = take(N * c.q_dim());
  a.lse = take(N * c.n_heads);
  a.x2 = take(N * c.hidden);
  a.rstd2 = take(N);
  a.h2 = take(N * c.hidden);
  if (c.qk_norm) {
    a.q_pre = take(N * c.q_dim());
    a.k_pre = take(N * c.kv_dim());
    a.q_rstd = take(N * c.n_heads);
    a.k_rstd = take(N * c.n_kv_heads);
  }
  if (c.sandwich_norms) {
    a.o_out = take(N * c.hidden);
    a.rstd_o = take(N);
    a.rstd_down = take(N);
    a.down_out = mlp_mem_.data() ? mlp_mem_.as<float>() + 3 * mlp_rows_ * c.intermediate : take(N * c.hidden);
  }
  if (mlp_mem_.data()) {
    float* chunk = mlp_mem_.as<float>();
    const int64_t rows = mlp_rows_ * c.intermediate;
    a.gate = chunk;
    a.up = chunk + rows;
    a.act = chunk + 2 * rows;
  } else {
    a.gate = take(N * c.intermediate);
    a.up = take(N * c.intermediate);
    a.act = take(N * c.intermediate);
  }
  for (const LoraModule& m : lora_modules(c))
    a.lora_t[size_t(m.first)] = lora_.config.has(m.first) ? take(N * lora_.config.rank) : nullptr;
  return a;
}

void LlamaModel::check_batch(const Batch& b) const {
  TF_CHECK(b.batch > 0 && b.seq > 0, "batch of ", b.batch, " x ", b.seq, " tokens is empty");
  TF_CHECK(b.n_tokens() <= max_tokens_, "micro-batch of ", b.n_tokens(), " tokens exceeds the planned ",
           max_tokens_);
  TF_CHECK(b.tokens && b.positions, "batch is missing tokens or positions");
  for (int64_t i = 0; i < b.n_tokens(); ++i)
    TF_CHECK(b.positions[i] >= 0, "position ", b.positions[i], " of token ", i, " is negative");
  // transformers rescales dynamic rope's frequencies per batch once a position reaches the limit,
  // and the keys already cached keep the old ones; tightfit keeps to the range where they are fixed.
  const RopeParams& rope = weights_.config.rope;
  if (rope.scaling == RopeScalingType::Dynamic)
    for (int64_t i = 0; i < b.n_tokens(); ++i)
      TF_CHECK(b.positions[i] < rope.original_max_positions, "position ", b.positions[i],
               " is past the model's max_position_embeddings ", rope.original_max_positions,
               ", where its dynamic rope scaling would change the frequencies: tightfit does not ",
               "run dynamic (NTK) rope there; use at most ", rope.original_max_positions, " tokens");
  // Longrope past the pretraining length needs the long factors; a model that has none (a GGUF
  // written with the short ones alone) stops there.
  if (rope.scaling == RopeScalingType::LongRope && !rope.has_long_factors())
    for (int64_t i = 0; i < b.n_tokens(); ++i)
      TF_CHECK(b.positions[i] < rope.original_max_positions, "position ", b.positions[i],
               " is past the model's original_max_position_embeddings ", rope.original_max_positions,
               ", where its longrope scaling switches to the long factors, and the model has none; use at ",
               "most ", rope.original_max_positions, " tokens");
}

Batch LlamaModel::stage(const Batch& b) {
  const size_t n = size_t(b.n_tokens());
  int32_t* mem = batch_mem_.as<int32_t>();
  auto put = [&](const int32_t* host, int64_t field) -> const int32_t* {
    if (!host) return nullptr;
    int32_t* dst = mem + field * max_tokens_;
    be_->upload_n(dst, host, n);
    return dst;
  };
  return Batch{b.batch, b.seq, put(b.tokens, 0), put(b.targets, 1), put(b.positions, 2), put(b.doc_ids, 3)};
}

LoraDropout LlamaModel::dropout(int layer, LoraTarget t, bool training, uint64_t step, int64_t row0) const {
  LoraDropout d;
  d.row0 = row0;
  d.p = training ? lora_.config.dropout : 0.0f;
  d.seed = lora_.config.seed;
  d.step = step;
  d.layer = layer;
  d.target = t;
  return d;
}

// What a profile calls the ops of a projection's adapter (OpRole), by LoraTarget; the frozen
// projection's are its module name.
static const char* adapter_role(LoraTarget t) {
  static constexpr const char* kRoles[kLoraTargetCount] = {"q_proj lora",   "k_proj lora",    "v_proj lora",
                                                           "o_proj lora",   "gate_proj lora", "up_proj lora",
                                                           "down_proj lora"};
  return kRoles[size_t(t)];
}

void LlamaModel::projection(float* y, const float* x, const WeightRef& w, const WeightRef* bias, int layer,
                            LoraTarget t, BlockActs& a, bool training, uint64_t step, int64_t n,
                            int64_t row0) {
  const OpRole frozen(*be_, lora_target_name(t));
  be_->linear_forward(y, x, w, n, 0.0f);
  if (bias) be_->add_bias(y, *bias, n, w.rows);
  const LoraAdapter& ad = lora_.at(layer, t);
  if (!ad.active()) return;
  const OpRole adapter(*be_, adapter_role(t));
  // A fused module's first projection forms the intermediate its later ones read.
  float* rows = a.lora_t[size_t(ad.first)] + row0 * ad.rank;
  if (ad.first == t)
    lora_forward(*be_, y, rows, lora_xd_, x, ad, lora_.config.scale(),
                 dropout(layer, t, training, step, row0), n);
  else
    lora_output(*be_, y, rows, ad, lora_.config.scale(), n);
}

void LlamaModel::projection_backward(float* dx, float beta, const float* dy, const float* x,
                                     const WeightRef& w, int layer, LoraTarget t, const BlockActs& a,
                                     uint64_t step, int64_t n, int64_t row0) {
  const OpRole frozen(*be_, lora_target_name(t));
  be_->linear_backward_input(dx, dy, w, n, beta);
  LoraAdapter& ad = lora_.at(layer, t);
  const OpRole adapter(*be_, adapter_role(t));
  if (ad.active())
    lora_backward(*be_, dx, dy, x, a.lora_t[size_t(ad.first)] + row0 * ad.rank, ad, lora_.config.scale(),
                  dropout(layer, ad.first, true, step, row0), n, lora_dt_, lora_xd_);
}

void LlamaModel::mlp_gate_up(int l, const BlockWeights& w, BlockActs& a, int64_t row0, int64_t n,
                             bool training, uint64_t step) {
  const float* h2 = a.h2 + row0 * config().hidden;
  projection(a.gate, h2, w.gate, nullptr, l, LoraTarget::Gate, a, training, step, n, row0);
  projection(a.up, h2, w.up, nullptr, l, LoraTarget::Up, a, training, step, n, row0);
  if (config().activation == MlpActivation::GeluTanh)
    be_->geglu_forward(a.act, a.gate, a.up, n * config().intermediate);
  else
    be_->swiglu_forward(a.act, a.gate, a.up, n * config().intermediate);
}

const float* LlamaModel::inv_freq(int layer) const {
  const LlamaConfig& c = weights_.config;
  const bool local = c.has_local_rope() && c.sliding_layer(layer);
  const int64_t half = c.head_dim / 2;
  if (long_rope_ && !local) return inv_freq_.as<float>() + half * (c.has_local_rope() ? 2 : 1);
  return inv_freq_.as<float>() + (local ? half : 0);
}

bool LlamaModel::uses_long_factors(const Batch& b) const {
  const RopeParams& rope = weights_.config.rope;
  if (!rope.has_long_factors()) return false;
  for (int64_t i = 0; i < b.n_tokens(); ++i)
    if (b.positions[i] >= rope.original_max_positions) return true;
  return false;
}

float* LlamaModel::down_rows(const BlockActs& a, int64_t row0) const {
  return a.down_out + (mlp_rows_ == max_tokens_ ? row0 * weights_.config.hidden : 0);
}

const BlockWeights& LlamaModel::acquire_block(int layer, int next) {
  return store_ ? store_->acquire(layer, next) : placed_.blocks[size_t(layer)];
}

void LlamaModel::release_block(int layer) {
  if (store_) store_->release(layer);
}

const float* LlamaModel::input(int r, int next) {
  return act_store_ ? act_store_->acquire(r, next) : residual_[size_t(r)];
}

float* LlamaModel::output(int r) {
  return act_store_ ? act_store_->output(r) : residual_[size_t(r)];
}

void LlamaModel::written(int r, int64_t rows, bool training) {
  if (act_store_) act_store_->written(r, rows, training && r < config().n_layers);
}

void LlamaModel::done_with_inputs() {
  if (act_store_) act_store_->release();
}

void LlamaModel::block_forward(int l, const BlockWeights& w, const Batch& b, BlockActs& a, const float* x,
                               float* out, bool training, uint64_t step, KvCache* cache, bool mlp) {
  const LlamaConfig& c = weights_.config;
  const int64_t n = b.n_tokens();

  be_->rmsnorm_forward(a.h1, a.rstd1, x, w.attn_norm, n, c.hidden, c.rms_eps);
  const bool bias = c.attention_bias;
  projection(c.qk_norm ? a.q_pre : a.q, a.h1, w.q, bias ? &w.q_bias : nullptr, l, LoraTarget::Q, a, training,
             step, n);
  projection(c.qk_norm ? a.k_pre : a.k, a.h1, w.k, bias ? &w.k_bias : nullptr, l, LoraTarget::K, a, training,
             step, n);
  if (c.qk_norm) {
    be_->rmsnorm_forward(a.q, a.q_rstd, a.q_pre, w.q_norm, n * c.n_heads, c.head_dim, c.rms_eps);
    be_->rmsnorm_forward(a.k, a.k_rstd, a.k_pre, w.k_norm, n * c.n_kv_heads, c.head_dim, c.rms_eps);
  }
  projection(a.v, a.h1, w.v, bias ? &w.v_bias : nullptr, l, LoraTarget::V, a, training, step, n);
  be_->rope_forward(a.q, b.positions, inv_freq(l), n, c.n_heads, c.head_dim, c.rope_layout);
  be_->rope_forward(a.k, b.positions, inv_freq(l), n, c.n_kv_heads, c.head_dim, c.rope_layout);
  const float scale = c.attention_scale(l);
  if (cache) {
    const int64_t kv = c.kv_dim();
    float* k_layer = cache->k.as<float>() + int64_t(l) * cache->capacity * kv;
    float* v_layer = cache->v.as<float>() + int64_t(l) * cache->capacity * kv;
    be_->copy(k_layer + cache->n_past * kv, a.k, n * kv);
    be_->copy(v_layer + cache->n_past * kv, a.v, n * kv);
    be_->attention_cached_forward(a.att, a.q, k_layer, v_layer, cache->n_past, n, c.n_heads, c.n_kv_heads,
                                  c.head_dim, scale, c.window(l), c.attn_softcap);
  } else {
    const AttentionShape shape{b.batch,    b.seq, c.n_heads,   c.n_kv_heads,
                               c.head_dim, scale, c.window(l), c.attn_softcap};
    be_->attention_forward(a.att, a.lse, a.q, a.k, a.v, b.doc_ids, shape);
  }
  if (c.sandwich_norms) {
    projection(a.o_out, a.att, w.o, nullptr, l, LoraTarget::O, a, training, step, n);
    be_->rmsnorm_forward(a.x2, a.rstd_o, a.o_out, w.post_attn_norm, n, c.hidden, c.rms_eps);
  } else {
    projection(a.x2, a.att, w.o, nullptr, l, LoraTarget::O, a, training, step, n);
  }
  be_->add_inplace(a.x2, x, n * c.hidden);

  be_->rmsnorm_forward(a.h2, a.rstd2, a.x2, w.mlp_norm, n, c.hidden, c.rms_eps);
  if (!mlp) return;
  for (int64_t r0 = 0; r0 < n; r0 += mlp_rows_) {
    const int64_t m = std::min(mlp_rows_, n - r0);
    mlp_gate_up(l, w, a, r0, m, training, step);
    if (c.sandwich_norms) {
      float* down = down_rows(a, r0);
      projection(down, a.act, w.down, nullptr, l, LoraTarget::Down, a, training, step, m, r0);
      be_->rmsnorm_forward(out + r0 * c.hidden, a.rstd_down + r0, down, w.post_mlp_norm, m, c.hidden,
                           c.rms_eps);
    } else {
      projection(out + r0 * c.hidden, a.act, w.down, nullptr, l, LoraTarget::Down, a, training, step, m, r0);
    }
  }
  be_->add_inplace(out, a.x2, n * c.hidden);
}

// On entry d_res_ holds the gradient of the block's output; on exit, of its input.
void LlamaModel::block_backward(int l, const BlockWeights& w, const Batch& b, BlockActs& a, const float* x,
                                uint64_t step) {
  const LlamaConfig& c = weights_.config;
  const int64_t n = b.n_tokens();

  // MLP: out = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2), a chunk of rows at a time, each
  // chunk's gate, up, activation and down adapter's intermediate formed again when not kept.
  const bool kept = mlp_rows_ == max_tokens_;
  for (int64_t r0 = 0; r0 < n; r0 += mlp_rows_) {
    const int64_t m = std::min(mlp_rows_, n - r0), H = c.hidden, I = c.intermediate;
    if (!kept) {
      mlp_gate_up(l, w, a, r0, m, true, step);
      const LoraAdapter& down = lora_.at(l, LoraTarget::Down);
      if (c.sandwich_norms) {
        // The post-MLP norm's backward needs the down output and its rstd again (d_branch_'s rows
        // are written by the norm and then overwritten by its gradient).
        projection(down_rows(a, r0), a.act, w.down, nullptr, l, LoraTarget::Down, a, true, step, m, r0);
        be_->rmsnorm_forward(d_branch_ + r0 * H, a.rstd_down + r0, down_rows(a, r0), w.post_mlp_norm, m, H,
                             c.rms_eps);
      } else if (down.active()) {
        const OpRole role(*be_, adapter_role(LoraTarget::Down));
        lora_intermediate(*be_, a.lora_t[size_t(LoraTarget::Down)] + r0 * down.rank, lora_xd_, a.act, down,
                          dropout(l, LoraTarget::Down, true, step, r0), m);
      }
    }
    const float* d_down = d_res_ + r0 * H;
    if (c.sandwich_norms) {
      be_->fill(d_branch_ + r0 * H, 0.0f, m * H);
      be_->rmsnorm_backward(d_branch_ + r0 * H, nullptr, d_res_ + r0 * H, down_rows(a, r0), w.post_mlp_norm,
                            a.rstd_down + r0, m, H);
      d_down = d_branch_ + r0 * H;
    }
    projection_backward(d_act_, 0.0f, d_down, a.act, w.down, l, LoraTarget::Down, a, step, m, r0);
    be_->fill(d_gate_, 0.0f, m * I);
    be_->fill(d_up_, 0.0f, m * I);
    if (c.activation == MlpActivation::GeluTanh)
      be_->geglu_backward(d_gate_, d_up_, d_act_, a.gate, a.up, m * I);
    else
      be_->swiglu_backward(d_gate_, d_up_, d_act_, a.gate, a.up, m * I);
    projection_backward(d_h_ + r0 * H, 0.0f, d_gate_, a.h2 + r0 * H, w.gate, l, LoraTarget::Gate, a, step, m,
                        r0);
    projection_backward(d_h_ + r0 * H, 1.0f, d_up_, a.h2 + r0 * H, w.up, l, LoraTarget::Up, a, step, m, r0);
  }
  be_->rmsnorm_backward(d_res_, nullptr, d_h_, a.x2, w.mlp_norm, a.rstd2, n, c.hidden);

  // Attention: x2 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x)
  const float* d_o = d_res_;
  if (c.sandwich_norms) {
    be_->fill(d_branch_, 0.0f, n * c.hidden);
    be_->rmsnorm_backward(d_branch_, nullptr, d_res_, a.o_out, w.post_attn_norm, a.rstd_o, n, c.hidden);
    d_o = d_branch_;
  }
  projection_backward(d_att_, 0.0f, d_o, a.att, w.o, l, LoraTarget::O, a, step, n);
  be_->fill(d_q_, 0.0f, n * c.q_dim());
  be_->fill(d_k_, 0.0f, n * c.kv_dim());
  be_->fill(d_v_, 0.0f, n * c.kv_dim());
  const AttentionShape shape{
      b.batch, b.seq, c.n_heads, c.n_kv_heads, c.head_dim, c.attention_scale(l), c.window(l), c.attn_softcap};
  be_->attention_backward(d_q_, d_k_, d_v_, d_att_, a.q, a.k, a.v, a.att, a.lse, b.doc_ids, shape);
  be_->rope_backward(d_q_, b.positions, inv_freq(l), n, c.n_heads, c.head_dim, c.rope_layout);
  be_->rope_backward(d_k_, b.positions, inv_freq(l), n, c.n_kv_heads, c.head_dim, c.rope_layout);
  const float *d_q = d_q_, *d_k = d_k_;
  if (c.qk_norm) {
    be_->fill(d_q_pre_, 0.0f, n * c.q_dim());
    be_->fill(d_k_pre_, 0.0f, n * c.kv_dim());
    be_->rmsnorm_backward(d_q_pre_, nullptr, d_q_, a.q_pre, w.q_norm, a.q_rstd, n * c.n_heads, c.head_dim);
    be_->rmsnorm_backward(d_k_pre_, nullptr, d_k_, a.k_pre, w.k_norm, a.k_rstd, n * c.n_kv_heads, c.head_dim);
    d_q = d_q_pre_;
    d_k = d_k_pre_;
  }
  projection_backward(d_h_, 0.0f, d_q, a.h1, w.q, l, LoraTarget::Q, a, step, n);
  projection_backward(d_h_, 1.0f, d_k, a.h1, w.k, l, LoraTarget::K, a, step, n);
  projection_backward(d_h_, 1.0f, d_v_, a.h1, w.v, l, LoraTarget::V, a, step, n);
  be_->rmsnorm_backward(d_res_, nullptr, d_h_, x, w.attn_norm, a.rstd1, n, c.hidden);
}

Batch LlamaModel::forward_stack(const Batch& host_batch, bool training, uint64_t step, KvCache* cache) {
  check_batch(host_batch);
  long_rope_ = uses_long_factors(host_batch);
  const Batch b = stage(host_batch);
  const LlamaConfig& c = weights_.config;
  const int64_t n = b.n_tokens();
  // An offloaded block input is handed out once per pass (ActivationStore::output).
  float* x0 = output(0);
  if (host_embedding()) {
    // The upload is queued from ordinary host memory, which the copy has read when it returns, so
    // the next batch's rows may overwrite them.
    cpu_backend().embedding_forward(embed_rows_.as<float>(), host_batch.tokens, n, weights_.embed);
    be_->upload_n(x0, embed_rows_.as<float>(), size_t(n * c.hidden));
  } else {
    be_->embedding_forward(x0, b.tokens, n, placed_.embed);
  }
  if (c.embed_scale != 1.0f) be_->scale_inplace(x0, c.embed_scale, n * c.hidden);
  written(0, n, training);
  done_with_inputs();
  // Streamed blocks load in use order: after the last block, a training step's backward goes on
  // down from it; a forward-only pass is followed by the next one's first block.
  for (int l = 0; l < c.n_layers; ++l) {
    BlockActs& a = acts_[policy_ == CheckpointPolicy::None ? size_t(l) : 0];
    const int next = l + 1 < c.n_layers ? l + 1 : training ? l - 1 : 0;
    const BlockWeights& w = acquire_block(l, next);
    const float* x = input(l, -1);
    float* out = output(l + 1);
    block_forward(l, w, b, a, x, out, training, step, cache);
    written(l + 1, n, training);
    done_with_inputs();
    release_block(l);
  }
  be_->rmsnorm_forward(final_h_, final_rstd_, input(c.n_layers, -1), placed_.final_norm, n, c.hidden,
                       c.rms_eps);
  done_with_inputs();
  return b;
}

LossSum LlamaModel::forward_backward(const Batch& host_batch, float grad_scale, uint64_t step) {
  return forward_backward(host_batch, grad_scale, step, nullptr);
}

LossSum LlamaModel::forward_backward(const Batch& host_batch, float grad_scale, uint64_t step,
                                     const BlockGradsDone& grads_done) {
  TF_CHECK(host_batch.targets, "a training batch needs targets");
  const LlamaConfig& c = weights_.config;
  const Batch b = forward_stack(host_batch, true, step);
  const int64_t n = b.n_tokens();

  be_->fill(d_final_h_, 0.0f, n * c.hidden);
  const LossSum total = loss(b, d_final_h_, grad_scale);
  be_->fill(d_res_, 0.0f, n * c.hidden);
  be_->rmsnorm_backward(d_res_, nullptr, d_final_h_, input(c.n_layers, -1), placed_.final_norm, final_rstd_,
                        n, c.hidden);
  done_with_inputs();
  for (int l = c.n_layers - 1; l >= 0; --l) {
    // The next step's forward starts with the block this one ends with, and goes on with block 1.
    const BlockWeights& w = acquire_block(l, l > 0 ? l - 1 : c.n_layers > 1 ? 1 : -1);
    // An offloaded input comes back one block ahead, overlapping this block's backward.
    const float* x = input(l, l - 1);
    if (policy_ == CheckpointPolicy::None) {
      block_backward(l, w, b, acts_[size_t(l)], x, step);
    } else {
      // Recompute this block from its kept input; the same step regenerates the same dropout masks.
      // Its output, the next block's input, is written again with the same values; with the MLP in
      // chunks, the backward forms each chunk's MLP itself, and the output is not needed.
      float* out = output(l + 1);
      block_forward(l, w, b, acts_[0], x, out, true, step, nullptr, mlp_rows_ == max_tokens_);
      block_backward(l, w, b, acts_[0], x, step);
    }
    done_with_inputs();
    release_block(l);
    if (grads_done) grads_done(l);
  }
  return total;
}

LossSum LlamaModel::loss(const Batch& b, float* d_h, float grad_scale) {
  const int64_t n = b.n_tokens(), H = config().hidden;
  LossSum total;
  for (int64_t r0 = 0; r0 < n; r0 += loss_rows_) {
    const int64_t m = std::min(loss_rows_, n - r0);
    int64_t valid = 0;
    total.sum +=
        be_->lm_head_cross_entropy(d_h ? d_h + r0 * H : nullptr, &valid, final_h_ + r0 * H, placed_.lm_head,
                                   b.targets + r0, m, grad_scale, config().final_softcap);
    total.n_valid += valid;
  }
  return total;
}

LossSum LlamaModel::forward_loss(const Batch& host_batch) {
  TF_CHECK(host_batch.targets, "computing a loss needs targets");
  const Batch b = forward_stack(host_batch, false, 0);
  return loss(b, nullptr, 1.0f);
}

namespace {
// Gemma 2's final soft-capping, of logits already on the host (the loss caps inside its kernel).
void cap_logits(const LlamaConfig& c, float* logits, int64_t n) {
  if (c.final_softcap <= 0) return;
  for (int64_t i = 0; i < n; ++i) logits[i] = c.final_softcap * std::tanh(logits[i] / c.final_softcap);
}
}  // namespace

void LlamaModel::forward_logits(const Batch& b, float* logits) {
  forward_stack(b, false, 0);
  const int64_t vocab = config().vocab, n = b.n_tokens();
  for (int64_t r = 0; r < n; r += logit_rows_) {
    const int64_t m = std::min(logit_rows_, n - r);
    be_->linear_forward(logits_.as<float>(), final_h_ + r * config().hidden, placed_.lm_head, m, 0.0f);
    be_->download(logits + r * vocab, logits_.data(), size_t(m * vocab) * sizeof(float));
  }
  cap_logits(config(), logits, n * vocab);
}

KvCache LlamaModel::make_kv_cache(int64_t capacity) const {
  const LlamaConfig& c = weights_.config;
  TF_CHECK(capacity > 0, "a KV cache needs a positive capacity");
  KvCache cache;
  cache.capacity = capacity;
  const size_t bytes = size_t(c.n_layers) * size_t(capacity) * size_t(c.kv_dim()) * sizeof(float);
  cache.k = be_->alloc_unplanned(bytes, MemTag::Activations, "KV cache keys");
  cache.v = be_->alloc_unplanned(bytes, MemTag::Activations, "KV cache values");
  return cache;
}

void LlamaModel::decode(KvCache& cache, const int32_t* tokens, int64_t n, float* logits) {
  TF_CHECK(n > 0 && n <= max_tokens_, "decode of ", n, " tokens; at most ", max_tokens_, " per call");
  TF_CHECK(cache.n_past + n <= cache.capacity, "KV cache full: ", cache.n_past, " + ", n,
           " tokens exceed its ", cache.capacity);
  for (int64_t i = 0; i < n; ++i) decode_positions_[size_t(i)] = int32_t(cache.n_past + i);
  const Batch b{1, int(n), tokens, nullptr, decode_positions_.data(), nullptr};
  forward_stack(b, false, 0, &cache);
  cache.n_past += n;
  float* last = logits_.as<float>();
  be_->linear_forward(last, final_h_ + (n - 1) * config().hidden, placed_.lm_head, 1, 0.0f);
  be_->download(logits, last, size_t(config().vocab) * sizeof(float));
  cap_logits(config(), logits, config().vocab);
}

}  // namespace tf
