// defines: helpers shared by test files: a per-test temporary directory, the message of the
// tf::Error a call throws, and the pages of a range this process has mapped in.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "src/core/error.h"

namespace tf::test {

// A fresh directory for the running test, removed afterwards. Named after the suite, the test and
// the process, so tests that ctest runs side by side never share one.
struct TempDir {
  std::filesystem::path dir;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name =
        std::string("tf-") + info->test_suite_name() + "-" + info->name() + "-" + std::to_string(::getpid());
    std::replace(name.begin(), name.end(), '/', '_');  // parameterized names hold a '/'
    dir = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~TempDir() { std::filesystem::remove_all(dir); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string str() const { return dir.string(); }
};

// The message of the tf::Error that fn throws, or "(no error)" when it returns.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Pages of [p, p + bytes) that this process has mapped in (/proc/self/pagemap's present bit).
inline size_t present_pages(const void* p, size_t bytes) {
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const int fd = ::open("/proc/self/pagemap", O_RDONLY);
  EXPECT_GE(fd, 0);
  size_t present = 0;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) / page,
                  last = (reinterpret_cast<uintptr_t>(p) + bytes - 1) / page;
  for (uintptr_t v = first; v <= last; ++v) {
    uint64_t entry = 0;
    EXPECT_EQ(::pread(fd, &entry, sizeof entry, off_t(v * sizeof entry)), ssize_t(sizeof entry));
    present += (entry >> 63) & 1;
  }
  ::close(fd);
  return present;
}

}  // namespace tf::test
