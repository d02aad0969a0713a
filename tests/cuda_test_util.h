// defines: helpers for tests of the CUDA backend's launchers on the simulator: Guarded<T> (a device
// array between signalling-NaN guard elements that must stay untouched), same_value (bitwise equality that
// lets any NaN match any NaN), error_of
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
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

// n elements of simulated device memory with kGuard guard elements on each side, inside the same
// allocation: the simulator's bounds check does not see a write that lands there, the guard check
// does. A guard is a signalling NaN (0x7f800001 in f32, 0x7f81 in bf16): arithmetic returns a
// quiet NaN with other bits, so even a stray accumulation into a guard (NaN + x) shows, which a
// quiet NaN would hide by coming back unchanged.
template <typename T>
class Guarded {
 public:
  static constexpr size_t kGuard = 37;

  Guarded(const std::vector<T>& host, const char* what) : n_(host.size()) {
    std::vector<T> all(n_ + 2 * kGuard, guard_value());
    std::copy(host.begin(), host.end(), all.begin() + kGuard);
    base_ = static_cast<T*>(simt_rt::device_alloc(all.size() * sizeof(T), what));
    simt_rt::memcpy_h2d(base_, all.data(), all.size() * sizeof(T), simt_rt::current_stream());
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

  // Whether every guard element still holds its bits.
  bool guards_intact() const {
    std::vector<T> all(n_ + 2 * kGuard);
    simt_rt::memcpy_d2h(all.data(), base_, all.size() * sizeof(T), simt_rt::current_stream());
    simt_rt::stream_synchronize(simt_rt::current_stream());
    const T guard = guard_value();
    for (size_t i = 0; i < kGuard; ++i) {
      if (std::memcmp(&all[i], &guard, sizeof(T)) != 0 ||
          std::memcmp(&all[all.size() - 1 - i], &guard, sizeof(T)) != 0)
        return false;
    }
    return true;
  }

 private:
  static T guard_value() {
    static_assert(sizeof(T) == 4 || sizeof(T) == 2, "guards are 32- or 16-bit signalling NaNs");
    const uint32_t bits32 = 0x7f800001u;
    const uint16_t bits16 = 0x7f81u;
    T g;
    std::memcpy(&g, sizeof(T) == 4 ? static_cast<const void*>(&bits32) : &bits16, sizeof(T));
    return g;
  }

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
