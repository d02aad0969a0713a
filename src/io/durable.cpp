#include "src/io/durable.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "src/core/error.h"

namespace tf::io {

namespace {

namespace fs = std::filesystem;

std::string errno_text() {
  return std::strerror(errno);
}

void write_all(int fd, std::string_view content, const std::string& path) {
  const char* p = content.data();
  size_t n = content.size();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    TF_CHECK(w > 0, path, ": write failed: ", errno_text());
    p += w;
    n -= size_t(w);
  }
}

// Writes, fsyncs and closes; the descriptor is closed even when a step fails.
void write_sync_close(int fd, std::string_view content, const std::string& path) {
  try {
    write_all(fd, content, path);
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

}  // namespace

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  TF_CHECK(fd >= 0, dir, ": cannot open the directory to fsync it: ", errno_text());
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TF_CHECK(rc == 0, dir, ": fsync of the directory failed: ", std::strerror(err));
}

void write_file_synced(const std::string& path, std::string_view content) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TF_CHECK(fd >= 0, path, ": cannot create the file: ", errno_text());
  write_sync_close(fd, content, path);
}

void write_file_atomic(const std::string& path, std::string_view content) {
  const fs::path target(path);
  const fs::path dir = parent_of(target);
  // Built by append: GCC 12 warns falsely (-Wrestrict) on "." + std::string.
  std::string tmp = (dir / target.filename()).string();
  tmp.insert(tmp.size() - target.filename().string().size(), ".");
  tmp.append(".tmp.XXXXXX");
  const int fd = ::mkstemp(tmp.data());
  TF_CHECK(fd >= 0, path, ": cannot create a temporary file in ", dir.string(), ": ", errno_text());
  try {
    // mkstemp creates 0600; outputs are meant to be readable like any other file.
    TF_CHECK(::fchmod(fd, 0644) == 0, path, ": cannot set permissions: ", errno_text());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  try {
    write_sync_close(fd, content, path);
    TF_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, path,
             ": cannot rename the temporary file over it: ", errno_text());
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(dir.string());
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

}  // namespace tf::io
