// defines: tf::model_scratch_shape
#include "src/model/scratch_shape.h"

#include <algorithm>

#include "src/core/error.h"

namespace tf {

namespace {

// Two matrices whose products take the same scratch: the launchers read only these.
bool same_scratch(const WeightRef& a, const WeightRef& b) {
  return a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols &&
         (a.scales.absmax == nullptr) == (b.scales.absmax == nullptr);
}

}  // namespace

ScratchShape model_scratch_shape(const LlamaWeights& w, const LoraConfig& lora, int batch, int seq,
                                 bool train, const ModelLayout& layout) {
  const LlamaConfig& c = w.config;
  TF_CHECK(batch > 0 && seq > 0, "a micro-batch of ", batch, " x ", seq, " tokens is empty");
  ScratchShape s;
  s.batch = batch;
  s.seq = seq;
  s.n_heads = c.n_heads;
  s.n_kv_heads = c.n_kv_heads;
  s.head_dim = c.head_dim;
  s.train = train;
  s.mlp_rows = layout.mlp_chunk;
  s.loss_rows = layout.loss_rows;
  auto add = [](std::vector<WeightRef>& list, const WeightRef& m) {
    if (std::none_of(list.begin(), list.end(), [&m](const WeightRef& p) { return same_scratch(p, m); }))
      list.push_back(m);
  };
  for (const BlockWeights& b : w.blocks) {
    for (const WeightRef* m : {&b.q, &b.k, &b.v, &b.o}) add(s.projections, *m);
    for (const WeightRef* m : {&b.gate, &b.up, &b.down}) add(s.mlp_projections, *m);
  }
  s.lm_head = c.tie_embeddings ? w.embed : w.lm_head;
  s.lora_params = int64_t(LoraState::memory_plan(c, lora)[0].bytes / sizeof(float));
  return s;
}

}  // namespace tf
