// defines: tf::pool_for (a loop over tasks on the calling thread and a pool of threads that wait
// briefly awake between calls, for the few-microsecond loops of decoding), tf::in_parallel_work
// (whether the calling thread is inside an OpenMP region or a pool task)
#pragma once

#include <cstdint>
#include <type_traits>

namespace tf {

// How long an idle pool thread keeps checking for the next call before it sleeps, in
// microseconds. A decoding step calls the pool about 250 times a token with a few microseconds
// between calls, which a thread that slept at once would pay a wake-up for each time; a thread
// that spun on (libgomp's active policy) would take the core from the thread it waits for on a
// loaded machine. See docs/DESIGN.md, section 4 (Numerics and determinism), on threads.
constexpr int64_t kPoolSpinMicros = 50;

// A call hands out its tasks in claims, runs of consecutive tasks: about this many for each thread
// that takes part, and never more than kPoolMaxClaims.
constexpr int64_t kPoolClaimsPerThread = 8;
constexpr int64_t kPoolMaxClaims = (int64_t(1) << 20) - 1;

// How often a call reads the machine's count of runnable threads (/proc/loadavg) to size itself.
constexpr int64_t kPoolLoadSampleMicros = 10000;

namespace detail {
using PoolTask = void (*)(void* body, int64_t begin, int64_t end);
void pool_run(int64_t n_tasks, PoolTask task, void* body);

// The CPUs not taken by other threads, from /proc/loadavg's text (its fourth field, runnable /
// total, counts the threads running or waiting for a CPU now), the CPUs online and how many of the
// runnable are this pool's own (the caller and its awake workers): at least 1, at most `online`.
// Text it cannot read gives `online`.
int free_cpus(const char* loadavg, int online, int own_running);

// Whether calls size themselves by the free CPUs (on by default); tests turn it off to run the
// pool's threads whatever else the machine runs.
void set_pool_sized_by_load(bool on);
}  // namespace detail

// body(i) for every i in [0, n_tasks), on the calling thread and up to omp_get_max_threads() - 1
// pool threads, fewer where other programs keep the CPUs busy (detail::free_cpus, sampled every
// kPoolLoadSampleMicros): a thread more than the free CPUs would share a CPU with the caller and
// slow its serial work more than it helps. Tasks are claimed a run at a time from a shared counter
// (about kPoolClaimsPerThread runs per thread), so the caller never waits for a thread that has
// not started: where the other threads are descheduled the caller runs every run itself. It waits
// only for runs already taken, briefly awake and then asleep. The calling thread runs the loop
// alone (in order) where it is inside an OpenMP region or a pool task, where another thread's call
// is running, or for a single thread. A body's exception reaches the caller after every run taken
// has ended (the first one thrown; the runs not yet taken are skipped). The body must not enter
// OpenMP regions (a team started from a pool thread is a second set of threads): check
// in_parallel_work().
template <typename Body>
void pool_for(int64_t n_tasks, Body&& body) {
  using B = std::remove_reference_t<Body>;
  detail::pool_run(
      n_tasks,
      [](void* b, int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) (*static_cast<B*>(b))(i);
      },
      const_cast<void*>(static_cast<const void*>(&body)));
}

// Whether the calling thread is inside an OpenMP parallel region or running a pool task: a loop
// there must stay on its thread.
bool in_parallel_work();

}  // namespace tf
