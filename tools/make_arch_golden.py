#!/usr/bin/env python3
"""Writes the golden fixtures of tests/test_golden_arch.cpp: tiny random Qwen2 and Llama models
built with transformers, each as an HF directory and (where llama.cpp converts it) as a GGUF
written by llama.cpp's own convert_hf_to_gguf.py, with the logits, loss and LoRA gradients
transformers + PEFT compute for one batch. Run by hand, never by CI; no GPU, no network:

    /work/venv/bin/python tools/make_arch_golden.py \
        --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp

(the llama.cpp sources ship in the llama-cpp-python source distribution on PyPI). It needs torch,
transformers >= 5, peft, safetensors and tokenizers.

Output under tests/fixtures/arch_golden/:
    qwen2/                  Qwen2ForCausalLM: hidden 48, 6 heads over 2 kv heads (GQA ratio 3),
                            head_dim 16 (not hidden / heads = 8), untied, vocab = the tokenizer's
    qwen2.gguf              convert_hf_to_gguf.py --outtype bf16 of qwen2/
    qwen2_tied/             Qwen2ForCausalLM: hidden 32, 4 heads over 2, tied embeddings, vocab 320
                            padded past the tokenizer's (the converter fills the gap with [PADn])
    qwen2_tied.gguf
    llama/                  LlamaForCausalLM: hidden 32, 4 heads over 2, head_dim 16, untied; its
                            config.json has default rope; config_<rope>.json beside it the same
                            model with each rope scaling type (llama3, yarn, linear, dynamic)
    llama_llama3.gguf       llama/ with config_llama3.json, converted: rope_freqs.weight
    llama_yarn.gguf         llama/ with config_yarn.json, converted: rope.scaling.* keys
    qwen3/, qwen3.gguf      Qwen3ForCausalLM: hidden 48, 6 heads over 2 (head_dim 16), tied, q/k norms
    gemma3/, gemma3.gguf    Gemma3ForCausalLM: hidden 32, 4 heads over 2 (head_dim 16), tied, 6 layers
                            (5 sliding over 4 keys with rope base 100, 1 full with base 10000 and
                            linear scaling by 8); the GGUF's norms hold 1 + w (the converter's)
    gemma3/config_capped.json  gemma3/ with Gemma 3's optional final soft cap set (logits 2)
    gemma2/, gemma2.gguf    Gemma2ForCausalLM: hidden 32, 4 heads over 2 (head_dim 16), tied, 4 layers
                            (0 and 2 slide over 4 keys, 1 and 3 full), attention scores capped at 3 and
                            logits at 2, both reached by far (q/k projections and the final norm scaled
                            up so that tanh saturates)
    <name>_expected.safetensors, for qwen2, qwen2_tied, qwen3, gemma3, gemma3_capped, gemma2 and llama_<rope> for default, llama3, yarn
    and linear (dynamic's equals default's, which the script asserts, so it has none of its own):
        input_ids [2, 16] int32, labels [2, 16] int32 (-100 = ignored, first 5 of each row)
        logits [2, 16, vocab] f32, loss [1] f32
        <module>.lora_A.weight / lora_B.weight and their .grad (PEFT names without the
        "base_model.model." prefix), r 4, alpha 8, on all seven projections
        metadata: n_targets, lora_r, lora_alpha, lora_targets, seed, library versions
The script asserts, and prints, how far the logits move without the q/k/v biases, without each
rope scaling and without yarn's attention factor, without Qwen3's q/k norms, and without each of
Gemma 3's features (the norms' 1 + w, the embedding scale, the output norms, the local rope base,
the window, the full layer's scaling) and of Gemma 2's (each soft cap, the window), so each fixture is
known to discriminate.
The weights are bf16 (norms, biases and embeddings too), drawn normal(0, 0.1) (norms 1 + 0.1 normal,
biases 0.3 normal) from fixed seeds, and the bf16 GGUF holds the same values, so both forms of a
model must give the same expected numbers. The reference runs in float64 from those values (HF
computes the rotary tables in float32 even then) and is rounded to float32.

RoPE scaling configs (theta 10000, head_dim 16, positions 0..15):
    llama3   factor 8, low 1, high 4, original_max_position_embeddings 64 (a frequency in each branch)
    yarn     factor 4, original_max_position_embeddings 512, beta_fast 32, beta_slow 1: the ramp runs
             from dimension 0 to 4, so frequency 0 is kept, 1..3 blended (ramp 0.25, 0.5, 0.75) and
             4..7 divided by 4; attention factor 0.1 ln 4 + 1 = 1.139 (so q.k scales by 1.297)
    linear   factor 4
    dynamic  factor 4, max_position_embeddings 16: within 16 positions transformers keeps the default
             frequencies, so its expected equals llama_default's
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import peft
import safetensors.torch
import tokenizers
import torch
import transformers

SEED = 4242
BATCH, SEQ, MASKED_PREFIX = 2, 16, 5
LORA_R, LORA_ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_VOCAB = 300

ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32.0,
             "beta_slow": 1.0},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny tokenizer for tiny models: numbers 0123456789, punctuation !?.,;: and spaces.",
    "Qwen and Llama read the same bytes; byte-level BPE never meets an unknown character.",
    "LoRA adapts seven projections of every block while the base stays frozen.",
] * 20


def make_tokenizer(directory):
    """A byte-level BPE of TOKENIZER_VOCAB entries (256 bytes, merges, one special token)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)


def randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.to(torch.bfloat16)


def lora_model(model, seed, targets=TARGETS):
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif ".lora_B." in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def peft_name(name):
    prefix = "base_model.model."
    assert name.startswith(prefix), name
    return name[len(prefix):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def make_batch(vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[:, :MASKED_PREFIX] = -100
    return input_ids, labels


def run(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    grads = {peft_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


def load_f64(model_cls, directory, config=None):
    kwargs = {"config": config} if config is not None else {}
    return model_cls.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager", **kwargs)


def expected(path, model_cls, directory, seed, config=None, meta=None, targets=TARGETS, extra=None):
    """Runs the LoRA'd float64 model of `directory` (with `config` if given) and writes the expected
    file (unless `path` is None), with `extra(model)`'s tensors added; returns the logits so callers
    can measure what a variant changes."""
    model = lora_model(load_f64(model_cls, directory, config), seed + 1, targets)
    vocab = model.config.vocab_size
    input_ids, labels = make_batch(min(vocab, TOKENIZER_VOCAB), seed + 2)
    logits, loss, grads = run(model, input_ids, labels)
    tensors = {"input_ids": input_ids.to(torch.int32), "labels": labels.to(torch.int32),
               "logits": logits.float().contiguous(), "loss": loss.float().reshape(1)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[peft_name(name)] = p.detach().float().contiguous()
    for name, g in grads.items():
        tensors[name + ".grad"] = g.float().contiguous()
    with torch.no_grad(), model.disable_adapter():
        lora_change = float((model(input_ids=input_ids).logits - logits).abs().max())
    assert lora_change > 1e-3, lora_change
    if extra is not None:
        tensors.update(extra(model))
    meta = dict(meta or {}, n_targets=int((labels[:, 1:] != -100).sum()), lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                lora_targets=",".join(targets), seed=seed, lora_max_logit_change=f"{lora_change:.3e}",
                torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if path is None:
        return logits, input_ids
    safetensors.torch.save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})
    print(f"{os.path.basename(path)}: loss {float(loss):.6f}, {os.path.getsize(path)} bytes, {meta}")
    return logits, input_ids


def convert(llama_cpp, directory, out):
    """llama.cpp's converter, with the pre-tokenizer named: a tokenizer trained here has no entry in
    its table of pre-tokenizer hashes, which it would otherwise refuse."""
    wrapper = (
        "import os, sys\n"
        f"sys.path.insert(0, {llama_cpp!r}); sys.path.insert(1, {os.path.join(llama_cpp, 'gguf-py')!r})\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ['TF_GGUF_PRE']\n"
        # Gemma 2's converter reads a sentencepiece tokenizer.model only; Gemma 3's takes this one.
        "import conversion.gemma as gemma\n"
        "gemma.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()\n"
        "import convert_hf_to_gguf\n"
        "convert_hf_to_gguf.main()\n")
    arch = json.load(open(os.path.join(directory, "config.json")))["model_type"]
    pre = "qwen2" if arch in ("qwen2", "qwen3") else "llama-bpe"
    result = subprocess.run([sys.executable, "-c", wrapper, directory, "--outtype", "bf16", "--outfile", out],
                            env=dict(os.environ, TF_GGUF_PRE=pre), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    print(f"{os.path.basename(out)}: {os.path.getsize(out)} bytes")


def save_model(model, directory, tokenizer_dir):
    model.save_pretrained(directory, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)


def strip_tokenizer(directory):
    """The committed HF directories keep only what the tests read: config and weights."""
    for name in os.listdir(directory):
        if name not in ("config.json", "model.safetensors") and not name.startswith("config_"):
            os.remove(os.path.join(directory, name))


def qwen2(out, llama_cpp, tok_dir, name, seed, **config):
    cfg = transformers.Qwen2Config(intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=1000000.0, **config)
    model = randomise(transformers.Qwen2ForCausalLM(cfg), seed)
    directory = os.path.join(out, name)
    save_model(model, directory, tok_dir)
    convert(llama_cpp, directory, os.path.join(out, f"{name}.gguf"))
    # How much the q/k/v biases matter: a loader that drops them must fail by far more than 1e-5.
    plain = load_f64(transformers.Qwen2ForCausalLM, directory)
    logits, ids = expected(os.path.join(out, f"{name}_expected.safetensors"), transformers.Qwen2ForCausalLM,
                           directory, seed)
    with torch.no_grad():
        for layer in plain.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        change = float((plain(input_ids=ids).logits - logits).abs().max())
    print(f"  {name}: logits move by {change:.3e} without the biases")
    assert change > 1e-2
    strip_tokenizer(directory)


def qwen3(out, llama_cpp, tok_dir, name, seed, **config):
    cfg = transformers.Qwen3Config(intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=1000000.0, **config)
    model = randomise(transformers.Qwen3ForCausalLM(cfg), seed)
    directory = os.path.join(out, name)
    save_model(model, directory, tok_dir)
    convert(llama_cpp, directory, os.path.join(out, f"{name}.gguf"))
    logits, ids = expected(os.path.join(out, f"{name}_expected.safetensors"), transformers.Qwen3ForCausalLM,
                           directory, seed)
    # How much the per-head q/k norms matter: a model that skips them must fail by far more than 1e-5.
    plain = lora_model(load_f64(transformers.Qwen3ForCausalLM, directory), seed + 1)
    with torch.no_grad():
        for layer in plain.base_model.model.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
        change = float((plain(input_ids=ids).logits - logits).abs().max())
    print(f"  {name}: logits move by {change:.3e} without the q/k norms")
    assert change > 1e-2
    strip_tokenizer(directory)


def gemma3(out, llama_cpp, tok_dir, seed):
    """Gemma3ForCausalLM: hidden 32, 4 heads over 2 kv heads, head_dim 16 (not hidden / heads = 8),
    tied, 6 layers (transformers' and llama.cpp's default pattern: layers 0-4 slide, 5 is full) with a
    window of 4 (shorter than the batch's 16), the sliding layers' rope base 100 and the full layer's
    10000 with linear scaling by 8, query_pre_attn_scalar = head_dim (llama.cpp scales by head_dim
    for every Gemma 3 but the 27B)."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    base = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                rms_norm_eps=1e-6, query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True,
                pad_token_id=0, bos_token_id=None, eos_token_id=None)
    directory = os.path.join(out, "gemma3")
    cls = transformers.Gemma3ForCausalLM
    model = randomise(cls(transformers.Gemma3TextConfig(**base, rope_parameters=copy.deepcopy(rope))), seed)
    save_model(model, directory, tok_dir)
    convert(llama_cpp, directory, os.path.join(out, "gemma3.gguf"))
    logits, ids = expected(os.path.join(out, "gemma3_expected.safetensors"), cls, directory, seed)

    def change(what, edit=None, **config):
        cfg = transformers.Gemma3TextConfig(**dict(base, **config.get("base", {})),
                                            rope_parameters=config.get("rope", copy.deepcopy(rope)))
        other = lora_model(load_f64(cls, directory, cfg), seed + 1)
        with torch.no_grad():
            if edit is not None:
                edit(other.base_model.model.model)
            moved = float((other(input_ids=ids).logits - logits).abs().max())
        print(f"  gemma3: logits move by {moved:.3e} without {what}")
        assert moved > 1e-2, (what, moved)

    def no_plus_one(m):
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1.0)  # (1 + (w - 1)) = w: the norm as Llama applies it
    def no_embed_scale(m):
        m.embed_tokens.embed_scale.fill_(1.0)
    def no_sandwich(m):
        for layer in m.layers:
            layer.post_attention_layernorm = torch.nn.Identity()
            layer.post_feedforward_layernorm = torch.nn.Identity()
    change("the norms' 1 + w", no_plus_one)
    change("the embedding scale", no_embed_scale)
    change("the post-attention and post-MLP norms", no_sandwich)
    change("the sliding layers' rope base", rope=dict(copy.deepcopy(rope), sliding_attention={
        "rope_type": "default", "rope_theta": 10000.0}))
    change("the window", base=dict(sliding_window=64))
    change("the full layer's linear scaling", rope=dict(copy.deepcopy(rope), full_attention={
        "rope_type": "default", "rope_theta": 10000.0}))
    strip_tokenizer(directory)


def gemma3_capped(out, seed):
    """gemma3/ (written by the gemma3 group) with Gemma3TextConfig's optional final soft cap set, as
    config_capped.json beside its config.json: logits capped at 2, below the largest in this model (about 4),
    so tanh bends some and not others (transformers' Gemma 3 ignores attn_logit_softcapping, which
    tightfit refuses). HF only: llama.cpp's gemma3 converter writes no cap."""
    directory = os.path.join(out, "gemma3")
    cls = transformers.Gemma3ForCausalLM
    config = json.load(open(os.path.join(directory, "config.json")))
    config.update(final_logit_softcapping=2.0)
    with open(os.path.join(directory, "config_capped.json"), "w") as f:
        json.dump(config, f, indent=2)

    def text_config(**changes):
        cfg = transformers.Gemma3TextConfig.from_dict(dict(config, **changes))
        return cfg
    logits, ids = expected(os.path.join(out, "gemma3_capped_expected.safetensors"), cls, directory, seed,
                           config=text_config())
    print(f"  gemma3_capped: largest |logit| {float(logits.abs().max()):.3f} under the cap 2")
    other = lora_model(load_f64(cls, directory, text_config(final_logit_softcapping=None)), seed + 1)
    with torch.no_grad():
        moved = float((other(input_ids=ids).logits - logits).abs().max())
    print(f"  gemma3_capped: logits move by {moved:.3e} without the cap")
    assert moved > 1e-2, moved


def gemma2(out, llama_cpp, tok_dir, seed):
    """Gemma2ForCausalLM: hidden 32, 4 heads over 2 kv heads, head_dim 16, tied, 4 layers (transformers'
    and llama.cpp's pattern: the even layers slide, over 4 keys, shorter than the batch's 16), one rope
    base, query_pre_attn_scalar = head_dim (llama.cpp's scale for every Gemma 2 but the 27B). The caps
    are small (attention 3, final 2) and the q/k projections (times 4) and the final norm (w + 4) are
    scaled up so that scores and logits reach several times their caps: tanh saturates for some and
    not for others, and the script asserts what each cap changes."""
    base = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                rms_norm_eps=1e-6, query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True,
                attn_logit_softcapping=3.0, final_logit_softcapping=2.0, rope_theta=10000.0,
                pad_token_id=0, bos_token_id=None, eos_token_id=None)
    directory = os.path.join(out, "gemma2")
    cls = transformers.Gemma2ForCausalLM
    model = randomise(cls(transformers.Gemma2Config(**base)), seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.model.norm.weight.add_(4.0)
    save_model(model, directory, tok_dir)
    convert(llama_cpp, directory, os.path.join(out, "gemma2.gguf"))
    logits, ids = expected(os.path.join(out, "gemma2_expected.safetensors"), cls, directory, seed)
    print(f"  gemma2: largest |logit| {float(logits.abs().max()):.3f} under the cap 2")

    def change(what, **config):
        other = lora_model(load_f64(cls, directory, transformers.Gemma2Config(**dict(base, **config))), seed + 1)
        with torch.no_grad():
            moved = float((other(input_ids=ids).logits - logits).abs().max())
        print(f"  gemma2: logits move by {moved:.3e} without {what}")
        assert moved > 1e-2, (what, moved)
    change("the attention cap", attn_logit_softcapping=None)
    change("the final cap", final_logit_softcapping=None)
    change("the window", sliding_window=64)
    strip_tokenizer(directory)


def llama(out, llama_cpp, tok_dir, seed):
    base = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
    directory = os.path.join(out, "llama")
    model = randomise(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**base, max_position_embeddings=128, rope_theta=10000.0)), seed)
    save_model(model, directory, tok_dir)
    default_logits = None
    for rope, scaling in ROPES.items():
        max_pos = 16 if rope == "dynamic" else 128
        params = dict(scaling or {"rope_type": "default"}, rope_theta=10000.0)
        cfg = transformers.LlamaConfig(**base, max_position_embeddings=max_pos, rope_parameters=params,
                                       architectures=["LlamaForCausalLM"])
        if rope != "default":
            cfg.to_json_file(os.path.join(directory, f"config_{rope}.json"))
        path = None if rope == "dynamic" else os.path.join(out, f"llama_{rope}_expected.safetensors")
        logits, ids = expected(path, transformers.LlamaForCausalLM, directory, seed, config=cfg)
        if rope == "default":
            default_logits = logits
            continue
        change = float((logits - default_logits).abs().max())
        print(f"  {rope}: logits move by {change:.3e} from the default rope")
        assert change > 1e-2 if rope != "dynamic" else change < 1e-9, (rope, change)
        if rope == "yarn":
            # The attention factor alone: the same frequencies with cos/sin left unscaled.
            unscaled = dict(params, attention_factor=1.0)
            plain = load_f64(transformers.LlamaForCausalLM, directory,
                             transformers.LlamaConfig(**base, max_position_embeddings=max_pos,
                                                      rope_parameters=unscaled))
            with torch.no_grad():
                no_mscale = lora_model(plain, seed + 1)(input_ids=ids).logits
            change = float((no_mscale - logits).abs().max())
            print(f"  yarn: logits move by {change:.3e} without the attention factor")
            assert change > 1e-2
        if rope in ("llama3", "yarn"):
            # The converter reads config.json: give it this variant's, then restore the default.
            staged = tempfile.mkdtemp()
            for name in os.listdir(directory):
                if not name.startswith("config"):
                    shutil.copy(os.path.join(directory, name), staged)
            shutil.copy(os.path.join(directory, f"config_{rope}.json"), os.path.join(staged, "config.json"))
            convert(llama_cpp, staged, os.path.join(out, f"llama_{rope}.gguf"))
            shutil.rmtree(staged)
    strip_tokenizer(directory)


PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
PHI3_SHORT = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0]


def phi3(out, llama_cpp, tok_dir, seed):
    """Phi3ForCausalLM: hidden 48, 3 heads over 1 kv head (head_dim 16), untied, fused qkv_proj and
    gate_up_proj, a sliding window of 6 (shorter than the batch's 16), longrope with distinct short
    factors (max_position_embeddings 256 over original_max_position_embeddings 64: attention factor
    sqrt(1 + ln 4 / ln 64) = 1.155). LoRA on PEFT's four Phi-3 modules; the expected file also holds
    PEFT's saved adapter names (metadata peft_names, peft_target_modules) and layer 1's qkv_proj and
    gate_up_proj after merge_and_unload (merged.<name>)."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT,
            "long_factor": [2.0 * f + 1.0 for f in PHI3_SHORT]}
    base = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, tie_word_embeddings=False,
                max_position_embeddings=256, original_max_position_embeddings=64, sliding_window=6,
                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                pad_token_id=None)
    directory = os.path.join(out, "phi3")
    model = randomise(transformers.Phi3ForCausalLM(transformers.Phi3Config(**base, rope_parameters=rope)), seed)
    save_model(model, directory, tok_dir)
    # The converter reads a GPT-2 style vocabulary only for a tokenizer it takes for Phi-4's.
    tcfg_path = os.path.join(directory, "tokenizer_config.json")
    tcfg = json.load(open(tcfg_path))
    tcfg["tokenizer_class"] = "GPT2Tokenizer"
    json.dump(tcfg, open(tcfg_path, "w"))
    convert(llama_cpp, directory, os.path.join(out, "phi3.gguf"))

    saved = tempfile.mkdtemp()
    peft_meta = {}

    def extra(lora):
        lora.save_pretrained(saved)
        names = sorted(safetensors.torch.load_file(os.path.join(saved, "adapter_model.safetensors")))
        cfg = json.load(open(os.path.join(saved, "adapter_config.json")))
        peft_meta.update(peft_names=",".join(names), peft_target_modules=",".join(sorted(cfg["target_modules"])))
        merged = copy.deepcopy(lora).merge_and_unload()
        layer = merged.model.layers[1]
        return {"merged.model.layers.1.self_attn.qkv_proj.weight": layer.self_attn.qkv_proj.weight.detach().float(),
                "merged.model.layers.1.mlp.gate_up_proj.weight": layer.mlp.gate_up_proj.weight.detach().float()}

    # extra() fills peft_meta before expected() writes the metadata.
    logits, ids = expected(os.path.join(out, "phi3_expected.safetensors"), transformers.Phi3ForCausalLM, directory,
                           seed, meta=peft_meta, targets=PHI3_TARGETS, extra=extra)
    shutil.rmtree(saved)
    assert all(f"layers.{l}.{m}.lora_{ab}.weight" in peft_meta["peft_names"]
               for l in (0, 1) for m in ("self_attn.qkv_proj", "mlp.gate_up_proj") for ab in "AB"), peft_meta
    # What the window, longrope as a whole, its short factors and its attention factor each change.
    variants = {
        "the sliding window": (dict(base, sliding_window=None), rope),
        "longrope": (base, {"rope_type": "default", "rope_theta": 10000.0}),
        "the short factors": (base, dict(rope, short_factor=[1.0] * len(PHI3_SHORT))),
        "the attention factor": (dict(base, max_position_embeddings=64), rope),
    }
    for what, (cfg, params) in variants.items():
        config = transformers.Phi3Config(**cfg, rope_parameters=params)
        other = lora_model(load_f64(transformers.Phi3ForCausalLM, directory, config), seed + 1, PHI3_TARGETS)
        with torch.no_grad():
            change = float((other(input_ids=ids).logits - logits).abs().max())
        print(f"  phi3: logits move by {change:.3e} without {what}")
        assert change > 1e-2, (what, change)
    strip_tokenizer(directory)


# Each group writes its own fixtures; --only regenerates the named groups and leaves the others.
GROUPS = {
    "qwen2": lambda out, lcpp, tok: qwen2(out, lcpp, tok, "qwen2", SEED, vocab_size=TOKENIZER_VOCAB,
                                          hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                          head_dim=16, tie_word_embeddings=False),
    "qwen2_tied": lambda out, lcpp, tok: qwen2(out, lcpp, tok, "qwen2_tied", SEED + 10, vocab_size=320,
                                               hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True),
    "llama": lambda out, lcpp, tok: llama(out, lcpp, tok, SEED + 20),
    "phi3": lambda out, lcpp, tok: phi3(out, lcpp, tok, SEED + 40),
    "gemma3": lambda out, lcpp, tok: gemma3(out, lcpp, tok, SEED + 50),
    "gemma3_capped": lambda out, lcpp, tok: gemma3_capped(out, SEED + 50),
    "gemma2": lambda out, lcpp, tok: gemma2(out, lcpp, tok, SEED + 60),
    "qwen3": lambda out, lcpp, tok: qwen3(out, lcpp, tok, "qwen3", SEED + 30, vocab_size=TOKENIZER_VOCAB,
                                          hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                          head_dim=16, tie_word_embeddings=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out-dir", default=os.path.join(here, "..", "tests", "fixtures", "arch_golden"))
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py)")
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS),
                        help="regenerate these groups' fixtures only (default: all, into an emptied directory)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    if not args.only and os.path.exists(args.out_dir):
        shutil.rmtree(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    tok_dir = tempfile.mkdtemp()
    make_tokenizer(tok_dir)
    for name in args.only or GROUPS:
        if args.only and os.path.exists(os.path.join(args.out_dir, name)):
            shutil.rmtree(os.path.join(args.out_dir, name))
        GROUPS[name](args.out_dir, args.llama_cpp, tok_dir)
    shutil.rmtree(tok_dir)


if __name__ == "__main__":
    main()
