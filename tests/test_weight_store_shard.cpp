// defines: tests of offload::WeightStore's shard tier (--shard-weights) with the ranks as threads of
// one process joined by an in-process all-gather: every block a rank acquires is the whole block,
// byte for byte, from the ranks' shares (f32 norms, bf16 kept in the file, NF4 with nested absmax,
// INT8; 2 and 3 ranks; on the cpu and, for one rank, on the simulated device); the shares are 1/N
// of the block and the tracker sees exactly the plan; the full tensors are let go; one rank is
// refused by name.
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "model_test_util.h"
#include "offload/weight_store.h"
#include "src/core/error.h"
#include "src/io/model_loader.h"
#include "src/io/spill.h"
#include "src/model/llama.h"
#include "tests/sim_test_util.h"
#include "tests/stream_test_util.h"
#include "tests/test_util.h"

namespace tf {
namespace {

using offload::WeightStore;
using offload::WeightTier;

// The ranks' all-gathers as one process's threads: the k-th gather of every rank forms round k,
// done once the last rank has started it (each rank's `mine` copied into every rank's `all`).
class Hub {
 public:
  explicit Hub(int ranks) : ranks_(ranks) {}
  uint64_t start(int rank, std::span<const std::byte> mine, std::span<std::byte> all) {
    std::lock_guard lock(mutex_);
    const uint64_t ticket = ++started_[size_t(rank)];
    if (rounds_.size() < ticket) rounds_.resize(ticket, Round(size_t(ranks_)));
    Round& r = rounds_[ticket - 1];
    r.mine[size_t(rank)] = mine;
    r.all[size_t(rank)] = all;
    if (++r.arrived == ranks_) {
      for (int to = 0; to < ranks_; ++to) {
        EXPECT_EQ(r.all[size_t(to)].size(), r.mine[0].size() * size_t(ranks_));
        for (int from = 0; from < ranks_; ++from) {
          EXPECT_EQ(r.mine[size_t(from)].size(), r.mine[0].size()) << "round " << ticket;
          std::memcpy(r.all[size_t(to)].data() + size_t(from) * r.mine[0].size(), r.mine[size_t(from)].data(),
                      r.mine[0].size());
        }
      }
      r.done = true;
      done_.notify_all();
    }
    return ticket;
  }
  void wait(uint64_t ticket) {
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return rounds_.size() >= ticket && rounds_[ticket - 1].done; });
  }

 private:
  struct Round {
    explicit Round(size_t n) : mine(n), all(n) {}
    std::vector<std::span<const std::byte>> mine;
    std::vector<std::span<std::byte>> all;
    int arrived = 0;
    bool done = false;
  };
  int ranks_;
  std::mutex mutex_;
  std::condition_variable done_;
  std::vector<Round> rounds_;
  std::vector<uint64_t> started_ = std::vector<uint64_t>(16, 0);
};

class ThreadExchange final : public offload::BlockExchange {
 public:
  ThreadExchange(Hub& hub, int rank, int size) : hub_(hub), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  uint64_t start_gather(std::span<const std::byte> mine, std::span<std::byte> all) override {
    return hub_.start(rank_, mine, all);
  }
  void wait(uint64_t ticket) override { hub_.wait(ticket); }

 private:
  Hub& hub_;
  int rank_, size_;
};

// The bytes of every part (data, absmax, nested) of a block's slots, as they lie in host memory.
std::vector<std::string> block_bytes(const LlamaConfig& c, const BlockWeights& b) {
  std::vector<std::string> v;
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    if (!is_layer_slot(s) || layer != 0) return;
    const WeightRef& r = b.slot(s);
    const std::array<uint64_t, 3> parts = io::spill_parts(r);
    const std::array<const void*, 3> at = {r.data, r.scales.absmax, r.scales.nested};
    for (size_t i = 0; i < parts.size(); ++i)
      v.push_back(at[i] ? std::string(static_cast<const char*>(at[i]), parts[i]) : std::string());
  });
  return v;
}

// Each rank acquires the blocks in a training pass's order (forward 0..L-1, backward L-1..0, each
// with the next one prefetched) and checks each against `want`'s.
void run_pass(WeightStore& store, const LlamaWeights& want, int rank, std::vector<std::string>& failures) {
  const int L = want.config.n_layers;
  std::vector<int> order;
  for (int l = 0; l < L; ++l) order.push_back(l);
  for (int l = L - 1; l >= 0; --l) order.push_back(l);
  for (size_t i = 0; i < order.size(); ++i) {
    const int l = order[i], next = i + 1 < order.size() ? order[i + 1] : -1;
    const BlockWeights& got = store.acquire(l, next);
    if (block_bytes(want.config, got) != block_bytes(want.config, want.blocks[size_t(l)]))
      failures.push_back("rank " + std::to_string(rank) + ": block " + std::to_string(l) + " (acquire " +
                         std::to_string(i) + ") differs from the whole weights");
    store.release(l);
  }
}

LlamaConfig deep_config() {
  LlamaConfig c = test::tiny_config();
  c.n_layers = 4;  // with two, both blocks stay in the slots and no slot is ever refilled
  return c;
}

struct ShardCase {
  io::QuantMode quant;
  int ranks;
};

class ShardStore : public ::testing::TestWithParam<ShardCase> {};

TEST_P(ShardStore, EveryBlockGatheredIsTheWholeBlockAndTheSourcesGo) {
  const auto [quant, ranks] = GetParam();
  test::TempDir tmp;
  const std::string dir = test::write_bf16_model_dir(deep_config(), tmp.dir / "m");
  const io::LoadedModel want = io::load_model(dir, true, quant);
  std::vector<io::LoadedModel> loaded;
  for (int r = 0; r < ranks; ++r) loaded.push_back(io::load_model(dir, true, quant));
  Hub hub(ranks);
  std::vector<std::unique_ptr<ThreadExchange>> ex;
  std::vector<std::unique_ptr<WeightStore>> stores;
  MemTracker& t = MemTracker::instance();
  const size_t before = t.current(MemTag::Weights);
  const offload::StoreFootprint f =
      WeightStore::footprint(loaded[0].weights, WeightTier::Shard, cpu_backend(), ranks);
  ASSERT_EQ(f.backend.size(), 3u);
  EXPECT_EQ(f.backend[2].what, "weight shards");
  uint64_t block_total = 0;
  LlamaWeights::for_each_slot(want.weights.config, [&](WeightSlot s, int layer) {
    if (!is_layer_slot(s)) return;
    for (uint64_t p : io::spill_parts(want.weights.slot(s, layer))) block_total += p;
  });
  // A share is 1/N of a layer's bytes, rounded up per part and per share to 64 bytes.
  const uint64_t n_parts = 3 * 16 * uint64_t(want.weights.config.n_layers);
  EXPECT_GE(f.backend[2].bytes * uint64_t(ranks), block_total);
  EXPECT_LE(f.backend[2].bytes * uint64_t(ranks), block_total + 64 * n_parts + 64 * 4 * uint64_t(ranks));
  for (int r = 0; r < ranks; ++r) {
    ex.push_back(std::make_unique<ThreadExchange>(hub, r, ranks));
    stores.push_back(std::make_unique<WeightStore>(loaded[size_t(r)].weights, WeightTier::Shard,
                                                   cpu_backend(), ex.back().get()));
  }
  size_t planned = 0;
  for (const PlannedAlloc& a : f.backend) planned += a.bytes;
  EXPECT_EQ(t.current(MemTag::Weights) - before, planned * size_t(ranks));

  // The sources go: the owned tensors of a converted base are freed, and no block's slot points at
  // memory any more; the stores' shares hold everything.
  for (int r = 0; r < ranks; ++r) {
    LlamaWeights& w = loaded[size_t(r)].weights;
    const size_t held = t.current(MemTag::Weights);
    const uint64_t released = stores[size_t(r)]->release_sources(w);
    if (quant != io::QuantMode::Keep) {
      EXPECT_GT(released, 0u);
      EXPECT_LT(t.current(MemTag::Weights), held) << "rank " << r << " still holds its converted layers";
    }
    for (const BlockWeights& b : w.blocks) EXPECT_EQ(b.q.data, nullptr);
    EXPECT_EQ(w.blocks[0].q.dtype, want.weights.blocks[0].q.dtype);
    EXPECT_NE(w.embed.data, nullptr);
  }

  std::vector<std::vector<std::string>> failures(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      for (int pass = 0; pass < 2; ++pass) run_pass(*stores[size_t(r)], want.weights, r, failures[size_t(r)]);
    });
  for (std::thread& th : threads) th.join();
  for (const auto& v : failures)
    for (const std::string& s : v) ADD_FAILURE() << s;
}

INSTANTIATE_TEST_SUITE_P(Quant, ShardStore,
                         ::testing::Values(ShardCase{io::QuantMode::Keep, 2},
                                           ShardCase{io::QuantMode::Nf4, 2}, ShardCase{io::QuantMode::Nf4, 3},
                                           ShardCase{io::QuantMode::Int8, 3}),
                         [](const ::testing::TestParamInfo<ShardCase>& p) {
                           return std::string(io::quant_mode_name(p.param.quant)) + "_" +
                                  std::to_string(p.param.ranks) + "_ranks";
                         });

// One rank computes on the simulated device (its gathers land in a page-locked buffer and are
// copied into a device slot on the copy stream), the other on the cpu: the shares are the same
// bytes either way, and the device's blocks are those the device places from the whole weights.
TEST(ShardStoreDevice, ASimulatedDeviceRankGathersIntoItsSlotsTheBlocksItWouldPlace) {
  test::TempDir tmp;
  const std::string dir = test::write_bf16_model_dir(deep_config(), tmp.dir / "m");
  io::LoadedModel w0 = io::load_model(dir, true, io::QuantMode::Keep);
  io::LoadedModel w1 = io::load_model(dir, true, io::QuantMode::Keep);
  const std::unique_ptr<Backend> sim = make_backend("simt");
  Hub hub(2);
  ThreadExchange e0(hub, 0, 2), e1(hub, 1, 2);
  const offload::StoreFootprint f = WeightStore::footprint(w0.weights, WeightTier::Shard, *sim, 2);
  ASSERT_EQ(f.host.size(), 3u);
  EXPECT_EQ(f.host[2].what, "weight shards");
  WeightStore device(w0.weights, WeightTier::Shard, *sim, &e0);
  WeightStore host(w1.weights, WeightTier::Shard, cpu_backend(), &e1);
  device.release_sources(w0.weights);
  const LlamaWeights& want = w1.weights;
  std::vector<std::string> host_failures;
  std::thread other([&] { run_pass(host, want, 1, host_failures); });
  const int L = want.config.n_layers;
  std::vector<int> order;
  for (int l = 0; l < L; ++l) order.push_back(l);
  for (int l = L - 1; l >= 0; --l) order.push_back(l);
  for (size_t i = 0; i < order.size(); ++i) {
    const int l = order[i];
    const BlockWeights& got = device.acquire(l, i + 1 < order.size() ? order[i + 1] : -1);
    sim->synchronize();
    for (WeightSlot s : {WeightSlot::AttnNorm, WeightSlot::Q, WeightSlot::K, WeightSlot::Down}) {
      const WeightRef& ref = want.blocks[size_t(l)].slot(s);
      const size_t bytes = sim->placed_weight_bytes(ref);
      std::vector<DeviceMem> storage;
      const WeightRef placed = sim->place_weight(ref, "want", storage);
      sim->synchronize();
      std::string a(bytes, '\0'), b(bytes, '\0');
      sim->download(a.data(), got.slot(s).data, bytes);
      sim->download(b.data(), placed.data, bytes);
      EXPECT_TRUE(a == b) << "block " << l << " slot " << int(s) << " (acquire " << i << ")";
    }
    device.release(l);
  }
  other.join();
  for (const std::string& s : host_failures) ADD_FAILURE() << s;
}

TEST(ShardStoreRefusal, OneRankHasNothingToShareWith) {
  const LlamaWeights w = init_random_weights(test::tiny_config(), DType::BF16, 1);
  try {
    WeightStore::footprint(w, WeightTier::Shard, cpu_backend(), 1);
    ADD_FAILURE() << "a shard tier of one rank was accepted";
  } catch (const Error& e) {
    test::expect_contains(e.what(), {"--shard-weights", "mpirun -np N", "1 rank"});
  }
}

}  // namespace
}  // namespace tf
