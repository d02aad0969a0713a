// The whole model on each device backend against the cpu backend: a tiny model trained 20 steps
// (losses and LoRA weights), logits, KV-cache decoding, quantized bases (NF4 with double
// quantization, Q8_0 and Q4_1, tied embeddings) trained a few steps, and a base dtype or shape the
// device cannot run refused before anything runs. "simt" (the CUDA backend on the simulator) runs everywhere;
// "cuda" runs where a GPU is present and otherwise says why it skips.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "model_test_util.h"
#include "op_test_util.h"
#include "src/core/error.h"
#include "src/io/quantize_weights.h"
#include "src/train/trainer.h"
#include "tests/backend_test_util.h"

namespace tf {
namespace {

using test::BatchData;
using test::synthetic_batch;
using test::tiny_config;

// bf16 unit roundoff: the device rounds every GEMM's f32 activations to bf16 (8 significant bits).
constexpr double kUBf16 = 1.0 / 256;

class BackendModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    device_ = test::open_backend(GetParam(), &why);
    if (!device_) GTEST_SKIP() << why;
  }
  std::unique_ptr<Backend> device_;
};

TrainConfig train_config(int steps) {
  TrainConfig t;
  t.lr.peak_lr = 1e-2f;
  t.lr.total_steps = steps;
  t.lr.warmup_steps = 2;
  t.weight_decay = 0.01f;
  return t;
}

LoraConfig lora_with_dropout() {
  LoraConfig l = test::lora_r8();
  l.dropout = 0.1f;
  return l;
}

// The weights are stored in bf16 on both sides (init in bf16), so the backends differ only in the
// device's bf16 rounding of GEMM inputs and in summation order.
TEST_P(BackendModel, TrainingTwentyStepsFollowsTheCpu) {
  const LlamaConfig cfg = tiny_config(64);
  constexpr int kSteps = 20;
  LlamaModel cpu(init_random_weights(cfg, DType::BF16, 42, 0.25f), lora_with_dropout(),
                 CheckpointPolicy::PerBlock, 2 * 24);
  LlamaModel dev(init_random_weights(cfg, DType::BF16, 42, 0.25f), lora_with_dropout(),
                 CheckpointPolicy::PerBlock, 2 * 24, *device_);
  Trainer tc(cpu, train_config(kSteps)), td(dev, train_config(kSteps));
  std::vector<double> lc, ld;
  for (int s = 0; s < kSteps; ++s) {
    const BatchData data = synthetic_batch(2, 24, cfg.vocab, uint64_t(s), 12, 3);
    const Batch b = data.view(true);
    const StepStats a = tc.step({&b, 1}), d = td.step({&b, 1});
    ASSERT_FALSE(a.skipped || d.skipped) << "step " << s;
    lc.push_back(a.loss);
    ld.push_back(d.loss);
  }
  // Step 0 runs the same weights: each logit is a chain of 2 * n_layers + 1 matrix products on the
  // residual stream, each rounding its input once to bf16 (relative kUBf16), and cross-entropy moves
  // by at most 2 max|d logit|; |logit| stays below ~8 here (std 0.25 through a final norm). The
  // bound 2 * 5 * kUBf16 * 8 ~ 0.31 absolute is loose but a wrong op gives O(1).
  const double first_bound = 2.0 * (2 * cfg.n_layers + 1) * kUBf16 * 8.0;
  EXPECT_NEAR(ld[0], lc[0], first_bound);
  // Later steps also differ through the updates, which AdamW normalises to ~lr per parameter; the
  // curves must stay within the same bound and both must learn (a broken backward stays flat).
  for (int s = 1; s < kSteps; ++s) EXPECT_NEAR(ld[size_t(s)], lc[size_t(s)], first_bound) << "step " << s;
  EXPECT_LT(ld.back(), ld.front() - 0.5);
  EXPECT_LT(lc.back(), lc.front() - 0.5);

  // The adapters: AdamW moves each parameter by at most lr per step, so two runs whose gradients
  // agree in sign drift apart by far less than 20 * lr; relative L2 distance of the whole vector.
  const LoraState hc = cpu.lora().host_copy(), hd = dev.lora().host_copy();
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < hc.n_params; ++i) {
    const double a = hc.params.as<float>()[i], d = hd.params.as<float>()[i];
    ASSERT_TRUE(std::isfinite(d)) << "parameter " << i;
    diff += (a - d) * (a - d);
    norm += a * a;
  }
  EXPECT_LT(std::sqrt(diff / norm), 0.05);
}

TEST_P(BackendModel, LogitsAndDecodingFollowTheCpu) {
  const LlamaConfig cfg = tiny_config(50);
  LlamaModel cpu(init_random_weights(cfg, DType::BF16, 7, 0.2f), test::lora_r8(), CheckpointPolicy::None, 32);
  LlamaModel dev(init_random_weights(cfg, DType::BF16, 7, 0.2f), test::lora_r8(), CheckpointPolicy::None, 32,
                 *device_);
  test::fill_lora_params(cpu.lora(), 3, 1, 0.05f);
  dev.lora().copy_from(cpu.lora());
  const BatchData data = synthetic_batch(2, 13, cfg.vocab, 5, 7);
  std::vector<float> a(size_t(26 * cfg.vocab)), d(a.size());
  cpu.forward_logits(data.view(true), a.data());
  dev.forward_logits(data.view(true), d.data());
  // As in training, step 0: 2 * n_layers + 1 roundings of a product's input to bf16; the logits
  // themselves are bounded by ~|h| |w| ~ 4 here.
  const double bound = (2 * cfg.n_layers + 1) * kUBf16 * 4.0;
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(d[i], a[i], bound) << "logit " << i;

  // Decoding through the KV cache: the prompt in two pieces, then one token at a time.
  KvCache kc = cpu.make_kv_cache(16), kd = dev.make_kv_cache(16);
  const std::vector<int32_t> prompt = {3, 9, 27, 31, 1, 44, 12};
  std::vector<float> la(size_t(cfg.vocab)), lb(la.size());
  for (const auto& [start, n] : {std::pair{0, 4}, std::pair{4, 3}}) {
    cpu.decode(kc, prompt.data() + start, n, la.data());
    dev.decode(kd, prompt.data() + start, n, lb.data());
  }
  for (int32_t t : {5, 17, 40}) {
    cpu.decode(kc, &t, 1, la.data());
    dev.decode(kd, &t, 1, lb.data());
    for (size_t i = 0; i < la.size(); ++i)
      ASSERT_NEAR(lb[i], la[i], bound) << "token " << t << " logit " << i;
  }
}

// Qwen3's and Gemma 3's blocks (q/k norms per head; output norms, GeGLU, the embedding and score
// scales, a rope base of the sliding layers' own and their window) run the device's ops as the
// cpu's: the norms add no product, so the logits keep the bound above, taken relative to their
// largest (2 n_layers + 1 roundings to bf16, twice that for the norms' own f32 rounding), and the
// gradients of one step stay within the same relative distance of the cpu's, which a wrong op or
// table (O(1) in the logits) exceeds.
TEST_P(BackendModel, Qwen3AndGemma3BlocksFollowTheCpu) {
  for (const bool gemma : {false, true}) {
    SCOPED_TRACE(gemma ? "gemma3" : "qwen3");
    LlamaConfig cfg = tiny_config(50);
    cfg.qk_norm = true;
    if (gemma) {
      cfg.sandwich_norms = true;
      cfg.activation = MlpActivation::GeluTanh;
      cfg.embed_scale = std::sqrt(float(cfg.hidden));
      cfg.query_pre_attn_scalar = 2.0f * float(cfg.head_dim);
      cfg.sliding_window = 4;
      cfg.sliding_layers.assign(size_t(cfg.n_layers), true);
      cfg.sliding_layers.back() = false;
      cfg.rope_local = cfg.rope;
      cfg.rope_local.theta = 100.0f;
    }
    LlamaModel cpu(init_random_weights(cfg, DType::BF16, 7, 0.2f), test::lora_r8(), CheckpointPolicy::None,
                   32);
    LlamaModel dev(init_random_weights(cfg, DType::BF16, 7, 0.2f), test::lora_r8(), CheckpointPolicy::None,
                   32, *device_);
    test::fill_lora_params(cpu.lora(), 3, 1, 0.05f);
    dev.lora().copy_from(cpu.lora());
    const BatchData data = synthetic_batch(2, 13, cfg.vocab, 5, 7);
    std::vector<float> a(size_t(26 * cfg.vocab)), d(a.size());
    cpu.forward_logits(data.view(true), a.data());
    dev.forward_logits(data.view(true), d.data());
    double largest = 0;
    for (float x : a) largest = std::max(largest, double(std::abs(x)));
    const double rel = 2 * (2 * cfg.n_layers + 1) * kUBf16;
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(d[i], a[i], rel * largest) << "logit " << i;

    cpu.lora().zero_grads();
    dev.lora().zero_grads();
    const LossSum lc = cpu.forward_backward(data.view(true), 0.1f, 0);
    const LossSum ld = dev.forward_backward(data.view(true), 0.1f, 0);
    EXPECT_NEAR(ld.mean(), lc.mean(), 2 * rel * largest);
    const std::vector<float> gc(cpu.lora().grad_data(), cpu.lora().grad_data() + cpu.lora().n_params);
    const std::vector<float> gd =
        dev.backend().download_n(dev.lora().grad_data(), size_t(dev.lora().n_params));
    EXPECT_LT(test::rel_norm_error(gd.data(), gc.data(), gc.size()), 4 * rel);
  }
}

// A model whose head dimension the flash kernels take (64) trains and decodes on the device's
// default attention (flash, bf16 tensor cores) as on its plain f32 kernel: the two runs share every
// other op, so they differ only by attention's bf16 rounding of q, k, v and P. With weights of std
// 0.1 the scores stay within a few units, so each layer's attention output moves by a few u_b
// relative (q, k, v and P rounded once each), and the logits by at most n_layers of those through
// the residual stream: 4 n_layers kUBf16 max |logit| (~0.13 here), which a wrong mask or head
// (O(1) in the logits) exceeds.
TEST_P(BackendModel, FlashAttentionTrainsAndDecodesLikeThePlainKernel) {
  LlamaConfig cfg = tiny_config(64);
  cfg.hidden = 128;
  cfg.intermediate = 128;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 64;
  cfg.rope.head_dim = 64;
  std::string why;
  const std::unique_ptr<Backend> plain = test::open_backend(GetParam(), &why, AttentionKernel::Plain);
  ASSERT_EQ(device_->attention_kernel(cfg.head_dim), "flash");
  ASSERT_EQ(plain->attention_kernel(cfg.head_dim), "plain");
  constexpr int kSteps = 8;
  LlamaModel fm(init_random_weights(cfg, DType::BF16, 11, 0.1f), test::lora_r8(), CheckpointPolicy::PerBlock,
                2 * 24, *device_);
  LlamaModel pm(init_random_weights(cfg, DType::BF16, 11, 0.1f), test::lora_r8(), CheckpointPolicy::PerBlock,
                2 * 24, *plain);
  const BatchData packed = synthetic_batch(2, 24, cfg.vocab, 3, 12, 3);
  std::vector<float> flash_logits(size_t(48 * cfg.vocab)), plain_logits(flash_logits.size());
  fm.forward_logits(packed.view(true), flash_logits.data());
  pm.forward_logits(packed.view(true), plain_logits.data());
  double largest = 0;
  for (const float x : plain_logits) largest = std::max(largest, std::abs(double(x)));
  const double bound = 4.0 * cfg.n_layers * kUBf16 * largest;
  for (size_t i = 0; i < flash_logits.size(); ++i)
    ASSERT_NEAR(flash_logits[i], plain_logits[i], bound) << "logit " << i << ", packed documents";
  // Decoding through the KV cache before training (the adapters are still equal).
  KvCache kf = fm.make_kv_cache(16), kp = pm.make_kv_cache(16);
  std::vector<float> la(size_t(cfg.vocab)), lb(la.size());
  const std::vector<int32_t> prompt = {3, 9, 27, 31, 1};
  fm.decode(kf, prompt.data(), int(prompt.size()), la.data());
  pm.decode(kp, prompt.data(), int(prompt.size()), lb.data());
  for (int32_t t : {5, 17, 40}) {
    fm.decode(kf, &t, 1, la.data());
    pm.decode(kp, &t, 1, lb.data());
    for (size_t i = 0; i < la.size(); ++i)
      ASSERT_NEAR(la[i], lb[i], bound) << "token " << t << " logit " << i;
  }
  Trainer tf(fm, train_config(kSteps)), tp(pm, train_config(kSteps));
  for (int s = 0; s < kSteps; ++s) {
    const BatchData data = synthetic_batch(2, 24, cfg.vocab, uint64_t(s), 12, 3);
    const Batch b = data.view(true);
    const StepStats f = tf.step({&b, 1}), p = tp.step({&b, 1});
    ASSERT_FALSE(f.skipped || p.skipped) << "step " << s;
    // The loss moves by at most twice the largest logit difference.
    EXPECT_NEAR(f.loss, p.loss, 2 * bound) << "step " << s;
  }
}

// A tied model whose matrices are stored as `dtype`: NF4 through finetune's --quant nf4 (double
// quantized absmax), a ggml type through ggml's reference quantizer, the bytes kept in `keep`.
LlamaWeights quantized_base(const LlamaConfig& c, DType dtype, std::vector<std::vector<uint8_t>>& keep) {
  LlamaWeights w = init_random_weights(c, DType::F32, 42, 0.25f);
  LlamaWeights::for_each_slot(c, [&](WeightSlot slot, int layer) {
    if (!io::is_matrix_slot(slot) || (slot == WeightSlot::LmHead && c.tie_embeddings)) return;
    WeightRef& ref = w.slot(slot, layer);
    if (dtype == DType::NF4) {
      ref = io::store_weight(ref, io::QuantMode::Nf4, w, hf_weight_name(slot, layer));
      return;
    }
    const int64_t n = ref.rows * ref.cols;
    keep.emplace_back(size_t(dtype_bytes(dtype, n)));
    ref::quantize_rows_ggml(*ggml_of_dtype(dtype), static_cast<const float*>(ref.data), n,
                            keep.back().data());
    ref = WeightRef(keep.back().data(), dtype, ref.rows, ref.cols);
  });
  if (c.tie_embeddings) w.lm_head = w.embed;
  return w;
}

// The device computes with the quantized blocks as stored, each dequantized value then rounded to
// bf16 for the GEMM, and the cpu with the exact dequantized value: each of the 2 * n_layers + 1
// products on the residual stream rounds its input and its weight once (2 kUBf16), so the first
// bound of TrainingTwentyStepsFollowsTheCpu doubles: 2 * 5 * 2 kUBf16 * 8 ~ 0.63 absolute, loose
// but a misdecoded block gives O(1). Both runs must learn over the five steps.
TEST_P(BackendModel, QuantizedBasesTrainLikeTheCpu) {
  LlamaConfig cfg = tiny_config(64);
  cfg.tie_embeddings = true;
  constexpr int kSteps = 5;
  for (DType dtype : {DType::NF4, DType::Q8_0, DType::Q4_1}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    std::vector<std::vector<uint8_t>> kc, kd;
    LlamaModel cpu(quantized_base(cfg, dtype, kc), test::lora_r8(), CheckpointPolicy::PerBlock, 2 * 24);
    LlamaModel dev(quantized_base(cfg, dtype, kd), test::lora_r8(), CheckpointPolicy::PerBlock, 2 * 24,
                   *device_);
    ASSERT_EQ(dev.weights().embed.dtype, dtype);
    Trainer tc(cpu, train_config(kSteps)), td(dev, train_config(kSteps));
    const double bound = 2.0 * (2 * cfg.n_layers + 1) * 2 * kUBf16 * 8.0;
    std::vector<double> lc, ld;
    for (int s = 0; s < kSteps; ++s) {
      const BatchData data = synthetic_batch(2, 24, cfg.vocab, uint64_t(s), 12, 3);
      const Batch b = data.view(true);
      const StepStats a = tc.step({&b, 1}), d = td.step({&b, 1});
      ASSERT_FALSE(a.skipped || d.skipped) << "step " << s;
      EXPECT_NEAR(d.loss, a.loss, bound) << "step " << s;
      lc.push_back(a.loss);
      ld.push_back(d.loss);
    }
    EXPECT_LT(ld.back(), ld.front());
    EXPECT_LT(lc.back(), lc.front());
  }
}

TEST_P(BackendModel, RefusesABaseDtypeOrShapeItCannotRunBeforeAnyStep) {
  const LlamaConfig cfg = tiny_config(64);
  LlamaWeights w = init_random_weights(cfg, DType::BF16, 1);
  ASSERT_FALSE(device_->supports_weight(DType::I32));
  std::vector<int32_t> ints(size_t(cfg.hidden) * size_t(cfg.q_dim()));
  w.blocks[1].q = WeightRef(ints.data(), DType::I32, cfg.q_dim(), cfg.hidden);
  const size_t before = device_->tracker().current_total();
  try {
    LlamaModel m(std::move(w), test::lora_r8(), CheckpointPolicy::None, 16, *device_);
    FAIL() << "an i32 weight was accepted by " << device_->name();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("does not run i32 base weights (tensor model.layers.1.self_attn.q_proj.weight)"),
              std::string::npos)
        << msg;
  }
  EXPECT_EQ(device_->tracker().current_total(), before) << "memory left behind by the refused model";

  // NF4 / INT8 scale blocks run over the flattened tensor; the device decodes rows of whole groups of 8.
  std::vector<uint8_t> codes(4 * 60 / 2);
  std::vector<float> absmax(4);
  QuantScales scales;
  scales.absmax = absmax.data();
  std::vector<DeviceMem> storage;
  try {
    device_->place_weight(WeightRef(codes.data(), DType::NF4, 4, 60, scales), "blk.0.attn_q.weight", storage);
    FAIL() << "an nf4 weight of 60 columns was accepted by " << device_->name();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("backend runs nf4 weights whose rows are a multiple of 8 elements; tensor "
                       "blk.0.attn_q.weight is 4 x 60"),
              std::string::npos)
        << msg;
  }
  EXPECT_TRUE(storage.empty());
  EXPECT_EQ(device_->tracker().current_total(), before);
}

INSTANTIATE_TEST_SUITE_P(Devices, BackendModel, ::testing::Values("simt", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

}  // namespace
}  // namespace tf
