"""Softmax family: softmax over L elements at stride `inner`, for rows = outer * inner rows; one warp per row.

params: rows, L, inner, in_dtype, out_dtype (input and output contiguous, same layout), masked_rows_zero
(attention: a row that is all -inf gives zeros instead of NaN, as ONNX Attention defines)
args: x, y"""

import math

import numpy as np

from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load, store

FAMILY = "softmax"


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [("x", "ptr"), ("y", "ptr")]


def launch_config(p: dict):
    return (math.ceil(p["rows"] / 8), 1, 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    ti, to = CTYPES[p["in_dtype"]], CTYPES[p["out_dtype"]]
    zero_rows = "true" if p.get("masked_rows_zero") else "false"
    return f'''#include "rowwise.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}(const {ti}* __restrict__ x, {to}* __restrict__ y) {{
  softmax_rows<{ti}, {to}, {p["rows"]}L, {p["L"]}, {p["inner"]}, {zero_rows}>(x, y);
}}
'''


def reference(p: dict, args: dict) -> None:
    shape = [p["rows"] // max(p["inner"], 1), p["L"], p["inner"]]
    x = load(args["x"], p["in_dtype"], shape)
    mx = x.max(axis=1, keepdims=True)
    zero_rows = bool(p.get("masked_rows_zero"))
    if zero_rows:
        mx = np.where(np.isneginf(mx), np.float32(0), mx)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - mx)
        s = e.sum(axis=1, keepdims=True, dtype=np.float32)
        if zero_rows:
            s = np.where(s == 0, np.float32(1), s)
        store(args["y"], p["out_dtype"], e * (np.float32(1) / s))
