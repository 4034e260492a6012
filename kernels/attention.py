"""Attention family: softmax(score(Q K^T)) V in one kernel (kernels/cuda/attention.cuh), over any views of
Q, K^T and V (GQA arrives as a broadcast view of the K/V heads), with the scores' elementwise epilogue
(scale, additive or boolean masks) fused. Decode (T = 1) splits the keys over the block's 8 warps.

params: BH, T, S, HD, VD (batch*heads, queries, keys, head dims), TQ, KW (queries and key segments per block),
  q: {dtype, bh, t, d}, k: {dtype, bh, d, s} (the K^T view), v: {dtype, bh, s, d}   (atoms of each index)
  epi_inputs: [{dtype, atoms}] over [BH, T, S]; expr: the score expression over ["acc"] = Q.K
  out_dtype (out contiguous [BH, T, VD])
args: q, k, v, e0..e{n-1}, out"""

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels.gemm import epilogue_decls
from flashrt.kernels.dtypes import CTYPES
from flashrt.kernels.memory import load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "attention"


def choose_config(T: int, S: int) -> tuple[int, int]:
    """(TQ, KW): decode puts all 8 warps on one query's keys; prefill gives each query 4 or 8 warps."""
    if T == 1:
        return 1, 8
    return (2, 4) if S >= 128 else (8, 1)


def _dot_body(p: dict, tk: str) -> str:
    """Q.K over the head dim: 16-byte loads when a key row is contiguous and aligned, else element loads."""
    k, hd = p["k"], p["HD"]
    vec = {"float32": 4, "bfloat16": 8, "float16": 8}.get(k["dtype"], 0)
    strides = [s for _, s in k["bh"]] + [s for _, s in k["s"]]
    if vec and k["d"] == [[hd, 1]] and hd % vec == 0 and all(s % vec == 0 for s in strides) \
            and p.get("k_aligned", False):
        return f"""#pragma unroll
    for (int d = 0; d < HD; d += {vec}) {{
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(kr + d));
      float kv[{vec}];
      unpack(raw, kv, kr);
#pragma unroll
      for (int i = 0; i < {vec}; ++i) dot = fmaf(qv[d + i], kv[i], dot);
    }}"""
    return f"""#pragma unroll 16
    for (int d = 0; d < HD; ++d) dot = fmaf(qv[d], to_float(kr[{atoms_code("(long)d", k["d"])}]), dot);"""


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [("q", "ptr"), ("k", "ptr"), ("v", "ptr")] + [(f"e{i}", "ptr") for i in range(len(p["epi_inputs"]))] \
        + [("out", "ptr")]


def launch_config(p: dict):
    return (-(-p["T"] // p["TQ"]), p["BH"], 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    q, k, v = p["q"], p["k"], p["v"]
    tq, tk, tv = (CTYPES[x["dtype"]] for x in (q, k, v))
    to = CTYPES[p["out_dtype"]]
    fields = [f"const {tq}* q;", f"const {tk}* k;", f"const {tv}* v;"]
    params = [f"const {tq}* __restrict__ q", f"const {tk}* __restrict__ k", f"const {tv}* __restrict__ v"]
    names = ["q", "k", "v"]
    body_text, result = epilogue_decls(p, "out", fields, params, names)
    T, S = p["T"], p["S"]
    return f'''#include "attention.cuh"

namespace {{
struct P {{
  struct Args {{ {" ".join(fields)} }};
  static constexpr int T = {T}, S = {S}, HD = {p["HD"]}, VD = {p["VD"]}, TQ = {p["TQ"]}, KW = {p["KW"]};
  __device__ static float load_q(const Args& g, int bh, int t, int d) {{
    return to_float(g.q[{atoms_code("(long)bh", q["bh"])} + {atoms_code("(long)t", q["t"])}
                        + {atoms_code("(long)d", q["d"])}]);
  }}
  __device__ static void dot_qk(const Args& g, int bh, int j, const float* qv, float& dot) {{
    const {tk}* kr = g.k + {atoms_code("(long)bh", k["bh"])} + {atoms_code("(long)j", k["s"])};
{_dot_body(p, tk)}
  }}
  __device__ static float score(const Args& g, int bh, int t, int j, float acc) {{
    const long o = ((long)bh * T + t) * S + j;
    {body_text}
    return {result};
  }}
  __device__ static float load_v(const Args& g, int bh, int j, int d) {{
    return to_float(g.v[{atoms_code("(long)bh", v["bh"])} + {atoms_code("(long)j", v["s"])}
                        + {atoms_code("(long)d", v["d"])}]);
  }}
  __device__ static void store(const Args& g, int bh, int t, int d, float x) {{
    g.out[((long)bh * T + t) * VD + d] = from_float<{to}>(x);
  }}
}};
}}  // namespace

extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  attention<P>(g);
}}
'''


def reference(p: dict, args: dict) -> None:
    BH, T, S, HD, VD = p["BH"], p["T"], p["S"], p["HD"], p["VD"]
    q, k, v = p["q"], p["k"], p["v"]
    Q = load_atoms(args["q"], q["dtype"], list(q["bh"]) + list(q["t"]) + list(q["d"]), [BH, T, HD])
    Kt = load_atoms(args["k"], k["dtype"], list(k["bh"]) + list(k["d"]) + list(k["s"]), [BH, HD, S])
    V = load_atoms(args["v"], v["dtype"], list(v["bh"]) + list(v["s"]) + list(v["d"]), [BH, S, VD])
    inputs = [load_atoms(args[f"e{i}"], e["dtype"], e["atoms"], [BH, T, S]) for i, e in enumerate(p["epi_inputs"])]
    s = np.broadcast_to(ex.evaluate(p["expr"], inputs, np.matmul(Q, Kt).astype(np.float32)), (BH, T, S))
    with np.errstate(invalid="ignore", over="ignore"):
        mx = s.max(axis=-1, keepdims=True)
        mx = np.where(np.isneginf(mx), np.float32(0), mx)
        e = np.exp(s - mx)
        total = e.sum(axis=-1, keepdims=True, dtype=np.float32)
        inv = np.where(total > 0, np.float32(1) / np.where(total > 0, total, 1), np.float32(0))
    store(args["out"], p["out_dtype"], np.matmul(e * inv, V).astype(np.float32))
