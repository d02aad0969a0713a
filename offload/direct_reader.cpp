// defines: tf::offload::DirectReader's implementation: chunked reads through io_uring or a pread
// worker thread, O_DIRECT with a buffered fallback, short reads resubmitted, EOF and errors raised
// by wait()
#include "offload/direct_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "src/core/error.h"

#if TF_HAVE_URING
#include <liburing.h>
#endif

namespace tf::offload {

namespace {

// Reads are cut into chunks of this size so that one range keeps many reads in flight and a range
// of any size fits io_uring's 32-bit read length. A multiple of kAlign.
constexpr uint64_t kChunk = uint64_t(1) << 20;
// io_uring rings are limited to 32768 entries; a deeper queue than this gains nothing on a disk.
constexpr unsigned kMaxQueueDepth = 4096;

uint64_t align_down(uint64_t x) {
  return x / DirectReader::kAlign * DirectReader::kAlign;
}
uint64_t align_up(uint64_t x) {
  return align_down(x + (DirectReader::kAlign - 1));
}

struct IoChoice {
  bool pread = false;
  bool buffered = false;
};

IoChoice io_choice() {
  const char* env = std::getenv("TIGHTFIT_IO");
  if (env == nullptr || *env == '\0') return {};
  const std::string v = env;
  if (v == "pread") return {true, false};
  if (v == "buffered") return {false, true};
  if (v == "pread,buffered" || v == "buffered,pread") return {true, true};
  TF_FAIL("TIGHTFIT_IO=", v,
          " is not a read mode: expected pread (a worker thread in place of io_uring), buffered (through the "
          "page cache in place of O_DIRECT) or pread,buffered");
}

// Closes the file on every path out of the constructor, errors included.
struct Fd {
  int fd = -1;
  Fd() = default;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// One read in flight: part of a requested range, no longer than kChunk.
struct Chunk {
  uint64_t ticket = 0;
  uint64_t range_begin = 0, range_end = 0;  // the requested range, for messages
  uint64_t begin = 0, end = 0;              // file bytes this chunk fills: aligned, `end` may pass EOF
  uint64_t need = 0;                        // complete once the bytes before this have landed
  uint64_t landed = 0;                      // bytes [begin, landed) have landed
  char* base = nullptr;                     // where byte `begin` lands
  std::string error;

  // O_DIRECT reads start on a block boundary, so a resubmitted short read rereads from the block
  // holding its first missing byte.
  uint64_t read_pos(bool direct) const { return direct ? align_down(landed) : landed; }
};

enum class Step { Done, Again, Failed };

// Accounts for a read of `c` that returned `res` (bytes, or -errno): the chunk is done, needs
// another read for its remaining bytes, or failed with c.error set. Runs on whichever thread
// issued the read.
Step advance(const std::string& path, int fd, bool direct, Chunk& c, int64_t res) {
  if (res == -EINTR || res == -EAGAIN) return Step::Again;
  if (res < 0) {
    c.error = detail::concat(path, ": read of bytes [", c.range_begin, ", ", c.range_end,
                             ") failed: ", std::strerror(int(-res)));
    return Step::Failed;
  }
  const uint64_t pos = c.read_pos(direct);
  const uint64_t reached = pos + uint64_t(res);
  if (reached >= c.need) {
    // What follows is past the end of the file (or outside the range, where it is unspecified).
    if (reached < c.end) std::memset(c.base + (reached - c.begin), 0, size_t(c.end - reached));
    c.landed = reached;
    return Step::Done;
  }
  if (reached > c.landed) {
    c.landed = reached;
    return Step::Again;
  }
  // No byte past those already landed: the file ends inside the range, so it shrank after it was
  // opened. A read that returned nothing knows only that the end is at or before `pos`.
  uint64_t eof = reached;
  struct stat st {};
  if (res == 0 && ::fstat(fd, &st) == 0 && uint64_t(st.st_size) < eof) eof = uint64_t(st.st_size);
  c.error = detail::concat(path, ": read of bytes [", c.range_begin, ", ", c.range_end, ") ended at byte ",
                           eof, ": the file is shorter than the range");
  return Step::Failed;
}

}  // namespace

struct DirectReader::Impl {
  struct Request {
    unsigned chunks_in_flight = 0;
    bool all_issued = false;
    bool abandoned = false;  // submit() failed part way: nobody holds its ticket
    std::string error;       // of its first chunk that failed
    bool complete() const { return all_issued && chunks_in_flight == 0; }
  };

  std::string path;
  uint64_t size = 0;
  Fd file;
  bool direct = true;
  bool uring = false;
  unsigned depth = 0;

  std::vector<Chunk> chunks;             // one slot per read that may be in flight
  std::vector<unsigned> idle;            // slots not in flight
  std::map<uint64_t, Request> requests;  // incomplete, or failed and not yet waited for
  uint64_t next_ticket = 1;
  // Set when the ring itself fails: chunks it holds may never complete, so every later call
  // raises this instead of waiting for them.
  std::string broken;

#if TF_HAVE_URING
  io_uring ring{};
  unsigned prepared = 0;   // read SQEs not yet handed to the kernel
  unsigned in_kernel = 0;  // reads the kernel holds whose completions are not reaped
#endif

  // The pread worker: `queued` holds slots to read, `done` the slots read with their outcome.
  std::thread worker;
  std::mutex mu;
  std::condition_variable work_cv, done_cv;
  std::deque<unsigned> queued;
  std::deque<std::pair<unsigned, Step>> done;
  bool stop = false;

  Impl(const std::string& p, unsigned queue_depth) : path(p), depth(queue_depth) {
    TF_CHECK(queue_depth >= 1 && queue_depth <= kMaxQueueDepth, path, ": a queue depth of ", queue_depth,
             " reads is outside [1, ", kMaxQueueDepth, "]");
    const IoChoice choice = io_choice();
    direct = !choice.buffered;
    file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    if (file.fd < 0 && direct && errno == EINVAL) {
      direct = false;
      file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    }
    TF_CHECK(file.fd >= 0, path, ": cannot open for reading: ", std::strerror(errno));
    struct stat st {};
    TF_CHECK(::fstat(file.fd, &st) == 0, path, ": cannot stat: ", std::strerror(errno));
    TF_CHECK(!S_ISDIR(st.st_mode), path, ": is a directory, not a file to read");
    TF_CHECK(S_ISREG(st.st_mode), path, ": is not a regular file");
    size = uint64_t(st.st_size);
    // Readahead would cache pages past the ranges read, which no DONTNEED of a landed range drops:
    // the chunks in flight are this reader's readahead.
    if (!direct) (void)::posix_fadvise(file.fd, 0, 0, POSIX_FADV_RANDOM);

    chunks.resize(depth);
    idle.reserve(depth);
    for (unsigned i = depth; i-- > 0;) idle.push_back(i);
#if TF_HAVE_URING
    // A container's seccomp filter or a disabled io_uring (EPERM, ENOSYS) leaves the worker thread.
    if (!choice.pread && io_uring_queue_init(depth, &ring, 0) == 0) uring = true;
#endif
    if (!uring) worker = std::thread([this] { work(); });
  }

  ~Impl() {
#if TF_HAVE_URING
    if (uring) {
      // Reads the kernel holds land in their owners' buffers: every one is reaped before the ring
      // goes. SQEs never submitted die with the ring.
      while (in_kernel > 0) {
        io_uring_cqe* cqe = nullptr;
        const int r = io_uring_wait_cqe(&ring, &cqe);
        if (r == -EINTR) continue;
        if (r < 0) break;
        io_uring_cqe_seen(&ring, cqe);
        --in_kernel;
      }
      io_uring_queue_exit(&ring);
      return;
    }
#endif
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
      queued.clear();
    }
    work_cv.notify_one();
    worker.join();  // after the read it is in, if any
  }

  void work() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      work_cv.wait(lock, [this] { return stop || !queued.empty(); });
      if (stop) return;
      const unsigned slot = queued.front();
      queued.pop_front();
      lock.unlock();
      Chunk& c = chunks[slot];
      Step step;
      do {
        const uint64_t pos = c.read_pos(direct);
        const ssize_t r = ::pread(file.fd, c.base + (pos - c.begin), size_t(c.end - pos), off_t(pos));
        step = advance(path, file.fd, direct, c, r < 0 ? -int64_t(errno) : int64_t(r));
      } while (step == Step::Again);
      lock.lock();
      done.emplace_back(slot, step);
      done_cv.notify_one();
    }
  }

  void check_broken() const {
    TF_CHECK(broken.empty(), broken);
  }

  void issue(unsigned slot) {
    if (!uring) {
      {
        std::lock_guard<std::mutex> lock(mu);
        queued.push_back(slot);
      }
      work_cv.notify_one();
      return;
    }
#if TF_HAVE_URING
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe == nullptr) {
      flush();
      sqe = io_uring_get_sqe(&ring);
    }
    TF_CHECK(sqe != nullptr, path, ": the io_uring submission queue is full with ", in_kernel,
             " reads in flight");
    const Chunk& c = chunks[slot];
    const uint64_t pos = c.read_pos(direct);
    io_uring_prep_read(sqe, file.fd, c.base + (pos - c.begin), unsigned(c.end - pos), pos);
    io_uring_sqe_set_data64(sqe, slot);
    ++prepared;
#endif
  }

  // Hands prepared reads to the kernel.
  void flush() {
#if TF_HAVE_URING
    while (prepared > 0) {
      const int r = io_uring_submit(&ring);
      if (r == -EINTR) continue;
      if (r <= 0) {
        broken =
            detail::concat(path, ": io_uring_submit failed: ", r < 0 ? std::strerror(-r) : "no read taken");
        TF_FAIL(broken);
      }
      prepared -= unsigned(r);
      in_kernel += unsigned(r);
    }
#endif
  }

  // A chunk is done or failed: its request learns of it and its slot is free again.
  void finish(unsigned slot, Step step) {
    Chunk& c = chunks[slot];
    if (step == Step::Done && !direct) {
      // Advice only: a file system that ignores it still delivered the bytes.
      (void)::posix_fadvise(file.fd, off_t(c.begin), off_t(c.landed - c.begin), POSIX_FADV_DONTNEED);
    }
    auto it = requests.find(c.ticket);
    Request& req = it->second;
    if (step == Step::Failed && req.error.empty()) req.error = std::move(c.error);
    c.error.clear();
    --req.chunks_in_flight;
    if (req.complete() && (req.error.empty() || req.abandoned)) requests.erase(it);
    idle.push_back(slot);
  }

  // Blocks until at least one read completes and accounts for every completion there is.
  void reap() {
    if (!uring) {
      std::deque<std::pair<unsigned, Step>> landed;
      {
        std::unique_lock<std::mutex> lock(mu);
        done_cv.wait(lock, [this] { return !done.empty(); });
        landed.swap(done);
      }
      for (const auto& [slot, step] : landed) finish(slot, step);
      return;
    }
#if TF_HAVE_URING
    flush();
    io_uring_cqe* cqe = nullptr;
    int r;
    do r = io_uring_wait_cqe(&ring, &cqe);
    while (r == -EINTR);
    if (r < 0) {
      broken = detail::concat(path, ": waiting for io_uring completions failed: ", std::strerror(-r));
      TF_FAIL(broken);
    }
    unsigned again = 0;
    while (cqe != nullptr) {
      const auto slot = unsigned(io_uring_cqe_get_data64(cqe));
      const int64_t res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      --in_kernel;
      const Step step = advance(path, file.fd, direct, chunks[slot], res);
      if (step == Step::Again) {
        issue(slot);
        ++again;
      } else {
        finish(slot, step);
      }
      cqe = nullptr;
      if (io_uring_peek_cqe(&ring, &cqe) != 0) cqe = nullptr;
    }
    if (again > 0) flush();
#endif
  }

  uint64_t submit(uint64_t offset, uint64_t bytes, void* dst, size_t capacity) {
    check_broken();
    TF_CHECK(bytes <= UINT64_MAX - offset, path, ": the range of ", bytes, " bytes at offset ", offset,
             " overflows a 64-bit file offset");
    const uint64_t end = offset + bytes;
    TF_CHECK(end <= size, path, ": range [", offset, ", ", end, ") lies outside the file, which holds ", size,
             " bytes");
    TF_CHECK(reinterpret_cast<uintptr_t>(dst) % kAlign == 0, path, ": the destination ", dst, " of range [",
             offset, ", ", end, ") is not aligned to ", kAlign, " bytes");
    const size_t span = aligned_span(offset, bytes);
    TF_CHECK(capacity >= span, path, ": a buffer of ", capacity, " bytes cannot hold range [", offset, ", ",
             end, "), whose aligned span is ", span, " bytes");
    const uint64_t ticket = next_ticket++;
    if (bytes == 0) return ticket;

    Request& req = requests[ticket];
    const uint64_t span_begin = align_down(offset), span_end = align_up(end);
    try {
      for (uint64_t at = span_begin; at < span_end; at += kChunk) {
        while (idle.empty()) reap();
        const unsigned slot = idle.back();
        idle.pop_back();
        Chunk& c = chunks[slot];
        c.ticket = ticket;
        c.range_begin = offset;
        c.range_end = end;
        c.begin = at;
        c.end = std::min(at + kChunk, span_end);
        c.need = std::min(c.end, end);
        c.landed = at;
        c.base = static_cast<char*>(dst) + (at - span_begin);
        ++req.chunks_in_flight;
        issue(slot);
      }
      req.all_issued = true;
      flush();
    } catch (...) {
      auto it = requests.find(ticket);
      it->second.all_issued = true;
      it->second.abandoned = true;
      if (it->second.complete()) requests.erase(it);
      throw;
    }
    return ticket;
  }

  // Raises the error of a complete request and forgets it.
  void raise_if_failed(std::map<uint64_t, Request>::iterator it) {
    if (it->second.error.empty()) return;
    const std::string error = std::move(it->second.error);
    requests.erase(it);
    TF_FAIL(error);
  }

  void wait(uint64_t ticket) {
    TF_CHECK(ticket != 0 && ticket < next_ticket, path, ": no read was submitted with ticket ", ticket);
    for (;;) {
      check_broken();
      auto it = requests.find(ticket);
      if (it == requests.end()) return;  // landed, and forgotten since it succeeded
      if (it->second.complete()) return raise_if_failed(it);
      reap();
    }
  }

  void drain() {
    for (;;) {
      check_broken();
      bool pending = false;
      for (const auto& [t, req] : requests) pending = pending || !req.complete();
      if (!pending) break;
      reap();
    }
    // What is left failed (abandoned requests are forgotten as they complete); every one has been
    // waited for now, so the first error stands for all of them.
    if (requests.empty()) return;
    const std::string error = std::move(requests.begin()->second.error);
    requests.clear();
    TF_FAIL(error);
  }
};

DirectReader::DirectReader(const std::string& path, unsigned queue_depth)
    : impl_(std::make_unique<Impl>(path, queue_depth)) {}
DirectReader::~DirectReader() = default;

const std::string& DirectReader::path() const {
  return impl_->path;
}
uint64_t DirectReader::file_size() const {
  return impl_->size;
}

std::string DirectReader::mode() const {
  return std::string(impl_->uring ? "io_uring" : "pread thread") +
         (impl_->direct ? ", O_DIRECT" : ", buffered");
}

size_t DirectReader::aligned_span(uint64_t offset, uint64_t bytes) {
  if (bytes == 0) return 0;
  TF_CHECK(bytes <= UINT64_MAX - offset && offset + bytes <= UINT64_MAX - (kAlign - 1), "the range of ",
           bytes, " bytes at offset ", offset, " overflows a 64-bit file offset");
  return size_t(align_up(offset + bytes) - align_down(offset));
}

uint64_t DirectReader::submit(uint64_t offset, uint64_t bytes, void* dst, size_t capacity) {
  return impl_->submit(offset, bytes, dst, capacity);
}
void DirectReader::wait(uint64_t ticket) {
  impl_->wait(ticket);
}
void DirectReader::drain() {
  impl_->drain();
}

}  // namespace tf::offload
