// defines: tests of the model's memory layouts (ModelLayout): the MLP run a chunk of rows at a time
// against the MLP on every row at once, on the cpu and the simulated device (losses, logits,
// decoding and the gradients of every adapter), the embedding table in host memory against the
// table placed, the loss in calls of fewer rows against one call, and the memory plans of them
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "model_test_util.h"
#include "src/core/alloc.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/io/quantize_weights.h"
#include "src/model/llama.h"

namespace tf {
namespace {

using test::BatchData;
using test::synthetic_batch;

struct Result {
  LossSum loss;
  double eval = 0;
  std::vector<float> grads, logits, decoded;
};

// One micro-batch's loss and gradients with random adapters (LoRA's own init leaves B at zero, and
// so A's gradient), then a loss, logits and two decoding calls, one of more rows than a chunk.
Result run(LlamaModel& m) {
  LoraState& lora = m.lora();
  std::vector<float> params(size_t(lora.n_params));
  const Philox rng(5, 6);
  for (size_t i = 0; i < params.size(); ++i) params[i] = 0.3f * rng.normal(uint64_t(i));
  m.backend().upload_n(lora.param_data(), params.data(), params.size());
  m.backend().synchronize();
  lora.zero_grads();
  Result r;
  const int vocab = m.config().vocab;
  const BatchData train = synthetic_batch(2, 9, vocab, 11, 5, 1);
  r.loss = m.forward_backward(train.view(true), 0.5f, 3);
  r.grads = m.backend().download_n(lora.grad_data(), size_t(lora.n_params));
  const BatchData data = synthetic_batch(1, 10, vocab, 77);
  r.eval = m.forward_loss(data.view()).mean();
  r.logits.resize(size_t(10 * vocab));
  m.forward_logits(data.view(), r.logits.data());
  KvCache cache = m.make_kv_cache(16);
  r.decoded.resize(size_t(2 * vocab));
  m.decode(cache, data.tokens.data(), 8, r.decoded.data());
  m.decode(cache, data.tokens.data() + 8, 1, r.decoded.data() + vocab);
  return r;
}

bool mlp_target(LoraTarget t) {
  return t == LoraTarget::Gate || t == LoraTarget::Up || t == LoraTarget::Down;
}

// Whether this machine's f32 GEMM (OpenBLAS, the kernels it picked for this CPU) gives each row of
// a product the same bits whatever the number of rows multiplied with it, on the tiny model's
// shapes (hidden 32, intermediate 64, vocabulary 48, LoRA rank 8) and the chunks the tests use.
// Its AVX-512 kernels do; its AVX2 ones sum a row of a few-row product in another order.
bool gemm_rows_independent() {
  static const bool independent = [] {
    constexpr int64_t M = 24;
    for (const auto& [K, N] : {std::pair<int64_t, int64_t>{32, 64}, {64, 32}, {32, 48}, {32, 32}, {32, 8}}) {
      std::vector<float> a(size_t(M * K)), w(size_t(N * K));
      for (size_t i = 0; i < a.size(); ++i) a[i] = std::sin(0.37f * float(i) + 0.1f);
      for (size_t i = 0; i < w.size(); ++i) w[i] = std::cos(0.53f * float(i) + 0.2f);
      const auto product = [&](int64_t row, int64_t rows, float* c) {
        cpu_backend().matmul(c, N, MatOperand{a.data() + row * K, DType::F32, K, false},
                             MatOperand{w.data(), DType::F32, K, true}, rows, N, K, 1.0f, 0.0f);
      };
      std::vector<float> whole(size_t(M * N)), parts(size_t(M * N));
      product(0, M, whole.data());
      for (int64_t chunk : {1, 4, 5, 7}) {
        for (int64_t r = 0; r < M; r += chunk) product(r, std::min(chunk, M - r), parts.data() + r * N);
        if (parts != whole) return false;
      }
    }
    return true;
  }();
  return independent;
}

// A result of another layout within `tolerance` of the largest magnitude of `want`.
void expect_close(const std::vector<float>& want, const std::vector<float>& got, float tolerance,
                  const char* what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  float largest = 0, worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    largest = std::max(largest, std::fabs(want[i]));
    worst = std::max(worst, std::fabs(want[i] - got[i]));
  }
  EXPECT_LE(worst, tolerance * largest) << what << " differ by " << worst << " of the largest " << largest;
}

// With a row-independent GEMM the forward is row-independent, so losses, logits and decoding are
// the same bit for bit, and so are the gradients flowing into each row, hence the attention
// adapters'. An MLP adapter's gradient sums the micro-batch's 18 rows, in chunks and then across
// them instead of in one product: reassociating a sum of n f32 terms moves it by at most
// (n - 1) 2^-24 of the sum of their magnitudes, below 1.1e-6 of it here; 1e-5 of the tensor's
// largest gradient leaves room for the terms' cancellation.
// Where the GEMM sums a row in another order for another row count, each product of a chunk moves
// by up to (K - 1) 2^-24 of its terms' magnitudes (below 4e-6 for K 64) and the blocks carry that
// on: logits and decoding are held to 1e-5 of their largest, and the losses (sums of row losses,
// each moving by at most twice the largest logit change) to 1e-5 relative. A gradient ends a longer
// chain: the forward's products through the layers, the loss's, then the backward's back to its
// adapter, a dozen of them each adding up to 4e-6 of its terms, so gradients are held to 5e-5 of
// their largest (measured on an AVX2 machine: up to 1.14e-5, under dropout with per-block
// checkpointing). A chunk that dropped, repeated or misplaced a row would move them by percents.
void expect_same(LlamaModel& whole, const Result& a, LlamaModel& chunked, const Result& b) {
  const bool exact = gemm_rows_independent();
  EXPECT_EQ(a.loss.n_valid, b.loss.n_valid);
  if (exact) {
    EXPECT_EQ(a.loss.sum, b.loss.sum);
    EXPECT_EQ(a.eval, b.eval);
    EXPECT_TRUE(a.logits == b.logits) << "logits differ";
    EXPECT_TRUE(a.decoded == b.decoded) << "decoded logits differ";
  } else {
    EXPECT_NEAR(a.loss.sum, b.loss.sum, 1e-5 * std::fabs(a.loss.sum));
    EXPECT_NEAR(a.eval, b.eval, 1e-5 * std::fabs(a.eval));
    expect_close(a.logits, b.logits, 1e-5f, "logits");
    expect_close(a.decoded, b.decoded, 1e-5f, "decoded logits");
  }
  ASSERT_EQ(a.grads.size(), b.grads.size());
  const LlamaConfig& c = whole.config();
  for (int l = 0; l < c.n_layers; ++l) {
    for (int t = 0; t < kLoraTargetCount; ++t) {
      const LoraAdapter& ad = whole.lora().at(l, LoraTarget(t));
      if (!ad.active()) continue;
      ASSERT_TRUE(chunked.lora().at(l, LoraTarget(t)).active());
      for (const auto& [grad, count] :
           {std::pair{ad.dA, ad.rank * ad.in}, std::pair{ad.dB, ad.out * ad.rank}}) {
        const size_t first = size_t(grad - whole.lora().grad_data());
        const auto begin = a.grads.begin() + ptrdiff_t(first), end = begin + count;
        float largest = 0;
        for (auto it = begin; it != end; ++it) largest = std::max(largest, std::fabs(*it));
        ASSERT_GT(largest, 0.0f) << "layer " << l << " target " << t << " has no gradient";
        for (size_t i = first; i < first + size_t(count); ++i) {
          if (mlp_target(LoraTarget(t)) || !exact)
            ASSERT_NEAR(a.grads[i], b.grads[i], (exact ? 1e-5f : 5e-5f) * largest)
                << "layer " << l << " target " << t << " at " << i;
          else
            ASSERT_EQ(a.grads[i], b.grads[i]) << "layer " << l << " target " << t << " at " << i;
        }
      }
    }
  }
}

struct ChunkCase {
  const char* name;
  CheckpointPolicy policy;
  int64_t chunk;
  float dropout;
};

void PrintTo(const ChunkCase& c, std::ostream* os) {
  *os << c.name;
}

LoraConfig lora_with(float dropout) {
  LoraConfig l = test::lora_r8();
  l.dropout = dropout;
  return l;
}

class MlpChunkCpu : public ::testing::TestWithParam<ChunkCase> {};

TEST_P(MlpChunkCpu, GivesTheResultsOfTheWholeMlp) {
  const ChunkCase& p = GetParam();
  const LlamaConfig cfg = test::tiny_config(48);
  const LoraConfig lora = lora_with(p.dropout);
  LlamaModel whole(init_random_weights(cfg, DType::F32, 3, 0.25f), lora, p.policy, 24);
  LlamaModel chunked(init_random_weights(cfg, DType::F32, 3, 0.25f), lora, p.policy, 24, cpu_backend(),
                     offload::WeightTier::Resident, ModelLayout{p.chunk});
  EXPECT_EQ(whole.mlp_rows(), 24);
  EXPECT_EQ(chunked.mlp_rows(), p.chunk);
  const Result a = run(whole), b = run(chunked);
  expect_same(whole, a, chunked, b);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, MlpChunkCpu,
    ::testing::Values(ChunkCase{"none_by5", CheckpointPolicy::None, 5, 0.0f},
                      ChunkCase{"block_by5_dropout", CheckpointPolicy::PerBlock, 5, 0.1f},
                      ChunkCase{"none_by1_dropout", CheckpointPolicy::None, 1, 0.1f},
                      ChunkCase{"block_by7", CheckpointPolicy::PerBlock, 7, 0.0f}),
    [](const ::testing::TestParamInfo<ChunkCase>& i) { return std::string(i.param.name); });

// The device's products are row-independent too (bf16 weights, f32 adapters); the simulator checks
// every access of the chunk buffers, the per-layer inputs offloaded to host memory included.
TEST(MlpChunkSimt, GivesTheResultsOfTheWholeMlp) {
  const LlamaConfig cfg = test::tiny_config(48);
  const LoraConfig lora = lora_with(0.1f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  for (CheckpointPolicy policy : {CheckpointPolicy::PerBlock, CheckpointPolicy::PerBlockOffload}) {
    SCOPED_TRACE(policy == CheckpointPolicy::PerBlock ? "block" : "offload");
    LlamaModel whole(init_random_weights(cfg, DType::BF16, 3, 0.25f), lora, policy, 24, *be);
    LlamaModel chunked(init_random_weights(cfg, DType::BF16, 3, 0.25f), lora, policy, 24, *be,
                       offload::WeightTier::Resident, ModelLayout{7});
    const Result a = run(whole), b = run(chunked);
    expect_same(whole, a, chunked, b);
  }
}

size_t plan_bytes(const MemoryPlan& p, const std::string& what) {
  size_t n = 0;
  for (const PlannedAlloc& a : p.allocs) n += a.what == what ? a.bytes : 0;
  return n;
}

// The chunked layout keeps no block's gate, up or activation and forms one chunk's instead; the
// backward's gradients of them are one chunk's too. The model allocates what its plan says.
TEST(MlpChunkPlan, KeepsOneChunkOfTheMlpInsteadOfEveryRow) {
  const LlamaConfig cfg = test::tiny_config(48);
  const LlamaWeights w = init_random_weights(cfg, DType::F32, 3, 0.25f);
  const int64_t N = 24, C = 5, I = cfg.intermediate;
  for (CheckpointPolicy policy : {CheckpointPolicy::None, CheckpointPolicy::PerBlock}) {
    const size_t sets = policy == CheckpointPolicy::None ? size_t(cfg.n_layers) : 1;
    const MemoryPlan whole = LlamaModel::memory_plan(w, test::lora_r8(), policy, N, cpu_backend());
    const MemoryPlan chunked = LlamaModel::memory_plan(w, test::lora_r8(), policy, N, cpu_backend(),
                                                       offload::WeightTier::Resident, ModelLayout{C});
    EXPECT_EQ(plan_bytes(whole, "MLP chunk"), 0u);
    EXPECT_EQ(plan_bytes(chunked, "MLP chunk"), size_t(3 * C * I) * sizeof(float));
    EXPECT_EQ(plan_bytes(whole, "saved activations") - plan_bytes(chunked, "saved activations"),
              sets * size_t(3 * N * I) * sizeof(float));
    EXPECT_EQ(plan_bytes(whole, "activation gradients") - plan_bytes(chunked, "activation gradients"),
              size_t(3 * (N - C) * I) * sizeof(float));
    LlamaWeights weights = init_random_weights(cfg, DType::F32, 3, 0.25f);
    MemTracker& t = MemTracker::instance();
    std::array<size_t, kMemTagCount> before{};
    for (size_t i = 0; i < kMemTagCount; ++i) before[i] = t.current(MemTag(i));
    LlamaModel m(std::move(weights), test::lora_r8(), policy, N, cpu_backend(), offload::WeightTier::Resident,
                 ModelLayout{C});
    for (size_t i = 0; i < kMemTagCount; ++i)
      EXPECT_EQ(t.current(MemTag(i)) - before[i], chunked.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
  }
  // A chunk of all the rows or more is the whole MLP; a negative one is refused.
  EXPECT_EQ(LlamaModel::memory_plan(w, test::lora_r8(), CheckpointPolicy::PerBlock, N, cpu_backend(),
                                    offload::WeightTier::Resident, ModelLayout{N + 3})
                .total,
            LlamaModel::memory_plan(w, test::lora_r8(), CheckpointPolicy::PerBlock, N, cpu_backend()).total);
  EXPECT_THROW(LlamaModel::memory_plan(w, test::lora_r8(), CheckpointPolicy::PerBlock, N, cpu_backend(),
                                       offload::WeightTier::Resident, ModelLayout{-1}),
               Error);
}

// The rows looked up on the host are the device's lookup bit for bit (a copy, or an NF4 block's
// code times its absmax, the same products on both), so everything after them is too.
TEST(HostEmbeddingSimt, GivesTheResultsOfThePlacedTable) {
  const LlamaConfig cfg = test::tiny_config(48);
  const LoraConfig lora = lora_with(0.1f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  for (DType dtype : {DType::BF16, DType::NF4}) {
    SCOPED_TRACE(dtype_name(dtype));
    auto weights = [&] {
      LlamaWeights w = init_random_weights(cfg, DType::BF16, 3, 0.25f);
      if (dtype == DType::NF4)
        w.embed = io::store_weight(w.embed, io::QuantMode::Nf4, w, "model.embed_tokens.weight");
      return w;
    };
    LlamaModel placed(weights(), lora, CheckpointPolicy::PerBlock, 24, *be);
    LlamaModel host(weights(), lora, CheckpointPolicy::PerBlock, 24, *be, offload::WeightTier::Resident,
                    ModelLayout{0, true});
    EXPECT_FALSE(placed.host_embedding());
    EXPECT_TRUE(host.host_embedding());
    const Result a = run(placed), b = run(host);
    EXPECT_EQ(a.loss.sum, b.loss.sum);
    EXPECT_EQ(a.eval, b.eval);
    EXPECT_TRUE(a.grads == b.grads) << "gradients differ";
    EXPECT_TRUE(a.logits == b.logits) << "logits differ";
    EXPECT_TRUE(a.decoded == b.decoded) << "decoded logits differ";
  }
}

// The table leaves the device's plan and the rows' staging joins the host's; the model allocates
// on the device what its plan says. A tied table stays, and so does every table on the cpu.
TEST(HostEmbeddingPlan, MovesTheTableToHostMemory) {
  LlamaConfig cfg = test::tiny_config(48);
  const std::unique_ptr<Backend> be = make_backend("simt");
  const int64_t N = 24;
  const ModelLayout host_table{0, true};
  {
    LlamaWeights w = init_random_weights(cfg, DType::BF16, 3, 0.25f);
    const MemoryPlan placed = LlamaModel::memory_plan(w, test::lora_r8(), CheckpointPolicy::PerBlock, N, *be);
    const MemoryPlan host = LlamaModel::memory_plan(w, test::lora_r8(), CheckpointPolicy::PerBlock, N, *be,
                                                    offload::WeightTier::Resident, host_table);
    EXPECT_EQ(placed.bytes(MemTag::Weights) - host.bytes(MemTag::Weights), be->placed_weight_bytes(w.embed));
    ASSERT_EQ(host.host.size(), 1u);
    EXPECT_EQ(host.host[0].what, "embedding rows");
    EXPECT_EQ(host.host[0].bytes, size_t(N * cfg.hidden) * sizeof(float));
    be->reserve(host.total);
    LlamaModel m(std::move(w), test::lora_r8(), CheckpointPolicy::PerBlock, N, *be,
                 offload::WeightTier::Resident, host_table);
    for (size_t i = 0; i < kMemTagCount; ++i)
      EXPECT_EQ(be->tracker().current(MemTag(i)), host.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
  }
  cfg.tie_embeddings = true;
  const LlamaWeights tied = init_random_weights(cfg, DType::BF16, 3, 0.25f);
  EXPECT_EQ(LlamaModel::memory_plan(tied, test::lora_r8(), CheckpointPolicy::PerBlock, N, *be,
                                    offload::WeightTier::Resident, host_table)
                .total,
            LlamaModel::memory_plan(tied, test::lora_r8(), CheckpointPolicy::PerBlock, N, *be).total);
  LlamaModel on_cpu(init_random_weights(test::tiny_config(48), DType::F32, 3, 0.25f), test::lora_r8(),
                    CheckpointPolicy::PerBlock, N, cpu_backend(), offload::WeightTier::Resident, host_table);
  EXPECT_FALSE(on_cpu.host_embedding());
}

// Each row's loss and its gradient come from that row's logits alone, so the loss in calls of fewer
// rows sums the same row losses in another grouping of double additions (18 terms: a few 2^-52 of
// their sum), and each row's gradient is its own, up to how the products of another row count
// round (an f32 GEMM's sum over the hidden dimension, reordered by the BLAS for a different shape:
// within 32 2^-24 of the sum of magnitudes); 1e-5 of each tensor's largest gradient bounds what
// that becomes through the blocks' backward. The forward alone (logits, decoding) is untouched.
// Where the GEMM rounds a row of a few-row product otherwise (gemm_rows_independent), the logits
// the loss reads move by up to 32 2^-24 of their terms' magnitudes, and each row loss by twice
// that: the losses are held to 1e-5 relative then.
void expect_loss_rows_same(LlamaModel& one, const Result& a, LlamaModel& calls, const Result& b) {
  const double loss_tolerance = gemm_rows_independent() ? 1e-12 : 1e-5;
  EXPECT_NEAR(a.loss.sum, b.loss.sum, loss_tolerance * std::fabs(a.loss.sum));
  EXPECT_EQ(a.loss.n_valid, b.loss.n_valid);
  EXPECT_NEAR(a.eval, b.eval, loss_tolerance * std::fabs(a.eval));
  EXPECT_TRUE(a.logits == b.logits) << "logits differ";
  EXPECT_TRUE(a.decoded == b.decoded) << "decoded logits differ";
  ASSERT_EQ(a.grads.size(), b.grads.size());
  float largest = 0;
  for (float g : a.grads) largest = std::max(largest, std::fabs(g));
  ASSERT_GT(largest, 0.0f);
  for (size_t i = 0; i < a.grads.size(); ++i) ASSERT_NEAR(a.grads[i], b.grads[i], 1e-5f * largest) << i;
  EXPECT_EQ(one.loss_rows(), one.max_tokens());
  EXPECT_LT(calls.loss_rows(), calls.max_tokens());
}

TEST(LossRows, GiveTheLossAndGradientsOfOneCall) {
  const LlamaConfig cfg = test::tiny_config(48);
  const LoraConfig lora = lora_with(0.1f);
  for (int64_t rows : {int64_t(1), int64_t(4), int64_t(7)}) {
    SCOPED_TRACE("cpu, " + std::to_string(rows) + " rows per call");
    LlamaModel one(init_random_weights(cfg, DType::F32, 3, 0.25f), lora, CheckpointPolicy::PerBlock, 24);
    LlamaModel calls(init_random_weights(cfg, DType::F32, 3, 0.25f), lora, CheckpointPolicy::PerBlock, 24,
                     cpu_backend(), offload::WeightTier::Resident, ModelLayout{0, false, rows});
    const Result a = run(one), b = run(calls);
    expect_loss_rows_same(one, a, calls, b);
  }
  const std::unique_ptr<Backend> be = make_backend("simt");
  SCOPED_TRACE("simt, 5 rows per call");
  LlamaModel one(init_random_weights(cfg, DType::BF16, 3, 0.25f), lora, CheckpointPolicy::PerBlock, 24, *be);
  LlamaModel calls(init_random_weights(cfg, DType::BF16, 3, 0.25f), lora, CheckpointPolicy::PerBlock, 24, *be,
                   offload::WeightTier::Resident, ModelLayout{0, false, 5});
  const Result a = run(one), b = run(calls);
  expect_loss_rows_same(one, a, calls, b);
  EXPECT_THROW(LlamaModel::memory_plan(init_random_weights(cfg, DType::F32, 3, 0.25f), lora,
                                       CheckpointPolicy::PerBlock, 24, cpu_backend(),
                                       offload::WeightTier::Resident, ModelLayout{0, false, -2}),
               Error);
}

}  // namespace
}  // namespace tf
