// The simulator's stand-in for cuBLASLt (tf::simt::blas::gemm) against tf::ref::matmul: every
// transpose combination, alpha and beta, padded leading dimensions, strided batches, odd sizes and
// each element type; the argument checks, and the out-of-bounds, freed and unordered operands it
// reports.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "kernels/sim/sim.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/op_test_util.h"
#include "tests/sim_test_util.h"

using tf::sim::DeviceBuffer;
using tf::simt::blas::ElemType;
using tf::simt::blas::Gemm;

namespace {

using tf::test::expect_contains;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

tf::DType dtype_of(ElemType t) {
  return t == ElemType::F32 ? tf::DType::F32 : t == ElemType::BF16 ? tf::DType::BF16 : tf::DType::F16;
}

// n random values in [-1, 1) stored as `t` (raw bytes), and the same values as f32.
struct Stored {
  std::vector<std::byte> bytes;
  std::vector<float> values;
};
Stored make_stored(ElemType t, size_t n, uint64_t seed) {
  Stored s;
  s.values = tf::test::random_floats(n, seed);
  if (t == ElemType::F32) {
    s.bytes.resize(n * 4);
    std::memcpy(s.bytes.data(), s.values.data(), n * 4);
    return s;
  }
  s.bytes.resize(n * 2);
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = t == ElemType::BF16 ? tf::f32_to_bf16(s.values[i]) : tf::f32_to_f16(s.values[i]);
    s.values[i] = t == ElemType::BF16 ? tf::bf16_to_f32(h) : tf::f16_to_f32(h);
    std::memcpy(s.bytes.data() + 2 * i, &h, 2);
  }
  return s;
}

DeviceBuffer upload(const std::vector<std::byte>& bytes, const char* name) {
  DeviceBuffer b(bytes.size(), name);
  std::memcpy(b.data(), bytes.data(), bytes.size());
  return b;
}

struct Case {
  ElemType type;
  bool trans_a, trans_b;
  int64_t m, n, k, batch;
  float alpha, beta;
};

// Runs one case with every leading dimension padded, A and B batches spaced apart (B broadcast
// when batch > 1, stride 0) and C's padding and the bytes after it holding a sentinel, and checks
// every element of every batch against tf::ref::matmul and the sentinels untouched.
//
// Tolerance: the stand-in and the reference both sum the exact double products of the same widened
// values in double and round to f32 once, so they differ by the final rounding of each (2^-24
// relative each, 2^-23 together) plus double's rounding of the sum (k * 2^-53 relative to
// sum |a||b|); 2^-22 * (|alpha| sum |a||b| + |beta c|) covers both with room.
void run_case(const Case& cs) {
  const int64_t a_rows = cs.trans_a ? cs.k : cs.m, a_width = cs.trans_a ? cs.m : cs.k;
  const int64_t b_rows = cs.trans_b ? cs.n : cs.k, b_width = cs.trans_b ? cs.k : cs.n;
  const int64_t lda = a_width + 3, ldb = b_width + 1, ldc = cs.n + 2;
  const int64_t stride_a = a_rows * lda + 5, stride_b = cs.batch > 1 ? 0 : b_rows * ldb;
  const int64_t stride_c = cs.m * ldc + 4;
  const size_t a_elems = size_t((cs.batch - 1) * stride_a + a_rows * lda);
  const size_t b_elems = size_t(b_rows * ldb), c_elems = size_t(cs.batch * stride_c + 8);
  const Stored a = make_stored(cs.type, a_elems, 11), b = make_stored(cs.type, b_elems, 12);
  std::vector<float> c0 = tf::test::random_floats(c_elems, 13);
  constexpr float kSentinel = 1234.5f;
  for (int64_t bi = 0; bi < cs.batch; ++bi) {
    for (int64_t i = 0; i < cs.m; ++i) {
      for (int64_t j = 0; j < ldc; ++j) {
        float& v = c0[size_t(bi * stride_c + i * ldc + j)];
        if (j >= cs.n)
          v = kSentinel;
        else if (cs.beta == 0.0f)
          v = kNaN;  // beta 0 must overwrite, never read
      }
    }
    for (int64_t p = cs.m * ldc; p < stride_c; ++p) c0[size_t(bi * stride_c + p)] = kSentinel;
  }
  for (size_t p = size_t(cs.batch * stride_c); p < c_elems; ++p) c0[p] = kSentinel;

  DeviceBuffer da = upload(a.bytes, "A"), db = upload(b.bytes, "B");
  DeviceBuffer dc = DeviceBuffer::from(c0, "C");
  const size_t elem = cs.type == ElemType::F32 ? 4 : 2;
  Gemm g;
  g.a = da.data();
  g.lda = lda;
  g.trans_a = cs.trans_a;
  g.b = db.data();
  g.ldb = ldb;
  g.trans_b = cs.trans_b;
  g.type = cs.type;
  g.c = dc.as<float>();
  g.ldc = ldc;
  g.m = cs.m;
  g.n = cs.n;
  g.k = cs.k;
  g.alpha = cs.alpha;
  g.beta = cs.beta;
  g.batch = cs.batch;
  g.stride_a = stride_a;
  g.stride_b = stride_b;
  g.stride_c = stride_c;
  tf::simt::blas::gemm(g);
  const std::vector<float> got = dc.to_vector<float>();

  const tf::DType dt = dtype_of(cs.type);
  for (int64_t bi = 0; bi < cs.batch; ++bi) {
    std::vector<float> want(c0.begin() + bi * stride_c, c0.begin() + bi * stride_c + cs.m * ldc);
    const tf::MatOperand A{a.bytes.data() + size_t(bi * stride_a) * elem, dt, lda, cs.trans_a};
    const tf::MatOperand B{b.bytes.data() + size_t(bi * stride_b) * elem, dt, ldb, cs.trans_b};
    tf::ref::matmul(want.data(), ldc, A, B, cs.m, cs.n, cs.k, cs.alpha, cs.beta);
    for (int64_t i = 0; i < cs.m; ++i) {
      for (int64_t j = 0; j < cs.n; ++j) {
        double mag = 0;
        for (int64_t p = 0; p < cs.k; ++p) {
          const float av = a.values[size_t(bi * stride_a + (cs.trans_a ? p * lda + i : i * lda + p))];
          const float bv = b.values[size_t(bi * stride_b + (cs.trans_b ? j * ldb + p : p * ldb + j))];
          mag += std::fabs(double(av) * double(bv));
        }
        const size_t at = size_t(bi * stride_c + i * ldc + j);
        const double bound = std::ldexp(
            std::fabs(double(cs.alpha)) * mag + (cs.beta == 0.0f ? 0.0 : std::fabs(double(cs.beta) * c0[at])),
            -22);
        ASSERT_NEAR(got[at], want[size_t(i * ldc + j)], bound)
            << "batch " << bi << " C[" << i << ", " << j << "] type " << int(cs.type) << " trans "
            << cs.trans_a << cs.trans_b << " beta " << cs.beta;
      }
    }
  }
  for (size_t p = 0; p < c_elems; ++p) {
    const bool inside = p < size_t(cs.batch * stride_c) && int64_t(p % size_t(stride_c)) < cs.m * ldc &&
                        int64_t(p % size_t(stride_c)) % ldc < cs.n;
    if (!inside) {
      ASSERT_EQ(got[p], kSentinel) << "stray write at C element " << p;
    }
  }
}

TEST(SimBlasGemm, EveryTransposeTypeAndBetaAgainstTheReference) {
  for (ElemType t : {ElemType::F32, ElemType::BF16, ElemType::F16}) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        for (float beta : {0.0f, 1.0f, -0.5f}) run_case({t, ta == 1, tb == 1, 7, 5, 13, 1, 0.75f, beta});
      }
    }
  }
}

TEST(SimBlasGemm, StridedBatchesWithABroadcastOperand) {
  for (ElemType t : {ElemType::F32, ElemType::BF16, ElemType::F16}) {
    run_case({t, false, true, 3, 6, 9, 3, 1.0f, 0.0f});
    run_case({t, true, false, 5, 2, 4, 4, -2.0f, 0.25f});
  }
}

TEST(SimBlasGemm, DegenerateShapes) {
  run_case({ElemType::BF16, false, false, 1, 1, 1, 1, 1.0f, 0.0f});
  run_case({ElemType::F16, true, true, 1, 9, 2, 2, 1.0f, 1.0f});
  // k = 0: C = beta * C (zeros over the NaNs for beta 0).
  run_case({ElemType::BF16, false, true, 4, 3, 0, 2, 1.0f, 0.0f});
  run_case({ElemType::F32, false, false, 4, 3, 0, 1, 1.0f, 3.0f});
}

// ---- reported errors --------------------------------------------------------------------------

std::string gemm_error(const Gemm& g) {
  try {
    tf::simt::blas::gemm(g);
  } catch (const tf::Error& e) {
    return e.what();
  }
  return "";
}

// A valid bf16 product C[4, 6] = A[4, 5] B[5, 6] on buffers of exactly the right size.
struct Fixture {
  DeviceBuffer a{4 * 5 * 2, "A"}, b{5 * 6 * 2, "B"}, c{4 * 6 * 4, "C"};
  Gemm g;
  Fixture() {
    std::memset(a.data(), 0, a.bytes());
    std::memset(b.data(), 0, b.bytes());
    g.a = a.data();
    g.lda = 5;
    g.b = b.data();
    g.ldb = 6;
    g.c = c.as<float>();
    g.ldc = 6;
    g.m = 4;
    g.n = 6;
    g.k = 5;
  }
};

TEST(SimBlasGemm, TheFixtureRuns) {
  Fixture f;
  EXPECT_EQ(gemm_error(f.g), "");
  for (float v : f.c.to_vector<float>()) EXPECT_EQ(v, 0.0f);
}

TEST(SimBlasGemm, OperandsPastTheirAllocationAreReported) {
  {
    Fixture f;
    f.g.lda = 6;  // the last row of A now ends three elements past the buffer
    expect_contains(gemm_error(f.g), {"operand A of blas::gemm", "6 bytes past its end", "'A'"});
  }
  {
    Fixture f;
    f.g.trans_b = true;  // B read as [6, 5]: 30 elements, but with ldb 6 the span is 35
    expect_contains(gemm_error(f.g), {"operand B of blas::gemm", "10 bytes past its end", "'B'"});
  }
  {
    Fixture f;
    f.g.ldc = 7;  // C's last row ends at element 27 of 24
    expect_contains(gemm_error(f.g), {"operand C of blas::gemm", "12 bytes past its end", "'C'"});
  }
  {
    Fixture f;
    f.g.batch = 2;
    f.g.stride_a = 0;
    f.g.stride_b = 0;
    f.g.stride_c = 24;  // the second C lies wholly past the buffer
    expect_contains(gemm_error(f.g), {"operand C of blas::gemm", "96 bytes past its end"});
  }
  {
    Fixture f;
    std::vector<uint16_t> host(20);
    f.g.a = host.data();
    expect_contains(gemm_error(f.g), {"operand A of blas::gemm", "is not device memory"});
  }
}

TEST(SimBlasGemm, FreedOperandsAndUnorderedStreamsAreReported) {
  Fixture f;
  void* freed = tf::simt::rt::device_alloc(f.b.bytes(), "freed B");
  tf::simt::rt::device_free(freed);
  Gemm g = f.g;
  g.b = freed;
  expect_contains(gemm_error(g), {"use after free", "operand B of blas::gemm", "'freed B'"});

  // A written by a copy on one stream and read by the product on another, with no event between.
  void* a = tf::simt::rt::device_alloc(f.a.bytes(), "A on the copy stream");
  tf::simt::rt::StreamHandle copy = tf::simt::rt::stream_create(), compute = tf::simt::rt::stream_create();
  const std::vector<uint16_t> zeros(20, 0);
  tf::simt::rt::memcpy_h2d(a, zeros.data(), f.a.bytes(), copy);
  tf::simt::rt::set_current_stream(compute);
  g = f.g;
  g.a = a;
  expect_contains(gemm_error(g), {"stream race", "operand A of blas::gemm", "'A on the copy stream'"});
  tf::simt::rt::EventHandle done = tf::simt::rt::event_create();
  tf::simt::rt::event_record(done, copy);
  tf::simt::rt::stream_wait_event(compute, done);
  EXPECT_EQ(gemm_error(g), "");
  tf::simt::rt::set_current_stream(nullptr);
  tf::simt::rt::event_destroy(done);
  tf::simt::rt::stream_destroy(copy);
  tf::simt::rt::stream_destroy(compute);
  tf::simt::rt::device_free(a);
}

TEST(SimBlasGemm, BadArgumentsAreReported) {
  auto expect_bad = [](auto edit, std::initializer_list<const char*> parts) {
    Fixture f;
    edit(f.g, f);
    expect_contains(gemm_error(f.g), parts);
  };
  expect_bad([](Gemm& g, Fixture&) { g.m = -1; }, {"bad shape m=-1"});
  expect_bad([](Gemm& g, Fixture&) { g.batch = 0; }, {"bad shape", "batch=0"});
  expect_bad([](Gemm& g, Fixture&) { g.type = ElemType(7); }, {"element type 7"});
  expect_bad([](Gemm& g, Fixture&) { g.lda = 4; }, {"A has leading dimension 4", "hold 5 elements"});
  expect_bad([](Gemm& g, Fixture&) { g.ldb = 5; }, {"B has leading dimension 5", "hold 6 elements"});
  expect_bad([](Gemm& g, Fixture&) { g.ldc = 5; }, {"C has leading dimension 5", "hold 6 elements"});
  expect_bad([](Gemm& g, Fixture&) { g.b = nullptr; }, {"B is null"});
  expect_bad(
      [](Gemm& g, Fixture&) {
        g.batch = 2;
        g.stride_b = -30;
      },
      {"B has a negative batch stride -30"});
  expect_bad(
      [](Gemm& g, Fixture&) {
        g.batch = 2;
        g.stride_c = 20;
      },
      {"C's batch stride 20", "overwrite each other"});
  expect_bad([](Gemm& g, Fixture& f) { g.c = f.a.as<float>(); }, {"C overlaps A"});
}

}  // namespace
