// defines: tf::generate_tokens (greedy or sampled continuation with a KV cache), tf::GenerateStats
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "src/model/llama.h"

namespace tf {

// Continues `prompt_ids`: greedy when temperature is 0, else sampled from softmax(logits / T) with
// Philox keyed by `seed`. Only ids below `n_tokens` (the tokenizer's vocab_size()) are chosen: a
// model's vocabulary is often padded past its tokenizer's (Qwen2.5: 151936 rows, 151665 tokens),
// and a padded row, though never trained, can win. Stops after one of `stop_ids` (EOS and the
// model's end-of-turn tokens, io::LoadedModel::stop_ids; included in the result) or max_new tokens.
// Where a generation's time went, by the host clock: `prompt_s` from the call to the first token
// chosen (the prompt's forward passes), `decode_s` from the first token chosen to the last (one
// cached decode step and one choice per token after the first), so that tokens after the first per
// decode second is the decoding rate, comparable with other engines' rate measured the same way.
struct GenerateStats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  double prompt_s = 0, decode_s = 0;
};

std::vector<int32_t> generate_tokens(LlamaModel& model, const std::vector<int32_t>& prompt_ids, int max_new,
                                     std::span<const int32_t> stop_ids, int64_t n_tokens,
                                     float temperature = 0.0f, uint64_t seed = 0,
                                     GenerateStats* stats = nullptr);

}  // namespace tf
