#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/io/safetensors.h"

using namespace tf;
using namespace tf::io;
namespace fs = std::filesystem;

namespace {

// A fresh directory per test, removed afterwards.
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (fs::temp_directory_path() / "tf_safetensors_XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
  return s;
}

// A file made by hand: the 8-byte length, the header text as given, then `data_size` bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_size) {
  write_bytes(path, u64_le(header.size()) + header + std::string(data_size, '\x5a'));
}

// Runs `f`, which must throw a tf::Error whose message holds every one of `parts`.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "no tf::Error thrown; expected one mentioning '" << parts.back() << "'";
}

std::span<const std::byte> as_bytes_of(const std::vector<float>& v) {
  return std::as_bytes(std::span(v));
}

template <typename T>
std::vector<T> values_of(const SafetensorsTensor& t) {
  std::vector<T> out(t.bytes.size() / sizeof(T));
  std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  return out;
}

TEST_F(SafetensorsTest, RoundTripKeepsBytesShapesAndMetadataAndAlignsEveryTensor) {
  Philox rng(7, 0);
  std::vector<float> f32(15);
  for (size_t i = 0; i < f32.size(); ++i) f32[i] = rng.normal(i);
  // An odd number of 2-byte elements, given first: written naively it would misalign the f32 data.
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc020, 0x0001, 0x7f80, 0xffff, 0x8000, 0x4049};
  const std::vector<int32_t> i32 = {-7, 0, 1 << 30, -(1 << 30)};
  const std::vector<uint16_t> f16 = {0x3c00, 0x0400, 0xfbff};
  const std::vector<float> scalar = {3.25f};
  const std::vector<SafetensorsWriteTensor> in = {
      {"bf16.odd", StDType::BF16, {7}, std::as_bytes(std::span(bf16))},
      {"layers.0.weight", StDType::F32, {3, 5}, as_bytes_of(f32)},
      {"ids", StDType::I32, {2, 2}, std::as_bytes(std::span(i32))},
      {"half", StDType::F16, {1, 1, 1, 3}, std::as_bytes(std::span(f16))},
      {"scalar", StDType::F32, {}, as_bytes_of(scalar)},
      {"empty", StDType::F32, {0, 4}, {}},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "round \"trip\" \xc3\xa9"}};
  const std::string path = file("rt.safetensors");
  write_safetensors(path, in, meta);

  const std::string raw = read_bytes(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | uint8_t(raw[size_t(i)]);
  EXPECT_EQ(header_len % 8, 0u) << "header must be padded so the data starts 8-byte aligned";
  EXPECT_EQ(raw[8 + header_len - 1] == ' ' || raw[8 + header_len - 1] == '}', true);

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), in.size());
  for (const SafetensorsWriteTensor& w : in) {
    SCOPED_TRACE(w.name);
    const SafetensorsTensor& t = f.get(w.name);
    EXPECT_EQ(t.dtype, w.dtype);
    EXPECT_EQ(t.shape, w.shape);
    ASSERT_EQ(t.bytes.size(), w.bytes.size());
    EXPECT_EQ(std::memcmp(t.bytes.data(), w.bytes.data(), w.bytes.size()), 0);
    const TensorView v = f.view(w.name);  // throws if misaligned
    EXPECT_EQ(v.numel(), t.numel());
    EXPECT_TRUE(v.is_contiguous());
  }
  // Data order: element sizes never grow, and within one size the given order is kept.
  std::vector<std::string> order;
  for (const SafetensorsTensor& t : f.tensors()) order.push_back(t.name);
  EXPECT_EQ(order,
            (std::vector<std::string>{"layers.0.weight", "ids", "scalar", "empty", "bf16.odd", "half"}));
  EXPECT_EQ(f.view("layers.0.weight").as<const float>()[14], f32[14]);
  EXPECT_EQ(f.view("layers.0.weight").shape_str(), "[3, 5]");

  const SafetensorsModel m = SafetensorsModel::open(path);
  EXPECT_EQ(m.size(), in.size());
  EXPECT_EQ(m.view("ids").as<const int32_t>()[2], 1 << 30);
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::others_read, fs::perms::others_read);
}

TEST_F(SafetensorsTest, WriteReplacesAtomicallyAndCleansUpOnFailure) {
  const std::string path = file("w.safetensors");
  const std::vector<float> a = {1, 2}, b = {3, 4, 5};
  write_safetensors(path, std::vector<SafetensorsWriteTensor>{{"x", StDType::F32, {2}, as_bytes_of(a)}});
  write_safetensors(path, std::vector<SafetensorsWriteTensor>{{"x", StDType::F32, {3}, as_bytes_of(b)}});
  EXPECT_EQ(values_of<float>(SafetensorsFile::open(path).get("x")), b);

  // Invalid input is refused before anything is written: the old file stays.
  expect_error(
      [&] {
        write_safetensors(path,
                          std::vector<SafetensorsWriteTensor>{{"x", StDType::F32, {2}, as_bytes_of(a)},
                                                              {"x", StDType::F32, {2}, as_bytes_of(a)}});
      },
      {path, "'x'", "given twice"});
  expect_error(
      [&] {
        write_safetensors(path,
                          std::vector<SafetensorsWriteTensor>{{"x", StDType::F32, {3}, as_bytes_of(a)}});
      },
      {path, "needs 12 bytes but 8 were given"});
  expect_error(
      [&] {
        write_safetensors(
            path, std::vector<SafetensorsWriteTensor>{{"__metadata__", StDType::F32, {2}, as_bytes_of(a)}});
      },
      {path, "reserved"});
  expect_error(
      [&] {
        write_safetensors(
            path, std::vector<SafetensorsWriteTensor>{{"x", StDType::F32, {1, 1, 1, 1, 2}, as_bytes_of(a)}});
      },
      {path, "5 dimensions"});
  EXPECT_EQ(values_of<float>(SafetensorsFile::open(path).get("x")), b);

  const std::string missing_dir = file("no/such/dir/w.safetensors");
  expect_error(
      [&] {
        write_safetensors(missing_dir,
                          std::vector<SafetensorsWriteTensor>{{"x", StDType::F32, {2}, as_bytes_of(a)}});
      },
      {missing_dir, "temporary file"});
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(dir_)) entries += e.path().filename() != "no" ? 1 : 0;
  EXPECT_EQ(entries, 1u) << "a temporary file was left behind";
}

TEST_F(SafetensorsTest, ReadsAFileWrittenByThePythonPackage) {
  const std::string path = std::string(TIGHTFIT_FIXTURES) + "/python_small.safetensors";
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"},
                                                              {"source", "make_safetensors_fixture.py"}}));
  EXPECT_EQ(f.tensors().size(), 8u);
  EXPECT_EQ(values_of<float>(f.get("f32")), (std::vector<float>{-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f}));
  EXPECT_EQ(f.get("f32").shape, (std::vector<int64_t>{2, 3}));
  const TensorView bf = f.view("bf16");
  ASSERT_EQ(bf.dtype, DType::BF16);
  const float bf_want[] = {1.0f, -2.5f, 3.140625f, 0.0078125f};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(bf16_to_f32(bf.as<const uint16_t>()[i]), bf_want[i]);
  const TensorView h = f.view("f16");
  EXPECT_EQ(h.shape_str(), "[3, 1]");
  EXPECT_EQ(f16_to_f32(h.as<const uint16_t>()[0]), 0.5f);
  EXPECT_EQ(f16_to_f32(h.as<const uint16_t>()[1]), -65504.0f);
  EXPECT_EQ(f16_to_f32(h.as<const uint16_t>()[2]), std::ldexp(1.0f, -14));
  EXPECT_EQ(values_of<int32_t>(f.get("i32")), (std::vector<int32_t>{INT32_MIN, -1, 0, 1, INT32_MAX}));
  EXPECT_EQ(f.view("scalar").ndim, 0);
  EXPECT_EQ(f.view("scalar").as<const float>()[0], 42.0f);
  EXPECT_EQ(f.get("empty").shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(f.get("empty").bytes.size(), 0u);
  EXPECT_EQ(values_of<int64_t>(f.get("i64")), (std::vector<int64_t>{-1, int64_t(1) << 40}));
  EXPECT_EQ(values_of<uint8_t>(f.get("u8")), (std::vector<uint8_t>{0, 127, 255}));
  expect_error([&] { (void)f.view("i64"); }, {path, "'i64'", "dtype I64"});
  expect_error([&] { (void)f.get("f64"); }, {path, "no tensor named 'f64'"});
}

TEST_F(SafetensorsTest, GoldenFixturesHoldWhatTheScriptDocuments) {
  for (const char* name : {"golden_tiny.safetensors", "golden_tiny_llama3.safetensors"}) {
    SCOPED_TRACE(name);
    const SafetensorsFile f = SafetensorsFile::open(std::string(TIGHTFIT_FIXTURES) + "/" + name);
    // 21 base weights, 14 LoRA modules x (A, B, dA, dB), input_ids, labels, logits, loss.
    EXPECT_EQ(f.tensors().size(), 21u + 14u * 4u + 4u);
    EXPECT_EQ(f.metadata().at("hidden_size"), "64");
    EXPECT_EQ(f.metadata().at("lora_r"), "4");
    EXPECT_EQ(f.get("model.layers.1.self_attn.k_proj.weight").shape, (std::vector<int64_t>{32, 64}));
    EXPECT_EQ(f.get("model.layers.0.mlp.down_proj.lora_A.weight").shape, (std::vector<int64_t>{4, 128}));
    EXPECT_EQ(f.get("model.layers.0.mlp.down_proj.lora_B.weight.grad").shape, (std::vector<int64_t>{64, 4}));
    EXPECT_EQ(f.get("logits").shape, (std::vector<int64_t>{2, 16, 256}));
    const TensorView labels = f.view("labels");
    EXPECT_EQ(labels.dtype, DType::I32);
    EXPECT_EQ(labels.as<const int32_t>()[4], -100);
    EXPECT_EQ(labels.as<const int32_t>()[16 + 5], f.view("input_ids").as<const int32_t>()[16 + 5]);
    // Random weights give a loss near ln(256) = 5.55, well above 0.
    EXPECT_GT(f.view("loss").as<const float>()[0], 4.0f);
  }
}

TEST_F(SafetensorsTest, EveryTruncationIsRefused) {
  const std::vector<float> a = {1, 2, 3};
  const std::vector<int32_t> b = {4, 5};
  const std::string good = file("good.safetensors");
  write_safetensors(
      good,
      std::vector<SafetensorsWriteTensor>{{"a", StDType::F32, {3}, as_bytes_of(a)},
                                          {"b", StDType::I32, {2}, std::as_bytes(std::span(b))}},
      {{"k", "v"}});
  const std::string bytes = read_bytes(good);
  const std::string cut = file("cut.safetensors");
  for (size_t n = 0; n < bytes.size(); ++n) {
    SCOPED_TRACE(n);
    write_bytes(cut, bytes.substr(0, n));
    expect_error([&] { (void)SafetensorsFile::open(cut); }, {cut});
  }
  expect_error(
      [&] {
        write_bytes(cut, bytes.substr(0, 5));
        (void)SafetensorsFile::open(cut);
      },
      {"5 bytes, too short"});
  expect_error(
      [&] {
        write_bytes(cut, bytes.substr(0, 20));
        (void)SafetensorsFile::open(cut);
      },
      {"runs past the end of the file"});
  expect_error(
      [&] {
        write_bytes(cut, bytes.substr(0, bytes.size() - 1));
        (void)SafetensorsFile::open(cut);
      },
      {"run past the end of the data section"});
}

TEST_F(SafetensorsTest, HeaderLengthIsCheckedBeforeUse) {
  const std::string p = file("len.safetensors");
  write_bytes(p, u64_le(~uint64_t(0)) + "{}");
  expect_error([&] { (void)SafetensorsFile::open(p); }, {p, "header length 18446744073709551615 exceeds"});
  write_bytes(p, u64_le(kMaxSafetensorsHeader + 1) + "{}");
  expect_error([&] { (void)SafetensorsFile::open(p); }, {p, "exceeds the 100000000-byte limit"});
  write_bytes(p, u64_le(50) + std::string(12, ' '));
  expect_error([&] { (void)SafetensorsFile::open(p); },
               {p, "header length 50 runs past the end of the file (20 bytes)"});
  // A sparse file larger than the limit: the length is refused without reading (or allocating) it.
  write_bytes(p, u64_le(kMaxSafetensorsHeader + 8));
  ASSERT_EQ(::truncate(p.c_str(), off_t(2 * kMaxSafetensorsHeader)), 0);
  expect_error([&] { (void)SafetensorsFile::open(p); }, {p, "exceeds"});

  write_bytes(p, "");
  expect_error([&] { (void)SafetensorsFile::open(p); }, {p, "0 bytes, too short"});
  expect_error([&] { (void)SafetensorsFile::open(dir_.string()); }, {dir_.string(), "not a regular file"});
  const std::string none = file("none.safetensors");
  expect_error([&] { (void)SafetensorsFile::open(none); }, {none, "cannot open"});
}

TEST_F(SafetensorsTest, MalformedHeadersNameTheFileTensorAndProblem) {
  struct Case {
    std::string header;
    size_t data_size;
    std::string expected;
  };
  auto entry = [](const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
  };
  const std::string a_ok = R"("a":)" + entry("F32", "[2]", "[0,8]");
  const std::vector<Case> cases = {
      {R"({"a":)", 0, "header is not valid JSON"},
      {R"({} trailing)", 0, "header is not valid JSON"},
      {"{\"a\xff\":1}", 0, "header is not valid JSON"},
      {"[1,2]", 0, "header is not a JSON object but '[1,2]'"},
      {"3", 0, "header is not a JSON object"},
      {R"({"a":)" + entry("F7", "[2]", "[0,8]") + "}", 8, "tensor 'a': unknown dtype 'F7' (known: F64, F32"},
      {R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8, "tensor 'a': 'dtype' is missing"},
      {R"({"a":)" + entry("F32", "[-2]", "[0,8]") + "}", 8, "tensor 'a': shape dimension 0 is negative (-2)"},
      {R"({"a":)" + entry("F32", "[2.0]", "[0,8]") + "}", 8,
       "tensor 'a': shape dimension 0 is not an integer"},
      {R"({"a":)" + entry("F32", R"(["2"])", "[0,8]") + "}", 8, "shape dimension 0 is not an integer"},
      {R"({"a":)" + entry("F32", "2", "[0,8]") + "}", 8, "tensor 'a': 'shape' is missing or not an array"},
      {R"({"a":)" + entry("F32", "[1,1,1,1,2]", "[0,8]") + "}", 8, "tensor 'a': shape has 5 dimensions"},
      {R"({"a":)" + entry("U8", "[4294967296,4294967296,2]", "[0,8]") + "}", 8,
       "has more elements than 2^64"},
      {R"({"a":)" + entry("F32", "[4611686018427387904]", "[0,8]") + "}", 8, "needs more than 2^64 bytes"},
      {R"({"a":)" + entry("U8", "[9223372036854775808]", "[0,8]") + "}", 8, "does not fit in int64"},
      {R"({"a":)" + entry("F32", "[1e30]", "[0,8]") + "}", 8, "is not an integer"},
      {R"({"a":)" + entry("F32", "[2]", "[0,400]") + "}", 8,
       "tensor 'a': data_offsets [0, 400] run past the end"},
      {R"({"a":)" + entry("F32", "[2]", "[0]") + "}", 8, "not a [begin, end] pair"},
      {R"({"a":)" + entry("F32", "[2]", "[8,0]") + "}", 8, "end before they begin"},
      {R"({"a":)" + entry("F32", "[2]", "[-8,0]") + "}", 8, "are not non-negative integers"},
      {R"({"a":)" + entry("F32", "[2]", "[0,12]") + "}", 12, "span 12 bytes but F32 x [2] needs 8"},
      {"{" + a_ok + R"(,"b":)" + entry("I32", "[2]", "[4,12]") + "}", 12,
       "tensor 'b' [4, 12) overlaps tensor 'a' [0, 8)"},
      {"{" + a_ok + R"(,"b":)" + entry("I32", "[1]", "[12,16]") + "}", 16,
       "gap of 4 bytes between tensor 'a' (ends at 8) and tensor 'b' (begins at 12)"},
      {R"({"a":)" + entry("F32", "[2]", "[4,12]") + "}", 12,
       "does not start at offset 0: the first tensor, 'a'"},
      {"{" + a_ok + "}", 12, "the tensors end at data offset 8 but the data section holds 12 bytes"},
      {"{}", 4, "the tensors end at data offset 0 but the data section holds 4 bytes"},
      {"{" + a_ok + "," + a_ok + "}", 8, "duplicate name 'a'"},
      {R"({"__metadata__":{"k":1},)" + a_ok + "}", 8, "__metadata__ value of 'k' is not a string but '1'"},
      {R"({"__metadata__":{"k":"x","k":"y"},)" + a_ok + "}", 8, "duplicate key 'k' inside '__metadata__'"},
      {R"({"__metadata__":"x",)" + a_ok + "}", 8, "__metadata__ is not a JSON object"},
      {R"({"a":[1]})", 8, "tensor 'a': entry is not a JSON object"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}})", 8, "unexpected field 'extra'"},
      {R"({"":)" + entry("F32", "[2]", "[0,8]") + "}", 8, "a tensor has an empty name"},
      {R"({"a":{"dtype":"F32","shape":[[[[[2]]]]],"data_offsets":[0,8]}})", 8, "header nests deeper than 3"},
  };
  const std::string p = file("bad.safetensors");
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    write_raw(p, c.header, c.data_size);
    expect_error([&] { (void)SafetensorsFile::open(p); }, {p + ": ", c.expected});
  }
  // Zero-sized tensors may share an offset with each other and with the next tensor's start.
  write_raw(p,
            R"({"e":)" + entry("F32", "[0]", "[0,0]") + R"(,"z":)" + entry("F16", "[3,0]", "[0,0]") + "," +
                a_ok + "}",
            8);
  EXPECT_EQ(SafetensorsFile::open(p).tensors().size(), 3u);
}

TEST_F(SafetensorsTest, ShardedModelsLookUpAcrossShardsAndValidateTheIndex) {
  const std::vector<float> a = {1, 2}, b = {3}, c = {4, 5, 6};
  write_safetensors(file("s1.safetensors"),
                    std::vector<SafetensorsWriteTensor>{{"a", StDType::F32, {2}, as_bytes_of(a)},
                                                        {"b", StDType::F32, {1}, as_bytes_of(b)}});
  write_safetensors(file("s2.safetensors"),
                    std::vector<SafetensorsWriteTensor>{{"c", StDType::F32, {3}, as_bytes_of(c)}});
  const std::string index = file("model.safetensors.index.json");
  auto write_index = [&](const std::string& weight_map) {
    write_bytes(index, R"({"metadata":{"total_size":24},"weight_map":)" + weight_map + "}");
  };
  write_index(R"({"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors"})");
  const SafetensorsModel m = SafetensorsModel::open(dir_.string());
  EXPECT_EQ(m.source(), index);
  EXPECT_EQ(m.shards().size(), 2u);
  EXPECT_EQ(m.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(m.view("c").as<const float>()[2], 6.0f);
  EXPECT_EQ(values_of<float>(m.get("b")), b);
  expect_error([&] { (void)m.get("d"); }, {index, "no tensor named 'd'"});
  EXPECT_EQ(m.find("d"), nullptr);

  write_index(R"({"a":"s1.safetensors","b":"s1.safetensors","c":"s3.safetensors"})");
  expect_error([&] { (void)SafetensorsModel::open(index); },
               {index, "shard 's3.safetensors'", "does not exist"});
  for (const std::string bad : {"../s2.safetensors", "sub/s2.safetensors", "/tmp/s2.safetensors", "..", "",
                                "s2.safetensors\\u0000x", R"(..\\s2.safetensors)"}) {
    SCOPED_TRACE(bad);
    write_index(R"({"a":"s1.safetensors","b":"s1.safetensors","c":")" + bad + R"("})");
    expect_error([&] { (void)SafetensorsModel::open(index); },
                 {index, "tensor 'c'", "not a plain file name"});
  }
  // Control bytes in a name are escaped so the message is neither cut short nor a terminal sequence.
  write_index(
      R"({"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors","d\u0000\u001b":"s2.safetensors"})");
  expect_error([&] { (void)SafetensorsModel::open(index); }, {index, "tensor 'd\\x00\\x1b' is mapped"});
  write_index(R"({"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors","d":"s2.safetensors"})");
  expect_error([&] { (void)SafetensorsModel::open(index); },
               {index, "tensor 'd' is mapped to shard 's2.safetensors', which does not contain it"});
  write_index(R"({"a":"s1.safetensors","c":"s2.safetensors"})");
  expect_error([&] { (void)SafetensorsModel::open(index); },
               {index, "shard 's1.safetensors' holds tensor 'b', which the weight_map does not list"});
  write_index(R"({"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors","c":"s1.safetensors"})");
  expect_error([&] { (void)SafetensorsModel::open(index); },
               {index, "duplicate key 'c' inside 'weight_map'"});
  write_index(R"(["s1.safetensors"])");
  expect_error([&] { (void)SafetensorsModel::open(index); },
               {index, "'weight_map' is missing or not an object"});
  write_index("{}");
  expect_error([&] { (void)SafetensorsModel::open(index); }, {index, "'weight_map' is empty"});
  write_bytes(index, "{\"weight_map\":");
  expect_error([&] { (void)SafetensorsModel::open(index); }, {index, "is not valid JSON"});
  // An oversized index (sparse, so the test stays cheap) is refused before it is read.
  ASSERT_EQ(::truncate(index.c_str(), off_t(kMaxSafetensorsHeader + 1)), 0);
  expect_error([&] { (void)SafetensorsModel::open(index); }, {index, "larger than the 100000000-byte limit"});

  const std::string empty_dir = file("empty");
  fs::create_directory(empty_dir);
  expect_error([&] { (void)SafetensorsModel::open(empty_dir); },
               {empty_dir, "neither model.safetensors.index.json nor model.safetensors"});
}

}  // namespace
