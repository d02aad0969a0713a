// defines: the thread pool behind tf::pool_for, and tf::in_parallel_work
#include "src/core/pool.h"

#include <fcntl.h>
#include <omp.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace tf {
namespace {

thread_local bool t_in_pool_task = false;
std::atomic<bool> g_sized_by_load{true};

// The ticket packs the call's generation, its number of claims and the next claim to hand out, so
// that one compare-and-swap both checks that a claim belongs to the running call and takes it: a
// thread that read the ticket of an earlier call and was descheduled cannot take a claim of a later
// one, whose generation differs.
constexpr int kFieldBits = 20;
constexpr uint64_t kFieldMask = (uint64_t(1) << kFieldBits) - 1;
static_assert(kPoolMaxClaims <= int64_t(kFieldMask), "claims must fit the ticket's field");
constexpr uint64_t kGenerationMask = (uint64_t(1) << (64 - 2 * kFieldBits)) - 1;

uint64_t claims_of(uint64_t ticket) {
  return (ticket >> kFieldBits) & kFieldMask;
}
uint64_t next_of(uint64_t ticket) {
  return ticket & kFieldMask;
}

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// The value of `a` once it differs from `old`: checked for kPoolSpinMicros (unless `spin` is false),
// then asleep until a notify (a futex where the type is four bytes). `awake` counts the threads
// that are not asleep.
template <typename T>
T wait_for_change(const std::atomic<T>& a, T old, bool spin = true, std::atomic<int>* awake = nullptr) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kPoolSpinMicros);
  for (int i = 1; spin; ++i) {
    const T v = a.load(std::memory_order_acquire);
    if (v != old) return v;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() >= deadline) break;
  }
  if (awake) awake->fetch_sub(1, std::memory_order_relaxed);
  for (;;) {
    a.wait(old, std::memory_order_acquire);
    const T v = a.load(std::memory_order_acquire);
    if (v != old) {
      if (awake) awake->fetch_add(1, std::memory_order_relaxed);
      return v;
    }
  }
}

// The count of runnable threads on the machine now, as /proc/loadavg's text.
bool read_loadavg(char* buf, size_t size) {
  const int fd = ::open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t n = ::read(fd, buf, size - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  return true;
}

class Pool {
 public:
  Pool() = default;
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  ~Pool() {
    stop_.store(true, std::memory_order_release);
    wake_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();
    for (std::thread& w : workers_) w.join();
  }

  // Runs the call with up to `helpers` pool threads beside the caller, as many as the free CPUs
  // leave room for, or returns false (nothing run) where another thread's call holds the pool or no
  // CPU is free beside the caller's.
  bool run(int64_t n_tasks, detail::PoolTask task, void* body, int helpers) {
    std::unique_lock<std::mutex> lock(run_mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    if (g_sized_by_load.load(std::memory_order_relaxed)) helpers = std::min(helpers, free_cpus() - 1);
    if (helpers <= 0) return false;
    while (int(workers_.size()) < helpers) {
      const int index = int(workers_.size());
      awake_.fetch_add(1, std::memory_order_relaxed);
      // The worker waits for the wake count to move past the one before this call's.
      const uint32_t seen = wake_.load(std::memory_order_relaxed);
      workers_.emplace_back([this, index, seen] { worker(index, seen); });
    }
    // About kPoolClaimsPerThread claims for each thread taking part: each claim is a compare-and-swap
    // on a line all of them share, which thousands of short tasks (an lm_head's rows) would pay
    // for more than the balance they buy.
    per_claim_ = std::max((n_tasks + int64_t(kPoolMaxClaims) - 1) / int64_t(kPoolMaxClaims),
                          n_tasks / (kPoolClaimsPerThread * (helpers + 1)));
    per_claim_ = std::max<int64_t>(per_claim_, 1);
    const int32_t claims = int32_t((n_tasks + per_claim_ - 1) / per_claim_);
    task_ = task;
    body_ = body;
    n_tasks_ = n_tasks;
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    helpers_.store(helpers, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & kGenerationMask;
    ticket_.store(generation_ << (2 * kFieldBits) | uint64_t(claims) << kFieldBits,
                  std::memory_order_release);
    wake_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();

    t_in_pool_task = true;
    work();
    t_in_pool_task = false;
    for (int32_t d = done_.load(std::memory_order_acquire); d != claims;) d = wait_for_change(done_, d);
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void worker(int index, uint32_t seen) {
    pthread_setname_np(pthread_self(), "tf-pool");
    t_in_pool_task = true;
    // A worker the last call did not take sleeps at once: it would spin on a CPU the call left free
    // for others.
    bool taken = true;
    for (;;) {
      seen = wait_for_change(wake_, seen, taken, &awake_);
      if (stop_.load(std::memory_order_acquire)) return;
      taken = index < helpers_.load(std::memory_order_relaxed);
      if (taken) work();
    }
  }

  // Takes claims of the running call until none is left, runs each, and counts it done.
  void work() {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t claims = claims_of(t), next = next_of(t);
      if (next >= claims) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        continue;
      // The claim is taken, so its call runs until this one is counted: its fields are stable.
      const int64_t begin = int64_t(next) * per_claim_;
      const int64_t end = std::min(n_tasks_, begin + per_claim_);
      if (!failed_.load(std::memory_order_relaxed)) {
        try {
          task_(body_, begin, end);
        } catch (...) {
          std::lock_guard<std::mutex> g(error_mutex_);
          if (!error_) error_ = std::current_exception();
          failed_.store(true, std::memory_order_relaxed);
        }
      }
      if (uint64_t(done_.fetch_add(1, std::memory_order_acq_rel)) + 1 == claims) done_.notify_one();
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  // The CPUs free for this pool's threads, read again once the last reading is
  // kPoolLoadSampleMicros old; under run_mutex_. A new count holds once two readings in a row give
  // it: one reading can catch a thread of another program in passing, or a worker of ours just
  // woken and not yet counted awake.
  int free_cpus() {
    const auto now = std::chrono::steady_clock::now();
    if (now - sampled_ >= std::chrono::microseconds(kPoolLoadSampleMicros)) {
      sampled_ = now;
      const int online = std::max(1, int(sysconf(_SC_NPROCESSORS_ONLN)));
      char text[128];
      const int own = 1 + awake_.load(std::memory_order_relaxed);
      const int reading = read_loadavg(text, sizeof text) ? detail::free_cpus(text, online, own) : online;
      if (free_ == 0 || reading == last_reading_) free_ = reading;
      last_reading_ = reading;
    }
    return free_;
  }

  std::mutex run_mutex_;
  std::vector<std::thread> workers_;
  std::atomic<int> awake_{0};  // workers not asleep
  std::chrono::steady_clock::time_point sampled_{};
  int free_ = 0;
  int last_reading_ = 0;
  std::atomic<uint32_t> wake_{0};  // bumped for each call and to stop; idle workers wait on it
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int32_t> done_{0};  // claims of the running call that have ended
  std::atomic<int> helpers_{0};   // workers below this index take part in the running call
  std::atomic<bool> stop_{false};
  std::atomic<bool> failed_{false};
  uint64_t generation_ = 0;  // the caller's, under run_mutex_
  // The running call, written by its caller before the ticket is published.
  detail::PoolTask task_ = nullptr;
  void* body_ = nullptr;
  int64_t n_tasks_ = 0;
  int64_t per_claim_ = 1;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

bool in_parallel_work() {
  return t_in_pool_task || omp_in_parallel();
}

namespace detail {

int free_cpus(const char* loadavg, int online, int own_running) {
  // "0.52 0.58 0.59 3/712 12345": past three load averages, then runnable / total.
  const char* p = loadavg;
  for (int field = 0; field < 3; ++field) {
    while (*p && *p != ' ') ++p;
    while (*p == ' ') ++p;
  }
  char* end = nullptr;
  errno = 0;
  const long running = std::strtol(p, &end, 10);
  if (end == p || *end != '/' || errno == ERANGE || running < 0) return online;
  const long others = std::max(0L, running - std::max(0, own_running));
  return int(std::clamp<long>(online - others, 1, online));
}

void set_pool_sized_by_load(bool on) {
  g_sized_by_load.store(on, std::memory_order_relaxed);
}

void pool_run(int64_t n_tasks, PoolTask task, void* body) {
  if (n_tasks <= 0) return;
  const int helpers = int(std::min<int64_t>(omp_get_max_threads(), n_tasks)) - 1;
  if (helpers > 0 && !in_parallel_work() && pool().run(n_tasks, task, body, helpers)) return;
  task(body, 0, n_tasks);
}

}  // namespace detail

}  // namespace tf
