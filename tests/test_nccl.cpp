// defines: tests of the device sum of GPU ranks (src/dist/device_sum, src/dist/nccl_sum): the
// rounds a sum is cut into, the GPU each rank drives, the refusals that keep a sum on the host, the
// rank-order add kernel against the host's rank-order sum on the SIMT simulator, and, where a
// machine has two GPUs and the build NCCL, NCCL's sum on two or three ranks (this binary re-run
// under mpirun) against the host's bit for bit
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/sum_parts.h"
#include "src/core/error.h"
#include "src/dist/comm.h"
#include "src/dist/device_sum.h"
#include "src/train/trainer.h"
#include "tests/cuda_test_util.h"
#include "tests/model_test_util.h"
#include "tests/mpi_test_util.h"
#include "tests/op_test_util.h"

#if TIGHTFIT_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using namespace tf;
using namespace tf::test;

// Rank r's values of a sum test: random ones of mixed sign, and at every fourth element values
// whose float sum depends on the order: 1e8 + x rounds back to 1e8 for a small x (floats there are
// 8 apart), so rank order ((1e8 + -1e8) + x) + ... keeps rank 2's x where another order loses it.
std::vector<float> share(int rank, int64_t n) {
  std::vector<float> v = random_floats(size_t(n), 100 + uint64_t(rank), 1.0f + float(rank));
  for (int64_t i = 0; i < n; i += 4) {
    const float big = 1e8f * float(1 + i % 5);
    v[size_t(i)] = rank == 0 ? big : rank == 1 ? -big : v[size_t(i)];
  }
  return v;
}

// Every rank's values one after another, as a gather lays them out.
std::vector<float> gathered(int ranks, int64_t n) {
  std::vector<float> all;
  for (int r = 0; r < ranks; ++r) {
    const std::vector<float> v = share(r, n);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

// The host's rank-order sum of `all`, `ranks` buffers of n values.
std::vector<float> host_sum(const std::vector<float>& all, int ranks, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  dist::sum_in_rank_order(all.data(), ranks, n, out.data());
  return out;
}

// The first element whose bits differ, -1 where none does.
int64_t first_bit_difference(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) return int64_t(i);
  return -1;
}

TEST(DeviceSum, RoundsCoverTheValuesInOrderInBoundedChunks) {
  EXPECT_TRUE(dist::sum_rounds(0, 4).empty());
  const std::vector<dist::SumRound> one = dist::sum_rounds(3, 4);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].offset, 0);
  EXPECT_EQ(one[0].count, 3);
  EXPECT_EQ(dist::sum_rounds(4, 4).size(), 1u);
  for (const int64_t n : {5, 8, 9, 1031}) {
    SCOPED_TRACE(n);
    const std::vector<dist::SumRound> rounds = dist::sum_rounds(n, 4);
    EXPECT_EQ(int64_t(rounds.size()), (n + 3) / 4);
    int64_t next = 0;
    for (const dist::SumRound& r : rounds) {
      EXPECT_EQ(r.offset, next);
      EXPECT_GE(r.count, 1);
      EXPECT_LE(r.count, 4);
      next = r.offset + r.count;
    }
    EXPECT_EQ(next, n);
  }
  EXPECT_THROW(dist::sum_rounds(5, 0), Error);
  EXPECT_THROW(dist::sum_rounds(-1, 4), Error);
  // The gather buffer holds every rank's longest round.
  EXPECT_EQ(dist::sum_gather_values(3, 9, 4), 12);
  EXPECT_EQ(dist::sum_gather_values(3, 2, 4), 6);
  EXPECT_EQ(dist::sum_gather_values(2, 0, 4), 0);
  EXPECT_EQ(dist::sum_gather_values(8, int64_t(1) << 30, dist::kSumChunkValues), 8 * dist::kSumChunkValues);
}

// The launcher's local-rank variables, put back as they were when the test ends.
class LauncherEnv {
 public:
  static constexpr const char* kNames[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
  LauncherEnv() {
    for (const char* name : kNames) {
      const char* v = std::getenv(name);
      saved_.push_back(v ? std::optional<std::string>(v) : std::nullopt);
      unsetenv(name);
    }
  }
  ~LauncherEnv() {
    for (size_t i = 0; i < saved_.size(); ++i) {
      if (saved_[i])
        setenv(kNames[i], saved_[i]->c_str(), 1);
      else
        unsetenv(kNames[i]);
    }
  }

 private:
  std::vector<std::optional<std::string>> saved_;
};

TEST(DeviceSum, EachRankOfAMachineDrivesItsOwnGpu) {
  // The local rank modulo the GPUs; the rank in the run where the launcher gives no local rank.
  EXPECT_EQ(dist::device_for_rank(0, 4, 2), 0);
  EXPECT_EQ(dist::device_for_rank(1, 5, 2), 1);
  EXPECT_EQ(dist::device_for_rank(3, 0, 2), 1);
  EXPECT_EQ(dist::device_for_rank(5, 5, 8), 5);
  EXPECT_EQ(dist::device_for_rank(-1, 3, 2), 1);
  EXPECT_EQ(dist::device_for_rank(-1, 2, 4), 2);
  EXPECT_NE(error_of([] { dist::device_for_rank(0, 1, 0); }).find("rank 1 has no GPU to drive (0 visible)"),
            std::string::npos);

  const LauncherEnv env;
  EXPECT_EQ(dist::launcher_local_rank(), -1);
  setenv("SLURM_LOCALID", "2", 1);
  EXPECT_EQ(dist::launcher_local_rank(), 2);
  // Open MPI's variable first: mpirun inside a Slurm allocation sets both.
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  EXPECT_EQ(dist::launcher_local_rank(), 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "one", 1);
  EXPECT_NE(error_of([] {
              dist::launcher_local_rank();
            }).find("OMPI_COMM_WORLD_LOCAL_RANK=one, which is not a process's index on its machine"),
            std::string::npos);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "-1", 1);
  EXPECT_THROW(dist::launcher_local_rank(), Error);
}

// Two ranks of which the other computes exactly what this one does: every sum doubles (x + x is 2x
// exactly, in float as in double). Counts its float sums and its broadcasts.
class MirroredRanks final : public dist::Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string describe() const override { return "two mirrored ranks in one process (a test)"; }
  void all_reduce_sum(std::span<float> data) override {
    ++float_sums;
    for (float& v : data) v *= 2;
  }
  void all_reduce_sum(std::span<double> data) override {
    for (double& v : data) v *= 2;
  }
  void all_reduce_sum(std::span<int64_t> data) override {
    for (int64_t& v : data) v *= 2;
  }
  void broadcast(std::span<std::byte>, int) override { ++broadcasts; }
  void all_gather(std::span<const std::byte> mine, std::span<std::byte> all) override {
    dist::check_gather_sizes(mine.size(), all.size(), 2);
    for (size_t r = 0; r < 2 && !mine.empty(); ++r)
      std::memcpy(all.data() + r * mine.size(), mine.data(), mine.size());
  }
  void barrier() override {}
  int float_sums = 0, broadcasts = 0;

 protected:
  void abort_ranks(const std::string& message) override { TF_FAIL(message); }
};

// The refusals every rank agrees on before NCCL would start, from each rank's broadcast of where it
// would run.
TEST(DeviceSum, HostMemoryOneProcessAndTheSimulatorSumOnTheHost) {
  std::string why;
  const auto single = dist::single_process();
  EXPECT_FALSE(dist::make_device_sum(*single, cpu_backend(), &why));
  EXPECT_EQ(why, "one process");

  MirroredRanks two;
  EXPECT_FALSE(dist::make_device_sum(two, cpu_backend(), &why));
  EXPECT_EQ(why, "the cpu backend's memory is host memory");
  EXPECT_EQ(two.broadcasts, 2);

  const std::unique_ptr<Backend> simt = make_backend("simt");
  EXPECT_FALSE(dist::make_device_sum(two, *simt, &why));
  EXPECT_EQ(two.broadcasts, 4);
  if (dist::nccl_built())
    EXPECT_EQ(why, "the simt backend is not a GPU, and NCCL sums in a GPU's memory");
  else
    EXPECT_NE(why.find("this tightfit was built without NCCL"), std::string::npos) << why;
  EXPECT_THROW(dist::make_device_sum(two, *simt, &why, 0), Error);
}

TEST(DeviceSum, RanksStartNcclOnlyWithAGpuEachThatAllCanUse) {
  EXPECT_EQ(dist::ranks_gpu_refusal({{true, "a", 0}, {true, "a", 1}, {true, "b", 0}, {true, "b", 1}}), "");
  EXPECT_EQ(dist::ranks_gpu_refusal({{true, "a", 0}, {false, "a", -1}}), "rank 1 cannot sum on its device");
  EXPECT_EQ(dist::ranks_gpu_refusal({{true, "a", 0}, {true, "b", 1}, {true, "a", 1}, {true, "b", 1}}),
            "ranks 1 and 3 both drive cuda:1 on b, and NCCL takes a GPU of its own for each rank (launch at "
            "most as many ranks on a machine as it has GPUs)");
}

// The device sum of the same mirrored ranks: doubles the values where they are, on the backend.
class MirroredDeviceSum final : public dist::DeviceSum {
 public:
  explicit MirroredDeviceSum(Backend& be) : be_(be) {}
  void all_reduce_sum(float* data, int64_t n) override {
    ++calls;
    summed += n;
    ranges.emplace_back(data, n);
    be_.scale_inplace(data, 2.0f, n);
  }
  std::string describe() const override { return "the mirrored ranks' device sum (a test)"; }
  int calls = 0;
  int64_t summed = 0;
  std::vector<std::pair<const float*, int64_t>> ranges;  // of every sum, in order

 private:
  Backend& be_;
};

// Given a device sum, the trainer sums a device backend's gradients with it, where they are, and
// not over the communicator through a host copy; the two give the same steps bit for bit. Overlapped
// with the backward, it starts one sum a block, from the last block down, each block's gradients
// once; after the backward, one sum of them all.
class TrainerDeviceSum : public ::testing::TestWithParam<bool> {};

TEST_P(TrainerDeviceSum, SumsADeviceBackendsGradientsWithTheDeviceSum) {
  const bool overlap = GetParam();
  const LlamaConfig cfg = test::tiny_config(64);
  const std::unique_ptr<Backend> be_host = make_backend("simt"), be_device = make_backend("simt");
  LlamaModel via_host(init_random_weights(cfg, DType::BF16, 42, 0.25f), test::lora_r8(),
                      CheckpointPolicy::PerBlock, 2 * 24, *be_host);
  LlamaModel via_device(init_random_weights(cfg, DType::BF16, 42, 0.25f), test::lora_r8(),
                        CheckpointPolicy::PerBlock, 2 * 24, *be_device);
  TrainConfig tc;
  tc.lr.peak_lr = 1e-2f;
  tc.lr.total_steps = 3;
  tc.overlap_grad_sum = overlap;
  MirroredRanks host_ranks, device_ranks;
  MirroredDeviceSum device_sum(*be_device);
  Trainer th(via_host, tc, &host_ranks), td(via_device, tc, &device_ranks, &device_sum);
  for (int s = 0; s < 3; ++s) {
    const test::BatchData data = test::synthetic_batch(2, 24, cfg.vocab, uint64_t(s), 12, 3);
    const Batch b = data.view(true);
    const StepStats h = th.step({&b, 1}), d = td.step({&b, 1});
    ASSERT_FALSE(h.skipped || d.skipped) << "step " << s;
    EXPECT_EQ(h.loss, d.loss) << "step " << s;
    EXPECT_EQ(h.grad_norm, d.grad_norm) << "step " << s;
    EXPECT_EQ(d.overlapped, overlap);
  }
  const LoraState& lora = via_device.lora();
  const int steps_sums = overlap ? cfg.n_layers : 1;
  ASSERT_EQ(device_sum.calls, 3 * steps_sums);
  EXPECT_EQ(device_sum.summed, 3 * lora.n_params);
  // Each step's sums tile the gradients, the last block's first.
  for (int s = 0; s < 3; ++s) {
    int64_t end = lora.n_params;
    for (int i = 0; i < steps_sums; ++i) {
      const auto [data, n] = device_sum.ranges[size_t(s * steps_sums + i)];
      EXPECT_EQ(data + n - lora.grads.as<float>(), end) << "step " << s << ", sum " << i;
      end -= n;
    }
    EXPECT_EQ(end, 0) << "step " << s;
  }
  EXPECT_EQ(device_ranks.float_sums, 0) << "the gradients went through the host";
  EXPECT_EQ(host_ranks.float_sums, 3);
  const LoraState a = via_host.lora().host_copy(), b = via_device.lora().host_copy();
  ASSERT_EQ(a.n_params, b.n_params);
  EXPECT_EQ(std::memcmp(a.params.as<float>(), b.params.as<float>(), size_t(a.n_params) * sizeof(float)), 0)
      << "the adapters differ";
}

INSTANTIATE_TEST_SUITE_P(DeviceSum, TrainerDeviceSum, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? "Overlapped" : "AfterTheBackward";
                         });

// The kernel the NCCL sum adds the gathered ranks with, on the simulator: the host's rank-order sum
// bit for bit, at lengths around the 128-thread block and for one to five ranks. Rank order matters
// from three ranks on (share()), which the reversed order shows.
TEST(DeviceSum, SumPartsKernelIsTheHostRankOrderSumBitForBit) {
  // The default stream: a simt backend destroyed by an earlier test of this process leaves its own
  // stream, gone with it, as the current one.
  simt_rt::set_current_stream(nullptr);
  for (const int ranks : {1, 2, 3, 5}) {
    for (const int64_t n : {1, 5, 127, 128, 129, 1031}) {
      SCOPED_TRACE(testing::Message() << ranks << " ranks, " << n << " values");
      const std::vector<float> all = gathered(ranks, n);
      const std::vector<float> want = host_sum(all, ranks, n);
      Guarded<float> parts(all, "parts"), out(std::vector<float>(size_t(n), -7.0f), "out");
      simt::sum_parts_in_order(out.get(), parts.get(), ranks, n, simt_rt::current_stream());
      EXPECT_EQ(first_bit_difference(out.download(), want), -1);
      EXPECT_TRUE(out.guards_intact());
      EXPECT_TRUE(parts.guards_intact());
      if (ranks >= 3) {
        std::vector<float> reversed = share(ranks - 1, n);
        for (int r = ranks - 2; r >= 0; --r) {
          const std::vector<float> v = share(r, n);
          for (int64_t i = 0; i < n; ++i) reversed[size_t(i)] += v[size_t(i)];
        }
        EXPECT_NE(first_bit_difference(reversed, want), -1) << "the values do not depend on the order";
      }
    }
  }
  Guarded<float> none(std::vector<float>(1, 3.0f), "none");
  simt::sum_parts_in_order(none.get(), none.get(), 2, 0, simt_rt::current_stream());
  EXPECT_EQ(none.download(), std::vector<float>(1, 3.0f));
  EXPECT_NE(error_of([&] {
              simt::sum_parts_in_order(none.get(), none.get(), 0, 1, simt_rt::current_stream());
            }).find("sum_parts_in_order: 0 parts of 1 values"),
            std::string::npos);
}

// The CUDA devices this process sees, and where there are none the runtime's reason.
int cuda_devices(std::string* why) {
#if TIGHTFIT_HAVE_CUDA
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    *why = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0) *why = "no CUDA device found";
  return n;
#else
  *why = "this tightfit was built without the CUDA backend";
  return 0;
#endif
}

constexpr const char* kChildTest = "NcclSum.IsTheHostRankOrderSumBitForBitOnGpuRanks";

// On each rank under mpirun: NCCL's sum of this rank's share, in rounds of 1000 values and in the
// default rounds, at lengths that end inside a round, on one, and a value past one, against the
// host's rank-order sum of every rank's share and against the MPI sum of a host copy.
void check_device_sum_on_this_rank() {
  const std::unique_ptr<dist::Communicator> comm = dist::launch();
  const int ranks = comm->size(), rank = comm->rank();
  ASSERT_GE(ranks, 2);
  std::string why;
  const int gpus = count_gpus(&why);
  ASSERT_GE(gpus, ranks) << why;
  const int device = dist::device_for_rank(dist::launcher_local_rank(), rank, gpus);
  const std::unique_ptr<Backend> be = make_backend("cuda:" + std::to_string(device));
  const int64_t big = dist::kSumChunkValues;
  const struct {
    int64_t chunk;
    std::vector<int64_t> lengths;
  } cases[] = {{1000, {1, 999, 1000, 1001, 2007, 3000}}, {big, {4097, big, big + 3}}};
  for (const auto& c : cases) {
    const std::unique_ptr<dist::DeviceSum> sum = dist::make_device_sum(*comm, *be, &why, c.chunk);
    ASSERT_TRUE(sum != nullptr) << why;
    for (const int64_t n : c.lengths) {
      SCOPED_TRACE(testing::Message()
                   << "rank " << rank << " of " << ranks << ", " << n << " values in rounds of " << c.chunk);
      const std::vector<float> all = gathered(ranks, n);
      const std::vector<float> want = host_sum(all, ranks, n);
      std::vector<float> mine = share(rank, n);
      DeviceMem mem = be->alloc(size_t(n) * sizeof(float), MemTag::Grads, "the summed share");
      be->upload_n(mem.as<float>(), mine.data(), mine.size());
      sum->all_reduce_sum(mem.as<float>(), n);
      EXPECT_EQ(first_bit_difference(be->download_n(mem.as<float>(), size_t(n)), want), -1);
      comm->all_reduce_sum(std::span(mine));
      EXPECT_EQ(first_bit_difference(mine, want), -1) << "the MPI sum";
    }
  }
  comm->barrier();
}

TEST(NcclSum, IsTheHostRankOrderSumBitForBitOnGpuRanks) {
  if (!dist::nccl_built())
    GTEST_SKIP() << "this build has no NCCL (TIGHTFIT_NCCL=OFF, or no CUDA backend, MPI, nccl.h or libnccl "
                    "at build time): GPU ranks sum on the host";
  if (dist::launcher_size() > 0) {
    check_device_sum_on_this_rank();
    return;
  }
  std::string why;
  const int gpus = cuda_devices(&why);
  if (gpus < 2) GTEST_SKIP() << "needs 2 CUDA devices, found " << gpus << (why.empty() ? "" : ": " + why);
  // Three ranks where there are three GPUs: only from three on does the order of the sum show.
  test::rerun_under_mpirun(gpus >= 3 ? 3 : 2, kChildTest);
}

}  // namespace
