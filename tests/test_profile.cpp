// defines: tests of the per-op profile (kernels/profile.h): a profiled backend counts each op's calls
// under the role its caller names, with the work of their shapes, and stops when detached; the
// profile of a training step lists exactly the ops the model calls, as many times as its config and
// checkpointing make it call them, with times >= 0 and shares that sum to 1; the simulated device
// is profiled the same way
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "kernels/profile.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"
#include "tests/model_test_util.h"

namespace tf {
namespace {

using Counts = std::map<std::pair<std::string, std::string>, int64_t>;

Counts counts_of(const OpProfile& p) {
  Counts c;
  for (const OpStats& s : p.entries()) c[{op_name(s.op), s.role}] = s.calls;
  return c;
}

const OpStats& find(const std::vector<OpStats>& entries, const std::string& op, const std::string& role) {
  for (const OpStats& s : entries)
    if (op_name(s.op) == op && s.role == role) return s;
  ADD_FAILURE() << op << " [" << role << "] is not in the profile";
  static const OpStats none;
  return none;
}

std::vector<float> values(size_t n, float v) {
  return std::vector<float>(n, v);
}

TEST(OpProfile, CountsEachCallUnderItsRoleWithTheWorkOfItsShape) {
  std::unique_ptr<Backend> be = make_backend("cpu");
  const int64_t M = 5, N = 7, K = 3;
  std::vector<float> a = values(M * K, 1.0f), b = values(K * N, 2.0f), c = values(M * N, 0.0f),
                     w = values(N * K, 0.5f), y = values(M * N, 0.0f);
  const MatOperand A{a.data(), DType::F32, K, false}, B{b.data(), DType::F32, N, false};
  const WeightRef W(w.data(), DType::F32, N, K);

  be->matmul(c.data(), N, A, B, M, N, K, 1.0f, 0.0f);  // before the profile: not counted
  OpProfile p;
  be->set_profile(&p);
  be->matmul(c.data(), N, A, B, M, N, K, 1.0f, 0.0f);
  {
    const OpRole outer(*be, "q_proj");
    be->linear_forward(y.data(), a.data(), W, M, 0.0f);
    {
      const OpRole inner(*be, "q_proj lora");
      be->matmul(c.data(), N, A, B, M, N, K, 1.0f, 1.0f);
    }
    be->linear_forward(y.data(), a.data(), W, M, 0.0f);
  }
  be->fill(c.data(), 0.0f, M * N);
  be->set_profile(nullptr);
  be->fill(c.data(), 0.0f, M * N);  // after: not counted
  EXPECT_EQ(c[0], 0.0f);

  const Counts want = {{{"matmul", ""}, 1},
                       {{"matmul", "q_proj lora"}, 1},
                       {{"linear_forward", "q_proj"}, 2},
                       {{"fill", ""}, 1}};
  EXPECT_EQ(counts_of(p), want);
  const std::vector<OpStats> e = p.entries();
  // Two FLOPs per multiply-add; fill moves its floats once.
  EXPECT_EQ(find(e, "matmul", "").work.flops, 2.0 * M * N * K);
  EXPECT_EQ(find(e, "linear_forward", "q_proj").work.flops, 2 * 2.0 * M * N * K);
  EXPECT_TRUE(find(e, "linear_forward", "q_proj").flop_rate());
  EXPECT_EQ(find(e, "fill", "").work.flops, 0);
  EXPECT_EQ(find(e, "fill", "").work.bytes, 4.0 * M * N);
  EXPECT_FALSE(find(e, "fill", "").flop_rate());
  for (size_t i = 0; i < e.size(); ++i) {
    EXPECT_GE(e[i].seconds, 0) << op_name(e[i].op);
    if (i > 0) {
      EXPECT_GE(e[i - 1].seconds, e[i].seconds) << "entries are the longest first";
    }
  }

  const std::string table = p.table();
  for (const char* text : {"matmul", "q_proj lora", "linear_forward", "GFLOP/s", "GB/s", "fill"})
    EXPECT_NE(table.find(text), std::string::npos) << text << "\n" << table;
}

// Builds the tiny model, runs one optimizer step with a profile attached and returns the profile.
OpProfile profile_one_step(CheckpointPolicy policy, float dropout, Backend& be) {
  const LlamaConfig cfg = test::tiny_config();
  LoraConfig lora = test::lora_r8();
  lora.dropout = dropout;
  const test::BatchData data = test::synthetic_batch(2, 12, cfg.vocab, 4);
  LlamaModel model(init_random_weights(cfg, DType::F32, 3), lora, policy, 24, be);
  TrainConfig tc;
  tc.clip = 0;  // a clip scales the gradients only when their norm is over it
  Trainer trainer(model, tc);
  const Batch b = data.view();
  OpProfile p;
  be.set_profile(&p);
  trainer.step({&b, 1});
  be.set_profile(nullptr);
  p.add_step(1.0);
  return p;
}

// What one step of the model calls: each block's forward `f` times (twice when it is recomputed
// from its kept input), its backward once, per layer; the embedding, final norm, loss and optimizer
// once a step.
Counts expected_step(int layers, int f, bool dropout) {
  const int64_t L = layers;
  Counts c = {{{"embedding_forward", ""}, 1},
              {{"rmsnorm_forward", ""}, 2 * f * L + 1},
              {{"rope_forward", ""}, 2 * f * L},
              {{"attention_forward", ""}, f * L},
              {{"add_inplace", ""}, 2 * f * L},
              {{"swiglu_forward", ""}, f * L},
              {{"lm_head_cross_entropy", ""}, 1},
              {{"rmsnorm_backward", ""}, 2 * L + 1},
              {{"rope_backward", ""}, 2 * L},
              {{"attention_backward", ""}, L},
              {{"swiglu_backward", ""}, L},
              // the gradients of gate, up, q, k, v per block; the final norm's, the residual's and the
              // LoRA gradients once
              {{"fill", ""}, 5 * L + 3},
              {{"sum_squares", ""}, 1},
              {{"adamw_update", ""}, 1}};
  for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}) {
    const std::string lora = std::string(proj) + " lora";
    c[{"linear_forward", proj}] = f * L;
    c[{"linear_backward_input", proj}] = L;
    // x A^T and t B^T forward; dB, dt, dA and dx backward
    c[{"matmul", lora}] = (2 * f + 4) * L;
    if (dropout) {
      // the input's mask forward; backward the gradient's and the input's from one draw of it
      c[{"dropout_forward", lora}] = f * L;
      c[{"dropout_backward", lora}] = L;
    }
  }
  return c;
}

void expect_shares_sum_to_one(const OpProfile& p) {
  const nlohmann::json j = nlohmann::json::parse(p.json());
  double share = 0, seconds = 0;
  for (const nlohmann::json& op : j["ops"]) {
    EXPECT_GE(op["seconds"].get<double>(), 0) << op;
    EXPECT_GT(op["calls"].get<int64_t>(), 0) << op;
    share += op["share"].get<double>();
    seconds += op["seconds"].get<double>();
  }
  // Each share is its op's time over the sum of all of them: they add up to 1 within the rounding
  // of a few dozen double divisions.
  if (seconds > 0) {
    EXPECT_NEAR(share, 1.0, 1e-12);
  }
  EXPECT_NEAR(j["op_seconds"].get<double>(), seconds, 1e-12 * seconds + 1e-300);
  EXPECT_EQ(j["steps"], 1);
}

TEST(OpProfile, ATrainingStepListsEveryOpTheModelCallsAsOftenAsItsConfigSays) {
  const int layers = test::tiny_config().n_layers;
  for (const float dropout : {0.0f, 0.1f}) {
    SCOPED_TRACE(dropout);
    const OpProfile keep = profile_one_step(CheckpointPolicy::None, dropout, cpu_backend());
    EXPECT_EQ(counts_of(keep), expected_step(layers, 1, dropout > 0));
    expect_shares_sum_to_one(keep);
    const OpProfile recompute = profile_one_step(CheckpointPolicy::PerBlock, dropout, cpu_backend());
    EXPECT_EQ(counts_of(recompute), expected_step(layers, 2, dropout > 0));
    expect_shares_sum_to_one(recompute);
  }
  // The frozen projections' work is their shapes' across the calls: 2 n rows cols per call.
  const LlamaConfig c = test::tiny_config();
  const OpProfile p = profile_one_step(CheckpointPolicy::None, 0.0f, cpu_backend());
  EXPECT_EQ(find(p.entries(), "linear_forward", "gate_proj").work.flops,
            double(layers) * 2.0 * 24 * c.intermediate * c.hidden);
}

TEST(OpProfile, ProfilesTheSimulatedDevice) {
  std::unique_ptr<Backend> be = make_backend("simt");
  const OpProfile p = profile_one_step(CheckpointPolicy::None, 0.0f, *be);
  EXPECT_EQ(counts_of(p), expected_step(test::tiny_config().n_layers, 1, false));
  expect_shares_sum_to_one(p);
}

}  // namespace
}  // namespace tf
