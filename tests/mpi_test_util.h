// defines: tf::test::rerun_under_mpirun, which runs one test of this test binary on several ranks
// (mpirun -np N with the binary itself), for tests whose ranks each check their own side
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "src/dist/comm.h"

namespace tf::test {

// Runs this binary under mpirun on `ranks` ranks with --gtest_filter=`test` and expects every rank
// to pass (each rank's failures are in the output above).
inline void rerun_under_mpirun(int ranks, const std::string& test) {
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  char self[4096];
  const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  ASSERT_GT(len, 0);
  self[len] = '\0';
  const std::string launcher = dist::mpiexec(), n = std::to_string(ranks), filter = "--gtest_filter=" + test;
  const pid_t pid = fork();
  if (pid == 0) {
    execl(launcher.c_str(), launcher.c_str(), "-np", n.c_str(), "--oversubscribe", "--mca", "btl",
          "self,vader", self, filter.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFEXITED(st)) << "mpirun ended by signal " << WTERMSIG(st);
  EXPECT_EQ(WEXITSTATUS(st), 0) << "a rank's check failed (its output above)";
}

}  // namespace tf::test
