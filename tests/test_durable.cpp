#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/io/durable.h"
#include "tests/test_util.h"

using namespace tf;
using namespace tf::io;
using tf::test::error_of;
using tf::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_plain(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

TEST(AtomicFile, CommitPublishesTheStreamedContentReadableByAll) {
  TempDir tmp;
  const fs::path target = tmp.dir / "out.bin";
  write_plain(target, "old contents");
  {
    AtomicFile f(target.string());
    f.write("new ", 4);
    f.write("", 0);
    f.write("contents", 8);
    // Until commit the target is untouched: a reader meanwhile sees the old file.
    EXPECT_EQ(read_all(target), "old contents");
    f.commit();
  }
  EXPECT_EQ(read_all(target), "new contents");
  EXPECT_EQ(names_in(tmp.dir), std::vector<std::string>{"out.bin"}) << "a temporary file was left behind";
  struct stat st {};
  ASSERT_EQ(::stat(target.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
}

TEST(AtomicFile, DestroyedWithoutCommitLeavesTheOldTargetAndNoTemporary) {
  TempDir tmp;
  const fs::path target = tmp.dir / "out.bin";
  write_plain(target, "old contents");
  {
    AtomicFile f(target.string());
    f.write("partial", 7);
    // The temporary exists beside the target while the write is under way.
    EXPECT_EQ(names_in(tmp.dir).size(), 2u);
  }
  EXPECT_EQ(read_all(target), "old contents");
  EXPECT_EQ(names_in(tmp.dir), std::vector<std::string>{"out.bin"});

  // Nor is a target created when there was none before.
  { AtomicFile f((tmp.dir / "new.bin").string()); }
  EXPECT_EQ(names_in(tmp.dir), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFile, RefusesACommitTwiceOrAWriteAfterCommit) {
  TempDir tmp;
  const std::string target = (tmp.dir / "out.bin").string();
  AtomicFile f(target);
  f.write("x", 1);
  f.commit();
  const std::string twice = error_of([&] { f.commit(); });
  EXPECT_NE(twice.find(target), std::string::npos) << twice;
  EXPECT_NE(twice.find("committed twice"), std::string::npos) << twice;
  const std::string late = error_of([&] { f.write("y", 1); });
  EXPECT_NE(late.find("written after commit"), std::string::npos) << late;
  EXPECT_EQ(read_all(target), "x");
}

TEST(AtomicFile, ATargetInAMissingDirectoryFailsNamingIt) {
  TempDir tmp;
  const std::string target = (tmp.dir / "no" / "such" / "out.bin").string();
  const std::string msg = error_of([&] { AtomicFile f(target); });
  EXPECT_NE(msg.find(target), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot create a temporary file"), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  EXPECT_TRUE(names_in(tmp.dir).empty());
}

TEST(AtomicFile, WriteFileAtomicReplacesTheTarget) {
  TempDir tmp;
  const fs::path target = tmp.dir / "report.md";
  write_file_atomic(target.string(), "first");
  write_file_atomic(target.string(), "second, longer");
  EXPECT_EQ(read_all(target), "second, longer");
  EXPECT_EQ(names_in(tmp.dir), std::vector<std::string>{"report.md"});
  const std::string missing = (tmp.dir / "gone" / "report.md").string();
  const std::string msg = error_of([&] { write_file_atomic(missing, "x"); });
  EXPECT_NE(msg.find(missing), std::string::npos) << msg;
}

TEST(PublishDir, ReplacesTheTargetOnlyWithACompleteDirectory) {
  TempDir tmp;
  const fs::path target = tmp.dir / "out";
  fs::create_directory(target);
  write_plain(target / "old.txt", "old");
  // A fill that fails halfway leaves the old directory as it was and no temporary beside it.
  EXPECT_THROW(publish_dir(target.string(),
                           [](const std::string& staged) {
                             write_plain(fs::path(staged) / "new.txt", "half");
                             throw Error("simulated failure");
                           }),
               Error);
  EXPECT_EQ(names_in(target), std::vector<std::string>{"old.txt"});
  EXPECT_EQ(names_in(tmp.dir), std::vector<std::string>{"out"});

  publish_dir(target.string(), [](const std::string& staged) {
    EXPECT_TRUE(names_in(staged).empty());
    write_plain(fs::path(staged) / "new.txt", "new");
  });
  EXPECT_EQ(names_in(target), std::vector<std::string>{"new.txt"});
  EXPECT_EQ(read_all(target / "new.txt"), "new");
  EXPECT_EQ(names_in(tmp.dir), std::vector<std::string>{"out"});
}

TEST(DirLock, ASecondHolderIsRefusedNamingThePidOfTheFirst) {
  TempDir tmp;
  const std::string path = (tmp.dir / ".lock").string();
  {
    const DirLock first(path, "runs/a", "wait for it");
    // flock locks belong to the open file, so a second open in this process conflicts too.
    const std::string msg = error_of([&] { DirLock second(path, "runs/a", "wait for it"); });
    EXPECT_NE(msg.find("runs/a is in use by another tightfit process (pid " + std::to_string(::getpid()) +
                       "); wait for it"),
              std::string::npos)
        << msg;
  }
  // Released with its holder.
  const DirLock again(path, "runs/a", "wait for it");
  EXPECT_EQ(read_all(path), std::to_string(::getpid()) + "\n");
}

}  // namespace
