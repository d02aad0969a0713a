// defines: tests of cuDNN's fused attention (kernels/cuda/cudnn_attention.cu), the --attention cudnn
// baseline: on a GPU with cuDNN, its forward (out, lse) and backward (dq, dk, dv added to what the
// arrays held) against tf::cpu on the same bf16-rounded inputs, within bounds derived from the bf16
// steps inside cuDNN's kernels, at head dims 64, 80, 96 and 128 with GQA; everywhere the CUDA backend
// is built, the refusals that need no device (packed documents, head dims) and the reason it gives
// when it cannot run. The GPU cases skip, saying why, where there is no GPU or no cuDNN.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/attention_test_util.h"
#include "tests/op_test_util.h"

#if TIGHTFIT_HAVE_CUDA
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/runtime.h"
#endif

namespace tf {
namespace {

#if TIGHTFIT_HAVE_CUDA
namespace rt = cuda::rt;

// Unit roundoffs: bf16 keeps 8 significant bits, f32 24.
constexpr double kUb = 1.0 / (1 << 8);
constexpr double kUf = 1.0 / (1 << 24);

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

AttentionShape shape(int batch, int seq, int heads, int kv_heads, int dim) {
  return AttentionShape{batch, seq, heads, kv_heads, dim, float(1.0 / std::sqrt(double(dim)))};
}

// ---- checks made before the device is touched (any CUDA build) -----------------------------------

TEST(CudnnAttentionChecks, PackedDocumentsAreRefusedNamingTheOption) {
  const std::string fwd = error_of([] {
    static const int32_t docs[4] = {0, 0, 1, 1};
    cuda::cudnn_attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, docs, shape(1, 4, 2, 1, 64));
  });
  EXPECT_NE(fwd.find("--attention cudnn does not take packed documents"), std::string::npos) << fwd;
  const std::string bwd = error_of([] {
    static const int32_t docs[4] = {0, 0, 1, 1};
    cuda::cudnn_attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                   nullptr, docs, shape(1, 4, 2, 1, 64));
  });
  EXPECT_NE(bwd.find("--attention cudnn does not take packed documents"), std::string::npos) << bwd;
}

TEST(CudnnAttentionChecks, HeadDimsCudnnCannotTakeAreRefused) {
  for (void (*f)() : {+[] {
                        cuda::cudnn_attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                      shape(1, 4, 2, 1, 100));
                      },
                      +[] {
                        cuda::cudnn_attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                       nullptr, nullptr, nullptr, nullptr,
                                                       shape(1, 4, 2, 1, 160));
                      }}) {
    const std::string msg = error_of(f);
    EXPECT_NE(msg.find("head dimensions that are multiples of 8 up to 128"), std::string::npos) << msg;
  }
}

// cuDNN checks each tensor, operation and the operation graph as it is finalized, which needs no
// device: a shape, type or attribute it would refuse on a GPU fails here. The forward is 14
// operations (Q K^T, scale, two index generators, the comparison and select of the causal mask,
// max, subtract, exp, sum, log, add, divide, P V); the backward 22, and 2 more reductions over
// the query heads of each kv head (dK, dV) with GQA.
TEST(CudnnAttentionChecks, GraphsPassCudnnsChecksWithoutADevice) {
  for (const int dim : {64, 80, 96, 128}) {
    for (const int kv_heads : {2, 8}) {
      const AttentionShape s = shape(2, 192, 8, kv_heads, dim);
      int ops = 0;
#if TIGHTFIT_HAVE_CUDNN
      EXPECT_EQ(cuda::cudnn_attention_offline_engines(s, false, "", &ops), -1);
      EXPECT_EQ(ops, 14) << "forward, head dim " << dim;
      EXPECT_EQ(cuda::cudnn_attention_offline_engines(s, true, "", &ops), -1);
      EXPECT_EQ(ops, kv_heads == 8 ? 22 : 24) << "backward, head dim " << dim;
#else
      const std::string msg = error_of([&] { cuda::cudnn_attention_offline_engines(s, false, "", &ops); });
      EXPECT_NE(msg.find("built without cuDNN"), std::string::npos) << msg;
#endif
    }
  }
}

#if TIGHTFIT_HAVE_CUDNN
// cuDNN's description of an H200 (sm_90, 132 SMs), in the JSON its device properties serialize to:
// with it cuDNN's heuristics run for the graphs with no GPU present and must propose engines (cuDNN
// classifies the graphs as its SDPA_FWD and SDPA_BWD patterns). Whether an engine takes a graph is
// decided when its plan is built, which needs the driver: on a GPU, the parity tests below.
constexpr const char* kH200 =
    R"({"maxGridSize":[2147483647,65535,65535],"maxBlockSize":[1024,1024,64],"regsPerBlock":65536,)"
    R"("multiProcessorCount":132,"warpSize":32,"maxSharedMemoryPerBlock":49152,)"
    R"("maxSharedMemoryPerBlockOptin":232448,"reservedSharedMemoryPerBlock":1024,"maxRegistersPerSM":65536,)"
    R"("maxCtasPerSM":32,"maxThreadsPerBlock":1024,"maxThreadsPerSM":2048,"pciDeviceId":8962,"isTccDriver":0,)"
    R"("supportCoopLaunch":1,"totalGlobalMem":150754820096,"smClockRateKHz":1980000,"memClockRateKHz":3201000,)"
    R"("l2CacheSize":52428800,"cudaDeviceId":0,"deviceVer":900,"driverVer":13000,"deviceName":"NVIDIA H200"})";

TEST(CudnnAttentionChecks, HeuristicsProposeEnginesForAnH200WithoutOne) {
  for (const int dim : {64, 80, 96, 128}) {
    for (const int kv_heads : {2, 8}) {
      for (const bool backward : {false, true}) {
        const AttentionShape s = shape(2, 256, 8, kv_heads, dim);
        int ops = 0;
        EXPECT_GE(cuda::cudnn_attention_offline_engines(s, backward, kH200, &ops), 1)
            << (backward ? "backward" : "forward") << ", head dim " << dim << ", kv heads " << kv_heads;
      }
    }
  }
}
#endif

TEST(CudnnAttentionChecks, AvailabilityComesWithItsReason) {
  std::string why;
  const bool available = cuda::cudnn_attention_available(&why);
#if TIGHTFIT_HAVE_CUDNN
  std::string gpus_why;
  if (count_gpus(&gpus_why) == 0) {
    EXPECT_FALSE(available) << "cuDNN attention available without a CUDA device (" << gpus_why << ")";
  }
  if (!available) {
    EXPECT_FALSE(why.empty());
  }
#else
  EXPECT_FALSE(available);
  EXPECT_NE(why.find("built without cuDNN"), std::string::npos) << why;
#endif
}

// ---- against the cpu on a GPU -------------------------------------------------------------------

// The reason the GPU cases cannot run here, or "".
std::string skip_reason() {
  std::string why;
  if (count_gpus(&why) == 0) return "no CUDA device: " + why;
  if (!cuda::cudnn_attention_available(&why)) return "cuDNN attention unavailable: " + why;
  return "";
}

std::vector<float> bf16_rounded(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_f32(f32_to_bf16(v[i]));
  return out;
}

class DeviceFloats {
 public:
  explicit DeviceFloats(const std::vector<float>& host) : n_(host.size()) {
    p_ = static_cast<float*>(rt::device_alloc(n_ * sizeof(float), "cudnn attention test"));
    rt::memcpy_h2d(p_, host.data(), n_ * sizeof(float), rt::current_stream());
  }
  ~DeviceFloats() { rt::device_free(p_); }
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;
  float* get() const { return p_; }
  std::vector<float> download() const {
    std::vector<float> out(n_);
    rt::memcpy_d2h(out.data(), p_, n_ * sizeof(float), rt::current_stream());
    rt::stream_synchronize(rt::current_stream());
    return out;
  }

 private:
  size_t n_;
  float* p_;
};

// Counts the elements outside their bound, records the worst error as a fraction of its bound
// (the max_error property gpu-check's table shows) and reports the first few.
void expect_within(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                   const std::vector<double>& bound) {
  ASSERT_EQ(got.size(), want.size());
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - double(want[i]));
    worst = std::max(worst, err / bound[i]);
    if (!(err <= bound[i]) && ++bad <= 5)
      ADD_FAILURE() << what << "[" << i << "]: " << got[i] << ", cpu " << want[i] << ", bound " << bound[i];
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements outside their bound";
  ::testing::Test::RecordProperty(std::string("max_error_") + what, std::to_string(worst));
}

struct Case {
  int batch, seq, heads, kv_heads, dim;
};

std::string case_name(const Case& c) {
  return "b" + std::to_string(c.batch) + "_s" + std::to_string(c.seq) + "_h" + std::to_string(c.heads) +
         "_kv" + std::to_string(c.kv_heads) + "_d" + std::to_string(c.dim);
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << case_name(c);
}

class CudnnAttention : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const std::string why = skip_reason();
    if (!why.empty()) GTEST_SKIP() << why;
    const Case c = GetParam();
    s = shape(c.batch, c.seq, c.heads, c.kv_heads, c.dim);
    const size_t nq = size_t(c.batch) * c.seq * c.heads * c.dim,
                 nkv = size_t(c.batch) * c.seq * c.kv_heads * c.dim;
    q = bf16_rounded(test::random_floats(nq, 1));
    k = bf16_rounded(test::random_floats(nkv, 2));
    v = bf16_rounded(test::random_floats(nkv, 3));
  }

  // The sums the bf16 steps inside cuDNN's kernels scale, for every (sequence, head, query i, key
  // j <= i): with P_ij = exp(scale q_i.k_j - lse_i), dS_ij = scale P_ij (dO_i.v_j - dO_i.out_i):
  //   pv[i, d]   = sum_j P_ij |v_jd|          (P rounded to bf16 before P V)
  //   pdo[j, d]  = sum_i P_ij |dO_id|         (P^T rounded before dV = P^T dO)
  //   dsq[j, d]  = sum_i |dS_ij| |q_id|       (dS rounded before dK = dS^T Q)
  //   dsk[i, d]  = sum_j |dS_ij| |k_jd|       (dS rounded before dQ = dS K)
  // the kv sums over every query head of the kv head's group.
  struct Sums {
    std::vector<double> pv, pdo, dsq, dsk;
  };
  Sums sums(const std::vector<float>& lse, const std::vector<float>& d_out,
            const std::vector<float>& out) const {
    const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq, group = H / KV;
    Sums r{std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(k.size()),
           std::vector<double>(q.size())};
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < S; ++i) {
          const int64_t row = (b * S + i) * H + h;
          const float *qi = &q[size_t(row * D)], *doi = d_out.empty() ? nullptr : &d_out[size_t(row * D)];
          double delta = 0;
          for (int64_t d = 0; doi && d < D; ++d) delta += double(doi[d]) * out[size_t(row * D + d)];
          for (int64_t j = 0; j <= i; ++j) {
            const int64_t kv = (b * S + j) * KV + h / group;
            const float *kj = &k[size_t(kv * D)], *vj = &v[size_t(kv * D)];
            double qk = 0, dp = 0;
            for (int64_t d = 0; d < D; ++d) {
              qk += double(qi[d]) * kj[d];
              if (doi) dp += double(doi[d]) * vj[d];
            }
            const double p = std::exp(s.scale * qk - lse[size_t(row)]);
            const double ds = std::fabs(s.scale * p * (dp - delta));
            for (int64_t d = 0; d < D; ++d) {
              r.pv[size_t(row * D + d)] += p * std::fabs(vj[d]);
              if (!doi) continue;
              r.pdo[size_t(kv * D + d)] += p * std::fabs(doi[d]);
              r.dsq[size_t(kv * D + d)] += ds * std::fabs(qi[d]);
              r.dsk[size_t(row * D + d)] += ds * std::fabs(kj[d]);
            }
          }
        }
    return r;
  }

  AttentionShape s;
  std::vector<float> q, k, v;
};

// Against the cpu on the same bf16 inputs, cuDNN differs by its own bf16 roundings and by the f32
// arithmetic of both sides: out_d by u_b pv_d (P in bf16) + u_b |out_d| (out written in bf16) + twice
// one f32 implementation's bound (tests/attention_test_util.h, key tiles of one: any tiling); lse,
// computed in f32 from the same inputs, by twice the f32 bound. 1 % more covers the second-order
// terms (u_b^2 relative).
TEST_P(CudnnAttention, ForwardMatchesTheCpuWithinBf16Bounds) {
  const size_t rows = q.size() / size_t(s.head_dim);
  std::vector<float> want(q.size()), want_lse(rows);
  cpu::attention_forward(want.data(), want_lse.data(), q.data(), k.data(), v.data(), nullptr, s);

  const DeviceFloats dq(q), dk(k), dv(v), out(std::vector<float>(q.size(), NAN)),
      lse(std::vector<float>(rows, NAN));
  cuda::cudnn_attention_forward(out.get(), lse.get(), dq.get(), dk.get(), dv.get(), nullptr, s);

  const test::ForwardBounds f32 = test::forward_bounds(s, q, k, v, {}, 1);
  const Sums sum = sums(want_lse, {}, {});
  std::vector<double> out_bound(q.size()), lse_bound(rows);
  for (size_t i = 0; i < q.size(); ++i)
    out_bound[i] = 1.01 * (kUb * (sum.pv[i] + std::fabs(want[i])) + 2 * f32.out[i]);
  for (size_t i = 0; i < rows; ++i) lse_bound[i] = 1.01 * 2 * f32.lse[i];
  expect_within("out", out.download(), want, out_bound);
  expect_within("lse", lse.download(), want_lse, lse_bound);
}

// The backward from the same saved out (rounded to bf16, as cuDNN reads it) and lse, adding into
// gradients that already hold values: cuDNN's bf16 roundings of P^T, dS and the gradients it
// writes move dv by u_b (pdo + |dv|), dk by u_b (dsq + |dk|), dq by u_b (dsk + |dq|); each side's f32
// arithmetic by one f32 backward bound; the addition into the held value by u_f |result|.
TEST_P(CudnnAttention, BackwardAddsTheCpuGradientsWithinBf16Bounds) {
  const size_t rows = q.size() / size_t(s.head_dim);
  std::vector<float> out(q.size()), lse(rows);
  cpu::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), nullptr, s);
  out = bf16_rounded(out);
  const std::vector<float> d_out = bf16_rounded(test::random_floats(q.size(), 4));
  const std::vector<float> held_q = test::random_floats(q.size(), 5, 0.5f);
  const std::vector<float> held_k = test::random_floats(k.size(), 6, 0.5f);
  const std::vector<float> held_v = test::random_floats(v.size(), 7, 0.5f);
  std::vector<float> want_dq = held_q, want_dk = held_k, want_dv = held_v;
  cpu::attention_backward(want_dq.data(), want_dk.data(), want_dv.data(), d_out.data(), q.data(), k.data(),
                          v.data(), out.data(), lse.data(), nullptr, s);

  const DeviceFloats gq(held_q), gk(held_k), gv(held_v), dq(q), dk(k), dv(v), d_o(d_out), o(out), l(lse);
  try {
    cuda::cudnn_attention_backward(gq.get(), gk.get(), gv.get(), d_o.get(), dq.get(), dk.get(), dv.get(),
                                   o.get(), l.get(), nullptr, s);
  } catch (const Error& e) {
    // cuDNN before 9.16 takes only multiples of 128 in the backward, and the launcher says so.
    const std::string msg = e.what();
    ASSERT_TRUE(s.seq % 128 != 0 && msg.find("multiples of 128") != std::string::npos) << msg;
    GTEST_SKIP() << msg;
  }

  const test::GradBounds f32 = test::backward_bounds(s, q, k, v, d_out, out, lse, {});
  const Sums sum = sums(lse, d_out, out);
  auto bound = [](const std::vector<float>& want, const std::vector<float>& held,
                  const std::vector<double>& rounded, const std::vector<double>& f32_bound) {
    std::vector<double> b(want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      const double grad = std::fabs(double(want[i]) - held[i]);
      b[i] = 1.01 * (kUb * (rounded[i] + grad) + 2 * f32_bound[i] + kUf * std::fabs(want[i]));
    }
    return b;
  };
  expect_within("dq", gq.download(), want_dq, bound(want_dq, held_q, sum.dsk, f32.dq));
  expect_within("dk", gk.download(), want_dk, bound(want_dk, held_k, sum.dsq, f32.dk));
  expect_within("dv", gv.download(), want_dv, bound(want_dv, held_v, sum.pdo, f32.dv));
}

// Head dims 64, 80, 96, 128; GQA 4:1 and 2:1 and none; batches of one and two; one sequence length
// that is not a multiple of cuDNN's tiles.
INSTANTIATE_TEST_SUITE_P(Shapes, CudnnAttention,
                         ::testing::Values(Case{2, 256, 8, 2, 64}, Case{1, 384, 4, 2, 80},
                                           Case{2, 128, 4, 4, 96}, Case{1, 256, 8, 2, 128},
                                           Case{1, 200, 4, 1, 64}),
                         [](const ::testing::TestParamInfo<Case>& p) { return case_name(p.param); });
#else
TEST(CudnnAttentionChecks, NeedsTheCudaBackend) {
  GTEST_SKIP() << "built without the CUDA backend (TIGHTFIT_CUDA=OFF or no nvcc)";
}
#endif

}  // namespace
}  // namespace tf
