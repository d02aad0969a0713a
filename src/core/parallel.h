// defines: tf::kMinParallelElems (the size below which elementwise loops stay on one thread),
// tf::parallel_for_if (a loop that enters an OpenMP region only when it runs in parallel),
// tf::ordered_sum (a parallel sum whose bits do not depend on the thread count)
#pragma once

#include <algorithm>
#include <cstdint>

namespace tf {

// Elementwise loops over fewer elements run on the calling thread: starting and joining an OpenMP
// region costs microseconds, more than such a loop, and decoding runs thousands of them per token.
constexpr int64_t kMinParallelElems = int64_t(1) << 15;

// body(i) for every i in [0, n), split over the threads when `parallel`, else in order on the
// calling thread without entering an OpenMP region: libgomp starts a team even for a region whose
// `if` clause leaves it one thread (an allocation, a free and the team's bookkeeping), which a
// loop called for every few hundred elements (a row's chunk in decoding) pays each time.
template <typename Body>
void parallel_for_if(bool parallel, int64_t n, Body&& body) {
  if (!parallel) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// Indices per chunk of ordered_sum, and the most chunks it makes (their sums live on the stack, so
// a training step allocates nothing here). The chunking depends only on n, never on the thread
// count, so that any number of threads adds the same terms in the same order.
constexpr int64_t kOrderedSumChunk = int64_t(1) << 14;
constexpr int64_t kOrderedSumMaxChunks = 1024;

// The sum of term(i) for i in [0, n), in double: each chunk of kOrderedSumChunk indices (more when
// n exceeds kOrderedSumChunk * kOrderedSumMaxChunks) is summed in index order by one thread, then
// the chunk sums are added in chunk order. `#pragma omp reduction` would instead add per-thread
// partials, whose extent depends on the thread count, in the order the threads finish; that is
// what a loss or a gradient norm must not depend on.
template <typename Term>
double ordered_sum(int64_t n, Term&& term) {
  if (n <= 0) return 0;
  const int64_t grown = (n + kOrderedSumMaxChunks - 1) / kOrderedSumMaxChunks;
  const int64_t chunk = std::max(kOrderedSumChunk, grown);
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  double partial[kOrderedSumMaxChunks];
#pragma omp parallel for schedule(static) if (n >= kMinParallelElems)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    double s = 0;
    for (int64_t i = c * chunk; i < end; ++i) s += term(i);
    partial[c] = s;
  }
  double sum = 0;
  for (int64_t c = 0; c < n_chunks; ++c) sum += partial[c];
  return sum;
}

}  // namespace tf
