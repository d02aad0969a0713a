#include "src/io/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "src/core/error.h"
#include "src/io/durable.h"

namespace tf::io {
namespace {

constexpr uint32_t kMinVersion = 2;  // v1 used 32-bit counts and lengths
constexpr uint32_t kMaxVersion = 3;
constexpr uint64_t kMaxKeyBytes = 65535;      // the GGUF spec's bound on key length
constexpr uint64_t kMaxTensorNameBytes = 63;  // ggml's GGML_MAX_NAME, less the terminator

// Bytes a value of scalar type t occupies; 0 for String and Array (variable) and unknown types.
uint64_t scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8:
    case GgufValueType::I8:
    case GgufValueType::Bool: return 1;
    case GgufValueType::U16:
    case GgufValueType::I16: return 2;
    case GgufValueType::U32:
    case GgufValueType::I32:
    case GgufValueType::F32: return 4;
    case GgufValueType::U64:
    case GgufValueType::I64:
    case GgufValueType::F64: return 8;
    case GgufValueType::String:
    case GgufValueType::Array: return 0;
  }
  return 0;
}

bool valid_value_type(uint32_t t) {
  return t <= uint32_t(GgufValueType::F64);
}

// The fewest bytes one element of type t can occupy: bounds an element count before anything is
// allocated for it. A string is at least its 8-byte length; an array its type and count.
uint64_t min_encoded_size(GgufValueType t) {
  if (t == GgufValueType::String) return 8;
  if (t == GgufValueType::Array) return 12;
  return scalar_size(t);
}

uint64_t align_up(uint64_t x, uint64_t a) {
  return (x + a - 1) / a * a;
}

// Bounds-checked little-endian reader over the file bytes; every failure names the file, what was
// being read and where.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* p, size_t n) : path_(path), p_(p), n_(n) {}
  size_t pos() const { return pos_; }
  size_t left() const { return n_ - pos_; }

  const uint8_t* take(uint64_t bytes, const std::string& what) {
    if (bytes > left())
      TF_FAIL(path_, ": truncated: ", what, " needs ", bytes, " bytes at offset ", pos_, " but only ", left(),
              " remain");
    const uint8_t* at = p_ + pos_;
    pos_ += size_t(bytes);
    return at;
  }
  template <typename T>
  T read(const std::string& what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string_view string(const std::string& what, uint64_t max_len) {
    const uint64_t len = read<uint64_t>(what + " length");
    if (len > left())
      TF_FAIL(path_, ": ", what, " has length ", len, " at offset ", pos_ - 8, " but only ", left(),
              " bytes remain in the file");
    if (len > max_len) TF_FAIL(path_, ": ", what, " is ", len, " bytes long; the limit is ", max_len);
    return {reinterpret_cast<const char*>(take(len, what)), size_t(len)};
  }

 private:
  const std::string& path_;
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

GgufValue read_value(Cursor& c, const std::string& path, GgufValueType type, const std::string& key,
                     int depth) {
  GgufValue v;
  v.type = type;
  const std::string what = "value of key '" + key + "'";
  switch (type) {
    case GgufValueType::U8: v.u = c.read<uint8_t>(what); break;
    case GgufValueType::I8: v.i = c.read<int8_t>(what); break;
    case GgufValueType::U16: v.u = c.read<uint16_t>(what); break;
    case GgufValueType::I16: v.i = c.read<int16_t>(what); break;
    case GgufValueType::U32: v.u = c.read<uint32_t>(what); break;
    case GgufValueType::I32: v.i = c.read<int32_t>(what); break;
    case GgufValueType::U64: v.u = c.read<uint64_t>(what); break;
    case GgufValueType::I64: v.i = c.read<int64_t>(what); break;
    case GgufValueType::F32: v.f = c.read<float>(what); break;
    case GgufValueType::F64: v.f = c.read<double>(what); break;
    case GgufValueType::Bool: {
      const uint8_t b = c.read<uint8_t>(what);
      if (b > 1) TF_FAIL(path, ": key '", key, "': bool value ", int(b), " is neither 0 nor 1");
      v.u = b;
      break;
    }
    case GgufValueType::String:
      v.str = c.string("string " + what, std::numeric_limits<uint64_t>::max());
      break;
    case GgufValueType::Array: {
      if (depth >= kGgufMaxArrayDepth)
        TF_FAIL(path, ": key '", key, "': arrays nested deeper than ", kGgufMaxArrayDepth, " levels");
      const uint32_t et = c.read<uint32_t>("array element type of key '" + key + "'");
      if (!valid_value_type(et)) TF_FAIL(path, ": key '", key, "': unknown array element type ", et);
      v.elem_type = GgufValueType(et);
      v.count = c.read<uint64_t>("array length of key '" + key + "'");
      const uint64_t min_size = min_encoded_size(v.elem_type);
      if (v.count > c.left() / min_size)
        TF_FAIL(path, ": key '", key, "': array of ", v.count, " ", gguf_value_type_name(v.elem_type),
                " elements cannot fit in the ", c.left(), " bytes left in the file");
      if (v.elem_type == GgufValueType::String) {
        v.strings.reserve(size_t(v.count));
        for (uint64_t k = 0; k < v.count; ++k)
          v.strings.push_back(c.string("element " + std::to_string(k) + " of key '" + key + "'",
                                       std::numeric_limits<uint64_t>::max()));
      } else if (v.elem_type == GgufValueType::Array) {
        v.arrays.reserve(size_t(v.count));
        for (uint64_t k = 0; k < v.count; ++k)
          v.arrays.push_back(read_value(c, path, GgufValueType::Array, key, depth + 1));
      } else {
        v.raw = c.take(v.count * min_size, what);
        if (v.elem_type == GgufValueType::Bool)
          for (uint64_t k = 0; k < v.count; ++k)
            if (v.raw[k] > 1) TF_FAIL(path, ": key '", key, "': bool element ", k, " is ", int(v.raw[k]));
      }
      break;
    }
  }
  return v;
}

}  // namespace

const char* gguf_value_type_name(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8: return "u8";
    case GgufValueType::I8: return "i8";
    case GgufValueType::U16: return "u16";
    case GgufValueType::I16: return "i16";
    case GgufValueType::U32: return "u32";
    case GgufValueType::I32: return "i32";
    case GgufValueType::F32: return "f32";
    case GgufValueType::Bool: return "bool";
    case GgufValueType::String: return "string";
    case GgufValueType::Array: return "array";
    case GgufValueType::U64: return "u64";
    case GgufValueType::I64: return "i64";
    case GgufValueType::F64: return "f64";
  }
  return "unknown";
}

std::vector<int64_t> GgufTensorInfo::shape() const {
  std::vector<int64_t> s;
  for (int d = n_dims - 1; d >= 0; --d) s.push_back(ne[size_t(d)]);
  return s;
}

GgufFile GgufFile::open(const std::string& path) {
  GgufFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) TF_FAIL(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    TF_FAIL(path, ": cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    TF_FAIL(path, ": not a regular file");
  }
  f.size_ = size_t(st.st_size);
  if (f.size_ > 0) {
    void* m = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    if (m == MAP_FAILED) TF_FAIL(path, ": cannot mmap ", f.size_, " bytes: ", std::strerror(err));
    f.map_ = m;
    f.bytes_ = static_cast<const uint8_t*>(m);
  } else {
    ::close(fd);
  }
  f.parse();
  return f;
}

GgufFile GgufFile::from_memory(const void* data, size_t size, std::string name) {
  GgufFile f;
  f.path_ = std::move(name);
  f.bytes_ = static_cast<const uint8_t*>(data);
  f.size_ = size;
  f.parse();
  return f;
}

GgufFile::GgufFile(GgufFile&& o) noexcept
    : path_(std::move(o.path_)),
      bytes_(o.bytes_),
      size_(o.size_),
      map_(o.map_),
      version_(o.version_),
      alignment_(o.alignment_),
      data_offset_(o.data_offset_),
      kv_(std::move(o.kv_)),
      kv_index_(std::move(o.kv_index_)),
      tensors_(std::move(o.tensors_)),
      tensor_index_(std::move(o.tensor_index_)) {
  o.map_ = nullptr;
  o.bytes_ = nullptr;
  o.size_ = 0;
}

GgufFile& GgufFile::operator=(GgufFile&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    bytes_ = o.bytes_;
    size_ = o.size_;
    map_ = o.map_;
    version_ = o.version_;
    alignment_ = o.alignment_;
    data_offset_ = o.data_offset_;
    kv_ = std::move(o.kv_);
    kv_index_ = std::move(o.kv_index_);
    tensors_ = std::move(o.tensors_);
    tensor_index_ = std::move(o.tensor_index_);
    o.map_ = nullptr;
    o.bytes_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

GgufFile::~GgufFile() {
  release();
}

void GgufFile::release() {
  if (map_) ::munmap(map_, size_);
  map_ = nullptr;
}

void GgufFile::parse() {
  Cursor c(path_, bytes_, size_);
  const uint8_t* magic = c.take(4, "magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) TF_FAIL(path_, ": not a GGUF file (bad magic)");
  version_ = c.read<uint32_t>("version");
  if (__builtin_bswap32(version_) >= kMinVersion && __builtin_bswap32(version_) <= kMaxVersion)
    TF_FAIL(path_, ": big-endian GGUF files are not supported");
  if (version_ < kMinVersion || version_ > kMaxVersion)
    TF_FAIL(path_, ": unsupported GGUF version ", version_, " (supported: ", kMinVersion, "-", kMaxVersion,
            ")");
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Smallest encodings: a kv is an 8-byte key length, a 4-byte type and a 1-byte value; a tensor
  // info is an 8-byte name length, 4-byte n_dims, 4-byte type and 8-byte offset.
  if (n_kv > c.left() / 13)
    TF_FAIL(path_, ": metadata count ", n_kv, " cannot fit in the ", c.left(), " bytes of the file");
  if (n_tensors > c.left() / 24)
    TF_FAIL(path_, ": tensor count ", n_tensors, " cannot fit in the ", c.left(), " bytes of the file");

  kv_.reserve(size_t(n_kv));
  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string key(c.string("key of metadata entry " + std::to_string(k), kMaxKeyBytes));
    const uint32_t type = c.read<uint32_t>("value type of key '" + key + "'");
    if (!valid_value_type(type)) TF_FAIL(path_, ": key '", key, "' has unknown value type ", type);
    if (kv_index_.count(key)) TF_FAIL(path_, ": duplicate metadata key '", key, "'");
    GgufValue v = read_value(c, path_, GgufValueType(type), key, 0);
    kv_index_.emplace(key, kv_.size());
    kv_.emplace_back(key, std::move(v));
  }

  if (const GgufValue* a = find("general.alignment")) {
    if (a->type != GgufValueType::U32)
      TF_FAIL(path_, ": general.alignment has type ", gguf_value_type_name(a->type), ", expected u32");
    if (a->u == 0 || (a->u & (a->u - 1)) != 0)
      TF_FAIL(path_, ": general.alignment ", a->u, " is not a non-zero power of two");
    alignment_ = uint32_t(a->u);
  }

  tensors_.reserve(size_t(n_tensors));
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensorInfo ti;
    ti.name = std::string(c.string("name of tensor " + std::to_string(t), kMaxTensorNameBytes));
    const std::string& name = ti.name;
    if (tensor_index_.count(name)) TF_FAIL(path_, ": duplicate tensor name '", name, "'");
    const uint32_t n_dims = c.read<uint32_t>("n_dims of tensor '" + name + "'");
    if (n_dims > uint32_t(kGgufMaxDims))
      TF_FAIL(path_, ": tensor '", name, "' has ", n_dims, " dimensions; at most ", kGgufMaxDims,
              " are allowed");
    ti.n_dims = int(n_dims);
    int64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const int64_t ne = c.read<int64_t>("dimension " + std::to_string(d) + " of tensor '" + name + "'");
      if (ne < 0) TF_FAIL(path_, ": tensor '", name, "' has negative dimension ", d, ": ", ne);
      if (__builtin_mul_overflow(n_elements, ne, &n_elements))
        TF_FAIL(path_, ": tensor '", name, "': element count overflows (dimension ", d, " is ", ne, ")");
      ti.ne[d] = ne;
    }
    ti.n_elements = n_elements;
    const uint32_t type = c.read<uint32_t>("type of tensor '" + name + "'");
    const GgmlTypeInfo info = ggml_type_info(type);
    if (!info.name) TF_FAIL(path_, ": tensor '", name, "' has unknown ggml type ", type);
    ti.type = GgmlType(type);
    if (ti.ne[0] % info.block_elems != 0)
      TF_FAIL(path_, ": tensor '", name, "': row length ", ti.ne[0], " is not a multiple of the ", info.name,
              " block size ", info.block_elems);
    const uint64_t n_blocks = uint64_t(n_elements) / uint64_t(info.block_elems);
    if (__builtin_mul_overflow(n_blocks, uint64_t(info.block_bytes), &ti.n_bytes))
      TF_FAIL(path_, ": tensor '", name, "': byte size overflows");
    ti.offset = c.read<uint64_t>("offset of tensor '" + name + "'");
    tensor_index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(ti));
  }

  data_offset_ = align_up(c.pos(), alignment_);
  // Even a tensor of zero elements points into the data section, so it must start inside the file.
  if (!tensors_.empty() && data_offset_ > size_)
    TF_FAIL(path_, ": the tensor data section starts at offset ", data_offset_, " (the header rounded up to ",
            "the alignment ", alignment_, "), past the end of the file (", size_, " bytes)");
  // Tensors lie in order, each at the running sum of the previous sizes rounded up to the
  // alignment, as ggml writes and requires them: no overlap, no gap, no misalignment.
  uint64_t expected = 0;
  for (GgufTensorInfo& ti : tensors_) {
    if (ti.offset % alignment_ != 0)
      TF_FAIL(path_, ": tensor '", ti.name, "' offset ", ti.offset, " is not a multiple of the alignment ",
              alignment_);
    if (ti.offset < expected)
      TF_FAIL(path_, ": tensor '", ti.name, "' offset ", ti.offset,
              " overlaps the previous tensor's data (expected ", expected, ")");
    if (ti.offset > expected)
      TF_FAIL(path_, ": tensor '", ti.name, "' offset ", ti.offset,
              " leaves a gap after the previous tensor (expected ", expected, ")");
    const uint64_t avail = size_ > data_offset_ ? size_ - data_offset_ : 0;
    if (ti.offset > avail || ti.n_bytes > avail - ti.offset)
      TF_FAIL(path_, ": tensor '", ti.name, "' data [", ti.offset, ", +", ti.n_bytes,
              ") runs past the end of the file (data section holds ", avail, " bytes)");
    ti.data = bytes_ + data_offset_ + ti.offset;
    // Cannot overflow: offset + n_bytes <= avail, and padding adds less than the alignment.
    expected = align_up(ti.offset + ti.n_bytes, alignment_);
  }
}

const GgufValue* GgufFile::find(std::string_view key) const {
  const auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufValue& GgufFile::value(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) TF_FAIL(path_, ": metadata key '", key, "' is missing");
  return *v;
}

namespace {
const GgufValue& expect_type(const GgufFile& f, std::string_view key, GgufValueType t) {
  const GgufValue& v = f.value(key);
  if (v.type != t)
    TF_FAIL(f.path(), ": metadata key '", key, "' has type ", gguf_value_type_name(v.type), ", expected ",
            gguf_value_type_name(t));
  return v;
}
}  // namespace

uint8_t GgufFile::get_u8(std::string_view k) const {
  return uint8_t(expect_type(*this, k, GgufValueType::U8).u);
}
int8_t GgufFile::get_i8(std::string_view k) const {
  return int8_t(expect_type(*this, k, GgufValueType::I8).i);
}
uint16_t GgufFile::get_u16(std::string_view k) const {
  return uint16_t(expect_type(*this, k, GgufValueType::U16).u);
}
int16_t GgufFile::get_i16(std::string_view k) const {
  return int16_t(expect_type(*this, k, GgufValueType::I16).i);
}
uint32_t GgufFile::get_u32(std::string_view k) const {
  return uint32_t(expect_type(*this, k, GgufValueType::U32).u);
}
int32_t GgufFile::get_i32(std::string_view k) const {
  return int32_t(expect_type(*this, k, GgufValueType::I32).i);
}
uint64_t GgufFile::get_u64(std::string_view k) const {
  return expect_type(*this, k, GgufValueType::U64).u;
}
int64_t GgufFile::get_i64(std::string_view k) const {
  return expect_type(*this, k, GgufValueType::I64).i;
}
float GgufFile::get_f32(std::string_view k) const {
  return float(expect_type(*this, k, GgufValueType::F32).f);
}
double GgufFile::get_f64(std::string_view k) const {
  return expect_type(*this, k, GgufValueType::F64).f;
}
bool GgufFile::get_bool(std::string_view k) const {
  return expect_type(*this, k, GgufValueType::Bool).u != 0;
}
std::string_view GgufFile::get_string(std::string_view k) const {
  return expect_type(*this, k, GgufValueType::String).str;
}

int64_t GgufFile::get_int(std::string_view key) const {
  const GgufValue& v = value(key);
  switch (v.type) {
    case GgufValueType::U8:
    case GgufValueType::U16:
    case GgufValueType::U32:
    case GgufValueType::U64:
      if (v.u > uint64_t(std::numeric_limits<int64_t>::max()))
        TF_FAIL(path_, ": metadata key '", key, "' value ", v.u, " is out of range");
      return int64_t(v.u);
    case GgufValueType::I8:
    case GgufValueType::I16:
    case GgufValueType::I32:
    case GgufValueType::I64: return v.i;
    default: break;
  }
  TF_FAIL(path_, ": metadata key '", key, "' has type ", gguf_value_type_name(v.type),
          ", expected an integer");
}

double GgufFile::get_float(std::string_view key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufValueType::F32 && v.type != GgufValueType::F64)
    TF_FAIL(path_, ": metadata key '", key, "' has type ", gguf_value_type_name(v.type),
            ", expected f32 or f64");
  return v.f;
}

const GgufValue& GgufFile::get_array(std::string_view key, GgufValueType elem) const {
  const GgufValue& v = expect_type(*this, key, GgufValueType::Array);
  if (v.elem_type != elem)
    TF_FAIL(path_, ": metadata key '", key, "' is an array of ", gguf_value_type_name(v.elem_type),
            ", expected an array of ", gguf_value_type_name(elem));
  return v;
}

std::vector<std::string_view> GgufFile::get_string_array(std::string_view key) const {
  return get_array(key, GgufValueType::String).strings;
}

std::vector<float> GgufFile::get_f32_array(std::string_view key) const {
  const GgufValue& v = get_array(key, GgufValueType::F32);
  std::vector<float> out(size_t(v.count));
  if (v.count) std::memcpy(out.data(), v.raw, size_t(v.count) * 4);
  return out;
}

std::vector<int32_t> GgufFile::get_i32_array(std::string_view key) const {
  const GgufValue& v = get_array(key, GgufValueType::I32);
  std::vector<int32_t> out(size_t(v.count));
  if (v.count) std::memcpy(out.data(), v.raw, size_t(v.count) * 4);
  return out;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensorInfo& GgufFile::tensor(std::string_view name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (!t) TF_FAIL(path_, ": tensor '", name, "' is not in the file");
  return *t;
}

// ---- writer ----

namespace {
template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}
void put_string(std::vector<uint8_t>& out, std::string_view s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

void put_value_body(std::vector<uint8_t>& out, const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::U8: put<uint8_t>(out, uint8_t(v.u)); break;
    case GgufValueType::I8: put<int8_t>(out, int8_t(v.i)); break;
    case GgufValueType::U16: put<uint16_t>(out, uint16_t(v.u)); break;
    case GgufValueType::I16: put<int16_t>(out, int16_t(v.i)); break;
    case GgufValueType::U32: put<uint32_t>(out, uint32_t(v.u)); break;
    case GgufValueType::I32: put<int32_t>(out, int32_t(v.i)); break;
    case GgufValueType::U64: put<uint64_t>(out, v.u); break;
    case GgufValueType::I64: put<int64_t>(out, v.i); break;
    case GgufValueType::F32: put<float>(out, float(v.f)); break;
    case GgufValueType::F64: put<double>(out, v.f); break;
    case GgufValueType::Bool: put<uint8_t>(out, v.u ? 1 : 0); break;
    case GgufValueType::String: put_string(out, v.str); break;
    case GgufValueType::Array:
      put<uint32_t>(out, uint32_t(v.elem_type));
      put<uint64_t>(out, v.count);
      if (v.elem_type == GgufValueType::String) {
        TF_CHECK(v.strings.size() == v.count, "gguf writer: string array count mismatch");
        for (std::string_view s : v.strings) put_string(out, s);
      } else if (v.elem_type == GgufValueType::Array) {
        TF_CHECK(v.arrays.size() == v.count, "gguf writer: nested array count mismatch");
        for (const GgufValue& a : v.arrays) put_value_body(out, a);
      } else {
        const size_t n = size_t(v.count * scalar_size(v.elem_type));
        TF_CHECK(n == 0 || v.raw, "gguf writer: numeric array without data");
        out.insert(out.end(), v.raw, v.raw + n);
      }
      break;
  }
}
}  // namespace

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {
  TF_CHECK(alignment != 0 && (alignment & (alignment - 1)) == 0, "gguf writer: alignment ", alignment,
           " is not a non-zero power of two");
  if (alignment != kGgufDefaultAlignment) add_u32("general.alignment", alignment);
}

void GgufWriter::begin_key(const std::string& key, GgufValueType type) {
  TF_CHECK(!key.empty() && key.size() <= kMaxKeyBytes, "gguf writer: bad key length for '", key, "'");
  TF_CHECK(keys_.emplace(key, 0).second, "gguf writer: duplicate metadata key '", key, "'");
  put_string(kv_bytes_, key);
  put<uint32_t>(kv_bytes_, uint32_t(type));
  ++kv_count_;
}

void GgufWriter::add_u8(const std::string& k, uint8_t v) {
  begin_key(k, GgufValueType::U8);
  put(kv_bytes_, v);
}
void GgufWriter::add_i8(const std::string& k, int8_t v) {
  begin_key(k, GgufValueType::I8);
  put(kv_bytes_, v);
}
void GgufWriter::add_u16(const std::string& k, uint16_t v) {
  begin_key(k, GgufValueType::U16);
  put(kv_bytes_, v);
}
void GgufWriter::add_i16(const std::string& k, int16_t v) {
  begin_key(k, GgufValueType::I16);
  put(kv_bytes_, v);
}
void GgufWriter::add_u32(const std::string& k, uint32_t v) {
  begin_key(k, GgufValueType::U32);
  put(kv_bytes_, v);
}
void GgufWriter::add_i32(const std::string& k, int32_t v) {
  begin_key(k, GgufValueType::I32);
  put(kv_bytes_, v);
}
void GgufWriter::add_u64(const std::string& k, uint64_t v) {
  begin_key(k, GgufValueType::U64);
  put(kv_bytes_, v);
}
void GgufWriter::add_i64(const std::string& k, int64_t v) {
  begin_key(k, GgufValueType::I64);
  put(kv_bytes_, v);
}
void GgufWriter::add_f32(const std::string& k, float v) {
  begin_key(k, GgufValueType::F32);
  put(kv_bytes_, v);
}
void GgufWriter::add_f64(const std::string& k, double v) {
  begin_key(k, GgufValueType::F64);
  put(kv_bytes_, v);
}
void GgufWriter::add_bool(const std::string& k, bool v) {
  begin_key(k, GgufValueType::Bool);
  put<uint8_t>(kv_bytes_, v ? 1 : 0);
}
void GgufWriter::add_string(const std::string& k, std::string_view v) {
  begin_key(k, GgufValueType::String);
  put_string(kv_bytes_, v);
}

void GgufWriter::add_string_array(const std::string& k, const std::vector<std::string>& v) {
  begin_key(k, GgufValueType::Array);
  put<uint32_t>(kv_bytes_, uint32_t(GgufValueType::String));
  put<uint64_t>(kv_bytes_, v.size());
  for (const std::string& s : v) put_string(kv_bytes_, s);
}

void GgufWriter::add_f32_array(const std::string& k, const std::vector<float>& v) {
  begin_key(k, GgufValueType::Array);
  put<uint32_t>(kv_bytes_, uint32_t(GgufValueType::F32));
  put<uint64_t>(kv_bytes_, v.size());
  for (float x : v) put(kv_bytes_, x);
}

void GgufWriter::add_i32_array(const std::string& k, const std::vector<int32_t>& v) {
  begin_key(k, GgufValueType::Array);
  put<uint32_t>(kv_bytes_, uint32_t(GgufValueType::I32));
  put<uint64_t>(kv_bytes_, v.size());
  for (int32_t x : v) put(kv_bytes_, x);
}

void GgufWriter::add_value(const std::string& k, const GgufValue& v) {
  begin_key(k, v.type);
  put_value_body(kv_bytes_, v);
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data,
                            size_t n_bytes) {
  TF_CHECK(!name.empty() && name.size() <= kMaxTensorNameBytes, "gguf writer: tensor name '", name,
           "' must be 1 to ", kMaxTensorNameBytes, " bytes");
  TF_CHECK(ne.size() <= size_t(kGgufMaxDims), "gguf writer: tensor '", name, "' has ", ne.size(),
           " dimensions; at most ", kGgufMaxDims);
  const GgmlTypeInfo info = ggml_type_info(uint32_t(type));
  TF_CHECK(info.name != nullptr, "gguf writer: tensor '", name, "' has unknown type ", uint32_t(type));
  int64_t n = 1;
  for (int64_t d : ne) {
    TF_CHECK(d >= 0 && !__builtin_mul_overflow(n, d, &n), "gguf writer: tensor '", name, "' has bad shape");
  }
  const int64_t row = ne.empty() ? 1 : ne[0];  // a 0-dim tensor is one element
  TF_CHECK(row % info.block_elems == 0, "gguf writer: tensor '", name, "' row length ", row,
           " is not a multiple of the ", info.name, " block size ", info.block_elems);
  const uint64_t expect = uint64_t(n) / uint64_t(info.block_elems) * uint64_t(info.block_bytes);
  TF_CHECK(expect == n_bytes, "gguf writer: tensor '", name, "' is given ", n_bytes, " bytes; its ",
           info.name, " shape needs ", expect);
  TF_CHECK(tensor_names_.emplace(name, 0).second, "gguf writer: duplicate tensor name '", name, "'");
  tensors_.push_back({name, type, std::move(ne), data, n_bytes});
}

void GgufWriter::write(const std::string& path) const {
  std::vector<uint8_t> head;
  head.insert(head.end(), {'G', 'G', 'U', 'F'});
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, kv_count_);
  head.insert(head.end(), kv_bytes_.begin(), kv_bytes_.end());
  uint64_t offset = 0;
  for (const PendingTensor& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, uint32_t(t.ne.size()));
    for (int64_t d : t.ne) put<int64_t>(head, d);
    put<uint32_t>(head, uint32_t(t.type));
    put<uint64_t>(head, offset);
    offset = align_up(offset + t.n_bytes, alignment_);
  }
  head.resize(size_t(align_up(head.size(), alignment_)), 0);

  // Streamed to a temporary file beside the target (merged models do not fit in memory twice),
  // fsync'ed and renamed over it, so a crash leaves the old file or the complete new one.
  AtomicFile file(path);
  file.write(head.data(), head.size());
  const std::vector<uint8_t> zeros(alignment_, 0);
  for (const PendingTensor& t : tensors_) {
    file.write(t.data, t.n_bytes);
    file.write(zeros.data(), align_up(t.n_bytes, alignment_) - t.n_bytes);
  }
  file.commit();
}

}  // namespace tf::io
