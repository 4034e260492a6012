"""Attention family: softmax(score(Q K^T)) V in one kernel (kernels/cuda/attention.cuh), over any views of
Q, K^T and V (GQA arrives as a broadcast view of the K/V heads), with the scores' elementwise epilogue
(scale, additive or boolean masks) fused. Decode (T small) splits the keys of a head over the CL blocks of a
thread-block cluster, which merge their partial softmax results through distributed shared memory.

params: BH, T, S, HD, VD (batch*heads, queries, keys, head dims), TQ, KW (queries and key segments per block),
  CL (optional, default 1: blocks of a cluster splitting the keys),
  q: {dtype, bh, t, d}, k: {dtype, bh, d, s} (the K^T view), v: {dtype, bh, s, d}   (atoms of each index)
  epi_inputs: [{dtype, atoms}] over [BH, T, S]; expr: the score expression over ["acc"] = Q.K
  out_dtype (out contiguous [BH, T, VD])
  dyn (optional): null | {causal}: a dynamic KV length. S is then the cache capacity and the argument `pos`
    (device int32 [1]) the number of tokens in the cache before this run; query row t sees key j iff
    j <= pos + t (causal) or j < pos + T (not causal). Keys a row does not see are never read; a row that
    sees none gets zeros.
args: q, k, v, [pos], e0..e{n-1}, out
The kernel calls griddepcontrol (waiting before its first read), so it may be launched with programmatic
dependent launch."""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels.gemm import epilogue_decls
from flashrt.kernels.dtypes import CTYPES, ITEMSIZE
from flashrt.kernels.memory import load, load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "attention"


SMS = 132  # multiprocessors of the GPU the grid is sized for (H100 / H200)
MIN_KEYS_PER_WARP = 16  # measured on an H200 (benchmarks/NOTES.md, v3)


def choose_config(T: int, S: int, BH: int = 1) -> tuple[int, int, int]:
    """(TQ, KW, CL): up to 8 queries per block (all of them when T <= 8, else 2 or 8), the rest of the 8 warps
    splitting the keys (4 warps for a single query: measured faster than 8); then clusters of CL blocks split
    the keys further until the grid fills the GPU, and KW shrinks while a warp would get fewer than
    MIN_KEYS_PER_WARP keys."""
    TQ = T if T <= 8 else (2 if S >= 128 else 8)
    KW = 4 if T == 1 else 8 // TQ if T <= 8 or S >= 128 else 1
    CL, blocks = 1, BH * math.ceil(T / TQ)
    while CL < 8 and blocks * CL < SMS and S >= 2 * CL * MIN_KEYS_PER_WARP:
        CL *= 2
    while KW > 1 and S < CL * KW * MIN_KEYS_PER_WARP:
        KW //= 2
    return TQ, KW, CL


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
    pos = [("pos", "ptr")] if p.get("dyn") else []
    return [("q", "ptr"), ("k", "ptr"), ("v", "ptr")] + pos + [(f"e{i}", "ptr") for i in range(len(p["epi_inputs"]))] \
        + [("out", "ptr")]


def launch_config(p: dict):
    cl = p.get("CL", 1)
    return (-(-p["T"] // p["TQ"]) * cl, p["BH"], 1), (32 * p["TQ"] * p["KW"], 1, 1), 0


def _value_dims(p: dict) -> tuple[int, str, str]:
    """(VPL, dim(lane, i), load_v body): the value dims a lane accumulates. When a value row is contiguous and
    VD = 32 * VPL, lane l owns dims [l * VPL, (l + 1) * VPL), read with one 4/8/16-byte load where the pointer
    allows it; otherwise dims i * 32 + l, read one element at a time."""
    v, vd = p["v"], p["VD"]
    vpl = -(-vd // 32)
    ctype = CTYPES[v["dtype"]]
    row = f'g.v + {atoms_code("(long)bh", v["bh"])} + {atoms_code("(long)j", v["s"])}'
    nbytes = vpl * ITEMSIZE[v["dtype"]]
    strides = [s for _, s in v["bh"]] + [s for _, s in v["s"]]
    if v["d"] == [[vd, 1]] and vd == 32 * vpl and nbytes in (4, 8, 16) and all(s % vpl == 0 for s in strides):
        body = f"""const {ctype}* vr = {row} + lane * VPL;
    if (reinterpret_cast<unsigned long>(g.v) % {nbytes} == 0) {{
      const Pack<{ctype}, VPL> pk = *reinterpret_cast<const Pack<{ctype}, VPL>*>(vr);
#pragma unroll
      for (int i = 0; i < VPL; ++i) o[i] = to_float(pk.v[i]);
    }} else {{
#pragma unroll
      for (int i = 0; i < VPL; ++i) o[i] = to_float(vr[i]);
    }}"""
        return vpl, "lane * VPL + i", body
    body = f"""const {ctype}* vr = {row};
#pragma unroll
    for (int i = 0; i < VPL; ++i) {{
      const int d = i * 32 + lane;
      o[i] = d < VD ? to_float(vr[{atoms_code("(long)d", v["d"])}]) : 0.f;
    }}"""
    return vpl, "i * 32 + lane", body


def _visible_code(p: dict) -> str:
    """C expression: how many keys (a prefix) query row t sees, given pos."""
    dyn = p.get("dyn")
    if not dyn:
        return "S"
    last = "(long)pos + t + 1" if dyn["causal"] else "(long)pos + T"
    return f"(int)min((long)S, max(0L, {last}))"


def cuda_source(p: dict, symbol: str) -> str:
    q, k = p["q"], p["k"]
    tq, tk, tv = (CTYPES[x["dtype"]] for x in (q, k, p["v"]))
    to = CTYPES[p["out_dtype"]]
    fields = [f"const {tq}* q;", f"const {tk}* k;", f"const {tv}* v;"]
    params = [f"const {tq}* __restrict__ q", f"const {tk}* __restrict__ k", f"const {tv}* __restrict__ v"]
    names = ["q", "k", "v"]
    if p.get("dyn"):
        fields.append("const int* pos;")
        params.append("const int* __restrict__ pos")
        names.append("pos")
    body_text, result = epilogue_decls(p, "out", fields, params, names)
    T, S, cl = p["T"], p["S"], p.get("CL", 1)
    vpl, dim, load_v = _value_dims(p)
    threads = 32 * p["TQ"] * p["KW"]
    cluster = f"__cluster_dims__({cl}, 1, 1) " if cl > 1 else ""
    return f'''#include "attention.cuh"

namespace {{
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {{ T v[N]; }};
struct P {{
  struct Args {{ {" ".join(fields)} }};
  static constexpr int T = {T}, S = {S}, HD = {p["HD"]}, VD = {p["VD"]}, TQ = {p["TQ"]}, KW = {p["KW"]};
  static constexpr int CL = {cl}, VPL = {vpl};
  __device__ static int pos(const Args& g) {{ return {"*g.pos" if p.get("dyn") else "0"}; }}
  __device__ static int visible(int pos, int t) {{ return {_visible_code(p)}; }}
  __device__ static int dim(int lane, int i) {{ return {dim}; }}
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
  __device__ static void load_v(const Args& g, int bh, int j, int lane, float (&o)[VPL]) {{
    {load_v}
  }}
  __device__ static void store(const Args& g, int bh, int t, int d, float x) {{
    g.out[((long)bh * T + t) * VD + d] = from_float<{to}>(x);
  }}
}};
}}  // namespace

extern "C" __global__ void {cluster}__launch_bounds__({threads}) {symbol}({", ".join(params)}) {{
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
    visible = np.ones((T, S), bool)
    if p.get("dyn"):
        pos = int(load(args["pos"], "int32", [1])[0])
        seen = pos + np.arange(T) + 1 if p["dyn"]["causal"] else np.full(T, pos + T)
        visible = np.arange(S)[None, :] < seen[:, None]
        stale = ~visible.any(axis=0)  # keys no row sees hold stale cache data: never let it reach a sum
        Kt = np.where(stale[None, None, :], np.float32(0), Kt)
        V = np.where(stale[None, :, None], np.float32(0), V)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.broadcast_to(ex.evaluate(p["expr"], inputs, np.matmul(Q, Kt).astype(np.float32)), (BH, T, S))
        s = np.where(visible, s, np.float32(-np.inf))
        mx = s.max(axis=-1, keepdims=True)
        mx = np.where(np.isneginf(mx), np.float32(0), mx)
        e = np.exp(s - mx)
        total = e.sum(axis=-1, keepdims=True, dtype=np.float32)
        inv = np.where(total > 0, np.float32(1) / np.where(total > 0, total, 1), np.float32(0))
    store(args["out"], p["out_dtype"], np.matmul(e * inv, V).astype(np.float32))
