// defines: tf::tok::Normalizer and tf::tok::Decoder (the text transforms of an HF tokenizer.json,
// built from its "normalizer" and "decoder" objects), tf::tok::prepend_scheme_of (Metaspace's
// prepend scheme, read the way HF tokenizers reads it)
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/token_model.h"

namespace tf::tok {

// Applied to each stretch of input between the added tokens that are matched on the raw text.
// Unicode forms come from utf8proc; the other steps are HF tokenizers' own definitions.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // The normalized text. Unicode steps need UTF-8 and say where the text is broken.
  virtual std::string apply(std::string_view text) const = 0;
};
// A tokenizer.json "normalizer" object; null when it is JSON null. Anything it does not implement
// is refused with an error that names `source`, the type and the types it knows.
std::unique_ptr<const Normalizer> make_normalizer(const nlohmann::json& j, const std::string& source);

// Turns the tokens of a decode (vocab spellings and added tokens' contents, in order) into text, as
// HF's decoder chain does: each step maps the list of token strings to a new list, and the result
// is their concatenation.
class Decoder {
 public:
  virtual ~Decoder() = default;
  // `at_start`: the tokens begin the output. Without it the steps that only act on the start of
  // the output (Metaspace's first token, Strip's leading cut) leave the text alone, so a single
  // token decodes as it would appear inside a longer text.
  virtual std::string decode(std::vector<std::string> tokens, bool at_start) const = 0;
};
// A tokenizer.json "decoder" object. JSON null is HF's absent decoder: tokens joined by spaces.
std::unique_ptr<const Decoder> make_decoder(const nlohmann::json& j, const std::string& source);

// Metaspace's "prepend_scheme", or the legacy "add_prefix_space" of files written before it
// existed (true: always; false: never); a file giving both must agree, as HF tokenizers requires.
PrependScheme prepend_scheme_of(const nlohmann::json& metaspace, const std::string& source);

}  // namespace tf::tok
