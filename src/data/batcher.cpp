#include "src/data/batcher.h"

#include <algorithm>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::data {

size_t TokenBatch::target_count() const {
  return size_t(std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t != kIgnoreIndex; }));
}

bool next_batch(const TokenizedDataset& data, Sampler& sampler, const BatchOptions& opt, TokenBatch& out) {
  TF_CHECK(opt.batch > 0 && opt.seq > 0, "batch and seq must be positive, not ", opt.batch, " x ", opt.seq);
  TF_CHECK(sampler.size() == data.size(), "the sampler covers ", sampler.size(),
           " examples but the dataset has ", data.size());
  const size_t b = size_t(opt.batch), s = size_t(opt.seq), n = b * s;
  out.batch = opt.batch;
  out.seq = opt.seq;
  out.tokens.resize(n);
  out.targets.resize(n);
  out.positions.resize(n);
  out.doc_ids.resize(n);

  std::vector<size_t> fill(b, 0);
  std::vector<int32_t> docs(b, 0);
  out.packed = false;
  bool placed = false;
  size_t next_row = 0;  // without packing, rows are used in turn
  while (!sampler.done()) {
    const size_t ex = sampler.peek();
    const size_t len = data.length(ex);
    TF_CHECK(len <= s, "example ", ex, " has ", len, " tokens, more than the batch's seq ", s,
             " (tokenize with seq_len equal to seq)");
    size_t row = b;
    if (opt.pack) {
      for (size_t r = 0; r < b && row == b; ++r)
        if (fill[r] + len <= s) row = r;
    } else if (next_row < b) {
      row = next_row++;
    }
    if (row == b) break;
    const auto ids = data.example_ids(ex);
    const auto train = data.example_trainable(ex);
    const size_t base = row * s + fill[row];
    for (size_t t = 0; t < len; ++t) {
      out.tokens[base + t] = ids[t];
      out.targets[base + t] = t + 1 < len && train[t + 1] ? ids[t + 1] : kIgnoreIndex;
      out.positions[base + t] = int32_t(t);
      out.doc_ids[base + t] = docs[row];
    }
    fill[row] += len;
    out.packed = out.packed || docs[row] > 0;
    ++docs[row];
    placed = true;
    sampler.advance();
  }
  if (!placed) return false;
  for (size_t r = 0; r < b; ++r) {
    for (size_t t = fill[r]; t < s; ++t) {
      const size_t i = r * s + t;
      out.tokens[i] = opt.pad_id;
      out.targets[i] = kIgnoreIndex;
      out.positions[i] = int32_t(t - fill[r]);
      out.doc_ids[i] = docs[r];
    }
  }
  return true;
}

}  // namespace tf::data
