// GGUF reader, writer and llama mapping: a file written by gguf-py read back exactly, writer round
// trips, and hostile files (truncated, oversized lengths and counts, bad types, bad offsets,
// duplicates, bad alignment, deep nesting) each refused with a tf::Error naming the file and the
// problem, without allocating by an unchecked length.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "tests/test_util.h"

namespace tf::io {
namespace {

const std::string kFixture = std::string(TIGHTFIT_FIXTURES) + "/gguf_dequant.gguf";

// Raw GGUF bytes, for files no well-behaved writer would produce.
struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& put(T v) {
    const size_t at = b.size();
    b.resize(at + sizeof(T));
    std::memcpy(b.data() + at, &v, sizeof(T));
    return *this;
  }
  Bytes& str(std::string_view s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  }
  Bytes& kv_u32(std::string_view key, uint32_t v) { return str(key).put<uint32_t>(4).put<uint32_t>(v); }
  Bytes& tensor(std::string_view name, std::vector<int64_t> ne, uint32_t type, uint64_t offset) {
    str(name).put<uint32_t>(uint32_t(ne.size()));
    for (int64_t d : ne) put<int64_t>(d);
    return put<uint32_t>(type).put<uint64_t>(offset);
  }
  Bytes& pad(size_t align) {
    b.resize((b.size() + align - 1) / align * align, 0);
    return *this;
  }
  Bytes& data(size_t n, uint8_t v = 0) {
    b.insert(b.end(), n, v);
    return *this;
  }
};

// Parses an exact-size copy (so a read past the end would be caught by sanitizers) and returns
// the error message, or fails the test when the bytes are accepted.
std::string parse_error(const std::vector<uint8_t>& bytes, const std::string& name = "bad.gguf") {
  std::vector<uint8_t> copy(bytes);
  try {
    GgufFile::from_memory(copy.data(), copy.size(), name);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted";
  return {};
}

#define EXPECT_GGUF_ERROR(bytes, ...)                                                               \
  do {                                                                                              \
    const std::string msg_ = parse_error(bytes);                                                    \
    EXPECT_NE(msg_.find("bad.gguf: "), std::string::npos) << msg_;                                  \
    for (const char* part_ : {__VA_ARGS__}) EXPECT_NE(msg_.find(part_), std::string::npos) << msg_; \
  } while (0)

// A valid two-tensor file: F32 [2, 8] then Q8_0 [1, 32], data ending exactly at the end of file.
std::vector<uint8_t> valid_file(uint32_t version = 3) {
  Bytes f;
  f.header(2, 2, version).kv_u32("general.alignment", 32).str("general.name").put<uint32_t>(8).str("tiny");
  f.tensor("a", {8, 2}, 0, 0).tensor("b", {32, 1}, 8, 64).pad(32).data(64, 0x3f).data(34, 0x11);
  return f.b;
}

TEST(Gguf, ReadsMinimalV2AndV3) {
  for (uint32_t version : {2u, 3u}) {
    const std::vector<uint8_t> bytes = valid_file(version);
    const GgufFile f = GgufFile::from_memory(bytes.data(), bytes.size(), "tiny.gguf");
    EXPECT_EQ(f.version(), version);
    EXPECT_EQ(f.get_string("general.name"), "tiny");
    ASSERT_EQ(f.tensors().size(), 2u);
    const GgufTensorInfo& a = f.tensor("a");
    EXPECT_EQ(a.shape(), (std::vector<int64_t>{2, 8}));
    EXPECT_EQ(a.row_length(), 8);
    EXPECT_EQ(a.n_rows(), 2);
    EXPECT_EQ(a.n_bytes, 64u);
    EXPECT_EQ(a.row_bytes(), 32u);
    EXPECT_EQ(f.tensor("b").row_bytes(), 34u);
    EXPECT_EQ(a.data, bytes.data() + f.data_offset());
    EXPECT_EQ(f.tensor("b").bytes().size(), 34u);
    EXPECT_EQ(f.tensor("b").data[0], 0x11);
  }
}

TEST(Gguf, ReadsEveryValueTypeFromGgufPyFixture) {
  const GgufFile f = GgufFile::open(kFixture);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.get_u8("test.u8"), 200);
  EXPECT_EQ(f.get_i8("test.i8"), -100);
  EXPECT_EQ(f.get_u16("test.u16"), 60000);
  EXPECT_EQ(f.get_i16("test.i16"), -30000);
  EXPECT_EQ(f.get_u32("test.u32"), 4000000000u);
  EXPECT_EQ(f.get_i32("test.i32"), -2000000000);
  EXPECT_EQ(f.get_f32("test.f32"), 0.15625f);
  EXPECT_TRUE(f.get_bool("test.bool"));
  EXPECT_EQ(f.get_string("test.string"), "h\xc3\xa9llo gguf");
  EXPECT_EQ(f.get_u64("test.u64"), 18000000000000000000ull);
  EXPECT_EQ(f.get_i64("test.i64"), -9000000000000000000ll);
  EXPECT_EQ(f.get_f64("test.f64"), -2.5e-300);
  EXPECT_EQ(f.get_i32_array("test.array_i32"), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(f.get_string_array("test.array_string"), (std::vector<std::string_view>{"a", "", "ccc"}));
  const GgufValue& nested = f.get_array("test.array_nested", GgufValueType::Array);
  ASSERT_EQ(nested.arrays.size(), 2u);
  EXPECT_EQ(nested.arrays[0].count, 2u);
  EXPECT_EQ(nested.arrays[1].count, 1u);
  EXPECT_EQ(f.get_int("test.u16"), 60000);
  EXPECT_EQ(f.get_float("test.f32"), 0.15625);
  EXPECT_EQ(f.tensor("t.Q4_K").shape(), (std::vector<int64_t>{3, 512}));
  EXPECT_EQ(f.tensor("t.Q4_K").n_bytes, 3u * 2u * 144u);
}

TEST(Gguf, GettersNameFileKeyAndProblem) {
  const GgufFile f = GgufFile::open(kFixture);
  std::string m = test::error_of([&] { f.get_u32("test.i32"); });
  EXPECT_NE(m.find(kFixture), std::string::npos) << m;
  EXPECT_NE(m.find("'test.i32' has type i32, expected u32"), std::string::npos) << m;
  m = test::error_of([&] { f.get_u32("no.such.key"); });
  EXPECT_NE(m.find("'no.such.key' is missing"), std::string::npos) << m;
  m = test::error_of([&] { f.get_string_array("test.array_i32"); });
  EXPECT_NE(m.find("array of i32, expected an array of string"), std::string::npos) << m;
  m = test::error_of([&] { f.tensor("nope.weight"); });
  EXPECT_NE(m.find("tensor 'nope.weight' is not in the file"), std::string::npos) << m;
  m = test::error_of([&] { f.get_int("test.string"); });
  EXPECT_NE(m.find("expected an integer"), std::string::npos) << m;
}

std::string temp_dir() {
  const auto dir = std::filesystem::temp_directory_path() / ("tf_gguf_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir.string();
}

TEST(GgufWriter, RoundTripsMetadataAndTensorsWithAlignment) {
  const GgufFile src = GgufFile::open(kFixture);
  const std::string dir = temp_dir();
  const std::string path = dir + "/out.gguf";
  GgufWriter w(64);
  w.add_u8("k.u8", 7);
  w.add_i8("k.i8", -7);
  w.add_u16("k.u16", 700);
  w.add_i16("k.i16", -700);
  w.add_u32("k.u32", 70000);
  w.add_i32("k.i32", -70000);
  w.add_u64("k.u64", 1ull << 40);
  w.add_i64("k.i64", -(1ll << 40));
  w.add_f32("k.f32", 1.5f);
  w.add_f64("k.f64", 2.25);
  w.add_bool("k.bool", false);
  w.add_string("k.str", "text");
  w.add_string_array("k.strs", {"x", "yz"});
  w.add_f32_array("k.f32s", {0.5f, -1.0f});
  w.add_i32_array("k.i32s", {4, 5});
  w.add_value("k.nested", src.value("test.array_nested"));
  for (const GgufTensorInfo& t : src.tensors())
    w.add_tensor(t.name, t.type, std::vector<int64_t>(t.ne.begin(), t.ne.begin() + t.n_dims), t.data,
                 t.n_bytes);
  w.write(path);

  const GgufFile f = GgufFile::open(path);
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.data_offset() % 64, 0u);
  EXPECT_EQ(f.get_u8("k.u8"), 7);
  EXPECT_EQ(f.get_i8("k.i8"), -7);
  EXPECT_EQ(f.get_u16("k.u16"), 700);
  EXPECT_EQ(f.get_i16("k.i16"), -700);
  EXPECT_EQ(f.get_u32("k.u32"), 70000u);
  EXPECT_EQ(f.get_i32("k.i32"), -70000);
  EXPECT_EQ(f.get_u64("k.u64"), 1ull << 40);
  EXPECT_EQ(f.get_i64("k.i64"), -(1ll << 40));
  EXPECT_EQ(f.get_f32("k.f32"), 1.5f);
  EXPECT_EQ(f.get_f64("k.f64"), 2.25);
  EXPECT_FALSE(f.get_bool("k.bool"));
  EXPECT_EQ(f.get_string("k.str"), "text");
  EXPECT_EQ(f.get_string_array("k.strs"), (std::vector<std::string_view>{"x", "yz"}));
  EXPECT_EQ(f.get_f32_array("k.f32s"), (std::vector<float>{0.5f, -1.0f}));
  EXPECT_EQ(f.get_i32_array("k.i32s"), (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(f.get_array("k.nested", GgufValueType::Array).arrays.size(), 2u);
  ASSERT_EQ(f.tensors().size(), src.tensors().size());
  for (const GgufTensorInfo& t : src.tensors()) {
    const GgufTensorInfo& g = f.tensor(t.name);
    EXPECT_EQ(g.type, t.type);
    EXPECT_EQ(g.ne, t.ne);
    EXPECT_EQ(g.offset % 64, 0u);
    ASSERT_EQ(g.n_bytes, t.n_bytes);
    EXPECT_EQ(std::memcmp(g.data, t.data, t.n_bytes), 0) << t.name;
  }
  // Written through a temporary file renamed into place: nothing else is left in the directory.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()),
            1);
  std::filesystem::remove_all(dir);
}

TEST(GgufWriter, RefusesInconsistentInput) {
  GgufWriter w;
  w.add_u32("a", 1);
  EXPECT_THROW(w.add_u32("a", 2), Error);
  std::vector<uint8_t> data(34);
  EXPECT_THROW(w.add_tensor("q", GgmlType::Q8_0, {16}, data.data(), 34), Error);  // partial block
  EXPECT_THROW(w.add_tensor("q", GgmlType::Q8_0, {32}, data.data(), 33), Error);  // wrong size
  EXPECT_THROW(w.add_tensor("q", GgmlType::Q8_0, {}, data.data(), 0), Error);     // scalar of blocks
  w.add_tensor("q", GgmlType::Q8_0, {32}, data.data(), 34);
  EXPECT_THROW(w.add_tensor("q", GgmlType::Q8_0, {32}, data.data(), 34), Error);  // duplicate
  EXPECT_THROW(GgufWriter(48), Error);
}

// ---- hostile files ----

TEST(GgufBad, TruncationAtEveryOffset) {
  const std::vector<uint8_t> full = valid_file();
  for (size_t n = 0; n < full.size(); ++n) {
    SCOPED_TRACE(n);
    const std::string msg = parse_error(std::vector<uint8_t>(full.begin(), full.begin() + long(n)));
    EXPECT_NE(msg.find("bad.gguf: "), std::string::npos) << msg;
    const bool named =
        msg.find("truncated") != std::string::npos || msg.find("past the end") != std::string::npos ||
        msg.find("cannot fit") != std::string::npos || msg.find("remain in the file") != std::string::npos;
    EXPECT_TRUE(named) << msg;
  }
}

TEST(GgufBad, TruncatedFileOnDiskNamesThePath) {
  const std::string dir = temp_dir();
  const std::string path = dir + "/cut.gguf";
  const std::vector<uint8_t> full = valid_file();
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(full.data()), long(full.size() - 1));
  try {
    GgufFile::open(path);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path + ": tensor 'b'"), std::string::npos) << e.what();
  }
  std::ofstream(dir + "/empty.gguf", std::ios::binary);
  EXPECT_THROW(GgufFile::open(dir + "/empty.gguf"), Error);
  EXPECT_THROW(GgufFile::open(dir + "/missing.gguf"), Error);
  std::filesystem::remove_all(dir);
}

TEST(GgufBad, HeaderFields) {
  std::vector<uint8_t> f = valid_file();
  f[0] = 'X';
  EXPECT_GGUF_ERROR(f, "bad magic");
  for (uint32_t version : {1u, 4u}) {
    f = valid_file();
    std::memcpy(f.data() + 4, &version, 4);
    EXPECT_GGUF_ERROR(f, "unsupported GGUF version");
  }
  f = valid_file();
  std::swap(f[4], f[7]);
  std::swap(f[5], f[6]);
  EXPECT_GGUF_ERROR(f, "big-endian");
  EXPECT_GGUF_ERROR(Bytes().header(~0ull >> 1, 0).b, "tensor count");
  EXPECT_GGUF_ERROR(Bytes().header(0, ~0ull).b, "metadata count");
  EXPECT_GGUF_ERROR(Bytes().header(1000, 0).data(100).b, "tensor count 1000 cannot fit");
}

TEST(GgufBad, HugeLengths) {
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).put<uint64_t>(~0ull).data(16).b, "key of metadata entry 0",
                    "length");
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str("k").put<uint32_t>(8).put<uint64_t>(1ull << 62).data(16).b,
                    "string value of key 'k'", "only");
  // A string one byte longer than what remains.
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str("k").put<uint32_t>(8).put<uint64_t>(17).data(16).b, "key 'k'");
  EXPECT_GGUF_ERROR(
      Bytes().header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(0).put<uint64_t>(~0ull).data(16).b,
      "key 'k': array of", "cannot fit");
  EXPECT_GGUF_ERROR(
      Bytes().header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(1ull << 61).data(16).b,
      "array of", "string");
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str(std::string(70000, 'k')).put<uint32_t>(4).put<uint32_t>(1).b,
                    "the limit is 65535");
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor(std::string(64, 'n'), {32}, 0, 0).pad(32).data(128).b,
                    "the limit is 63");
}

TEST(GgufBad, UnknownTypes) {
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str("k").put<uint32_t>(13).put<uint32_t>(0).b, "key 'k'",
                    "unknown value type 13");
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(77).put<uint64_t>(0).b,
                    "unknown array element type 77");
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str("k").put<uint32_t>(7).put<uint8_t>(2).b, "bool value 2");
  for (uint32_t type : {4u, 5u, 99u, 0xffffffffu})
    EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("w", {32}, type, 0).pad(32).data(256).b, "tensor 'w'",
                      "unknown ggml type");
}

// A type tightfit cannot dequantize still opens, with its size known, so that the file can be
// inspected; loading it as a model is what refuses it.
TEST(Gguf, OpensTensorsOfTypesWithoutADequantizer) {
  const std::vector<uint8_t> b = Bytes().header(1, 0).tensor("w", {64}, 20, 0).pad(32).data(36).b;
  const GgufFile f = GgufFile::from_memory(b.data(), b.size(), "iq.gguf");
  const GgufTensorInfo& t = f.tensor("w");
  EXPECT_EQ(t.type, GgmlType::IQ4_NL);
  EXPECT_EQ(t.n_bytes, 36u);
  EXPECT_FALSE(ggml_type_info(uint32_t(t.type)).supported);
}

TEST(GgufBad, Dimensions) {
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("w", {1, 1, 1, 1, 1}, 0, 0).pad(32).data(32).b, "tensor 'w'",
                    "5 dimensions");
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("w", {1ll << 32, 1ll << 32}, 0, 0).pad(32).data(32).b,
                    "tensor 'w'", "element count overflows");
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("w", {4, -1}, 0, 0).pad(32).data(32).b, "negative dimension");
  // Fits in int64 elements but not in bytes: 2^62 F32 elements are 2^64 bytes.
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("w", {1ll << 31, 1ll << 31}, 0, 0).pad(32).data(32).b,
                    "byte size overflows");
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("w", {48, 2}, 8, 0).pad(32).data(256).b, "row length 48",
                    "block size 32");
}

TEST(GgufBad, Offsets) {
  auto two = [](uint64_t off_b, size_t data_bytes, uint32_t align = 32) {
    Bytes f;
    f.header(2, align == 32 ? 0 : 1);
    if (align != 32) f.kv_u32("general.alignment", align);
    f.tensor("a", {8}, 0, 0).tensor("b", {8}, 0, off_b).pad(align).data(data_bytes);
    return f.b;
  };
  ASSERT_NO_THROW({
    const std::vector<uint8_t> ok = two(32, 64);
    GgufFile::from_memory(ok.data(), ok.size(), "ok");
  });
  EXPECT_GGUF_ERROR(two(16, 64), "tensor 'b'", "not a multiple of the alignment");
  EXPECT_GGUF_ERROR(two(0, 64), "tensor 'b'", "overlaps");
  EXPECT_GGUF_ERROR(two(64, 128), "tensor 'b'", "gap");
  EXPECT_GGUF_ERROR(two(32, 60), "tensor 'b'", "past the end");
  EXPECT_GGUF_ERROR(two(1ull << 63, 64), "tensor 'b'");
  // With alignment 8, b at 16 would be a gap and at 8 overlapping: the running sum is 32.
  EXPECT_GGUF_ERROR(two(16, 64, 8), "tensor 'b'", "overlaps");
  EXPECT_GGUF_ERROR(Bytes().header(1, 0).tensor("a", {8}, 0, ~0ull & ~31ull).pad(32).data(32).b, "tensor 'a'",
                    "gap");
}

TEST(GgufBad, Duplicates) {
  EXPECT_GGUF_ERROR(Bytes().header(0, 2).kv_u32("k", 1).kv_u32("k", 2).b, "duplicate metadata key 'k'");
  EXPECT_GGUF_ERROR(Bytes().header(2, 0).tensor("w", {8}, 0, 0).tensor("w", {8}, 0, 32).pad(32).data(64).b,
                    "duplicate tensor name 'w'");
}

TEST(GgufBad, Alignment) {
  for (uint32_t a : {0u, 3u, 48u})
    EXPECT_GGUF_ERROR(Bytes().header(0, 1).kv_u32("general.alignment", a).b, "general.alignment",
                      "not a non-zero power of two");
  EXPECT_GGUF_ERROR(Bytes().header(0, 1).str("general.alignment").put<uint32_t>(10).put<uint64_t>(32).b,
                    "general.alignment has type u64, expected u32");
}

TEST(GgufBad, DeeplyNestedArrays) {
  Bytes f;
  f.header(0, 1).str("k").put<uint32_t>(9);
  for (int d = 0; d < kGgufMaxArrayDepth + 4; ++d) f.put<uint32_t>(9).put<uint64_t>(1);
  f.put<uint32_t>(4).put<uint64_t>(0);
  EXPECT_GGUF_ERROR(f.b, "key 'k'", "nested deeper than");
  Bytes ok;
  ok.header(0, 1).str("k").put<uint32_t>(9);
  for (int d = 0; d < kGgufMaxArrayDepth - 1; ++d) ok.put<uint32_t>(9).put<uint64_t>(1);
  ok.put<uint32_t>(4).put<uint64_t>(0);
  EXPECT_NO_THROW(GgufFile::from_memory(ok.b.data(), ok.b.size(), "ok"));
}

// A corrupted byte anywhere must end in a clean error or a successful parse, never a crash.
TEST(GgufBad, EverySingleByteCorruption) {
  const std::vector<uint8_t> full = valid_file();
  const size_t header_end = full.size() - 98;  // the data section: 64 + 34 bytes
  for (size_t i = 0; i < header_end; ++i) {
    for (uint8_t v : {uint8_t(0x00), uint8_t(0xff), uint8_t(0x80), uint8_t(full[i] + 1)}) {
      std::vector<uint8_t> f = full;
      f[i] = v;
      try {
        GgufFile::from_memory(f.data(), f.size(), "bad.gguf");
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("bad.gguf: "), std::string::npos) << e.what();
      }
    }
  }
}

// ---- llama mapping ----

struct TinyLlama {
  std::vector<uint16_t> embd = std::vector<uint16_t>(64 * 16);
  std::vector<float> norm = std::vector<float>(16, 1.0f);
  GgufWriter w;
  TinyLlama() {
    w.add_string("general.architecture", "llama");
    w.add_u32("llama.embedding_length", 16);
    w.add_u32("llama.feed_forward_length", 40);
    w.add_u32("llama.block_count", 2);
    w.add_u32("llama.attention.head_count", 4);
    w.add_u32("llama.attention.head_count_kv", 2);
    w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
    w.add_f32("llama.rope.freq_base", 50000.0f);
    w.add_u32("llama.context_length", 512);
    w.add_u32("llama.rope.dimension_count", 4);
    w.add_string_array("tokenizer.ggml.tokens", std::vector<std::string>(64, "t"));
    w.add_tensor("token_embd.weight", GgmlType::F16, {16, 64}, embd.data(), embd.size() * 2);
    w.add_tensor("output_norm.weight", GgmlType::F32, {16}, norm.data(), norm.size() * 4);
  }
  GgufFile write(const std::string& dir) {
    w.write(dir + "/tiny.gguf");
    return GgufFile::open(dir + "/tiny.gguf");
  }
};

TEST(GgufLlama, MapsConfig) {
  const std::string dir = temp_dir();
  TinyLlama t;
  const LlamaConfig c = llama_config_from_gguf(t.write(dir));
  EXPECT_EQ(c.hidden, 16);
  EXPECT_EQ(c.intermediate, 40);
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 4);
  EXPECT_EQ(c.vocab, 64);
  EXPECT_EQ(c.rms_eps, 1e-6f);
  EXPECT_EQ(c.rope.theta, 50000.0f);
  EXPECT_EQ(c.rope.head_dim, 4);
  EXPECT_EQ(c.rope.scaling, RopeScalingType::None);
  EXPECT_EQ(c.max_positions, 512);
  EXPECT_EQ(c.rope_layout, RopeLayout::Interleaved);
  EXPECT_TRUE(c.tie_embeddings);

  TinyLlama u;
  std::vector<uint16_t> out(64 * 16);
  u.w.add_tensor("output.weight", GgmlType::F16, {16, 64}, out.data(), out.size() * 2);
  u.w.add_string("llama.rope.scaling.type", "linear");
  u.w.add_f32("llama.rope.scaling.factor", 4.0f);
  const LlamaConfig cu = llama_config_from_gguf(u.write(dir));
  EXPECT_FALSE(cu.tie_embeddings);
  EXPECT_EQ(cu.rope.scaling, RopeScalingType::Linear);
  EXPECT_EQ(cu.rope.factor, 4.0f);
  std::filesystem::remove_all(dir);
}

TEST(GgufLlama, ReadsYarnAndRopeFreqs) {
  const std::string dir = temp_dir();
  TinyLlama t;
  t.w.add_string("llama.rope.scaling.type", "yarn");
  t.w.add_f32("llama.rope.scaling.factor", 4.0f);
  t.w.add_u32("llama.rope.scaling.original_context_length", 128);
  t.w.add_f32("llama.rope.scaling.yarn_beta_fast", 16.0f);
  t.w.add_f32("llama.rope.scaling.attn_factor", 1.0f);  // llama.cpp's neutral value
  t.w.add_bool("llama.rope.scaling.finetuned", true);
  const std::vector<float> factors = {1.0f, 8.0f};
  t.w.add_tensor("rope_freqs.weight", GgmlType::F32, {2}, factors.data(), factors.size() * 4);
  const LlamaConfig c = llama_config_from_gguf(t.write(dir));
  EXPECT_EQ(c.rope.scaling, RopeScalingType::Yarn);
  EXPECT_EQ(c.rope.factor, 4.0f);
  EXPECT_EQ(c.rope.original_max_positions, 128);
  EXPECT_EQ(c.rope.beta_fast, 16.0f);
  EXPECT_EQ(c.rope.beta_slow, 1.0f);
  EXPECT_EQ(c.rope.freq_factors, factors);
  std::filesystem::remove_all(dir);
}

TEST(GgufLlama, Qwen2KeepsHfRowsAndHasBiases) {
  const std::string dir = temp_dir();
  GgufWriter w;
  std::vector<uint16_t> embd(64 * 16);
  w.add_string("general.architecture", "qwen2");
  w.add_u32("qwen2.embedding_length", 16);
  w.add_u32("qwen2.feed_forward_length", 40);
  w.add_u32("qwen2.block_count", 2);
  w.add_u32("qwen2.attention.head_count", 4);
  w.add_u32("qwen2.attention.head_count_kv", 2);
  w.add_f32("qwen2.attention.layer_norm_rms_epsilon", 1e-6f);
  w.add_f32("qwen2.rope.freq_base", 1e6f);
  w.add_tensor("token_embd.weight", GgmlType::F16, {16, 64}, embd.data(), embd.size() * 2);
  w.write(dir + "/qwen2.gguf");
  const LlamaConfig c = llama_config_from_gguf(GgufFile::open(dir + "/qwen2.gguf"));
  EXPECT_EQ(c.architecture, "qwen2");
  EXPECT_EQ(c.rope_layout, RopeLayout::SplitHalf);
  EXPECT_TRUE(c.attention_bias);  // even where blk.0.attn_q.bias is missing: the load then names it
  EXPECT_EQ(c.rope.theta, 1e6f);
  EXPECT_EQ(parse_gguf_llama_tensor_name("blk.1.attn_k.bias"),
            (GgufLlamaTensor{GgufLlamaRole::AttnKBias, 1}));
  EXPECT_EQ(gguf_llama_tensor_name({GgufLlamaRole::AttnQBias, 0}), "blk.0.attn_q.bias");
  std::filesystem::remove_all(dir);
}

TEST(GgufLlama, RefusesInconsistentMetadata) {
  const std::string dir = temp_dir();
  const auto error_of = [&](const std::function<void(TinyLlama&)>& edit) {
    TinyLlama t;
    edit(t);
    try {
      llama_config_from_gguf(t.write(dir));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  std::string m = error_of([](TinyLlama& t) { t.w.add_u32("llama.vocab_size", 65); });
  EXPECT_NE(m.find("token_embd.weight has 64 rows but the vocabulary has 65"), std::string::npos) << m;
  m = error_of([](TinyLlama& t) { t.w.add_string("llama.rope.scaling.type", "longrope"); });
  EXPECT_NE(m.find("rope scaling type 'longrope' is not supported"), std::string::npos) << m;
  m = error_of([](TinyLlama& t) {
    t.w.add_string("llama.rope.scaling.type", "yarn");
    t.w.add_f32("llama.rope.scaling.factor", 4.0f);
    t.w.add_u32("llama.rope.scaling.original_context_length", 128);
    t.w.add_f32("llama.rope.scaling.yarn_ext_factor", 0.5f);
  });
  EXPECT_NE(m.find("'llama.rope.scaling.yarn_ext_factor' is not supported"), std::string::npos) << m;
  m = error_of([](TinyLlama& t) { t.w.add_f32("llama.rope.scaling.factor", 2.0f); });
  EXPECT_NE(m.find("'llama.rope.scaling.factor' is not supported with rope scaling type 'none'"),
            std::string::npos)
      << m;
  m = error_of([](TinyLlama& t) {
    std::vector<float> factors(3, 1.0f);
    t.w.add_tensor("rope_freqs.weight", GgmlType::F32, {3}, factors.data(), factors.size() * 4);
  });
  EXPECT_NE(m.find("rope_freqs.weight must hold 2 f32 factors"), std::string::npos) << m;
  m = error_of([](TinyLlama& t) { t.w.add_u32("llama.attention.key_length", 8); });
  EXPECT_NE(m.find("rotary dimension"), std::string::npos) << m;
  EXPECT_NE(m.find(dir + "/tiny.gguf"), std::string::npos) << m;

  GgufWriter w;
  w.add_string("general.architecture", "gpt2");
  w.write(dir + "/gpt2.gguf");
  try {
    llama_config_from_gguf(GgufFile::open(dir + "/gpt2.gguf"));
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'gpt2'"), std::string::npos) << e.what();
  }
  GgufWriter missing;
  missing.add_string("general.architecture", "llama");
  missing.write(dir + "/missing.gguf");
  try {
    llama_config_from_gguf(GgufFile::open(dir + "/missing.gguf"));
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'llama.embedding_length' is missing"), std::string::npos)
        << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(GgufLlama, TensorNames) {
  EXPECT_EQ(parse_gguf_llama_tensor_name("blk.12.attn_q.weight"),
            (GgufLlamaTensor{GgufLlamaRole::AttnQ, 12}));
  EXPECT_EQ(parse_gguf_llama_tensor_name("blk.0.ffn_down.weight"),
            (GgufLlamaTensor{GgufLlamaRole::FfnDown, 0}));
  EXPECT_EQ(parse_gguf_llama_tensor_name("token_embd.weight"),
            (GgufLlamaTensor{GgufLlamaRole::TokenEmbd, -1}));
  EXPECT_EQ(parse_gguf_llama_tensor_name("output.weight"), (GgufLlamaTensor{GgufLlamaRole::Output, -1}));
  for (const char* bad :
       {"blk.x.attn_q.weight", "blk.1.attn_output.bias", "blk.-1.attn_q.weight", "blk.01.attn_q.weight",
        "blk.1attn_q.weight", "output.weight.x", "rope_freqs.weight", ""})
    EXPECT_FALSE(parse_gguf_llama_tensor_name(bad).has_value()) << bad;
  for (int r = 0; r <= int(GgufLlamaRole::Output); ++r) {
    const GgufLlamaRole role = GgufLlamaRole(r);
    const bool per_block = role != GgufLlamaRole::TokenEmbd && role != GgufLlamaRole::OutputNorm &&
                           role != GgufLlamaRole::Output;
    const GgufLlamaTensor t{role, per_block ? 7 : -1};
    EXPECT_EQ(parse_gguf_llama_tensor_name(gguf_llama_tensor_name(t)), t) << gguf_llama_tensor_name(t);
  }
}

}  // namespace
}  // namespace tf::io
