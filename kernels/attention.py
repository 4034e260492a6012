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
  k / v with several sources (optional, up to MAX_SOURCES): {dtype, sources: [{keys, bh, d, s}, ...]} instead of
    bh, d, s: K (V) is the concatenation of the sources along the key axis, each a view of its own pointer over
    its `keys` keys (the keys add up to S): key j in [S0, S0 + S1) is key j - S0 of source 1. A Concat that
    only feeds attention is read in place this way (aot/partition.py).
  epi_inputs: [{dtype, atoms}] over [BH, T, S]; expr: the score expression over ["acc"] = Q.K
  out_dtype (out contiguous [BH, T, VD])
  prefetch (optional, true; SIMT kernel with dyn): before it waits for the previous kernel, each block streams the
    cache rows before pos of its share of the keys into L2 (the reference is unchanged)
  dyn (optional): null | {causal}: a dynamic KV length. S is then the cache capacity and the argument `pos`
    (device int32 [1]) the number of tokens in the cache before this run; query row t sees key j iff
    j <= pos + t (causal) or j < pos + T (not causal). Keys no row sees (stale cache data) are never read;
    a row that sees none gets zeros.
  SIMT kernel: TQ, KW (queries and key segments per block), CL (optional, default 1: blocks of a cluster
    splitting the keys), k_aligned (optional: K's rows, of every source, are 16-byte aligned)
  tensor-core kernel: mma = {dtype, warps, bk, cl, q_regs, q_chunks, k_chunks, v_chunks}
    dtype       the operand type of Q, K, V and P (the reference rounds P to it)
    warps       warps per block, 16 query rows each; bk: keys per tile; cl: blocks of a cluster splitting the tiles
    q_regs      Q's mma fragments stay in registers, else they are re-read from shared memory at every key tile
    *_chunks    the view is copied by 16-byte cp.async (contiguous and aligned along the head dim), else by element
  oproj (optional, SIMT kernel, T = 1): {N, b: {dtype, quant?: "fp8"}, outs: 1 | 2} the o-projection fused in:
    the output O [BH * VD] is not stored; rounded to out_dtype, it is multiplied by W_o (stored [N, BH * VD],
    row-major; an fp8 W_o with its per-row scale w_o_scale [N]) and added into each of the float32 accumulators
    y0 [, y1] [N]: y += W_o O. Each cluster adds its head's products with atomics, so the accumulators must hold
    their starting values (the residual, a GEMV's a_mirror earlier in the list) and the sum's order varies.
  l2_next (optional) kernels/prefetch.py: later launches' weights to prefetch into L2
args: q, k, k1..k{n-1}, v, v1..v{n-1} (one per source), [pos], e0..e{n-1}, out (with oproj: w_o, [w_o_scale],
  y0, [y1] in place of out), [l2_next0, ...]
Both kernels call griddepcontrol (waiting before their first read), so they may be launched with programmatic
dependent launch."""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels import gemm_mma, prefetch
from flashrt.kernels.gemm import add_projection, epilogue_decls, projection_decls
from flashrt.kernels.dtypes import CTYPES, ITEMSIZE, from_f32, to_f32
from flashrt.kernels.memory import load, load_atoms, store
from flashrt.kernels.source import atoms_code

FAMILY = "attention"


SMS = 132  # multiprocessors of the GPU the grid is sized for (H100 / H200)
MIN_KEYS_PER_WARP = 16  # measured on an H200 (benchmarks/NOTES.md, v3)
MMA_MIN_T = 16  # one full 16-row mma tile; fewer queries stay with the SIMT kernel's decode path
MMA_MAX_DIM = 256  # larger head dims keep the SIMT kernel (the O accumulators would not fit in registers)
MMA_MAX_WARPS = 4  # per block, 16 query rows each
MAX_SOURCES = 8  # sources of one K or V operand (a pointer argument each)
MAX_OPROJ_ROWS = 16  # o-projection rows per thread of a fused o-projection (the rest stays a launch of its own)


def sources(p: dict, name: str) -> list[dict]:
    """The sources of operand "k" or "v" in key order, each {keys, bh, d, s}; an operand without `sources` is
    one source over all S keys."""
    view = p[name]
    if "sources" in view:
        return view["sources"]
    return [{"keys": p["S"], "bh": view["bh"], "d": view["d"], "s": view["s"]}]


def source_args(p: dict, name: str) -> list[str]:
    """The pointer arguments of operand "k" or "v", one per source: k, k1, k2, ..."""
    return [name] + [f"{name}{i}" for i in range(1, len(sources(p, name)))]


def _offsets(offset: int | list[int], n: int) -> list[int]:
    return [offset] * n if isinstance(offset, int) else list(offset)


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


def mma_config(p: dict, offsets: tuple = (0, 0, 0), hopper: bool = True) -> dict | None:
    """params["mma"] for the tensor-core kernel, or None where the SIMT kernel runs (see the module docstring).
    offsets: the element offsets of the Q, K^T and V views (for K and V, an int or one per source), which decide
    their 16-byte alignment; a multi-source view is copied by cp.async only if every source can be. hopper: every
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
    ks, vs = sources(p, "k"), sources(p, "v")
    return {"dtype": dtype, "warps": warps, "bk": bk, "cl": cl, "q_regs": hopper and HD // 4 + VD // 2 <= 128,
            "q_chunks": gemm_mma.chunked(q["d"], q["bh"] + q["t"], offsets[0], 8),
            "k_chunks": all(gemm_mma.chunked(x["d"], x["bh"] + x["s"], o, 8)
                            for x, o in zip(ks, _offsets(offsets[1], len(ks)))),
            "v_chunks": all(gemm_mma.chunked(x["d"], x["bh"] + x["s"], o, 8)
                            for x, o in zip(vs, _offsets(offsets[2], len(vs))))}


def mma_smem_bytes(p: dict) -> int:
    """Dynamic shared memory of the tensor-core kernel; mirrors AttnMmaShape in attention_mma.cuh."""
    c, HD, VD = p["mma"], p["HD"], p["VD"]
    bq, bk = 16 * c["warps"], c["bk"]
    tiles = max((bq * (HD + 8) + bk * (HD + 8) + bk * (VD + 8)) * 2, bq * (VD + 4) * 4)
    return tiles + (2 + c["cl"]) * bq * 4


def _key_rows(p: dict, name: str, j: str) -> list[tuple[int, str, dict]]:
    """(end key, C pointer to key j's row, source) for each source of operand "k" or "v"; key j lies in the
    first source whose end key is past it."""
    rows, start = [], 0
    for arg, src in zip(source_args(p, name), sources(p, name)):
        local = j if start == 0 else f"({j} - {start})"
        rows.append((start + src["keys"], f'g.{arg} + {atoms_code("(long)bh", src["bh"])} + '
                                          f'{atoms_code(f"(long){local}", src["s"])}', src))
        start += src["keys"]
    return rows


def _select(cases: list[tuple[int, str]], j: str) -> str:
    """C expression: the value of the first case whose end key is past key j."""
    code = cases[-1][1]
    for end, value in reversed(cases[:-1]):
        code = f"({j} < {end} ? {value} : {code})"
    return code


def _branch(cases: list[tuple[int, str]], j: str) -> str:
    """C statements: the block of the first case whose end key is past key j."""
    if len(cases) == 1:
        return cases[0][1]
    return " else ".join(f"if ({j} < {end}) {{\n{body}\n    }}" for end, body in cases[:-1]) \
        + f" else {{\n{cases[-1][1]}\n    }}"


def _same_dims(srcs: list[dict]) -> bool:
    return all(src["d"] == srcs[0]["d"] for src in srcs)


def _dot_body(p: dict, d_atoms: list) -> str:
    """Q.K over the head dim: 16-byte loads when every source's key rows are contiguous and aligned, else
    element loads (at d_atoms, the head dim of the source kr points into)."""
    k, hd, srcs = p["k"], p["HD"], sources(p, "k")
    vec = {"float32": 4, "bfloat16": 8, "float16": 8}.get(k["dtype"], 0)
    strides = [s for src in srcs for _, s in src["bh"] + src["s"]]
    if vec and all(src["d"] == [[hd, 1]] for src in srcs) and hd % vec == 0 and all(s % vec == 0 for s in strides) \
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
    for (int d = 0; d < HD; ++d) dot = fmaf(qv[d], to_float(kr[{atoms_code("(long)d", d_atoms)}]), dot);"""


def arg_spec(p: dict) -> list[tuple[str, str]]:
    pos = [("pos", "ptr")] if p.get("dyn") else []
    kv = [(name, "ptr") for name in source_args(p, "k") + source_args(p, "v")]
    args = [("q", "ptr")] + kv + pos + [(f"e{i}", "ptr") for i in range(len(p["epi_inputs"]))]
    oproj = p.get("oproj")
    if oproj:
        return args + [(name, "ptr") for _, name in projection_decls(oproj["b"], "w_o")] + \
            [(f"y{i}", "ptr") for i in range(oproj["outs"])] + prefetch.arg_spec(p)
    return args + [("out", "ptr")] + prefetch.arg_spec(p)


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
    v, vd, srcs = p["v"], p["VD"], sources(p, "v")
    vpl = -(-vd // 32)
    ctype = CTYPES[v["dtype"]]
    rows = _key_rows(p, "v", "j")
    row = _select([(end, ptr) for end, ptr, _ in rows], "j")
    nbytes = vpl * ITEMSIZE[v["dtype"]]
    strides = [s for src in srcs for _, s in src["bh"] + src["s"]]
    if all(src["d"] == [[vd, 1]] for src in srcs) and vd == 32 * vpl and nbytes in (4, 8, 16) \
            and all(s % vpl == 0 for s in strides):
        base = "g.v" if len(srcs) == 1 else "vr"  # the strides keep every row as aligned as its source's base
        body = f"""const {ctype}* vr = {row} + lane * VPL;
    if (reinterpret_cast<unsigned long>({base}) % {nbytes} == 0) {{
      const Pack<{ctype}, VPL> pk = *reinterpret_cast<const Pack<{ctype}, VPL>*>(vr);
#pragma unroll
      for (int i = 0; i < VPL; ++i) o[i] = to_float(pk.v[i]);
    }} else {{
#pragma unroll
      for (int i = 0; i < VPL; ++i) o[i] = to_float(vr[i]);
    }}"""
        return vpl, "lane * VPL + i", body

    def elements(ptr: str, d_atoms: list) -> str:
        return f"""const {ctype}* vr = {ptr};
#pragma unroll
    for (int i = 0; i < VPL; ++i) {{
      const int d = i * 32 + lane;
      o[i] = d < VD ? to_float(vr[{atoms_code("(long)d", d_atoms)}]) : 0.f;
    }}"""

    if _same_dims(srcs):
        return vpl, "i * 32 + lane", elements(row, srcs[0]["d"])
    return vpl, "i * 32 + lane", _branch([(end, elements(ptr, src["d"])) for end, ptr, src in rows], "j")


def _visible_code(p: dict) -> str:
    """C expression: how many keys (a prefix) query row t sees, given pos."""
    dyn = p.get("dyn")
    if not dyn:
        return "S"
    last = "(long)pos + t + 1" if dyn["causal"] else "(long)pos + T"
    return f"(int)min((long)S, max(0L, {last}))"


def can_prefetch(p: dict) -> bool:
    """Whether the SIMT kernel can stream its share of the cached keys and values into L2 before it waits for the
    previous kernel (param `prefetch`): a dynamic KV length, one source each for K and V, rows of 16-byte
    multiples, contiguous along the key axis."""
    if not p.get("dyn") or p.get("mma") or "sources" in p["k"] or "sources" in p["v"]:
        return False
    k, v, HD, VD = p["k"], p["v"], p["HD"], p["VD"]
    rows = (k["d"] == [[HD, 1]] and len(k["s"]) == 1 and k["s"][0][1] == HD and v["d"] == [[VD, 1]]
            and len(v["s"]) == 1 and v["s"][0][1] == VD)
    return rows and HD * ITEMSIZE[k["dtype"]] % 16 == 0 and VD * ITEMSIZE[v["dtype"]] % 16 == 0


def prefetches(p: dict) -> bool:
    return bool(p.get("prefetch")) and can_prefetch(p)


def _prefetch_body(p: dict) -> str:
    if not prefetches(p):
        return "(void)g; (void)bh; (void)j0; (void)j1;"
    k, v, HD, VD = p["k"], p["v"], p["HD"], p["VD"]
    spans = []
    for name, view, width in (("k", k, HD), ("v", v, VD)):
        row = width * ITEMSIZE[view["dtype"]]
        spans.append(f"l2_prefetch_span(g.{name} + {atoms_code('(long)bh', view['bh'])} + (long)j0 * {width}, "
                     f"(long)(j1 - j0) * {row});")
    return "if (j1 <= j0) return;\n    " + "\n    ".join(spans)


def _simt_members(p: dict) -> str:
    q, k = p["q"], p["k"]
    tk = CTYPES[k["dtype"]]
    vpl, dim, load_v = _value_dims(p)
    rows = _key_rows(p, "k", "j")
    if _same_dims(sources(p, "k")):
        dot = f"""const {tk}* kr = {_select([(end, ptr) for end, ptr, _ in rows], "j")};
{_dot_body(p, rows[0][2]["d"])}"""
    else:
        dot = _branch([(end, f"const {tk}* kr = {ptr};\n{_dot_body(p, src['d'])}") for end, ptr, src in rows], "j")
    return f"""template <typename U, int N> struct alignas(sizeof(U) * N) Pack {{ U v[N]; }};
  static constexpr int TQ = {p["TQ"]}, KW = {p["KW"]}, CL = {p.get("CL", 1)}, VPL = {vpl};
  __device__ static int dim(int lane, int i) {{ return {dim}; }}
  __device__ static float load_q(const Args& g, int bh, int t, int d) {{
    return to_float(g.q[{atoms_code("(long)bh", q["bh"])} + {atoms_code("(long)t", q["t"])}
                        + {atoms_code("(long)d", q["d"])}]);
  }}
  __device__ static void dot_qk(const Args& g, int bh, int j, const float* qv, float& dot) {{
    {dot}
  }}
  __device__ static void load_v(const Args& g, int bh, int j, int lane, float (&o)[VPL]) {{
    {load_v}
  }}
  static constexpr bool PREFETCH = {"true" if prefetches(p) else "false"};
  __device__ static void prefetch(const Args& g, int bh, int j0, int j1) {{  // keys [j0, j1) of K and V into L2
    {_prefetch_body(p)}
  }}"""


def _mma_members(p: dict) -> str:
    """The tensor-core kernel's shape and staging constants, and pointers to elements of Q, K and V (K and V: in
    the source holding the key, picked per key row)."""
    c, q = p["mma"], p["q"]

    def flag(x: bool) -> str:
        return "true" if x else "false"

    def at(view: dict, row_index: str, row: str) -> str:  # the kernel asks only for elements inside the view
        return " + ".join(atoms_code(f"(long){i}", view[x], in_range=True)
                          for i, x in (("bh", "bh"), (row, row_index), ("d", "d")))

    def ptr(name: str) -> str:
        cases, start = [], 0
        for arg, src in zip(source_args(p, name), sources(p, name)):
            cases.append((start + src["keys"], f"g.{arg} + {at(src, 's', 'j' if start == 0 else f'(j - {start})')}"))
            start += src["keys"]
        return _select(cases, "j")

    def s_inner(name: str) -> str:
        return flag(all(gemm_mma.inner_is(src["s"]) for src in sources(p, name)))

    return f"""using Elem = {CTYPES[c["dtype"]]};
  static constexpr int WARPS = {c["warps"]}, BK = {c["bk"]}, CL = {c["cl"]};
  static constexpr bool Q_REGS = {flag(c["q_regs"])};
  static constexpr bool Q_CHUNKS = {flag(c["q_chunks"])}, Q_T_INNER = {flag(gemm_mma.inner_is(q["t"]))};
  static constexpr bool K_CHUNKS = {flag(c["k_chunks"])}, K_S_INNER = {s_inner("k")};
  static constexpr bool V_CHUNKS = {flag(c["v_chunks"])}, V_S_INNER = {s_inner("v")};
  __device__ static const Elem* q_ptr(const Args& g, int bh, int t, int d) {{ return g.q + {at(q, "t", "t")}; }}
  __device__ static const Elem* k_ptr(const Args& g, int bh, int j, int d) {{ return {ptr("k")}; }}
  __device__ static const Elem* v_ptr(const Args& g, int bh, int j, int d) {{ return {ptr("v")}; }}"""


def cuda_source(p: dict, symbol: str) -> str:
    names = ["q"] + source_args(p, "k") + source_args(p, "v")
    types = [CTYPES[p[n[0]]["dtype"]] for n in names]
    fields = [f"const {t}* {n};" for t, n in zip(types, names)]
    params = [f"const {t}* __restrict__ {n}" for t, n in zip(types, names)]
    if p.get("dyn"):
        fields.append("const int* pos;")
        params.append("const int* __restrict__ pos")
        names.append("pos")
    oproj = p.get("oproj")
    out_type = CTYPES[p["out_dtype"]]
    # with oproj the output stays in the kernel: the o-projection's weight (and scale) and the accumulators instead
    outs = projection_decls(oproj["b"], "w_o") + [("float", f"y{i}") for i in range(oproj["outs"])] if oproj else None
    body_text, result = epilogue_decls(p, "out", fields, params, names, outs)
    params = params + prefetch.params(p)
    if oproj:
        cl, nt = p.get("CL", 1), 32 * p.get("TQ", 1) * p.get("KW", 1)
        if p.get("mma") or p["T"] != 1 or oproj["N"] % cl or p["VD"] * ITEMSIZE[oproj["b"]["dtype"]] % 16 \
                or -(-(oproj["N"] // cl) // nt) > MAX_OPROJ_ROWS:
            raise ValueError("attention: a fused o-projection (oproj) is generated for one query (SIMT kernel), N a "
                             f"multiple of CL, 16-byte weight rows, at most {MAX_OPROJ_ROWS} rows per thread")
        two = CTYPES[oproj["b"]["dtype"]]
        store_body = "(void)g; (void)bh; (void)t; (void)d; (void)x;"
        ys = ", ".join(f"g.y{i}" for i in range(oproj["outs"]))
        sizes = f"OPROJ_N = {oproj['N']}, OPROJ_K = {p['BH'] * p['VD']}, OPROJ_OUTS = {oproj['outs']}"
        oproj_members = f"""static constexpr int {sizes};
  using TWO = {two};
  __device__ static const TWO* oproj_weights(const Args& g) {{ return g.w_o; }}
  __device__ static float oproj_scale(const Args& g, int row) {{
    return {"g.w_o_scale[row]" if oproj["b"].get("quant") else "1.f"};
  }}
  __device__ static float* oproj_out(const Args& g, int k) {{ float* const y[] = {{{ys}}}; return y[k]; }}"""
    else:
        store_body = f"g.out[((long)bh * T + t) * VD + d] = from_float<{out_type}>(x);"
        oproj_members = """static constexpr int OPROJ_N = 0, OPROJ_K = 0, OPROJ_OUTS = 0;
  using TWO = bf16_t;
  __device__ static const TWO* oproj_weights(const Args&) { return nullptr; }
  __device__ static float oproj_scale(const Args&, int) { return 1.f; }
  __device__ static float* oproj_out(const Args&, int) { return nullptr; }"""
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
    {store_body}
  }}
  __device__ static float round_out(float x) {{ return to_float(from_float<{out_type}>(x)); }}
  {oproj_members}
}};
}}  // namespace

extern "C" __global__ void {cluster}__launch_bounds__({threads}) {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  {prefetch.code(p)}
  {template}<P>(g);
}}
'''


def reference(p: dict, args: dict) -> None:
    BH, T, S, HD, VD = p["BH"], p["T"], p["S"], p["HD"], p["VD"]
    q, k, v = p["q"], p["k"], p["v"]
    Q = load_atoms(args["q"], q["dtype"], list(q["bh"]) + list(q["t"]) + list(q["d"]), [BH, T, HD])
    Kt = np.concatenate([load_atoms(args[a], k["dtype"], list(x["bh"]) + list(x["d"]) + list(x["s"]),
                                    [BH, HD, x["keys"]]) for a, x in zip(source_args(p, "k"), sources(p, "k"))], axis=2)
    V = np.concatenate([load_atoms(args[a], v["dtype"], list(x["bh"]) + list(x["s"]) + list(x["d"]),
                                   [BH, x["keys"], VD]) for a, x in zip(source_args(p, "v"), sources(p, "v"))], axis=1)
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
    out = np.matmul(e * inv, V).astype(np.float32)
    oproj = p.get("oproj")
    if oproj is None:
        store(args["out"], p["out_dtype"], out)
        return
    o = to_f32(from_f32(out.reshape(BH * VD), p["out_dtype"]), p["out_dtype"])  # y += W_o O, O as the kernel rounds it
    add_projection(oproj["b"], args, "w_o", o, oproj["N"], [f"y{i}" for i in range(oproj["outs"])])
