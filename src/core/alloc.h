// defines: tf::MemTag, tf::MemTracker, tf::Buffer (tracked, aligned, owning storage)
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace tf {

// What a buffer holds; the memory planner and the end-of-run report speak in these terms.
enum class MemTag : uint8_t { Weights, Lora, Grads, Optimizer, Activations, Workspace, Count };
constexpr size_t kMemTagCount = size_t(MemTag::Count);
std::string_view mem_tag_name(MemTag t);

// Process-wide byte counters per tag: current and peak, plus the peak of the total. Lock-free,
// so it can be read at any time from any thread.
class MemTracker {
 public:
  static MemTracker& instance();
  void on_alloc(MemTag tag, size_t bytes);
  void on_free(MemTag tag, size_t bytes);
  size_t current(MemTag tag) const { return current_[size_t(tag)].load(); }
  size_t peak(MemTag tag) const { return peak_[size_t(tag)].load(); }
  size_t current_total() const { return total_.load(); }
  size_t peak_total() const { return total_peak_.load(); }
  // Restarts peak measurement from the current usage (e.g. at the first training step).
  void reset_peaks();

 private:
  std::array<std::atomic<size_t>, kMemTagCount> current_{};
  std::array<std::atomic<size_t>, kMemTagCount> peak_{};
  std::atomic<size_t> total_{0};
  std::atomic<size_t> total_peak_{0};
};

// Owning, 64-byte aligned host allocation, counted against its tag for its lifetime.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, MemTag tag, bool zero = true);
  ~Buffer();
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T>
  T* as() {
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* as() const {
    return static_cast<const T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  MemTag tag() const { return tag_; }

 private:
  void release();
  void* data_ = nullptr;
  size_t bytes_ = 0;
  MemTag tag_ = MemTag::Workspace;
};

// Grows `b` to at least `bytes` (contents not kept) and returns its data. Ops called in a hot loop
// keep such a buffer per calling thread, so they allocate when a larger size first appears rather
// than on every call.
inline void* grow_scratch(Buffer& b, size_t bytes) {
  if (b.bytes() < bytes) b = Buffer(bytes, MemTag::Workspace, /*zero=*/false);
  return b.data();
}

}  // namespace tf
