#!/usr/bin/env python3
"""Copies the chat templates llama.cpp ships into tests/fixtures/templates/ and renders a fixed set of
conversations with each, the way transformers renders chat templates (its own jinja2 environment:
ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, its tojson, raise_exception and
strftime_now), writing the expected strings for tests/test_data_jinja_templates.cpp.

    /work/venv/bin/python tools/make_template_fixtures.py [LLAMA_CPP_DIR]

Writes tests/fixtures/templates/<name>.jinja (the texts as published), index.json (each file's
source), conversations.json (the conversations, in tightfit's Message shape) and expected.json: per
template and conversation the rendered text, or that rendering raises, and for templates with
{% generation %} blocks the byte spans transformers' return_assistant_tokens_mask marks.
Run by hand, never by CI.
"""
import datetime as _dt
import json
import pathlib
import re
import shutil
import sys

from transformers.utils import chat_template_utils as ctu

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "templates"
DEFAULT_LLAMA_CPP = "/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp"

# strftime_now renders this instant; the C++ test passes the same one (noon UTC, so the local date
# is the same in every time zone within 11 hours of UTC).
NOW = _dt.datetime(2024, 6, 15, 12, 0, 0, tzinfo=_dt.timezone.utc)
NOW_UNIX = int(NOW.timestamp())


class _FixedClock(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return NOW.astimezone(tz) if tz else NOW.astimezone().replace(tzinfo=None)


ctu.datetime = _FixedClock

BOS, EOS = "<s>", "</s>"

# None of llama.cpp's templates has {% generation %} blocks; these two, written for these tests in
# the form transformers' chat templating guide gives, have them, so that the spans transformers'
# return_assistant_tokens_mask marks are compared too.
GENERATION_TEMPLATES = {
    "tightfit-chatml-generation.jinja": (
        "{%- for message in messages %}\n"
        "    {%- if message.role == 'assistant' %}\n"
        "        {{- '<|im_start|>assistant\\n' }}\n"
        "        {%- generation %}\n"
        "            {{- message.content + '<|im_end|>' }}\n"
        "        {%- endgeneration %}\n"
        "        {{- '\\n' }}\n"
        "    {%- else %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n"
    ),
    "tightfit-llama3-generation.jinja": (
        "{{- bos_token }}\n"
        "{%- for message in messages %}\n"
        "    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}\n"
        "    {%- if message.role == 'assistant' %}\n"
        "        {%- generation %}{{- message.content | trim + '<|eot_id|>' }}{%- endgeneration %}\n"
        "    {%- else %}\n"
        "        {{- message.content | trim + '<|eot_id|>' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}

# Messages in tightfit's shape (src/data/chat_template.h): tool call arguments as JSON text.
CONVERSATIONS = {
    "system_single": {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi there. How can I help?"},
        ],
        "add_generation_prompt": False,
    },
    "multi_turn": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "  And 3+3?\n"},
            {"role": "assistant", "content": "6, of course."},
        ],
        "add_generation_prompt": False,
    },
    "open_prompt": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another, in \"quotes\" & caf\u00e9 \u2603."},
        ],
        "add_generation_prompt": True,
    },
    "no_system_prompt": {
        "messages": [{"role": "user", "content": "Hi"}],
        "add_generation_prompt": True,
    },
    "tool_calls": {
        "messages": [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "call12345", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}],
            },
            {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call12345", "name": "get_weather"},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": False,
    },
    "reasoning": {
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>\n7 has no divisors but 1 and 7.\n</think>\n\nYes."},
        ],
        "add_generation_prompt": False,
    },
}


def template_messages(messages):
    """The dicts a template sees, as src/data/chat_template.cpp builds them."""
    out = []
    for m in messages:
        d = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            d["tool_calls"] = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                for c in m["tool_calls"]
            ]
        if m.get("tool_call_id"):
            d["tool_call_id"] = m["tool_call_id"]
        if m.get("name"):
            d["name"] = m["name"]
        out.append(d)
    return out


def byte_spans(text, spans):
    return [[len(text[:b].encode()), len(text[:e].encode())] for b, e in spans]


def render(template, conv, with_mask):
    kwargs = dict(
        conversations=[template_messages(conv["messages"])],
        tools=conv.get("tools"),
        chat_template=template,
        add_generation_prompt=conv["add_generation_prompt"],
        bos_token=BOS,
        eos_token=EOS,
    )
    try:
        if with_mask:
            texts, spans = ctu.render_jinja_template(return_assistant_tokens_mask=True, **kwargs)
            return {"text": texts[0], "generation": byte_spans(texts[0], spans[0])}
        texts, _ = ctu.render_jinja_template(**kwargs)
        return {"text": texts[0]}
    except Exception as e:  # the template refuses the conversation (raise_exception, bad types)
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_LLAMA_CPP) / "models" / "templates"
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    index, expected, texts = {}, {}, {}
    for path in sorted(src.glob("*.jinja")):
        texts[path.name] = path.read_text(encoding="utf-8")
        index[path.name] = f"llama.cpp (llama-cpp-python 0.3.36 sdist) vendor/llama.cpp/models/templates/{path.name}"
    for name, text in GENERATION_TEMPLATES.items():
        texts[name] = text
        index[name] = "written for these tests (tools/make_template_fixtures.py), with {% generation %} blocks"
    for file, text in texts.items():
        (OUT / file).write_text(text, encoding="utf-8")
        with_mask = re.search(r"\{\%-?\s*generation\s*-?\%\}", text) is not None
        expected[file] = {name: render(text, conv, with_mask) for name, conv in CONVERSATIONS.items()}
    dump = lambda obj, name: (OUT / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    dump({"now_unix": NOW_UNIX, "bos_token": BOS, "eos_token": EOS, "conversations": CONVERSATIONS}, "conversations.json")
    dump(index, "index.json")
    dump(expected, "expected.json")
    ok = sum(1 for e in expected.values() for r in e.values() if "text" in r)
    print(f"{len(index)} templates, {ok} renders, {sum(len(e) for e in expected.values()) - ok} refused by the template")


if __name__ == "__main__":
    main()
