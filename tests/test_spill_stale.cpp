// defines: tests of the sweep of stale spill files: a tightfit eval killed with SIGKILL while its
// converted base streams from a spill file in --spill-dir leaves the file behind, and the next
// spill file made in that directory removes it; a spill file whose owner is still running (it
// holds the file's flock), a decoy named like a spill file without the marker, and a link named
// like one all stay.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "src/io/model_loader.h"
#include "src/io/spill.h"
#include "tests/cli_test_util.h"
#include "tests/test_util.h"

namespace tf::test {
namespace {

class SpillStale : public Cli {};

// The spill files of `dir` as default_spill_path names them.
std::vector<fs::path> spill_files(const fs::path& dir) {
  std::vector<fs::path> v;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().starts_with("tightfit-spill-")) v.push_back(e.path());
  return v;
}

// A process that holds a marked spill file's lock, as a running tightfit does, until killed. It
// makes only system calls between fork and its end.
pid_t hold_spill_file(const fs::path& path) {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ::flock(fd, LOCK_EX) != 0) _exit(1);
    if (::write(fd, io::kSpillMagic, sizeof io::kSpillMagic - 1) < 0) _exit(1);
    if (::write(ready[1], "k", 1) != 1) _exit(1);
    for (;;) ::pause();
  }
  char c = 0;
  ::close(ready[1]);
  const bool ok = ::read(ready[0], &c, 1) == 1;
  ::close(ready[0]);
  return ok ? pid : -1;
}

TEST_F(SpillStale, AKilledRunsFileIsRemovedAndNothingElse) {
  ASSERT_NO_FATAL_FAILURE(make_model_and_data());
  const fs::path spill = dir_ / "spill";
  fs::create_directories(spill);
  // Enough records that the eval is still running when its spill file is seen.
  {
    std::ofstream data(dir_ / "many.jsonl");
    for (int i = 0; i < 4000; ++i)
      data << nlohmann::json{{"text",
                              "the quick brown fox " + std::to_string(i) + " jumps over the lazy dog"}}
                  .dump()
           << "\n";
  }
  const fs::path decoy = spill / "tightfit-spill-999999-0.bin";
  std::ofstream(decoy) << "not a spill file, though named like one";
  const fs::path elsewhere = dir_ / "marked.bin";
  std::ofstream(elsewhere) << io::kSpillMagic;
  const fs::path link = spill / "tightfit-spill-999999-1.bin";
  fs::create_symlink(elsewhere, link);
  const fs::path held = spill / "tightfit-spill-999998-0.bin";
  const pid_t holder = hold_spill_file(held);
  ASSERT_GT(holder, 0);

  const pid_t eval =
      spawn({"eval", "--model", (dir_ / "model").string(), "--data", (dir_ / "many.jsonl").string(),
             "--quant", "nf4", "--weights", "disk", "--spill-dir", spill.string(), "--threads", "1"},
            dir_ / "eval.out", dir_ / "eval.err");
  const fs::path left = spill / ("tightfit-spill-" + std::to_string(eval) + "-0.bin");
  bool seen = false;
  for (int i = 0; i < 20000 && !seen; ++i) {
    seen = fs::exists(left) && fs::file_size(left) > 0;
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::kill(eval, SIGKILL);
  EXPECT_EQ(wait_status(eval), 128 + SIGKILL) << slurp(dir_ / "eval.err");
  ASSERT_TRUE(seen) << "the eval's spill file never appeared: " << slurp(dir_ / "eval.err");
  ASSERT_TRUE(fs::exists(left)) << "a killed run removes nothing";

  {
    const io::SpillOptions next{io::default_spill_path(spill.string())};
    const io::LoadedModel m = io::load_model((dir_ / "model").string(), true, io::QuantMode::Nf4, &next);
    EXPECT_FALSE(fs::exists(left)) << "the killed run's spill file stayed";
    EXPECT_TRUE(fs::exists(held)) << "a spill file in use was removed";
    EXPECT_TRUE(fs::exists(decoy)) << "a file without the marker was removed";
    EXPECT_EQ(slurp(decoy), "not a spill file, though named like one");
    EXPECT_TRUE(fs::is_symlink(link)) << "a link was removed";
    EXPECT_TRUE(fs::exists(elsewhere));
    EXPECT_TRUE(fs::exists(next.path));
    // A live tightfit's own spill file is locked from its creation: the next one's sweep keeps it.
    const io::SpillOptions other{io::default_spill_path(spill.string())};
    const io::LoadedModel m2 = io::load_model((dir_ / "model").string(), true, io::QuantMode::Int8, &other);
    EXPECT_TRUE(fs::exists(next.path)) << "the spill file of a load still in use was removed";
    EXPECT_TRUE(fs::exists(other.path));
  }
  // The holder gone, its lock went with it: the next spill file's sweep removes its file.
  ::kill(holder, SIGKILL);
  EXPECT_EQ(wait_status(holder), 128 + SIGKILL);
  EXPECT_EQ(io::remove_stale_spill_files(spill.string()), std::vector<std::string>{held.string()});
  EXPECT_FALSE(fs::exists(held));
  EXPECT_TRUE(fs::exists(decoy));
  EXPECT_TRUE(fs::is_symlink(link));
  EXPECT_EQ(spill_files(spill).size(), 2u);
}

// A stale file found by name only where the name is default_spill_path's: other names, even with
// the marker and no lock, are left alone.
TEST(SpillStaleNames, OnlyDefaultSpillNamesAreSwept) {
  TempDir tmp;
  for (const char* name : {"tightfit-spill-1-2.bin.keep", "tightfit-spill--2.bin", "tightfit-spill-1x-2.bin",
                           "base-spill.bin", "tightfit-spill-1-2.bin"})
    std::ofstream(tmp.dir / name) << io::kSpillMagic;
  EXPECT_EQ(io::remove_stale_spill_files(tmp.str()),
            std::vector<std::string>{(tmp.dir / "tightfit-spill-1-2.bin").string()});
  EXPECT_EQ(std::distance(fs::directory_iterator(tmp.dir), fs::directory_iterator()), 4);
}

}  // namespace
}  // namespace tf::test
