// defines: tf::cpu::set_num_threads, tf::cpu::num_threads
#include <cblas.h>
#include <omp.h>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::cpu {

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
