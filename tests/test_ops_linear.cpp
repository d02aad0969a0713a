// Tests: tf::cpu::linear_forward / linear_backward_input against tf::ref for every weight dtype
// (random valid blocks; NF4 with and without double quantization), token counts on both sides of
// the quant_gemv cut, tiles split along rows and columns, beta 0 over NaNs and beta 1; f32 / bf16 /
// f16 weights giving exactly tf::cpu::matmul's bits; the input gradient against finite differences
// of the forward; a bounded workspace; bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/quant_gemv.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/alloc.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/op_test_util.h"

using namespace tf;
using tf::test::random_floats;

namespace {

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();

const DType kAllDtypes[] = {DType::F32,  DType::BF16, DType::F16,  DType::Q4_0, DType::Q4_1,
                            DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q2_K, DType::Q3_K,
                            DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::NF4,  DType::INT8};

// Byte offsets of the f16 scale fields in one block of a ggml type: random bytes there could be an
// infinity or a NaN, so the tests overwrite them with finite values.
std::vector<size_t> half_fields(DType dt) {
  switch (dt) {
    case DType::Q4_0: return {offsetof(BlockQ4_0, d)};
    case DType::Q4_1: return {offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)};
    case DType::Q5_0: return {offsetof(BlockQ5_0, d)};
    case DType::Q5_1: return {offsetof(BlockQ5_1, d), offsetof(BlockQ5_1, m)};
    case DType::Q8_0: return {offsetof(BlockQ8_0, d)};
    case DType::Q2_K: return {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)};
    case DType::Q3_K: return {offsetof(BlockQ3_K, d)};
    case DType::Q4_K: return {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)};
    case DType::Q5_K: return {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)};
    case DType::Q6_K: return {offsetof(BlockQ6_K, d)};
    default: return {};
  }
}

// A [rows, cols] weight of any dtype with random valid contents, and its values as f32 (through the
// reference dequantization) for the error bounds.
struct TestWeight {
  std::vector<uint8_t> data;
  std::vector<float> absmax;
  std::vector<uint8_t> absmax_codes;
  std::vector<float> nested;
  std::vector<float> values;
  WeightRef ref;

  TestWeight(DType dt, int64_t rows, int64_t cols, uint64_t seed, bool double_quant = false) {
    const Philox rng(seed, 0x11ea);
    const int64_t n = rows * cols;
    if (!is_quantized(dt)) {
      const std::vector<float> v = random_floats(size_t(n), seed);
      data.resize(size_t(n) * dtype_size(dt));
      for (int64_t i = 0; i < n; ++i) {
        if (dt == DType::F32) {
          std::memcpy(data.data() + 4 * i, &v[size_t(i)], 4);
        } else {
          const uint16_t h = dt == DType::BF16 ? f32_to_bf16(v[size_t(i)]) : f32_to_f16(v[size_t(i)]);
          std::memcpy(data.data() + 2 * i, &h, 2);
        }
      }
    } else {
      data.resize(size_t(dtype_bytes(dt, n)));
      for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    }
    QuantScales scales;
    const int64_t blocks = ref::quant_blocks(n, 64);
    if (dt == DType::INT8) {
      for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(int8_t(int(rng.u32(i) % 255u) - 127));
    }
    if (dt == DType::NF4 || dt == DType::INT8) {
      const std::vector<float> u = random_floats(size_t(blocks), seed + 1);
      if (double_quant) {
        absmax_codes.resize(size_t(blocks));
        for (int64_t b = 0; b < blocks; ++b) absmax_codes[size_t(b)] = uint8_t(rng.u32(uint64_t(n + b)));
        nested = random_floats(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)), seed + 2);
        for (float& x : nested) x = 1.0f + 0.5f * x;
        scales = QuantScales{absmax_codes.data(), nested.data(), 0.25f};
      } else {
        for (float x : u) absmax.push_back(1.0f + 0.5f * x);
        scales = QuantScales{absmax.data(), nullptr, 0.0f};
      }
    } else if (is_quantized(dt)) {
      const int64_t block_bytes = dtype_block_bytes(dt);
      const int64_t n_blocks = int64_t(data.size()) / block_bytes;
      const std::vector<float> d = random_floats(size_t(2 * n_blocks), seed + 3, 0.05f);
      for (int64_t b = 0; b < n_blocks; ++b) {
        int k = 0;
        for (const size_t off : half_fields(dt)) {
          const uint16_t h = f32_to_f16(d[size_t(2 * b + k++)]);
          std::memcpy(data.data() + b * block_bytes + off, &h, 2);
        }
      }
    }
    ref = WeightRef{data.data(), dt, rows, cols, scales};
    values.resize(size_t(n));
    if (n > 0) ref::dequantize_weight_tile(values.data(), cols, ref, 0, rows, 0, cols);
  }
};

// Bound on |fast - reference| for one output element out = sum_k a_k b_k + beta out0. The f32
// dot product of length K, in any summation order and blocking, with or without FMA, is within
// gamma_K S of the exact sum, S = sum_k |a_k| |b_k| and gamma_K ~ K eps / 2 (each of the K - 1
// additions and K products rounds once, and an error made early is carried by the later sums);
// the reference sums in double and rounds once (eps / 2 relative); adding beta out0 rounds once
// more. (K + 2) eps (S + |beta out0|) covers all three with a factor of two to spare.
double element_tolerance(int64_t K, double S, double beta_term) {
  return double(K + 2) * kEpsF32 * (S + beta_term);
}

// Reports the first element outside its bound, and how many are.
void expect_within(const std::vector<float>& got, const std::vector<float>& want,
                   const std::vector<double>& S, const std::vector<float>& start, float beta, int64_t K) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double beta_term = beta == 0.0f ? 0.0 : std::abs(double(beta) * double(start[i]));
    const double tol = element_tolerance(K, S[i], beta_term);
    if (!(std::abs(double(got[i]) - double(want[i])) <= tol)) {
      if (bad == 0)
        ADD_FAILURE() << "element " << i << ": got " << got[i] << ", reference " << want[i] << ", bound "
                      << tol;
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << "of " << want.size() << " elements outside the bound";
}

// S[i, j] = sum_k |x[i, k]| |W[j, k]| (forward) or sum_r |dy[i, r]| |W[r, j]| (input gradient).
std::vector<double> abs_products(const std::vector<float>& a, const TestWeight& w, int64_t n, bool forward) {
  const int64_t rows = w.ref.rows, cols = w.ref.cols;
  const int64_t out_w = forward ? rows : cols, inner = forward ? cols : rows;
  std::vector<double> S(size_t(n * out_w), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < inner; ++k) {
      const double ak = std::abs(double(a[size_t(i * inner + k)]));
      for (int64_t j = 0; j < out_w; ++j) {
        const float wv = forward ? w.values[size_t(j * cols + k)] : w.values[size_t(k * cols + j)];
        S[size_t(i * out_w + j)] += ak * std::abs(double(wv));
      }
    }
  return S;
}

std::string describe(DType dt, int64_t n, int64_t rows, int64_t cols, float beta) {
  return std::string(dtype_name(dt)) + " n=" + std::to_string(n) + " W=" + std::to_string(rows) + "x" +
         std::to_string(cols) + " beta=" + std::to_string(beta);
}

// Runs both ops, both betas, on cpu and ref and checks them against each other; beta 0 starts
// from NaNs, which must all be overwritten. Two cpu calls must agree bit for bit.
void check_linear_case(const TestWeight& w, int64_t n, uint64_t seed) {
  const int64_t rows = w.ref.rows, cols = w.ref.cols;
  const std::vector<float> x = random_floats(size_t(n * cols), seed);
  const std::vector<float> dy = random_floats(size_t(n * rows), seed + 1);
  const std::vector<double> s_fwd = abs_products(x, w, n, true);
  const std::vector<double> s_bwd = abs_products(dy, w, n, false);
  for (const float beta : {0.0f, 1.0f}) {
    SCOPED_TRACE(describe(w.ref.dtype, n, rows, cols, beta));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const std::vector<float> y0 =
        beta == 0.0f ? std::vector<float>(size_t(n * rows), nan) : random_floats(size_t(n * rows), seed + 2);
    const std::vector<float> dx0 =
        beta == 0.0f ? std::vector<float>(size_t(n * cols), nan) : random_floats(size_t(n * cols), seed + 3);
    std::vector<float> y_cpu = y0, y_again = y0, y_ref = y0;
    cpu::linear_forward(y_cpu.data(), x.data(), w.ref, n, beta);
    cpu::linear_forward(y_again.data(), x.data(), w.ref, n, beta);
    ref::linear_forward(y_ref.data(), x.data(), w.ref, n, beta);
    expect_within(y_cpu, y_ref, s_fwd, y0, beta, cols);
    EXPECT_EQ(std::memcmp(y_cpu.data(), y_again.data(), y_cpu.size() * 4), 0) << "forward is not repeatable";

    std::vector<float> dx_cpu = dx0, dx_again = dx0, dx_ref = dx0;
    cpu::linear_backward_input(dx_cpu.data(), dy.data(), w.ref, n, beta);
    cpu::linear_backward_input(dx_again.data(), dy.data(), w.ref, n, beta);
    ref::linear_backward_input(dx_ref.data(), dy.data(), w.ref, n, beta);
    expect_within(dx_cpu, dx_ref, s_bwd, dx0, beta, rows);
    EXPECT_EQ(std::memcmp(dx_cpu.data(), dx_again.data(), dx_cpu.size() * 4), 0)
        << "input gradient is not repeatable";
  }
}

// Columns of the small test weights: ggml types need whole blocks (two or three here); NF4 and
// INT8 take 99, so 64-element scale blocks straddle rows and the tensor ends on half a byte; f32,
// bf16 and f16 any width.
int64_t small_cols(DType dt) {
  if (dt == DType::NF4 || dt == DType::INT8 || !is_quantized(dt)) return 99;
  return dtype_block_elems(dt) == 256 ? 512 : 96;
}

TEST(Linear, FastMatchesReferenceForEveryDtype) {
  // 1 and 7 tokens go through quant_gemv, 33 and 1025 through dequantized tiles and sgemm.
  static_assert(cpu::kQuantGemvMaxTokens >= 7 && cpu::kQuantGemvMaxTokens < 33);
  uint64_t seed = 100;
  for (const DType dt : kAllDtypes) {
    for (const bool double_quant : {false, true}) {
      if (double_quant && dt != DType::NF4) continue;
      SCOPED_TRACE(double_quant ? "double quantization" : "");
      const TestWeight w(dt, 67, small_cols(dt), seed++, double_quant);
      for (const int64_t n : {1, 7, 33, 1025}) check_linear_case(w, n, seed += 4);
    }
  }
}

TEST(Linear, TilesSplitAlongRowsAndColumns) {
  // A weight over a tile's 4M elements is cut into tiles of 2048 columns (whole blocks) and 2048
  // rows: these take two of each, the last ones partial, and the column runs' products add up in y
  // (beta with the first only) and the row tiles' in dx. 12 tokens take the tiled path; 3 take
  // quant_gemv on the same weight.
  struct Case {
    DType dtype;
    int64_t cols;
    bool double_quant;
  };
  const Case cases[] = {{DType::Q4_K, 2048 + 256, false},
                        {DType::Q8_0, 2048 + 32, false},
                        {DType::NF4, 2048 + 5, true},
                        {DType::INT8, 2048 + 70, false}};
  uint64_t seed = 500;
  for (const Case& c : cases) {
    const TestWeight w(c.dtype, 2100, c.cols, seed++, c.double_quant);
    ASSERT_GT(w.ref.rows * w.ref.cols, int64_t(1) << 22);
    for (const int64_t n : {12, 3}) check_linear_case(w, n, seed += 4);
  }
}

TEST(Linear, DenseWeightsGiveExactlyMatmul) {
  uint64_t seed = 900;
  for (const DType dt : {DType::F32, DType::BF16, DType::F16}) {
    const TestWeight w(dt, 67, 99, seed++);
    for (const int64_t n : {1, 33}) {
      for (const float beta : {0.0f, 1.0f}) {
        SCOPED_TRACE(describe(dt, n, 67, 99, beta));
        const std::vector<float> x = random_floats(size_t(n * 99), seed++);
        const std::vector<float> dy = random_floats(size_t(n * 67), seed++);
        const std::vector<float> y0 = random_floats(size_t(n * 67), seed++);
        const std::vector<float> dx0 = random_floats(size_t(n * 99), seed++);
        std::vector<float> y = y0, y_mm = y0, dx = dx0, dx_mm = dx0;
        cpu::linear_forward(y.data(), x.data(), w.ref, n, beta);
        cpu::matmul(y_mm.data(), 67, {x.data(), DType::F32, 99, false}, {w.ref.data, dt, 99, true}, n, 67, 99,
                    1.0f, beta);
        EXPECT_EQ(std::memcmp(y.data(), y_mm.data(), y.size() * 4), 0);
        cpu::linear_backward_input(dx.data(), dy.data(), w.ref, n, beta);
        cpu::matmul(dx_mm.data(), 99, {dy.data(), DType::F32, 67, false}, {w.ref.data, dt, 99, false}, n, 99,
                    67, 1.0f, beta);
        EXPECT_EQ(std::memcmp(dx.data(), dx_mm.data(), dx.size() * 4), 0);
      }
    }
  }
}

TEST(Linear, InputGradientMatchesFiniteDifferencesOfForward) {
  // loss(x) = sum dy . linear_forward(x) is linear in x, so central differences have no truncation
  // error at any step: what is left is the rounding of the two losses. The reference forward sums in
  // double and rounds each y_ij once, within eps / 2 |y_ij| <= eps / 2 S_ij, and the loss adds them
  // in double, so each loss is within delta = eps sum_i,j |dy_ij| S_ij (a factor of two to spare),
  // and a difference quotient within 2 delta / (2 h).
  const int64_t n = 3, rows = 5, cols = 70;
  const TestWeight w(DType::NF4, rows, cols, 31, true);
  std::vector<double> x = test::to_double(random_floats(size_t(n * cols), 32));
  const std::vector<float> dy = random_floats(size_t(n * rows), 33);
  const double h = 0.5;
  const auto loss = [&] {
    const std::vector<float> xf(x.begin(), x.end());
    std::vector<float> y(size_t(n * rows));
    ref::linear_forward(y.data(), xf.data(), w.ref, n, 0.0f);
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += double(dy[i]) * double(y[i]);
    return l;
  };
  const std::vector<double> numeric = test::numeric_gradient(x, loss, h);
  // |x| grows to |x| + h inside the differences.
  std::vector<float> x_bound(x.size(), 1.0f + float(h));
  const std::vector<double> s_fwd = abs_products(x_bound, w, n, true);
  double delta = 0;
  for (size_t i = 0; i < s_fwd.size(); ++i) delta += std::abs(double(dy[i])) * s_fwd[i];
  delta *= kEpsF32;
  const std::vector<double> s_bwd = abs_products(dy, w, n, false);
  for (int backend = 0; backend < 2; ++backend) {
    std::vector<float> dx(x.size(), 0.0f);
    if (backend == 0) {
      cpu::linear_backward_input(dx.data(), dy.data(), w.ref, n, 0.0f);
    } else {
      ref::linear_backward_input(dx.data(), dy.data(), w.ref, n, 0.0f);
    }
    for (size_t i = 0; i < dx.size(); ++i)
      EXPECT_NEAR(dx[i], numeric[i], delta / h + element_tolerance(rows, s_bwd[i], 0.0))
          << (backend == 0 ? "cpu" : "ref") << " element " << i;
  }
}

TEST(Linear, WorkspaceIsBoundedAndReused) {
  // A 2048 x 6144 Q4_0 weight is 48 MiB as f32; the tiles stay within 16 MiB per calling thread
  // and a second call allocates nothing.
  const int64_t rows = 2048, cols = 6144, n = 64;
  const TestWeight w(DType::Q4_0, rows, cols, 41);
  const std::vector<float> x = random_floats(size_t(n * cols), 42);
  const std::vector<float> dy = random_floats(size_t(n * rows), 43);
  std::vector<float> y(size_t(n * rows)), dx(size_t(n * cols));
  MemTracker& mt = MemTracker::instance();
  const size_t before = mt.current(MemTag::Workspace);
  mt.reset_peaks();
  cpu::linear_forward(y.data(), x.data(), w.ref, n, 0.0f);
  cpu::linear_backward_input(dx.data(), dy.data(), w.ref, n, 0.0f);
  EXPECT_LE(mt.peak(MemTag::Workspace) - before, size_t(16) << 20);
  const size_t after_first = mt.current(MemTag::Workspace);
  cpu::linear_forward(y.data(), x.data(), w.ref, n, 1.0f);
  cpu::linear_backward_input(dx.data(), dy.data(), w.ref, n, 1.0f);
  EXPECT_EQ(mt.current(MemTag::Workspace), after_first);
}

TEST(Linear, EmptyShapes) {
  // No columns: y = beta y (beta 0 overwrites); no rows: dx = beta dx.
  const TestWeight no_cols(DType::NF4, 3, 0, 51);
  std::vector<float> y(6, std::numeric_limits<float>::quiet_NaN());
  cpu::linear_forward(y.data(), nullptr, no_cols.ref, 2, 0.0f);
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
  const TestWeight no_rows(DType::Q8_0, 0, 64, 52);
  std::vector<float> dx(128, 2.0f);
  cpu::linear_backward_input(dx.data(), nullptr, no_rows.ref, 2, 0.5f);
  EXPECT_EQ(dx, std::vector<float>(128, 1.0f));
}

TEST(Linear, RejectsBadArguments) {
  const TestWeight nf4(DType::NF4, 4, 64, 61);
  const TestWeight int8(DType::INT8, 4, 64, 62);
  const TestWeight q4k(DType::Q4_K, 4, 256, 63);
  WeightRef nf4_no_absmax = nf4.ref;
  nf4_no_absmax.scales.absmax = nullptr;
  WeightRef int8_no_absmax = int8.ref;
  int8_no_absmax.scales.absmax = nullptr;
  WeightRef q4k_partial_block = q4k.ref;
  q4k_partial_block.cols = 100;
  WeightRef null_data = q4k.ref;
  null_data.data = nullptr;
  WeightRef i32 = q4k.ref;
  i32.dtype = DType::I32;
  struct Bad {
    WeightRef w;
    int64_t n;
    std::string message;
  };
  const Bad bad[] = {{nf4_no_absmax, 2, "nf4 weight without its absmax"},
                     {int8_no_absmax, 2, "int8 weight without its absmax"},
                     {q4k_partial_block, 2, "q4_k weight rows of 100 elements are not whole blocks of 256"},
                     {null_data, 2, "weight is null"},
                     {i32, 2, "cannot be stored as i32"},
                     {nf4.ref, -1, "bad shape: -1 tokens through a 4 x 64 weight"}};
  std::vector<float> a(2048, 0.5f), b(2048, 0.5f);
  for (const Bad& c : bad) {
    for (int op = 0; op < 4; ++op) {
      SCOPED_TRACE(c.message + " op " + std::to_string(op));
      try {
        if (op == 0) cpu::linear_forward(a.data(), b.data(), c.w, c.n, 0.0f);
        if (op == 1) ref::linear_forward(a.data(), b.data(), c.w, c.n, 0.0f);
        if (op == 2) cpu::linear_backward_input(a.data(), b.data(), c.w, c.n, 0.0f);
        if (op == 3) ref::linear_backward_input(a.data(), b.data(), c.w, c.n, 0.0f);
        ADD_FAILURE() << "accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(op < 2 ? "linear_forward" : "linear_backward_input"),
                  std::string::npos)
            << e.what();
      }
    }
  }
  EXPECT_THROW(cpu::linear_forward(nullptr, b.data(), q4k.ref, 2, 0.0f), Error);
}

}  // namespace
