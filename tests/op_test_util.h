// defines: helpers shared by op tests: seeded random data, relative norm error, central
// finite differences in float64, bf16 rounding of test weights, a scoped thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "src/core/rng.h"

namespace tf::test {

// OpenMP's and OpenBLAS's thread count for the scope.
class ScopedThreads {
 public:
  explicit ScopedThreads(int n) : saved_(cpu::num_threads()) { cpu::set_num_threads(n); }
  ~ScopedThreads() { cpu::set_num_threads(saved_); }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int saved_;
};

// Deterministic uniform values in [-scale, scale).
inline std::vector<float> random_floats(size_t n, uint64_t seed, float scale = 1.0f) {
  Philox rng(seed, 0x7e57);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (2.0f * rng.uniform(i) - 1.0f) * scale;
  return v;
}

inline std::vector<double> to_double(const std::vector<float>& v) {
  return {v.begin(), v.end()};
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

// ||got - want|| / max(||want||, tiny): the error measure every op test bounds.
template <typename A, typename B>
double rel_norm_error(const A* got, const B* want, size_t n) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double(got[i]) - double(want[i]);
    diff += d * d;
    ref += double(want[i]) * double(want[i]);
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}
template <typename A, typename B>
double rel_norm_error(const std::vector<A>& got, const std::vector<B>& want) {
  return rel_norm_error(got.data(), want.data(), std::min(got.size(), want.size()));
}

// Central differences of the scalar f with respect to every element of x (modified in place and
// restored). With f evaluated in float64 and h = 1e-6 the truncation and rounding errors are both
// around 1e-10 relative, far below the 1e-6-level disagreement a wrong backward produces.
inline std::vector<double> numeric_gradient(std::vector<double>& x, const std::function<double()>& f,
                                            double h = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = f();
    x[i] = saved - h;
    const double down = f();
    x[i] = saved;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

}  // namespace tf::test
