// defines: tf::io::StDType, SafetensorsTensor, SafetensorsFile (validated, memory-mapped reader),
//          SafetensorsModel (one lookup over a single-file or sharded model), write_safetensors
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "src/core/dtype.h"
#include "src/core/tensor.h"

namespace tf::io {

// The safetensors element types this reader recognises. Only those with a tf::DType (F32, BF16,
// F16, I32) can be viewed as tensors; the others can be listed and read as raw bytes, so a file
// holding, say, an I64 buffer next to the weights still opens.
enum class StDType : uint8_t { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U8, BOOL };

size_t st_dtype_size(StDType t);
std::string_view st_dtype_name(StDType t);  // as spelled in the header: "F32", "BF16", ...
std::optional<DType> to_dtype(StDType t);
StDType to_st_dtype(DType t);

// The header's size limit, as in the reference implementation: larger headers are refused before
// anything is parsed.
constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

// One tensor of an open file. `bytes` points into the read-only mapping and lives as long as
// the SafetensorsFile (moving the file does not move the mapping).
struct SafetensorsTensor {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;  // at most kMaxDims entries; empty for a scalar
  std::span<const std::byte> bytes;

  int64_t numel() const;
  std::string shape_str() const;  // "[4, 64]"
};

// A safetensors file, memory-mapped read-only and validated completely by open(): the header
// length against the file, the JSON, every dtype, shape and offset (overflow-checked), that the
// tensors tile the data section exactly (from 0, no gaps, no overlaps, to the last byte), that no
// name repeats, and that __metadata__ maps strings to strings. Every error is a tf::Error naming
// the file, the tensor where there is one, and the problem. The file must not be truncated by
// another process while it is open (the mapping would fault).
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  // In data order (by offset).
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsTensor* find(std::string_view name) const;
  // Throws naming the file and the missing tensor.
  const SafetensorsTensor& get(std::string_view name) const;
  // A tensor view of the mapped bytes; throws unless the dtype has a tf::DType and the data is
  // aligned to its element size (true for files from the reference writer and from ours). The
  // view is read-only in fact: the mapping is PROT_READ.
  TensorView view(std::string_view name) const;

 private:
  struct Mapping;
  SafetensorsFile() = default;
  std::string path_;
  std::unique_ptr<Mapping> map_;
  std::vector<SafetensorsTensor> tensors_;
  std::unordered_map<std::string, size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

// A whole model: either one .safetensors file or the shards listed by a
// model.safetensors.index.json (whose weight_map maps tensor name -> shard file name). The index
// is validated: shard names are plain file names in the index's directory (no path separators,
// no "." or ".."), every shard exists, every mapped tensor is in its shard, and every tensor of
// a shard is mapped to that shard, so a lookup has exactly one answer.
class SafetensorsModel {
 public:
  // `path`: a .safetensors file, an index .json, or a directory holding
  // model.safetensors.index.json or model.safetensors.
  static SafetensorsModel open(const std::string& path);

  const std::string& source() const { return source_; }  // the file or index that was opened
  const std::vector<SafetensorsFile>& shards() const { return shards_; }
  size_t size() const { return index_.size(); }
  std::vector<std::string> names() const;  // sorted
  const SafetensorsTensor* find(std::string_view name) const;
  const SafetensorsTensor& get(std::string_view name) const;  // throws naming source and tensor
  TensorView view(std::string_view name) const;

 private:
  std::string source_;
  std::vector<SafetensorsFile> shards_;
  // name -> (shard, position in that shard's tensors())
  std::unordered_map<std::string, std::pair<size_t, size_t>> index_;
};

// One tensor to write: its bytes are copied to the file as they are (little-endian, row-major).
struct SafetensorsWriteTensor {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;

  // From a contiguous CPU view.
  static SafetensorsWriteTensor from_view(const TensorView& v, std::string name);
};

// Writes `tensors` and `metadata` to `path` atomically: a temporary file in the same directory is
// written, fsync'ed and renamed over `path`, then the directory is fsync'ed, so a crash leaves
// either the old file or the complete new one. The header lists the tensors in data order:
// stably sorted by element size, largest first (otherwise in the given order), which keeps every
// tensor aligned to its element size; it is padded with spaces to a multiple of 8 bytes.
// Throws naming `path` on invalid input (empty or duplicate names, the reserved name
// __metadata__, more than kMaxDims dims, negative dims, byte counts that disagree with the
// shape) and on any I/O failure, leaving no temporary file behind.
void write_safetensors(const std::string& path, std::span<const SafetensorsWriteTensor> tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace tf::io
