// defines: tf::dist::DeviceSum (the rank-order sum over the ranks of floats in a GPU backend's
// memory, summed there), make_device_sum (NCCL's, where it is built and the backend is a GPU), the
// rounds both device and host sums are cut into, and the GPU each rank of a machine drives
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "src/dist/comm.h"

namespace tf::dist {

// A sum over the ranks of a buffer in a device backend's memory, without a copy to the host: the
// same bits as Communicator::all_reduce_sum of the buffer's host copy (every rank's values added
// in rank order, 0 first, each addition one f32 rounding). Every rank calls it with the same n.
class DeviceSum {
 public:
  virtual ~DeviceSum() = default;
  // In place: data[i] (n floats in the backend's memory) becomes the sum over ranks r = 0..size-1,
  // in that order, of rank r's data[i]. Queued in order with the backend's ops, and returns once
  // the sum is done.
  virtual void all_reduce_sum(float* data, int64_t n) = 0;
  // The sum of data[0, n) as all_reduce_sum gives it, queued behind the backend's ops queued so
  // far; where the sum runs beside the backend's later ops, it returns at once. Every rank starts
  // the same ranges in the same order, and leaves them alone until finish_sums. By default it sums
  // at once.
  virtual void start_sum(float* data, int64_t n);
  // Returns once every sum started since the last call is done and visible to the backend's later
  // ops, with the seconds they worked (by default, the time start_sum took).
  virtual double finish_sums();
  // What sums and where, for the log ("NCCL 2.28.3 all-gather + rank-order add on cuda:0").
  virtual std::string describe() const = 0;

 private:
  double started_seconds_ = 0;
};

// One round of a sum cut into chunks: values [offset, offset + count).
struct SumRound {
  int64_t offset = 0;
  int64_t count = 0;
};
// The rounds of a sum of n values, at most `chunk` each, in order and covering [0, n) once.
std::vector<SumRound> sum_rounds(int64_t n, int64_t chunk);

// Where one rank's device sum would run: whether it can at all, its machine and its GPU.
struct RankGpu {
  bool usable = false;
  std::string host;
  int device = -1;
};
// Why the ranks cannot start one device sum together ("" where they can): a rank that cannot, or
// two ranks driving one GPU of one machine, which NCCL refuses.
std::string ranks_gpu_refusal(const std::vector<RankGpu>& ranks);

// Whether this binary was built with NCCL (TIGHTFIT_NCCL).
bool nccl_built();

// The device sum of this run's ranks for gradients in `be`'s memory: NCCL's, started with MPI
// alone (rank 0's NCCL id broadcast over `comm`) on the device `be` runs on, gathering `chunk`
// values per rank per round. Every rank calls it; where any rank cannot use NCCL (a build without
// it, a backend that is not a GPU, one process, two ranks on one GPU) every rank gets nullptr, with
// the reason in *why, and sums its gradients on the host over `comm`.
std::unique_ptr<DeviceSum> make_device_sum(Communicator& comm, Backend& be, std::string* why,
                                           int64_t chunk = kSumChunkValues);

// This process's index among the ranks on its machine, from its launcher's environment (Open MPI's
// OMPI_COMM_WORLD_LOCAL_RANK, MPICH's MPI_LOCALRANKID, Slurm's SLURM_LOCALID), -1 where none says.
int launcher_local_rank();
// The GPU a rank drives, one per rank of a machine: its local rank (its rank in the run where the
// launcher gives none) modulo the `devices` the process sees.
int device_for_rank(int local_rank, int rank, int devices);

}  // namespace tf::dist
