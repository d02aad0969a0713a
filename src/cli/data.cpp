// defines: `tightfit data`: shows a dataset as finetune would train on it. The examples are
// rendered and tokenised by the same code as training (render_example, tokenize_segments,
// tokenize_dataset), so what is marked here is what the loss sees; "all labels are -100", the
// most common masking mistake, shows as its own line.
#include "src/cli/data.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/cli/common.h"
#include "src/cli/options.h"
#include "src/core/error.h"
#include "src/data/batcher.h"
#include "src/data/sampler.h"

namespace tf::cli {
namespace {

using nlohmann::json;

constexpr const char* kOpen = "[[";
constexpr const char* kClose = "]]";
constexpr const char* kColorOpen = "\x1b[1;32m";
constexpr const char* kColorClose = "\x1b[0m";

// A token counts in the loss when its flag is set and something precedes it: the first token of an
// example is never predicted.
bool in_loss(const std::vector<uint8_t>& trainable, size_t k) {
  return k > 0 && trainable[k] != 0;
}

struct Shown {
  size_t line = 0;
  std::string error;  // the template refused the record
  std::vector<int32_t> ids;
  std::vector<uint8_t> trainable;
  size_t kept = 0;                                 // tokens within --seq-len
  size_t trained = 0;                              // of those, the ones in the loss
  std::string status;                              // kept, truncated, or why it is dropped
  std::vector<std::pair<std::string, bool>> runs;  // the kept text in runs of (text, in the loss)
};

Shown show_example(const data::Example& ex, const data::ChatTemplate& tmpl, const tok::Tokenizer& tok,
                   const data::TokenizeOptions& to, const data::LossOptions& loss) {
  Shown s;
  s.line = ex.line;
  std::vector<data::Segment> segs;
  try {
    segs = data::render_example(tmpl, ex, tok.adds_bos(), loss);
  } catch (const Error& e) {
    s.error = e.what();
    return s;
  }
  data::tokenize_segments(segs, tok, to.train_on_all, SIZE_MAX, s.ids, s.trainable);
  s.kept = std::min(s.ids.size(), to.seq_len);
  for (size_t k = 0; k < s.kept; ++k) s.trained += in_loss(s.trainable, k);
  size_t trained_anywhere = 0;
  for (size_t k = 0; k < s.ids.size(); ++k) trained_anywhere += in_loss(s.trainable, k);
  if (trained_anywhere == 0)
    s.status = "dropped: no trained token";
  else if (s.trained == 0)
    s.status = "dropped: no trained token within --seq-len";
  else if (s.ids.size() > to.seq_len)
    s.status = "truncated to its first " + std::to_string(to.seq_len) + " tokens";
  else
    s.status = "kept";
  // Runs are decoded whole, so that a character split across tokens shows as itself.
  for (size_t k = 0; k < s.kept;) {
    const bool t = in_loss(s.trainable, k);
    size_t e = k;
    while (e < s.kept && in_loss(s.trainable, e) == t) ++e;
    s.runs.emplace_back(tok.decode(std::span<const int32_t>(s.ids.data() + k, e - k)), t);
    k = e;
  }
  return s;
}

// Rows of --seq-len tokens that hold tokens, over all rows the batches fill, in file order.
struct Packing {
  size_t batches = 0;
  double efficiency = 0;
};
Packing packing(const data::TokenizedDataset& td, int micro_batch, int seq_len, bool pack) {
  Packing p;
  if (td.size() == 0) return p;
  data::Sampler sampler(td.size(), 0, /*shuffle=*/false, /*epochs=*/1);
  data::BatchOptions bo;
  bo.batch = micro_batch;
  bo.seq = seq_len;
  bo.pack = pack;
  data::TokenBatch batch;
  while (data::next_batch(td, sampler, bo, batch)) ++p.batches;
  p.efficiency = double(td.ids.size()) / (double(p.batches) * micro_batch * seq_len);
  return p;
}

size_t loss_tokens(const data::TokenizedDataset& td) {
  size_t n = 0;
  for (size_t i = 0; i < td.size(); ++i) {
    const auto t = td.example_trainable(i);
    for (size_t k = 1; k < t.size(); ++k) n += t[k];
  }
  return n;
}

}  // namespace

int run_data(const DataOptions& o) {
  check_input_file("--data", o.data, "a JSONL file");
  TF_CHECK(o.seq_len >= 8 && o.seq_len <= (1 << 20), "--seq-len must be in [8, 1048576], got ", o.seq_len);
  TF_CHECK(o.micro_batch >= 1 && o.micro_batch <= 4096, "--micro-batch must be in [1, 4096], got ",
           o.micro_batch);
  TF_CHECK(o.examples >= 0, "-n (examples shown) must not be negative, got ", o.examples);
  data::TokenizeOptions to = tokenize_options(o.seq_len, o.train_on, o.mask_history, o.train_on_eos);
  to.skip_bad_lines = true;
  to.allow_empty = true;
  const data::LossOptions loss{
      .all = to.train_on_all, .mask_history = to.mask_history, .eos = to.train_on_eos};

  // Only the tokenizer and the chat template are read: a GGUF's tensors are not loaded, and an HF
  // directory's stay mapped as the file stores them (keep), untouched.
  const io::LoadedModel m = io::load_model(o.model, false, io::QuantMode::Keep);
  TF_CHECK(m.tokenizer, m.source, ": the model has no tokenizer (tokenizer.json, tokenizer.model or an ",
           "embedded GGUF vocabulary)");
  const tok::Tokenizer& tok = *m.tokenizer;
  const data::ChatTemplate tmpl = choose_template(o.template_name, m, o.think);
  const data::Dataset ds = data::load_jsonl(o.data, {.skip_bad_lines = true});
  const data::TokenizedDataset td = data::tokenize_dataset(ds, tmpl, tok, to);

  std::vector<Shown> shown;
  for (size_t i = 0; i < ds.examples.size() && i < size_t(o.examples); ++i)
    shown.push_back(show_example(ds.examples[i], tmpl, tok, to, loss));
  const Packing packed = packing(td, o.micro_batch, o.seq_len, true);
  const Packing unpacked = packing(td, o.micro_batch, o.seq_len, false);
  const size_t read = ds.examples.size() + ds.skipped_lines;
  const size_t bad = ds.skipped_lines + td.skipped_bad;
  const size_t trained = loss_tokens(td);
  std::vector<std::string> problems = ds.first_problems;
  problems.insert(problems.end(), td.first_problems.begin(), td.first_problems.end());
  const std::string template_name = tmpl.kind == data::TemplateKind::Model
                                        ? "the model's own chat template"
                                        : std::string(data::template_name(tmpl.kind));

  if (o.json) {
    json examples = json::array();
    for (const Shown& s : shown) {
      json e{{"line", s.line}};
      if (!s.error.empty()) {
        e["error"] = s.error;
      } else {
        std::string marked;
        json runs = json::array();
        for (const auto& [text, t] : s.runs) {
          marked += t ? kOpen + text + kClose : text;
          runs.push_back({{"text", text}, {"trained", t}});
        }
        e.update({{"tokens", s.ids.size()},
                  {"trained", s.trained},
                  {"status", s.status},
                  {"marked", marked},
                  {"runs", runs}});
      }
      examples.push_back(e);
    }
    const json out{
        {"model", o.model},
        {"data", o.data},
        {"template", std::string(data::template_name(tmpl.kind))},
        {"seq_len", o.seq_len},
        {"examples", examples},
        {"read", read},
        {"kept", td.size()},
        {"truncated", td.truncated},
        {"dropped",
         {{"too_long", td.dropped_too_long}, {"no_trained_token", td.dropped_no_target}, {"bad_lines", bad}}},
        {"tokens", td.ids.size()},
        {"trained_tokens", trained},
        {"problems", problems},
        {"packing", {{"pack", packed.efficiency}, {"no_pack", unpacked.efficiency}}},
        {"no_trained_token", trained == 0}};
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  const bool color = stdout_is_terminal();
  const char* open = color ? kColorOpen : kOpen;
  const char* close = color ? kColorClose : kClose;
  std::printf("template %s; tokens in the loss are marked %s\n", template_name.c_str(),
              color ? "in green" : "[[like this]]");
  for (const Shown& s : shown) {
    if (!s.error.empty()) {
      std::printf("\n--- line %zu: the template cannot render it: %s\n", s.line, s.error.c_str());
      continue;
    }
    std::printf("\n--- line %zu: %zu tokens, %zu in the loss; %s\n", s.line, s.ids.size(), s.trained,
                s.status.c_str());
    std::string text;
    for (const auto& [run, t] : s.runs) text += t ? open + run + close : run;
    std::printf("%s\n", text.c_str());
    if (s.kept < s.ids.size())
      std::printf("[... %zu tokens past --seq-len %d]\n", s.ids.size() - s.kept, o.seq_len);
  }
  std::printf("\n%s at --seq-len %d:\n", o.data.c_str(), o.seq_len);
  std::printf("  examples: %zu read, %zu kept (%zu of them truncated), %zu dropped\n", read, td.size(),
              td.truncated, td.dropped_too_long + td.dropped_no_target + bad);
  std::printf(
      "  dropped: %zu too long with no trained token within --seq-len, %zu with no trained token at all, "
      "%zu bad lines\n",
      td.dropped_too_long, td.dropped_no_target, bad);
  for (const std::string& p : problems) std::printf("    %s\n", p.c_str());
  std::printf("  tokens: %zu, %zu of them in the loss\n", td.ids.size(), trained);
  if (td.size() > 0)
    std::printf(
        "  packing efficiency (tokens / (sequences x --seq-len), micro-batch %d, in file order): %.3f with "
        "--pack (%zu sequences), %.3f with --no-pack (%zu sequences)\n",
        o.micro_batch, packed.efficiency, packed.batches * size_t(o.micro_batch), unpacked.efficiency,
        unpacked.batches * size_t(o.micro_batch));
  if (trained == 0)
    std::printf(
        "no example has a token in the loss: all labels are -100, and finetune would refuse this data "
        "(check --template, --train-on, --mask-history and the records' train/weight flags)\n");
  return 0;
}

}  // namespace tf::cli
