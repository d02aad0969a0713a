// defines: tests of src/dist: the rank-order sum against a plain loop, the single-process
// communicator (its all-gather's size checks too), and the MPI communicator's collectives on three ranks
// (this test binary re-run under mpirun)
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/dist/comm.h"
#include "tests/mpi_test_util.h"

namespace {

using namespace tf;

// Values whose float sum depends on the order: 1e8 + 1 rounds back to 1e8 in float (the spacing of
// floats there is 8), so only rank order ((1e8 + -1e8) + 1) gives 1; any other order gives 0 or 2.
std::vector<float> order_sensitive(int rank, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float big = 1e8f * float(1 + i % 5);
    v[size_t(i)] = rank == 0 ? big : rank == 1 ? -big : 1.0f + float(i % 3);
  }
  return v;
}

TEST(Dist, RankOrderSumAddsRanksLeftToRight) {
  const int ranks = 3;
  const int64_t n = 7;
  std::vector<float> gathered;
  for (int r = 0; r < ranks; ++r) {
    const std::vector<float> v = order_sensitive(r, n);
    gathered.insert(gathered.end(), v.begin(), v.end());
  }
  std::vector<float> out(static_cast<size_t>(n));
  dist::sum_in_rank_order(gathered.data(), ranks, n, out.data());
  for (int64_t i = 0; i < n; ++i) {
    float want = gathered[size_t(i)];
    for (int r = 1; r < ranks; ++r) want += gathered[size_t(r * n + i)];
    EXPECT_EQ(out[size_t(i)], want) << i;
    EXPECT_EQ(out[size_t(i)], 1.0f + float(i % 3)) << i;
  }
  std::vector<double> gd = {0.1, 0.2, 0.3, 1e300, -1e300, 0.4};
  std::vector<double> od(2);
  dist::sum_in_rank_order(gd.data(), 3, 2, od.data());
  EXPECT_EQ(od[0], (0.1 + 0.3) + -1e300);
  EXPECT_EQ(od[1], (0.2 + 1e300) + 0.4);
}

TEST(Dist, SingleProcessCollectivesAreTheIdentity) {
  const auto c = dist::single_process();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  std::vector<float> f = {1.5f, -2.0f};
  c->all_reduce_sum(std::span(f));
  EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f}));
  std::vector<int64_t> k = {7};
  c->all_reduce_sum(std::span(k));
  EXPECT_EQ(k[0], 7);
  EXPECT_EQ(dist::broadcast_string(*c, "rank zero"), "rank zero");
  EXPECT_TRUE(dist::broadcast_flag(*c, true));
  EXPECT_FALSE(dist::any_rank(*c, false));
  c->barrier();
  EXPECT_THROW(c->abort("stop"), Error);
}

TEST(Dist, SingleProcessAllGatherCopiesItsShareAndRefusesAWrongBuffer) {
  const auto c = dist::single_process();
  const std::vector<std::byte> mine = {std::byte{1}, std::byte{2}, std::byte{3}};
  std::vector<std::byte> all(3);
  c->all_gather(std::span(mine), std::span(all));
  EXPECT_EQ(all, mine);
  std::vector<std::byte> short_buffer(2);
  try {
    c->all_gather(std::span(mine), std::span(short_buffer));
    ADD_FAILURE() << "an all-gather of 3 bytes into 2 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("into a buffer of 2 bytes (1 x 3 expected)"), std::string::npos)
        << e.what();
  }
  // A share whose product with the rank count overflows size_t is refused before any copy.
  EXPECT_THROW(dist::check_gather_sizes(SIZE_MAX / 2 + 1, 0, 2), Error);
  EXPECT_THROW(dist::check_gather_sizes(4, 7, 2), Error);
  EXPECT_NO_THROW(dist::check_gather_sizes(4, 8, 2));
}

// Rank r's share of a gather test: n bytes, each naming its rank and position.
std::vector<std::byte> gather_share(int rank, size_t n) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(uint8_t(rank * 89 + int(i % 251)));
  return v;
}

constexpr const char* kChildTest = "DistMpi.CollectivesOnThreeRanks";

// Runs on each rank when this binary is started by mpirun (below): every collective, each rank
// checking what it received. A failure exits non-zero, which mpirun reports.
void check_collectives_on_this_rank() {
  const auto c = dist::launch();
  ASSERT_EQ(c->size(), 3);
  const int rank = c->rank();
  // Longer than one gather round (2^20 values), so the chunks' boundaries are covered too.
  const int64_t n = (int64_t(1) << 20) + 5;
  std::vector<float> f = order_sensitive(rank, n);
  c->all_reduce_sum(std::span(f));
  for (int64_t i = 0; i < n; ++i)
    if (f[size_t(i)] != 1.0f + float(i % 3))
      FAIL() << "rank " << rank << ": element " << i << " is " << f[size_t(i)];
  std::vector<double> d = {rank == 0 ? 1e300 : rank == 1 ? -1e300 : 0.5};
  c->all_reduce_sum(std::span(d));
  EXPECT_EQ(d[0], 0.5);
  std::vector<int64_t> k = {int64_t(rank) << 40, 1};
  c->all_reduce_sum(std::span(k));
  EXPECT_EQ(k[0], int64_t(3) << 40);
  EXPECT_EQ(k[1], 3);
  EXPECT_EQ(dist::broadcast_string(*c, rank == 0 ? "from rank 0" : "not this"), "from rank 0");
  EXPECT_EQ(dist::broadcast_flag(*c, rank == 0), true);
  EXPECT_TRUE(dist::any_rank(*c, rank == 2));
  EXPECT_FALSE(dist::any_rank(*c, false));
  // An odd share, so that no rank's bytes start on an aligned offset of the gathered buffer.
  const size_t share = 1000003;
  const std::vector<std::byte> mine = gather_share(rank, share);
  std::vector<std::byte> all(3 * share);
  c->all_gather(std::span(mine), std::span(all));
  for (int r = 0; r < 3; ++r) {
    const std::vector<std::byte> want = gather_share(r, share);
    for (size_t i = 0; i < share; ++i)
      if (all[size_t(r) * share + i] != want[i])
        FAIL() << "rank " << rank << ": byte " << i << " of rank " << r << "'s share differs";
  }
  std::vector<std::byte> wrong(3 * share - 1);
  EXPECT_THROW(c->all_gather(std::span(mine), std::span(wrong)), Error);
  c->barrier();
}

TEST(DistMpi, CollectivesOnThreeRanks) {
  if (!dist::mpi_built())
    GTEST_SKIP() << "this build has no MPI (TIGHTFIT_MPI=OFF or no MPI found): no ranks to run";
  if (dist::launcher_size() > 0) {
    check_collectives_on_this_rank();
    return;
  }
  test::rerun_under_mpirun(3, kChildTest);
}

TEST(DistMpi, ABuildWithoutMpiRefusesAnMpiLaunch) {
  if (dist::mpi_built())
    GTEST_SKIP() << "this build has MPI, so an MPI launch is accepted (DistMpi.CollectivesOnThreeRanks)";
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  try {
    dist::launch();
    ADD_FAILURE() << "launch() accepted 2 ranks without MPI";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("built without MPI support"), std::string::npos) << e.what();
  }
  unsetenv("OMPI_COMM_WORLD_SIZE");
}

}  // namespace
