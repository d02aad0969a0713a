#include "src/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <unordered_set>

#include "src/core/error.h"
#include "src/io/durable.h"

namespace tf::io {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr StDType kAllDTypes[] = {StDType::F64,     StDType::F32,     StDType::F16, StDType::BF16,
                                  StDType::F8_E4M3, StDType::F8_E5M2, StDType::I64, StDType::I32,
                                  StDType::I16,     StDType::I8,      StDType::U8,  StDType::BOOL};

std::optional<StDType> parse_dtype(std::string_view s) {
  for (StDType t : kAllDTypes) {
    if (st_dtype_name(t) == s) return t;
  }
  return std::nullopt;
}

std::string known_dtypes() {
  std::string s;
  for (StDType t : kAllDTypes) {
    if (!s.empty()) s += ", ";
    s += st_dtype_name(t);
  }
  return s;
}

// Names and values from a hostile file can be megabytes long or hold control bytes (a NUL would
// cut the message short, an escape sequence would reach the terminal): error messages show a
// bounded prefix with control bytes escaped.
std::string shown(std::string_view s) {
  constexpr size_t kMax = 120;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(1, '\'');
  for (char c : s.substr(0, kMax)) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      out.append("\\x").append(1, kHex[u >> 4]).append(1, kHex[u & 15]);
    } else {
      out.append(1, c);
    }
  }
  if (s.size() <= kMax) return out.append(1, '\'');
  return out.append("...' (").append(std::to_string(s.size())).append(" bytes)");
}

std::string brief(const json& v) {
  return shown(v.dump());
}

std::string errno_text() {
  return std::strerror(errno);
}

// Parses JSON text and rejects, while parsing, nesting deeper than `max_depth` (the formats here
// are shallow, so deep input is hostile and would only cost memory) and repeated keys in any
// object (nlohmann would silently keep the last one, so a name could mean two tensors).
// `where` prefixes every message ("<file>: header").
json parse_strict_json(std::string_view text, const std::string& where, int max_depth) {
  std::vector<std::set<std::string>> keys_seen;
  std::string outer_key;
  auto check = [&](int depth, json::parse_event_t event, json& parsed) {
    TF_CHECK(depth <= max_depth, where, " nests deeper than ", max_depth, " levels");
    switch (event) {
      case json::parse_event_t::object_start: keys_seen.emplace_back(); break;
      case json::parse_event_t::object_end: keys_seen.pop_back(); break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        const bool fresh = keys_seen.back().insert(key).second;
        if (depth == 1) {
          TF_CHECK(fresh, where, ": duplicate name ", shown(key));
          outer_key = key;
        }
        TF_CHECK(fresh, where, ": duplicate key ", shown(key), " inside ", shown(outer_key));
        break;
      }
      default: break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), check);
  } catch (const json::exception& e) {
    TF_FAIL(where, " is not valid JSON: ", e.what());
  }
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

uint64_t read_u64_le(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | uint64_t(p[i]);
  return v;
}

struct ParsedEntry {
  SafetensorsTensor tensor;
  uint64_t begin = 0;
  uint64_t end = 0;
};

ParsedEntry parse_entry(const std::string& path, const std::string& name, const json& v, uint64_t data_size) {
  const std::string where = path + ": tensor " + shown(name);
  TF_CHECK(!name.empty(), path, ": a tensor has an empty name");
  TF_CHECK(v.is_object(), where, ": entry is not a JSON object but ", brief(v));
  for (const auto& [key, unused] : v.items()) {
    TF_CHECK(key == "dtype" || key == "shape" || key == "data_offsets", where, ": unexpected field ",
             shown(key));
  }
  ParsedEntry e;
  e.tensor.name = name;

  auto dt = v.find("dtype");
  TF_CHECK(dt != v.end() && dt->is_string(), where, ": 'dtype' is missing or not a string");
  const auto& dt_name = dt->get_ref<const std::string&>();
  const std::optional<StDType> dtype = parse_dtype(dt_name);
  TF_CHECK(dtype, where, ": unknown dtype ", shown(dt_name), " (known: ", known_dtypes(), ")");
  e.tensor.dtype = *dtype;

  auto shape = v.find("shape");
  TF_CHECK(shape != v.end() && shape->is_array(), where, ": 'shape' is missing or not an array");
  TF_CHECK(shape->size() <= size_t(kMaxDims), where, ": shape has ", shape->size(), " dimensions; at most ",
           kMaxDims, " are supported");
  uint64_t numel = 1;
  for (size_t i = 0; i < shape->size(); ++i) {
    const json& d = (*shape)[i];
    TF_CHECK(!d.is_number_integer() || d.is_number_unsigned(), where, ": shape dimension ", i,
             " is negative (", d.dump(), ")");
    TF_CHECK(d.is_number_unsigned(), where, ": shape dimension ", i, " is not an integer: ", brief(d));
    const uint64_t n = d.get<uint64_t>();
    TF_CHECK(n <= uint64_t(std::numeric_limits<int64_t>::max()), where, ": shape dimension ", i, " (", n,
             ") does not fit in int64");
    TF_CHECK(!mul_overflows(numel, n, &numel), where, ": shape ", shape->dump(),
             " has more elements than 2^64");
    e.tensor.shape.push_back(int64_t(n));
  }
  uint64_t nbytes = 0;
  TF_CHECK(!mul_overflows(numel, st_dtype_size(*dtype), &nbytes), where, ": shape ", shape->dump(), " of ",
           dt_name, " needs more than 2^64 bytes");

  auto offsets = v.find("data_offsets");
  TF_CHECK(offsets != v.end() && offsets->is_array() && offsets->size() == 2, where,
           ": 'data_offsets' is missing or not a [begin, end] pair");
  for (const json& o : *offsets) {
    TF_CHECK(o.is_number_unsigned(), where, ": data_offsets ", brief(*offsets),
             " are not non-negative integers");
  }
  e.begin = (*offsets)[0].get<uint64_t>();
  e.end = (*offsets)[1].get<uint64_t>();
  TF_CHECK(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin");
  TF_CHECK(e.end <= data_size, where, ": data_offsets [", e.begin, ", ", e.end,
           "] run past the end of the data section (", data_size, " bytes)");
  TF_CHECK(e.end - e.begin == nbytes, where, ": data_offsets [", e.begin, ", ", e.end, "] span ",
           e.end - e.begin, " bytes but ", dt_name, " x ", shape->dump(), " needs ", nbytes);
  return e;
}

// Plain file name in the index's own directory: anything else could reach outside the model.
bool is_plain_file_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
}

std::string read_bounded_text_file(const std::string& path) {
  std::error_code ec;
  TF_CHECK(fs::is_regular_file(path, ec), path, ": not a readable regular file");
  const uintmax_t size = fs::file_size(path, ec);
  TF_CHECK(!ec, path, ": cannot read its size: ", ec.message());
  TF_CHECK(size <= kMaxSafetensorsHeader, path, ": ", size, " bytes is larger than the ",
           kMaxSafetensorsHeader, "-byte limit for an index");
  std::ifstream in(path, std::ios::binary);
  TF_CHECK(in, path, ": cannot open: ", errno_text());
  std::string text(size_t(size), '\0');
  in.read(text.data(), std::streamsize(size));
  TF_CHECK(in.gcount() == std::streamsize(size), path, ": read ", in.gcount(), " of ", size, " bytes");
  return text;
}

}  // namespace

size_t st_dtype_size(StDType t) {
  switch (t) {
    case StDType::F64: return 8;
    case StDType::F32: return 4;
    case StDType::F16: return 2;
    case StDType::BF16: return 2;
    case StDType::F8_E4M3: return 1;
    case StDType::F8_E5M2: return 1;
    case StDType::I64: return 8;
    case StDType::I32: return 4;
    case StDType::I16: return 2;
    case StDType::I8: return 1;
    case StDType::U8: return 1;
    case StDType::BOOL: return 1;
  }
  return 0;
}

std::string_view st_dtype_name(StDType t) {
  switch (t) {
    case StDType::F64: return "F64";
    case StDType::F32: return "F32";
    case StDType::F16: return "F16";
    case StDType::BF16: return "BF16";
    case StDType::F8_E4M3: return "F8_E4M3";
    case StDType::F8_E5M2: return "F8_E5M2";
    case StDType::I64: return "I64";
    case StDType::I32: return "I32";
    case StDType::I16: return "I16";
    case StDType::I8: return "I8";
    case StDType::U8: return "U8";
    case StDType::BOOL: return "BOOL";
  }
  return "?";
}

std::optional<DType> to_dtype(StDType t) {
  switch (t) {
    case StDType::F32: return DType::F32;
    case StDType::BF16: return DType::BF16;
    case StDType::F16: return DType::F16;
    case StDType::I32: return DType::I32;
    default: return std::nullopt;
  }
}

StDType to_st_dtype(DType t) {
  switch (t) {
    case DType::F32: return StDType::F32;
    case DType::BF16: return StDType::BF16;
    case DType::F16: return StDType::F16;
    case DType::I32: return StDType::I32;
    default: break;
  }
  TF_FAIL("dtype ", dtype_name(t), " has no safetensors equivalent");
}

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string SafetensorsTensor::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) ::munmap(addr, size);
  }
};

SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TF_CHECK(fd >= 0, path, ": cannot open safetensors file: ", errno_text());
  struct stat st {};
  const int stat_rc = ::fstat(fd, &st);
  const int stat_errno = errno;
  if (stat_rc != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    TF_FAIL(path, ": not a regular file", stat_rc != 0 ? std::string(": ") + std::strerror(stat_errno) : "");
  }
  const uint64_t file_size = uint64_t(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    TF_FAIL(path, ": file is ", file_size, " bytes, too short for the 8-byte header length");
  }
  f.map_ = std::make_unique<Mapping>();
  void* addr = ::mmap(nullptr, size_t(file_size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  TF_CHECK(addr != MAP_FAILED, path, ": cannot map ", file_size, " bytes: ", std::strerror(map_errno));
  f.map_->addr = addr;
  f.map_->size = size_t(file_size);
  const auto* base = static_cast<const std::byte*>(addr);

  const uint64_t header_len = read_u64_le(base);
  TF_CHECK(header_len <= kMaxSafetensorsHeader, path, ": header length ", header_len, " exceeds the ",
           kMaxSafetensorsHeader, "-byte limit");
  TF_CHECK(header_len <= file_size - 8, path, ": header length ", header_len,
           " runs past the end of the file (", file_size, " bytes)");
  const uint64_t data_size = file_size - 8 - header_len;
  const std::byte* data = base + 8 + header_len;

  const std::string where = path + ": header";
  const json header = parse_strict_json(
      std::string_view(reinterpret_cast<const char*>(base + 8), size_t(header_len)), where, 3);
  TF_CHECK(header.is_object(), where, " is not a JSON object but ", brief(header));

  std::vector<ParsedEntry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      TF_CHECK(value.is_object(), path, ": __metadata__ is not a JSON object but ", brief(value));
      for (const auto& [key, v] : value.items()) {
        TF_CHECK(v.is_string(), path, ": __metadata__ value of ", shown(key), " is not a string but ",
                 brief(v));
        f.metadata_.emplace(key, v.get<std::string>());
      }
      continue;
    }
    entries.push_back(parse_entry(path, name, value, data_size));
  }

  // The tensors must tile the data section exactly: any gap or overlap means bytes that belong
  // to no tensor or to two, which a correct writer never produces.
  std::stable_sort(entries.begin(), entries.end(), [](const ParsedEntry& a, const ParsedEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const ParsedEntry* prev = nullptr;
  for (const ParsedEntry& e : entries) {
    const std::string& name = e.tensor.name;
    if (!prev) {
      TF_CHECK(e.begin == 0, path, ": tensor data does not start at offset 0: the first tensor, ",
               shown(name), ", begins at ", e.begin);
    } else {
      TF_CHECK(e.begin >= expected, path, ": tensor ", shown(name), " [", e.begin, ", ", e.end,
               ") overlaps tensor ", shown(prev->tensor.name), " [", prev->begin, ", ", prev->end, ")");
      TF_CHECK(e.begin == expected, path, ": gap of ", e.begin - expected, " bytes between tensor ",
               shown(prev->tensor.name), " (ends at ", expected, ") and tensor ", shown(name), " (begins at ",
               e.begin, ")");
    }
    expected = e.end;
    prev = &e;
  }
  TF_CHECK(expected == data_size, path, ": the tensors end at data offset ", expected,
           " but the data section holds ", data_size, " bytes");

  f.tensors_.reserve(entries.size());
  for (ParsedEntry& e : entries) {
    e.tensor.bytes = std::span<const std::byte>(data + e.begin, size_t(e.end - e.begin));
    f.by_name_.emplace(e.tensor.name, f.tensors_.size());
    f.tensors_.push_back(std::move(e.tensor));
  }
  return f;
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const SafetensorsTensor& SafetensorsFile::get(std::string_view name) const {
  const SafetensorsTensor* t = find(name);
  TF_CHECK(t, path_, ": no tensor named ", shown(name), " (the file holds ", tensors_.size(), ")");
  return *t;
}

namespace {

TensorView make_view(const SafetensorsTensor& t, const std::string& source) {
  const std::optional<DType> dtype = to_dtype(t.dtype);
  TF_CHECK(dtype, source, ": tensor ", shown(t.name), " has dtype ", st_dtype_name(t.dtype),
           ", which tightfit does not compute with (F32, BF16, F16 and I32 only)");
  TF_CHECK(reinterpret_cast<uintptr_t>(t.bytes.data()) % dtype_size(*dtype) == 0, source, ": tensor ",
           shown(t.name), " is not aligned to its ", dtype_size(*dtype),
           "-byte elements in the file; copy its bytes instead of viewing them");
  TensorView v;
  // The mapping is read-only; TensorView has no const flavour, so writes through it would fault.
  v.data = const_cast<std::byte*>(t.bytes.data());
  v.dtype = *dtype;
  v.ndim = int(t.shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[size_t(d)] = t.shape[size_t(d)];
    v.strides[size_t(d)] = stride;
    stride *= t.shape[size_t(d)];
  }
  v.name = t.name;
  return v;
}

}  // namespace

TensorView SafetensorsFile::view(std::string_view name) const {
  return make_view(get(name), path_);
}

SafetensorsModel SafetensorsModel::open(const std::string& path) {
  SafetensorsModel m;
  std::error_code ec;
  std::string file = path;
  if (fs::is_directory(path, ec)) {
    const fs::path dir(path);
    if (fs::exists(dir / "model.safetensors.index.json", ec)) {
      file = (dir / "model.safetensors.index.json").string();
    } else if (fs::exists(dir / "model.safetensors", ec)) {
      file = (dir / "model.safetensors").string();
    } else {
      TF_FAIL(path, ": the directory holds neither model.safetensors.index.json nor model.safetensors");
    }
  }
  m.source_ = file;

  if (fs::path(file).extension() != ".json") {
    m.shards_.push_back(SafetensorsFile::open(file));
    const auto& tensors = m.shards_[0].tensors();
    for (size_t i = 0; i < tensors.size(); ++i) m.index_.emplace(tensors[i].name, std::pair{size_t(0), i});
    return m;
  }

  const std::string text = read_bounded_text_file(file);
  const json index = parse_strict_json(text, file, 3);
  TF_CHECK(index.is_object(), file, " is not a JSON object but ", brief(index));
  auto wm = index.find("weight_map");
  TF_CHECK(wm != index.end() && wm->is_object(), file, ": 'weight_map' is missing or not an object");
  TF_CHECK(!wm->empty(), file, ": 'weight_map' is empty");

  const fs::path dir = fs::path(file).parent_path();
  std::unordered_map<std::string, size_t> shard_of_name;  // shard file name -> position in shards_
  std::vector<std::string> shard_names;
  for (const auto& [name, shard] : wm->items()) {
    TF_CHECK(shard.is_string(), file, ": weight_map entry for tensor ", shown(name),
             " is not a file name but ", brief(shard));
    const auto& shard_name = shard.get_ref<const std::string&>();
    TF_CHECK(is_plain_file_name(shard_name), file, ": tensor ", shown(name), " is mapped to shard ",
             shown(shard_name), ", which is not a plain file name in the index's directory");
    if (shard_of_name.emplace(shard_name, shard_names.size()).second) shard_names.push_back(shard_name);
  }
  for (const std::string& shard_name : shard_names) {
    const fs::path shard_path = dir / shard_name;
    TF_CHECK(fs::is_regular_file(shard_path, ec), file, ": shard ", shown(shard_name),
             " named by the weight_map does not exist (looked for ", shard_path.string(), ")");
    m.shards_.push_back(SafetensorsFile::open(shard_path.string()));
  }
  for (const auto& [name, shard] : wm->items()) {
    const size_t s = shard_of_name.at(shard.get<std::string>());
    const SafetensorsTensor* t = m.shards_[s].find(name);
    TF_CHECK(t, file, ": tensor ", shown(name), " is mapped to shard ", shown(shard_names[s]),
             ", which does not contain it");
    m.index_.emplace(name, std::pair{s, size_t(t - m.shards_[s].tensors().data())});
  }
  for (size_t s = 0; s < m.shards_.size(); ++s) {
    for (const SafetensorsTensor& t : m.shards_[s].tensors()) {
      auto it = wm->find(t.name);
      TF_CHECK(it != wm->end(), file, ": shard ", shown(shard_names[s]), " holds tensor ", shown(t.name),
               ", which the weight_map does not list");
      TF_CHECK(it->get<std::string>() == shard_names[s], file, ": shard ", shown(shard_names[s]),
               " holds tensor ", shown(t.name), ", which the weight_map puts in ",
               shown(it->get<std::string>()));
    }
  }
  return m;
}

std::vector<std::string> SafetensorsModel::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, unused] : index_) out.push_back(name);
  std::sort(out.begin(), out.end());
  return out;
}

const SafetensorsTensor* SafetensorsModel::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &shards_[it->second.first].tensors()[it->second.second];
}

const SafetensorsTensor& SafetensorsModel::get(std::string_view name) const {
  const SafetensorsTensor* t = find(name);
  TF_CHECK(t, source_, ": no tensor named ", shown(name), " (the model holds ", index_.size(), ")");
  return *t;
}

TensorView SafetensorsModel::view(std::string_view name) const {
  const SafetensorsTensor& t = get(name);
  return make_view(t, shards_[index_.at(std::string(name)).first].path());
}

SafetensorsWriteTensor SafetensorsWriteTensor::from_view(const TensorView& v, std::string name) {
  TF_CHECK(v.device == Device::CPU && v.is_contiguous(), "tensor ", shown(name),
           " must be a contiguous CPU tensor to be written");
  SafetensorsWriteTensor t;
  t.name = std::move(name);
  t.dtype = to_st_dtype(v.dtype);
  t.shape.assign(v.shape.begin(), v.shape.begin() + v.ndim);
  t.bytes = std::span<const std::byte>(static_cast<const std::byte*>(v.data), v.nbytes());
  return t;
}

void write_safetensors(const std::string& path, std::span<const SafetensorsWriteTensor> tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::unordered_set<std::string> names;
  for (const SafetensorsWriteTensor& t : tensors) {
    const std::string where = path + ": tensor " + shown(t.name);
    TF_CHECK(!t.name.empty(), path, ": cannot write a tensor with an empty name");
    TF_CHECK(t.name != "__metadata__", where, ": the name is reserved for the metadata");
    TF_CHECK(names.insert(t.name).second, where, ": the name is given twice");
    TF_CHECK(t.shape.size() <= size_t(kMaxDims), where, ": ", t.shape.size(), " dimensions; at most ",
             kMaxDims);
    uint64_t nbytes = st_dtype_size(t.dtype);
    for (int64_t d : t.shape) {
      TF_CHECK(d >= 0, where, ": negative dimension ", d);
      TF_CHECK(!mul_overflows(nbytes, uint64_t(d), &nbytes), where, ": size overflows 64 bits");
    }
    TF_CHECK(nbytes == t.bytes.size(), where, ": ", st_dtype_name(t.dtype), " x shape needs ", nbytes,
             " bytes but ", t.bytes.size(), " were given");
  }

  // Largest elements first: every offset is then a multiple of each later tensor's element size.
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return st_dtype_size(tensors[a].dtype) > st_dtype_size(tensors[b].dtype);
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i : order) {
    const SafetensorsWriteTensor& t = tensors[i];
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = st_dtype_name(t.dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + t.bytes.size()};
    header[t.name] = std::move(entry);
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  // The data section then starts 8-byte aligned (the format allows trailing spaces in the header).
  text.append((8 - text.size() % 8) % 8, ' ');
  std::byte len[8];
  for (int i = 0; i < 8; ++i) len[i] = std::byte((uint64_t(text.size()) >> (8 * i)) & 0xff);

  AtomicFile file(path);
  file.write(len, sizeof(len));
  file.write(text.data(), text.size());
  for (size_t i : order) file.write(tensors[i].bytes.data(), tensors[i].bytes.size());
  file.commit();
}

}  // namespace tf::io
