// defines: tf::offload::DirectReader (asynchronous reads of byte ranges of one file into aligned
// buffers, around the page cache: io_uring with O_DIRECT where the kernel and file system allow it)
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace tf::offload {

// Reads ranges of one read-only file. A streamed weight is read once per use, so the reads bypass
// the page cache (O_DIRECT): the kernel's cache must not be what holds a model larger than the
// memory budget. Where O_DIRECT is refused (tmpfs, some network file systems) the reads are buffered
// and each range is dropped from the cache after it lands (POSIX_FADV_DONTNEED); where io_uring is
// unavailable (an old kernel, a seccomp filter) one worker thread issues the reads. Every mode
// delivers the same bytes; `mode()` says which one runs.
//
// Reads complete in any order but are waited for by ticket; a read that fails or comes back short
// is a tf::Error naming the file, the range and the reason, raised by wait().
//
// One thread uses a reader: submit(), wait() and drain() are not safe to call concurrently (the
// pread worker is internal). The destructor waits for every read in flight, so no read lands in a
// buffer after its reader is gone; the reader allocates memory in proportion to queue_depth only
// (plus the message of each failed read not yet waited for).
class DirectReader {
 public:
  // Offsets, lengths and destinations of O_DIRECT reads are multiples of this (the largest logical
  // block size of common devices).
  static constexpr size_t kAlign = 4096;

  // Opens `path` for reading; `queue_depth` reads may be in flight at once (submit() past that
  // waits for the oldest). TIGHTFIT_IO=pread forces the worker-thread mode and TIGHTFIT_IO=buffered
  // the cached mode, TIGHTFIT_IO=pread,buffered both, for tests and for file systems that misbehave
  // under O_DIRECT; any other non-empty value is an error.
  explicit DirectReader(const std::string& path, unsigned queue_depth = 64);
  ~DirectReader();
  DirectReader(const DirectReader&) = delete;
  DirectReader& operator=(const DirectReader&) = delete;

  const std::string& path() const;
  uint64_t file_size() const;
  // "io_uring, O_DIRECT", "io_uring, buffered", "pread thread, O_DIRECT", "pread thread, buffered".
  std::string mode() const;

  // Bytes of an aligned buffer that receives [offset, offset + bytes): the range widened to kAlign
  // boundaries on both sides.
  static size_t aligned_span(uint64_t offset, uint64_t bytes);
  // Where the first requested byte lands in that buffer: offset % kAlign.
  static size_t lead(uint64_t offset) { return size_t(offset % kAlign); }
  // The first kAlign boundary at or after `p`: a buffer allocated kAlign bytes larger than its spans
  // holds them from there.
  static std::byte* align_buffer(void* p) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<std::byte*>((a + kAlign - 1) / kAlign * kAlign);
  }

  // Starts reading [offset, offset + bytes) of the file into `dst` (kAlign-aligned, `capacity` >=
  // aligned_span(offset, bytes)); the requested bytes land at dst + lead(offset). The range must lie
  // inside the file. Returns a ticket for wait(). Bytes of the widened span outside the range are
  // unspecified (zero past the end of the file).
  uint64_t submit(uint64_t offset, uint64_t bytes, void* dst, size_t capacity);
  // Returns once the read of `ticket` has landed; raises its error if it failed.
  void wait(uint64_t ticket);
  // Waits for every read submitted so far; raises the error of the first that failed and was not
  // waited for, which stands for every other such failure (they are not raised again).
  void drain();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tf::offload
