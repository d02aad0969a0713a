// defines: the SIMT simulator's runtime: allocation registry, fibers and scheduler, barriers, warp
// collectives, mma / ldmatrix / cp.async, and the checker (bounds, races, initialisation, limits)
#include "kernels/sim/sim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>

#include "kernels/sim/fiber.h"
#include "kernels/sim/fragments.h"
#include "kernels/sim/mma.h"
#include "kernels/sim/runtime.h"
#include "src/core/error.h"

namespace tf::sim {
namespace {

// ---- allocation registry --------------------------------------------------------------------------

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<uintptr_t, const Region*>& registry() {
  static std::map<uintptr_t, const Region*> r;
  return r;
}

// ---- launch state -------------------------------------------------------------------------------

// Thrown inside a fiber once its launch has failed, to unwind the fiber back to its entry.
struct AbortFiber {};

enum class State : uint8_t { Ready, Barrier, Warp, Done };
enum class WarpOp : uint8_t { Shfl, Vote, SyncWarp, Mma, LdMatrix, Reduce };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Shfl: return "__shfl*_sync";
    case WarpOp::Vote: return "a vote (__ballot/__any/__all_sync)";
    case WarpOp::SyncWarp: return "__syncwarp";
    case WarpOp::Mma: return "mma.sync";
    case WarpOp::LdMatrix: return "ldmatrix";
    case WarpOp::Reduce: return "__reduce_*_sync";
  }
  return "?";
}

// Per byte of shared memory: whether it was ever written in this block, and the last write and
// read with the barrier epochs they happened in. Two accesses race when at least one writes, they
// come from different threads, and no barrier separates them: the block epoch counts
// __syncthreads, the warp epoch counts barriers that order the lanes of one warp.
struct Shadow {
  uint32_t w_epoch = 0, w_wepoch = 0, r_epoch = 0, r_wepoch = 0;
  uint16_t w_tid = 0, r_tid = 0;
  bool init = false, w_atomic = false;
  bool r_multi = false;  // a thread other than r_tid also read, unordered with r_tid's read
};

struct CpCopy {
  uintptr_t dst;
  const Region* region;
  int bytes;
  std::array<std::byte, 16> data;
};

struct Thread {
  Fiber fiber;
  unsigned tid = 0;
  Dim3 idx;
  State state = State::Ready;
  std::source_location loc;  // where it waits (barrier or collective)
  WarpOp op = WarpOp::Shfl;
  unsigned op_mask = 0;
  void* op_data = nullptr;
  std::vector<CpCopy> uncommitted;
  std::deque<std::vector<CpCopy>> groups;
};

// A fiber stack with an inaccessible lowest page, so an overflow faults instead of corrupting.
class Stack {
 public:
  static constexpr size_t kBytes = 256 * 1024;
  Stack() {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    mem_ = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TF_CHECK(mem_ != MAP_FAILED, "simulator: cannot map a ", kBytes, "-byte fiber stack");
    mprotect(mem_, page_, PROT_NONE);
  }
  ~Stack() { munmap(mem_, kBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* base() const { return static_cast<char*>(mem_) + page_; }
  size_t size() const { return kBytes - page_; }

 private:
  void* mem_ = nullptr;
  size_t page_ = 0;
};

struct Launch {
  LaunchSpec spec;
  const std::function<void()>* body = nullptr;
  unsigned nthreads = 0;
  std::vector<Thread> threads;
  std::vector<uint32_t> warp_epoch;
  uint32_t epoch = 1;
  Dim3 block_idx;
  Thread* cur = nullptr;
  std::vector<Thread*> ready;
  unsigned at_barrier = 0, done = 0;
  unsigned barrier_true = 0, barrier_count = 0;  // __syncthreads_count: so far, and of the last barrier
  const Thread* first_exited = nullptr;
  std::mt19937_64 rng;
  std::string error;
  // Shared memory: dynamic at offset 0, static arrays after it, a shadow byte per arena byte.
  Buffer arena{kMaxSmemPerBlock, MemTag::Workspace, false};
  std::vector<Shadow> shadow = std::vector<Shadow>(kMaxSmemPerBlock);
  size_t used = 0;  // arena bytes handed out in the current block
  size_t static_bytes = 0;
  Region dynamic;
  std::deque<std::pair<const SharedDecl*, Region>> statics;
  // With blocks interleaved (set_block_interleave) each resident block is a Launch of its own that
  // runs as a fiber, `slot`: its threads' stacks start at stack_base in the pool, and after every
  // thread switch it yields to the launch's scheduler.
  size_t stack_base = 0;
  bool interleaved = false;
  Fiber slot;
};

thread_local Launch* g_launch = nullptr;
thread_local uint64_t g_seed = 0;
thread_local bool g_seed_set = false;
thread_local unsigned g_interleave = 0;  // 0: not read from TF_SIM_INTERLEAVE yet

std::vector<std::unique_ptr<Stack>>& stack_pool() {
  thread_local std::vector<std::unique_ptr<Stack>> pool;
  return pool;
}

Launch& current() {
  TF_CHECK(g_launch && g_launch->cur, "simulator: a device function was called outside a kernel launch");
  return *g_launch;
}

std::string fmt_dim(const Dim3& d) {
  return detail::concat("(", d.x, ",", d.y, ",", d.z, ")");
}
std::string fmt_loc(const std::source_location& l) {
  std::string f = l.file_name();
  const size_t slash = f.find_last_of('/');
  return detail::concat(slash == std::string::npos ? f : f.substr(slash + 1), ":", l.line());
}
std::string fmt_mask(unsigned m) {
  std::ostringstream os;
  os << "0x" << std::hex << m;
  return os.str();
}
std::string fmt_thread(const Thread& t) {
  return detail::concat("thread ", fmt_dim(t.idx), " [warp ", t.tid / kWarpSize, " lane ", t.tid % kWarpSize,
                        "]");
}
std::string fmt_block(const Launch& L) {
  return detail::concat("kernel '", L.spec.kernel, "', block ", fmt_dim(L.block_idx));
}
// "'tile'[12] (byte 48 of 1024)" for the element of region r at addr.
std::string fmt_place(const Region& r, uintptr_t addr) {
  const auto off = std::ptrdiff_t(addr - uintptr_t(r.base));
  std::string s = detail::concat(r.space == Space::Shared     ? "shared array '"
                                 : r.space == Space::Constant ? "__constant__ table '"
                                                              : "global buffer '",
                                 r.name, "'");
  if (r.elem_size && off >= 0 && off % std::ptrdiff_t(r.elem_size) == 0)
    s += detail::concat("[", off / std::ptrdiff_t(r.elem_size), "]");
  return s + detail::concat(" (byte offset ", off, " of ", r.bytes, ")");
}

// Ends the launch: inside a fiber the message is kept and the fiber unwinds; outside one (argument
// conversion, configuration checks) it is thrown at once.
[[noreturn]] void fail(const std::string& msg) {
  Launch* L = g_launch;
  if (L && L->cur) {
    if (L->error.empty()) L->error = msg;
    throw AbortFiber{};
  }
  throw Error("simulator: " + msg);
}

void suspend(Launch& L, Thread& t) {
  t.fiber.yield();
  if (!L.error.empty()) throw AbortFiber{};
}

// ---- memory checks ------------------------------------------------------------------------------

void check_shared(Launch& L, const Thread& t, const Region& r, uintptr_t addr, size_t bytes,
                  AccessKind kind) {
  const size_t off = addr - uintptr_t(L.arena.data());
  const uint32_t e = L.epoch, we = L.warp_epoch[t.tid / kWarpSize];
  const auto tid = uint16_t(t.tid);
  // True when a barrier separates the earlier access by `other` from the current one.
  auto ordered = [&](uint16_t other, uint32_t other_epoch, uint32_t other_wepoch) {
    return other_epoch != e || (other / kWarpSize == t.tid / kWarpSize && other_wepoch != we);
  };
  auto race = [&](const char* what, uint16_t other, const char* other_did) {
    fail(detail::concat("shared-memory race (", what, ") in ", fmt_block(L), ": ", fmt_thread(t),
                        kind == AccessKind::Read ? " reads " : " writes ", fmt_place(r, addr), ", which ",
                        other == tid ? std::string("another thread") : fmt_thread(L.threads[other]), " ",
                        other_did, " with no barrier between (missing __syncthreads?)"));
  };
  for (size_t i = 0; i < bytes; ++i) {
    Shadow& s = L.shadow[off + i];
    if ((kind == AccessKind::Read || kind == AccessKind::Atomic) && !s.init) {
      fail(detail::concat("read of uninitialised shared memory in ", fmt_block(L), ": ", fmt_thread(t),
                          " reads ", fmt_place(r, addr), ", which no thread of this block has written"));
    }
    const bool other_writer = s.w_epoch && s.w_tid != tid && !ordered(s.w_tid, s.w_epoch, s.w_wepoch);
    if (kind == AccessKind::Read) {
      if (other_writer) race("read after write", s.w_tid, "wrote");
      const bool prev_other =
          s.r_epoch && !ordered(s.r_tid, s.r_epoch, s.r_wepoch) && (s.r_tid != tid || s.r_multi);
      s.r_multi = prev_other;
      s.r_tid = tid;
      s.r_epoch = e;
      s.r_wepoch = we;
      continue;
    }
    if (other_writer && !(kind == AccessKind::Atomic && s.w_atomic))
      race("write after write", s.w_tid, "wrote");
    if (s.r_epoch && !ordered(s.r_tid, s.r_epoch, s.r_wepoch) && (s.r_tid != tid || s.r_multi)) {
      race("write after read", s.r_tid, "read");
    }
    s.w_tid = tid;
    s.w_epoch = e;
    s.w_wepoch = we;
    s.w_atomic = kind == AccessKind::Atomic;
    s.init = s.init || kind != AccessKind::AsyncCopy;
  }
}

// Per byte of global memory a launch touches: its last write and read in this launch, as for shared
// memory plus the block, since no barrier orders threads of different blocks. Kept in pages found
// by address and dropped when the next launch starts. Each access is one word: block (1 + its
// linear index, modulo 2^20 - 1; 0 for none) in bits 44-63, thread in 34-43, a flag in 32 (the
// write was atomic; other unordered threads read too), barrier epoch in 16-31, warp epoch in 0-15.
struct GlobalShadow {
  uint64_t w = 0, r = 0;
  bool operator==(const GlobalShadow&) const = default;
};
constexpr int kWhoShift = 34, kBlockShift = 44;
constexpr uint64_t kFlag = uint64_t(1) << 32;

class GlobalShadowPages {
 public:
  static constexpr size_t kPage = 4096;
  // Pages kept for the next launch; a launch that touched more gives the rest back.
  static constexpr size_t kKeep = 256;
  void reset() {
    pages_.clear();
    used_ = 0;
    cache_.fill(Cached{});
    if (pool_.size() > kKeep) pool_.resize(kKeep);
  }
  GlobalShadow& at(uintptr_t addr) {
    const uintptr_t page = addr / kPage;
    Cached& c = cache_[page % kCache];
    if (c.page != page) {
      auto [it, fresh] = pages_.try_emplace(page, used_);
      if (fresh) {
        if (used_ == pool_.size()) {
          pool_.push_back(std::make_unique<GlobalShadow[]>(kPage));
        } else {
          std::fill_n(pool_[used_].get(), kPage, GlobalShadow{});
        }
        ++used_;
      }
      c = Cached{page, pool_[it->second].get()};
    }
    return c.shadow[addr % kPage];
  }

 private:
  struct Cached {
    uintptr_t page = ~uintptr_t(0);
    GlobalShadow* shadow = nullptr;
  };
  static constexpr size_t kCache = 64;
  std::array<Cached, kCache> cache_{};
  std::unordered_map<uintptr_t, size_t> pages_;
  std::vector<std::unique_ptr<GlobalShadow[]>> pool_;
  size_t used_ = 0;
};
thread_local GlobalShadowPages g_global;

uint64_t block_number(const Launch& L) {
  const Dim3 &b = L.block_idx, &g = L.spec.grid;
  return 1 + (b.x + uint64_t(g.x) * (b.y + uint64_t(g.y) * b.z)) % 0xfffff;
}
// "thread (3,0,0) of block (1,0,0)" for the access word x (its block modulo 2^20 - 1).
std::string fmt_other(const Launch& L, uint64_t x) {
  const Dim3 &g = L.spec.grid, &d = L.spec.block;
  const auto n = uint32_t((x >> kBlockShift) - 1), tid = uint32_t(x >> kWhoShift) & 0x3ff;
  return detail::concat("thread ", fmt_dim(Dim3(tid % d.x, tid / d.x % d.y, tid / (d.x * d.y))), " of block ",
                        fmt_dim(Dim3(n % g.x, n / g.x % g.y, n / (g.x * g.y))));
}

// Two accesses to a global byte in one launch race when they come from different threads, at least
// one writes, they are not both atomics, and they are in different blocks or, in one block, no
// barrier separates them.
void check_global(Launch& L, const Thread& t, const Region& r, uintptr_t addr, size_t bytes,
                  AccessKind kind) {
  const uint64_t e = L.epoch & 0xffff, we = L.warp_epoch[t.tid / kWarpSize] & 0xffff;
  const uint64_t me = block_number(L) << kBlockShift | uint64_t(t.tid) << kWhoShift | e << 16 | we;
  const uint64_t me_who = me >> kWhoShift;
  // Whether the earlier access x is ordered before this one by a barrier of this block.
  auto ordered = [&](uint64_t x) {
    return x >> kBlockShift == me >> kBlockShift &&
           ((x >> 16 & 0xffff) != e ||
            ((x >> kWhoShift & 0x3ff) / kWarpSize == t.tid / kWarpSize && (x & 0xffff) != we));
  };
  auto race = [&](const char* what, uint64_t other, const char* other_did) {
    const bool same_block = other >> kBlockShift == me >> kBlockShift;
    fail(detail::concat("global-memory race (", what, ") in kernel '", L.spec.kernel, "': ", fmt_other(L, me),
                        kind == AccessKind::Read ? " reads " : " writes ", fmt_place(r, addr), ", which ",
                        other >> kWhoShift == me_who ? std::string("another thread") : fmt_other(L, other),
                        " ", other_did,
                        same_block ? " with no barrier between (missing __syncthreads?)"
                                   : "; threads of different blocks are not ordered within a launch"));
  };
  GlobalShadowPages& pages = g_global;
  GlobalShadow* run = &pages.at(addr);  // the bytes up to the end of addr's page
  size_t run_left = GlobalShadowPages::kPage - addr % GlobalShadowPages::kPage;
  GlobalShadow before, after;
  for (size_t i = 0; i < bytes; ++i, --run_left) {
    if (run_left == 0) {
      run = &pages.at(addr + i);
      run_left = GlobalShadowPages::kPage;
    }
    GlobalShadow& s = *run++;
    // The bytes of one access mostly share their history: one byte's outcome holds for the rest.
    if (i > 0 && s == before) {
      s = after;
      continue;
    }
    before = s;
    const bool other_writer = s.w && s.w >> kWhoShift != me_who && !ordered(s.w);
    const bool other_reader = s.r && !ordered(s.r) && (s.r >> kWhoShift != me_who || (s.r & kFlag));
    if (kind == AccessKind::Read) {
      if (other_writer) [[unlikely]]
        race("read after write", s.w, "wrote");
      s.r = me | (other_reader ? kFlag : 0);
    } else {
      if (other_writer && !(kind == AccessKind::Atomic && (s.w & kFlag))) [[unlikely]]
        race("write after write", s.w, "wrote");
      if (other_reader) [[unlikely]]
        race("write after read", s.r, "read");
      s.w = me | (kind == AccessKind::Atomic ? kFlag : 0);
    }
    after = s;
  }
}

void check_access_by(Launch* L, const Thread* t, const Region* r, uintptr_t addr, size_t bytes,
                     AccessKind kind) {
  const char* verb = kind == AccessKind::Read        ? "read"
                     : kind == AccessKind::Write     ? "write"
                     : kind == AccessKind::AsyncCopy ? "cp.async write"
                                                     : "atomic";
  auto who = [&] {
    return L && t ? detail::concat(" in ", fmt_block(*L), ", ", fmt_thread(*t)) : std::string();
  };
  if (!r) {
    fail(detail::concat(verb, " of ", bytes, " bytes through a null pointer (address ",
                        reinterpret_cast<const void*>(addr), ")", who()));
  }
  if (r->freed) {
    fail(detail::concat("use after free: ", verb, " of ", bytes, " bytes", who(), ": ", fmt_place(*r, addr),
                        ", which rt::device_free has freed"));
  }
  const uintptr_t base = uintptr_t(r->base), end = base + r->bytes;
  if (addr < base || addr + bytes > end) {
    const std::string side = addr < base ? detail::concat(base - addr, " bytes before its start")
                                         : detail::concat(addr + bytes - end, " bytes past its end");
    fail(detail::concat("out-of-bounds ", verb, " of ", bytes, " bytes", who(), ": ", fmt_place(*r, addr),
                        ", ", side));
  }
  if ((bytes & (bytes - 1)) == 0 && addr % bytes != 0) {
    fail(detail::concat("misaligned ", verb, " of ", bytes, " bytes", who(), ": ", fmt_place(*r, addr)));
  }
  if (r->space == Space::Constant && kind != AccessKind::Read)
    fail(detail::concat(verb, " of ", bytes, " bytes", who(), " into read-only ", fmt_place(*r, addr)));
  if (r->space == Space::Constant && !r->initialised) {
    fail(detail::concat("read", who(), " of ", fmt_place(*r, addr),
                        ", which the host never filled (port::upload_constant)"));
  }
  if (r->space == Space::Shared && L && t) check_shared(*L, *t, *r, addr, bytes, kind);
  if (r->space == Space::Global && L && t) check_global(*L, *t, *r, addr, bytes, kind);
  if (r->streams) {
    const std::string race = stream_access(r, addr, bytes, kind);
    if (!race.empty()) fail(race + who());
  }
}

// ---- warp collectives ---------------------------------------------------------------------------

struct ShflData {
  ShflKind kind;
  uint64_t value;
  int arg;
  int width;
  uint64_t result;
};
struct VoteData {
  VoteKind kind;
  bool pred;
  unsigned result;
};
struct ReduceData {
  ReduceKind kind;
  bool is_signed;
  uint32_t value;
  uint32_t result;
};
struct LdMatrixData {
  int num;
  bool trans;
  const Region* region;
  uintptr_t addr;
  uint32_t* regs;
};

unsigned existing_lanes(const Launch& L, unsigned warp) {
  const unsigned n = std::min<unsigned>(kWarpSize, L.nthreads - warp * kWarpSize);
  return n == 32 ? ~0u : (1u << n) - 1;
}

// Fails when a lane of t's warp waits in a collective whose mask names t, which is about to stop
// (exit) or wait at a barrier instead: that collective can never complete.
void check_not_awaited(Launch& L, const Thread& t, const char* doing) {
  const unsigned warp = t.tid / kWarpSize, lane = t.tid % kWarpSize;
  for (unsigned j = 0; j < kWarpSize && warp * kWarpSize + j < L.nthreads; ++j) {
    const Thread& o = L.threads[warp * kWarpSize + j];
    if (o.state == State::Warp && ((o.op_mask >> lane) & 1)) {
      fail(detail::concat("warp collective never completes in ", fmt_block(L), ": lane ", j, " waits in ",
                          op_name(o.op), " (mask ", fmt_mask(o.op_mask), ") at ", fmt_loc(o.loc),
                          ", but lane ", lane, " ", doing));
    }
  }
}

void complete(Launch& L, unsigned warp, unsigned mask, WarpOp op, Thread& last) {
  Thread* lanes = &L.threads[warp * kWarpSize];
  auto data = [&](unsigned j) { return lanes[j].op_data; };
  auto fail_arg = [&](unsigned j, const char* what) {
    fail(detail::concat(op_name(op), " in ", fmt_block(L), ", warp ", warp, ": lane ", j, " at ",
                        fmt_loc(lanes[j].loc), " ", what));
  };
  switch (op) {
    case WarpOp::Shfl:
      for (unsigned j = 0; j < kWarpSize; ++j) {
        if (!((mask >> j) & 1)) continue;
        auto* d = static_cast<ShflData*>(data(j));
        const int w = d->width;
        if (w < 1 || w > kWarpSize || (w & (w - 1)))
          fail_arg(j, "passes a width that is not a power of two <= 32");
        const int seg = int(j) / w * w;
        int src = int(j);
        switch (d->kind) {
          case ShflKind::Idx: src = seg + ((d->arg % w) + w) % w; break;
          case ShflKind::Up: src = int(j) - d->arg >= seg ? int(j) - d->arg : int(j); break;
          case ShflKind::Down: src = int(j) + d->arg < seg + w ? int(j) + d->arg : int(j); break;
          case ShflKind::Xor: src = (int(j) ^ d->arg) < seg + w ? int(j) ^ d->arg : int(j); break;
        }
        if (src < 0 || src >= kWarpSize || !((mask >> src) & 1)) {
          fail_arg(j, detail::concat("reads lane ", src, ", which is not in the mask ", fmt_mask(mask),
                                     " (its value is undefined)")
                          .c_str());
        }
        d->result = static_cast<ShflData*>(data(unsigned(src)))->value;
      }
      break;
    case WarpOp::Vote: {
      unsigned ballot = 0;
      for (unsigned j = 0; j < kWarpSize; ++j) {
        if ((mask >> j) & 1 && static_cast<VoteData*>(data(j))->pred) ballot |= 1u << j;
      }
      for (unsigned j = 0; j < kWarpSize; ++j) {
        if (!((mask >> j) & 1)) continue;
        auto* d = static_cast<VoteData*>(data(j));
        d->result = d->kind == VoteKind::Ballot ? ballot
                    : d->kind == VoteKind::Any  ? ballot != 0
                                                : ballot == mask;
      }
      break;
    }
    case WarpOp::SyncWarp: ++L.warp_epoch[warp]; break;
    case WarpOp::Mma: {
      if (mask != ~0u)
        fail_arg(last.tid % kWarpSize, "runs with fewer than 32 lanes; mma.sync needs the full warp");
      MmaOperands* ops[kWarpSize];
      for (unsigned j = 0; j < kWarpSize; ++j) {
        ops[j] = static_cast<MmaOperands*>(data(j));
        if (ops[j]->shape != ops[0]->shape || ops[j]->type != ops[0]->type)
          fail_arg(j, "uses a different shape or input type than lane 0");
      }
      mma_execute(ops);
      break;
    }
    case WarpOp::Reduce: {
      const auto* first = static_cast<ReduceData*>(data(unsigned(std::countr_zero(mask))));
      uint32_t acc = first->value;
      for (unsigned j = 0; j < kWarpSize; ++j) {
        if (!((mask >> j) & 1)) continue;
        const auto* d = static_cast<ReduceData*>(data(j));
        if (d->kind != first->kind || d->is_signed != first->is_signed)
          fail_arg(j, "reduces with a different operation or type than the mask's first lane");
        if (d == first) continue;
        const bool less = d->is_signed ? int32_t(d->value) < int32_t(acc) : d->value < acc;
        switch (d->kind) {
          case ReduceKind::Add: acc += d->value; break;
          case ReduceKind::Min: acc = less ? d->value : acc; break;
          case ReduceKind::Max: acc = less ? acc : d->value; break;
        }
      }
      for (unsigned j = 0; j < kWarpSize; ++j) {
        if ((mask >> j) & 1) static_cast<ReduceData*>(data(j))->result = acc;
      }
      break;
    }
    case WarpOp::LdMatrix: {
      if (mask != ~0u)
        fail_arg(last.tid % kWarpSize, "runs with fewer than 32 lanes; ldmatrix needs the full warp");
      const auto* first = static_cast<LdMatrixData*>(data(0));
      uint16_t rows[4][8][8];
      for (unsigned j = 0; j < kWarpSize; ++j) {
        const auto* d = static_cast<LdMatrixData*>(data(j));
        if (d->num != first->num || d->trans != first->trans)
          fail_arg(j, "uses a different .num or .trans than lane 0");
        if (int(j) >= 8 * d->num) continue;  // only lanes 0..8*num-1 supply row addresses
        if (!d->region || d->region->space != Space::Shared)
          fail_arg(j, "passes a row address outside shared memory");
        check_access_by(&L, &lanes[j], d->region, d->addr, 16, AccessKind::Read);
        std::memcpy(rows[j / 8][j % 8], reinterpret_cast<const void*>(d->addr), 16);
      }
      for (unsigned j = 0; j < kWarpSize; ++j) {
        auto* d = static_cast<LdMatrixData*>(data(j));
        for (int m = 0; m < d->num; ++m) {
          const FragCoord lo = ldmatrix_coord(int(j), 0, d->trans), hi = ldmatrix_coord(int(j), 1, d->trans);
          d->regs[m] = uint32_t(rows[m][lo.row][lo.col]) | uint32_t(rows[m][hi.row][hi.col]) << 16;
        }
      }
      break;
    }
  }
}

void warp_collective(WarpOp op, unsigned mask, void* op_data, std::source_location loc) {
  Launch& L = current();
  Thread& t = *L.cur;
  const unsigned warp = t.tid / kWarpSize, lane = t.tid % kWarpSize;
  const unsigned existing = existing_lanes(L, warp);
  t.loc = loc;
  if (!((mask >> lane) & 1)) {
    fail(detail::concat(op_name(op), " in ", fmt_block(L), ": ", fmt_thread(t), " at ", fmt_loc(loc),
                        " passes mask ", fmt_mask(mask), ", which does not include its own lane"));
  }
  if (mask & ~existing) {
    fail(detail::concat(op_name(op), " in ", fmt_block(L), ": ", fmt_thread(t), " at ", fmt_loc(loc),
                        " passes mask ", fmt_mask(mask),
                        ", which names lanes this warp does not have (lanes ", fmt_mask(existing), ")"));
  }
  Thread* lanes = &L.threads[warp * kWarpSize];
  for (unsigned j = 0; j < kWarpSize; ++j) {
    if (j == lane || !((existing >> j) & 1)) continue;
    const Thread& o = lanes[j];
    const bool named = (mask >> j) & 1;
    if (o.state == State::Warp && (named || ((o.op_mask >> lane) & 1)) && (o.op_mask != mask || o.op != op)) {
      fail(detail::concat("warp collective mismatch in ", fmt_block(L), ", warp ", warp, ": lane ", lane,
                          " calls ", op_name(op), " with mask ", fmt_mask(mask), " at ", fmt_loc(loc),
                          ", while lane ", j, " waits in ", op_name(o.op), " with mask ", fmt_mask(o.op_mask),
                          " at ", fmt_loc(o.loc)));
    }
    if (named && o.state == State::Done) {
      fail(detail::concat(op_name(op), " in ", fmt_block(L), ": lane ", lane, " at ", fmt_loc(loc),
                          " passes mask ", fmt_mask(mask), ", but lane ", j, " of that mask has exited"));
    }
    if (named && o.state == State::Barrier) {
      fail(detail::concat(op_name(op), " in ", fmt_block(L), ": lane ", lane, " at ", fmt_loc(loc),
                          " passes mask ", fmt_mask(mask), ", but lane ", j,
                          " of that mask waits at __syncthreads at ", fmt_loc(o.loc)));
    }
  }
  t.op = op;
  t.op_mask = mask;
  t.op_data = op_data;
  t.state = State::Warp;
  bool all = true;
  for (unsigned j = 0; j < kWarpSize; ++j) all = all && (!((mask >> j) & 1) || lanes[j].state == State::Warp);
  if (!all) {
    suspend(L, t);
    return;
  }
  complete(L, warp, mask, op, t);
  for (unsigned j = 0; j < kWarpSize; ++j) {
    if (!((mask >> j) & 1)) continue;
    lanes[j].state = State::Ready;
    if (j != lane) L.ready.push_back(&lanes[j]);
  }
}

// ---- fibers and scheduling ----------------------------------------------------------------------

void thread_exit(Launch& L, Thread& t) {
  if (L.at_barrier > 0) {
    const Thread* waiter = nullptr;
    for (const Thread& o : L.threads) {
      if (o.state == State::Barrier) waiter = &o;
    }
    fail(detail::concat("barrier not reached by every thread in ", fmt_block(L), ": ", fmt_thread(t),
                        " exited while ", L.at_barrier, " of ", L.nthreads,
                        " threads wait at __syncthreads at ", fmt_loc(waiter->loc), " (e.g. ",
                        fmt_thread(*waiter), ")"));
  }
  check_not_awaited(L, t, "exited");
  t.state = State::Done;
  ++L.done;
  if (!L.first_exited) L.first_exited = &t;
}

void fiber_main(void*) {
  Launch& L = *g_launch;
  Thread& t = *L.cur;
  try {
    (*L.body)();
    thread_exit(L, t);
  } catch (const AbortFiber&) {
  } catch (const std::exception& e) {
    if (L.error.empty())
      L.error = detail::concat("exception in ", fmt_block(L), ", ", fmt_thread(t), ": ", e.what());
  } catch (...) {
    rethrow_fiber_unwind();
    if (L.error.empty()) L.error = detail::concat("unknown exception in ", fmt_block(L), ", ", fmt_thread(t));
  }
  t.state = State::Done;
}

// Nothing can run but the block is not finished: threads wait at a barrier and in collectives
// that cannot complete.
void report_stall(Launch& L) {
  std::string msg = detail::concat("deadlock in ", fmt_block(L), ":");
  int shown = 0;
  for (const Thread& t : L.threads) {
    if (t.state == State::Done || shown == 4) continue;
    ++shown;
    msg += t.state == State::Barrier
               ? detail::concat(" ", fmt_thread(t), " waits at __syncthreads at ", fmt_loc(t.loc), ";")
               : detail::concat(" ", fmt_thread(t), " waits in ", op_name(t.op), " (mask ",
                                fmt_mask(t.op_mask), ") at ", fmt_loc(t.loc), ";");
  }
  L.error = msg + " a barrier or collective that not every named thread reaches";
}

void run_block(Launch& L) {
  const size_t dirty = L.used;
  std::fill(L.shadow.begin(), L.shadow.begin() + std::ptrdiff_t(dirty), Shadow{});
  std::memset(L.arena.data(), 0xff, dirty);
  L.statics.clear();
  L.used = (L.spec.dynamic_smem + 15) / 16 * 16;
  L.static_bytes = 0;
  L.epoch = 1;
  std::fill(L.warp_epoch.begin(), L.warp_epoch.end(), 1u);
  L.at_barrier = L.done = 0;
  L.first_exited = nullptr;
  L.ready.clear();
  auto& pool = stack_pool();
  const Dim3 b = L.spec.block;
  for (unsigned i = 0; i < L.nthreads; ++i) {
    Thread& t = L.threads[i];
    t.tid = i;
    t.idx = Dim3(i % b.x, i / b.x % b.y, i / (b.x * b.y));
    t.state = State::Ready;
    t.uncommitted.clear();
    t.groups.clear();
    t.fiber.start(pool[L.stack_base + i]->base(), pool[L.stack_base + i]->size(), fiber_main, nullptr);
    L.ready.push_back(&t);
  }
  while (L.error.empty()) {
    if (L.ready.empty()) {
      if (L.done < L.nthreads) report_stall(L);
      break;
    }
    const size_t pick = L.rng() % L.ready.size();
    Thread* t = L.ready[pick];
    L.ready[pick] = L.ready.back();
    L.ready.pop_back();
    L.cur = t;
    t->fiber.resume();
    L.cur = nullptr;
    if (L.interleaved) L.slot.yield();
  }
}

void check_config(const LaunchSpec& s) {
  const Dim3 b = s.block, g = s.grid;
  auto where = [&] {
    return detail::concat("launch of kernel '", s.kernel, "' with grid ", fmt_dim(g), ", block ", fmt_dim(b));
  };
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0)
    fail(where() + ": a dimension is 0");
  if (b.x > kMaxBlockDim.x || b.y > kMaxBlockDim.y || b.z > kMaxBlockDim.z) {
    fail(detail::concat(where(), ": block dimensions exceed sm_90's ", fmt_dim(kMaxBlockDim)));
  }
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads > kMaxThreadsPerBlock) {
    fail(detail::concat(where(), ": ", threads, " threads per block, above sm_90's limit of ",
                        kMaxThreadsPerBlock));
  }
  if (g.x > kMaxGridX || g.y > kMaxGridYZ || g.z > kMaxGridYZ)
    fail(where() + ": grid dimensions exceed sm_90's limits");
  if (s.dynamic_smem > kMaxSmemPerBlock) {
    fail(detail::concat(where(), ": ", s.dynamic_smem, " bytes of dynamic shared memory, above sm_90's ",
                        kMaxSmemPerBlock, " (227 KB) per block"));
  }
}

}  // namespace

// ---- public entry points ------------------------------------------------------------------------

void set_seed(uint64_t s) {
  g_seed = s;
  g_seed_set = true;
}

void set_block_interleave(unsigned resident) {
  g_interleave = std::max(resident, 1u);
}

unsigned block_interleave() {
  if (g_interleave == 0) {
    const char* env = std::getenv("TF_SIM_INTERLEAVE");
    g_interleave = std::max(env ? unsigned(std::strtoul(env, nullptr, 10)) : 1u, 1u);
  }
  return g_interleave;
}

uint64_t seed() {
  if (!g_seed_set) {
    const char* env = std::getenv("TF_SIM_SEED");
    g_seed = env ? std::strtoull(env, nullptr, 10) : 1;
    g_seed_set = true;
  }
  return g_seed;
}

DeviceBuffer::DeviceBuffer(size_t bytes, std::string name, size_t elem_size)
    : storage_(bytes, MemTag::Workspace, false), region_(std::make_unique<Region>()) {
  if (bytes) std::memset(storage_.data(), 0xff, bytes);
  region_->base = static_cast<std::byte*>(storage_.data());
  region_->bytes = bytes;
  region_->elem_size = elem_size;
  region_->name = std::move(name);
  if (bytes) register_global(region_.get());
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : storage_(std::move(o.storage_)), region_(std::move(o.region_)) {}

DeviceBuffer::~DeviceBuffer() {
  if (!region_ || !region_->bytes) return;
  std::lock_guard lock(registry_mutex());
  registry().erase(uintptr_t(region_->base));
}

const Region* global_region(const void* p) {
  const auto a = uintptr_t(p);
  std::lock_guard lock(registry_mutex());
  auto it = registry().upper_bound(a);
  if (it == registry().begin()) return nullptr;
  --it;
  return a <= it->first + it->second->bytes ? it->second : nullptr;
}

void register_global(const Region* r) {
  std::lock_guard lock(registry_mutex());
  registry()[uintptr_t(r->base)] = r;
}

const Region* find_global(const void* p) {
  if (!p) return nullptr;
  if (const Region* r = global_region(p)) return r;
  fail(detail::concat(
      "pointer ", p,
      " passed to a kernel is not in any sim::DeviceBuffer or rt::device_alloc allocation (host memory?)"));
}

void check_access(const Region* region, uintptr_t addr, size_t bytes, AccessKind kind) {
  Launch* L = g_launch;
  check_access_by(L, L ? L->cur : nullptr, region, addr, bytes, kind);
}

const Region* static_shared(const SharedDecl& decl) {
  Launch& L = current();
  for (auto& [d, r] : L.statics) {
    if (d == &decl) return &r;
  }
  L.static_bytes += (decl.bytes + 15) / 16 * 16;
  if (L.static_bytes > kMaxStaticSmem) {
    fail(detail::concat("kernel '", L.spec.kernel, "' declares ", L.static_bytes,
                        " bytes of static shared memory (", "'", decl.name, "' of ", decl.bytes,
                        " bytes the last), above sm_90's ", kMaxStaticSmem,
                        " (48 KB); use dynamic shared memory"));
  }
  if (L.used + decl.bytes > kMaxSmemPerBlock) {
    fail(detail::concat("kernel '", L.spec.kernel, "' uses ", L.used + decl.bytes,
                        " bytes of shared memory (static + dynamic), above sm_90's ", kMaxSmemPerBlock,
                        " per block"));
  }
  Region r;
  r.base = static_cast<std::byte*>(L.arena.data()) + L.used;
  r.bytes = decl.bytes;
  r.space = Space::Shared;
  r.elem_size = decl.elem_size;
  r.name = decl.name;
  L.used += (decl.bytes + 15) / 16 * 16;
  L.statics.emplace_back(&decl, std::move(r));
  return &L.statics.back().second;
}

const Region* dynamic_shared() {
  return &current().dynamic;
}

const Dim3& thread_index() {
  return current().cur->idx;
}
const Dim3& block_index() {
  return current().block_idx;
}
const Dim3& block_dim() {
  return current().spec.block;
}
const Dim3& grid_dim() {
  return current().spec.grid;
}

void syncthreads(std::source_location loc) {
  syncthreads_count(false, loc);
}

unsigned syncthreads_count(bool pred, std::source_location loc) {
  Launch& L = current();
  Thread& t = *L.cur;
  t.loc = loc;
  if (L.first_exited) {
    fail(detail::concat("barrier not reached by every thread in ", fmt_block(L), ": ", fmt_thread(t),
                        " waits at __syncthreads at ", fmt_loc(loc), ", but ", fmt_thread(*L.first_exited),
                        " has already exited"));
  }
  check_not_awaited(L, t, detail::concat("waits at __syncthreads at ", fmt_loc(loc)).c_str());
  t.state = State::Barrier;
  L.barrier_true += pred ? 1 : 0;
  if (++L.at_barrier == L.nthreads) {
    for (const Thread& o : L.threads) {
      if (o.loc.line() != loc.line() || std::strcmp(o.loc.file_name(), loc.file_name()) != 0) {
        fail(detail::concat("threads of ", fmt_block(L), " meet at different __syncthreads: ", fmt_thread(t),
                            " at ", fmt_loc(loc), ", ", fmt_thread(o), " at ", fmt_loc(o.loc)));
      }
    }
    ++L.epoch;
    for (uint32_t& w : L.warp_epoch) ++w;
    L.at_barrier = 0;
    L.barrier_count = std::exchange(L.barrier_true, 0);
    for (Thread& o : L.threads) {
      o.state = State::Ready;
      L.ready.push_back(&o);
    }
  }
  suspend(L, t);
  // Nothing else runs between the barrier's release and this read, and the next barrier cannot
  // complete before every thread has passed this one.
  return L.barrier_count;
}

void syncwarp(unsigned mask, std::source_location loc) {
  warp_collective(WarpOp::SyncWarp, mask, nullptr, loc);
}

uint64_t shfl_bits(ShflKind kind, unsigned mask, uint64_t value, int arg, int width,
                   std::source_location loc) {
  ShflData d{kind, value, arg, width, 0};
  warp_collective(WarpOp::Shfl, mask, &d, loc);
  return d.result;
}

unsigned vote(VoteKind kind, unsigned mask, bool pred, std::source_location loc) {
  VoteData d{kind, pred, 0};
  warp_collective(WarpOp::Vote, mask, &d, loc);
  return d.result;
}

uint32_t reduce(ReduceKind kind, bool is_signed, unsigned mask, uint32_t value, std::source_location loc) {
  ReduceData d{kind, is_signed, value, 0};
  warp_collective(WarpOp::Reduce, mask, &d, loc);
  return d.result;
}

void mma(const MmaOperands& lane, std::source_location loc) {
  MmaOperands ops = lane;
  warp_collective(WarpOp::Mma, ~0u, &ops, loc);
}

void ldmatrix(int num, bool trans, uint32_t* regs, const Region* region, uintptr_t addr,
              std::source_location loc) {
  LdMatrixData d{num, trans, region, addr, regs};
  warp_collective(WarpOp::LdMatrix, ~0u, &d, loc);
}

void cp_async(const Region* dst_region, uintptr_t dst, const Region* src_region, uintptr_t src, int cp_size,
              int src_size, std::source_location loc) {
  Launch& L = current();
  Thread& t = *L.cur;
  auto bad = [&](const std::string& what) {
    fail(detail::concat("cp.async in ", fmt_block(L), ", ", fmt_thread(t), " at ", fmt_loc(loc), ": ", what));
  };
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    bad(detail::concat("copy size ", cp_size, " is not 4, 8 or 16"));
  if (src_size < 0 || src_size > cp_size)
    bad(detail::concat("source size ", src_size, " is not in 0..", cp_size));
  if (!dst_region || dst_region->space != Space::Shared) bad("the destination is not shared memory");
  if (dst % unsigned(cp_size) != 0) bad(detail::concat("the destination is not ", cp_size, "-byte aligned"));
  // The copy may land at any time until its wait: its destination must be free of other threads'
  // accesses from the issue on, not only at the wait.
  check_access_by(&L, &t, dst_region, dst, size_t(cp_size), AccessKind::AsyncCopy);
  CpCopy c{dst, dst_region, cp_size, {}};
  if (src_size > 0) {
    if (src_region && src_region->space != Space::Global) bad("the source is not global memory");
    if (src % unsigned(cp_size) != 0) bad(detail::concat("the source is not ", cp_size, "-byte aligned"));
    check_access_by(&L, &t, src_region, src, size_t(src_size), AccessKind::Read);
    std::memcpy(c.data.data(), reinterpret_cast<const void*>(src), size_t(src_size));
  }
  t.uncommitted.push_back(c);
}

void cp_async_commit() {
  Thread& t = *current().cur;
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait(int pending_groups) {
  Launch& L = current();
  Thread& t = *L.cur;
  while (t.groups.size() > size_t(std::max(pending_groups, 0))) {
    for (const CpCopy& c : t.groups.front()) {
      check_access_by(&L, &t, c.region, c.dst, size_t(c.bytes), AccessKind::Write);
      std::memcpy(reinterpret_cast<void*>(c.dst), c.data.data(), size_t(c.bytes));
    }
    t.groups.pop_front();
  }
}

void run(const LaunchSpec& spec, const std::function<void()>& body) {
  TF_CHECK(g_launch == nullptr, "simulator: kernel '", spec.kernel, "' launched from inside a kernel");
  check_config(spec);
  // The launch is one operation on its stream: every global access it makes is ordered by it.
  begin_stream_op(spec.stream, detail::concat("kernel '", spec.kernel, "'"));
  struct EndOp {
    ~EndOp() { end_stream_op(); }
  } end_op;
  g_global.reset();
  const unsigned nthreads = spec.block.x * spec.block.y * spec.block.z;
  auto make_launch = [&](uint64_t rng_seed) {
    auto L = std::make_unique<Launch>();
    L->spec = spec;
    L->body = &body;
    L->nthreads = nthreads;
    L->threads = std::vector<Thread>(nthreads);
    L->warp_epoch.assign((nthreads + kWarpSize - 1) / kWarpSize, 1);
    L->rng.seed(rng_seed);
    L->dynamic.base = static_cast<std::byte*>(L->arena.data());
    L->dynamic.bytes = spec.dynamic_smem;
    L->dynamic.space = Space::Shared;
    L->dynamic.name = "dynamic";
    L->used = kMaxSmemPerBlock;  // the first block clears the whole arena
    return L;
  };
  auto L = make_launch(seed());

  // Blocks run in a seeded random order: a kernel must not depend on it.
  const uint64_t nblocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), L->rng);
  auto block_at = [&](uint64_t i) {
    return Dim3(unsigned(i % spec.grid.x), unsigned(i / spec.grid.x % spec.grid.y),
                unsigned(i / (uint64_t(spec.grid.x) * spec.grid.y)));
  };

  const auto resident = unsigned(std::min<uint64_t>(block_interleave(), nblocks));
  auto& pool = stack_pool();
  while (pool.size() < size_t(resident) * nthreads) pool.push_back(std::make_unique<Stack>());
  struct Active {  // clears g_launch however run() leaves
    explicit Active(Launch* l) { g_launch = l; }
    ~Active() { g_launch = nullptr; }
  } active(L.get());
  if (resident <= 1) {
    for (uint64_t i : order) {
      L->block_idx = block_at(i);
      run_block(*L);
      if (!L->error.empty()) break;
    }
    if (!L->error.empty()) throw Error("simulator: " + L->error);
    return;
  }

  // Interleaved: `resident` blocks at a time, each a fiber taking the next block of the order when
  // its block is done; the scheduler switches between them at random after every thread switch
  // (a barrier, a collective, an exit), so blocks progress side by side in a seeded interleaving.
  struct Interleave {
    std::vector<std::unique_ptr<Stack>> stacks;  // before slots: a slot's fiber may unwind on its stack
    std::vector<std::unique_ptr<Launch>> slots;
    const std::vector<uint64_t>* order;
    std::function<Dim3(uint64_t)> block_at;
    size_t next = 0;
  };
  static thread_local Interleave* g_run = nullptr;
  Interleave I;
  I.order = &order;
  I.block_at = block_at;
  for (unsigned k = 0; k < resident; ++k) {
    I.slots.push_back(make_launch(seed() + 0x9e3779b97f4a7c15ull * (k + 1)));
    I.stacks.push_back(std::make_unique<Stack>());
    Launch& S = *I.slots.back();
    S.stack_base = size_t(k) * nthreads;
    S.interleaved = true;
    S.slot.start(
        I.stacks.back()->base(), I.stacks.back()->size(),
        [](void*) {
          Launch& self = *g_launch;
          Interleave& R = *g_run;
          while (self.error.empty() && R.next < R.order->size()) {
            self.block_idx = R.block_at((*R.order)[R.next++]);
            run_block(self);
          }
        },
        nullptr);
  }
  g_run = &I;
  struct Done {
    ~Done() { g_run = nullptr; }
  } done;
  std::vector<Launch*> alive;
  for (auto& S : I.slots) alive.push_back(S.get());
  const std::string* error = nullptr;
  while (!alive.empty() && !error) {
    const size_t k = L->rng() % alive.size();
    g_launch = alive[k];
    alive[k]->slot.resume();
    if (!alive[k]->error.empty()) error = &alive[k]->error;
    if (alive[k]->slot.finished()) {
      alive[k] = alive.back();
      alive.pop_back();
    }
  }
  g_launch = L.get();
  if (error) throw Error("simulator: " + *error);
}

}  // namespace tf::sim
