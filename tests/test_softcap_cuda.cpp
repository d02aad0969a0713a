// Tests: logit soft-capping (Gemma 2) in the CUDA backend's kernels, run on the SIMT simulator
// (tf::simt): the plain attention kernels (forward, backward, decoding), the flash kernels
// (forward, backward, decoding) and the fused lm_head + cross-entropy, each against the float64
// reference with the cap set, on inputs whose scores and logits pass the caps by far (so tanh
// saturates for some and an ignored cap or a missing 1 - tanh^2 shows as an error of order 1);
// and cuDNN's refusal of a capped call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cpu/ref/cross_entropy.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/ops.h"
#include "tests/attention_test_util.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"

#if TIGHTFIT_HAVE_CUDA
#include "kernels/cuda/cudnn_attention.h"
#endif

namespace tf {
namespace {

using test::Docs;
using test::Guarded;
using test::random_floats;
using test::rel_norm_error;

// The relative error of a few f32 roundings: the floor under a bound taken from the naive f32
// reference when that one happens to be almost exact.
constexpr double kF32Floor = 4 * 5.96e-8;
// bf16's unit roundoff (8 significant bits).
constexpr double kBf16U = 1.0 / 256;

struct Inputs {
  AttentionShape s;
  std::vector<float> q, k, v, d_out;
  std::vector<int32_t> doc;
  // q and k in [-3, 3): scores of up to several times the caps of 1 to 3 used here.
  Inputs(const AttentionShape& shape, Docs docs, uint64_t seed) : s(shape) {
    const size_t tokens = size_t(s.batch) * size_t(s.seq);
    q = random_floats(tokens * size_t(s.n_heads * s.head_dim), seed, 3.0f);
    k = random_floats(tokens * size_t(s.n_kv_heads * s.head_dim), seed + 1, 3.0f);
    v = random_floats(k.size(), seed + 2);
    d_out = random_floats(q.size(), seed + 3);
    doc = test::make_doc_ids(s.batch, s.seq, docs, seed + 4);
  }
  size_t lse_size() const { return q.size() / size_t(s.head_dim); }
  const int32_t* doc_ptr() const { return doc.empty() ? nullptr : doc.data(); }
};

template <typename T>
struct Outputs {
  std::vector<T> out, lse, dq, dk, dv;
};

// The reference in precision T on the inputs as given (or rounded to bf16 first: what the flash
// kernels' tensor cores multiply).
template <typename T>
Outputs<T> reference(const Inputs& in, bool bf16) {
  auto load = [bf16](const std::vector<float>& x) {
    const std::vector<float> r = bf16 ? test::bf16_rounded(x) : x;
    return std::vector<T>(r.begin(), r.end());
  };
  const std::vector<T> q = load(in.q), k = load(in.k), v = load(in.v), d_out = load(in.d_out);
  Outputs<T> o{std::vector<T>(q.size()), std::vector<T>(in.lse_size()), std::vector<T>(q.size()),
               std::vector<T>(k.size()), std::vector<T>(k.size())};
  ref::attention_forward<T>(o.out.data(), o.lse.data(), q.data(), k.data(), v.data(), in.doc_ptr(), in.s);
  ref::attention_backward<T>(o.dq.data(), o.dk.data(), o.dv.data(), d_out.data(), q.data(), k.data(),
                             v.data(), in.doc_ptr(), in.s);
  return o;
}

// One of the device kernels, forward then backward from its own out and lse, as the backend runs them.
Outputs<float> device(const Inputs& in, bool flash) {
  Guarded<float> q(in.q, "q"), k(in.k, "k"), v(in.v, "v"), d_out(in.d_out, "d_out");
  Guarded<float> out(std::vector<float>(in.q.size()), "out"), lse(std::vector<float>(in.lse_size()), "lse");
  Guarded<float> dq(std::vector<float>(in.q.size()), "dq"), dk(std::vector<float>(in.k.size()), "dk"),
      dv(std::vector<float>(in.k.size()), "dv");
  Guarded<int32_t> doc(in.doc, "doc");
  const int32_t* d = in.doc.empty() ? nullptr : doc.get();
  if (flash) {
    simt::flash_attention_forward(out.get(), lse.get(), q.get(), k.get(), v.get(), d, in.s);
    simt::flash_attention_backward(dq.get(), dk.get(), dv.get(), d_out.get(), q.get(), k.get(), v.get(),
                                   out.get(), lse.get(), d, in.s);
  } else {
    simt::attention_forward(out.get(), lse.get(), q.get(), k.get(), v.get(), d, in.s);
    simt::attention_backward(dq.get(), dk.get(), dv.get(), d_out.get(), q.get(), k.get(), v.get(), out.get(),
                             lse.get(), d, in.s);
  }
  for (const Guarded<float>* g : {&out, &lse, &dq, &dk, &dv}) EXPECT_TRUE(g->guards_intact());
  return {out.download(), lse.download(), dq.download(), dk.download(), dv.download()};
}

struct Case {
  int batch, seq, heads, kv_heads, head_dim;
  Docs docs;
  int window;
  float cap;
};

AttentionShape shape_of(const Case& c) {
  AttentionShape s = test::make_shape(c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
  s.window = c.window;
  s.softcap = c.cap;
  return s;
}

// The plain kernels are f32 implementations of the reference's formulas, caps included (a
// division, tanhf and a product per score): within 4x the naive f32 reference's own error (or
// kF32Floor), as tests/test_softcap_ops.cpp bounds the cpu's.
TEST(SoftcapCuda, PlainAttentionMatchesReference) {
  for (const Case& c :
       {Case{1, 33, 4, 2, 16, Docs::Packed, 0, 2.0f}, Case{2, 20, 3, 1, 8, Docs::None, 5, 1.0f}}) {
    SCOPED_TRACE("seq " + std::to_string(c.seq) + " cap " + std::to_string(c.cap));
    const Inputs in(shape_of(c), c.docs, 40 + uint64_t(c.seq));
    const Outputs<float> got = device(in, false), naive = reference<float>(in, false);
    const Outputs<double> exact = reference<double>(in, false);
    auto check = [](const char* what, const std::vector<float>& g, const std::vector<float>& n,
                    const std::vector<double>& want) {
      const double err = rel_norm_error(g, want), naive_err = rel_norm_error(n, want);
      EXPECT_LE(err, 4 * std::max(naive_err, kF32Floor))
          << what << ": device " << err << ", naive " << naive_err;
    };
    check("out", got.out, naive.out, exact.out);
    check("lse", got.lse, naive.lse, exact.lse);
    check("dq", got.dq, naive.dq, exact.dq);
    check("dk", got.dk, naive.dk, exact.dk);
    check("dv", got.dv, naive.dv, exact.dv);
  }
}

// The flash kernels against the float64 reference on the bf16-rounded inputs they multiply. The
// forward rounds P to bf16 before P V (each weight relative 2^-9, out by at most 2^-8 relative);
// the backward rounds P and dS to bf16 for their products and takes delta from the rounded dO and
// the forward's out (2^-8 off): a relative error of a few 2^-8 in each gradient. 4 bf16 ulps for
// out and lse and 8 for the gradients leave room for exp2f and the f32 sums, while a cap left out
// or a missing 1 - tanh^2 is off by order 1: the uncapped reference is checked to be far away.
TEST(SoftcapCuda, FlashAttentionMatchesReferenceOnBf16Inputs) {
  for (const Case& c :
       {Case{1, 70, 2, 1, 64, Docs::Packed, 0, 2.0f}, Case{1, 70, 4, 2, 64, Docs::None, 17, 3.0f}}) {
    SCOPED_TRACE("window " + std::to_string(c.window) + " cap " + std::to_string(c.cap));
    const Inputs in(shape_of(c), c.docs, 70 + uint64_t(c.window));
    const Outputs<float> got = device(in, true);
    const Outputs<double> exact = reference<double>(in, true);
    EXPECT_LE(rel_norm_error(got.out, exact.out), 4 * kBf16U);
    EXPECT_LE(rel_norm_error(got.lse, exact.lse), 4 * kBf16U);
    EXPECT_LE(rel_norm_error(got.dq, exact.dq), 8 * kBf16U);
    EXPECT_LE(rel_norm_error(got.dk, exact.dk), 8 * kBf16U);
    EXPECT_LE(rel_norm_error(got.dv, exact.dv), 8 * kBf16U);
    Inputs uncapped = in;
    uncapped.s.softcap = 0.0f;
    const Outputs<double> plain = reference<double>(uncapped, true);
    EXPECT_GT(rel_norm_error(plain.out, exact.out), 40 * kBf16U) << "the inputs do not reach the cap";
    EXPECT_GT(rel_norm_error(plain.dq, exact.dq), 80 * kBf16U) << "the inputs do not reach the cap";
  }
}

// Decoding with a cap, on the plain kernel (f32: 4x the naive f32 reference's error) and the flash
// one (bf16 inputs and P: 4 bf16 ulps against the reference on the rounded inputs), against the
// float64 cached reference.
TEST(SoftcapCuda, CachedDecodeMatchesReference) {
  const int H = 4, KV = 2, D = 64;
  for (const auto& [n_past, n_new, window] :
       {std::tuple{int64_t(40), int64_t(1), 0}, std::tuple{int64_t(30), int64_t(3), 9}}) {
    SCOPED_TRACE("past " + std::to_string(n_past) + " new " + std::to_string(n_new));
    const float scale = 0.125f, cap = 2.0f;
    const int64_t rows = n_past + n_new;
    const std::vector<float> q = random_floats(size_t(n_new * H * D), 90, 3.0f),
                             k = random_floats(size_t(rows * KV * D), 91, 3.0f),
                             v = random_floats(k.size(), 92);
    auto exact = [&](bool bf16) {
      auto load = [bf16](const std::vector<float>& x) {
        const std::vector<float> r = bf16 ? test::bf16_rounded(x) : x;
        return std::vector<double>(r.begin(), r.end());
      };
      const std::vector<double> qd = load(q), kd = load(k), vd = load(v);
      std::vector<double> out(q.size());
      ref::attention_cached_forward<double>(out.data(), qd.data(), kd.data(), vd.data(), n_past, n_new, H, KV,
                                            D, scale, window, cap);
      return out;
    };
    Guarded<float> dq(q, "q"), dk(k, "k"), dv(v, "v"), out(std::vector<float>(q.size()), "out");
    simt::attention_cached_forward(out.get(), dq.get(), dk.get(), dv.get(), n_past, n_new, H, KV, D, scale,
                                   window, cap);
    std::vector<float> naive(q.size());
    ref::attention_cached_forward<float>(naive.data(), q.data(), k.data(), v.data(), n_past, n_new, H, KV, D,
                                         scale, window, cap);
    const std::vector<double> want = exact(false);
    EXPECT_LE(rel_norm_error(out.download(), want), 4 * std::max(rel_norm_error(naive, want), kF32Floor));
    simt::flash_attention_cached_forward(out.get(), dq.get(), dk.get(), dv.get(), n_past, n_new, H, KV, D,
                                         scale, window, cap);
    EXPECT_LE(rel_norm_error(out.download(), exact(true)), 4 * kBf16U);
    EXPECT_TRUE(out.guards_intact());
  }
}

// The device's loss and d_h with capped logits (f32 W: f32 products on the device, as on the cpu)
// against the float64 reference, within 4x the cpu's own error (or kF32Floor): both form the
// same capped logits, softmax and gradient in f32, in other orders.
TEST(SoftcapCuda, CrossEntropyMatchesReference) {
  const int64_t n = 131, vocab = 37, dim = 24;
  const float cap = 2.0f;
  const std::vector<float> h = random_floats(size_t(n * dim), 5, 3.0f),
                           w = random_floats(size_t(vocab * dim), 6);
  std::vector<int32_t> targets(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    targets[size_t(i)] = i % 5 == 3 ? kIgnoreIndex : int32_t((i * 7 + 3) % vocab);
  const int64_t valid =
      std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t != kIgnoreIndex; });
  const float grad_scale = 1.0f / float(valid);

  const std::vector<double> hd(h.begin(), h.end()), wd(w.begin(), w.end());
  const auto read_w = [&wd](int64_t r, int64_t c) { return wd[size_t(r * dim + c)]; };
  std::vector<double> dh_exact(hd.size(), 0.0);
  int64_t n_valid = 0;
  const double loss_exact = ref::lm_head_cross_entropy_loops(dh_exact.data(), &n_valid, hd.data(), read_w,
                                                             vocab, dim, targets.data(), n, grad_scale, cap);

  std::vector<float> dh_cpu(h.size(), 0.0f);
  const WeightRef host_w{w.data(), DType::F32, vocab, dim};
  const double loss_cpu = cpu::lm_head_cross_entropy(dh_cpu.data(), &n_valid, h.data(), host_w,
                                                     targets.data(), n, grad_scale, cap);

  Guarded<float> dev_h(h, "h"), dev_w(w, "W"), dev_dh(std::vector<float>(h.size(), 0.0f), "d_h");
  Guarded<int32_t> dev_t(targets, "targets");
  int64_t got_valid = 0;
  const double loss = simt::lm_head_cross_entropy(dev_dh.get(), &got_valid, dev_h.get(),
                                                  WeightRef{dev_w.get(), DType::F32, vocab, dim}, dev_t.get(),
                                                  n, grad_scale, cap);
  EXPECT_EQ(got_valid, valid);
  const double loss_err = std::abs(loss - loss_exact) / loss_exact,
               cpu_loss_err = std::abs(loss_cpu - loss_exact) / loss_exact;
  EXPECT_LE(loss_err, 4 * std::max(cpu_loss_err, kF32Floor))
      << "device " << loss_err << ", cpu " << cpu_loss_err;
  const std::vector<float> dh = dev_dh.download();
  EXPECT_LE(rel_norm_error(dh, dh_exact), 4 * std::max(rel_norm_error(dh_cpu, dh_exact), kF32Floor));
  EXPECT_TRUE(dev_dh.guards_intact());
}

#if TIGHTFIT_HAVE_CUDA
// cuDNN's graph here has no soft-capping: its launchers refuse a capped call by name, in a build
// with cuDNN and without, before anything is planned.
TEST(SoftcapCuda, CudnnRefusesCappedScoresByName) {
  AttentionShape s = test::make_shape(2, 192, 8, 2, 64);
  s.softcap = 50.0f;
  int ops = 0;
  for (const bool backward : {false, true}) {
    const std::string msg =
        test::error_of([&] { cuda::cudnn_attention_offline_engines(s, backward, "", &ops); });
    EXPECT_NE(
        msg.find("--attention cudnn: the cuDNN attention graph here has no logit soft-capping (this model "
                 "caps its attention scores at 50)"),
        std::string::npos)
        << msg;
  }
}
#endif

}  // namespace
}  // namespace tf
