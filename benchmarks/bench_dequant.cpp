// Dequantization throughput of tf::cpu::dequantize_weight_tile per dtype (the run-time chosen path
// and the portable one), and tf::cpu::quant_gemv at one token against OpenBLAS cblas_sgemv on the
// f32 matrix of the same shape, measured in the same run.
//
//   build/benchmarks/bench_dequant [--threads T] [--reps N]
//
// Shapes: a SmolLM2-135M projection [1536 x 576] and its lm_head [49152 x 576]; the k-quants, whose
// rows must be multiples of 256, on [1536 x 1536]. Each figure is the best of N calls; the GEMVs
// start each call with the caches emptied of their weights.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/quant_gemv.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/rng.h"

using namespace tf;
using Clock = std::chrono::steady_clock;

namespace {

// Random codes with the f16 scales of every ggml block set to a typical small value, and positive
// f32 absmax for NF4 / INT8: what a real checkpoint looks like to the kernels.
struct BenchWeight {
  std::vector<uint8_t> data;
  std::vector<float> absmax;
  WeightRef ref;

  BenchWeight(DType t, int64_t rows, int64_t cols) {
    Philox rng(7, uint64_t(t));
    data.resize(size_t(dtype_bytes(t, rows * cols)));
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    QuantScales s;
    if (t == DType::NF4 || t == DType::INT8) {
      absmax.assign(size_t((rows * cols + 63) / 64), 0.05f);
      s.absmax = absmax.data();
    } else {
      const uint16_t scale = f32_to_f16(0.01f);
      const int64_t bytes = dtype_block_bytes(t);
      const size_t d = t == DType::Q2_K   ? offsetof(BlockQ2_K, d)
                       : t == DType::Q3_K ? offsetof(BlockQ3_K, d)
                       : t == DType::Q6_K ? offsetof(BlockQ6_K, d)
                                          : 0;
      for (int64_t b = 0; b < int64_t(data.size()) / bytes; ++b) {
        std::memcpy(&data[size_t(b * bytes) + d], &scale, 2);
        if (t == DType::Q4_1 || t == DType::Q5_1 || t == DType::Q4_K || t == DType::Q5_K || t == DType::Q2_K)
          std::memcpy(&data[size_t(b * bytes) + (t == DType::Q2_K ? d + 2 : 2)], &scale, 2);
      }
    }
    ref = WeightRef(data.data(), t, rows, cols, s);
  }
};

// Reads 96 MiB, three times the L3 of a large desktop part, so that the next call finds its weights
// in memory as a decoding step does (the rest of the model has passed through the caches since).
void evict_caches() {
  static std::vector<float> junk(size_t(24) << 20, 1.0f);
  volatile float sink = 0;
  float s = 0;
  for (size_t i = 0; i < junk.size(); i += 16) s += junk[i];
  sink = s;
  (void)sink;
}

template <typename Fn>
double best_seconds(int reps, bool cold, Fn&& fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    if (cold) evict_caches();
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, reps = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--threads" || a == "--reps") && i + 1 < argc) {
      (a == "--threads" ? threads : reps) = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "error: unknown option %s (expected --threads T, --reps N)\n", a.c_str());
      return 1;
    }
  }
  cpu::set_num_threads(threads);
  std::printf("threads %d, AVX-512 kernels %s, best of %d calls\n", cpu::num_threads(),
              cpu::cpu_has_avx512() ? "yes" : "no (portable only)", reps);

  const DType row576[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1,
                          DType::Q8_0, DType::NF4,  DType::INT8};
  const DType kquants[] = {DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K};

  std::printf("\ndequantize_weight_tile, whole matrix, Gelem/s (fast / portable)\n");
  const auto dequant_rate = [&](DType t, int64_t rows, int64_t cols) {
    const BenchWeight w(t, rows, cols);
    std::vector<float> out(size_t(rows * cols));
    const auto run = [&] { cpu::dequantize_weight_tile(out.data(), cols, w.ref, 0, rows, 0, cols); };
    const double fast = best_seconds(reps, false, run);
    double portable;
    {
      cpu::ScopedPortableKernels force;
      portable = best_seconds(reps, false, run);
    }
    const double n = double(rows * cols) / 1e9;
    std::printf("  %-5s [%5lld x %4lld]  %7.2f / %6.2f  (%.1fx)\n", std::string(dtype_name(t)).c_str(),
                (long long)rows, (long long)cols, n / fast, n / portable, portable / fast);
  };
  for (DType t : row576) dequant_rate(t, 1536, 576);
  for (DType t : kquants) dequant_rate(t, 1536, 1536);

  std::printf("\nquant_gemv at 1 token vs cblas_sgemv on f32 weights of the same shape (time ratio)\n");
  const auto gemv_ratio = [&](DType t, int64_t rows, int64_t cols) {
    const BenchWeight w(t, rows, cols);
    std::vector<float> f32(size_t(rows * cols));
    cpu::dequantize_weight_tile(f32.data(), cols, w.ref, 0, rows, 0, cols);
    std::vector<float> x(static_cast<size_t>(cols), 0.5f), y(static_cast<size_t>(rows));
    const double quant =
        best_seconds(reps, true, [&] { cpu::quant_gemv(y.data(), x.data(), w.ref, 1, 0.0f); });
    const double sgemv = best_seconds(reps, true, [&] {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(rows), int(cols), 1.0f, f32.data(), int(cols), x.data(), 1,
                  0.0f, y.data(), 1);
    });
    std::printf("  %-5s [%5lld x %4lld]  quant %8.1f us  sgemv %8.1f us  sgemv/quant %5.2fx\n",
                std::string(dtype_name(t)).c_str(), (long long)rows, (long long)cols, quant * 1e6,
                sgemv * 1e6, sgemv / quant);
  };
  for (int64_t rows : {1536, 49152})
    for (DType t : row576) gemv_ratio(t, rows, 576);
  for (DType t : kquants) gemv_ratio(t, 1536, 1536);
  return 0;
}
