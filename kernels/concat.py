"""Concat family: out = concatenate(inputs, axis), each input any view (atoms over its own shape); the
output is contiguous. One launch for any number of inputs.

params: shape (of out), axis, inputs: [{dtype, size (along axis), atoms}], out_dtype
  vec (optional, 8): a 1-D concat of contiguous inputs, each a multiple of 8 elements, whose pointers the build
      knows are 16-byte aligned: each thread converts 8 elements with 16-byte loads and stores (the engine's
      input converter, aot/partition.py); the result is the same
args: in0..in{n-1}, out"""

import math

import numpy as np

from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "concat"


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [(f"in{i}", "ptr") for i in range(len(p["inputs"]))] + [("out", "ptr")]


VECTOR_DTYPES = ("float32", "bfloat16", "float16")


def vector_ok(p: dict) -> bool:
    """Whether params allow the 8-wide path (alignment is the builder's to know: it is not in params)."""
    return (len(p["shape"]) == 1 and p["out_dtype"] in VECTOR_DTYPES
            and all(x["dtype"] in VECTOR_DTYPES and x["size"] % 8 == 0 and x["atoms"] in ([[x["size"], 1]], [])
                    for x in p["inputs"]))


def launch_config(p: dict):
    total = math.prod(p["shape"]) // (8 if p.get("vec") else 1)
    return (max(1, min(1 << 16, math.ceil(total / 256))), 1, 1), (256, 1, 1), 0


def _split(p: dict) -> tuple[int, int, int]:
    shape, axis = p["shape"], p["axis"]
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def cuda_source(p: dict, symbol: str) -> str:
    outer, A, inner = _split(p)
    params = [f"const {CTYPES[x['dtype']]}* __restrict__ in{i}" for i, x in enumerate(p["inputs"])]
    params.append(f"{CTYPES[p['out_dtype']]}* __restrict__ out")
    if p.get("vec"):
        return _vector_source(p, symbol, params)
    branches, start = [], 0
    for i, x in enumerate(p["inputs"]):
        size = x["size"]
        local = f"((o * {size}L + (c - {start}L)) * {inner}L + r)"
        cond = f"if (c < {start + size}L)" if i < len(p["inputs"]) - 1 else ""
        branches.append(f"{cond} {{ const long li = {local}; v = to_float(in{i}[{atoms_code('li', x['atoms'])}]); }}")
        start += size
    body = "\n    else ".join(branches)
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  griddep_launch_dependents();
  griddep_wait();
  for (long e = (long)blockIdx.x * 256 + threadIdx.x; e < {outer * A * inner}L; e += (long)gridDim.x * 256) {{
    const long r = e % {inner}L, c = (e / {inner}L) % {A}L, o = e / ({inner}L * {A}L);
    float v;
    {body}
    out[e] = from_float<{CTYPES[p["out_dtype"]]}>(v);
  }}
}}
'''


def _vector_source(p: dict, symbol: str, params: list[str]) -> str:
    branches, start = [], 0
    for i, x in enumerate(p["inputs"]):
        cond = f"if (e < {start + x['size']}L)" if i < len(p["inputs"]) - 1 else ""
        branches.append(f"{cond} convert8(in{i} + (e - {start}L), out + e);")
        start += x["size"]
    body = "\n    else ".join(branches)
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  griddep_launch_dependents();
  griddep_wait();
  for (long e = ((long)blockIdx.x * 256 + threadIdx.x) * 8; e < {p["shape"][0]}L; e += (long)gridDim.x * 256 * 8) {{
    {body}
  }}
}}
'''


def reference(p: dict, args: dict) -> None:
    outer, A, inner = _split(p)
    parts = [load_atoms(args[f"in{i}"], x["dtype"], x["atoms"], [outer, x["size"], inner])
             for i, x in enumerate(p["inputs"])]
    store(args["out"], p["out_dtype"], np.concatenate(parts, axis=1).reshape(p["shape"]))
