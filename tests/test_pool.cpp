// Tests: tf::pool_for runs every task exactly once for any task and thread count, many calls in a
// row (a late worker never takes a later call's task), calls from several threads at once, nested
// calls, an exception thrown by a task, tasks that outnumber the claims; tf::in_parallel_work;
// detail::free_cpus on /proc/loadavg's text.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "src/core/pool.h"
#include "tests/op_test_util.h"

using namespace tf;

namespace {

using Threads = test::ScopedThreads;

// The pool's threads take part whatever else the machine runs (ctest runs tests side by side).
class UnsizedPool : public ::testing::Test {
 protected:
  void SetUp() override { detail::set_pool_sized_by_load(false); }
  void TearDown() override { detail::set_pool_sized_by_load(true); }
};

// Runs pool_for over n tasks and checks that each ran once.
void expect_each_task_once(int64_t n) {
  std::vector<std::atomic<int>> runs(size_t(n < 0 ? 0 : n));
  pool_for(n, [&](int64_t i) { runs[size_t(i)].fetch_add(1, std::memory_order_relaxed); });
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(runs[size_t(i)].load(), 1) << "task " << i << " of " << n;
}

}  // namespace

TEST_F(UnsizedPool, RunsEveryTaskOnceForAnyTaskAndThreadCount) {
  for (int threads : {1, 2, 3, 5}) {
    Threads scope(threads);
    for (int64_t n : {0, 1, 2, 3, 7, 64, 1000}) {
      SCOPED_TRACE("threads " + std::to_string(threads) + ", tasks " + std::to_string(n));
      expect_each_task_once(n);
    }
  }
  std::vector<int> none;
  pool_for(-3, [&](int64_t i) { none.push_back(int(i)); });
  EXPECT_TRUE(none.empty());
}

// Two tasks, each waiting for the other to start: they finish only if a pool thread runs one while
// the caller runs the other.
TEST_F(UnsizedPool, APoolThreadRunsTasksBesideTheCaller) {
  Threads scope(2);
  for (int call = 0; call < 50; ++call) {
    std::atomic<int> started{0};
    std::atomic<bool> met{true};
    pool_for(2, [&](int64_t) {
      started.fetch_add(1);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (started.load() < 2)
        if (std::chrono::steady_clock::now() > deadline) {
          met = false;
          return;
        }
    });
    ASSERT_TRUE(met.load()) << "call " << call << ": the two tasks never ran at the same time";
  }
}

// Thousands of short calls: a worker that wakes late for one call must not run a task of the next,
// whose body writes another vector.
TEST_F(UnsizedPool, ManyShortCallsInARowEachRunTheirOwnTasks) {
  Threads scope(3);
  std::vector<std::atomic<int>> runs(8);
  for (int call = 0; call < 20000; ++call) {
    for (auto& r : runs) r.store(0, std::memory_order_relaxed);
    std::atomic<int> stray{0};
    pool_for(int64_t(runs.size()), [&, call](int64_t i) {
      if (i < 0 || i >= int64_t(runs.size())) stray.fetch_add(1);
      runs[size_t(i)].fetch_add(1 + call % 2, std::memory_order_relaxed);
    });
    ASSERT_EQ(stray.load(), 0);
    for (size_t i = 0; i < runs.size(); ++i) ASSERT_EQ(runs[i].load(), 1 + call % 2) << "call " << call;
  }
}

TEST_F(UnsizedPool, CallsFromSeveralThreadsAtOnceEachRunTheirTasks) {
  Threads scope(2);
  std::vector<std::thread> callers;
  std::atomic<int> failures{0};
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&failures] {
      for (int call = 0; call < 500; ++call) {
        std::vector<std::atomic<int>> runs(33);
        pool_for(33, [&](int64_t i) { runs[size_t(i)].fetch_add(1); });
        for (auto& r : runs)
          if (r.load() != 1) failures.fetch_add(1);
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(UnsizedPool, NestedCallsAndCallsInsideOpenMpRunOnTheirThread) {
  Threads scope(2);
  std::vector<std::atomic<int>> runs(16 * 16);
  std::atomic<int> inner_elsewhere{0};
  pool_for(16, [&](int64_t i) {
    EXPECT_TRUE(in_parallel_work());
    const std::thread::id self = std::this_thread::get_id();
    pool_for(16, [&](int64_t j) {
      if (std::this_thread::get_id() != self) inner_elsewhere.fetch_add(1);
      runs[size_t(i * 16 + j)].fetch_add(1);
    });
  });
  EXPECT_EQ(inner_elsewhere.load(), 0);
  for (auto& r : runs) EXPECT_EQ(r.load(), 1);
  EXPECT_FALSE(in_parallel_work());

  std::atomic<int> elsewhere{0}, total{0};
#pragma omp parallel num_threads(2)
  {
    EXPECT_TRUE(in_parallel_work());
    const std::thread::id self = std::this_thread::get_id();
    pool_for(10, [&](int64_t) {
      if (std::this_thread::get_id() != self) elsewhere.fetch_add(1);
      total.fetch_add(1);
    });
  }
  EXPECT_EQ(elsewhere.load(), 0);
  EXPECT_EQ(total.load(), 10 * omp_get_max_threads());
}

TEST_F(UnsizedPool, ATaskThrowingReachesTheCallerAndThePoolStaysUsable) {
  for (int threads : {1, 3}) {
    Threads scope(threads);
    std::atomic<int> ran{0};
    EXPECT_THROW(pool_for(200,
                          [&](int64_t i) {
                            ran.fetch_add(1);
                            if (i == 5) throw std::runtime_error("task 5 failed");
                          }),
                 std::runtime_error);
    EXPECT_GE(ran.load(), 1);
    EXPECT_LE(ran.load(), 200);
    expect_each_task_once(100);
  }
}

// More tasks than the ticket holds claims: each claim takes a run of tasks.
TEST_F(UnsizedPool, MoreTasksThanClaimsStillRunEachOnce) {
  Threads scope(2);
  const int64_t n = kPoolMaxClaims * 2 + 5;
  std::vector<uint8_t> runs(size_t(n), 0);
  pool_for(n, [&](int64_t i) { ++runs[size_t(i)]; });
  int64_t wrong = 0;
  for (uint8_t r : runs) wrong += r != 1;
  EXPECT_EQ(wrong, 0);
}

TEST(Pool, FreeCpusCountTheRunnableThreadsOfOthers) {
  // "3/712": three runnable, of which own_running are this pool's.
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 1/712 12345\n", 2, 1), 2);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 2/712 12345\n", 2, 1), 1);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 2/712 12345\n", 2, 2), 2);
  EXPECT_EQ(detail::free_cpus("1.00 1.00 1.00 3/80 1\n", 4, 1), 2);
  EXPECT_EQ(detail::free_cpus("9.00 9.00 9.00 40/80 1\n", 4, 1), 1);  // never below one
  EXPECT_EQ(detail::free_cpus("0.00 0.00 0.00 0/80 1\n", 4, 1), 4);   // never above online
  // Text that is not /proc/loadavg's gives every CPU online.
  EXPECT_EQ(detail::free_cpus("", 4, 1), 4);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59", 4, 1), 4);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 x/712 1", 4, 1), 4);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 3 712 1", 4, 1), 4);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 99999999999999999999999/712 1", 4, 1), 4);
  EXPECT_EQ(detail::free_cpus("0.52 0.58 0.59 -3/712 1", 4, 1), 4);
}
