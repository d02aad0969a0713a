// defines: tf::cuda::gemm_bf16_mma (built by nvcc) and tf::simt::gemm_bf16_mma (this source
// compiled as host C++ against the simulator): a tiled bf16 GEMM on mma.sync + ldmatrix + cp.async
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/gemm_mma.h"
#include "kernels/cuda/port.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// A block of 128 threads computes a 64x64 tile of C in steps of 32 along k, double-buffered: the
// cp.async copies of step t+1 fly while step t is multiplied. Its four warps own 32x32 quarters,
// each as 2x4 mma tiles of 16x8. Shared rows are padded by 8 elements (16 bytes) so that the eight
// row addresses of one ldmatrix hit different banks (strides of 80 and 144 bytes).
constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kThreads = 128, kPad = 8;
constexpr int kLdA = kTileK + kPad;    // A tile [kTileM][kLdA]
constexpr int kLdBnk = kTileK + kPad;  // B tile [kTileN][kLdBnk] when B is [n, k]
constexpr int kLdBkn = kTileN + kPad;  // B tile [kTileK][kLdBkn] when B is [k, n]
constexpr int kChunk = 8;              // bf16 elements per 16-byte cp.async

template <bool kBIsNK>
__global__ void __launch_bounds__(kThreads)
    gemm_bf16_mma_kernel(port::gptr<const uint16_t> a, port::gptr<const uint16_t> b, port::gptr<float> c,
                         int m, int n, int k) {
  constexpr int kStageA = kTileM * kLdA;
  constexpr int kStageB = kBIsNK ? kTileN * kLdBnk : kTileK * kLdBkn;
  TF_SHARED(uint16_t, a_tile, 2 * kStageA);
  TF_SHARED(uint16_t, b_tile, 2 * kStageB);
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 2 * 32, warp_n = warp % 2 * 32;
  const int m0 = int(blockIdx.y) * kTileM, n0 = int(blockIdx.x) * kTileN;

  // Chunks past the matrix edge are zero-filled (source size 0, nothing read), so edge tiles need
  // no special case in the multiply.
  auto load_stage = [&](int kt, int stage) {
    const int k0 = kt * kTileK;
    for (int i = tid; i < kTileM * kTileK / kChunk; i += kThreads) {
      const int row = i / (kTileK / kChunk), col = i % (kTileK / kChunk) * kChunk;
      const bool inside = m0 + row < m && k0 + col < k;
      port::cp_async_16(a_tile + stage * kStageA + row * kLdA + col,
                        inside ? a + (size_t(m0 + row) * size_t(k) + size_t(k0 + col)) : a, inside ? 16 : 0);
    }
    if constexpr (kBIsNK) {
      for (int i = tid; i < kTileN * kTileK / kChunk; i += kThreads) {
        const int row = i / (kTileK / kChunk), col = i % (kTileK / kChunk) * kChunk;
        const bool inside = n0 + row < n && k0 + col < k;
        port::cp_async_16(b_tile + stage * kStageB + row * kLdBnk + col,
                          inside ? b + (size_t(n0 + row) * size_t(k) + size_t(k0 + col)) : b,
                          inside ? 16 : 0);
      }
    } else {
      for (int i = tid; i < kTileK * kTileN / kChunk; i += kThreads) {
        const int row = i / (kTileN / kChunk), col = i % (kTileN / kChunk) * kChunk;
        const bool inside = k0 + row < k && n0 + col < n;
        port::cp_async_16(b_tile + stage * kStageB + row * kLdBkn + col,
                          inside ? b + (size_t(k0 + row) * size_t(n) + size_t(n0 + col)) : b,
                          inside ? 16 : 0);
      }
    }
  };

  float acc[2][4][4] = {};
  const int k_tiles = (k + kTileK - 1) / kTileK;
  if (k_tiles > 0) load_stage(0, 0);
  port::cp_async_commit();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    if (kt + 1 < k_tiles) {
      load_stage(kt + 1, stage ^ 1);
      port::cp_async_commit();
      port::cp_async_wait<1>();
    } else {
      port::cp_async_wait<0>();
    }
    __syncthreads();
    const port::sptr<uint16_t> as = a_tile + stage * kStageA;
    const port::sptr<uint16_t> bs = b_tile + stage * kStageB;
    TF_UNROLL
    for (int kk = 0; kk < kTileK; kk += 16) {
      // ldmatrix.x4 matrices: A rows 0-7 / 8-15 of columns kk..kk+7, then the same of kk+8..kk+15,
      // which is the order of the A fragment's registers a0a1, a2a3, a4a5, a6a7.
      uint32_t af[2][4], bf[4][2];
      TF_UNROLL
      for (int mi = 0; mi < 2; ++mi) {
        port::ldmatrix<4>(af[mi], as + (warp_m + mi * 16 + lane % 16) * kLdA + kk + lane / 16 * 8);
      }
      // Each x4 covers two n8 tiles: (k 0-7, k 8-15) of the first, then of the second.
      TF_UNROLL
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        if constexpr (kBIsNK) {
          port::ldmatrix<4>(
              r, bs + (warp_n + np * 16 + lane % 8 + lane / 16 * 8) * kLdBnk + kk + lane / 8 % 2 * 8);
        } else {
          port::ldmatrix<4, true>(
              r, bs + (kk + lane % 8 + lane / 8 % 2 * 8) * kLdBkn + warp_n + np * 16 + lane / 16 * 8);
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
      TF_UNROLL
      for (int mi = 0; mi < 2; ++mi) {
        TF_UNROLL
        for (int ni = 0; ni < 4; ++ni) port::mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
      }
    }
    __syncthreads();  // the next step's copies overwrite the stage just read
  }

  // Accumulator fragment: lane holds rows lane/4 and lane/4 + 8, columns 2(lane%4) and +1.
  const int group = lane / 4, in_group = lane % 4;
  TF_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    TF_UNROLL
    for (int ni = 0; ni < 4; ++ni) {
      TF_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + warp_m + mi * 16 + group + (i >= 2 ? 8 : 0);
        const int col = n0 + warp_n + ni * 8 + in_group * 2 + (i & 1);
        if (row < m && col < n) c[size_t(row) * size_t(n) + size_t(col)] = acc[mi][ni][i];
      }
    }
  }
}

}  // namespace

void gemm_bf16_mma(const GemmBf16Args& args) {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw Error(detail::concat("gemm_bf16_mma: ", what));
  };
  require(args.m >= 0 && args.n >= 0 && args.k >= 0, "negative dimension");
  require(args.k % kChunk == 0, "k must be a multiple of 8");
  require(args.b_is_nk || args.n % kChunk == 0, "n must be a multiple of 8 when B is [k, n]");
  require(reinterpret_cast<uintptr_t>(args.a) % 16 == 0 && reinterpret_cast<uintptr_t>(args.b) % 16 == 0,
          "A and B must be 16-byte aligned");
  if (args.m == 0 || args.n == 0) return;
  const dim3 grid(unsigned((args.n + kTileN - 1) / kTileN), unsigned((args.m + kTileM - 1) / kTileM));
  port::launch(args.b_is_nk ? gemm_bf16_mma_kernel<true> : gemm_bf16_mma_kernel<false>,
               port::LaunchConfig{"gemm_bf16_mma", grid, dim3(kThreads)}, args.a, args.b, args.c, args.m,
               args.n, args.k);
}

}  // namespace tf::TF_PORT_BACKEND
