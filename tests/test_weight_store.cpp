// defines: tests of offload::WeightStore on its own terms: which tiers and weights it refuses, and
// by which names, before anything is allocated; its memory plan against what it allocates on the
// cpu (read buffers) and on the simulated device (slots and host read buffers); the simulated
// device streaming from the model file with the results of resident weights.
#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gguf_test_util.h"
#include "kernels/backend.h"
#include "model_test_util.h"
#include "offload/weight_store.h"
#include "src/core/error.h"
#include "src/io/model_loader.h"
#include "src/model/llama.h"
#include "tests/sim_test_util.h"
#include "tests/stream_test_util.h"
#include "tests/test_util.h"

namespace tf {
namespace {

using offload::WeightStore;
using offload::WeightTier;
using test::BatchData;
using test::synthetic_batch;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(WeightStore, HostOnTheCpuIsRefusedNamingTheOptions) {
  const LlamaWeights w = init_random_weights(test::tiny_config(), DType::BF16, 1);
  const size_t before = MemTracker::instance().current_total();
  const std::string e = error_of([&] {
    LlamaModel m(init_random_weights(test::tiny_config(), DType::BF16, 1), test::lora_r8(),
                 CheckpointPolicy::PerBlock, 8, cpu_backend(), WeightTier::Host);
  });
  test::expect_contains(
      e, {"--weights host", "cpu backend's memory is host memory", "--weights resident", "--weights disk"});
  EXPECT_EQ(MemTracker::instance().current_total(), before);
  EXPECT_EQ(error_of([&] { WeightStore::footprint(w, WeightTier::Host, cpu_backend()); }), e);
}

TEST(WeightStore, DiskNeedsTensorsKeptInTheirFile) {
  // Weights made in memory lie in no file at all.
  const LlamaWeights w = init_random_weights(test::tiny_config(), DType::BF16, 1);
  test::expect_contains(error_of([&] { WeightStore::footprint(w, WeightTier::Disk, cpu_backend()); }),
                        {"--weights disk", "tensor model.layers.0.input_layernorm.weight", "--quant keep"});
  // An f32 GGUF converted to bf16 at load keeps its norms in the file but not its matrices.
  test::TempDir tmp;
  const test::GgufBase base(test::tiny_config(), (tmp.dir / "m.gguf").string(), false);
  const io::LoadedModel bf16 = io::load_model(base.path, true, io::QuantMode::Bf16);
  test::expect_contains(
      error_of([&] { WeightStore::footprint(bf16.weights, WeightTier::Disk, cpu_backend()); }),
      {"--weights disk", "tensor model.layers.0.self_attn.q_proj.weight (bf16)", "converted",
       "--quant keep"});
  const io::LoadedModel kept = io::load_model(base.path, true, io::QuantMode::Keep);
  EXPECT_GT(WeightStore::footprint(kept.weights, WeightTier::Disk, cpu_backend()).streamed_bytes, 0u);
}

TEST(WeightStore, TheDeviceStreamsNoF32MatricesAndRefusesBeforeAllocating) {
  const std::unique_ptr<Backend> be = make_backend("simt");
  const std::string e = error_of([&] {
    LlamaModel m(init_random_weights(test::tiny_config(), DType::F32, 1), test::lora_r8(),
                 CheckpointPolicy::PerBlock, 8, *be, WeightTier::Host);
  });
  test::expect_contains(e, {"copies streamed blocks as they are stored",
                            "tensor model.layers.0.self_attn.q_proj.weight (f32)", "--quant bf16"});
  EXPECT_EQ(be->tracker().current_total(), 0u);
  EXPECT_EQ(be->device_blocks(), 0u);
}

// On the cpu the two read buffers are the backend's memory: the plan lists them, the tracker sees
// exactly them beside the rest of the model, and nothing scales with the number of layers.
TEST(WeightStore, CpuDiskPlanIsWhatTheModelAllocates) {
  test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config();
  const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / "a");
  cfg.n_layers = 6;
  const std::string deep = test::write_bf16_model_dir(cfg, tmp.dir / "b");
  const LoraConfig lora = test::lora_r8();
  io::LoadedModel m2 = io::load_model(dir, true, io::QuantMode::Keep);
  const io::LoadedModel m6 = io::load_model(deep, true, io::QuantMode::Keep);
  const MemoryPlan plan = LlamaModel::memory_plan(m2.weights, lora, CheckpointPolicy::PerBlock, 8,
                                                  cpu_backend(), WeightTier::Disk);
  const MemoryPlan plan6 = LlamaModel::memory_plan(m6.weights, lora, CheckpointPolicy::PerBlock, 8,
                                                   cpu_backend(), WeightTier::Disk);
  EXPECT_EQ(plan.bytes(MemTag::Weights), plan6.bytes(MemTag::Weights));
  EXPECT_EQ(plan6.streamed_bytes, 3 * plan.streamed_bytes);
  MemTracker& t = MemTracker::instance();
  std::array<size_t, kMemTagCount> before{};
  for (size_t i = 0; i < kMemTagCount; ++i) before[i] = t.current(MemTag(i));
  LlamaModel m(std::move(m2.weights), lora, CheckpointPolicy::PerBlock, 8, cpu_backend(), WeightTier::Disk);
  for (size_t i = 0; i < kMemTagCount; ++i)
    EXPECT_EQ(t.current(MemTag(i)) - before[i], plan.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
}

// On the device the file's blocks land in host read buffers (the plan's host list) and are copied
// into the slots on the copy stream; the results are those of resident weights. The two models run
// one after the other: simulated backends share the runtime's scratch, so two at once would race.
TEST(WeightStore, SimtFromTheFileMatchesResidentAndItsPlan) {
  test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config();
  cfg.n_layers = 3;  // with two, both blocks stay in the slots and no slot is ever refilled
  const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / "m");
  const LoraConfig lora = test::lora_r8();
  const auto train = [&](LlamaModel& m) {
    std::vector<double> out;
    for (int step = 0; step < 2; ++step) {
      const BatchData data = synthetic_batch(2, 8, cfg.vocab, uint64_t(step));
      out.push_back(m.forward_backward(data.view(), 1.0f, uint64_t(step)).sum);
    }
    const std::vector<float> g = m.backend().download_n(m.lora().grad_data(), size_t(m.lora().n_params));
    out.insert(out.end(), g.begin(), g.end());
    return out;
  };
  std::vector<double> resident;
  {
    const std::unique_ptr<Backend> be = make_backend("simt");
    LlamaModel r(io::load_model(dir, true, io::QuantMode::Keep).weights, lora, CheckpointPolicy::PerBlock, 16,
                 *be);
    resident = train(r);
  }
  const std::unique_ptr<Backend> be = make_backend("simt");
  io::LoadedModel loaded = io::load_model(dir, true, io::QuantMode::Keep);
  const MemoryPlan plan =
      LlamaModel::memory_plan(loaded.weights, lora, CheckpointPolicy::PerBlock, 16, *be, WeightTier::Disk);
  ASSERT_EQ(plan.host.size(), 2u);
  EXPECT_EQ(plan.host[0].what, "streamed block read buffer");
  const size_t host_before = MemTracker::instance().current(MemTag::Weights);
  be->reserve(plan.total);
  LlamaModel d(std::move(loaded.weights), lora, CheckpointPolicy::PerBlock, 16, *be, WeightTier::Disk);
  EXPECT_EQ(MemTracker::instance().current(MemTag::Weights) - host_before,
            plan.host[0].bytes + plan.host[1].bytes);
  for (size_t i = 0; i < kMemTagCount; ++i)
    EXPECT_EQ(be->tracker().current(MemTag(i)), plan.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
  EXPECT_TRUE(train(d) == resident) << "losses or LoRA gradients differ";
}

}  // namespace
}  // namespace tf
