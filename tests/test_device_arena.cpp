// defines: tests of the device arena: the allocator (alignment, first fit, fragmentation and
// coalescing, its errors), the CUDA backend's arena on the simulator (reserved exactly, grown
// without a reserve, blocks of their own for KV caches), LlamaModel::memory_plan against what the
// model allocates on cpu and simt, and no device allocation after the first training step.
#include <gtest/gtest.h>

#include <array>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/arena.h"
#include "kernels/cuda/runtime.h"
#include "kernels/sim/runtime.h"
#include "model_test_util.h"
#include "src/core/error.h"
#include "src/train/trainer.h"

namespace tf {
namespace {

using test::synthetic_batch;
using test::tiny_config;

// The arena keeps books only, so host memory stands in for a device block here.
struct HostBlock {
  explicit HostBlock(size_t bytes) : p(std::aligned_alloc(kArenaAlign, bytes)) {}
  ~HostBlock() { std::free(p); }
  HostBlock(const HostBlock&) = delete;
  HostBlock& operator=(const HostBlock&) = delete;
  void* p;
};

size_t offset_of(const DeviceArena& a, const void* p) {
  return size_t(static_cast<const std::byte*>(p) - static_cast<const std::byte*>(a.base()));
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(DeviceArena, PiecesStartOn256ByteBoundariesAndNeverShareAGranule) {
  HostBlock block(64 * 256);
  DeviceArena a(block.p, 64 * 256, "test arena");
  std::vector<std::pair<void*, size_t>> pieces;
  for (size_t bytes : {1, 255, 256, 257, 0, 1000, 64, 513})
    pieces.emplace_back(a.allocate(bytes, MemTag::Workspace, "x"), bytes);
  size_t expect = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const size_t off = offset_of(a, pieces[i].first);
    // The simulator orders accesses per 64-byte granule of an allocation: two pieces sharing one
    // would report races between unrelated buffers.
    EXPECT_EQ(off % 256, 0u) << "piece " << i;
    EXPECT_EQ(off % sim::kStreamGranule, 0u);
    EXPECT_EQ(off, expect) << "first fit in an empty arena packs pieces in order";
    expect += pieces[i].second == 0 ? 256 : (pieces[i].second + 255) / 256 * 256;
  }
  EXPECT_EQ(a.in_use(), expect);
  EXPECT_EQ(a.in_use(MemTag::Workspace), expect);
  EXPECT_EQ(a.pieces(), pieces.size());
}

TEST(DeviceArena, FragmentsAndCoalescesFreedNeighbours) {
  constexpr size_t kUnit = 256;
  HostBlock block(16 * kUnit);
  DeviceArena a(block.p, 16 * kUnit, "test arena");
  void* p0 = a.allocate(kUnit, MemTag::Activations, "p0");
  void* p1 = a.allocate(2 * kUnit, MemTag::Activations, "p1");
  void* p2 = a.allocate(kUnit, MemTag::Activations, "p2");
  void* p3 = a.allocate(12 * kUnit, MemTag::Weights, "p3");
  EXPECT_EQ(a.largest_free(), 0u);
  EXPECT_EQ(a.free_pieces(), 0u);

  // Two separate free units: 512 bytes are free but no 512-byte piece is.
  a.deallocate(p0);
  a.deallocate(p2);
  EXPECT_EQ(a.free_pieces(), 2u);
  EXPECT_EQ(a.largest_free(), kUnit);
  EXPECT_EQ(a.try_allocate(2 * kUnit, MemTag::Workspace), nullptr);
  // First fit: the lowest hole that is large enough.
  void* q = a.allocate(kUnit, MemTag::Workspace, "q");
  EXPECT_EQ(q, p0);
  a.deallocate(q);

  // Freeing the piece between two free ones merges all three into one.
  a.deallocate(p1);
  EXPECT_EQ(a.free_pieces(), 1u);
  EXPECT_EQ(a.largest_free(), 4 * kUnit);
  void* big = a.allocate(4 * kUnit, MemTag::Activations, "big");
  EXPECT_EQ(big, p0);
  a.deallocate(big);

  // The last piece merges with the free space before it: the arena is whole again.
  a.deallocate(p3);
  EXPECT_EQ(a.free_pieces(), 1u);
  EXPECT_EQ(a.largest_free(), a.size());
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.allocate(16 * kUnit, MemTag::Weights, "all"), block.p);
}

TEST(DeviceArena, ARequestThatDoesNotFitNamesItTheArenaAndItsUsePerTag) {
  HostBlock block(8 * 256);
  DeviceArena a(block.p, 8 * 256, "simt device arena");
  a.allocate(1024, MemTag::Weights, "model.embed_tokens.weight");
  a.allocate(300, MemTag::Lora, "LoRA parameters");
  const std::string msg = error_of([&] { a.allocate(1000, MemTag::Activations, "saved activations"); });
  EXPECT_NE(msg.find("simt device arena: 'saved activations' (1000 bytes) does not fit: the arena holds "
                     "2.00 KiB, 1.50 KiB in use (weights 1.00 KiB, lora 512 bytes), largest free piece "
                     "512 bytes"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("sized once per run"), std::string::npos) << msg;
}

TEST(DeviceArena, RefusesDoubleFreesInteriorAndForeignPointers) {
  HostBlock block(4 * 256);
  DeviceArena a(block.p, 4 * 256, "test arena");
  auto* p = static_cast<std::byte*>(a.allocate(512, MemTag::Grads, "g"));
  a.allocate(256, MemTag::Grads, "h");
  const std::string interior = error_of([&] { a.deallocate(p + 16); });
  EXPECT_NE(interior.find("test arena: free of"), std::string::npos) << interior;
  EXPECT_NE(interior.find("byte 16 of a piece of 512 bytes, not its start"), std::string::npos) << interior;
  a.deallocate(p);
  const std::string twice = error_of([&] { a.deallocate(p); });
  EXPECT_NE(twice.find("(offset 0), which is not in use (freed twice?)"), std::string::npos) << twice;
  int host = 0;
  const std::string foreign = error_of([&] { a.deallocate(&host); });
  EXPECT_NE(foreign.find("which is not in the arena"), std::string::npos) << foreign;
  // The refused frees changed nothing.
  EXPECT_EQ(a.in_use(), 256u);
  EXPECT_EQ(a.in_use(MemTag::Grads), 256u);
}

// ---- the CUDA backend's arena on the simulator ----------------------------------------------

TEST(DeviceBackendArena, AReservedArenaTakesOneBlockAndRefusesWhatDoesNotFit) {
  const std::unique_ptr<Backend> be = make_backend("simt");
  be->reserve(4096);
  EXPECT_EQ(be->device_blocks(), 1u);
  EXPECT_EQ(be->footprint(1), 256u);
  EXPECT_EQ(be->footprint(0), 0u);
  DeviceMem w = be->alloc(3000, MemTag::Weights, "weights");
  const std::string msg = error_of([&] { be->alloc(1500, MemTag::Activations, "saved activations"); });
  EXPECT_NE(msg.find("simt device arena: 'saved activations' (1500 bytes) does not fit: the arena holds "
                     "4.00 KiB, 3.00 KiB in use (weights 3.00 KiB), largest free piece 1.00 KiB"),
            std::string::npos)
      << msg;
  EXPECT_EQ(be->device_blocks(), 1u) << "a reserved arena must not grow";
  const std::string again = error_of([&] { be->reserve(8192); });
  EXPECT_NE(again.find("simt: cannot reserve a device arena of 8192 bytes while 3072 bytes are allocated"),
            std::string::npos)
      << again;
  w = DeviceMem();
  be->reserve(8192);
  DeviceMem a = be->alloc(8192, MemTag::Activations, "all of it");
  EXPECT_EQ(be->device_blocks(), 2u);
  EXPECT_EQ(be->tracker().current(MemTag::Activations), 8192u);
}

// On the simulator a piece is checked as an allocation of its own: a kernel running past it into
// its neighbour, or writing to it after it was freed, is reported naming the piece.
TEST(DeviceBackendArena, SimulatedPiecesAreCheckedLikeAllocationsOfTheirOwn) {
  const std::unique_ptr<Backend> be = make_backend("simt");
  be->reserve(4096);
  DeviceMem first = be->alloc(64 * sizeof(float), MemTag::Workspace, "first piece");
  const DeviceMem second = be->alloc(64 * sizeof(float), MemTag::Workspace, "second piece");
  be->fill(first.as<float>(), 1.0f, 64);
  try {
    be->fill(first.as<float>(), 1.0f, 65);
    FAIL() << "a fill running past its piece was not reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'first piece'"), std::string::npos) << e.what();
  }
  float* stale = first.as<float>();
  first = DeviceMem();
  try {
    be->fill(stale, 1.0f, 4);
    FAIL() << "a fill of a freed piece was not reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use after free"), std::string::npos) << e.what();
  }
  be->fill(second.as<float>(), 2.0f, 64);
}

TEST(DeviceBackendArena, WithoutAReserveTheArenaGrowsByBlocksOfAtLeastWhatItHolds) {
  const std::unique_ptr<Backend> be = make_backend("simt");
  EXPECT_EQ(be->device_blocks(), 0u);
  std::vector<DeviceMem> held;
  held.push_back(be->alloc(100, MemTag::Workspace, "a"));
  EXPECT_EQ(be->device_blocks(), 1u);  // a 1 MiB block
  held.push_back(be->alloc((1u << 20) - 256, MemTag::Workspace, "b"));
  EXPECT_EQ(be->device_blocks(), 1u) << "b fits the first block";
  held.push_back(be->alloc(3u << 20, MemTag::Workspace, "c"));
  EXPECT_EQ(be->device_blocks(), 2u);  // a block of 3 MiB: more than the 1 MiB held so far
  held.push_back(be->alloc(1u << 20, MemTag::Workspace, "d"));
  EXPECT_EQ(be->device_blocks(), 3u);  // 4 MiB: all blocks so far
  held.push_back(be->alloc(3u << 20, MemTag::Workspace, "e"));
  EXPECT_EQ(be->device_blocks(), 3u) << "e fits the third block";
  held.clear();
  EXPECT_EQ(be->tracker().current_total(), 0u);
}

// The arena is reserved exactly for the model here, so any allocation from it would be an error.
TEST(DeviceBackendArena, LogitsComeFromThePlanAndKvCachesTakeBlocksOfTheirOwn) {
  const LlamaConfig cfg = tiny_config(32);
  LlamaWeights w = init_random_weights(cfg, DType::BF16, 3, 0.2f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  be->reserve(LlamaModel::memory_plan(w, test::lora_r8(), CheckpointPolicy::None, 8, *be).total);
  LlamaModel m(std::move(w), test::lora_r8(), CheckpointPolicy::None, 8, *be);
  const test::BatchData data = synthetic_batch(1, 8, cfg.vocab, 4);
  std::vector<float> all(size_t(8 * cfg.vocab));
  m.forward_logits(data.view(), all.data());
  EXPECT_EQ(be->device_blocks(), 1u);
  const size_t before = be->tracker().current(MemTag::Activations);
  {
    KvCache kv = m.make_kv_cache(12);
    EXPECT_EQ(be->device_blocks(), 3u);  // the arena, the keys and the values
    const size_t per = size_t(cfg.n_layers) * 12 * size_t(cfg.kv_dim()) * sizeof(float);
    EXPECT_EQ(be->tracker().current(MemTag::Activations), before + 2 * per);
    const std::vector<int32_t> prompt = {1, 5, 9};
    std::vector<float> logits(size_t(cfg.vocab));
    m.decode(kv, prompt.data(), 3, logits.data());
  }
  EXPECT_EQ(be->tracker().current(MemTag::Activations), before);
}

// ---- the plan against what the model allocates ---------------------------------------------

struct PlanCase {
  const char* name;
  CheckpointPolicy policy;
  bool bias, tied;
  DType dtype;
  uint32_t targets;
  int64_t max_tokens;
};

LlamaConfig case_config(const PlanCase& p) {
  LlamaConfig c = tiny_config(48);
  c.attention_bias = p.bias;
  c.tie_embeddings = p.tied;
  return c;
}

LoraConfig case_lora(const PlanCase& p) {
  LoraConfig l = test::lora_r8();
  l.targets = p.targets;
  return l;
}

void PrintTo(const PlanCase& p, std::ostream* os) {
  *os << p.name;
}

class PlanMatches : public ::testing::TestWithParam<PlanCase> {};

TEST_P(PlanMatches, WhatTheModelAllocatesOnCpu) {
  const PlanCase& p = GetParam();
  LlamaWeights w = init_random_weights(case_config(p), p.dtype, 5, 0.2f);
  const MemoryPlan plan = LlamaModel::memory_plan(w, case_lora(p), p.policy, p.max_tokens, cpu_backend());
  EXPECT_EQ(plan.total, plan.requested()) << "the cpu backend pads nothing";
  EXPECT_EQ(plan.bytes(MemTag::Weights), 0u) << "the cpu backend reads the weights where they are";
  MemTracker& t = MemTracker::instance();
  std::array<size_t, kMemTagCount> before{};
  for (size_t i = 0; i < kMemTagCount; ++i) before[i] = t.current(MemTag(i));
  LlamaModel m(std::move(w), case_lora(p), p.policy, p.max_tokens);
  for (size_t i = 0; i < kMemTagCount; ++i)
    EXPECT_EQ(t.current(MemTag(i)) - before[i], plan.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
}

TEST_P(PlanMatches, WhatTheModelAllocatesOnSimtExactly) {
  const PlanCase& p = GetParam();
  const LlamaConfig cfg = case_config(p);
  LlamaWeights w = init_random_weights(cfg, p.dtype, 5, 0.2f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  const MemoryPlan plan = LlamaModel::memory_plan(w, case_lora(p), p.policy, p.max_tokens, *be);
  // Every matrix is placed as bf16 (2 bytes an element), vectors as they are.
  const int64_t matrices = int64_t(cfg.n_layers) * (int64_t(cfg.hidden) * (cfg.q_dim() + 2 * cfg.kv_dim()) +
                                                    int64_t(cfg.q_dim()) * cfg.hidden +
                                                    3 * int64_t(cfg.hidden) * cfg.intermediate) +
                           int64_t(cfg.vocab) * cfg.hidden * (p.tied ? 1 : 2);
  const int64_t vectors =
      int64_t(cfg.n_layers) * (2 * cfg.hidden + (p.bias ? cfg.q_dim() + 2 * cfg.kv_dim() : 0)) + cfg.hidden;
  const int64_t vector_bytes = p.dtype == DType::F32 ? 4 : 2;
  EXPECT_EQ(plan.bytes(MemTag::Weights), size_t(2 * matrices + vector_bytes * vectors));

  be->reserve(plan.total);
  LlamaModel m(std::move(w), case_lora(p), p.policy, p.max_tokens, *be);
  for (size_t i = 0; i < kMemTagCount; ++i)
    EXPECT_EQ(be->tracker().current(MemTag(i)), plan.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
  // The arena is exactly full: the plan counted every piece with its padding.
  const std::string msg = error_of([&] { be->alloc(1, MemTag::Workspace, "one more byte"); });
  EXPECT_NE(msg.find("'one more byte' (1 bytes) does not fit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("largest free piece 0 bytes"), std::string::npos) << msg;
  EXPECT_EQ(be->device_blocks(), 1u);
}

// With the per-layer weights streamed from host memory, the arena holds the global weights and two
// slots of the largest block, each tensor in its footprint, and is exactly full.
TEST_P(PlanMatches, WhatTheModelAllocatesOnSimtExactlyWithStreamedBlocks) {
  const PlanCase& p = GetParam();
  if (p.dtype == DType::F32) GTEST_SKIP() << "the device streams no f32 matrices (it places them as bf16)";
  const LlamaConfig cfg = case_config(p);
  LlamaWeights w = init_random_weights(cfg, p.dtype, 5, 0.2f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  const MemoryPlan plan =
      LlamaModel::memory_plan(w, case_lora(p), p.policy, p.max_tokens, *be, offload::WeightTier::Host);
  size_t block = 0;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot s, int layer) {
    if (is_layer_slot(s) && layer == 0) block += be->footprint(be->placed_weight_bytes(w.slot(s, layer)));
  });
  size_t globals = 0;
  for (const WeightRef* g : {&w.embed, &w.final_norm, &w.lm_head})
    if (g != &w.lm_head || !p.tied) globals += be->placed_weight_bytes(*g);
  EXPECT_EQ(plan.bytes(MemTag::Weights), globals + 2 * block);
  EXPECT_EQ(
      plan.streamed_bytes,
      LlamaModel::memory_plan(w, case_lora(p), p.policy, p.max_tokens, *be).bytes(MemTag::Weights) - globals)
      << "every per-layer tensor is copied once per pass, as placed";
  EXPECT_TRUE(plan.host.empty());

  be->reserve(plan.total);
  LlamaModel m(std::move(w), case_lora(p), p.policy, p.max_tokens, *be, offload::WeightTier::Host);
  for (size_t i = 0; i < kMemTagCount; ++i)
    EXPECT_EQ(be->tracker().current(MemTag(i)), plan.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
  const std::string msg = error_of([&] { be->alloc(1, MemTag::Workspace, "one more byte"); });
  EXPECT_NE(msg.find("largest free piece 0 bytes"), std::string::npos) << msg;
  EXPECT_EQ(be->device_blocks(), 1u);
}

constexpr uint32_t kAll = (1u << kLoraTargetCount) - 1;
constexpr uint32_t kQv = (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::V));

INSTANTIATE_TEST_SUITE_P(
    Configs, PlanMatches,
    ::testing::Values(
        PlanCase{"none_plain", CheckpointPolicy::None, false, false, DType::BF16, kAll, 16},
        PlanCase{"perblock_plain", CheckpointPolicy::PerBlock, false, false, DType::BF16, kAll, 16},
        PlanCase{"none_bias_tied_f32", CheckpointPolicy::None, true, true, DType::F32, kQv, 24},
        PlanCase{"perblock_bias_f32", CheckpointPolicy::PerBlock, true, false, DType::F32, kAll, 7},
        PlanCase{"perblock_tied_qv", CheckpointPolicy::PerBlock, false, true, DType::BF16, kQv, 40}),
    [](const ::testing::TestParamInfo<PlanCase>& p) { return std::string(p.param.name); });

// With the block inputs offloaded, the device holds a window of three of them instead of all
// n_layers + 1, and host memory the n_layers the backward brings back; both exactly what the model
// takes (the arena full, the process's tracker grown by the host list).
TEST(PlanOffload, TheDeviceHoldsTheWindowAndTheHostTheSavedInputsExactly) {
  LlamaConfig cfg = tiny_config(48);
  cfg.n_layers = 6;
  const int64_t N = 16, H = cfg.hidden;
  const LoraConfig lora = test::lora_r8();
  LlamaWeights w = init_random_weights(cfg, DType::BF16, 5, 0.2f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  const MemoryPlan kept = LlamaModel::memory_plan(w, lora, CheckpointPolicy::PerBlock, N, *be);
  const MemoryPlan plan = LlamaModel::memory_plan(w, lora, CheckpointPolicy::PerBlockOffload, N, *be);
  EXPECT_EQ(kept.bytes(MemTag::Activations) - plan.bytes(MemTag::Activations),
            size_t((cfg.n_layers + 1 - 3) * N * H) * sizeof(float));
  ASSERT_EQ(plan.host.size(), 1u);
  EXPECT_EQ(plan.host[0].what, "saved block inputs");
  EXPECT_EQ(plan.host[0].tag, MemTag::Activations);
  EXPECT_EQ(plan.host[0].bytes, size_t(cfg.n_layers * N * H) * sizeof(float));
  EXPECT_TRUE(kept.host.empty());

  MemTracker& host = MemTracker::instance();
  const size_t host_before = host.current(MemTag::Activations);
  be->reserve(plan.total);
  LlamaModel m(std::move(w), lora, CheckpointPolicy::PerBlockOffload, N, *be);
  for (size_t i = 0; i < kMemTagCount; ++i)
    EXPECT_EQ(be->tracker().current(MemTag(i)), plan.bytes(MemTag(i))) << mem_tag_name(MemTag(i));
  EXPECT_EQ(host.current(MemTag::Activations) - host_before, plan.host[0].bytes);
  const std::string msg = error_of([&] { be->alloc(1, MemTag::Workspace, "one more byte"); });
  EXPECT_NE(msg.find("largest free piece 0 bytes"), std::string::npos) << msg;
  EXPECT_EQ(be->device_blocks(), 1u);
}

// ---- no device allocation after the first step ---------------------------------------------

// rt::scratch slots of the simulated runtime (kernels/sim/runtime.cpp).
constexpr int kScratchSlots = 64;

// Where each launcher scratch slot lives now. rt::scratch(slot, 0) never grows a slot in use, and
// the simulator never reuses the addresses of a freed allocation, so a slot that grew later shows
// a different address. (A slot no launcher used yet gets an empty allocation here; growing it later
// shows as well.)
std::vector<void*> scratch_addresses() {
  std::vector<void*> out;
  for (int s = 0; s < kScratchSlots; ++s) out.push_back(simt::rt::scratch(s, 0));
  return out;
}

TEST(NoDeviceAllocation, AfterTheFirstTrainingStep) {
  const LlamaConfig cfg = tiny_config(40);
  LoraConfig lora = test::lora_r8();
  lora.dropout = 0.1f;
  LlamaWeights w = init_random_weights(cfg, DType::BF16, 11, 0.25f);
  const std::unique_ptr<Backend> be = make_backend("simt");
  constexpr int kBatch = 2, kSeq = 12;
  be->reserve(LlamaModel::memory_plan(w, lora, CheckpointPolicy::PerBlock, kBatch * kSeq, *be).total);
  LlamaModel m(std::move(w), lora, CheckpointPolicy::PerBlock, kBatch * kSeq, *be);
  TrainConfig tc;
  tc.lr.total_steps = 4;
  Trainer trainer(m, tc);
  const auto step = [&](int s) {
    const test::BatchData data = synthetic_batch(kBatch, kSeq, cfg.vocab, uint64_t(s), 7, 2);
    const Batch b = data.view(true);
    ASSERT_FALSE(trainer.step({&b, 1}).skipped);
  };
  step(0);
  const size_t blocks = be->device_blocks(), current = be->tracker().current_total();
  const std::vector<void*> scratch = scratch_addresses();
  be->tracker().reset_peaks();
  for (int s = 1; s < 4; ++s) step(s);
  EXPECT_EQ(be->device_blocks(), blocks) << "the arena took device memory after step 1";
  EXPECT_EQ(blocks, 1u);
  EXPECT_EQ(be->tracker().current_total(), current);
  EXPECT_EQ(be->tracker().peak_total(), current) << "a step allocated from the arena";
  const std::vector<void*> later = scratch_addresses();
  for (int s = 0; s < kScratchSlots; ++s)
    EXPECT_EQ(later[size_t(s)], scratch[size_t(s)]) << "rt::scratch slot " << s << " grew after step 1";
}

}  // namespace
}  // namespace tf
