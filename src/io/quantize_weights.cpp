// defines: QuantMode names, store_weight (chunked conversion and quantization of base weights at
//          load) and weight_memory
#include "src/io/quantize_weights.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/element.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "src/core/error.h"

namespace tf::io {

namespace {

constexpr size_t kDTypeCount = size_t(DType::INT8) + 1;

constexpr QuantMode kAllModes[] = {QuantMode::Keep, QuantMode::None, QuantMode::Bf16, QuantMode::Int8,
                                   QuantMode::Nf4,  QuantMode::Q8_0, QuantMode::Q4_0, QuantMode::Q4_1,
                                   QuantMode::Q5_0, QuantMode::Q5_1};

// Rows per chunk: about chunk_elems elements, in a multiple of the rows that hold a whole number of
// 64-element NF4 / INT8 blocks, so that every chunk but the last starts and ends on a block.
int64_t chunk_rows(int64_t rows, int64_t cols, int64_t chunk_elems) {
  const int64_t whole = kNf4Block / std::gcd(cols, int64_t(kNf4Block));
  return std::min(rows, std::max(whole, chunk_elems / cols / whole * whole));
}

// Memory of the weights' own, as an owned tensor (LlamaWeights::owned) whose view starts at it, so
// that a weight store that copied it elsewhere can let it go (WeightStore::release_sources).
template <typename T>
T* own(LlamaWeights& w, int64_t count) {
  Tensor t;
  t.storage = Buffer(size_t(count) * sizeof(T), MemTag::Weights, /*zero=*/false);
  t.view.data = t.storage.data();
  T* p = static_cast<T*>(t.view.data);
  w.owned.push_back(std::move(t));
  return p;
}

// Reads whole rows of a stored weight as f32, exactly: ggml blocks through ggml's reference
// dequantization, NF4 / INT8 codes times their absmax, the double quantization of an NF4 absmax
// undone once for the tensor as bitsandbytes does it (the product rounded before the offset).
class RowReader {
 public:
  explicit RowReader(const WeightRef& src) : src_(src) {
    if (src.dtype != DType::NF4 && src.dtype != DType::INT8) return;
    TF_CHECK(src.scales.absmax, "a ", dtype_name(src.dtype), " weight without its absmax");
    absmax_ = static_cast<const float*>(src.scales.absmax);
    if (!src.scales.nested) return;
    const int64_t blocks = ref::quant_blocks(src.rows * src.cols, kNf4Block);
    undone_ = Buffer(size_t(blocks) * sizeof(float), MemTag::Workspace, /*zero=*/false);
    ref::dequantize_double_absmax(static_cast<const uint8_t*>(src.scales.absmax), src.scales.nested,
                                  src.scales.offset, blocks, undone_.as<float>());
    absmax_ = undone_.as<float>();
  }

  // Rows [r0, r0 + nr) into dst; r0 * cols is a multiple of 64 (chunk_rows makes it so).
  void read(int64_t r0, int64_t nr, float* dst) const {
    const int64_t i0 = r0 * src_.cols, n = nr * src_.cols;
    const auto* bytes = static_cast<const uint8_t*>(src_.data);
    switch (src_.dtype) {
      case DType::F32:
      case DType::BF16:
      case DType::F16: widen_to_f32(dst, bytes + size_t(i0) * dtype_size(src_.dtype), src_.dtype, n); return;
      case DType::NF4: ref::dequantize_nf4(bytes + i0 / 2, absmax_ + i0 / kNf4Block, n, dst); return;
      case DType::INT8:
        ref::dequantize_int8(reinterpret_cast<const int8_t*>(bytes) + i0, absmax_ + i0 / kInt8Block, n, dst);
        return;
      default:
        ref::dequantize_rows(*ggml_of_dtype(src_.dtype), bytes + dtype_bytes(src_.dtype, i0), n, dst);
        return;
    }
  }

 private:
  const WeightRef& src_;
  Buffer undone_;
  const float* absmax_ = nullptr;
};

// Calls fn(r0, n_rows, x) for consecutive row chunks of `src`, x holding their f32 values.
template <typename Fn>
void for_each_chunk(const WeightRef& src, int64_t chunk_elems, Fn&& fn) {
  const int64_t step = chunk_rows(src.rows, src.cols, chunk_elems);
  const RowReader reader(src);
  Buffer scratch(size_t(step * src.cols) * sizeof(float), MemTag::Workspace, /*zero=*/false);
  for (int64_t r0 = 0; r0 < src.rows; r0 += step) {
    const int64_t nr = std::min(step, src.rows - r0);
    reader.read(r0, nr, scratch.as<float>());
    fn(r0, nr, scratch.as<const float>());
  }
}

// quantize_* name a bad element by its index in the chunk; this names it in the tensor.
void check_finite(const float* x, int64_t r0, int64_t nr, int64_t cols, const std::string& name,
                  QuantMode mode) {
  for (int64_t i = 0; i < nr * cols; ++i)
    TF_CHECK(std::isfinite(x[i]), name, ": element [", r0 + i / cols, ", ", i % cols, "] is ", x[i],
             "; a non-finite weight cannot be quantized to ", quant_mode_name(mode));
}

std::string format_bytes(int64_t b) {
  char s[32];
  const double x = double(b);
  if (x >= 1024.0 * 1024 * 1024)
    std::snprintf(s, sizeof s, "%.2f GiB", x / (1024.0 * 1024 * 1024));
  else if (x >= 1024.0 * 1024)
    std::snprintf(s, sizeof s, "%.1f MiB", x / (1024.0 * 1024));
  else
    std::snprintf(s, sizeof s, "%.1f KiB", x / 1024.0);
  return s;
}

}  // namespace

std::optional<QuantMode> parse_quant_mode(std::string_view name) {
  for (QuantMode m : kAllModes)
    if (quant_mode_name(m) == name) return m;
  return std::nullopt;
}

std::string quant_mode_names() {
  std::string s;
  for (QuantMode m : kAllModes) s += (s.empty() ? "" : ", ") + std::string(quant_mode_name(m));
  return s;
}

std::optional<GgmlType> ggml_type_of(QuantMode mode) {
  switch (mode) {
    case QuantMode::Q8_0: return GgmlType::Q8_0;
    case QuantMode::Q4_0: return GgmlType::Q4_0;
    case QuantMode::Q4_1: return GgmlType::Q4_1;
    case QuantMode::Q5_0: return GgmlType::Q5_0;
    case QuantMode::Q5_1: return GgmlType::Q5_1;
    default: return std::nullopt;
  }
}

void check_storable(QuantMode mode, int64_t cols, const std::string& name) {
  if (!ggml_type_of(mode) || cols % kQK0 == 0) return;
  TF_FAIL(name, ": rows of ", cols, " elements cannot be quantized to ", quant_mode_name(mode),
          ": its blocks of ", kQK0, " lie along each row, so a row must hold whole blocks; nf4 and int8, ",
          "whose blocks run over the whole tensor, store any shape");
}

std::string_view quant_mode_name(QuantMode mode) {
  switch (mode) {
    case QuantMode::Keep: return "keep";
    case QuantMode::None: return "none";
    case QuantMode::Bf16: return "bf16";
    case QuantMode::Int8: return "int8";
    case QuantMode::Nf4: return "nf4";
    case QuantMode::Q8_0: return "q8_0";
    case QuantMode::Q4_0: return "q4_0";
    case QuantMode::Q4_1: return "q4_1";
    case QuantMode::Q5_0: return "q5_0";
    case QuantMode::Q5_1: return "q5_1";
  }
  return "?";
}

int64_t stored_bytes(const WeightRef& r) {
  const int64_t n = r.rows * r.cols;
  if (r.dtype == DType::NF4 || r.dtype == DType::INT8) {
    const int64_t blocks = ref::quant_blocks(n, dtype_block_elems(r.dtype));
    const int64_t scales = r.scales.nested
                               ? blocks + ref::quant_blocks(blocks, kNf4NestedBlock) * int64_t(sizeof(float))
                               : blocks * int64_t(sizeof(float));
    return dtype_bytes(r.dtype, n) + scales;
  }
  return is_quantized(r.dtype) ? dtype_bytes(r.dtype, n) : n * int64_t(dtype_size(r.dtype));
}

uint64_t droppable_bytes(const void* data, uint64_t bytes) {
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (uintptr_t(data) + page - 1) / page * page;
  const uintptr_t end = (uintptr_t(data) + bytes) / page * page;
  return end > begin ? uint64_t(end - begin) : 0;
}

uint64_t drop_source_pages(const WeightRef& src, const WeightRef& stored) {
  if (stored.data == src.data || src.data == nullptr) return 0;
  const uint64_t bytes = uint64_t(dtype_bytes(src.dtype, src.rows * src.cols));
  const uint64_t dropped = droppable_bytes(src.data, bytes);
  if (dropped == 0) return 0;
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  void* begin = reinterpret_cast<void*>((uintptr_t(src.data) + page - 1) / page * page);
  // Advice only: where the kernel refuses it the pages stay, which costs memory, not correctness.
  return ::madvise(begin, size_t(dropped), MADV_DONTNEED) == 0 ? dropped : 0;
}

DType stored_dtype(DType src, QuantMode mode) {
  switch (mode) {
    case QuantMode::Keep: return src;
    case QuantMode::None: return is_quantized(src) ? DType::F32 : src;
    case QuantMode::Bf16: return DType::BF16;
    case QuantMode::Int8: return DType::INT8;
    case QuantMode::Nf4: return DType::NF4;
    case QuantMode::Q8_0:
    case QuantMode::Q4_0:
    case QuantMode::Q4_1:
    case QuantMode::Q5_0:
    case QuantMode::Q5_1: return *dtype_of_ggml(*ggml_type_of(mode));
  }
  TF_FAIL("unknown quant mode");
}

WeightRef store_weight(const WeightRef& src, QuantMode mode, LlamaWeights& w, const std::string& name,
                       int64_t chunk_elems) {
  TF_CHECK(chunk_elems > 0, "store_weight: chunk of ", chunk_elems, " elements");
  const int64_t rows = src.rows, cols = src.cols, n = rows * cols;
  switch (mode) {
    case QuantMode::Keep: return src;
    case QuantMode::None: {
      if (!is_quantized(src.dtype)) return src;
      // The target is f32 itself, so each chunk is dequantized straight into it.
      float* dst = own<float>(w, n);
      const RowReader reader(src);
      const int64_t step = chunk_rows(rows, cols, chunk_elems);
      for (int64_t r0 = 0; r0 < rows; r0 += step) reader.read(r0, std::min(step, rows - r0), dst + r0 * cols);
      return {dst, DType::F32, rows, cols};
    }
    case QuantMode::Bf16: {
      if (src.dtype == DType::BF16) return src;
      uint16_t* dst = own<uint16_t>(w, n);
      for_each_chunk(src, chunk_elems, [&](int64_t r0, int64_t nr, const float* x) {
        uint16_t* d = dst + r0 * cols;
        for (int64_t i = 0; i < nr * cols; ++i) d[i] = f32_to_bf16(x[i]);
      });
      return {dst, DType::BF16, rows, cols};
    }
    case QuantMode::Int8: {
      if (src.dtype == DType::INT8) return src;
      int8_t* codes = own<int8_t>(w, n);
      float* absmax = own<float>(w, ref::quant_blocks(n, kInt8Block));
      for_each_chunk(src, chunk_elems, [&](int64_t r0, int64_t nr, const float* x) {
        check_finite(x, r0, nr, cols, name, mode);
        ref::quantize_int8(x, nr * cols, codes + r0 * cols, absmax + r0 * cols / kInt8Block);
      });
      return {codes, DType::INT8, rows, cols, QuantScales{absmax}};
    }
    case QuantMode::Nf4: {
      if (src.dtype == DType::NF4) return src;
      const int64_t blocks = ref::quant_blocks(n, kNf4Block);
      uint8_t* codes = own<uint8_t>(w, ref::nf4_packed_bytes(n));
      // The offset of double quantization is the mean of all of the tensor's absmax, so they are
      // collected whole before any is quantized.
      Buffer absmax(size_t(blocks) * sizeof(float), MemTag::Workspace, /*zero=*/false);
      for_each_chunk(src, chunk_elems, [&](int64_t r0, int64_t nr, const float* x) {
        check_finite(x, r0, nr, cols, name, mode);
        ref::quantize_nf4(x, nr * cols, codes + r0 * cols / 2, absmax.as<float>() + r0 * cols / kNf4Block);
      });
      uint8_t* absmax_codes = own<uint8_t>(w, blocks);
      float* nested = own<float>(w, ref::quant_blocks(blocks, kNf4NestedBlock));
      const float offset = ref::double_quantize_absmax(absmax.as<float>(), blocks, absmax_codes, nested);
      return {codes, DType::NF4, rows, cols, QuantScales{absmax_codes, nested, offset}};
    }
    case QuantMode::Q8_0:
    case QuantMode::Q4_0:
    case QuantMode::Q4_1:
    case QuantMode::Q5_0:
    case QuantMode::Q5_1: {
      const GgmlType type = *ggml_type_of(mode);
      const DType to = *dtype_of_ggml(type);
      if (src.dtype == to) return src;
      check_storable(mode, cols, name);
      // Each row is whole blocks, so a chunk of whole rows is whole blocks too, written in place.
      auto* blocks = own<uint8_t>(w, dtype_bytes(to, n));
      const int64_t row_bytes = dtype_bytes(to, cols);
      for_each_chunk(src, chunk_elems, [&](int64_t r0, int64_t nr, const float* x) {
        check_finite(x, r0, nr, cols, name, mode);
        ref::quantize_rows_ggml(type, x, nr * cols, blocks + r0 * row_bytes);
      });
      return {blocks, to, rows, cols};
    }
  }
  TF_FAIL("unknown quantization mode ", int(mode));
}

int64_t WeightMemory::params() const {
  int64_t s = 0;
  for (const Entry& e : by_dtype) s += e.params;
  return s;
}

int64_t WeightMemory::bytes() const {
  int64_t s = 0;
  for (const Entry& e : by_dtype) s += e.bytes;
  return s;
}

double WeightMemory::bits_per_param() const {
  const int64_t p = params();
  return p == 0 ? 0.0 : 8.0 * double(bytes()) / double(p);
}

std::string WeightMemory::summary() const {
  std::string s = format_bytes(bytes()) + " (";
  for (size_t i = 0; i < by_dtype.size(); ++i) {
    if (i) s += ", ";
    s += std::string(dtype_name(by_dtype[i].dtype)) + " " + format_bytes(by_dtype[i].bytes);
  }
  char bits[48];
  std::snprintf(bits, sizeof bits, "), %.2f bits per parameter", bits_per_param());
  return s + bits;
}

WeightMemory weight_memory(const LlamaWeights& w) {
  std::array<WeightMemory::Entry, kDTypeCount> sums{};
  LlamaWeights::for_each_slot(w.config, [&](WeightSlot slot, int layer) {
    const WeightRef& r = w.slot(slot, layer);
    WeightMemory::Entry& e = sums[size_t(r.dtype)];
    e.params += r.rows * r.cols;
    e.bytes += stored_bytes(r);
  });
  WeightMemory m;
  for (size_t t = 0; t < kDTypeCount; ++t)
    if (sums[t].params) m.by_dtype.push_back({DType(t), sums[t].params, sums[t].bytes});
  return m;
}

}  // namespace tf::io
