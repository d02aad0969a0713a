// defines: tf::data::Example (one JSONL record in any of its shapes), tf::data::ChatTemplate,
// tf::data::Segment, tf::data::LossOptions (what counts in the loss) and its rules, template_by_name,
// detect_template, render_example, render_response_prompt, segments_to_text
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tf::data {

// A function call an assistant turn makes (OpenAI `tool_calls`, ShareGPT `function_call`).
struct ToolCall {
  std::string id;  // may be empty
  std::string name;
  std::string arguments;  // the arguments object as compact JSON text
};

struct Message {
  Message() = default;
  Message(std::string r, std::string c) : role(std::move(r)), content(std::move(c)) {}

  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
  std::vector<ToolCall> tool_calls;  // assistant turns only
  std::string tool_call_id;          // tool turns: the call this answers (may be empty)
  std::string name;                  // tool turns: the function's name (may be empty)
  // Whether this turn's tokens count in the loss: -1 as the options decide (assistant turns yes,
  // others no), 0 never, 1 always. From a record's per-message "train" / "weight" field.
  int train = -1;
};

// One training record. Which fields are meaningful depends on `shape`.
struct Example {
  enum class Shape { Text, PromptCompletion, Messages, Instruction };
  Shape shape = Shape::Text;
  std::string text;                // Text
  std::string prompt, completion;  // PromptCompletion
  // Messages: the conversation. Instruction: the turns before the instruction (alpaca's "system"
  // and "history"), usually none.
  std::vector<Message> messages;
  std::string tools;  // Messages: the record's "tools" list as compact JSON text, or empty
  std::string instruction, input, output;  // Instruction (input may be empty)
  size_t line = 0;                         // 1-based line in its file, for error messages
};

// Model: the model's own Jinja chat template (src/data/model_template.h), what --template auto
// renders with when the model has one; the others are built in and chosen by name.
enum class TemplateKind { Plain, Alpaca, ChatML, Llama3, Llama2, Mistral, Gemma, Model };

struct ModelTemplate;

struct ChatTemplate {
  TemplateKind kind = TemplateKind::Plain;
  // The system prompt the model's own template inserts when a conversation has none (SmolLM2 and
  // Qwen2 do this); empty: none is inserted.
  std::string default_system;
  std::shared_ptr<const ModelTemplate> model;  // kind Model
};

// A piece of rendered text. `bos` / `eos` say that the tokenizer's BOS token comes right before the
// text / its EOS token right after it: those are ids, not text, so that a template does not depend on
// how a vocabulary spells them. A trainable segment's EOS is trainable too.
struct Segment {
  std::string text;
  bool trainable = false;
  bool bos = false;
  bool eos = false;
};

// Which end-of-turn markers count in the loss (--train-on-eos). The marker is the template's own
// (<|im_end|>, <|eot_id|>) or the EOS token where the template ends a turn with it.
enum class EosLoss {
  Turn,  // the marker of every trained turn (the default)
  Last,  // only the marker of the last trained turn
  All,   // the marker of every turn, trained or not, but turns marked "train": false
  None,  // no marker
};

// Which tokens count in the loss. Precedence: a message's own `train` flag, then mask_history,
// then all; the end-of-turn markers follow `eos`.
struct LossOptions {
  bool all = false;           // --train-on all: every token, the template's own text included
  bool mask_history = false;  // only the last assistant turn (of the turns without a flag)
  EosLoss eos = EosLoss::Turn;
};

// The --train-on-eos names: turn, last, all, none; anything else is an error listing them.
EosLoss eos_loss_by_name(std::string_view name);

// Whether turn `i` of `msgs` counts in the loss: its content (turn_trained), its end-of-turn marker
// (end_trained), and the template's text around it, such as a role header (frame_trained; `i` may be
// msgs.size() for text that belongs to no turn). Every renderer, built-in or the model's own,
// decides by these.
bool turn_trained(const std::vector<Message>& msgs, size_t i, const LossOptions& loss);
bool end_trained(const std::vector<Message>& msgs, size_t i, const LossOptions& loss);
bool frame_trained(const std::vector<Message>& msgs, size_t i, const LossOptions& loss);

// "plain", "alpaca", "chatml", "llama3", "llama2", "mistral", "gemma"; anything else is an error listing
// these.
ChatTemplate template_by_name(std::string_view name);
std::string_view template_name(TemplateKind kind);

// Recognises a model's Jinja chat template (tokenizer_config.json `chat_template`, GGUF
// `tokenizer.chat_template`) by its markers. `source` names where the text came from in errors; an
// unrecognised template is an error that suggests --template.
ChatTemplate detect_template(std::string_view jinja, std::string_view source);

// Renders one example as the model's template would, split into prompt (not trainable) and response
// (trainable) segments as `loss` decides: by default assistant turns with their end-of-turn marker,
// completions and outputs with EOS; a {"text"} record is trainable as a whole. ChatML renders tool
// calls and tool turns as Qwen2.5 does, Llama 3 as Llama 3.1 does (tools lists refused); the other
// built-in templates refuse them, naming --template auto. `tokenizer_adds_bos` decides BOS for the plain and
// Alpaca formats, which have no opinion of their own; the chat templates write BOS where the
// model's template does. Throws a tf::Error (without a location; the caller adds file:line) when the
// example does not fit the template, e.g. Llama-2 and Mistral demand alternating user/assistant turns.
std::vector<Segment> render_example(const ChatTemplate& tmpl, const Example& ex, bool tokenizer_adds_bos,
                                    const LossOptions& loss = {});

// The prompt that leads up to `ex`'s final response (completion, output or closing assistant turn),
// rendered exactly as training renders the record: every segment before the response's trainable
// one (a chat template's assistant header included), none of them trainable. Generation from it
// continues where training taught the model to answer, under any template.
std::vector<Segment> render_response_prompt(const ChatTemplate& tmpl, const Example& ex,
                                            bool tokenizer_adds_bos);

// The segments as one string with BOS/EOS spelled out, for display and tests.
std::string segments_to_text(const std::vector<Segment>& segs, std::string_view bos, std::string_view eos);

}  // namespace tf::data
