// defines: bench_gpu_kernels, the GPU kernel benchmark: the CUDA backend's attention and quantized
// matmul against their baselines, beside the bf16 GEMM ceiling of the same run.
//
//   build/benchmarks/bench_gpu_kernels [--quick] [--json FILE] [--allow-no-gpu]
//
// On GPU 0, each figure is the median of several calls (after warm-up), timed with CUDA events on
// the launchers' stream:
// - the ceiling: a 4096^3 bf16 x bf16 -> f32 GEMM through blas::gemm (cuBLASLt), in TFLOP/s;
// - causal attention, GQA 4:1 (32 query heads, 8 kv heads), head dims 64 and 128, at sequence
//   lengths 512 .. 16384 (16384 tokens a call: batch 16384 / seq): forward and backward TFLOP/s of
//   the flash kernels (tf::cuda::flash_attention_*), the plain tiled f32 kernels
//   (tf::cuda::attention_*; only up to seq 4096, beyond which a call takes seconds) and cuDNN's
//   fused attention (tf::cuda::cudnn_attention_*), and each as a percentage of the ceiling. FLOPs
//   count the causal half: forward 2 B S^2 H D, backward 2.5 times that;
// - frozen linear layers on Llama-3-8B's projection shapes (q/o 4096 x 4096, k/v 1024 x 4096,
//   gate/up 14336 x 4096, down 4096 x 14336) at 64, 512, 2048 and 8192 tokens, per quantized dtype:
//   the fused dequantize + matmul (tf::cuda::qmatmul_forward / _backward_input), dequantize +
//   cuBLASLt (tf::cuda::quant_linear_forward / _backward_input, kernels/cuda/dequant.h) and the
//   bf16 cuBLASLt product of the same shape, in ms and as a ratio to bf16. Weights are random,
//   quantized on the host with tf::ref's quantizers (NF4 with double quantization, INT8, Q8_0, Q4_0,
//   Q4_1, Q5_0, Q5_1); the k-quants, which have no quantizer here, get random codes under finite
//   scales (the values do not change the work).
// --quick measures a subset (seq 1024 and 4096 at head dim 128, plain at 1024 only; q/o and
// gate/up at 2048 tokens; NF4, INT8, Q4_0, Q8_0, Q4_K) for tools/gpu-check.sh. --json writes every
// figure, and every failure's message, to FILE. A launcher that throws shows its message in place
// of its figure and the run goes on; the exit status is 1 when any did. Without a GPU it says why
// and exits 1, or 0 with --allow-no-gpu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/qmatmul.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/core/rng.h"

using namespace tf;
namespace rt = tf::cuda::rt;
using nlohmann::json;

namespace {

struct Options {
  bool quick = false;
  bool allow_no_gpu = false;
  std::string json_path;
};

// One measurement: the median in ms, or the message of the error that stopped it.
struct Timing {
  std::optional<double> ms;
  std::string error;
};

// The first line of an error, short enough for a table cell.
std::string short_error(const std::string& what) {
  std::string line = what.substr(0, what.find('\n'));
  return line.size() <= 160 ? line : line.substr(0, 157) + "...";
}

class Timer {
 public:
  Timer(int warmup, int reps) : warmup_(warmup), reps_(reps) {
    TF_CUDA_CHECK(cudaEventCreate(&start_));
    TF_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~Timer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // The median of reps_ calls of f after warmup_ more; an error (a tf::Error from a launcher, or a
  // fault the stream reports) ends the measurement with its message.
  Timing median(const std::function<void()>& f) const {
    const auto stream = static_cast<cudaStream_t>(rt::current_stream());
    try {
      for (int i = 0; i < warmup_; ++i) f();
      TF_CUDA_CHECK(cudaStreamSynchronize(stream));
      std::vector<double> ms;
      for (int i = 0; i < reps_; ++i) {
        TF_CUDA_CHECK(cudaEventRecord(start_, stream));
        f();
        TF_CUDA_CHECK(cudaEventRecord(stop_, stream));
        TF_CUDA_CHECK(cudaEventSynchronize(stop_));
        float t = 0;
        TF_CUDA_CHECK(cudaEventElapsedTime(&t, start_, stop_));
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      return {ms[ms.size() / 2], ""};
    } catch (const Error& e) {
      // A launcher that threw may have left work queued; what it queued must finish (or fail)
      // before the next measurement starts.
      (void)cudaStreamSynchronize(stream);
      (void)cudaGetLastError();
      return {std::nullopt, short_error(e.what())};
    }
  }

 private:
  int warmup_, reps_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Device memory for the run, freed at the end of its scope.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes, const char* what) : bytes_(bytes) {
    p_ = bytes ? rt::device_alloc(bytes, what) : nullptr;
  }
  template <typename T>
  DeviceBuffer(const std::vector<T>& host, const char* what) : DeviceBuffer(host.size() * sizeof(T), what) {
    if (bytes_) rt::memcpy_h2d(p_, host.data(), bytes_, rt::current_stream());
  }
  ~DeviceBuffer() { rt::device_free(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  void zero() const { rt::memset_async(p_, 0, bytes_, rt::current_stream()); }

 private:
  size_t bytes_;
  void* p_;
};

std::vector<float> random_floats(size_t n, uint64_t seed, float scale) {
  const Philox rng(seed, 0xbe7c);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (2.0f * rng.uniform(i) - 1.0f) * scale;
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

std::string cell(const Timing& t, double value, const char* format) {
  if (!t.ms) return "error";
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, value);
  return buf;
}

// ---- the ceiling ---------------------------------------------------------------------------------

double gemm_ceiling(const Timer& timer, json& out) {
  constexpr int64_t n = 4096;
  const DeviceBuffer a(to_bf16(random_floats(size_t(n * n), 1, 1.0f)), "bench gemm A");
  const DeviceBuffer b(to_bf16(random_floats(size_t(n * n), 2, 1.0f)), "bench gemm B");
  const DeviceBuffer c(size_t(n * n) * sizeof(float), "bench gemm C");
  cuda::blas::Gemm g;
  g.a = a.get();
  g.lda = n;
  g.b = b.get();
  g.ldb = n;
  g.type = cuda::blas::ElemType::BF16;
  g.c = c.get<float>();
  g.ldc = n;
  g.m = g.n = g.k = n;
  const Timing t = timer.median([&] { cuda::blas::gemm(g); });
  const double tflops = t.ms ? 2.0 * double(n) * n * n / (*t.ms * 1e-3) / 1e12 : 0.0;
  out["gemm_bf16"] = {{"m", n},           {"n", n},          {"k", n}, {"ms", t.ms ? json(*t.ms) : json()},
                      {"tflops", tflops}, {"error", t.error}};
  std::printf("ceiling: bf16 GEMM 4096^3 (cuBLASLt, f32 accumulation and output): %s TFLOP/s%s%s\n\n",
              cell(t, tflops, "%.1f").c_str(), t.ms ? "" : " ", t.error.c_str());
  return tflops;
}

// ---- attention -----------------------------------------------------------------------------------

struct AttentionImpl {
  const char* name;
  void (*forward)(float*, float*, const float*, const float*, const float*, const int32_t*,
                  const AttentionShape&);
  void (*backward)(float*, float*, float*, const float*, const float*, const float*, const float*,
                   const float*, const float*, const int32_t*, const AttentionShape&);
};

bool bench_attention(const Options& opt, const Timer& timer, double ceiling, json& out) {
  const std::vector<AttentionImpl> impls = {
      {"flash", cuda::flash_attention_forward, cuda::flash_attention_backward},
      {"plain", cuda::attention_forward, cuda::attention_backward},
      {"cudnn", cuda::cudnn_attention_forward, cuda::cudnn_attention_backward},
  };
  std::string cudnn_why;
  const bool cudnn = cuda::cudnn_attention_available(&cudnn_why);
  const std::vector<int> seqs =
      opt.quick ? std::vector<int>{1024, 4096} : std::vector<int>{512, 1024, 2048, 4096, 8192, 16384};
  const std::vector<int> dims = opt.quick ? std::vector<int>{128} : std::vector<int>{64, 128};
  const int plain_max_seq = opt.quick ? 1024 : 4096;
  constexpr int kTokens = 16384, kHeads = 32, kKvHeads = 8;
  std::printf("attention: causal, GQA %d:%d, %d tokens a call; TFLOP/s (%% of the GEMM ceiling)\n", kHeads,
              kKvHeads, kTokens);
  std::printf("  %-5s %6s %4s %5s  %-26s %-26s\n", "impl", "seq", "dim", "batch", "forward", "backward");
  if (!cudnn) std::printf("  (cudnn: %s)\n", cudnn_why.c_str());
  bool ok = true;
  json rows = json::array();
  for (const int dim : dims) {
    // Every length runs kTokens tokens, so one set of buffers serves them all.
    const size_t nq = size_t(kTokens) * kHeads * dim, nkv = size_t(kTokens) * kKvHeads * dim;
    const DeviceBuffer q(random_floats(nq, 3, 1.0f), "bench q"), k(random_floats(nkv, 4, 1.0f), "bench k"),
        v(random_floats(nkv, 5, 1.0f), "bench v"), d_out(random_floats(nq, 6, 1.0f), "bench d_out");
    const DeviceBuffer o(nq * sizeof(float), "bench out"),
        lse(size_t(kTokens) * kHeads * sizeof(float), "bench lse");
    const DeviceBuffer dq(nq * sizeof(float), "bench dq"), dk(nkv * sizeof(float), "bench dk"),
        dv(nkv * sizeof(float), "bench dv");
    dq.zero();
    dk.zero();
    dv.zero();
    for (const int seq : seqs) {
      const int batch = kTokens / seq;
      const AttentionShape s{batch, seq, kHeads, kKvHeads, dim, float(1.0 / std::sqrt(double(dim)))};
      const double fwd_flops = 2.0 * batch * double(seq) * seq * kHeads * dim;
      const double bwd_flops = 2.5 * fwd_flops;
      for (const AttentionImpl& impl : impls) {
        json row = {{"impl", impl.name}, {"seq", seq},      {"head_dim", dim},
                    {"batch", batch},    {"heads", kHeads}, {"kv_heads", kKvHeads}};
        std::string skipped;
        if (std::string(impl.name) == "plain" && seq > plain_max_seq)
          skipped = "skipped: the plain f32 kernel is too slow at this length";
        if (std::string(impl.name) == "cudnn" && !cudnn) skipped = "n/a: " + cudnn_why;
        if (!skipped.empty()) {
          row["skipped"] = skipped;
          rows.push_back(row);
          std::printf("  %-5s %6d %4d %5d  %s\n", impl.name, seq, dim, batch, skipped.c_str());
          continue;
        }
        const Timing f = timer.median([&] {
          impl.forward(o.get<float>(), lse.get<float>(), q.get<float>(), k.get<float>(), v.get<float>(),
                       nullptr, s);
        });
        const Timing b = timer.median([&] {
          impl.backward(dq.get<float>(), dk.get<float>(), dv.get<float>(), d_out.get<float>(), q.get<float>(),
                        k.get<float>(), v.get<float>(), o.get<float>(), lse.get<float>(), nullptr, s);
        });
        const double f_tf = f.ms ? fwd_flops / (*f.ms * 1e-3) / 1e12 : 0.0;
        const double b_tf = b.ms ? bwd_flops / (*b.ms * 1e-3) / 1e12 : 0.0;
        auto figure = [&](const Timing& t, double rate) {
          return t.ms ? cell(t, rate, "%.1f") + " (" + cell(t, 100.0 * rate / ceiling, "%.0f") + " %)"
                      : t.error;
        };
        std::printf("  %-5s %6d %4d %5d  %-26s %-26s\n", impl.name, seq, dim, batch, figure(f, f_tf).c_str(),
                    figure(b, b_tf).c_str());
        for (const auto& [dir, t, rate] : {std::tuple{"forward", f, f_tf}, std::tuple{"backward", b, b_tf}}) {
          row[dir] = {{"ms", t.ms ? json(*t.ms) : json()},
                      {"tflops", rate},
                      {"percent_of_gemm", ceiling > 0 ? 100.0 * rate / ceiling : 0.0},
                      {"error", t.error}};
          ok = ok && t.ms.has_value();
        }
        rows.push_back(row);
      }
    }
  }
  out["attention"] = rows;
  std::printf("\n");
  return ok;
}

// ---- quantized matmul ----------------------------------------------------------------------------

// A quantized weight in device memory, from random host values.
struct DeviceWeight {
  std::vector<std::unique_ptr<DeviceBuffer>> buffers;
  WeightRef ref;
};

GgmlType ggml_type(DType t) {
  switch (t) {
    case DType::Q8_0: return GgmlType::Q8_0;
    case DType::Q4_0: return GgmlType::Q4_0;
    case DType::Q4_1: return GgmlType::Q4_1;
    case DType::Q5_0: return GgmlType::Q5_0;
    case DType::Q5_1: return GgmlType::Q5_1;
    default: TF_FAIL("bench_gpu_kernels: ", dtype_name(t), " has no ggml quantizer");
  }
}

// Byte offsets of the f16 scale fields of a k-quant block, set to finite values over random codes.
std::vector<size_t> k_quant_scales(DType t) {
  switch (t) {
    case DType::Q2_K: return {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)};
    case DType::Q3_K: return {offsetof(BlockQ3_K, d)};
    case DType::Q4_K: return {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)};
    case DType::Q5_K: return {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)};
    case DType::Q6_K: return {offsetof(BlockQ6_K, d)};
    default: TF_FAIL("bench_gpu_kernels: ", dtype_name(t), " is not a k-quant");
  }
}

DeviceWeight quantize_to_device(DType t, const std::vector<float>& w, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  DeviceWeight dw;
  auto upload = [&](const auto& host) {
    dw.buffers.push_back(std::make_unique<DeviceBuffer>(host, "bench quantized weight"));
    return dw.buffers.back()->get();
  };
  QuantScales scales;
  const void* data = nullptr;
  if (t == DType::NF4) {
    std::vector<uint8_t> codes(size_t(ref::nf4_packed_bytes(n)));
    std::vector<float> absmax(size_t(ref::quant_blocks(n, kNf4Block)));
    ref::quantize_nf4(w.data(), n, codes.data(), absmax.data());
    std::vector<uint8_t> absmax_codes(absmax.size());
    std::vector<float> nested(size_t(ref::quant_blocks(int64_t(absmax.size()), kNf4NestedBlock)));
    scales.offset = ref::double_quantize_absmax(absmax.data(), int64_t(absmax.size()), absmax_codes.data(),
                                                nested.data());
    data = upload(codes);
    scales.absmax = upload(absmax_codes);
    scales.nested = static_cast<const float*>(upload(nested));
  } else if (t == DType::INT8) {
    std::vector<int8_t> codes(static_cast<size_t>(n));
    std::vector<float> absmax(size_t(ref::quant_blocks(n, kInt8Block)));
    ref::quantize_int8(w.data(), n, codes.data(), absmax.data());
    data = upload(codes);
    scales.absmax = upload(absmax);
  } else if (t >= DType::Q2_K && t <= DType::Q6_K) {
    std::vector<uint8_t> blocks(size_t(dtype_bytes(t, n)));
    const Philox rng(11, uint64_t(t));
    for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = uint8_t(rng.u32(i));
    const uint16_t scale = f32_to_f16(1.0f / 64);
    const size_t block_bytes = size_t(dtype_block_bytes(t));
    for (size_t at = 0; at < blocks.size(); at += block_bytes)
      for (const size_t field : k_quant_scales(t)) std::memcpy(&blocks[at + field], &scale, sizeof(scale));
    data = upload(blocks);
  } else {
    std::vector<uint8_t> blocks(size_t(dtype_bytes(t, n)));
    ref::quantize_rows_ggml(ggml_type(t), w.data(), n, blocks.data());
    data = upload(blocks);
  }
  dw.ref = WeightRef(data, t, rows, cols, scales);
  return dw;
}

struct Projection {
  const char* name;
  int64_t rows, cols;
};

bool bench_qmatmul(const Options& opt, const Timer& timer, json& out) {
  const std::vector<Projection> shapes =
      opt.quick
          ? std::vector<Projection>{{"q/o", 4096, 4096}, {"gate/up", 14336, 4096}}
          : std::vector<Projection>{
                {"q/o", 4096, 4096}, {"k/v", 1024, 4096}, {"gate/up", 14336, 4096}, {"down", 4096, 14336}};
  const std::vector<int64_t> token_counts =
      opt.quick ? std::vector<int64_t>{2048} : std::vector<int64_t>{64, 512, 2048, 8192};
  const std::vector<DType> dtypes =
      opt.quick
          ? std::vector<DType>{DType::NF4, DType::INT8, DType::Q4_0, DType::Q8_0, DType::Q4_K}
          : std::vector<DType>{DType::NF4,  DType::INT8, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0,
                               DType::Q5_1, DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K};
  const int64_t max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  std::printf(
      "quantized matmul: ms of y = x W^T (fwd) and dx = dy W (bwd); ratio to bf16 cuBLASLt of the shape\n");
  std::printf("  %-5s %-8s %6s  %-22s %-22s %-22s %-22s %-12s\n", "dtype", "shape", "tokens", "fused fwd",
              "fused bwd", "dequant+cuBLASLt fwd", "dequant+cuBLASLt bwd", "bf16 fwd/bwd");
  bool ok = true;
  json rows = json::array();
  for (const Projection& p : shapes) {
    const std::vector<float> w = random_floats(size_t(p.rows * p.cols), 7, 0.05f);
    const DeviceBuffer w_bf16(to_bf16(w), "bench bf16 weight");
    const WeightRef bf16(w_bf16.get(), DType::BF16, p.rows, p.cols);
    const DeviceBuffer x(random_floats(size_t(max_tokens * p.cols), 8, 1.0f), "bench x");
    const DeviceBuffer dy(random_floats(size_t(max_tokens * p.rows), 9, 1.0f), "bench dy");
    const DeviceBuffer y(size_t(max_tokens * p.rows) * sizeof(float), "bench y");
    const DeviceBuffer dx(size_t(max_tokens * p.cols) * sizeof(float), "bench dx");
    // The bf16 products of each token count, shared by every dtype.
    std::vector<std::pair<Timing, Timing>> base;
    for (const int64_t n : token_counts)
      base.emplace_back(
          timer.median([&] { cuda::linear_forward(y.get<float>(), x.get<float>(), bf16, n, 0.0f); }),
          timer.median(
              [&] { cuda::linear_backward_input(dx.get<float>(), dy.get<float>(), bf16, n, 0.0f); }));
    for (const DType dt : dtypes) {
      const std::string name(dtype_name(dt));
      std::optional<DeviceWeight> dw;
      std::string quant_error;
      try {
        dw = quantize_to_device(dt, w, p.rows, p.cols);
      } catch (const Error& e) {
        quant_error = short_error(e.what());
      }
      for (size_t ti = 0; ti < token_counts.size(); ++ti) {
        const int64_t n = token_counts[ti];
        json row = {{"dtype", name}, {"shape", p.name}, {"rows", p.rows}, {"cols", p.cols}, {"tokens", n}};
        if (!dw) {
          row["error"] = quant_error;
          rows.push_back(row);
          std::printf("  %-5s %-8s %6lld  %s\n", name.c_str(), p.name, (long long)n, quant_error.c_str());
          ok = false;
          continue;
        }
        const WeightRef W = dw->ref;
        const int64_t tile_rows = cuda::quant_tile_rows(W);
        const Timing ff =
            timer.median([&] { cuda::qmatmul_forward(y.get<float>(), x.get<float>(), W, n, 0.0f); });
        const Timing fb =
            timer.median([&] { cuda::qmatmul_backward_input(dx.get<float>(), dy.get<float>(), W, n, 0.0f); });
        const Timing df = timer.median(
            [&] { cuda::quant_linear_forward(y.get<float>(), x.get<float>(), W, n, 0.0f, tile_rows); });
        const Timing db = timer.median([&] {
          cuda::quant_linear_backward_input(dx.get<float>(), dy.get<float>(), W, n, 0.0f, tile_rows);
        });
        const auto& [bf, bb] = base[ti];
        auto figure = [](const Timing& t, const Timing& bf16_t) {
          if (!t.ms) return std::string("error: ") + t.error.substr(0, 14);
          char buf[64];
          if (bf16_t.ms)
            std::snprintf(buf, sizeof(buf), "%.3f (%.2fx)", *t.ms, *t.ms / *bf16_t.ms);
          else
            std::snprintf(buf, sizeof(buf), "%.3f", *t.ms);
          return std::string(buf);
        };
        char base_cell[64];
        std::snprintf(base_cell, sizeof(base_cell), "%.3f/%.3f", bf.ms.value_or(NAN), bb.ms.value_or(NAN));
        std::printf("  %-5s %-8s %6lld  %-22s %-22s %-22s %-22s %-12s\n", name.c_str(), p.name, (long long)n,
                    figure(ff, bf).c_str(), figure(fb, bb).c_str(), figure(df, bf).c_str(),
                    figure(db, bb).c_str(), base_cell);
        const std::vector<std::pair<const char*, const Timing*>> all = {
            {"fused_forward", &ff},
            {"fused_backward_input", &fb},
            {"dequant_cublaslt_forward", &df},
            {"dequant_cublaslt_backward_input", &db},
            {"bf16_forward", &bf},
            {"bf16_backward_input", &bb}};
        for (const auto& [key, t] : all) {
          const Timing& bf16_t = std::string(key).find("backward") != std::string::npos ? bb : bf;
          row[key] = {{"ms", t->ms ? json(*t->ms) : json()},
                      {"ratio_to_bf16", t->ms && bf16_t.ms ? json(*t->ms / *bf16_t.ms) : json()},
                      {"error", t->error}};
          ok = ok && t->ms.has_value();
        }
        rows.push_back(row);
      }
    }
  }
  out["qmatmul"] = rows;
  std::printf("\n");
  return ok;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--allow-no-gpu") {
      o.allow_no_gpu = true;
    } else if (a == "--json") {
      TF_CHECK(i + 1 < argc, "--json needs a file to write");
      o.json_path = argv[++i];
    } else {
      TF_FAIL("unknown argument '", a,
              "' (usage: bench_gpu_kernels [--quick] [--json FILE] [--allow-no-gpu])");
    }
  }
  return o;
}

int run(const Options& opt) {
  std::string why;
  if (count_gpus(&why) == 0) {
    std::printf("bench_gpu_kernels: no GPU to measure (%s)%s\n", why.c_str(),
                opt.allow_no_gpu ? "; nothing measured (--allow-no-gpu)" : "");
    return opt.allow_no_gpu ? 0 : 1;
  }
  rt::set_device(0);
  rt::set_current_stream(rt::stream_create());
  const std::string device = rt::device_name(0);
  std::printf("bench_gpu_kernels on %s%s\n\n", device.c_str(), opt.quick ? " (--quick)" : "");
  json out = {{"device", device}, {"quick", opt.quick}};
  const Timer timer(opt.quick ? 1 : 2, opt.quick ? 3 : 7);
  const double ceiling = gemm_ceiling(timer, out);
  bool ok = ceiling > 0;
  ok = bench_attention(opt, timer, ceiling, out) && ok;
  ok = bench_qmatmul(opt, timer, out) && ok;
  if (!opt.json_path.empty()) {
    std::ofstream f(opt.json_path);
    f << out.dump(2) << "\n";
    TF_CHECK(f.good(), "bench_gpu_kernels: cannot write ", opt.json_path);
  }
  if (!ok) std::printf("bench_gpu_kernels: some measurements failed (their messages are in the table)\n");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_gpu_kernels: %s\n", e.what());
    return 2;
  }
}
