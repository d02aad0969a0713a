// Tests: tf::Trainer (learning, accumulation, the NaN/Inf skip policy, clipping before AdamW) and the
// learning-rate schedules.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/ref/adamw.h"
#include "model_test_util.h"
#include "op_test_util.h"
#include "src/core/error.h"
#include "src/train/trainer.h"

using namespace tf;
using namespace tf::test;

namespace {

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
  LlamaModel twin(init_random_weights(cfg, DType::F32, 1), lora_r8(), CheckpointPolicy::None, 32);
  TrainConfig tc = train_config(10, 1e-3f);
  tc.max_consecutive_skips = 3;
  // The schedule (and dropout) follow the step counter, which skipped steps advance by design; with
  // a constant rate and no dropout only AdamW's own step count could tell the two runs apart.
  tc.lr.schedule = LrSchedule::Constant;
  tc.lr.warmup_steps = 0;
  Trainer trainer(model, tc), reference(twin, tc);
  const BatchData data = synthetic_batch(1, 32, cfg.vocab, 1), data2 = synthetic_batch(1, 32, cfg.vocab, 2);
  const Batch b = data.view(), b2 = data2.view();
  ASSERT_FALSE(trainer.step({&b, 1}).skipped);
  ASSERT_FALSE(reference.step({&b, 1}).skipped);
  LoraState& lora = model.lora();
  const auto copy = [&](const DeviceMem& buf) {
    const float* f = buf.as<float>();
    return std::vector<float>(f, f + lora.n_params);
  };
  std::vector<float> params = copy(lora.params);
  const std::vector<float> m = copy(lora.adam_m), v = copy(lora.adam_v);
  // Poison the adapter: the forward pass now produces NaN everywhere.
  const float good = lora.param_data()[0];
  lora.param_data()[0] = params[0] = std::numeric_limits<float>::quiet_NaN();
  for (int i = 1; i <= 2; ++i) {
    const StepStats st = trainer.step({&b, 1});
    EXPECT_TRUE(st.skipped);
    EXPECT_EQ(st.skipped_total, i);
  }
  // Skipped steps leave the parameters and moments untouched (NaN compares unequal: skip it).
  for (size_t i = 1; i < params.size(); ++i) ASSERT_EQ(params[i], lora.param_data()[i]) << i;
  EXPECT_EQ(copy(lora.adam_m), m);
  EXPECT_EQ(copy(lora.adam_v), v);
  EXPECT_EQ(trainer.state().adam_steps, 1);

  // Once the cause is gone, the next step is exactly the step a run without the skips takes.
  lora.param_data()[0] = good;
  ASSERT_FALSE(trainer.step({&b2, 1}).skipped);
  ASSERT_FALSE(reference.step({&b2, 1}).skipped);
  EXPECT_EQ(trainer.state().adam_steps, 2);
  EXPECT_EQ(copy(lora.params), copy(twin.lora().params));
  EXPECT_EQ(copy(lora.adam_m), copy(twin.lora().adam_m));
  EXPECT_EQ(copy(lora.adam_v), copy(twin.lora().adam_v));

  lora.param_data()[0] = std::numeric_limits<float>::quiet_NaN();
  for (int i = 1; i <= 2; ++i) EXPECT_TRUE(trainer.step({&b, 1}).skipped);
  try {
    trainer.step({&b, 1});
    FAIL() << "third consecutive skip must abort";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 consecutive steps"), std::string::npos) << e.what();
  }
}

TEST(Trainer, ClippingBoundsTheUpdate) {
  // AdamW divides by sqrt(v) + eps, so its first step is sign(g) * lr whatever the gradient's
  // scale, except where |g| is near eps. Clipping to a norm of 1e-6 over the ~4k nonzero gradients
  // (B's: A's are zero while B is) brings them to ~1.6e-8, comparable with eps = 1e-8: the update
  // then depends on the clipped gradient, and differs from the update of the unclipped one.
  const LlamaConfig cfg = tiny_config(64);
  LlamaModel model(init_random_weights(cfg, DType::F32, 1), lora_r8(), CheckpointPolicy::None, 32);
  TrainConfig tc = train_config(10, 1e-2f);
  tc.lr.warmup_steps = 0;
  tc.clip = 1e-6f;
  Trainer trainer(model, tc);
  const BatchData data = synthetic_batch(1, 32, cfg.vocab, 1);
  const Batch b = data.view();
  LoraState& lora = model.lora();
  const size_t n = size_t(lora.n_params);

  // The gradient the step will compute: the same deterministic pass, scaled by 1 / target tokens.
  int64_t targets = 0;
  for (int32_t t : data.targets) targets += t != kIgnoreIndex;
  lora.zero_grads();
  model.forward_backward(b, 1.0f / float(targets), 0);
  const std::vector<double> grad(lora.grad_data(), lora.grad_data() + n);
  const std::vector<double> before(lora.param_data(), lora.param_data() + n);
  const double norm = global_grad_norm(lora.backend(), lora.grad_data(), lora.n_params);
  ASSERT_GT(norm, 100 * tc.clip);

  // One AdamW step from zero moments, in double, on a given gradient.
  const auto adamw_from = [&](const std::vector<double>& g) {
    std::vector<double> p = before, m0(n), v0(n);
    AdamWParams ap;
    ap.lr = learning_rate(tc.lr, 0);
    ap.beta1 = tc.beta1;
    ap.beta2 = tc.beta2;
    ap.eps = tc.adam_eps;
    ap.weight_decay = tc.weight_decay;
    ap.step = 1;
    ref::adamw_update<double>(p.data(), g.data(), m0.data(), v0.data(), int64_t(n), ap);
    return p;
  };
  std::vector<double> clipped = grad;
  for (double& g : clipped) g *= double(tc.clip) / (norm + 1e-6);
  const std::vector<double> want = adamw_from(clipped), unclipped = adamw_from(grad);

  trainer.step({&b, 1});
  std::vector<double> got_step(n), want_step(n), unclipped_step(n);
  for (size_t i = 0; i < n; ++i) {
    got_step[i] = double(lora.param_data()[i]) - before[i];
    want_step[i] = want[i] - before[i];
    unclipped_step[i] = unclipped[i] - before[i];
  }
  // The parameters are ~0.2 and move by up to lr = 1e-2, so reading the step off f32 parameters
  // costs ~1e-6 of it (8e-7 measured); the step of the unclipped gradient is off by 200%.
  EXPECT_LT(rel_norm_error(got_step, want_step), 1e-4);
  EXPECT_GT(rel_norm_error(unclipped_step, want_step), 0.1);
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
