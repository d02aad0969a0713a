// defines: the MPI communicator (MPI_COMM_WORLD): rank-order all-reduce sums over MPI_Allgather,
// the byte all-gather, broadcast, barrier, MPI_Abort, and the sums overlapped with the backward on
// a communication thread
#include "src/dist/mpi.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "src/core/error.h"

namespace tf::dist {
namespace {

// Values gathered per round of a sum (the planner counts its buffer by the same constant).
constexpr int64_t kChunk = kSumChunkValues;

// Bytes per rank gathered per round of an all-gather: well inside an int count, and a bounded
// message whatever the size of the block.
constexpr size_t kGatherChunk = size_t(1) << 26;

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
    // MPI progresses a collective only inside an MPI call, so a sum overlapped with the backward
    // runs as blocking calls on a thread of its own, beside the main thread's own collectives (a
    // sharded weight's all-gather, the loss sum): that takes MPI_THREAD_MULTIPLE.
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &thread_level_);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    if (size_ != expected)
      abort("the MPI world has " + std::to_string(size_) + " processes, the launcher announced " +
            std::to_string(expected));
    if (thread_level_ == MPI_THREAD_MULTIPLE) {
      // The thread's collectives go on a communicator of their own, so that their order across the
      // ranks cannot interleave with the main thread's.
      MPI_Comm_dup(MPI_COMM_WORLD, &jobs_comm_);
      thread_ = std::thread([this] { run_jobs(); });
    }
  }
  ~MpiWorld() override {
    if (thread_.joinable()) {
      {
        std::lock_guard lock(mutex_);
        stopping_ = true;
      }
      wake_.notify_all();
      thread_.join();
      MPI_Comm_free(&jobs_comm_);
    }
    MPI_Finalize();
  }

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
  void all_gather(std::span<const std::byte> mine, std::span<std::byte> all) override {
    check_gather_sizes(mine.size(), all.size(), size_);
    gather_bytes(mine, all, MPI_COMM_WORLD);
  }
  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }

  bool overlap() const override { return thread_.joinable(); }
  std::string overlap_note() const override {
    return overlap() ? "" : "the MPI library grants no MPI_THREAD_MULTIPLE";
  }
  uint64_t start_sum(std::span<float> data) override {
    if (!overlap()) return Communicator::start_sum(data);
    return queue({data, {}, {}});
  }
  uint64_t start_gather(std::span<const std::byte> mine, std::span<std::byte> all) override {
    if (!overlap()) return Communicator::start_gather(mine, all);
    check_gather_sizes(mine.size(), all.size(), size_);
    return queue({{}, mine, all});
  }
  void wait(uint64_t ticket) override {
    if (!overlap()) return;
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return finished_ >= ticket; });
  }
  double finish_sums() override {
    if (!overlap()) return 0;
    std::unique_lock lock(mutex_);
    done_.wait(lock, [this] { return finished_ == started_; });
    const double s = sum_seconds_;
    sum_seconds_ = 0;
    return s;
  }

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
  void gather_and_sum(std::span<T> data, MPI_Comm comm = MPI_COMM_WORLD, std::vector<T>* buffer = nullptr) {
    std::vector<T> local;
    std::vector<T>& gathered = buffer ? *buffer : local;
    gathered.resize(
        std::max(gathered.size(), size_t(std::min<int64_t>(int64_t(data.size()), kChunk)) * size_t(size_)));
    for (size_t off = 0; off < data.size(); off += size_t(kChunk)) {
      const int n = int(std::min<size_t>(data.size() - off, size_t(kChunk)));
      MPI_Allgather(data.data() + off, n, mpi_type<T>(), gathered.data(), n, mpi_type<T>(), comm);
      sum_in_rank_order(gathered.data(), size_, n, data.data() + off);
    }
  }

  // Rounds of at most kGatherChunk bytes per rank (MPI counts are ints); each round receives rank
  // r's piece at r x mine.size() + off through a type whose extent is one rank's whole share.
  void gather_bytes(std::span<const std::byte> mine, std::span<std::byte> all, MPI_Comm comm) {
    for (size_t off = 0; off < mine.size(); off += kGatherChunk) {
      const int n = int(std::min(mine.size() - off, kGatherChunk));
      MPI_Datatype piece = MPI_DATATYPE_NULL, strided = MPI_DATATYPE_NULL;
      MPI_Type_contiguous(n, MPI_BYTE, &piece);
      MPI_Type_create_resized(piece, 0, MPI_Aint(mine.size()), &strided);
      MPI_Type_commit(&strided);
      MPI_Allgather(mine.data() + off, n, MPI_BYTE, all.data() + off, 1, strided, comm);
      MPI_Type_free(&strided);
      MPI_Type_free(&piece);
    }
  }

  // A collective for the communication thread: a sum of `sum`, else the gather of `mine` into `all`.
  struct Job {
    std::span<float> sum;
    std::span<const std::byte> mine;
    std::span<std::byte> all;
  };
  uint64_t queue(const Job& job) {
    uint64_t ticket = 0;
    {
      std::lock_guard lock(mutex_);
      jobs_.push_back(job);
      ticket = ++started_;
    }
    wake_.notify_all();
    return ticket;
  }

  // The communication thread: the collectives started, one after another in the order started, on
  // a communicator of their own, each the same calls as on the main thread, so the bits do not
  // depend on the overlap.
  void run_jobs() {
    std::vector<float> gathered;  // kept across sums and steps: no allocation once it has grown
    std::unique_lock lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      const Job job = jobs_.front();
      jobs_.pop_front();
      lock.unlock();
      const auto t0 = std::chrono::steady_clock::now();
      if (job.all.empty())
        gather_and_sum(job.sum, jobs_comm_, &gathered);
      else
        gather_bytes(job.mine, job.all, jobs_comm_);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      lock.lock();
      if (job.all.empty()) sum_seconds_ += s;
      ++finished_;
      done_.notify_all();
    }
  }

  int rank_ = 0, size_ = 1;
  int thread_level_ = MPI_THREAD_SINGLE;
  MPI_Comm jobs_comm_ = MPI_COMM_NULL;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::deque<Job> jobs_;
  uint64_t started_ = 0, finished_ = 0;  // tickets: the collectives queued and those done
  bool stopping_ = false;
  double sum_seconds_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> mpi_world(int expected) {
  return std::make_unique<MpiWorld>(expected);
}

}  // namespace tf::dist
