// defines: tests of the device features kernels/cuda/port.h offers, each run as a small kernel on
// the SIMT simulator against a host computation: bf16 / half conversions, vector loads, bit and
// fast-math intrinsics, __constant__ tables, warp reductions, counting barriers, atomics, dynamic
// shared memory above 48 KB and the mma.sync shapes; where a feature can be misused, a kernel with
// the misuse planted must end its launch with a tf::Error that names it.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/port.h"
#include "kernels/sim/fragments.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"
#include "tests/sim_test_util.h"

using tf::sim::DeviceBuffer;
namespace port = tf::port;

namespace {

using tf::test::expect_bijection;

using tf::test::expect_contains;
using tf::test::launch_error;

// Unit roundoff of f32.
constexpr double kU32 = 1.0 / (1 << 24);

std::vector<uint32_t> random_words(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<uint32_t> v(n);
  for (uint32_t& w : v) w = uint32_t(gen());
  return v;
}

int grid_for(size_t n, int block) {
  return int((n + size_t(block) - 1) / size_t(block));
}

// ---- bf16 / half conversions ------------------------------------------------------------------------

__global__ void to_16bit(port::gptr<const float> x, int n, port::gptr<port::bf16> bf,
                         port::gptr<port::half> hf) {
  for (int i = int(blockIdx.x * blockDim.x + threadIdx.x); i < n; i += int(gridDim.x * blockDim.x)) {
    const float v = x[i];
    bf[i] = __float2bfloat16_rn(v);
    hf[i] = __float2half_rn(v);
  }
}

__global__ void from_16bit(port::gptr<const uint16_t> bits, int n, port::gptr<float> from_bf,
                           port::gptr<float> from_hf) {
  for (int i = int(blockIdx.x * blockDim.x + threadIdx.x); i < n; i += int(gridDim.x * blockDim.x)) {
    const uint16_t b = bits[i];
    from_bf[i] = __bfloat162float(__ushort_as_bfloat16(b));
    from_hf[i] = __half2float(__ushort_as_half(b));
  }
}

// Pairs through both packed spellings (odd pairs through the float2 form), and back.
__global__ void pairs_16bit(port::gptr<const float2> x, int n, port::gptr<port::bf16x2> bf,
                            port::gptr<port::half2> hf, port::gptr<float2> bf_back,
                            port::gptr<float2> hf_back) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const float2 v = x[i];
  const port::bf16x2 b = i % 2 ? __float22bfloat162_rn(v) : __floats2bfloat162_rn(v.x, v.y);
  const port::half2 h = i % 2 ? __float22half2_rn(v) : __floats2half2_rn(v.x, v.y);
  bf[i] = b;
  hf[i] = h;
  bf_back[i] = __bfloat1622float2(b);
  hf_back[i] = __half22float2(h);
}

// Special values and the rounding cases of both formats, then random bit patterns (every class of
// f32: NaNs, infinities, subnormals, huge) and random values scaled into the f16 subnormal range.
std::vector<float> conversion_inputs() {
  const uint32_t specials[] = {
      0x00000000, 0x80000000, 0x7f800000, 0xff800000,                          // zeros, infinities
      0x7fc00000, 0xffc00000, 0x7f800001, 0x7fbfffff, 0xffffffff, 0x7fc12345,  // NaNs (signalling too)
      0x00000001, 0x007fffff, 0x00800000, 0x7f7fffff, 0xff7fffff,  // f32 subnormals, min normal, max
      0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff,  // bf16 ties to even (down, up), around a tie
      0x7f7f8000, 0x7f7f7fff, 0x00008000, 0x00018000,  // bf16 tie to infinity, subnormal ties
      0x477fe000, 0x477fefff, 0x477ff000, 0xc77ff000,  // f16 max 65504, just below and at its overflow tie
      0x33800000, 0x33000000, 0x33000001, 0x33c00000,  // f16 min subnormal, tie to 0, above, 3 * 2^-25
      0x38800000, 0x387fc000, 0x3f801000, 0x3f803000,  // f16 min normal, tie into it, 1.0 ties
  };
  std::vector<float> v;
  for (uint32_t s : specials) v.push_back(std::bit_cast<float>(s));
  for (uint32_t w : random_words(6000, 7)) v.push_back(std::bit_cast<float>(w));
  for (float f : tf::test::random_floats(2000, 8)) v.push_back(f);
  for (float f : tf::test::random_floats(2000, 9)) v.push_back(std::ldexp(f, -14));
  return v;
}

TEST(SimFeatures, Bf16AndHalfConversionsMatchDtypeBitForBit) {
  const auto x = conversion_inputs();
  const int n = int(x.size());
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer bf(x.size() * 2, "bf", 2), hf(x.size() * 2, "hf", 2);
  tf::sim::launch("to_16bit", to_16bit, 8, 256, 0, dx.as<float>(), n, bf.as<port::bf16>(),
                  hf.as<port::half>());
  const auto got_bf = bf.to_vector<uint16_t>(), got_hf = hf.to_vector<uint16_t>();
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const uint32_t xb = std::bit_cast<uint32_t>(x[i]);
    if (got_bf[i] != tf::f32_to_bf16(x[i]) && bad++ < 5)
      ADD_FAILURE() << std::hex << "bf16 of 0x" << xb << ": 0x" << got_bf[i] << ", dtype.h 0x"
                    << tf::f32_to_bf16(x[i]);
    if (got_hf[i] != tf::f32_to_f16(x[i]) && bad++ < 5)
      ADD_FAILURE() << std::hex << "f16 of 0x" << xb << ": 0x" << got_hf[i] << ", dtype.h 0x"
                    << tf::f32_to_f16(x[i]);
  }
  EXPECT_EQ(bad, 0);

  // Every 16-bit pattern back to f32, compared as bits so that NaN payloads count.
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  auto dall = DeviceBuffer::from(all, "bits");
  DeviceBuffer from_bf(all.size() * 4, "from_bf", 4), from_hf(all.size() * 4, "from_hf", 4);
  tf::sim::launch("from_16bit", from_16bit, 8, 256, 0, dall.as<uint16_t>(), int(all.size()),
                  from_bf.as<float>(), from_hf.as<float>());
  const auto back_bf = from_bf.to_vector<uint32_t>(), back_hf = from_hf.to_vector<uint32_t>();
  for (size_t i = 0; i < all.size(); ++i) {
    ASSERT_EQ(back_bf[i], std::bit_cast<uint32_t>(tf::bf16_to_f32(all[i]))) << "bf16 0x" << std::hex << i;
    ASSERT_EQ(back_hf[i], std::bit_cast<uint32_t>(tf::f16_to_f32(all[i]))) << "f16 0x" << std::hex << i;
  }
}

TEST(SimFeatures, PackedPairsKeepXInTheLowHalf) {
  const auto x = conversion_inputs();
  const int pairs = int(x.size() / 2);
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer bf(size_t(pairs) * 4, "bf", 4), hf(size_t(pairs) * 4, "hf", 4);
  DeviceBuffer bf_back(size_t(pairs) * 8, "bf_back", 8), hf_back(size_t(pairs) * 8, "hf_back", 8);
  tf::sim::launch("pairs_16bit", pairs_16bit, grid_for(size_t(pairs), 256), 256, 0, dx.as<float2>(), pairs,
                  bf.as<port::bf16x2>(), hf.as<port::half2>(), bf_back.as<float2>(), hf_back.as<float2>());
  const auto got_bf = bf.to_vector<uint32_t>(), got_hf = hf.to_vector<uint32_t>();
  const auto back_bf = bf_back.to_vector<uint32_t>(), back_hf = hf_back.to_vector<uint32_t>();
  for (size_t i = 0; i < size_t(pairs); ++i) {
    const float lo = x[2 * i], hi = x[2 * i + 1];
    ASSERT_EQ(got_bf[i], uint32_t(tf::f32_to_bf16(lo)) | uint32_t(tf::f32_to_bf16(hi)) << 16) << "pair " << i;
    ASSERT_EQ(got_hf[i], uint32_t(tf::f32_to_f16(lo)) | uint32_t(tf::f32_to_f16(hi)) << 16) << "pair " << i;
    ASSERT_EQ(back_bf[2 * i], std::bit_cast<uint32_t>(tf::bf16_to_f32(tf::f32_to_bf16(lo)))) << "pair " << i;
    ASSERT_EQ(back_bf[2 * i + 1], std::bit_cast<uint32_t>(tf::bf16_to_f32(tf::f32_to_bf16(hi))))
        << "pair " << i;
    ASSERT_EQ(back_hf[2 * i], std::bit_cast<uint32_t>(tf::f16_to_f32(tf::f32_to_f16(lo)))) << "pair " << i;
    ASSERT_EQ(back_hf[2 * i + 1], std::bit_cast<uint32_t>(tf::f16_to_f32(tf::f32_to_f16(hi))))
        << "pair " << i;
  }
}

// ---- vector loads and stores --------------------------------------------------------------------------

// y[4i..4i+3] = x[4i..4i+3] reversed, one float4 load (through __ldg) and one store per thread.
__global__ void reverse_quads(port::gptr<const float> x, port::gptr<float> y, int quads) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= quads) return;
  const float4 v = __ldg(port::ptr_cast<const float4>(x) + i);
  port::ptr_cast<float4>(y)[i] = make_float4(v.w, v.z, v.y, v.x);
}

// Eight bf16 values per 16-byte uint4 load, summed in f32; the other vector types round-trip.
__global__ void vector_kinds(port::gptr<const uint16_t> h, port::gptr<float> sums, port::gptr<float2> f2,
                             port::gptr<int2> i2, port::gptr<int4> i4, port::gptr<uint2> u2, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const uint4 w = port::ptr_cast<const uint4>(h)[i];
  const unsigned words[4] = {w.x, w.y, w.z, w.w};
  float s = 0;
  for (unsigned word : words) {
    s += __bfloat162float(__ushort_as_bfloat16(uint16_t(word & 0xffffu)));
    s += __bfloat162float(__ushort_as_bfloat16(uint16_t(word >> 16)));
  }
  sums[i] = s;
  f2[i] = make_float2(float(i), -float(i));
  i2[i] = make_int2(i, -i);
  i4[i] = make_int4(i, 2 * i, 3 * i, 4 * i);
  u2[i] = make_uint2(unsigned(i), ~unsigned(i));
}

TEST(SimFeatures, VectorLoadsAndStoresMoveWholeElements) {
  const int quads = 300;
  const auto x = tf::test::random_floats(size_t(quads) * 4, 3);
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer dy(x.size() * 4, "y", 4);
  tf::sim::launch("reverse_quads", reverse_quads, grid_for(size_t(quads), 128), 128, 0, dx.as<float>(),
                  dy.as<float>(), quads);
  const auto y = dy.to_vector<float>();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(y[i], x[i / 4 * 4 + 3 - i % 4]) << "element " << i;

  const int n = 100;
  const auto h = tf::test::to_bf16(tf::test::random_floats(size_t(n) * 8, 4));
  auto dh = DeviceBuffer::from(h, "h");
  DeviceBuffer sums(size_t(n) * 4, "sums", 4), f2(size_t(n) * 8, "f2", 8), i2(size_t(n) * 8, "i2", 8),
      i4(size_t(n) * 16, "i4", 16), u2(size_t(n) * 8, "u2", 8);
  tf::sim::launch("vector_kinds", vector_kinds, 1, 128, 0, dh.as<uint16_t>(), sums.as<float>(),
                  f2.as<float2>(), i2.as<int2>(), i4.as<int4>(), u2.as<uint2>(), n);
  const auto s = sums.to_vector<float>();
  const auto gf2 = f2.to_vector<float2>();
  const auto gi2 = i2.to_vector<int2>();
  const auto gi4 = i4.to_vector<int4>();
  const auto gu2 = u2.to_vector<uint2>();
  for (int i = 0; i < n; ++i) {
    float want = 0;  // the kernel's own order, so the sums agree exactly
    for (int j = 0; j < 8; ++j) want += tf::bf16_to_f32(h[size_t(i * 8 + j)]);
    EXPECT_EQ(s[size_t(i)], want) << "row " << i;
    EXPECT_TRUE(gf2[size_t(i)].x == float(i) && gf2[size_t(i)].y == -float(i)) << i;
    EXPECT_TRUE(gi2[size_t(i)].x == i && gi2[size_t(i)].y == -i) << i;
    EXPECT_TRUE(gi4[size_t(i)].x == i && gi4[size_t(i)].y == 2 * i && gi4[size_t(i)].z == 3 * i &&
                gi4[size_t(i)].w == 4 * i)
        << i;
    EXPECT_TRUE(gu2[size_t(i)].x == unsigned(i) && gu2[size_t(i)].y == ~unsigned(i)) << i;
  }
}

TEST(SimFeaturesPlantedBug, MisalignedFloat4LoadIsReported) {
  auto dx = DeviceBuffer::from(tf::test::random_floats(64, 5), "x");
  DeviceBuffer dy(64 * 4, "y", 4);
  // One float past the start: the float4 of the kernel's one thread straddles two 16-byte units.
  expect_contains(launch_error([&] {
                    tf::sim::launch("reverse_quads_misaligned", reverse_quads, 1, 1, 0, dx.as<float>() + 1,
                                    dy.as<float>(), 1);
                  }),
                  {"misaligned read of 16 bytes", "kernel 'reverse_quads_misaligned'", "global buffer 'x'",
                   "byte offset 4"});
  expect_contains(launch_error([&] {
                    tf::sim::launch("reverse_quads_misaligned_store", reverse_quads, 1, 1, 0, dx.as<float>(),
                                    dy.as<float>() + 2, 1);
                  }),
                  {"misaligned write of 16 bytes", "global buffer 'y'", "byte offset 8"});
}

// ---- dynamic shared memory above 48 KB, through float4 ---------------------------------------------

// 64 KB of dynamic shared memory as 4096 float4: every thread fills 16 of them, then reads the
// ones its neighbour filled.
__global__ void rotate_dynamic(port::gptr<float> out) {
  TF_DYNAMIC_SHARED(float4, quads);
  const int t = int(threadIdx.x), threads = int(blockDim.x);
  for (int j = 0; j < 16; ++j) {
    const float v = float(t * 16 + j);
    quads[t * 16 + j] = make_float4(v, v + 0.25f, v + 0.5f, v + 0.75f);
  }
  __syncthreads();
  const int src = (t + 1) % threads;
  float s = 0;
  for (int j = 0; j < 16; ++j) {
    const float4 q = quads[src * 16 + j];
    s += q.x + q.y + q.z + q.w;
  }
  out[t] = s;
}

TEST(SimFeatures, DynamicSharedMemoryAbove48KB) {
  DeviceBuffer out(256 * 4, "out", 4);
  tf::sim::launch("rotate_dynamic", rotate_dynamic, 1, 256, 64 * 1024, out.as<float>());
  const auto got = out.to_vector<float>();
  for (int t = 0; t < 256; ++t) {
    float want = 0;
    for (int j = 0; j < 16; ++j) {
      const float v = float((t + 1) % 256 * 16 + j);
      want += v + (v + 0.25f) + (v + 0.5f) + (v + 0.75f);
    }
    ASSERT_EQ(got[size_t(t)], want) << "thread " << t;
  }
}

// ---- bit intrinsics -----------------------------------------------------------------------------------

constexpr int kBitOps = 12;

__global__ void bit_ops(port::gptr<const uint32_t> x, port::gptr<const uint32_t> y,
                        port::gptr<const uint32_t> s, int n, port::gptr<uint32_t> out) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const uint32_t a = x[i], b = y[i], sel = s[i];
  const unsigned long long ab = (unsigned long long)(a) << 32 | b;
  const port::gptr<uint32_t> o = out + i * kBitOps;
  o[0] = uint32_t(__popc(a));
  o[1] = uint32_t(__clz(int(a)));
  o[2] = uint32_t(__ffs(int(a)));
  o[3] = __brev(a);
  o[4] = __byte_perm(a, b, sel);
  o[5] = __byte_perm(a, b, 0x5410);  // the low halves of a and b: the packing of two 16-bit values
  o[6] = uint32_t(__popcll(ab));
  o[7] = uint32_t(__clzll((long long)(ab)));
  o[8] = uint32_t(__ffsll((long long)(ab)));
  o[9] = __float_as_uint(__uint_as_float(a));  // NaN payloads survive
  o[10] = uint32_t(__float_as_int(__int_as_float(int(b))));
  o[11] = __float_as_uint(float(int(a % 2001u) - 1000));
}

// Host references written bit by bit.
uint32_t popcount_ref(uint64_t v) {
  uint32_t c = 0;
  for (; v; v >>= 1) c += uint32_t(v & 1);
  return c;
}
uint32_t clz_ref(uint64_t v, int bits) {
  uint32_t c = 0;
  for (int i = bits - 1; i >= 0 && !((v >> i) & 1); --i) ++c;
  return c;
}
uint32_t ffs_ref(uint64_t v, int bits) {
  for (int i = 0; i < bits; ++i) {
    if ((v >> i) & 1) return uint32_t(i + 1);
  }
  return 0;
}
uint32_t brev_ref(uint32_t v) {
  uint32_t r = 0;
  for (int i = 0; i < 32; ++i) r = r << 1 | ((v >> i) & 1);
  return r;
}
uint32_t byte_perm_ref(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t k = (sel >> (4 * n)) & 7;
    const uint32_t byte = k < 4 ? (a >> (8 * k)) & 0xff : (b >> (8 * (k - 4))) & 0xff;
    r |= byte << (8 * n);
  }
  return r;
}

TEST(SimFeatures, BitIntrinsicsMatchBitByBitReferences) {
  auto xs = random_words(500, 11), ys = random_words(500, 12), ss = random_words(500, 13);
  for (uint32_t edge : {0u, 1u, 0x80000000u, 0xffffffffu, 0x7fc00001u, 0x00010000u}) {
    xs.push_back(edge);
    ys.push_back(edge);
    ss.push_back(0x3210u);
  }
  xs.push_back(0);  // a zero 64-bit word: __clzll 64, __ffsll 0
  ys.push_back(0);
  ss.push_back(0x7777u);
  const int n = int(xs.size());
  auto dx = DeviceBuffer::from(xs, "x"), dy = DeviceBuffer::from(ys, "y"), ds = DeviceBuffer::from(ss, "s");
  DeviceBuffer out(size_t(n) * kBitOps * 4, "out", 4);
  tf::sim::launch("bit_ops", bit_ops, grid_for(size_t(n), 128), 128, 0, dx.as<uint32_t>(), dy.as<uint32_t>(),
                  ds.as<uint32_t>(), n, out.as<uint32_t>());
  const auto got = out.to_vector<uint32_t>();
  for (int i = 0; i < n; ++i) {
    const uint32_t a = xs[size_t(i)], b = ys[size_t(i)];
    const uint64_t ab = uint64_t(a) << 32 | b;
    const uint32_t want[kBitOps] = {popcount_ref(a),
                                    clz_ref(a, 32),
                                    ffs_ref(a, 32),
                                    brev_ref(a),
                                    byte_perm_ref(a, b, ss[size_t(i)]),
                                    (b & 0xffffu) << 16 | (a & 0xffffu),
                                    popcount_ref(ab),
                                    clz_ref(ab, 64),
                                    ffs_ref(ab, 64),
                                    a,
                                    b,
                                    std::bit_cast<uint32_t>(float(int(a % 2001u) - 1000))};
    for (int k = 0; k < kBitOps; ++k) {
      ASSERT_EQ(got[size_t(i * kBitOps + k)], want[k])
          << "op " << k << " of x 0x" << std::hex << a << " y 0x" << b << " s 0x" << ss[size_t(i)];
    }
  }
}

// ---- fast math -----------------------------------------------------------------------------------------

constexpr int kMathOps = 5;

__global__ void fast_math(port::gptr<const float> x, port::gptr<const float> y, int n,
                          port::gptr<float> out) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const float a = x[i], b = y[i];
  out[i * kMathOps + 0] = rsqrtf(a);
  out[i * kMathOps + 1] = __expf(b);
  out[i * kMathOps + 2] = __logf(a);
  out[i * kMathOps + 3] = exp2f(b);
  out[i * kMathOps + 4] = __fdividef(b, a);
}

// Spacing of f32 values at v.
double ulp(double v) {
  return v == 0 ? std::ldexp(1.0, -149) : std::ldexp(1.0, std::max(std::ilogb(float(v)), -126) - 23);
}

TEST(SimFeatures, FastMathIsWithinTheGpusDocumentedBounds) {
  // a in [2^-10, 2^10] for rsqrtf, __logf and the divisor; b in [-10, 10] for the exponentials.
  std::vector<float> a, b;
  for (float u : tf::test::random_floats(1000, 21)) a.push_back(std::exp2(10.0f * u));
  for (float u : tf::test::random_floats(1000, 22)) b.push_back(10.0f * u);
  a.push_back(1.0f);
  b.push_back(0.0f);
  const int n = int(a.size());
  auto da = DeviceBuffer::from(a, "a"), db = DeviceBuffer::from(b, "b");
  DeviceBuffer out(size_t(n) * kMathOps * 4, "out", 4);
  tf::sim::launch("fast_math", fast_math, grid_for(size_t(n), 128), 128, 0, da.as<float>(), db.as<float>(), n,
                  out.as<float>());
  const auto got = out.to_vector<float>();
  for (int i = 0; i < n; ++i) {
    const double x = a[size_t(i)], y = b[size_t(i)];
    const double want[kMathOps] = {1.0 / std::sqrt(x), std::exp(y), std::log(x), std::exp2(y), y / x};
    // The CUDA C Programming Guide's maximum errors of each function on the GPU (see port.h).
    const double bound[kMathOps] = {
        2 * ulp(want[0]),
        (2 + std::floor(std::fabs(1.173 * y))) * ulp(want[1]),
        x >= 0.5 && x <= 2 ? std::ldexp(1.0, -21) / std::pow(2.0, 0.41) : 3 * ulp(want[2]),
        2 * ulp(want[3]),
        2 * ulp(want[4]),
    };
    for (int k = 0; k < kMathOps; ++k) {
      ASSERT_LE(std::fabs(double(got[size_t(i * kMathOps + k)]) - want[k]), bound[k])
          << "function " << k << " at x " << x << ", y " << y;
    }
  }
}

// ---- __constant__ tables --------------------------------------------------------------------------------

TF_CONSTANT(float, kTable, 64);
TF_CONSTANT(int, kNeverUploaded, 8);

__global__ void gather_constant(port::gptr<const int> idx, int n, port::gptr<float> out) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  out[i] = kTable[idx[i]];
}

__global__ void read_never_uploaded(port::gptr<int> out) {
  out[threadIdx.x] = kNeverUploaded[threadIdx.x];
}

TEST(SimFeatures, ConstantTableReadsWhatTheHostUploaded) {
  const auto table = tf::test::random_floats(64, 31);
  port::upload_constant(kTable, table.data(), table.size());
  std::vector<int> idx(200);
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = int((i * 37) % 64);
  auto didx = DeviceBuffer::from(idx, "idx");
  DeviceBuffer out(idx.size() * 4, "out", 4);
  tf::sim::launch("gather_constant", gather_constant, 2, 128, 0, didx.as<int>(), int(idx.size()),
                  out.as<float>());
  const auto got = out.to_vector<float>();
  for (size_t i = 0; i < idx.size(); ++i) ASSERT_EQ(got[i], table[size_t(idx[i])]) << "element " << i;
}

TEST(SimFeaturesPlantedBug, ConstantTableMisuseIsReported) {
  const auto table = tf::test::random_floats(65, 32);
  port::upload_constant(kTable, table.data(), 64);
  // An index one past the table.
  std::vector<int> idx(32, 5);
  idx[17] = 64;
  auto didx = DeviceBuffer::from(idx, "idx");
  DeviceBuffer out(idx.size() * 4, "out", 4);
  expect_contains(launch_error([&] {
                    tf::sim::launch("gather_constant", gather_constant, 1, 32, 0, didx.as<int>(), 32,
                                    out.as<float>());
                  }),
                  {"out-of-bounds read of 4 bytes", "kernel 'gather_constant'", "thread (17,0,0)",
                   "__constant__ table 'kTable'[64]", "past its end"});
  // A table the launcher forgot to upload: zeros on the GPU, an error here.
  expect_contains(launch_error([&] {
                    tf::sim::launch("read_never_uploaded", read_never_uploaded, 1, 8, 0, out.as<int>());
                  }),
                  {"__constant__ table 'kNeverUploaded'", "never filled (port::upload_constant)",
                   "kernel 'read_never_uploaded'"});
  // More than the table holds.
  try {
    port::upload_constant(kTable, table.data(), 65);
    ADD_FAILURE() << "an upload past the table's end was accepted";
  } catch (const tf::Error& e) {
    expect_contains(e.what(), {"upload of 260 bytes into __constant__ table 'kTable' of 256 bytes",
                               "test_sim_features.cpp:"});
  }
}

// ---- warp reductions and __activemask ----------------------------------------------------------------

constexpr int kReduceOuts = 7;

// Every lane of a warp reduces the same values: int and unsigned, the whole warp (the second warp
// of a 48-thread block has 16 lanes), and the lanes l % 3 == 0 alone.
__global__ void warp_reduce(port::gptr<const int> x, port::gptr<int> out) {
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int lanes = int(blockDim.x) - warp * 32 < 32 ? int(blockDim.x) - warp * 32 : 32;
  const unsigned all = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  const int v = x[tid];
  const port::gptr<int> o = out + tid * kReduceOuts;
  o[0] = __reduce_add_sync(all, v);
  o[1] = __reduce_min_sync(all, v);
  o[2] = __reduce_max_sync(all, v);
  o[3] = int(__reduce_add_sync(all, unsigned(v)));
  o[4] = int(__reduce_min_sync(all, unsigned(v)));
  o[5] = int(__reduce_max_sync(all, unsigned(v)));
  o[6] = lane % 3 == 0 ? __reduce_add_sync(all & 0x49249249u, v) : 0;
}

TEST(SimFeatures, WarpReductionsMatchTheHost) {
  const int threads = 48;
  std::vector<int> x(threads);
  std::mt19937 gen(41);
  // Values near INT_MAX / INT_MIN, so that the sums wrap and signed and unsigned orders differ.
  for (int& v : x) v = int(gen() % 2000) - 1000 + (gen() % 2 ? INT_MAX - 2000 : INT_MIN + 2000);
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer out(size_t(threads) * kReduceOuts * 4, "out", 4);
  tf::sim::launch("warp_reduce", warp_reduce, 1, threads, 0, dx.as<int>(), out.as<int>());
  const auto got = out.to_vector<int>();
  for (int tid = 0; tid < threads; ++tid) {
    const int warp = tid / 32, first = warp * 32, last = std::min(threads, first + 32);
    uint32_t sum = 0, sum3 = 0, umin = UINT_MAX, umax = 0;
    int smin = INT_MAX, smax = INT_MIN;
    for (int j = first; j < last; ++j) {
      const int v = x[size_t(j)];
      sum += uint32_t(v);
      if ((j - first) % 3 == 0) sum3 += uint32_t(v);
      smin = std::min(smin, v);
      smax = std::max(smax, v);
      umin = std::min(umin, uint32_t(v));
      umax = std::max(umax, uint32_t(v));
    }
    const int want[kReduceOuts] = {
        int(sum), smin, smax, int(sum), int(umin), int(umax), tid % 32 % 3 == 0 ? int(sum3) : 0};
    for (int k = 0; k < kReduceOuts; ++k)
      ASSERT_EQ(got[size_t(tid * kReduceOuts + k)], want[k]) << tid << "/" << k;
  }
}

// The lanes l < 16 broadcast lane 0's value. The fixed kernel names them with a ballot taken by the
// whole warp; the planted bug takes __activemask() inside the branch for "the lanes in here",
// which the hardware does not promise (it may return any subset holding the caller).
template <bool kActiveMask>
__global__ void broadcast_in_branch(port::gptr<const int> x, port::gptr<int> out) {
  const int lane = int(threadIdx.x);
  const unsigned branch = __ballot_sync(0xffffffffu, lane < 16);
  if (lane < 16) {
    const unsigned mask = kActiveMask ? __activemask() : branch;
    out[lane] = __shfl_sync(mask, int(x[lane]), 0);
  }
}

// Lane 0 adds while the others take the maximum: two reductions under one mask.
__global__ void mixed_reductions(port::gptr<const int> x, port::gptr<int> out) {
  const int lane = int(threadIdx.x);
  if (lane == 0) {
    out[lane] = __reduce_add_sync(0xffffffffu, int(x[lane]));
  } else {
    out[lane] = __reduce_max_sync(0xffffffffu, int(x[lane]));
  }
}

TEST(SimFeaturesPlantedBug, WarpReductionAndActiveMaskMisuseIsReported) {
  std::vector<int> x(32);
  for (int i = 0; i < 32; ++i) x[size_t(i)] = 100 + i;
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer out(32 * 4, "out", 4);
  for (uint64_t seed : {1, 2, 3}) {
    tf::sim::set_seed(seed);
    expect_contains(
        launch_error([&] {
          tf::sim::launch("broadcast_activemask", broadcast_in_branch<true>, 1, 32, 0, dx.as<int>(),
                          out.as<int>());
        }),
        {"__shfl*_sync", "kernel 'broadcast_activemask'", "reads lane 0, which is not in the mask"});
    expect_contains(launch_error([&] {
                      tf::sim::launch("mixed_reductions", mixed_reductions, 1, 32, 0, dx.as<int>(),
                                      out.as<int>());
                    }),
                    {"__reduce_*_sync", "kernel 'mixed_reductions'",
                     "reduces with a different operation or type than the mask's first lane"});
  }
  tf::sim::set_seed(1);
  tf::sim::launch("broadcast_ballot", broadcast_in_branch<false>, 1, 32, 0, dx.as<int>(), out.as<int>());
  const auto got = out.to_vector<int>();
  for (int i = 0; i < 16; ++i) EXPECT_EQ(got[size_t(i)], 100) << "lane " << i;
}

// ---- counting barriers ----------------------------------------------------------------------

// A 2D block, so that the barrier counts threads of every dimension.
__global__ void barrier_votes(port::gptr<const int> x, port::gptr<int> out) {
  const int t = int(threadIdx.x + blockDim.x * threadIdx.y);
  const int v = x[t];
  const port::gptr<int> o = out + t * 5;
  o[0] = __syncthreads_count(v > 0);
  o[1] = __syncthreads_and(v > -1000);
  o[2] = __syncthreads_or(v > 990);
  o[3] = __syncthreads_and(v > 0);
  o[4] = __syncthreads_or(v > 5000);
}

TEST(SimFeatures, CountingBarriersCountTheWholeBlock) {
  const int threads = 16 * 12;
  std::vector<int> x(threads);
  std::mt19937 gen(51);
  for (int& v : x) v = int(gen() % 1999) - 999;  // in [-999, 999]
  x[77] = 995;
  auto dx = DeviceBuffer::from(x, "x");
  DeviceBuffer out(size_t(threads) * 5 * 4, "out", 4);
  tf::sim::launch("barrier_votes", barrier_votes, 1, dim3(16, 12), 0, dx.as<int>(), out.as<int>());
  const auto got = out.to_vector<int>();
  int positive = 0, above = 0;
  for (int v : x) {
    positive += v > 0;
    above += v > 990;
  }
  for (int t = 0; t < threads; ++t) {
    const int want[5] = {positive, 1, above > 0 ? 1 : 0, positive == threads ? 1 : 0, 0};
    for (int k = 0; k < 5; ++k)
      EXPECT_EQ(got[size_t(t * 5 + k)], want[k]) << "thread " << t << " barrier " << k;
  }
}

// Threads 0..63 count at one barrier and the rest wait at another.
__global__ void divergent_count(port::gptr<int> out) {
  const int t = int(threadIdx.x);
  if (t < 64) {
    out[t] = __syncthreads_count(1);
  } else {
    __syncthreads();
    out[t] = 0;
  }
}

TEST(SimFeaturesPlantedBug, CountingBarrierInDivergentCodeIsReported) {
  DeviceBuffer out(128 * 4, "out", 4);
  expect_contains(
      launch_error([&] { tf::sim::launch("divergent_count", divergent_count, 1, 128, 0, out.as<int>()); }),
      {"meet at different __syncthreads", "kernel 'divergent_count'"});
}

// ---- atomics -------------------------------------------------------------------------------------------

// f32 and f64 atomicAdd, and a float maximum built from atomicCAS on the bits of |x| (for
// non-negative floats the bit order is the value order). The CAS loop starts from a guess of 0, so
// every thread but the first retries at least once.
__global__ void atomics(port::gptr<const float> x, int n, port::gptr<float> fsum, port::gptr<double> dsum,
                        port::gptr<unsigned> max_bits) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const float v = x[i];
  atomicAdd(fsum, v);
  atomicAdd(dsum, double(v));
  const float mag = v < 0 ? -v : v;
  unsigned assumed = 0;
  for (;;) {
    const float cur = __uint_as_float(assumed);
    const unsigned old = atomicCAS(max_bits, assumed, __float_as_uint(cur < mag ? mag : cur));
    if (old == assumed) break;
    assumed = old;
  }
}

TEST(SimFeatures, AtomicAddAndCasMatchTheHost) {
  const int n = 1000;
  const auto x = tf::test::random_floats(size_t(n), 61);
  auto dx = DeviceBuffer::from(x, "x");
  auto fsum = DeviceBuffer::from(std::vector<float>{0.0f}, "fsum");
  auto dsum = DeviceBuffer::from(std::vector<double>{0.0}, "dsum");
  auto max_bits = DeviceBuffer::from(std::vector<unsigned>{0u}, "max_bits");
  tf::sim::launch("atomics", atomics, grid_for(size_t(n), 128), 128, 0, dx.as<float>(), n, fsum.as<float>(),
                  dsum.as<double>(), max_bits.as<unsigned>());
  double want = 0, mag = 0;
  float max = 0;
  for (float v : x) {
    want += v;
    mag += std::fabs(v);
    max = std::max(max, std::fabs(v));
  }
  // Any order of n additions: (n - 1) u sum |x| in f32, the same with f64's unit roundoff 2^-53.
  EXPECT_NEAR(fsum.to_vector<float>()[0], want, (n - 1) * kU32 * mag);
  EXPECT_NEAR(dsum.to_vector<double>()[0], want, (n - 1) * std::ldexp(1.0, -53) * mag);
  EXPECT_EQ(std::bit_cast<float>(max_bits.to_vector<unsigned>()[0]), max);
}

// ---- mma.sync shapes ------------------------------------------------------------------------------------

TEST(SimFeatures, NewMmaLayoutsCoverTheirTilesOnce) {
  expect_bijection(16, 8, 4, tf::sim::mma_m16n8k8_a_coord);
  expect_bijection(8, 8, 2, tf::sim::mma_m16n8k8_b_coord);
  expect_bijection(16, 32, 16, tf::sim::mma_m16n8k32_s8_a_coord);
  expect_bijection(32, 8, 8, tf::sim::mma_m16n8k32_s8_b_coord);
  expect_bijection(16, 16, 8, tf::sim::mma_m16n8k16_s8_a_coord);
  expect_bijection(16, 8, 4, tf::sim::mma_m16n8k16_s8_b_coord);
}

TEST(SimFeatures, NewMmaLayoutsMatchThePtxIsaFormulas) {
  auto at = [](tf::sim::FragCoord p) { return std::pair(p.row, p.col); };
  // m16n8k8 .bf16/.f16: lane 5 is groupID 1, threadID_in_group 1; a3 sits at row 1 + 8, column 2 + 1.
  EXPECT_EQ(at(tf::sim::mma_m16n8k8_a_coord(5, 3)), std::pair(9, 3));
  EXPECT_EQ(at(tf::sim::mma_m16n8k8_a_coord(0, 1)), std::pair(0, 1));
  EXPECT_EQ(at(tf::sim::mma_m16n8k8_b_coord(6, 1)), std::pair(5, 1));  // b1: row 2 * 2 + 1, column 1
  // m16n8k32 .s8: lane 7 (group 1, thread 3); a13 is byte 1 of register 3: row 1 + 8, column 12 + 1 + 16.
  EXPECT_EQ(at(tf::sim::mma_m16n8k32_s8_a_coord(7, 13)), std::pair(9, 29));
  EXPECT_EQ(at(tf::sim::mma_m16n8k32_s8_a_coord(7, 9)), std::pair(1, 29));   // register 2: row groupID
  EXPECT_EQ(at(tf::sim::mma_m16n8k32_s8_b_coord(30, 6)), std::pair(26, 7));  // b6: 8 + 2 + 16
  // m16n8k16 .s8: lane 9 (group 2, thread 1); a6 is byte 2 of register 1: row 2 + 8, column 4 + 2.
  EXPECT_EQ(at(tf::sim::mma_m16n8k16_s8_a_coord(9, 6)), std::pair(10, 6));
  EXPECT_EQ(at(tf::sim::mma_m16n8k16_s8_b_coord(3, 2)), std::pair(14, 0));
}

uint32_t pack16(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | uint32_t(hi) << 16;
}
uint32_t pack8(int8_t b0, int8_t b1, int8_t b2, int8_t b3) {
  return uint32_t(uint8_t(b0)) | uint32_t(uint8_t(b1)) << 8 | uint32_t(uint8_t(b2)) << 16 |
         uint32_t(uint8_t(b3)) << 24;
}

// One warp: D = A B + C for A [16,8] and B [8,8] (row-major 16-bit patterns), C and D [16,8] f32.
// The fragments are gathered with the PTX ISA's register-by-register description of m16n8k8:
// A register r holds row groupID + 8r, columns 2 threadID_in_group and the next; B's register holds
// rows 2 threadID_in_group and the next of column groupID.
template <bool kF16>
__global__ void mma_k8_probe(port::gptr<const uint16_t> a, port::gptr<const uint16_t> b,
                             port::gptr<const float> c, port::gptr<float> d) {
  const int lane = int(threadIdx.x), group = lane / 4, in_group = lane % 4;
  uint32_t af[2], bf[1];
  float cf[4], df[4];
  for (int r = 0; r < 2; ++r) {
    const int row = group + 8 * r, col = 2 * in_group;
    af[r] = pack16(a[row * 8 + col], a[row * 8 + col + 1]);
  }
  bf[0] = pack16(b[2 * in_group * 8 + group], b[(2 * in_group + 1) * 8 + group]);
  for (int i = 0; i < 4; ++i) cf[i] = c[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2];
  if constexpr (kF16) {
    port::mma_m16n8k8_f16(df, af, bf, cf);
  } else {
    port::mma_m16n8k8_bf16(df, af, bf, cf);
  }
  for (int i = 0; i < 4; ++i) d[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2] = df[i];
}

template <bool kF16>
void check_mma_k8() {
  const auto af = tf::test::random_floats(16 * 8, 71), bf = tf::test::random_floats(8 * 8, 72),
             cf = tf::test::random_floats(16 * 8, 73);
  std::vector<uint16_t> a(af.size()), b(bf.size());
  for (size_t i = 0; i < a.size(); ++i) a[i] = kF16 ? tf::f32_to_f16(af[i]) : tf::f32_to_bf16(af[i]);
  for (size_t i = 0; i < b.size(); ++i) b[i] = kF16 ? tf::f32_to_f16(bf[i]) : tf::f32_to_bf16(bf[i]);
  auto da = DeviceBuffer::from(a, "a"), db = DeviceBuffer::from(b, "b"), dc = DeviceBuffer::from(cf, "c");
  DeviceBuffer dd(16 * 8 * 4, "d", 4);
  tf::sim::launch("mma_k8_probe", mma_k8_probe<kF16>, 1, 32, 0, da.as<uint16_t>(), db.as<uint16_t>(),
                  dc.as<float>(), dd.as<float>());
  const auto d = dd.to_vector<float>();
  auto val = [&](uint16_t h) { return double(kF16 ? tf::f16_to_f32(h) : tf::bf16_to_f32(h)); };
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      double want = cf[size_t(r * 8 + n)], mag = std::fabs(want);
      for (int k = 0; k < 8; ++k) {
        const double p = val(a[size_t(r * 8 + k)]) * val(b[size_t(k * 8 + n)]);
        want += p;
        mag += std::fabs(p);
      }
      // 8 products (exact in f32) and C summed in f32: at most 9 roundings of partial sums.
      EXPECT_NEAR(d[size_t(r * 8 + n)], want, 9 * kU32 * mag)
          << (kF16 ? "f16" : "bf16") << " D[" << r << "][" << n << "]";
    }
  }
}

TEST(SimFeatures, MmaM16N8K8MatchesTheHostInBf16AndF16) {
  check_mma_k8<false>();
  check_mma_k8<true>();
}

// One warp: D = A B + C with A [16,k] and B [k,8] int8 (row-major), C and D [16,8] int32, k 32 or
// 16. The PTX ISA's registers: for k = 32, A register r holds row groupID + 8 (r % 2), columns
// 16 (r / 2) + 4 threadID_in_group .. + 3, and B register r rows 16 r + 4 threadID_in_group .. + 3
// of column groupID; for k = 16, A register r holds row groupID + 8 r, columns 4 threadID_in_group
// .. + 3, and B's one register rows 4 threadID_in_group .. + 3.
template <int kK>
__global__ void mma_s8_probe(port::gptr<const int8_t> a, port::gptr<const int8_t> b,
                             port::gptr<const int32_t> c, port::gptr<int32_t> d) {
  const int lane = int(threadIdx.x), group = lane / 4, in_group = lane % 4;
  constexpr int kARegs = kK / 8, kBRegs = kK / 16;
  uint32_t af[kARegs], bf[kBRegs];
  int32_t cf[4], df[4];
  for (int r = 0; r < kARegs; ++r) {
    const int row = kK == 32 ? group + 8 * (r % 2) : group + 8 * r;
    const int col = (kK == 32 ? 16 * (r / 2) : 0) + 4 * in_group;
    af[r] = pack8(a[row * kK + col], a[row * kK + col + 1], a[row * kK + col + 2], a[row * kK + col + 3]);
  }
  for (int r = 0; r < kBRegs; ++r) {
    const int k0 = 16 * r + 4 * in_group;
    bf[r] =
        pack8(b[k0 * 8 + group], b[(k0 + 1) * 8 + group], b[(k0 + 2) * 8 + group], b[(k0 + 3) * 8 + group]);
  }
  for (int i = 0; i < 4; ++i) cf[i] = c[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2];
  if constexpr (kK == 32) {
    port::mma_m16n8k32_s8(df, af, bf, cf);
  } else {
    port::mma_m16n8k16_s8(df, af, bf, cf);
  }
  for (int i = 0; i < 4; ++i) d[(group + (i / 2) * 8) * 8 + in_group * 2 + i % 2] = df[i];
}

template <int kK>
void check_mma_s8() {
  std::mt19937 gen(81 + kK);
  std::vector<int8_t> a(16 * kK), b(kK * 8);
  for (int8_t& v : a) v = int8_t(int(gen() % 256) - 128);
  for (int8_t& v : b) v = int8_t(int(gen() % 256) - 128);
  a[0] = b[0] = -128;  // the extreme product (+16384)
  std::vector<int32_t> c(16 * 8);
  for (int32_t& v : c) v = int32_t(gen() % 200001) - 100000;
  c[0] = INT_MAX - 10;  // row 0 sums past INT_MAX: the .s32 result wraps
  auto da = DeviceBuffer::from(a, "a"), db = DeviceBuffer::from(b, "b"), dc = DeviceBuffer::from(c, "c");
  DeviceBuffer dd(16 * 8 * 4, "d", 4);
  tf::sim::launch("mma_s8_probe", mma_s8_probe<kK>, 1, 32, 0, da.as<int8_t>(), db.as<int8_t>(),
                  dc.as<int32_t>(), dd.as<int32_t>());
  const auto d = dd.to_vector<int32_t>();
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      int64_t sum = c[size_t(r * 8 + n)];
      for (int k = 0; k < kK; ++k) sum += int64_t(a[size_t(r * kK + k)]) * b[size_t(k * 8 + n)];
      EXPECT_EQ(uint32_t(d[size_t(r * 8 + n)]), uint32_t(uint64_t(sum)))
          << "k " << kK << " D[" << r << "][" << n << "]";
    }
  }
}

TEST(SimFeatures, MmaInt8MatchesTheHostExactly) {
  check_mma_s8<32>();
  check_mma_s8<16>();
}

// Half the warp issues m16n8k8 and the other half m16n8k16: the lanes disagree on the shape.
__global__ void mixed_mma_shapes(port::gptr<float> out) {
  const int lane = int(threadIdx.x);
  const float c[4] = {0, 0, 0, 0};
  float d[4];
  if (lane < 16) {
    const uint32_t a[2] = {0, 0}, b[1] = {0};
    port::mma_m16n8k8_bf16(d, a, b, c);
  } else {
    const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    port::mma_m16n8k16_bf16(d, a, b, c);
  }
  out[lane] = d[0];
}

TEST(SimFeaturesPlantedBug, MmaShapesMixedInOneWarpAreReported) {
  DeviceBuffer out(32 * 4, "out", 4);
  expect_contains(
      launch_error([&] { tf::sim::launch("mixed_mma_shapes", mixed_mma_shapes, 1, 32, 0, out.as<float>()); }),
      {"mma.sync", "kernel 'mixed_mma_shapes'", "uses a different shape or input type than lane 0"});
}

}  // namespace
