// defines: the CUDA backend, tf::cuda::make_device_backend (a GPU) and, from the same source built
// against the SIMT simulator, tf::simt::make_device_backend: device memory counted per tag, a
// compute and a copy stream with events, frozen weights placed on the device, and every op of the
// op list forwarded to this build's launchers (kernels/cuda/device_ops.h), attention to the kernel
// --attention chose (flash, plain or, on a GPU, cuDNN).
#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/arena.h"
#include "kernels/cuda/device_backend.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/scratch_plan.h"
#include "kernels/quant_blocks.h"
#include "src/core/error.h"

#if TF_PORT_SIM
#include "kernels/sim/runtime.h"
#else
#include "kernels/cuda/cudnn_attention.h"
#endif

namespace tf::TF_PORT_BACKEND {

namespace {

#if TF_PORT_SIM
// cuDNN is not simulated: the simt backend refuses --attention cudnn when it is made, so its
// attention never reaches these.
bool cudnn_attention_available(std::string* why) {
  *why = "the simt simulator does not run cuDNN (--device cuda runs it on a GPU)";
  return false;
}
[[noreturn]] void no_cudnn() {
  TF_FAIL("the simt simulator does not run cuDNN's fused attention");
}
void cudnn_attention_forward(float*, float*, const float*, const float*, const float*, const int32_t*,
                             const AttentionShape&) {
  no_cudnn();
}
void cudnn_attention_backward(float*, float*, float*, const float*, const float*, const float*, const float*,
                              const float*, const float*, const int32_t*, const AttentionShape&) {
  no_cudnn();
}
#endif

class DeviceBackend final : public Backend {
 public:
  DeviceBackend(int device, AttentionKernel attention) : device_(device), attention_(attention) {
    rt::set_device(device);
    std::string why;
    TF_CHECK(attention != AttentionKernel::Cudnn || cudnn_attention_available(&why),
             "--attention cudnn: ", why);
    compute_ = rt::stream_create();
    copy_ = rt::stream_create();
    rt::reset_memory_peak();
  }
  ~DeviceBackend() override {
    rt::device_synchronize();
    rt::release_scratch();
    release_blocks();
    for (void* p : unplanned_) rt::device_free(p);
    for (const auto& [id, e] : events_) rt::event_destroy(e);
    rt::stream_destroy(copy_);
    rt::stream_destroy(compute_);
  }
  DeviceBackend(const DeviceBackend&) = delete;
  DeviceBackend& operator=(const DeviceBackend&) = delete;

  std::string name() const override {
    return TF_PORT_SIM ? std::string("simt") : "cuda:" + std::to_string(device_);
  }
  std::string describe() const override {
    const double gib = double(rt::device_total_memory(device_)) / double(1ull << 30);
    char size[32];
    std::snprintf(size, sizeof size, "%.1f GiB", gib);
    return name() + " (" + rt::device_name(device_) + ", " + size + ")";
  }
  std::optional<uint64_t> memory_capacity() const override {
    if (TF_PORT_SIM) return std::nullopt;
    return uint64_t(rt::device_total_memory(device_));
  }
  MemTracker& tracker() override { return tracker_; }

  void upload(void* dst, const void* src, size_t bytes, Stream s) override {
    if (bytes) rt::memcpy_h2d(dst, src, bytes, stream(s));
  }
  void download(void* dst, const void* src, size_t bytes, Stream s) override {
    if (bytes) rt::memcpy_d2h(dst, src, bytes, stream(s));
    rt::stream_synchronize(stream(s));
  }
  void download_async(void* dst, const void* src, size_t bytes, Stream s) override {
    if (bytes) rt::memcpy_d2h(dst, src, bytes, stream(s));
  }
  void copy_bytes(void* dst, const void* src, size_t bytes, Stream s) override {
    if (bytes) rt::memcpy_d2d(dst, src, bytes, stream(s));
  }
  Event record(Stream s) override {
    const uint64_t id = ++last_event_;
    rt::EventHandle e = rt::event_create();
    events_[id] = e;
    rt::event_record(e, stream(s));
    return Event{id};
  }
  void wait(Stream s, Event e) override {
    const auto it = events_.find(e.id);
    TF_CHECK(it != events_.end(), name(), ": wait on an event this backend never recorded (id ", e.id, ")");
    rt::stream_wait_event(stream(s), it->second);
    rt::event_destroy(it->second);
    events_.erase(it);
  }
  void synchronize() override { rt::device_synchronize(); }
  int device() const { return device_; }
  rt::StreamHandle compute_stream() const { return compute_; }

  // The dense GEMMs run in bf16 with f32 accumulation, so f32 matrices are stored as bf16 (half the
  // memory, and the operand type cuBLASLt multiplies); norm weights and biases ([1, n]) stay f32.
  // Quantized weights are placed as stored (kernels/cuda/quant_decode.h decodes them).
  bool supports_weight(DType dtype) const override { return dtype != DType::I32; }
  WeightRef place_weight(const WeightRef& host, std::string_view tensor,
                         std::vector<DeviceMem>& storage) override {
    TF_CHECK(supports_weight(host.dtype), "the ", name(), " backend does not run ", dtype_name(host.dtype),
             " weights (tensor ", tensor, ")");
    if (is_quantized(host.dtype)) return place_quantized(host, tensor, storage);
    const size_t n = size_t(host.rows) * size_t(host.cols);
    const DType dtype = placed_dtype(host);
    const bool to_bf16 = dtype != host.dtype;
    DeviceMem mem = alloc(placed_weight_bytes(host), MemTag::Weights, tensor);
    if (to_bf16) {
      const float* src = static_cast<const float*>(host.data);
      std::vector<uint16_t> rows(std::min<size_t>(n, kStagingElems));
      for (size_t i = 0; i < n; i += rows.size()) {
        const size_t m = std::min(rows.size(), n - i);
        for (size_t j = 0; j < m; ++j) rows[j] = f32_to_bf16(src[i + j]);
        upload(mem.as<uint16_t>() + i, rows.data(), m * sizeof(uint16_t), Stream::Compute);
        rt::stream_synchronize(compute_);
      }
    } else {
      upload(mem.data(), host.data, mem.bytes(), Stream::Compute);
    }
    WeightRef placed(mem.data(), dtype, host.rows, host.cols);
    storage.push_back(std::move(mem));
    return placed;
  }
  // A streamed weight is copied as it is stored: converting an f32 matrix on the way would hold the
  // host until each piece is copied, serialising the copy stream with the host.
  WeightRef place_weight_at(const WeightRef& host, std::string_view tensor, void* dst, Stream s) override {
    TF_CHECK(supports_weight(host.dtype), "the ", name(), " backend does not run ", dtype_name(host.dtype),
             " weights (tensor ", tensor, ")");
    TF_CHECK(placed_dtype(host) == host.dtype, "the ", name(),
             " backend streams base weights as they are stored, and it places f32 matrices as bf16 (tensor ",
             tensor, "): load the base as bf16 (--quant bf16) to stream it");
    if (is_quantized(host.dtype)) return upload_quantized(host, tensor, static_cast<unsigned char*>(dst), s);
    upload(dst, host.data, placed_weight_bytes(host), s);
    return WeightRef(dst, host.dtype, host.rows, host.cols);
  }
  size_t placed_weight_bytes(const WeightRef& host) const override {
    if (is_quantized(host.dtype)) return QuantPlacement(host).bytes;
    return size_t(dtype_bytes(placed_dtype(host), int64_t(host.rows) * host.cols));
  }

  void reserve(size_t bytes) override {
    size_t in_use = 0;
    for (const auto& a : arenas_) in_use += a->in_use();
    TF_CHECK(in_use == 0, name(), ": cannot reserve a device arena of ", bytes, " bytes while ", in_use,
             " bytes are allocated from the arena; reserve before building the model");
    release_blocks();
    reserved_ = true;
    const size_t size = arena_size(bytes);
    if (size) add_block(size, "device arena");
  }
  size_t footprint(size_t bytes) const override { return bytes ? arena_footprint(bytes) : 0; }
  size_t reserved_bytes(size_t bytes) const override {
    const size_t size = arena_size(bytes);
    return size ? rt::allocation_bytes(size) : 0;
  }
  // The matrices as placed: f32 ones as bf16, and NF4 / INT8 ones with their absmax, which placing
  // refuses a weight without (a model described from its config alone has none); attention as
  // call_kernel runs packed batches.
  std::vector<PlannedAlloc> scratch_plan(const ScratchShape& shape) const override {
    static const float kPlacedAbsmax = 0.0f;
    ScratchShape placed = shape;
    auto as_placed = [](WeightRef& w) {
      w.dtype = placed_dtype(w);
      if (w.dtype == DType::NF4 || w.dtype == DType::INT8) w.scales.absmax = &kPlacedAbsmax;
    };
    for (WeightRef& w : placed.projections) as_placed(w);
    for (WeightRef& w : placed.mlp_projections) as_placed(w);
    as_placed(placed.lm_head);
    AttentionKernel kernel = kernel_for(shape.head_dim);
    if (kernel == AttentionKernel::Cudnn)
      kernel = flash_attention_supports(shape.head_dim) ? AttentionKernel::Flash : AttentionKernel::Plain;
    const ScratchNeeds needs = plan_scratch(placed, kernel);
    std::vector<PlannedAlloc> out;
    for (const ScratchNeeds::Slot& slot : needs.slots)
      if (slot.bytes)
        out.push_back({std::string("kernel scratch: ") + slot.what, MemTag::Workspace,
                       rt::allocation_bytes(slot.bytes)});
    return out;
  }
  std::optional<uint64_t> device_memory_peak() const override { return uint64_t(rt::memory_peak()); }
  size_t device_blocks() const override { return blocks_taken_; }

  std::string attention_kernel(int head_dim) const override {
    if (attention_ == AttentionKernel::Flash)
      TF_CHECK(flash_attention_supports(head_dim),
               "--attention flash takes head dimensions 64, 80, 96 and 128; ", "this model's is ", head_dim,
               " (--attention plain or auto runs it)");
    if (attention_ == AttentionKernel::Cudnn)
      TF_CHECK(head_dim % 8 == 0 && head_dim <= 128,
               "--attention cudnn takes head dimensions that are multiples ",
               "of 8 up to 128; this model's is ", head_dim, " (--attention auto runs it)");
    return attention_name(kernel_for(head_dim));
  }

#define TF_OP(ret, op, params, args)  \
  ret do_##op params override {       \
    rt::set_current_stream(compute_); \
    return TF_PORT_BACKEND::op args;  \
  }
#define TF_ATTENTION_OP(ret, op, params, args)
#include "kernels/op_signatures.inc"
#undef TF_ATTENTION_OP
#undef TF_OP

  void do_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            const int32_t* doc_ids, const AttentionShape& s) override {
    rt::set_current_stream(compute_);
    switch (call_kernel(doc_ids, s)) {
      case AttentionKernel::Cudnn: return cudnn_attention_forward(out, lse, q, k, v, doc_ids, s);
      case AttentionKernel::Flash: return flash_attention_forward(out, lse, q, k, v, doc_ids, s);
      default: return TF_PORT_BACKEND::attention_forward(out, lse, q, k, v, doc_ids, s);
    }
  }
  void do_attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q,
                             const float* k, const float* v, const float* out, const float* lse,
                             const int32_t* doc_ids, const AttentionShape& s) override {
    rt::set_current_stream(compute_);
    switch (call_kernel(doc_ids, s)) {
      case AttentionKernel::Cudnn:
        return cudnn_attention_backward(dq, dk, dv, d_out, q, k, v, out, lse, doc_ids, s);
      case AttentionKernel::Flash:
        return flash_attention_backward(dq, dk, dv, d_out, q, k, v, out, lse, doc_ids, s);
      default: return TF_PORT_BACKEND::attention_backward(dq, dk, dv, d_out, q, k, v, out, lse, doc_ids, s);
    }
  }
  // Decoding is inference: it takes the flash kernel wherever the head dimension allows (cuDNN's
  // graph is the training baseline).
  void do_attention_cached_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                                   int64_t n_past, int64_t n_new, int n_heads, int n_kv_heads, int head_dim,
                                   float scale, int window, float softcap) override {
    rt::set_current_stream(compute_);
    if (attention_ != AttentionKernel::Plain && flash_attention_supports(head_dim))
      return flash_attention_cached_forward(out, q, k_cache, v_cache, n_past, n_new, n_heads, n_kv_heads,
                                            head_dim, scale, window, softcap);
    TF_PORT_BACKEND::attention_cached_forward(out, q, k_cache, v_cache, n_past, n_new, n_heads, n_kv_heads,
                                              head_dim, scale, window, softcap);
  }

 protected:
  void* allocate(size_t bytes, MemTag tag, std::string_view what) override {
    void* p = nullptr;
    for (const auto& a : arenas_)
      if ((p = a->try_allocate(bytes, tag))) break;
    if (!p && reserved_) {
      TF_CHECK(!arenas_.empty(), name(), " device arena: '", what, "' (", bytes,
               " bytes) does not fit: the arena was reserved with 0 bytes");
      p = arenas_[0]->allocate(bytes, tag, what);
    }
    if (!p) {
      size_t total = 0;
      for (const auto& a : arenas_) total += a->size();
      add_block(std::max({arena_footprint(bytes), kGrowthBlock, total}),
                "device arena block " + std::to_string(arenas_.size()));
      p = arenas_.back()->allocate(bytes, tag, what);
    }
    tracker_.on_alloc(tag, bytes);
    return own_piece(p, bytes, what);
  }
  void* allocate_unplanned(size_t bytes, MemTag tag, std::string_view what) override {
    void* p = rt::device_alloc(bytes, std::string(what).c_str());
    unplanned_.insert(p);
    ++blocks_taken_;
    tracker_.on_alloc(tag, bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes, MemTag tag) override {
    void* const slot = arena_address(p);
    const auto in =
        std::find_if(arenas_.begin(), arenas_.end(), [slot](const auto& a) { return a->owns(slot); });
    if (in != arenas_.end()) {
      (*in)->deallocate(slot);
    } else {
      TF_CHECK(unplanned_.erase(p) == 1, name(), ": free of ", p,
               ", which is neither in its device arena nor a block of its own");
      rt::device_free(p);
    }
    tracker_.on_free(tag, bytes);
  }
  void* allocate_host(size_t bytes, std::string_view what) override {
    return rt::host_alloc_pinned(bytes, std::string(what).c_str());
  }
  void deallocate_host(void* p) override {
    rt::host_free_pinned(p);
  }

 public:
  bool register_host(const void* p, size_t bytes, std::string* why) override {
    return rt::host_register(p, bytes, why);
  }
  void unregister_host(const void* p) override {
    rt::host_unregister(p);
  }

 private:
  static constexpr size_t kStagingElems = size_t(1) << 22;  // f32 -> bf16 conversion in 8 MiB pieces
  static constexpr size_t kGrowthBlock = size_t(1) << 20;   // the smallest block an unreserved arena adds

  // The block reserve(bytes) takes.
  static size_t arena_size(size_t bytes) {
    return (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  }
  // f32 matrices as bf16, vectors as they are (see supports_weight).
  static DType placed_dtype(const WeightRef& host) {
    return host.dtype == DType::F32 && host.rows > 1 ? DType::BF16 : host.dtype;
  }
  // Where a quantized weight's arrays lie in its one allocation (one piece, so the memory plan's
  // footprint of placed_weight_bytes is what placing takes): the blocks or codes, then for NF4 /
  // INT8 the absmax (f32, or uint8 codes with double quantization) and the nested f32 scales, each
  // starting on 16 bytes.
  struct QuantPlacement {
    explicit QuantPlacement(const WeightRef& w) {
      const int64_t n = w.rows * w.cols;
      data = size_t(dtype_bytes(w.dtype, n));
      if (w.dtype == DType::NF4 || w.dtype == DType::INT8) {
        const int64_t blocks = (n + dtype_block_elems(w.dtype) - 1) / dtype_block_elems(w.dtype);
        absmax = size_t(blocks) * (w.scales.nested ? 1 : sizeof(float));
        if (w.scales.nested)
          nested = size_t((blocks + kNf4NestedBlock - 1) / kNf4NestedBlock) * sizeof(float);
      }
      absmax_at = round16(data);
      nested_at = absmax_at + round16(absmax);
      bytes = nested_at + nested;
    }
    static size_t round16(size_t b) { return (b + 15) / 16 * 16; }
    size_t data = 0, absmax = 0, nested = 0;
    size_t absmax_at = 0, nested_at = 0, bytes = 0;
  };
  // Uploads the blocks, codes and scales as they are, into memory tagged Weights.
  WeightRef place_quantized(const WeightRef& host, std::string_view tensor, std::vector<DeviceMem>& storage) {
    DeviceMem mem = alloc(QuantPlacement(host).bytes, MemTag::Weights, tensor);
    const WeightRef placed = upload_quantized(host, tensor, mem.as<unsigned char>(), Stream::Compute);
    storage.push_back(std::move(mem));
    return placed;
  }
  // Uploads the blocks, codes and scales into `base` (QuantPlacement(host).bytes) on `s`.
  WeightRef upload_quantized(const WeightRef& host, std::string_view tensor, unsigned char* base, Stream s) {
    const bool flat = host.dtype == DType::NF4 || host.dtype == DType::INT8;
    TF_CHECK(!flat || host.cols % 8 == 0, "the ", name(), " backend runs ", dtype_name(host.dtype),
             " weights whose rows are a multiple of 8 elements; tensor ", tensor, " is ", host.rows, " x ",
             host.cols);
    TF_CHECK(!flat || host.scales.absmax, "tensor ", tensor, ": ", dtype_name(host.dtype),
             " weight without its absmax");
    const QuantPlacement at(host);
    upload(base, host.data, at.data, s);
    QuantScales scales;
    if (flat) {
      upload(base + at.absmax_at, host.scales.absmax, at.absmax, s);
      scales.absmax = base + at.absmax_at;
      if (host.scales.nested) {
        upload(base + at.nested_at, host.scales.nested, at.nested, s);
        scales.nested = reinterpret_cast<const float*>(base + at.nested_at);
        scales.offset = host.scales.offset;
      }
    }
    return WeightRef(base, host.dtype, host.rows, host.cols, scales);
  }
  // On the simulator each piece is also an allocation of its own (a view, which device memory in use
  // does not count twice), so that a kernel running past its piece into the next, or reading a
  // freed piece or bytes nobody wrote, is reported as for any device allocation; the arena still
  // decides what fits and where. On a GPU the piece is the arena's memory itself.
  void* own_piece(void* slot, size_t bytes, std::string_view what) {
#if TF_PORT_SIM
    void* p = sim::device_alloc_view(std::max<size_t>(bytes, 1), std::string(what).c_str());
    pieces_[p] = slot;
    return p;
#else
    (void)bytes;
    (void)what;
    return slot;
#endif
  }
  // The arena address of what own_piece returned (its own allocation freed on the simulator), or p
  // itself for a block of its own.
  void* arena_address(void* p) {
#if TF_PORT_SIM
    const auto it = pieces_.find(p);
    if (it == pieces_.end()) return p;
    void* slot = it->second;
    pieces_.erase(it);
    rt::device_free(p);
    return slot;
#else
    return p;
#endif
  }
  void add_block(size_t bytes, const std::string& what) {
    void* p = rt::device_alloc(bytes, (name() + " " + what).c_str());
    ++blocks_taken_;
    arenas_.push_back(std::make_unique<DeviceArena>(p, bytes, name() + " " + what));
  }
  void release_blocks() {
    for (const auto& a : arenas_) rt::device_free(a->base());
    arenas_.clear();
  }

  // The kernel that runs a head dimension: --attention's choice, auto resolved.
  AttentionKernel kernel_for(int head_dim) const {
    if (attention_ != AttentionKernel::Auto) return attention_;
    return flash_attention_supports(head_dim) ? AttentionKernel::Flash : AttentionKernel::Plain;
  }
  // The kernel of one call. cuDNN's graph has no per-token document mask, no sliding window and no
  // one-token sequence, so such calls under --attention cudnn run what auto would.
  AttentionKernel call_kernel(const int32_t* doc_ids, const AttentionShape& s) const {
    if (attention_ == AttentionKernel::Cudnn && (doc_ids != nullptr || s.window > 0 || s.seq == 1))
      return flash_attention_supports(s.head_dim) ? AttentionKernel::Flash : AttentionKernel::Plain;
    return kernel_for(s.head_dim);
  }

  rt::StreamHandle stream(Stream s) const {
    return s == Stream::Compute ? compute_ : copy_;
  }

  int device_;
  AttentionKernel attention_;
  rt::StreamHandle compute_ = nullptr, copy_ = nullptr;
  std::map<uint64_t, rt::EventHandle> events_;
  uint64_t last_event_ = 0;
  MemTracker tracker_;
  // alloc() carves from these: one reserved arena, or the blocks an unreserved arena grew by.
  std::vector<std::unique_ptr<DeviceArena>> arenas_;
  bool reserved_ = false;
  std::set<void*> unplanned_;  // alloc_unplanned() blocks
#if TF_PORT_SIM
  std::map<void*, void*> pieces_;  // a piece's own simulated allocation -> its place in the arena
#endif
  size_t blocks_taken_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_device_backend(int device, AttentionKernel attention) {
  return std::make_unique<DeviceBackend>(device, attention);
}

bool compute_stream(Backend& be, int* device, rt::StreamHandle* stream) {
  const auto* d = dynamic_cast<const DeviceBackend*>(&be);
  if (!d) return false;
  *device = d->device();
  *stream = d->compute_stream();
  return true;
}

}  // namespace tf::TF_PORT_BACKEND
