// defines: reading /proc/self/status and glibc's allocator policy (tf::process_memory,
// set_memory_policy, release_free_memory)
#include "src/core/process_memory.h"

#include <malloc.h>
#include <sys/prctl.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include "src/core/error.h"

namespace tf {

namespace {

// The value of "Name:   1234 kB" in bytes, or nothing when the line is another field.
std::optional<uint64_t> field_bytes(std::string_view line, std::string_view name, std::string_view where) {
  if (line.size() <= name.size() || line.substr(0, name.size()) != name || line[name.size()] != ':')
    return std::nullopt;
  std::string_view rest = line.substr(name.size() + 1);
  while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\t')) rest.remove_prefix(1);
  uint64_t kib = 0;
  size_t digits = 0;
  while (digits < rest.size() && rest[digits] >= '0' && rest[digits] <= '9') {
    TF_CHECK(kib <= (UINT64_MAX >> 10) / 10, where, ": ", name, " overflows: ", line);
    kib = kib * 10 + uint64_t(rest[digits] - '0');
    ++digits;
  }
  TF_CHECK(digits > 0 && rest.substr(digits) == " kB", where, ": ", name, " is not a count of kB: ", line);
  return kib << 10;
}

}  // namespace

ProcessMemory parse_process_status(std::string_view text, std::string_view where) {
  ProcessMemory m;
  struct Field {
    std::string_view name;
    uint64_t* dst;
    bool seen;
  } fields[] = {{"VmRSS", &m.rss, false},
                {"VmHWM", &m.peak_rss, false},
                {"RssAnon", &m.rss_anon, false},
                {"RssFile", &m.rss_file, false}};
  while (!text.empty()) {
    const size_t end = text.find('\n');
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
    for (Field& f : fields) {
      if (const std::optional<uint64_t> v = field_bytes(line, f.name, where)) {
        *f.dst = *v;
        f.seen = true;
      }
    }
  }
  for (const Field& f : fields) TF_CHECK(f.seen, where, ": has no ", f.name, " line");
  return m;
}

ProcessMemory process_memory() {
  const char* path = "/proc/self/status";
  std::ifstream in(path);
  TF_CHECK(in, path, ": cannot read the process's memory use: ", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return parse_process_status(text.str(), path);
}

void set_memory_policy() {
  // mallopt returns 0 on failure; either setting refused would leave RSS following glibc's
  // dynamic heuristics, which the memory planner cannot predict.
  TF_CHECK(mallopt(M_MMAP_THRESHOLD, int(kMmapThreshold)) == 1, "mallopt(M_MMAP_THRESHOLD, ", kMmapThreshold,
           ") failed");
  TF_CHECK(mallopt(M_TRIM_THRESHOLD, int(kTrimThreshold)) == 1, "mallopt(M_TRIM_THRESHOLD, ", kTrimThreshold,
           ") failed");
  TF_CHECK(prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0,
           "prctl(PR_SET_THP_DISABLE) failed: ", std::strerror(errno));
}

bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return bool(out);
}

void release_free_memory() {
  malloc_trim(0);
}

}  // namespace tf
