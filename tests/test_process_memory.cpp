// defines: tests of reading the process's memory from /proc/self/status and of the allocator policy
// that gives freed buffers back to the system
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <string>
#include <vector>

#include "src/core/alloc.h"
#include "src/core/error.h"
#include "src/core/process_memory.h"

using namespace tf;

namespace {

constexpr uint64_t kMiB = uint64_t(1) << 20;

const char* const kStatus =
    "Name:\ttightfit\n"
    "VmPeak:\t  900000 kB\n"
    "VmHWM:\t  524288 kB\n"
    "VmRSS:\t  262144 kB\n"
    "RssAnon:\t  200000 kB\n"
    "RssFile:\t   62000 kB\n"
    "RssShmem:\t     144 kB\n"
    "Threads:\t2\n";

std::string without_line(std::string text, const std::string& name) {
  const size_t at = text.find(name + ":");
  return text.erase(at, text.find('\n', at) + 1 - at);
}

std::string error_of(const std::string& text) {
  try {
    parse_process_status(text, "status");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ProcessMemory, ParsesTheFourFieldsInBytes) {
  const ProcessMemory m = parse_process_status(kStatus, "status");
  EXPECT_EQ(m.peak_rss, uint64_t(524288) << 10);
  EXPECT_EQ(m.rss, uint64_t(262144) << 10);
  EXPECT_EQ(m.rss_anon, uint64_t(200000) << 10);
  EXPECT_EQ(m.rss_file, uint64_t(62000) << 10);
}

TEST(ProcessMemory, NamesAMissingOrMalformedField) {
  for (const char* name : {"VmRSS", "VmHWM", "RssAnon", "RssFile"}) {
    EXPECT_NE(error_of(without_line(kStatus, name)).find(std::string("has no ") + name + " line"),
              std::string::npos)
        << name;
  }
  const std::string bad = error_of(std::string(kStatus) + "VmRSS:\t  12 MB\n");
  EXPECT_NE(bad.find("status: VmRSS is not a count of kB"), std::string::npos) << bad;
  // A field whose name only starts like one of the four is another field.
  EXPECT_EQ(error_of(std::string(kStatus) + "VmRSSx:\tjunk\n"), "");
}

TEST(ProcessMemory, ReadsItsOwnProcess) {
  const ProcessMemory m = process_memory();
  EXPECT_GT(m.rss, 0u);
  EXPECT_GE(m.peak_rss, m.rss);
  EXPECT_GT(m.rss_file, 0u);  // the test binary's own pages at least
  EXPECT_LE(m.rss_anon + m.rss_file, m.rss);
}

// A touched buffer shows in RSS as its size, and freeing it gives it back: under the policy even
// after a larger buffer was freed first, which makes glibc's own dynamic policy raise its mmap
// threshold above the later buffers and keep them, once freed, in a heap that it does not trim.
TEST(ProcessMemory, FreedBuffersLeaveRssUnderThePolicy) {
  set_memory_policy();
  const uint64_t before = process_memory().rss;
  {
    const Buffer b(64 * kMiB, MemTag::Workspace);  // zeroed: every page touched
    const uint64_t held = process_memory().rss;
    // The buffer's pages, plus at most a few pages of the allocator's and the reader's own.
    EXPECT_GE(held, before + 64 * kMiB - kMiB);
    EXPECT_LE(held, before + 64 * kMiB + 2 * kMiB);
  }
  EXPECT_LE(process_memory().rss, before + 2 * kMiB);

  { const Buffer large(16 * kMiB, MemTag::Workspace); }
  {
    std::vector<Buffer> pieces;
    for (int i = 0; i < 3; ++i) pieces.emplace_back(8 * kMiB, MemTag::Workspace);
    EXPECT_GE(process_memory().rss, before + 24 * kMiB - kMiB);
  }
  EXPECT_LE(process_memory().rss, before + 2 * kMiB);
}

// The peak restarts from the current RSS, so a phase's peak can be measured after a larger one.
TEST(ProcessMemory, ThePeakRestartsFromTheCurrentRss) {
  set_memory_policy();
  { const Buffer b(48 * kMiB, MemTag::Workspace); }
  EXPECT_GE(process_memory().peak_rss, process_memory().rss + 40 * kMiB);
  ASSERT_TRUE(reset_peak_rss());
  const ProcessMemory after = process_memory();
  EXPECT_LE(after.peak_rss, after.rss + kMiB);
}

// Memory a process asks for huge pages on gets them where the system offers transparent huge pages
// at all; the policy refuses them, so touching one byte every 2 MiB makes a page resident, not 2 MiB.
TEST(ProcessMemory, TouchedPagesStaySmallUnderThePolicy) {
  set_memory_policy();
  constexpr size_t kBytes = 16 * kMiB;
  void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  madvise(p, kBytes, MADV_HUGEPAGE);
  const uint64_t before = process_memory().rss;
  for (size_t at = 0; at < kBytes; at += 2 * kMiB) static_cast<volatile char*>(p)[at] = 1;
  EXPECT_LE(process_memory().rss, before + kMiB);
  munmap(p, kBytes);
}

TEST(ProcessMemory, ReleaseFreeMemoryTrimsTheHeap) {
  set_memory_policy();
  const uint64_t before = process_memory().rss;
  {
    // Small pieces stay below the mmap threshold: they come from the heap.
    std::vector<std::vector<char>> pieces;
    for (int i = 0; i < 4096; ++i) pieces.emplace_back(8 << 10, char(i));
    EXPECT_GE(process_memory().rss, before + 31 * kMiB);
    // Keeping the last piece keeps the heap's top in use, so free() alone cannot trim below it.
    std::vector<char> last(8 << 10, 1);
    pieces.clear();
    release_free_memory();
    EXPECT_LE(process_memory().rss, before + 2 * kMiB);
    EXPECT_EQ(last[0], 1);
  }
}
