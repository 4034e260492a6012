"""Gather family (embedding lookup and index select): out[o, j, i] = data[o, idx[j], i] for data viewed
as [outer, D, inner] (contiguous) and indices flattened to [J]. Negative indices count from the end;
out-of-range indices are clamped to [0, D-1] (a kernel cannot raise; the CPU reference does the same).

params: outer, D, inner, J, data_dtype, index_dtype, out_dtype
args: data, idx, out"""

import math

import numpy as np

from flashrt.kernels.dtypes import CTYPES, STORAGE
from flashrt.kernels.memory import load, store

FAMILY = "gather"


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [("data", "ptr"), ("idx", "ptr"), ("out", "ptr")]


def launch_config(p: dict):
    total = p["outer"] * p["J"] * p["inner"]
    return (max(1, min(1 << 16, math.ceil(total / 256))), 1, 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    td, ti, to = CTYPES[p["data_dtype"]], CTYPES[p["index_dtype"]], CTYPES[p["out_dtype"]]
    outer, D, inner, J = p["outer"], p["D"], p["inner"], p["J"]
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}(const {td}* __restrict__ data,
    const {ti}* __restrict__ idx, {to}* __restrict__ out) {{
  griddep_launch_dependents();
  griddep_wait();
  for (long e = (long)blockIdx.x * 256 + threadIdx.x; e < {outer * J * inner}L; e += (long)gridDim.x * 256) {{
    const long i = e % {inner}L, j = (e / {inner}L) % {J}L, o = e / ({inner}L * {J}L);
    long long d = to_index(idx[j]);
    d = d < 0 ? d + {D} : d;
    d = d < 0 ? 0 : (d >= {D} ? {D - 1} : d);
    out[e] = from_float<{to}>(to_float(data[(o * {D}L + d) * {inner}L + i]));
  }}
}}
'''


def reference(p: dict, args: dict) -> None:
    outer, D, inner, J = p["outer"], p["D"], p["inner"], p["J"]
    data = load(args["data"], p["data_dtype"], [outer, D, inner])
    idx_ptr = args["idx"]
    from flashrt.kernels.dtypes import ITEMSIZE
    from flashrt.kernels.memory import _span

    _span(idx_ptr, p["index_dtype"], [J], [1])
    raw = idx_ptr.buffer[idx_ptr.offset:idx_ptr.offset + J * ITEMSIZE[p["index_dtype"]]]
    idx = raw.view(STORAGE[p["index_dtype"]]).astype(np.int64)
    idx = np.where(idx < 0, idx + D, idx).clip(0, D - 1)
    store(args["out"], p["out_dtype"], data[:, idx, :])
