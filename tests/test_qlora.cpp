// Tests: QLoRA end to end. LoRA trained on NF4 (and INT8) base weights computes exactly what the
// same run computes on the dequantized weights in f32, and follows the loss curve of the run on the
// original f32 weights within a bound derived from the logit error of the quantized base.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "model_test_util.h"
#include "src/io/quantize_weights.h"
#include "src/train/trainer.h"

using namespace tf;
using namespace tf::test;

namespace {

constexpr int kSteps = 40;
constexpr int kBatch = 4, kSeq = 32;

LlamaConfig qlora_config() {
  LlamaConfig c = tiny_config(64);
  // Tied, so that the quantized embedding is both looked up and used as the lm_head.
  c.tie_embeddings = true;
  return c;
}

LlamaWeights f32_base(const LlamaConfig& c) {
  // std 0.25: the frozen head can express the learnable rule (see test_train.cpp).
  return init_random_weights(c, DType::F32, 42, 0.25f);
}

// The f32 base with every matrix stored as `mode` makes it (norms stay f32).
LlamaWeights quantized_base(const LlamaConfig& c, io::QuantMode mode) {
  LlamaWeights w = f32_base(c);
  LlamaWeights::for_each_slot(c, [&](WeightSlot slot, int layer) {
    if (!io::is_matrix_slot(slot)) return;
    WeightRef& ref = w.slot(slot, layer);
    ref = io::store_weight(ref, mode, w, hf_weight_name(slot, layer));
  });
  if (c.tie_embeddings) w.lm_head = w.embed;
  return w;
}

// The quantized base's matrices dequantized to f32: the values the quantized model computes with.
LlamaWeights dequantized_base(const LlamaConfig& c, io::QuantMode mode) {
  LlamaWeights q = quantized_base(c, mode);
  LlamaWeights::for_each_slot(c, [&](WeightSlot slot, int layer) {
    WeightRef& ref = q.slot(slot, layer);
    if (!is_quantized(ref.dtype)) return;
    Tensor t(DType::F32, {ref.rows, ref.cols}, MemTag::Weights, hf_weight_name(slot, layer));
    ref::dequantize_weight_tile(t.as<float>(), ref.cols, ref, 0, ref.rows, 0, ref.cols);
    ref = WeightRef(t.view.data, DType::F32, ref.rows, ref.cols);
    q.owned.push_back(std::move(t));
  });
  if (c.tie_embeddings) q.lm_head = q.embed;
  return q;
}

TrainConfig train_config() {
  TrainConfig t;
  t.lr.peak_lr = 1e-2f;
  t.lr.total_steps = kSteps;
  t.lr.warmup_steps = 5;
  return t;
}

std::unique_ptr<LlamaModel> make_model(LlamaWeights w) {
  return std::make_unique<LlamaModel>(std::move(w), lora_r8(), CheckpointPolicy::PerBlock, kBatch * kSeq);
}

// Step s trains on batch s; returns each step's loss. `after_step` sees the model after each step.
template <typename Fn>
std::vector<double> train(LlamaModel& model, Fn&& after_step) {
  Trainer trainer(model, train_config());
  std::vector<double> losses;
  for (int s = 0; s < kSteps; ++s) {
    const BatchData data = synthetic_batch(kBatch, kSeq, model.config().vocab, uint64_t(s), 16);
    const Batch b = data.view(true);
    const StepStats st = trainer.step({&b, 1});
    EXPECT_FALSE(st.skipped);
    losses.push_back(st.loss);
    after_step(model, s);
  }
  return losses;
}
std::vector<double> train(LlamaModel& model) {
  return train(model, [](LlamaModel&, int) {});
}

void copy_adapter(LlamaModel& from, LlamaModel& to) {
  ASSERT_EQ(from.lora().n_params, to.lora().n_params);
  std::memcpy(to.lora().param_data(), from.lora().param_data(), size_t(from.lora().n_params) * sizeof(float));
}

// The mean over the batch's target tokens of max_j |logit_j on a - logit_j on b|.
double mean_max_logit_gap(LlamaModel& a, LlamaModel& b, const Batch& batch) {
  const int64_t vocab = a.config().vocab;
  const size_t n = size_t(batch.n_tokens() * vocab);
  std::vector<float> la(n), lb(n);
  a.forward_logits(batch, la.data());
  b.forward_logits(batch, lb.data());
  double sum = 0;
  int64_t count = 0;
  for (int64_t t = 0; t < batch.n_tokens(); ++t) {
    if (batch.targets[t] == kIgnoreIndex) continue;
    double gap = 0;
    for (int64_t j = 0; j < vocab; ++j)
      gap = std::max(gap, double(std::fabs(la[size_t(t * vocab + j)] - lb[size_t(t * vocab + j)])));
    sum += gap;
    ++count;
  }
  return sum / double(count);
}

class QLora : public ::testing::TestWithParam<io::QuantMode> {};

}  // namespace

// The quantized run and the f32 run on the dequantized weights multiply the same values: only the
// order of f32 sums differs (tiles of rows through sgemm against one sgemm), a relative 1e-6 per
// product that a 40-step run does not amplify past 1e-4 on a loss of order 1.
TEST_P(QLora, TrainsExactlyAsOnItsDequantizedWeights) {
  const LlamaConfig c = qlora_config();
  auto quant = make_model(quantized_base(c, GetParam()));
  ASSERT_EQ(quant->weights().embed.dtype, GetParam() == io::QuantMode::Nf4 ? DType::NF4 : DType::INT8);
  auto deq = make_model(dequantized_base(c, GetParam()));
  const std::vector<double> lq = train(*quant);
  const std::vector<double> ld = train(*deq);
  for (int s = 0; s < kSteps; ++s)
    EXPECT_NEAR(lq[size_t(s)], ld[size_t(s)], 1e-4 * ld[size_t(s)]) << "step " << s;
}

// Cross-entropy is lse(z) - z_target; its gradient in z is softmax - onehot, of L1 norm at most 2,
// so one token's loss moves by at most 2 max_j |dz_j| (mean value theorem), and the mean loss by
// at most 2 G, G the mean over tokens of max_j |dz_j|. So for a FIXED adapter, |loss on the
// quantized base - loss on the f32 base| <= 2 G: checked at every step's adapter of the quantized
// run, and at step 0, where both runs have the same (initial) adapter. After that the two runs
// follow different adapters; training on the quantized base must not amplify its error, so their
// curves must stay within 2 G_max, G_max the largest G seen along the run.
TEST_P(QLora, FollowsTheF32LossCurveWithinTheLogitErrorBound) {
  const LlamaConfig c = qlora_config();
  auto quant = make_model(quantized_base(c, GetParam()));
  auto f32_at_quant_adapter = make_model(f32_base(c));
  const BatchData probe = synthetic_batch(kBatch, kSeq, c.vocab, 1000, 16);
  double g_max = 0;
  const std::vector<double> lq = train(*quant, [&](LlamaModel& m, int s) {
    copy_adapter(m, *f32_at_quant_adapter);
    const Batch b = probe.view(true);
    const double gap = mean_max_logit_gap(m, *f32_at_quant_adapter, b);
    const double dl = std::fabs(m.forward_loss(b).mean() - f32_at_quant_adapter->forward_loss(b).mean());
    EXPECT_LE(dl, 2 * gap + 1e-5) << "step " << s;
    EXPECT_GT(gap, 0.0) << "the quantized base must differ from the f32 one";
    g_max = std::max(g_max, gap);
  });
  auto f32 = make_model(f32_base(c));
  const std::vector<double> lf = train(*f32);
  for (int s = 0; s < kSteps; ++s)
    EXPECT_LE(std::fabs(lq[size_t(s)] - lf[size_t(s)]), 2 * g_max) << "step " << s;
  auto f32_at_start = make_model(f32_base(c));
  auto quant_at_start = make_model(quantized_base(c, GetParam()));
  const BatchData first = synthetic_batch(kBatch, kSeq, c.vocab, 0, 16);
  EXPECT_LE(std::fabs(lq[0] - lf[0]),
            2 * mean_max_logit_gap(*quant_at_start, *f32_at_start, first.view(true)) + 1e-5);
  // Both learn the rule: a bound on the gap says nothing if neither run moves.
  EXPECT_LT(lq.back(), lq.front() / 2);
  EXPECT_LT(lf.back(), lf.front() / 2);
  std::printf("%s: G_max %.4f, first loss %.4f vs %.4f, last %.4f vs %.4f\n",
              std::string(io::quant_mode_name(GetParam())).c_str(), g_max, lq.front(), lf.front(), lq.back(),
              lf.back());
}

INSTANTIATE_TEST_SUITE_P(Modes, QLora, ::testing::Values(io::QuantMode::Nf4, io::QuantMode::Int8),
                         [](const ::testing::TestParamInfo<io::QuantMode>& p) {
                           return std::string(io::quant_mode_name(p.param));
                         });
