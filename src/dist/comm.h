// defines: tf::dist::Communicator (the ranks of a data-parallel run: rank, size, deterministic
// all-reduce sums, all-gather, broadcast, barrier, abort), the single-process communicator, the rank-order
// sum both implementations share, and the launch that picks one for this process
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>

namespace tf::dist {

// The processes of one run. Every collective must be called by every rank in the same order.
// Sums are deterministic: each rank's contribution is added in rank order (0, 1, ..., size-1) on
// every rank, so the result, and therefore every optimizer step, is the same bits on every rank
// and in every run, whatever the timing of the ranks.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // What carries the collectives, for the log ("single process", "MPI (Open MPI v4.1.4)").
  virtual std::string describe() const = 0;

  // In place: data[i] becomes the sum over ranks r = 0..size-1, in that order, of rank r's data[i].
  virtual void all_reduce_sum(std::span<float> data) = 0;
  virtual void all_reduce_sum(std::span<double> data) = 0;
  // Integers sum exactly in any order.
  virtual void all_reduce_sum(std::span<int64_t> data) = 0;
  // Rank `root`'s bytes into every rank's `data`.
  virtual void broadcast(std::span<std::byte> data, int root) = 0;
  // Every rank's `mine` (the same size on every rank) into every rank's `all`, rank r's bytes at
  // [r x mine.size(), (r + 1) x mine.size()): bytes split across the ranks, put back together on
  // each. Throws unless all.size() is size() x mine.size().
  virtual void all_gather(std::span<const std::byte> mine, std::span<std::byte> all) = 0;
  virtual void barrier() = 0;

  // Collectives that run while this thread computes, on a communication thread: start_sum(data)
  // begins the same rank-order sum as all_reduce_sum(data) (the same bits), start_gather(mine, all)
  // the same all-gather as all_gather(mine, all); both return at once with a ticket. wait(ticket)
  // returns once that collective and every one started before it are done (they run one after
  // another in the order started); finish_sums() once every one started is, with the seconds the
  // sums among them took (their work, hidden or not). Every rank starts the same collectives in the
  // same order, and the caller leaves their buffers alone until they are done. Where overlap() is
  // false each runs before start_* returns.
  virtual bool overlap() const { return false; }
  // Why collectives cannot overlap here ("" where they can), for the log.
  virtual std::string overlap_note() const { return overlap() ? "" : "one process"; }
  virtual uint64_t start_sum(std::span<float> data) {
    all_reduce_sum(data);
    return 0;
  }
  virtual uint64_t start_gather(std::span<const std::byte> mine, std::span<std::byte> all) {
    all_gather(mine, all);
    return 0;
  }
  virtual void wait(uint64_t ticket) {}
  virtual double finish_sums() { return 0; }
  // Stops every rank of the run: prints "error: rank r of N: message" on stderr and ends this
  // process and the others (MPI_Abort), so that no rank waits forever in a collective for one that
  // failed. A single process throws tf::Error with the message instead.
  [[noreturn]] void abort(const std::string& message) {
    abort_ranks(message);
    // Compilers ignore [[noreturn]] on virtual functions, so the promise is kept here.
    std::abort();
  }

 protected:
  // Ends every rank or throws; never returns.
  virtual void abort_ranks(const std::string& message) = 0;
};

// One process: every collective is the identity.
std::unique_ptr<Communicator> single_process();

// The communicator of this process: MPI's when it was started by an MPI launcher (mpirun sets
// OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK) with more than one rank, else single_process().
// A build without MPI refuses such a launch. MPI is finalised when the returned object is destroyed.
std::unique_ptr<Communicator> launch();

// Whether this binary was built with MPI (TIGHTFIT_MPI).
bool mpi_built();
// The launcher of the MPI this binary was built with (mpiexec), "" without MPI: runs of several
// ranks must use the launcher that matches the library.
std::string mpiexec();

// The size an MPI launcher gave this process in its environment (0 when none did).
int launcher_size();

// `ranks` buffers of `n` values each, laid out one after another, summed element by element in
// rank order into `out`: out[i] = ((v_0[i] + v_1[i]) + v_2[i]) + ...
void sum_in_rank_order(const float* gathered, int ranks, int64_t n, float* out);
void sum_in_rank_order(const double* gathered, int ranks, int64_t n, double* out);

// Values per round of the MPI all-reduce sum's gather: bounds its buffer at size x 4 MiB for
// floats whatever the length of the data.
inline constexpr int64_t kSumChunkValues = int64_t(1) << 20;
// The values a sum of n values over `ranks` ranks gathers into, on the host (all_reduce_sum) or a
// device (DeviceSum), in rounds of `chunk`: ranks x the longest round.
int64_t sum_gather_values(int ranks, int64_t n, int64_t chunk = kSumChunkValues);

// Refuses an all-gather whose `all` is not `ranks` x `mine` bytes (or whose product overflows).
void check_gather_sizes(size_t mine, size_t all, int ranks);

// Helpers over the collectives.
// Rank 0's `value` on every rank.
std::string broadcast_string(Communicator& c, const std::string& value);
bool broadcast_flag(Communicator& c, bool value);
// Whether any rank passes true.
bool any_rank(Communicator& c, bool value);

}  // namespace tf::dist
