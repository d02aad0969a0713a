// defines: the single-process communicator, the rank-order sums, the broadcast helpers and the
// launch that picks this process's communicator
#include "src/dist/comm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "src/core/error.h"
#include "src/dist/mpi.h"

namespace tf::dist {
namespace {

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string describe() const override { return "single process"; }
  void all_reduce_sum(std::span<float>) override {}
  void all_reduce_sum(std::span<double>) override {}
  void all_reduce_sum(std::span<int64_t>) override {}
  void broadcast(std::span<std::byte>, int root) override {
    TF_CHECK(root == 0, "broadcast from rank ", root, " in a single-process run");
  }
  void all_gather(std::span<const std::byte> mine, std::span<std::byte> all) override {
    check_gather_sizes(mine.size(), all.size(), 1);
    if (!mine.empty()) std::memcpy(all.data(), mine.data(), mine.size());
  }
  void barrier() override {}

 protected:
  void abort_ranks(const std::string& message) override { TF_FAIL(message); }
};

template <typename T>
void sum_ranks(const T* gathered, int ranks, int64_t n, T* out) {
  TF_CHECK(ranks >= 1 && n >= 0, "rank-order sum of ", ranks, " ranks of ", n, " values");
  std::memcpy(out, gathered, size_t(n) * sizeof(T));
  for (int r = 1; r < ranks; ++r) {
    const T* v = gathered + int64_t(r) * n;
    for (int64_t i = 0; i < n; ++i) out[i] += v[i];
  }
}

}  // namespace

void check_gather_sizes(size_t mine, size_t all, int ranks) {
  TF_CHECK(ranks >= 1 && mine <= SIZE_MAX / size_t(ranks) && all == mine * size_t(ranks), "all-gather of ",
           mine, " bytes from each of ", ranks, " ranks into a buffer of ", all, " bytes (", ranks, " x ",
           mine, " expected)");
}

int64_t sum_gather_values(int ranks, int64_t n, int64_t chunk) {
  TF_CHECK(ranks >= 1 && n >= 0 && chunk >= 1, "a sum of ", n, " values over ", ranks, " ranks in rounds of ",
           chunk);
  return int64_t(ranks) * std::min(n, chunk);
}

std::unique_ptr<Communicator> single_process() {
  return std::make_unique<SingleProcess>();
}

void sum_in_rank_order(const float* gathered, int ranks, int64_t n, float* out) {
  sum_ranks(gathered, ranks, n, out);
}
void sum_in_rank_order(const double* gathered, int ranks, int64_t n, double* out) {
  sum_ranks(gathered, ranks, n, out);
}

int launcher_size() {
  // Open MPI's mpirun, then the PMI-1/2 launchers (MPICH's hydra, Slurm's srun).
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    TF_CHECK(*end == '\0' && n >= 1 && n <= 1 << 20, "the MPI launcher set ", name, "=", v,
             ", which is not a number of processes");
    return int(n);
  }
  return 0;
}

bool mpi_built() {
#ifdef TIGHTFIT_HAVE_MPI
  return true;
#else
  return false;
#endif
}

std::string mpiexec() {
#ifdef TIGHTFIT_MPIEXEC
  return TIGHTFIT_MPIEXEC;
#else
  return "";
#endif
}

std::unique_ptr<Communicator> launch() {
  const int n = launcher_size();
  if (n <= 1) return single_process();
#ifdef TIGHTFIT_HAVE_MPI
  return mpi_world(n);
#else
  TF_FAIL(
      "this process is one of ", n,
      " started by an MPI launcher, but this tightfit was built without MPI support (TIGHTFIT_MPI=OFF "
      "or no MPI found at build time); install Open MPI (libopenmpi-dev) and rebuild, or run one process");
#endif
}

std::string broadcast_string(Communicator& c, const std::string& value) {
  int64_t size = c.rank() == 0 ? int64_t(value.size()) : 0;
  c.broadcast(std::as_writable_bytes(std::span(&size, 1)), 0);
  std::string s = c.rank() == 0 ? value : std::string(size_t(size), '\0');
  c.broadcast(std::as_writable_bytes(std::span(s.data(), s.size())), 0);
  return s;
}

bool broadcast_flag(Communicator& c, bool value) {
  int64_t v = value ? 1 : 0;
  c.broadcast(std::as_writable_bytes(std::span(&v, 1)), 0);
  return v != 0;
}

bool any_rank(Communicator& c, bool value) {
  int64_t v = value ? 1 : 0;
  c.all_reduce_sum(std::span(&v, 1));
  return v != 0;
}

}  // namespace tf::dist
