// Frozen linear layers on quantized weights against the f32 GEMM of the same shape, measured in the
// same run.
//
//   build/benchmarks/bench_qmatmul [--threads T] [--reps R] [--shape ROWSxCOLS] [--tokens N] [--cpu-time]
//
// For the SmolLM2-135M MLP's [1536 x 576] (gate, up) and [576 x 1536] (down) weights and a
// [4096 x 4096] one at 1, 64, 512 and 4096 tokens,
// times tf::cpu::linear_forward (y = x W^T) and tf::cpu::linear_backward_input (dx = dy W) with W
// in NF4 (double quantization), Q4_K, Q4_1, Q8_0 and INT8, and tf::cpu::matmul with an f32 W; prints
// the median of R calls (after one warm-up) and the ratio quantized / f32. A format whose blocks do
// not divide the rows (Q4_K's 256 in 576) shows "-". --shape and --tokens run one of the shapes or
// token counts alone.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/rng.h"

using namespace tf;
using Clock = std::chrono::steady_clock;

namespace {

// Byte offsets of the f16 scale fields of one block: random bytes there could be infinities.
std::vector<size_t> half_fields(DType dt) {
  switch (dt) {
    case DType::Q4_1: return {offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)};
    case DType::Q8_0: return {offsetof(BlockQ8_0, d)};
    case DType::Q4_K: return {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)};
    default: return {};
  }
}

// A [rows, cols] weight of random codes under finite random scales (the values do not change the
// work done).
struct BenchWeight {
  std::vector<uint8_t> data;
  std::vector<float> absmax, nested;
  std::vector<uint8_t> absmax_codes;
  WeightRef ref;

  BenchWeight(DType dt, int64_t rows, int64_t cols) {
    const Philox rng(7, uint64_t(dt));
    const int64_t n = rows * cols;
    data.resize(size_t(dtype_bytes(dt, n)));
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    QuantScales scales;
    const int64_t blocks = (n + 63) / 64;
    if (dt == DType::NF4) {
      absmax_codes.resize(size_t(blocks));
      for (int64_t b = 0; b < blocks; ++b) absmax_codes[size_t(b)] = uint8_t(rng.u32(uint64_t(n + b)));
      nested.assign(size_t((blocks + kNf4NestedBlock - 1) / kNf4NestedBlock), 0.5f);
      scales = QuantScales{absmax_codes.data(), nested.data(), 0.1f};
    } else if (dt == DType::INT8) {
      absmax.assign(size_t(blocks), 0.5f);
      scales = QuantScales{absmax.data(), nullptr, 0.0f};
    } else {
      const int64_t block_bytes = dtype_block_bytes(dt);
      const uint16_t d = f32_to_f16(0.01f);
      for (int64_t b = 0; b < int64_t(data.size()) / block_bytes; ++b)
        for (const size_t off : half_fields(dt)) std::memcpy(data.data() + b * block_bytes + off, &d, 2);
    }
    ref = WeightRef{data.data(), dt, rows, cols, scales};
  }
};

// Wall time, or with --cpu-time the CPU time of the process: on a shared machine that does not
// count the time other processes hold the cores. With more than one thread run it under
// OMP_WAIT_POLICY=passive, so that a thread waiting at a barrier sleeps instead of spinning and
// the figure is the work done.
bool g_cpu_time = false;

double now_seconds() {
  if (!g_cpu_time) return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

template <typename F>
double median_seconds(int reps, const F& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_seconds();
    f();
    t.push_back(now_seconds() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, reps = 5;
  std::string only_shape;
  int64_t only_tokens = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--cpu-time") {
      g_cpu_time = true;
    } else if (a == "--shape" && i + 1 < argc) {
      only_shape = argv[++i];
    } else if (a == "--tokens" && i + 1 < argc) {
      only_tokens = std::atoll(argv[++i]);
    } else {
      std::fprintf(
          stderr,
          "usage: bench_qmatmul [--threads T] [--reps R] [--shape ROWSxCOLS] [--tokens N] [--cpu-time]\n");
      return 1;
    }
  }
  cpu::set_num_threads(threads);
  const DType dtypes[] = {DType::NF4, DType::Q4_K, DType::Q4_1, DType::Q8_0, DType::INT8};
  const int64_t shapes[][2] = {{1536, 576}, {576, 1536}, {4096, 4096}};
  const int64_t token_counts[] = {1, 64, 512, 4096};
  std::printf("threads %d, median of %d calls; %s ms, and in brackets quantized / f32\n", cpu::num_threads(),
              reps, g_cpu_time ? "process CPU" : "wall");
  std::printf("%-11s %-7s %6s %9s", "W", "op", "tokens", "f32");
  for (const DType dt : dtypes) std::printf(" %17s", std::string(dtype_name(dt)).c_str());
  std::printf("\n");
  for (const auto& s : shapes) {
    const int64_t rows = s[0], cols = s[1];
    const std::string shape = std::to_string(rows) + "x" + std::to_string(cols);
    if (!only_shape.empty() && shape != only_shape) continue;
    std::vector<float> w_f32(size_t(rows * cols), 0.01f);
    std::vector<BenchWeight> weights;
    for (const DType dt : dtypes) weights.emplace_back(dt, rows, cols - cols % dtype_block_elems(dt));
    for (const bool forward : {true, false}) {
      for (const int64_t n : token_counts) {
        if (only_tokens != 0 && n != only_tokens) continue;
        const int64_t in_w = forward ? cols : rows, out_w = forward ? rows : cols;
        std::vector<float> in(size_t(n * in_w), 0.5f), out(size_t(n * out_w));
        const double base = median_seconds(reps, [&] {
          if (forward) {
            cpu::matmul(out.data(), rows, {in.data(), DType::F32, cols, false},
                        {w_f32.data(), DType::F32, cols, true}, n, rows, cols, 1.0f, 0.0f);
          } else {
            cpu::matmul(out.data(), cols, {in.data(), DType::F32, rows, false},
                        {w_f32.data(), DType::F32, cols, false}, n, cols, rows, 1.0f, 0.0f);
          }
        });
        std::printf("%-11s %-7s %6lld %9.3f", shape.c_str(), forward ? "forward" : "dx", (long long)n,
                    base * 1e3);
        for (const BenchWeight& w : weights) {
          if (cols % dtype_block_elems(w.ref.dtype) != 0 && w.ref.dtype != DType::NF4 &&
              w.ref.dtype != DType::INT8) {
            std::printf(" %17s", "-");
            continue;
          }
          const double t = median_seconds(reps, [&] {
            if (forward) {
              cpu::linear_forward(out.data(), in.data(), w.ref, n, 0.0f);
            } else {
              cpu::linear_backward_input(out.data(), in.data(), w.ref, n, 0.0f);
            }
          });
          std::printf(" %9.3f (%5.2fx)", t * 1e3, t / base);
        }
        std::printf("\n");
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
