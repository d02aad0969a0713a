// defines: the MPI communicator (MPI_COMM_WORLD): rank-order all-reduce sums over MPI_Allgather,
// broadcast, barrier and MPI_Abort
#include "src/dist/mpi.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <vector>

#include "src/core/error.h"

namespace tf::dist {
namespace {

// Values gathered per round: bounds the gather buffer at size x 4 MiB for floats whatever the
// length of the gradient.
constexpr int64_t kChunk = int64_t(1) << 20;

template <typename T>
MPI_Datatype mpi_type();
template <>
MPI_Datatype mpi_type<float>() {
  return MPI_FLOAT;
}
template <>
MPI_Datatype mpi_type<double>() {
  return MPI_DOUBLE;
}

class MpiWorld final : public Communicator {
 public:
  explicit MpiWorld(int expected) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    TF_CHECK(!initialized, "MPI is already initialised in this process");
    // Errors stay fatal (MPI_ERRORS_ARE_FATAL, the default): a failed collective ends the whole job
    // rather than leaving the other ranks waiting in it.
    MPI_Init(nullptr, nullptr);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    if (size_ != expected)
      abort("the MPI world has " + std::to_string(size_) + " processes, the launcher announced " +
            std::to_string(expected));
  }
  ~MpiWorld() override { MPI_Finalize(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe() const override {
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    std::string v(version, size_t(len));
    v = v.substr(0, std::min(v.find(','), v.find('\n')));
    return "MPI (" + v + ")";
  }

  void all_reduce_sum(std::span<float> data) override { gather_and_sum(data); }
  void all_reduce_sum(std::span<double> data) override { gather_and_sum(data); }
  void all_reduce_sum(std::span<int64_t> data) override {
    for (size_t off = 0; off < data.size(); off += size_t(kChunk)) {
      const int n = int(std::min<size_t>(data.size() - off, size_t(kChunk)));
      MPI_Allreduce(MPI_IN_PLACE, data.data() + off, n, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    }
  }
  void broadcast(std::span<std::byte> data, int root) override {
    TF_CHECK(root >= 0 && root < size_, "broadcast from rank ", root, " of ", size_);
    for (size_t off = 0; off < data.size(); off += size_t(INT_MAX)) {
      const int n = int(std::min<size_t>(data.size() - off, size_t(INT_MAX)));
      MPI_Bcast(data.data() + off, n, MPI_BYTE, root, MPI_COMM_WORLD);
    }
  }
  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }

 protected:
  void abort_ranks(const std::string& message) override {
    std::fprintf(stderr, "error: rank %d of %d: %s\n", rank_, size_, message.c_str());
    std::fflush(stderr);
    std::fflush(stdout);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }

 private:
  // MPI_Allreduce may add the ranks' values in any order (a tree, a ring, by message arrival), so
  // every rank gathers them all and adds them in rank order itself: (size - 1) x n values received
  // per rank instead of a ring's 2 (size - 1) / size x n, which LoRA gradients, a few MiB, afford.
  template <typename T>
  void gather_and_sum(std::span<T> data) {
    std::vector<T> gathered(size_t(std::min<int64_t>(int64_t(data.size()), kChunk)) * size_t(size_));
    for (size_t off = 0; off < data.size(); off += size_t(kChunk)) {
      const int n = int(std::min<size_t>(data.size() - off, size_t(kChunk)));
      MPI_Allgather(data.data() + off, n, mpi_type<T>(), gathered.data(), n, mpi_type<T>(), MPI_COMM_WORLD);
      sum_in_rank_order(gathered.data(), size_, n, data.data() + off);
    }
  }

  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> mpi_world(int expected) {
  return std::make_unique<MpiWorld>(expected);
}

}  // namespace tf::dist
