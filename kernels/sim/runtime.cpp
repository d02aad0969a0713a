// defines: tf::simt::rt, the device runtime of the simulated GPU (device memory the simulator checks
// for bounds and use after free, copies, memset, streams, events, scratch slots), and the ordering
// checks of kernels/sim/runtime.h. Work runs at once, in call order; what streams and events would
// leave unordered on a GPU is found by the clocks below and reported, not left to luck.
#include "kernels/sim/runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/pinned_ledger.h"
#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace tf::sim {

// An operation's place: its stream id in the top bits, its count on that stream's clock below.
// 0 is "none" (counts start at 1).
using OpId = uint64_t;
constexpr int kCountBits = 40;
constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;

struct StreamShadow {
  struct Entry {
    OpId write = 0;
    // The latest reads of up to two streams: a read ordered before a later one is implied by it;
    // a third stream's unordered read replaces the first (a race with that one may go unseen).
    OpId read[2] = {0, 0};
  };
  Entry* entries = nullptr;
  size_t count = 0;
  size_t mapped = 0;
};

namespace {

size_t page_size() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

// One rt::device_alloc: page-aligned anonymous memory. Freeing returns its pages to the system but
// keeps the address range reserved and the region registered, so no later allocation reuses the
// addresses and a stale pointer still names what it pointed to.
struct Allocation {
  Region region;
  StreamShadow shadow;
  size_t mapped = 0;
  bool counted = true;  // in State::in_use (not a view of memory counted already)
};

// A vector clock: clock[s] is the count of the last operation of stream s ordered before now.
using Clock = std::vector<uint64_t>;
void join(Clock& into, const Clock& from) {
  if (into.size() < from.size()) into.resize(from.size(), 0);
  for (size_t i = 0; i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}

struct StreamState {
  int id = 0;
  bool live = true;
  Clock clock;
  // Names of the stream's latest operations, for messages about an earlier access.
  static constexpr size_t kLogSize = 4096;
  std::deque<std::string> log;
  uint64_t log_first = 1;
};
struct Event {
  Clock clock;
};

constexpr int kScratchSlots = 64;
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
};

struct State {
  std::mutex m;
  std::map<uintptr_t, std::unique_ptr<Allocation>> allocs;  // by base address, freed ones included
  std::vector<std::unique_ptr<StreamState>> streams;        // by id; 0 is the default stream
  std::set<const Event*> events;
  Clock host;            // what the host has waited for
  size_t in_use = 0;     // mapped bytes of the live counted allocations
  size_t peak = 0;       // the most in_use since the last reset_memory_peak
  std::mutex scratch_m;  // taken before m, never while holding it
  std::array<Scratch, kScratchSlots> scratch{};
  void* current = nullptr;
  bool sync_after_launch = [] {
    const char* env = std::getenv("TF_CUDA_SYNC");
    return env && std::strcmp(env, "1") == 0;
  }();
  State() {
    streams.push_back(std::make_unique<StreamState>());
    streams[0]->clock.assign(1, 0);
  }
};

State& state() {
  static State s;
  return s;
}

// The operation running on this host thread.
struct CurrentOp {
  bool active = false;
  OpId op = 0;
  const StreamState* stream = nullptr;
  std::string what;
};
thread_local CurrentOp g_op;

StreamState& stream_of(State& st, void* s, const char* call) {
  if (!s) return *st.streams[0];
  for (auto& p : st.streams) {
    if (p.get() == s && p->live) return *p;
  }
  TF_FAIL(call, ": stream ", s, " was not made by rt::stream_create or has been destroyed");
}

Event& event_of(State& st, void* e, const char* call) {
  TF_CHECK(e && st.events.count(static_cast<const Event*>(e)), call, ": event ", e,
           " was not made by rt::event_create or has been destroyed");
  return *static_cast<Event*>(e);
}

std::string stream_name(int id) {
  return id == 0 ? std::string("the default stream") : detail::concat("stream ", id);
}

// "kernel 'gemm' on stream 2" for an earlier operation.
std::string describe(const State& st, OpId op) {
  const auto id = size_t(op >> kCountBits);
  const uint64_t count = op & kCountMask;
  const StreamState& s = *st.streams[id];
  const std::string what = count >= s.log_first && count - s.log_first < s.log.size()
                               ? s.log[size_t(count - s.log_first)]
                               : std::string("an earlier operation");
  return what + " on " + stream_name(s.id);
}

// Whether `earlier` happened before the running operation.
bool ordered(OpId earlier) {
  const auto id = size_t(earlier >> kCountBits);
  const Clock& c = g_op.stream->clock;
  return id < c.size() && c[id] >= (earlier & kCountMask);
}

std::string place(const Region& r, uintptr_t addr) {
  return detail::concat("'", r.name, "' (byte offset ", addr - uintptr_t(r.base), " of ", r.bytes, ")");
}

constexpr const char* kHowToOrder =
    " (record an event after the earlier one and make this stream wait for it, or synchronise)";

// Checks that [p, p + bytes) lies in one live device allocation; `role` names the pointer in the
// message ("the destination of rt::memcpy_h2d").
const Region* check_device_range(const void* p, size_t bytes, const std::string& role) {
  TF_CHECK(p, role, " is a null pointer (", bytes, " bytes)");
  const Region* r = global_region(p);
  TF_CHECK(r, role, " ", p, " is not device memory (no rt::device_alloc or sim::DeviceBuffer holds it)");
  const size_t off = size_t(static_cast<const std::byte*>(p) - r->base);
  TF_CHECK(!r->freed, "use after free: ", role, " is in '", r->name, "' (byte offset ", off, " of ", r->bytes,
           "), which rt::device_free has freed");
  TF_CHECK(off + bytes <= r->bytes, role, ": ", bytes, " bytes at byte offset ", off, " of '", r->name, "' (",
           r->bytes, " bytes) run ", off + bytes - r->bytes, " bytes past its end");
  return r;
}

// One operation on a stream for the span of a scope.
struct StreamOp {
  StreamOp(void* stream, std::string what) { begin_stream_op(stream, std::move(what)); }
  ~StreamOp() { end_stream_op(); }
  StreamOp(const StreamOp&) = delete;
  StreamOp& operator=(const StreamOp&) = delete;
};

// A range access by a copy, memset or host stand-in: checked, then recorded on the running operation.
void range_access(const void* p, size_t bytes, AccessKind kind, const std::string& role) {
  if (bytes == 0) return;
  const Region* r = check_device_range(p, bytes, role);
  const std::string race = stream_access(r, uintptr_t(p), bytes, kind);
  if (!race.empty()) TF_FAIL(race);
}

}  // namespace

void begin_stream_op(void* stream, std::string what) {
  State& st = state();
  std::lock_guard lock(st.m);
  StreamState& s = stream_of(st, stream, what.c_str());
  join(s.clock, st.host);
  const uint64_t count = ++s.clock[size_t(s.id)];
  s.log.push_back(what);
  if (s.log.size() > StreamState::kLogSize) {
    s.log.pop_front();
    ++s.log_first;
  }
  g_op = CurrentOp{true, (uint64_t(s.id) << kCountBits) | count, &s, std::move(what)};
}

void end_stream_op() {
  g_op.active = false;
}

std::string stream_access(const Region* r, uintptr_t addr, size_t bytes, AccessKind kind) {
  StreamShadow* sh = r->streams;
  if (!sh || !g_op.active || bytes == 0) return {};
  const OpId op = g_op.op;
  const size_t off = addr - uintptr_t(r->base);
  const size_t first = off / kStreamGranule, last = (off + bytes - 1) / kStreamGranule;
  for (size_t g = first; g <= last && g < sh->count; ++g) {
    StreamShadow::Entry& e = sh->entries[g];
    if (e.write == op) continue;
    const uintptr_t at = std::max(addr, uintptr_t(r->base) + g * kStreamGranule);
    if (kind == AccessKind::Read) {
      if (e.read[0] == op || e.read[1] == op) continue;
      if (e.write && !ordered(e.write)) {
        return detail::concat("stream race: ", g_op.what, " on ", stream_name(g_op.stream->id), " reads ",
                              place(*r, at), ", last written by ", describe(state(), e.write),
                              ", which is not ordered before it", kHowToOrder);
      }
      // Keep readers that are not ordered before this one; an ordered one is implied by it.
      OpId* slot = nullptr;
      for (OpId& x : e.read) {
        if (!slot && (!x || (x >> kCountBits) == (op >> kCountBits) || ordered(x))) slot = &x;
      }
      *(slot ? slot : &e.read[0]) = op;
      continue;
    }
    const char* verb = kind == AccessKind::Atomic ? " updates " : " writes ";
    if (e.write && !ordered(e.write)) {
      return detail::concat("stream race: ", g_op.what, " on ", stream_name(g_op.stream->id), verb,
                            place(*r, at), ", which ", describe(state(), e.write),
                            " also writes with no ordering between them", kHowToOrder);
    }
    for (OpId x : e.read) {
      if (x && x != op && !ordered(x)) {
        return detail::concat("stream race: ", g_op.what, " on ", stream_name(g_op.stream->id), verb,
                              place(*r, at), ", which ", describe(state(), x),
                              " reads with no ordering between them", kHowToOrder);
      }
    }
    e.write = op;
    e.read[0] = e.read[1] = 0;
  }
  return {};
}

void check_struct_param(const char* kernel, size_t index, const void* p, size_t bytes) {
  auto word = [&](size_t off) {
    uintptr_t w;
    std::memcpy(&w, static_cast<const std::byte*>(p) + off, sizeof(w));
    return w;
  };
  for (size_t off = 0; off + 8 <= bytes; off += 8) {
    const uintptr_t w = word(off);
    const Region* r = w ? global_region(reinterpret_cast<const void*>(w)) : nullptr;
    if (!r) continue;
    // A Ptr is {address, region}: its region half may also be the allocation that ends where the
    // address is, when it points one past that one's end.
    const uintptr_t next = off + 16 <= bytes ? word(off + 8) : 0;
    const Region* before = global_region(reinterpret_cast<const void*>(w - 1));
    if (next && (next == uintptr_t(r) || next == uintptr_t(before))) {
      off += 8;
      continue;
    }
    throw Error(detail::concat("simulator: kernel '", kernel, "': parameter ", index + 1,
                               " (a struct) holds a raw device pointer at byte ", off, " (into '", r->name,
                               "'); make the member a port::gptr<T> so its accesses are checked"));
  }
}

void host_access(const void* p, size_t bytes, AccessKind kind, const char* what) {
  StreamOp op(simt::rt::current_stream(), what);
  range_access(p, bytes, kind, what);
}

}  // namespace tf::sim

namespace tf::simt::rt {

using sim::Allocation;
using sim::state;
using sim::State;
using sim::StreamOp;

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
  return size_t(sysconf(_SC_PHYS_PAGES)) * sim::page_size();
}

namespace {

void* map_allocation(size_t bytes, const char* what, bool counted) {
  const size_t page = sim::page_size();
  const size_t mapped = allocation_bytes(bytes);
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
  a->counted = counted;
  // The ordering record: zero pages until a granule is first touched.
  sim::StreamShadow& sh = a->shadow;
  sh.count = (bytes + sim::kStreamGranule - 1) / sim::kStreamGranule;
  sh.mapped = std::max<size_t>((sh.count * sizeof(sim::StreamShadow::Entry) + page - 1) / page, 1) * page;
  void* q =
      mmap(nullptr, sh.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (q == MAP_FAILED) {
    munmap(p, mapped);
    TF_FAIL("cannot map the ordering record of '", a->region.name, "' (", bytes,
            " bytes): ", std::strerror(errno));
  }
  sh.entries = static_cast<sim::StreamShadow::Entry*>(q);
  a->region.streams = &sh;
  sim::register_global(&a->region);
  State& st = state();
  std::lock_guard lock(st.m);
  st.allocs[uintptr_t(p)] = std::move(a);
  if (counted) {
    st.in_use += mapped;
    st.peak = std::max(st.peak, st.in_use);
  }
  return p;
}

}  // namespace

size_t allocation_bytes(size_t bytes) {
  const size_t page = sim::page_size();
  return std::max<size_t>((bytes + page - 1) / page, 1) * page;
}

void* device_alloc(size_t bytes, const char* what) {
  return map_allocation(bytes, what, true);
}

size_t memory_in_use() {
  State& st = state();
  std::lock_guard lock(st.m);
  return st.in_use;
}

size_t memory_peak() {
  State& st = state();
  std::lock_guard lock(st.m);
  return st.peak;
}

void reset_memory_peak() {
  State& st = state();
  std::lock_guard lock(st.m);
  st.peak = st.in_use;
}

void device_free(void* p) {
  if (!p) return;
  State& st = state();
  std::lock_guard lock(st.m);
  auto it = st.allocs.find(uintptr_t(p));
  if (it == st.allocs.end()) {
    const sim::Region* r = sim::global_region(p);
    TF_CHECK(!r || r->base != p, "rt::device_free(", p, "): '", r->name,
             "' is a sim::DeviceBuffer, which frees itself, not an rt::device_alloc allocation");
    TF_CHECK(!r, "rt::device_free(", p, "): the pointer is byte offset ",
             static_cast<std::byte*>(p) - r->base, " of '", r->name,
             "', not the start of an rt::device_alloc allocation");
    TF_FAIL("rt::device_free(", p, "): the pointer is not device memory from rt::device_alloc");
  }
  Allocation& a = *it->second;
  TF_CHECK(!a.region.freed, "rt::device_free: '", a.region.name, "' (", a.region.bytes, " bytes at ", p,
           ") was already freed (double free)");
  // cudaFree waits for the device, so no stream's work on the memory is left to order.
  a.region.freed = true;
  a.region.streams = nullptr;
  if (a.counted) st.in_use -= a.mapped;
  munmap(a.shadow.entries, a.shadow.mapped);
  a.shadow = sim::StreamShadow{};
  void* q = mmap(p, a.mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  TF_CHECK(q == p, "rt::device_free: cannot release the pages of '", a.region.name,
           "': ", std::strerror(errno));
}

namespace {

// The live host_alloc_pinned allocations.
PinnedLedger& pinned() {
  static PinnedLedger ledger;
  return ledger;
}

}  // namespace

void* host_alloc_pinned(size_t bytes, const char* what) {
  const size_t page = sim::page_size();
  void* p = std::aligned_alloc(page, std::max<size_t>((bytes + page - 1) / page, 1) * page);
  TF_CHECK(p, "cannot allocate ", bytes, " bytes of page-locked host memory for ", what);
  pinned().add(p, bytes);
  return p;
}

void host_free_pinned(void* p) {
  if (!p) return;
  pinned().remove(p);
  std::free(p);
}

size_t pinned_in_use() {
  return pinned().in_use();
}

// The simulated copy engine reads any host memory; there is nothing to lock.
bool host_register(const void* p, size_t bytes, std::string* why) {
  (void)p;
  (void)bytes;
  (void)why;
  return true;
}

void host_unregister(const void* p) {
  (void)p;
}

void memcpy_h2d(void* dst, const void* src, size_t bytes, StreamHandle s) {
  StreamOp op(s, "rt::memcpy_h2d");
  sim::range_access(dst, bytes, sim::AccessKind::Write, "the destination of rt::memcpy_h2d");
  TF_CHECK(src || !bytes, "rt::memcpy_h2d: the host source is a null pointer");
  if (bytes) std::memcpy(dst, src, bytes);
}

void memcpy_d2h(void* dst, const void* src, size_t bytes, StreamHandle s) {
  StreamOp op(s, "rt::memcpy_d2h");
  sim::range_access(src, bytes, sim::AccessKind::Read, "the source of rt::memcpy_d2h");
  TF_CHECK(dst || !bytes, "rt::memcpy_d2h: the host destination is a null pointer");
  if (bytes) std::memcpy(dst, src, bytes);
}

void memcpy_d2d(void* dst, const void* src, size_t bytes, StreamHandle s) {
  StreamOp op(s, "rt::memcpy_d2d");
  sim::range_access(src, bytes, sim::AccessKind::Read, "the source of rt::memcpy_d2d");
  sim::range_access(dst, bytes, sim::AccessKind::Write, "the destination of rt::memcpy_d2d");
  if (bytes) std::memmove(dst, src, bytes);
}

void memset_async(void* dst, int value, size_t bytes, StreamHandle s) {
  StreamOp op(s, "rt::memset_async");
  sim::range_access(dst, bytes, sim::AccessKind::Write, "the destination of rt::memset_async");
  if (bytes) std::memset(dst, value, bytes);
}

StreamHandle stream_create() {
  State& st = state();
  std::lock_guard lock(st.m);
  auto s = std::make_unique<sim::StreamState>();
  s->id = int(st.streams.size());
  TF_CHECK(uint64_t(s->id) < (uint64_t(1) << (64 - sim::kCountBits)), "rt::stream_create: too many streams");
  s->clock.assign(st.streams.size() + 1, 0);
  st.streams.push_back(std::move(s));
  return st.streams.back().get();
}

void stream_destroy(StreamHandle s) {
  if (!s) return;
  State& st = state();
  std::lock_guard lock(st.m);
  // Kept (not live) so that accesses it made can still be named and device_synchronize covers them.
  sim::stream_of(st, s, "rt::stream_destroy").live = false;
}

EventHandle event_create() {
  State& st = state();
  std::lock_guard lock(st.m);
  auto* e = new sim::Event;
  st.events.insert(e);
  return e;
}

void event_destroy(EventHandle e) {
  if (!e) return;
  State& st = state();
  std::lock_guard lock(st.m);
  sim::event_of(st, e, "rt::event_destroy");
  st.events.erase(static_cast<const sim::Event*>(e));
  delete static_cast<sim::Event*>(e);
}

void event_record(EventHandle e, StreamHandle s) {
  State& st = state();
  std::lock_guard lock(st.m);
  sim::Event& ev = sim::event_of(st, e, "rt::event_record");
  sim::StreamState& ss = sim::stream_of(st, s, "rt::event_record");
  sim::join(ss.clock, st.host);
  ev.clock = ss.clock;
}

void stream_wait_event(StreamHandle s, EventHandle e) {
  State& st = state();
  std::lock_guard lock(st.m);
  sim::StreamState& ss = sim::stream_of(st, s, "rt::stream_wait_event");
  const sim::Event& ev = sim::event_of(st, e, "rt::stream_wait_event");
  sim::join(ss.clock, st.host);
  sim::join(ss.clock, ev.clock);
}

void stream_synchronize(StreamHandle s) {
  State& st = state();
  std::lock_guard lock(st.m);
  sim::join(st.host, sim::stream_of(st, s, "rt::stream_synchronize").clock);
}

void device_synchronize() {
  State& st = state();
  std::lock_guard lock(st.m);
  for (const auto& s : st.streams) sim::join(st.host, s->clock);
}

StreamHandle current_stream() {
  State& st = state();
  std::lock_guard lock(st.m);
  return st.current;
}

void set_current_stream(StreamHandle s) {
  State& st = state();
  std::lock_guard lock(st.m);
  sim::stream_of(st, s, "rt::set_current_stream");
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
  TF_CHECK(slot >= 0 && slot < sim::kScratchSlots, "rt::scratch: slot ", slot, " is not in 0..",
           sim::kScratchSlots - 1);
  State& st = state();
  std::lock_guard lock(st.scratch_m);
  sim::Scratch& sc = st.scratch[size_t(slot)];
  if (sc.bytes < bytes || !sc.p) {
    device_free(sc.p);
    sc = sim::Scratch{};
    sc.p = device_alloc(bytes, ("rt::scratch slot " + std::to_string(slot)).c_str());
    sc.bytes = bytes;
  }
  return sc.p;
}

void release_scratch() {
  State& st = state();
  std::lock_guard lock(st.scratch_m);
  for (sim::Scratch& sc : st.scratch) {
    device_free(sc.p);
    sc = sim::Scratch{};
  }
}

}  // namespace tf::simt::rt

namespace tf::sim {

void* device_alloc_view(size_t bytes, const char* what) {
  return simt::rt::map_allocation(bytes, what, false);
}

}  // namespace tf::sim
