// defines: tf::Backend (the one interface the model, LoRA and the trainer run on: memory where the
// ops run, copies to and from the host, a compute and a copy stream with events, and every op of
// kernels/op_signatures.inc, each a call of its virtual do_<op> that an attached OpProfile times),
// tf::OpRole, tf::DeviceMem, tf::cpu_backend, tf::make_backend
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/ops.h"
#include "kernels/profile.h"
#include "kernels/scratch_shape.h"
#include "src/core/alloc.h"
#include "src/core/error.h"

namespace tf {

class Backend;

// An allocation in a backend's memory (host memory for cpu, device memory for cuda and simt),
// counted against its tag in the backend's tracker for its lifetime. Move-only; frees itself.
class DeviceMem {
 public:
  DeviceMem() = default;
  ~DeviceMem() { release(); }
  DeviceMem(DeviceMem&& o) noexcept { *this = std::move(o); }
  DeviceMem& operator=(DeviceMem&& o) noexcept;
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  MemTag tag() const { return tag_; }

 private:
  friend class Backend;
  void release();
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  MemTag tag_ = MemTag::Workspace;
};

// Host memory a backend gives for copies to and from its memory (Backend::alloc_host), counted
// against its tag in the process's MemTracker for its lifetime. Move-only; frees itself.
class HostMem {
 public:
  HostMem() = default;
  ~HostMem() { release(); }
  HostMem(HostMem&& o) noexcept { *this = std::move(o); }
  HostMem& operator=(HostMem&& o) noexcept {
    if (this != &o) {
      release();
      owner_ = std::exchange(o.owner_, nullptr);
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      tag_ = o.tag_;
    }
    return *this;
  }
  HostMem(const HostMem&) = delete;
  HostMem& operator=(const HostMem&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  friend class Backend;
  inline void release();
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  MemTag tag_ = MemTag::Workspace;
};

// An allocation a component will ask a backend for, as its memory plan lists it.
struct PlannedAlloc {
  std::string what;
  MemTag tag = MemTag::Workspace;
  size_t bytes = 0;
};

// The attention kernels a device backend runs (--attention): Flash, bf16 on tensor cores; Plain, the
// tiled f32 kernels (the device reference); Cudnn, cuDNN's fused attention (a GPU with cuDNN only).
// Auto is flash where it takes the head dimension, else plain. The cpu has one kernel and takes only
// Auto.
enum class AttentionKernel : uint8_t { Auto, Flash, Plain, Cudnn };
// "auto", "flash", "plain", "cudnn"; throws naming --attention for anything else.
AttentionKernel parse_attention(std::string_view name);
const char* attention_name(AttentionKernel k);

// The two queues of work a backend has. Work on one stream runs in order; work on different
// streams is ordered only by events. The cpu backend runs everything at once, in call order.
enum class Stream : uint8_t { Compute, Copy };
struct Event {
  uint64_t id = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  // "cpu", "simt", "cuda:0"; describe() adds what the user should know ("cuda:0 (NVIDIA H200, 139 GiB)").
  virtual std::string name() const = 0;
  virtual std::string describe() const { return name(); }
  // Whether this backend's memory is host memory the caller may read and write directly.
  virtual bool host_memory() const { return false; }

  // ---- memory --------------------------------------------------------------------------------
  // Bytes in this backend's memory, contents unspecified; `what` names it in errors.
  DeviceMem alloc(size_t bytes, MemTag tag, std::string_view what);
  // As alloc, for memory made outside any step whose size a run's plan cannot know (a KV cache,
  // sized by the prompt): a device backend takes it from the device as a block of its own, so that
  // a reserved arena stays exactly the plan.
  DeviceMem alloc_unplanned(size_t bytes, MemTag tag, std::string_view what);
  // Host memory that copies to and from this backend's memory read or write: page-locked on a device
  // backend (rt::host_alloc_pinned), so that the copy engine takes it without staging and the copy
  // overlaps the host; ordinary host memory on the cpu. `what` names it in errors.
  HostMem alloc_host(size_t bytes, MemTag tag, std::string_view what);
  // Page-locks host memory that already holds data (weights copied from where they were loaded),
  // read-only, so that copies from it overlap as from alloc_host's: false, with the reason in *why,
  // where the system refuses (a locked-memory limit), and the copies stay pageable. The cpu has
  // nothing to lock.
  virtual bool register_host(const void* p, size_t bytes, std::string* why) {
    (void)p;
    (void)bytes;
    (void)why;
    return true;
  }
  virtual void unregister_host(const void* p) { (void)p; }
  // Sets aside `bytes` of this backend's memory for a run, before its model is built
  // (LlamaModel::memory_plan says how much). A device backend takes it from the device as one block,
  // its arena, and carves every alloc() from it (first fit, pieces of footprint() bytes); from then
  // on an alloc() that does not fit is an error naming it, the arena's size and its use per tag,
  // never a device allocation in the middle of a step. Only while nothing is allocated from the
  // arena. Without it, a device backend's arena grows when a request fits none of its blocks, by a
  // block of max(the request, 1 MiB, all its blocks so far), so growth takes few device
  // allocations. The cpu backend allocates host memory per alloc() and ignores it.
  virtual void reserve(size_t bytes) { (void)bytes; }
  // Bytes of this backend's memory an alloc() of `bytes` takes, padding included.
  virtual size_t footprint(size_t bytes) const { return bytes; }
  // Bytes of the device reserve(bytes) takes: the arena rounded as the device runtime allocates.
  virtual size_t reserved_bytes(size_t bytes) const { return bytes; }
  // The device scratch the op launchers of a run of `shape` take besides the arena, one entry per
  // scratch slot at its largest, in the bytes the device runtime allocates for it (nothing for the
  // cpu, whose kernels' scratch is host memory). A slot grows to the largest size asked and stays,
  // so all of it is live at the run's peak. cuDNN's workspace is not in it.
  virtual std::vector<PlannedAlloc> scratch_plan(const ScratchShape& shape) const {
    (void)shape;
    return {};
  }
  // The most device memory in use since this backend was made, everything on the device counted
  // (rt::memory_peak); nothing for the cpu.
  virtual std::optional<uint64_t> device_memory_peak() const { return std::nullopt; }
  // Bytes of this backend's memory place_weight allocates for `host` (0 where the ops read it in
  // host memory).
  virtual size_t placed_weight_bytes(const WeightRef& host) const {
    (void)host;
    return 0;
  }
  // Blocks of device memory this backend has taken from its device so far, for alloc() and
  // alloc_unplanned() (0 for cpu, which has no device): constant once a run's model is built.
  virtual size_t device_blocks() const { return 0; }
  // Bytes of memory a GPU has in all (the default budget of a run's plan); nothing for the cpu and
  // the simulator, whose memory is the host's.
  virtual std::optional<uint64_t> memory_capacity() const { return std::nullopt; }
  // Current and peak bytes per tag of this backend's memory.
  virtual MemTracker& tracker() = 0;
  // host -> backend and backend -> backend copies are queued on `s`; download waits for the
  // stream and returns with the bytes on the host.
  virtual void upload(void* dst, const void* src, size_t bytes, Stream s = Stream::Compute) = 0;
  virtual void download(void* dst, const void* src, size_t bytes, Stream s = Stream::Compute) = 0;
  virtual void copy_bytes(void* dst, const void* src, size_t bytes, Stream s = Stream::Compute) = 0;
  // As download, queued on `s` without waiting: the host bytes are there for the work queued on `s`
  // after it, and for the host once `s` has been waited for (the cpu copies them at once).
  virtual void download_async(void* dst, const void* src, size_t bytes, Stream s) {
    download(dst, src, bytes, s);
  }
  virtual Event record(Stream s) = 0;
  virtual void wait(Stream s, Event e) = 0;
  virtual void synchronize() = 0;

  // ---- frozen weights ------------------------------------------------------------------------
  // Whether the ops of this backend read a WeightRef of this storage dtype.
  virtual bool supports_weight(DType dtype) const = 0;
  // A WeightRef for this backend's ops holding the same values as `host` (a weight in host
  // memory), uploading into memory appended to `storage` when the backend has its own. `name`
  // names the tensor in errors (an unsupported dtype among them).
  virtual WeightRef place_weight(const WeightRef& host, std::string_view name,
                                 std::vector<DeviceMem>& storage) = 0;
  // As place_weight, into `dst` (placed_weight_bytes(host) bytes of this backend's memory that the
  // caller owns: a slot that streamed blocks take in turn), queued on `s`: `host` must keep its
  // bytes until that work has run. A backend whose ops read host memory returns `host`.
  virtual WeightRef place_weight_at(const WeightRef& host, std::string_view name, void* dst, Stream s) {
    (void)name;
    (void)dst;
    (void)s;
    return host;
  }

  // ---- ops -----------------------------------------------------------------------------------
  // The attention kernel this backend runs for a head dimension ("cpu", "flash", "plain", "cudnn"):
  // a model checks its head dimension here before it is built, so a --attention choice that cannot
  // run it is refused by name before anything is placed.
  virtual std::string attention_kernel(int head_dim) const = 0;
  // Each op runs the backend's do_<op>, timed into the attached profile when there is one.
#define TF_OP(ret, name, params, args)                                                        \
  ret name params {                                                                           \
    if (!profile_) return do_##name args;                                                     \
    return profiled(OpId::name, op_work::name args, [&]() -> ret { return do_##name args; }); \
  }
#include "kernels/op_signatures.inc"
#undef TF_OP

  // ---- profiling -----------------------------------------------------------------------------
  // From now on every op's call is added to `profile` (nullptr: none, the default), timed by the host
  // clock with the backend synchronised before and after it; without a profile an op costs one test
  // more than its virtual call.
  void set_profile(OpProfile* profile) {
    profile_ = profile;
  }
  OpProfile* profile() const {
    return profile_;
  }

  // Typed helpers over upload / download.
  template <typename T>
  void upload_n(T* dst, const T* src, size_t n, Stream s = Stream::Compute) {
    upload(dst, src, n * sizeof(T), s);
  }
  template <typename T>
  std::vector<T> download_n(const T* src, size_t n, Stream s = Stream::Compute) {
    std::vector<T> out(n);
    download(out.data(), src, n * sizeof(T), s);
    return out;
  }

 protected:
#define TF_OP(ret, name, params, args) virtual ret do_##name params = 0;
#include "kernels/op_signatures.inc"
#undef TF_OP
  virtual void* allocate(size_t bytes, MemTag tag, std::string_view what) = 0;
  virtual void deallocate(void* p, size_t bytes, MemTag tag) = 0;
  virtual void* allocate_unplanned(size_t bytes, MemTag tag, std::string_view what) {
    return allocate(bytes, tag, what);
  }
  virtual void* allocate_host(size_t bytes, std::string_view what) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TF_CHECK(p, "cannot allocate ", bytes, " bytes of host memory for ", what);
    return p;
  }
  virtual void deallocate_host(void* p) {
    std::free(p);
  }

 private:
  friend class DeviceMem;
  friend class HostMem;
  friend class OpRole;
  template <typename F>
  auto profiled(OpId op, const OpWork& work, F&& run) -> decltype(run());
  // The clock before an op, after the work queued before it has finished.
  double start_op();
  // Adds the op's time since `t0`, once its work has finished, to the profile.
  void finish_op(OpId op, const OpWork& work, double t0);

  OpProfile* profile_ = nullptr;
  const char* role_ = "";
};

// Names what the ops called while it lives do for the caller ("q_proj"), so that a profile keeps
// them apart from the same ops' other calls. `role` is kept by pointer: a string literal, or one that
// outlives the scope. Scopes nest; the innermost names the ops.
class OpRole {
 public:
  OpRole(Backend& be, const char* role) : be_(be), outer_(std::exchange(be.role_, role)) {}
  ~OpRole() { be_.role_ = outer_; }
  OpRole(const OpRole&) = delete;
  OpRole& operator=(const OpRole&) = delete;

 private:
  Backend& be_;
  const char* outer_;
};

template <typename F>
auto Backend::profiled(OpId op, const OpWork& work, F&& run) -> decltype(run()) {
  const double t0 = start_op();
  if constexpr (std::is_void_v<decltype(run())>) {
    run();
    finish_op(op, work, t0);
  } else {
    auto result = run();
    finish_op(op, work, t0);
    return result;
  }
}

inline HostMem Backend::alloc_host(size_t bytes, MemTag tag, std::string_view what) {
  HostMem m;
  if (!bytes) return m;
  m.data_ = allocate_host(bytes, what);
  m.owner_ = this;
  m.bytes_ = bytes;
  m.tag_ = tag;
  MemTracker::instance().on_alloc(tag, bytes);
  return m;
}

inline void HostMem::release() {
  if (owner_ && data_) {
    owner_->deallocate_host(data_);
    MemTracker::instance().on_free(tag_, bytes_);
  }
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

inline DeviceMem Backend::alloc_unplanned(size_t bytes, MemTag tag, std::string_view what) {
  DeviceMem m;
  m.owner_ = this;
  m.bytes_ = bytes;
  m.tag_ = tag;
  m.data_ = bytes ? allocate_unplanned(bytes, tag, what) : nullptr;
  return m;
}

// The process's cpu backend (today's tf::cpu ops on host memory, counted in MemTracker::instance()).
Backend& cpu_backend();

// The backend a --device value names: "cpu", "simt" (the CUDA backend on the SIMT simulator),
// "cuda" / "cuda:N" (a GPU; needs a build with the CUDA backend) or "auto" (cuda:0 when a GPU is
// present, else cpu). `picked` receives one line saying what auto chose and why. `attention` is the
// --attention choice: anything but Auto needs a device backend, and Cudnn a GPU with cuDNN.
std::unique_ptr<Backend> make_backend(std::string_view spec, std::string* picked = nullptr,
                                      AttentionKernel attention = AttentionKernel::Auto);
// The number of CUDA devices this build can use, or 0 with the reason in *why (a build without the
// CUDA backend, no driver, no device).
int count_gpus(std::string* why);
// The checks of make_backend that need no device: the spelling of `spec`, and cuda in a build
// without the CUDA backend, and an --attention choice the device cannot take. For refusing a bad
// --device or --attention before a model loads.
void check_device(std::string_view spec, AttentionKernel attention = AttentionKernel::Auto);

}  // namespace tf
