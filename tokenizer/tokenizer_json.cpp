// defines: tf::tok::Tokenizer::from_tokenizer_json. HF tokenizer.json with a BPE model: byte-level (GPT-2,
// Llama-3, Qwen2, SmolLM style) or sentencepiece-style (Llama-2, Mistral, TinyLlama: characters with byte
// fallback, Metaspace or a Prepend/Replace normalizer, a Sequence decoder). Every field we do not implement
// is refused by name rather than ignored, so a tokenizer that would encode differently from the reference
// never loads silently.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "tokenizer/hf_pipeline.h"
#include "tokenizer/json_reader.h"
#include "tokenizer/token_model.h"
#include "tokenizer/tokenizer.h"

namespace tf::tok {
namespace {

using nlohmann::json;

// Real tokenizer.json files are under 20 MB; the bound keeps a hostile path from exhausting memory.
constexpr uintmax_t kMaxTokenizerJsonBytes = 512ull << 20;

constexpr const char* kKnownPreTokenizers = "ByteLevel, Split, Digits, Metaspace, Sequence";

// One step of the pre-tokenizer: appends split patterns, or sets the Metaspace split.
void pre_step(const JsonReader& rd, const json& p, BpeSpec& spec) {
  const std::string type = json_type_name(p);
  if (spec.metaspace) rd.fail("pre-tokenizer steps after Metaspace are not supported");
  if (spec.byte_level) rd.fail("pre-tokenizer steps after ByteLevel are not supported");
  if (type == "ByteLevel") {
    spec.byte_level = true;
    spec.add_prefix_space = rd.flag(p, "add_prefix_space", false);
    if (rd.flag(p, "use_regex", true)) spec.split_patterns.push_back(kGpt2SplitPattern);
    return;
  }
  if (type == "Metaspace") {
    if (!spec.split_patterns.empty()) rd.fail("pre-tokenizer steps before Metaspace are not supported");
    MetaspaceSpec m;
    m.replacement = rd.str(rd.field(p, "replacement", "Metaspace pre-tokenizer"), "Metaspace replacement");
    m.prepend = prepend_scheme_of(p, rd.path);
    m.split = rd.flag(p, "split", true);
    spec.metaspace = m;
    return;
  }
  if (type == "Split") {
    const json& pat = rd.field(p, "pattern", "Split pre-tokenizer");
    const json& behavior = rd.field(p, "behavior", "Split pre-tokenizer");
    if (!behavior.is_string() || behavior.get<std::string>() != "Isolated")
      rd.fail("Split pre-tokenizer behavior " + shown(behavior.dump()) +
              " is not supported (only \"Isolated\")");
    if (rd.flag(p, "invert", false)) rd.fail("Split pre-tokenizer with invert = true is not supported");
    if (pat.is_object() && pat.contains("Regex")) {
      spec.split_patterns.push_back(rd.str(pat["Regex"], "Split pattern"));
    } else if (pat.is_object() && pat.contains("String")) {
      // A literal split string, quoted so PCRE2 matches it verbatim.
      spec.split_patterns.push_back("\\Q" + rd.str(pat["String"], "Split pattern") + "\\E");
    } else {
      rd.fail("Split pre-tokenizer pattern " + shown(pat.dump()) +
              " is neither {\"Regex\"} nor {\"String\"}");
    }
    return;
  }
  if (type == "Digits") {
    spec.split_patterns.push_back(rd.flag(p, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)");
    return;
  }
  rd.fail("pre-tokenizer type '" + shown(type) + "' is not supported (known: " + kKnownPreTokenizers + ")");
}

// Without a ByteLevel step the model's symbols are characters (sentencepiece-style files); without
// any pre-tokenizer each stretch of text is one piece.
void pre_tokenizer(const JsonReader& rd, const json& root, BpeSpec& spec) {
  spec.byte_level = false;
  if (!root.contains("pre_tokenizer") || root["pre_tokenizer"].is_null()) return;
  const json& p = root["pre_tokenizer"];
  if (json_type_name(p) != "Sequence") {
    pre_step(rd, p, spec);
    return;
  }
  for (const json& s : rd.array(p, "pretokenizers", "Sequence pre-tokenizer")) pre_step(rd, s, spec);
}

// Returns the ids TemplateProcessing puts before and after the text of a single sequence.
void post_processor(const JsonReader& rd, const json& root, std::vector<int32_t>& prefix,
                    std::vector<int32_t>& suffix) {
  if (!root.contains("post_processor") || root["post_processor"].is_null()) return;
  const json& p = root["post_processor"];
  std::vector<const json*> procs;
  if (json_type_name(p) == "Sequence") {
    for (const json& s : rd.array(p, "processors", "Sequence post-processor")) procs.push_back(&s);
  } else {
    procs.push_back(&p);
  }
  for (const json* q : procs) {
    const std::string type = json_type_name(*q);
    if (type == "ByteLevel") continue;  // only adjusts offsets
    if (type != "TemplateProcessing")
      rd.fail("post-processor type '" + shown(type) +
              "' is not supported (known: TemplateProcessing, ByteLevel, Sequence)");
    const json& single = rd.array(*q, "single", "TemplateProcessing");
    const json& specials = rd.field(*q, "special_tokens", "TemplateProcessing");
    bool seen_text = false;
    for (const json& item : single) {
      if (item.is_object() && item.contains("Sequence")) {
        seen_text = true;
        continue;
      }
      if (!item.is_object() || !item.contains("SpecialToken"))
        rd.fail("TemplateProcessing item " + shown(item.dump()) + " is not supported");
      const std::string name =
          rd.str(rd.field(item["SpecialToken"], "id", "TemplateProcessing SpecialToken"), "token");
      const json& ids = rd.array(rd.field(specials, name.c_str(), "TemplateProcessing special_tokens"), "ids",
                                 "TemplateProcessing special token");
      for (const json& id : ids) {
        if (!id.is_number_integer())
          rd.fail("TemplateProcessing id of '" + shown(name) + "' is not an integer");
        (seen_text ? suffix : prefix).push_back(id.get<int32_t>());
      }
    }
  }
}

const json& member_or_null(const json& root, const char* key) {
  static const json null_json;
  return root.contains(key) ? root[key] : null_json;
}

json parse_file(const std::string& path) {
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  TF_CHECK(!ec, path, ": cannot read tokenizer file: ", ec.message());
  TF_CHECK(size <= kMaxTokenizerJsonBytes, path, ": tokenizer file is ", size, " bytes; over the limit of ",
           kMaxTokenizerJsonBytes);
  std::ifstream in(path, std::ios::binary);
  TF_CHECK(in, path, ": cannot open tokenizer file");
  std::string text(size_t(size), '\0');
  in.read(text.data(), std::streamsize(size));
  TF_CHECK(in.gcount() == std::streamsize(size), path, ": short read of tokenizer file");
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    TF_FAIL(path, ": malformed JSON: ", e.what());
  }
}

}  // namespace

Tokenizer Tokenizer::from_tokenizer_json(const std::string& path) {
  const json root = parse_file(path);
  const JsonReader rd{path};
  if (!root.is_object()) rd.fail("top level is not a JSON object");
  const json& model = rd.field(root, "model", "the file");
  if (!model.is_object()) rd.fail("\"model\" is not an object");
  const std::string mtype = json_type_name(model);
  if (mtype != "BPE") rd.fail("model type '" + shown(mtype) + "' is not supported (only \"BPE\")");
  // Dropout samples merges at random (a training-time augmentation); 0 is the deterministic BPE.
  // The subword prefix and suffix belong to WordPiece-like vocabularies no Llama-family model uses.
  for (const char* key : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"})
    rd.require_unset(model, key, "BPE model");
  // Built first: they are the parts of the file most often refused.
  std::unique_ptr<const Normalizer> normalizer = make_normalizer(member_or_null(root, "normalizer"), path);
  std::unique_ptr<const Decoder> decoder = make_decoder(member_or_null(root, "decoder"), path);

  BpeSpec spec;
  spec.source = path;
  spec.ignore_merges = rd.flag(model, "ignore_merges", false);
  spec.byte_fallback = rd.flag(model, "byte_fallback", false);
  spec.fuse_unk = rd.flag(model, "fuse_unk", false);
  const json& vocab = rd.field(model, "vocab", "BPE model");
  if (!vocab.is_object()) rd.fail("model vocab is not an object");
  const json empty_list = json::array();
  const json& added_json =
      root.contains("added_tokens") && !root["added_tokens"].is_null() ? root["added_tokens"] : empty_list;
  if (!added_json.is_array()) rd.fail("\"added_tokens\" is not an array");
  // Ids must fit the number of entries: a dense vocabulary plus added tokens beyond it.
  const size_t max_ids = vocab.size() + added_json.size();
  spec.vocab.assign(vocab.size(), std::string());
  for (const auto& [piece, idj] : vocab.items()) {
    rd.str(json(piece), "vocab piece '" + shown(piece) + "'");
    if (!idj.is_number_integer()) rd.fail("vocab id of '" + shown(piece) + "' is not an integer");
    const int64_t id = idj.get<int64_t>();
    if (id < 0 || uint64_t(id) >= max_ids)
      rd.fail("vocab id " + std::to_string(id) + " of '" + shown(piece) + "' is out of range (0.." +
              std::to_string(max_ids - 1) + ")");
    if (size_t(id) >= spec.vocab.size()) spec.vocab.resize(size_t(id) + 1);
    if (!spec.vocab[size_t(id)].empty())
      rd.fail("vocab id " + std::to_string(id) + " is given to two pieces");
    if (piece.empty()) rd.fail("vocab has an empty piece");
    spec.vocab[size_t(id)] = piece;
  }
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const std::string unk = rd.str(model["unk_token"], "unk_token");
    if (!vocab.contains(unk)) rd.fail("unk_token '" + shown(unk) + "' is not in the vocab");
    spec.unk_id = vocab[unk].get<int32_t>();
  }
  const json& merges = rd.field(model, "merges", "BPE model");
  if (!merges.is_array()) rd.fail("model merges is not an array");
  spec.merges.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const json& m = merges[r];
    if (m.is_string()) {
      const std::string s = rd.str(m, "merge");
      const size_t sp = s.find(' ', 1);
      if (sp == std::string::npos || sp + 1 >= s.size() || s.find(' ', sp + 1) != std::string::npos)
        rd.fail("merge #" + std::to_string(r) + " '" + shown(s) +
                "' is not two tokens separated by one space");
      spec.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2) {
      spec.merges.emplace_back(rd.str(m[0], "merge"), rd.str(m[1], "merge"));
    } else {
      rd.fail("merge #" + std::to_string(r) + " is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }
  pre_tokenizer(rd, root, spec);

  std::vector<AddedToken> added;
  size_t size = spec.vocab.size();
  for (const json& a : added_json) {
    AddedToken t;
    const json& idj = rd.field(a, "id", "added token");
    if (!idj.is_number_integer()) rd.fail("added token id is not an integer");
    const int64_t id = idj.get<int64_t>();
    t.content = rd.str(rd.field(a, "content", "added token"), "added token content");
    if (id < 0 || uint64_t(id) >= max_ids)
      rd.fail("added token '" + shown(t.content) + "' id " + std::to_string(id) + " is out of range (0.." +
              std::to_string(max_ids - 1) + ")");
    t.id = int32_t(id);
    t.special = rd.flag(a, "special", false);
    // HF's default for a token the file does not mark: special tokens match the raw text.
    t.normalized = rd.flag(a, "normalized", !t.special);
    for (const char* key : {"single_word", "lstrip", "rstrip"})
      if (rd.flag(a, key, false))
        rd.fail("added token '" + shown(t.content) + "' with " + key + " = true is not supported");
    if (size_t(id) < spec.vocab.size() && !spec.vocab[size_t(id)].empty() &&
        spec.vocab[size_t(id)] != t.content)
      rd.fail("added token '" + shown(t.content) + "' has id " + std::to_string(id) +
              ", which the vocab gives to '" + shown(spec.vocab[size_t(id)]) + "'");
    size = std::max(size, size_t(id) + 1);
    added.push_back(std::move(t));
  }

  std::vector<int32_t> prefix, suffix;
  post_processor(rd, root, prefix, suffix);
  if (prefix.size() > 1 || suffix.size() > 1)
    rd.fail(
        "TemplateProcessing adds more than one token before or after the text; only BOS/EOS are supported");

  Tokenizer t;
  t.source_ = path;
  t.model_ = make_bpe(spec);
  t.normalizer_ = std::move(normalizer);
  t.decoder_ = std::move(decoder);
  t.vocab_size_ = size;
  t.set_added_tokens(std::move(added));
  // tokenizer.json does not name BOS/EOS; the template's tokens are, else the usual special names.
  const auto named = [&](std::initializer_list<const char*> names) -> int32_t {
    for (const char* n : names)
      for (const AddedToken& a : t.added_)
        if (a.special && a.content == n) return a.id;
    return -1;
  };
  const int32_t bos = prefix.empty() ? named({"<|begin_of_text|>", "<s>", "<|startoftext|>"}) : prefix[0];
  const int32_t eos = suffix.empty() ? named({"<|end_of_text|>", "</s>", "<|endoftext|>"}) : suffix[0];
  t.set_special_ids(bos, eos, named({"<|finetune_right_pad_id|>", "<pad>", "<|pad|>"}));
  t.set_add_bos_eos(!prefix.empty(), !suffix.empty());
  return t;
}

}  // namespace tf::tok
