#include "src/core/alloc.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "src/core/error.h"

namespace tf {

std::string_view mem_tag_name(MemTag t) {
  switch (t) {
    case MemTag::Weights: return "weights";
    case MemTag::Lora: return "lora";
    case MemTag::Grads: return "grads";
    case MemTag::Optimizer: return "optimizer";
    case MemTag::Activations: return "activations";
    case MemTag::Workspace: return "workspace";
    case MemTag::Count: break;
  }
  return "?";
}

MemTracker& MemTracker::instance() {
  static MemTracker tracker;
  return tracker;
}

static void raise_to(std::atomic<size_t>& peak, size_t value) {
  size_t seen = peak.load();
  while (value > seen && !peak.compare_exchange_weak(seen, value)) {
  }
}

void MemTracker::on_alloc(MemTag tag, size_t bytes) {
  const size_t i = size_t(tag);
  raise_to(peak_[i], current_[i].fetch_add(bytes) + bytes);
  raise_to(total_peak_, total_.fetch_add(bytes) + bytes);
}

void MemTracker::on_free(MemTag tag, size_t bytes) {
  current_[size_t(tag)].fetch_sub(bytes);
  total_.fetch_sub(bytes);
}

void MemTracker::reset_peaks() {
  for (size_t i = 0; i < kMemTagCount; ++i) peak_[i].store(current_[i].load());
  total_peak_.store(total_.load());
}

Buffer::Buffer(size_t bytes, MemTag tag, bool zero) : bytes_(bytes), tag_(tag) {
  if (bytes == 0) return;
  const size_t rounded = (bytes + 63) / 64 * 64;
  data_ = std::aligned_alloc(64, rounded);
  TF_CHECK(data_ != nullptr, "out of host memory allocating ", bytes, " bytes for ", mem_tag_name(tag));
  if (zero) std::memset(data_, 0, rounded);
  MemTracker::instance().on_alloc(tag_, bytes_);
}

Buffer::~Buffer() {
  release();
}

void Buffer::release() {
  if (data_) {
    std::free(data_);
    MemTracker::instance().on_free(tag_, bytes_);
  }
  data_ = nullptr;
  bytes_ = 0;
}

Buffer::Buffer(Buffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_), tag_(o.tag_) {
  o.data_ = nullptr;
  o.bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    tag_ = o.tag_;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

}  // namespace tf
