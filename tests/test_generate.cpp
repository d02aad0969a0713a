// Tests: generate_tokens chooses only ids the tokenizer has, in a model whose padded vocabulary
// rows (past the tokenizer's size) outscore every real token: greedy picks the best real token,
// sampling draws among real tokens only; it stops after any of its stop tokens; its stats count the
// prompt's tokens and the ones it generated.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "src/model/generate.h"
#include "src/model/llama.h"
#include "tests/model_test_util.h"

namespace tf {
namespace {

constexpr int kRows = 64;    // the model's vocabulary
constexpr int kTokens = 40;  // the tokenizer's; ids 40..63 are padding

LoraConfig inert_lora() {
  LoraConfig l;
  l.rank = 1;
  l.targets = 1u << int(LoraTarget::Q);
  return l;
}

// Random weights except the padded lm_head rows, +-100 along hidden unit 0: whatever the sign of
// that unit of the final hidden state, half of them score ~100 where real tokens score ~0.1.
LlamaWeights padded_weights() {
  const LlamaConfig cfg = test::tiny_config(kRows);
  LlamaWeights w = init_random_weights(cfg, DType::F32, 3);
  float* head = const_cast<float*>(static_cast<const float*>(w.lm_head.data));
  for (int row = kTokens; row < kRows; ++row) {
    std::fill(head + row * cfg.hidden, head + (row + 1) * cfg.hidden, 0.0f);
    head[row * cfg.hidden] = row % 2 ? 100.0f : -100.0f;
  }
  return w;
}

const std::vector<int32_t> kPrompt = {3, 14, 15, 9, 2, 6};

TEST(Generate, GreedyPicksTheBestIdTheTokenizerHas) {
  LlamaModel model(padded_weights(), inert_lora(), CheckpointPolicy::None, 32);
  const int n_new = 8;
  for (int32_t id : generate_tokens(model, kPrompt, n_new, /*stop_ids=*/{}, /*n_tokens=*/kRows))
    EXPECT_GE(id, kTokens) << "the padded rows are meant to win when nothing excludes them";

  const std::vector<int32_t> out = generate_tokens(model, kPrompt, n_new, {}, kTokens);
  ASSERT_EQ(out.size(), size_t(n_new));
  // Each id is the argmax over the real tokens of the logits that precede it, recomputed with one
  // full forward. That forward rounds differently from the cached decode (by ~1e-6 here), hence
  // "within 1e-4 of the best" rather than "equal".
  std::vector<int32_t> seq = kPrompt;
  seq.insert(seq.end(), out.begin(), out.end());
  std::vector<int32_t> pos(seq.size());
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = int32_t(i);
  std::vector<float> logits(seq.size() * kRows);
  model.forward_logits(Batch{1, int(seq.size()), seq.data(), nullptr, pos.data(), nullptr}, logits.data());
  for (int i = 0; i < n_new; ++i) {
    ASSERT_GE(out[size_t(i)], 0);
    ASSERT_LT(out[size_t(i)], kTokens) << "step " << i;
    const float* row = logits.data() + (kPrompt.size() + size_t(i) - 1) * kRows;
    EXPECT_GE(row[out[size_t(i)]], *std::max_element(row, row + kTokens) - 1e-4f) << "step " << i;
  }
}

TEST(Generate, SamplingDrawsOnlyIdsTheTokenizerHas) {
  LlamaModel model(padded_weights(), inert_lora(), CheckpointPolicy::None, 32);
  const int n_new = 8;
  const std::vector<int32_t> greedy = generate_tokens(model, kPrompt, n_new, {}, kTokens);
  bool padded_drawn = false, differs_from_greedy = false;
  for (uint64_t seed = 0; seed < 5; ++seed) {
    for (int32_t id : generate_tokens(model, kPrompt, n_new, {}, kRows, 1.0f, seed))
      padded_drawn |= id >= kTokens;
    const std::vector<int32_t> out = generate_tokens(model, kPrompt, n_new, {}, kTokens, 1.0f, seed);
    for (int32_t id : out) EXPECT_TRUE(id >= 0 && id < kTokens) << id << " with seed " << seed;
    differs_from_greedy |= out != greedy;
  }
  EXPECT_TRUE(padded_drawn) << "the padded rows are meant to win when nothing excludes them";
  // Real tokens score within ~0.1 of each other, so at temperature 1 the draws are far from
  // deterministic: five sequences of eight all equal to the greedy one mean nothing was sampled.
  EXPECT_TRUE(differs_from_greedy);
}

// Generation ends after the first token that is any of the stop ids (kept in the result), and runs
// to max_new when none comes.
TEST(Generate, StopsAfterAnyStopToken) {
  LlamaModel model(padded_weights(), inert_lora(), CheckpointPolicy::None, 32);
  const int n_new = 8;
  const std::vector<int32_t> greedy = generate_tokens(model, kPrompt, n_new, {}, kTokens);
  ASSERT_EQ(greedy.size(), size_t(n_new));
  // The first token after the first that has not come before: stopping there cuts the run short.
  size_t k = 1;
  while (k < greedy.size() &&
         std::find(greedy.begin(), greedy.begin() + ptrdiff_t(k), greedy[k]) != greedy.begin() + ptrdiff_t(k))
    ++k;
  ASSERT_LT(k, greedy.size()) << "the greedy run repeats one token";
  const std::vector<int32_t> stops = {kTokens - 1 == greedy[k] ? kTokens - 2 : kTokens - 1, greedy[k]};
  const std::vector<int32_t> out = generate_tokens(model, kPrompt, n_new, stops, kTokens);
  EXPECT_EQ(out, std::vector<int32_t>(greedy.begin(), greedy.begin() + ptrdiff_t(k) + 1));
  const std::vector<int32_t> unused = {kTokens};
  EXPECT_EQ(generate_tokens(model, kPrompt, n_new, unused, kTokens), greedy);
}

TEST(Generate, StatsCountThePromptAndTheTokensGenerated) {
  LlamaModel model(padded_weights(), inert_lora(), CheckpointPolicy::None, 32);
  GenerateStats full;
  const std::vector<int32_t> greedy = generate_tokens(model, kPrompt, 8, {}, kTokens, 0.0f, 0, &full);
  EXPECT_EQ(full.prompt_tokens, int64_t(kPrompt.size()));
  EXPECT_EQ(full.new_tokens, int64_t(greedy.size()));
  EXPECT_GT(full.prompt_s, 0.0);
  EXPECT_GT(full.decode_s, 0.0) << "seven decode steps take time";
  // Stopped at its second token: the count follows the tokens returned, not max_new.
  GenerateStats stopped;
  const std::vector<int32_t> stop = {greedy[1]};
  const std::vector<int32_t> out = generate_tokens(model, kPrompt, 8, stop, kTokens, 0.0f, 0, &stopped);
  EXPECT_EQ(stopped.new_tokens, int64_t(out.size()));
  EXPECT_LE(out.size(), size_t(2));
}

}  // namespace
}  // namespace tf
