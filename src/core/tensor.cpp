#include "src/core/tensor.h"

#include "src/core/error.h"

namespace tf {

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  std::string name) {
  TF_CHECK(shape.size() <= size_t(kMaxDims), "tensor ", name, " has ", shape.size(), " dims; at most ",
           kMaxDims, " are supported");
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = int(shape.size());
  int i = 0;
  for (int64_t s : shape) {
    TF_CHECK(s >= 0, "tensor ", name, " has negative dimension ", s);
    v.shape[size_t(i++)] = s;
  }
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[size_t(d)] = stride;
    stride *= v.shape[size_t(d)];
  }
  v.name = std::move(name);
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[size_t(d)];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[size_t(d)] != 1 && strides[size_t(d)] != stride) return false;
    stride *= shape[size_t(d)];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (int d = 0; d < ndim; ++d) {
    if (d) s += ", ";
    s += std::to_string(shape[size_t(d)]);
  }
  return s + "]";
}

Tensor::Tensor(DType dtype, std::initializer_list<int64_t> shape, MemTag tag, std::string name) {
  view = TensorView::contiguous(nullptr, dtype, shape, std::move(name));
  storage = Buffer(view.nbytes(), tag);
  view.data = storage.data();
}

}  // namespace tf
