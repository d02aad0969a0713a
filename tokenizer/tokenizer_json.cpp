// HF tokenizer.json with a byte-level BPE model (GPT-2, Llama-3, Qwen2, SmolLM style). Every field
// we do not implement is refused by name rather than ignored, so a tokenizer that would encode
// differently from the reference never loads silently.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "tokenizer/token_model.h"
#include "tokenizer/tokenizer.h"

namespace tf::tok {
namespace {

using nlohmann::json;

// Real tokenizer.json files are under 20 MB; the bound keeps a hostile path from exhausting memory.
constexpr uintmax_t kMaxTokenizerJsonBytes = 512ull << 20;

std::string type_name(const json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "?";
}

struct Reader {
  const std::string& path;

  [[noreturn]] void fail(const std::string& what) const { TF_FAIL(path, ": ", what); }

  const json& field(const json& obj, const char* key, const char* where) const {
    if (!obj.is_object() || !obj.contains(key)) fail(std::string(where) + " has no \"" + key + "\"");
    return obj[key];
  }
  bool flag(const json& obj, const char* key, bool dflt) const {
    if (!obj.contains(key) || obj[key].is_null()) return dflt;
    if (!obj[key].is_boolean()) fail(std::string("\"") + key + "\" is not a boolean");
    return obj[key].get<bool>();
  }
  std::string str(const json& j, const std::string& what) const {
    if (!j.is_string()) fail(what + " is not a string");
    std::string s = j.get<std::string>();
    if (s.size() > kMaxPieceBytes)
      fail(what + " is " + std::to_string(s.size()) + " bytes long; pieces over " +
           std::to_string(kMaxPieceBytes) + " bytes are refused");
    return s;
  }
  void require_unset(const json& obj, const char* key, const char* where) const {
    if (!obj.contains(key) || obj[key].is_null()) return;
    const json& v = obj[key];
    const bool unset = (v.is_string() && v.get<std::string>().empty()) ||
                       (v.is_boolean() && !v.get<bool>()) || (v.is_number() && v.get<double>() == 0.0);
    if (!unset) fail(std::string(where) + " \"" + key + "\" = " + v.dump() + " is not supported");
  }

  // One step of the pre-tokenizer: appends split patterns; returns true for the ByteLevel step.
  bool pre_step(const json& p, BpeSpec& spec) const {
    const std::string type = type_name(p);
    if (type == "ByteLevel") {
      spec.add_prefix_space = flag(p, "add_prefix_space", false);
      if (flag(p, "use_regex", true)) spec.split_patterns.push_back(kGpt2SplitPattern);
      return true;
    }
    if (type == "Split") {
      const json& pat = field(p, "pattern", "Split pre-tokenizer");
      const json& behavior = field(p, "behavior", "Split pre-tokenizer");
      if (!behavior.is_string() || behavior.get<std::string>() != "Isolated")
        fail("Split pre-tokenizer behavior " + behavior.dump() + " is not supported (only \"Isolated\")");
      if (flag(p, "invert", false)) fail("Split pre-tokenizer with invert = true is not supported");
      if (pat.is_object() && pat.contains("Regex")) {
        spec.split_patterns.push_back(str(pat["Regex"], "Split pattern"));
      } else if (pat.is_object() && pat.contains("String")) {
        // A literal split string, quoted so PCRE2 matches it verbatim.
        spec.split_patterns.push_back("\\Q" + str(pat["String"], "Split pattern") + "\\E");
      } else {
        fail("Split pre-tokenizer pattern " + pat.dump() + " is neither {\"Regex\"} nor {\"String\"}");
      }
      return false;
    }
    if (type == "Digits") {
      spec.split_patterns.push_back(flag(p, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)");
      return false;
    }
    fail("pre-tokenizer type '" + type + "' is not supported (known: ByteLevel, Split, Digits, Sequence)");
  }

  void pre_tokenizer(const json& root, BpeSpec& spec) const {
    const json& p = field(root, "pre_tokenizer", "the file");
    std::vector<const json*> steps;
    if (type_name(p) == "Sequence") {
      const json& list = field(p, "pretokenizers", "Sequence pre-tokenizer");
      if (!list.is_array()) fail("Sequence pre-tokenizer's \"pretokenizers\" is not an array");
      for (const json& s : list) steps.push_back(&s);
    } else {
      steps.push_back(&p);
    }
    bool byte_level = false;
    for (size_t i = 0; i < steps.size(); ++i) {
      if (byte_level) fail("pre-tokenizer steps after ByteLevel are not supported");
      byte_level = pre_step(*steps[i], spec);
    }
    if (!byte_level)
      fail("pre-tokenizer has no ByteLevel step; only byte-level BPE tokenizers are supported");
  }

  // Returns the ids TemplateProcessing puts before and after the text of a single sequence.
  void post_processor(const json& root, std::vector<int32_t>& prefix, std::vector<int32_t>& suffix) const {
    if (!root.contains("post_processor") || root["post_processor"].is_null()) return;
    const json& p = root["post_processor"];
    std::vector<const json*> procs;
    if (type_name(p) == "Sequence") {
      const json& list = field(p, "processors", "Sequence post-processor");
      if (!list.is_array()) fail("Sequence post-processor's \"processors\" is not an array");
      for (const json& s : list) procs.push_back(&s);
    } else {
      procs.push_back(&p);
    }
    for (const json* q : procs) {
      const std::string type = type_name(*q);
      if (type == "ByteLevel") continue;  // only adjusts offsets
      if (type != "TemplateProcessing")
        fail("post-processor type '" + type +
             "' is not supported (known: TemplateProcessing, ByteLevel, Sequence)");
      const json& single = field(*q, "single", "TemplateProcessing");
      const json& specials = field(*q, "special_tokens", "TemplateProcessing");
      if (!single.is_array()) fail("TemplateProcessing \"single\" is not an array");
      bool seen_text = false;
      for (const json& item : single) {
        if (item.is_object() && item.contains("Sequence")) {
          seen_text = true;
          continue;
        }
        if (!item.is_object() || !item.contains("SpecialToken"))
          fail("TemplateProcessing item " + item.dump() + " is not supported");
        const std::string name =
            str(field(item["SpecialToken"], "id", "TemplateProcessing SpecialToken"), "token");
        const json& ids = field(field(specials, name.c_str(), "TemplateProcessing special_tokens"), "ids",
                                "TemplateProcessing special token");
        if (!ids.is_array()) fail("TemplateProcessing ids of '" + name + "' are not an array");
        for (const json& id : ids) {
          if (!id.is_number_integer()) fail("TemplateProcessing id of '" + name + "' is not an integer");
          (seen_text ? suffix : prefix).push_back(id.get<int32_t>());
        }
      }
    }
  }
};

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
  const Reader rd{path};
  if (!root.is_object()) rd.fail("top level is not a JSON object");
  const json& model = rd.field(root, "model", "the file");
  if (!model.is_object()) rd.fail("\"model\" is not an object");
  const std::string mtype = type_name(model);
  if (mtype != "BPE") rd.fail("model type '" + mtype + "' is not supported (only byte-level \"BPE\")");
  for (const char* key : {"dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"})
    rd.require_unset(model, key, "BPE model");
  if (root.contains("normalizer") && !root["normalizer"].is_null())
    rd.fail("normalizer '" + type_name(root["normalizer"]) + "' is not supported (only none)");
  if (root.contains("decoder") && !root["decoder"].is_null() && type_name(root["decoder"]) != "ByteLevel")
    rd.fail("decoder '" + type_name(root["decoder"]) + "' is not supported (only ByteLevel)");

  BpeSpec spec;
  spec.source = path;
  spec.ignore_merges = rd.flag(model, "ignore_merges", false);
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
  rd.pre_tokenizer(root, spec);

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
  rd.post_processor(root, prefix, suffix);
  if (prefix.size() > 1 || suffix.size() > 1)
    rd.fail(
        "TemplateProcessing adds more than one token before or after the text; only BOS/EOS are supported");

  Tokenizer t;
  t.source_ = path;
  t.model_ = make_byte_level_bpe(spec);
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
