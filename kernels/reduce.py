"""Reduce family: out[o] = reduce(x[o, r] for r < R) with op mean | sum | max | min; the input is any view
whose atoms enumerate [outer, R] row-major (kept dims first, reduced dims last). One thread per output.

params: outer, R, op, atoms, in_dtype, out_dtype
args: x, out"""

import math

import numpy as np

from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "reduce"
_INIT = {"sum": "0.f", "mean": "0.f", "max": "-INFINITY", "min": "INFINITY"}
_STEP = {"sum": "a += v;", "mean": "a += v;", "max": "a = fmaxf(a, v);", "min": "a = fminf(a, v);"}


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [("x", "ptr"), ("out", "ptr")]


def launch_config(p: dict):
    return (max(1, min(1 << 16, math.ceil(p["outer"] / 256))), 1, 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    ti, to, R, op = CTYPES[p["in_dtype"]], CTYPES[p["out_dtype"]], p["R"], p["op"]
    final = f"a / {R}.f" if op == "mean" else "a"
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}(const {ti}* __restrict__ x, {to}* __restrict__ out) {{
  griddep_launch_dependents();
  griddep_wait();
  for (long o = (long)blockIdx.x * 256 + threadIdx.x; o < {p["outer"]}L; o += (long)gridDim.x * 256) {{
    float a = {_INIT[op]};
    for (long r = 0; r < {R}L; ++r) {{
      const long li = o * {R}L + r;
      const float v = to_float(x[{atoms_code("li", p["atoms"])}]);
      {_STEP[op]}
    }}
    out[o] = from_float<{to}>({final});
  }}
}}
'''


def reference(p: dict, args: dict) -> None:
    x = load_atoms(args["x"], p["in_dtype"], p["atoms"], [p["outer"], p["R"]])
    a = np.float32(0)
    if p["op"] in ("sum", "mean"):
        a = np.zeros(p["outer"], np.float32)
        for r in range(p["R"]):  # sequential float32 accumulation, as the kernel does
            a = a + x[:, r]
        if p["op"] == "mean":
            a = a / np.float32(p["R"])
    else:
        a = x.max(axis=1) if p["op"] == "max" else x.min(axis=1)
    store(args["out"], p["out_dtype"], np.asarray(a, np.float32))
