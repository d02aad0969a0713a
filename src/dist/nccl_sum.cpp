// defines: the NCCL device sum (built only with TIGHTFIT_NCCL): each round ncclAllGather of every
// rank's values into a device buffer, then a kernel adding the ranks' values in rank order, both
// queued on a stream of the sum's own behind the backend's compute stream, so that a block's sum
// runs beside the backward of the blocks below; MPI serves only the start-up
#include "src/dist/nccl_sum.h"

#include <nccl.h>

#include <exception>
#include <span>
#include <vector>

#include "kernels/cuda/device_backend.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/sum_parts.h"
#include "src/core/error.h"

namespace tf::dist {
namespace {

class NcclSum final : public DeviceSum {
 public:
  NcclSum(Communicator& comm, int device, cuda::rt::StreamHandle stream, int64_t chunk)
      : ranks_(comm.size()), rank_(comm.rank()), device_(device), compute_(stream), chunk_(chunk) {
    TF_CHECK(chunk >= 1, "an NCCL sum in rounds of ", chunk, " values");
    cuda::rt::set_device(device_);
    comm_stream_ = static_cast<cudaStream_t>(cuda::rt::stream_create());
    ready_ = cuda::rt::event_create();
    ncclUniqueId id{};
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    comm.broadcast(std::as_writable_bytes(std::span(&id, 1)), 0);
    check(ncclCommInitRank(&nccl_, ranks_, id, rank_), "ncclCommInitRank");
    int version = 0;
    check(ncclGetVersion(&version), "ncclGetVersion");
    version_ = std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
               std::to_string(version % 100);
  }
  ~NcclSum() override {
    // Unwinding from an error, a peer may never finish a collective: abort rather than wait.
    if (std::uncaught_exceptions() > 0)
      ncclCommAbort(nccl_);
    else
      ncclCommDestroy(nccl_);
    if (gathered_) cuda::rt::device_free(gathered_);
    for (const Timing& t : timings_) {
      cudaEventDestroy(t.begin);
      cudaEventDestroy(t.end);
    }
    cuda::rt::event_destroy(ready_);
    cuda::rt::stream_destroy(comm_stream_);
  }
  NcclSum(const NcclSum&) = delete;
  NcclSum& operator=(const NcclSum&) = delete;

  void all_reduce_sum(float* data, int64_t n) override {
    start_sum(data, n);
    finish_sums();
  }

  // On a stream of its own behind an event of the compute stream: the ops that made the gradients
  // come first, and the backward of the blocks below runs beside the sum. Each round's gather and
  // add are in order there, the next round's gather behind this round's add, which reads the
  // buffer it overwrites.
  void start_sum(float* data, int64_t n) override {
    reserve(sum_gather_values(ranks_, n, chunk_));
    cuda::rt::event_record(ready_, compute_);
    cuda::rt::stream_wait_event(comm_stream_, ready_);
    if (started_ == timings_.size()) timings_.push_back({timing_event(), timing_event()});
    const Timing& t = timings_[started_++];
    cuda_check(cudaEventRecord(t.begin, comm_stream_), "cudaEventRecord");
    for (const SumRound& r : sum_rounds(n, chunk_)) {
      check(ncclAllGather(data + r.offset, gathered_, size_t(r.count), ncclFloat, nccl_, comm_stream_),
            "ncclAllGather");
      cuda::sum_parts_in_order(data + r.offset, gathered_, ranks_, r.count, comm_stream_);
    }
    cuda_check(cudaEventRecord(t.end, comm_stream_), "cudaEventRecord");
  }

  // The host waits for the sum stream, so whatever the backend queues after it comes after the sums.
  double finish_sums() override {
    cuda::rt::stream_synchronize(comm_stream_);
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(nccl_, &async), "ncclCommGetAsyncError");
    check(async, "ncclAllGather (completed with an error)");
    double seconds = 0;
    for (size_t i = 0; i < started_; ++i) {
      float ms = 0;
      cuda_check(cudaEventElapsedTime(&ms, timings_[i].begin, timings_[i].end), "cudaEventElapsedTime");
      seconds += 1e-3 * double(ms);
    }
    started_ = 0;
    return seconds;
  }

  std::string describe() const override {
    return "NCCL " + version_ +
           " all-gather + rank-order add on the device (cuda:" + std::to_string(device_) + ", " +
           std::to_string(chunk_) + " values a rank a round)";
  }

 private:
  struct Timing {
    cudaEvent_t begin, end;
  };

  // A gather buffer of `need` values at least. The buffer is kept across sums: every step's sums
  // are the same, so it is made once; sums still queued on the old one finish first.
  void reserve(int64_t need) {
    if (need <= capacity_) return;
    cuda::rt::stream_synchronize(comm_stream_);
    if (gathered_) cuda::rt::device_free(gathered_);
    gathered_ = nullptr;
    gathered_ = static_cast<float*>(
        cuda::rt::device_alloc(size_t(need) * sizeof(float), "the NCCL gradient sum's gathered ranks"));
    capacity_ = need;
  }
  cudaEvent_t timing_event() const {
    cudaEvent_t e = nullptr;
    cuda_check(cudaEventCreate(&e), "cudaEventCreate");
    return e;
  }
  void cuda_check(cudaError_t r, const char* what) const {
    TF_CHECK(r == cudaSuccess, "CUDA: ", what, " for the NCCL sum on rank ", rank_, " (cuda:", device_,
             "): ", cudaGetErrorString(r));
  }
  void check(ncclResult_t r, const char* what) const {
    if (r == ncclSuccess) return;
    const char* last = ncclGetLastError(nccl_);  // NCCL's own detail, whatever the communicator
    TF_FAIL("NCCL: ", what, " on rank ", rank_, " of ", ranks_, " (cuda:", device_,
            "): ", ncclGetErrorString(r), last && *last ? std::string(": ") + last : std::string());
  }

  int ranks_, rank_, device_;
  cuda::rt::StreamHandle compute_;  // the backend's, where the gradients are made
  cudaStream_t comm_stream_ = nullptr;
  cuda::rt::EventHandle ready_ = nullptr;  // the compute stream's point a sum waits for
  std::vector<Timing> timings_;            // begin and end of each sum started, reused
  size_t started_ = 0;
  int64_t chunk_;
  ncclComm_t nccl_ = nullptr;
  std::string version_;
  float* gathered_ = nullptr;  // ranks x the longest round, device memory outside the backend's arena
  int64_t capacity_ = 0;
};

}  // namespace

std::string nccl_refusal(Backend& be, int* device) {
  cuda::rt::StreamHandle stream = nullptr;
  if (!cuda::compute_stream(be, device, &stream))
    return "the " + be.name() + " backend is not a GPU, and NCCL sums in a GPU's memory";
  return "";
}

std::unique_ptr<DeviceSum> nccl_sum(Communicator& comm, Backend& be, int64_t chunk) {
  int device = 0;
  cuda::rt::StreamHandle stream = nullptr;
  TF_CHECK(cuda::compute_stream(be, &device, &stream), "an NCCL sum on the ", be.name(),
           " backend, which is not a GPU");
  return std::make_unique<NcclSum>(comm, device, stream, chunk);
}

}  // namespace tf::dist
