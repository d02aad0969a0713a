#include "src/io/durable.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "src/core/error.h"

namespace tf::io {

namespace {

namespace fs = std::filesystem;

std::string errno_text() {
  return std::strerror(errno);
}

// At most 1 GiB per call: Linux moves at most 2 GiB - 4 KiB per write() and some systems refuse
// (EINVAL) a count above INT_MAX instead of writing part of it.
constexpr size_t kMaxWriteChunk = size_t(1) << 30;

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min(n, kMaxWriteChunk));
    if (w < 0 && errno == EINTR) continue;
    TF_CHECK(w > 0, path, ": write failed: ", errno_text());
    p += w;
    n -= size_t(w);
  }
}

// Writes, fsyncs and closes; the descriptor is closed even when a step fails.
void write_sync_close(int fd, std::string_view content, const std::string& path) {
  try {
    write_all(fd, content.data(), content.size(), path);
    TF_CHECK(::fsync(fd) == 0, path, ": fsync failed: ", errno_text());
  } catch (...) {
    ::close(fd);
    throw;
  }
  TF_CHECK(::close(fd) == 0, path, ": close failed: ", errno_text());
}

fs::path parent_of(const fs::path& p) {
  return p.has_parent_path() ? p.parent_path() : fs::path(".");
}

// fsyncs `dir`; errors begin with `who`: the directory itself, or the file whose rename into it is
// being made durable.
void fsync_dir_for(const std::string& dir, const std::string& who) {
  std::string what = "the directory";
  if (who != dir) what.append(" ").append(dir);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  TF_CHECK(fd >= 0, who, ": cannot open ", what, " to fsync it: ", errno_text());
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TF_CHECK(rc == 0, who, ": fsync of ", what, " failed: ", std::strerror(err));
}

// The pid a DirLock holder wrote, or 0 if it cannot be read (yet).
long read_holder_pid(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0 || !std::isdigit(static_cast<unsigned char>(buf[0]))) return 0;
  return std::strtol(buf, nullptr, 10);
}

}  // namespace

void fsync_dir(const std::string& dir) {
  fsync_dir_for(dir, dir);
}

AtomicFile::AtomicFile(const std::string& path) : path_(path) {
  const fs::path target(path);
  const fs::path dir = parent_of(target);
  dir_ = dir.string();
  // A hidden name, so listings of the directory never show the partial file as an output.
  // Built by append: GCC 12 warns falsely (-Wrestrict) on "." + std::string.
  std::string tmp = (dir / target.filename()).string();
  tmp.insert(tmp.size() - target.filename().string().size(), ".");
  tmp.append(".tmp.XXXXXX");
  fd_ = ::mkstemp(tmp.data());
  TF_CHECK(fd_ >= 0, path, ": cannot create a temporary file in ", dir_, ": ", errno_text());
  tmp_ = std::move(tmp);
  // mkstemp creates 0600; outputs (models, adapters, reports) are meant to be readable like any
  // other file.
  if (::fchmod(fd_, 0644) != 0) fail("cannot set permissions");
}

AtomicFile::~AtomicFile() {
  discard();
}

void AtomicFile::write(const void* data, size_t n) {
  TF_CHECK(fd_ >= 0, path_, ": written after commit() or after a failed step");
  try {
    write_all(fd_, data, n, path_);
  } catch (...) {
    discard();
    throw;
  }
}

void AtomicFile::commit() {
  TF_CHECK(fd_ >= 0, path_, ": committed twice or after a failed step");
  if (::fsync(fd_) != 0) fail("fsync failed");
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) fail("close failed");
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail("cannot rename the temporary file over it");
  tmp_.clear();
  // The rename is durable only once the directory entry is on disk.
  fsync_dir_for(dir_, path_);
}

void AtomicFile::fail(const char* what) {
  const std::string err = errno_text();
  discard();
  TF_FAIL(path_, ": ", what, ": ", err);
}

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
  tmp_.clear();
}

void write_file_synced(const std::string& path, std::string_view content) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TF_CHECK(fd >= 0, path, ": cannot create the file: ", errno_text());
  write_sync_close(fd, content, path);
}

void write_file_atomic(const std::string& path, std::string_view content) {
  AtomicFile file(path);
  file.write(content.data(), content.size());
  file.commit();
}

void replace_dir(const std::string& staged, const std::string& target) {
  const fs::path dir = parent_of(fs::path(target));
  std::error_code ec;
  if (!fs::exists(target, ec)) {
    TF_CHECK(::rename(staged.c_str(), target.c_str()) == 0, target, ": cannot rename ", staged,
             " to it: ", errno_text());
    fsync_dir(dir.string());
    return;
  }
  TF_CHECK(fs::is_directory(target, ec), target, ": exists and is not a directory; refusing to replace it");
  if (::renameat2(AT_FDCWD, staged.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0) {
    TF_CHECK(errno == EINVAL || errno == ENOSYS, target, ": cannot exchange it with ", staged, ": ",
             errno_text());
    // No atomic exchange here: move the old directory aside, then the new one in.
    const std::string aside = staged + ".old";
    TF_CHECK(::rename(target.c_str(), aside.c_str()) == 0, target, ": cannot move it aside: ", errno_text());
    TF_CHECK(::rename(staged.c_str(), target.c_str()) == 0, target, ": cannot rename ", staged,
             " to it (the previous contents are in ", aside, "): ", errno_text());
    fsync_dir(dir.string());
    fs::remove_all(aside, ec);
    return;
  }
  fsync_dir(dir.string());
  // `staged` now holds the old contents.
  fs::remove_all(staged, ec);
  TF_CHECK(!ec, staged, ": cannot remove the replaced directory: ", ec.message());
}

void publish_dir(const std::string& target, const std::function<void(const std::string& staged)>& fill) {
  fs::path final_dir = fs::path(target).lexically_normal();
  if (!final_dir.has_filename()) final_dir = final_dir.parent_path();  // "out/model/"
  const fs::path dir = parent_of(final_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  TF_CHECK(!ec, dir.string(), ": cannot create: ", ec.message());
  std::string staged = (dir / ("." + final_dir.filename().string() + ".tmp-XXXXXX")).string();
  TF_CHECK(::mkdtemp(staged.data()) != nullptr, target, ": cannot create a temporary directory in ",
           dir.string(), ": ", errno_text());
  try {
    fill(staged);
    fsync_dir(staged);
    replace_dir(staged, final_dir.string());
  } catch (...) {
    fs::remove_all(staged, ec);
    throw;
  }
}

DirLock::DirLock(const std::string& path, const std::string& what, const std::string& advice) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  TF_CHECK(fd_ >= 0, path, ": cannot open the lock file: ", errno_text());
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err != EWOULDBLOCK) {
      ::close(fd_);
      TF_FAIL(path, ": cannot lock: ", std::strerror(err));
    }
    // The holder writes its pid right after locking; a process that lost the race by microseconds
    // may look before it has.
    long pid = read_holder_pid(fd_);
    for (int i = 0; i < 200 && pid == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      pid = read_holder_pid(fd_);
    }
    ::close(fd_);
    TF_FAIL(what, " is in use by another tightfit process (",
            pid ? "pid " + std::to_string(pid) : "pid unknown", "); ", advice);
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    const int err = errno;
    ::close(fd_);
    TF_FAIL(path, ": cannot write the lock file: ", std::strerror(err));
  }
}

DirLock::~DirLock() {
  ::close(fd_);
}

}  // namespace tf::io
