// defines: tests of Phi-3's fused LoRA modules (qkv_proj, gate_up_proj: one A and one B over
// several projections) against unfused adapters that share A, and against finite differences with
// dropout; their target checks; longrope's frequencies, attention factor and its switch to the long factors;
// Phi-3's config.json and what it refuses; checkpoints that store the modules and refuse another layout.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "op_test_util.h"
#include "src/core/error.h"
#include "src/io/hf_model.h"
#include "src/io/safetensors.h"
#include "src/model/llama.h"
#include "src/train/checkpoint.h"
#include "test_util.h"

using namespace tf;
using namespace tf::test;

namespace {

LlamaConfig fused(LlamaConfig c) {
  c.architecture = "phi3";
  c.fused_qkv = c.fused_gate_up = true;
  return c;
}

LoraConfig lora(float dropout = 0.0f, uint32_t targets = (1u << kLoraTargetCount) - 1) {
  LoraConfig l;
  l.rank = 4;
  l.alpha = 8;
  l.dropout = dropout;
  l.seed = 7;
  l.targets = targets;
  return l;
}

}  // namespace

TEST(Phi3Lora, FusedModuleIsOneAdapterOverItsProjections) {
  const LlamaConfig c = fused(tiny_config());
  const LoraState s(c, lora());
  const std::vector<LoraModule> modules = lora_modules(c);
  ASSERT_EQ(modules.size(), 4u);
  EXPECT_STREQ(modules[0].name, "qkv_proj");
  EXPECT_STREQ(modules[2].name, "gate_up_proj");
  // One A [r, hidden] and one B [q + 2 kv, r] for qkv_proj; [2 intermediate, r] for gate_up_proj.
  const int64_t r = 4, h = c.hidden, qkv = c.q_dim() + 2 * c.kv_dim(), i = c.intermediate;
  EXPECT_EQ(s.n_params, c.n_layers * r * ((h + qkv) + (c.q_dim() + h) + (h + 2 * i) + (i + h)));
  for (int l = 0; l < c.n_layers; ++l) {
    const LoraAdapter &q = s.at(l, LoraTarget::Q), &k = s.at(l, LoraTarget::K), &v = s.at(l, LoraTarget::V);
    EXPECT_EQ(k.A, q.A);
    EXPECT_EQ(v.dA, q.dA);
    EXPECT_EQ(k.B, q.B + int64_t(q.out) * r);
    EXPECT_EQ(v.dB, k.dB + int64_t(k.out) * r);
    EXPECT_EQ(s.module(l, modules[0]).out, qkv);
    EXPECT_EQ(s.at(l, LoraTarget::Up).B, s.at(l, LoraTarget::Gate).B + i * r);
    EXPECT_EQ(s.module(l, modules[2]).out, 2 * i);
  }
}

TEST(Phi3Lora, FusedModulesComputeWhatUnfusedAdaptersSharingASee) {
  // An adapter on qkv_proj is q, k and v adapters with one A and B's row ranges: loading those
  // into an unfused model must give the same logits and loss, the same dB, and dA the sum of the
  // three (two for gate_up). The forward runs the same f32 ops on the same values; the gradients
  // differ only in the order of dA's sums over the module's projections, so 1e-6 relative (10x
  // f32's spread over such sums) bounds every comparison.
  const LlamaConfig plain = tiny_config();
  const LlamaConfig fc = fused(plain);
  const BatchData data = synthetic_batch(2, 10, plain.vocab, 3, 1 << 30, 2);
  LlamaModel f(init_random_weights(fc, DType::F32, 5, 0.2f), lora(), CheckpointPolicy::PerBlock, 20);
  LlamaModel u(init_random_weights(plain, DType::F32, 5, 0.2f), lora(), CheckpointPolicy::None, 20);
  const auto r = random_floats(size_t(f.lora().n_params), 11, 0.1f);
  std::copy(r.begin(), r.end(), f.lora().param_data());
  for (int l = 0; l < plain.n_layers; ++l)
    for (int t = 0; t < kLoraTargetCount; ++t) {
      const LoraAdapter &a = f.lora().at(l, LoraTarget(t)), &b = u.lora().at(l, LoraTarget(t));
      std::copy_n(a.A, int64_t(a.rank) * a.in, b.A);
      std::copy_n(a.B, int64_t(a.rank) * a.out, b.B);
    }
  const Batch batch = data.view();
  const size_t n_logits = size_t(batch.n_tokens()) * size_t(plain.vocab);
  std::vector<float> lf(n_logits), lu(n_logits);
  f.forward_logits(batch, lf.data());
  u.forward_logits(batch, lu.data());
  EXPECT_LT(rel_norm_error(lf.data(), lu.data(), n_logits), 1e-6);
  f.lora().zero_grads();
  u.lora().zero_grads();
  const LossSum loss_f = f.forward_backward(batch, 1.0f / 16, 2),
                loss_u = u.forward_backward(batch, 1.0f / 16, 2);
  EXPECT_NEAR(loss_f.sum, loss_u.sum, 1e-6 * std::abs(loss_u.sum));
  for (int l = 0; l < plain.n_layers; ++l)
    for (const LoraModule& m : lora_modules(fc)) {
      const LoraAdapter& a = f.lora().at(l, m.first);
      std::vector<float> da(size_t(a.rank) * size_t(a.in), 0.0f);
      for (int i = 0; i < m.count; ++i) {
        const auto t = LoraTarget(int(m.first) + i);
        const LoraAdapter &fa = f.lora().at(l, t), &ua = u.lora().at(l, t);
        for (size_t j = 0; j < da.size(); ++j) da[j] += ua.dA[j];
        EXPECT_LT(rel_norm_error(fa.dB, ua.dB, size_t(fa.rank) * size_t(fa.out)), 1e-6)
            << m.name << " " << lora_target_name(t) << " layer " << l;
      }
      EXPECT_LT(rel_norm_error(a.dA, da.data(), da.size()), 1e-6) << m.name << " layer " << l;
    }
}

TEST(Phi3Lora, FusedGradientsMatchFiniteDifferencesWithDropout) {
  // One dropout mask per module: the loss is a fixed function of the parameters for a fixed step,
  // so the 4-point difference of tests/test_model.cpp (h = 3e-2, truncation O(h^4), f32 loss
  // rounding ~2e-4) checks each module's A and its whole B; the backward regenerating each
  // projection's own mask instead of the module's put qkv_proj and gate_up_proj 46% and 54% off.
  const LlamaConfig c = fused(tiny_config(32));
  const BatchData data = synthetic_batch(2, 12, c.vocab, 2, 6, 2);
  LlamaModel m(init_random_weights(c, DType::F32, 3, 0.3f), lora(0.2f), CheckpointPolicy::None, 24,
               cpu_backend(), offload::WeightTier::Resident, ModelLayout{.mlp_chunk = 8});
  const auto r = random_floats(size_t(m.lora().n_params), 4, 0.05f);
  float* p = m.lora().param_data();
  std::copy(r.begin(), r.end(), p);
  const Batch b = data.view(true);
  m.lora().zero_grads();
  m.forward_backward(b, 1.0f / 16.0f, 9);
  const std::vector<float> analytic(m.lora().grad_data(), m.lora().grad_data() + m.lora().n_params);
  const auto loss_at = [&](int64_t i, double v) {
    p[i] = float(v);
    m.lora().zero_grads();
    return m.forward_backward(b, 0.0f, 9).sum / 16.0;
  };
  for (const LoraModule& mod : lora_modules(c)) {
    std::vector<double> numeric, picked;
    for (int l = 0; l < c.n_layers; ++l) {
      const LoraAdapter a = m.lora().module(l, mod);
      const int64_t first = a.A - p, end = a.B - p + int64_t(a.out) * a.rank;
      for (int64_t i = first; i < end; i += 53) {
        const double saved = p[i], h = 3e-2;
        const double d1 = loss_at(i, saved + h) - loss_at(i, saved - h);
        const double d2 = loss_at(i, saved + 2 * h) - loss_at(i, saved - 2 * h);
        p[i] = float(saved);
        numeric.push_back((8 * d1 - d2) / (12 * h));
        picked.push_back(analytic[size_t(i)]);
      }
    }
    EXPECT_LT(rel_norm_error(picked, numeric), 3e-3) << mod.name;
  }
}

TEST(Phi3Lora, TargetsNameWholeModules) {
  const uint32_t qkv = 7u << int(LoraTarget::Q), gate_up = 3u << int(LoraTarget::Gate);
  EXPECT_EQ(parse_lora_targets("qkv_proj"), qkv);
  EXPECT_EQ(parse_lora_targets("gate_up_proj, o"), gate_up | (1u << int(LoraTarget::O)));
  EXPECT_EQ(parse_lora_targets("qkv,gate_up"), qkv | gate_up);
  const LlamaConfig c = fused(tiny_config());
  EXPECT_NO_THROW(check_lora_targets(c, parse_lora_targets("qkv_proj,down")));
  const std::string q = error_of([&] { LoraState s(c, lora(0.0f, parse_lora_targets("q,v"))); });
  EXPECT_NE(q.find("name q_proj, v_proj but not k_proj"), std::string::npos) << q;
  EXPECT_NE(q.find("target qkv_proj instead"), std::string::npos) << q;
  const std::string g = error_of([&] { LoraState::memory_plan(c, lora(0.0f, parse_lora_targets("gate"))); });
  EXPECT_NE(g.find("target gate_up_proj instead"), std::string::npos) << g;
  // An unfused model takes any subset.
  EXPECT_NO_THROW(check_lora_targets(tiny_config(), parse_lora_targets("q,gate")));
}

TEST(Phi3Rope, LongropeSwitchesToItsLongFactorsPastThePretrainingLength) {
  LlamaConfig c = fused(tiny_config());
  c.rope.scaling = RopeScalingType::LongRope;
  c.rope.freq_factors = {1.0f, 1.5f, 2.0f, 4.0f};
  c.rope.long_factors = {8.0f, 6.0f, 3.0f, 5.0f};
  c.rope.original_max_positions = 12;
  c.rope.factor = 4.0f;
  // transformers: inv_freq = 1 / (short_factor * theta^(2i/d)), cos and sin times
  // sqrt(1 + ln 4 / ln 12) = 1.2406.
  std::vector<float> inv(4);
  rope_inv_freq(c.rope, inv.data());
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(inv[size_t(i)], 1.0 / (c.rope.freq_factors[size_t(i)] * std::pow(10000.0, 2.0 * i / 8)),
                1e-6 * inv[size_t(i)]);
  EXPECT_NEAR(rope_attention_factor(c.rope), std::sqrt(1 + std::log(4.0) / std::log(12.0)), 1e-6);
  c.rope.attention_factor = 1.5f;
  EXPECT_EQ(rope_attention_factor(c.rope), 1.5f);

  // transformers picks one set per forward pass: the long factors, for every position, once the
  // largest position reaches original_max_positions. So a batch of 13 runs as a model whose short
  // factors are the long ones, bit for bit, and a batch of 12 as the model itself.
  LlamaConfig as_long = c;
  as_long.rope.freq_factors = c.rope.long_factors;
  as_long.rope.long_factors.clear();
  as_long.rope.original_max_positions = 64;  // the attention factor is set, so this changes only the limit
  LlamaWeights w_long = init_random_weights(c, DType::F32, 1);
  w_long.config = as_long;
  LlamaConfig short_only = c;
  short_only.rope.long_factors.clear();
  LlamaWeights w_short = init_random_weights(c, DType::F32, 1);
  w_short.config = short_only;
  LlamaModel m(init_random_weights(c, DType::F32, 1), lora(), CheckpointPolicy::None, 13);
  LlamaModel m_long(std::move(w_long), lora(), CheckpointPolicy::None, 13);
  LlamaModel m_short(std::move(w_short), lora(), CheckpointPolicy::None, 13);
  std::vector<int32_t> tokens(13), positions(13);
  for (int i = 0; i < 13; ++i) {
    tokens[size_t(i)] = 1 + (i * 7) % (c.vocab - 1);
    positions[size_t(i)] = i;
  }
  const auto logits_of = [&](LlamaModel& model, int n) {
    std::vector<float> out(size_t(n * c.vocab));
    model.forward_logits(Batch{1, n, tokens.data(), nullptr, positions.data(), nullptr}, out.data());
    return out;
  };
  EXPECT_EQ(logits_of(m, 12), logits_of(m_short, 12)) << "within the pretraining length: the short factors";
  const std::vector<float> past = logits_of(m, 13);
  EXPECT_EQ(past, logits_of(m_long, 13)) << "past it: the long factors at every position";
  const std::vector<float> short_13 = logits_of(m_short, 12);
  EXPECT_NE(std::vector<float>(past.begin() + c.vocab, past.begin() + 12 * c.vocab),
            std::vector<float>(short_13.begin() + c.vocab, short_13.end()))
      << "the earlier positions rotate with the long factors too";
  // A longrope model without long factors stops at the pretraining length.
  const std::string e = error_of([&] { logits_of(m_short, 13); });
  EXPECT_NE(e.find("position 12 is past the model's original_max_position_embeddings 12"), std::string::npos)
      << e;
  EXPECT_NE(e.find("the model has none"), std::string::npos) << e;
}

namespace {

// Phi-3-mini-128k's config.json fields, at a tiny size: head_dim 16, so 8 rope factors.
nlohmann::json phi3_json() {
  std::vector<double> short_f(8), long_f(8);
  for (int i = 0; i < 8; ++i) {
    short_f[size_t(i)] = 1.0 + 0.25 * i;
    long_f[size_t(i)] = 4.0 + i;
  }
  return {{"architectures", {"Phi3ForCausalLM"}},
          {"model_type", "phi3"},
          {"hidden_size", 64},
          {"intermediate_size", 96},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"vocab_size", 256},
          {"max_position_embeddings", 1024},
          {"original_max_position_embeddings", 64},
          {"sliding_window", 32},
          {"resid_pdrop", 0.0},
          {"embd_pdrop", 0.0},
          {"attention_dropout", 0.0},
          {"rope_scaling", {{"type", "longrope"}, {"short_factor", short_f}, {"long_factor", long_f}}}};
}

std::string config_error(const nlohmann::json& j) {
  return error_of([&] { io::llama_config_from_hf(j, "config.json"); });
}

}  // namespace

TEST(Phi3Config, ReadsFusedProjectionsLongropeAndTheWindow) {
  nlohmann::json j = phi3_json();
  LlamaConfig c = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(c.architecture, "phi3");
  EXPECT_TRUE(c.fused_qkv && c.fused_gate_up);
  EXPECT_EQ(c.rope_layout, RopeLayout::SplitHalf);  // neox rotation: no q/k permutation
  EXPECT_EQ(c.window(0), 32);
  EXPECT_EQ(c.window(1), 32);
  EXPECT_EQ(c.rope.scaling, RopeScalingType::LongRope);
  EXPECT_EQ(c.rope.original_max_positions, 64);
  EXPECT_EQ(c.rope.factor, 16.0f);  // max_position_embeddings / original_max_position_embeddings
  ASSERT_EQ(c.rope.freq_factors.size(), 8u);
  EXPECT_EQ(c.rope.freq_factors[3], 1.75f);
  EXPECT_EQ(c.rope.long_factors[7], 11.0f);
  EXPECT_NEAR(rope_attention_factor(c.rope), std::sqrt(1 + std::log(16.0) / std::log(64.0)), 1e-6);
  EXPECT_EQ(fused_rows(c, WeightSlot::V)->row0, c.q_dim() + c.kv_dim());
  EXPECT_EQ(fused_rows(c, WeightSlot::Up)->row0, c.intermediate);
  EXPECT_FALSE(fused_rows(c, WeightSlot::O).has_value());

  j["rope_scaling"]["attention_factor"] = 1.25;
  EXPECT_EQ(rope_attention_factor(io::llama_config_from_hf(j, "config.json").rope), 1.25f);
  j["model_type"] = "phi3";
  j.erase("architectures");
  j.erase("sliding_window");
  j.erase("rope_scaling");
  j["resid_pdrop"] = 0.1;
  c = io::llama_config_from_hf(j, "config.json");
  EXPECT_EQ(c.architecture, "phi3");
  EXPECT_EQ(c.window(0), 0);  // Phi3Config's sliding_window defaults to null
  EXPECT_EQ(c.rope.scaling, RopeScalingType::None);
  EXPECT_FLOAT_EQ(c.residual_dropout, 0.1f);
}

TEST(Phi3Config, RefusesWhatItCannotRun) {
  nlohmann::json j = phi3_json();
  j["partial_rotary_factor"] = 0.75;  // Phi-4-mini
  EXPECT_NE(config_error(j).find("partial_rotary_factor 0.75 is not supported"), std::string::npos);
  j = phi3_json();
  j["rope_scaling"]["short_factor"] = {1.0, 2.0};
  EXPECT_NE(config_error(j).find("short_factor must list 8 factors"), std::string::npos) << config_error(j);
  j = phi3_json();
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  EXPECT_NE(config_error(j).find("Phi3ForCausalLM rotates with default or longrope rope"), std::string::npos)
      << config_error(j);
  j = phi3_json();
  j["sliding_window"] = 0;
  EXPECT_NE(config_error(j).find("sliding_window must be positive or null"), std::string::npos);
}

TEST(Phi3Checkpoint, StoresTheModulesAndRefusesAnotherLayoutByName) {
  const LlamaConfig c = fused(tiny_config());
  LoraState saved(c, lora());
  uint64_t seed = 0;
  for (DeviceMem* b : {&saved.params, &saved.adam_m, &saved.adam_v}) {
    const auto r = random_floats(size_t(saved.n_params), ++seed, 1.0f);
    std::copy(r.begin(), r.end(), b->as<float>());
  }
  TempDir run;
  CheckpointMeta meta;
  meta.config_hash = "h";
  meta.data_cursor = "{}";
  const std::string dir = save_checkpoint(run.str(), saved, TrainerState{3, 3, 0, 0}, meta, 2);
  const io::SafetensorsFile f = io::SafetensorsFile::open(dir + "/lora.safetensors");
  ASSERT_NE(f.find("param.layers.1.qkv_proj.B"), nullptr);
  EXPECT_EQ(f.find("param.layers.1.qkv_proj.B")->shape,
            (std::vector<int64_t>{c.q_dim() + 2 * c.kv_dim(), 4}));
  EXPECT_NE(f.find("adam_v.layers.0.gate_up_proj.A"), nullptr);
  EXPECT_EQ(f.find("param.layers.0.q_proj.A"), nullptr);
  LoraState loaded(c, lora());
  load_checkpoint(dir, "h", "", loaded);
  for (const DeviceMem* m : {&loaded.params, &loaded.adam_m, &loaded.adam_v}) {
    const DeviceMem& want = m == &loaded.params   ? saved.params
                            : m == &loaded.adam_m ? saved.adam_m
                                                  : saved.adam_v;
    EXPECT_EQ(std::memcmp(m->data(), want.data(), want.bytes()), 0);
  }
  // The same projections unfused: another layout, refused by what each adapts.
  LoraState plain(tiny_config(), lora());
  const std::string e = error_of([&] { load_checkpoint(dir, "h", "", plain); });
  EXPECT_NE(e.find("the checkpoint adapts [\"qkv_proj\",\"o_proj\",\"gate_up_proj\",\"down_proj\"]"),
            std::string::npos)
      << e;
}
