// defines: the LoRA branch benchmark: one adapter's forward and backward (lora_forward, lora_backward) on
// the shapes of a SmolLM2-135M training step (1024 tokens: seq 512 x micro-batch 2, rank 16), with dropout
// and without, and each op it runs alone, measured in the same run.
//
//   OMP_WAIT_POLICY=passive build/benchmarks/bench_lora [--threads T] [--reps R] [--tokens N] [--rank R]
//                                                        [--dropout P]
//
// For each input width of the step's adapters (576: q, k, v, o, gate, up; 1536: down) and an output
// width, prints the median of R calls after one warm-up of: the dropout mask alone (GB/s: x read, the
// masked copy written) with the AVX2 Philox rounds and with the portable ones (tf::cpu::
// ScopedPortableKernels), each product of the branch (GFLOP/s), and the whole branch forward + backward
// with dropout p under either mask, and with p = 0 (the branch without masks); ratios are of time to
// the portable mask's. Last, the frozen product x W^T (f32 W) and x A^T as two sgemm calls against one
// sgemm of x and [W; A]. Run it under OMP_WAIT_POLICY=passive, as tightfit runs itself: libgomp's default
// spin makes two threads on a two-core machine wait out whole scheduler slices between OpenBLAS's
// threads and OpenMP's (every op then takes 8 ms).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/isa.h"
#include "kernels/ops.h"
#include "src/core/rng.h"
#include "src/model/lora.h"

using namespace tf;
using Clock = std::chrono::steady_clock;

namespace {

double median_seconds(int reps, const std::function<void()>& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::vector<float> random_vector(size_t n, uint64_t stream, float scale) {
  const Philox rng(7, stream);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (2.0f * rng.uniform(i) - 1.0f) * scale;
  return v;
}

MatOperand f32_operand(const float* p, int64_t ld, bool trans = false) {
  return MatOperand{p, DType::F32, ld, trans};
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 9, rank = 16;
  int64_t tokens = 1024;
  float p = 0.05f;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads")
      threads = std::atoi(argv[i + 1]);
    else if (a == "--reps")
      reps = std::atoi(argv[i + 1]);
    else if (a == "--tokens")
      tokens = std::atoll(argv[i + 1]);
    else if (a == "--rank")
      rank = std::atoi(argv[i + 1]);
    else if (a == "--dropout")
      p = float(std::atof(argv[i + 1]));
    else {
      std::fprintf(stderr,
                   "usage: bench_lora [--threads T] [--reps R] [--tokens N] [--rank R] [--dropout P]\n");
      return 2;
    }
  }
  if (threads > 0) omp_set_num_threads(threads);
  Backend& be = cpu_backend();
  std::printf("LoRA branch, %lld tokens, rank %d, dropout %.3g, %d threads, median of %d\n",
              (long long)tokens, rank, double(p), threads, reps);
  if (!cpu::use_avx2()) std::printf("this CPU has no AVX2: the \"AVX2\" rows run the portable mask too\n");
  std::printf("%-12s %-28s %10s %12s\n", "in -> out", "what", "ms", "rate");
  const int shapes[][2] = {{576, 576}, {576, 192}, {576, 1536}, {1536, 576}};
  for (const auto& s : shapes) {
    const int in = s[0], out = s[1];
    std::vector<float> x = random_vector(size_t(tokens) * in, 1, 1.0f);
    std::vector<float> dy = random_vector(size_t(tokens) * out, 2, 1.0f);
    std::vector<float> A = random_vector(size_t(rank) * in, 3, 0.04f);
    std::vector<float> B = random_vector(size_t(out) * rank, 4, 0.04f);
    std::vector<float> dA(A.size()), dB(B.size()), y(size_t(tokens) * out), dx(size_t(tokens) * in);
    std::vector<float> t(size_t(tokens) * rank), dt(t.size()), xd(x.size());
    LoraAdapter ad;
    ad.A = A.data();
    ad.B = B.data();
    ad.dA = dA.data();
    ad.dB = dB.data();
    ad.in = in;
    ad.out = out;
    ad.rank = rank;
    LoraDropout drop;
    drop.p = p;
    drop.seed = 11;
    drop.step = 3;
    drop.layer = 5;
    char shape[32];
    std::snprintf(shape, sizeof shape, "%d -> %d", in, out);
    auto row = [&](const char* what, double secs, double amount, const char* unit) {
      std::printf("%-12s %-28s %10.3f %9.2f %s\n", shape, what, secs * 1e3, amount / secs / 1e9, unit);
    };
    const double n = double(tokens);
    auto mask = [&] { drop.apply(be, xd.data(), x.data(), tokens, in); };
    double portable_mask;
    {
      const cpu::ScopedPortableKernels portable;
      portable_mask = median_seconds(reps, mask);
    }
    const double fast_mask = median_seconds(reps, mask);
    row("dropout mask, portable", portable_mask, 8.0 * n * in, "GB/s");
    row("dropout mask, AVX2", fast_mask, 8.0 * n * in, "GB/s");
    std::printf("%-12s %-28s %10s %9.2fx\n", shape, "  AVX2 / portable time", "", fast_mask / portable_mask);
    row("x A^T",
        median_seconds(reps,
                       [&] {
                         be.matmul(t.data(), rank, f32_operand(x.data(), in), f32_operand(A.data(), in, true),
                                   tokens, rank, in, 1.0f, 0.0f);
                       }),
        2.0 * n * in * rank, "GFLOP/s");
    row("t B^T (y +=)",
        median_seconds(reps,
                       [&] {
                         be.matmul(y.data(), out, f32_operand(t.data(), rank),
                                   f32_operand(B.data(), rank, true), tokens, out, rank, 1.0f, 1.0f);
                       }),
        2.0 * n * out * rank, "GFLOP/s");
    row("dB += dy^T t",
        median_seconds(reps,
                       [&] {
                         be.matmul(dB.data(), rank, f32_operand(dy.data(), out, true),
                                   f32_operand(t.data(), rank), out, rank, tokens, 1.0f, 1.0f);
                       }),
        2.0 * n * out * rank, "GFLOP/s");
    row("dt = dy B",
        median_seconds(reps,
                       [&] {
                         be.matmul(dt.data(), rank, f32_operand(dy.data(), out), f32_operand(B.data(), rank),
                                   tokens, rank, out, 1.0f, 0.0f);
                       }),
        2.0 * n * out * rank, "GFLOP/s");
    row("dA += dt^T x",
        median_seconds(reps,
                       [&] {
                         be.matmul(dA.data(), in, f32_operand(dt.data(), rank, true),
                                   f32_operand(x.data(), in), rank, in, tokens, 1.0f, 1.0f);
                       }),
        2.0 * n * in * rank, "GFLOP/s");
    row("dx += dt A",
        median_seconds(reps,
                       [&] {
                         be.matmul(dx.data(), in, f32_operand(dt.data(), rank), f32_operand(A.data(), in),
                                   tokens, in, rank, 1.0f, 1.0f);
                       }),
        2.0 * n * in * rank, "GFLOP/s");
    const double branch_flops = 6.0 * n * rank * (in + out);
    auto branch = [&](float q) {
      LoraDropout d = drop;
      d.p = q;
      return median_seconds(reps, [&] {
        lora_forward(be, y.data(), t.data(), xd.data(), x.data(), ad, 2.0f, d, tokens);
        lora_backward(be, dx.data(), dy.data(), x.data(), t.data(), ad, 2.0f, d, tokens, dt.data(),
                      xd.data());
      });
    };
    double portable_branch;
    {
      const cpu::ScopedPortableKernels portable;
      portable_branch = branch(p);
    }
    const double fast_branch = branch(p), plain_branch = branch(0.0f);
    row("branch, portable mask", portable_branch, branch_flops, "GFLOP/s");
    row("branch, AVX2 mask", fast_branch, branch_flops, "GFLOP/s");
    row("branch, p = 0", plain_branch, branch_flops, "GFLOP/s");
    std::printf("%-12s %-28s %10s %9.2fx\n", shape, "  AVX2 / portable time", "",
                fast_branch / portable_branch);
    // Without dropout x A^T could ride on the frozen projection's pass over x: one sgemm against an
    // f32 W with A's rows appended ([W; A], out + rank rows), against the two products apart.
    std::vector<float> WA = random_vector(size_t(out + rank) * in, 5, 0.04f),
                       yt(size_t(tokens) * (out + rank));
    const double apart = median_seconds(reps, [&] {
      be.matmul(y.data(), out, f32_operand(x.data(), in), f32_operand(WA.data(), in, true), tokens, out, in,
                1.0f, 0.0f);
      be.matmul(t.data(), rank, f32_operand(x.data(), in),
                f32_operand(WA.data() + size_t(out) * in, in, true), tokens, rank, in, 1.0f, 0.0f);
    });
    const double joined = median_seconds(reps, [&] {
      be.matmul(yt.data(), out + rank, f32_operand(x.data(), in), f32_operand(WA.data(), in, true), tokens,
                out + rank, in, 1.0f, 0.0f);
    });
    const double joint_flops = 2.0 * n * in * (out + rank);
    row("x W^T, x A^T apart", apart, joint_flops, "GFLOP/s");
    row("x [W; A]^T, one sgemm", joined, joint_flops, "GFLOP/s");
    std::printf("%-12s %-28s %10s %9.2fx\n", shape, "  one / apart time", "", joined / apart);
  }
  return 0;
}
