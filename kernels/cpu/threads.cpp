// defines: tf::cpu::set_num_threads, tf::cpu::num_threads, and the OpenMP wait policy tightfit
// gives libgomp (apply_default_wait_policy, wait_policy)
#include "kernels/cpu/threads.h"

#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/pool.h"

namespace tf::cpu {

namespace {

// Set beside OMP_WAIT_POLICY when the value is tightfit's default rather than the user's.
constexpr const char* kDefaultMarker = "TIGHTFIT_DEFAULT_WAIT_POLICY";

int g_exec_error = 0;  // errno of a re-execution that failed

}  // namespace

void apply_default_wait_policy(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  if (setenv("OMP_WAIT_POLICY", kDefaultWaitPolicy, 1) == 0 &&
      setenv(kDefaultMarker, kDefaultWaitPolicy, 1) == 0)
    execv("/proc/self/exe", argv);
  g_exec_error = errno;
  unsetenv("OMP_WAIT_POLICY");
  unsetenv(kDefaultMarker);
}

namespace {

std::string openmp_wait_policy() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  const char* marker = std::getenv(kDefaultMarker);
  if (policy && marker && std::strcmp(policy, marker) == 0 && !std::getenv("GOMP_SPINCOUNT"))
    return std::string("idle threads sleep at once (OMP_WAIT_POLICY=") + policy +
           ", tightfit's default; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment override it)";
  std::string set;
  for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
    if (const char* v = std::getenv(name)) set += (set.empty() ? "" : " ") + std::string(name) + "=" + v;
  if (!set.empty()) return "as the environment sets it (" + set + ")";
  std::string why = "libgomp's default: idle threads spin before they sleep";
  if (g_exec_error)
    why += std::string(" (tightfit could not set its own: ") + std::strerror(g_exec_error) + ")";
  return why;
}

}  // namespace

std::string wait_policy() {
  return openmp_wait_policy() +
         "; decoding's few-token products and cached attention run on tightfit's pool, " +
         "whose threads check for work " + std::to_string(kPoolSpinMicros) +
         " us before they sleep and join a call only where a CPU is free";
}

// OpenMP (our loops) and OpenBLAS (its own thread pool) are set together: they never run at the
// same time, and either one left at a different count would over- or under-subscribe the cores.
void set_num_threads(int n) {
  TF_CHECK(n >= 0, "set_num_threads: thread count must be >= 0 (0 = one per core), got ", n);
  const int threads = n == 0 ? omp_get_num_procs() : n;
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

int num_threads() {
  return omp_get_max_threads();
}

}  // namespace tf::cpu
