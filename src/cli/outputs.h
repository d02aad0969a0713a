// defines: which existing files and directories a command may replace: describe_entries,
//          kExportMarker, is_empty_dir, may_replace_export_dir, publish_export_dir,
//          check_export_file_target (tightfit never overwrites what it did not write, unless told to)
#pragma once

#include <functional>
#include <string>

namespace tf::cli {

// A hidden file that marks a directory as an export tightfit wrote (PEFT, merged HF, a run's
// adapter/), so that a later export may replace it; its content names the format. Loaders ignore
// files they do not know.
inline constexpr const char* kExportMarker = ".tightfit-export";

// "a.txt, adapter/, notes/ and 3 more": up to `shown` entries of the directory `dir`, sorted,
// directories with a trailing slash; entries named `ignore` are left out.
std::string describe_entries(const std::string& dir, size_t shown = 4, const std::string& ignore = {});

// Whether `dir` is a directory with no entries.
bool is_empty_dir(const std::string& dir);

// Whether an export may be written to `dir` without --force: nothing is there, an empty
// directory, or a directory tightfit exported before (it holds kExportMarker).
bool may_replace_export_dir(const std::string& dir);

// Writes the export directory `dir` whole: `write` fills a fresh directory beside it, the marker
// (naming `format`) is added, and the result is swapped in (io::publish_dir), so a previous
// directory is removed only once the new one is complete.
void publish_export_dir(const std::string& dir, const std::string& format,
                        const std::function<void(const std::string& staged)>& write);

// Refuses (tf::Error naming `path`) to let an export file replace a directory, or a file that is
// not a GGUF file tightfit exported (io::kGgufExportKey), unless `force`.
void check_export_file_target(const std::string& path, bool force);

}  // namespace tf::cli
