// defines: tf::kMinParallelElems (the size below which elementwise loops stay on one thread),
// tf::ordered_sum (a parallel sum whose bits do not depend on the thread count)
#pragma once

#include <cstdint>
#include <vector>

namespace tf {

// Elementwise loops over fewer elements run on the calling thread: starting and joining an OpenMP
// region costs microseconds, more than such a loop, and decoding runs thousands of them per token.
constexpr int64_t kMinParallelElems = int64_t(1) << 15;

// Indices per chunk of ordered_sum. The chunking is fixed, not derived from the thread count, so
// that any number of threads adds the same terms in the same order.
constexpr int64_t kOrderedSumChunk = int64_t(1) << 14;

// The sum of term(i) for i in [0, n), in double: each chunk of kOrderedSumChunk indices is summed
// in index order by one thread, then the chunk sums are added in chunk order. `#pragma omp
// reduction` would instead add per-thread partials, whose extent depends on the thread count, in
// the order the threads finish; that is what a loss or a gradient norm must not depend on.
template <typename Term>
double ordered_sum(int64_t n, Term&& term) {
  const int64_t n_chunks = (n + kOrderedSumChunk - 1) / kOrderedSumChunk;
  std::vector<double> partial(size_t(n_chunks > 0 ? n_chunks : 0));
#pragma omp parallel for schedule(static) if (n >= kMinParallelElems)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t end = c + 1 < n_chunks ? (c + 1) * kOrderedSumChunk : n;
    double s = 0;
    for (int64_t i = c * kOrderedSumChunk; i < end; ++i) s += term(i);
    partial[size_t(c)] = s;
  }
  double sum = 0;
  for (const double p : partial) sum += p;
  return sum;
}

}  // namespace tf
