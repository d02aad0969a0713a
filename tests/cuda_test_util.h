// defines: helpers for tests of the CUDA backend's launchers on the simulator: Guarded<T> (a device
// array between NaN guard elements that must stay untouched), same_value (bitwise equality that
// lets any NaN match any NaN), error_of
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace tf::test {

namespace simt_rt = tf::simt::rt;

// n elements of simulated device memory with kGuard elements of 0xff bytes (NaN in f32, bf16 and
// f16) on each side, inside the same allocation: the simulator's bounds check does not see a write
// that lands there, the guard check does.
template <typename T>
class Guarded {
 public:
  static constexpr size_t kGuard = 37;

  Guarded(const std::vector<T>& host, const char* what) : n_(host.size()) {
    const size_t bytes = (n_ + 2 * kGuard) * sizeof(T);
    base_ = static_cast<T*>(simt_rt::device_alloc(bytes, what));
    simt_rt::memset_async(base_, 0xff, bytes, simt_rt::current_stream());
    if (n_) simt_rt::memcpy_h2d(base_ + kGuard, host.data(), n_ * sizeof(T), simt_rt::current_stream());
  }
  ~Guarded() { simt_rt::device_free(base_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;

  T* get() const { return base_ + kGuard; }
  size_t size() const { return n_; }

  std::vector<T> download() const {
    std::vector<T> out(n_);
    if (n_) simt_rt::memcpy_d2h(out.data(), get(), n_ * sizeof(T), simt_rt::current_stream());
    simt_rt::stream_synchronize(simt_rt::current_stream());
    return out;
  }

  // Whether every guard byte still holds 0xff.
  bool guards_intact() const {
    std::vector<unsigned char> bytes((n_ + 2 * kGuard) * sizeof(T));
    simt_rt::memcpy_d2h(bytes.data(), base_, bytes.size(), simt_rt::current_stream());
    simt_rt::stream_synchronize(simt_rt::current_stream());
    const size_t guard_bytes = kGuard * sizeof(T);
    for (size_t i = 0; i < guard_bytes; ++i) {
      if (bytes[i] != 0xff || bytes[bytes.size() - 1 - i] != 0xff) return false;
    }
    return true;
  }

 private:
  size_t n_;
  T* base_;
};

// Equal bits, or both NaN (a GPU returns its canonical NaN where the CPU keeps the operand's).
inline bool same_value(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

// Index of the first element where got and want differ by same_value, or -1.
inline int64_t first_difference(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!same_value(got[i], want[i])) return int64_t(i);
  return -1;
}

// The message of the tf::Error that f throws, or "" when it returns.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace tf::test
