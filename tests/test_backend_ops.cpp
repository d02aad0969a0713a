// Tests: every op case of the CPU op tests (tests/test_ops_*.cpp: odd shapes and head dims, GQA
// ratios, document ids, ignored targets, both rope layouts, dropout, transposed and padded matmul
// operands, f32 / bf16 / f16 weights, beta 0 and 1, NaN / Inf inputs) run through the tf::Backend
// interface on every backend present ("simt" always; "cuda" when the build has the CUDA backend and
// a GPU, otherwise skipped saying why), against tf::cpu_backend(). Inputs are uploaded into the
// backend's memory, weights placed with Backend::place_weight as the model places them, outputs sit
// between guard words that must stay untouched, accumulating outputs start non-zero, and results
// (host scalars included) are downloaded and compared per element: bit for bit where both sides
// round the same operations, else within a bound derived from the backend's precision and computed
// from the data, stated above each check.
//
// Precision of a device backend (kernels/cuda/backend.cu): f32 weight matrices (rows > 1) are
// stored as bf16; dense GEMMs may round every operand that is not bf16 already to bf16 (unit
// roundoff kUb = 2^-8) and accumulate in f32; everything else is f32 (or double where the op list
// says so). Bounds on a product therefore use the rounding of each operand as the backend may
// apply it, and the cpu reference runs on the weight as placed (downloaded back), whose placement
// is itself checked bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/ref/adamw.h"
#include "kernels/cpu/ref/attention.h"
#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "tests/attention_test_util.h"
#include "tests/backend_test_util.h"
#include "tests/op_test_util.h"
#include "tests/test_util.h"

namespace tf {
namespace {

using test::Docs;
using test::error_of;
using test::make_doc_ids;
using test::open_backend;
using test::random_floats;

constexpr double kU = 1.0 / (1 << 24);            // f32 unit roundoff
constexpr double kUd = 1.0 / 9007199254740992.0;  // double unit roundoff, 2^-53
constexpr double kUb = 1.0 / 256;                 // bf16 unit roundoff, 2^-8
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr DType kFloatTypes[] = {DType::F32, DType::BF16, DType::F16};

// ---- the backend under test ----------------------------------------------------------------------

// The largest |got - want| / bound the running case has compared (at most 1 when it passes; 0 when
// every comparison was exact), recorded as the case's "max_error" property for the table of
// tools/gpu-check.sh.
double g_worst_ratio = 0;
void note_error(double err, double bound) {
  if (bound > 0 && std::isfinite(err)) g_worst_ratio = std::max(g_worst_ratio, err / bound);
}

class BackendOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    g_worst_ratio = 0;
    std::string why;
    dev_ = open_backend(GetParam(), &why);
    if (!dev_) GTEST_SKIP() << why;
  }
  void TearDown() override {
    if (!dev_) return;
    char worst[32];
    std::snprintf(worst, sizeof worst, "%.3g", g_worst_ratio);
    RecordProperty("max_error", worst);
  }
  Backend& dev() { return *dev_; }
  static Backend& cpu() { return cpu_backend(); }
  // The same device with its attention ops on one kernel (plain or flash), made on first use.
  Backend& attention_dev(AttentionKernel k) {
    std::unique_ptr<Backend>& be = k == AttentionKernel::Flash ? flash_ : plain_;
    if (!be) {
      std::string why;
      be = open_backend(GetParam(), &why, k);
    }
    return *be;
  }
  // "op [case] on backend", the prefix of every failure message.
  std::string ctx(const std::string& op, const std::string& c) const {
    return op + " [" + c + "] on " + dev_->name();
  }

 private:
  std::unique_ptr<Backend> dev_, plain_, flash_;
};

// ---- arrays in backend memory between guards -----------------------------------------------------

// Guard bytes on each side of every array: a signalling-NaN word that no arithmetic produces (a
// GPU's NaN is quiet), so a stray write just outside an output changes it, where the allocation's
// own bounds (which the simulator checks) include it. 64 bytes keep the array 64-byte aligned.
constexpr size_t kGuardBytes = 64;
constexpr uint32_t kGuardWord = 0x7fa5a5a5;

template <typename T>
class Buf {
 public:
  Buf(Backend& b, const std::vector<T>& host, const char* what)
      : b_(&b), n_(host.size()), what_(what), mem_(b.alloc(image_bytes(), MemTag::Workspace, what)) {
    std::vector<unsigned char> image = guard_image();
    if (n_) std::memcpy(image.data() + kGuardBytes, host.data(), n_ * sizeof(T));
    b.upload(mem_.data(), image.data(), image.size());
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;

  T* get() const { return reinterpret_cast<T*>(static_cast<unsigned char*>(mem_.data()) + kGuardBytes); }
  // The contents; a test failure naming ctx and the first guard byte that changed, if any did.
  std::vector<T> read(const std::string& ctx) const {
    std::vector<unsigned char> image(image_bytes());
    b_->download(image.data(), mem_.data(), image.size());
    const std::vector<unsigned char> guards = guard_image();
    int bad = 0;
    for (size_t i = 0; i < image.size(); ++i) {
      if (i >= kGuardBytes && i < kGuardBytes + n_ * sizeof(T)) continue;
      if (image[i] != guards[i] && bad++ == 0) {
        ADD_FAILURE() << ctx << ": " << what_ << ": stray write at guard byte "
                      << (i < kGuardBytes ? std::to_string(i) + " before the array"
                                          : std::to_string(i - kGuardBytes - n_ * sizeof(T)) + " after it");
      }
    }
    std::vector<T> out(n_);
    if (n_) std::memcpy(out.data(), image.data() + kGuardBytes, n_ * sizeof(T));
    return out;
  }

 private:
  size_t image_bytes() const { return n_ * sizeof(T) + 2 * kGuardBytes; }
  std::vector<unsigned char> guard_image() const {
    std::vector<unsigned char> image(image_bytes());
    for (size_t i = 0; i < image.size(); i += 4) std::memcpy(image.data() + i, &kGuardWord, 4);
    return image;
  }
  Backend* b_;
  size_t n_;
  const char* what_;
  DeviceMem mem_;
};

// ---- comparisons ---------------------------------------------------------------------------------

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Equal bits, or both NaN (a GPU returns its canonical NaN where the CPU keeps an operand's).
bool same_value(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b);
}

// Reports the first three elements where `ok` fails, and how many do.
template <typename Ok, typename Describe>
void report(const std::string& ctx, const char* what, size_t n, const Ok& ok, const Describe& describe) {
  int64_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    if (ok(i)) continue;
    if (bad++ < 3) ADD_FAILURE() << ctx << ": " << what << "[" << i << "] " << describe(i);
  }
  if (bad > 3) ADD_FAILURE() << ctx << ": " << what << ": " << bad << " of " << n << " elements wrong";
}

void expect_same(const std::string& ctx, const char* what, const std::vector<float>& got,
                 const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size()) << ctx << ": " << what;
  report(
      ctx, what, got.size(), [&](size_t i) { return same_value(got[i], want[i]); },
      [&](size_t i) {
        return testing::Message() << "got " << got[i] << ", want " << want[i] << " (exactly)";
      });
}

// Bit for bit, NaN payloads included: memory the op must not touch.
void expect_untouched(const std::string& ctx, const char* what, const std::vector<float>& got,
                      const std::vector<float>& before) {
  ASSERT_EQ(got.size(), before.size()) << ctx << ": " << what;
  report(
      ctx, what, got.size(), [&](size_t i) { return bits_of(got[i]) == bits_of(before[i]); },
      [&](size_t i) { return testing::Message() << "was written: " << got[i] << ", was " << before[i]; });
}

// |got - want| <= bound where want is finite; the same infinity where it is infinite; a NaN where it
// is NaN (so NaN inputs must propagate to the same places).
void expect_close(const std::string& ctx, const char* what, const std::vector<float>& got,
                  const std::vector<float>& want, const std::vector<double>& bound) {
  ASSERT_EQ(got.size(), want.size()) << ctx << ": " << what;
  ASSERT_EQ(bound.size(), want.size()) << ctx << ": " << what;
  report(
      ctx, what, got.size(),
      [&](size_t i) {
        if (std::isnan(want[i])) return bool(std::isnan(got[i]));
        if (std::isinf(want[i])) return got[i] == want[i];
        const double err = std::abs(double(got[i]) - double(want[i]));
        note_error(err, bound[i]);
        return err <= bound[i];
      },
      [&](size_t i) {
        return testing::Message() << "got " << got[i] << ", want " << want[i] << ", bound " << bound[i];
      });
}

void expect_scalar(const std::string& ctx, const char* what, double got, double want, double bound) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << ctx << ": " << what << " got " << got << ", want NaN";
  } else if (std::isinf(want)) {
    EXPECT_EQ(got, want) << ctx << ": " << what;
  } else {
    note_error(std::abs(got - want), bound);
    EXPECT_LE(std::abs(got - want), bound)
        << ctx << ": " << what << " got " << got << ", want " << want << ", bound " << bound;
  }
}

// A tf::Error message without the " (file:line)" TF_CHECK appends, which names the source that
// found the error and so differs between backends.
std::string without_location(const std::string& msg) {
  const size_t open = msg.rfind(" (");
  if (open == std::string::npos || msg.empty() || msg.back() != ')') return msg;
  const std::string loc = msg.substr(open + 2, msg.size() - open - 3);
  const size_t colon = loc.rfind(':');
  const bool is_location = colon != std::string::npos && colon + 1 < loc.size() &&
                           loc.find_first_not_of("0123456789", colon + 1) == std::string::npos &&
                           loc.find(' ') == std::string::npos;
  return is_location ? msg.substr(0, open) : msg;
}

// Both calls throw tf::Error with the same message (the backend reports what the CPU reports).
void expect_same_error(const std::string& ctx, const std::string& got, const std::string& want) {
  EXPECT_NE(want, "(no error)") << ctx;
  EXPECT_EQ(without_location(got), without_location(want)) << ctx;
}

// ---- weights -------------------------------------------------------------------------------------

// A float weight on the host: values stored as dtype (bf16 / f16 bits, or f32), and the values it
// holds as f32.
struct HostWeight {
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  std::vector<float> values;
  std::vector<uint16_t> bits;
  WeightRef ref() const {
    return {dtype == DType::F32 ? static_cast<const void*>(values.data()) : bits.data(), dtype, rows, cols};
  }
};

HostWeight make_weight(const std::vector<float>& values, DType dtype, int64_t rows, int64_t cols) {
  HostWeight w{dtype, rows, cols, values, {}};
  if (dtype == DType::F32) return w;
  w.bits.resize(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    w.bits[i] = dtype == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
    w.values[i] = dtype == DType::BF16 ? bf16_to_f32(w.bits[i]) : f16_to_f32(w.bits[i]);
  }
  return w;
}

// A weight placed on a backend as the model places it, and its values as placed, downloaded back:
// the cpu reference runs on those, so that the comparison measures the op, not the storage.
struct Placed {
  // The host weight stays alive as a model's does: a backend may use it where it lies (the cpu
  // backend's placement is the host WeightRef itself).
  HostWeight original;
  std::vector<DeviceMem> storage;
  WeightRef dev;
  HostWeight host;
  // Relative rounding a GEMM may add to this weight: none when it is stored as bf16.
  double gemm_rounding() const { return dev.dtype == DType::BF16 ? 0.0 : kUb; }
};

// Places w and checks the placement: the same dtype and bits, or (an f32 matrix of several rows
// on a device backend) the round-to-nearest-even bf16 of every value.
std::unique_ptr<Placed> place(Backend& b, const HostWeight& w, const std::string& ctx, const char* name) {
  auto p = std::make_unique<Placed>();
  p->original = w;
  p->dev = b.place_weight(p->original.ref(), name, p->storage);
  EXPECT_EQ(p->dev.rows, w.rows) << ctx;
  EXPECT_EQ(p->dev.cols, w.cols) << ctx;
  const size_t n = size_t(w.rows * w.cols);
  const bool to_bf16 = w.dtype == DType::F32 && p->dev.dtype == DType::BF16;
  EXPECT_TRUE(p->dev.dtype == w.dtype || to_bf16)
      << ctx << ": " << name << " (" << dtype_name(w.dtype) << ") placed as " << dtype_name(p->dev.dtype);
  if (p->dev.dtype == DType::F32) {
    std::vector<float> placed(n);
    b.download(placed.data(), p->dev.data, n * sizeof(float));
    p->host = make_weight(placed, DType::F32, w.rows, w.cols);
    expect_untouched(ctx, name, placed, w.values);
    return p;
  }
  std::vector<uint16_t> placed(n);
  b.download(placed.data(), p->dev.data, n * sizeof(uint16_t));
  p->host = HostWeight{p->dev.dtype, w.rows, w.cols, std::vector<float>(n), placed};
  int64_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    p->host.values[i] = p->dev.dtype == DType::BF16 ? bf16_to_f32(placed[i]) : f16_to_f32(placed[i]);
    const uint16_t want = to_bf16 ? f32_to_bf16(w.values[i]) : w.bits[i];
    if (placed[i] != want && bad++ < 3)
      ADD_FAILURE() << ctx << ": " << name << "[" << i << "] placed as bits " << placed[i] << ", want "
                    << want;
  }
  return p;
}

std::string describe_dtype(DType t) {
  return std::string(dtype_name(t));
}

std::vector<int32_t> random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  Philox rng(seed, 0xe3);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(vocab));
  return t;
}

// Random values with a NaN, +Inf and -Inf planted where there is room.
std::vector<float> with_specials(std::vector<float> v) {
  if (v.size() > 7) {
    v[3] = kNaN;
    v[5] = kInf;
    v[7] = -kInf;
  }
  return v;
}

// ---- embedding -------------------------------------------------------------------------------------

// A row of the table as placed is copied: exactly the cpu op's bits on the table as placed (its
// NaN and infinities included).
TEST_P(BackendOps, EmbeddingForwardGivesTheRowsAsPlaced) {
  const int64_t vocab = 257, dim = 33, n = 40;
  std::vector<float> table = random_floats(size_t(vocab * dim), 1);
  table[size_t(5 * dim + 3)] = kNaN;
  table[size_t(6 * dim)] = kInf;
  table[size_t(7 * dim + 1)] = -kInf;
  std::vector<int32_t> tokens = random_ids(n, vocab, 2);
  tokens[0] = 5;
  tokens[1] = 6;
  tokens[2] = 7;
  tokens[3] = 5;
  tokens[4] = int32_t(vocab - 1);
  for (const DType dt : kFloatTypes) {
    const std::string c = ctx("embedding_forward", describe_dtype(dt) + " table 257x33, 40 tokens");
    const auto w = place(dev(), make_weight(table, dt, vocab, dim), c, "embedding table");
    Buf<int32_t> d_tokens(dev(), tokens, "tokens");
    Buf<float> d_out(dev(), std::vector<float>(size_t(n * dim), kNaN), "out");
    dev().embedding_forward(d_out.get(), d_tokens.get(), n, w->dev);
    std::vector<float> want(size_t(n * dim));
    cpu().embedding_forward(want.data(), tokens.data(), n, w->host.ref());
    expect_same(c, "out", d_out.read(c), want);
  }
}

// Each d_table element adds the d_out entries of its token's c occurrences to its start value, in
// some order: each side is within (c + 1) u (|start| + sum |terms|) of the exact sum, so the two
// within twice that. A NaN in d_out reaches only its token's element.
TEST_P(BackendOps, EmbeddingBackwardAccumulatesRepeatedTokens) {
  struct Case {
    int64_t vocab, dim, n;
  };
  for (const Case k : {Case{33, 40, 300}, Case{7, 5, 9}, Case{1, 3, 4}}) {
    const std::string c =
        ctx("embedding_backward", "vocab " + std::to_string(k.vocab) + " dim " + std::to_string(k.dim) +
                                      " tokens " + std::to_string(k.n));
    const std::vector<int32_t> tokens = random_ids(k.n, k.vocab, 3);
    std::vector<float> d_out = random_floats(size_t(k.n * k.dim), 4);
    if (k.n > 2) d_out[size_t(2 * k.dim + 1)] = kNaN;
    const std::vector<float> start = random_floats(size_t(k.vocab * k.dim), 5);
    Buf<int32_t> d_tokens(dev(), tokens, "tokens");
    Buf<float> d_dout(dev(), d_out, "d_out"), d_table(dev(), start, "d_table");
    dev().embedding_backward(d_table.get(), d_dout.get(), d_tokens.get(), k.n, k.vocab, k.dim);
    std::vector<float> want = start;
    cpu().embedding_backward(want.data(), d_out.data(), tokens.data(), k.n, k.vocab, k.dim);
    std::vector<double> abs_sum(start.size()), count(start.size());
    for (size_t i = 0; i < start.size(); ++i) abs_sum[i] = std::abs(double(start[i]));
    for (int64_t t = 0; t < k.n; ++t) {
      for (int64_t d = 0; d < k.dim; ++d) {
        const size_t at = size_t(tokens[size_t(t)] * k.dim + d);
        abs_sum[at] += std::abs(double(d_out[size_t(t * k.dim + d)]));
        count[at] += 1;
      }
    }
    std::vector<double> bound(start.size());
    for (size_t i = 0; i < bound.size(); ++i) bound[i] = 2 * (count[i] + 1) * kU * abs_sum[i];
    expect_close(c, "d_table", d_table.read(c), want, bound);
  }
}

// A bad id is reported with the CPU's message before anything is written.
TEST_P(BackendOps, EmbeddingRejectsBadTokenIdsAsTheCpuDoes) {
  const int64_t vocab = 10, dim = 4;
  const auto w =
      place(dev(), make_weight(std::vector<float>(size_t(vocab * dim), 1.0f), DType::F32, vocab, dim),
            ctx("embedding", "placement"), "embedding table");
  for (const int32_t bad : {10, -1, -100}) {
    const std::string c = ctx("embedding", "token id " + std::to_string(bad) + " at position 2");
    const std::vector<int32_t> tokens = {0, 9, bad};
    const std::vector<float> out0(size_t(3 * dim), 5.0f), table0(size_t(vocab * dim), 0.25f);
    Buf<int32_t> d_tokens(dev(), tokens, "tokens");
    Buf<float> d_out(dev(), out0, "out"), d_table(dev(), table0, "d_table");
    std::vector<float> out = out0, table = table0;
    expect_same_error(
        c, error_of([&] { dev().embedding_forward(d_out.get(), d_tokens.get(), 3, w->dev); }),
        error_of([&] { cpu().embedding_forward(out.data(), tokens.data(), 3, w->host.ref()); }));
    expect_same_error(
        c, error_of([&] {
          dev().embedding_backward(d_table.get(), d_out.get(), d_tokens.get(), 3, vocab, dim);
        }),
        error_of([&] { cpu().embedding_backward(table.data(), out.data(), tokens.data(), 3, vocab, dim); }));
    expect_untouched(c, "out", d_out.read(c), out0);
    expect_untouched(c, "d_table", d_table.read(c), table0);
  }
}

// ---- matmul ----------------------------------------------------------------------------------------

// A stored matrix [rows, ld] in one dtype with its exact values as f32.
struct HostMatrix {
  DType dtype;
  int64_t rows, ld;
  std::vector<float> values;
  std::vector<uint16_t> bits;
  const void* data() const {
    return dtype == DType::F32 ? static_cast<const void*>(values.data()) : bits.data();
  }
};

HostMatrix make_matrix(int64_t rows, int64_t cols, int64_t pad, DType dt, uint64_t seed) {
  const HostWeight w = make_weight(random_floats(size_t(rows * (cols + pad)), seed), dt, rows, cols + pad);
  return HostMatrix{dt, rows, cols + pad, w.values, w.bits};
}

// The same matrix in backend memory.
struct DevMatrix {
  std::optional<Buf<float>> f32;
  std::optional<Buf<uint16_t>> half;
  DevMatrix(Backend& b, const HostMatrix& m, const char* what) {
    if (m.dtype == DType::F32) {
      f32.emplace(b, m.values, what);
    } else {
      half.emplace(b, m.bits, what);
    }
  }
  const void* data() const { return f32 ? static_cast<const void*>(f32->get()) : half->get(); }
};

// op(X)[r, c] of a stored matrix.
float op_at(const HostMatrix& x, bool trans, int64_t r, int64_t c) {
  return x.values[size_t(trans ? c * x.ld + r : r * x.ld + c)];
}

struct MatCase {
  int64_t M, N, K;
  bool ta, tb;
  DType ad, bd;
  int64_t pad;
  float alpha, beta;
};

std::string describe(const MatCase& c) {
  return "M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) +
         " ta=" + std::to_string(c.ta) + " tb=" + std::to_string(c.tb) + " A=" + describe_dtype(c.ad) +
         " B=" + describe_dtype(c.bd) + " pad=" + std::to_string(c.pad) +
         " alpha=" + std::to_string(c.alpha) + " beta=" + std::to_string(c.beta);
}

// A GEMM may round an operand that is not bf16 to bf16 (relative kUb), and each side accumulates
// in f32 in its own order and blocking: within (K + 2) u of sum |a b| (K products and additions,
// alpha and beta's add), so
//   |device - cpu| <= (u_a + u_b + u_a u_b + 2 (K + 2) u) |alpha| sum_p |a_ip b_pj| + 4 u |beta c0|.
double operand_rounding(DType t) {
  return t == DType::BF16 ? 0.0 : kUb;
}

void check_matmul(Backend& dev, const MatCase& c, const std::string& cx, uint64_t seed) {
  const HostMatrix A = make_matrix(c.ta ? c.K : c.M, c.ta ? c.M : c.K, c.pad, c.ad, seed);
  const HostMatrix B = make_matrix(c.tb ? c.N : c.K, c.tb ? c.K : c.N, c.pad, c.bd, seed + 1);
  const int64_t ldc = c.N + c.pad;
  // beta 0 must not read C: NaN there would poison the result. The padding between rows of C
  // belongs to someone else and must keep its bits.
  const std::vector<float> c0 = c.beta == 0.0f ? std::vector<float>(size_t(c.M * ldc), kNaN)
                                               : random_floats(size_t(c.M * ldc), seed + 2);
  const DevMatrix dA(dev, A, "A"), dB(dev, B, "B");
  Buf<float> dC(dev, c0, "C");
  dev.matmul(dC.get(), ldc, {dA.data(), c.ad, A.ld, c.ta}, {dB.data(), c.bd, B.ld, c.tb}, c.M, c.N, c.K,
             c.alpha, c.beta);
  std::vector<float> want = c0;
  cpu_backend().matmul(want.data(), ldc, {A.data(), c.ad, A.ld, c.ta}, {B.data(), c.bd, B.ld, c.tb}, c.M, c.N,
                       c.K, c.alpha, c.beta);
  const std::vector<float> got = dC.read(cx);
  const double ua = operand_rounding(c.ad), ub = operand_rounding(c.bd);
  const double rel = ua + ub + ua * ub + 2 * double(c.K + 2) * kU;
  std::vector<float> got_v, want_v, got_pad, c0_pad;
  std::vector<double> bound;
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      const size_t at = size_t(i * ldc + j);
      if (j >= c.N) {
        got_pad.push_back(got[at]);
        c0_pad.push_back(c0[at]);
        continue;
      }
      double mag = 0;
      for (int64_t p = 0; p < c.K; ++p) mag += std::abs(double(op_at(A, c.ta, i, p)) * op_at(B, c.tb, p, j));
      got_v.push_back(got[at]);
      want_v.push_back(want[at]);
      bound.push_back(rel * std::abs(double(c.alpha)) * mag +
                      (c.beta == 0.0f ? 0.0 : 4 * kU * std::abs(double(c.beta) * c0[at])));
    }
  }
  expect_close(cx, "C", got_v, want_v, bound);
  expect_untouched(cx, "C padding", got_pad, c0_pad);
}

TEST_P(BackendOps, MatmulAcrossShapesTransposesAndDtypes) {
  // Single rows and columns, sizes off any SIMD or tile multiple, every transpose pair and B dtype.
  const int64_t shapes[][3] = {{1, 1, 1}, {7, 33, 40}, {33, 7, 65}, {40, 65, 7}, {1, 65, 40}, {7, 65, 65}};
  uint64_t seed = 1;
  for (const auto& s : shapes) {
    for (int t = 0; t < 4; ++t) {
      for (const DType bd : kFloatTypes) {
        const MatCase c{s[0], s[1], s[2], bool(t & 1), bool(t & 2), DType::F32, bd, 0, 1.0f, 0.0f};
        check_matmul(dev(), c, ctx("matmul", describe(c)), seed += 3);
      }
    }
  }
}

TEST_P(BackendOps, MatmulNarrowLeftOperandPaddedAlphaBetaAndEmptyK) {
  uint64_t seed = 100;
  std::vector<MatCase> cases;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    for (const DType ad : {DType::BF16, DType::F16}) {
      cases.push_back({65, 7, 65, ta, tb, ad, DType::F32, 0, 1.0f, 0.0f});
      cases.push_back({33, 65, 40, ta, tb, ad, DType::BF16, 0, 1.0f, 0.0f});
    }
    for (const DType bd : {DType::F32, DType::BF16}) {
      cases.push_back({33, 40, 65, ta, tb, DType::F32, bd, 5, 1.5f, 0.5f});
      cases.push_back({7, 65, 65, ta, tb, DType::F32, bd, 3, -0.25f, 0.75f});
    }
  }
  // K = 0: C = beta C, one rounding on each side.
  cases.push_back({2, 2, 0, false, false, DType::F32, DType::F32, 1, 1.0f, 0.5f});
  for (const MatCase& c : cases) check_matmul(dev(), c, ctx("matmul", describe(c)), seed += 3);
}

// dA += dC op(B)^T sums N terms, dB += op(A)^T dC sums M; as for the forward, with dC an f32
// operand (rounded to bf16 by the GEMM), and the accumulation into the start values one more
// rounding on each side: 4 u |start|. Entries of the padding stay as they were.
TEST_P(BackendOps, MatmulBackwardAccumulatesInTheOperandsOrientation) {
  const int64_t M = 33, N = 40, K = 24, pad = 3;
  uint64_t seed = 300;
  for (int t = 0; t < 4; ++t) {
    for (const DType bd : {DType::F32, DType::BF16}) {
      for (int outputs = 0; outputs < 3; ++outputs) {  // both, dA only, dB only
        const bool ta = t & 1, tb = t & 2, want_a = outputs != 2, want_b = outputs != 1;
        const std::string c =
            ctx("matmul_backward", "M=33 N=40 K=24 pad=3 ta=" + std::to_string(ta) +
                                       " tb=" + std::to_string(tb) + " B=" + describe_dtype(bd) +
                                       (outputs == 0   ? " dA and dB"
                                        : outputs == 1 ? " dA only"
                                                       : " dB only"));
        const HostMatrix A = make_matrix(ta ? K : M, ta ? M : K, pad, DType::F32, seed++);
        const HostMatrix B = make_matrix(tb ? N : K, tb ? K : N, pad, bd, seed++);
        const int64_t ldc = N + pad;
        const std::vector<float> dc = random_floats(size_t(M * ldc), seed++);
        const std::vector<float> da0 = random_floats(A.values.size(), seed++);
        const std::vector<float> db0 = random_floats(B.values.size(), seed++);
        const DevMatrix d_a(dev(), A, "A"), d_b(dev(), B, "B");
        Buf<float> d_dc(dev(), dc, "dC"), d_da(dev(), da0, "dA"), d_db(dev(), db0, "dB");
        dev().matmul_backward(want_a ? d_da.get() : nullptr, want_b ? d_db.get() : nullptr, d_dc.get(), ldc,
                              {d_a.data(), DType::F32, A.ld, ta}, {d_b.data(), bd, B.ld, tb}, M, N, K);
        std::vector<float> da = da0, db = db0;
        cpu().matmul_backward(want_a ? da.data() : nullptr, want_b ? db.data() : nullptr, dc.data(), ldc,
                              {A.data(), DType::F32, A.ld, ta}, {B.data(), bd, B.ld, tb}, M, N, K);
        const double udc = kUb, ua = operand_rounding(DType::F32), ub = operand_rounding(bd);
        // Bounds per stored element; padding (and an output not asked for) must keep its start.
        std::vector<double> bound_a(da0.size(), 0.0), bound_b(db0.size(), 0.0);
        const double rel_a = udc + ub + udc * ub + 2 * double(N + 2) * kU;
        const double rel_b = ua + udc + ua * udc + 2 * double(M + 2) * kU;
        for (int64_t i = 0; i < M; ++i) {
          for (int64_t p = 0; p < K; ++p) {
            double mag = 0;
            for (int64_t j = 0; j < N; ++j)
              mag += std::abs(double(dc[size_t(i * ldc + j)]) * op_at(B, tb, p, j));
            const size_t at = size_t(ta ? p * A.ld + i : i * A.ld + p);
            bound_a[at] = want_a ? rel_a * mag + 4 * kU * std::abs(double(da0[at])) : 0.0;
          }
        }
        for (int64_t p = 0; p < K; ++p) {
          for (int64_t j = 0; j < N; ++j) {
            double mag = 0;
            for (int64_t i = 0; i < M; ++i)
              mag += std::abs(double(op_at(A, ta, i, p)) * dc[size_t(i * ldc + j)]);
            const size_t at = size_t(tb ? j * B.ld + p : p * B.ld + j);
            bound_b[at] = want_b ? rel_b * mag + 4 * kU * std::abs(double(db0[at])) : 0.0;
          }
        }
        // A zero bound asks for the start's bits (padding, or an output not requested).
        const auto check = [&](const char* what, const std::vector<float>& got,
                               const std::vector<float>& want, const std::vector<float>& start,
                               const std::vector<double>& bound) {
          std::vector<float> got_v, want_v, got_kept, start_kept;
          std::vector<double> bound_v;
          for (size_t i = 0; i < got.size(); ++i) {
            if (bound[i] == 0.0) {
              got_kept.push_back(got[i]);
              start_kept.push_back(start[i]);
            } else {
              got_v.push_back(got[i]);
              want_v.push_back(want[i]);
              bound_v.push_back(bound[i]);
            }
          }
          expect_close(c, what, got_v, want_v, bound_v);
          expect_untouched(c, what, got_kept, start_kept);
        };
        check("dA", d_da.read(c), da, da0, bound_a);
        check("dB", d_db.read(c), db, db0, bound_b);
      }
    }
  }
}

// ---- frozen linear layers ----------------------------------------------------------------------------

// y = x W^T + beta y (K = cols) and dx = dy W + beta dx (K = rows) are GEMMs whose f32 activation
// the backend may round to bf16 (kUb) and whose weight as placed it may round too (kUb unless
// stored as bf16), with f32 accumulation on each side: per element
//   (u_x + u_w + u_x u_w + 2 (K + 2) u) sum_k |x_k w_k| + 4 u |beta start|.
// beta 0 starts from NaN, which must be overwritten.
TEST_P(BackendOps, LinearForwardAndInputGradientForEveryFloatWeight) {
  struct Shape {
    int64_t rows, cols;
  };
  uint64_t seed = 900;
  // 1 x 33: a weight of one row, which a device keeps in f32.
  for (const Shape s : {Shape{40, 72}, Shape{17, 24}, Shape{1, 33}}) {
    for (const DType dt : kFloatTypes) {
      const std::string wname =
          describe_dtype(dt) + " W " + std::to_string(s.rows) + "x" + std::to_string(s.cols);
      const auto w =
          place(dev(), make_weight(random_floats(size_t(s.rows * s.cols), seed++), dt, s.rows, s.cols),
                ctx("linear", wname), "linear weight");
      const std::vector<float>& wv = w->host.values;
      const double rel_y = kUb + w->gemm_rounding() + kUb * w->gemm_rounding() + 2 * double(s.cols + 2) * kU;
      const double rel_dx = kUb + w->gemm_rounding() + kUb * w->gemm_rounding() + 2 * double(s.rows + 2) * kU;
      for (const int64_t n : {1, 7, 33}) {
        const std::vector<float> x = random_floats(size_t(n * s.cols), seed++);
        const std::vector<float> dy = random_floats(size_t(n * s.rows), seed++);
        for (const float beta : {0.0f, 1.0f}) {
          const std::string c =
              ctx("linear", wname + " n=" + std::to_string(n) + " beta=" + std::to_string(beta));
          const std::vector<float> y0 = beta == 0.0f ? std::vector<float>(size_t(n * s.rows), kNaN)
                                                     : random_floats(size_t(n * s.rows), seed++);
          const std::vector<float> dx0 = beta == 0.0f ? std::vector<float>(size_t(n * s.cols), kNaN)
                                                      : random_floats(size_t(n * s.cols), seed++);
          Buf<float> d_x(dev(), x, "x"), d_dy(dev(), dy, "dy"), d_y(dev(), y0, "y"), d_dx(dev(), dx0, "dx");
          dev().linear_forward(d_y.get(), d_x.get(), w->dev, n, beta);
          dev().linear_backward_input(d_dx.get(), d_dy.get(), w->dev, n, beta);
          std::vector<float> y = y0, dx = dx0;
          cpu().linear_forward(y.data(), x.data(), w->host.ref(), n, beta);
          cpu().linear_backward_input(dx.data(), dy.data(), w->host.ref(), n, beta);
          std::vector<double> by(y.size()), bdx(dx.size());
          for (int64_t i = 0; i < n; ++i) {
            for (int64_t r = 0; r < s.rows; ++r) {
              double mag = 0;
              for (int64_t k = 0; k < s.cols; ++k)
                mag += std::abs(double(x[size_t(i * s.cols + k)]) * wv[size_t(r * s.cols + k)]);
              const size_t at = size_t(i * s.rows + r);
              by[at] = rel_y * mag + (beta == 0.0f ? 0.0 : 4 * kU * std::abs(double(y0[at])));
            }
            for (int64_t k = 0; k < s.cols; ++k) {
              double mag = 0;
              for (int64_t r = 0; r < s.rows; ++r)
                mag += std::abs(double(dy[size_t(i * s.rows + r)]) * wv[size_t(r * s.cols + k)]);
              const size_t at = size_t(i * s.cols + k);
              bdx[at] = rel_dx * mag + (beta == 0.0f ? 0.0 : 4 * kU * std::abs(double(dx0[at])));
            }
          }
          expect_close(c, "y", d_y.read(c), y, by);
          expect_close(c, "dx", d_dx.read(c), dx, bdx);
        }
      }
    }
  }
}

// No columns: y = beta y (beta 0 overwrites its NaNs with zeros); no rows: dx = beta dx; no tokens:
// nothing written. Exact: no products are summed.
TEST_P(BackendOps, LinearEmptyShapes) {
  {
    const std::string c = ctx("linear_forward", "f32 W 3x0, 2 tokens, beta 0");
    const auto w = place(dev(), make_weight({}, DType::F32, 3, 0), c, "linear weight");
    Buf<float> d_y(dev(), std::vector<float>(6, kNaN), "y"), d_x(dev(), {}, "x");
    dev().linear_forward(d_y.get(), d_x.get(), w->dev, 2, 0.0f);
    std::vector<float> y(6, kNaN);
    cpu().linear_forward(y.data(), nullptr, w->host.ref(), 2, 0.0f);
    expect_same(c, "y", d_y.read(c), y);
  }
  {
    const std::string c = ctx("linear_backward_input", "f32 W 0x64, 2 tokens, beta 0.5");
    const auto w = place(dev(), make_weight({}, DType::F32, 0, 64), c, "linear weight");
    Buf<float> d_dx(dev(), std::vector<float>(128, 2.0f), "dx"), d_dy(dev(), {}, "dy");
    dev().linear_backward_input(d_dx.get(), d_dy.get(), w->dev, 2, 0.5f);
    std::vector<float> dx(128, 2.0f);
    cpu().linear_backward_input(dx.data(), nullptr, w->host.ref(), 2, 0.5f);
    expect_same(c, "dx", d_dx.read(c), dx);
  }
  {
    const std::string c = ctx("linear", "bf16 W 17x24, no tokens");
    const auto w =
        place(dev(), make_weight(random_floats(17 * 24, 3), DType::BF16, 17, 24), c, "linear weight");
    Buf<float> d_y(dev(), {}, "y"), d_x(dev(), {}, "x");
    dev().linear_forward(d_y.get(), d_x.get(), w->dev, 0, 0.0f);
    dev().linear_backward_input(d_x.get(), d_y.get(), w->dev, 0, 1.0f);
    d_y.read(c);
    d_x.read(c);
  }
}

// A backend runs a weight's storage type or refuses it by name when the weight is placed, before
// any op sees it; a type it accepts keeps its dtype, shape and (ggml blocks) bytes when placed.
TEST_P(BackendOps, QuantizedWeightsAreRunOrRefusedByName) {
  const DType quantized[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                             DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K};
  for (const DType dt : quantized) {
    const std::string c = ctx("place_weight", describe_dtype(dt) + " 3x512");
    const int64_t rows = 3, cols = 512;
    std::vector<uint8_t> bytes(size_t(dtype_bytes(dt, rows * cols)));
    const Philox rng(uint64_t(dt), 0x9);
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = uint8_t(rng.u32(i));
    const WeightRef host(bytes.data(), dt, rows, cols);
    std::vector<DeviceMem> storage;
    if (!dev().supports_weight(dt)) {
      const std::string msg = error_of([&] { dev().place_weight(host, "blk.0.attn_q.weight", storage); });
      EXPECT_NE(msg.find(std::string(dtype_name(dt))), std::string::npos) << c << ": " << msg;
      EXPECT_NE(msg.find("blk.0.attn_q.weight"), std::string::npos) << c << ": " << msg;
      continue;
    }
    const WeightRef placed = dev().place_weight(host, "blk.0.attn_q.weight", storage);
    EXPECT_EQ(placed.dtype, dt) << c;
    EXPECT_EQ(placed.rows, rows) << c;
    EXPECT_EQ(placed.cols, cols) << c;
    std::vector<uint8_t> back(bytes.size());
    dev().download(back.data(), placed.data, back.size());
    EXPECT_EQ(back, bytes) << c;
  }
  // NF4 with double-quantized absmax and INT8 with f32 absmax: codes and scales placed as they are.
  for (const DType dt : {DType::NF4, DType::INT8}) {
    const std::string c = ctx("place_weight", describe_dtype(dt) + " 5x40");
    const int64_t rows = 5, cols = 40, blocks = (rows * cols + 63) / 64;
    const bool nested = dt == DType::NF4;
    std::vector<uint8_t> codes(size_t(dtype_bytes(dt, rows * cols))),
        absmax_codes(static_cast<size_t>(blocks));
    const Philox rng(uint64_t(dt), 0xa);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = uint8_t(rng.u32(i));
    for (size_t i = 0; i < absmax_codes.size(); ++i) absmax_codes[i] = uint8_t(rng.u32(i + (1u << 20)));
    const std::vector<float> absmax = random_floats(size_t(blocks), 11), scale = {0.5f};
    QuantScales s;
    s.absmax = nested ? static_cast<const void*>(absmax_codes.data()) : absmax.data();
    if (nested) {
      s.nested = scale.data();
      s.offset = 0.25f;
    }
    std::vector<DeviceMem> storage;
    const WeightRef host(codes.data(), dt, rows, cols, s);
    if (!dev().supports_weight(dt)) {
      const std::string msg = error_of([&] { dev().place_weight(host, "blk.0.attn_q.weight", storage); });
      EXPECT_NE(msg.find(std::string(dtype_name(dt))), std::string::npos) << c << ": " << msg;
      continue;
    }
    const WeightRef placed = dev().place_weight(host, "blk.0.attn_q.weight", storage);
    std::vector<uint8_t> back(codes.size());
    dev().download(back.data(), placed.data, back.size());
    EXPECT_EQ(back, codes) << c;
    if (nested) {
      std::vector<uint8_t> back_codes(absmax_codes.size());
      float back_scale = 0;
      dev().download(back_codes.data(), placed.scales.absmax, back_codes.size());
      dev().download(&back_scale, placed.scales.nested, sizeof(float));
      EXPECT_EQ(back_codes, absmax_codes) << c;
      EXPECT_EQ(back_scale, scale[0]) << c;
      EXPECT_EQ(placed.scales.offset, 0.25f) << c;
    } else {
      std::vector<float> back_absmax(absmax.size());
      dev().download(back_absmax.data(), placed.scales.absmax, back_absmax.size() * sizeof(float));
      EXPECT_EQ(back_absmax, absmax) << c;
      EXPECT_EQ(placed.scales.nested, nullptr) << c;
    }
  }
}

// Widening bf16 / f16 / f32 storage to f32 is exact: the cpu op's values on the weight as placed
// (any NaN matching any NaN), and the columns of dst past n_cols untouched.
TEST_P(BackendOps, WeightTileGivesTheValuesAsPlaced) {
  struct Tile {
    int64_t r0, n_rows, c0, n_cols;
  };
  const auto check = [&](const std::string& c, const Placed& w, const Tile& t) {
    const int64_t ld = t.n_cols + 3;
    const std::vector<float> dst0 = random_floats(size_t(t.n_rows * ld), 7);
    Buf<float> d_dst(dev(), dst0, "dst");
    dev().dequantize_weight_tile(d_dst.get(), ld, w.dev, t.r0, t.n_rows, t.c0, t.n_cols);
    std::vector<float> want = dst0;
    cpu().dequantize_weight_tile(want.data(), ld, w.host.ref(), t.r0, t.n_rows, t.c0, t.n_cols);
    const std::vector<float> got = d_dst.read(c);
    std::vector<float> got_v, want_v, got_pad, dst0_pad;
    for (size_t i = 0; i < got.size(); ++i) {
      const bool pad = int64_t(i) % ld >= t.n_cols;
      (pad ? got_pad : got_v).push_back(got[i]);
      (pad ? dst0_pad : want_v).push_back(pad ? dst0[i] : want[i]);
    }
    expect_same(c, "dst", got_v, want_v);
    expect_untouched(c, "dst padding", got_pad, dst0_pad);
  };
  std::vector<float> values = random_floats(33 * 35, 8);
  values[40] = kNaN;
  values[41] = kInf;
  for (const DType dt : kFloatTypes) {
    const std::string wname = describe_dtype(dt) + " W 33x35";
    const auto w = place(dev(), make_weight(values, dt, 33, 35), ctx("dequantize_weight_tile", wname), "W");
    for (const Tile t : {Tile{0, 33, 0, 35}, Tile{1, 31, 2, 33}, Tile{32, 1, 34, 1}})
      check(ctx("dequantize_weight_tile", wname + " rows " + std::to_string(t.r0) + "+" +
                                              std::to_string(t.n_rows) + " cols " + std::to_string(t.c0) +
                                              "+" + std::to_string(t.n_cols)),
            *w, t);
  }
  // Every 16-bit pattern (NaNs with payloads, infinities, subnormals) as a 4096 x 16 weight.
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  for (const DType dt : {DType::BF16, DType::F16}) {
    HostWeight hw{dt, 4096, 16, std::vector<float>(all.size()), all};
    const std::string wname = describe_dtype(dt) + " every bit pattern";
    const auto w = place(dev(), hw, ctx("dequantize_weight_tile", wname), "W");
    for (int64_t r0 = 0; r0 < 4096; r0 += 256)
      check(ctx("dequantize_weight_tile", wname + " rows " + std::to_string(r0) + "+256"), *w,
            Tile{r0, 256, 0, 16});
  }
}

// ---- rmsnorm ---------------------------------------------------------------------------------------

// rstd = 1 / sqrt(mean(x^2) + eps): the mean of dim non-negative terms is within (dim + 1) u of
// exact on either side in any order, eps adds u, sqrt halves the relative error and adds u, the
// reciprocal (or rsqrtf, 2 ulp) 4u: both sides together within (dim + 12) u rstd. out = x rstd w
// rounds twice more per side: (dim + 16) u |x rstd w|. A NaN in x makes its row NaN; an infinity
// makes rstd 0, its own element NaN and the row's others 0, exactly.
TEST_P(BackendOps, RmsnormForwardForEveryWeightDtype) {
  const float eps = 1e-5f;
  for (const DType dt : kFloatTypes) {
    std::vector<float> wv = random_floats(203, 3, 0.5f);
    for (float& v : wv) v += 1.0f;
    for (const int64_t rows : {1, 7, 33}) {
      for (const int64_t dim : {1, 32, 80, 203}) {
        const std::string c = ctx("rmsnorm_forward", describe_dtype(dt) + " rows " + std::to_string(rows) +
                                                         " dim " + std::to_string(dim));
        const auto w =
            place(dev(), make_weight({wv.begin(), wv.begin() + dim}, dt, 1, dim), c, "norm weight");
        std::vector<float> x = random_floats(size_t(rows * dim), 1, 3.0f);
        if (rows > 2) x[size_t(2 * dim + dim / 2)] = kNaN;
        if (rows > 4) x[size_t(4 * dim)] = kInf;
        Buf<float> d_x(dev(), x, "x");
        Buf<float> d_out(dev(), std::vector<float>(x.size(), kNaN), "out"),
            d_rstd(dev(), std::vector<float>(size_t(rows), kNaN), "rstd");
        dev().rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), w->dev, rows, dim, eps);
        std::vector<float> out(x.size()), rstd(static_cast<size_t>(rows));
        cpu().rmsnorm_forward(out.data(), rstd.data(), x.data(), w->host.ref(), rows, dim, eps);
        std::vector<double> b_out(x.size()), b_rstd(rstd.size());
        for (int64_t r = 0; r < rows; ++r) {
          b_rstd[size_t(r)] = double(dim + 12) * kU * std::abs(double(rstd[size_t(r)]));
          for (int64_t i = 0; i < dim; ++i) {
            const size_t at = size_t(r * dim + i);
            b_out[at] =
                double(dim + 16) * kU * std::abs(double(x[at]) * rstd[size_t(r)] * w->host.values[size_t(i)]);
          }
        }
        expect_close(c, "rstd", d_rstd.read(c), rstd, b_rstd);
        expect_close(c, "out", d_out.read(c), out, b_out);
      }
    }
  }
}

// dx_i += rstd w_i g_i - x_i rstd^3 / dim sum_j w_j g_j x_j: the first term (a) a few roundings
// per side (6 u a together), the second (b) a dim-term dot product (2 (dim + 7) u b), the
// accumulation 2 u (|start| + |result|). d_weight_j += sum over rows of g x rstd: a (rows + 1)-term
// sum with the start, within 2 (rows + 2) u (|start| + sum |terms|). A NaN in d_out makes its row
// of dx and its column of d_weight NaN. rstd is the cpu forward's, the same input to both.
TEST_P(BackendOps, RmsnormBackwardAccumulatesForEveryWeightDtype) {
  for (const DType dt : kFloatTypes) {
    std::vector<float> wv = random_floats(203, 27, 0.5f);
    for (float& v : wv) v += 1.0f;
    for (const int64_t rows : {1, 7, 33}) {
      for (const int64_t dim : {1, 32, 80, 203}) {
        for (const bool with_dw : {true, false}) {
          const std::string c =
              ctx("rmsnorm_backward", describe_dtype(dt) + " rows " + std::to_string(rows) + " dim " +
                                          std::to_string(dim) + (with_dw ? "" : " no d_weight"));
          const auto w =
              place(dev(), make_weight({wv.begin(), wv.begin() + dim}, dt, 1, dim), c, "norm weight");
          const std::vector<float>& wp = w->host.values;
          const std::vector<float> x = random_floats(size_t(rows * dim), 23, 2.0f);
          std::vector<float> g = random_floats(size_t(rows * dim), 24);
          if (rows > 1) g[size_t(dim)] = kNaN;
          const std::vector<float> dx0 = random_floats(x.size(), 25), dw0 = random_floats(size_t(dim), 26);
          std::vector<float> scratch(x.size()), rstd(static_cast<size_t>(rows));
          cpu().rmsnorm_forward(scratch.data(), rstd.data(), x.data(), w->host.ref(), rows, dim, 1e-5f);
          Buf<float> d_x(dev(), x, "x"), d_g(dev(), g, "d_out"), d_rstd(dev(), rstd, "rstd");
          Buf<float> d_dx(dev(), dx0, "dx"), d_dw(dev(), dw0, "d_weight");
          dev().rmsnorm_backward(d_dx.get(), with_dw ? d_dw.get() : nullptr, d_g.get(), d_x.get(), w->dev,
                                 d_rstd.get(), rows, dim);
          std::vector<float> dx = dx0, dw = dw0;
          cpu().rmsnorm_backward(dx.data(), with_dw ? dw.data() : nullptr, g.data(), x.data(), w->host.ref(),
                                 rstd.data(), rows, dim);
          std::vector<double> b_dx(x.size()), b_dw(static_cast<size_t>(dim));
          for (int64_t r = 0; r < rows; ++r) {
            const double rs = rstd[size_t(r)];
            double abs_dot = 0;
            for (int64_t j = 0; j < dim; ++j) {
              const size_t k = size_t(r * dim + j);
              abs_dot += std::abs(double(g[k]) * wp[size_t(j)] * x[k]);
            }
            for (int64_t i = 0; i < dim; ++i) {
              const size_t k = size_t(r * dim + i);
              const double a = std::abs(rs * wp[size_t(i)] * g[k]);
              const double b = std::abs(double(x[k])) * rs * rs * rs / double(dim) * abs_dot;
              b_dx[k] = 6 * kU * a + 2 * double(dim + 7) * kU * b +
                        2 * kU * (std::abs(double(dx0[k])) + std::abs(double(dx[k])));
            }
          }
          for (int64_t i = 0; i < dim; ++i) {
            double abs_sum = std::abs(double(dw0[size_t(i)]));
            for (int64_t r = 0; r < rows; ++r)
              abs_sum += std::abs(double(g[size_t(r * dim + i)]) * x[size_t(r * dim + i)] * rstd[size_t(r)]);
            b_dw[size_t(i)] = 2 * double(rows + 2) * kU * abs_sum;
          }
          expect_close(c, "dx", d_dx.read(c), dx, b_dx);
          if (with_dw) {
            expect_close(c, "d_weight", d_dw.read(c), dw, b_dw);
          } else {
            expect_untouched(c, "d_weight", d_dw.read(c), dw0);
          }
        }
      }
    }
  }
}

// ---- rope ------------------------------------------------------------------------------------------

// Both sides form the same f32 angle pos * inv_freq; cosf / sinf are within 2 ulp under nvcc and 1
// ulp on the host, so c and s differ by at most 3 ulp <= 6u relative; each side then rounds two
// products and a sum, within 2u (|a c| + |b s|). The outputs agree within 10u (|a| + |b|) of the
// pair they come from; a NaN reaches both elements of its pair.
TEST_P(BackendOps, RopeBothLayoutsAndDirections) {
  struct Case {
    int64_t tokens;
    int heads, head_dim;
  };
  for (const Case k : {Case{1, 3, 32}, Case{7, 3, 64}, Case{33, 2, 80}, Case{20, 4, 128}}) {
    RopeParams rp;
    rp.head_dim = k.head_dim;
    rp.theta = 500000.0f;
    std::vector<float> inv_freq(size_t(k.head_dim / 2));
    rope_inv_freq(rp, inv_freq.data());
    Philox rng(11, 0x905);
    std::vector<int32_t> pos(size_t(k.tokens));
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = int32_t(rng.u32(i) % 131072u);
    for (const RopeLayout layout : {RopeLayout::SplitHalf, RopeLayout::Interleaved}) {
      for (const bool forward : {true, false}) {
        const std::string c = ctx(forward ? "rope_forward" : "rope_backward",
                                  std::to_string(k.tokens) + " tokens x " + std::to_string(k.heads) +
                                      " heads x " + std::to_string(k.head_dim) +
                                      (layout == RopeLayout::SplitHalf ? " split-half" : " interleaved"));
        std::vector<float> x = random_floats(size_t(k.tokens * k.heads * k.head_dim), 12);
        x[9] = kNaN;
        Buf<float> d_x(dev(), x, "x"), d_inv(dev(), inv_freq, "inv_freq");
        Buf<int32_t> d_pos(dev(), pos, "pos");
        std::vector<float> want = x;
        if (forward) {
          dev().rope_forward(d_x.get(), d_pos.get(), d_inv.get(), k.tokens, k.heads, k.head_dim, layout);
          cpu().rope_forward(want.data(), pos.data(), inv_freq.data(), k.tokens, k.heads, k.head_dim, layout);
        } else {
          dev().rope_backward(d_x.get(), d_pos.get(), d_inv.get(), k.tokens, k.heads, k.head_dim, layout);
          cpu().rope_backward(want.data(), pos.data(), inv_freq.data(), k.tokens, k.heads, k.head_dim,
                              layout);
        }
        std::vector<double> bound(x.size());
        const int half = k.head_dim / 2;
        for (size_t head = 0; head < size_t(k.tokens * k.heads); ++head) {
          for (int i = 0; i < half; ++i) {
            const bool split = layout == RopeLayout::SplitHalf;
            const size_t ia = head * size_t(k.head_dim) + size_t(split ? i : 2 * i);
            const size_t ib = head * size_t(k.head_dim) + size_t(split ? i + half : 2 * i + 1);
            bound[ia] = bound[ib] = 10 * kU * (std::abs(double(x[ia])) + std::abs(double(x[ib])));
          }
        }
        expect_close(c, "x", d_x.read(c), want, bound);
      }
    }
  }
}

// ---- attention -------------------------------------------------------------------------------------
//
// A device runs attention on one of two kernels, and each test runs both: the plain tiled kernel in
// f32, and the flash kernel on bf16 tensor cores (the default where it takes the head dimension).
//
// Plain: the bounds are f32 bounds on how far each implementation, in any tiling and order, is from
// exact arithmetic; two implementations are within twice that. For a query row with n allowed keys j, scores
// s_j = scale q.k_j and A_j = scale sum_d |q_d k_jd|, A = max_j A_j (D = head_dim):
// - a score is a D-term dot product and a scaling: |error| <= (D + 1) u A_j;
// - online softmax: exp(s_j - max) rounds its argument and its result, and each rescale by
//   exp(old max - new max), at most one per key, does the same, so each normalized weight w_j is
//   off by a relative eps <= u (2 (D + 1) A + (n + 2)(2 A + 2)), the normalization included;
// - out_d = sum_j w_j v_jd moves by at most 2 eps M_d, M_d = sum_j w_j |v_jd|, and the n-term sums
//   of numerator and denominator add 2 (n + 1) u M_d.
// So |error of out_d| <= u K M_d, K = 4 (D + 1) A + 4 (n + 2)(2 A + 2) + 2 n + 2, and
// lse = max + log(sum) is off by at most u (K + |lse|).
//
// The backward gets the same f32 out and lse on both sides. With p = exp(s - lse), dP = dO.v,
// delta = dO.out, B = sum |dO v|, C = sum |dO out| and dS = p (dP - delta): p is off by a relative
// u e, e = (D + 1) A_j + |s| + |lse| + 1 (score, subtraction, exp), dP and delta by D u B and D u C,
// so |error of dS| <= u G, G = p ((e + 3) |dP - delta| + D (B + C)). dq_d = scale sum_j dS_j k_jd
// over n terms is off by u scale sum_j (G_j + (n + 2) |dS_j|) |k_jd|; dk and dv likewise over the N
// (head, query) terms that reach key j: u scale sum (G + (N + 2) |dS|) |q_d| and
// u sum p (e + N + 2) |dO_d|. Accumulating into the start values rounds once more per side.
//
// Flash (tests/attention_test_util.h derives both bounds): the forward within
// test::flash_forward_bounds' bound against an f32 implementation on the f32 inputs. The backward
// from the same out and lse by the triangle inequality: the kernel is within
// test::flash_backward_bounds of the exact formulas on its bf16-rounded inputs; those are
// |G(bf16 inputs) - G(f32 inputs)| from the exact formulas on the inputs themselves, computed in
// float64 (test::backward_given); and the cpu is within one f32 implementation's bound of those.

struct AttnCase {
  int batch, seq, heads, kv_heads, head_dim;
  Docs docs;
};

std::string describe(const AttnCase& c) {
  const char* docs[] = {"no docs", "packed docs", "interleaved docs"};
  return "batch " + std::to_string(c.batch) + " seq " + std::to_string(c.seq) + " heads " +
         std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + " head_dim " +
         std::to_string(c.head_dim) + " " + docs[int(c.docs)];
}

using test::ForwardBounds;
using test::GradBounds;
using test::RowBound;

// Two f32 implementations of unknown tiling (each key its own tile): twice one's bound.
RowBound forward_row_bound(const float* qi, const float* kbase, const float* vbase, int64_t kv_row,
                           const std::vector<int64_t>& keys, int D, float scale) {
  RowBound r = test::forward_row_bound(qi, kbase, vbase, kv_row, keys, D, scale, 1);
  for (double& m : r.out) m *= 2;
  r.lse *= 2;
  return r;
}

struct AttnData {
  AttnCase c;
  AttentionShape s;
  std::vector<float> q, k, v, d_out;
  std::vector<int32_t> doc;
  const int32_t* doc_ptr() const { return doc.empty() ? nullptr : doc.data(); }
  size_t q_size() const { return size_t(c.batch) * size_t(c.seq) * size_t(c.heads * c.head_dim); }
  size_t kv_size() const { return size_t(c.batch) * size_t(c.seq) * size_t(c.kv_heads * c.head_dim); }
  size_t lse_size() const { return size_t(c.batch) * size_t(c.seq) * size_t(c.heads); }
};

// q and k in [-2, 2) make scores of a few units after scaling, so softmax rows are far from uniform
// and a wrong mask or a lost rescale shows.
AttnData make_attention(const AttnCase& c, uint64_t seed) {
  AttnData a;
  a.c = c;
  a.s.batch = c.batch;
  a.s.seq = c.seq;
  a.s.n_heads = c.heads;
  a.s.n_kv_heads = c.kv_heads;
  a.s.head_dim = c.head_dim;
  a.s.scale = 1.0f / std::sqrt(float(c.head_dim));
  a.q = random_floats(a.q_size(), seed, 2.0f);
  a.k = random_floats(a.kv_size(), seed + 1, 2.0f);
  a.v = random_floats(a.kv_size(), seed + 2);
  a.d_out = random_floats(a.q_size(), seed + 3);
  if (c.docs != Docs::None) a.doc = make_doc_ids(c.batch, c.seq, c.docs, seed + 4);
  return a;
}

std::vector<double> as_bf16_doubles(const std::vector<float>& x) {
  std::vector<double> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return r;
}

// The kernels a case runs on: plain always, flash where it takes the head dimension (where the
// device's auto choice is flash).
std::vector<AttentionKernel> attention_kernels(Backend& dev, int head_dim) {
  if (dev.attention_kernel(head_dim) == "flash") return {AttentionKernel::Plain, AttentionKernel::Flash};
  return {AttentionKernel::Plain};
}

std::string kernel_case(AttentionKernel k, const std::string& c) {
  return std::string(attention_name(k)) + " kernel, " + c;
}

TEST_P(BackendOps, AttentionForwardAndBackwardAcrossShapes) {
  // Single-token sequences, sequences shorter than a tile and a few tiles long, head dims 20, 32,
  // 64 and 80, GQA groups of 1, 2 and 4, packed and interleaved documents, batches of two.
  const AttnCase cases[] = {{2, 1, 4, 2, 32, Docs::None},         {2, 1, 4, 2, 32, Docs::Packed},
                            {2, 7, 4, 4, 80, Docs::None},         {2, 7, 4, 4, 80, Docs::Packed},
                            {2, 33, 4, 2, 64, Docs::None},        {2, 33, 4, 2, 64, Docs::Packed},
                            {1, 40, 4, 1, 32, Docs::None},        {1, 40, 4, 1, 32, Docs::Packed},
                            {2, 37, 2, 2, 64, Docs::Interleaved}, {1, 17, 2, 1, 20, Docs::Packed}};
  for (const AttnCase& ac : cases) {
    const AttnData in = make_attention(ac, 1234 + uint64_t(ac.seq));
    std::vector<float> out(in.q_size()), lse(in.lse_size());
    cpu().attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(), in.doc_ptr(),
                            in.s);
    // Two f32 implementations of unknown tiling (each key its own tile): twice one's bound.
    const ForwardBounds f32_fb = test::forward_bounds(in.s, in.q, in.k, in.v, in.doc, 1);
    // The backward from the cpu's saved out and lse, into non-zero gradients.
    const std::vector<float> dq0 = random_floats(in.q_size(), 5), dk0 = random_floats(in.kv_size(), 6),
                             dv0 = random_floats(in.kv_size(), 7);
    std::vector<float> dq = dq0, dk = dk0, dv = dv0;
    cpu().attention_backward(dq.data(), dk.data(), dv.data(), in.d_out.data(), in.q.data(), in.k.data(),
                             in.v.data(), out.data(), lse.data(), in.doc_ptr(), in.s);
    const GradBounds gb = test::backward_bounds(in.s, in.q, in.k, in.v, in.d_out, out, lse, in.doc);

    for (const AttentionKernel kernel : attention_kernels(dev(), ac.head_dim)) {
      Backend& be = attention_dev(kernel);
      const bool flash = kernel == AttentionKernel::Flash;
      {
        const std::string c = ctx("attention_forward", kernel_case(kernel, describe(ac)));
        Buf<float> d_q(be, in.q, "q"), d_k(be, in.k, "k"), d_v(be, in.v, "v");
        Buf<int32_t> d_doc(be, in.doc, "doc_ids");
        Buf<float> d_out(be, std::vector<float>(in.q_size(), kNaN), "out"),
            d_lse(be, std::vector<float>(in.lse_size(), kNaN), "lse");
        be.attention_forward(d_out.get(), d_lse.get(), d_q.get(), d_k.get(), d_v.get(),
                             in.doc.empty() ? nullptr : d_doc.get(), in.s);
        std::vector<double> b_out(f32_fb.out), b_lse(f32_fb.lse);
        if (flash) {
          const test::FlashBounds fl = test::flash_forward_bounds(in.s, in.q, in.k, in.v, in.doc, 64);
          b_out = fl.vs_f32.out;
          b_lse = fl.vs_f32.lse;
        } else {
          for (double& x : b_out) x *= 2;
          for (double& x : b_lse) x *= 2;
        }
        expect_close(c, "out", d_out.read(c), out, b_out);
        expect_close(c, "lse", d_lse.read(c), lse, b_lse);
      }
      const std::string c = ctx("attention_backward", kernel_case(kernel, describe(ac)));
      Buf<float> d_q(be, in.q, "q"), d_k(be, in.k, "k"), d_v(be, in.v, "v"), d_do(be, in.d_out, "d_out");
      Buf<float> d_out(be, out, "out"), d_lse(be, lse, "lse");
      Buf<int32_t> d_doc(be, in.doc, "doc_ids");
      Buf<float> d_dq(be, dq0, "dq"), d_dk(be, dk0, "dk"), d_dv(be, dv0, "dv");
      be.attention_backward(d_dq.get(), d_dk.get(), d_dv.get(), d_do.get(), d_q.get(), d_k.get(), d_v.get(),
                            d_out.get(), d_lse.get(), in.doc.empty() ? nullptr : d_doc.get(), in.s);
      // Plain: twice one implementation's bound. Flash: its own bound, the inputs' rounding and one
      // f32 bound. Either way the accumulation into the start (2 u |start| per side).
      GradBounds b{gb.dq, gb.dk, gb.dv};
      if (flash) {
        const std::vector<double> qr = as_bf16_doubles(in.q), kr = as_bf16_doubles(in.k),
                                  vr = as_bf16_doubles(in.v), dor = as_bf16_doubles(in.d_out);
        const GradBounds fb = test::flash_backward_bounds(in.s, qr, kr, vr, dor, out, lse, in.doc);
        const GradBounds rounded = test::backward_given(in.s, qr, kr, vr, dor, out, lse, in.doc);
        const GradBounds exact = test::backward_given(
            in.s, std::vector<double>(in.q.begin(), in.q.end()),
            std::vector<double>(in.k.begin(), in.k.end()), std::vector<double>(in.v.begin(), in.v.end()),
            std::vector<double>(in.d_out.begin(), in.d_out.end()), out, lse, in.doc);
        auto add = [](std::vector<double>& to, const std::vector<double>& own, const std::vector<double>& a,
                      const std::vector<double>& e) {
          for (size_t at = 0; at < to.size(); ++at) to[at] += own[at] + std::abs(a[at] - e[at]);
        };
        add(b.dq, fb.dq, rounded.dq, exact.dq);
        add(b.dk, fb.dk, rounded.dk, exact.dk);
        add(b.dv, fb.dv, rounded.dv, exact.dv);
      } else {
        for (std::vector<double>* v : {&b.dq, &b.dk, &b.dv})
          for (double& x : *v) x *= 2;
      }
      for (size_t at = 0; at < in.kv_size(); ++at) {
        b.dk[at] += 4 * kU * std::abs(double(dk0[at]));
        b.dv[at] += 4 * kU * std::abs(double(dv0[at]));
      }
      for (size_t at = 0; at < in.q_size(); ++at) b.dq[at] += 4 * kU * std::abs(double(dq0[at]));
      expect_close(c, "dq", d_dq.read(c), dq, b.dq);
      expect_close(c, "dk", d_dk.read(c), dk, b.dk);
      expect_close(c, "dv", d_dv.read(c), dv, b.dv);
    }
  }
}

// Decoding against a KV cache whose rows past the valid ones hold NaN (a read beyond them turns the
// output NaN) and the forward bound for query i over cache rows 0 .. n_past + i. No new tokens
// writes nothing.
TEST_P(BackendOps, AttentionCachedForwardAcrossCacheLengths) {
  struct Case {
    int64_t n_past, n_new;
    int heads, kv_heads, head_dim;
  };
  std::vector<Case> cases;
  for (const int64_t n_past : {0, 1, 37}) {
    for (const int64_t n_new : {1, 5, 33}) {
      cases.push_back({n_past, n_new, 4, 4, 64});  // no GQA
      cases.push_back({n_past, n_new, 6, 2, 80});  // groups of 3
    }
  }
  cases.push_back({37, 2, 4, 1, 64});
  cases.push_back({5, 40, 3, 1, 64});
  cases.push_back({10, 0, 2, 1, 8});
  for (const Case& k : cases) {
    const int64_t valid = k.n_past + k.n_new, kv_row = int64_t(k.kv_heads) * k.head_dim, D = k.head_dim;
    const float scale = 1.0f / std::sqrt(float(D));
    const uint64_t seed = 4321 + uint64_t(k.n_past * 7 + k.n_new);
    const std::vector<float> q = random_floats(size_t(k.n_new * k.heads * D), seed, 2.0f);
    std::vector<float> kc = random_floats(size_t(valid * kv_row), seed + 1, 2.0f);
    std::vector<float> vc = random_floats(size_t(valid * kv_row), seed + 2);
    kc.resize(size_t((valid + 3) * kv_row), kNaN);
    vc.resize(kc.size(), kNaN);
    const std::vector<float> qr = test::bf16_rounded(q), kr = test::bf16_rounded(kc),
                             vr = test::bf16_rounded(vc);
    std::vector<float> out(q.size());
    cpu().attention_cached_forward(out.data(), q.data(), kc.data(), vc.data(), k.n_past, k.n_new, k.heads,
                                   k.kv_heads, k.head_dim, scale, 0);
    for (const AttentionKernel kernel : attention_kernels(dev(), k.head_dim)) {
      Backend& be = attention_dev(kernel);
      const std::string c =
          ctx("attention_cached_forward",
              kernel_case(kernel, "past " + std::to_string(k.n_past) + " new " + std::to_string(k.n_new) +
                                      " heads " + std::to_string(k.heads) + "/" + std::to_string(k.kv_heads) +
                                      " head_dim " + std::to_string(k.head_dim)));
      Buf<float> d_q(be, q, "q"), d_kc(be, kc, "k_cache"), d_vc(be, vc, "v_cache");
      Buf<float> d_out(be, std::vector<float>(q.size(), kNaN), "out");
      be.attention_cached_forward(d_out.get(), d_q.get(), d_kc.get(), d_vc.get(), k.n_past, k.n_new, k.heads,
                                  k.kv_heads, k.head_dim, scale, 0);
      std::vector<double> bound(q.size());
      const int group = k.heads / k.kv_heads;
      for (int64_t i = 0; i < k.n_new; ++i) {
        std::vector<int64_t> keys;
        for (int64_t j = 0; j <= k.n_past + i; ++j) keys.push_back(j);
        for (int h = 0; h < k.heads; ++h) {
          const int64_t qo = (i * k.heads + h) * D, ko = h / group * D;
          const std::vector<double> b =
              kernel == AttentionKernel::Flash
                  ? test::flash_forward_row_bound(q.data() + qo, qr.data() + qo, kc.data() + ko,
                                                  kr.data() + ko, vc.data() + ko, vr.data() + ko, kv_row,
                                                  keys, int(D), scale, 64)
                        .out_vs_f32
                  : forward_row_bound(q.data() + qo, kc.data() + ko, vc.data() + ko, kv_row, keys, int(D),
                                      scale)
                        .out;
          std::copy(b.begin(), b.end(), bound.begin() + qo);
        }
      }
      expect_close(c, "out", d_out.read(c), out, bound);
    }
  }
}

// A decoder's calls (a prefill of P tokens, then one token at a time against the cache so far) on
// the backend give the rows of the cpu's training forward over the whole sequence, within the
// forward bound of each row (the same keys j <= i either way).
TEST_P(BackendOps, AttentionCachedStepsMatchTheTrainingForward) {
  struct Case {
    int64_t prefill, steps;
    int heads, kv_heads, head_dim;
  };
  for (const Case k : {Case{1, 30, 4, 4, 64}, Case{20, 17, 6, 2, 80}}) {
    const int64_t T = k.prefill + k.steps, D = k.head_dim, q_row = k.heads * D;
    AttentionShape s;
    s.seq = int(T);
    s.n_heads = k.heads;
    s.n_kv_heads = k.kv_heads;
    s.head_dim = k.head_dim;
    s.scale = 1.0f / std::sqrt(float(D));
    const std::vector<float> q = random_floats(size_t(T * q_row), 777, 2.0f);
    const std::vector<float> kc = random_floats(size_t(T * k.kv_heads * D), 778, 2.0f);
    const std::vector<float> vc = random_floats(kc.size(), 779);
    std::vector<float> train(q.size()), lse(size_t(T * k.heads));
    cpu().attention_forward(train.data(), lse.data(), q.data(), kc.data(), vc.data(), nullptr, s);
    std::vector<double> plain_bound(q.size());
    const int group = k.heads / k.kv_heads;
    for (int64_t i = 0; i < T; ++i) {
      std::vector<int64_t> keys;
      for (int64_t j = 0; j <= i; ++j) keys.push_back(j);
      for (int h = 0; h < k.heads; ++h) {
        const RowBound r =
            forward_row_bound(q.data() + i * q_row + h * D, kc.data() + h / group * D,
                              vc.data() + h / group * D, k.kv_heads * D, keys, int(D), s.scale);
        std::copy(r.out.begin(), r.out.end(), plain_bound.begin() + i * q_row + h * D);
      }
    }
    for (const AttentionKernel kernel : attention_kernels(dev(), k.head_dim)) {
      Backend& be = attention_dev(kernel);
      const std::string c = ctx(
          "attention_cached_forward",
          kernel_case(kernel, "prefill " + std::to_string(k.prefill) + " then " + std::to_string(k.steps) +
                                  " steps, heads " + std::to_string(k.heads) + "/" +
                                  std::to_string(k.kv_heads) + " head_dim " + std::to_string(k.head_dim)));
      Buf<float> d_q(be, q, "q"), d_kc(be, kc, "k_cache"), d_vc(be, vc, "v_cache");
      Buf<float> d_out(be, std::vector<float>(q.size(), kNaN), "out");
      const auto step = [&](int64_t n_past, int64_t n_new) {
        be.attention_cached_forward(d_out.get() + n_past * q_row, d_q.get() + n_past * q_row, d_kc.get(),
                                    d_vc.get(), n_past, n_new, k.heads, k.kv_heads, k.head_dim, s.scale, 0);
      };
      step(0, k.prefill);
      for (int64_t pos = k.prefill; pos < T; ++pos) step(pos, 1);
      const std::vector<double> bound = kernel == AttentionKernel::Flash
                                            ? test::flash_forward_bounds(s, q, kc, vc, {}, 64).vs_f32.out
                                            : plain_bound;
      expect_close(c, "out", d_out.read(c), train, bound);
    }
  }
}

// ---- swiglu ----------------------------------------------------------------------------------------

// expf is within 2 ulp (4u relative) under nvcc and 1 ulp on the host, so sigmoid(g) is within 6u
// relative on the device and 4u on the host, silu within 7u and 5u: the forward g s up within
// (8 + 6) u of the CPU's (16 u |out| allowed). Backward: t = s + silu (1 - s) is within
// 6u + 14u |g| + u |t| absolute per side, d up t then two more roundings, the accumulation one more:
// both sides 32 u |d up| (1 + |g| + |t|) + 2 u (|start| + |result|); d_up += d silu within
// 14 u |d silu| + 2 u (|start| + |result|). Gates reach deep into both saturated tails (exactly
// 0 and x there), and NaN / Inf gates give NaN where the CPU does.
TEST_P(BackendOps, SwigluForwardAndBackward) {
  for (const int64_t n : {1, 7, 33, 100, 1031}) {
    const std::string c = ctx("swiglu", "n=" + std::to_string(n));
    std::vector<float> gate = with_specials(random_floats(size_t(n), 1, 12.0f));
    if (n > 20) {
      const float tails[] = {-1000.0f, -100.0f, 0.0f, 100.0f, 1000.0f};
      std::copy(std::begin(tails), std::end(tails), gate.begin() + 10);
    }
    const std::vector<float> up = random_floats(size_t(n), 2, 2.0f), g = random_floats(size_t(n), 3);
    const std::vector<float> dg0 = random_floats(size_t(n), 4), du0 = random_floats(size_t(n), 5);
    Buf<float> d_gate(dev(), gate, "gate"), d_up(dev(), up, "up"), d_g(dev(), g, "d_out");
    Buf<float> d_out(dev(), std::vector<float>(size_t(n), kNaN), "out"), d_dg(dev(), dg0, "d_gate"),
        d_du(dev(), du0, "d_up");
    dev().swiglu_forward(d_out.get(), d_gate.get(), d_up.get(), n);
    dev().swiglu_backward(d_dg.get(), d_du.get(), d_g.get(), d_gate.get(), d_up.get(), n);
    std::vector<float> out(static_cast<size_t>(n)), dg = dg0, du = du0;
    cpu().swiglu_forward(out.data(), gate.data(), up.data(), n);
    cpu().swiglu_backward(dg.data(), du.data(), g.data(), gate.data(), up.data(), n);
    std::vector<double> b_out(static_cast<size_t>(n)), b_dg(static_cast<size_t>(n)),
        b_du(static_cast<size_t>(n));
    for (size_t i = 0; i < size_t(n); ++i) {
      const double s = 1.0 / (1.0 + std::exp(-double(gate[i]))), silu = double(gate[i]) * s;
      const double t = s + silu * (1.0 - s), dup = std::abs(double(g[i]) * up[i]);
      b_out[i] = 16 * kU * std::abs(double(out[i]));
      b_dg[i] = 32 * kU * dup * (1 + std::abs(double(gate[i])) + std::abs(t)) +
                2 * kU * (std::abs(double(dg0[i])) + std::abs(double(dg[i])));
      b_du[i] = 14 * kU * std::abs(double(g[i]) * silu) +
                2 * kU * (std::abs(double(du0[i])) + std::abs(double(du[i])));
    }
    expect_close(c, "out", d_out.read(c), out, b_out);
    expect_close(c, "d_gate", d_dg.read(c), dg, b_dg);
    expect_close(c, "d_up", d_du.read(c), du, b_du);
  }
}

// ---- geglu ----------------------------------------------------------------------------------------

// As test_cuda_elementwise's geglu bound: tanhf within 2 ulp on either side, the two sides' t within
// E = 12u A (1 - t^2) + 8u |t| (A the tanh argument's terms), the CPU's operations in its order, and
// twice each resulting bound. Gates reach deep into both saturated tails (exactly 0 and x there), and
// NaN / Inf gates give NaN where the CPU does.
TEST_P(BackendOps, GegluForwardAndBackward) {
  const double k = 0.7978845608028654, cc = 0.044715;
  for (const int64_t n : {1, 7, 33, 100, 1031}) {
    const std::string c = ctx("geglu", "n=" + std::to_string(n));
    std::vector<float> gate = with_specials(random_floats(size_t(n), 1, 12.0f));
    if (n > 20) {
      const float tails[] = {-1000.0f, -100.0f, 0.0f, 100.0f, 1000.0f};
      std::copy(std::begin(tails), std::end(tails), gate.begin() + 10);
    }
    const std::vector<float> up = random_floats(size_t(n), 2, 2.0f), g = random_floats(size_t(n), 3);
    const std::vector<float> dg0 = random_floats(size_t(n), 4), du0 = random_floats(size_t(n), 5);
    Buf<float> d_gate(dev(), gate, "gate"), d_up(dev(), up, "up"), d_g(dev(), g, "d_out");
    Buf<float> d_out(dev(), std::vector<float>(size_t(n), kNaN), "out"), d_dg(dev(), dg0, "d_gate"),
        d_du(dev(), du0, "d_up");
    dev().geglu_forward(d_out.get(), d_gate.get(), d_up.get(), n);
    dev().geglu_backward(d_dg.get(), d_du.get(), d_g.get(), d_gate.get(), d_up.get(), n);
    std::vector<float> out(static_cast<size_t>(n)), dg = dg0, du = du0;
    cpu().geglu_forward(out.data(), gate.data(), up.data(), n);
    cpu().geglu_backward(dg.data(), du.data(), g.data(), gate.data(), up.data(), n);
    std::vector<double> b_out(static_cast<size_t>(n)), b_dg(static_cast<size_t>(n)),
        b_du(static_cast<size_t>(n));
    for (size_t i = 0; i < size_t(n); ++i) {
      const double x = gate[i], ax = std::abs(x), t = std::tanh(k * (x + cc * x * x * x)), s2 = 1 - t * t;
      const double E = 12 * kU * k * (ax + cc * ax * ax * ax) * s2 + 8 * kU * std::abs(t);
      const double P = 0.5 * ax * k * (1 + 3 * cc * x * x);
      const double dgelu = 0.5 * (1 + t) + 0.5 * x * s2 * k * (1 + 3 * cc * x * x);
      const double dup = std::abs(double(g[i]) * up[i]), hx = 0.5 * ax;
      b_out[i] =
          2 * (hx * std::abs(double(up[i])) * (E + 2 * kU * (1 + t)) + 4 * kU * std::abs(double(out[i])));
      b_dg[i] = 2 * (dup * (E / 2 + P * (2 * std::abs(t) * E + 2 * kU + 14 * kU * s2) + 2 * kU * (1 + t) +
                            6 * kU * std::abs(dgelu)) +
                     2 * kU * (std::abs(double(dg0[i])) + std::abs(double(dg[i]))));
      b_du[i] = 2 * (std::abs(double(g[i])) * hx * (E + 2 * kU * (1 + t)) +
                     4 * kU * std::abs(double(g[i]) * hx * (1 + t)) +
                     2 * kU * (std::abs(double(du0[i])) + std::abs(double(du[i]))));
    }
    expect_close(c, "out", d_out.read(c), out, b_out);
    expect_close(c, "d_gate", d_dg.read(c), dg, b_dg);
    expect_close(c, "d_up", d_du.read(c), du, b_du);
  }
}

// ---- fused lm_head + cross-entropy -----------------------------------------------------------------

struct CeCase {
  int64_t n, vocab, dim;
  DType dtype;
  float h_scale;
  int64_t ignore_from, ignore_to;  // rows [from, to) ignored, besides every fifth
};

// Logits z = h W^T are a GEMM whose f32 h the backend may round to bf16 (u_h = kUb) and whose W as
// placed too (u_w): they err by at most delta_i = rel_z max_v sum_d |h_d W_vd| per row. The loss
// lse(z) - z_t then moves by at most 2 delta_i, plus a few f32 roundings of exp and log on either
// side (16 u (|max| + log sum + |z_t| + 1)); each softmax probability by a factor within
// exp(+-(2 delta_i + 16 u)). d_h += sum_v g_v W_v with g = grad_scale (p - onehot) errs by
// grad_scale sum_v p_v (exp(2 delta_i + 16 u) - 1) |W_vd| plus rel_g sum_v |g_v W_vd|, rel_g
// covering d_logits rounded to bf16 and the f32 accumulation over the vocabulary, and 4 u |start|.
// Ignored rows add nothing. The loss is a double sum over rows on both sides; n_valid is exact.
TEST_P(BackendOps, LmHeadCrossEntropyLossAndGradient) {
  // 130 rows span several chunks with rows 64..127 ignored (a CPU chunk skipped whole); 160 rows
  // with 128..159 ignored skip a 128-row chunk; h_scale 30 gives logits in the hundreds.
  const CeCase cases[] = {
      {1, 7, 33, DType::F32, 1.0f, 0, 0},         {33, 300, 40, DType::F32, 1.0f, 0, 0},
      {130, 300, 33, DType::BF16, 1.0f, 64, 128}, {130, 100, 7, DType::F16, 1.0f, 64, 128},
      {33, 300, 33, DType::BF16, 30.0f, 0, 0},    {160, 50, 24, DType::F32, 1.0f, 128, 160}};
  uint64_t seed = 1;
  for (const CeCase& k : cases) {
    const std::string c =
        ctx("lm_head_cross_entropy", "n=" + std::to_string(k.n) + " vocab=" + std::to_string(k.vocab) +
                                         " dim=" + std::to_string(k.dim) + " " + describe_dtype(k.dtype) +
                                         " h_scale=" + std::to_string(k.h_scale));
    const auto w =
        place(dev(), make_weight(random_floats(size_t(k.vocab * k.dim), seed++), k.dtype, k.vocab, k.dim), c,
              "lm_head");
    const std::vector<float>& wv = w->host.values;
    const std::vector<float> h = random_floats(size_t(k.n * k.dim), seed++, k.h_scale);
    std::vector<int32_t> targets = random_ids(k.n, k.vocab, seed++);
    int64_t valid = 0;
    for (int64_t i = 0; i < k.n; ++i) {
      if (i % 5 == 3 || (i >= k.ignore_from && i < k.ignore_to)) targets[size_t(i)] = kIgnoreIndex;
      valid += targets[size_t(i)] != kIgnoreIndex;
    }
    const float grad_scale = 1.0f / float(valid);
    const std::vector<float> dh0 = random_floats(h.size(), seed++, 0.01f);
    Buf<float> d_h(dev(), h, "h"), d_dh(dev(), dh0, "d_h");
    Buf<int32_t> d_t(dev(), targets, "targets");
    int64_t got_valid = -1, loss_only_valid = -1, want_valid = -2;
    const double got =
        dev().lm_head_cross_entropy(d_dh.get(), &got_valid, d_h.get(), w->dev, d_t.get(), k.n, grad_scale);
    const double got_loss_only =
        dev().lm_head_cross_entropy(nullptr, &loss_only_valid, d_h.get(), w->dev, d_t.get(), k.n, grad_scale);
    std::vector<float> dh = dh0;
    const double want = cpu().lm_head_cross_entropy(dh.data(), &want_valid, h.data(), w->host.ref(),
                                                    targets.data(), k.n, grad_scale);
    EXPECT_EQ(want_valid, valid) << c;
    EXPECT_EQ(got_valid, valid) << c;
    EXPECT_EQ(loss_only_valid, valid) << c << " (no d_h)";

    const double u_w = w->gemm_rounding();
    const double rel_z = kUb + u_w + kUb * u_w + 2 * double(k.dim + 2) * kU;
    const double rel_g = kUb + u_w + kUb * u_w + 2 * double(k.vocab + 2) * kU;
    double loss_bound = 0;
    std::vector<double> dh_bound(h.size());
    for (size_t i = 0; i < h.size(); ++i) dh_bound[i] = 4 * kU * std::abs(double(dh0[i]));
    for (int64_t i = 0; i < k.n; ++i) {
      const int32_t t = targets[size_t(i)];
      if (t == kIgnoreIndex) continue;
      std::vector<double> z(size_t(k.vocab));
      double delta = 0, mx = -INFINITY;
      for (int64_t v = 0; v < k.vocab; ++v) {
        double acc = 0, mag = 0;
        for (int64_t d = 0; d < k.dim; ++d) {
          const double p = double(h[size_t(i * k.dim + d)]) * wv[size_t(v * k.dim + d)];
          acc += p;
          mag += std::abs(p);
        }
        z[size_t(v)] = acc;
        mx = std::max(mx, acc);
        delta = std::max(delta, rel_z * mag);
      }
      double sum = 0;
      for (const double zv : z) sum += std::exp(zv - mx);
      loss_bound += 2 * delta + 16 * kU * (std::abs(mx) + std::log(sum) + std::abs(z[size_t(t)]) + 1);
      for (int64_t d = 0; d < k.dim; ++d) {
        double b = 0;
        for (int64_t v = 0; v < k.vocab; ++v) {
          const double p = std::exp(z[size_t(v)] - mx) / sum;
          const double gv = double(grad_scale) * (p - (v == t ? 1.0 : 0.0));
          const double wa = std::abs(double(wv[size_t(v * k.dim + d)]));
          b += double(grad_scale) * p * std::expm1(2 * delta + 16 * kU) * wa + rel_g * std::abs(gv) * wa;
        }
        dh_bound[size_t(i * k.dim + d)] += b;
      }
    }
    expect_scalar(c, "loss", got, want, loss_bound);
    expect_scalar(c, "loss without d_h", got_loss_only, want, loss_bound);
    expect_close(c, "d_h", d_dh.read(c), dh, dh_bound);
  }
}

// All targets ignored: a zero loss, no valid row, d_h untouched. A target outside the vocabulary:
// the CPU's message, before anything is written.
TEST_P(BackendOps, LmHeadCrossEntropyIgnoredAndBadTargets) {
  const int64_t vocab = 10, dim = 4, n = 4;
  const auto w = place(dev(), make_weight(random_floats(size_t(vocab * dim), 9), DType::F32, vocab, dim),
                       ctx("lm_head_cross_entropy", "placement"), "lm_head");
  const std::vector<float> h(size_t(n * dim), 0.5f), dh0(size_t(n * dim), 0.25f);
  Buf<float> d_h(dev(), h, "h"), d_dh(dev(), dh0, "d_h");
  {
    const std::string c = ctx("lm_head_cross_entropy", "all targets ignored");
    Buf<int32_t> d_t(dev(), std::vector<int32_t>(size_t(n), kIgnoreIndex), "targets");
    int64_t n_valid = -1;
    EXPECT_EQ(dev().lm_head_cross_entropy(d_dh.get(), &n_valid, d_h.get(), w->dev, d_t.get(), n, 1.0f), 0.0)
        << c;
    EXPECT_EQ(n_valid, 0) << c;
    expect_untouched(c, "d_h", d_dh.read(c), dh0);
  }
  for (const int32_t bad : {10, -1, 1 << 30}) {
    const std::string c = ctx("lm_head_cross_entropy", "target " + std::to_string(bad) + " at row 3");
    const std::vector<int32_t> targets = {1, kIgnoreIndex, 2, bad};
    Buf<int32_t> d_t(dev(), targets, "targets");
    int64_t n_valid = 0;
    std::vector<float> dh = dh0;
    expect_same_error(
        c, error_of([&] {
          dev().lm_head_cross_entropy(d_dh.get(), &n_valid, d_h.get(), w->dev, d_t.get(), n, 1.0f);
        }),
        error_of([&] {
          cpu().lm_head_cross_entropy(dh.data(), &n_valid, h.data(), w->host.ref(), targets.data(), n, 1.0f);
        }));
    expect_untouched(c, "d_h", d_dh.read(c), dh0);
  }
}

// ---- elementwise steps -----------------------------------------------------------------------------

// Empty, one element, around SIMD widths and a 128-thread block, several blocks with a tail.
const int64_t kSizes[] = {0, 1, 7, 63, 64, 65, 129, 1031};

// Each is one correctly rounded f32 operation per element on both sides (IEEE add and multiply are
// the same on a GPU as on the CPU), so the results agree bit for bit, NaNs as NaNs.
TEST_P(BackendOps, AddScaleFillCopyBitForBit) {
  for (const int64_t n : kSizes) {
    const std::string c = ctx("add_inplace / scale_inplace / copy / fill", "n=" + std::to_string(n));
    const std::vector<float> x = with_specials(random_floats(size_t(n), 1)), y0 = random_floats(size_t(n), 2);
    Buf<float> d_x(dev(), x, "x"), d_y(dev(), y0, "y"), d_z(dev(), y0, "z"), d_f(dev(), y0, "f");
    std::vector<float> y = y0, z = y0, f = y0;
    dev().add_inplace(d_y.get(), d_x.get(), n);
    cpu().add_inplace(y.data(), x.data(), n);
    dev().scale_inplace(d_y.get(), 0.37f, n);
    cpu().scale_inplace(y.data(), 0.37f, n);
    dev().copy(d_z.get(), d_x.get(), n);
    cpu().copy(z.data(), x.data(), n);
    dev().fill(d_f.get(), -2.5f, n);
    cpu().fill(f.data(), -2.5f, n);
    expect_same(c, "add then scale", d_y.read(c), y);
    expect_untouched(c, "copy", d_z.read(c), z);
    expect_untouched(c, "fill", d_f.read(c), f);
  }
}

// The bias as stored (a [1, width] weight, placed as it is), widened exactly, then one f32 add.
TEST_P(BackendOps, AddBiasForEveryFloatType) {
  struct Shape {
    int64_t rows, width;
  };
  for (const Shape s : {Shape{1, 1}, Shape{7, 33}, Shape{40, 129}}) {
    for (const DType dt : kFloatTypes) {
      const std::string c = ctx(
          "add_bias", describe_dtype(dt) + " " + std::to_string(s.rows) + " x " + std::to_string(s.width));
      const auto bias =
          place(dev(), make_weight(random_floats(size_t(s.width), 3), dt, 1, s.width), c, "bias");
      const std::vector<float> y0 = with_specials(random_floats(size_t(s.rows * s.width), 4));
      Buf<float> d_y(dev(), y0, "y");
      dev().add_bias(d_y.get(), bias->dev, s.rows, s.width);
      std::vector<float> y = y0;
      cpu().add_bias(y.data(), bias->host.ref(), s.rows, s.width);
      expect_same(c, "y", d_y.read(c), y);
    }
  }
}

// Every term x^2 is exact in double, so each side only rounds its n - 1 additions of non-negative
// terms (in double, as the op list says): within (n - 1) u_d S of the exact sum S, so the two within
// 2 (n + 1) u_d S. An infinity gives +inf and a NaN NaN on both. 20011 elements take several
// chunks of the CPU's ordered sum and two passes on a device.
TEST_P(BackendOps, SumSquaresInDouble) {
  std::vector<int64_t> sizes(std::begin(kSizes), std::end(kSizes));
  sizes.push_back(20011);
  for (const int64_t n : sizes) {
    for (const int special : {0, 1, 2}) {  // none, an infinity, a NaN
      if (special && n < 2) continue;
      const std::string c = ctx("sum_squares", "n=" + std::to_string(n) +
                                                   (special == 1   ? " with inf"
                                                    : special == 2 ? " with NaN"
                                                                   : ""));
      std::vector<float> x = random_floats(size_t(n), 5, 3.0f);
      if (special) x[size_t(n / 2)] = special == 1 ? -kInf : kNaN;
      Buf<float> d_x(dev(), x, "x");
      const double got = dev().sum_squares(d_x.get(), n);
      const double want = cpu().sum_squares(x.data(), n);
      double S = 0;
      for (const float v : x) S += double(v) * v;
      expect_scalar(c, "sum", got, want, 2 * double(n + 1) * kUd * S);
    }
  }
}

// Element i is dropped when Philox(seed, stream).uniform(i) < p: the same mask, and kept values
// scaled by one rounding with the same factor, so bit for bit (NaN inputs included). p = 0 is the
// identity; p = 1 is refused with the CPU's message, nothing written.
TEST_P(BackendOps, DropoutMasksBitForBit) {
  std::vector<int64_t> sizes(std::begin(kSizes), std::end(kSizes));
  sizes.push_back(20011);
  for (const int64_t n : sizes) {
    for (const float p : {0.25f, 0.0f, 0.9f}) {
      const std::string c = ctx("dropout_forward", "n=" + std::to_string(n) + " p=" + std::to_string(p));
      const std::vector<float> x = with_specials(random_floats(size_t(n), 6));
      const uint64_t stream = (uint64_t(3) << 40) | 9;
      Buf<float> d_x(dev(), x, "x"), d_out(dev(), std::vector<float>(size_t(n), kNaN), "out");
      const uint64_t first = uint64_t(n) * 3;
      dev().dropout_forward(d_out.get(), d_x.get(), n, p, 77, stream, first);
      std::vector<float> out(static_cast<size_t>(n));
      cpu().dropout_forward(out.data(), x.data(), n, p, 77, stream, first);
      expect_same(c, "out", d_out.read(c), out);
    }
  }
  const std::string c = ctx("dropout_forward", "p=1");
  const std::vector<float> x(64, 1.0f), out0(64, 2.0f);
  Buf<float> d_x(dev(), x, "x"), d_out(dev(), out0, "out");
  std::vector<float> out = out0;
  expect_same_error(c, error_of([&] { dev().dropout_forward(d_out.get(), d_x.get(), 64, 1.0f, 1, 1, 0); }),
                    error_of([&] { cpu().dropout_forward(out.data(), x.data(), 64, 1.0f, 1, 1, 0); }));
  expect_untouched(c, "out", d_out.read(c), out0);
}

// The backward from the same mask: dx gains the kept gradient, scaled, and the gradient's buffer
// leaves holding dropout(x), bit for bit the CPU's; p = 1 is refused with the CPU's message.
TEST_P(BackendOps, DropoutBackwardBitForBit) {
  std::vector<int64_t> sizes(std::begin(kSizes), std::end(kSizes));
  sizes.push_back(20011);
  for (const int64_t n : sizes) {
    for (const float p : {0.25f, 0.0f, 0.9f}) {
      const std::string c = ctx("dropout_backward", "n=" + std::to_string(n) + " p=" + std::to_string(p));
      const std::vector<float> x = with_specials(random_floats(size_t(n), 6)),
                               g = random_floats(size_t(n), 7);
      const std::vector<float> dx0 = random_floats(size_t(n), 8);
      const uint64_t stream = (uint64_t(3) << 40) | 10;
      Buf<float> d_x(dev(), x, "x"), d_g(dev(), g, "g"), d_dx(dev(), dx0, "dx");
      const uint64_t first = uint64_t(n) * 3;
      dev().dropout_backward(d_dx.get(), d_g.get(), d_x.get(), n, p, 77, stream, first);
      std::vector<float> dx = dx0, gg = g;
      cpu().dropout_backward(dx.data(), gg.data(), x.data(), n, p, 77, stream, first);
      expect_same(c, "dx", d_dx.read(c), dx);
      expect_same(c, "g", d_g.read(c), gg);
    }
  }
  const std::string c = ctx("dropout_backward", "p=1");
  const std::vector<float> x(64, 1.0f), g0(64, 2.0f);
  Buf<float> d_x(dev(), x, "x"), d_g(dev(), g0, "g"), d_dx(dev(), g0, "dx");
  std::vector<float> dx = g0, g = g0;
  expect_same_error(
      c, error_of([&] { dev().dropout_backward(d_dx.get(), d_g.get(), d_x.get(), 64, 1.0f, 1, 1, 0); }),
      error_of([&] { cpu().dropout_backward(dx.data(), g.data(), x.data(), 64, 1.0f, 1, 1, 0); }));
  expect_untouched(c, "g", d_g.read(c), g0);
  expect_untouched(c, "dx", d_dx.read(c), g0);
}

// ---- AdamW -----------------------------------------------------------------------------------------

// Both sides run the CPU's operations in its order with the same f32 scalars; the compilers may
// contract different multiply-adds into FMAs, which removes a rounding here or there. Against exact
// arithmetic on those scalars, per side: v = v b2 + (1 - b2) g^2 (non-negative terms) within 3u v;
// m = lerp within 2u (|g| + |m0|) + u |m|; denom = sqrt(v) / bc + eps within 5u relative;
// param = p decay - lr' m / denom within u |p decay| + u |param| + 7u |update| + lr' |dm| / denom.
// The two sides are within twice each bound; a NaN or Inf gradient makes its parameter NaN.
TEST_P(BackendOps, AdamWUpdate) {
  AdamWParams first;
  first.lr = 1e-2f;
  first.weight_decay = 0.1f;
  AdamWParams second = first;
  second.step = 2;
  AdamWParams later;
  later.lr = 3e-4f;
  later.weight_decay = 0.01f;
  later.step = 7;
  for (const AdamWParams& hp : {first, second, later}) {
    for (const int64_t n : kSizes) {
      const std::string c =
          ctx("adamw_update", "n=" + std::to_string(n) + " step " + std::to_string(hp.step));
      const std::vector<float> p0 = random_floats(size_t(n), 13),
                               g = with_specials(random_floats(size_t(n), 14, 0.1f));
      const std::vector<float> m0 = random_floats(size_t(n), 15, 0.01f);
      std::vector<float> v0 = random_floats(size_t(n), 16, 1e-3f);
      for (float& v : v0) v = std::abs(v);
      if (n > 0) v0[0] = 0.0f;  // first step of a fresh moment: eps decides the denominator
      Buf<float> d_p(dev(), p0, "param"), d_g(dev(), g, "grad"), d_m(dev(), m0, "m"), d_v(dev(), v0, "v");
      dev().adamw_update(d_p.get(), d_g.get(), d_m.get(), d_v.get(), n, hp);
      std::vector<float> p = p0, m = m0, v = v0;
      cpu().adamw_update(p.data(), g.data(), m.data(), v.data(), n, hp);
      const ref::AdamWScalars<double> s(hp);
      std::vector<double> bp(static_cast<size_t>(n)), bm(static_cast<size_t>(n)), bv(static_cast<size_t>(n));
      for (size_t i = 0; i < size_t(n); ++i) {
        const double denom = std::sqrt(double(v[i])) / s.bias_correction2_sqrt + s.eps;
        const double update = s.step_size * std::abs(double(m[i])) / denom;
        const double dm_side =
            2 * kU * (std::abs(double(g[i])) + std::abs(double(m0[i]))) + kU * std::abs(double(m[i]));
        bv[i] = 6 * kU * v[i];
        bm[i] = 2 * dm_side;
        bp[i] = 2 * kU * (std::abs(p0[i] * s.decay) + std::abs(double(p[i]))) + 14 * kU * update +
                2 * s.step_size * dm_side / denom;
      }
      expect_close(c, "param", d_p.read(c), p, bp);
      expect_close(c, "m", d_m.read(c), m, bm);
      expect_close(c, "v", d_v.read(c), v, bv);
    }
  }
  const std::string c = ctx("adamw_update", "step 0");
  AdamWParams bad;
  bad.step = 0;
  const std::vector<float> one(1, 1.0f);
  Buf<float> d_p(dev(), one, "param"), d_g(dev(), one, "grad"), d_m(dev(), one, "m"), d_v(dev(), one, "v");
  std::vector<float> p = one, g = one, m = one, v = one;
  expect_same_error(c,
                    error_of([&] { dev().adamw_update(d_p.get(), d_g.get(), d_m.get(), d_v.get(), 1, bad); }),
                    error_of([&] { cpu().adamw_update(p.data(), g.data(), m.data(), v.data(), 1, bad); }));
  expect_untouched(c, "param", d_p.read(c), one);
}

// ---- refused arguments -----------------------------------------------------------------------------

// What the CPU refuses (the bad operands, weights and shapes of the CPU tests), the backend refuses
// too, before it writes anything. The messages may name the backend's own limits, so only the
// refusal is compared.
TEST_P(BackendOps, RefusesWhatTheCpuRefuses) {
  const std::vector<float> zeros(64, 0.0f), out0 = random_floats(64, 3);
  Buf<float> d_in(dev(), zeros, "input"), d_out(dev(), out0, "output");
  std::vector<float> in = zeros, out = out0;
  struct Call {
    const char* what;
    std::function<void(Backend&, float* out, const float* in)> call;
  };
  const auto w = [](const float* p, DType t, int64_t rows, int64_t cols) {
    return WeightRef(p, t, rows, cols);
  };
  const Call calls[] = {
      {"matmul with lda 3 < K 4",
       [](Backend& b, float* o, const float* i) {
         b.matmul(o, 4, {i, DType::F32, 3, false}, {i, DType::F32, 4, false}, 4, 4, 4, 1.0f, 0.0f);
       }},
      {"matmul with a transposed bf16 B of ldb 2 < K 4",
       [](Backend& b, float* o, const float* i) {
         b.matmul(o, 4, {i, DType::F32, 4, false}, {i, DType::BF16, 2, true}, 4, 4, 4, 1.0f, 0.0f);
       }},
      {"matmul with an i32 operand",
       [](Backend& b, float* o, const float* i) {
         b.matmul(o, 4, {i, DType::I32, 4, false}, {i, DType::F32, 4, false}, 4, 4, 4, 1.0f, 0.0f);
       }},
      {"matmul with ldc 3 < N 4",
       [](Backend& b, float* o, const float* i) {
         b.matmul(o, 3, {i, DType::F32, 4, false}, {i, DType::F32, 4, false}, 4, 4, 4, 1.0f, 0.0f);
       }},
      {"rmsnorm with an i32 weight",
       [&](Backend& b, float* o, const float* i) {
         b.rmsnorm_forward(o, o + 32, i, w(i, DType::I32, 1, 8), 1, 8, 1e-6f);
       }},
      {"rmsnorm with a 1x7 weight for dim 8",
       [&](Backend& b, float* o, const float* i) {
         b.rmsnorm_forward(o, o + 32, i, w(i, DType::F32, 1, 7), 1, 8, 1e-6f);
       }},
      {"attention with 3 heads over 2 kv heads",
       [](Backend& b, float* o, const float* i) {
         AttentionShape s;
         s.seq = 1;
         s.n_heads = 3;
         s.n_kv_heads = 2;
         s.head_dim = 4;
         s.scale = 0.5f;
         b.attention_forward(o, o + 32, i, i, i, nullptr, s);
       }},
      {"attention with head_dim 0",
       [](Backend& b, float* o, const float* i) {
         AttentionShape s;
         s.seq = 1;
         s.n_heads = 2;
         s.n_kv_heads = 2;
         s.scale = 0.5f;
         b.attention_forward(o, o + 32, i, i, i, nullptr, s);
       }},
      {"attention_cached_forward with 3 heads over 2 kv heads",
       [](Backend& b, float* o, const float* i) {
         b.attention_cached_forward(o, i, i, i, 0, 1, 3, 2, 4, 0.5f, 0);
       }},
      {"attention_cached_forward with n_past -1",
       [](Backend& b, float* o, const float* i) {
         b.attention_cached_forward(o, i, i, i, -1, 1, 2, 2, 4, 0.5f, 0);
       }},
      {"attention_cached_forward with n_new -1",
       [](Backend& b, float* o, const float* i) {
         b.attention_cached_forward(o, i, i, i, 0, -1, 2, 2, 4, 0.5f, 0);
       }},
  };
  for (const Call& c : calls) {
    const std::string cx = ctx("refusal", c.what);
    EXPECT_NE(error_of([&] { c.call(cpu(), out.data(), in.data()); }), "(no error)") << cx << ": the cpu";
    EXPECT_NE(error_of([&] { c.call(dev(), d_out.get(), d_in.get()); }), "(no error)") << cx;
    expect_untouched(cx, "output", d_out.read(cx), out0);
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::Values("simt", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

}  // namespace
}  // namespace tf
