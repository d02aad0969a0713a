// Tests: the fused dequantize + mma matmul of the CUDA backend on the simulator
// (tf::simt::qmatmul_forward / qmatmul_backward_input) for every quantized dtype (random valid
// blocks; NF4 with and without double-quantized absmax), against a float64 product of the
// bf16-rounded operands and against tf::cpu::linear_forward / linear_backward_input: token counts
// 1, 17 and 67 (inside one 128-row tile, past 64), K at a quant-block edge, N not a multiple of the
// 64-column tile, beta 0 over NaNs and beta 1, NaN guards around every output; which weights
// qmatmul_supports takes and the errors for the others.
//
// Bounds, all worst case (no test fails by chance), with S = sum_p |a_p b_p| over the exact
// operands and u = 2^-23:
// - against the bf16 product: the device multiplies the bf16-rounded operands exactly (8-bit
//   significands, 16-bit products, exact in f32) and accumulates K of them in f32; each addition
//   errs by at most one ulp of its result (a full ulp, not half: tensor cores need not round to
//   nearest in their adds), and adding beta c0 rounds twice more, so |err| <= g (S' + |beta c0|)
//   with g = (K + 2) u / (1 - (K + 2) u) and S' the sum over the rounded operands;
// - against tf::cpu: rounding both operands to bf16 (unit roundoff 2^-8 each) moves each product by
//   at most (2^-7 + 2^-16) |a_p b_p|, and the CPU's own f32 sum errs by at most (K + 2) u (S + |beta
//   c0|) (tests/test_ops_linear.cpp's bound), added to the device's.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/ref/quantize.h"
#include "kernels/cuda/qmatmul.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "kernels/sim/sim.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"
#include "tests/sim_test_util.h"

namespace {

using tf::DType;
using tf::WeightRef;
using tf::sim::DeviceBuffer;
using tf::test::expect_contains;
using tf::test::Guarded;
using tf::test::random_floats;

constexpr double kU = 1.0 / (1 << 23);  // one f32 ulp at 1, relative
constexpr double kBf16Product = 2.0 / 256 + 1.0 / 65536;

// Byte offsets of the f16 scale fields of one block: random bytes there could be an infinity or a
// NaN, so they are overwritten with finite values.
std::vector<size_t> half_fields(DType dt) {
  switch (dt) {
    case DType::Q4_0: return {offsetof(tf::BlockQ4_0, d)};
    case DType::Q4_1: return {offsetof(tf::BlockQ4_1, d), offsetof(tf::BlockQ4_1, m)};
    case DType::Q5_0: return {offsetof(tf::BlockQ5_0, d)};
    case DType::Q5_1: return {offsetof(tf::BlockQ5_1, d), offsetof(tf::BlockQ5_1, m)};
    case DType::Q8_0: return {offsetof(tf::BlockQ8_0, d)};
    case DType::Q2_K: return {offsetof(tf::BlockQ2_K, d), offsetof(tf::BlockQ2_K, dmin)};
    case DType::Q3_K: return {offsetof(tf::BlockQ3_K, d)};
    case DType::Q4_K: return {offsetof(tf::BlockQ4_K, d), offsetof(tf::BlockQ4_K, dmin)};
    case DType::Q5_K: return {offsetof(tf::BlockQ5_K, d), offsetof(tf::BlockQ5_K, dmin)};
    case DType::Q6_K: return {offsetof(tf::BlockQ6_K, d)};
    default: return {};
  }
}

// A quantized [rows, cols] weight with random valid contents, on the host and in simulated device
// memory, with its values (tf::ref::dequantize_weight_tile) and those values rounded to bf16.
struct QWeight {
  std::vector<uint8_t> data;
  std::vector<float> absmax;
  std::vector<uint8_t> absmax_codes;
  std::vector<float> nested;
  WeightRef host;
  WeightRef dev;
  std::vector<float> values, values_bf16;
  std::vector<DeviceBuffer> buffers;

  QWeight(DType dt, int64_t rows, int64_t cols, uint64_t seed, bool double_quant = false) {
    const tf::Philox rng(seed, 0x9a7e);
    const int64_t n = rows * cols;
    data.resize(size_t(tf::dtype_bytes(dt, n)));
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    tf::QuantScales scales;
    if (dt == DType::NF4 || dt == DType::INT8) {
      if (dt == DType::INT8) {
        for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(int8_t(int(rng.u32(i) % 255u) - 127));
      }
      const int64_t blocks = tf::ref::quant_blocks(n, 64);
      if (double_quant) {
        for (int64_t b = 0; b < blocks; ++b) absmax_codes.push_back(uint8_t(rng.u32(uint64_t(n + b))));
        nested = random_floats(size_t(tf::ref::quant_blocks(blocks, tf::kNf4NestedBlock)), seed + 2);
        for (float& x : nested) x = 1.0f + 0.5f * x;
        scales = tf::QuantScales{absmax_codes.data(), nested.data(), 0.25f};
      } else {
        for (float x : random_floats(size_t(blocks), seed + 1)) absmax.push_back(1.0f + 0.5f * x);
        scales = tf::QuantScales{absmax.data(), nullptr, 0.0f};
      }
    } else {
      const int64_t block_bytes = tf::dtype_block_bytes(dt), n_blocks = int64_t(data.size()) / block_bytes;
      const std::vector<float> d = random_floats(size_t(2 * n_blocks), seed + 3, 0.05f);
      for (int64_t b = 0; b < n_blocks; ++b) {
        int f = 0;
        for (const size_t off : half_fields(dt)) {
          const uint16_t h = tf::f32_to_f16(d[size_t(2 * b + f++)]);
          std::memcpy(data.data() + b * block_bytes + off, &h, 2);
        }
      }
    }
    host = WeightRef{data.data(), dt, rows, cols, scales};
    values.resize(size_t(n));
    tf::ref::dequantize_weight_tile(values.data(), cols, host, 0, rows, 0, cols);
    for (float v : values) values_bf16.push_back(tf::bf16_to_f32(tf::f32_to_bf16(v)));
    tf::QuantScales dev_scales;
    buffers.push_back(DeviceBuffer::from(data, "weight blocks"));
    if (!absmax.empty()) {
      buffers.push_back(DeviceBuffer::from(absmax, "absmax"));
      dev_scales.absmax = buffers.back().data();
    }
    if (!absmax_codes.empty()) {
      buffers.push_back(DeviceBuffer::from(absmax_codes, "absmax codes"));
      dev_scales.absmax = buffers.back().data();
      buffers.push_back(DeviceBuffer::from(nested, "nested absmax"));
      dev_scales.nested = buffers.back().as<float>();
      dev_scales.offset = scales.offset;
    }
    dev = WeightRef{buffers.front().data(), dt, rows, cols, dev_scales};
  }
};

// A signalling NaN in every output element that beta 0 must overwrite.
std::vector<float> nan_filled(size_t n) {
  const uint32_t bits = 0x7f800001u;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return std::vector<float>(n, f);
}

struct Case {
  DType dtype;
  int64_t rows, cols;
  bool double_quant;
};

// One direction of one case: out[n_tokens, width] from in[n_tokens, depth] through the fused kernel
// (in passes of pass_elems, or through the launcher when 0), checked element by element against
// both references. Returns the output.
std::vector<float> check(const Case& c, bool forward, int64_t n_tokens, float beta, uint64_t seed,
                         int64_t pass_elems = 0) {
  const QWeight w(c.dtype, c.rows, c.cols, seed, c.double_quant);
  const int64_t width = forward ? c.rows : c.cols, depth = forward ? c.cols : c.rows;
  const std::vector<float> in = random_floats(size_t(n_tokens * depth), seed + 10);
  const std::vector<float> start = beta == 0.0f ? nan_filled(size_t(n_tokens * width))
                                                : random_floats(size_t(n_tokens * width), seed + 11);
  const Guarded<float> d_in(in, "in");
  Guarded<float> d_out(start, "out");
  std::vector<float> cpu = start;
  if (pass_elems > 0) {
    tf::simt::qmatmul_in_passes(d_out.get(), d_in.get(), w.dev, n_tokens, beta, forward, pass_elems);
  } else if (forward) {
    tf::simt::qmatmul_forward(d_out.get(), d_in.get(), w.dev, n_tokens, beta);
  }
  if (forward) {
    tf::cpu::linear_forward(cpu.data(), in.data(), w.host, n_tokens, beta);
  } else {
    if (pass_elems == 0) tf::simt::qmatmul_backward_input(d_out.get(), d_in.get(), w.dev, n_tokens, beta);
    tf::cpu::linear_backward_input(cpu.data(), in.data(), w.host, n_tokens, beta);
  }
  const std::vector<float> got = d_out.download();
  const std::string what = std::string(tf::dtype_name(c.dtype)) +
                           (c.double_quant ? " (double quant) " : " ") + std::to_string(c.rows) + "x" +
                           std::to_string(c.cols) + (forward ? " forward" : " input gradient") + ", " +
                           std::to_string(n_tokens) + " tokens, beta " + std::to_string(beta);
  const double g = double(depth + 2) * kU / (1 - double(depth + 2) * kU);
  int bad = 0;
  for (int64_t i = 0; i < n_tokens; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      double want = 0, mag = 0, mag_bf16 = 0;
      for (int64_t p = 0; p < depth; ++p) {
        const size_t wi = size_t(forward ? j * c.cols + p : p * c.cols + j);
        const float x = in[size_t(i * depth + p)];
        const double prod_bf16 = double(tf::bf16_to_f32(tf::f32_to_bf16(x))) * double(w.values_bf16[wi]);
        want += prod_bf16;
        mag_bf16 += std::fabs(prod_bf16);
        mag += std::fabs(double(x) * double(w.values[wi]));
      }
      const size_t at = size_t(i * width + j);
      const double extra = beta == 0.0f ? 0.0 : double(beta) * double(start[at]);
      want += extra;
      const double device_err = g * (mag_bf16 + std::fabs(extra));
      const double cpu_bound = kBf16Product * mag + device_err + g * (mag + std::fabs(extra));
      const double v = got[at];
      if (!(std::fabs(v - want) <= device_err) && bad++ < 3) {
        ADD_FAILURE() << what << ": out[" << i << "][" << j << "] = " << v << ", bf16 product " << want
                      << ", bound " << device_err;
      }
      if (!(std::fabs(v - double(cpu[at])) <= cpu_bound) && bad++ < 3) {
        ADD_FAILURE() << what << ": out[" << i << "][" << j << "] = " << v << ", tf::cpu " << cpu[at]
                      << ", bound " << cpu_bound;
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
  EXPECT_TRUE(d_out.guards_intact()) << what << ": a write landed outside the output";
  return got;
}

// Rows 72 and 40 are not multiples of the 64-column tile (forward) nor of the 32-deep k step (input
// gradient); 96 columns end a 32-block format on its third block and put NF4 / INT8 blocks of 64
// across rows; the k-quants end K on their first and second 256 super-block.
const Case kCases[] = {
    {DType::Q4_0, 72, 96, false},  {DType::Q4_1, 72, 96, false},  {DType::Q5_0, 72, 96, false},
    {DType::Q5_1, 72, 96, false},  {DType::Q8_0, 72, 96, false},  {DType::NF4, 72, 96, false},
    {DType::NF4, 72, 232, true},   {DType::INT8, 72, 96, false},  {DType::Q2_K, 40, 256, false},
    {DType::Q3_K, 40, 512, false}, {DType::Q4_K, 40, 256, false}, {DType::Q4_K, 40, 512, false},
    {DType::Q5_K, 40, 512, false}, {DType::Q6_K, 40, 256, false}, {DType::Q6_K, 40, 512, false},
};

struct TokenRun {
  int64_t n_tokens;
  float beta;
};
const TokenRun kRuns[] = {{1, 0.0f}, {17, 1.0f}, {67, 0.0f}, {67, 1.0f}};

TEST(CudaQmatmul, ForwardAgainstTheBf16ProductAndTheCpu) {
  uint64_t seed = 100;
  for (const Case& c : kCases) {
    for (const TokenRun& r : kRuns) check(c, true, r.n_tokens, r.beta, seed++);
  }
}

TEST(CudaQmatmul, InputGradientAgainstTheBf16ProductAndTheCpu) {
  uint64_t seed = 200;
  for (const Case& c : kCases) {
    for (const TokenRun& r : kRuns) check(c, false, r.n_tokens, r.beta, seed++);
  }
}

// 300 tokens are three 128-row tiles of the grid in one pass, or three passes of one tile each (the
// last 44 rows) when the passes hold a single tile: every output element sums the same products in
// the same order either way, so the bits agree.
TEST(CudaQmatmul, PassesOfOneTileGiveTheBitsOfOnePass) {
  uint64_t seed = 300;
  for (const Case& c : {Case{DType::Q4_K, 40, 256, false}, Case{DType::NF4, 72, 96, false}}) {
    for (bool forward : {true, false}) {
      for (float beta : {0.0f, 1.0f}) {
        const std::vector<float> one = check(c, forward, 300, beta, seed);
        const std::vector<float> many = check(c, forward, 300, beta, seed, 1);
        EXPECT_EQ(tf::test::first_difference(many, one), -1)
            << tf::dtype_name(c.dtype) << (forward ? " forward" : " input gradient") << " beta " << beta;
        ++seed;
      }
    }
  }
}

TEST(CudaQmatmul, SupportsEveryQuantizedDtypeWithRowsOfWholeGroupsOfEight) {
  for (const Case& c : kCases) {
    const QWeight w(c.dtype, 2, c.cols, 1, c.double_quant);
    EXPECT_TRUE(tf::simt::qmatmul_supports(w.dev)) << tf::dtype_name(c.dtype);
  }
  const QWeight nf4(DType::NF4, 2, 36, 2), int8(DType::INT8, 2, 36, 3), nf4_ok(DType::NF4, 2, 40, 4);
  EXPECT_FALSE(tf::simt::qmatmul_supports(nf4.dev)) << "nf4 rows of 36";
  EXPECT_FALSE(tf::simt::qmatmul_supports(int8.dev)) << "int8 rows of 36";
  WeightRef no_absmax = nf4_ok.dev;
  no_absmax.scales = {};
  EXPECT_FALSE(tf::simt::qmatmul_supports(no_absmax)) << "nf4 without absmax";
  EXPECT_FALSE(tf::simt::qmatmul_supports(WeightRef(nf4_ok.dev.data, DType::NF4, 0, 40, nf4_ok.dev.scales)))
      << "no rows";
  EXPECT_FALSE(tf::simt::qmatmul_supports(WeightRef(nf4_ok.dev.data, DType::Q4_K, 1, 264))) << "q4_k of 264";
  EXPECT_FALSE(tf::simt::qmatmul_supports(WeightRef(nf4_ok.dev.data, DType::BF16, 2, 16))) << "bf16";
  EXPECT_FALSE(tf::simt::qmatmul_supports(WeightRef(nf4_ok.dev.data, DType::F32, 2, 8))) << "f32";
}

TEST(CudaQmatmul, WeightsItDoesNotTakeAreRefusedByName) {
  const QWeight nf4(DType::NF4, 2, 36, 5);
  Guarded<float> buf(std::vector<float>(64, 0.0f), "buf");
  expect_contains(
      tf::test::error_of([&] { tf::simt::qmatmul_forward(buf.get(), buf.get(), nf4.dev, 1, 0.0f); }),
      {"qmatmul_forward", "2 x 36 nf4 weight", "not a multiple of 8 elements"});
  expect_contains(
      tf::test::error_of([&] { tf::simt::qmatmul_backward_input(buf.get(), buf.get(), nf4.dev, 1, 0.0f); }),
      {"qmatmul_backward_input", "2 x 36 nf4 weight", "not a multiple of 8 elements"});
  const WeightRef f32(buf.get(), DType::F32, 2, 8);
  expect_contains(tf::test::error_of([&] { tf::simt::qmatmul_forward(buf.get(), buf.get(), f32, 1, 0.0f); }),
                  {"qmatmul_forward", "2 x 8 f32 weight", "not quantized"});
  const QWeight q8(DType::Q8_0, 2, 32, 6);
  expect_contains(tf::test::error_of(
                      [&] { tf::simt::qmatmul_in_passes(buf.get(), buf.get(), q8.dev, 1, 0.0f, true, 0); }),
                  {"qmatmul_forward", "passes of 0 elements"});
  EXPECT_TRUE(buf.guards_intact());
}

}  // namespace
