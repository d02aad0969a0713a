// defines: the CUDA backend, tf::cuda::make_device_backend (a GPU) and, from the same source built
// against the SIMT simulator, tf::simt::make_device_backend: device memory counted per tag, a
// compute and a copy stream with events, frozen weights placed on the device, and every op of the
// op list forwarded to this build's launchers (kernels/cuda/device_ops.h).
#include <map>
#include <string>
#include <vector>

#include "kernels/cuda/device_backend.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

class DeviceBackend final : public Backend {
 public:
  explicit DeviceBackend(int device) : device_(device) {
    rt::set_device(device);
    compute_ = rt::stream_create();
    copy_ = rt::stream_create();
  }
  ~DeviceBackend() override {
    rt::device_synchronize();
    rt::release_scratch();
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
  MemTracker& tracker() override { return tracker_; }

  void upload(void* dst, const void* src, size_t bytes, Stream s) override {
    if (bytes) rt::memcpy_h2d(dst, src, bytes, stream(s));
  }
  void download(void* dst, const void* src, size_t bytes, Stream s) override {
    if (bytes) rt::memcpy_d2h(dst, src, bytes, stream(s));
    rt::stream_synchronize(stream(s));
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

  // The dense GEMMs run in bf16 with f32 accumulation, so f32 matrices are stored as bf16 (half the
  // memory, and the operand type cuBLASLt multiplies); norm weights and biases ([1, n]) stay f32.
  // Quantized formats are not device formats yet.
  bool supports_weight(DType dtype) const override {
    return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16;
  }
  WeightRef place_weight(const WeightRef& host, std::string_view tensor,
                         std::vector<DeviceMem>& storage) override {
    TF_CHECK(supports_weight(host.dtype), "the ", name(), " backend does not run ", dtype_name(host.dtype),
             " weights (tensor ", tensor, ")");
    const size_t n = size_t(host.rows) * size_t(host.cols);
    const bool to_bf16 = host.dtype == DType::F32 && host.rows > 1;
    const DType dtype = to_bf16 ? DType::BF16 : host.dtype;
    DeviceMem mem = alloc(size_t(dtype_bytes(dtype, int64_t(n))), MemTag::Weights, tensor);
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

#define TF_OP(ret, op, params, args)  \
  ret op params override {            \
    rt::set_current_stream(compute_); \
    return TF_PORT_BACKEND::op args;  \
  }
#include "kernels/op_signatures.inc"
#undef TF_OP

 protected:
  void* allocate(size_t bytes, MemTag tag, std::string_view what) override {
    void* p = rt::device_alloc(bytes, std::string(what).c_str());
    tracker_.on_alloc(tag, bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes, MemTag tag) override {
    rt::device_free(p);
    tracker_.on_free(tag, bytes);
  }

 private:
  static constexpr size_t kStagingElems = size_t(1) << 22;  // f32 -> bf16 conversion in 8 MiB pieces

  rt::StreamHandle stream(Stream s) const {
    return s == Stream::Compute ? compute_ : copy_;
  }

  int device_;
  rt::StreamHandle compute_ = nullptr, copy_ = nullptr;
  std::map<uint64_t, rt::EventHandle> events_;
  uint64_t last_event_ = 0;
  MemTracker tracker_;
};

}  // namespace

std::unique_ptr<Backend> make_device_backend(int device) {
  return std::make_unique<DeviceBackend>(device);
}

}  // namespace tf::TF_PORT_BACKEND
