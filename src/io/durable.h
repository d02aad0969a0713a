// defines: tf::io durable file helpers: write_file_atomic, write_file_synced, fsync_dir,
//          replace_dir (crash-safe writes of small outputs and whole output directories)
#pragma once

#include <string>
#include <string_view>

namespace tf::io {

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

}  // namespace tf::io
