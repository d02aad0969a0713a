// The CUDA backend's dense products on the simulator (tf::simt::) against tf::cpu: matmul and
// matmul_backward over operand type pairs and transposes, linear_forward / linear_backward_input
// and lm_head_cross_entropy over f32 / bf16 / f16 weights, dequantize_weight_tile, at odd sizes,
// with NaN guard bytes around every output; and the errors they report.
//
// Tolerances, all worst-case (a k bound, so no test fails by chance): a product sum_p a_p b_p
// whose operands are rounded to bf16 on the device (unit roundoff u = 2^-8, relative) errs by at
// most (u_a + u_b + u_a u_b) sum_p |a_p b_p|, where u_x is u when that operand is converted and 0
// when it is used as stored; f32 accumulation adds (k + 2) 2^-24 sum_p |a_p b_p| on either side
// (the CPU's sgemm, and cuBLASLt on a GPU; the simulator's stand-in sums in double), counted twice.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"
#include "tests/sim_test_util.h"

namespace rt = tf::simt::rt;
using tf::DType;
using tf::MatOperand;
using tf::WeightRef;
using tf::test::error_of;
using tf::test::Guarded;

namespace {

using tf::test::expect_contains;

constexpr double kU = 1.0 / 256;          // bf16 unit roundoff, 2^-8
constexpr double kU32 = 1.0 / (1 << 24);  // f32 unit roundoff
constexpr size_t kGuardBytes = 64;        // 0xff (NaN) bytes before and after every device array

double accumulation(int64_t k) {
  return 2.0 * double(k + 2) * kU32;
}

// n random values in [-1, 1) stored as dtype (f32 values or bf16 / f16 bits as uint16_t), kept on
// the host and on the device, with their exact values as f32.
struct Stored {
  DType dtype;
  std::vector<float> values;
  std::vector<float> f32;
  std::vector<uint16_t> half;
  std::unique_ptr<Guarded<float>> dev_f32;
  std::unique_ptr<Guarded<uint16_t>> dev_half;

  Stored(DType t, size_t n, uint64_t seed, const char* name)
      : dtype(t), values(tf::test::random_floats(n, seed)) {
    if (t == DType::F32) {
      f32 = values;
      dev_f32 = std::make_unique<Guarded<float>>(f32, name);
      return;
    }
    half.resize(n);
    for (size_t i = 0; i < n; ++i) {
      half[i] = t == DType::BF16 ? tf::f32_to_bf16(values[i]) : tf::f32_to_f16(values[i]);
      values[i] = t == DType::BF16 ? tf::bf16_to_f32(half[i]) : tf::f16_to_f32(half[i]);
    }
    dev_half = std::make_unique<Guarded<uint16_t>>(half, name);
  }
  const void* host() const {
    return dtype == DType::F32 ? static_cast<const void*>(f32.data()) : half.data();
  }
  const void* dev() const {
    return dtype == DType::F32 ? static_cast<const void*>(dev_f32->get()) : dev_half->get();
  }
};

// Relative roundoff a device product adds to an operand of type t whose partner has type other.
double conversion(DType t, DType other) {
  return t != other && t != DType::BF16 ? kU : 0.0;
}

// bound[i, j] = rel * sum_p |a(i, p) b(p, j)| + 2^-23 |extra[i, j]|, row-major [m, n].
template <typename ReadA, typename ReadB>
std::vector<double> bounds(const ReadA& a, const ReadB& b, int64_t m, int64_t n, int64_t k, double rel,
                           const std::vector<double>& extra) {
  std::vector<double> out(size_t(m * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double mag = 0;
      for (int64_t p = 0; p < k; ++p) mag += std::fabs(double(a(i, p)) * double(b(p, j)));
      out[size_t(i * n + j)] = rel * mag + 2 * kU32 * std::fabs(extra[size_t(i * n + j)]) + 1e-30;
    }
  }
  return out;
}

// A signalling NaN: arithmetic on it returns a quiet NaN, so even an accumulation into a padding
// element shows.
float padding_value() {
  const uint32_t bits = 0x7f800001u;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

bool is_padding(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits == 0x7f800001u;
}

// got and want are [rows, ld] with `cols` compared columns; the others must keep padding_value().
void expect_close(const std::vector<float>& got, const std::vector<float>& want,
                  const std::vector<double>& bound, int64_t rows, int64_t cols, int64_t ld,
                  const std::string& what) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < ld; ++j) {
      const size_t at = size_t(i * ld + j);
      if (j >= cols) {
        ASSERT_TRUE(is_padding(got[at])) << what << ": stray write at [" << i << ", " << j << "]";
        continue;
      }
      ASSERT_NEAR(got[at], want[at], bound[size_t(i * cols + j)]) << what << " [" << i << ", " << j << "]";
    }
  }
}

std::vector<float> with_padding(std::vector<float> v, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = cols; j < ld; ++j) v[size_t(i * ld + j)] = padding_value();
  }
  return v;
}

// ---- matmul and matmul_backward --------------------------------------------------------------

struct Pair {
  DType a, b;
};
constexpr Pair kPairs[] = {{DType::F32, DType::F32},  {DType::BF16, DType::BF16}, {DType::F16, DType::F16},
                           {DType::F32, DType::BF16}, {DType::BF16, DType::F32},  {DType::F32, DType::F16},
                           {DType::F16, DType::BF16}};

// C[7, 5] = 0.5 op(A) op(B) + beta C with K = 13 and padded leading dimensions, through
// tf::simt::matmul, or through matmul_in_tiles with converted tiles of tile_elems elements.
void check_matmul(const Pair& pr, bool ta, bool tb, float beta, int64_t tile_elems) {
  const int64_t M = 7, N = 5, K = 13, ldc = N + 2;
  const int64_t lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 3;
  const Stored A(pr.a, size_t((ta ? K : M) * lda), 1, "A"), B(pr.b, size_t((tb ? N : K) * ldb), 2, "B");
  std::vector<float> c0 = with_padding(tf::test::random_floats(size_t(M * ldc), 3), M, N, ldc);
  if (beta == 0.0f) std::fill(c0.begin(), c0.end(), padding_value());  // beta 0 overwrites NaN
  Guarded<float> dc(c0, "C");
  const MatOperand dA{A.dev(), pr.a, lda, ta}, dB{B.dev(), pr.b, ldb, tb};
  if (tile_elems) {
    tf::simt::matmul_in_tiles(dc.get(), ldc, dA, dB, M, N, K, 0.5f, beta, tile_elems);
  } else {
    tf::simt::matmul(dc.get(), ldc, dA, dB, M, N, K, 0.5f, beta);
  }
  std::vector<float> want = c0;
  tf::cpu::matmul(want.data(), ldc, MatOperand{A.host(), pr.a, lda, ta}, MatOperand{B.host(), pr.b, ldb, tb},
                  M, N, K, 0.5f, beta);
  const auto a = [&](int64_t i, int64_t p) {
    return 0.5f * A.values[size_t(ta ? p * lda + i : i * lda + p)];
  };
  const auto b = [&](int64_t p, int64_t j) { return B.values[size_t(tb ? j * ldb + p : p * ldb + j)]; };
  const double ua = conversion(pr.a, pr.b), ub = conversion(pr.b, pr.a);
  std::vector<double> extra(size_t(M * N));
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j)
      extra[size_t(i * N + j)] = beta == 0.0f ? 0.0 : beta * c0[size_t(i * ldc + j)];
  }
  const auto bound = bounds(a, b, M, N, K, ua + ub + ua * ub + accumulation(K), extra);
  expect_close(dc.download(), want, bound, M, N, ldc,
               std::string("matmul ") + std::string(tf::dtype_name(pr.a)) + " x " +
                   std::string(tf::dtype_name(pr.b)) + " trans " + std::to_string(ta) + std::to_string(tb) +
                   " beta " + std::to_string(beta) + " tiles " + std::to_string(tile_elems));
  EXPECT_TRUE(dc.guards_intact()) << "a guard of dc was written";
}

TEST(CudaMatmul, EveryTypePairAndTransposeAgainstTheCpu) {
  for (const Pair& pr : kPairs) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        for (float beta : {0.0f, 0.75f}) check_matmul(pr, ta == 1, tb == 1, beta, 0);
      }
    }
  }
}

// Tiles of 2 K elements are two rows (or columns) of op(X): the 7 x 5 product takes 4 x 3 tiles
// when both operands are converted.
TEST(CudaMatmul, MixedOperandsConvertedInManyTiles) {
  for (const Pair& pr :
       {Pair{DType::F32, DType::F16}, Pair{DType::F32, DType::BF16}, Pair{DType::F16, DType::BF16}}) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) check_matmul(pr, ta == 1, tb == 1, 0.75f, 2 * 13);
    }
  }
}

// Times an identity, C is the converted operand itself: f32 and f16 values must round to the
// nearest bf16, ties to even, exactly as tf::f32_to_bf16 does.
TEST(CudaMatmul, ConvertedOperandsRoundToTheNearestBf16) {
  const int64_t M = 9, K = 6;
  std::vector<uint16_t> eye(size_t(K * K), tf::f32_to_bf16(0.0f));
  for (int64_t i = 0; i < K; ++i) eye[size_t(i * K + i)] = tf::f32_to_bf16(1.0f);
  Guarded<uint16_t> identity(eye, "I");
  for (DType dt : {DType::F32, DType::F16}) {
    Stored A(dt, size_t(M * K), 24, "A");
    if (dt == DType::F32) {
      // Values halfway between two bf16 (ties) and just either side of halfway.
      A.f32[0] = tf::bf16_to_f32(0x3f81) + std::ldexp(1.0f, -8);
      A.f32[1] = tf::bf16_to_f32(0x3f82) + std::ldexp(1.0f, -8);
      A.f32[2] = std::nextafter(A.f32[0], 2.0f);
      A.f32[3] = std::nextafter(A.f32[1], 0.0f);
      rt::memcpy_h2d(A.dev_f32->get(), A.f32.data(), A.f32.size() * sizeof(float), nullptr);
    }
    Guarded<float> c(std::vector<float>(size_t(M * K), padding_value()), "C");
    tf::simt::matmul(c.get(), K, MatOperand{A.dev(), dt, K, false},
                     MatOperand{identity.get(), DType::BF16, K, false}, M, K, K, 1.0f, 0.0f);
    const std::vector<float> got = c.download();
    for (size_t i = 0; i < got.size(); ++i) {
      const float exact = dt == DType::F32 ? A.f32[i] : tf::f16_to_f32(A.half[i]);
      ASSERT_EQ(got[i], tf::bf16_to_f32(tf::f32_to_bf16(exact))) << tf::dtype_name(dt) << " element " << i;
    }
  }
}

TEST(CudaMatmul, EmptyInnerDimensionScalesC) {
  const Stored A(DType::F32, 4, 1, "A"), B(DType::BF16, 4, 2, "B");
  const std::vector<float> c0 = {1, 2, 3, 4, 5, 6};
  Guarded<float> dc(c0, "C");
  tf::simt::matmul(dc.get(), 3, MatOperand{A.dev(), DType::F32, 1, false},
                   MatOperand{B.dev(), DType::BF16, 3, false}, 2, 3, 0, 1.0f, -2.0f);
  const std::vector<float> got = dc.download();
  for (size_t i = 0; i < c0.size(); ++i) EXPECT_EQ(got[i], -2.0f * c0[i]);
  EXPECT_TRUE(dc.guards_intact()) << "a guard of dc was written";
}

TEST(CudaMatmul, BackwardAccumulatesBothGradientsLikeTheCpu) {
  const int64_t M = 6, N = 9, K = 5;
  for (const Pair& pr : kPairs) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        const int64_t lda = ta ? M : K, ldb = tb ? K : N, ldc = N + 1;
        const size_t a_n = size_t((ta ? K : M) * lda), b_n = size_t((tb ? N : K) * ldb);
        const Stored A(pr.a, a_n, 4, "A"), B(pr.b, b_n, 5, "B");
        const Stored G(DType::F32, size_t(M * ldc), 6, "dC");
        const std::vector<float> da0 = tf::test::random_floats(a_n, 7), db0 = tf::test::random_floats(b_n, 8);
        Guarded<float> dda(da0, "dA"), ddb(db0, "dB");
        const MatOperand dA{A.dev(), pr.a, lda, ta == 1}, dB{B.dev(), pr.b, ldb, tb == 1};
        tf::simt::matmul_backward(dda.get(), ddb.get(), G.dev_f32->get(), ldc, dA, dB, M, N, K);
        std::vector<float> want_a = da0, want_b = db0;
        tf::cpu::matmul_backward(want_a.data(), want_b.data(), G.f32.data(), ldc,
                                 MatOperand{A.host(), pr.a, lda, ta == 1},
                                 MatOperand{B.host(), pr.b, ldb, tb == 1}, M, N, K);
        // dA = dC op(B)^T pairs the f32 dC with B, and dB = op(A)^T dC pairs A with dC.
        const double ug_a = conversion(DType::F32, pr.b), ub = conversion(pr.b, DType::F32);
        const double ua = conversion(pr.a, DType::F32), ug_b = conversion(DType::F32, pr.a);
        const auto g = [&](int64_t i, int64_t j) { return G.values[size_t(i * ldc + j)]; };
        const auto opa = [&](int64_t i, int64_t p) {
          return A.values[size_t(ta ? p * lda + i : i * lda + p)];
        };
        const auto opb = [&](int64_t p, int64_t j) {
          return B.values[size_t(tb ? j * ldb + p : p * ldb + j)];
        };
        // Both gradients are compared in op() coordinates: dA as [M, K], dB as [K, N].
        const auto stored_a = [&](const std::vector<float>& v, int64_t i, int64_t p) {
          return double(v[size_t(ta ? p * lda + i : i * lda + p)]);
        };
        const auto stored_b = [&](const std::vector<float>& v, int64_t p, int64_t j) {
          return double(v[size_t(tb ? j * ldb + p : p * ldb + j)]);
        };
        std::vector<double> extra_a(size_t(M * K)), extra_b(size_t(K * N));
        for (int64_t i = 0; i < M; ++i) {
          for (int64_t p = 0; p < K; ++p) extra_a[size_t(i * K + p)] = stored_a(want_a, i, p);
        }
        for (int64_t p = 0; p < K; ++p) {
          for (int64_t j = 0; j < N; ++j) extra_b[size_t(p * N + j)] = stored_b(want_b, p, j);
        }
        const auto bt = [&](int64_t j, int64_t p) { return opb(p, j); };
        const auto at = [&](int64_t p, int64_t i) { return opa(i, p); };
        const auto bound_a = bounds(g, bt, M, K, N, ug_a + ub + ug_a * ub + accumulation(N), extra_a);
        const auto bound_b = bounds(at, g, K, N, M, ua + ug_b + ua * ug_b + accumulation(M), extra_b);
        const std::vector<float> got_a = dda.download(), got_b = ddb.download();
        const std::string what = std::string(tf::dtype_name(pr.a)) + " x " +
                                 std::string(tf::dtype_name(pr.b)) + " trans " + std::to_string(ta) +
                                 std::to_string(tb);
        for (int64_t i = 0; i < M; ++i) {
          for (int64_t p = 0; p < K; ++p) {
            ASSERT_NEAR(stored_a(got_a, i, p), stored_a(want_a, i, p), bound_a[size_t(i * K + p)])
                << "dA " << what << " [" << i << ", " << p << "]";
          }
        }
        for (int64_t p = 0; p < K; ++p) {
          for (int64_t j = 0; j < N; ++j) {
            ASSERT_NEAR(stored_b(got_b, p, j), stored_b(want_b, p, j), bound_b[size_t(p * N + j)])
                << "dB " << what << " [" << p << ", " << j << "]";
          }
        }
        EXPECT_TRUE(dda.guards_intact()) << "a guard of dda was written";
        EXPECT_TRUE(ddb.guards_intact()) << "a guard of ddb was written";
      }
    }
  }
}

// ---- linear layers and weight tiles ----------------------------------------------------------

constexpr DType kFloatDtypes[] = {DType::F32, DType::BF16, DType::F16};

TEST(CudaLinear, ForwardAndInputGradientAgainstTheCpu) {
  const int64_t n = 5, rows = 11, cols = 19;
  for (DType dt : kFloatDtypes) {
    const Stored W(dt, size_t(rows * cols), 9, "W");
    const WeightRef w_dev(W.dev(), dt, rows, cols), w_host(W.host(), dt, rows, cols);
    const double ux = conversion(DType::F32, dt), uw = conversion(dt, DType::F32);
    for (float beta : {0.0f, 0.5f}) {
      const Stored x(DType::F32, size_t(n * cols), 10, "x"), dy(DType::F32, size_t(n * rows), 11, "dy");
      std::vector<float> y0 = tf::test::random_floats(size_t(n * rows), 12);
      std::vector<float> dx0 = tf::test::random_floats(size_t(n * cols), 13);
      if (beta == 0.0f) {
        std::fill(y0.begin(), y0.end(), NAN);
        std::fill(dx0.begin(), dx0.end(), NAN);
      }
      Guarded<float> y(y0, "y"), dx(dx0, "dx");
      tf::simt::linear_forward(y.get(), x.dev_f32->get(), w_dev, n, beta);
      tf::simt::linear_backward_input(dx.get(), dy.dev_f32->get(), w_dev, n, beta);
      std::vector<float> want_y = y0, want_dx = dx0;
      tf::cpu::linear_forward(want_y.data(), x.f32.data(), w_host, n, beta);
      tf::cpu::linear_backward_input(want_dx.data(), dy.f32.data(), w_host, n, beta);

      std::vector<double> extra_y(size_t(n * rows), 0.0), extra_dx(size_t(n * cols), 0.0);
      if (beta != 0.0f) {
        for (size_t i = 0; i < extra_y.size(); ++i) extra_y[i] = beta * y0[i];
        for (size_t i = 0; i < extra_dx.size(); ++i) extra_dx[i] = beta * dx0[i];
      }
      const auto xa = [&](int64_t i, int64_t c) { return x.values[size_t(i * cols + c)]; };
      const auto wt = [&](int64_t c, int64_t r) { return W.values[size_t(r * cols + c)]; };
      const auto ga = [&](int64_t i, int64_t r) { return dy.values[size_t(i * rows + r)]; };
      const auto wb = [&](int64_t r, int64_t c) { return W.values[size_t(r * cols + c)]; };
      const double rel_y = ux + uw + ux * uw + accumulation(cols),
                   rel_dx = ux + uw + ux * uw + accumulation(rows);
      const std::string what = std::string(tf::dtype_name(dt)) + " beta " + std::to_string(beta);
      expect_close(y.download(), want_y, bounds(xa, wt, n, rows, cols, rel_y, extra_y), n, rows, rows,
                   "linear_forward " + what);
      expect_close(dx.download(), want_dx, bounds(ga, wb, n, cols, rows, rel_dx, extra_dx), n, cols, cols,
                   "linear_backward_input " + what);
      EXPECT_TRUE(y.guards_intact()) << "a guard of y was written";
      EXPECT_TRUE(dx.guards_intact()) << "a guard of dx was written";
    }
  }
}

TEST(CudaLinear, WeightTilesAreTheStoredValues) {
  const int64_t rows = 9, cols = 13, r0 = 2, n_rows = 5, c0 = 3, n_cols = 7, ld = 10;
  for (DType dt : kFloatDtypes) {
    const Stored W(dt, size_t(rows * cols), 14, "W");
    const std::vector<float> nan(size_t(n_rows * ld), padding_value());
    Guarded<float> dst(nan, "tile");
    tf::simt::dequantize_weight_tile(dst.get(), ld, WeightRef(W.dev(), dt, rows, cols), r0, n_rows, c0,
                                     n_cols);
    std::vector<float> want = nan;
    tf::cpu::dequantize_weight_tile(want.data(), ld, WeightRef(W.host(), dt, rows, cols), r0, n_rows, c0,
                                    n_cols);
    const std::vector<double> exact(size_t(n_rows * n_cols), 0.0);
    expect_close(dst.download(), want, exact, n_rows, n_cols, ld,
                 std::string("tile ") + std::string(tf::dtype_name(dt)));
    EXPECT_TRUE(dst.guards_intact()) << "a guard of dst was written";
  }
}

// ---- lm_head + cross-entropy -----------------------------------------------------------------

// 131 rows: a full chunk of 128 and 3 more; every fifth target ignored, and a vocabulary of 37.
TEST(CudaCrossEntropy, LossAndGradientAgainstTheCpu) {
  const int64_t n = 131, vocab = 37, dim = 24;
  std::vector<int32_t> targets(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    targets[size_t(i)] = i % 5 == 3 ? tf::kIgnoreIndex : int32_t((i * 7 + 3) % vocab);
  const int64_t valid =
      std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t != tf::kIgnoreIndex; });
  const float grad_scale = 1.0f / float(valid);
  Guarded<int32_t> dt(targets, "targets");
  for (DType wdt : kFloatDtypes) {
    const Stored W(wdt, size_t(vocab * dim), 15, "W");
    const Stored h(DType::F32, size_t(n * dim), 16, "h");
    const std::vector<float> dh0 = tf::test::random_floats(size_t(n * dim), 17);
    Guarded<float> dh(dh0, "d_h");
    int64_t got_valid = -1, want_valid = -2, loss_only_valid = -3;
    const double got = tf::simt::lm_head_cross_entropy(
        dh.get(), &got_valid, h.dev_f32->get(), WeightRef(W.dev(), wdt, vocab, dim), dt.get(), n, grad_scale);
    const double loss_only = tf::simt::lm_head_cross_entropy(
        nullptr, &loss_only_valid, h.dev_f32->get(), WeightRef(W.dev(), wdt, vocab, dim), dt.get(), n, 1.0f);
    std::vector<float> want_dh = dh0;
    const double want =
        tf::cpu::lm_head_cross_entropy(want_dh.data(), &want_valid, h.f32.data(),
                                       WeightRef(W.host(), wdt, vocab, dim), targets.data(), n, grad_scale);
    EXPECT_EQ(got_valid, valid);
    EXPECT_EQ(want_valid, valid);
    EXPECT_EQ(loss_only_valid, valid);
    EXPECT_EQ(loss_only, got) << "the loss does not depend on whether d_h is formed";

    // Logits z = h W^T err by at most delta_i = rel_z max_v sum_d |h_d W_vd| per row (the matmul
    // bound); the loss lse(z) - z_t moves by at most 2 delta_i, and each softmax probability by a
    // factor within exp(+-2 delta_i). d_h = sum_v g_v W_v with g = grad_scale (p - onehot) then
    // errs by grad_scale sum_v p_v (exp(2 delta_i) - 1) |W_vd| plus rel_g sum_v |g_v W_vd|, rel_g
    // covering d_logits rounded to bf16 (when W is not f32) and f32 accumulation over the vocabulary.
    const double uh = conversion(DType::F32, wdt), uw = conversion(wdt, DType::F32);
    const double rel_z = uh + uw + uh * uw + accumulation(dim);
    const double rel_g = uh + uw + uh * uw + accumulation(vocab);
    double loss_bound = 0;
    std::vector<double> dh_bound(size_t(n * dim), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = targets[size_t(i)];
      if (t == tf::kIgnoreIndex) {
        for (int64_t d = 0; d < dim; ++d)
          dh_bound[size_t(i * dim + d)] = 2 * kU32 * std::fabs(dh0[size_t(i * dim + d)]);
        continue;
      }
      std::vector<double> z(static_cast<size_t>(vocab));
      double delta = 0, mx = -INFINITY;
      for (int64_t v = 0; v < vocab; ++v) {
        double acc = 0, mag = 0;
        for (int64_t d = 0; d < dim; ++d) {
          const double p = double(h.values[size_t(i * dim + d)]) * double(W.values[size_t(v * dim + d)]);
          acc += p;
          mag += std::fabs(p);
        }
        z[size_t(v)] = acc;
        mx = std::max(mx, acc);
        delta = std::max(delta, rel_z * mag);
      }
      double sum = 0;
      for (double zv : z) sum += std::exp(zv - mx);
      // exp and log in f32 on either side add a few f32 roundings of the loss's terms.
      loss_bound += 2 * delta + 16 * kU32 * (std::fabs(mx) + std::log(sum) + std::fabs(z[size_t(t)]) + 1);
      for (int64_t d = 0; d < dim; ++d) {
        double b = 2 * kU32 * std::fabs(dh0[size_t(i * dim + d)]);
        for (int64_t v = 0; v < vocab; ++v) {
          const double p = std::exp(z[size_t(v)] - mx) / sum;
          const double g = double(grad_scale) * (p - (v == t ? 1.0 : 0.0));
          const double w = std::fabs(double(W.values[size_t(v * dim + d)]));
          b += double(grad_scale) * p * (std::exp(2 * delta + 16 * kU32) - 1) * w + rel_g * std::fabs(g) * w;
        }
        dh_bound[size_t(i * dim + d)] = b + 1e-30;
      }
    }
    EXPECT_NEAR(got, want, loss_bound) << tf::dtype_name(wdt);
    expect_close(dh.download(), want_dh, dh_bound, n, dim, dim,
                 std::string("d_h ") + std::string(tf::dtype_name(wdt)));
    EXPECT_TRUE(dh.guards_intact()) << "a guard of dh was written";
  }
}

TEST(CudaCrossEntropy, AllIgnoredTargetsTouchNothing) {
  const int64_t n = 3, vocab = 5, dim = 4;
  const std::vector<int32_t> targets(size_t(n), tf::kIgnoreIndex);
  Guarded<int32_t> dt(targets, "targets");
  const Stored W(DType::BF16, size_t(vocab * dim), 18, "W"), h(DType::F32, size_t(n * dim), 19, "h");
  const std::vector<float> dh0 = tf::test::random_floats(size_t(n * dim), 20);
  Guarded<float> dh(dh0, "d_h");
  int64_t valid = -1;
  EXPECT_EQ(tf::simt::lm_head_cross_entropy(dh.get(), &valid, h.dev_f32->get(),
                                            WeightRef(W.dev(), DType::BF16, vocab, dim), dt.get(), n, 1.0f),
            0.0);
  EXPECT_EQ(valid, 0);
  EXPECT_EQ(dh.download(), dh0);
}

// ---- reported errors --------------------------------------------------------------------------

TEST(CudaCrossEntropy, ATargetOutsideTheVocabularyIsReportedBeforeAnyOutput) {
  const int64_t n = 6, vocab = 5, dim = 4;
  const std::vector<int32_t> targets = {0, 4, tf::kIgnoreIndex, 2, 5, 1};
  Guarded<int32_t> dt(targets, "targets");
  const Stored W(DType::BF16, size_t(vocab * dim), 21, "W"), h(DType::F32, size_t(n * dim), 22, "h");
  const std::vector<float> dh0 = tf::test::random_floats(size_t(n * dim), 23);
  Guarded<float> dh(dh0, "d_h");
  int64_t valid = -1;
  expect_contains(error_of([&] {
                    tf::simt::lm_head_cross_entropy(dh.get(), &valid, h.dev_f32->get(),
                                                    WeightRef(W.dev(), DType::BF16, vocab, dim), dt.get(), n,
                                                    1.0f);
                  }),
                  {"lm_head_cross_entropy: target 5 at row 4 is outside [0, 5)"});
  EXPECT_EQ(dh.download(), dh0);
  EXPECT_EQ(valid, -1);
}

// Quantized weights run (tests/test_cuda_dequant.cpp); these are the ones that cannot.
TEST(CudaMatmul, BadQuantizedWeightsAndBadOperandsAreRefused) {
  const std::vector<uint16_t> blocks(64, 0);
  Guarded<uint16_t> q(blocks, "q4_0 weight");
  const WeightRef partial_blocks(q.get(), DType::Q4_0, 2, 48);
  Guarded<float> out(std::vector<float>(64, 0.0f), "out");
  expect_contains(error_of([&] { tf::simt::linear_forward(out.get(), out.get(), partial_blocks, 1, 0.0f); }),
                  {"linear_forward: q4_0 weight rows of 48 elements are not whole blocks of 32"});
  expect_contains(
      error_of([&] { tf::simt::linear_backward_input(out.get(), out.get(), partial_blocks, 1, 0.0f); }),
      {"linear_backward_input: q4_0 weight rows of 48 elements are not whole blocks of 32"});
  expect_contains(
      error_of([&] { tf::simt::dequantize_weight_tile(out.get(), 48, partial_blocks, 0, 1, 0, 48); }),
      {"dequantize_weight_tile: q4_0 rows of 48 elements are not whole blocks of 32"});
  expect_contains(
      error_of([&] {
        tf::simt::dequantize_weight_tile(out.get(), 32, WeightRef(q.get(), DType::Q4_0, 2, 64), 0, 1, 16, 32);
      }),
      {"dequantize_weight_tile: columns [16, 48) of a q4_0 weight do not start and end on blocks of 32"});
  int64_t valid = 0;
  Guarded<int32_t> t(std::vector<int32_t>{0}, "targets");
  expect_contains(error_of([&] {
                    tf::simt::lm_head_cross_entropy(nullptr, &valid, out.get(), partial_blocks, t.get(), 1,
                                                    1.0f);
                  }),
                  {"lm_head_cross_entropy: q4_0 weight rows of 48 elements are not whole blocks of 32"});
  tf::QuantScales absmax;
  absmax.absmax = out.get();
  expect_contains(
      error_of([&] {
        tf::simt::linear_forward(out.get(), out.get(), WeightRef(q.get(), DType::NF4, 4, 18, absmax), 1,
                                 0.0f);
      }),
      {"linear_forward: the CUDA backend runs nf4 weights whose rows are a multiple of 8 elements; "
       "this one is 4 x 18"});
  const MatOperand a{out.get(), DType::F32, 3, false}, b{out.get(), DType::F32, 4, false};
  expect_contains(error_of([&] { tf::simt::matmul(out.get(), 4, a, b, 2, 4, 4, 1.0f, 0.0f); }),
                  {"matmul: operand A has leading dimension 3 but its stored rows hold 4 elements"});
  const MatOperand i32{out.get(), DType::I32, 4, false};
  expect_contains(error_of([&] { tf::simt::matmul(out.get(), 4, i32, b, 2, 4, 4, 1.0f, 0.0f); }),
                  {"matmul: operand A has dtype i32"});
  expect_contains(error_of([&] {
                    tf::simt::dequantize_weight_tile(out.get(), 4, WeightRef(q.get(), DType::BF16, 2, 4), 1,
                                                     2, 0, 4);
                  }),
                  {"dequantize_weight_tile: rows [1, 3) x cols [0, 4) outside a 2 x 4 weight"});
}

}  // namespace
