// defines: tf::PinnedLedger (the live page-locked host allocations of a device runtime and their
// bytes, which both runtimes behind kernels/cuda/runtime_api.inc keep the same way, each its own)
#pragma once

#include <cstddef>
#include <map>
#include <mutex>

#include "src/core/error.h"

namespace tf {

class PinnedLedger {
 public:
  void add(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(m_);
    bytes_[p] = bytes;
    in_use_ += bytes;
  }
  // Forgets `p`; refuses a pointer that is no live allocation (a double free, a foreign pointer).
  void remove(void* p) {
    std::lock_guard<std::mutex> lock(m_);
    const auto it = bytes_.find(p);
    TF_CHECK(it != bytes_.end(), "rt::host_free_pinned: ", p, " is no live page-locked allocation");
    in_use_ -= it->second;
    bytes_.erase(it);
  }
  size_t in_use() {
    std::lock_guard<std::mutex> lock(m_);
    return in_use_;
  }

 private:
  std::mutex m_;
  std::map<void*, size_t> bytes_;
  size_t in_use_ = 0;
};

}  // namespace tf
