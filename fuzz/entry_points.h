// defines: tf::fuzz::run_target and one entry point per parser fuzzed (safetensors, gguf,
//          tokenizer_json, tokenizer_encode, jsonl, jinja), shared by the libFuzzer targets in fuzz/ and by
//          tests/test_fuzz_regressions.cpp, so a committed crashing input is replayed exactly as the
//          fuzzer ran it.
//
// Each entry point returns true when the input was accepted and false when the parser refused it
// with a tf::Error: both are expected outcomes of arbitrary bytes. Any other exception escapes
// (libFuzzer then reports it as a crash, the test as a failure), and a broken invariant on an
// accepted input traps.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "src/core/error.h"
#include "src/data/chat_template.h"
#include "src/data/dataset.h"
#include "src/data/jinja.h"
#include "src/data/model_template.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/safetensors.h"
#include "tokenizer/tokenizer.h"

#ifndef TIGHTFIT_FIXTURES
#error "TIGHTFIT_FIXTURES must name tests/fixtures (the encode target loads its tokenizers from there)"
#endif

namespace tf::fuzz {

// A broken invariant on input the parser accepted: stop here so the fuzzer keeps the input.
inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz invariant broken: %s\n", what);
    __builtin_trap();
  }
}

// The safetensors, tokenizer.json and JSONL readers take a path, so each input goes through one
// file per process; /dev/shm keeps that in memory where it exists.
class ScratchFile {
 public:
  explicit ScratchFile(std::string_view tag) {
    const std::filesystem::path dir = std::filesystem::is_directory("/dev/shm")
                                          ? std::filesystem::path("/dev/shm")
                                          : std::filesystem::temp_directory_path();
    path_ = (dir / ("tightfit-fuzz-" + std::to_string(::getpid()) + "-" + std::string(tag))).string();
  }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;
  ~ScratchFile() { std::remove(path_.c_str()); }

  const std::string& write(const uint8_t* data, size_t size) {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), std::streamsize(size));
    out.close();
    require(bool(out), "could not write the scratch file");
    return path_;
  }

 private:
  std::string path_;
};

// Reads every byte a view hands out, so a span past the mapping or the buffer faults under ASan
// (heap) or as SIGSEGV/SIGBUS (mapping) instead of passing unnoticed.
inline uint8_t touch(const void* p, size_t n) {
  const auto* b = static_cast<const volatile uint8_t*>(p);
  uint8_t acc = 0;
  for (size_t i = 0; i < n; ++i) acc = uint8_t(acc ^ b[i]);
  return acc;
}

inline bool run_safetensors(const uint8_t* data, size_t size) {
  static ScratchFile file("safetensors");
  const std::string& path = file.write(data, size);
  try {
    const io::SafetensorsFile f = io::SafetensorsFile::open(path);
    for (const io::SafetensorsTensor& t : f.tensors()) {
      require(f.find(t.name) == &t, "a listed tensor is not found by its name");
      require(uint64_t(t.numel()) * io::st_dtype_size(t.dtype) == t.bytes.size(),
              "span disagrees with dtype x shape");
      touch(t.bytes.data(), t.bytes.size());
      try {
        const TensorView v = f.view(t.name);
        require(v.nbytes() == t.bytes.size(), "view size disagrees with the span");
      } catch (const Error&) {
        // Dtypes without a tf::DType and misaligned data are refused by view(), by contract.
      }
    }
    for (const auto& [k, v] : f.metadata()) {
      touch(k.data(), k.size());
      touch(v.data(), v.size());
    }
    return true;
  } catch (const Error&) {
    return false;
  }
}

// Bytes of one numeric GGUF array element.
inline size_t gguf_scalar_size(io::GgufValueType t) {
  switch (t) {
    case io::GgufValueType::U8:
    case io::GgufValueType::I8:
    case io::GgufValueType::Bool: return 1;
    case io::GgufValueType::U16:
    case io::GgufValueType::I16: return 2;
    case io::GgufValueType::U64:
    case io::GgufValueType::I64:
    case io::GgufValueType::F64: return 8;
    default: return 4;
  }
}

inline bool run_gguf(const uint8_t* data, size_t size) {
  try {
    const io::GgufFile f = io::GgufFile::from_memory(data, size, "fuzz.gguf");
    for (const auto& [key, v] : f.metadata()) {
      require(f.find(key) == &v, "a metadata key is not found by its name");
      touch(v.str.data(), v.str.size());
      if (v.type == io::GgufValueType::Array && v.raw != nullptr)
        touch(v.raw, size_t(v.count) * gguf_scalar_size(v.elem_type));
      for (std::string_view s : v.strings) touch(s.data(), s.size());
    }
    for (const io::GgufTensorInfo& t : f.tensors()) {
      require(f.find_tensor(t.name) == &t, "a tensor is not found by its name");
      require(t.data >= data && t.n_bytes <= size && t.data + t.n_bytes <= data + size,
              "tensor data outside the file");
      touch(t.data, size_t(t.n_bytes));
      (void)t.shape();
      (void)t.row_bytes();
    }
    try {
      (void)io::llama_config_from_gguf(f);
    } catch (const Error&) {
      // Most inputs are not a complete llama model; refusing them is the contract.
    }
    return true;
  } catch (const Error&) {
    return false;
  }
}

inline bool run_tokenizer_json(const uint8_t* data, size_t size) {
  static ScratchFile file("tokenizer.json");
  const std::string& path = file.write(data, size);
  try {
    const tok::Tokenizer t = tok::Tokenizer::from_tokenizer_json(path);
    for (std::string_view text : {"Hello world", " 12345 \n\t  x", "caf\xc3\xa9 \xf0\x9f\x98\x80!"}) {
      const std::vector<int32_t> ids = t.encode(text);
      for (int32_t id : ids)
        require(id >= 0 && size_t(id) < t.vocab_size(), "encode produced an id outside the vocabulary");
      (void)t.decode(ids);
    }
    return true;
  } catch (const Error&) {
    return false;
  }
}

// The committed fixture tokenizers, loaded once: byte-level BPE (SmolLM2, Llama-3 patterns) and a
// sentencepiece model.
inline const std::vector<tok::Tokenizer>& fixture_tokenizers() {
  static const std::vector<tok::Tokenizer> toks = [] {
    const std::string dir = std::string(TIGHTFIT_FIXTURES) + "/tokenizer/";
    std::vector<tok::Tokenizer> v;
    v.push_back(tok::Tokenizer::from_tokenizer_json(dir + "bpe_smollm.json"));
    v.push_back(tok::Tokenizer::from_tokenizer_json(dir + "bpe_llama3.json"));
    v.push_back(tok::Tokenizer::from_sentencepiece(dir + "spm_bpe.model"));
    return v;
  }();
  return toks;
}

// The first byte picks the tokenizer and the options; the rest is the text.
inline bool run_tokenizer_encode(const uint8_t* data, size_t size) {
  if (size == 0) return true;
  const auto& toks = fixture_tokenizers();
  const size_t which = data[0] % toks.size();
  const tok::Tokenizer& t = toks[which];
  tok::EncodeOptions opt;
  opt.add_special = (data[0] & 0x10) != 0;
  opt.parse_special = (data[0] & 0x20) != 0;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    const std::vector<int32_t> ids = t.encode(text, opt);
    for (int32_t id : ids)
      require(id >= 0 && size_t(id) < t.vocab_size(), "encode produced an id outside the vocabulary");
    const std::string back = t.decode(ids);
    // Byte-level BPE has no normaliser in these fixtures: every byte string must come back as it was
    // when nothing was added and no special token was parsed out of the text.
    if (which < 2 && !opt.add_special && !opt.parse_special)
      require(back == text, "byte-level BPE decode(encode(text)) differs from text");
    return true;
  } catch (const Error&) {
    return false;
  }
}

// The first byte picks the load options; the rest is the file. Accepted files are rendered with
// every template and tokenised with the SmolLM2 fixture tokenizer.
inline bool run_jsonl(const uint8_t* data, size_t size) {
  if (size == 0) return true;
  static ScratchFile file("data.jsonl");
  data::LoadOptions opt;
  opt.skip_bad_lines = (data[0] & 1) != 0;
  if (data[0] & 2) opt.max_line_bytes = 64;  // reach the over-long-line path with small inputs
  const std::string& path = file.write(data + 1, size - 1);
  try {
    const data::Dataset ds = data::load_jsonl(path, opt);
    require(!ds.examples.empty(), "load_jsonl returned no example without an error");
    const tok::Tokenizer& t = fixture_tokenizers()[0];
    for (const char* name : {"plain", "alpaca", "chatml", "llama3", "llama2", "mistral"}) {
      const data::ChatTemplate tmpl = data::template_by_name(name);
      for (const data::Example& ex : ds.examples) {
        try {
          (void)data::segments_to_text(data::render_example(tmpl, ex, true), "<s>", "</s>");
        } catch (const Error&) {
          // Llama-2 and Mistral refuse conversations that do not alternate; that is the contract.
        }
      }
      data::TokenizeOptions topt;
      topt.seq_len = 64;
      topt.skip_bad_lines = true;
      try {
        const data::TokenizedDataset td = data::tokenize_dataset(ds, tmpl, t, topt);
        require(td.ids.size() == td.trainable.size(), "ids and trainable flags differ in length");
        for (size_t i = 0; i < td.size(); ++i)
          require(td.length(i) <= topt.seq_len, "an example longer than seq_len");
      } catch (const Error&) {
        // No example left after skipping is an error by contract.
      }
    }
    return true;
  } catch (const Error&) {
    return false;
  }
}

// The input is a chat template: parsed under small bounds and, when it parses, rendered with a
// conversation that has a system prompt, a tool call and its result. Refusing to render (a
// raise_exception, a type error, a bound) is the contract; the output must respect its bound.
inline bool run_jinja(const uint8_t* data, size_t size) {
  data::jinja::Limits limits;
  limits.max_output_bytes = size_t(1) << 16;
  limits.max_iterations = 10000;
  limits.max_depth = 32;
  static const nlohmann::ordered_json ctx = [] {
    std::vector<data::Message> msgs = {{"system", "Be brief."}, {"user", "Weather?"}, {"assistant", ""}};
    msgs.back().tool_calls.push_back({"call12345", "get_weather", R"({"city":"Paris"})"});
    msgs.push_back({"tool", R"({"temp": 21})"});
    msgs.back().tool_call_id = "call12345";
    msgs.push_back({"assistant", "<think>\nok\n</think>\n\nIt is 21."});
    return data::template_context(msgs, R"([{"type":"function","function":{"name":"get_weather"}}])", true,
                                  "<s>", "</s>");
  }();
  try {
    const data::jinja::Template t(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.jinja",
                                  limits);
    try {
      const data::jinja::Rendered r = t.render(ctx, 0);
      require(r.text.size() <= limits.max_output_bytes, "the output is larger than its bound");
      for (const data::jinja::Span& s : r.generation)
        require(s.begin <= s.end && s.end <= r.text.size(), "a generation span outside the output");
    } catch (const Error&) {
      // Templates may refuse a conversation.
    }
    return true;
  } catch (const Error&) {
    return false;
  }
}

using EntryPoint = bool (*)(const uint8_t*, size_t);

// Name (as in fuzz/<name>_fuzz.cpp, fuzz/corpus/<name>/, fuzz/regressions/<name>/) -> entry point;
// nullptr for an unknown name.
inline EntryPoint entry_point(std::string_view name) {
  if (name == "safetensors") return run_safetensors;
  if (name == "gguf") return run_gguf;
  if (name == "tokenizer_json") return run_tokenizer_json;
  if (name == "tokenizer_encode") return run_tokenizer_encode;
  if (name == "jsonl") return run_jsonl;
  if (name == "jinja") return run_jinja;
  return nullptr;
}

}  // namespace tf::fuzz
