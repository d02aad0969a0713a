// Correct kernels on the SIMT simulator against CPU references: the PTX fragment layouts, ldmatrix,
// mma.sync in bf16 and f16, a block reduction on warp shuffles, the tiled mma.sync GEMM of
// kernels/cuda/gemm_mma.cu, and the seeded thread order.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

#include "kernels/cuda/gemm_mma.h"
#include "kernels/cuda/port.h"
#include "kernels/sim/fragments.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"
#include "tests/sim_test_util.h"

using tf::sim::DeviceBuffer;
namespace port = tf::port;

namespace {

using tf::test::expect_bijection;

// Unit roundoff of f32.
constexpr double kU32 = 1.0 / (1 << 24);

TEST(SimtFragments, LayoutsCoverTheirTilesOnce) {
  expect_bijection(16, 16, 8, tf::sim::mma_a_coord);
  expect_bijection(16, 8, 4, tf::sim::mma_b_coord);
  expect_bijection(16, 8, 4, tf::sim::mma_c_coord);
  expect_bijection(8, 8, 2, [](int l, int h) { return tf::sim::ldmatrix_coord(l, h, false); });
  expect_bijection(8, 8, 2, [](int l, int h) { return tf::sim::ldmatrix_coord(l, h, true); });
}

TEST(SimtFragments, MatchThePtxIsaFormulas) {
  // Spot values read off the PTX ISA figures for mma.m16n8k16 (.bf16/.f16) and ldmatrix.
  EXPECT_EQ(tf::sim::mma_a_coord(0, 2).row, 8);   // a2: groupID + 8
  EXPECT_EQ(tf::sim::mma_a_coord(0, 4).col, 8);   // a4: column + 8
  EXPECT_EQ(tf::sim::mma_a_coord(5, 7).row, 9);   // lane 5: groupID 1, a7 row 1 + 8
  EXPECT_EQ(tf::sim::mma_a_coord(5, 7).col, 11);  // threadID_in_group 1: 2 + 1 + 8
  EXPECT_EQ(tf::sim::mma_b_coord(6, 3).row, 13);  // b3: 2 * 2 + 1 + 8
  EXPECT_EQ(tf::sim::mma_b_coord(6, 3).col, 1);
  EXPECT_EQ(tf::sim::mma_c_coord(31, 3).row, 15);
  EXPECT_EQ(tf::sim::mma_c_coord(31, 3).col, 7);
  EXPECT_EQ(tf::sim::ldmatrix_coord(9, 1, false).row, 2);
  EXPECT_EQ(tf::sim::ldmatrix_coord(9, 1, false).col, 3);
  EXPECT_EQ(tf::sim::ldmatrix_coord(9, 1, true).row, 3);
  EXPECT_EQ(tf::sim::ldmatrix_coord(9, 1, true).col, 2);
}

// ---- ldmatrix -------------------------------------------------------------------------------------

// One warp: shared holds 32 rows of 8 b16 values, value = 8 * row + column; lane l supplies the
// address of row l, so matrix j is rows 8j..8j+7.
template <int kNum, bool kTrans>
__global__ void ldmatrix_probe(port::gptr<uint32_t> out) {
  TF_SHARED(uint16_t, rows, 32 * 8);
  const int lane = int(threadIdx.x);
  for (int c = 0; c < 8; ++c) rows[lane * 8 + c] = uint16_t(lane * 8 + c);
  __syncwarp();
  uint32_t r[kNum];
  port::ldmatrix<kNum, kTrans>(r, rows + lane * 8);
  for (int j = 0; j < kNum; ++j) out[lane * 4 + j] = r[j];
}

template <int kNum, bool kTrans>
void check_ldmatrix() {
  DeviceBuffer out(32 * 4 * sizeof(uint32_t), "out", sizeof(uint32_t));
  tf::sim::launch("ldmatrix_probe", ldmatrix_probe<kNum, kTrans>, 1, 32, 0, out.as<uint32_t>());
  const auto got = out.to_vector<uint32_t>();
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < kNum; ++j) {
      // PTX ISA: without .trans lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix j; with
      // .trans, column l/4 of rows 2(l%4) and 2(l%4)+1.
      const int r0 = kTrans ? 2 * (lane % 4) : lane / 4, c0 = kTrans ? lane / 4 : 2 * (lane % 4);
      const int r1 = kTrans ? r0 + 1 : r0, c1 = kTrans ? c0 : c0 + 1;
      const uint32_t want = uint32_t(8 * (8 * j + r0) + c0) | uint32_t(8 * (8 * j + r1) + c1) << 16;
      EXPECT_EQ(got[size_t(lane * 4 + j)], want)
          << "x" << kNum << (kTrans ? ".trans" : "") << " lane " << lane << " register " << j;
    }
  }
}

TEST(SimtLdmatrix, DistributesRowsAsThePtxIsaSays) {
  check_ldmatrix<1, false>();
  check_ldmatrix<2, false>();
  check_ldmatrix<4, false>();
  check_ldmatrix<1, true>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, true>();
}

// ---- mma.sync ---------------------------------------------------------------------------------------

// One warp computes D = A B + C for A [16,16] and B [16,8] (row-major, 16-bit bit patterns) and C,
// D [16,8] f32, gathering its fragments with the PTX ISA's formulas written out here.
template <bool kF16>
__global__ void mma_probe(port::gptr<const uint16_t> a, port::gptr<const uint16_t> b,
                          port::gptr<const float> c, port::gptr<float> d) {
  const int lane = int(threadIdx.x), group = lane / 4, in_group = lane % 4;
  auto pack = [](uint16_t lo, uint16_t hi) { return uint32_t(lo) | uint32_t(hi) << 16; };
  uint32_t af[4], bf[2];
  float cf[4], df[4];
  for (int reg = 0; reg < 4; ++reg) {
    const int row = group + (reg % 2) * 8, col = in_group * 2 + (reg / 2) * 8;
    af[reg] = pack(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  for (int reg = 0; reg < 2; ++reg) {
    const int k = in_group * 2 + reg * 8;
    bf[reg] = pack(b[k * 8 + group], b[(k + 1) * 8 + group]);
  }
  for (int i = 0; i < 4; ++i) cf[i] = c[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2];
  if constexpr (kF16) {
    port::mma_m16n8k16_f16(df, af, bf, cf);
  } else {
    port::mma_m16n8k16_bf16(df, af, bf, cf);
  }
  for (int i = 0; i < 4; ++i) d[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2] = df[i];
}

template <bool kF16>
void check_mma() {
  const auto af = tf::test::random_floats(16 * 16, 11), bf = tf::test::random_floats(16 * 8, 12),
             cf = tf::test::random_floats(16 * 8, 13);
  std::vector<uint16_t> a(af.size()), b(bf.size());
  for (size_t i = 0; i < a.size(); ++i) a[i] = kF16 ? tf::f32_to_f16(af[i]) : tf::f32_to_bf16(af[i]);
  for (size_t i = 0; i < b.size(); ++i) b[i] = kF16 ? tf::f32_to_f16(bf[i]) : tf::f32_to_bf16(bf[i]);
  auto da = DeviceBuffer::from(a, "a"), db = DeviceBuffer::from(b, "b"), dc = DeviceBuffer::from(cf, "c");
  DeviceBuffer dd(16 * 8 * sizeof(float), "d", sizeof(float));
  tf::sim::launch("mma_probe", mma_probe<kF16>, 1, 32, 0, da.as<uint16_t>(), db.as<uint16_t>(),
                  dc.as<float>(), dd.as<float>());
  const auto d = dd.to_vector<float>();
  auto val = [&](uint16_t h) { return double(kF16 ? tf::f16_to_f32(h) : tf::bf16_to_f32(h)); };
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      double want = cf[size_t(r * 8 + n)], mag = std::fabs(want);
      for (int k = 0; k < 16; ++k) {
        want += val(a[size_t(r * 16 + k)]) * val(b[size_t(k * 8 + n)]);
        mag += std::fabs(val(a[size_t(r * 16 + k)]) * val(b[size_t(k * 8 + n)]));
      }
      // 16 products (exact in f32) and C summed in f32: at most 17 roundings of partial sums.
      EXPECT_NEAR(d[size_t(r * 8 + n)], want, 17 * kU32 * mag)
          << (kF16 ? "f16" : "bf16") << " D[" << r << "][" << n << "]";
    }
  }
}

TEST(SimtMma, M16N8K16MatchesTheCpuInBf16AndF16) {
  check_mma<false>();
  check_mma<true>();
}

// ---- block reduction on warp shuffles ---------------------------------------------------------------

__global__ void reduce_sum(port::gptr<const float> x, int n, port::gptr<float> out) {
  TF_SHARED(float, partials, 32);
  const int tid = int(threadIdx.x), lane = tid % warpSize, warp = tid / warpSize;
  float sum = 0;
  for (int i = int(blockIdx.x * blockDim.x) + tid; i < n; i += int(gridDim.x * blockDim.x)) sum += x[i];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) partials[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    const int warps = int(blockDim.x) / warpSize;
    float v = lane < warps ? float(partials[lane]) : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) atomicAdd(out, v);
  }
}

TEST(SimtReduce, BlockReductionWithShufflesMatchesTheCpu) {
  const int n = 10007;
  const auto x = tf::test::random_floats(size_t(n), 21);
  auto dx = DeviceBuffer::from(x, "x");
  auto dout = DeviceBuffer::from(std::vector<float>{0.0f}, "out");
  tf::sim::launch("reduce_sum", reduce_sum, 6, 256, 0, dx.as<float>(), n, dout.as<float>());
  double want = 0, mag = 0;
  for (float v : x) {
    want += v;
    mag += std::fabs(v);
  }
  // Any order of n f32 additions errs by at most (n - 1) u sum|x|.
  EXPECT_NEAR(dout.to_vector<float>()[0], want, double(n - 1) * kU32 * mag);
}

// ---- tiled mma.sync GEMM ------------------------------------------------------------------------------

struct GemmCase {
  int m, n, k;
  bool b_is_nk;
};

// Runs tf::simt::gemm_bf16_mma and checks every element against a float64 reference within the
// bound of k-term f32 summation of exact products: |err| <= k u / (1 - k u) * sum |a||b|.
void check_gemm(const GemmCase& g, uint64_t seed) {
  const auto a = tf::test::to_bf16(tf::test::random_floats(size_t(g.m) * size_t(g.k), seed));
  const auto b = tf::test::to_bf16(tf::test::random_floats(size_t(g.k) * size_t(g.n), seed + 1));
  auto da = DeviceBuffer::from(a, "A"), db = DeviceBuffer::from(b, "B");
  DeviceBuffer dc(size_t(g.m) * size_t(g.n) * sizeof(float), "C", sizeof(float));
  tf::simt::gemm_bf16_mma({da.as<uint16_t>(), db.as<uint16_t>(), dc.as<float>(), g.m, g.n, g.k, g.b_is_nk});
  const auto c = dc.to_vector<float>();
  const double gamma = g.k * kU32 / (1 - g.k * kU32);
  int bad = 0;
  for (int i = 0; i < g.m; ++i) {
    for (int j = 0; j < g.n; ++j) {
      double want = 0, mag = 0;
      for (int p = 0; p < g.k; ++p) {
        const size_t bi =
            g.b_is_nk ? size_t(j) * size_t(g.k) + size_t(p) : size_t(p) * size_t(g.n) + size_t(j);
        const double prod =
            double(tf::bf16_to_f32(a[size_t(i) * size_t(g.k) + size_t(p)])) * tf::bf16_to_f32(b[bi]);
        want += prod;
        mag += std::fabs(prod);
      }
      const double got = c[size_t(i) * size_t(g.n) + size_t(j)];
      if (!(std::fabs(got - want) <= gamma * mag) && bad++ < 3) {
        ADD_FAILURE() << "C[" << i << "][" << j << "] = " << got << ", CPU reference " << want << " (m "
                      << g.m << " n " << g.n << " k " << g.k << (g.b_is_nk ? ", B [n,k])" : ", B [k,n])");
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

// Whole 64x64 block tiles (4 blocks) and four 32-deep k steps, so the double buffer is swapped
// back and forth and every block's output placement is exercised.
TEST(SimtGemm, TiledMmaGemm128MatchesTheCpu) {
  for (bool nk : {true, false}) check_gemm({128, 128, 128, nk}, 31);
}

TEST(SimtGemm, TiledMmaGemmHandlesPartialTiles) {
  // Edges inside a 16x8 mma tile, inside a 64-wide block tile and inside a 32-deep k step.
  for (const GemmCase& g : {GemmCase{33, 40, 24, true}, GemmCase{33, 40, 24, false}, GemmCase{1, 8, 8, false},
                            GemmCase{70, 9, 40, true}, GemmCase{65, 72, 72, false}}) {
    check_gemm(g, 41);
  }
}

TEST(SimtGemm, RejectsShapesItCannotTile) {
  DeviceBuffer buf(4096, "buf");
  const tf::GemmBf16Args bad_k{buf.as<uint16_t>(), buf.as<uint16_t>(), buf.as<float>(), 8, 8, 12, true};
  EXPECT_THROW(tf::simt::gemm_bf16_mma(bad_k), tf::Error);
  const tf::GemmBf16Args bad_n{buf.as<uint16_t>(), buf.as<uint16_t>(), buf.as<float>(), 8, 12, 8, false};
  EXPECT_THROW(tf::simt::gemm_bf16_mma(bad_n), tf::Error);
}

// ---- seeded thread order ----------------------------------------------------------------------------

// Each thread takes a ticket: the tickets record the order in which the scheduler ran threads.
__global__ void take_tickets(port::gptr<int> counter, port::gptr<int> order) {
  order[threadIdx.x] = atomicAdd(counter, 1);
}

std::vector<int> ticket_order(uint64_t seed) {
  tf::sim::set_seed(seed);
  auto counter = DeviceBuffer::from(std::vector<int>{0}, "counter");
  DeviceBuffer order(64 * sizeof(int), "order", sizeof(int));
  tf::sim::launch("take_tickets", take_tickets, 1, 64, 0, counter.as<int>(), order.as<int>());
  return order.to_vector<int>();
}

TEST(SimtScheduler, SeedShufflesThreadOrderReproducibly) {
  const auto first = ticket_order(1), again = ticket_order(1), other = ticket_order(2);
  tf::sim::set_seed(1);
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other);
  EXPECT_EQ(std::set<int>(first.begin(), first.end()).size(), 64u);  // every thread ran exactly once
  std::vector<int> in_order(64);
  for (int i = 0; i < 64; ++i) in_order[size_t(i)] = i;
  EXPECT_NE(first, in_order);  // 64! orders: a shuffle landing on the identity would be a broken shuffle
}

}  // namespace
