// defines: the backend-independent parts of tf::Backend (DeviceMem, alloc, the timing of a profiled
// op) and make_backend, which turns a --device value into a backend
#include "kernels/backend.h"

#include <chrono>
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

double Backend::start_op() {
  synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Backend::finish_op(OpId op, const OpWork& work, double t0) {
  synchronize();
  const double t1 =
      std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  profile_->add(op, role_, t1 - t0, work);
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

AttentionKernel parse_attention(std::string_view name) {
  for (const AttentionKernel k :
       {AttentionKernel::Auto, AttentionKernel::Flash, AttentionKernel::Plain, AttentionKernel::Cudnn})
    if (name == attention_name(k)) return k;
  TF_FAIL("--attention must be auto, flash, plain or cudnn, got '", name, "'");
}

const char* attention_name(AttentionKernel k) {
  switch (k) {
    case AttentionKernel::Auto: return "auto";
    case AttentionKernel::Flash: return "flash";
    case AttentionKernel::Plain: return "plain";
    case AttentionKernel::Cudnn: return "cudnn";
  }
  return "?";
}

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

void check_device(std::string_view spec, AttentionKernel attention) {
  const DeviceSpec d = parse_device(spec);
  TF_CHECK(d.kind != DeviceSpec::Kind::Cpu || attention == AttentionKernel::Auto, "--attention ",
           attention_name(attention),
           " chooses a kernel of the CUDA backend (--device simt or cuda); the cpu ",
           "backend has one attention kernel (leave --attention auto)");
  TF_CHECK(d.kind != DeviceSpec::Kind::Simt || attention != AttentionKernel::Cudnn,
           "--attention cudnn runs cuDNN's fused attention on a GPU (--device cuda); the simt simulator does "
           "not run cuDNN");
#if !TIGHTFIT_HAVE_CUDA
  TF_CHECK(d.kind != DeviceSpec::Kind::Cuda, "--device ", spec,
           ": this tightfit was built without the CUDA backend (build it where the CUDA toolkit is "
           "installed, with -DTIGHTFIT_CUDA=ON)");
#endif
}

std::unique_ptr<Backend> make_backend(std::string_view spec, std::string* picked, AttentionKernel attention) {
  check_device(spec, attention);
  const DeviceSpec d = parse_device(spec);
  switch (d.kind) {
    case DeviceSpec::Kind::Cpu: return make_cpu_backend();
    case DeviceSpec::Kind::Simt: return simt::make_device_backend(0, attention);
#if TIGHTFIT_HAVE_CUDA
    case DeviceSpec::Kind::Cuda: return cuda::make_device_backend(d.index, attention);
#else
    case DeviceSpec::Kind::Cuda: break;
#endif
    case DeviceSpec::Kind::Auto: break;
  }
  std::string why;
  if (count_gpus(&why) > 0) {
    std::unique_ptr<Backend> gpu = make_backend("cuda:0", nullptr, attention);
    if (picked) *picked = gpu->describe() + ", picked by --device auto";
    return gpu;
  }
  TF_CHECK(attention == AttentionKernel::Auto, "--attention ", attention_name(attention),
           " chooses a kernel of the CUDA backend, but --device auto found no GPU (", why,
           "); use --device simt to run it on the simulator, or leave --attention auto");
  if (picked) *picked = "cpu (--device auto: " + why + ")";
  return make_cpu_backend();
}

}  // namespace tf
