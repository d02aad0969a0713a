// defines: the backend-independent parts of tf::Backend (DeviceMem, alloc) and make_backend, which
// turns a --device value into a backend
#include "kernels/backend.h"

#include <utility>

#include "kernels/cuda/device_backend.h"
#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace tf {

DeviceMem& DeviceMem::operator=(DeviceMem&& o) noexcept {
  if (this != &o) {
    release();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    tag_ = o.tag_;
  }
  return *this;
}

void DeviceMem::release() {
  if (owner_ && data_) owner_->deallocate(data_, bytes_, tag_);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

DeviceMem Backend::alloc(size_t bytes, MemTag tag, std::string_view what) {
  DeviceMem m;
  m.owner_ = this;
  m.bytes_ = bytes;
  m.tag_ = tag;
  m.data_ = bytes ? allocate(bytes, tag, what) : nullptr;
  return m;
}

std::unique_ptr<Backend> make_cpu_backend();

namespace {

struct DeviceSpec {
  enum class Kind : uint8_t { Auto, Cpu, Simt, Cuda } kind;
  int index = 0;
};

DeviceSpec parse_device(std::string_view spec) {
  if (spec == "auto") return {DeviceSpec::Kind::Auto};
  if (spec == "cpu") return {DeviceSpec::Kind::Cpu};
  if (spec == "simt") return {DeviceSpec::Kind::Simt};
  if (spec == "cuda") return {DeviceSpec::Kind::Cuda};
  if (spec.starts_with("cuda:") && spec.size() > 5 && spec.size() <= 8) {
    int index = 0;
    for (const char ch : spec.substr(5)) {
      if (ch < '0' || ch > '9') index = -1;
      if (index >= 0) index = index * 10 + (ch - '0');
    }
    if (index >= 0) return {DeviceSpec::Kind::Cuda, index};
  }
  TF_FAIL("--device must be auto, cpu, simt, cuda or cuda:N (N a GPU index), got '", spec, "'");
}

}  // namespace

int count_gpus(std::string* why) {
#if TIGHTFIT_HAVE_CUDA
  try {
    const int n = cuda::rt::device_count();
    if (n == 0) *why = "no CUDA device found";
    return n;
  } catch (const Error& e) {
    *why = e.what();
    return 0;
  }
#else
  *why = "this tightfit was built without the CUDA backend";
  return 0;
#endif
}

void check_device(std::string_view spec) {
  [[maybe_unused]] const DeviceSpec d = parse_device(spec);
#if !TIGHTFIT_HAVE_CUDA
  TF_CHECK(d.kind != DeviceSpec::Kind::Cuda, "--device ", spec,
           ": this tightfit was built without the CUDA backend (build it where the CUDA toolkit is "
           "installed, with -DTIGHTFIT_CUDA=ON)");
#endif
}

std::unique_ptr<Backend> make_backend(std::string_view spec, std::string* picked) {
  check_device(spec);
  const DeviceSpec d = parse_device(spec);
  switch (d.kind) {
    case DeviceSpec::Kind::Cpu: return make_cpu_backend();
    case DeviceSpec::Kind::Simt: return simt::make_device_backend(0);
#if TIGHTFIT_HAVE_CUDA
    case DeviceSpec::Kind::Cuda: return cuda::make_device_backend(d.index);
#else
    case DeviceSpec::Kind::Cuda: break;
#endif
    case DeviceSpec::Kind::Auto: break;
  }
  std::string why;
  if (count_gpus(&why) > 0) {
    std::unique_ptr<Backend> gpu = make_backend("cuda:0");
    if (picked) *picked = gpu->describe() + ", picked by --device auto";
    return gpu;
  }
  if (picked) *picked = "cpu (--device auto: " + why + ")";
  return make_cpu_backend();
}

}  // namespace tf
