// defines: tf::Device, tf::TensorView (non-owning), tf::Tensor (owning, tracked)
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "src/core/alloc.h"
#include "src/core/dtype.h"

namespace tf {

enum class Device : uint8_t { CPU, CUDA };

constexpr int kMaxDims = 4;

// A view: where the elements are, their type, shape and strides (in elements), and a name used
// in error messages. Copying a view never copies data.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};
  std::string name;

  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               std::string name = {});
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  int64_t dim(int i) const { return shape[size_t(i)]; }
  std::string shape_str() const;  // "[4, 64]"

  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

// Owning tensor: a tracked Buffer plus a contiguous view of it.
struct Tensor {
  Buffer storage;
  TensorView view;

  Tensor() = default;
  Tensor(DType dtype, std::initializer_list<int64_t> shape, MemTag tag, std::string name = {});
  template <typename T>
  T* as() {
    return static_cast<T*>(view.data);
  }
  template <typename T>
  const T* as() const {
    return static_cast<const T*>(view.data);
  }
  int64_t numel() const { return view.numel(); }
};

}  // namespace tf
