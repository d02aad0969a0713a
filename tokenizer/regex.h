// defines: tf::tok::Regex (a compiled PCRE2 pattern over UTF-8 text: the split patterns of
// pre-tokenizers and the Replace patterns of normalizers and decoders)
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tf::tok {

class Regex {
 public:
  // `what` names the pattern's role in errors ("pre-tokenizer pattern", "Replace normalizer pattern").
  Regex(const std::string& pattern, const std::string& source, const std::string& what);
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;
  ~Regex();

  // The non-empty matches in text[begin, end), in order, as (offset, length) into text. Raw
  // (non-UTF-8) bytes never match (PCRE2_MATCH_INVALID_UTF).
  void find_all(std::string_view text, size_t begin, size_t end,
                std::vector<std::pair<size_t, size_t>>& out) const;
  // Splits text[begin, end) into matches and the non-empty gaps between them, in order (HF's
  // "Isolated" split behaviour).
  void split(std::string_view text, size_t begin, size_t end,
             std::vector<std::pair<size_t, size_t>>& out) const;
  // Every non-empty match replaced by `content`.
  std::string replace_all(std::string_view text, std::string_view content) const;

 private:
  struct Code;
  std::string pattern_, source_, what_;
  std::unique_ptr<Code> code_;
};

}  // namespace tf::tok
