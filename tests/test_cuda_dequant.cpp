// The CUDA backend's decoders of quantized frozen weights (kernels/cuda/quant_decode.h) on the
// simulator against tf::ref::dequantize_weight_tile: every quantized dtype decodes to the
// reference's bits (f32) and to their bf16 rounding (packed pairs), at odd row counts, with an NF4 /
// INT8 tensor whose last scale block is partial and rows that cross blocks, and a double-quantized
// NF4 with more than one nested absmax; and the weights the device refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/ref/quantize.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/quant_decode.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"
#include "tests/quant_test_util.h"
#include "tests/sim_test_util.h"

namespace rt = tf::simt::rt;
using tf::DType;
using tf::WeightRef;
using tf::test::error_of;
using tf::test::expect_contains;

namespace tf::simt {
namespace {

// Every 8-element group of w through decode8 (f32) and decode8_bf16 (packed pairs).
template <DType T>
__global__ void decode_all(port::gptr<float> out, port::gptr<uint32_t> packed, QuantWeight w) {
  const int64_t groups_per_row = w.cols / 8;
  for (int64_t g = grid_first(); g < w.rows * groups_per_row; g += grid_stride()) {
    const int64_t row = g / groups_per_row, col = g % groups_per_row * 8;
    float v[8];
    decode8<T>(w, row, col, v);
    uint32_t p[4];
    decode8_bf16<T>(w, row, col, p);
    for (int k = 0; k < 8; ++k) out[row * w.cols + col + k] = v[k];
    for (int k = 0; k < 4; ++k) packed[(row * w.cols + col) / 2 + k] = p[k];
  }
}

}  // namespace
}  // namespace tf::simt

namespace {

constexpr DType kQuantTypes[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1,
                                 DType::Q8_0, DType::Q2_K, DType::Q3_K, DType::Q4_K,
                                 DType::Q5_K, DType::Q6_K, DType::NF4,  DType::INT8};

using tf::test::f16_fields;

// n bytes in simulated device memory, freed with the owner.
struct DeviceBytes {
  void* p = nullptr;
  DeviceBytes(const void* host, size_t n, const char* what) {
    p = rt::device_alloc(std::max<size_t>(n, 1), what);
    if (n) rt::memcpy_h2d(p, host, n, rt::current_stream());
    rt::stream_synchronize(rt::current_stream());
  }
  ~DeviceBytes() { rt::device_free(p); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
};

// A rows x cols quantized weight with random codes and random finite scales (so that every value
// is a number and exact comparisons mean something), on the host and on the simulated device.
struct TestWeight {
  DType dtype;
  int64_t rows, cols;
  bool nested;
  std::vector<uint8_t> data;
  std::vector<float> absmax;          // f32 absmax, or the nested scales with double quantization
  std::vector<uint8_t> absmax_codes;  // double quantization only
  float offset = 0.0f;
  std::unique_ptr<DeviceBytes> dev_data, dev_absmax, dev_codes;

  // small_scales: f16 scales within +-1/16 instead of any finite f16, for ops whose error grows
  // with the size of the values rather than with their relative rounding (softmax).
  TestWeight(DType t, int64_t r, int64_t c, uint64_t seed, bool double_quant = false,
             bool small_scales = false)
      : dtype(t), rows(r), cols(c), nested(double_quant) {
    tf::Philox rng(seed, 0xdec0);
    const int64_t n = rows * cols;
    data.resize(size_t(tf::dtype_bytes(t, n)));
    for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(rng.u32(i));
    if (t == DType::NF4 || t == DType::INT8) {
      const int64_t blocks = tf::ref::quant_blocks(n, tf::dtype_block_elems(t));
      absmax = tf::test::random_floats(size_t(blocks), seed + 1, 2.0f);
      for (float& a : absmax) a = std::fabs(a) + 0.01f;
      if (nested) {
        for (int64_t b = 0; b < blocks; ++b)
          absmax_codes.push_back(uint8_t(rng.u32(uint64_t(b) + (1u << 30))));
        absmax = tf::test::random_floats(size_t(tf::ref::quant_blocks(blocks, tf::kNf4NestedBlock)), seed + 2,
                                         0.5f);
        offset = 0.3125f + absmax[0];
      }
    } else {
      // Any finite f16 scale: either sign, subnormals and the largest values included.
      const int64_t block_bytes = tf::dtype_block_bytes(t);
      for (int64_t b = 0; b < int64_t(data.size()) / block_bytes; ++b)
        for (size_t f : f16_fields(t)) {
          uint16_t h = uint16_t(rng.u32(uint64_t(b * 4 + int64_t(f)) + (1ull << 40)));
          if (((h >> 10) & 0x1f) == 0x1f) h = uint16_t(h & ~0x4000u);
          if (small_scales) h = tf::f32_to_f16(float(int(h % 2001) - 1000) / 16000.0f);
          std::memcpy(&data[size_t(b * block_bytes) + f], &h, 2);
        }
    }
    dev_data = std::make_unique<DeviceBytes>(data.data(), data.size(), "weight data");
    if (!absmax.empty())
      dev_absmax =
          std::make_unique<DeviceBytes>(absmax.data(), absmax.size() * 4, nested ? "nested" : "absmax");
    if (nested)
      dev_codes = std::make_unique<DeviceBytes>(absmax_codes.data(), absmax_codes.size(), "absmax codes");
  }

  WeightRef host() const { return ref(data.data(), absmax.data(), absmax_codes.data()); }
  WeightRef device() const {
    return ref(dev_data->p, dev_absmax ? static_cast<const float*>(dev_absmax->p) : nullptr,
               dev_codes ? dev_codes->p : nullptr);
  }
  std::string what() const {
    return std::string(tf::dtype_name(dtype)) + (nested ? " (double quant)" : "") + " " +
           std::to_string(rows) + "x" + std::to_string(cols);
  }

 private:
  WeightRef ref(const void* d, const float* a, const void* codes) const {
    tf::QuantScales s;
    if (nested) {
      s.absmax = codes;
      s.nested = a;
      s.offset = offset;
    } else if (!absmax.empty()) {
      s.absmax = a;
    }
    return {d, dtype, rows, cols, s};
  }
};

std::vector<uint32_t> bits_of(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

std::vector<float> reference(const TestWeight& w) {
  std::vector<float> want(size_t(w.rows * w.cols));
  tf::ref::dequantize_weight_tile(want.data(), w.cols, w.host(), 0, w.rows, 0, w.cols);
  return want;
}

// decode8 gives the reference's bits for every element, and decode8_bf16 their bf16 rounding.
void expect_decodes_exactly(const TestWeight& w) {
  SCOPED_TRACE(w.what());
  const size_t n = size_t(w.rows * w.cols);
  tf::test::Guarded<float> out(std::vector<float>(n, 0.0f), "decoded");
  tf::test::Guarded<uint32_t> packed(std::vector<uint32_t>(n / 2, 0u), "decoded bf16");
  const tf::simt::QuantWeight q = tf::simt::quant_weight(w.device(), "decode test");
  tf::simt::with_quant_dtype(w.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    tf::port::launch(tf::simt::decode_all<T>, tf::simt::on_current_stream("decode_all", 8, 128), out.get(),
                     packed.get(), q);
  });
  const std::vector<float> want = reference(w);
  EXPECT_EQ(bits_of(out.download()), bits_of(want));
  const std::vector<uint32_t> got_bf16 = packed.download();
  for (size_t i = 0; i < n; ++i) {
    const uint16_t got = uint16_t(got_bf16[i / 2] >> (16 * (i % 2)));
    ASSERT_EQ(got, tf::f32_to_bf16(want[i])) << "bf16 of element " << i;
  }
  EXPECT_TRUE(out.guards_intact());
  EXPECT_TRUE(packed.guards_intact());
}

TEST(CudaDequantDecode, EveryGgmlTypeGivesTheReferenceBits) {
  for (DType t : kQuantTypes) {
    if (t == DType::NF4 || t == DType::INT8) continue;
    const int64_t cols = tf::dtype_block_elems(t) == 256 ? 512 : 96;
    expect_decodes_exactly(TestWeight(t, 5, cols, 40 + uint64_t(t)));
  }
}

TEST(CudaDequantDecode, Nf4AndInt8RowsCrossTheirBlocksAndTheLastBlockIsPartial) {
  // 7 x 24 = 168 elements: blocks of 64, 64 and 40, each row of 24 inside or across them.
  for (DType t : {DType::NF4, DType::INT8}) expect_decodes_exactly(TestWeight(t, 7, 24, 60 + uint64_t(t)));
}

TEST(CudaDequantDecode, DoubleQuantizedNf4ReadsEveryNestedScale) {
  // 37 x 456 = 16872 elements: 264 absmax blocks, so two nested scales (256 absmax each), the
  // second one partial.
  expect_decodes_exactly(TestWeight(DType::NF4, 37, 456, 71, true));
}

TEST(CudaDequantDecode, WeightsTheDeviceCannotDecodeAreRefusedByName) {
  const TestWeight nf4(DType::NF4, 3, 24, 80);
  WeightRef odd = nf4.device();
  odd.rows = 4;
  odd.cols = 18;
  expect_contains(
      error_of([&] { tf::simt::quant_weight(odd, "linear_forward"); }),
      {"linear_forward: the CUDA backend runs nf4 weights whose rows are a multiple of 8 elements; "
       "this one is 4 x 18"});
  WeightRef no_absmax = nf4.device();
  no_absmax.scales = {};
  expect_contains(error_of([&] { tf::simt::quant_weight(no_absmax, "embedding_forward"); }),
                  {"embedding_forward: nf4 weight without its absmax"});
  const TestWeight q4(DType::Q4_K, 2, 256, 81);
  WeightRef partial = q4.device();
  partial.cols = 128;
  expect_contains(error_of([&] { tf::simt::quant_weight(partial, "linear_forward"); }),
                  {"linear_forward: q4_k rows of 128 elements are not whole blocks of 256"});
  WeightRef f32 = q4.device();
  f32.dtype = DType::F32;
  expect_contains(error_of([&] { tf::simt::quant_weight(f32, "linear_forward"); }),
                  {"linear_forward: f32 is not a quantized dtype"});
}

// ---- the ops' quantized cases ----------------------------------------------------------------------

constexpr double kU = 1.0 / 256;          // bf16 unit roundoff, 2^-8
constexpr double kU32 = 1.0 / (1 << 24);  // f32 unit roundoff

// The error bound of a product whose operands the device rounds to bf16 (x or dy, and the
// dequantized weight, relative u each) with f32 sums over k terms on both sides (the CPU's sgemm,
// and cuBLASLt on a GPU; the simulator's stand-in sums in double), counted twice: per element
// (2u + u^2) sum |a b| + 2 (k + 3) u32 (sum |a b| + |beta c|), the 3 for the beta term's add.
double product_bound(double abs_products, double abs_beta_term, int64_t k) {
  return (2 * kU + kU * kU) * abs_products + 2.0 * double(k + 3) * kU32 * (abs_products + abs_beta_term);
}

std::vector<TestWeight*> op_weights(std::vector<std::unique_ptr<TestWeight>>& keep, int64_t rows,
                                    bool small_scales = false) {
  std::vector<TestWeight*> out;
  for (DType t : kQuantTypes) {
    const int64_t cols = tf::dtype_block_elems(t) == 256 ? 256 : 64;
    keep.push_back(std::make_unique<TestWeight>(t, rows, cols, 90 + uint64_t(t), false, small_scales));
    out.push_back(keep.back().get());
  }
  keep.push_back(std::make_unique<TestWeight>(DType::NF4, rows, 40, 99, true, small_scales));
  out.push_back(keep.back().get());
  return out;
}

// The dequantized-tile path through tiles of 3 rows (7 = 3 + 3 + 1, a partial last tile) and the ops
// themselves (whichever path they take for the weight: both round x and W to bf16 and sum in f32),
// beta 0 and 1, against tf::cpu on the dequantized weight.
TEST(CudaDequantOps, LinearForwardAndBackwardInputMatchTheCpuWithinBf16Rounding) {
  std::vector<std::unique_ptr<TestWeight>> keep;
  const int64_t n = 5, R = 7;
  for (TestWeight* w : op_weights(keep, R)) {
    SCOPED_TRACE(w->what());
    const int64_t C = w->cols;
    const std::vector<float> Wf = reference(*w);
    const std::vector<float> x = tf::test::random_floats(size_t(n * C), 3),
                             dy = tf::test::random_floats(size_t(n * R), 4);
    const std::vector<float> y0 = tf::test::random_floats(size_t(n * R), 5),
                             dx0 = tf::test::random_floats(size_t(n * C), 6);
    tf::test::Guarded<float> dev_x(x, "x"), dev_dy(dy, "dy");
    for (float beta : {0.0f, 1.0f}) {
      for (int64_t tile_rows : {int64_t(3), int64_t(0)}) {
        SCOPED_TRACE("beta " + std::to_string(beta) + (tile_rows ? ", tiles of 3 rows" : ", the op"));
        tf::test::Guarded<float> y(y0, "y"), dx(dx0, "dx");
        if (tile_rows) {
          tf::simt::quant_linear_forward(y.get(), dev_x.get(), w->device(), n, beta, tile_rows);
          tf::simt::quant_linear_backward_input(dx.get(), dev_dy.get(), w->device(), n, beta, tile_rows);
        } else {
          tf::simt::linear_forward(y.get(), dev_x.get(), w->device(), n, beta);
          tf::simt::linear_backward_input(dx.get(), dev_dy.get(), w->device(), n, beta);
        }
        std::vector<float> want_y = y0, want_dx = dx0;
        tf::cpu::linear_forward(want_y.data(), x.data(), w->host(), n, beta);
        tf::cpu::linear_backward_input(want_dx.data(), dy.data(), w->host(), n, beta);
        const std::vector<float> got_y = y.download(), got_dx = dx.download();
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t r = 0; r < R; ++r) {
            double abs = 0;
            for (int64_t c = 0; c < C; ++c)
              abs += std::fabs(double(x[size_t(t * C + c)]) * Wf[size_t(r * C + c)]);
            const size_t i = size_t(t * R + r);
            ASSERT_LE(std::fabs(double(got_y[i]) - want_y[i]), product_bound(abs, std::fabs(beta * y0[i]), C))
                << "y[" << t << ", " << r << "]";
          }
          for (int64_t c = 0; c < C; ++c) {
            double abs = 0;
            for (int64_t r = 0; r < R; ++r)
              abs += std::fabs(double(dy[size_t(t * R + r)]) * Wf[size_t(r * C + c)]);
            const size_t i = size_t(t * C + c);
            ASSERT_LE(std::fabs(double(got_dx[i]) - want_dx[i]),
                      product_bound(abs, std::fabs(beta * dx0[i]), R))
                << "dx[" << t << ", " << c << "]";
          }
        }
        EXPECT_TRUE(y.guards_intact());
        EXPECT_TRUE(dx.guards_intact());
      }
    }
  }
}

TEST(CudaDequantOps, DequantizeWeightTileAndEmbeddingGiveTheCpuBits) {
  std::vector<std::unique_ptr<TestWeight>> keep;
  const std::vector<int32_t> tokens = {3, 0, 6, 3, 5, 1};
  tf::test::Guarded<int32_t> dev_tokens(tokens, "tokens");
  for (TestWeight* w : op_weights(keep, 7)) {
    SCOPED_TRACE(w->what());
    const bool flat = w->dtype == DType::NF4 || w->dtype == DType::INT8;
    // NF4 / INT8 tiles may start and end anywhere; ggml ones on blocks (the last may end the row).
    const int64_t c0 = flat ? 3 : tf::dtype_block_elems(w->dtype), n_cols = flat ? 29 : w->cols - c0;
    const int64_t r0 = 2, n_rows = 4, ld = n_cols + 3;
    std::vector<float> want(size_t(n_rows * ld), -7.5f);
    tf::cpu::dequantize_weight_tile(want.data(), ld, w->host(), r0, n_rows, c0, n_cols);
    tf::test::Guarded<float> got(std::vector<float>(want.size(), -7.5f), "tile");
    tf::simt::dequantize_weight_tile(got.get(), ld, w->device(), r0, n_rows, c0, n_cols);
    EXPECT_EQ(bits_of(got.download()), bits_of(want));  // the padding columns included
    EXPECT_TRUE(got.guards_intact());

    std::vector<float> want_rows(tokens.size() * size_t(w->cols));
    tf::cpu::embedding_forward(want_rows.data(), tokens.data(), int64_t(tokens.size()), w->host());
    tf::test::Guarded<float> rows(std::vector<float>(want_rows.size(), 0.0f), "embedding rows");
    tf::simt::embedding_forward(rows.get(), dev_tokens.get(), int64_t(tokens.size()), w->device());
    EXPECT_EQ(bits_of(rows.download()), bits_of(want_rows));
    EXPECT_TRUE(rows.guards_intact());
  }
}

// The loss and d_h against a float64 computation on the dequantized weight. Each logit z_v is a
// product with bf16 operands, within eps_v = product_bound(sum_c |h_c W_vc|, 0, dim); the loss of
// a row, lse(z) - z_t, moves by at most 2 max_v eps_v (lse is 1-Lipschitz in the max norm), so the
// sum by that over the counted rows, plus the float64 sums' rounding. The softmax then moves by at
// most a factor e^(2 eps) - 1 of each p_v, and d_h = sum_v g_v W_v is a second bf16 product:
// |error| <= scale ((e^(2 eps) - 1) sum_v (p_v + [v = t]) |W_vc| + product_bound(sum_v |g_v W_vc|)).
TEST(CudaDequantOps, LmHeadCrossEntropyMatchesFloat64WithinBf16Rounding) {
  std::vector<std::unique_ptr<TestWeight>> keep;
  const int64_t vocab = 9, n = 6;
  const std::vector<int32_t> targets = {0, 8, tf::kIgnoreIndex, 2, 5, 8};
  const float scale = 0.25f;
  tf::test::Guarded<int32_t> dev_targets(targets, "targets");
  for (TestWeight* w : op_weights(keep, vocab, true)) {
    SCOPED_TRACE(w->what());
    const int64_t dim = w->cols;
    const std::vector<float> Wf = reference(*w);
    const std::vector<float> h = tf::test::random_floats(size_t(n * dim), 7),
                             dh0 = tf::test::random_floats(size_t(n * dim), 8);
    tf::test::Guarded<float> dev_h(h, "h"), dh(dh0, "d_h");
    int64_t valid = -1;
    const double loss = tf::simt::lm_head_cross_entropy(dh.get(), &valid, dev_h.get(), w->device(),
                                                        dev_targets.get(), n, scale);
    EXPECT_EQ(valid, 5);
    double want_loss = 0, loss_bound = 1e-12;
    std::vector<double> want_dh(dh0.begin(), dh0.end()), dh_bound(dh0.size(), 0.0);
    for (int64_t t = 0; t < n; ++t) {
      if (targets[size_t(t)] == tf::kIgnoreIndex) continue;
      std::vector<double> z(static_cast<size_t>(vocab)), p(static_cast<size_t>(vocab));
      double eps = 0, mx = -INFINITY, sum = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        double dot = 0, abs = 0;
        for (int64_t c = 0; c < dim; ++c) {
          dot += double(h[size_t(t * dim + c)]) * Wf[size_t(v * dim + c)];
          abs += std::fabs(double(h[size_t(t * dim + c)]) * Wf[size_t(v * dim + c)]);
        }
        z[size_t(v)] = dot;
        eps = std::max(eps, product_bound(abs, 0, dim));
        mx = std::max(mx, dot);
      }
      for (int64_t v = 0; v < vocab; ++v) sum += std::exp(z[size_t(v)] - mx);
      const int32_t tt = targets[size_t(t)];
      want_loss += mx + std::log(sum) - z[size_t(tt)];
      loss_bound += 2 * eps;
      for (int64_t v = 0; v < vocab; ++v) p[size_t(v)] = std::exp(z[size_t(v)] - mx) / sum;
      const double soft = std::expm1(2 * eps);
      for (int64_t c = 0; c < dim; ++c) {
        double g_abs = 0, shift = 0, acc = 0;
        for (int64_t v = 0; v < vocab; ++v) {
          const double g = p[size_t(v)] - (v == tt ? 1.0 : 0.0), wv = Wf[size_t(v * dim + c)];
          acc += g * wv;
          g_abs += std::fabs(g * wv);
          shift += (p[size_t(v)] + (v == tt ? 1.0 : 0.0)) * std::fabs(wv);
        }
        want_dh[size_t(t * dim + c)] += scale * acc;
        dh_bound[size_t(t * dim + c)] =
            scale * (soft * shift + product_bound(g_abs, std::fabs(dh0[size_t(t * dim + c)]), vocab));
      }
    }
    EXPECT_LE(std::fabs(loss - want_loss), loss_bound);
    const std::vector<float> got = dh.download();
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_LE(std::fabs(double(got[i]) - want_dh[i]), dh_bound[i] + 2 * kU32 * std::fabs(want_dh[i]))
          << "d_h element " << i;
    EXPECT_TRUE(dh.guards_intact());
  }
}

}  // namespace
