"""Elementwise family: out = expr(in0, in1, ...), each input a strided/broadcast view of the output's
shape; one thread per output element (grid-stride).

params: shape, inputs: [{dtype, atoms}] ((size, stride) atoms over the output's shape), expr (may read an input
  through RoPE's rotate_half along the last axis: ["in_rot", k]), out_dtype,
  cache (optional): fused KV-cache writes of flat output ranges (kernels/state.py)
args: in0..in{n-1}, out, [cache_pos, cache0, ...]"""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels import state
from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "eltwise"
MAX_BLOCKS = 1 << 16


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [(f"in{i}", "ptr") for i in range(len(p["inputs"]))] + [("out", "ptr")] + state.cache_arg_spec(p)


def launch_config(p: dict):
    total = math.prod(p["shape"])
    return (max(1, min(MAX_BLOCKS, math.ceil(total / 256))), 1, 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    total = math.prod(p["shape"])
    params = [f"const {CTYPES[x['dtype']]}* __restrict__ in{i}" for i, x in enumerate(p["inputs"])]
    out_type = CTYPES[p["out_dtype"]]
    params.append(f"{out_type}* __restrict__ out")
    params += state.cache_params(p, out_type)
    loads = [f"to_float(in{i}[{atoms_code('i', x['atoms'])}])" for i, x in enumerate(p["inputs"])]
    d = p["shape"][-1] if p["shape"] else 1  # rotate_half (RoPE): the element half a row away, negated in the
    rot = [f"(i % {d}L < {d // 2}L ? -1.f : 1.f) * to_float(in{k}["  # first half (params: d is even if used)
           f"{atoms_code(f'(i - i % {d}L + (i % {d}L + {d // 2}L) % {d}L)', x['atoms'])}])"
           for k, x in enumerate(p["inputs"])]
    body, result = ex.emit(p["expr"], lambda k, rotated=False: rot[k] if rotated else loads[k])
    body_text = "\n    ".join(body)
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  griddep_launch_dependents();
  griddep_wait();
  for (long i = (long)blockIdx.x * 256 + threadIdx.x; i < {total}L; i += (long)gridDim.x * 256) {{
    {body_text}
    const {out_type} r = from_float<{out_type}>({result});
    out[i] = r;
    {state.cache_store_code(p, "i", "r")}
  }}
}}
'''


def reference(p: dict, args: dict) -> None:
    shape = list(p["shape"])
    inputs = [load_atoms(args[f"in{i}"], x["dtype"], x["atoms"], shape) for i, x in enumerate(p["inputs"])]
    result = np.broadcast_to(ex.evaluate(p["expr"], inputs), shape)
    store(args["out"], p["out_dtype"], result)
    state.cache_store_reference(p, args, result, p["out_dtype"])
