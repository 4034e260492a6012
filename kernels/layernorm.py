"""LayerNorm family: y = (x - mean) / sqrt(var + eps) * gamma (+ beta) over the last K elements of each
row; one warp per row. (A LayerNorm that feeds only GEMMs is fused into their prologue instead.)

params: rows, K, eps, has_beta, rms (RMSNorm: no mean subtraction, no beta), in_dtype, out_dtype,
        gamma_dtype (default float32; the dtype of gamma and beta, contiguous [K])
args: x, gamma, [beta], y"""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load, store

FAMILY = "layernorm"


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [("x", "ptr"), ("gamma", "ptr")] + ([("beta", "ptr")] if p["has_beta"] else []) + [("y", "ptr")]


def launch_config(p: dict):
    return (math.ceil(p["rows"] / 8), 1, 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    ti, to = CTYPES[p["in_dtype"]], CTYPES[p["out_dtype"]]
    tg = CTYPES[p.get("gamma_dtype", "float32")]
    beta_param = f", const {tg}* __restrict__ beta" if p["has_beta"] else ""
    has_beta, beta = ("true", "beta") if p["has_beta"] else ("false", "nullptr")
    rms = "true" if p.get("rms") else "false"
    return f'''#include "rowwise.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}(const {ti}* __restrict__ x,
    const {tg}* __restrict__ gamma{beta_param}, {to}* __restrict__ y) {{
  layernorm_rows<{ti}, {to}, {p["rows"]}L, {p["K"]}, {has_beta}, {rms}, {tg}>(x, gamma, {beta}, y,
                                                                         {ex.c_float(p["eps"])});
}}
'''


def reference(p: dict, args: dict) -> None:
    x = load(args["x"], p["in_dtype"], [p["rows"], p["K"]])
    mean = np.float32(0) if p.get("rms") else x.mean(axis=-1, keepdims=True, dtype=np.float32)
    var = np.square(x - mean).mean(axis=-1, keepdims=True, dtype=np.float32)
    gd = p.get("gamma_dtype", "float32")
    y = (x - mean) * (np.float32(1) / np.sqrt(var + np.float32(p["eps"]))) * load(args["gamma"], gd, [p["K"]])
    if p["has_beta"]:
        y = y + load(args["beta"], gd, [p["K"]])
    store(args["y"], p["out_dtype"], y)
