#!/usr/bin/env python3
"""Writes tests/fixtures/python_small.safetensors: a tiny file written by the reference `safetensors`
package, so the C++ reader is tested against another implementation's output, not only its own.

Run by hand, never by CI; needs torch and safetensors (e.g. the venv described in make_golden.py):
    /opt/tfref/bin/python tools/make_safetensors_fixture.py

Contents (tests/test_safetensors.cpp checks every value exactly; all are exact in their dtype):
    f32     F32  [2, 3]  -1.0, -0.5, 0.0, 0.5, 1.0, 1.5
    bf16    BF16 [4]     1.0, -2.5, 3.140625, 2**-7
    f16     F16  [3, 1]  0.5, -65504.0 (most negative half), 2**-14 (smallest normal half)
    i32     I32  [5]     -2**31, -1, 0, 1, 2**31 - 1
    scalar  F32  []      42.0
    empty   F32  [0, 3]  (no bytes)
    i64     I64  [2]     -1, 2**40   (a dtype the reader lists but tf::DType has no type for)
    u8      U8   [3]     0, 127, 255
metadata: {"format": "pt", "source": "make_safetensors_fixture.py"}
"""

import os

import torch
from safetensors.torch import save_file


def main():
    tensors = {
        "f32": torch.tensor([[-1.0, -0.5, 0.0], [0.5, 1.0, 1.5]], dtype=torch.float32),
        "bf16": torch.tensor([1.0, -2.5, 3.140625, 2.0**-7], dtype=torch.bfloat16),
        "f16": torch.tensor([[0.5], [-65504.0], [2.0**-14]], dtype=torch.float16),
        "i32": torch.tensor([-2**31, -1, 0, 1, 2**31 - 1], dtype=torch.int32),
        "scalar": torch.tensor(42.0, dtype=torch.float32),
        "empty": torch.zeros((0, 3), dtype=torch.float32),
        "i64": torch.tensor([-1, 2**40], dtype=torch.int64),
        "u8": torch.tensor([0, 127, 255], dtype=torch.uint8),
    }
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "tests", "fixtures", "python_small.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "source": "make_safetensors_fixture.py"})
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
