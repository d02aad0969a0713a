// A sentencepiece .model behind our TokenModel: libsentencepiece does normalisation and encoding;
// this class only adapts ids, turns library statuses into tf::Error naming the file, and refuses
// text that is not UTF-8 (sentencepiece would silently replace it, and a training set with broken
// text should be fixed, not tokenized).
#include <sentencepiece_processor.h>

#include "src/core/error.h"
#include "tokenizer/token_model.h"
#include "tokenizer/utf8.h"

namespace tf::tok {
namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's visible space

class SentencePiece final : public TokenModel {
 public:
  SentencePiece(const std::string& path, SentencePieceInfo& info) : source_(path) {
    const auto status = sp_.Load(path);
    TF_CHECK(status.ok(), path, ": not a loadable sentencepiece model: ", status.ToString());
    const int n = sp_.GetPieceSize();
    pieces_.reserve(size_t(n));
    for (int i = 0; i < n; ++i) {
      pieces_.push_back(sp_.IdToPiece(i));
      TF_CHECK(pieces_.back().size() <= kMaxPieceBytes, path, ": piece ", i, " is ", pieces_.back().size(),
               " bytes long; pieces over ", kMaxPieceBytes, " bytes are refused");
      if (sp_.IsControl(i) || sp_.IsUnknown(i)) info.control_tokens.push_back({pieces_.back(), i, true});
    }
    info.bos_id = sp_.bos_id();
    info.eos_id = sp_.eos_id();
    info.pad_id = sp_.pad_id();
    info.unk_id = sp_.unk_id();
  }

  void encode(std::string_view text, bool, std::vector<int32_t>& out) const override {
    const size_t bad = utf8_invalid_at(text);
    TF_CHECK(bad == std::string_view::npos, source_, ": text is not valid UTF-8 at byte ", bad,
             "; the sentencepiece tokenizer encodes UTF-8 text only");
    std::vector<int> ids;
    const auto status = sp_.Encode(text, &ids);
    TF_CHECK(status.ok(), source_, ": sentencepiece failed to encode: ", status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

  void decode(std::span<const int32_t> ids, bool after_special, std::string& out) const override {
    if (after_special) {  // the library drops the dummy-prefix space that encode put there
      std::string text;
      const auto status = sp_.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
      TF_CHECK(status.ok(), source_, ": sentencepiece failed to decode: ", status.ToString());
      out += text;
      return;
    }
    for (const int32_t id : ids) {
      const std::string& p = pieces_[size_t(id)];
      if (sp_.IsByte(id)) {
        out += char(std::stoi(p.substr(3, 2), nullptr, 16));
      } else if (!sp_.IsControl(id)) {
        for (size_t i = 0; i < p.size();) {
          if (p.compare(i, kSpace.size(), kSpace) == 0) {
            out += ' ';
            i += kSpace.size();
          } else {
            out += p[i++];
          }
        }
      }
    }
  }

  const std::string& piece(int32_t id) const override { return pieces_[size_t(id)]; }
  std::optional<int32_t> find(std::string_view p) const override {
    const int id = sp_.PieceToId(p);
    if (id == sp_.unk_id() && p != pieces_[size_t(id)]) return std::nullopt;
    return id;
  }
  size_t size() const override { return pieces_.size(); }

 private:
  std::string source_;
  sentencepiece::SentencePieceProcessor sp_;
  std::vector<std::string> pieces_;
};

}  // namespace

std::unique_ptr<TokenModel> make_sentencepiece(const std::string& path, SentencePieceInfo& info) {
  return std::make_unique<SentencePiece>(path, info);
}

}  // namespace tf::tok
