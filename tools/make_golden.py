#!/usr/bin/env python3
"""Writes the golden fixtures the C++ model tests compare against (docs/DESIGN.md, "Tests", item 2).

Run by hand, never by CI. It needs PyTorch, transformers (>= 5, for `rope_parameters`), PEFT and
safetensors; no GPU and no network (the model is built from a config, not downloaded):

    python -m venv /opt/tfref && /opt/tfref/bin/pip install torch transformers peft safetensors
    /opt/tfref/bin/python tools/make_golden.py            # writes both fixtures
    /opt/tfref/bin/python tools/make_golden.py --out-dir /tmp/golden

Output (under tests/fixtures/ unless --out-dir is given):
    golden_tiny.safetensors         plain RoPE, rope_theta 10000
    golden_tiny_llama3.safetensors  the same model with llama3 RoPE scaling, rope_theta 500000
A rerun reproduces every tensor and metadata value bit for bit; the bytes of the header may still
differ, since the safetensors writer emits metadata in hash-map order.

The model: LlamaForCausalLM, 2 layers, hidden 64, intermediate 128, 4 heads, 2 kv heads
(head_dim 16), vocab 256, untied embeddings, rms_norm_eps 1e-5, max_position_embeddings 128, no
attention bias, eager attention. Weights are drawn from torch.Generator(seed 1234) rather than
HF's init: projections and embeddings normal(0, 0.1) so attention is far from uniform (HF's
std 0.02 makes every score ~0.1 and hides RoPE and masking errors), norm weights 1 + 0.1*normal
so a missing or misplaced norm weight shows. The llama3 fixture uses the same weights.

RoPE scaling of the second fixture: rope_type llama3, factor 8, low_freq_factor 1,
high_freq_factor 4, original_max_position_embeddings 64. With head_dim 16 and theta 500000 the
wavelengths 2*pi/inv_freq are 6.3, 32.4, 167, ... so 64 puts one frequency in each of the three
branches (kept: wavelength < 64/4; smoothed: between 16 and 64; divided by 8: > 64). (A value of
16 would leave the "kept" branch untested.) Positions are 0..15, where the rescaled angles differ
from the unscaled ones by up to ~1.7 rad; metadata `rope_scaling_max_logit_change` records how much
the logits move when scaling is switched off, i.e. how strongly the fixture discriminates.

The LoRA adapter (PEFT): r 4, lora_alpha 8 (scale alpha/r = 2), dropout 0, on all seven of
q_proj k_proj v_proj o_proj gate_proj up_proj down_proj. lora_A ~ normal(0, 0.1), lora_B ~
normal(0, 0.02) (non-zero, unlike PEFT's init, so that dA is non-zero and B's contribution shows).

The batch: input_ids [2,16] uniform in [0,256); labels = input_ids with the first 5 positions of
each row set to -100 (the loss mask). Labels are the UNSHIFTED HF labels: HF shifts internally,
so logits[b,t] is scored against labels[b,t+1] for t = 0..14, and the last position of each row
predicts nothing. loss = mean over the targets that are not -100 (labels[b,5..15]: 2 * 11 = 22) of
cross_entropy(logits[b,t], labels[b,t+1]), which is HF's ForCausalLMLoss with no
num_items_in_batch.

Precision: the weights are float32 values; the forward and backward that produce the stored
logits, loss and gradients run in float64 (the model in .double()), then are rounded to float32,
so the stored reference carries almost no error of its own. HF computes the RoPE cos/sin tables in
float32 even for a float64 model, so the reference shares that rounding. The same model is also
run in float32 through HF's own loss (labels=...) and the script asserts both agree; metadata
records the float32-vs-float64 relative norm errors, a measured scale for a float32 C++ result.

Tensors in each file (all float32 except input_ids and labels, int32):
    model.embed_tokens.weight                             [256, 64]
    model.layers.{0,1}.input_layernorm.weight             [64]
    model.layers.{0,1}.self_attn.q_proj.weight            [64, 64]
    model.layers.{0,1}.self_attn.k_proj.weight            [32, 64]
    model.layers.{0,1}.self_attn.v_proj.weight            [32, 64]
    model.layers.{0,1}.self_attn.o_proj.weight            [64, 64]
    model.layers.{0,1}.post_attention_layernorm.weight    [64]
    model.layers.{0,1}.mlp.gate_proj.weight               [128, 64]
    model.layers.{0,1}.mlp.up_proj.weight                 [128, 64]
    model.layers.{0,1}.mlp.down_proj.weight               [64, 128]
    model.norm.weight                                     [64]
    lm_head.weight                                        [256, 64]
    <module>.lora_A.weight  [4, in]   and  <module>.lora_B.weight  [out, 4]
        for every <module> above among the seven projections, e.g.
        model.layers.0.self_attn.q_proj.lora_A.weight [4, 64], ...lora_B.weight [64, 4],
        model.layers.1.mlp.down_proj.lora_A.weight [4, 128], ...lora_B.weight [64, 4]
        (PEFT's names without the "base_model.model." prefix)
    <module>.lora_A.weight.grad, <module>.lora_B.weight.grad   same shapes: d loss / d param
    input_ids  [2, 16]      int32
    labels     [2, 16]      int32, -100 = ignored
    logits     [2, 16, 256] float32
    loss       [1]          float32
The LoRA'd forward is y = x W^T + scale * (x A^T) B^T with scale = lora_alpha / r = 2.
Metadata (all strings): the config values (hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, vocab_size, rms_norm_eps, rope_theta,
max_position_embeddings, tie_word_embeddings, rope_scaling as JSON or "none"), lora_r,
lora_alpha, lora_scale, lora_targets, seed, batch, seq_len, n_targets, the float32-vs-float64
errors, rope_scaling_max_logit_change, and the library versions used.
"""

import argparse
import copy
import json
import math
import os

import peft
import safetensors
import safetensors.torch
import torch
import transformers

SEED = 1234
BATCH, SEQ, MASKED_PREFIX = 2, 16, 5
LORA_R, LORA_ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def make_config(rope_theta, rope_scaling):
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_parameters=rope,
        attn_implementation="eager", torch_dtype=torch.float32)


def base_weights(config):
    """Weights drawn once, from our own generator, so both fixtures share them."""
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            out[name] = 0.1 * torch.randn(p.shape, generator=gen)
    return out


def build(config, weights):
    """The LoRA-wrapped float32 model with the given base weights and seeded LoRA weights."""
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(weights, strict=True)
    assert not missing and not unexpected
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif ".lora_B." in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.eval()  # dropout is 0 anyway; eval() makes that independent of the config
    return model


def make_batch(vocab):
    gen = torch.Generator().manual_seed(SEED + 2)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[:, :MASKED_PREFIX] = -100
    return input_ids, labels


def causal_lm_loss(logits, labels):
    """HF's causal LM loss, written out: logits[b,t] predicts labels[b,t+1]; mean over kept targets."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")


def peft_name(name):
    prefix = "base_model.model."
    assert name.startswith(prefix), name
    name = name[len(prefix):]
    # PEFT stores adapter weights as <module>.lora_A.<adapter>.weight; export drops the adapter name.
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    grads = {peft_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


def make_fixture(path, rope_theta, rope_scaling, weights):
    config = make_config(rope_theta, rope_scaling)
    model32 = build(config, weights)
    input_ids, labels = make_batch(config.vocab_size)

    model64 = copy.deepcopy(model32).double()
    logits64, loss64, grads64 = run(model64, input_ids, labels)
    logits32, loss32, grads32 = run(model32, input_ids, labels)

    # HF's own loss on the float32 model must be the loss written out above.
    with torch.no_grad():
        hf_loss = model32(input_ids=input_ids, labels=labels).loss
    assert abs(float(hf_loss) - float(loss32)) <= 1e-6 * abs(float(loss32)), (hf_loss, loss32)
    assert abs(float(loss32) - float(loss64)) <= 1e-5 * abs(float(loss64)), (loss32, loss64)

    grad_err = max(rel_err(grads32[n], grads64[n]) for n in grads64)
    meta = {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.rms_norm_eps, "rope_theta": rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": str(config.tie_word_embeddings).lower(),
        "rope_scaling": json.dumps(rope_scaling, sort_keys=True) if rope_scaling else "none",
        "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_scale": LORA_ALPHA / LORA_R,
        "lora_targets": ",".join(TARGETS), "seed": SEED, "batch": BATCH, "seq_len": SEQ,
        "n_targets": int((labels[:, 1:] != -100).sum()), "computed_in": "float64",
        "f32_vs_f64_logits_rel_err": f"{rel_err(logits32, logits64):.3e}",
        "f32_vs_f64_loss_rel_err": f"{abs(float(loss32) - float(loss64)) / abs(float(loss64)):.3e}",
        "f32_vs_f64_max_grad_rel_err": f"{grad_err:.3e}",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }
    if rope_scaling is not None:
        plain = build(make_config(rope_theta, None), weights).double()
        with torch.no_grad():
            plain_logits = plain(input_ids=input_ids).logits
        change = float((plain_logits - logits64).abs().max())
        assert change > 1e-2, f"RoPE scaling barely changes the logits ({change}); the fixture would not test it"
        meta["rope_scaling_max_logit_change"] = f"{change:.3e}"
    with torch.no_grad():
        with model64.disable_adapter():
            no_lora = model64(input_ids=input_ids).logits
    lora_change = float((no_lora - logits64).abs().max())
    assert lora_change > 1e-3, f"the adapter barely changes the logits ({lora_change})"
    meta["lora_max_logit_change"] = f"{lora_change:.3e}"

    tensors = {name: w.float().contiguous() for name, w in weights.items()}
    for name, p in model64.named_parameters():
        if p.requires_grad:
            tensors[peft_name(name)] = p.detach().float().contiguous()
    for name, g in grads64.items():
        tensors[name + ".grad"] = g.float().contiguous()
    tensors["input_ids"] = input_ids.to(torch.int32).contiguous()
    tensors["labels"] = labels.to(torch.int32).contiguous()
    tensors["logits"] = logits64.float().contiguous()
    tensors["loss"] = loss64.float().reshape(1).contiguous()
    meta = {k: str(v) for k, v in meta.items()}
    safetensors.torch.save_file(tensors, path, metadata=meta)
    size = os.path.getsize(path)
    assert size < 1 << 20, f"{path} is {size} bytes; keep fixtures under 1 MiB"
    print(f"{path}: {len(tensors)} tensors, {size} bytes, loss {float(loss64):.6f} "
          f"(uniform would be {math.log(config.vocab_size):.6f})")
    for k in sorted(meta):
        if "err" in k or "change" in k:
            print(f"  {k} = {meta[k]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out-dir", default=os.path.join(here, "..", "tests", "fixtures"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    weights = base_weights(make_config(10000.0, None))
    make_fixture(os.path.join(args.out_dir, "golden_tiny.safetensors"), 10000.0, None, weights)
    make_fixture(os.path.join(args.out_dir, "golden_tiny_llama3.safetensors"), 500000.0, LLAMA3_SCALING,
                 weights)


if __name__ == "__main__":
    main()
