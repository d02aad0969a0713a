#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "model_test_util.h"
#include "op_test_util.h"
#include "src/core/error.h"
#include "src/train/trainer.h"

using namespace tf;
using namespace tf::test;

namespace {

LoraConfig lora_r8() {
  LoraConfig l;
  l.rank = 8;
  l.alpha = 16;
  l.seed = 1;
  return l;
}

TrainConfig train_config(int64_t steps, float lr) {
  TrainConfig t;
  t.lr.peak_lr = lr;
  t.lr.total_steps = steps;
  t.lr.warmup_steps = 5;
  t.weight_decay = 0.01f;
  return t;
}

}  // namespace

TEST(Trainer, TinyModelHalvesItsLossIn100Steps) {
  const LlamaConfig cfg = tiny_config(64);
  // std 0.25 lets logits reach ~8 through the frozen head, enough to express the rule.
  LlamaModel model(init_random_weights(cfg, DType::BF16, 42, 0.25f), lora_r8(), CheckpointPolicy::PerBlock,
                   4 * 32);
  Trainer trainer(model, train_config(100, 1e-2f));
  const BatchData eval = synthetic_batch(4, 32, cfg.vocab, 1000, 16);
  const double before = model.forward_loss(eval.view(true)).mean();
  double first = 0, last = 0;
  for (int s = 0; s < 100; ++s) {
    const BatchData data = synthetic_batch(4, 32, cfg.vocab, uint64_t(s), 16);
    const Batch b = data.view(true);
    const StepStats st = trainer.step({&b, 1});
    ASSERT_FALSE(st.skipped);
    ASSERT_TRUE(std::isfinite(st.loss));
    if (s == 0) first = st.loss;
    last = st.loss;
  }
  const double after = model.forward_loss(eval.view(true)).mean();
  // A random model starts at or above the uniform guess, ln(64) = 4.16 (random logits of std ~1
  // only add to it); the successor rule is learnable by the adapters.
  EXPECT_GT(first, std::log(64.0) - 0.1);
  EXPECT_LT(last, first / 2);
  EXPECT_LT(after, before / 2);
  EXPECT_EQ(trainer.state().adam_steps, 100);
}

TEST(Trainer, AccumulationMatchesOneLargeBatch) {
  const LlamaConfig cfg = tiny_config(64);
  const BatchData whole = synthetic_batch(2, 16, cfg.vocab, 3, 8, 2);
  BatchData half0 = whole, half1 = whole;
  for (BatchData* h : {&half0, &half1}) h->batch = 1;
  for (auto* v : {&half1.tokens, &half1.targets, &half1.positions, &half1.doc_ids})
    v->erase(v->begin(), v->begin() + 16);
  LlamaModel a(init_random_weights(cfg, DType::F32, 1), lora_r8(), CheckpointPolicy::None, 32);
  LlamaModel b(init_random_weights(cfg, DType::F32, 1), lora_r8(), CheckpointPolicy::None, 32);
  Trainer ta(a, train_config(10, 1e-3f)), tb(b, train_config(10, 1e-3f));
  const Batch one = whole.view(true);
  const Batch two[2] = {half0.view(true), half1.view(true)};
  for (int s = 0; s < 3; ++s) {
    const StepStats sa = ta.step({&one, 1});
    const StepStats sb = tb.step(two);
    // The two differ only in the order float sums are taken: a few ulps of the loss.
    EXPECT_NEAR(sa.loss, sb.loss, 1e-5 * sa.loss);
    EXPECT_NEAR(sa.grad_norm, sb.grad_norm, 1e-4 * sa.grad_norm);
  }
  EXPECT_LT(rel_norm_error(a.lora().param_data(), b.lora().param_data(), size_t(a.lora().n_params)), 1e-5);
}

TEST(Trainer, NonFiniteStepsAreSkippedCountedAndAbortAfterTheLimit) {
  const LlamaConfig cfg = tiny_config(64);
  LlamaModel model(init_random_weights(cfg, DType::F32, 1), lora_r8(), CheckpointPolicy::None, 32);
  TrainConfig tc = train_config(10, 1e-3f);
  tc.max_consecutive_skips = 3;
  Trainer trainer(model, tc);
  const BatchData data = synthetic_batch(1, 32, cfg.vocab, 1);
  const Batch b = data.view();
  ASSERT_FALSE(trainer.step({&b, 1}).skipped);
  std::vector<float> before(model.lora().param_data(), model.lora().param_data() + model.lora().n_params);
  // Poison the adapter: the forward pass now produces NaN everywhere.
  model.lora().param_data()[0] = std::numeric_limits<float>::quiet_NaN();
  before[0] = model.lora().param_data()[0];
  for (int i = 1; i <= 2; ++i) {
    const StepStats st = trainer.step({&b, 1});
    EXPECT_TRUE(st.skipped);
    EXPECT_EQ(st.skipped_total, i);
  }
  // Skipped steps leave the parameters untouched (NaN compares unequal, so compare the rest).
  for (size_t i = 1; i < before.size(); ++i) ASSERT_EQ(before[i], model.lora().param_data()[i]);
  EXPECT_EQ(trainer.state().adam_steps, 1);
  try {
    trainer.step({&b, 1});
    FAIL() << "third consecutive skip must abort";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 consecutive steps"), std::string::npos) << e.what();
  }
}

TEST(Trainer, ClippingBoundsTheUpdate) {
  const LlamaConfig cfg = tiny_config(64);
  LlamaModel model(init_random_weights(cfg, DType::F32, 1), lora_r8(), CheckpointPolicy::None, 32);
  TrainConfig tc = train_config(10, 1e-3f);
  tc.clip = 1e-6f;
  Trainer trainer(model, tc);
  const BatchData data = synthetic_batch(1, 32, cfg.vocab, 1);
  const Batch b = data.view();
  trainer.step({&b, 1});
  // After clipping, the gradient the optimizer saw has norm ~clip.
  EXPECT_NEAR(global_grad_norm(model.lora().grad_data(), model.lora().n_params), 1e-6, 1e-8);
}

TEST(LrSchedule, WarmupThenDecay) {
  LrScheduleParams p;
  p.peak_lr = 1.0f;
  p.warmup_steps = 4;
  p.total_steps = 14;
  EXPECT_FLOAT_EQ(learning_rate(p, 0), 0.25f);
  EXPECT_FLOAT_EQ(learning_rate(p, 3), 1.0f);
  EXPECT_FLOAT_EQ(learning_rate(p, 4), 1.0f);
  EXPECT_NEAR(learning_rate(p, 9), 0.5f, 1e-6);  // halfway through the cosine
  EXPECT_NEAR(learning_rate(p, 14), 0.0f, 1e-6);
  p.schedule = LrSchedule::Linear;
  EXPECT_NEAR(learning_rate(p, 9), 0.5f, 1e-6);
  EXPECT_NEAR(learning_rate(p, 11), 0.3f, 1e-6);
  p.schedule = LrSchedule::Constant;
  EXPECT_FLOAT_EQ(learning_rate(p, 13), 1.0f);
  EXPECT_THROW(parse_lr_schedule("exponential"), Error);
}
