// defines: the cpu backend: tf::cpu's ops on host memory, every copy done at once (there is only one
// stream of work on the host), weights read where they lie
#include "kernels/backend.h"

#include <cstdlib>
#include <cstring>

#include "src/core/error.h"

namespace tf {

namespace {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  bool host_memory() const override { return true; }
  MemTracker& tracker() override { return MemTracker::instance(); }

  void upload(void* dst, const void* src, size_t bytes, Stream) override { copy_host(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes, Stream) override { copy_host(dst, src, bytes); }
  void copy_bytes(void* dst, const void* src, size_t bytes, Stream) override { copy_host(dst, src, bytes); }
  Event record(Stream) override { return Event{}; }
  void wait(Stream, Event) override {}
  void synchronize() override {}

  bool supports_weight(DType) const override { return true; }
  WeightRef place_weight(const WeightRef& host, std::string_view, std::vector<DeviceMem>&) override {
    return host;
  }
  std::string attention_kernel(int) const override { return "cpu"; }

#define TF_OP(ret, name, params, args) \
  ret do_##name params override {      \
    return cpu::name args;             \
  }
#include "kernels/op_signatures.inc"
#undef TF_OP

 protected:
  void* allocate(size_t bytes, MemTag tag, std::string_view what) override {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TF_CHECK(p != nullptr, "out of host memory allocating ", bytes, " bytes for ", what);
    MemTracker::instance().on_alloc(tag, bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes, MemTag tag) override {
    std::free(p);
    MemTracker::instance().on_free(tag, bytes);
  }

 private:
  static void copy_host(void* dst, const void* src, size_t bytes) {
    if (bytes) std::memmove(dst, src, bytes);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() {
  return std::make_unique<CpuBackend>();
}

Backend& cpu_backend() {
  static const std::unique_ptr<Backend> backend = make_cpu_backend();
  return *backend;
}

}  // namespace tf
