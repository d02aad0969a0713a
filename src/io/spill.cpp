// defines: the spill file of per-layer base weights converted at load (tf::io::SpillFile and its
// sizes)
#include "src/io/spill.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string_view>

#include "kernels/cpu/ref/quantize.h"
#include "src/core/error.h"

namespace tf::io {

namespace {

uint64_t align_up(uint64_t n) {
  return (n + kSpillAlign - 1) / kSpillAlign * kSpillAlign;
}

std::string size_text(uint64_t bytes) {
  char s[48];
  std::snprintf(s, sizeof s, "%.1f MiB (%llu bytes)", double(bytes) / double(1 << 20),
                static_cast<unsigned long long>(bytes));
  return s;
}

std::string dir_of(const std::string& path) {
  const std::filesystem::path p = std::filesystem::path(path).parent_path();
  return p.empty() ? "." : p.string();
}

// A default_spill_path name: "tightfit-spill-<digits>-<digits>.bin".
bool is_spill_name(const std::string& name) {
  static constexpr std::string_view kPrefix = "tightfit-spill-", kSuffix = ".bin";
  if (name.size() <= kPrefix.size() + kSuffix.size() || !name.starts_with(kPrefix) ||
      !name.ends_with(kSuffix))
    return false;
  const std::string_view mid =
      std::string_view(name).substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  const size_t dash = mid.find('-');
  if (dash == 0 || dash == std::string_view::npos || dash + 1 == mid.size()) return false;
  for (size_t i = 0; i < mid.size(); ++i)
    if (i != dash && (mid[i] < '0' || mid[i] > '9')) return false;
  return true;
}

}  // namespace

bool remove_if_stale_spill_file(const std::string& path) {
  // O_NOFOLLOW and the checks below: only a regular file of ours, never what a link points at.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return false;
  struct stat st {};
  char head[sizeof kSpillMagic - 1];
  bool stale = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
               ::pread(fd, head, sizeof head, 0) == ssize_t(sizeof head) &&
               std::memcmp(head, kSpillMagic, sizeof head) == 0 &&
               // A run holds its spill file's lock from creation to removal; one that can be taken
               // is the file of a process that is gone.
               ::flock(fd, LOCK_EX | LOCK_NB) == 0;
  // Still the same file at the path, under the lock: nobody can have replaced it since.
  struct stat now {};
  stale = stale && ::lstat(path.c_str(), &now) == 0 && now.st_dev == st.st_dev && now.st_ino == st.st_ino &&
          ::unlink(path.c_str()) == 0;
  ::close(fd);
  return stale;
}

std::vector<std::string> remove_stale_spill_files(const std::string& dir) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (is_spill_name(name) && remove_if_stale_spill_file(it->path().string()))
      removed.push_back(it->path().string());
  }
  return removed;
}

std::optional<uint64_t> disk_free_bytes(const std::string& dir) {
  struct statvfs st {};
  if (::statvfs(dir.c_str(), &st) != 0) return std::nullopt;
  return uint64_t(st.f_bavail) * uint64_t(st.f_frsize);
}

std::string default_spill_path(const std::string& dir) {
  static std::atomic<unsigned> count{0};
  return (std::filesystem::path(dir) /
          ("tightfit-spill-" + std::to_string(::getpid()) + "-" + std::to_string(count++) + ".bin"))
      .string();
}

std::array<uint64_t, 3> spill_parts(const WeightRef& w) {
  const int64_t n = w.rows * w.cols;
  std::array<uint64_t, 3> p{uint64_t(dtype_bytes(w.dtype, n)), 0, 0};
  if (w.dtype == DType::NF4 || w.dtype == DType::INT8) {
    const int64_t blocks = ref::quant_blocks(n, dtype_block_elems(w.dtype));
    p[1] = uint64_t(blocks) * (w.scales.nested ? 1 : sizeof(float));
    if (w.scales.nested) p[2] = uint64_t(ref::quant_blocks(blocks, kNf4NestedBlock)) * sizeof(float);
  }
  return p;
}

uint64_t spilled_bytes(const WeightRef& stored) {
  uint64_t n = 0;
  for (uint64_t part : spill_parts(stored)) n += align_up(part);
  return n;
}

uint64_t spill_bytes(const LlamaWeights& source, QuantMode quant) {
  // NF4 conversions always double-quantize their absmax (store_weight); this marks it for the sizes.
  static const float nested = 0.0f;
  uint64_t n = 0;
  LlamaWeights::for_each_slot(source.config, [&](WeightSlot s, int layer) {
    if (!is_layer_slot(s)) return;
    const WeightRef& r = source.slot(s, layer);
    const DType to = stored_dtype(r.dtype, is_matrix_slot(s) ? quant : QuantMode::None);
    if (to == r.dtype) {
      if (kept_in_memory(source, r)) n += spilled_bytes(r);
      return;
    }
    WeightRef converted(nullptr, to, r.rows, r.cols);
    if (to == DType::NF4) converted.scales.nested = &nested;
    n += spilled_bytes(converted);
  });
  return n ? kSpillAlign + n : 0;
}

SpillFile::SpillFile(const SpillOptions& options, uint64_t bytes) : path_(options.path), bytes_(bytes) {
  TF_CHECK(!path_.empty() && bytes > 0, "a spill file needs a path and a size");
  const std::string dir = dir_of(path_);
  // Before the free-space check: what a killed run left takes space that this one may need.
  for (const std::string& stale : remove_stale_spill_files(dir))
    std::fprintf(stderr, "note: %s: removed the spill file of a tightfit that ended without removing it\n",
                 stale.c_str());
  const std::optional<uint64_t> free = options.free_bytes ? options.free_bytes(dir) : disk_free_bytes(dir);
  TF_CHECK(free, dir, ": cannot read the free space of the directory the base converted at load is ",
           "written to for --weights disk (does it exist?)");
  TF_CHECK(*free >= bytes, dir, ": the base converted at load needs ", size_text(bytes),
           " of disk for its spill file (", path_, ") to be streamed from under --weights disk, but only ",
           size_text(*free),
           " are free there; free space, choose another directory with --spill-dir, or keep the weights "
           "in memory (--weights resident)");
  // O_EXCL: a file at the path, whoever made it, is never truncated or overwritten.
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd_ < 0 && errno == EEXIST && options.replace_stale && remove_if_stale_spill_file(path_)) {
    std::fprintf(stderr, "note: %s: removing the spill file a run that did not finish left behind\n",
                 path_.c_str());
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  }
  TF_CHECK(fd_ >= 0 || errno != EEXIST, path_,
           ": exists; tightfit writes the base converted at load to a spill file of its own and never "
           "overwrites a file it did not create. Remove it if a run that was killed left it behind, or "
           "choose another directory with --spill-dir");
  TF_CHECK(fd_ >= 0, path_,
           ": cannot create the spill file of the base converted at load: ", std::strerror(errno));
  // Taken before the file holds its marker, so that no sweep ever sees it marked and unlocked while
  // this process lives; the lock goes with the descriptor, closed after the file is removed.
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd_);
    ::unlink(path_.c_str());
    TF_FAIL(path_, ": cannot lock the spill file just created: ", std::strerror(err));
  }
  std::array<char, kSpillAlign> header{};
  std::memcpy(header.data(), kSpillMagic, sizeof kSpillMagic - 1);
  try {
    write_at(header.data(), header.size(), 0, "the header");
  } catch (const Error&) {
    // The destructor does not run for an object never made: the file goes here.
    ::close(fd_);
    ::unlink(path_.c_str());
    throw;
  }
  end_ = kSpillAlign;
}

void SpillFile::write_at(const void* data, uint64_t bytes, uint64_t offset, const std::string& what) {
  const auto* p = static_cast<const char*>(data);
  for (uint64_t done = 0; done < bytes;) {
    const ssize_t n = ::pwrite(fd_, p + done, size_t(bytes - done), off_t(offset + done));
    if (n < 0 && errno == EINTR) continue;
    TF_CHECK(n > 0, path_, ": writing ", what,
             " of the spill file: ", n < 0 ? std::strerror(errno) : "nothing written");
    done += uint64_t(n);
  }
}

SpillFile::~SpillFile() {
  if (map_) ::munmap(map_, size_t(end_));
  ::close(fd_);
  ::unlink(path_.c_str());
}

void SpillFile::write(WeightSlot slot, int layer, const WeightRef& stored, const std::string& name) {
  Written wr{slot, layer, WeightRef(nullptr, stored.dtype, stored.rows, stored.cols, stored.scales), {}};
  const std::array<uint64_t, 3> parts = spill_parts(stored);
  const std::array<const void*, 3> data{stored.data, stored.scales.absmax, stored.scales.nested};
  TF_CHECK(end_ + spilled_bytes(stored) <= bytes_, path_, ": tensor ", name,
           " does not fit the spill file as planned (", bytes_, " bytes)");
  const uint64_t begin = end_;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == 0) continue;
    wr.offsets[i] = end_;
    write_at(data[i], parts[i], end_, "tensor " + name);
    end_ += align_up(parts[i]);
  }
  // Written out and dropped from the page cache, a tensor at a time: the cache must not be what
  // holds the converted model either.
  TF_CHECK(::fdatasync(fd_) == 0, path_, ": writing tensor ", name,
           " converted at load: ", std::strerror(errno));
  ::posix_fadvise(fd_, off_t(begin), off_t(end_ - begin), POSIX_FADV_DONTNEED);
  written_.push_back(wr);
}

void SpillFile::attach(const std::shared_ptr<SpillFile>& self, LlamaWeights& w) {
  SpillFile& f = *self;
  TF_CHECK(f.end_ == f.bytes_, f.path_, ": the spill file holds ", f.end_, " bytes, planned ", f.bytes_);
  // The last part's padding, so that every aligned read lies inside the file.
  TF_CHECK(::ftruncate(f.fd_, off_t(f.end_)) == 0, f.path_, ": ", std::strerror(errno));
  f.map_ = ::mmap(nullptr, size_t(f.end_), PROT_READ, MAP_SHARED, f.fd_, 0);
  if (f.map_ == MAP_FAILED) {
    f.map_ = nullptr;
    TF_FAIL(f.path_, ": cannot map the spill file: ", std::strerror(errno));
  }
  const auto* base = static_cast<const std::byte*>(f.map_);
  for (const Written& wr : f.written_) {
    WeightRef r = wr.ref;
    r.data = base + wr.offsets[0];
    if (r.scales.absmax) r.scales.absmax = base + wr.offsets[1];
    if (r.scales.nested) r.scales.nested = reinterpret_cast<const float*>(base + wr.offsets[2]);
    w.slot(wr.slot, wr.layer) = r;
  }
  w.files.push_back(MappedFile::of(f.path_, f.map_, 0, f.end_));
  w.keepalive.push_back(self);
}

bool kept_in_memory(const LlamaWeights& source, const WeightRef& src) {
  return source.owns(src.data) || source.owns(src.scales.absmax) || source.owns(src.scales.nested);
}

WeightRef store_layer_weight(const LlamaWeights& source, const WeightRef& src, QuantMode mode,
                             LlamaWeights& w, const std::string& name, SpillFile* spill, WeightSlot slot,
                             int layer) {
  if (!spill || !is_layer_slot(slot)) return store_weight(src, mode, w, name);
  // The converted copy lives in `own` only until it is written.
  LlamaWeights own;
  const WeightRef stored = store_weight(src, mode, own, name);
  if (stored.data == src.data && !kept_in_memory(source, src)) return src;
  spill->write(slot, layer, stored, name);
  return WeightRef(nullptr, stored.dtype, stored.rows, stored.cols);
}

}  // namespace tf::io
