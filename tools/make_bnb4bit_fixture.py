#!/usr/bin/env python3
"""Writes tests/fixtures/bnb4bit/ and tests/fixtures/bnb4bit_phi3/: a tiny random Llama and a tiny
random Phi-3 saved by transformers as bitsandbytes 4-bit (NF4, double-quantized) checkpoints, and
the logits of their dequantized weights.

Run by hand (needs torch, transformers, safetensors and bitsandbytes, which quantizes on the CPU):
    python tools/make_bnb4bit_fixture.py

The checkpoint is made the way people make the *-bnb-4bit models: an f32 LlamaForCausalLM is
saved, loaded back with from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
nf4, double quant)) on the CPU, which quantizes every decoder Linear with quantize_4bit
(blocksize 64, compress_statistics=True), and saved with save_pretrained, so config.json carries
the quantization_config and model.safetensors each quantized weight's packed codes plus the
absmax / quant_map / nested_absmax / nested_quant_map / quant_state.bitsandbytes__nf4 tensors of
QuantState.as_dict(packed=True). Embeddings, lm_head (untied) and norms stay f32.

The intermediate size, 272, gives the MLP matrices 272 absmax blocks: two nested blocks of 256, the
second partial; and down_proj rows of 272, so that scale blocks straddle rows. bitsandbytes'
blocks run over the flattened tensor (its quantize_4bit and CUDA kernels); its native CPU
dequantize_4bit kernel assumes whole blocks per row and gives other values for such a matrix, so
the reference dequantizes with bitsandbytes' portable torch implementation
(backends/default/ops.py, _dequantize_4bit_compute), the one the CPU op itself falls back to, and
the script prints where the native kernel differs.

The Phi-3 (hidden 64, 4 heads over 2 kv heads of 16, intermediate 256) quantizes its fused
qkv_proj [128, 64] and gate_up_proj [512, 64] whole, as bitsandbytes does any Linear: its 128 qkv
blocks share one nested scale across q, k and v, so k and v begin inside a nested group, while
up_proj begins gate_up_proj's second group (block 256).

expected.safetensors holds
    input_ids        i32 [3, 8]       three fixed token sequences
    logits           f32 [3, 8, 128]  a plain f32 LlamaForCausalLM with every quantized weight
                                      replaced by bitsandbytes' dequantize_4bit of it
    dequant.<name>   f32 [rows, cols] that dequantization of one weight, to compare the loader's NF4
                                      with (one whose double-quantized absmax an FMA would change)
    absmax.<name>    f32 [blocks]     the absmax of an MLP weight as bitsandbytes dequantizes its
                                      double quantization (both nested blocks)
"""
import json
import os
import shutil
import tempfile

import torch
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Phi3Config,
                          Phi3ForCausalLM)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=272, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
                      max_position_embeddings=128, initializer_range=0.1)
    write(LlamaForCausalLM, cfg, os.path.join(FIXTURES, "bnb4bit"), "model.layers.1.self_attn.k_proj.weight",
          "model.layers.1.mlp.down_proj.weight")
    torch.manual_seed(1)
    cfg = Phi3Config(hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
                     max_position_embeddings=128, original_max_position_embeddings=128, initializer_range=0.1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=None,
                     bos_token_id=1, eos_token_id=2)
    write(Phi3ForCausalLM, cfg, os.path.join(FIXTURES, "bnb4bit_phi3"), "model.layers.1.self_attn.qkv_proj.weight",
          "model.layers.1.self_attn.qkv_proj.weight")


def write(model_class, cfg, out_dir, dequant_name, absmax_name):
    base = model_class(cfg).eval()
    work = tempfile.mkdtemp()
    try:
        base.save_pretrained(os.path.join(work, "f32"))
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        quant = AutoModelForCausalLM.from_pretrained(os.path.join(work, "f32"), quantization_config=bnb,
                                                     device_map="cpu", dtype=torch.float32)
        os.makedirs(out_dir, exist_ok=True)
        quant.save_pretrained(work + "/q")
        for f in ("config.json", "model.safetensors"):
            shutil.copyfile(os.path.join(work, "q", f), os.path.join(out_dir, f))
    finally:
        shutil.rmtree(work)

    # Rebuild every weight from the saved file alone, as a loader sees it.
    path = os.path.join(out_dir, "model.safetensors")
    state = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for k in keys:
            state[k] = f.get_tensor(k)
    plain = {}
    absmax = {}
    for k in keys:
        if k.endswith(".weight") and state[k].dtype == torch.uint8:
            comps = {c[len(k) + 1:]: state[c] for c in keys if c.startswith(k + ".")}
            qs = F.QuantState.from_dict(comps, device="cpu")
            # As dequantize_4bit undoes the double quantization: the product, then the offset.
            absmax[k] = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
            plain[k] = _dequantize_4bit_compute(state[k].reshape(-1), absmax[k], qs.code, qs.blocksize, qs.shape,
                                                torch.float32)
            native = F.dequantize_4bit(state[k], qs, blocksize=qs.blocksize, quant_type=qs.quant_type).float()
            differ = int((native != plain[k]).sum())
            if differ:
                print(f"{k} {list(qs.shape)}: bitsandbytes' native CPU dequantize_4bit differs in {differ} elements")
        elif "." not in k.rsplit(".weight", 1)[-1] and k.endswith(".weight"):
            plain[k] = state[k]
    ref = model_class(cfg).eval()
    missing = ref.load_state_dict(plain, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, missing

    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0],
                        [100, 3, 3, 3, 42, 7, 64, 2],
                        [11, 22, 33, 44, 55, 66, 77, 88]], dtype=torch.int32)
    with torch.no_grad():
        logits = ref(ids.long()).logits.float().contiguous()
    out = {"input_ids": ids, "logits": logits, "dequant." + dequant_name: plain[dequant_name].contiguous(),
           "absmax." + absmax_name: absmax[absmax_name].float().contiguous()}
    save_file(out, os.path.join(out_dir, "expected.safetensors"))
    qc = json.load(open(os.path.join(out_dir, "config.json")))["quantization_config"]
    print("quantization_config:", qc)
    for f in sorted(os.listdir(out_dir)):
        print(f, os.path.getsize(os.path.join(out_dir, f)), "bytes")


if __name__ == "__main__":
    main()
