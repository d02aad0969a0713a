// defines: tf::ProcessMemory, process_memory and parse_process_status (the process's resident
// memory as the kernel counts it), set_memory_policy and release_free_memory (the allocator policy
// that makes that memory follow the buffers the process holds)
#pragma once

#include <cstdint>
#include <string_view>

namespace tf {

// Bytes of this process's memory as /proc/self/status reports it.
struct ProcessMemory {
  uint64_t rss = 0;       // VmRSS: resident now
  uint64_t peak_rss = 0;  // VmHWM: the most resident at any time since the process started
  uint64_t rss_anon = 0;  // RssAnon: resident heap, stacks and anonymous mappings
  uint64_t rss_file = 0;  // RssFile: resident pages of mapped files (the binary, libraries, models)
};

// Reads /proc/self/status; a tf::Error when it cannot be read or lacks one of the four fields.
ProcessMemory process_memory();
// Restarts the peak (VmHWM) from the current RSS (writes 5 to /proc/self/clear_refs), for measuring
// the peak of one phase; false where the kernel refuses it.
bool reset_peak_rss();
// The four fields of a /proc/<pid>/status text; `where` names it in errors.
ProcessMemory parse_process_status(std::string_view text, std::string_view where);

// The malloc threshold at and above which set_memory_policy makes glibc map an allocation on its
// own (given back to the system when freed), and the free space at the top of a heap above which
// glibc trims it.
constexpr uint64_t kMmapThreshold = uint64_t(128) << 10;
constexpr uint64_t kTrimThreshold = uint64_t(1) << 20;

// Fixes the allocator policy, once, before anything allocates much (the first call in main): a
// fixed mmap threshold (glibc's own raises it to the largest block freed so far, up to 32 MiB,
// after which buffers of that size come from the heap and stay resident when freed), a low trim
// threshold, and no transparent huge pages (where the system enables them for all memory, a
// buffer's first touch makes 2 MiB resident instead of 4 KiB), so that the process's RSS is the
// pages it touched of what it holds plus a bounded amount.
void set_memory_policy();
// Gives the free pages of glibc's heaps back to the system (malloc_trim): called after phases that
// free much memory in small pieces (parsing a model's metadata, tokenising a dataset).
void release_free_memory();

}  // namespace tf
