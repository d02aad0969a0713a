// defines: tf::io durable file helpers: AtomicFile, write_file_atomic, write_file_synced, fsync_dir,
//          replace_dir, publish_dir (crash-safe writes of single files, streamed or whole, and of
//          output directories), DirLock (one process at a time per directory)
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

namespace tf::io {

// A file written to a temporary beside `path` and published by commit(): fsync, close, rename over
// `path`, fsync the directory, so that a crash leaves either the old file or the complete new one.
// Streamed, so outputs larger than memory (merged models) need no second copy. Destroyed without
// commit(), or after a failure, the temporary is removed and `path` is untouched. The published
// file is 0644. Errors are tf::Error naming `path` and the step that failed; after one, the file
// accepts no further write() or commit().
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();

 private:
  // Discards the temporary and throws "<path>: <what>: <errno text>".
  [[noreturn]] void fail(const char* what);
  // Closes the descriptor and removes the temporary, if still there.
  void discard() noexcept;

  std::string path_;
  std::string dir_;
  std::string tmp_;  // empty once renamed or removed
  int fd_ = -1;
};

// Writes `content` to `path` so that a crash leaves either the old file or the complete new one: a
// temporary file beside it is written, fsync'ed and renamed over `path`, then the directory is
// fsync'ed. Throws tf::Error naming `path`; no temporary file is left behind.
void write_file_atomic(const std::string& path, std::string_view content);

// Creates (or truncates) `path`, writes `content` and fsyncs it. For files inside a directory that
// is itself published atomically (by rename) once complete.
void write_file_synced(const std::string& path, std::string_view content);

// fsyncs a directory, making the creations, renames and removals of its entries durable.
void fsync_dir(const std::string& dir);

// Makes the complete directory `staged` appear at `target`, replacing any directory there, such
// that a reader sees either the old directory or the new one, never a mixture and never nothing
// (Linux renameat2 RENAME_EXCHANGE; where the filesystem lacks it, the old directory is moved
// aside first, leaving a short window with no `target`). Both must be in the same directory,
// which is fsync'ed afterwards. The old contents are removed.
void replace_dir(const std::string& staged, const std::string& target);

// Builds a directory and makes it appear at `target` whole: `fill` writes into a fresh, empty
// directory beside `target` (a hidden name), which is fsync'ed and then swapped in by replace_dir,
// so a directory already at `target` is removed only once the new one is complete. If `fill`
// throws, the partial directory is removed and `target` is untouched. Whether `target` may be
// replaced is the caller's decision.
void publish_dir(const std::string& target, const std::function<void(const std::string& staged)>& fill);

// An exclusive lock on `path` (a lock file, created if missing) held for the object's lifetime,
// and by no child process: flock(2), so the kernel releases it when the holder exits, however it
// exits. The holder writes its pid into the file. When another process holds the lock, the
// constructor throws a tf::Error "<what> is in use by another tightfit process (pid N); <advice>".
// The file is left in place on release: removing it could let two processes lock two different
// files of the same name.
class DirLock {
 public:
  DirLock(const std::string& path, const std::string& what, const std::string& advice);
  ~DirLock();
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace tf::io
