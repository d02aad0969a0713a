#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model_test_util.h"
#include "op_test_util.h"
#include "src/core/error.h"

using namespace tf;
using namespace tf::test;

namespace {

LoraConfig test_lora(float dropout = 0.0f) {
  LoraConfig l;
  l.rank = 4;
  l.alpha = 8;
  l.dropout = dropout;
  l.seed = 7;
  return l;
}

// B starts at zero (as PEFT); give it values so every gradient path is exercised.
void randomise_lora(LoraState& s, uint64_t seed) {
  const auto r = random_floats(size_t(s.n_params), seed, 0.05f);
  std::copy(r.begin(), r.end(), s.param_data());
}

std::vector<float> grads_of(LlamaModel& m, const Batch& b, uint64_t step = 3) {
  m.lora().zero_grads();
  m.forward_backward(b, 1.0f / 16.0f, step);
  return {m.lora().grad_data(), m.lora().grad_data() + m.lora().n_params};
}

}  // namespace

TEST(LlamaModel, CheckpointingGivesIdenticalLoraGradients) {
  const LlamaConfig cfg = tiny_config();
  const BatchData data = synthetic_batch(2, 24, cfg.vocab, 1, 10, 3);
  for (float dropout : {0.0f, 0.1f}) {
    LlamaModel keep(init_random_weights(cfg, DType::BF16, 5), test_lora(dropout), CheckpointPolicy::None, 48);
    LlamaModel recompute(init_random_weights(cfg, DType::BF16, 5), test_lora(dropout),
                         CheckpointPolicy::PerBlock, 48);
    randomise_lora(keep.lora(), 11);
    randomise_lora(recompute.lora(), 11);
    const auto g1 = grads_of(keep, data.view(true));
    const auto g2 = grads_of(recompute, data.view(true));
    ASSERT_EQ(g1.size(), g2.size());
    // Recomputation runs the same deterministic ops on the same inputs: bit-identical, not close.
    for (size_t i = 0; i < g1.size(); ++i)
      ASSERT_EQ(g1[i], g2[i]) << "gradient " << i << " dropout " << dropout;
    double norm = 0;
    for (float g : g1) norm += double(g) * g;
    EXPECT_GT(norm, 0.0);
  }
}

TEST(LlamaModel, LoraGradientsMatchFiniteDifferences) {
  // f32 forward, so the central difference uses a large step: with loss ~ 4 and f32 rounding of
  // ~5e-7 relative, h = 1e-2 leaves rounding noise ~ 4 * 6e-8 / 1e-2 ~ 2e-5 per component and
  // truncation error O(h^2 * third derivative) ~ 1e-4: a 2% norm-wise bound catches any wrong path
  // (a missing or doubled term is an O(1) error) without flaking.
  const LlamaConfig cfg = tiny_config(32);
  const BatchData data = synthetic_batch(2, 12, cfg.vocab, 2, 6, 2);
  LlamaConfig qwen = cfg;
  qwen.attention_bias = true;
  for (const LlamaConfig& c : {cfg, qwen}) {
    LlamaModel m(init_random_weights(c, DType::F32, 3), test_lora(0.2f), CheckpointPolicy::None, 24);
    randomise_lora(m.lora(), 4);
    const Batch b = data.view(true);
    const auto analytic = grads_of(m, b, 9);
    float* p = m.lora().param_data();
    const int64_t n = m.lora().n_params;
    // A deterministic subset of parameters keeps the test fast; it covers every adapter.
    std::vector<double> numeric, picked;
    for (int64_t i = 0; i < n; i += 7) {
      const float saved = p[i];
      auto loss_at = [&](float v) {
        p[i] = v;
        m.lora().zero_grads();
        return m.forward_backward(b, 0.0f, 9).sum / 16.0;
      };
      const double h = 1e-2;
      const double up = loss_at(saved + float(h)), down = loss_at(saved - float(h));
      p[i] = saved;
      numeric.push_back((up - down) / (2 * h));
      picked.push_back(analytic[size_t(i)]);
    }
    EXPECT_LT(rel_norm_error(picked, numeric), 2e-2) << "attention_bias " << c.attention_bias;
  }
}

TEST(LlamaModel, DropoutIsDeterministicPerStepAndOffInEval) {
  const LlamaConfig cfg = tiny_config();
  const BatchData data = synthetic_batch(1, 16, cfg.vocab, 3);
  LlamaModel m(init_random_weights(cfg, DType::F32, 1), test_lora(0.3f), CheckpointPolicy::None, 16);
  randomise_lora(m.lora(), 2);
  EXPECT_EQ(grads_of(m, data.view(), 5), grads_of(m, data.view(), 5));
  EXPECT_NE(grads_of(m, data.view(), 5), grads_of(m, data.view(), 6));
  const double eval1 = m.forward_loss(data.view()).sum;
  EXPECT_EQ(eval1, m.forward_loss(data.view()).sum);
}

TEST(LlamaModel, ZeroBMeansBaseModelLogits) {
  // A fresh adapter has B = 0, so it must not change the model's output.
  const LlamaConfig cfg = tiny_config();
  const BatchData data = synthetic_batch(1, 9, cfg.vocab, 4);
  LlamaModel with(init_random_weights(cfg, DType::F32, 6), test_lora(), CheckpointPolicy::None, 9);
  LoraConfig only_q = test_lora();
  only_q.targets = parse_lora_targets("q");
  LlamaModel other(init_random_weights(cfg, DType::F32, 6), only_q, CheckpointPolicy::None, 9);
  std::vector<float> a(size_t(9 * cfg.vocab)), b(a.size());
  with.forward_logits(data.view(), a.data());
  other.forward_logits(data.view(), b.data());
  EXPECT_EQ(a, b);
}

TEST(LlamaModel, PackedDocumentsMatchSeparateSequences) {
  // Two documents packed into one sequence with doc ids and restarted positions must give the same
  // loss as the two documents run as separate sequences.
  const LlamaConfig cfg = tiny_config();
  const BatchData packed = synthetic_batch(1, 16, cfg.vocab, 8, 8);
  BatchData split = packed;
  split.batch = 2;
  split.seq = 8;
  LlamaModel m(init_random_weights(cfg, DType::F32, 2), test_lora(), CheckpointPolicy::None, 16);
  randomise_lora(m.lora(), 3);
  const LossSum a = m.forward_loss(packed.view(true));
  const LossSum b = m.forward_loss(split.view(false));
  EXPECT_EQ(a.n_valid, b.n_valid);
  EXPECT_NEAR(a.sum, b.sum, 1e-5 * std::abs(b.sum));
}

TEST(LlamaModel, RejectsOversizedBatchesAndBadConfigs) {
  const LlamaConfig cfg = tiny_config();
  LlamaModel m(init_random_weights(cfg, DType::F32, 2), test_lora(), CheckpointPolicy::None, 8);
  const BatchData data = synthetic_batch(1, 9, cfg.vocab, 1);
  EXPECT_THROW(m.forward_loss(data.view()), Error);
  LlamaConfig bad = cfg;
  bad.n_kv_heads = 3;
  EXPECT_THROW(init_random_weights(bad, DType::F32, 1), Error);
  EXPECT_THROW(parse_lora_targets("q,bogus"), Error);
  EXPECT_EQ(parse_lora_targets("q_proj, v"), (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::V)));
}
