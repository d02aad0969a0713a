// defines: the bf16 GEMM benchmark: the products of a SmolLM2-135M training step (1024 tokens: seq 512 x
// micro-batch 2) under f32 and bf16 matmul precision, and the raw GEMMs they could be built on, measured in
// the same run.
//
//   build/benchmarks/bench_bf16_gemm [--threads T] [--reps R] [--tokens N] [--cpu-time]
//
// For each frozen projection (q/o 576 -> 576, k/v 576 -> 192, gate/up 576 -> 1536, down 1536 -> 576,
// the tied lm_head 576 -> 49152) forward (y = x W^T) and input gradient (dx = dy W), and the LoRA
// products of rank 16 (x A^T, then (x A^T) B^T), prints the median of R calls after one warm-up of:
//   (a) f32: OpenBLAS sgemm on f32, for a Q4_1 weight tf::cpu::linear_* under f32 precision (tiles
//       dequantized to f32, then sgemm): today's path, the base of every ratio;
//   (b) bf16: tf::cpu::linear_* under bf16 precision on the same Q4_1 weight (tiles dequantized to bf16,
//       activations rounded once, oneDNN's matmul primitive), and the primitive alone on operands
//       already in bf16 (tf::cpu::bf16_gemm);
//   (c) oneDNN's dnnl_sgemm on the same f32 operands as OpenBLAS's;
// each as a ratio of time to (a). The LoRA products are f32 by f32 and run sgemm under either precision:
// they show (c) against (a) only. Needs a CPU with avx512_bf16 for (b).
#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/isa.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/rng.h"

using namespace tf;
using Clock = std::chrono::steady_clock;

namespace {

bool g_cpu_time = false;

// Wall time, or with --cpu-time the process's CPU time (on a shared machine it leaves out the time
// other processes hold the cores; run more than one thread under OMP_WAIT_POLICY=passive then).
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

// A [rows, cols] Q4_1 weight of random codes under finite scales (the values do not change the work).
struct Q4_1Weight {
  std::vector<uint8_t> data;
  WeightRef ref;
  Q4_1Weight(int64_t rows, int64_t cols) : data(size_t(dtype_bytes(DType::Q4_1, rows * cols))) {
    const Philox rng(3, 4);
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    const uint16_t d = f32_to_f16(0.01f);
    for (size_t b = 0; b < data.size() / sizeof(BlockQ4_1); ++b) {
      std::memcpy(data.data() + b * sizeof(BlockQ4_1) + offsetof(BlockQ4_1, d), &d, 2);
      std::memcpy(data.data() + b * sizeof(BlockQ4_1) + offsetof(BlockQ4_1, m), &d, 2);
    }
    ref = WeightRef{data.data(), DType::Q4_1, rows, cols};
  }
};

void print_ratio(double t, double base) {
  std::printf(" %8.3f (%4.2fx)", t * 1e3, t / base);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, reps = 5;
  int64_t n = 1024;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--tokens" && i + 1 < argc) {
      n = std::max<int64_t>(1, std::atoll(argv[++i]));
    } else if (a == "--cpu-time") {
      g_cpu_time = true;
    } else {
      std::fprintf(stderr, "usage: bench_bf16_gemm [--threads T] [--reps R] [--tokens N] [--cpu-time]\n");
      return 1;
    }
  }
  if (!cpu::cpu_has_avx512_bf16()) {
    std::fprintf(stderr,
                 "bench_bf16_gemm: this CPU has no avx512_bf16, so there is no bf16 path to measure\n");
    return 1;
  }
  cpu::set_num_threads(threads);
  std::printf("%lld tokens, threads %d, median of %d calls; %s ms, and in brackets time / (a)\n",
              (long long)n, cpu::num_threads(), reps, g_cpu_time ? "process CPU" : "wall");
  std::printf("%-16s %-7s %18s %18s %18s %18s %18s\n", "W [out x in]", "op", "(a) f32 linear",
              "(b) bf16 linear", "(b) bf16_gemm", "(a') cblas_sgemm", "(c) dnnl_sgemm");
  const struct {
    const char* name;
    int64_t rows, cols;
  } projections[] = {{"q,o", 576, 576},
                     {"k,v", 192, 576},
                     {"gate,up", 1536, 576},
                     {"down", 576, 1536},
                     {"lm_head", 49152, 576}};
  for (const auto& p : projections) {
    const Q4_1Weight w(p.rows, p.cols);
    std::vector<float> w_f32(size_t(p.rows * p.cols));
    cpu::dequantize_weight_tile(w_f32.data(), p.cols, w.ref, 0, p.rows, 0, p.cols);
    std::vector<uint16_t> w_bf16(w_f32.size());
    cpu::round_to_bf16(w_bf16.data(), w_f32.data(), int64_t(w_f32.size()));
    for (const bool forward : {true, false}) {
      const int64_t in_w = forward ? p.cols : p.rows, out_w = forward ? p.rows : p.cols;
      std::vector<float> in(size_t(n * in_w), 0.5f), out(size_t(n * out_w));
      std::vector<uint16_t> in_bf16(in.size());
      cpu::round_to_bf16(in_bf16.data(), in.data(), int64_t(in.size()));
      const auto linear = [&] {
        if (forward) {
          cpu::linear_forward(out.data(), in.data(), w.ref, n, 0.0f);
        } else {
          cpu::linear_backward_input(out.data(), in.data(), w.ref, n, 0.0f);
        }
      };
      const double base = median_seconds(reps, linear);
      double bf16_linear = 0;
      {
        cpu::ScopedMatmulPrecision bf16(cpu::MatmulPrecision::BF16);
        bf16_linear = median_seconds(reps, linear);
      }
      const double bf16_gemm = median_seconds(reps, [&] {
        cpu::bf16_gemm(out.data(), out_w, {in_bf16.data(), DType::BF16, in_w, false},
                       {w_bf16.data(), DType::BF16, p.cols, forward}, n, out_w, in_w, 1.0f, 0.0f);
      });
      const double sgemm = median_seconds(reps, [&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, forward ? CblasTrans : CblasNoTrans, int(n), int(out_w),
                    int(in_w), 1.0f, in.data(), int(in_w), w_f32.data(), int(p.cols), 0.0f, out.data(),
                    int(out_w));
      });
      const double dnnl = median_seconds(reps, [&] {
        dnnl_sgemm('N', forward ? 'T' : 'N', n, out_w, in_w, 1.0f, in.data(), in_w, w_f32.data(), p.cols,
                   0.0f, out.data(), out_w);
      });
      std::printf("%-16s %-7s %18.3f",
                  (std::string(p.name) + " " + std::to_string(p.rows) + "x" + std::to_string(p.cols)).c_str(),
                  forward ? "forward" : "dx", base * 1e3);
      print_ratio(bf16_linear, base);
      print_ratio(bf16_gemm, base);
      print_ratio(sgemm, base);
      print_ratio(dnnl, base);
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  // LoRA rank 16 on a 576-wide input: x A^T (K = 576, N = 16), then (x A^T) B^T (K = 16) for each output
  // width; f32 by f32.
  const int64_t r = 16;
  const struct {
    const char* name;
    int64_t M, N, K;
  } lora[] = {{"lora x A^T", n, r, 576},
              {"lora h B^T 576", n, 576, r},
              {"lora h B^T 1536", n, 1536, r},
              {"lora x A^T 1536", n, r, 1536}};
  for (const auto& l : lora) {
    std::vector<float> a(size_t(l.M * l.K), 0.5f), b(size_t(l.N * l.K), 0.25f), c(size_t(l.M * l.N));
    const double sgemm = median_seconds(reps, [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(l.M), int(l.N), int(l.K), 1.0f, a.data(),
                  int(l.K), b.data(), int(l.K), 0.0f, c.data(), int(l.N));
    });
    const double dnnl = median_seconds(reps, [&] {
      dnnl_sgemm('N', 'T', l.M, l.N, l.K, 1.0f, a.data(), l.K, b.data(), l.K, 0.0f, c.data(), l.N);
    });
    std::printf("%-16s %-7s %18.3f %18s %18s", l.name, "forward", sgemm * 1e3, "-", "-");
    print_ratio(sgemm, sgemm);
    print_ratio(dnnl, sgemm);
    std::printf("\n");
  }
  return 0;
}
