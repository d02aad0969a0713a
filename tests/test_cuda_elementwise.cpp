// Tests: the CUDA backend's elementwise launchers (add_inplace, add_bias, fill, scale_inplace, copy,
// sum_squares, dropout_forward, swiglu, geglu, adamw_update) run on the SIMT simulator (tf::simt) against
// tf::cpu, at sizes around the block size, with NaN guards around every output and NaN / Inf inputs;
// and every launcher of this family and of test_cuda_norm's queueing on rt::current_stream().
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/cpu/ref/adamw.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/ops.h"
#include "kernels/sim/sim.h"
#include "src/core/dtype.h"
#include "tests/cuda_test_util.h"
#include "tests/op_test_util.h"

using namespace tf;
using namespace tf::test;

namespace {

// Unit roundoff of f32 and of double.
constexpr double kU = 1.0 / (1 << 24);
constexpr double kUd = 1.0 / 9007199254740992.0;  // 2^-53

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Around the 128-thread block: empty, one element, part of a block, exactly one, one more, several
// blocks with a tail.
const int64_t kSizes[] = {0, 1, 5, 127, 128, 129, 1031};

// Random values with a NaN, +Inf and -Inf planted where there is room, for the ops that propagate.
std::vector<float> with_specials(std::vector<float> v) {
  if (v.size() > 7) {
    v[3] = kNaN;
    v[5] = kInf;
    v[7] = -kInf;
  }
  return v;
}

// Each op is one correctly rounded f32 operation per element on both sides (IEEE add and multiply
// are the same on the GPU as on the CPU), so the results agree bit for bit, NaNs as NaNs.
TEST(CudaElementwise, AddScaleFillCopyMatchCpuBitForBit) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    const std::vector<float> x = with_specials(random_floats(size_t(n), 1));
    const std::vector<float> y0 = random_floats(size_t(n), 2);
    Guarded<float> dx(x, "x"), dy(y0, "y");
    std::vector<float> want = y0;

    simt::add_inplace(dy.get(), dx.get(), n);
    cpu::add_inplace(want.data(), x.data(), n);
    EXPECT_EQ(first_difference(dy.download(), want), -1);

    simt::scale_inplace(dy.get(), -0.37f, n);
    cpu::scale_inplace(want.data(), -0.37f, n);
    EXPECT_EQ(first_difference(dy.download(), want), -1);

    simt::copy(dy.get(), dx.get(), n);
    EXPECT_EQ(first_difference(dy.download(), x), -1);

    simt::fill(dy.get(), -2.5f, n);
    EXPECT_EQ(first_difference(dy.download(), std::vector<float>(size_t(n), -2.5f)), -1);
    EXPECT_TRUE(dy.guards_intact());
    EXPECT_TRUE(dx.guards_intact());
  }
  EXPECT_NE(error_of([] { simt::copy(nullptr, nullptr, -1); }).find("copy: negative element count -1"),
            std::string::npos);
}

// The bias as stored, widened exactly, then one f32 add: bit for bit, for every float storage type.
TEST(CudaElementwise, AddBiasMatchesCpuForEveryFloatType) {
  for (const auto& [rows, width] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 7}, {1, 1}, {3, 33}, {5, 129}}) {
    SCOPED_TRACE(testing::Message() << rows << " x " << width);
    const std::vector<float> bias = with_specials(random_floats(size_t(width), 3));
    std::vector<uint16_t> b16 = to_bf16(bias), h16(bias.size());
    for (size_t i = 0; i < bias.size(); ++i) h16[i] = f32_to_f16(bias[i]);
    Guarded<float> d32(bias, "bias f32");
    Guarded<uint16_t> dbf(b16, "bias bf16"), dh(h16, "bias f16");
    const std::pair<WeightRef, WeightRef> cases[] = {
        {WeightRef(d32.get(), DType::F32, 1, width), WeightRef(bias.data(), DType::F32, 1, width)},
        {WeightRef(dbf.get(), DType::BF16, width, 1), WeightRef(b16.data(), DType::BF16, width, 1)},
        {WeightRef(dh.get(), DType::F16, 1, width), WeightRef(h16.data(), DType::F16, 1, width)}};
    for (const auto& [device_bias, host_bias] : cases) {
      SCOPED_TRACE(dtype_name(host_bias.dtype));
      const std::vector<float> y0 = random_floats(size_t(rows * width), 4);
      Guarded<float> dy(y0, "y");
      std::vector<float> want = y0;
      simt::add_bias(dy.get(), device_bias, rows, width);
      cpu::add_bias(want.data(), host_bias, rows, width);
      EXPECT_EQ(first_difference(dy.download(), want), -1);
      EXPECT_TRUE(dy.guards_intact());
    }
  }
  Guarded<float> y(std::vector<float>(8), "y"), bias(std::vector<float>(4), "bias");
  EXPECT_NE(error_of([&] {
              simt::add_bias(y.get(), WeightRef(bias.get(), DType::F32, 1, 4), 1, 8);
            }).find("add_bias: bias of 1 x 4 elements for rows of 8"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              simt::add_bias(y.get(), WeightRef(bias.get(), DType::Q8_0, 1, 8), 1, 8);
            }).find("add_bias: bias dtype q8_0 is not a float type (f32, bf16, f16)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              simt::add_bias(y.get(), WeightRef(bias.get(), DType::I32, 1, 8), 1, 8);
            }).find("add_bias: bias dtype i32 is not a float type"),
            std::string::npos);
}

// Every term x^2 is exact in double, so each side only rounds its n - 1 additions of non-negative
// terms: each is within (n - 1) u_d S of the exact sum S, and they are within 2 (n - 1) u_d S of
// each other. The device order is fixed by n alone, so any thread interleaving gives the same bits.
TEST(CudaElementwise, SumSquaresIsCpuWithinRoundingAndTheSameBitsEveryRun) {
  // 20000 elements make 157 first-pass blocks, more than the second pass's 128 threads.
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(129), int64_t(1031), int64_t(20000)}) {
    SCOPED_TRACE(n);
    const std::vector<float> x = random_floats(size_t(n), 5, 3.0f);
    Guarded<float> dx(x, "x");
    const double want = cpu::sum_squares(x.data(), n);
    tf::sim::set_seed(1);
    const double got = simt::sum_squares(dx.get(), n);
    EXPECT_LE(std::abs(got - want), 2.0 * double(std::max<int64_t>(n - 1, 0)) * kUd * want);
    if (n == 1) {
      EXPECT_EQ(got, double(x[0]) * double(x[0]));
    }
    tf::sim::set_seed(99);
    EXPECT_EQ(simt::sum_squares(dx.get(), n), got);
  }
  const std::vector<float> specials = with_specials(random_floats(9, 6));
  Guarded<float> ds(specials, "x");
  EXPECT_TRUE(std::isnan(simt::sum_squares(ds.get(), 9)));
  EXPECT_EQ(simt::sum_squares(ds.get() + 4, 5), std::numeric_limits<double>::infinity());
}

// The device draws the CPU's Philox stream, so masks and kept values (x * (1 / (1 - p)), one
// rounding with the same factor) are the CPU's bit for bit.
TEST(CudaElementwise, DropoutDrawsExactlyTheCpuMasks) {
  for (int64_t n : {int64_t(1), int64_t(6), int64_t(129), int64_t(1031)}) {
    for (float p : {0.0f, 0.1f, 0.5f, 0.9f}) {
      SCOPED_TRACE(testing::Message() << n << " p " << p);
      const std::vector<float> x = with_specials(random_floats(size_t(n), 7));
      Guarded<float> dx(x, "x"), dout(std::vector<float>(size_t(n)), "out");
      std::vector<float> want(static_cast<size_t>(n));
      // Offsets inside a Philox block and past the CPU's groups of 64 elements.
      const uint64_t first = uint64_t(n % 4 == 1 ? 3 : 130);
      simt::dropout_forward(dout.get(), dx.get(), n, p, 0x1234567890abcdefull, 0xfeedull + uint64_t(n),
                            first);
      cpu::dropout_forward(want.data(), x.data(), n, p, 0x1234567890abcdefull, 0xfeedull + uint64_t(n),
                           first);
      const std::vector<float> got = dout.download();
      EXPECT_EQ(first_difference(got, want), -1);
      EXPECT_TRUE(dout.guards_intact());
      if (n == 1031 && p == 0.5f) {
        int64_t dropped = 0;
        for (float v : got) dropped += v == 0.0f;
        EXPECT_GT(dropped, 400);
        EXPECT_LT(dropped, 631);
      }
    }
  }
  Guarded<float> d(std::vector<float>(4), "x");
  EXPECT_NE(error_of([&] {
              simt::dropout_forward(d.get(), d.get(), 4, 1.0f, 1, 2, 0);
            }).find("dropout_forward: p must be in [0, 1), got 1"),
            std::string::npos);
}

// expf is within 2 ulp (4u relative) under nvcc and 1 ulp on the host, so sigmoid(g) is within 6u
// relative on the device and 4u on the host, silu within 7u and 5u. Hence forward g s up is within
// (8 + 6)u of the CPU's. Backward: t = s + silu (1 - s) is within 6u + 14u|g| + u|t| absolute per
// side, d up t then two more roundings, the accumulate one more: both sides together
// 32u |d up| (1 + |g| + |t|) + 2u |result|; d_up += d silu within 14u |d silu| + 2u |result|.
TEST(CudaElementwise, SwigluMatchesCpuWithinTheExpBound) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    const std::vector<float> gate = with_specials(random_floats(size_t(n), 8, 6.0f));
    const std::vector<float> up = random_floats(size_t(n), 9), d_out = random_floats(size_t(n), 10);
    const std::vector<float> dg0 = random_floats(size_t(n), 11), du0 = random_floats(size_t(n), 12);
    Guarded<float> g(gate, "gate"), u(up, "up"), d(d_out, "d_out"), out(std::vector<float>(size_t(n)), "out");
    Guarded<float> dg(dg0, "d_gate"), du(du0, "d_up");
    std::vector<float> want(static_cast<size_t>(n)), want_dg = dg0, want_du = du0;
    simt::swiglu_forward(out.get(), g.get(), u.get(), n);
    cpu::swiglu_forward(want.data(), gate.data(), up.data(), n);
    simt::swiglu_backward(dg.get(), du.get(), d.get(), g.get(), u.get(), n);
    cpu::swiglu_backward(want_dg.data(), want_du.data(), d_out.data(), gate.data(), up.data(), n);
    const std::vector<float> got = out.download(), got_dg = dg.download(), got_du = du.download();
    for (size_t i = 0; i < size_t(n); ++i) {
      SCOPED_TRACE(i);
      if (!std::isfinite(gate[i])) {
        // silu(NaN) is NaN; silu(+Inf) * up is +-Inf and silu(-Inf) is -Inf * 0 = NaN on both sides.
        EXPECT_TRUE(same_value(got[i], want[i]));
        EXPECT_EQ(std::isnan(got_dg[i]), std::isnan(want_dg[i]));
        continue;
      }
      const double s = 1.0 / (1.0 + std::exp(-double(gate[i]))), silu = double(gate[i]) * s;
      const double t = s + silu * (1.0 - s), dup = std::abs(double(d_out[i]) * up[i]);
      EXPECT_LE(std::abs(double(got[i]) - want[i]), 16 * kU * std::abs(want[i]));
      EXPECT_LE(std::abs(double(got_dg[i]) - want_dg[i]),
                32 * kU * dup * (1 + std::abs(gate[i]) + std::abs(t)) + 2 * kU * std::abs(want_dg[i]));
      EXPECT_LE(std::abs(double(got_du[i]) - want_du[i]),
                14 * kU * std::abs(d_out[i] * silu) + 2 * kU * std::abs(want_du[i]));
    }
    EXPECT_TRUE(out.guards_intact());
    EXPECT_TRUE(dg.guards_intact());
    EXPECT_TRUE(du.guards_intact());
  }
}

// tanhf is within 2 ulp (4u relative) under nvcc and on the host. Each side forms the tanh's
// argument within 6u A (A = k (|x| + c |x|^3), the terms' size), so t is within 6u A (1 - t^2) + 4u |t|
// and the two sides' t within E = 12u A (1 - t^2) + 8u |t|. The kernel rounds the CPU's operations in
// its order: the forward x/2 (1 + t) up is within |x/2 up| (E + 2u |1 + t|) + 4u |out|; gelu' =
// (1 + t)/2 + x/2 (1 - t^2) k (1 + 3c x^2) within E/2 + P (2 |t| E + 2u + 14u (1 - t^2)) +
// 2u |1 + t| + 2u |gelu'| (P = |x/2| k (1 + 3c x^2)), d_gate += d up gelu' and d_up += d gelu within
// that times |d up| (and E |d x/2|), four more roundings and the accumulation's. Twice each bound.
TEST(CudaElementwise, GegluMatchesCpuWithinTheTanhBound) {
  const double k = 0.7978845608028654, c = 0.044715;
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    const std::vector<float> gate = with_specials(random_floats(size_t(n), 8, 6.0f));
    const std::vector<float> up = random_floats(size_t(n), 9), d_out = random_floats(size_t(n), 10);
    const std::vector<float> dg0 = random_floats(size_t(n), 11), du0 = random_floats(size_t(n), 12);
    Guarded<float> g(gate, "gate"), u(up, "up"), d(d_out, "d_out"), out(std::vector<float>(size_t(n)), "out");
    Guarded<float> dg(dg0, "d_gate"), du(du0, "d_up");
    std::vector<float> want(static_cast<size_t>(n)), want_dg = dg0, want_du = du0;
    simt::geglu_forward(out.get(), g.get(), u.get(), n);
    cpu::geglu_forward(want.data(), gate.data(), up.data(), n);
    simt::geglu_backward(dg.get(), du.get(), d.get(), g.get(), u.get(), n);
    cpu::geglu_backward(want_dg.data(), want_du.data(), d_out.data(), gate.data(), up.data(), n);
    const std::vector<float> got = out.download(), got_dg = dg.download(), got_du = du.download();
    for (size_t i = 0; i < size_t(n); ++i) {
      SCOPED_TRACE(i);
      if (!std::isfinite(gate[i])) {
        // gelu(NaN) is NaN, gelu(+Inf) is +Inf and gelu(-Inf) is -Inf * 0 = NaN on both sides.
        EXPECT_TRUE(same_value(got[i], want[i]));
        EXPECT_EQ(std::isnan(got_dg[i]), std::isnan(want_dg[i]));
        continue;
      }
      const double x = gate[i], ax = std::abs(x), t = std::tanh(k * (x + c * x * x * x)), s2 = 1 - t * t;
      const double E = 12 * kU * k * (ax + c * ax * ax * ax) * s2 + 8 * kU * std::abs(t);
      const double P = 0.5 * ax * k * (1 + 3 * c * x * x);
      const double dgelu = 0.5 * (1 + t) + 0.5 * x * s2 * k * (1 + 3 * c * x * x);
      const double dup = std::abs(double(d_out[i]) * up[i]), hx = 0.5 * ax;
      const double b_out =
          2 * (hx * std::abs(double(up[i])) * (E + 2 * kU * (1 + t)) + 4 * kU * std::abs(want[i]));
      const double b_dg = 2 * (dup * (E / 2 + P * (2 * std::abs(t) * E + 2 * kU + 14 * kU * s2) +
                                      2 * kU * (1 + t) + 6 * kU * std::abs(dgelu)) +
                               2 * kU * (std::abs(double(dg0[i])) + std::abs(double(want_dg[i]))));
      const double b_du = 2 * (std::abs(double(d_out[i])) * hx * (E + 2 * kU * (1 + t)) +
                               4 * kU * std::abs(d_out[i] * hx * (1 + t)) +
                               2 * kU * (std::abs(double(du0[i])) + std::abs(double(want_du[i]))));
      EXPECT_LE(std::abs(double(got[i]) - want[i]), b_out);
      EXPECT_LE(std::abs(double(got_dg[i]) - want_dg[i]), b_dg);
      EXPECT_LE(std::abs(double(got_du[i]) - want_du[i]), b_du);
    }
    EXPECT_TRUE(out.guards_intact());
    EXPECT_TRUE(dg.guards_intact());
    EXPECT_TRUE(du.guards_intact());
  }
}

// The kernel runs the CPU's operations in its order with the CPU's f32 scalars; the two compilers
// may contract different multiply-adds into FMAs, which removes a rounding here or there. Bounding
// each side against exact arithmetic on the same scalars: v = v b2 + (1 - b2) g^2 (non-negative
// terms) within 3u v; m = lerp within 2u (|g| + |m0|) + u |m|; denom = sqrt(v) / bc + eps within
// 5u relative; param = p decay - lr' m / denom within u |p decay| + u |param| + 7u |update| +
// lr' |dm| / denom. The two sides are within twice each bound of one another.
TEST(CudaElementwise, AdamWMatchesCpuUpToContraction) {
  AdamWParams early;
  early.lr = 1e-3f;
  AdamWParams later = early;
  later.weight_decay = 0.1f;
  later.step = 7;
  for (const AdamWParams& hp : {early, later}) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(testing::Message() << n << " step " << hp.step);
      const std::vector<float> p0 = random_floats(size_t(n), 13),
                               g = with_specials(random_floats(size_t(n), 14));
      const std::vector<float> m0 = random_floats(size_t(n), 15, 0.1f);
      std::vector<float> v0 = random_floats(size_t(n), 16, 0.01f);
      for (float& v : v0) v = std::abs(v);
      Guarded<float> dp(p0, "param"), dg(g, "grad"), dm(m0, "m"), dv(v0, "v");
      std::vector<float> p = p0, m = m0, v = v0;
      simt::adamw_update(dp.get(), dg.get(), dm.get(), dv.get(), n, hp);
      cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, hp);
      const std::vector<float> got_p = dp.download(), got_m = dm.download(), got_v = dv.download();
      const ref::AdamWScalars<double> s(hp);
      for (size_t i = 0; i < size_t(n); ++i) {
        SCOPED_TRACE(i);
        if (!std::isfinite(g[i])) {
          EXPECT_TRUE(std::isnan(got_p[i]) && std::isnan(p[i]));
          continue;
        }
        const double denom = std::sqrt(double(v[i])) / s.bias_correction2_sqrt + s.eps;
        const double update = s.step_size * std::abs(double(m[i])) / denom;
        const double dm_side = 2 * kU * (std::abs(g[i]) + std::abs(m0[i])) + kU * std::abs(m[i]);
        EXPECT_LE(std::abs(double(got_v[i]) - v[i]), 6 * kU * v[i]);
        EXPECT_LE(std::abs(double(got_m[i]) - m[i]), 2 * dm_side);
        EXPECT_LE(std::abs(double(got_p[i]) - p[i]), 2 * kU * (std::abs(p0[i] * s.decay) + std::abs(p[i])) +
                                                         14 * kU * update +
                                                         2 * s.step_size * dm_side / denom);
      }
      EXPECT_TRUE(dp.guards_intact());
      EXPECT_TRUE(dm.guards_intact());
      EXPECT_TRUE(dv.guards_intact());
    }
  }
}

// The simulator orders work by streams and reports a read that nothing orders after the write it
// reads. Inputs uploaded on a fresh current stream are therefore readable only by launchers that
// queue on that stream (and downloads that wait for it); one that used the default stream instead
// fails here.
TEST(CudaLaunchers, QueueOnTheCurrentStream) {
  const simt::rt::StreamHandle stream = simt::rt::stream_create();
  simt::rt::set_current_stream(stream);
  const int64_t n = 40, rows = 5, dim = 8;
  {
    const std::vector<float> a = random_floats(size_t(n), 51), b = random_floats(size_t(n), 52);
    std::vector<float> pos_v = random_floats(size_t(n), 53, 0.5f);
    for (float& v : pos_v) v = std::abs(v);
    Guarded<float> x(a, "x"), y(b, "y"), z(b, "z"), w(std::vector<float>(size_t(dim), 1.0f), "weight");
    Guarded<float> m(a, "m"), v(pos_v, "v"), r(std::vector<float>(size_t(rows)), "rstd");
    Guarded<int32_t> tok(std::vector<int32_t>{0, 3, 4, 1, 0}, "tokens"),
        pos(std::vector<int32_t>(size_t(rows), 2), "pos");
    const WeightRef wt(w.get(), DType::F32, 1, dim), table(x.get(), DType::F32, 5, dim);
    simt::add_inplace(y.get(), x.get(), n);
    simt::add_bias(y.get(), wt, rows, dim);
    simt::scale_inplace(y.get(), 0.5f, n);
    simt::copy(z.get(), y.get(), n);
    simt::fill(z.get(), 1.0f, n);
    EXPECT_GT(simt::sum_squares(y.get(), n), 0.0);
    simt::dropout_forward(z.get(), y.get(), n, 0.25f, 1, 2, 0);
    simt::swiglu_forward(z.get(), x.get(), y.get(), n);
    simt::swiglu_backward(z.get(), m.get(), y.get(), x.get(), y.get(), n);
    simt::geglu_forward(z.get(), x.get(), y.get(), n);
    simt::geglu_backward(z.get(), m.get(), y.get(), x.get(), y.get(), n);
    AdamWParams hp;
    simt::adamw_update(x.get(), y.get(), m.get(), v.get(), n, hp);
    simt::rmsnorm_forward(z.get(), r.get(), x.get(), wt, rows, dim, 1e-5f);
    simt::rmsnorm_backward(z.get(), w.get(), y.get(), x.get(), wt, r.get(), rows, dim);
    simt::rope_forward(z.get(), pos.get(), w.get(), rows, 1, dim, RopeLayout::SplitHalf);
    simt::rope_backward(z.get(), pos.get(), w.get(), rows, 1, dim, RopeLayout::Interleaved);
    simt::embedding_forward(y.get(), tok.get(), rows, table);
    simt::embedding_backward(z.get(), y.get(), tok.get(), rows, 5, dim);
    EXPECT_EQ(z.download().size(), size_t(n));
  }
  simt::rt::set_current_stream(nullptr);
  simt::rt::stream_destroy(stream);
}

}  // namespace
