// Memory of a model's base weights under each --quant mode (keep, none, bf16, int8, nf4, and ggml's
// q8_0, q4_0, q4_1, q5_0, q5_1), beside
// the theoretical bytes of the target format, for a real GGUF file and for a 1.2B-parameter config.
//
//   build/benchmarks/bench_weight_memory [--gguf FILE] [--skip-1b]
//
// For the GGUF file every mode goes through io::load_model; "stored" is what the weights occupy
// once loaded (weight_memory: codes plus scales, mapped tensors used in place included) and "load
// peak" the most memory the loader allocated at once (tracked weights plus scratch), so for keep
// only the mapped file is used. The 1B config (Llama-3.2-1B's shapes, random f32 weights standing
// in for a mapped f32 checkpoint) converts each matrix with io::store_weight, as the loader does.
// "theory" is params x bits of the target format / 8 per tensor: 32 (f32), 16 (bf16), 8 + 32/64
// (int8), 4 + 8/64 + 32/(64 x 256) (nf4 with double quantization), a ggml type's own bits.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "benchmarks/bench_models.h"
#include "kernels/cpu/ref/quantize.h"
#include "src/core/alloc.h"
#include "src/io/model_loader.h"
#include "src/io/quantize_weights.h"

using namespace tf;

namespace {

constexpr io::QuantMode kModes[] = {
    io::QuantMode::Keep, io::QuantMode::None, io::QuantMode::Bf16, io::QuantMode::Int8, io::QuantMode::Nf4,
    io::QuantMode::Q8_0, io::QuantMode::Q4_0, io::QuantMode::Q4_1, io::QuantMode::Q5_0, io::QuantMode::Q5_1};

double mib(double bytes) {
  return bytes / (1024.0 * 1024.0);
}

// Bits per element the mode stores a matrix of dtype `src` in.
double target_bits(io::QuantMode mode, DType src) {
  switch (mode) {
    case io::QuantMode::Keep:
      return is_quantized(src) ? 8.0 * double(dtype_block_bytes(src)) / double(dtype_block_elems(src))
                               : 8.0 * double(dtype_size(src));
    case io::QuantMode::None: return is_quantized(src) ? 32.0 : 8.0 * double(dtype_size(src));
    case io::QuantMode::Bf16: return 16.0;
    case io::QuantMode::Int8: return ref::bits_per_param(ref::QuantFormat::Int8);
    case io::QuantMode::Nf4: return ref::bits_per_param(ref::QuantFormat::Nf4DoubleQuant);
    case io::QuantMode::Q8_0:
    case io::QuantMode::Q4_0:
    case io::QuantMode::Q4_1:
    case io::QuantMode::Q5_0:
    case io::QuantMode::Q5_1: {
      const DType t = io::stored_dtype(src, mode);
      return 8.0 * double(dtype_block_bytes(t)) / double(dtype_block_elems(t));
    }
  }
  return 0;
}

// Theoretical bytes of `w` (as loaded by keep) stored by `mode`: norms and biases stay as they are.
double theory_bytes(const LlamaWeights& w, io::QuantMode mode) {
  double bytes = 0;
  LlamaWeights::for_each_slot(w.config, [&](WeightSlot slot, int layer) {
    const WeightRef& r = w.slot(slot, layer);
    const double n = double(r.rows) * double(r.cols);
    const io::QuantMode m = io::is_matrix_slot(slot) ? mode : io::QuantMode::None;
    bytes += n * target_bits(m, r.dtype) / 8.0;
  });
  return bytes;
}

size_t load_peak() {
  return MemTracker::instance().peak(MemTag::Weights) + MemTracker::instance().peak(MemTag::Workspace);
}

void header(const char* what) {
  std::printf(
      "\n%s\n| mode | stored MiB | theory MiB | load peak MiB | bits/param | dtypes "
      "|\n|---|---|---|---|---|---|\n",
      what);
}

void row(io::QuantMode mode, const LlamaWeights& w, double theory, size_t peak) {
  const io::WeightMemory m = io::weight_memory(w);
  std::string dtypes;
  for (const auto& e : m.by_dtype) dtypes += (dtypes.empty() ? "" : ", ") + std::string(dtype_name(e.dtype));
  std::printf("| %s | %.1f | %.1f | %.1f | %.3f | %s |\n", std::string(io::quant_mode_name(mode)).c_str(),
              mib(double(m.bytes())), mib(theory), mib(double(peak)), m.bits_per_param(), dtypes.c_str());
}

void bench_gguf(const std::string& path) {
  header(("GGUF " + path).c_str());
  const io::LoadedModel kept = io::load_model(path, true, io::QuantMode::Keep);
  for (io::QuantMode mode : kModes) {
    MemTracker::instance().reset_peaks();
    const size_t before =
        MemTracker::instance().current(MemTag::Weights) + MemTracker::instance().current(MemTag::Workspace);
    const io::LoadedModel m = io::load_model(path, true, mode);
    row(mode, m.weights, theory_bytes(kept.weights, mode), load_peak() - before);
  }
}

void bench_1b() {
  const LlamaConfig c = bench::llama_1b_config(2048);
  std::printf("\ngenerating a random f32 model with Llama-3.2-1B's shapes ...\n");
  LlamaWeights src = init_random_weights(c, DType::F32, 7);
  header("1.2B config from f32 (Llama-3.2-1B shapes, tied embeddings)");
  for (io::QuantMode mode : kModes) {
    MemTracker::instance().reset_peaks();
    const size_t before =
        MemTracker::instance().current(MemTag::Weights) + MemTracker::instance().current(MemTag::Workspace);
    LlamaWeights w;
    w.config = c;
    w.blocks.resize(size_t(c.n_layers));
    LlamaWeights::for_each_slot(c, [&](WeightSlot slot, int layer) {
      const WeightRef& s = src.slot(slot, layer);
      w.slot(slot, layer) =
          io::is_matrix_slot(slot) ? io::store_weight(s, mode, w, hf_weight_name(slot, layer)) : s;
    });
    w.lm_head = w.embed;
    row(mode, w, theory_bytes(src, mode), load_peak() - before);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string gguf;
  bool skip_1b = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--gguf") && i + 1 < argc) {
      gguf = argv[++i];
    } else if (!std::strcmp(argv[i], "--skip-1b")) {
      skip_1b = true;
    } else {
      std::fprintf(stderr, "usage: bench_weight_memory [--gguf FILE] [--skip-1b]\n");
      return 2;
    }
  }
  try {
    if (!gguf.empty()) bench_gguf(gguf);
    if (!skip_1b) bench_1b();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
