// defines: tests of tf::offload::DirectReader: exact bytes at awkward offsets and lengths in every
// read mode (io_uring or the pread thread, O_DIRECT or buffered), many reads in flight waited out of
// order, the page cache left empty, and the errors of bad ranges, buffers, files and settings
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "offload/direct_reader.h"
#include "tests/test_util.h"

namespace {

using tf::offload::DirectReader;
using tf::test::error_of;
using tf::test::TempDir;
namespace fs = std::filesystem;

constexpr uint64_t kAlign = DirectReader::kAlign;
constexpr uint64_t kMiB = uint64_t(1) << 20;
constexpr unsigned char kSentinel = 0xAB;

// A byte of the test files: a multiplicative hash of its offset, so that bytes read from the wrong
// offset (by any shift, not only multiples of 256) differ from the expected ones.
unsigned char file_byte(uint64_t i) {
  return (unsigned char)((i * 0x9E3779B97F4A7C15ull) >> 56);
}

void write_file(const fs::path& path, uint64_t size) {
  std::vector<char> bytes(size);
  for (uint64_t i = 0; i < size; ++i) bytes[i] = char(file_byte(i));
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(size));
  ASSERT_TRUE(out.good()) << path;
}

struct FreeAligned {
  void operator()(unsigned char* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<unsigned char[], FreeAligned>;

// An aligned buffer of `bytes` (at least one block), every byte the sentinel.
AlignedBytes aligned_buffer(size_t bytes) {
  const size_t n = std::max<size_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  AlignedBytes buf(static_cast<unsigned char*>(std::aligned_alloc(kAlign, n)));
  std::memset(buf.get(), kSentinel, n);
  return buf;
}

// Where in buf (which received the aligned span of [offset, offset + bytes) of a file of
// `file_size` bytes) the first byte differs from what it must hold: the file's bytes in the range,
// zeros past the end of the file. nullopt when none does.
std::optional<uint64_t> first_wrong_byte(const unsigned char* buf, uint64_t offset, uint64_t bytes,
                                         uint64_t file_size) {
  const uint64_t lead = DirectReader::lead(offset);
  for (uint64_t i = 0; i < bytes; ++i) {
    if (buf[lead + i] != file_byte(offset + i)) return offset + i;
  }
  const uint64_t span_begin = offset - lead;
  const uint64_t span_end = span_begin + DirectReader::aligned_span(offset, bytes);
  for (uint64_t at = std::max(file_size, offset + bytes); at < span_end; ++at) {
    if (buf[at - span_begin] != 0) return at;
  }
  return std::nullopt;
}

// Sets TIGHTFIT_IO for a scope (unset for an empty value) and restores what was there.
class ScopedIo {
 public:
  explicit ScopedIo(const std::string& value) {
    if (const char* old = std::getenv("TIGHTFIT_IO")) old_ = old;
    if (value.empty()) {
      ::unsetenv("TIGHTFIT_IO");
    } else {
      ::setenv("TIGHTFIT_IO", value.c_str(), 1);
    }
  }
  ~ScopedIo() {
    if (old_) {
      ::setenv("TIGHTFIT_IO", old_->c_str(), 1);
    } else {
      ::unsetenv("TIGHTFIT_IO");
    }
  }
  ScopedIo(const ScopedIo&) = delete;
  ScopedIo& operator=(const ScopedIo&) = delete;

 private:
  std::optional<std::string> old_;
};

struct Mode {
  const char* env;   // TIGHTFIT_IO
  const char* name;  // what DirectReader::mode() says
  const char* test_name;
};
void PrintTo(const Mode& m, std::ostream* os) {
  *os << m.name;
}

const Mode kModes[] = {
    {"", "io_uring, O_DIRECT", "uring_direct"},
    {"buffered", "io_uring, buffered", "uring_buffered"},
    {"pread", "pread thread, O_DIRECT", "pread_direct"},
    {"pread,buffered", "pread thread, buffered", "pread_buffered"},
};

// Why this machine cannot run `want` where the reader fell back to another mode, or "" when it
// runs `want`. A fallback nothing explains is a failure.
std::string why_not(const DirectReader& r, const std::string& want) {
  const std::string got = r.mode();
  if (got == want) return "";
  const bool want_uring = want.find("io_uring") == 0, got_uring = got.find("io_uring") == 0;
  const bool want_direct = want.find("O_DIRECT") != std::string::npos;
  const bool got_direct = got.find("O_DIRECT") != std::string::npos;
  if (want_uring && !got_uring) return "io_uring is refused on this machine or not built in (" + got + ")";
  if (want_direct && !got_direct) return "the file system of " + r.path() + " refuses O_DIRECT (" + got + ")";
  ADD_FAILURE() << "asked for " << want << ", got " << got;
  return "mode mismatch";
}

class DirectReaderModes : public ::testing::TestWithParam<Mode> {
 protected:
  void SetUp() override { io_.emplace(GetParam().env); }
  void TearDown() override { io_.reset(); }
  TempDir tmp;
  std::optional<ScopedIo> io_;
};

// Reads [offset, offset + bytes) alone and checks every byte of its buffer.
void expect_exact(DirectReader& r, uint64_t offset, uint64_t bytes) {
  const size_t span = DirectReader::aligned_span(offset, bytes);
  AlignedBytes buf = aligned_buffer(span);
  r.wait(r.submit(offset, bytes, buf.get(), span));
  const auto wrong = first_wrong_byte(buf.get(), offset, bytes, r.file_size());
  EXPECT_FALSE(wrong.has_value()) << r.mode() << ": range [" << offset << ", " << offset + bytes
                                  << ") holds a wrong byte at file offset " << *wrong;
}

TEST_P(DirectReaderModes, ExactBytesAtAwkwardOffsetsAndLengths) {
  // Several chunks, and a size that is not a multiple of the block size.
  const uint64_t size = 3 * kMiB + 1234;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, size);
  DirectReader r(path.string());
  EXPECT_EQ(r.file_size(), size);
  EXPECT_EQ(r.path(), path.string());
  if (const std::string why = why_not(r, GetParam().name); !why.empty()) GTEST_SKIP() << why;

  const uint64_t lengths[] = {0, 1, 4095, 4096, 4097};
  for (const uint64_t offset : {uint64_t(0), uint64_t(1), uint64_t(4095), uint64_t(4096), uint64_t(4097)}) {
    for (const uint64_t bytes : lengths) expect_exact(r, offset, bytes);
  }
  expect_exact(r, size - 1, 1);          // the last byte
  expect_exact(r, size - 4097, 4097);    // ending exactly at EOF, mid-block
  expect_exact(r, size - 1234, 1234);    // the unaligned tail alone
  expect_exact(r, size, 0);              // empty, at EOF
  expect_exact(r, kMiB - 3, kMiB + 10);  // across chunk boundaries
  expect_exact(r, 5, size - 5);          // every chunk, to EOF
  expect_exact(r, 0, size);
}

TEST_P(DirectReaderModes, ManyReadsInFlightWaitedOutOfOrder) {
  const uint64_t size = 2 * kMiB + 3000;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, size);
  // A queue shallower than the reads submitted, so submit() waits for the oldest ones, and a range
  // of more chunks than the whole queue holds.
  DirectReader r(path.string(), 3);
  if (const std::string why = why_not(r, GetParam().name); !why.empty()) GTEST_SKIP() << why;

  struct Read {
    uint64_t offset, bytes, ticket = 0;
    AlignedBytes buf;
  };
  std::vector<Read> reads;
  uint64_t state = 12345;
  for (int i = 0; i < 40; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const uint64_t offset = (state >> 20) % size;
    const uint64_t bytes = (state >> 44) % std::min<uint64_t>(size - offset, 300000);
    reads.push_back({offset, bytes, 0, nullptr});
  }
  reads.push_back({7, size - 7, 0, nullptr});
  reads.push_back({size - 1, 1, 0, nullptr});
  for (Read& rd : reads) {
    const size_t span = DirectReader::aligned_span(rd.offset, rd.bytes);
    rd.buf = aligned_buffer(span);
    rd.ticket = r.submit(rd.offset, rd.bytes, rd.buf.get(), span);
  }
  for (size_t i = reads.size(); i-- > 0;) {
    if (i % 2 == 0) r.wait(reads[i].ticket);
  }
  r.drain();
  for (size_t i = 0; i < reads.size(); ++i) {
    if (i % 2 == 1) r.wait(reads[i].ticket);  // long landed: returns at once
  }
  for (const Read& rd : reads) {
    const auto wrong = first_wrong_byte(rd.buf.get(), rd.offset, rd.bytes, size);
    EXPECT_FALSE(wrong.has_value()) << r.mode() << ": range [" << rd.offset << ", " << rd.offset + rd.bytes
                                    << ") holds a wrong byte at file offset " << *wrong;
  }
}

// Pages of `path` the page cache holds (mincore over a mapping, which reads nothing).
size_t cached_pages(const fs::path& path, uint64_t size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  EXPECT_NE(map, MAP_FAILED) << std::strerror(errno);
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((size + page - 1) / page);
  EXPECT_EQ(::mincore(map, size, resident.data()), 0) << std::strerror(errno);
  ::munmap(map, size);
  ::close(fd);
  size_t n = 0;
  for (const unsigned char v : resident) n += v & 1;
  return n;
}

TEST_P(DirectReaderModes, ReadsLeaveNothingInThePageCache) {
  const uint64_t size = 4 * kMiB + 100;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, size);
  // Written pages are dirty, and dirty pages stay cached: write them back, then drop them.
  {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::fsync(fd), 0);
    ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    ::close(fd);
  }
  if (cached_pages(path, size) != 0)
    GTEST_SKIP() << "this file system keeps " << path << " cached regardless";
  DirectReader r(path.string());
  if (const std::string why = why_not(r, GetParam().name); !why.empty()) GTEST_SKIP() << why;
  // As the weight store reads: one range after another, in file order, which the kernel's
  // readahead would run ahead of.
  for (uint64_t at = 0; at < size; at += kMiB / 2) expect_exact(r, at, std::min(kMiB / 2, size - at));
  EXPECT_EQ(cached_pages(path, size), 0u) << r.mode();
  expect_exact(r, 3, size - 3);  // and all at once
  EXPECT_EQ(cached_pages(path, size), 0u) << r.mode();
}

TEST_P(DirectReaderModes, FileTruncatedAfterOpenIsAShortRangeNotGarbage) {
  const uint64_t size = 2 * kMiB + 100;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, size);
  DirectReader r(path.string());
  if (const std::string why = why_not(r, GetParam().name); !why.empty()) GTEST_SKIP() << why;
  const uint64_t cut = kMiB + 10;  // inside a chunk and inside a block
  fs::resize_file(path, cut);
  EXPECT_EQ(r.file_size(), size);

  const uint64_t across = kMiB - 100;  // starts before the cut, ends after it
  AlignedBytes a = aligned_buffer(DirectReader::aligned_span(across, size - across));
  const uint64_t t1 =
      r.submit(across, size - across, a.get(), DirectReader::aligned_span(across, size - across));
  const uint64_t past = kMiB + kMiB / 2;  // wholly past the cut
  AlignedBytes b = aligned_buffer(DirectReader::aligned_span(past, 1000));
  const uint64_t t2 = r.submit(past, 1000, b.get(), DirectReader::aligned_span(past, 1000));
  const uint64_t around = kMiB;  // one chunk, whose read comes back short at the cut
  AlignedBytes d = aligned_buffer(DirectReader::aligned_span(around, 2000));
  const uint64_t t4 = r.submit(around, 2000, d.get(), DirectReader::aligned_span(around, 2000));
  const uint64_t fine = 17;  // before the cut: still reads
  AlignedBytes c = aligned_buffer(DirectReader::aligned_span(fine, 5000));
  const uint64_t t3 = r.submit(fine, 5000, c.get(), DirectReader::aligned_span(fine, 5000));

  const std::string shorter =
      ") ended at byte " + std::to_string(cut) + ": the file is shorter than the range";
  const std::string e1 = error_of([&] { r.wait(t1); });
  EXPECT_NE(e1.find(path.string() + ": read of bytes [" + std::to_string(across) + ", " +
                    std::to_string(size) + shorter),
            std::string::npos)
      << e1;
  const std::string e2 = error_of([&] { r.wait(t2); });
  EXPECT_NE(e2.find(path.string() + ": read of bytes [" + std::to_string(past) + ", " +
                    std::to_string(past + 1000) + shorter),
            std::string::npos)
      << e2;
  const std::string e4 = error_of([&] { r.wait(t4); });
  EXPECT_NE(e4.find(path.string() + ": read of bytes [" + std::to_string(around) + ", " +
                    std::to_string(around + 2000) + shorter),
            std::string::npos)
      << e4;
  EXPECT_EQ(error_of([&] { r.wait(t3); }), "(no error)");
  EXPECT_FALSE(first_wrong_byte(c.get(), fine, 5000, size).has_value());
  // An error is raised once; the reader goes on reading what the file still holds.
  EXPECT_EQ(error_of([&] { r.drain(); }), "(no error)");
  expect_exact(r, 4096, 4096);
  // drain() raises the first of several failures, which stands for all of them.
  const uint64_t t5 = r.submit(past, 1000, b.get(), DirectReader::aligned_span(past, 1000));
  const uint64_t t6 = r.submit(around, 2000, d.get(), DirectReader::aligned_span(around, 2000));
  const std::string e5 = error_of([&] { r.drain(); });
  EXPECT_NE(e5.find(path.string() + ": read of bytes [" + std::to_string(past) + ", " +
                    std::to_string(past + 1000) + shorter),
            std::string::npos)
      << e5;
  EXPECT_EQ(error_of([&] { r.drain(); }), "(no error)");
  EXPECT_EQ(error_of([&] { r.wait(t5); }), "(no error)");
  EXPECT_EQ(error_of([&] { r.wait(t6); }), "(no error)");
}

TEST_P(DirectReaderModes, DestroyedWithReadsInFlight) {
  const uint64_t size = 3 * kMiB;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, size);
  AlignedBytes buf = aligned_buffer(size);
  bool uring = false;
  {
    DirectReader r(path.string(), 2);
    if (const std::string why = why_not(r, GetParam().name); !why.empty()) GTEST_SKIP() << why;
    uring = r.mode().find("io_uring") == 0;
    r.submit(1, size - 1, buf.get(), size);
  }
  // submit() returned with every chunk handed to the kernel or the worker. The ring is waited out,
  // so all of it has landed; the worker finishes the read it is in and drops the rest, so whatever
  // landed is the file's bytes and the rest is untouched.
  for (uint64_t i = 1; i < size; ++i) {
    if (uring) {
      ASSERT_EQ(buf[i], file_byte(i)) << "byte " << i;
    } else {
      ASSERT_TRUE(buf[i] == file_byte(i) || buf[i] == kSentinel) << "byte " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, DirectReaderModes, ::testing::ValuesIn(kModes),
                         [](const ::testing::TestParamInfo<Mode>& p) {
                           return std::string(p.param.test_name);
                         });

TEST(DirectReader, TmpfsFallsBackToBufferedWhereODirectIsRefused) {
  if (!fs::is_directory("/dev/shm")) GTEST_SKIP() << "no /dev/shm on this machine";
  ScopedIo io("");
  const fs::path dir = fs::path("/dev/shm") / ("tf-direct-reader-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path path = dir / "weights.bin";
  const uint64_t size = kMiB + 4097;
  write_file(path, size);
  // Linux 6.6 and later take O_DIRECT on tmpfs; older kernels refuse it with EINVAL.
  const int probe = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  const bool refused = probe < 0 && errno == EINVAL;
  if (probe >= 0) ::close(probe);
  {
    DirectReader r(path.string());
    const std::string m = r.mode();
    if (refused) {
      EXPECT_NE(m.find(", buffered"), std::string::npos) << m;
    } else {
      std::printf("this kernel takes O_DIRECT on tmpfs: the fallback is not reached (%s)\n", m.c_str());
      EXPECT_NE(m.find(", O_DIRECT"), std::string::npos) << m;
    }
    expect_exact(r, 4095, 4097);
    expect_exact(r, 3, size - 3);
  }
  fs::remove_all(dir);
}

// procfs refuses O_DIRECT with EINVAL on every kernel, as tmpfs did before Linux 6.6.
TEST(DirectReader, FileSystemRefusingODirectIsReadBuffered) {
  ScopedIo io("");
  const char* path = "/proc/version";
  const int probe = ::open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
  const int err = errno;
  if (probe >= 0) ::close(probe);
  if (probe >= 0 || err != EINVAL)
    GTEST_SKIP() << "O_DIRECT on " << path << " is not refused with EINVAL here";
  DirectReader r(path);
  EXPECT_NE(r.mode().find(", buffered"), std::string::npos) << r.mode();
  EXPECT_EQ(r.file_size(), 0u);  // what procfs says of its files
  AlignedBytes buf = aligned_buffer(kAlign);
  r.wait(r.submit(0, 0, buf.get(), kAlign));
  EXPECT_NE(error_of([&] { r.submit(0, 1, buf.get(), kAlign); }).find(": range [0, 1) lies outside the file"),
            std::string::npos);
}

TEST(DirectReader, RangesOutsideTheFileAreRefusedAtSubmit) {
  ScopedIo io("");
  TempDir tmp;
  const fs::path path = tmp.dir / "weights.bin";
  const uint64_t size = 10000;
  write_file(path, size);
  DirectReader r(path.string());
  AlignedBytes buf = aligned_buffer(4 * kAlign);
  const std::string p = path.string();
  EXPECT_NE(error_of([&] {
              r.submit(size - 10, 11, buf.get(), 4 * kAlign);
            }).find(p + ": range [9990, 10001) lies outside the file, which holds 10000 bytes"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              r.submit(size + 1, 0, buf.get(), 4 * kAlign);
            }).find(p + ": range [10001, 10001) lies outside the file"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] {
        r.submit(UINT64_MAX - 5, 10, buf.get(), 4 * kAlign);
      }).find(p + ": the range of 10 bytes at offset 18446744073709551610 overflows a 64-bit file offset"),
      std::string::npos);
  EXPECT_NE(error_of([&] { DirectReader::aligned_span(UINT64_MAX - 5, 2); }).find("overflows"),
            std::string::npos);
  // Nothing was read: the buffer is untouched and the reader still works.
  for (size_t i = 0; i < 4 * kAlign; ++i) ASSERT_EQ(buf[i], kSentinel) << i;
  expect_exact(r, 9000, 1000);
}

TEST(DirectReader, BuffersThatCannotTakeTheSpanAreRefusedAtSubmit) {
  ScopedIo io("");
  TempDir tmp;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, 20000);
  DirectReader r(path.string());
  AlignedBytes buf = aligned_buffer(4 * kAlign);
  const std::string p = path.string();
  EXPECT_EQ(DirectReader::aligned_span(4095, 2), 2 * kAlign);
  EXPECT_EQ(DirectReader::lead(4097), 1u);
  const std::string misaligned = error_of([&] { r.submit(0, 100, buf.get() + 1, 4 * kAlign - 1); });
  EXPECT_NE(misaligned.find(p + ": the destination "), std::string::npos) << misaligned;
  EXPECT_NE(misaligned.find(" of range [0, 100) is not aligned to 4096 bytes"), std::string::npos)
      << misaligned;
  EXPECT_NE(
      error_of([&] { r.submit(4095, 2, buf.get(), 2 * kAlign - 1); })
          .find(p +
                ": a buffer of 8191 bytes cannot hold range [4095, 4097), whose aligned span is 8192 bytes"),
      std::string::npos);
  for (size_t i = 0; i < 4 * kAlign; ++i) ASSERT_EQ(buf[i], kSentinel) << i;
}

TEST(DirectReader, FilesThatCannotBeReadAreRefusedAtOpen) {
  ScopedIo io("");
  TempDir tmp;
  const std::string missing = (tmp.dir / "absent.bin").string();
  EXPECT_NE(error_of([&] {
              DirectReader r(missing);
            }).find(missing + ": cannot open for reading: No such file or directory"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { DirectReader r(tmp.str()); }).find(tmp.str() + ": is a directory, not a file to read"),
      std::string::npos);
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, 100);
  EXPECT_NE(error_of([&] {
              DirectReader r(path.string(), 0);
            }).find(path.string() + ": a queue depth of 0 reads is outside [1, 4096]"),
            std::string::npos);
}

size_t open_fds() {
  size_t n = 0;
  for (const auto& e : fs::directory_iterator("/proc/self/fd")) n += e.is_symlink() ? 1 : 0;
  return n;
}

TEST(DirectReader, ErrorsLeakNoFileDescriptorOrRing) {
  if (!fs::is_directory("/proc/self/fd")) GTEST_SKIP() << "no /proc/self/fd to count descriptors in";
  TempDir tmp;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, 3 * kMiB);
  const size_t before = open_fds();
  for (const char* io : {"", "pread"}) {
    ScopedIo scoped(io);
    EXPECT_NE(error_of([&] { DirectReader r(tmp.str()); }), "(no error)");  // opened, then refused
    DirectReader r(path.string());
    fs::resize_file(path, kMiB);
    AlignedBytes buf = aligned_buffer(3 * kMiB);
    r.submit(0, 3 * kMiB, buf.get(), 3 * kMiB);
    EXPECT_NE(error_of([&] { r.drain(); }).find("shorter"), std::string::npos);
    fs::resize_file(path, 3 * kMiB);
  }
  EXPECT_EQ(open_fds(), before);
}

TEST(DirectReader, UnknownTicketsAreRefused) {
  ScopedIo io("");
  TempDir tmp;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, 100);
  DirectReader r(path.string());
  AlignedBytes buf = aligned_buffer(kAlign);
  const uint64_t t = r.submit(0, 100, buf.get(), kAlign);
  r.wait(t);
  EXPECT_NE(error_of([&] { r.wait(0); }).find(": no read was submitted with ticket 0"), std::string::npos);
  EXPECT_NE(
      error_of([&] { r.wait(t + 1); }).find(": no read was submitted with ticket " + std::to_string(t + 1)),
      std::string::npos);
}

TEST(DirectReader, BadTightfitIoIsRefused) {
  TempDir tmp;
  const fs::path path = tmp.dir / "weights.bin";
  write_file(path, 100);
  ScopedIo io("uring");
  EXPECT_NE(
      error_of([&] { DirectReader r(path.string()); })
          .find(
              "TIGHTFIT_IO=uring is not a read mode: expected pread (a worker thread in place of io_uring), "
              "buffered (through the page cache in place of O_DIRECT) or pread,buffered"),
      std::string::npos);
}

}  // namespace
