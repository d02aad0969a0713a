// The SIMT simulator's checker: kernels with planted bugs, each of which must end its launch with a
// message naming the kernel and the bug, and the fixed kernels, which must pass.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/cuda/port.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"
#include "tests/sim_test_util.h"

using tf::sim::DeviceBuffer;
namespace port = tf::port;

namespace {

using tf::test::expect_contains;
using tf::test::launch_error;

// Every test with a planted bug runs under several seeds: a checker that only catches a bug under
// a lucky thread order would fail here.
constexpr uint64_t kSeeds[] = {1, 2, 3, 17};

// ---- planted bug: missing barrier -------------------------------------------------------------------

// Tree reduction in shared memory. Each level reads what other threads wrote at the level before,
// so a barrier must separate the levels.
template <bool kBarrier>
__global__ void tree_sum(port::gptr<const float> x, port::gptr<float> out) {
  TF_SHARED(float, vals, 128);
  const int t = int(threadIdx.x);
  vals[t] = x[t];
  __syncthreads();
  for (int stride = 64; stride > 0; stride /= 2) {
    if (t < stride) vals[t] += float(vals[t + stride]);
    if (kBarrier) __syncthreads();
  }
  if (t == 0) out[0] = vals[0];
}

TEST(SimtPlantedBug, MissingBarrierIsReportedAsARace) {
  const auto x = tf::test::random_floats(128, 5);
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer out(sizeof(float), "out", sizeof(float));
  for (uint64_t seed : kSeeds) {
    tf::sim::set_seed(seed);
    const std::string msg = launch_error([&] {
      tf::sim::launch("tree_sum_missing_barrier", tree_sum<false>, 1, 128, 0, dx.as<float>(),
                      out.as<float>());
    });
    expect_contains(msg, {"shared-memory race", "kernel 'tree_sum_missing_barrier'", "block (0,0,0)",
                          "'vals'[", "no barrier between"});
  }
  tf::sim::set_seed(1);
  tf::sim::launch("tree_sum", tree_sum<true>, 1, 128, 0, dx.as<float>(), out.as<float>());
  double want = 0, mag = 0;
  for (float v : x) want += v, mag += std::fabs(v);
  // 127 f32 additions: at most 127 u sum|x|.
  EXPECT_NEAR(out.to_vector<float>()[0], want, 127.0 / (1 << 24) * mag);
}

// ---- planted bug: shared-memory race (non-atomic histogram) -----------------------------------------

template <bool kAtomic>
__global__ void histogram(port::gptr<const int> keys, int n, port::gptr<int> counts) {
  TF_SHARED(int, bins, 8);
  const int t = int(threadIdx.x);
  if (t < 8) bins[t] = 0;
  __syncthreads();
  for (int i = t; i < n; i += int(blockDim.x)) {
    if (kAtomic) {
      atomicAdd(bins + keys[i], 1);
    } else {
      bins[keys[i]] += 1;
    }
  }
  __syncthreads();
  if (t < 8) atomicAdd(counts + t, int(bins[t]));
}

TEST(SimtPlantedBug, UnsynchronisedSharedUpdatesAreARace) {
  std::vector<int> keys(512);
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = int(i * 7 % 8);
  auto dk = DeviceBuffer::from(keys, "keys");
  for (uint64_t seed : kSeeds) {
    tf::sim::set_seed(seed);
    auto counts = DeviceBuffer::from(std::vector<int>(8, 0), "counts");
    const std::string msg = launch_error([&] {
      tf::sim::launch("histogram_plain_add", histogram<false>, 1, 64, 0, dk.as<int>(), 512, counts.as<int>());
    });
    expect_contains(msg, {"shared-memory race", "kernel 'histogram_plain_add'", "'bins'["});
  }
  tf::sim::set_seed(1);
  auto counts = DeviceBuffer::from(std::vector<int>(8, 0), "counts");
  tf::sim::launch("histogram", histogram<true>, 1, 64, 0, dk.as<int>(), 512, counts.as<int>());
  EXPECT_EQ(counts.to_vector<int>(), std::vector<int>(8, 64));  // atomics on shared memory are not races
}

// ---- planted bug: off-by-one tile edge ---------------------------------------------------------------

// Transposes an n x n matrix through 16x16 shared tiles (padded by one column against bank
// conflicts). The buggy edge test lets the last tile column one past the matrix through.
template <bool kOffByOne>
__global__ void transpose(port::gptr<const float> in, port::gptr<float> out, int n) {
  TF_SHARED(float, tile, 16 * 17);
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  const int x = int(blockIdx.x) * 16 + tx, y = int(blockIdx.y) * 16 + ty;
  if (x < n && y < n) tile[ty * 17 + tx] = in[y * n + x];
  __syncthreads();
  const int ox = int(blockIdx.y) * 16 + tx, oy = int(blockIdx.x) * 16 + ty;
  if ((kOffByOne ? ox <= n : ox < n) && oy < n) out[oy * n + ox] = tile[tx * 17 + ty];
}

TEST(SimtPlantedBug, OffByOneTileEdgeIsCaught) {
  const int n = 40;  // 3 x 3 tiles, the last ones partial
  const auto x = tf::test::random_floats(size_t(n * n), 9);
  auto din = DeviceBuffer::from(x, "in");
  DeviceBuffer dout(size_t(n * n) * sizeof(float), "out", sizeof(float));
  const dim3 grid(3, 3), block(16, 16);
  for (uint64_t seed : kSeeds) {
    tf::sim::set_seed(seed);
    const std::string msg = launch_error([&] {
      tf::sim::launch("transpose_edge_off_by_one", transpose<true>, grid, block, 0, din.as<float>(),
                      dout.as<float>(), n);
    });
    // Inside the matrix the stray column lands in the next row, which only a wrong result shows;
    // either a shared tile element nobody loaded or the end of 'out' gives it away.
    const bool uninit = msg.find("uninitialised shared memory") != std::string::npos;
    expect_contains(msg, {"kernel 'transpose_edge_off_by_one'", uninit ? "'tile'[" : "out-of-bounds"});
  }
  tf::sim::set_seed(1);
  tf::sim::launch("transpose", transpose<false>, grid, block, 0, din.as<float>(), dout.as<float>(), n);
  const auto got = dout.to_vector<float>();
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) ASSERT_EQ(got[size_t(j * n + i)], x[size_t(i * n + j)]) << i << "," << j;
  }
}

// ---- planted bug: out-of-bounds write ----------------------------------------------------------------

// Grid rounded up to whole blocks with no guard for the tail.
template <bool kGuard>
__global__ void scale(port::gptr<float> v, int n, float s) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (!kGuard || i < n) v[i] = float(v[i]) * s;
}

TEST(SimtPlantedBug, OutOfBoundsWriteNamesBufferAndElement) {
  auto v = DeviceBuffer::from(std::vector<float>(100, 1.0f), "v");
  tf::sim::set_seed(1);
  // 100 elements, 2 blocks of 64: threads 100..127 of the grid run past the end. Reads come first,
  // so the first report is the read of v[100] or later.
  const std::string msg = launch_error(
      [&] { tf::sim::launch("scale_unguarded", scale<false>, 2, 64, 0, v.as<float>(), 100, 2.0f); });
  expect_contains(msg, {"out-of-bounds read of 4 bytes", "kernel 'scale_unguarded'", "block (1,0,0)",
                        "global buffer 'v'[", "bytes past its end"});
  auto fresh = DeviceBuffer::from(std::vector<float>(100, 1.0f), "v");  // the failed launch wrote part of v
  tf::sim::launch("scale", scale<true>, 2, 64, 0, fresh.as<float>(), 100, 2.0f);
  for (float x : fresh.to_vector<float>()) ASSERT_EQ(x, 2.0f);
}

__global__ void write_past_end(port::gptr<int> v) {
  v[int(threadIdx.x) + 1] = 7;
}

TEST(SimtPlantedBug, OutOfBoundsWriteNamesTheThreadAndElement) {
  auto v = DeviceBuffer::from(std::vector<int>(32, 0), "v");
  const std::string msg =
      launch_error([&] { tf::sim::launch("write_past_end", write_past_end, 1, 32, 0, v.as<int>()); });
  expect_contains(msg, {"out-of-bounds write of 4 bytes", "thread (31,0,0)", "global buffer 'v'[32]",
                        "4 bytes past its end"});
}

// ---- planted bug: wrong fragment lane mapping ---------------------------------------------------------

// A [16,16] times B [16,8] on one mma. The buggy variant swaps registers a1 and a2 of the A
// fragment (rows + 8 and columns + 8 confused), a mistake hardware would also compute silently.
template <bool kWrongLayout>
__global__ void mma_tile(port::gptr<const uint16_t> a, port::gptr<const uint16_t> b, port::gptr<float> d) {
  const int lane = int(threadIdx.x), group = lane / 4, in_group = lane % 4;
  uint32_t af[4], bf[2];
  for (int reg = 0; reg < 4; ++reg) {
    const int layout_reg = kWrongLayout && (reg == 1 || reg == 2) ? 3 - reg : reg;
    const int row = group + (layout_reg % 2) * 8, col = in_group * 2 + (layout_reg / 2) * 8;
    af[reg] = uint32_t(uint16_t(a[row * 16 + col])) | uint32_t(uint16_t(a[row * 16 + col + 1])) << 16;
  }
  for (int reg = 0; reg < 2; ++reg) {
    const int k = in_group * 2 + reg * 8;
    bf[reg] = uint32_t(uint16_t(b[k * 8 + group])) | uint32_t(uint16_t(b[(k + 1) * 8 + group])) << 16;
  }
  const float zero[4] = {0, 0, 0, 0};
  float df[4];
  port::mma_m16n8k16_bf16(df, af, bf, zero);
  for (int i = 0; i < 4; ++i) d[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2] = df[i];
}

double mma_tile_error(bool wrong) {
  const auto a = tf::test::to_bf16(tf::test::random_floats(256, 3));
  const auto b = tf::test::to_bf16(tf::test::random_floats(128, 4));
  auto da = DeviceBuffer::from(a, "a"), db = DeviceBuffer::from(b, "b");
  DeviceBuffer dd(128 * sizeof(float), "d", sizeof(float));
  tf::sim::launch(wrong ? "mma_tile_wrong_layout" : "mma_tile", wrong ? mma_tile<true> : mma_tile<false>, 1,
                  32, 0, da.as<uint16_t>(), db.as<uint16_t>(), dd.as<float>());
  std::vector<double> want(128, 0.0);
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      for (int k = 0; k < 16; ++k) {
        want[size_t(r * 8 + n)] +=
            double(tf::bf16_to_f32(a[size_t(r * 16 + k)])) * tf::bf16_to_f32(b[size_t(k * 8 + n)]);
      }
    }
  }
  return tf::test::rel_norm_error(dd.to_vector<float>(), want);
}

TEST(SimtPlantedBug, WrongFragmentLaneMappingGivesWrongResults) {
  // Right layout: 16 exact products summed in f32, relative error within 16 u = 1e-6; a swapped
  // register mixes in other rows' products, an O(1) relative error.
  EXPECT_LT(mma_tile_error(false), 1e-6);
  const double wrong = mma_tile_error(true);
  EXPECT_GT(wrong, 0.3)
      << "mma_tile_wrong_layout: swapping A fragment registers a1/a2 should change D entirely";
}

// ---- other checks --------------------------------------------------------------------------------------

__global__ void read_unwritten(port::gptr<float> out) {
  TF_SHARED(float, scratch, 64);
  if (threadIdx.x < 32) scratch[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = scratch[threadIdx.x];
}

TEST(SimtCheck, UninitialisedSharedReadIsReported) {
  DeviceBuffer out(64 * sizeof(float), "out", sizeof(float));
  const std::string msg =
      launch_error([&] { tf::sim::launch("read_unwritten", read_unwritten, 1, 64, 0, out.as<float>()); });
  expect_contains(
      msg, {"read of uninitialised shared memory", "kernel 'read_unwritten'", "shared array 'scratch'["});
}

__global__ void early_exit_then_barrier(port::gptr<float> out) {
  if (threadIdx.x % 2 == 1) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_barriers(port::gptr<float> out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

TEST(SimtCheck, BarrierNotReachedByEveryThreadIsReported) {
  DeviceBuffer out(64 * sizeof(float), "out", sizeof(float));
  for (uint64_t seed : kSeeds) {
    tf::sim::set_seed(seed);
    const std::string msg = launch_error([&] {
      tf::sim::launch("early_exit_then_barrier", early_exit_then_barrier, 1, 64, 0, out.as<float>());
    });
    expect_contains(msg,
                    {"barrier not reached by every thread", "kernel 'early_exit_then_barrier'", "exited"});
  }
  tf::sim::set_seed(1);
  const std::string msg = launch_error(
      [&] { tf::sim::launch("divergent_barriers", divergent_barriers, 1, 64, 0, out.as<float>()); });
  expect_contains(
      msg, {"meet at different __syncthreads", "kernel 'divergent_barriers'", "test_simt_checks.cpp:"});
}

__global__ void mismatched_masks(port::gptr<int> out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_sync(mask, int(threadIdx.x), 0);
}

__global__ void shuffle_from_outside_mask(port::gptr<int> out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, int(threadIdx.x), 16);
}

TEST(SimtCheck, WarpCollectiveMaskProblemsAreReported) {
  DeviceBuffer out(32 * sizeof(int), "out", sizeof(int));
  for (uint64_t seed : kSeeds) {
    tf::sim::set_seed(seed);
    const std::string msg =
        launch_error([&] { tf::sim::launch("mismatched_masks", mismatched_masks, 1, 32, 0, out.as<int>()); });
    expect_contains(msg, {"warp collective mismatch", "kernel 'mismatched_masks'", "0xffff", "0xffffffff"});
  }
  tf::sim::set_seed(1);
  const std::string msg = launch_error([&] {
    tf::sim::launch("shuffle_from_outside_mask", shuffle_from_outside_mask, 1, 32, 0, out.as<int>());
  });
  expect_contains(msg,
                  {"reads lane 1", "which is not in the mask 0xffff", "kernel 'shuffle_from_outside_mask'"});
}

__global__ void big_static_smem(port::gptr<float> out) {
  TF_SHARED(float, big, 12289);  // 49156 bytes, just over 48 KB
  big[threadIdx.x] = 0.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void use_dynamic(port::gptr<float> out) {
  TF_DYNAMIC_SHARED(float, dyn);
  dyn[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x];
}

TEST(SimtCheck, LimitsOfSm90AreEnforced) {
  DeviceBuffer out(1024 * sizeof(float), "out", sizeof(float));
  expect_contains(launch_error([&] {
                    tf::sim::launch("too_many_threads", use_dynamic, 1, dim3(512, 3), 0, out.as<float>());
                  }),
                  {"1536 threads per block", "limit of 1024", "too_many_threads"});
  expect_contains(launch_error([&] {
                    tf::sim::launch("deep_block", use_dynamic, 1, dim3(1, 1, 65), 0, out.as<float>());
                  }),
                  {"block dimensions exceed", "deep_block"});
  expect_contains(
      launch_error([&] { tf::sim::launch("wide_block", use_dynamic, 1, 1025, 0, out.as<float>()); }),
      {"block dimensions exceed", "wide_block"});
  expect_contains(launch_error([&] {
                    tf::sim::launch("too_much_dynamic", use_dynamic, 1, 32, 227 * 1024 + 1, out.as<float>());
                  }),
                  {"232449 bytes of dynamic shared memory", "too_much_dynamic"});
  expect_contains(
      launch_error([&] { tf::sim::launch("big_static_smem", big_static_smem, 1, 32, 0, out.as<float>()); }),
      {"static shared memory", "'big'", "48 KB", "big_static_smem"});
  // Dynamic shared memory up to the opt-in limit works, and its bounds are its launch size.
  tf::sim::launch("use_dynamic", use_dynamic, 1, 1024, 227 * 1024, out.as<float>());
  EXPECT_EQ(out.to_vector<float>()[5], 6.0f);
  expect_contains(
      launch_error([&] { tf::sim::launch("use_dynamic", use_dynamic, 1, 64, 128, out.as<float>()); }),
      {"out-of-bounds write", "shared array 'dynamic'", "of 128)", "past its end"});
}

__global__ void copy_one(port::gptr<const float> in, port::gptr<float> out) {
  out[threadIdx.x] = in[threadIdx.x];
}

TEST(SimtCheck, HostPointersAndNullPointersAreRejected) {
  std::vector<float> host(32, 1.0f);
  DeviceBuffer out(32 * sizeof(float), "out", sizeof(float));
  expect_contains(
      launch_error([&] { tf::sim::launch("copy_one", copy_one, 1, 32, 0, host.data(), out.as<float>()); }),
      {"not in any sim::DeviceBuffer"});
  expect_contains(launch_error([&] {
                    tf::sim::launch("copy_one", copy_one, 1, 32, 0, static_cast<const float*>(nullptr),
                                    out.as<float>());
                  }),
                  {"read of 4 bytes through a null pointer", "kernel 'copy_one'"});
}

// cp.async lands at the wait that retires its group; reading before that reads stale memory.
template <bool kWait>
__global__ void async_copy(port::gptr<const float> in, port::gptr<float> out) {
  TF_SHARED(float, stage, 128);
  const int t = int(threadIdx.x);
  port::cp_async_16(stage + 4 * t, in + 4 * t);
  port::cp_async_commit();
  if (kWait) port::cp_async_wait<0>();
  __syncthreads();
  out[t] = stage[(4 * t + 5) % 128];
}

TEST(SimtCheck, CpAsyncDataIsVisibleOnlyAfterItsWait) {
  const auto x = tf::test::random_floats(128, 2);
  auto din = DeviceBuffer::from(x, "in");
  DeviceBuffer out(32 * sizeof(float), "out", sizeof(float));
  expect_contains(launch_error([&] {
                    tf::sim::launch("async_copy_no_wait", async_copy<false>, 1, 32, 0, din.as<float>(),
                                    out.as<float>());
                  }),
                  {"read of uninitialised shared memory", "'stage'["});
  tf::sim::launch("async_copy", async_copy<true>, 1, 32, 0, din.as<float>(), out.as<float>());
  const auto got = out.to_vector<float>();
  for (size_t t = 0; t < 32; ++t) ASSERT_EQ(got[t], x[(4 * t + 5) % 128]);
}

// A cp.async may land at any time between its issue and its wait, so issuing one into shared
// memory that another thread read since the last barrier is a race even when its wait comes after
// a barrier: the double-buffering bug of refilling a stage before every thread is done with it.
template <bool kBarrier>
__global__ void refill_stage(port::gptr<const float> in, port::gptr<float> out) {
  TF_SHARED(float, stage, 128);
  const int t = int(threadIdx.x);
  port::cp_async_16(stage + 4 * t, in + 4 * t);
  port::cp_async_commit();
  port::cp_async_wait<0>();
  __syncthreads();
  const float first = stage[(4 * t + 5) % 128];
  if (kBarrier) __syncthreads();
  port::cp_async_16(stage + 4 * t, in + 128 + 4 * t);
  port::cp_async_commit();
  __syncthreads();
  port::cp_async_wait<0>();
  __syncthreads();
  out[t] = first + stage[(4 * t + 5) % 128];
}

TEST(SimtCheck, CpAsyncIntoSharedMemoryOthersStillReadIsARace) {
  const auto x = tf::test::random_floats(256, 3);
  auto din = DeviceBuffer::from(x, "in");
  DeviceBuffer out(32 * sizeof(float), "out", sizeof(float));
  expect_contains(launch_error([&] {
                    tf::sim::launch("refill_stage_early", refill_stage<false>, 1, 32, 0, din.as<float>(),
                                    out.as<float>());
                  }),
                  {"shared-memory race (write after read)", "'stage'["});
  tf::sim::launch("refill_stage", refill_stage<true>, 1, 32, 0, din.as<float>(), out.as<float>());
  const auto got = out.to_vector<float>();
  for (size_t t = 0; t < 32; ++t) ASSERT_EQ(got[t], x[(4 * t + 5) % 128] + x[128 + (4 * t + 5) % 128]);
}

}  // namespace
