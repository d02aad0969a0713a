#!/usr/bin/env python3
"""Print the expected pieces of tests/test_tokenizer_gguf.cpp's kPreSplits: what each GGUF
pre-tokenizer family's split regexes make of the test's texts, by Python's `regex` module.

Run by hand (never by CI), with the venv's Python (it needs `regex`) and llama.cpp's sources:
    PYTHON tools/make_pre_split_cases.py LLAMA_CPP_DIR > cases.inc
and paste the output over kPreSplits' entries.

The regexes are read from LLAMA_CPP_DIR/src/llama-vocab.cpp: each pre type's regex_exprs, except
that where llama.cpp keeps the model's "original regex from tokenizer.json" in a comment (it
rewrote it for std::regex), the original is used, as tightfit runs it with PCRE2. Each regex splits
every piece the previous one made into its matches and the gaps between them (HF's Isolated split);
an empty match only ends the gap before it.
"""
import ast
import re
import sys

import regex

TEXTS = [
    "HelloWORLD don't I'M 1234567",
    "x+=1;\n\n  y\t'z $5",
    "中文テスト，한국어。\u3000ok",
    "Ünïcödé ΑΒΓ αβγ ＡＢ ÀbcÉdf",
    "cafe\u0301 y\n\n\nz .Net ½ 'LL",
]

# (llama.cpp pre type, the tokenizer.ggml.pre names tightfit maps to it, BOS by default)
FAMILIES = [
    ("GPT2", ["gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"], False),
    ("STARCODER", ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"],
     False),
    ("LLAMA3", ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"], True),
    ("DBRX", ["dbrx", "smaug-bpe", "chatglm-bpe"], False),
    ("QWEN2", ["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "solar-open", "kormo", "f2llmv2",
               "grok-2"], False),
    ("QWEN35", ["qwen35"], False),
    ("DEEPSEEK_LLM", ["deepseek-llm"], False),
    ("DEEPSEEK_CODER", ["deepseek-coder"], False),
    ("DEEPSEEK3_LLM", ["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], False),
    ("FALCON", ["falcon"], False),
    ("PORO", ["poro-chat"], False),
    ("VIKING", ["viking"], False),
    ("TEKKEN", ["tekken"], True),
    ("GPT4O", ["gpt-4o", "llama4", "kanana2", "minimax-m2"], False),
    ("BAILINGMOE", ["bailingmoe", "bailingmoe2", "llada-moe"], False),
    ("SEED_CODER", ["seed-coder"], False),
    ("MINICPM5", ["minicpm5"], False),
    ("DEFAULT", ["default", ""], False),
]


def regexes(src, pre_type):
    """The regex list llama.cpp's BPE tokenizer uses for pre_type, originals where it keeps them."""
    body = src[src.index("struct llm_tokenizer_bpe : llm_tokenizer"):]
    label = "default:" if pre_type == "DEFAULT" else f"case LLAMA_VOCAB_PRE_TYPE_{pre_type}:"
    block = body[body.index(label):]
    block = block[:block.index("break;")]
    out = []
    original_next = False
    for line in block.split("\n")[1:]:
        s = line.strip()
        if s.startswith("// original regex from tokenizer.json"):
            original_next = True
            rest = s[len("// original regex from tokenizer.json"):].lstrip(": ")
            if rest.startswith('"'):
                out.append(ast.literal_eval(rest.rstrip(",")))
                original_next = "used"
            continue
        if s.startswith("//"):
            if original_next is True and s[2:].strip().startswith('"'):
                out.append(ast.literal_eval(s[2:].strip().rstrip(",")))
                original_next = "used"
            continue
        m = re.match(r'(".*")\s*,?\s*(//.*)?$', s)
        if not m:
            continue
        if original_next == "used":  # llama.cpp's rewrite of the original just taken
            original_next = False
            continue
        out.append(ast.literal_eval(m.group(1)))
    return out


def split(text, patterns):
    pieces = [text]
    for p in patterns:
        r = regex.compile(p)
        nxt = []
        for s in pieces:
            gap = 0
            for m in r.finditer(s):
                if m.start() > gap:
                    nxt.append(s[gap:m.start()])
                gap = m.start()
                if m.end() > m.start():
                    nxt.append(m.group())
                    gap = m.end()
            if gap < len(s):
                nxt.append(s[gap:])
        pieces = nxt
    return pieces


def cpp(s):
    esc = {"\n": "\\n", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
    # combining marks and odd spaces as escapes, so no editor normalizes or hides them
    return '"' + "".join(esc.get(c, f"\\u{ord(c):04x}" if c in "\u0301\u3000" else c) for c in s) + '"'


def main():
    src = open(sys.argv[1] + "/src/llama-vocab.cpp", encoding="utf-8").read()
    for pre_type, names, bos in FAMILIES:
        pats = regexes(src, pre_type)
        rows = ",\n".join("      {" + ", ".join(cpp(p) for p in split(t, pats)) + "}" for t in TEXTS)
        print("  {{%s},\n   %s,\n   {\n%s}}," % (", ".join(cpp(n) for n in names), str(bos).lower(), rows))


if __name__ == "__main__":
    main()
