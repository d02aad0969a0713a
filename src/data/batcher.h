// defines: tf::data::TokenBatch (token, target, position and document-id arrays of one batch),
// tf::data::BatchOptions, tf::data::next_batch (packing or one example per row)
#pragma once

#include <cstdint>
#include <vector>

#include "src/data/dataset.h"
#include "src/data/sampler.h"

namespace tf::data {

// Row-major [batch, seq] arrays. targets[i] is the token after i when it belongs to the same
// document and is trainable, else kIgnoreIndex (-100). positions restart at 0 with each document;
// doc_ids number the documents of a row from 0 (the attention mask keeps each token inside its
// document). A row's padding tail is one more document of pad tokens with kIgnoreIndex targets.
// `packed` says whether some row holds more than one example: only then do the documents need a
// mask (padding comes after every real token of its row, so whatever it attends to, no real token's
// output or gradient changes).
struct TokenBatch {
  int batch = 0, seq = 0;
  std::vector<int32_t> tokens, targets, positions, doc_ids;
  bool packed = false;
  size_t target_count() const;  // targets that count in the loss
};

struct BatchOptions {
  int batch = 1;
  int seq = 2048;
  // Several examples per row (first fit, in sampler order) rather than one padded example per row.
  bool pack = true;
  int32_t pad_id = 0;
};

// Fills `out` (reusing its storage) with the next examples of `sampler`. With packing, each example
// goes into the first row with room for it; the batch ends at the first example that fits in no
// row, which stays at the sampler's cursor for the next batch, so the cursor alone says where a
// resumed run continues. False when the sampler is done and nothing was placed; a batch cut short
// by the sampler's end is padded. Examples must be no longer than seq (tokenize with seq_len = seq).
bool next_batch(const TokenizedDataset& data, Sampler& sampler, const BatchOptions& opt, TokenBatch& out);

}  // namespace tf::data
