// defines: tf::simt::rt, the device runtime of the simulated GPU: device memory the simulator
// checks (bounds, use after free), copies, memset, streams, events and scratch slots.
#include "kernels/cuda/runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "kernels/sim/sim.h"
#include "src/core/error.h"

namespace tf::simt::rt {
namespace {

// One rt::device_alloc: page-aligned anonymous memory. Freeing returns its pages to the system but
// keeps the address range reserved and the region registered, so no later allocation reuses the
// addresses and a stale pointer still names what it pointed to.
struct Allocation {
  sim::Region region;
  size_t mapped = 0;
};

struct Stream {
  int id;
};
struct Event {
  bool recorded = false;
};

constexpr int kScratchSlots = 64;
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
};

struct State {
  std::mutex m;
  std::map<uintptr_t, std::unique_ptr<Allocation>> allocs;  // by base address, freed ones included
  std::set<const Stream*> streams;
  std::set<const Event*> events;
  int next_stream = 1;
  std::mutex scratch_m;  // taken before m, never while holding it
  std::array<Scratch, kScratchSlots> scratch{};
  StreamHandle current = nullptr;
  bool sync_after_launch = [] {
    const char* env = std::getenv("TF_CUDA_SYNC");
    return env && std::strcmp(env, "1") == 0;
  }();
};

State& state() {
  static State s;
  return s;
}

size_t page_size() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

void check_stream(State& st, StreamHandle s, const char* call) {
  TF_CHECK(!s || st.streams.count(static_cast<const Stream*>(s)), call, ": stream ", s,
           " was not made by rt::stream_create or has been destroyed");
}
void check_event(State& st, EventHandle e, const char* call) {
  TF_CHECK(e && st.events.count(static_cast<const Event*>(e)), call, ": event ", e,
           " was not made by rt::event_create or has been destroyed");
}

// Checks that [p, p + bytes) lies in one live device allocation; `role` names the pointer in the
// message ("destination of rt::memcpy_h2d").
void check_device_range(const void* p, size_t bytes, const char* role) {
  if (bytes == 0) return;
  TF_CHECK(p, "the ", role, " is a null pointer (", bytes, " bytes)");
  const sim::Region* r = sim::global_region(p);
  TF_CHECK(r, "the ", role, " ", p,
           " is not device memory (no rt::device_alloc or sim::DeviceBuffer holds it)");
  const size_t off = size_t(static_cast<const std::byte*>(p) - r->base);
  TF_CHECK(!r->freed, "use after free: the ", role, " is in '", r->name, "' (byte offset ", off, " of ",
           r->bytes, "), which rt::device_free has freed");
  TF_CHECK(off + bytes <= r->bytes, "the ", role, ": ", bytes, " bytes at byte offset ", off, " of '",
           r->name, "' (", r->bytes, " bytes) run ", off + bytes - r->bytes, " bytes past its end");
}

}  // namespace

int device_count() {
  return 1;
}

void set_device(int device) {
  TF_CHECK(device == 0, "rt::set_device(", device, "): the simulator has one device, 0");
}

std::string device_name(int device) {
  TF_CHECK(device == 0, "rt::device_name(", device, "): the simulator has one device, 0");
  return "SIMT simulator";
}

size_t device_total_memory(int device) {
  TF_CHECK(device == 0, "rt::device_total_memory(", device, "): the simulator has one device, 0");
  // Simulated device memory is host memory.
  return size_t(sysconf(_SC_PHYS_PAGES)) * page_size();
}

void* device_alloc(size_t bytes, const char* what) {
  const size_t mapped = std::max<size_t>((bytes + page_size() - 1) / page_size(), 1) * page_size();
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TF_CHECK(p != MAP_FAILED, "cannot allocate ", bytes, " bytes of simulated device memory for '", what,
           "': ", std::strerror(errno));
  // 0xff bytes read as NaN in f32, bf16 and f16, so a kernel reading what nobody wrote shows it.
  std::memset(p, 0xff, bytes);
  auto a = std::make_unique<Allocation>();
  a->region.base = static_cast<std::byte*>(p);
  a->region.bytes = bytes;
  a->region.name = what ? what : "(unnamed)";
  a->mapped = mapped;
  sim::register_global(&a->region);
  State& st = state();
  std::lock_guard lock(st.m);
  st.allocs[uintptr_t(p)] = std::move(a);
  return p;
}

void device_free(void* p) {
  if (!p) return;
  State& st = state();
  std::lock_guard lock(st.m);
  auto it = st.allocs.find(uintptr_t(p));
  if (it == st.allocs.end()) {
    const sim::Region* r = sim::global_region(p);
    TF_CHECK(!r, "rt::device_free(", p, "): the pointer is byte offset ",
             static_cast<std::byte*>(p) - r->base, " of '", r->name,
             "', not the start of an rt::device_alloc allocation");
    TF_FAIL("rt::device_free(", p, "): the pointer is not device memory from rt::device_alloc");
  }
  Allocation& a = *it->second;
  TF_CHECK(!a.region.freed, "rt::device_free: '", a.region.name, "' (", a.region.bytes, " bytes at ", p,
           ") was already freed (double free)");
  a.region.freed = true;
  void* q = mmap(p, a.mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  TF_CHECK(q == p, "rt::device_free: cannot release the pages of '", a.region.name,
           "': ", std::strerror(errno));
}

void memcpy_h2d(void* dst, const void* src, size_t bytes, StreamHandle s) {
  {
    State& st = state();
    std::lock_guard lock(st.m);
    check_stream(st, s, "rt::memcpy_h2d");
  }
  check_device_range(dst, bytes, "destination of rt::memcpy_h2d");
  TF_CHECK(src || !bytes, "rt::memcpy_h2d: the host source is a null pointer");
  if (bytes) std::memcpy(dst, src, bytes);
}

void memcpy_d2h(void* dst, const void* src, size_t bytes, StreamHandle s) {
  {
    State& st = state();
    std::lock_guard lock(st.m);
    check_stream(st, s, "rt::memcpy_d2h");
  }
  check_device_range(src, bytes, "source of rt::memcpy_d2h");
  TF_CHECK(dst || !bytes, "rt::memcpy_d2h: the host destination is a null pointer");
  if (bytes) std::memcpy(dst, src, bytes);
}

void memcpy_d2d(void* dst, const void* src, size_t bytes, StreamHandle s) {
  {
    State& st = state();
    std::lock_guard lock(st.m);
    check_stream(st, s, "rt::memcpy_d2d");
  }
  check_device_range(src, bytes, "source of rt::memcpy_d2d");
  check_device_range(dst, bytes, "destination of rt::memcpy_d2d");
  if (bytes) std::memmove(dst, src, bytes);
}

void memset_async(void* dst, int value, size_t bytes, StreamHandle s) {
  {
    State& st = state();
    std::lock_guard lock(st.m);
    check_stream(st, s, "rt::memset_async");
  }
  check_device_range(dst, bytes, "destination of rt::memset_async");
  if (bytes) std::memset(dst, value, bytes);
}

StreamHandle stream_create() {
  State& st = state();
  std::lock_guard lock(st.m);
  auto* s = new Stream{st.next_stream++};
  st.streams.insert(s);
  return s;
}

void stream_destroy(StreamHandle s) {
  if (!s) return;
  State& st = state();
  std::lock_guard lock(st.m);
  check_stream(st, s, "rt::stream_destroy");
  st.streams.erase(static_cast<const Stream*>(s));
  delete static_cast<Stream*>(s);
}

EventHandle event_create() {
  State& st = state();
  std::lock_guard lock(st.m);
  auto* e = new Event;
  st.events.insert(e);
  return e;
}

void event_destroy(EventHandle e) {
  if (!e) return;
  State& st = state();
  std::lock_guard lock(st.m);
  check_event(st, e, "rt::event_destroy");
  st.events.erase(static_cast<const Event*>(e));
  delete static_cast<Event*>(e);
}

void event_record(EventHandle e, StreamHandle s) {
  State& st = state();
  std::lock_guard lock(st.m);
  check_event(st, e, "rt::event_record");
  check_stream(st, s, "rt::event_record");
  static_cast<Event*>(e)->recorded = true;
}

void stream_wait_event(StreamHandle s, EventHandle e) {
  State& st = state();
  std::lock_guard lock(st.m);
  check_stream(st, s, "rt::stream_wait_event");
  check_event(st, e, "rt::stream_wait_event");
}

void stream_synchronize(StreamHandle s) {
  State& st = state();
  std::lock_guard lock(st.m);
  check_stream(st, s, "rt::stream_synchronize");
}

void device_synchronize() {}

StreamHandle current_stream() {
  State& st = state();
  std::lock_guard lock(st.m);
  return st.current;
}

void set_current_stream(StreamHandle s) {
  State& st = state();
  std::lock_guard lock(st.m);
  check_stream(st, s, "rt::set_current_stream");
  st.current = s;
}

void set_sync_after_launch(bool on) {
  State& st = state();
  std::lock_guard lock(st.m);
  st.sync_after_launch = on;
}

bool sync_after_launch() {
  State& st = state();
  std::lock_guard lock(st.m);
  return st.sync_after_launch;
}

void* scratch(int slot, size_t bytes) {
  TF_CHECK(slot >= 0 && slot < kScratchSlots, "rt::scratch: slot ", slot, " is not in 0..",
           kScratchSlots - 1);
  std::lock_guard lock(state().scratch_m);
  Scratch& sc = state().scratch[size_t(slot)];
  if (sc.bytes < bytes || !sc.p) {
    device_free(sc.p);
    sc = Scratch{};
    sc.p = device_alloc(bytes, ("rt::scratch slot " + std::to_string(slot)).c_str());
    sc.bytes = bytes;
  }
  return sc.p;
}

void release_scratch() {
  std::lock_guard lock(state().scratch_m);
  for (Scratch& sc : state().scratch) {
    device_free(sc.p);
    sc = Scratch{};
  }
}

}  // namespace tf::simt::rt
