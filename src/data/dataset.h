// defines: tf::data::load_jsonl (validated JSONL records), tf::data::parse_record,
// tf::data::tokenize_segments, tf::data::tokenize_dataset (token ids + per-token loss flags),
// tf::data::TokenizedDataset
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "src/data/chat_template.h"

namespace tf::tok {
class Tokenizer;
}

namespace tf::data {

struct LoadOptions {
  // Skip a bad line (and count it) instead of failing on it.
  bool skip_bad_lines = false;
  // A longer line is an error even under skip_bad_lines: reading stops at the bound, so a file
  // without newlines (a device, a binary file) costs bounded memory and time. Real records are far
  // below it.
  size_t max_line_bytes = size_t(64) << 20;
};

struct Dataset {
  std::string path;
  std::vector<Example> examples;
  size_t skipped_lines = 0;                 // bad lines skipped under skip_bad_lines
  std::vector<std::string> first_problems;  // the first few skipped lines' errors, for a warning
};

// Reads and validates a JSONL file: one JSON object per line in one of the shapes {"text"},
// {"prompt","completion"}, {"messages":[{"role","content"}...], "tools"?} (OpenAI's, with
// tool_calls, tool turns and text parts), ShareGPT's {"conversations":[{"from","value"}...],
// "system"?, "tools"?} or alpaca's {"instruction","input"?,"output","system"?,"history"?}; a
// message may carry "train": true|false or "weight": 0|1;
// blank lines are ignored. A bad line (invalid UTF-8, malformed JSON, not an object, missing or
// mistyped fields, an unknown role) is a tf::Error "file:line: problem", or is skipped and counted. A
// line over max_line_bytes, a directory, and a file with no example are errors.
Dataset load_jsonl(const std::string& path, const LoadOptions& opt = {});

// One line's record; errors say what is wrong without a location (load_jsonl adds file:line).
Example parse_record(std::string_view line);

// Token ids with a per-token "counts in the loss" flag, for many examples in two flat arrays.
struct TokenizedDataset {
  std::vector<int32_t> ids;
  std::vector<uint8_t> trainable;
  std::vector<size_t> offsets{0};  // example i is [offsets[i], offsets[i+1])
  size_t truncated = 0;            // examples longer than seq_len, kept as their first seq_len tokens
  size_t dropped_too_long = 0;     // examples longer than seq_len with no trainable token within it
  size_t dropped_no_target = 0;    // examples no longer than seq_len with no trainable token
  size_t skipped_bad = 0;          // examples the template refused, under skip_bad_lines
  std::vector<std::string> first_problems;  // the first few refusals' "file:line: problem"

  size_t size() const { return offsets.size() - 1; }
  size_t length(size_t i) const { return offsets[i + 1] - offsets[i]; }
  std::span<const int32_t> example_ids(size_t i) const { return {ids.data() + offsets[i], length(i)}; }
  std::span<const uint8_t> example_trainable(size_t i) const {
    return {trainable.data() + offsets[i], length(i)};
  }
  size_t trainable_tokens() const;
};

struct TokenizeOptions {
  size_t seq_len = 2048;
  bool train_on_all = false;    // loss on every token, prompt included
  bool skip_bad_lines = false;  // as LoadOptions: a record the template refuses is skipped and counted
  bool mask_history = false;    // loss only on the last assistant turn (not with train_on_all)
  EosLoss train_on_eos = EosLoss::Turn;
  bool allow_empty = false;  // no example left is a result (for reporting it), not an error
};

// Tokenises rendered segments. Each stretch between BOS/EOS tokens is encoded as one string (special
// tokens in it parsed, as HF tokenises a rendered chat template), so the ids equal those of the
// whole rendered text; a token's flag comes from the segment it lies in, found by encoding each
// segment boundary's prefix. A token that straddles a boundary belongs to the later segment.
// Boundaries past `max_tokens` are not resolved (their tokens are about to be truncated away). A BOS
// id counts in the loss when `bos_in_loss` (--train-on all) and the segment it opens does.
void tokenize_segments(const std::vector<Segment>& segs, const tok::Tokenizer& tok, bool bos_in_loss,
                       size_t max_tokens, std::vector<int32_t>& ids, std::vector<uint8_t>& trainable);

// Renders and tokenises every example, the loss decided by train_on_all, mask_history, train_on_eos
// and each message's own flag (LossOptions). Truncation keeps the start of an example (its first seq_len
// tokens); an example left with no trainable token to predict (none after its first token) is
// dropped and counted, apart from those that lost them to truncation. It is an error when no example
// is left, unless allow_empty.
TokenizedDataset tokenize_dataset(const Dataset& data, const ChatTemplate& tmpl, const tok::Tokenizer& tok,
                                  const TokenizeOptions& opt);

}  // namespace tf::data
