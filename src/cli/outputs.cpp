#include "src/cli/outputs.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "src/core/error.h"
#include "src/io/durable.h"
#include "src/io/gguf.h"
#include "src/io/gguf_lora.h"

namespace tf::cli {

namespace fs = std::filesystem;

std::string describe_entries(const std::string& dir, size_t shown, const std::string& ignore) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name != ignore) names.push_back(name + (e.is_directory(ec) ? "/" : ""));
  }
  std::sort(names.begin(), names.end());
  std::string out;
  for (size_t i = 0; i < names.size() && i < shown; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > shown) out += " and " + std::to_string(names.size() - shown) + " more";
  return out;
}

bool is_empty_dir(const std::string& dir) {
  std::error_code ec;
  if (fs::directory_iterator(dir, ec) != fs::directory_iterator()) return false;
  TF_CHECK(!ec, dir, ": cannot list: ", ec.message());
  return true;
}

bool may_replace_export_dir(const std::string& dir) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(dir, ec);
  if (!fs::exists(st)) return true;
  if (!fs::is_directory(st)) return false;
  return fs::is_regular_file(fs::path(dir) / kExportMarker, ec) || is_empty_dir(dir);
}

void publish_export_dir(const std::string& dir, const std::string& format,
                        const std::function<void(const std::string& staged)>& write) {
  io::publish_dir(dir, [&](const std::string& staged) {
    write(staged);
    io::write_file_synced((fs::path(staged) / kExportMarker).string(),
                          nlohmann::json{{"written_by", "tightfit"}, {"format", format}}.dump() + "\n");
  });
}

void check_export_file_target(const std::string& path, bool force) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(path, ec);
  if (!fs::exists(st)) return;
  TF_CHECK(!fs::is_directory(st), path,
           ": is a directory, but this format is written as one file; give --out ", "a file name");
  if (force) return;
  bool ours = false;
  try {
    const io::GgufFile f = io::GgufFile::open(path);
    const io::GgufValue* v = f.find(io::kGgufExportKey);
    ours = v && v->type == io::GgufValueType::String;
  } catch (const Error&) {
  }
  TF_CHECK(ours, path,
           ": exists and is not a file tightfit exported; choose another --out, or pass --force to ",
           "replace it");
}

}  // namespace tf::cli
