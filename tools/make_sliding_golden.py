#!/usr/bin/env python3
"""Writes the sliding-window golden fixtures: tiny Mistral and Qwen2 models whose attention window is
shorter than the sequence, with transformers' logits, loss and LoRA gradients.

Run by hand, never by CI, with PyTorch, transformers (>= 5), PEFT and safetensors (no GPU, no
network; the models are built from configs):

    /work/venv/bin/python tools/make_sliding_golden.py [--out-dir DIR]

Output (under tests/fixtures/ unless --out-dir is given):
    golden_mistral_sliding.safetensors  MistralForCausalLM, sliding_window 5, every layer slides
    golden_qwen2_sliding.safetensors    Qwen2ForCausalLM, use_sliding_window, sliding_window 7,
                                        max_window_layers 1 of 3 (layers 1 and 2 slide, 0 does not)

Both models: hidden 48, intermediate 64, 6 heads over 2 kv heads (GQA ratio 3, head_dim 8),
vocab 128, untied embeddings, eager attention; Mistral 2 layers, Qwen2 3 (with its q/k/v biases).
Weights come from torch.Generator(seed 1234) as in tools/make_golden.py: projections, biases and
embeddings normal(0, 0.1) so attention is far from uniform, norm weights 1 + 0.1 normal. The batch
is 2 sequences of 24 tokens, so most positions lie past the window; labels mask the first 5
positions of each row. The LoRA adapter (PEFT r 4, alpha 8, all seven projections, A normal(0, 0.1),
B normal(0, 0.02)), the loss (HF's shifted causal-LM mean) and the precision (the reference run in
float64, stored as float32; a float32 run must agree) are make_golden.py's.

Tensors: the base weights under their HF names (with model.layers.N.self_attn.{q,k,v}_proj.bias
for Qwen2), <module>.lora_{A,B}.weight and their .grad, input_ids and labels [2, 24] int32,
logits [2, 24, 128] and loss [1] float32.
Metadata (strings): "config", the model's config.json as transformers writes it (the C++ test
parses it as tightfit parses a model directory, layer_types included), lora_r, lora_alpha,
lora_targets, n_targets, the float32-vs-float64 errors, "window_max_logit_change" (how far the
logits move when the window is removed: the fixture's power to catch an ignored window) and the
library versions.
"""

import argparse
import copy
import math
import os

import peft
import safetensors
import safetensors.torch
import torch
import transformers

SEED = 1234
BATCH, SEQ, MASKED_PREFIX = 2, 24, 5
LORA_R, LORA_ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=128,
              tie_word_embeddings=False, attention_dropout=0.0,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def mistral_config(window):
    return transformers.MistralConfig(num_hidden_layers=2, sliding_window=window, **COMMON)


def qwen2_config(window):
    return transformers.Qwen2Config(num_hidden_layers=3, use_sliding_window=window is not None,
                                    sliding_window=window or 4096, max_window_layers=1, **COMMON)


def base_weights(model):
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for name, p in model.named_parameters():
        scale_one = name.endswith("norm.weight")
        out[name] = (1.0 if scale_one else 0.0) + 0.1 * torch.randn(p.shape, generator=gen)
    return out


def build(model_class, config, weights):
    config._attn_implementation = "eager"
    model = model_class(config)
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
    model.eval()
    return model


def make_batch(vocab):
    gen = torch.Generator().manual_seed(SEED + 2)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[:, :MASKED_PREFIX] = -100
    return input_ids, labels


def causal_lm_loss(logits, labels):
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")


def peft_name(name):
    prefix = "base_model.model."
    assert name.startswith(prefix), name
    return name[len(prefix):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    grads = {peft_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


def make_fixture(path, model_class, make_config, window):
    config = make_config(window)
    weights = base_weights(model_class(make_config(window)))
    model32 = build(model_class, config, weights)
    input_ids, labels = make_batch(config.vocab_size)
    model64 = copy.deepcopy(model32).double()
    logits64, loss64, grads64 = run(model64, input_ids, labels)
    logits32, loss32, grads32 = run(model32, input_ids, labels)
    with torch.no_grad():
        hf_loss = model32(input_ids=input_ids, labels=labels).loss
    assert abs(float(hf_loss) - float(loss32)) <= 1e-6 * abs(float(loss32)), (hf_loss, loss32)
    assert abs(float(loss32) - float(loss64)) <= 1e-5 * abs(float(loss64)), (loss32, loss64)

    full = build(model_class, make_config(None), weights).double()
    with torch.no_grad():
        full_logits = full(input_ids=input_ids).logits
    window_change = float((full_logits - logits64).abs().max())
    assert window_change > 1e-2, f"the window barely changes the logits ({window_change})"
    # Positions inside the window see every earlier key: there the two models agree.
    inside = float((full_logits[:, :window] - logits64[:, :window]).abs().max())
    assert inside < 1e-9, f"positions inside the window differ from full attention by {inside}"

    grad_err = max(rel_err(grads32[n], grads64[n]) for n in grads64)
    meta = {
        "config": config.to_json_string(use_diff=False),
        "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_targets": ",".join(TARGETS),
        "seed": SEED, "batch": BATCH, "seq_len": SEQ, "n_targets": int((labels[:, 1:] != -100).sum()),
        "computed_in": "float64",
        "f32_vs_f64_logits_rel_err": f"{rel_err(logits32, logits64):.3e}",
        "f32_vs_f64_max_grad_rel_err": f"{grad_err:.3e}",
        "window_max_logit_change": f"{window_change:.3e}",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }
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
    safetensors.torch.save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})
    size = os.path.getsize(path)
    assert size < 1 << 20, f"{path} is {size} bytes; keep fixtures under 1 MiB"
    print(f"{path}: {len(tensors)} tensors, {size} bytes, loss {float(loss64):.6f} "
          f"(uniform {math.log(config.vocab_size):.6f}), layer_types {getattr(config, 'layer_types', '(none: every layer slides)')}")
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
    make_fixture(os.path.join(args.out_dir, "golden_mistral_sliding.safetensors"), transformers.MistralForCausalLM,
                 mistral_config, 5)
    make_fixture(os.path.join(args.out_dir, "golden_qwen2_sliding.safetensors"), transformers.Qwen2ForCausalLM,
                 qwen2_config, 7)


if __name__ == "__main__":
    main()
