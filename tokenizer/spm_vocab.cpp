// The "llama" GGUF vocabulary: sentencepiece BPE encoding from pieces and scores alone (what
// llama.cpp does without libsentencepiece). Start from single characters, repeatedly merge the
// adjacent pair whose concatenation is a piece with the highest score (ties: leftmost), then emit
// each symbol's id, or its bytes as <0xNN> pieces when it is not a piece itself.
#include <array>
#include <cmath>
#include <cstdio>
#include <queue>
#include <unordered_map>

#include "src/core/error.h"
#include "tokenizer/token_model.h"
#include "tokenizer/utf8.h"

namespace tf::tok {
namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's visible space

class ScoreSpm final : public TokenModel {
 public:
  explicit ScoreSpm(const SpmSpec& spec)
      : source_(spec.source),
        pieces_(spec.pieces),
        types_(spec.types),
        unk_id_(spec.unk_id),
        add_space_prefix_(spec.add_space_prefix) {
    TF_CHECK(spec.scores.size() == pieces_.size(), source_, ": ", pieces_.size(), " tokens but ",
             spec.scores.size(), " scores");
    if (types_.empty()) types_.assign(pieces_.size(), TokenType::Normal);
    TF_CHECK(types_.size() == pieces_.size(), source_, ": ", pieces_.size(), " tokens but ", types_.size(),
             " token types");
    scores_ = spec.scores;
    byte_id_.fill(-1);
    for (size_t i = 0; i < pieces_.size(); ++i) {
      const std::string& p = pieces_[i];
      TF_CHECK(p.size() <= kMaxPieceBytes, source_, ": token ", i, " is ", p.size(),
               " bytes long; pieces over ", kMaxPieceBytes, " bytes are refused");
      TF_CHECK(std::isfinite(scores_[i]), source_, ": token ", i, " has a non-finite score");
      const int32_t t = int32_t(types_[i]);
      TF_CHECK(t >= 1 && t <= 6, source_, ": token ", i, " has unknown token type ", t);
      const bool fresh = all_ids_.emplace(p, int32_t(i)).second;
      TF_CHECK(fresh, source_, ": token '", shown(p), "' appears twice in the vocab");
      // Only normal and user-defined pieces are reachable by merging, as in sentencepiece.
      if (types_[i] == TokenType::Normal || types_[i] == TokenType::UserDefined)
        mergeable_.emplace(p, int32_t(i));
      unsigned byte = 0;
      if (types_[i] == TokenType::Byte) {
        int consumed = 0;
        const bool ok =
            p.size() == 6 && std::sscanf(p.c_str(), "<0x%2X>%n", &byte, &consumed) == 1 && consumed == 6;
        TF_CHECK(ok, source_, ": byte token ", i, " is '", shown(p), "', not <0xNN>");
        byte_id_[byte] = int32_t(i);
      }
    }
    TF_CHECK(unk_id_ < int32_t(pieces_.size()), source_, ": unknown-token id ", unk_id_, " is out of range");
  }

  void encode(std::string_view text, bool, std::vector<int32_t>& out) const override {
    const size_t bad = utf8_invalid_at(text);
    TF_CHECK(bad == std::string_view::npos, source_, ": text is not valid UTF-8 at byte ", bad,
             "; the sentencepiece tokenizer encodes UTF-8 text only");
    std::string s;
    s.reserve(text.size() + 8);
    if (add_space_prefix_) s += kSpace;
    for (const char c : text) {
      if (c == ' ')
        s += kSpace;
      else
        s += c;
    }
    struct Sym {
      uint32_t off, len;
      int32_t prev, next;
    };
    std::vector<Sym> syms;
    for (size_t i = 0; i < s.size();) {
      const size_t n = utf8_char_len(s, i);
      const int32_t k = int32_t(syms.size());
      syms.push_back({uint32_t(i), uint32_t(n), k - 1, k + 1});
      i += n;
    }
    if (syms.empty()) return;
    syms.back().next = -1;

    struct Cand {
      float score;
      int32_t left, right;
      uint32_t len;  // merged length, to recognise candidates made stale by other merges
      bool operator<(const Cand& o) const { return score != o.score ? score < o.score : left > o.left; }
    };
    std::priority_queue<Cand> heap;
    const auto push = [&](int32_t l) {
      if (l < 0 || syms[size_t(l)].next < 0) return;
      const Sym& a = syms[size_t(l)];
      const Sym& b = syms[size_t(a.next)];
      const auto it = mergeable_.find(std::string_view(s).substr(a.off, a.len + b.len));
      if (it != mergeable_.end()) heap.push({scores_[size_t(it->second)], l, a.next, a.len + b.len});
    };
    for (int32_t i = 0; i + 1 < int32_t(syms.size()); ++i) push(i);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      Sym& l = syms[size_t(c.left)];
      if (l.len == 0 || l.next != c.right || l.len + syms[size_t(c.right)].len != c.len) continue;
      Sym& r = syms[size_t(c.right)];
      l.len += r.len;
      l.next = r.next;
      if (r.next >= 0) syms[size_t(r.next)].prev = c.left;
      r.len = 0;
      push(l.prev);
      push(c.left);
    }
    for (int32_t i = 0; i >= 0; i = syms[size_t(i)].next) {
      const std::string_view sv = std::string_view(s).substr(syms[size_t(i)].off, syms[size_t(i)].len);
      const auto it = mergeable_.find(sv);
      if (it != mergeable_.end()) {
        out.push_back(it->second);
        continue;
      }
      for (const char c : sv) {
        const int32_t b = byte_id_[uint8_t(c)];
        if (b >= 0)
          out.push_back(b);
        else if (unk_id_ >= 0)
          out.push_back(unk_id_);
        else
          TF_FAIL(source_, ": text needs a token for byte ", int(uint8_t(c)), " and the vocab has no <0x",
                  std::hex, int(uint8_t(c)), "> and no unknown token");
      }
    }
  }

  void decode(std::span<const int32_t> ids, bool after_special, std::string& out) const override {
    const size_t start = out.size();
    for (const int32_t id : ids) append_piece(id, out);
    if (add_space_prefix_ && after_special && out.size() > start && out[start] == ' ') out.erase(start, 1);
  }

  const std::string& piece(int32_t id) const override { return pieces_[size_t(id)]; }
  std::optional<int32_t> find(std::string_view p) const override {
    const auto it = all_ids_.find(p);
    if (it == all_ids_.end()) return std::nullopt;
    return it->second;
  }
  size_t size() const override { return pieces_.size(); }

 private:
  void append_piece(int32_t id, std::string& out) const {
    const TokenType t = types_[size_t(id)];
    const std::string& p = pieces_[size_t(id)];
    if (t == TokenType::Byte) {  // validated as <0xNN> when loaded
      out += char(std::stoi(p.substr(3, 2), nullptr, 16));
      return;
    }
    if (t == TokenType::Control || t == TokenType::Unused) return;
    for (size_t i = 0; i < p.size();) {
      if (p.compare(i, kSpace.size(), kSpace) == 0) {
        out += ' ';
        i += kSpace.size();
      } else {
        out += p[i++];
      }
    }
  }

  // Heterogeneous lookup so a std::string_view into the text can be searched without a copy.
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view v) const { return std::hash<std::string_view>{}(v); }
  };
  using PieceMap = std::unordered_map<std::string, int32_t, Hash, std::equal_to<>>;

  std::string source_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<TokenType> types_;
  PieceMap mergeable_, all_ids_;
  std::array<int32_t, 256> byte_id_{};
  int32_t unk_id_;
  bool add_space_prefix_;
};

}  // namespace

std::unique_ptr<TokenModel> make_score_spm(const SpmSpec& spec) {
  return std::make_unique<ScoreSpm>(spec);
}

}  // namespace tf::tok
