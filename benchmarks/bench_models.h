// defines: what the benchmarks share: tf::bench::llama_1b_config (Llama-3.2-1B's shapes, tied
// embeddings) and train_flops_per_token, the useful FLOPs of one training step per token that the
// training benchmarks divide by their time: forward, the input-gradient half of backward through
// frozen weights, attention and LoRA; recomputation is not counted
#pragma once

#include "src/model/config.h"
#include "src/model/lora.h"

namespace tf::bench {

// Llama-3.2-1B's shapes (1.24B parameters with tied embeddings), rope as in its config.
inline LlamaConfig llama_1b_config(int max_positions) {
  LlamaConfig c;
  c.hidden = 2048;
  c.intermediate = 8192;
  c.n_layers = 16;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 64;
  c.vocab = 128256;
  c.tie_embeddings = true;
  c.rope.head_dim = 64;
  c.rope.theta = 500000.0f;
  c.max_positions = max_positions;
  return c;
}

// Useful FLOPs per token of one training step at sequence length `seq`.
inline double train_flops_per_token(const LlamaConfig& c, const LoraConfig& l, int seq) {
  const double h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), inter = c.intermediate;
  const double block_params = h * q * 2 + h * kv * 2 + 3 * h * inter;
  // Causal attention: a token attends to (seq + 1) / 2 keys on average; QK^T and PV are 2 flops
  // per multiply-add each. Backward does dV, dP, dQ, dK (4 products) and recomputes P (1 product).
  const double attn_fwd = 2.0 * 2.0 * q * (seq + 1) / 2.0;
  const double attn_bwd = 2.5 * attn_fwd;
  double lora = 0;
  for (int t = 0; t < kLoraTargetCount; ++t) {
    if (!l.has(LoraTarget(t))) continue;
    const auto [in, out] = lora_target_dims(c, LoraTarget(t));
    lora += 2.0 * l.rank * (in + out);  // forward; backward does three such products
  }
  const double per_layer = 2 * block_params + attn_fwd + 2 * block_params + attn_bwd + 4 * lora;
  const double lm_head = 2.0 * c.vocab * h * 2;  // logits and the gradient into h
  return per_layer * c.n_layers + lm_head;
}

}  // namespace tf::bench
