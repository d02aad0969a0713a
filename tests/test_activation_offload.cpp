// defines: tests of per-block checkpointing with the kept block inputs in host memory
// (CheckpointPolicy::PerBlockOffload, offload::ActivationStore) on the simulated device, against
// per-block checkpointing with them on the device, bit for bit; its refusal on the cpu; the
// page-locked host memory of Backend::alloc_host, which the saved inputs and the disk tier's read
// buffers take on a device; finetune --checkpointing offload on the simulated device
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "kernels/backend.h"
#include "kernels/cuda/runtime.h"
#include "model_test_util.h"
#include "src/core/error.h"
#include "src/io/model_loader.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"
#include "tests/sim_test_util.h"
#include "tests/stream_test_util.h"
#include "tests/test_util.h"

namespace tf {
namespace {

using offload::WeightTier;
using test::BatchData;
using test::synthetic_batch;

LoraConfig offload_lora() {
  LoraConfig l = test::lora_r8();
  l.dropout = 0.1f;
  return l;
}

// Everything compared with ==: one micro-batch's gradients, a few training steps' losses and
// adapters, then a loss, logits and two decoding calls, which run the window without saving.
struct Run {
  std::vector<float> grads, lora, logits, decoded;
  std::vector<double> losses;
  double eval = 0;
};

Run run(LlamaModel& m, int steps) {
  Run r;
  const int vocab = m.config().vocab;
  {
    const BatchData data = synthetic_batch(2, 9, vocab, 11, 5, 1);
    m.lora().zero_grads();
    m.forward_backward(data.view(true), 0.5f, 0);
    r.grads = m.backend().download_n(m.lora().grad_data(), size_t(m.lora().n_params));
  }
  TrainConfig tc;
  tc.lr.peak_lr = 1e-2f;
  tc.lr.total_steps = steps;
  tc.lr.warmup_steps = 1;
  Trainer t(m, tc);
  for (int s = 0; s < steps; ++s) {
    // Batches of different lengths: a saved input brought back has the rows of its own step.
    const BatchData data = synthetic_batch(2, 12 - 2 * s, vocab, uint64_t(s), 7, 1);
    const Batch b = data.view(true);
    r.losses.push_back(t.step({&b, 1}).loss);
  }
  const LoraState host = m.lora().host_copy();
  r.lora.assign(host.params.as<float>(), host.params.as<float>() + host.n_params);
  const BatchData data = synthetic_batch(1, 10, vocab, 77);
  r.eval = m.forward_loss(data.view()).mean();
  r.logits.resize(size_t(10 * vocab));
  m.forward_logits(data.view(), r.logits.data());
  KvCache cache = m.make_kv_cache(16);
  r.decoded.resize(size_t(2 * vocab));
  m.decode(cache, data.tokens.data(), 6, r.decoded.data());
  m.decode(cache, data.tokens.data() + 6, 1, r.decoded.data() + vocab);
  return r;
}

void expect_same(const Run& a, const Run& b) {
  EXPECT_TRUE(a.grads == b.grads) << "gradients differ";
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_EQ(a.losses[i], b.losses[i]) << "step " << i;
  EXPECT_EQ(a.eval, b.eval);
  EXPECT_TRUE(a.lora == b.lora) << "LoRA parameters differ";
  EXPECT_TRUE(a.logits == b.logits) << "logits differ";
  EXPECT_TRUE(a.decoded == b.decoded) << "decoded logits differ";
}

struct OffloadCase {
  const char* name;
  int n_layers;
  int n_kv_heads;
  WeightTier tier;
  bool gemma3 = false;  // Gemma 3's block: q/k norms, output norms, GeGLU, local rope, a window
};

// The tiny config with every feature Gemma 3 adds to the Llama block, its last layer full and the
// others sliding over 3 keys with a rope base of their own.
LlamaConfig gemma3_like(LlamaConfig c) {
  c.architecture = "gemma3";
  c.qk_norm = c.sandwich_norms = true;
  c.activation = MlpActivation::GeluTanh;
  c.embed_scale = std::sqrt(float(c.hidden));
  c.query_pre_attn_scalar = 2.0f * float(c.head_dim);
  c.sliding_window = 3;
  c.sliding_layers.assign(size_t(c.n_layers), true);
  c.sliding_layers.back() = false;
  c.rope_local = c.rope;
  c.rope_local.theta = 100.0f;
  return c;
}

class OffloadTrain : public ::testing::TestWithParam<OffloadCase> {};

// The simulator reports a copy out that does not wait for the compute writing its buffer, a copy
// in over a buffer an op still reads, and an op reading a buffer before its copy in landed, as
// races; the results are those of the inputs kept on the device.
TEST_P(OffloadTrain, SimtMatchesPerBlockBitForBit) {
  const OffloadCase& p = GetParam();
  LlamaConfig cfg = test::tiny_config(48);
  cfg.n_layers = p.n_layers;
  cfg.n_kv_heads = p.n_kv_heads;
  if (p.gemma3) cfg = gemma3_like(cfg);
  const std::unique_ptr<Backend> be = make_backend("simt");
  LlamaModel kept(init_random_weights(cfg, DType::BF16, 3, 0.25f), offload_lora(), CheckpointPolicy::PerBlock,
                  24, *be, p.tier);
  LlamaModel off(init_random_weights(cfg, DType::BF16, 3, 0.25f), offload_lora(),
                 CheckpointPolicy::PerBlockOffload, 24, *be, p.tier);
  expect_same(run(kept, 3), run(off, 3));
}

INSTANTIATE_TEST_SUITE_P(Configs, OffloadTrain,
                         ::testing::Values(OffloadCase{"five_layers_gqa", 5, 2, WeightTier::Resident},
                                           OffloadCase{"one_layer", 1, 4, WeightTier::Resident},
                                           OffloadCase{"four_layers_weights_host", 4, 2, WeightTier::Host},
                                           OffloadCase{"gemma3_weights_host", 2, 2, WeightTier::Host, true}),
                         [](const ::testing::TestParamInfo<OffloadCase>& p) {
                           return std::string(p.param.name);
                         });

// With the weights read from the file too: the block inputs and the read buffers both in
// page-locked host memory, both copied on the copy stream.
TEST(OffloadTrainDisk, SimtMatchesPerBlockBitForBit) {
  test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config(48);
  cfg.n_layers = 3;
  const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / "m");
  const std::unique_ptr<Backend> be = make_backend("simt");
  LlamaModel kept(io::load_model(dir, true, io::QuantMode::Keep).weights, offload_lora(),
                  CheckpointPolicy::PerBlock, 24, *be, WeightTier::Disk);
  LlamaModel off(io::load_model(dir, true, io::QuantMode::Keep).weights, offload_lora(),
                 CheckpointPolicy::PerBlockOffload, 24, *be, WeightTier::Disk);
  expect_same(run(kept, 2), run(off, 2));
}

TEST(OffloadCpu, IsRefusedNamingCheckpointingBlock) {
  const LlamaConfig cfg = test::tiny_config(48);
  for (const std::string& msg : {test::launch_error([&] {
                                   LlamaModel::memory_plan(init_random_weights(cfg, DType::F32, 3, 0.25f),
                                                           offload_lora(), CheckpointPolicy::PerBlockOffload,
                                                           8, cpu_backend());
                                 }),
                                 test::launch_error([&] {
                                   LlamaModel m(init_random_weights(cfg, DType::F32, 3, 0.25f),
                                                offload_lora(), CheckpointPolicy::PerBlockOffload, 8);
                                 })})
    test::expect_contains(
        msg, {"--checkpointing offload", "cpu backend's memory is host memory", "use --checkpointing block"});
}

// A device backend's host memory is page-locked (on the simulator, counted as such), a cpu's is not;
// both are counted against their tag in the process's tracker while they live.
TEST(HostMemory, AllocHostIsCountedAndPageLockedOnADevice) {
  const std::unique_ptr<Backend> be = make_backend("simt");
  MemTracker& t = MemTracker::instance();
  const size_t tracked = t.current(MemTag::Activations), pinned = simt::rt::pinned_in_use();
  {
    HostMem m = be->alloc_host(10000, MemTag::Activations, "test buffer");
    EXPECT_EQ(t.current(MemTag::Activations), tracked + 10000);
    EXPECT_EQ(simt::rt::pinned_in_use(), pinned + 10000);
    HostMem moved = std::move(m);
    EXPECT_EQ(m.data(), nullptr);
    EXPECT_EQ(moved.bytes(), 10000u);
    HostMem plain = cpu_backend().alloc_host(4096, MemTag::Activations, "test buffer");
    EXPECT_EQ(t.current(MemTag::Activations), tracked + 14096);
    EXPECT_EQ(simt::rt::pinned_in_use(), pinned + 10000);
  }
  EXPECT_EQ(t.current(MemTag::Activations), tracked);
  EXPECT_EQ(simt::rt::pinned_in_use(), pinned);
}

// The host memory a device model lists in its plan is page-locked: the saved block inputs, and the
// read buffers of the weights streamed from the file.
TEST(HostMemory, TheSavedInputsAndTheDiskReadBuffersArePageLocked) {
  test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config(48);
  cfg.n_layers = 4;
  const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / "m");
  const std::unique_ptr<Backend> be = make_backend("simt");
  LlamaWeights w = io::load_model(dir, true, io::QuantMode::Keep).weights;
  const MemoryPlan plan = LlamaModel::memory_plan(w, offload_lora(), CheckpointPolicy::PerBlockOffload, 16,
                                                  *be, WeightTier::Disk);
  ASSERT_EQ(plan.host.size(), 3u) << "two read buffers and the saved inputs";
  size_t host = 0;
  for (const PlannedAlloc& a : plan.host) host += a.bytes;
  const size_t pinned = simt::rt::pinned_in_use();
  LlamaModel m(std::move(w), offload_lora(), CheckpointPolicy::PerBlockOffload, 16, *be, WeightTier::Disk);
  EXPECT_EQ(simt::rt::pinned_in_use() - pinned, host);
}

class CliOffload : public test::Cli {};

// finetune takes the policy by name and gives the losses of --checkpointing block bit for bit.
TEST_F(CliOffload, FinetuneOnSimtGivesTheLossesOfCheckpointingBlock) {
  make_model_and_data();
  std::vector<std::string> block = finetune_args("block", 2), off = finetune_args("offload", 2);
  for (auto* args : {&block, &off}) set_option(*args, "--device", "simt");
  set_option(block, "--checkpointing", "block");
  set_option(off, "--checkpointing", "offload");
  ASSERT_EQ(run(block).status, 0);
  const test::Result r = run(off);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("checkpointing per block, inputs in host memory"), std::string::npos) << r.out;
  const std::vector<double> want = losses(dir_ / "block" / "metrics.jsonl");
  EXPECT_EQ(want.size(), 2u);
  EXPECT_EQ(losses(dir_ / "offload" / "metrics.jsonl"), want);
}

}  // namespace
}  // namespace tf
