// defines: the NF4, dynamic-map 8-bit and int8 quantize / dequantize references of
//          kernels/cpu/ref/quantize.h
#include "kernels/cpu/ref/quantize.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "src/core/error.h"

namespace tf::ref {
namespace {

// create_dynamic_map's float32 values as bitsandbytes 0.50 computes them (torch.linspace and
// float32 products, whose last bits a formula in double does not always reproduce), dumped by
// tools/make_nf4_fixture.py; the fixture test checks them against bitsandbytes' own map.
constexpr float kDynamicMap[256] = {
    -0x1.fc6666p-1f,  -0x1.f53334p-1f,  -0x1.eep-1f,      -0x1.e6ccccp-1f,
    -0x1.df999ap-1f,  -0x1.d86666p-1f,  -0x1.d13334p-1f,  -0x1.cap-1f,
    -0x1.c2ccccp-1f,  -0x1.bb999ap-1f,  -0x1.b46666p-1f,  -0x1.ad3334p-1f,
    -0x1.a6p-1f,      -0x1.9eccccp-1f,  -0x1.97999ap-1f,  -0x1.906666p-1f,
    -0x1.893334p-1f,  -0x1.82p-1f,      -0x1.7accccp-1f,  -0x1.73999ap-1f,
    -0x1.6c6668p-1f,  -0x1.653334p-1f,  -0x1.5ep-1f,      -0x1.56ccccp-1f,
    -0x1.4f999ap-1f,  -0x1.486668p-1f,  -0x1.413334p-1f,  -0x1.3ap-1f,
    -0x1.32ccccp-1f,  -0x1.2b999ap-1f,  -0x1.246668p-1f,  -0x1.1d3334p-1f,
    -0x1.16p-1f,      -0x1.0eccccp-1f,  -0x1.079998p-1f,  -0x1.006666p-1f,
    -0x1.f26664p-2f,  -0x1.e4p-2f,      -0x1.d59998p-2f,  -0x1.c73334p-2f,
    -0x1.b8ccccp-2f,  -0x1.aa6666p-2f,  -0x1.9cp-2f,      -0x1.8d9998p-2f,
    -0x1.7f3334p-2f,  -0x1.70ccccp-2f,  -0x1.626666p-2f,  -0x1.54p-2f,
    -0x1.459998p-2f,  -0x1.373334p-2f,  -0x1.28ccccp-2f,  -0x1.1a6668p-2f,
    -0x1.0cp-2f,      -0x1.fb3332p-3f,  -0x1.de6666p-3f,  -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f,  -0x1.88p-3f,      -0x1.6b3334p-3f,  -0x1.4e6666p-3f,
    -0x1.31999ap-3f,  -0x1.14ccccp-3f,  -0x1.fp-4f,       -0x1.b66668p-4f,
    -0x1.93d70ap-4f,  -0x1.8851eep-4f,  -0x1.7ccccep-4f,  -0x1.7147aep-4f,
    -0x1.65c29p-4f,   -0x1.5a3d7p-4f,   -0x1.4eb854p-4f,  -0x1.433334p-4f,
    -0x1.37ae14p-4f,  -0x1.2c28f6p-4f,  -0x1.20a3d6p-4f,  -0x1.151ebap-4f,
    -0x1.09999ap-4f,  -0x1.fc28f6p-5f,  -0x1.e51ebap-5f,  -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f,  -0x1.ap-5f,       -0x1.88f5c2p-5f,  -0x1.71eb86p-5f,
    -0x1.5ae146p-5f,  -0x1.43d70ap-5f,  -0x1.2ccccep-5f,  -0x1.15c29p-5f,
    -0x1.fd70a4p-6f,  -0x1.cf5c2ap-6f,  -0x1.a147aep-6f,  -0x1.733334p-6f,
    -0x1.451ebap-6f,  -0x1.170a3ep-6f,  -0x1.d1eb86p-7f,  -0x1.75c29p-7f,
    -0x1.3e76c8p-7f,  -0x1.2c083p-7f,   -0x1.19999ap-7f,  -0x1.072b02p-7f,
    -0x1.e978d4p-8f,  -0x1.c49ba6p-8f,  -0x1.9fbe76p-8f,  -0x1.7ae148p-8f,
    -0x1.56041ap-8f,  -0x1.3126e8p-8f,  -0x1.0c49bap-8f,  -0x1.ced914p-9f,
    -0x1.851eb8p-9f,  -0x1.3b645ap-9f,  -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f,   -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0.0f,
    0x1.27476ep-21f,  0x1.b43528p-19f,  0x1.040bfep-17f,  0x1.64840cp-16f,
    0x1.6f0068p-15f,  0x1.15df66p-14f,  0x1.743e96p-14f,  0x1.47ae16p-13f,
    0x1.19ce0ap-12f,  0x1.8fc506p-12f,  0x1.02de02p-11f,  0x1.3dd982p-11f,
    0x1.78d5p-11f,    0x1.b3d07cp-11f,  0x1.eecbfep-11f,  0x1.4fdf3ap-10f,
    0x1.e353f8p-10f,  0x1.3b645ap-9f,   0x1.851eb8p-9f,   0x1.ced914p-9f,
    0x1.0c49bap-8f,   0x1.3126e8p-8f,   0x1.56041ap-8f,   0x1.7ae148p-8f,
    0x1.9fbe76p-8f,   0x1.c49ba6p-8f,   0x1.e978d4p-8f,   0x1.072b02p-7f,
    0x1.19999ap-7f,   0x1.2c083p-7f,    0x1.3e76c8p-7f,   0x1.75c29p-7f,
    0x1.d1eb86p-7f,   0x1.170a3ep-6f,   0x1.451ebap-6f,   0x1.733334p-6f,
    0x1.a147aep-6f,   0x1.cf5c2ap-6f,   0x1.fd70a4p-6f,   0x1.15c29p-5f,
    0x1.2ccccep-5f,   0x1.43d70ap-5f,   0x1.5ae146p-5f,   0x1.71eb86p-5f,
    0x1.88f5c2p-5f,   0x1.ap-5f,        0x1.b70a3ep-5f,   0x1.ce147ap-5f,
    0x1.e51ebap-5f,   0x1.fc28f6p-5f,   0x1.09999ap-4f,   0x1.151ebap-4f,
    0x1.20a3d6p-4f,   0x1.2c28f6p-4f,   0x1.37ae14p-4f,   0x1.433334p-4f,
    0x1.4eb854p-4f,   0x1.5a3d7p-4f,    0x1.65c29p-4f,    0x1.7147aep-4f,
    0x1.7ccccep-4f,   0x1.8851eep-4f,   0x1.93d70ap-4f,   0x1.b66668p-4f,
    0x1.fp-4f,        0x1.14ccccp-3f,   0x1.31999ap-3f,   0x1.4e6666p-3f,
    0x1.6b3334p-3f,   0x1.88p-3f,       0x1.a4ccccp-3f,   0x1.c1999ap-3f,
    0x1.de6666p-3f,   0x1.fb3332p-3f,   0x1.0cp-2f,       0x1.1a6668p-2f,
    0x1.28ccccp-2f,   0x1.373334p-2f,   0x1.459998p-2f,   0x1.54p-2f,
    0x1.626666p-2f,   0x1.70ccccp-2f,   0x1.7f3334p-2f,   0x1.8d9998p-2f,
    0x1.9cp-2f,       0x1.aa6666p-2f,   0x1.b8ccccp-2f,   0x1.c73334p-2f,
    0x1.d59998p-2f,   0x1.e4p-2f,       0x1.f26664p-2f,   0x1.006666p-1f,
    0x1.079998p-1f,   0x1.0eccccp-1f,   0x1.16p-1f,       0x1.1d3334p-1f,
    0x1.246668p-1f,   0x1.2b999ap-1f,   0x1.32ccccp-1f,   0x1.3ap-1f,
    0x1.413334p-1f,   0x1.486668p-1f,   0x1.4f999ap-1f,   0x1.56ccccp-1f,
    0x1.5ep-1f,       0x1.653334p-1f,   0x1.6c6668p-1f,   0x1.73999ap-1f,
    0x1.7accccp-1f,   0x1.82p-1f,       0x1.893334p-1f,   0x1.906666p-1f,
    0x1.97999ap-1f,   0x1.9eccccp-1f,   0x1.a6p-1f,       0x1.ad3334p-1f,
    0x1.b46666p-1f,   0x1.bb999ap-1f,   0x1.c2ccccp-1f,   0x1.cap-1f,
    0x1.d13334p-1f,   0x1.d86666p-1f,   0x1.df999ap-1f,   0x1.e6ccccp-1f,
    0x1.eep-1f,       0x1.f53334p-1f,   0x1.fc6666p-1f,   0x1p+0f,
};

// Midpoints between neighbouring values of a sorted codebook, rounded to f32 as bitsandbytes'
// (code[:-1] + code[1:]) / 2 rounds them.
template <size_t N>
constexpr std::array<float, N - 1> midpoints(const float (&code)[N]) {
  std::array<float, N - 1> m{};
  for (size_t k = 0; k + 1 < N; ++k) m[k] = (code[k] + code[k + 1]) / 2.0f;
  return m;
}
constexpr std::array<float, 15> kNf4Mid = midpoints(kNf4Code);
constexpr std::array<float, 255> kDynamicMid = midpoints(kDynamicMap);

// bitsandbytes keeps the absmax it stores unclamped but divides by at least 1e-38, so a block
// of zeros scales to zeros instead of NaN.
constexpr float kMinDivisor = 1e-38f;

float block_absmax(const float* x, int64_t begin, int64_t end, const char* what) {
  float am = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    TF_CHECK(std::isfinite(x[i]), what, ": element ", i, " is not finite (", x[i], ")");
    am = std::max(am, std::fabs(x[i]));
  }
  return am;
}

// Quantizes x block by block to the codebook whose midpoints are `mid`, as bitsandbytes' torch
// backend does for NF4 and for the dynamic map: absmax[b] = max |x| over block b, then
// s = clamp(x / absmax, -1, 1) and code = the number of midpoints below s (torch.bucketize), so a
// value on a midpoint takes the lower code. store(i, code) receives each element's code.
template <size_t M, typename Store>
void quantize_blocks(const char* what, const float* x, int64_t n, int64_t block,
                     const std::array<float, M>& mid, float* absmax, Store store) {
  TF_CHECK(n >= 0 && block > 0, what, ": bad length ", n, " or block ", block);
  for (int64_t b = 0; b < quant_blocks(n, block); ++b) {
    const int64_t begin = b * block, end = std::min(n, begin + block);
    const float am = block_absmax(x, begin, end, what);
    absmax[b] = am;
    const float div = std::max(am, kMinDivisor);
    // bitsandbytes multiplies a full block by the reciprocal but divides a partial last block;
    // the two can differ in the last bit, which can move a value across a midpoint.
    const bool full = end - begin == block;
    const float recip = 1.0f / div;
    for (int64_t i = begin; i < end; ++i) {
      const float s = std::clamp(full ? x[i] * recip : x[i] / div, -1.0f, 1.0f);
      store(i, uint8_t(std::lower_bound(mid.begin(), mid.end(), s) - mid.begin()));
    }
  }
}

}  // namespace

const float* dynamic_map() {
  return kDynamicMap;
}

void quantize_nf4(const float* x, int64_t n, uint8_t* codes, float* absmax) {
  std::fill(codes, codes + nf4_packed_bytes(std::max<int64_t>(n, 0)), uint8_t(7 << 4 | 7));
  quantize_blocks("quantize_nf4", x, n, kNf4Block, kNf4Mid, absmax, [&](int64_t i, uint8_t k) {
    uint8_t& byte = codes[i / 2];
    byte = i % 2 == 0 ? uint8_t((byte & 0x0F) | k << 4) : uint8_t((byte & 0xF0) | k);
  });
}

void dequantize_nf4(const uint8_t* codes, const float* absmax, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = codes[i / 2];
    const int k = i % 2 == 0 ? byte >> 4 : byte & 0x0F;
    y[i] = kNf4Code[k] * absmax[i / kNf4Block];
  }
}

void quantize_dynamic8(const float* x, int64_t n, int64_t block, uint8_t* codes, float* absmax) {
  quantize_blocks("quantize_dynamic8", x, n, block, kDynamicMid, absmax,
                  [&](int64_t i, uint8_t k) { codes[i] = k; });
}

void dequantize_dynamic8(const uint8_t* codes, const float* absmax, int64_t n, int64_t block, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = kDynamicMap[codes[i]] * absmax[i / block];
}

float double_quantize_absmax(const float* absmax, int64_t blocks, uint8_t* codes, float* nested) {
  TF_CHECK(blocks >= 1, "double_quantize_absmax: needs at least one absmax, got ", blocks);
  double sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) sum += absmax[b];
  const float offset = float(sum) / float(blocks);
  std::vector<float> centred(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) centred[size_t(b)] = absmax[b] - offset;
  quantize_dynamic8(centred.data(), blocks, kNf4NestedBlock, codes, nested);
  return offset;
}

void dequantize_double_absmax(const uint8_t* codes, const float* nested, float offset, int64_t blocks,
                              float* absmax) {
  dequantize_dynamic8(codes, nested, blocks, kNf4NestedBlock, absmax);
  // A separate statement from the product, so that no compiler fuses the two into one FMA with a
  // different rounding from bitsandbytes' two operations.
  for (int64_t b = 0; b < blocks; ++b) absmax[b] += offset;
}

void quantize_int8(const float* x, int64_t n, int8_t* codes, float* absmax) {
  TF_CHECK(n >= 0, "quantize_int8: negative length ", n);
  for (int64_t b = 0; b < quant_blocks(n, kInt8Block); ++b) {
    const int64_t begin = b * kInt8Block, end = std::min(n, begin + kInt8Block);
    const float am = block_absmax(x, begin, end, "quantize_int8");
    absmax[b] = am;
    const float scale = am > 0.0f ? 127.0f / am : 0.0f;
    for (int64_t i = begin; i < end; ++i) codes[i] = int8_t(std::nearbyint(x[i] * scale));
  }
}

void dequantize_int8(const int8_t* codes, const float* absmax, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = float(codes[i]) * (absmax[i / kInt8Block] / 127.0f);
}

double bits_per_param(QuantFormat format) {
  switch (format) {
    case QuantFormat::Nf4: return 4.0 + 32.0 / kNf4Block;
    case QuantFormat::Nf4DoubleQuant:
      return 4.0 + 8.0 / kNf4Block + 32.0 / (double(kNf4Block) * kNf4NestedBlock);
    case QuantFormat::Int8: return 8.0 + 32.0 / kInt8Block;
  }
  TF_FAIL("bits_per_param: unknown format ", int(format));
}

}  // namespace tf::ref
