// defines: tf::cuda::rt on the CUDA runtime: every call checked with TF_CUDA_CHECK (file:line and
// CUDA's error string), streams created non-blocking so that only events and synchronisation order
// them, as in the simulator.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/pinned_ledger.h"
#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace tf::cuda::rt {
namespace {

constexpr int kScratchSlots = 64;
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
};

std::array<Scratch, kScratchSlots>& scratch_slots() {
  static std::array<Scratch, kScratchSlots> slots{};
  return slots;
}
std::mutex& scratch_mutex() {
  static std::mutex m;
  return m;
}

std::atomic<StreamHandle>& current() {
  static std::atomic<StreamHandle> s{nullptr};
  return s;
}

std::atomic<bool>& sync_flag() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("TF_CUDA_SYNC");
    return env && std::strcmp(env, "1") == 0;
  }()};
  return on;
}

// The most device memory cudaMemGetInfo reported in use, sampled after each allocation.
std::atomic<size_t>& peak_used() {
  static std::atomic<size_t> peak{0};
  return peak;
}

void note_in_use() {
  const size_t used = memory_in_use();
  size_t seen = peak_used().load();
  while (used > seen && !peak_used().compare_exchange_weak(seen, used)) {
  }
}

cudaStream_t cs(StreamHandle s) {
  return static_cast<cudaStream_t>(s);
}

// The live host_alloc_pinned allocations.
PinnedLedger& pinned() {
  static PinnedLedger ledger;
  return ledger;
}

}  // namespace

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  // No driver or no device means no CUDA device, not an error: the caller picks another backend.
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    cudaGetLastError();
    return 0;
  }
  TF_CUDA_CHECK(e);
  return n;
}

void set_device(int device) {
  TF_CUDA_CHECK(cudaSetDevice(device));
}

std::string device_name(int device) {
  cudaDeviceProp prop{};
  TF_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

size_t device_total_memory(int device) {
  cudaDeviceProp prop{};
  TF_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.totalGlobalMem;
}

void* device_alloc(size_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    const bool known = cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess;
    cudaGetLastError();
    TF_FAIL("cannot allocate ", bytes, " bytes of device memory for '", what, "'",
            known ? detail::concat(" (", free_bytes, " of ", total_bytes, " bytes free)") : std::string(),
            ": ", cudaGetErrorString(e));
  }
  note_in_use();
  return p;
}

size_t allocation_bytes(size_t bytes) {
  constexpr size_t kGranule = size_t(2) << 20;
  return std::max<size_t>((bytes + kGranule - 1) / kGranule, 1) * kGranule;
}

size_t memory_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  TF_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return total_bytes - free_bytes;
}

size_t memory_peak() {
  note_in_use();
  return peak_used().load();
}

void reset_memory_peak() {
  peak_used().store(memory_in_use());
}

void device_free(void* p) {
  TF_CUDA_CHECK(cudaFree(p));
}

void* host_alloc_pinned(size_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocDefault);
  if (e != cudaSuccess) {
    cudaGetLastError();
    TF_FAIL("cannot allocate ", bytes, " bytes of page-locked host memory for ", what, ": ",
            cudaGetErrorString(e));
  }
  pinned().add(p, bytes);
  return p;
}

void host_free_pinned(void* p) {
  if (!p) return;
  pinned().remove(p);
  TF_CUDA_CHECK(cudaFreeHost(p));
}

size_t pinned_in_use() {
  return pinned().in_use();
}

bool host_register(const void* p, size_t bytes, std::string* why) {
  const cudaError_t e = cudaHostRegister(const_cast<void*>(p), bytes, cudaHostRegisterReadOnly);
  if (e == cudaSuccess) return true;
  cudaGetLastError();
  if (why) *why = cudaGetErrorString(e);
  return false;
}

void host_unregister(const void* p) {
  TF_CUDA_CHECK(cudaHostUnregister(const_cast<void*>(p)));
}

void memcpy_h2d(void* dst, const void* src, size_t bytes, StreamHandle s) {
  TF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cs(s)));
}

void memcpy_d2h(void* dst, const void* src, size_t bytes, StreamHandle s) {
  TF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cs(s)));
}

void memcpy_d2d(void* dst, const void* src, size_t bytes, StreamHandle s) {
  TF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cs(s)));
}

void memset_async(void* dst, int value, size_t bytes, StreamHandle s) {
  TF_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, cs(s)));
}

StreamHandle stream_create() {
  cudaStream_t s = nullptr;
  TF_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void stream_destroy(StreamHandle s) {
  if (s) TF_CUDA_CHECK(cudaStreamDestroy(cs(s)));
}

EventHandle event_create() {
  cudaEvent_t e = nullptr;
  TF_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

void event_destroy(EventHandle e) {
  if (e) TF_CUDA_CHECK(cudaEventDestroy(static_cast<cudaEvent_t>(e)));
}

void event_record(EventHandle e, StreamHandle s) {
  TF_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e), cs(s)));
}

void stream_wait_event(StreamHandle s, EventHandle e) {
  TF_CUDA_CHECK(cudaStreamWaitEvent(cs(s), static_cast<cudaEvent_t>(e), 0));
}

void stream_synchronize(StreamHandle s) {
  TF_CUDA_CHECK(cudaStreamSynchronize(cs(s)));
}

void device_synchronize() {
  TF_CUDA_CHECK(cudaDeviceSynchronize());
}

StreamHandle current_stream() {
  return current().load();
}

void set_current_stream(StreamHandle s) {
  current().store(s);
}

void set_sync_after_launch(bool on) {
  sync_flag().store(on);
}

bool sync_after_launch() {
  return sync_flag().load();
}

void* scratch(int slot, size_t bytes) {
  TF_CHECK(slot >= 0 && slot < kScratchSlots, "rt::scratch: slot ", slot, " is not in 0..",
           kScratchSlots - 1);
  std::lock_guard lock(scratch_mutex());
  Scratch& sc = scratch_slots()[size_t(slot)];
  if (sc.bytes < bytes || !sc.p) {
    // cudaFree waits for the device, so no queued kernel still uses the old slot.
    device_free(sc.p);
    sc = Scratch{};
    sc.p = device_alloc(bytes, ("rt::scratch slot " + std::to_string(slot)).c_str());
    sc.bytes = bytes;
  }
  return sc.p;
}

void release_scratch() {
  std::lock_guard lock(scratch_mutex());
  for (Scratch& sc : scratch_slots()) {
    device_free(sc.p);
    sc = Scratch{};
  }
}

}  // namespace tf::cuda::rt
