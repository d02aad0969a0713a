#!/usr/bin/env python3
"""Writes tests/fixtures/bnb4bit/: a tiny random Llama saved by transformers as a bitsandbytes
4-bit (NF4, double-quantized) checkpoint, and the logits of its dequantized weights.

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
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bnb4bit")
DEQUANT = "model.layers.1.self_attn.k_proj.weight"
ABSMAX = "model.layers.1.mlp.down_proj.weight"


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=272, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
                      max_position_embeddings=128, initializer_range=0.1)
    base = LlamaForCausalLM(cfg).eval()
    work = tempfile.mkdtemp()
    try:
        base.save_pretrained(os.path.join(work, "f32"))
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        quant = AutoModelForCausalLM.from_pretrained(os.path.join(work, "f32"), quantization_config=bnb,
                                                     device_map="cpu", dtype=torch.float32)
        os.makedirs(OUT, exist_ok=True)
        quant.save_pretrained(work + "/q")
        for f in ("config.json", "model.safetensors"):
            shutil.copyfile(os.path.join(work, "q", f), os.path.join(OUT, f))
    finally:
        shutil.rmtree(work)

    # Rebuild every weight from the saved file alone, as a loader sees it.
    path = os.path.join(OUT, "model.safetensors")
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
    ref = LlamaForCausalLM(cfg).eval()
    missing = ref.load_state_dict(plain, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, missing

    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0],
                        [100, 3, 3, 3, 42, 7, 64, 2],
                        [11, 22, 33, 44, 55, 66, 77, 88]], dtype=torch.int32)
    with torch.no_grad():
        logits = ref(ids.long()).logits.float().contiguous()
    out = {"input_ids": ids, "logits": logits, "dequant." + DEQUANT: plain[DEQUANT].contiguous(),
           "absmax." + ABSMAX: absmax[ABSMAX].float().contiguous()}
    save_file(out, os.path.join(OUT, "expected.safetensors"))
    qc = json.load(open(os.path.join(OUT, "config.json")))["quantization_config"]
    print("quantization_config:", qc)
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")


if __name__ == "__main__":
    main()
