#!/usr/bin/env python3
"""Writes tests/fixtures/nf4_bnb.safetensors: input vectors and what bitsandbytes makes of them.

Run by hand (needs torch, numpy, safetensors and bitsandbytes, which quantizes on the CPU):
    python tools/make_nf4_fixture.py

For each case C the file holds
    C.input          f32 [n]      the vector
    C.codes          u8  [(n+1)/2] NF4 codes from quantize_4bit(blocksize=64, quant_type="nf4")
    C.absmax         f32 [blocks] its per-64 absmax (compress_statistics=False)
    C.dequant        f32 [n]      dequantize_4bit of those codes and absmax
    C.absmax_codes   u8  [blocks] with compress_statistics=True: the absmax minus their mean,
                                  quantized to the signed dynamic map in blocks of 256
    C.absmax_nested  f32 [ceil(blocks/256)] the absmax of each of those 256-blocks
    C.absmax_offset  f32 [1]      the mean that was subtracted
    C.absmax_dequant f32 [blocks] dequantize_blockwise of the nested codes (on a fresh map) + offset
and once
    dynamic_map      f32 [256]    create_dynamic_map(signed=True)
    nf4_code         f32 [16]     the NF4 codebook
The codes with double quantization equal those without (the absmax are the same), which the
script asserts.

The nested codes are bitsandbytes' blockwise quantization as its CUDA kernel and its torch
backend compute it (the nearest map value, a value on a float32 midpoint taking the lower index;
a block of zeros scales by 1 / 1e-38). bitsandbytes' native CPU kernel, which quantize_blockwise
calls on the CPU, searches the map with a binary search that sometimes returns a neighbour of the
nearest value; the script runs it too and prints where the two differ.
"""
import os

import numpy as np
import torch
import bitsandbytes.functional as F
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "nf4_bnb.safetensors")


def straddling_pair(rng, mid):
    """An absmax a and value x whose x * (1 / a) and x / a (each rounded to f32) fall on
    different sides of an NF4 midpoint, so the fixture tells the two scalings apart."""
    while True:
        a = np.float32(rng.uniform(0.5, 2.0))
        x = np.float32(mid[rng.integers(0, mid.size)] * a)
        for _ in range(3):
            recip = np.float32(x * np.float32(np.float32(1.0) / a))
            div = np.float32(x / a)
            if np.searchsorted(mid, recip) != np.searchsorted(mid, div):
                return a, x
            x = np.nextafter(x, np.float32(np.inf))


def rounding_case(rng):
    """Block 0: 1.0, then every NF4 midpoint (which takes the lower code) and the float just
    above each; block 1 (full) and block 2 (partial, two elements): pairs on which the reciprocal
    and the division disagree."""
    code = F.get_4bit_type("nf4", device="cpu")
    mid = ((code[:-1] + code[1:]) / 2).numpy()
    x = np.zeros(64 * 2 + 2, dtype=np.float32)
    x[0] = 1.0
    x[1:16] = mid
    x[16:31] = np.nextafter(mid, np.float32(np.inf))
    x[64], x[65] = straddling_pair(rng, mid)
    x[128], x[129] = straddling_pair(rng, mid)
    return x


def cases():
    rng = np.random.default_rng(20261201)
    # More than 256 blocks, so the nested quantization has a second (partial) 256-block; weights
    # at a typical scale with a few planted outliers, and one all-zero block.
    big = rng.standard_normal(64 * 257 + 5).astype(np.float32) * 0.02
    big[rng.integers(0, big.size, 12)] *= 40.0
    big[64 * 3 : 64 * 4] = 0.0
    yield "big", big
    yield "len7", rng.standard_normal(7).astype(np.float32)
    yield "len65", rng.standard_normal(65).astype(np.float32) * 3.0
    yield "heavy1025", rng.standard_t(2.0, 1025).astype(np.float32)
    yield "rounding", rounding_case(rng)


def blockwise_nearest(a, code, blocksize):
    """Blockwise quantization of `a` to the nearest value of `code`: scale each block by its absmax,
    then bucket by the midpoints between code values (what bitsandbytes' CUDA kernel computes)."""
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    a_com = a[:full].reshape(full // blocksize, blocksize)
    absmax = a_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(a_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, a[full:].abs().max().unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def main():
    tensors = {}
    for name, x in cases():
        t = torch.from_numpy(x)
        codes, state = F.quantize_4bit(t, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = F.dequantize_4bit(codes, state)
        codes2, state2 = F.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(codes, codes2)
        nested = state2.state2
        qabsmax, nested_absmax = blockwise_nearest(state.absmax - state2.offset, F.create_dynamic_map(), 256)
        assert torch.equal(nested_absmax, nested.absmax)
        native_differs = torch.nonzero(qabsmax != state2.absmax.reshape(-1)).reshape(-1).tolist()
        print(f"{name}: native CPU nested codes differ from the nearest at {native_differs}")
        absmax_dq = F.dequantize_blockwise(
            qabsmax, absmax=nested_absmax, code=F.create_dynamic_map(), blocksize=256
        ) + state2.offset
        tensors[name + ".input"] = x
        tensors[name + ".codes"] = codes.numpy().reshape(-1).copy()
        tensors[name + ".absmax"] = state.absmax.numpy().astype(np.float32)
        tensors[name + ".dequant"] = deq.numpy().reshape(-1).astype(np.float32)
        tensors[name + ".absmax_codes"] = qabsmax.numpy().copy()
        tensors[name + ".absmax_nested"] = nested_absmax.numpy().astype(np.float32)
        tensors[name + ".absmax_offset"] = np.array([float(state2.offset)], dtype=np.float32)
        tensors[name + ".absmax_dequant"] = absmax_dq.numpy().astype(np.float32)
    tensors["dynamic_map"] = F.create_dynamic_map().numpy()
    tensors["nf4_code"] = F.get_4bit_type("nf4", device="cpu").numpy()
    save_file(tensors, OUT, metadata={"bitsandbytes": __import__("bitsandbytes").__version__})
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
