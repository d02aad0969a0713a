// defines: tests of the simulator's global-memory race check (between threads of a block and
// between blocks of one launch) and of interleaved blocks: kernels with planted bugs that must be
// reported, and their fixed versions, which must pass.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/cuda/port.h"
#include "src/core/error.h"
#include "tests/sim_test_util.h"

using tf::sim::DeviceBuffer;
namespace port = tf::port;

namespace {

using tf::test::expect_contains;
using tf::test::launch_error;

// Every planted bug runs under several seeds (thread and block orders change with them), with
// blocks one after another and interleaved.
constexpr uint64_t kSeeds[] = {1, 2, 3, 17};
constexpr unsigned kInterleave[] = {1, 3};

struct SimSettings {
  SimSettings(uint64_t seed, unsigned interleave) {
    tf::sim::set_seed(seed);
    tf::sim::set_block_interleave(interleave);
  }
  ~SimSettings() {
    tf::sim::set_seed(1);
    tf::sim::set_block_interleave(1);
  }
};

// ---- between blocks ---------------------------------------------------------------------------------

// Block 1 reads what block 0 writes; nothing orders blocks within a launch.
template <bool kSeparateLaunches>
__global__ void pass_between_blocks(port::gptr<float> buf, port::gptr<float> out, int phase) {
  const int t = int(threadIdx.x);
  if (kSeparateLaunches) {
    if (phase == 0 && blockIdx.x == 0) buf[t] = float(t);
    if (phase == 1 && blockIdx.x == 1) out[t] = buf[t];
    return;
  }
  if (blockIdx.x == 0) buf[t] = float(t);
  if (blockIdx.x == 1) out[t] = buf[t];
}

__global__ void pass_across_a_barrier(port::gptr<float> buf, port::gptr<float> out) {
  const int t = int(threadIdx.x);
  if (blockIdx.x == 0) {
    __syncthreads();
    buf[t] = float(t);
  } else {
    out[t] = buf[t];
    __syncthreads();
  }
}

TEST(SimGlobalRace, ABlockReadingWhatAnotherBlockWritesIsReported) {
  DeviceBuffer buf(32 * sizeof(float), "partials", sizeof(float));
  DeviceBuffer out(32 * sizeof(float), "out", sizeof(float));
  for (unsigned il : kInterleave) {
    for (uint64_t seed : kSeeds) {
      SimSettings settings(seed, il);
      const std::string msg = launch_error([&] {
        tf::sim::launch("pass_between_blocks", pass_between_blocks<false>, 2, 32, 0, buf.as<float>(),
                        out.as<float>(), 0);
      });
      // Whichever block ran first, the other one's access is the second of the pair.
      expect_contains(msg, {"global-memory race", "kernel 'pass_between_blocks'", "global buffer 'partials'[",
                            "of block (0,0,0)", "of block (1,0,0)", "not ordered within a launch"});
    }
  }
  // A barrier orders the threads of one block only: block 0 writes after one, block 1 reads before.
  for (uint64_t seed : kSeeds) {
    SimSettings settings(seed, 1);
    expect_contains(launch_error([&] {
                      tf::sim::launch("pass_across_a_barrier", pass_across_a_barrier, 2, 32, 0,
                                      buf.as<float>(), out.as<float>());
                    }),
                    {"global-memory race", "kernel 'pass_across_a_barrier'", "not ordered within a launch"});
  }
  // Two launches on one stream are ordered: the fixed version passes and moves the values.
  tf::sim::launch("pass_between_blocks", pass_between_blocks<true>, 2, 32, 0, buf.as<float>(),
                  out.as<float>(), 0);
  tf::sim::launch("pass_between_blocks", pass_between_blocks<true>, 2, 32, 0, buf.as<float>(),
                  out.as<float>(), 1);
  const auto got = out.to_vector<float>();
  for (int t = 0; t < 32; ++t) EXPECT_EQ(got[size_t(t)], float(t));
}

// ---- within a block --------------------------------------------------------------------------------

// Each thread writes its element, then reads its neighbour's: a barrier must separate the two.
template <bool kBarrier>
__global__ void rotate(port::gptr<float> buf, port::gptr<float> out) {
  const int t = int(threadIdx.x), n = int(blockDim.x);
  buf[t] = float(t) * 2.0f;
  if (kBarrier) __syncthreads();
  out[t] = buf[(t + 1) % n];
}

TEST(SimGlobalRace, NeighbourReadWithoutABarrierIsReported) {
  DeviceBuffer buf(64 * sizeof(float), "scratch", sizeof(float));
  DeviceBuffer out(64 * sizeof(float), "out", sizeof(float));
  for (uint64_t seed : kSeeds) {
    SimSettings settings(seed, 1);
    expect_contains(launch_error([&] {
                      tf::sim::launch("rotate_missing_barrier", rotate<false>, 1, 64, 0, buf.as<float>(),
                                      out.as<float>());
                    }),
                    {"global-memory race", "kernel 'rotate_missing_barrier'", "global buffer 'scratch'[",
                     "of block (0,0,0)", "missing __syncthreads"});
  }
  tf::sim::launch("rotate", rotate<true>, 1, 64, 0, buf.as<float>(), out.as<float>());
  const auto got = out.to_vector<float>();
  for (int t = 0; t < 64; ++t) EXPECT_EQ(got[size_t(t)], float((t + 1) % 64) * 2.0f);
}

// Neighbouring bytes written by different threads, read back by their writers, then atomics from
// every thread of every block: none of it races.
__global__ void bytes_and_atomics(port::gptr<uint8_t> bytes, port::gptr<int> count) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  bytes[i] = uint8_t(i);
  bytes[i] = uint8_t(uint8_t(bytes[i]) + 1);
  atomicAdd(count, 1);
}

TEST(SimGlobalRace, AdjacentBytesOwnElementsAndAtomicsAreNotRaces) {
  DeviceBuffer bytes(128, "mask", 1);
  auto count = DeviceBuffer::from(std::vector<int>{0}, "count");
  for (unsigned il : kInterleave) {
    SimSettings settings(2, il);
    count.as<int>()[0] = 0;
    tf::sim::launch("bytes_and_atomics", bytes_and_atomics, 4, 32, 0, bytes.as<uint8_t>(), count.as<int>());
    EXPECT_EQ(count.to_vector<int>()[0], 128);
    const auto got = bytes.to_vector<uint8_t>();
    for (int i = 0; i < 128; ++i) EXPECT_EQ(got[size_t(i)], uint8_t(i + 1));
  }
}

// A plain read of a counter other blocks update atomically in the same launch races with them.
__global__ void read_while_counting(port::gptr<int> count, port::gptr<int> seen) {
  atomicAdd(count, 1);
  if (threadIdx.x == 0) seen[blockIdx.x] = count[0];
}

TEST(SimGlobalRace, APlainReadOfAnAtomicCounterIsReported) {
  auto count = DeviceBuffer::from(std::vector<int>{0}, "count");
  DeviceBuffer seen(4 * sizeof(int), "seen", sizeof(int));
  for (uint64_t seed : kSeeds) {
    SimSettings settings(seed, 1);
    expect_contains(launch_error([&] {
                      tf::sim::launch("read_while_counting", read_while_counting, 4, 32, 0, count.as<int>(),
                                      seen.as<int>());
                    }),
                    {"global-memory race", "kernel 'read_while_counting'", "global buffer 'count'[0]"});
  }
}

// ---- block order ----------------------------------------------------------------------------------

// Takes a ticket per block and stores it as though tickets came in block index order.
__global__ void ticket_per_block(port::gptr<int> next, port::gptr<int> ticket) {
  if (threadIdx.x == 0) ticket[blockIdx.x] = atomicAdd(next, 1);
}

TEST(SimBlockOrder, CodeAssumingBlocksRunInIndexOrderSeesAnotherOrder) {
  for (unsigned il : kInterleave) {
    int in_order = 0;
    for (uint64_t seed : kSeeds) {
      SimSettings settings(seed, il);
      auto next = DeviceBuffer::from(std::vector<int>{0}, "next");
      DeviceBuffer ticket(8 * sizeof(int), "ticket", sizeof(int));
      tf::sim::launch("ticket_per_block", ticket_per_block, 8, 32, 0, next.as<int>(), ticket.as<int>());
      const auto got = ticket.to_vector<int>();
      bool identity = true;
      for (int b = 0; b < 8; ++b) identity = identity && got[size_t(b)] == b;
      in_order += identity;
    }
    EXPECT_LT(in_order, int(std::size(kSeeds))) << "every seed ran the blocks in index order";
  }
}

// Blocks interleaved at barriers: a block that spins on a flag only another block raises, with a
// barrier in the loop, finishes only if the other block runs while it waits.
__global__ void wait_for_block0(port::gptr<int> flag, port::gptr<int> out) {
  if (blockIdx.x == 0) {
    __syncthreads();
    if (threadIdx.x == 0) atomicExch(flag, 1);
    return;
  }
  TF_SHARED(int, seen, 1);
  int rounds = 0;
  for (;;) {
    // One thread looks, so that the whole block leaves the loop in the same round.
    if (threadIdx.x == 0) seen[0] = atomicAdd(flag, 0);
    __syncthreads();
    const int raised = seen[0];
    __syncthreads();
    if (raised || ++rounds == 1000) break;
  }
  if (threadIdx.x == 0) out[0] = rounds;
}

TEST(SimBlockOrder, InterleavedBlocksProgressSideBySide) {
  // One after another, block 1 either runs after block 0 (no wait) or gives up after 1000 rounds;
  // interleaved, under some seed it waits a few rounds and sees the flag.
  bool waited_and_saw = false;
  for (uint64_t seed : kSeeds) {
    SimSettings settings(seed, 2);
    auto flag = DeviceBuffer::from(std::vector<int>{0}, "flag");
    auto out = DeviceBuffer::from(std::vector<int>{-1}, "out");
    tf::sim::launch("wait_for_block0", wait_for_block0, 2, 32, 0, flag.as<int>(), out.as<int>());
    const int rounds = out.to_vector<int>()[0];
    EXPECT_GE(rounds, 0);
    waited_and_saw = waited_and_saw || (rounds > 0 && rounds < 1000);
  }
  EXPECT_TRUE(waited_and_saw);
}

}  // namespace
