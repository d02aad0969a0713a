// defines: tiny model configs, synthetic batches and random LoRA parameters shared by model,
// training and adapter tests
#pragma once

#include <vector>

#include "src/core/rng.h"
#include "src/model/llama.h"

namespace tf::test {

inline LlamaConfig tiny_config(int vocab = 64) {
  LlamaConfig c;
  c.hidden = 32;
  c.intermediate = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.vocab = vocab;
  c.rope.head_dim = 8;
  c.max_positions = 256;
  return c;
}

// LoRA rank 8, alpha 16 on every projection, seed 1: the adapter of the training tests.
inline LoraConfig lora_r8() {
  LoraConfig l;
  l.rank = 8;
  l.alpha = 16;
  l.seed = 1;
  return l;
}

// Seeded normal values times scale in every LoRA parameter: LoRA's own init leaves B at zero,
// which would hide a wrong B in an export, an import or a merge.
inline void fill_lora_params(LoraState& s, uint64_t seed, uint64_t stream, float scale = 1.0f) {
  const Philox rng(seed, stream);
  for (int64_t i = 0; i < s.n_params; ++i) s.param_data()[i] = scale * rng.normal(uint64_t(i));
}

// Owns the arrays a Batch points into.
struct BatchData {
  int batch = 0, seq = 0;
  std::vector<int32_t> tokens, targets, positions, doc_ids;
  Batch view(bool with_docs = false) const {
    return Batch{
        batch, seq, tokens.data(), targets.data(), positions.data(), with_docs ? doc_ids.data() : nullptr};
  }
};

// Sequences following a fixed rule (next = (a * cur + c) mod vocab, a new random start every
// `doc_len` tokens) so the rule is learnable; the first `masked` positions of each sequence have no
// target. Documents are marked for packing tests.
inline BatchData synthetic_batch(int batch, int seq, int vocab, uint64_t seed, int doc_len = 1 << 30,
                                 int masked = 0) {
  BatchData d;
  d.batch = batch;
  d.seq = seq;
  const Philox rng(seed, 99);
  uint64_t draw = 0;
  for (int b = 0; b < batch; ++b) {
    int doc = 0, pos = 0;
    int32_t cur = int32_t(rng.u32(draw++) % uint32_t(vocab));
    for (int t = 0; t < seq; ++t) {
      if (pos == doc_len) {
        pos = 0;
        ++doc;
        cur = int32_t(rng.u32(draw++) % uint32_t(vocab));
      }
      d.tokens.push_back(cur);
      d.positions.push_back(pos++);
      d.doc_ids.push_back(doc);
      cur = int32_t((5 * cur + 3) % vocab);
    }
    for (int t = 0; t < seq; ++t) {
      const size_t i = size_t(b * seq + t);
      const bool last_of_doc = t + 1 == seq || d.positions[i + 1] == 0;
      d.targets.push_back(t < masked || last_of_doc ? kIgnoreIndex : d.tokens[i + 1]);
    }
  }
  return d;
}

}  // namespace tf::test
