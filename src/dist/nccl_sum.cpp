// defines: the NCCL device sum (built only with TIGHTFIT_NCCL): each round ncclAllGather of every
// rank's values into a device buffer, then a kernel adding the ranks' values in rank order, both
// queued on the backend's compute stream; MPI serves only the start-up
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
      : ranks_(comm.size()),
        rank_(comm.rank()),
        device_(device),
        stream_(static_cast<cudaStream_t>(stream)),
        chunk_(chunk) {
    TF_CHECK(chunk >= 1, "an NCCL sum in rounds of ", chunk, " values");
    cuda::rt::set_device(device_);
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
  }
  NcclSum(const NcclSum&) = delete;
  NcclSum& operator=(const NcclSum&) = delete;

  void all_reduce_sum(float* data, int64_t n) override {
    const int64_t need = sum_gather_values(ranks_, n, chunk_);
    if (need > capacity_) {
      // The buffer is kept across sums: every step's sum is the same length, so it is made once.
      if (gathered_) cuda::rt::device_free(gathered_);
      gathered_ = nullptr;
      gathered_ = static_cast<float*>(
          cuda::rt::device_alloc(size_t(need) * sizeof(float), "the NCCL gradient sum's gathered ranks"));
      capacity_ = need;
    }
    // Each round's gather and add are queued behind the ops that made the gradients, and the next
    // round's gather behind this round's add, which reads the buffer it overwrites.
    for (const SumRound& r : sum_rounds(n, chunk_)) {
      check(ncclAllGather(data + r.offset, gathered_, size_t(r.count), ncclFloat, nccl_, stream_),
            "ncclAllGather");
      cuda::sum_parts_in_order(data + r.offset, gathered_, ranks_, r.count, stream_);
    }
    cuda::rt::stream_synchronize(stream_);
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(nccl_, &async), "ncclCommGetAsyncError");
    check(async, "ncclAllGather (completed with an error)");
  }

  std::string describe() const override {
    return "NCCL " + version_ +
           " all-gather + rank-order add on the device (cuda:" + std::to_string(device_) + ", " +
           std::to_string(chunk_) + " values a rank a round)";
  }

 private:
  void check(ncclResult_t r, const char* what) const {
    if (r == ncclSuccess) return;
    const char* last = ncclGetLastError(nccl_);  // NCCL's own detail, whatever the communicator
    TF_FAIL("NCCL: ", what, " on rank ", rank_, " of ", ranks_, " (cuda:", device_,
            "): ", ncclGetErrorString(r), last && *last ? std::string(": ") + last : std::string());
  }

  int ranks_, rank_, device_;
  cudaStream_t stream_;
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
