// Tests: determinism of the fast ops and of the reductions behind the loss, the gradient norm and
// the update. At two threads every op, and a whole training step, repeats its bits exactly; the
// ops that split their work by fixed chunks (all but the OpenBLAS products) give the same bits at
// 1, 2 and 3 threads; tf::ordered_sum and the cross-entropy loss do not depend on the thread count;
// tf::parallel_for_if.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "src/core/parallel.h"
#include "src/train/trainer.h"
#include "tests/model_test_util.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;

namespace {

using Threads = test::ScopedThreads;

// The bytes of an op's outputs, compared whole.
using Bytes = std::string;

template <typename T>
void append(Bytes& out, const std::vector<T>& v) {
  out.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

void append(Bytes& out, double x) {
  append(out, std::vector<double>{x});
}

std::vector<int32_t> random_ids(int64_t n, int64_t below, uint64_t seed) {
  const Philox rng(seed, 0x1d5);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(below));
  return ids;
}

// One op on fixed inputs; run() returns the bytes of everything it wrote. `any_count` says that the
// op's bits do not depend on the thread count; otherwise only repeated runs at one count agree.
struct OpCase {
  std::string name;
  bool any_count;
  std::function<Bytes()> run;
};

OpCase matmul_case(DType b_dtype) {
  // K = 500 and 200 x 300 outputs: past OpenBLAS's threading threshold, so its threads split the
  // product; a bf16 B is widened in tiles by a parallel loop first.
  return {"matmul f32 x " + std::string(dtype_name(b_dtype)), false, [b_dtype] {
            const int64_t M = 200, N = 300, K = 500;
            const std::vector<float> a = random_floats(size_t(M * K), 1);
            const std::vector<float> b = random_floats(size_t(K * N), 2);
            const std::vector<uint16_t> b16 = test::to_bf16(b);
            const MatOperand B = b_dtype == DType::F32 ? MatOperand{b.data(), DType::F32, N, false}
                                                       : MatOperand{b16.data(), DType::BF16, N, false};
            const MatOperand A{a.data(), DType::F32, K, false};
            std::vector<float> c(size_t(M * N));
            cpu::matmul(c.data(), N, A, B, M, N, K, 1.0f, 0.0f);
            const std::vector<float> g = random_floats(c.size(), 3);
            std::vector<float> da(a.size()), db(b.size());
            cpu::matmul_backward(da.data(), b_dtype == DType::F32 ? db.data() : nullptr, g.data(), N, A, B, M,
                                 N, K);
            Bytes out;
            append(out, c);
            append(out, da);
            append(out, db);
            return out;
          }};
}

OpCase cross_entropy_case() {
  // 130 rows: three chunks, the middle one partly ignored; 2048 x 128 keeps both GEMMs threaded.
  return {"lm_head_cross_entropy", false, [] {
            const int64_t n = 130, vocab = 2048, dim = 128;
            const std::vector<float> w = random_floats(size_t(vocab * dim), 4);
            const std::vector<float> h = random_floats(size_t(n * dim), 5, 3.0f);
            std::vector<int32_t> targets = random_ids(n, vocab, 6);
            for (int64_t i = 70; i < 90; ++i) targets[size_t(i)] = kIgnoreIndex;
            std::vector<float> dh(h.size());
            int64_t n_valid = 0;
            const double loss = cpu::lm_head_cross_entropy(dh.data(), &n_valid, h.data(),
                                                           WeightRef{w.data(), DType::F32, vocab, dim},
                                                           targets.data(), n, 1.0f / 110.0f);
            Bytes out;
            append(out, loss);
            append(out, double(n_valid));
            append(out, dh);
            return out;
          }};
}

OpCase attention_case() {
  return {
      "attention forward and backward", true, [] {
        AttentionShape s;
        s.batch = 2;
        s.seq = 150;
        s.n_heads = 4;
        s.n_kv_heads = 2;
        s.head_dim = 32;
        s.scale = 1.0f / std::sqrt(32.0f);
        const int64_t T = int64_t(s.batch) * s.seq, QD = 4 * 32, KD = 2 * 32;
        const std::vector<float> q = random_floats(size_t(T * QD), 7), k = random_floats(size_t(T * KD), 8),
                                 v = random_floats(size_t(T * KD), 9), g = random_floats(size_t(T * QD), 10);
        std::vector<int32_t> docs(static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) docs[size_t(t)] = int32_t(t % s.seq / 70);
        std::vector<float> o(q.size()), lse(size_t(T * s.n_heads)), dq(q.size()), dk(k.size()), dv(v.size());
        cpu::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), docs.data(), s);
        cpu::attention_backward(dq.data(), dk.data(), dv.data(), g.data(), q.data(), k.data(), v.data(),
                                o.data(), lse.data(), docs.data(), s);
        Bytes out;
        for (const auto* x : {&o, &lse, &dq, &dk, &dv}) append(out, *x);
        return out;
      }};
}

OpCase attention_cached_case() {
  return {"attention_cached_forward", true, [] {
            const int64_t past = 100, fresh = 20, H = 8, KV = 2, D = 32;
            const std::vector<float> q = random_floats(size_t(fresh * H * D), 11);
            const std::vector<float> k = random_floats(size_t((past + fresh) * KV * D), 12);
            const std::vector<float> v = random_floats(k.size(), 13);
            std::vector<float> o(q.size());
            cpu::attention_cached_forward(o.data(), q.data(), k.data(), v.data(), past, fresh, int(H),
                                          int(KV), int(D), 1.0f / std::sqrt(float(D)), 0);
            Bytes out;
            append(out, o);
            return out;
          }};
}

OpCase rmsnorm_case() {
  // 300 x 200 crosses the parallel threshold; d_weight sums over rows.
  return {"rmsnorm forward and backward", true, [] {
            const int64_t rows = 300, dim = 200;
            const std::vector<float> x = random_floats(size_t(rows * dim), 14);
            const std::vector<float> w = random_floats(size_t(dim), 15);
            const std::vector<float> g = random_floats(x.size(), 16);
            const WeightRef wr{w.data(), DType::F32, 1, dim};
            std::vector<float> y(x.size()), rstd(static_cast<size_t>(rows)), dx(x.size()),
                dw(static_cast<size_t>(dim));
            cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), wr, rows, dim, 1e-5f);
            cpu::rmsnorm_backward(dx.data(), dw.data(), g.data(), x.data(), wr, rstd.data(), rows, dim);
            Bytes out;
            for (const auto* p : {&y, &rstd, &dx, &dw}) append(out, *p);
            return out;
          }};
}

OpCase embedding_case() {
  // 2000 tokens over 50 ids: each row of d_table sums ~40 tokens.
  return {
      "embedding forward and backward", true, [] {
        const int64_t vocab = 50, dim = 160, n = 2000;
        const std::vector<float> table = random_floats(size_t(vocab * dim), 17);
        const std::vector<int32_t> tokens = random_ids(n, vocab, 18);
        const std::vector<float> g = random_floats(size_t(n * dim), 19);
        std::vector<float> out(size_t(n * dim)), d_table(table.size());
        cpu::embedding_forward(out.data(), tokens.data(), n, WeightRef{table.data(), DType::F32, vocab, dim});
        cpu::embedding_backward(d_table.data(), g.data(), tokens.data(), n, vocab, dim);
        Bytes bytes;
        append(bytes, out);
        append(bytes, d_table);
        return bytes;
      }};
}

OpCase elementwise_case() {
  return {"rope, swiglu, geglu, adamw", true, [] {
            const int64_t tokens = 300, heads = 4, hd = 32, n = tokens * heads * hd;
            RopeParams rp;
            rp.head_dim = int(hd);
            std::vector<float> inv_freq(size_t(hd / 2));
            rope_inv_freq(rp, inv_freq.data());
            std::vector<int32_t> pos(static_cast<size_t>(tokens));
            for (int64_t t = 0; t < tokens; ++t) pos[size_t(t)] = int32_t(t);
            std::vector<float> x = random_floats(size_t(n), 20), dx = random_floats(size_t(n), 21);
            cpu::rope_forward(x.data(), pos.data(), inv_freq.data(), tokens, int(heads), int(hd),
                              RopeLayout::SplitHalf);
            cpu::rope_backward(dx.data(), pos.data(), inv_freq.data(), tokens, int(heads), int(hd),
                               RopeLayout::Interleaved);
            const std::vector<float> gate = random_floats(size_t(n), 22), up = random_floats(size_t(n), 23);
            std::vector<float> act(static_cast<size_t>(n)), dgate(static_cast<size_t>(n)),
                dup(static_cast<size_t>(n));
            cpu::swiglu_forward(act.data(), gate.data(), up.data(), n);
            cpu::swiglu_backward(dgate.data(), dup.data(), x.data(), gate.data(), up.data(), n);
            std::vector<float> gact(static_cast<size_t>(n)), gdgate(static_cast<size_t>(n)),
                gdup(static_cast<size_t>(n));
            cpu::geglu_forward(gact.data(), gate.data(), up.data(), n);
            cpu::geglu_backward(gdgate.data(), gdup.data(), x.data(), gate.data(), up.data(), n);
            std::vector<float> param = random_floats(size_t(n), 24), m(static_cast<size_t>(n)),
                               v(static_cast<size_t>(n));
            cpu::adamw_update(param.data(), dx.data(), m.data(), v.data(), n, AdamWParams{});
            Bytes out;
            for (const auto* p : {&x, &dx, &act, &dgate, &dup, &gact, &gdgate, &gdup, &param, &m, &v})
              append(out, *p);
            return out;
          }};
}

TEST(Threads, FastOpsRepeatTheirBitsAtTwoThreads) {
  const OpCase cases[] = {matmul_case(DType::F32), matmul_case(DType::BF16), cross_entropy_case(),
                          attention_case(),        attention_cached_case(),  rmsnorm_case(),
                          embedding_case(),        elementwise_case()};
  for (const OpCase& c : cases) {
    SCOPED_TRACE(c.name);
    Bytes first;
    {
      const Threads two(2);
      first = c.run();
      for (int rep = 0; rep < 4; ++rep) EXPECT_TRUE(c.run() == first) << "run " << rep + 2 << " differs";
    }
    if (!c.any_count) continue;
    for (const int n : {1, 3}) {
      const Threads threads(n);
      EXPECT_TRUE(c.run() == first) << n << " threads differ from 2";
    }
  }
}

// Terms spanning 2^-20 .. 2^20: their double sum depends on the order they are added in.
std::vector<float> wide_range_values(int64_t n) {
  std::vector<float> g = random_floats(size_t(n), 25);
  for (int64_t i = 0; i < n; ++i) g[size_t(i)] = std::ldexp(g[size_t(i)], int(i * 7919 % 41) - 20);
  return g;
}

double square(float x) {
  return double(x) * double(x);
}

TEST(OrderedSum, AddsFixedChunksInOrderForAnyThreadCount) {
  const int64_t n = 5 * kOrderedSumChunk + 77;
  const std::vector<float> g = wide_range_values(n);
  // The documented order, written out: each chunk from its first index, then the chunk sums.
  double want = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kOrderedSumChunk) {
    double s = 0;
    for (int64_t i = c0; i < std::min(n, c0 + kOrderedSumChunk); ++i) s += square(g[size_t(i)]);
    want += s;
  }
  // The data tells orders apart: one running sum, as one thread of a reduction adds, differs.
  double running = 0;
  for (const float x : g) running += square(x);
  ASSERT_NE(running, want);

  for (const int threads : {1, 2, 3}) {
    const Threads t(threads);
    EXPECT_EQ(ordered_sum(n, [&g](int64_t i) { return square(g[size_t(i)]); }), want) << threads;
    EXPECT_EQ(global_grad_norm(cpu_backend(), g.data(), n), std::sqrt(want)) << threads;
  }
  EXPECT_EQ(ordered_sum(0, [](int64_t) { return 1.0; }), 0.0);
  EXPECT_EQ(ordered_sum(3, [](int64_t i) { return double(i); }), 3.0);
  // Past kOrderedSumMaxChunks chunks of the usual size, chunks grow: every term is still counted once.
  const int64_t big = kOrderedSumChunk * kOrderedSumMaxChunks + 5;
  EXPECT_EQ(ordered_sum(big, [](int64_t) { return 1.0; }), double(big));
}

// parallel_for_if visits every index once; left to one thread it runs them in order on the caller,
// outside any OpenMP region (what spares a small loop libgomp's team), and in parallel the
// threads share them.
TEST(ParallelForIf, VisitsEveryIndexOnceAndEntersARegionOnlyInParallel) {
  const Threads t(2);
  const int64_t n = 1000;
  std::vector<int> visits(size_t(n), 0);
  std::vector<int64_t> order;
  bool inside_region = false;
  parallel_for_if(false, n, [&](int64_t i) {
    ++visits[size_t(i)];
    order.push_back(i);
    inside_region = inside_region || omp_in_parallel();
  });
  EXPECT_FALSE(inside_region);
  ASSERT_EQ(order.size(), size_t(n));
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(order[size_t(i)], i);
  std::vector<int> threads(size_t(n), -1);
  parallel_for_if(true, n, [&](int64_t i) {
    ++visits[size_t(i)];
    threads[size_t(i)] = omp_get_thread_num();
  });
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(visits[size_t(i)], 2) << i;
  EXPECT_EQ(threads.front(), 0);
  EXPECT_EQ(threads.back(), 1);
  parallel_for_if(true, 0, [&](int64_t) { ADD_FAILURE() << "no index to visit"; });
}

// One 64-row chunk of logits, [64, 257] from dim 15: GEMMs this small OpenBLAS runs on the calling
// thread whatever its thread count, so the logits are the same bits at any count and what is
// compared is the cross-entropy's own loops. Row 0's large loss makes the sum's rounding depend
// on the order the rows are added in: adding per-thread partial sums instead changes the bits in
// about 3 of 4 data sets, so eight of them leave a wrong order no real chance of passing.
TEST(LmHeadCrossEntropy, LossAndGradientAreTheSameForAnyThreadCount) {
  const int64_t n = 64, vocab = 257, dim = 15;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    SCOPED_TRACE("data set " + std::to_string(seed));
    const std::vector<float> w = random_floats(size_t(vocab * dim), 100 + seed);
    std::vector<float> h = random_floats(size_t(n * dim), 200 + seed, 2.0f);
    for (int64_t d = 0; d < dim; ++d) h[size_t(d)] *= 1000.0f;
    std::vector<int32_t> targets = random_ids(n, vocab, 300 + seed);
    for (int64_t i = 5; i < n; i += 9) targets[size_t(i)] = kIgnoreIndex;
    const auto logits = [&] {
      std::vector<float> z(size_t(n * vocab));
      cpu::matmul(z.data(), vocab, MatOperand{h.data(), DType::F32, dim, false},
                  MatOperand{w.data(), DType::F32, dim, true}, n, vocab, dim, 1.0f, 0.0f);
      return z;
    };
    const auto run = [&] {
      std::vector<float> dh(h.size());
      int64_t n_valid = 0;
      const WeightRef W{w.data(), DType::F32, vocab, dim};
      Bytes out;
      append(out, cpu::lm_head_cross_entropy(dh.data(), &n_valid, h.data(), W, targets.data(), n, 0.01f));
      append(out, double(n_valid));
      append(out, dh);
      return out;
    };
    std::vector<float> one_logits;
    Bytes one;
    {
      const Threads t(1);
      one_logits = logits();
      one = run();
    }
    for (const int threads : {2, 3}) {
      const Threads t(threads);
      ASSERT_TRUE(logits() == one_logits) << "OpenBLAS split a small GEMM over " << threads << " threads";
      EXPECT_TRUE(run() == one) << threads << " threads";
    }
  }
}

// A training step (LoRA on every projection with dropout, recomputed blocks, bf16 weights, sizes
// past every parallel threshold) run twice from the same state at two threads: the same losses,
// gradient norms and LoRA parameters, bit for bit. This is what a resumed run relies on.
TEST(Trainer, StepsRepeatTheirBitsAtTwoThreads) {
  LlamaConfig cfg = test::tiny_config(512);
  cfg.hidden = 128;
  cfg.intermediate = 256;
  cfg.head_dim = 32;
  cfg.rope.head_dim = 32;
  LoraConfig lora;
  lora.rank = 8;
  lora.dropout = 0.1f;
  lora.seed = 5;
  TrainConfig tc;
  tc.lr.peak_lr = 1e-2f;
  tc.lr.total_steps = 2;
  tc.clip = 0.5f;
  const auto train = [&] {
    LlamaModel model(init_random_weights(cfg, DType::BF16, 29, 0.1f), lora, CheckpointPolicy::PerBlock, 256);
    test::fill_lora_params(model.lora(), 30, 1, 0.05f);
    Trainer trainer(model, tc);
    Bytes out;
    for (int s = 0; s < 2; ++s) {
      const test::BatchData data = test::synthetic_batch(2, 128, cfg.vocab, uint64_t(s), 40);
      const Batch b = data.view(true);
      const StepStats st = trainer.step({&b, 1});
      EXPECT_FALSE(st.skipped);
      append(out, st.loss);
      append(out, double(st.grad_norm));
    }
    const float* p = model.lora().param_data();
    append(out, std::vector<float>(p, p + model.lora().n_params));
    return out;
  };
  const Threads two(2);
  const Bytes first = train();
  EXPECT_TRUE(train() == first);
}

}  // namespace
