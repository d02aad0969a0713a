// Tests: the bf16 precision of the cpu products (tf::cpu::bf16_gemm under tf::cpu::matmul,
// matmul_backward, linear_forward and linear_backward_input) against tf::ref in every transpose case,
// odd sizes, padded leading dimensions, alpha / beta, quantized weights over several tiles and
// activations over several slabs; the f32 precision giving the bits of OpenBLAS's sgemm on widened
// operands (what the products were before bf16 existed); round_to_bf16 and dequantize_weight_tile_bf16
// against tf::f32_to_bf16; and what --matmul picks for a given CPU and base (resolve_matmul).
#include <cblas.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/quant_gemv.h"
#include "kernels/cpu/ref/cross_entropy.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/op_test_util.h"
#include "tests/quant_test_util.h"

using namespace tf;
using tf::test::random_floats;

namespace {

// Unit roundoffs: f32 (24 significant bits) and bf16 (8).
constexpr double kU32 = 1.0 / (1 << 24);
constexpr double kUBf16 = 1.0 / (1 << 8);

#define SKIP_WITHOUT_BF16()                                     \
  if (!cpu::cpu_has_avx512_bf16())                              \
  GTEST_SKIP() << "this CPU has no avx512_bf16: the bf16 path " \
                  "cannot run here"

// The error bounds of one output element c = alpha * sum_k a_k b_k + beta * c0, computed by the bf16
// path from a'_k = bf16(a_k), b'_k = bf16(b_k):
// - against the reference on the ROUNDED operands: each a'_k b'_k is exact in f32 (8 + 8 significant
//   bits), so what remains is the f32 sum of K terms in any order (at most (K - 1) u32 of S' =
//   sum |a'_k b'_k|), alpha's product and beta's sum (one rounding each) and the reference's own
//   rounding: (K + 3) u32 (|alpha| S' + |beta c0|) bounds them all;
// - against the reference on the operands as given: rounding each operand to bf16 moves a product by
//   at most (2 u_bf16 + u_bf16^2) |a_k b_k|, so (2 u_bf16 + u_bf16^2) |alpha| S is added, S = sum
//   |a_k b_k|.
// Both are worst cases, met by no random data: the first catches an operand rounded the wrong way
// (truncation moves a product by up to 2^-7, far above (K + 3) 2^-24), the second anything else.
struct Bound {
  double rounded, given;
};
Bound bf16_bound(int64_t K, double alpha, double S_rounded, double S, double beta_c0) {
  const double sums = double(K + 3) * kU32 * (std::abs(alpha) * S_rounded + std::abs(beta_c0));
  return {sums, sums + (2 * kUBf16 + kUBf16 * kUBf16) * std::abs(alpha) * S};
}

float round_value(float v) {
  return bf16_to_f32(f32_to_bf16(v));
}

// A row-major [rows, ld] operand stored as f32 or bf16, with its values as given and rounded to bf16.
struct Operand {
  std::vector<float> given, rounded;
  std::vector<uint16_t> bits;
  DType dtype;
  int64_t ld;

  Operand(int64_t rows, int64_t cols, int64_t pad, DType dt, uint64_t seed) : dtype(dt), ld(cols + pad) {
    given = random_floats(size_t(rows * ld), seed);
    bits = test::to_bf16(given);
    if (dt == DType::BF16)
      for (size_t i = 0; i < given.size(); ++i) given[i] = bf16_to_f32(bits[i]);
    rounded.resize(given.size());
    for (size_t i = 0; i < given.size(); ++i) rounded[i] = bf16_to_f32(bits[i]);
  }
  MatOperand stored(bool trans) const {
    return {dtype == DType::BF16 ? static_cast<const void*>(bits.data()) : given.data(), dtype, ld, trans};
  }
  MatOperand f32(const std::vector<float>& v, bool trans) const { return {v.data(), DType::F32, ld, trans}; }
};

// op(X)[i, k] of a stored operand.
float op_at(const std::vector<float>& v, int64_t ld, bool trans, int64_t i, int64_t k) {
  return trans ? v[size_t(k * ld + i)] : v[size_t(i * ld + k)];
}

// S[i, j] = sum_k |op(A)[i, k]| |op(B)[k, j]|.
std::vector<double> abs_products(const std::vector<float>& a, int64_t lda, bool ta,
                                 const std::vector<float>& b, int64_t ldb, bool tb, int64_t M, int64_t N,
                                 int64_t K) {
  std::vector<double> S(size_t(M * N), 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const double ak = std::abs(double(op_at(a, lda, ta, i, k)));
      for (int64_t j = 0; j < N; ++j) S[size_t(i * N + j)] += ak * std::abs(double(op_at(b, ldb, !tb, j, k)));
    }
  return S;
}

// Checks got[i, j] (leading dimension ldc) against both references within bf16_bound; counts and
// reports the first element outside.
void expect_bf16_close(const std::vector<float>& got, const std::vector<float>& want_rounded,
                       const std::vector<float>& want_given, const std::vector<double>& S_rounded,
                       const std::vector<double>& S, const std::vector<float>& c0, int64_t M, int64_t N,
                       int64_t ldc, int64_t K, float alpha, float beta) {
  int64_t bad = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const size_t at = size_t(i * ldc + j), s = size_t(i * N + j);
      const Bound b = bf16_bound(K, alpha, S_rounded[s], S[s], beta == 0.0f ? 0.0 : double(beta) * c0[at]);
      const double e_rounded = std::abs(double(got[at]) - double(want_rounded[at]));
      const double e_given = std::abs(double(got[at]) - double(want_given[at]));
      if (!(e_rounded <= b.rounded && e_given <= b.given)) {
        if (bad == 0)
          ADD_FAILURE() << "C[" << i << ", " << j << "] = " << got[at] << ": reference on bf16 operands "
                        << want_rounded[at] << " (bound " << b.rounded << "), on the operands as given "
                        << want_given[at] << " (bound " << b.given << ")";
        ++bad;
      }
    }
  EXPECT_EQ(bad, 0) << "of " << M * N << " elements outside the bound";
}

struct GemmCase {
  int64_t M, N, K;
  bool ta, tb;
  DType a_dtype, b_dtype;
  int64_t pad;
  float alpha, beta;
};

std::string describe(const GemmCase& c) {
  return "M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) +
         " ta=" + std::to_string(c.ta) + " tb=" + std::to_string(c.tb) +
         " A=" + std::string(dtype_name(c.a_dtype)) + " B=" + std::string(dtype_name(c.b_dtype)) +
         " pad=" + std::to_string(c.pad) + " alpha=" + std::to_string(c.alpha) +
         " beta=" + std::to_string(c.beta);
}

void check_gemm(const GemmCase& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const Operand a(c.ta ? c.K : c.M, c.ta ? c.M : c.K, c.pad, c.a_dtype, seed);
  const Operand b(c.tb ? c.N : c.K, c.tb ? c.K : c.N, c.pad, c.b_dtype, seed + 1);
  const int64_t ldc = c.N + c.pad;
  // beta 0 must overwrite C without reading it: NaNs there would show.
  const std::vector<float> c0 = c.beta == 0.0f ? std::vector<float>(size_t(c.M * ldc), std::nanf(""))
                                               : random_floats(size_t(c.M * ldc), seed + 2);
  std::vector<float> got = c0, again = c0, want_rounded = c0, want_given = c0;
  {
    cpu::ScopedMatmulPrecision bf16(cpu::MatmulPrecision::BF16);
    cpu::matmul(got.data(), ldc, a.stored(c.ta), b.stored(c.tb), c.M, c.N, c.K, c.alpha, c.beta);
    cpu::matmul(again.data(), ldc, a.stored(c.ta), b.stored(c.tb), c.M, c.N, c.K, c.alpha, c.beta);
  }
  ref::matmul(want_rounded.data(), ldc, a.f32(a.rounded, c.ta), b.f32(b.rounded, c.tb), c.M, c.N, c.K,
              c.alpha, c.beta);
  ref::matmul(want_given.data(), ldc, a.f32(a.given, c.ta), b.f32(b.given, c.tb), c.M, c.N, c.K, c.alpha,
              c.beta);
  expect_bf16_close(got, want_rounded, want_given,
                    abs_products(a.rounded, a.ld, c.ta, b.rounded, b.ld, c.tb, c.M, c.N, c.K),
                    abs_products(a.given, a.ld, c.ta, b.given, b.ld, c.tb, c.M, c.N, c.K), c0, c.M, c.N, ldc,
                    c.K, c.alpha, c.beta);
  EXPECT_EQ(std::memcmp(got.data(), again.data(), got.size() * sizeof(float)), 0) << "not repeatable";
  // Padding past N is never written.
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = c.N; j < ldc; ++j) {
      const size_t at = size_t(i * ldc + j);
      ASSERT_TRUE(std::memcmp(&got[at], &c0[at], sizeof(float)) == 0)
          << "padding C[" << i << ", " << j << "]";
    }
}

TEST(Bf16Matmul, EveryTransposeCaseAndOperandDtypeMatchesReference) {
  SKIP_WITHOUT_BF16();
  uint64_t seed = 10;
  const DType pairs[][2] = {{DType::F32, DType::BF16}, {DType::BF16, DType::F32}, {DType::BF16, DType::BF16}};
  for (const auto& p : pairs)
    for (const bool ta : {false, true})
      for (const bool tb : {false, true}) {
        check_gemm({37, 29, 53, ta, tb, p[0], p[1], 0, 1.0f, 0.0f}, seed += 3);
        check_gemm({5, 67, 131, ta, tb, p[0], p[1], 3, 0.5f, 1.0f}, seed += 3);
        check_gemm({64, 48, 17, ta, tb, p[0], p[1], 1, -2.0f, 0.75f}, seed += 3);
      }
}

TEST(Bf16Matmul, OneByOneAndLongInnerDimension) {
  SKIP_WITHOUT_BF16();
  check_gemm({1, 1, 1, false, true, DType::F32, DType::BF16, 0, 1.0f, 0.0f}, 70);
  check_gemm({1, 3, 2000, false, true, DType::F32, DType::BF16, 0, 1.0f, 1.0f}, 71);
  check_gemm({3, 2, 2000, true, false, DType::BF16, DType::F32, 2, 1.0f, 0.0f}, 72);
}

TEST(Bf16Matmul, OperandsLargerThanATileSplitAlongTheInnerDimension) {
  SKIP_WITHOUT_BF16();
  // A transposed f32 A of M = 2 rows and K = 600000 is rounded in tiles of 2^20 elements along K: the
  // chunks add into C, beta with the first only.
  check_gemm({2, 3, 600000, true, true, DType::F32, DType::BF16, 0, 1.0f, 0.5f}, 80);
}

TEST(Bf16Matmul, BackwardMatchesReference) {
  SKIP_WITHOUT_BF16();
  // dA through a frozen bf16 B (the input gradient of a projection) and dB through a bf16 A, both
  // accumulated: dA += dC op(B)^T, a product of M x K over N.
  const int64_t M = 23, N = 41, K = 19;
  uint64_t seed = 90;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      SCOPED_TRACE("ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
      const Operand a(ta ? K : M, ta ? M : K, 1, DType::F32, seed++);
      const Operand b(tb ? N : K, tb ? K : N, 2, DType::BF16, seed++);
      const int64_t ldc = N + 1;
      const std::vector<float> g = random_floats(size_t(M * ldc), seed++);
      const std::vector<float> g_rounded = [&] {
        std::vector<float> r(g.size());
        for (size_t i = 0; i < g.size(); ++i) r[i] = round_value(g[i]);
        return r;
      }();
      const std::vector<float> dA0 = random_floats(a.given.size(), seed++);
      std::vector<float> got = dA0, want_rounded = dA0, want_given = dA0;
      {
        cpu::ScopedMatmulPrecision bf16(cpu::MatmulPrecision::BF16);
        cpu::matmul_backward(got.data(), nullptr, g.data(), ldc, a.stored(ta), b.stored(tb), M, N, K);
      }
      ref::matmul_backward(want_rounded.data(), nullptr, g_rounded.data(), ldc, a.stored(ta),
                           b.f32(b.rounded, tb), M, N, K);
      ref::matmul_backward(want_given.data(), nullptr, g.data(), ldc, a.stored(ta), b.f32(b.given, tb), M, N,
                           K);
      // dA (stored as A is) = dC op(B)^T: element (i, k) sums over N.
      std::vector<double> S_rounded(size_t(M * K), 0.0), S(size_t(M * K), 0.0);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < N; ++j) {
            const double bv = std::abs(double(op_at(b.rounded, b.ld, tb, k, j)));
            S_rounded[size_t(i * K + k)] += std::abs(double(g_rounded[size_t(i * ldc + j)])) * bv;
            S[size_t(i * K + k)] += std::abs(double(g[size_t(i * ldc + j)])) * bv;
          }
      // Compare element (i, k) of dA where it is stored: [i, k] or, transposed, [k, i].
      int64_t bad = 0;
      for (int64_t i = 0; i < M; ++i)
        for (int64_t k = 0; k < K; ++k) {
          const size_t at = size_t(ta ? k * a.ld + i : i * a.ld + k), s = size_t(i * K + k);
          const Bound bnd = bf16_bound(N, 1.0, S_rounded[s], S[s], dA0[at]);
          if (!(std::abs(double(got[at]) - want_rounded[at]) <= bnd.rounded &&
                std::abs(double(got[at]) - want_given[at]) <= bnd.given)) {
            if (bad++ == 0)
              ADD_FAILURE() << "dA(" << i << ", " << k << ") = " << got[at] << ", references "
                            << want_rounded[at] << " and " << want_given[at];
          }
        }
      EXPECT_EQ(bad, 0);
    }
}

// A [rows, cols] weight of random valid blocks (finite f16 scales), with its exact values.
struct QuantWeight {
  std::vector<uint8_t> data;
  std::vector<float> absmax, values;
  WeightRef ref;

  QuantWeight(DType dt, int64_t rows, int64_t cols, uint64_t seed) {
    const Philox rng(seed, 0xbf16);
    const int64_t n = rows * cols;
    data.resize(size_t(dtype_bytes(dt, n)));
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    QuantScales scales;
    if (dt == DType::NF4 || dt == DType::INT8) {
      for (const float u : random_floats(size_t(ref::quant_blocks(n, 64)), seed + 1))
        absmax.push_back(1.0f + 0.5f * u);
      scales = QuantScales{absmax.data(), nullptr, 0.0f};
    } else {
      const int64_t block_bytes = dtype_block_bytes(dt);
      const std::vector<float> d = random_floats(size_t(data.size()), seed + 2, 0.05f);
      for (int64_t b = 0; b < int64_t(data.size()) / block_bytes; ++b) {
        int k = 0;
        for (const size_t off : test::f16_fields(dt)) {
          const uint16_t h = f32_to_f16(d[size_t(2 * b + k++)]);
          std::memcpy(data.data() + b * block_bytes + off, &h, 2);
        }
      }
    }
    ref = WeightRef{data.data(), dt, rows, cols, scales};
    values.resize(size_t(n));
    ref::dequantize_weight_tile(values.data(), cols, ref, 0, rows, 0, cols);
  }
};

// linear_forward and linear_backward_input under bf16 against tf::ref, with W as stored (the given
// values) and with x and W rounded to bf16 first (a bf16 WeightRef of the rounded values).
void check_linear(const WeightRef& W, const std::vector<float>& w_values, int64_t n, uint64_t seed) {
  const int64_t rows = W.rows, cols = W.cols;
  SCOPED_TRACE(std::string(dtype_name(W.dtype)) + " " + std::to_string(rows) + "x" + std::to_string(cols) +
               ", " + std::to_string(n) + " tokens");
  const std::vector<uint16_t> w_bits = test::to_bf16(w_values);
  std::vector<float> w_rounded(w_values.size());
  for (size_t i = 0; i < w_values.size(); ++i) w_rounded[i] = bf16_to_f32(w_bits[i]);
  const WeightRef W_rounded{w_bits.data(), DType::BF16, rows, cols};
  for (const bool forward : {true, false}) {
    SCOPED_TRACE(forward ? "forward" : "input gradient");
    const int64_t in_w = forward ? cols : rows, out_w = forward ? rows : cols;
    const std::vector<float> in = random_floats(size_t(n * in_w), seed++);
    std::vector<float> in_rounded(in.size());
    for (size_t i = 0; i < in.size(); ++i) in_rounded[i] = round_value(in[i]);
    for (const float beta : {0.0f, 1.0f}) {
      const std::vector<float> out0 = beta == 0.0f ? std::vector<float>(size_t(n * out_w), std::nanf(""))
                                                   : random_floats(size_t(n * out_w), seed++);
      std::vector<float> got = out0, want_rounded = out0, want_given = out0;
      const auto run = [&](auto op, float* out, const std::vector<float>& x, const WeightRef& w) {
        op(out, x.data(), w, n, beta);
      };
      {
        cpu::ScopedMatmulPrecision bf16(cpu::MatmulPrecision::BF16);
        forward ? run(cpu::linear_forward, got.data(), in, W)
                : run(cpu::linear_backward_input, got.data(), in, W);
      }
      forward ? run(ref::linear_forward, want_rounded.data(), in_rounded, W_rounded)
              : run(ref::linear_backward_input, want_rounded.data(), in_rounded, W_rounded);
      forward ? run(ref::linear_forward, want_given.data(), in, W)
              : run(ref::linear_backward_input, want_given.data(), in, W);
      // op(A) = in [n, in_w]; op(B) = W^T (forward) or W, stored [rows, cols].
      expect_bf16_close(got, want_rounded, want_given,
                        abs_products(in_rounded, in_w, false, w_rounded, cols, forward, n, out_w, in_w),
                        abs_products(in, in_w, false, w_values, cols, forward, n, out_w, in_w), out0, n,
                        out_w, out_w, in_w, 1.0f, beta);
    }
  }
}

TEST(Bf16Linear, QuantizedAndBf16WeightsMatchReference) {
  SKIP_WITHOUT_BF16();
  static_assert(cpu::kQuantGemvMaxTokens < 9, "9 tokens must take the tiled GEMM");
  uint64_t seed = 200;
  for (const DType dt : {DType::Q4_1, DType::Q8_0, DType::Q4_K, DType::Q6_K, DType::NF4, DType::INT8}) {
    const int64_t cols =
        dtype_block_elems(dt) == 256 ? 512 : (dt == DType::NF4 || dt == DType::INT8 ? 99 : 96);
    const QuantWeight w(dt, 67, cols, seed++);
    for (const int64_t n : {9, 130}) check_linear(w.ref, w.values, n, seed += 8);
  }
  // A bf16 weight goes through matmul's bf16 path, as stored.
  const std::vector<uint16_t> bits = test::to_bf16(random_floats(size_t(45 * 77), seed));
  std::vector<float> values(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) values[i] = bf16_to_f32(bits[i]);
  check_linear(WeightRef{bits.data(), DType::BF16, 45, 77}, values, 33, seed + 1);
}

TEST(Bf16Linear, WeightOverSeveralTilesAndActivationsOverSeveralSlabs) {
  SKIP_WITHOUT_BF16();
  // Over 2^22 elements a weight is cut into tiles of 2048 columns and 2048 rows: two of each here,
  // the last partial; the forward's column runs and the input gradient's row tiles add up in the
  // output, beta with the first only.
  const QuantWeight big(DType::Q8_0, 2050, 2048 + 32, 300);
  ASSERT_GT(big.ref.rows * big.ref.cols, int64_t(1) << 22);
  check_linear(big.ref, big.values, 10, 301);
  // 1100 tokens of 2048 columns are more than one slab of 2^21 rounded activations: the products run
  // a slab of tokens at a time.
  const QuantWeight wide(DType::Q4_0, 6, 2048, 310);
  check_linear(wide.ref, wide.values, 1100, 311);
}

// The loss against a quantized lm_head under bf16 against tf::ref's double loops on h and W rounded
// to bf16. Its logits are products of bf16 operands summed in f32: each within
// dz = (dim + 3) u32 S of the reference (S = sum_d |h'_d W'_vd|), so a row's loss lse - z_t within
// 2 dz, plus the f32 softmax's few roundings. d_h = g (sum_v e_v W'_v / s - W'_t) rounds each
// exponential e_v to bf16 before its f32 product: within g sum_v p_v |W'_vd| (u_bf16 + (V + 3) u32
// + 2 dz (1 + 2 / cap)), the logits' error moving each p_v by up to 2 dz relative and a cap's
// slope by 2 dz / cap, plus a few roundings of g |W'_td|. Two vocabulary tiles and, at 300 tokens,
// two chunks of rows (h rounded per chunk), at 40 tokens one (h rounded once); ignored rows among
// them; with and without a cap.
TEST(Bf16Loss, QuantizedLmHeadMatchesTheReferenceOnRoundedOperands) {
  SKIP_WITHOUT_BF16();
  const int64_t vocab = 4096 + 300, dim = 96;
  const QuantWeight w(DType::Q8_0, vocab, dim, 400);
  std::vector<double> w_rounded(w.values.size());
  for (size_t i = 0; i < w.values.size(); ++i) w_rounded[i] = round_value(w.values[i]);
  const auto read_w = [&](int64_t v, int64_t d) { return w_rounded[size_t(v * dim + d)]; };
  const float grad_scale = 0.5f;
  for (const int64_t n : {int64_t(40), int64_t(300)})
    for (const float cap : {0.0f, 20.0f}) {
      SCOPED_TRACE(std::to_string(n) + " tokens, cap " + std::to_string(cap));
      const std::vector<float> h = random_floats(size_t(n * dim), 401 + uint64_t(n));
      std::vector<int32_t> targets(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i)
        targets[size_t(i)] = i % 7 == 3 ? kIgnoreIndex : int32_t((i * 2654435761u) % vocab);
      std::vector<double> h_rounded(h.size()), want_dh(h.size(), 0.0);
      for (size_t i = 0; i < h.size(); ++i) h_rounded[i] = round_value(h[i]);
      int64_t want_n = 0, got_n = 0;
      const double want = ref::lm_head_cross_entropy_loops(want_dh.data(), &want_n, h_rounded.data(), read_w,
                                                           vocab, dim, targets.data(), n, grad_scale, cap);
      std::vector<float> got_dh(h.size(), 0.0f);
      double got = 0;
      {
        cpu::ScopedMatmulPrecision bf16(cpu::MatmulPrecision::BF16);
        got = cpu::lm_head_cross_entropy(got_dh.data(), &got_n, h.data(), w.ref, targets.data(), n,
                                         grad_scale, cap);
      }
      ASSERT_EQ(got_n, want_n);
      double loss_bound = 0;
      int64_t bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (targets[size_t(i)] == kIgnoreIndex) continue;
        std::vector<double> z(static_cast<size_t>(vocab));
        double S = 0, mx = -1e300;
        for (int64_t v = 0; v < vocab; ++v) {
          double acc = 0, abs_acc = 0;
          for (int64_t d = 0; d < dim; ++d) {
            acc += h_rounded[size_t(i * dim + d)] * read_w(v, d);
            abs_acc += std::abs(h_rounded[size_t(i * dim + d)] * read_w(v, d));
          }
          z[size_t(v)] = cap > 0 ? cap * std::tanh(acc / cap) : acc;
          S = std::max(S, abs_acc);
          mx = std::max(mx, z[size_t(v)]);
        }
        double sum = 0;
        for (double& zv : z) sum += (zv = std::exp(zv - mx));  // z now holds the exponentials
        const double dz = double(dim + 3) * kU32 * S;
        loss_bound += 2 * dz + 16 * kU32 * (std::abs(mx) + std::log(sum) + 1);
        const double rel = kUBf16 + double(vocab + 3) * kU32 + 2 * dz * (1 + (cap > 0 ? 2 / cap : 0));
        for (int64_t d = 0; d < dim; ++d) {
          double weighted = 0;
          for (int64_t v = 0; v < vocab; ++v) weighted += z[size_t(v)] / sum * std::abs(read_w(v, d));
          const double bound =
              grad_scale * (weighted * rel + 8 * kU32 * std::abs(read_w(targets[size_t(i)], d)));
          const size_t at = size_t(i * dim + d);
          if (!(std::abs(double(got_dh[at]) - want_dh[at]) <= bound)) {
            if (bad++ == 0)
              ADD_FAILURE() << "d_h[" << i << ", " << d << "] = " << got_dh[at] << ", reference "
                            << want_dh[at] << " (bound " << bound << ")";
          }
        }
      }
      EXPECT_EQ(bad, 0) << "elements of d_h outside the bound";
      EXPECT_NEAR(got, want, loss_bound);
      for (int64_t i = 0; i < n; ++i) {
        if (targets[size_t(i)] != kIgnoreIndex) continue;
        for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(got_dh[size_t(i * dim + d)], 0.0f) << "ignored row " << i;
      }
    }
}

TEST(Bf16Precision, F32GivesTheBitsOfSgemmOnWidenedOperands) {
  // Under f32 (the library's default, and what a CPU without avx512_bf16 runs), a projection's
  // product is OpenBLAS's sgemm on the weight widened to f32, bit for bit, as before bf16 existed.
  ASSERT_EQ(cpu::matmul_precision(), cpu::MatmulPrecision::F32);
  const int64_t n = 40, rows = 50, cols = 96;
  const QuantWeight w(DType::Q4_1, rows, cols, 400);
  const std::vector<float> x = random_floats(size_t(n * cols), 401);
  std::vector<float> got(size_t(n * rows)), want(size_t(n * rows));
  cpu::linear_forward(got.data(), x.data(), w.ref, n, 0.0f);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(rows), int(cols), 1.0f, x.data(),
              int(cols), w.values.data(), int(cols), 0.0f, want.data(), int(rows));
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << "quantized weight";

  const std::vector<uint16_t> bits = test::to_bf16(w.values);
  std::vector<float> widened(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) widened[i] = bf16_to_f32(bits[i]);
  cpu::matmul(got.data(), rows, {x.data(), DType::F32, cols, false}, {bits.data(), DType::BF16, cols, true},
              n, rows, cols, 1.0f, 0.0f);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(rows), int(cols), 1.0f, x.data(),
              int(cols), widened.data(), int(cols), 0.0f, want.data(), int(rows));
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << "bf16 weight";
}

TEST(Bf16Precision, ProductsOfTwoF32OperandsStaySgemm) {
  SKIP_WITHOUT_BF16();
  // LoRA's products and an f32 base are f32 by f32: bf16 precision leaves them to sgemm, bit for bit.
  const int64_t M = 31, N = 17, K = 45;
  const std::vector<float> a = random_floats(size_t(M * K), 500), b = random_floats(size_t(K * N), 501);
  std::vector<float> got(size_t(M * N)), want(size_t(M * N));
  {
    cpu::ScopedMatmulPrecision bf16(cpu::MatmulPrecision::BF16);
    cpu::matmul(got.data(), N, {a.data(), DType::F32, K, false}, {b.data(), DType::F32, N, false}, M, N, K,
                1.0f, 0.0f);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(N), int(K), 1.0f, a.data(), int(K),
              b.data(), int(N), 0.0f, want.data(), int(N));
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
}

TEST(Bf16Rounding, RoundToBf16GivesTheBitsOfF32ToBf16) {
  // Ties (a low half of exactly 0x8000) go to even, the largest finite values round up to infinity,
  // signalling NaNs come out quiet, subnormals round as any other value.
  std::vector<uint32_t> bits = {0x00000000, 0x80000000, 0x3f808000, 0x3f818000, 0x3f80ffff, 0x3f807fff,
                                0x7f7fffff, 0xff7fffff, 0x7f800000, 0xff800000, 0x7f800001, 0xffc00001,
                                0x7fbfffff, 0x00008000, 0x00018000, 0x007fffff, 0x00000001, 0x80008001};
  const Philox rng(600, 1);
  for (uint64_t i = 0; i < 1000; ++i) bits.push_back(rng.u32(i));
  std::vector<float> src(bits.size());
  std::memcpy(src.data(), bits.data(), bits.size() * sizeof(float));
  for (const bool portable : {false, true}) {
    SCOPED_TRACE(portable ? "portable" : "as the CPU runs it");
    std::unique_ptr<cpu::ScopedPortableKernels> force;
    if (portable) force = std::make_unique<cpu::ScopedPortableKernels>();
    // Every length up to 40 covers the 16-lane body and every masked tail.
    for (size_t n = 0; n <= 40; ++n) {
      std::vector<uint16_t> got(n + 1, 0xdead);
      cpu::round_to_bf16(got.data(), src.data(), int64_t(n));
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(got[i], f32_to_bf16(src[i])) << "n=" << n << " bits " << std::hex << bits[i];
      ASSERT_EQ(got[n], 0xdead) << "wrote past n=" << n;
    }
    std::vector<uint16_t> got(src.size());
    cpu::round_to_bf16(got.data(), src.data(), int64_t(src.size()));
    for (size_t i = 0; i < src.size(); ++i) ASSERT_EQ(got[i], f32_to_bf16(src[i])) << std::hex << bits[i];
  }
}

TEST(Bf16Rounding, DequantizedTileIsTheF32TileRounded) {
  uint64_t seed = 700;
  for (const DType dt : {DType::Q4_0, DType::Q4_1, DType::Q5_1, DType::Q8_0, DType::Q2_K, DType::Q4_K,
                         DType::Q6_K, DType::NF4, DType::INT8}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t cols =
        dtype_block_elems(dt) == 256 ? 768 : (dt == DType::NF4 || dt == DType::INT8 ? 333 : 320);
    const QuantWeight w(dt, 9, cols, seed++);
    // Rows 2..8, columns from the second block (or element 7 of a flat format) to the end.
    const int64_t c0 = dt == DType::NF4 || dt == DType::INT8 ? 7 : dtype_block_elems(dt), n_cols = cols - c0;
    const int64_t ld = n_cols + 5;
    std::vector<uint16_t> got(size_t(7 * ld), 0xdead);
    cpu::dequantize_weight_tile_bf16(got.data(), ld, w.ref, 2, 7, c0, n_cols);
    for (int64_t r = 0; r < 7; ++r) {
      for (int64_t c = 0; c < n_cols; ++c)
        ASSERT_EQ(got[size_t(r * ld + c)], f32_to_bf16(w.values[size_t((r + 2) * cols + c0 + c)]))
            << "row " << r << " col " << c;
      for (int64_t c = n_cols; c < ld; ++c) ASSERT_EQ(got[size_t(r * ld + c)], 0xdead) << "padding written";
    }
  }
  // A bf16 weight keeps its bits; f16 and f32 are rounded.
  const std::vector<float> v = random_floats(64, seed);
  const std::vector<uint16_t> bf = test::to_bf16(v);
  std::vector<uint16_t> got(64);
  cpu::dequantize_weight_tile_bf16(got.data(), 8, WeightRef{bf.data(), DType::BF16, 8, 8}, 0, 8, 0, 8);
  EXPECT_EQ(got, bf);
  cpu::dequantize_weight_tile_bf16(got.data(), 8, WeightRef{v.data(), DType::F32, 8, 8}, 0, 8, 0, 8);
  EXPECT_EQ(got, bf);
}

TEST(MatmulChoice, AutoFollowsTheCpuAndTheWeights) {
  using cpu::MatmulChoice;
  using cpu::MatmulPrecision;
  const std::vector<DType> gguf = {DType::Q4_1, DType::Q8_0, DType::Q4_1};
  const std::vector<DType> f32 = {DType::F32, DType::F32};
  const std::vector<DType> f16 = {DType::F16};
  const std::vector<DType> bf16 = {DType::BF16, DType::F32};
  // auto: bf16 only with avx512_bf16 and a weight the bf16 path takes.
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::Auto, true, gguf).precision, MatmulPrecision::BF16);
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::Auto, true, bf16).precision, MatmulPrecision::BF16);
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::Auto, false, gguf).precision, MatmulPrecision::F32);
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::Auto, true, f32).precision, MatmulPrecision::F32);
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::Auto, true, f16).precision, MatmulPrecision::F32);
  EXPECT_EQ(
      cpu::resolve_matmul(MatmulChoice::Auto, true, gguf).why,
      "bf16 (auto: this CPU has avx512_bf16; q4_1, q8_0 weights, activations rounded to bf16, sums in f32)");
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::Auto, false, gguf).why,
            "f32 (auto: this CPU has no avx512_bf16)");
  // An explicit choice is kept, bf16 only where the CPU can run it.
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::F32, true, gguf).precision, MatmulPrecision::F32);
  EXPECT_EQ(cpu::resolve_matmul(MatmulChoice::BF16, true, f32).precision, MatmulPrecision::BF16);
  try {
    cpu::resolve_matmul(MatmulChoice::BF16, false, gguf);
    ADD_FAILURE() << "bf16 without avx512_bf16 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--matmul bf16 needs a CPU with avx512_bf16"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(cpu::parse_matmul_choice("auto"), MatmulChoice::Auto);
  EXPECT_EQ(cpu::parse_matmul_choice("f32"), MatmulChoice::F32);
  EXPECT_EQ(cpu::parse_matmul_choice("bf16"), MatmulChoice::BF16);
  try {
    cpu::parse_matmul_choice("fp16");
    ADD_FAILURE() << "fp16 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--matmul must be auto, f32 or bf16, got 'fp16'"),
              std::string::npos);
  }
}

TEST(MatmulChoice, Bf16GemmRefusesOtherOperands) {
  SKIP_WITHOUT_BF16();
  const std::vector<float> a(4, 1.0f);
  std::vector<float> c(4);
  EXPECT_THROW(cpu::bf16_gemm(c.data(), 2, {a.data(), DType::F32, 2, false}, {a.data(), DType::F32, 2, false},
                              2, 2, 2, 1.0f, 0.0f),
               Error);
}

}  // namespace
