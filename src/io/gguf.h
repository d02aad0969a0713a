// defines: tf::io::GgufFile (hardened GGUF v2/v3 reader over an mmap), tf::io::GgufValue,
//          tf::io::GgufTensorInfo, tf::io::GgufWriter (atomic GGUF v3 writer)
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor_count, u64 kv_count, kv pairs (string
// key, u32 value type, value), tensor infos (string name, u32 n_dims, i64 ne[n_dims], u32 ggml
// type, u64 offset), padding to general.alignment (default 32), tensor data. Strings are a u64
// byte length and the bytes. Tensor dims are innermost first: ne[0] is the length of a row.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kernels/quant_blocks.h"

namespace tf::io {

enum class GgufValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};
const char* gguf_value_type_name(GgufValueType t);

constexpr uint32_t kGgufDefaultAlignment = 32;
constexpr int kGgufMaxDims = 4;
// Arrays of arrays are allowed by the format; deeper nesting than this is refused so that a hostile
// file cannot drive the parser's recursion.
constexpr int kGgufMaxArrayDepth = 8;

// A metadata value. Strings and arrays of numbers point into the file's bytes (valid while the
// GgufFile lives); arrays of strings and arrays of arrays are unpacked into vectors.
struct GgufValue {
  GgufValueType type = GgufValueType::U8;
  uint64_t u = 0;  // U8, U16, U32, U64, Bool
  int64_t i = 0;   // I8, I16, I32, I64
  double f = 0;    // F32, F64
  std::string_view str;
  // Arrays: element type and count; numeric elements are `count` little-endian values at `raw`.
  GgufValueType elem_type = GgufValueType::U8;
  uint64_t count = 0;
  const uint8_t* raw = nullptr;
  std::vector<std::string_view> strings;  // String arrays
  std::vector<GgufValue> arrays;          // Array arrays
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  int n_dims = 0;
  std::array<int64_t, kGgufMaxDims> ne{1, 1, 1, 1};  // GGUF order: ne[0] = row length (innermost)
  uint64_t offset = 0;                               // from the start of the data section
  int64_t n_elements = 0;
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;

  int64_t row_length() const { return ne[0]; }
  int64_t n_rows() const { return ne[0] == 0 ? 0 : n_elements / ne[0]; }
  // Bytes of one row (ne[0] elements); rows start on block boundaries.
  uint64_t row_bytes() const {
    const GgmlTypeInfo info = ggml_type_info(uint32_t(type));
    return uint64_t(ne[0]) / uint64_t(info.block_elems) * uint64_t(info.block_bytes);
  }
  // Row-major shape, outermost first: a GGUF matrix with ne = [cols, rows] is [rows, cols], the
  // nn.Linear [out_features, in_features] layout.
  std::vector<int64_t> shape() const;
  std::span<const uint8_t> bytes() const { return {data, size_t(n_bytes)}; }
};

class GgufFile {
 public:
  // Maps and validates `path`; throws tf::Error naming the file and the problem.
  static GgufFile open(const std::string& path);
  // Parses bytes the caller keeps alive for the lifetime of the result (fuzzing, tests);
  // `name` stands for the file in error messages.
  static GgufFile from_memory(const void* data, size_t size, std::string name);

  GgufFile(GgufFile&& o) noexcept;
  GgufFile& operator=(GgufFile&& o) noexcept;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  ~GgufFile();

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  size_t file_size() const { return size_; }

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  bool has(std::string_view key) const { return kv_index_.count(std::string(key)) != 0; }
  const GgufValue* find(std::string_view key) const;
  // Throws naming the file and key when it is missing.
  const GgufValue& value(std::string_view key) const;

  // Typed getters: the stored type must be exactly the one asked for.
  uint8_t get_u8(std::string_view key) const;
  int8_t get_i8(std::string_view key) const;
  uint16_t get_u16(std::string_view key) const;
  int16_t get_i16(std::string_view key) const;
  uint32_t get_u32(std::string_view key) const;
  int32_t get_i32(std::string_view key) const;
  uint64_t get_u64(std::string_view key) const;
  int64_t get_i64(std::string_view key) const;
  float get_f32(std::string_view key) const;
  double get_f64(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  std::string_view get_string(std::string_view key) const;
  // Lenient getters for hyper-parameters that writers store with varying widths: any integer type
  // whose value fits; any float type.
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;
  // Arrays: the element type must match.
  const GgufValue& get_array(std::string_view key, GgufValueType elem) const;
  std::vector<std::string_view> get_string_array(std::string_view key) const;
  std::vector<float> get_f32_array(std::string_view key) const;
  std::vector<int32_t> get_i32_array(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;
  // Throws naming the file and tensor when it is missing.
  const GgufTensorInfo& tensor(std::string_view name) const;

 private:
  GgufFile() = default;
  void parse();
  void release();

  std::string path_;
  const uint8_t* bytes_ = nullptr;
  size_t size_ = 0;
  void* map_ = nullptr;  // set when bytes_ is our own mapping
  uint32_t version_ = 0;
  uint32_t alignment_ = kGgufDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// Builds a GGUF v3 file in memory order and writes it atomically (temporary file in the target
// directory, fsync, rename). Tensor data is referenced, not copied: it must stay valid until
// write() returns.
class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = kGgufDefaultAlignment);

  void add_u8(const std::string& key, uint8_t v);
  void add_i8(const std::string& key, int8_t v);
  void add_u16(const std::string& key, uint16_t v);
  void add_i16(const std::string& key, int16_t v);
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_u64(const std::string& key, uint64_t v);
  void add_i64(const std::string& key, int64_t v);
  void add_f32(const std::string& key, float v);
  void add_f64(const std::string& key, double v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, std::string_view v);
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
  // Any value, including nested arrays, e.g. copied from another file's metadata.
  void add_value(const std::string& key, const GgufValue& v);

  // `ne` innermost first (GGUF order); `data` holds the tensor's bytes in `type`'s storage.
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data,
                  size_t n_bytes);

  void write(const std::string& path) const;

 private:
  struct PendingTensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    const void* data;
    uint64_t n_bytes;
  };
  void begin_key(const std::string& key, GgufValueType type);

  uint32_t alignment_;
  std::vector<uint8_t> kv_bytes_;
  uint64_t kv_count_ = 0;
  std::unordered_map<std::string, int> keys_;
  std::vector<PendingTensor> tensors_;
  std::unordered_map<std::string, int> tensor_names_;
};

}  // namespace tf::io
