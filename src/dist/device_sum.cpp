// defines: the rounds of a sum, make_device_sum (NCCL's where it is built and every rank drives a
// GPU, else the reason the sums stay on the host), and the GPU each rank of a machine drives
#include "src/dist/device_sum.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "src/core/error.h"

#ifdef TIGHTFIT_HAVE_NCCL
#include "src/dist/nccl_sum.h"
#endif

namespace tf::dist {
namespace {

// Why this rank cannot sum in `be`'s memory with NCCL ("" where it can, its GPU in *device).
std::string nccl_refusal_here(Backend& be, int* device) {
#ifdef TIGHTFIT_HAVE_NCCL
  return nccl_refusal(be, device);
#else
  (void)be;
  (void)device;
  return "this tightfit was built without NCCL (TIGHTFIT_NCCL=OFF, or no nccl.h and libnccl at build time)";
#endif
}

// Every rank's RankGpu, each rank's broadcast from it in turn (a few bytes a rank, once a run).
std::vector<RankGpu> exchange_gpus(Communicator& comm, bool usable, int device) {
  struct Seat {
    int32_t usable = 0;
    int32_t device = -1;
    char host[64] = {};
  };
  Seat mine;
  mine.usable = usable ? 1 : 0;
  mine.device = device;
  gethostname(mine.host, sizeof mine.host - 1);
  std::vector<RankGpu> all;
  for (int r = 0; r < comm.size(); ++r) {
    Seat s = r == comm.rank() ? mine : Seat{};
    comm.broadcast(std::as_writable_bytes(std::span(&s, 1)), r);
    s.host[sizeof s.host - 1] = '\0';
    all.push_back({s.usable != 0, s.host, int(s.device)});
  }
  return all;
}

}  // namespace

void DeviceSum::start_sum(float* data, int64_t n) {
  const auto t0 = std::chrono::steady_clock::now();
  all_reduce_sum(data, n);
  started_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double DeviceSum::finish_sums() {
  const double s = started_seconds_;
  started_seconds_ = 0;
  return s;
}

std::vector<SumRound> sum_rounds(int64_t n, int64_t chunk) {
  TF_CHECK(n >= 0 && chunk >= 1, "a sum of ", n, " values in rounds of ", chunk);
  std::vector<SumRound> rounds;
  for (int64_t off = 0; off < n; off += chunk) rounds.push_back({off, std::min(chunk, n - off)});
  return rounds;
}

std::string ranks_gpu_refusal(const std::vector<RankGpu>& ranks) {
  for (size_t r = 0; r < ranks.size(); ++r)
    if (!ranks[r].usable) return "rank " + std::to_string(r) + " cannot sum on its device";
  for (size_t a = 0; a < ranks.size(); ++a)
    for (size_t b = a + 1; b < ranks.size(); ++b)
      if (ranks[a].host == ranks[b].host && ranks[a].device == ranks[b].device)
        return "ranks " + std::to_string(a) + " and " + std::to_string(b) +
               " both drive cuda:" + std::to_string(ranks[a].device) + " on " + ranks[a].host +
               ", and NCCL takes a GPU of its own for each rank (launch at most as many ranks on a "
               "machine as it has GPUs)";
  return "";
}

bool nccl_built() {
#ifdef TIGHTFIT_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

std::unique_ptr<DeviceSum> make_device_sum(Communicator& comm, Backend& be, std::string* why, int64_t chunk) {
  TF_CHECK(chunk >= 1, "a device sum in rounds of ", chunk, " values");
  if (comm.size() == 1) {
    *why = "one process";
    return nullptr;
  }
  int device = -1;
  const std::string mine = be.host_memory() ? "the " + be.name() + " backend's memory is host memory"
                                            : nccl_refusal_here(be, &device);
  // NCCL's start-up is collective: every rank takes it, or none does, as every rank sees from
  // where each would run.
  const std::vector<RankGpu> ranks = exchange_gpus(comm, mine.empty(), device);
  *why = mine.empty() ? ranks_gpu_refusal(ranks) : mine;
  if (!why->empty()) return nullptr;
#ifdef TIGHTFIT_HAVE_NCCL
  return nccl_sum(comm, be, chunk);
#else
  TF_FAIL("no device sum in a build without NCCL, whose every rank refuses it above");
#endif
}

int launcher_local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long r = std::strtol(v, &end, 10);
    TF_CHECK(*end == '\0' && r >= 0 && r < 1 << 20, "the MPI launcher set ", name, "=", v,
             ", which is not a process's index on its machine");
    return int(r);
  }
  return -1;
}

int device_for_rank(int local_rank, int rank, int devices) {
  TF_CHECK(devices >= 1, "rank ", rank, " has no GPU to drive (", devices, " visible)");
  TF_CHECK(rank >= 0, "rank ", rank);
  return (local_rank >= 0 ? local_rank : rank) % devices;
}

}  // namespace tf::dist
