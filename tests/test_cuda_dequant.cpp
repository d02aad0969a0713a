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

// Byte offsets of the f16 scales inside one block of a ggml type.
std::vector<size_t> f16_fields(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q5_0:
    case DType::Q8_0: return {0};
    case DType::Q4_1:
    case DType::Q5_1:
    case DType::Q4_K:
    case DType::Q5_K: return {0, 2};
    case DType::Q2_K: return {offsetof(tf::BlockQ2_K, d), offsetof(tf::BlockQ2_K, dmin)};
    case DType::Q3_K: return {offsetof(tf::BlockQ3_K, d)};
    case DType::Q6_K: return {offsetof(tf::BlockQ6_K, d)};
    default: return {};
  }
}

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

  TestWeight(DType t, int64_t r, int64_t c, uint64_t seed, bool double_quant = false)
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

}  // namespace
