// defines: tf::sim, the SIMT simulator that runs kernels/cuda/ kernels on the CPU: Dim3,
// DeviceBuffer (checked device allocations), Ptr / Ref (checked device pointers), launch, and the
// device-side entry points kernels/cuda/port.h maps CUDA's spellings onto.
//
// A launch runs its blocks one after another in a seeded order (or interleaved, see
// set_block_interleave); inside a block every thread is a fiber with its own stack. A thread
// runs until it reaches a barrier or a warp collective; the scheduler then picks
// the next runnable thread at random from a seeded generator, so thread order between barriers
// changes with the seed (set_seed, or the TF_SIM_SEED environment variable). The first problem a
// launch finds ends it with a tf::Error naming the kernel, block, threads and address.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "src/core/alloc.h"

namespace tf::sim {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Limits of the target architecture, sm_90 (CUDA C Programming Guide, compute capability 9.0).
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr Dim3 kMaxBlockDim{1024, 1024, 64};
inline constexpr unsigned kMaxGridX = 0x7fffffffu, kMaxGridYZ = 65535;
inline constexpr size_t kMaxStaticSmem = 48 * 1024;
inline constexpr size_t kMaxSmemPerBlock = 227 * 1024;  // static + dynamic, with the opt-in
inline constexpr int kWarpSize = 32;

// Seed of the thread-order shuffle for later launches on this host thread.
void set_seed(uint64_t seed);
uint64_t seed();
// How many blocks of a launch run side by side, interleaved at thread switches in a seeded order,
// for later launches on this host thread (TF_SIM_INTERLEAVE; 1, the default, runs them one after
// another). Code that assumes an order between blocks then sees them overlap.
void set_block_interleave(unsigned resident);
unsigned block_interleave();

enum class Space : uint8_t { Global, Shared, Constant };

// Memory a pointer may reach: a global allocation or one shared-memory array of one block.
struct Region {
  std::byte* base = nullptr;
  size_t bytes = 0;
  Space space = Space::Global;
  size_t elem_size = 0;  // element size for messages ("'tile'[12]"); 0 when untyped
  std::string name;
  bool initialised = true;  // false for a __constant__ table the host has not uploaded yet
  // Freed by rt::device_free: the region stays registered as a tombstone, so that an access
  // through a stale pointer is reported as a use after free of this allocation.
  bool freed = false;
  // rt::device_alloc memory: which stream operations last read and wrote each granule
  // (kernels/sim/runtime.h); null for memory whose accesses are not ordered by streams.
  struct StreamShadow* streams = nullptr;
};

// AsyncCopy is the issue of a cp.async into shared memory: checked as a write (bounds, races), since
// the copy may land at any time until its wait, but its bytes count as written only at the wait.
enum class AccessKind : uint8_t { Read, Write, Atomic, AsyncCopy };

// Checks one access by the running thread: bounds and alignment always, races and initialisation
// for shared memory. Ends the launch with a report when the access is wrong.
void check_access(const Region* region, uintptr_t addr, size_t bytes, AccessKind kind);
// The global allocation holding p, or nullptr for a null p; reports a pointer no DeviceBuffer owns.
const Region* find_global(const void* p);
// The global allocation (live or freed) holding p, or nullptr when none does.
const Region* global_region(const void* p);
// Makes a global allocation known to the simulator (DeviceBuffer and rt::device_alloc do this).
void register_global(const Region* r);

// Device memory for simulated kernels: an ordinary host allocation that the simulator knows, so
// every access a kernel makes through it is bounds-checked. Filled with 0xff bytes (NaN in f32,
// bf16 and f16) so that a kernel reading what nobody wrote produces visibly wrong results.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, std::string name, size_t elem_size = 0);
  template <typename T>
  static DeviceBuffer from(const std::vector<T>& host, std::string name) {
    DeviceBuffer b(host.size() * sizeof(T), std::move(name), sizeof(T));
    if (!host.empty()) std::memcpy(b.data(), host.data(), b.bytes());
    return b;
  }
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&&) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() { return storage_.data(); }
  size_t bytes() const { return storage_.bytes(); }
  template <typename T>
  T* as() {
    return static_cast<T*>(data());
  }
  template <typename T>
  std::vector<T> to_vector() const {
    std::vector<T> out(bytes() / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), storage_.data(), out.size() * sizeof(T));
    return out;
  }

 private:
  Buffer storage_;
  std::unique_ptr<Region> region_;  // stable address: pointers handed to kernels refer to it
};

template <typename T>
class Ptr;

// A checked reference to one element of device memory: reading converts to the value, assigning
// stores it; both go through check_access.
template <typename T>
class Ref {
  using V = std::remove_const_t<T>;

 public:
  Ref(uintptr_t addr, const Region* region) : addr_(addr), region_(region) {}
  Ref(const Ref&) = default;

  operator V() const {
    check_access(region_, addr_, sizeof(V), AccessKind::Read);
    V v;
    std::memcpy(&v, reinterpret_cast<const void*>(addr_), sizeof(V));
    return v;
  }
  Ref& operator=(const V& v) requires(!std::is_const_v<T>) {
    check_access(region_, addr_, sizeof(V), AccessKind::Write);
    std::memcpy(reinterpret_cast<void*>(addr_), &v, sizeof(V));
    return *this;
  }
  Ref& operator=(const Ref& other) requires(!std::is_const_v<T>) { return *this = V(other); }
  template <typename U>
  Ref& operator+=(const U& u) {
    return *this = V(V(*this) + u);
  }
  template <typename U>
  Ref& operator-=(const U& u) {
    return *this = V(V(*this) - u);
  }
  template <typename U>
  Ref& operator*=(const U& u) {
    return *this = V(V(*this) * u);
  }
  template <typename U>
  Ref& operator/=(const U& u) {
    return *this = V(V(*this) / u);
  }
  template <typename U>
  Ref& operator|=(const U& u) {
    return *this = V(V(*this) | u);
  }
  template <typename U>
  Ref& operator&=(const U& u) {
    return *this = V(V(*this) & u);
  }
  template <typename U>
  Ref& operator^=(const U& u) {
    return *this = V(V(*this) ^ u);
  }
  Ptr<T> operator&() const { return Ptr<T>(addr_, region_); }

 private:
  uintptr_t addr_;
  const Region* region_;
};

// A device pointer that remembers which allocation or shared array it points into, so every
// dereference can be checked against it. Arithmetic is unchecked, as in C++: only accesses are.
template <typename T>
class Ptr {
 public:
  Ptr() = default;
  Ptr(std::nullptr_t) {}
  // Implicit from a raw pointer so that kernel arguments convert at launch; the pointer must lie
  // in device memory (a DeviceBuffer or rt::device_alloc).
  Ptr(T* p) : addr_(reinterpret_cast<uintptr_t>(p)), region_(find_global(p)) {}
  Ptr(uintptr_t addr, const Region* region) : addr_(addr), region_(region) {}
  template <typename U>
  requires(std::is_convertible_v<U*, T*> && !std::is_same_v<U, T>) Ptr(const Ptr<U>& other)
      : addr_(other.addr()), region_(other.region()) {}

  Ref<T> operator*() const { return Ref<T>(addr_, region_); }
  Ref<T> operator[](std::ptrdiff_t i) const { return Ref<T>(at(i), region_); }
  Ptr operator+(std::ptrdiff_t i) const { return Ptr(at(i), region_); }
  Ptr operator-(std::ptrdiff_t i) const { return Ptr(at(-i), region_); }
  Ptr& operator+=(std::ptrdiff_t i) { return *this = *this + i; }
  Ptr& operator-=(std::ptrdiff_t i) { return *this = *this - i; }
  Ptr& operator++() { return *this += 1; }
  Ptr& operator--() { return *this -= 1; }
  std::ptrdiff_t operator-(const Ptr& o) const {
    return (std::ptrdiff_t(addr_) - std::ptrdiff_t(o.addr_)) / std::ptrdiff_t(sizeof(T));
  }
  explicit operator bool() const { return addr_ != 0; }
  bool operator==(const Ptr& o) const { return addr_ == o.addr_; }

  uintptr_t addr() const { return addr_; }
  const Region* region() const { return region_; }

 private:
  uintptr_t at(std::ptrdiff_t i) const { return addr_ + uintptr_t(i * std::ptrdiff_t(sizeof(T))); }
  uintptr_t addr_ = 0;
  const Region* region_ = nullptr;
};

template <typename U, typename T>
Ptr<U> ptr_cast(const Ptr<T>& p) {
  return Ptr<U>(p.addr(), p.region());
}

// ---- shared memory ------------------------------------------------------------------------------

// One static __shared__ declaration (a function-local static, so one per declaration site and
// template instantiation); each block gets its own storage for it.
struct SharedDecl {
  const char* name;
  size_t bytes;
  size_t elem_size;
};
const Region* static_shared(const SharedDecl& decl);
const Region* dynamic_shared();
template <typename T>
Ptr<T> region_ptr(const Region* r) {
  return Ptr<T>(uintptr_t(r->base), r);
}

// ---- thread identity, barriers, warp collectives ------------------------------------------------

const Dim3& thread_index();
const Dim3& block_index();
const Dim3& block_dim();
const Dim3& grid_dim();

void syncthreads(std::source_location loc);
// __syncthreads_count: a barrier that also returns how many threads of the block passed pred.
unsigned syncthreads_count(bool pred, std::source_location loc);
void syncwarp(unsigned mask, std::source_location loc);

enum class ShflKind : uint8_t { Idx, Up, Down, Xor };
uint64_t shfl_bits(ShflKind kind, unsigned mask, uint64_t value, int arg, int width,
                   std::source_location loc);
template <typename T>
T shfl(ShflKind kind, unsigned mask, T value, int arg, int width, std::source_location loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shfl_bits(kind, mask, bits, arg, width, loc);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

enum class VoteKind : uint8_t { Ballot, Any, All };
unsigned vote(VoteKind kind, unsigned mask, bool pred, std::source_location loc);

// __reduce_{add,min,max}_sync over the lanes of mask, on int (is_signed) or unsigned values; add
// wraps modulo 2^32 like the hardware.
enum class ReduceKind : uint8_t { Add, Min, Max };
uint32_t reduce(ReduceKind kind, bool is_signed, unsigned mask, uint32_t value, std::source_location loc);

// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16 with this lane's row address.
void ldmatrix(int num, bool trans, uint32_t* regs, const Region* region, uintptr_t addr,
              std::source_location loc);

// cp.async.{ca,cg}.shared.global: copies cp_size bytes (src_size of them read, the rest zero) at
// the thread's next cp_async_wait that retires its group, as the hardware may.
void cp_async(const Region* dst_region, uintptr_t dst, const Region* src_region, uintptr_t src, int cp_size,
              int src_size, std::source_location loc);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Atomic read-modify-write: returns the old value. Blocks run one at a time on one host thread, so
// no host atomics are needed; the checker treats atomics from different threads as ordered.
template <typename T, typename F>
T atomic_rmw(const Ptr<T>& p, F update) {
  check_access(p.region(), p.addr(), sizeof(T), AccessKind::Atomic);
  T old;
  std::memcpy(&old, reinterpret_cast<const void*>(p.addr()), sizeof(T));
  const T next = update(old);
  std::memcpy(reinterpret_cast<void*>(p.addr()), &next, sizeof(T));
  return old;
}

// ---- launch -------------------------------------------------------------------------------------

struct LaunchSpec {
  const char* kernel;
  Dim3 grid;
  Dim3 block;
  size_t dynamic_smem;
  void* stream = nullptr;  // an rt::StreamHandle: the launch's accesses happen on it
};
// Checks the configuration against the sm_90 limits, then runs body once per thread of every block.
void run(const LaunchSpec& spec, const std::function<void()>& body);

// Reports a struct kernel parameter (parameter `index`, 0-based, of `bytes` bytes at p) with an
// 8-byte word that points into device memory and is not the address half of a Ptr: accesses
// through such a raw member would bypass every check.
void check_struct_param(const char* kernel, size_t index, const void* p, size_t bytes);

template <typename T>
inline constexpr bool is_ptr_v = false;
template <typename T>
inline constexpr bool is_ptr_v<Ptr<T>> = true;

template <typename... Params, typename... Args>
void launch_with(const LaunchSpec& spec, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  static_assert((!std::is_pointer_v<std::decay_t<Params>> && ...),
                "a kernel parameter that points to device memory must be a port::gptr<T>, so that the "
                "simulator can check the kernel's accesses through it");
  std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  [&]<size_t... I>(std::index_sequence<I...>) {
    auto check = [&](size_t index, const auto& param) {
      using P = std::decay_t<decltype(param)>;
      if constexpr (std::is_class_v<P> && std::is_trivially_copyable_v<P> && !is_ptr_v<P>)
        check_struct_param(spec.kernel, index, &param, sizeof(P));
    };
    (check(I, std::get<I>(params)), ...);
  }
  (std::index_sequence_for<Params...>{});
  run(spec, [&] { std::apply(kernel, params); });
}

// A launch on the default stream.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_smem,
            Args&&... args) {
  launch_with(LaunchSpec{name, grid, block, dynamic_smem}, kernel, std::forward<Args>(args)...);
}

}  // namespace tf::sim
