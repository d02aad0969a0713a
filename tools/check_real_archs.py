#!/usr/bin/env python3
"""Checks tightfit on real files of every architecture it loads: a tiny random transformers model of
each, saved as an HF directory and converted to GGUF by llama.cpp's own convert_hf_to_gguf.py, against
transformers on the HF side and against llama-cpp-python on the GGUF side.

Run by hand (never by CI); no GPU, no network. Needs torch, transformers >= 5, tokenizers, numpy and
llama-cpp-python in the venv, llama.cpp's sources (they ship in the llama-cpp-python source
distribution on PyPI) and a built tightfit:

    /work/venv/bin/python tools/check_real_archs.py \
        --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp [--tightfit build/tightfit] \
        [--only llama qwen2 ...] [--keep DIR]

Each row of ARCHS is one model: a transformers class, its config and the tokenizer family it takes
(a byte-level BPE trained here on the pre-tokenizer regex of Llama 3 or Qwen2, with the special
tokens of Llama 3, Qwen2 or Phi-3, or a SentencePiece BPE with byte fallback, which needs the
sentencepiece and protobuf packages). For each, with the weights in bf16 and every computation of the reference in
float64:
  HF side    tightfit's ids for TEXT (`tightfit eval --logits-out` on a {"text"} record) equal the
             HF tokenizer's; its logits on them against transformers' (largest difference relative
             to the largest logit, and the mean NLL of the text); its greedy continuation of PROMPT
             (`tightfit generate`) against transformers' greedy argmax loop.
  GGUF side  for each --outtype of the converter (f32, bf16, q8_0): tightfit's ids equal
             llama-cpp-python's tokenize; tightfit's and llama.cpp's logits (logits_all=True) against
             the float64 reference of the GGUF's own weights (each tensor that the file stores as
             q8_0 or f16 rounded through gguf-py's quantizer, which is the converter's), and against
             each other; greedy continuations equal.
The reference of the GGUF is what the file says: the converter writes no sliding window for Llama /
Mistral or Qwen2 (only Gemma 2's and 3's), so those rows' GGUF reference attends over every
position, as llama.cpp does.

Tolerances. tightfit computes in f32 from the same weights as the reference, so it must agree to
f32 rounding: over two to six blocks of dot products of at most a few hundred terms, a relative
error of order 1e-6 per operation; TOL_F32 = 1e-4 relative (logits to the largest logit, NLL to
itself) leaves two orders of margin and is still far below what any wrong op gives (a dropped bias,
a wrong rope or norm moves the logits by 1e-2 or more, see tools/make_arch_golden.py). llama.cpp's
f32 files run in f32 with the KV cache kept f32 here, so they meet TOL_F32 too. On bf16 and q8_0
files llama.cpp rounds the activations to the weights' type before each product (bf16: 8 bits of
mantissa, relative u = 2^-9; q8_0: a step of 1/127 of each block of 32's largest value, u = 1/254),
which tightfit does not. To first order each rounded product adds at most u to the relative error of
what follows, and the deepest path through L blocks crosses 7 L + 1 products (q, k, v, o, gate, up,
down, the output), so llama.cpp is held to (7 L + 1) u against the reference (2.9e-2 for bf16 and
5.9e-2 for q8_0 over two blocks), plus 2^-11 for each value llama.cpp rounds to f16 in files of any
type (Gemma 3's GELU goes through ggml's f16 table: its input and its output, 2 L values). That bound
is what checks the reference itself (a wrong reading of the GGUF's semantics moves the logits by far
more); tightfit, held to TOL_F32 against the same reference, is then within llama.cpp's own rounding
of llama.cpp, which the table shows. A greedy continuation may diverge only at a near-tie: where the
other side's (transformers' or llama.cpp's) top-2 margin is at most twice the largest logit
difference between it and tightfit measured on TEXT. Exits 1 on any failure.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tokenizers
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interop_common import find_tightfit, read_safetensors  # noqa: E402
from make_arch_golden import randomise  # noqa: E402

TOL_F32 = 1e-4
# The relative rounding of llama.cpp's activations before a product with weights of each type: none
# for f32, bf16's 8 bits of mantissa, q8_0's step of 1/127 of a block's largest value (half a step).
ACTIVATION_ROUNDING = {"f32": 0.0, "bf16": 2.0**-9, "q8_0": 1.0 / 254}
GEN_TOKENS = 16
OUTTYPES = ["f32", "bf16", "q8_0"]

# Longer than the 8-token windows below, with digits, punctuation, newlines and spaces that the two
# pre-tokenizer regexes split differently.
TEXT = ("The quick brown fox jumps over the lazy dog. In 2024, 12345 foxes  jumped;\n"
        "  they didn't stop! Numbers: 3.14159, 2718 and 0x1F. LoRA adapts seven projections.\n")
PROMPT = "The quick brown fox"

CORPUS = [TEXT,
          "A tiny tokenizer for tiny models: numbers 0123456789, punctuation !?.,;: and spaces.",
          "Qwen and Llama read the same bytes; byte-level BPE never meets an unknown character.",
          "Gemma and Phi split on the same regex here; we'll see what they've learned.",
          "LoRA adapts seven projections of every block while the base stays frozen."] * 20

# The pre-tokenizer regexes of Llama 3's and Qwen2's tokenizer.json, with llama.cpp's names for them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZERS = {
    # name: (regex, llama.cpp pre-tokenizer, bos, eos, other special tokens)
    "llama3": (LLAMA3_REGEX, "llama-bpe", "<|begin_of_text|>", "<|end_of_text|>", []),
    "qwen2": (QWEN2_REGEX, "qwen2", None, "<|endoftext|>", []),
    # Phi-3's special tokens: llama.cpp sets attributes on these by name in any model named phi3 and
    # refuses a vocabulary without them.
    "phi3": (LLAMA3_REGEX, "llama-bpe", "<s>", "<|endoftext|>", ["<unk>", "</s>"]),
    # A SentencePiece BPE with byte fallback (tokenizer.model, and the tokenizer.json transformers makes
    # of it: Metaspace, ByteFallback), as Llama 2, TinyLlama and Mistral 7B v0.1 ship; the converter
    # writes it as a GGUF "llama" vocabulary.
    "spm": (None, None, "<s>", "</s>", []),
}
SPM_VOCAB = 400  # 256 byte pieces, three specials and room for the corpus' characters and merges
TOKENIZER_VOCAB = 320

SMALL = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256)


@dataclasses.dataclass
class Arch:
    name: str
    model_class: str
    config_class: str
    tokenizer: str
    config: dict
    # The config as the converted GGUF has it, where the converter writes less than the HF config says.
    gguf_config: dict = dataclasses.field(default_factory=dict)
    # Written into tokenizer_config.json: the converter of some architectures reads it.
    tokenizer_class: str | None = None
    # Values per block that llama.cpp rounds to f16 whatever the file's type: ggml's CPU GELU looks
    # its input up in a table of f16 and returns the f16 entry.
    llama_cpp_f16_roundings: int = 0


# One line per architecture: 6 query heads over 2 kv heads (GQA 3) of head_dim 32 (not hidden / heads),
# every matrix's inner dimension a multiple of 32 so that q8_0 takes every matrix.
ARCHS = [
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", "llama3", dict(SMALL, tie_word_embeddings=False)),
    Arch("llama_spm", "LlamaForCausalLM", "LlamaConfig", "spm", dict(SMALL, vocab_size=SPM_VOCAB)),
    Arch("llama31", "LlamaForCausalLM", "LlamaConfig", "llama3",
         dict(SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64})),
    Arch("mistral", "MistralForCausalLM", "MistralConfig", "llama3", dict(SMALL, sliding_window=8),
         gguf_config=dict(sliding_window=None)),
    # Qwen2's converter writes no key_length, so llama.cpp takes head_dim = hidden / heads (as every
    # released Qwen2 has it); a padded vocabulary, tied.
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "qwen2",
         dict(SMALL, head_dim=16, vocab_size=TOKENIZER_VOCAB + 32, tie_word_embeddings=True)),
    Arch("qwen2_sliding", "Qwen2ForCausalLM", "Qwen2Config", "qwen2",
         dict(SMALL, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1,
              tie_word_embeddings=False),
         gguf_config=dict(use_sliding_window=False, layer_types=["full_attention"] * 2)),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", "qwen2", dict(SMALL, tie_word_embeddings=True)),
    # Six layers: five sliding (window 8, rope base 10000) and a global one (1e6), Gemma 3's pattern.
    # query_pre_attn_scalar = head_dim: llama.cpp's gemma3 scales by 1/sqrt(head_dim) whatever the
    # config says (the released models have them equal).
    Arch("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", "llama3",
         dict(SMALL, num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=32,
              hidden_activation="gelu_pytorch_tanh"),
         llama_cpp_f16_roundings=2),
    # Four layers, the even ones sliding (window 8), Gemma 2's pattern; the caps low enough (scores at
    # 1, logits at 2) that tanh bends the random model's scores and logits. Gemma 2's converter takes
    # a SentencePiece tokenizer.model only.
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config", "spm",
         dict(SMALL, vocab_size=SPM_VOCAB, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=32,
              hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
         llama_cpp_f16_roundings=2),
    # Phi-3 has no head_dim field: hidden / heads.
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", "phi3",
         dict(SMALL, head_dim=None, tie_word_embeddings=False),
         tokenizer_class="GPT2Tokenizer"),
]


def make_spm_tokenizer(directory):
    import sentencepiece

    corpus = os.path.join(directory, "corpus.txt")
    os.makedirs(directory, exist_ok=True)
    with open(corpus, "w") as f:
        f.write("\n".join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(directory, "tokenizer"), vocab_size=SPM_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2)
    for name in ("corpus.txt", "tokenizer.vocab"):
        os.remove(os.path.join(directory, name))
    transformers.LlamaTokenizer.from_pretrained(directory, add_bos_token=True, legacy=False).save_pretrained(directory)
    tok = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    return tok, tok.token_to_id("<s>"), tok.token_to_id("</s>")


def make_tokenizer(directory, family):
    """A byte-level BPE of TOKENIZER_VOCAB entries split by the family's regex, as Llama 3's and
    Qwen2's tokenizer.json are built, with the family's BOS (added by the post-processor) and EOS; or
    the SentencePiece one."""
    if family == "spm":
        return make_spm_tokenizer(directory)
    regex, _, bos, eos, others = TOKENIZERS[family]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = [s for s in (bos, eos) if s] + others
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    if bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {"bos_token": bos} if bos else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **kwargs).save_pretrained(directory)
    return tok, (tok.token_to_id(bos) if bos else None), tok.token_to_id(eos)


def byte_decoder():
    """The byte each character of a byte-level BPE token stands for: the printable bytes as
    themselves, the others shifted past U+0100 in byte order (GPT-2's table, which ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF = byte_decoder()


def hf_bytes(tok, ids):
    """The bytes of `ids` as tightfit writes a continuation, specials left out: for a ByteLevel
    tokenizer each piece's characters stand for bytes, written as they are (HF's decode would make
    U+FFFD of an incomplete UTF-8 sequence); a SentencePiece one decodes as HF does, its ByteFallback
    making U+FFFD of each byte of a run of <0xNN> pieces that is not UTF-8."""
    if tok.token_to_id("<0x00>") is not None:
        return tok.decode(ids, skip_special_tokens=True).encode()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    pieces = [tok.id_to_token(i) for i in ids]
    return b"".join(bytes(BYTE_OF[c] for c in p) for p in pieces if p not in special)


def build(arch, directory, seed):
    tok, bos_id, eos_id = make_tokenizer(directory, arch.tokenizer)
    config = dict(arch.config)
    config.setdefault("vocab_size", TOKENIZER_VOCAB)
    if config.get("head_dim", 0) is None:
        del config["head_dim"]
    config_class = getattr(transformers, arch.config_class)
    cfg = config_class(**config, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None,
                       architectures=[arch.model_class])
    model = randomise(getattr(transformers, arch.model_class)(cfg), seed)
    model.save_pretrained(directory, safe_serialization=True)
    if arch.tokenizer_class:
        path = os.path.join(directory, "tokenizer_config.json")
        tc = json.load(open(path))
        tc["tokenizer_class"] = arch.tokenizer_class
        json.dump(tc, open(path, "w"), indent=2)
    return tok, eos_id


def reference(arch, directory, config_overrides=None, tensor_types=None, arch_enum=None, n_layers=None, gguf=None):
    """The float64 transformers model of `directory`, with `config_overrides` and, where given, each
    weight rounded to the type the GGUF stores it in."""
    cfg = transformers.AutoConfig.from_pretrained(directory)
    for k, v in (config_overrides or {}).items():
        setattr(cfg, k, v)
    model = getattr(transformers, arch.model_class).from_pretrained(directory, config=cfg, dtype=torch.float64,
                                                                     attn_implementation="eager").eval()
    if tensor_types is not None:
        names = gguf.get_tensor_name_map(arch_enum, n_layers)
        with torch.no_grad():
            for name, p in model.named_parameters():
                gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gname is None or gname not in tensor_types:
                    raise SystemExit(f"error: {arch.name}: no GGUF tensor for {name} (mapped to {gname})")
                qtype = tensor_types[gname]
                if qtype.name in ("F32", "BF16"):
                    continue  # the bf16 values, exactly
                values = p.detach().to(torch.float32).numpy()
                rounded = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
                p.copy_(torch.from_numpy(rounded.reshape(values.shape).astype(np.float64)))
    return model


def ref_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def greedy_ref(model, prompt_ids, n, eos):
    ids, toks, margins = list(prompt_ids), [], []
    for _ in range(n):
        row = ref_logits(model, ids)[-1]
        order = np.argsort(row)[::-1]
        toks.append(int(order[0]))
        margins.append(float(row[order[0]] - row[order[1]]))
        if toks[-1] == eos:
            break
        ids.append(toks[-1])
    return toks, margins


def greedy_llama(llm, prompt_ids, n, eos):
    llm.reset()
    llm.eval(prompt_ids)
    toks, margins = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        order = np.argsort(row)[::-1]
        toks.append(int(order[0]))
        margins.append(float(row[order[0]] - row[order[1]]))
        if toks[-1] == eos:
            break
        llm.eval([toks[-1]])
    return toks, margins


def nll(logits, ids):
    """Mean negative log-likelihood of ids[1:] under the logits of the positions before them."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def compare(a, b, ids):
    """(largest |a - b| relative to the largest |b|, |NLL(a) - NLL(b)| relative to NLL(b), largest |a - b|)."""
    diff = float(np.abs(a - b).max())
    scale = max(1.0, float(np.abs(b).max()))
    nb = nll(b, ids)
    return diff / scale, abs(nll(a, ids) - nb) / nb, diff


class Tightfit:
    def __init__(self, binary, work, threads):
        self.binary, self.work, self.threads = binary, work, threads

    def run(self, args):
        """stdout as bytes: a continuation of a tiny random model may end inside a UTF-8 sequence."""
        r = subprocess.run([self.binary, *args, "--threads", str(self.threads)], capture_output=True)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).decode("utf-8", "replace").strip().splitlines()
            return None, err[-1:] or ["exit " + str(r.returncode)]
        return r.stdout, None

    def ids_and_logits(self, model, text):
        """The ids of a {"text"} record (its EOS dropped) and the logits at each."""
        data = os.path.join(self.work, "text.jsonl")
        out = os.path.join(self.work, "logits.safetensors")
        with open(data, "w") as f:
            f.write(json.dumps({"text": text}) + "\n")
        _, err = self.run(["eval", "--model", model, "--data", data, "--template", "plain", "--seq-len", "512",
                           "--logits-out", out])
        if err:
            return None, None, err[0]
        t = read_safetensors(out)
        return t["input_ids.0"].tolist()[:-1], t["logits.0"][:-1].astype(np.float64), None

    def generate(self, model, prompt):
        out, err = self.run(["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", str(GEN_TOKENS)])
        if err:
            return None, err[0]
        return (out[:-1] if out.endswith(b"\n") else out), None


def generation_status(ref_text, tf_text, margins, ref_toks, decode, noise):
    """match, near-tie (diverging where the reference's top-2 margin is within 2 * noise) or DIFF."""
    if ref_text == tf_text:
        return "match"
    k, acc = 0, b""
    while k < len(ref_toks) and tf_text.startswith(acc + decode([ref_toks[k]])):
        acc += decode([ref_toks[k]])
        k += 1
    margin = margins[k] if k < len(margins) else float("inf")
    return f"near-tie@{k}" if margin <= 2 * noise else f"DIFF@{k} (margin {margin:.2e})"


class Report:
    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, arch, form, ids_ok, tf_rel, tf_nll, other_rel, other_nll, cross_rel, gen, ok, note=""):
        self.rows.append((arch, form, ids_ok, tf_rel, tf_nll, other_rel, other_nll, cross_rel, gen, ok, note))
        if not ok:
            self.failures.append(f"{arch} {form}: {note or gen}")
        print(f"{arch:<14} {form:<10} {'ok' if ok else 'FAIL'} {note}", flush=True)

    def print(self):
        fmt = "{:<14} {:<10} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10}  {:<22} {}"
        print()
        print(fmt.format("arch", "form", "ids", "tf logit", "tf NLL", "other lgt", "other NLL", "tf-other",
                         "greedy", "result"))
        f = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
        for a, form, ids, r1, n1, r2, n2, c, gen, ok, note in self.rows:
            print(fmt.format(a, form, {True: "=", False: "DIFF", None: "-"}[ids], f(r1), f(n1), f(r2), f(n2), f(c),
                             gen, "ok" if ok else "FAIL " + note))
        print("\ntf logit / tf NLL: tightfit against the float64 reference (largest logit difference relative to "
              "the largest logit; NLL relative); other: llama.cpp against the same reference (GGUF rows); "
              "tf-other: tightfit against llama.cpp; ids: tightfit's tokenization against the HF tokenizer's "
              "or llama.cpp's.")


def check_hf(arch, directory, tf, tok, eos, rep):
    ref = reference(arch, directory)
    ids, logits, err = tf.ids_and_logits(directory, TEXT)
    if err:
        rep.add(arch.name, "hf", None, None, None, None, None, None, "-", False, err)
        return
    hf_ids = tok.encode(TEXT).ids
    if ids != hf_ids:
        rep.add(arch.name, "hf", False, None, None, None, None, None, "-", False,
                f"ids: tightfit {ids} vs tokenizers {hf_ids}")
        return
    expected = ref_logits(ref, ids)
    rel, nll_rel, noise = compare(logits, expected, ids)
    prompt_ids = tok.encode(PROMPT).ids
    toks, margins = greedy_ref(ref, prompt_ids, GEN_TOKENS, eos)
    decode = lambda t: hf_bytes(tok, t)  # noqa: E731
    ref_text = decode([t for t in toks if t != eos])
    tf_text, err = tf.generate(directory, PROMPT)
    gen = err or generation_status(ref_text, tf_text, margins, toks, decode, noise)
    broken = [what for what, bad in (
        ("tightfit's logits", rel > TOL_F32), ("tightfit's NLL", nll_rel > TOL_F32),
        (f"greedy: transformers {ref_text!r} tightfit {tf_text!r}", gen.startswith("DIFF") or err)) if bad]
    rep.add(arch.name, "hf", True, rel, nll_rel, None, None, None, gen, not broken,
            "beyond tolerance: " + "; ".join(broken) if broken else "")


def convert(llama_cpp, arch, directory, outtype, out):
    """llama.cpp's converter, with the pre-tokenizer named: a tokenizer trained here has no entry in
    its table of pre-tokenizer hashes, which it would otherwise refuse."""
    wrapper = (
        "import os, sys\n"
        f"sys.path.insert(0, {llama_cpp!r}); sys.path.insert(1, {os.path.join(llama_cpp, 'gguf-py')!r})\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ['TF_GGUF_PRE']\n"
        "import convert_hf_to_gguf\n"
        "convert_hf_to_gguf.main()\n")
    r = subprocess.run([sys.executable, "-c", wrapper, directory, "--outtype", outtype, "--outfile", out],
                       env=dict(os.environ, TF_GGUF_PRE=TOKENIZERS[arch.tokenizer][1] or ""), capture_output=True,
                       text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["converter failed"])[-1]


def check_gguf(arch, directory, path, outtype, tf, tok, eos, rep, gguf, llama_cls):
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    n_layers = transformers.AutoConfig.from_pretrained(directory).num_hidden_layers
    form = f"gguf {outtype}"
    stored = sorted({t.name for t in types.values()})
    # f32 KV cache: llama.cpp's default f16 cache would round every key and value to 11 bits.
    try:
        llm = llama_cls(model_path=path, n_ctx=256, seed=0, logits_all=True, verbose=False, n_threads=tf.threads,
                        type_k=0, type_v=0)
    except ValueError as e:
        rep.add(arch.name, form, None, None, None, None, None, None, "-", False, f"llama.cpp: {e}")
        return
    llama_ids = llm.tokenize(TEXT.encode(), add_bos=True, special=False)
    ids, logits, err = tf.ids_and_logits(path, TEXT)
    if err:
        rep.add(arch.name, form, None, None, None, None, None, None, "-", False, err)
        return
    if ids != llama_ids:
        rep.add(arch.name, form, False, None, None, None, None, None, "-", False,
                f"ids: tightfit {ids} vs llama.cpp {llama_ids}")
        return
    ref = reference(arch, directory, arch.gguf_config, types, arch_enum, n_layers, gguf)
    expected = ref_logits(ref, ids)
    llm.reset()
    llm.eval(ids)
    llama_logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    rel, nll_rel, _ = compare(logits, expected, ids)
    lrel, lnll, _ = compare(llama_logits, expected, ids)
    crel, _, noise = compare(logits, llama_logits, ids)
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    toks, margins = greedy_llama(llm, prompt_ids, GEN_TOKENS, eos)
    decode = lambda t: llm.detokenize(t, special=False)  # noqa: E731
    llama_text = decode([t for t in toks if t != eos])
    tf_text, err = tf.generate(path, PROMPT)
    gen = err or generation_status(llama_text, tf_text, margins, toks, decode, noise)
    act_tol = max(TOL_F32, (7 * n_layers + 1) * ACTIVATION_ROUNDING[outtype]
                  + n_layers * arch.llama_cpp_f16_roundings * 2.0**-11)
    broken = [what for what, bad in (
        ("tightfit's logits", rel > TOL_F32), ("tightfit's NLL", nll_rel > TOL_F32),
        (f"llama.cpp's logits (bound {act_tol:.1e})", lrel > act_tol),
        (f"llama.cpp's NLL (bound {act_tol:.1e})", lnll > act_tol),
        (f"greedy: llama.cpp {llama_text!r} tightfit {tf_text!r}", gen.startswith("DIFF") or err)) if bad]
    rep.add(arch.name, form, True, rel, nll_rel, lrel, lnll, crel, gen, not broken,
            f"[{','.join(stored)}]" + (" beyond tolerance: " + "; ".join(broken) if broken else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--tightfit")
    ap.add_argument("--only", nargs="+", choices=[a.name for a in ARCHS])
    ap.add_argument("--outtypes", nargs="+", default=OUTTYPES, choices=OUTTYPES)
    ap.add_argument("--keep", help="write the models here and keep them (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    # gguf-py from the same tree as the converter, so the rounding and the tensor names are its own.
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    import gguf
    import gguf.quants
    from llama_cpp import Llama, __version__ as llama_version

    torch.use_deterministic_algorithms(True)
    start = time.time()
    tightfit = find_tightfit(args.tightfit)
    work = args.keep or tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    print(f"tightfit {tightfit}; llama-cpp-python {llama_version}; transformers {transformers.__version__}; "
          f"torch {torch.__version__}; work {work}")
    tf = Tightfit(tightfit, work, args.threads)
    rep = Report()
    for i, arch in enumerate(ARCHS):
        if args.only and arch.name not in args.only:
            continue
        directory = os.path.join(work, arch.name)
        shutil.rmtree(directory, ignore_errors=True)
        tok, eos = build(arch, directory, 5150 + 10 * i)
        check_hf(arch, directory, tf, tok, eos, rep)
        for outtype in args.outtypes:
            path = os.path.join(work, f"{arch.name}-{outtype}.gguf")
            err = convert(args.llama_cpp, arch, directory, outtype, path)
            if err:
                rep.add(arch.name, f"gguf {outtype}", None, None, None, None, None, None, "-", False,
                        f"converter: {err}")
                continue
            check_gguf(arch, directory, path, outtype, tf, tok, eos, rep, gguf, Llama)
    rep.print()
    print(f"{time.time() - start:.0f} s")
    if not args.keep:
        shutil.rmtree(work)
    if rep.failures:
        print(f"\n{len(rep.failures)} failures:\n  " + "\n  ".join(rep.failures))
        return 1
    print(f"\nall {len(rep.rows)} checks pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
