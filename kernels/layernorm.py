"""LayerNorm family: y = (x - mean) / sqrt(var + eps) * gamma (+ beta) over the last K elements of each
row; one warp per row. (A LayerNorm that feeds only GEMMs is fused into their prologue instead.)

params: rows, K, eps, has_beta, rms (RMSNorm: no mean subtraction, no beta), in_dtype, out_dtype,
        gamma_dtype (default float32; the dtype of gamma and beta, contiguous [K])
  epi (optional): {expr, inputs: [{dtype, atoms}]}: an elementwise epilogue (a RoPE after a per-head norm):
      y = expr(normalized, e1, ...) where expression input 0 is the normalized value and inputs 1.. are
      views over [rows, K] (atoms); ["in_rot", k] reads rotate_half along K
  cache (optional): fused KV-cache writes of flat output ranges (kernels/state.py)
  or parts: [params as above, ...]: independent norms in one launch (a layer's q and k head norms), part 0's
      rows first; each part's arguments in turn, named with the suffix _0, _1, ...
args: x, gamma, [beta], [e1 .. en], y, [cache_pos, cache0, ...]"""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels import state
from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load, load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "layernorm"
MAX_PARTS = 8  # norms one launch computes (each part adds 4-8 pointer arguments)


def _parts(p: dict) -> list[tuple[dict, str]]:
    """(params, argument-name suffix) of each norm the launch computes."""
    return [(q, f"_{j}") for j, q in enumerate(p["parts"])] if "parts" in p else [(p, "")]


def _epi_inputs(p: dict) -> list[dict]:
    return (p.get("epi") or {}).get("inputs", [])


def _arg_names(p: dict, sfx: str) -> list[tuple[str, str]]:
    extra = [(f"e{j + 1}{sfx}", "ptr") for j in range(len(_epi_inputs(p)))]
    beta = [(f"beta{sfx}", "ptr")] if p["has_beta"] else []
    return ([(f"x{sfx}", "ptr"), (f"gamma{sfx}", "ptr")] + beta + extra + [(f"y{sfx}", "ptr")]
            + state.cache_arg_spec(p, sfx))


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [a for q, sfx in _parts(p) for a in _arg_names(q, sfx)]


def launch_config(p: dict):
    return (math.ceil(sum(q["rows"] for q, _ in _parts(p)) / 8), 1, 1), (256, 1, 1), 0


def _params(p: dict, sfx: str) -> list[str]:
    ti, to, tg = CTYPES[p["in_dtype"]], CTYPES[p["out_dtype"]], CTYPES[p.get("gamma_dtype", "float32")]
    out = [f"const {ti}* __restrict__ x{sfx}", f"const {tg}* __restrict__ gamma{sfx}"]
    if p["has_beta"]:
        out.append(f"const {tg}* __restrict__ beta{sfx}")
    out += [f"const {CTYPES[e['dtype']]}* __restrict__ e{j + 1}{sfx}" for j, e in enumerate(_epi_inputs(p))]
    return out + [f"{to}* __restrict__ y{sfx}"] + state.cache_params(p, to, sfx)


def _row_code(p: dict, sfx: str) -> str:
    """Statements normalizing row `row` of a part (a warp; `lane` its lane) and writing its outputs."""
    K, ti, to = p["K"], CTYPES[p["in_dtype"]], CTYPES[p["out_dtype"]]
    beta = f" + to_float(beta{sfx}[{{k}}])" if p["has_beta"] else ""
    norm = f"(to_float(xr[{{k}}]) - mean) * rstd * to_float(gamma{sfx}[{{k}}])" + beta
    epi = p.get("epi")
    body_text, result = "", "nv"
    if epi:
        half = K // 2  # rotate_half along K: -x[k + h] for k < h, x[k - h] after
        rot_k, sign = f"(k + {half}) % {K}", f"(k < {half} ? -1.f : 1.f)"
        loads = ["nv"] + [f"to_float(e{j + 1}{sfx}[{atoms_code('i', e['atoms'])}])"
                          for j, e in enumerate(epi["inputs"])]
        rots = [f"{sign} * ({norm.format(k=rot_k)})"] + [
            f"{sign} * to_float(e{j + 1}{sfx}[{atoms_code(f'(i - k + {rot_k})', e['atoms'])}])"
            for j, e in enumerate(epi["inputs"])]
        body, result = ex.emit(epi["expr"], lambda j, rotated=False: rots[j] if rotated else loads[j])
        body_text = "\n      ".join(body)
    mean = "" if p.get("rms") else f'''
    float s = 0.f;
    for (int k = lane; k < {K}; k += 32) s += to_float(xr[k]);
    mean = warp_sum(s) / {K};'''
    return f'''const {ti}* xr = x{sfx} + row * {K}L;
    float mean = 0.f;{mean}
    float q = 0.f;
    for (int k = lane; k < {K}; k += 32) {{ const float d = to_float(xr[k]) - mean; q += d * d; }}
    const float rstd = 1.f / sqrtf(warp_sum(q) / {K} + {ex.c_float(p["eps"])});
    for (int k = lane; k < {K}; k += 32) {{
      const long i = row * {K}L + k;
      const float nv = {norm.format(k="k")};
      {body_text}
      const {to} r = from_float<{to}>({result});
      y{sfx}[i] = r;
      {state.cache_store_code(p, "i", "r", suffix=sfx)}
    }}'''


def cuda_source(p: dict, symbol: str) -> str:
    parts = _parts(p)
    params = [x for q, sfx in parts for x in _params(q, sfx)]
    branches, first = [], 0
    for q, sfx in parts:
        branches.append(f'''if (r0 < {first + q["rows"]}L) {{
    const long row = r0 - {first}L;
    {_row_code(q, sfx)}
    return;
  }}''')
        first += q["rows"]
    dispatch = "\n  ".join(branches)
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  griddep_launch_dependents();
  griddep_wait();  // before the rows past the end return: the next kernel waits only for this one
  const long r0 = (long)blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  {dispatch}
}}
'''


def _reference_part(p: dict, args: dict) -> None:
    rows, K = p["rows"], p["K"]
    x = load(args["x"], p["in_dtype"], [rows, K])
    mean = np.float32(0) if p.get("rms") else x.mean(axis=-1, keepdims=True, dtype=np.float32)
    var = np.square(x - mean).mean(axis=-1, keepdims=True, dtype=np.float32)
    gd = p.get("gamma_dtype", "float32")
    y = (x - mean) * (np.float32(1) / np.sqrt(var + np.float32(p["eps"]))) * load(args["gamma"], gd, [K])
    if p["has_beta"]:
        y = y + load(args["beta"], gd, [K])
    epi = p.get("epi")
    if epi:
        inputs = [y] + [load_atoms(args[f"e{j + 1}"], e["dtype"], e["atoms"], [rows, K])
                        for j, e in enumerate(epi["inputs"])]
        y = np.broadcast_to(ex.evaluate(epi["expr"], inputs), (rows, K))
    store(args["y"], p["out_dtype"], y)
    state.cache_store_reference(p, args, y, p["out_dtype"])


def reference(p: dict, args: dict) -> None:
    for q, sfx in _parts(p):
        _reference_part(q, {name[:len(name) - len(sfx)]: args[name] for name, _ in _arg_names(q, sfx)})
