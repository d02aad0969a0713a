// BPE over bytes (GPT-2's byte-level) or characters (sentencepiece-style, with byte fallback and
// Metaspace): PCRE2 split patterns, the GPT-2 byte <-> unicode mapping, and a merge loop that is
// O(n log n) in the piece length (a heap of candidate pairs over a linked list of symbols), so a
// megabyte-long piece encodes in bounded time without capping or changing the result.
#include <array>
#include <cstdio>
#include <queue>
#include <unordered_map>

#include "src/core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/token_model.h"
#include "tokenizer/utf8.h"

namespace tf::tok {

const char* const kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

// GPT-2's reversible byte -> printable code point mapping: printable Latin-1 bytes map to themselves,
// the other 68 bytes to U+0100 onwards in byte order.
std::array<uint32_t, 256> byte_to_codepoint_table() {
  std::array<uint32_t, 256> t{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    t[b] = printable ? b : next++;
  }
  return t;
}

struct MergeRule {
  uint32_t rank;
  int32_t merged;
};

uint64_t pair_key(int32_t a, int32_t b) {
  return (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
}

class Bpe final : public TokenModel {
 public:
  explicit Bpe(const BpeSpec& spec)
      : source_(spec.source),
        vocab_(spec.vocab),
        metaspace_(spec.metaspace),
        add_prefix_space_(spec.add_prefix_space),
        ignore_merges_(spec.ignore_merges),
        byte_level_(spec.byte_level),
        fuse_unk_(spec.fuse_unk),
        unk_id_(spec.unk_id) {
    for (size_t i = 0; i < vocab_.size(); ++i) {
      TF_CHECK(vocab_[i].size() <= kMaxPieceBytes, source_, ": token ", i, " is ", vocab_[i].size(),
               " bytes long; pieces over ", kMaxPieceBytes, " bytes are refused");
      if (vocab_[i].empty()) continue;
      const bool fresh = ids_.emplace(vocab_[i], int32_t(i)).second;
      TF_CHECK(fresh, source_, ": token '", shown(vocab_[i]), "' appears twice in the vocab");
    }
    const auto to_cp = byte_to_codepoint_table();
    for (uint32_t b = 0; b < 256; ++b) {
      byte_str_[b].clear();
      append_utf8(byte_str_[b], to_cp[b]);
      cp_to_byte_[to_cp[b]] = uint8_t(b);
      const auto it = ids_.find(byte_str_[b]);
      byte_id_[b] = it == ids_.end() ? -1 : it->second;
      std::array<char, 8> name{};
      std::snprintf(name.data(), name.size(), "<0x%02X>", b);
      const auto fb = spec.byte_fallback ? ids_.find(name.data()) : ids_.end();
      fallback_id_[b] = fb == ids_.end() ? -1 : fb->second;
    }
    TF_CHECK(!metaspace_ || utf8_char_len(metaspace_->replacement, 0) == metaspace_->replacement.size(),
             source_, ": Metaspace replacement '", shown(metaspace_ ? metaspace_->replacement : ""),
             "' is not one character");
    merges_.reserve(spec.merges.size());
    for (size_t r = 0; r < spec.merges.size(); ++r) {
      const auto& [a, b] = spec.merges[r];
      const int32_t ia = lookup_for_merge(a, r, a, b), ib = lookup_for_merge(b, r, a, b);
      const int32_t im = lookup_for_merge(a + b, r, a, b);
      // The first occurrence of a pair holds its rank, as in llama.cpp.
      merges_.emplace(pair_key(ia, ib), MergeRule{uint32_t(r), im});
    }
    for (const auto& p : spec.split_patterns) splitters_.emplace_back(p, source_, "pre-tokenizer pattern");
  }

  void encode(std::string_view text, bool at_start, std::vector<int32_t>& out) const override {
    if (metaspace_) {
      encode_metaspace(text, at_start, out);
      return;
    }
    std::string prefixed;
    if (add_prefix_space_ && !text.empty() && text[0] != ' ') {
      prefixed = " ";
      prefixed += text;
      text = prefixed;
    }
    std::vector<std::pair<size_t, size_t>> pieces{{0, text.size()}}, next;
    for (const auto& re : splitters_) {
      next.clear();
      for (const auto& [off, len] : pieces) re.split(text, off, off + len, next);
      pieces.swap(next);
    }
    for (const auto& [off, len] : pieces) encode_piece(text.substr(off, len), out);
  }

  void decode(std::span<const int32_t> ids, bool, std::string& out) const override {
    for (const int32_t id : ids) {
      const std::string& p = vocab_[size_t(id)];
      if (!byte_level_) {
        out += p;
        continue;
      }
      for (size_t i = 0; i < p.size();) {
        size_t n = utf8_char_len(p, i);
        if (n == 0) n = 1;
        uint32_t cp = 0;
        if (n == 1)
          cp = uint8_t(p[i]);
        else if (n == 2)
          cp = ((uint8_t(p[i]) & 0x1Fu) << 6) | (uint8_t(p[i + 1]) & 0x3Fu);
        const auto it = n <= 2 ? cp_to_byte_.find(cp) : cp_to_byte_.end();
        if (it != cp_to_byte_.end())
          out += char(it->second);
        else
          out.append(p, i, n);  // not a byte-level character: its own UTF-8
        i += n;
      }
    }
  }

  const std::string& piece(int32_t id) const override { return vocab_[size_t(id)]; }
  std::optional<int32_t> find(std::string_view p) const override {
    const auto it = ids_.find(std::string(p));
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }
  size_t size() const override { return vocab_.size(); }

 private:
  int32_t lookup_for_merge(const std::string& s, size_t rank, const std::string& a,
                           const std::string& b) const {
    const auto it = ids_.find(s);
    TF_CHECK(it != ids_.end(), source_, ": merge #", rank, " '", shown(a), " ", shown(b), "' needs '",
             shown(s), "', which is not in the vocab");
    return it->second;
  }

  // Metaspace: spaces become the replacement character, which starts a piece wherever it stands
  // (HF's "merged with next" split) and is put in front of the text as the prepend scheme says.
  void encode_metaspace(std::string_view text, bool at_start, std::vector<int32_t>& out) const {
    const std::string& rep = metaspace_->replacement;
    std::string s;
    const PrependScheme scheme = metaspace_->prepend;
    const bool prepend = scheme == PrependScheme::Always || (scheme == PrependScheme::First && at_start);
    if (prepend && !text.empty() && !text.starts_with(rep) && text[0] != ' ') s = rep;
    for (const char c : text) {
      if (c == ' ')
        s += rep;
      else
        s += c;
    }
    if (!metaspace_->split) {
      encode_piece(s, out);
      return;
    }
    size_t begin = 0;
    for (size_t at = s.find(rep, 1); at != std::string::npos; at = s.find(rep, at + rep.size())) {
      encode_piece(std::string_view(s).substr(begin, at - begin), out);
      begin = at;
    }
    if (begin < s.size()) encode_piece(std::string_view(s).substr(begin), out);
  }

  void encode_piece(std::string_view bytes, std::vector<int32_t>& out) const {
    if (ignore_merges_) {
      std::string mapped;
      if (byte_level_)
        for (const char c : bytes) mapped += byte_str_[uint8_t(c)];
      const auto it = ids_.find(byte_level_ ? mapped : std::string(bytes));
      if (it != ids_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    struct Sym {
      int32_t id, prev, next;
    };
    std::vector<Sym> syms;
    syms.reserve(bytes.size());
    bool last_unk = false;
    const auto push_sym = [&](int32_t id, bool unk) {
      if (unk && last_unk && fuse_unk_) return;
      last_unk = unk;
      const int32_t i = int32_t(syms.size());
      syms.push_back({id, i - 1, i + 1});
    };
    // The first symbols: bytes as GPT-2's characters, or the UTF-8 characters themselves. Like HF's
    // BPE, a symbol missing from the vocab becomes its <0xNN> byte tokens (byte_fallback, when the
    // vocab has all of them), else the unknown token, else it is dropped.
    for (size_t i = 0; i < bytes.size();) {
      size_t n = byte_level_ ? 1 : utf8_char_len(bytes, i);
      if (n == 0) n = 1;
      const std::string_view sym = bytes.substr(i, n);
      int32_t id = -1;
      if (byte_level_) {
        id = byte_id_[uint8_t(sym[0])];
      } else {
        const auto it = ids_.find(std::string(sym));
        if (it != ids_.end()) id = it->second;
      }
      i += n;
      if (id >= 0) {
        push_sym(id, false);
        continue;
      }
      bool fallback = !byte_level_;
      for (const char c : sym) fallback = fallback && fallback_id_[uint8_t(c)] >= 0;
      if (fallback) {
        for (const char c : sym) push_sym(fallback_id_[uint8_t(c)], false);
      } else if (unk_id_ >= 0) {
        push_sym(unk_id_, true);
      }
    }
    if (syms.empty()) return;
    syms.back().next = -1;

    struct Cand {
      uint32_t rank;
      int32_t left, right, left_id, right_id, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<>> heap;
    const auto push = [&](int32_t l) {
      if (l < 0 || syms[size_t(l)].next < 0) return;
      const int32_t r = syms[size_t(l)].next;
      const auto it = merges_.find(pair_key(syms[size_t(l)].id, syms[size_t(r)].id));
      if (it != merges_.end())
        heap.push({it->second.rank, l, r, syms[size_t(l)].id, syms[size_t(r)].id, it->second.merged});
    };
    for (int32_t i = 0; i + 1 < int32_t(syms.size()); ++i) push(i);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      Sym& l = syms[size_t(c.left)];
      // Stale candidates (a side was merged away since it was pushed) no longer match the list.
      if (l.id != c.left_id || l.next != c.right || syms[size_t(c.right)].id != c.right_id) continue;
      Sym& r = syms[size_t(c.right)];
      l.id = c.merged;
      l.next = r.next;
      if (r.next >= 0) syms[size_t(r.next)].prev = c.left;
      r.id = -1;
      push(l.prev);
      push(c.left);
    }
    for (int32_t i = 0; i >= 0; i = syms[size_t(i)].next) out.push_back(syms[size_t(i)].id);
  }

  std::string source_;
  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<uint64_t, MergeRule> merges_;
  std::vector<Regex> splitters_;
  std::array<std::string, 256> byte_str_;
  std::array<int32_t, 256> byte_id_{};
  std::array<int32_t, 256> fallback_id_{};  // <0xNN> tokens, under byte_fallback
  std::unordered_map<uint32_t, uint8_t> cp_to_byte_;
  std::optional<MetaspaceSpec> metaspace_;
  bool add_prefix_space_;
  bool ignore_merges_;
  bool byte_level_;
  bool fuse_unk_;
  int32_t unk_id_;
};

}  // namespace

std::unique_ptr<TokenModel> make_bpe(const BpeSpec& spec) {
  return std::make_unique<Bpe>(spec);
}

std::string byte_level_piece(uint8_t b) {
  static const auto table = byte_to_codepoint_table();
  std::string s;
  append_utf8(s, table[b]);
  return s;
}

}  // namespace tf::tok
