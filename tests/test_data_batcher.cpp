// Sampler and batcher: the shuffle is a deterministic permutation per (seed, epoch); a cursor saved
// mid-run and restored into a fresh sampler reproduces the following batches exactly; packed rows
// carry per-document positions, document ids and targets that never cross a document.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/data/batcher.h"

namespace tf::data {
namespace {

// Example i has `lens[i]` tokens with ids 1000*i + t; token t is trainable when t >= prompt[i].
TokenizedDataset make_data(const std::vector<size_t>& lens, const std::vector<size_t>& prompt) {
  TokenizedDataset d;
  for (size_t i = 0; i < lens.size(); ++i) {
    for (size_t t = 0; t < lens[i]; ++t) {
      d.ids.push_back(int32_t(1000 * i + t));
      d.trainable.push_back(uint8_t(t >= prompt[i]));
    }
    d.offsets.push_back(d.ids.size());
  }
  return d;
}

TEST(DataSampler, ShuffleIsADeterministicPermutationPerEpoch) {
  const size_t n = 1000;
  const Sampler a(n, 42), b(n, 42), c(n, 43);
  const auto e0 = a.epoch_order(0), e1 = a.epoch_order(1);
  EXPECT_EQ(e0, b.epoch_order(0));
  EXPECT_NE(e0, e1);
  EXPECT_NE(e0, c.epoch_order(0));
  auto sorted = e0;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(sorted[i], i);
  // A fair shuffle leaves ~1 of n items in place on average; more than 10 fixed points has
  // probability below 1e-7 (Poisson(1) tail), so this catches an order that barely moves.
  size_t fixed = 0;
  for (size_t i = 0; i < n; ++i) fixed += e0[i] == i;
  EXPECT_LE(fixed, 10u);
  const Sampler plain(5, 42, false);
  EXPECT_EQ(plain.epoch_order(3), (std::vector<uint32_t>{0, 1, 2, 3, 4}));
}

TEST(DataSampler, EpochsEndAndCursorsAreChecked) {
  Sampler s(3, 7, true, 2);
  std::vector<size_t> seen;
  while (!s.done()) {
    seen.push_back(s.peek());
    s.advance();
  }
  ASSERT_EQ(seen.size(), 6u);
  EXPECT_EQ(std::set<size_t>(seen.begin(), seen.begin() + 3).size(), 3u);
  EXPECT_EQ(s.cursor(), (SamplerCursor{2, 0}));
  EXPECT_THROW(s.peek(), Error);
  EXPECT_THROW(s.restore({0, 3}), Error);
}

TEST(DataBatcher, PackedRowsKeepDocumentsApart) {
  // Lengths 3, 4, 2, 5 into 2 rows of 6, first fit in order (no shuffle): row 0 = ex0 + ex2,
  // row 1 = ex1; ex3 fits in no row and starts the next batch.
  const TokenizedDataset d = make_data({3, 4, 2, 5}, {1, 2, 0, 1});
  Sampler s(d.size(), 1, false, 1);
  TokenBatch b;
  ASSERT_TRUE(next_batch(d, s, {.batch = 2, .seq = 6, .pack = true, .pad_id = 9}, b));
  const int32_t X = kIgnoreIndex;
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{0, 1, 2, 2000, 2001, 9, 1000, 1001, 1002, 1003, 9, 9}));
  EXPECT_EQ(b.targets, (std::vector<int32_t>{1, 2, X, 2001, X, X, X, 1002, 1003, X, X, X}));
  EXPECT_EQ(b.positions, (std::vector<int32_t>{0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 1}));
  EXPECT_EQ(b.doc_ids, (std::vector<int32_t>{0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 1, 1}));
  EXPECT_TRUE(b.packed) << "row 0 holds two examples";
  EXPECT_EQ(b.target_count(), 5u);
  EXPECT_EQ(s.cursor(), (SamplerCursor{0, 3}));

  ASSERT_TRUE(next_batch(d, s, {.batch = 2, .seq = 6, .pack = true, .pad_id = 9}, b));
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{3000, 3001, 3002, 3003, 3004, 9, 9, 9, 9, 9, 9, 9}));
  EXPECT_EQ(b.targets, (std::vector<int32_t>{3001, 3002, 3003, 3004, X, X, X, X, X, X, X, X}));
  EXPECT_EQ(b.doc_ids, (std::vector<int32_t>{0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0}));
  EXPECT_FALSE(b.packed) << "one example per row, the buffer reused from a packed batch";
  EXPECT_FALSE(next_batch(d, s, {.batch = 2, .seq = 6, .pack = true, .pad_id = 9}, b));
}

TEST(DataBatcher, UnpackedRowsHoldOneExampleEach) {
  const TokenizedDataset d = make_data({3, 4, 2}, {0, 0, 0});
  Sampler s(d.size(), 1, false, 1);
  TokenBatch b;
  ASSERT_TRUE(next_batch(d, s, {.batch = 2, .seq = 5, .pack = false, .pad_id = 7}, b));
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{0, 1, 2, 7, 7, 1000, 1001, 1002, 1003, 7}));
  EXPECT_EQ(b.doc_ids, (std::vector<int32_t>{0, 0, 0, 1, 1, 0, 0, 0, 0, 1}));
  EXPECT_FALSE(b.packed);
  ASSERT_TRUE(next_batch(d, s, {.batch = 2, .seq = 5, .pack = false, .pad_id = 7}, b));
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{2000, 2001, 7, 7, 7, 7, 7, 7, 7, 7}));
  EXPECT_EQ(b.target_count(), 1u);
  EXPECT_FALSE(next_batch(d, s, {.batch = 2, .seq = 5, .pack = false, .pad_id = 7}, b));

  Sampler again(d.size(), 1, false);
  EXPECT_THROW(next_batch(d, again, {.batch = 1, .seq = 3, .pack = false, .pad_id = 7}, b), Error)
      << "an example longer than seq must be refused";
}

TEST(DataBatcher, RestoredCursorReproducesTheBatches) {
  std::vector<size_t> lens, prompt;
  for (size_t i = 0; i < 37; ++i) {
    lens.push_back(2 + (i * 7) % 11);
    prompt.push_back(i % 3);
  }
  const TokenizedDataset d = make_data(lens, prompt);
  const BatchOptions opt{.batch = 3, .seq = 16, .pack = true, .pad_id = 0};
  Sampler run(d.size(), 1234);
  TokenBatch b;
  for (int k = 0; k < 5; ++k) ASSERT_TRUE(next_batch(d, run, opt, b));
  const SamplerCursor saved = run.cursor();
  std::vector<TokenBatch> expected(12);  // crosses into the following epochs
  for (TokenBatch& e : expected) ASSERT_TRUE(next_batch(d, run, opt, e));
  EXPECT_GE(run.cursor().epoch, 1u);

  Sampler resumed(d.size(), 1234);
  resumed.restore(saved);
  for (const TokenBatch& e : expected) {
    ASSERT_TRUE(next_batch(d, resumed, opt, b));
    EXPECT_EQ(b.tokens, e.tokens);
    EXPECT_EQ(b.targets, e.targets);
    EXPECT_EQ(b.positions, e.positions);
    EXPECT_EQ(b.doc_ids, e.doc_ids);
  }
  EXPECT_EQ(resumed.cursor(), run.cursor());
}

}  // namespace
}  // namespace tf::data
