"""Attention family: softmax(score(Q K^T)) V in one kernel, over any views of Q, K^T and V (GQA arrives as a
broadcast view of the K/V heads), with the scores' elementwise epilogue (scale, additive or boolean masks) fused.
Two kernels:
- the tensor-core kernel (kernels/cuda/attention_mma.cuh, params["mma"]) for prefill shapes: T >= MMA_MIN_T
  queries, Q, K and V of one 16-bit type, head dims multiples of 16 up to MMA_MAX_DIM. It rounds P to the
  operand type before P.V, and the reference does the same.
- the SIMT kernel (kernels/cuda/attention.cuh) for everything else. Decode (T small) splits the keys of a head
  over the CL blocks of a thread-block cluster, which merge their partial softmax results through distributed
  shared memory.

params: BH, T, S, HD, VD (batch*heads, queries, keys, head dims),
  q: {dtype, bh, t, d}, k: {dtype, bh, d, s} (the K^T view), v: {dtype, bh, s, d}   (atoms of each index)
  epi_inputs: [{dtype, atoms}] over [BH, T, S]; expr: the score expression over ["acc"] = Q.K
  out_dtype (out contiguous [BH, T, VD])
  dyn (optional): null | {causal}: a dynamic KV length. S is then the cache capacity and the argument `pos`
    (device int32 [1]) the number of tokens in the cache before this run; query row t sees key j iff
    j <= pos + t (causal) or j < pos + T (not causal). Keys no row sees (stale cache data) are never read;
    a row that sees none gets zeros.
  SIMT kernel: TQ, KW (queries and key segments per block), CL (optional, default 1: blocks of a cluster
    splitting the keys), k_aligned (optional: K's rows are 16-byte aligned)
  tensor-core kernel: mma = {dtype, warps, bk, cl, q_regs, q_chunks, k_chunks, v_chunks}
    dtype       the operand type of Q, K, V and P (the reference rounds P to it)
    warps       warps per block, 16 query rows each; bk: keys per tile; cl: blocks of a cluster splitting the tiles
    q_regs      Q's mma fragments stay in registers, else they are re-read from shared memory at every key tile
    *_chunks    the view is copied by 16-byte cp.async (contiguous and aligned along the head dim), else by element
args: q, k, v, [pos], e0..e{n-1}, out
Both kernels call griddepcontrol (waiting before their first read), so they may be launched with programmatic
dependent launch."""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels import gemm_mma
from flashrt.kernels.gemm import epilogue_decls
from flashrt.kernels.dtypes import CTYPES, ITEMSIZE, from_f32, to_f32
from flashrt.kernels.memory import load, load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "attention"


SMS = 132  # multiprocessors of the GPU the grid is sized for (H100 / H200)
MIN_KEYS_PER_WARP = 16  # measured on an H200 (benchmarks/NOTES.md, v3)
MMA_MIN_T = 16  # one full 16-row mma tile; fewer queries stay with the SIMT kernel's decode path
MMA_MAX_DIM = 256  # larger head dims keep the SIMT kernel (the O accumulators would not fit in registers)
MMA_MAX_WARPS = 4  # per block, 16 query rows each


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


def mma_config(p: dict, offsets: tuple[int, int, int] = (0, 0, 0), hopper: bool = True) -> dict | None:
    """params["mma"] for the tensor-core kernel, or None where the SIMT kernel runs (see the module docstring).
    offsets: the element offsets of the Q, K^T and V views, which decide their 16-byte alignment. hopper: every
    target is sm_90+; before that (sm_80, sm_89: no clusters, and nvcc spills the register plans of head dims
    above 128 and of Q held in registers) head dims stay <= 128, Q is re-read from shared memory, CL = 1.
    Up to 4 warps per block cover the queries; key tiles of 64 keys (32 above head dim 128, so that the
    accumulators and the tiles fit in registers and shared memory); then clusters of CL blocks split the key
    tiles until the grid fills the GPU, each block keeping at least 2 tiles."""
    T, S, BH, HD, VD = p["T"], p["S"], p["BH"], p["HD"], p["VD"]
    q, k, v = p["q"], p["k"], p["v"]
    dtype = q["dtype"]
    if T < MMA_MIN_T or dtype not in gemm_mma.OPERAND_DTYPES or k["dtype"] != dtype or v["dtype"] != dtype:
        return None
    if HD % 16 or VD % 16 or max(HD, VD) > (MMA_MAX_DIM if hopper else 128):
        return None
    warps = min(MMA_MAX_WARPS, math.ceil(T / 16))
    bk = 64 if max(HD, VD) <= 128 else 32
    blocks, tiles, cl = BH * math.ceil(T / (16 * warps)), math.ceil(S / bk), 1
    while hopper and cl < 8 and blocks * cl < SMS and tiles >= 4 * cl:
        cl *= 2
    return {"dtype": dtype, "warps": warps, "bk": bk, "cl": cl, "q_regs": hopper and HD // 4 + VD // 2 <= 128,
            "q_chunks": gemm_mma.chunked(q["d"], q["bh"] + q["t"], offsets[0], 8),
            "k_chunks": gemm_mma.chunked(k["d"], k["bh"] + k["s"], offsets[1], 8),
            "v_chunks": gemm_mma.chunked(v["d"], v["bh"] + v["s"], offsets[2], 8)}


def mma_smem_bytes(p: dict) -> int:
    """Dynamic shared memory of the tensor-core kernel; mirrors AttnMmaShape in attention_mma.cuh."""
    c, HD, VD = p["mma"], p["HD"], p["VD"]
    bq, bk = 16 * c["warps"], c["bk"]
    tiles = max((bq * (HD + 8) + bk * (HD + 8) + bk * (VD + 8)) * 2, bq * (VD + 4) * 4)
    return tiles + (2 + c["cl"]) * bq * 4


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


def launch_config(p: dict) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    if p.get("mma"):
        c = p["mma"]
        return (math.ceil(p["T"] / (16 * c["warps"])) * c["cl"], p["BH"], 1), (32 * c["warps"], 1, 1), mma_smem_bytes(p)
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


def _simt_members(p: dict) -> str:
    q, k = p["q"], p["k"]
    tk = CTYPES[k["dtype"]]
    vpl, dim, load_v = _value_dims(p)
    return f"""template <typename U, int N> struct alignas(sizeof(U) * N) Pack {{ U v[N]; }};
  static constexpr int TQ = {p["TQ"]}, KW = {p["KW"]}, CL = {p.get("CL", 1)}, VPL = {vpl};
  __device__ static int dim(int lane, int i) {{ return {dim}; }}
  __device__ static float load_q(const Args& g, int bh, int t, int d) {{
    return to_float(g.q[{atoms_code("(long)bh", q["bh"])} + {atoms_code("(long)t", q["t"])}
                        + {atoms_code("(long)d", q["d"])}]);
  }}
  __device__ static void dot_qk(const Args& g, int bh, int j, const float* qv, float& dot) {{
    const {tk}* kr = g.k + {atoms_code("(long)bh", k["bh"])} + {atoms_code("(long)j", k["s"])};
{_dot_body(p, tk)}
  }}
  __device__ static void load_v(const Args& g, int bh, int j, int lane, float (&o)[VPL]) {{
    {load_v}
  }}"""


def _mma_members(p: dict) -> str:
    """The tensor-core kernel's shape and staging constants, and element offsets into Q, K and V."""
    c, q, k, v = p["mma"], p["q"], p["k"], p["v"]

    def flag(x: bool) -> str:
        return "true" if x else "false"

    def at(view: dict, row_index: str, row: str) -> str:  # the kernel asks only for elements inside the view
        return " + ".join(atoms_code(f"(long){i}", view[x], in_range=True)
                          for i, x in (("bh", "bh"), (row, row_index), ("d", "d")))

    return f"""using Elem = {CTYPES[c["dtype"]]};
  static constexpr int WARPS = {c["warps"]}, BK = {c["bk"]}, CL = {c["cl"]};
  static constexpr bool Q_REGS = {flag(c["q_regs"])};
  static constexpr bool Q_CHUNKS = {flag(c["q_chunks"])}, Q_T_INNER = {flag(gemm_mma.inner_is(q["t"]))};
  static constexpr bool K_CHUNKS = {flag(c["k_chunks"])}, K_S_INNER = {flag(gemm_mma.inner_is(k["s"]))};
  static constexpr bool V_CHUNKS = {flag(c["v_chunks"])}, V_S_INNER = {flag(gemm_mma.inner_is(v["s"]))};
  __device__ static long q_at(int bh, int t, int d) {{ return {at(q, "t", "t")}; }}
  __device__ static long k_at(int bh, int j, int d) {{ return {at(k, "s", "j")}; }}
  __device__ static long v_at(int bh, int j, int d) {{ return {at(v, "s", "j")}; }}"""


def cuda_source(p: dict, symbol: str) -> str:
    tq, tk, tv = (CTYPES[p[x]["dtype"]] for x in ("q", "k", "v"))
    fields = [f"const {tq}* q;", f"const {tk}* k;", f"const {tv}* v;"]
    params = [f"const {tq}* __restrict__ q", f"const {tk}* __restrict__ k", f"const {tv}* __restrict__ v"]
    names = ["q", "k", "v"]
    if p.get("dyn"):
        fields.append("const int* pos;")
        params.append("const int* __restrict__ pos")
        names.append("pos")
    body_text, result = epilogue_decls(p, "out", fields, params, names)
    mma = p.get("mma")
    if mma:
        header, template, members = "attention_mma.cuh", "attention_mma", _mma_members(p)
        cl, threads = mma["cl"], 32 * mma["warps"]
    else:
        header, template, members = "attention.cuh", "attention", _simt_members(p)
        cl, threads = p.get("CL", 1), 32 * p["TQ"] * p["KW"]
    cluster = f"__cluster_dims__({cl}, 1, 1) " if cl > 1 else ""
    return f'''#include "{header}"

namespace {{
struct P {{
  struct Args {{ {" ".join(fields)} }};
  static constexpr int T = {p["T"]}, S = {p["S"]}, HD = {p["HD"]}, VD = {p["VD"]};
  {members}
  __device__ static int pos(const Args& g) {{ return {"*g.pos" if p.get("dyn") else "0"}; }}
  __device__ static int visible(int pos, int t) {{ return {_visible_code(p)}; }}
  __device__ static float score(const Args& g, int bh, int t, int j, float acc) {{
    const long o = ((long)bh * T + t) * S + j;
    {body_text}
    return {result};
  }}
  __device__ static void store(const Args& g, int bh, int t, int d, float x) {{
    g.out[((long)bh * T + t) * VD + d] = from_float<{CTYPES[p["out_dtype"]]}>(x);
  }}
}};
}}  // namespace

extern "C" __global__ void {cluster}__launch_bounds__({threads}) {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  {template}<P>(g);
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
        if p.get("mma"):  # the tensor-core kernel multiplies V by P rounded to the operand type, and sums that
            e = to_f32(from_f32(e, p["mma"]["dtype"]), p["mma"]["dtype"])
        total = e.sum(axis=-1, keepdims=True, dtype=np.float32)
        inv = np.where(total > 0, np.float32(1) / np.where(total > 0, total, 1), np.float32(0))
    store(args["out"], p["out_dtype"], np.matmul(e * inv, V).astype(np.float32))
