// defines: tf::tok::Regex over PCRE2 (UTF and Unicode properties on, the JIT where the library has one)
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/regex.h"

#include <pcre2.h>

#include <array>

#include "src/core/error.h"
#include "tokenizer/token_model.h"
#include "tokenizer/utf8.h"

namespace tf::tok {
namespace {

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buf{};
  pcre2_get_error_message(code, buf.data(), buf.size());
  return reinterpret_cast<const char*>(buf.data());
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

}  // namespace

struct Regex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

Regex::Regex(const std::string& pattern, const std::string& source, const std::string& what)
    : pattern_(pattern), source_(source), what_(what), code_(std::make_unique<Code>()) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  code_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &err_off, nullptr);
  TF_CHECK(code_->code, source, ": ", what, " /", shown(pattern), "/ does not compile at offset ", err_off,
           ": ", pcre2_message(err));
  // The JIT is an optional speed-up; the interpreter gives the same matches where it is absent.
  pcre2_jit_compile(code_->code, PCRE2_JIT_COMPLETE);
}

Regex::Regex(Regex&&) noexcept = default;
Regex& Regex::operator=(Regex&&) noexcept = default;
Regex::~Regex() = default;

void Regex::find_all(std::string_view text, size_t begin, size_t end,
                     std::vector<std::pair<size_t, size_t>>& out) const {
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(
      pcre2_match_data_create_from_pattern(code_->code, nullptr));
  TF_CHECK(md, "out of memory creating PCRE2 match data");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + begin);
  const size_t len = end - begin;
  size_t pos = 0;
  while (pos < len) {
    const int rc = pcre2_match(code_->code, subject, len, pos, 0, md.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    // Catastrophic backtracking ends at PCRE2's match limit and lands here as an error.
    TF_CHECK(rc >= 0, source_, ": ", what_, " /", shown(pattern_), "/ failed: ", pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    const size_t m0 = ov[0], m1 = ov[1];
    if (m1 == m0) {  // an empty match splits nothing; step over one character and look again
      const size_t n = m0 < len ? utf8_char_len(std::string_view(text.data() + begin, len), m0) : 1;
      pos = m0 + (n == 0 ? 1 : n);
      continue;
    }
    out.emplace_back(begin + m0, m1 - m0);
    pos = m1;
  }
}

void Regex::split(std::string_view text, size_t begin, size_t end,
                  std::vector<std::pair<size_t, size_t>>& out) const {
  std::vector<std::pair<size_t, size_t>> matches;
  find_all(text, begin, end, matches);
  size_t gap = begin;
  for (const auto& [off, len] : matches) {
    if (off > gap) out.emplace_back(gap, off - gap);
    out.emplace_back(off, len);
    gap = off + len;
  }
  if (end > gap) out.emplace_back(gap, end - gap);
}

std::string Regex::replace_all(std::string_view text, std::string_view content) const {
  std::vector<std::pair<size_t, size_t>> matches;
  find_all(text, 0, text.size(), matches);
  std::string out;
  size_t gap = 0;
  for (const auto& [off, len] : matches) {
    out.append(text, gap, off - gap);
    out += content;
    gap = off + len;
  }
  out.append(text, gap);
  return out;
}

}  // namespace tf::tok
