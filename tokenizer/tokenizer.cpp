// The shared tokenizer flow: split added tokens out of the text (longest match through a byte trie,
// so a long input costs at most its length x kMaxAddedTokenBytes), hand the stretches between them
// to the vocabulary's model, and add BOS/EOS as configured.
#include "tokenizer/tokenizer.h"

#include "src/core/error.h"
#include "tokenizer/hf_pipeline.h"
#include "tokenizer/token_model.h"

namespace tf::tok {

Tokenizer::Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

void Tokenizer::set_added_tokens(std::vector<AddedToken> added) {
  added_ = std::move(added);
  added_index_.clear();
  spelling_.clear();
  raw_trie_ = {};
  normalized_trie_ = {};
  for (size_t k = 0; k < added_.size(); ++k) {
    const AddedToken& t = added_[k];
    TF_CHECK(!t.content.empty(), source_, ": added token ", t.id, " has empty content");
    TF_CHECK(t.content.size() <= kMaxAddedTokenBytes, source_, ": added token ", t.id, " is ",
             t.content.size(), " bytes long; added tokens over ", kMaxAddedTokenBytes, " bytes are refused");
    TF_CHECK(t.id >= 0 && size_t(t.id) < vocab_size_, source_, ": added token '", shown(t.content),
             "' has id ", t.id, ", outside the vocabulary of ", vocab_size_);
    TF_CHECK(added_index_.emplace(t.id, k).second, source_, ": id ", t.id, " is given to two added tokens");
    // HF matches a normalized token by its content normalized, and decodes it as that spelling.
    const bool normalized = t.normalized && normalizer_;
    spelling_.push_back(normalized ? normalizer_->apply(t.content) : t.content);
    const std::string& spelling = spelling_.back();
    TF_CHECK(spelling.size() <= kMaxAddedTokenBytes, source_, ": added token ", t.id, " is ", spelling.size(),
             " bytes long once normalized; added tokens over ", kMaxAddedTokenBytes, " bytes are refused");
    if (spelling.empty()) continue;  // normalized away: HF never finds it in text either
    Trie& trie = t.normalized ? normalized_trie_ : raw_trie_;
    uint32_t node = 0;
    for (const char c : spelling) {
      const auto [it, fresh] = trie.edges.emplace((uint64_t(node) << 8) | uint8_t(c), trie.nodes);
      if (fresh) ++trie.nodes;
      node = it->second;
    }
    TF_CHECK(trie.terminal.emplace(node, k).second, source_, ": added token '", shown(t.content),
             "' appears twice");
  }
}

template <typename F>
void Tokenizer::split_added(const Trie& trie, std::string_view text, bool at_start, const EncodeOptions& opt,
                            std::vector<int32_t>& out, F&& stretch) const {
  size_t pending = 0;  // start of the text not yet encoded
  for (size_t i = 0; i < text.size();) {
    size_t best_end = 0, best = 0;
    uint32_t node = 0;
    for (size_t j = i; j < text.size(); ++j) {
      const auto e = trie.edges.find((uint64_t(node) << 8) | uint8_t(text[j]));
      if (e == trie.edges.end()) break;
      node = e->second;
      const auto t = trie.terminal.find(node);
      if (t != trie.terminal.end() && (opt.parse_special || !added_[t->second].special)) {
        best_end = j + 1;
        best = t->second;
      }
    }
    if (best_end == 0) {
      ++i;
      continue;
    }
    if (i > pending) stretch(text.substr(pending, i - pending), at_start && pending == 0);
    out.push_back(added_[best].id);
    i = pending = best_end;
  }
  if (pending < text.size()) stretch(text.substr(pending), at_start && pending == 0);
}

void Tokenizer::encode_stretch(std::string_view text, bool at_start, const EncodeOptions& opt,
                               std::vector<int32_t>& out) const {
  std::string normalized;
  if (normalizer_) {
    normalized = normalizer_->apply(text);
    text = normalized;
  }
  split_added(normalized_trie_, text, at_start, opt, out,
              [&](std::string_view s, bool first) { model_->encode(s, first, out); });
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& opt) const {
  std::vector<int32_t> out;
  if (opt.add_special && add_bos_ && bos_id_ >= 0) out.push_back(bos_id_);
  split_added(raw_trie_, text, true, opt, out,
              [&](std::string_view s, bool first) { encode_stretch(s, first, opt, out); });
  if (opt.add_special && add_eos_ && eos_id_ >= 0) out.push_back(eos_id_);
  return out;
}

void Tokenizer::check_id(int32_t id, const char* what) const {
  const bool known = id >= 0 && (size_t(id) < model_->size() || added_index_.count(id) != 0);
  TF_CHECK(known, source_, ": ", what, ": token id ", id, " is not in the vocabulary of ", vocab_size_);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  if (decoder_) {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (const int32_t id : ids) {
      const auto added = added_index_.find(id);
      if (added == added_index_.end()) {
        check_id(id, "decode");
        tokens.push_back(model_->piece(id));
      } else {
        // HF tells special tokens by their decoded spelling, so a special token whose normalized
        // spelling differs from its content is kept even under skip_special.
        const AddedToken& t = added_[added->second];
        const std::string& spelling = spelling_[added->second];
        if (!(skip_special && t.special && spelling == t.content)) tokens.push_back(spelling);
      }
    }
    return decoder_->decode(std::move(tokens), true);
  }
  std::string out;
  size_t run = 0;  // start of the current run of model (non-added) ids
  for (size_t i = 0; i <= ids.size(); ++i) {
    const auto added = i < ids.size() ? added_index_.find(ids[i]) : added_index_.end();
    if (i < ids.size() && added == added_index_.end()) {
      check_id(ids[i], "decode");
      continue;
    }
    if (i > run) model_->decode(ids.subspan(run, i - run), true, out);
    run = i + 1;
    if (i < ids.size() && !(skip_special && added_[added->second].special))
      out += added_[added->second].content;
  }
  return out;
}

std::string Tokenizer::token_to_piece(int32_t id) const {
  check_id(id, "token_to_piece");
  const auto added = added_index_.find(id);
  if (added != added_index_.end()) return added_[added->second].content;
  if (decoder_) return decoder_->decode({model_->piece(id)}, false);
  std::string out;
  model_->decode(std::span<const int32_t>(&id, 1), false, out);
  return out;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view piece) const {
  for (const auto& t : added_)
    if (t.content == piece) return t.id;
  return model_->find(piece);
}

void Tokenizer::set_special_ids(int32_t bos, int32_t eos, int32_t pad) {
  for (const int32_t id : {bos, eos, pad})
    if (id != -1) check_id(id, "special token");
  bos_id_ = bos;
  eos_id_ = eos;
  pad_id_ = pad;
}

void Tokenizer::set_add_bos_eos(bool add_bos, bool add_eos) {
  add_bos_ = add_bos;
  add_eos_ = add_eos;
}

Tokenizer Tokenizer::from_sentencepiece(const std::string& path) {
  Tokenizer t;
  t.source_ = path;
  SentencePieceInfo info;
  t.model_ = make_sentencepiece(path, info);
  t.vocab_size_ = t.model_->size();
  t.set_added_tokens(std::move(info.control_tokens));
  t.set_special_ids(info.bos_id, info.eos_id, info.pad_id);
  // The Llama convention for sentencepiece models: BOS in front, no EOS.
  t.set_add_bos_eos(info.bos_id >= 0, false);
  return t;
}

}  // namespace tf::tok
