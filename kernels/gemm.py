"""GEMM family: C[b, m, n] = epilogue(sum_k A'(b, m, k) B(b, k, n)) with an optional LayerNorm
prologue on A (over K) and an elementwise epilogue expression (bias, activation, residual, scale).

params:
  M, N, K         problem size; batch: the output's leading dims (numpy matmul broadcasting)
  a: {dtype, batch, m, k}   b: {dtype, batch, k, n}   operand views: for each index, (size, stride) atoms
                                                      that it is decomposed over (aot/views.py)
     b.quant: "fp8" | "nvfp4" (optional): a quantized weight stored [rows, K] (kernels/quant.py) with its
     scales as extra arguments after b (fp8: b_scale [rows]; nvfp4: b_block [rows, K/16], b_global [1])
  ln: null | {eps, has_beta, rms}      LayerNorm (or RMSNorm) of A's rows over K, gamma/beta float32 [K]
      ln.fold (optional, true): the norm folded for the wgmma kernel. The build multiplied gamma into the
      weight (B[k, n] = gamma[k] W[k, n], rounded to B's type), so A is multiplied unnormalized and
          C = epilogue(rstd[m] (acc - mean[m] colsum[n]) + bias[n])
      with each row's mean (0 for RMSNorm) and rstd = 1 / sqrt(var + eps) over K, colsum float32 [N] =
      sum_k B[k, n] of the stored B (LayerNorm only) and bias float32 [N] = beta . W (has_beta only); [2N]
      for a gated GEMM
  gated (optional, true): B holds [gate | up] (2N columns); the epilogue reads ["acc"] (gate) and ["acc", 1]
     (up) of each output (the GEMV kernel, or the wgmma kernel where M is larger)
  aq (optional): null | "tensor" | "row" | "nvfp4"   quantization of A' (after the norm) as the kernel stages
     it (kernels/quant.py): FP8 E4M3 with the static scale a_scale [1] (float32) or each row's max |A'| / 448;
     or NVFP4 with run-time E4M3 block scales per 16 values along K and the static global scale a_scale [1];
     the quantized values are multiplied and the float32 sums scaled back
  epi_inputs: [{dtype, atoms}]         extra epilogue tensors, atoms over batch + [M, N]
  expr: elementwise expression over ["acc"] and the epilogue inputs
  out_dtype: C's dtype, C contiguous over batch + [M, N]
  cache (optional, one-row GEMV only): fused KV-cache writes of flat output ranges (kernels/state.py)
  mirror (optional, true; gemv, not gated): C's values, as stored, also written as float32 to `mirror` (the
     accumulator a `down` GEMV adds into starts from the residual this kernel produces)
  a_mirror (optional, 1 or 2; one-row GEMV, not gated): A's row as read (before the norm) also written as float32
     to a_mirror0 [, a_mirror1] (the accumulators a fused attention + o-proj and MLP add into start from the
     residual this kernel reads)
  down (optional, one-row gated GEMV only): {N: N2, b: {dtype, quant?: "fp8"}} the down projection fused in:
     C is not stored; its values, rounded to out_dtype, are multiplied by W2 (stored [N2, N], N contiguous; an
     fp8 W2 with its per-row scale w2_scale [N2]) and added to y (float32 [N2], read and written):
         y[j] += sum_n C[0, n] * W2[j, n]
     Each block adds the products of its own C columns with atomics, so y must hold the residual beforehand
     (a `mirror` earlier in the launch list) and the sum's order varies between runs.
args: a, b, [b quant scales], [a_scale], [ln_gamma, [ln_beta]] or folded [ln_colsum], [ln_bias], e0..e{n-1},
  [a_mirror0, ...], [mirror], c, [cache_pos, cache0, ...]; with `down`, w2, [w2_scale], y in place of c; last
  [l2_next0, ...] (optional param l2_next, kernels/prefetch.py: later launches' weights to prefetch into L2)"""

import math

import numpy as np

from flashrt.kernels import expr as ex
from flashrt.kernels import gemm_mma, prefetch, state
from flashrt.kernels.dtypes import CTYPES, ITEMSIZE, from_f32, to_f32
from flashrt.kernels.memory import load, load_atoms, raw, store
from flashrt.kernels.quant import SCALED_ACT_QUANT, act_row_scales, dequant_fp8, dequant_nvfp4, fake_quant_act, \
    fake_quant_nvfp4_act
from flashrt.kernels.source import atoms_code

FAMILY = "gemm"


AQ_ID = {None: 0, "tensor": 1, "row": 2, "nvfp4": 3}
QUANT_ARGS = {"fp8": [("b_scale", "ptr")], "nvfp4": [("b_block", "ptr"), ("b_global", "ptr")]}


def arg_spec(p: dict) -> list[tuple[str, str]]:
    args = [("a", "ptr"), ("b", "ptr")] + QUANT_ARGS.get(p["b"].get("quant"), [])
    if p.get("aq") in SCALED_ACT_QUANT:
        args.append(("a_scale", "ptr"))
    ln = p["ln"]
    if ln and ln.get("fold"):
        args += ([] if ln.get("rms") else [("ln_colsum", "ptr")]) + ([("ln_bias", "ptr")] if ln["has_beta"] else [])
    elif ln:
        args.append(("ln_gamma", "ptr"))
        if ln["has_beta"]:
            args.append(("ln_beta", "ptr"))
    args += [(f"e{i}", "ptr") for i in range(len(p["epi_inputs"]))]
    if p.get("down"):
        return args + [(name, "ptr") for _, name in projection_decls(p["down"]["b"], "w2")] + [("y", "ptr")] + \
            prefetch.arg_spec(p)
    args += [(f"a_mirror{i}", "ptr") for i in range(p.get("a_mirror", 0))]
    return args + ([("mirror", "ptr")] if p.get("mirror") else []) + [("c", "ptr")] + state.cache_arg_spec(p) + \
        prefetch.arg_spec(p)


def tile(p: dict) -> tuple[int, int]:
    """(TM, TN): the largest per-thread tile that still gives about one block per multiprocessor (132)."""
    M, N, batch = p["M"], p["N"], math.prod(p["batch"])
    tm = 1 if M <= 16 else 2 if M <= 32 else 4
    tn = 4
    while tn > 1 and math.ceil(N / (16 * tn)) * math.ceil(M / (16 * tm)) * batch < 132:
        tn //= 2
    while tm > 1 and math.ceil(N / (16 * tn)) * math.ceil(M / (16 * tm)) * batch < 132:
        tm //= 2
    return tm, tn


def launch_config(p: dict) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    if p.get("mma"):
        return gemm_mma.launch_config(p)
    tm, tn = tile(p)
    grid = (math.ceil(p["N"] / (16 * tn)), math.ceil(p["M"] / (16 * tm)), math.prod(p["batch"]))
    return grid, (256, 1, 1), 0


def epilogue_decls(p: dict, out: str, fields: list, params: list, names: list,
                   outs: list[tuple[str, str]] | None = None) -> tuple[str, str]:
    """Append the epilogue inputs' and the outputs' declarations (outs: (ctype, name) pairs, by default the one
    output `out` of out_dtype); return the epilogue expression's CUDA statements (over `acc` and the linear output
    index `o`) and the name of its result."""
    for i, e in enumerate(p["epi_inputs"]):
        fields.append(f"const {CTYPES[e['dtype']]}* e{i};")
        params.append(f"const {CTYPES[e['dtype']]}* __restrict__ e{i}")
        names.append(f"e{i}")
    for ctype, name in outs or [(CTYPES[p["out_dtype"]], out)]:
        fields.append(f"{ctype}* {name};")
        params.append(f"{ctype}* __restrict__ {name}")
        names.append(name)
    loads = [f"to_float(g.e{i}[{atoms_code('o', e['atoms'])}])" for i, e in enumerate(p["epi_inputs"])]
    body, result = ex.emit(p["expr"], lambda k: loads[k], acc="acc")
    return "\n    ".join(body), result


def problem_struct(p: dict, kind: str) -> tuple[str, list[str], list[str]]:
    """The generated `struct P` a GEMM template (gemm.cuh's gemm_tile, gemv.cuh's gemv) instantiates: shapes,
    strided dtype-converting loads, the norm prologue's parameters and the epilogue; plus the kernel's
    parameter declarations and the names that initialize P::Args from them."""
    M, N, K = p["M"], p["N"], p["K"]
    a, b, ln = p["a"], p["b"], p["ln"]
    fold = bool(ln and ln.get("fold"))
    if fold and not (kind == "mma" and p["mma"].get("wgmma")):
        raise ValueError("gemm: a folded norm (ln.fold) runs only in the wgmma kernel")
    fields = [f"const {CTYPES[a['dtype']]}* a;", f"const {CTYPES[b['dtype']]}* b;"]
    params = [f"const {CTYPES[a['dtype']]}* __restrict__ a", f"const {CTYPES[b['dtype']]}* __restrict__ b"]
    names = ["a", "b"]
    quant = b.get("quant")
    for name, _ in QUANT_ARGS.get(quant, []):
        ctype = "unsigned char" if name == "b_block" else "float"
        fields.append(f"const {ctype}* {name};")
        params.append(f"const {ctype}* __restrict__ {name}")
        names.append(name)
    aq = p.get("aq")
    fields.append("const float* a_scale;")
    if aq in SCALED_ACT_QUANT:
        params.append("const float* __restrict__ a_scale")
        names.append("a_scale")
    else:
        names.append("nullptr")
    if fold:
        fields += ["const float* colsum;", "const float* bias;"]
        for name, present in (("ln_colsum", not ln.get("rms")), ("ln_bias", ln["has_beta"])):
            if present:
                params.append(f"const float* __restrict__ {name}")
            names.append(name if present else "nullptr")
    elif ln:
        fields += ["const float* gamma;", "const float* beta;"]
        params.append("const float* __restrict__ ln_gamma")
        names.append("ln_gamma")
        if ln["has_beta"]:
            params.append("const float* __restrict__ ln_beta")
            names.append("ln_beta")
        else:
            names.append("nullptr")
    if p.get("down"):  # C stays in the kernel; the down projection's weight (and scale) and the accumulator y
        outs = projection_decls(p["down"]["b"], "w2") + [("float", "y")]
    else:
        outs = [("float", f"a_mirror{i}") for i in range(p.get("a_mirror", 0))] + \
            ([("float", "mirror")] if p.get("mirror") else []) + [(CTYPES[p["out_dtype"]], "c")]
    body_text, result = epilogue_decls(p, "c", fields, params, names, outs)
    out_type = CTYPES[p["out_dtype"]]
    if p.get("cache"):  # fused KV-cache writes (gemv, one row: kernels/state.py)
        if kind != "gemv" or p["M"] != 1:
            raise ValueError("gemm: fused cache writes (cache) are generated for one-row GEMVs only")
        decls = state.cache_params(p, out_type)
        params += decls
        fields += [d.replace(" __restrict__", "") + ";" for d in decls]
        names += ["cache_pos"] + [f"cache{j}" for j in range(len(p["cache"]))]
    if (p.get("down") or p.get("mirror") or p.get("a_mirror")) and (
            kind != "gemv" or p["M"] != 1 or bool(p.get("down")) != bool(p.get("gated"))):
        raise ValueError("gemm: mirror, a_mirror (not gated) and down (gated) are generated for one-row GEMVs only")
    if p.get("down"):
        J = (8 // p["S"]) * (p["R"] // 2)  # the values of C a block multiplies by W2 (gemv.cuh step 5)
        if N % J or J * ITEMSIZE[p["down"]["b"]["dtype"]] % 8:
            raise ValueError(f"gemm: a fused down projection needs N = {N} to be a multiple of the {J} values per "
                             "block, and their weights in 8-byte multiples")
    cache_stores = state.cache_store_code(p, "o", "r", "g.")
    eps = ex.c_float(ln["eps"]) if ln else "0.f"
    row_scale = {"fp8": "g.b_scale[row]", "nvfp4": "g.b_global[0]"}.get(quant, "1.f")
    quant_id = {"fp8": 1, "nvfp4": 2}.get(quant, 0)
    block_scale = f"e4m3_to_float(g.b_block[(long)row * {K // 16} + kb])" if quant == "nvfp4" else "1.f"
    if kind == "mma":
        shape, operand_loads = gemm_mma.members(p)
    elif kind == "tile":
        tm, tn = tile(p)
        k_contig = "true" if b["k"] == [[K, 1]] else "false"
        shape = (f"static constexpr int M = {M}, N = {N}, K = {K}, TM = {tm}, TN = {tn};\n"
                 f"  static constexpr bool B_K_CONTIG = {k_contig};")
        operand_loads = f"""__device__ static float load_a(const Args& g, int bat, int m, int k) {{
    return to_float(g.a[{atoms_code("(long)bat", a["batch"])} + {atoms_code("(long)m", a["m"])}
                        + {atoms_code("(long)k", a["k"])}]);
  }}
  __device__ static float load_b(const Args& g, int bat, int k, int n) {{
    {_tile_load_b(b, K)}
  }}"""
    else:
        down = p.get("down") or {"N": 0, "b": {"dtype": "float32"}}
        a_mirror_code = " ".join(f"g.a_mirror{i}[k] = v;" for i in range(p.get("a_mirror", 0))) \
            or "(void)g; (void)k; (void)v;"
        w2 = CTYPES[down["b"]["dtype"]]
        shape = (f"static constexpr int M = {M}, N = {N}, K = {K}, R = {p['R']}, S = {p['S']};\n"
                 f"  static constexpr bool GATED = {'true' if p.get('gated') else 'false'};\n"
                 f"  using TW = {CTYPES[b['dtype']]};\n"
                 f"  static constexpr int DOWN_N = {down['N']};  // the fused down projection's rows (0: none)\n"
                 f"  using TW2 = {w2};")
        operand_loads = f"""__device__ static float load_a(const Args& g, int m, int k) {{
    return to_float(g.a[{atoms_code("(long)m", a["m"])} + {atoms_code("(long)k", a["k"])}]);
  }}
  __device__ static const TW* weights(const Args& g) {{ return g.b; }}
  __device__ static const TW2* down_weights(const Args& g) {{ return {"g.w2" if p.get("down") else "nullptr"}; }}
  __device__ static float down_scale(const Args& g, int row) {{
    return {"g.w2_scale[row]" if p.get("down", {}).get("b", {}).get("quant") else "1.f"};
  }}
  __device__ static float* down_out(const Args& g) {{ return {"g.y" if p.get("down") else "nullptr"}; }}
  static constexpr int A_MIRRORS = {p.get("a_mirror", 0)};
  __device__ static void a_mirror(const Args& g, int k, float v) {{ {a_mirror_code} }}"""
    value = "" if kind != "mma" else f"""
  __device__ static float value(const Args& g, int bat, int m, int n, float acc, float acc1 = 0.f) {{  // unstored
    const long o = ((long)bat * M + m) * N + n;
    {body_text}
    return {result};
  }}"""
    if p.get("down"):  # C's value as the down projection reads it (stored nowhere)
        store = "(void)g; (void)o;"
        value = f"""
  __device__ static float hidden(const Args& g, int m, int n, float acc, float acc1) {{
    const long o = (long)m * N + n;
    {body_text}
    return to_float(from_float<{out_type}>({result}));
  }}"""
    else:
        store = f"const {out_type} r = from_float<{out_type}>({result});\n    g.c[o] = r;" + \
            ("\n    g.mirror[o] = to_float(r);" if p.get("mirror") else "") + f"\n    {cache_stores}"
    unfolded = bool(ln) and not fold
    gamma, beta = ("g.gamma[k]" if unfolded else "1.f"), ("g.beta[k]" if unfolded and ln["has_beta"] else "0.f")
    colsum = "g.colsum[n]" if fold and not ln.get("rms") else "0.f"
    bias = "g.bias[n]" if fold and ln["has_beta"] else "0.f"
    struct = f'''namespace {{
struct P {{
  struct Args {{ {" ".join(fields)} }};
  {shape}
  static constexpr bool LN = {"true" if ln and not fold else "false"};
  static constexpr bool RMS = {"true" if ln and ln.get("rms") else "false"};
  static constexpr int NORM_FOLD = {(1 if ln.get("rms") else 2) if fold else 0};  // 1 RMSNorm, 2 LayerNorm folded
  static constexpr float EPS = {eps};
  {operand_loads}
  static constexpr int QUANT = {quant_id};
  static constexpr int AQ = {AQ_ID[aq]};  // A quantization: 0 none, 1 FP8 per tensor, 2 FP8 per row, 3 NVFP4
  __device__ static float a_scale(const Args& g) {{ return {"g.a_scale[0]" if aq in SCALED_ACT_QUANT else "1.f"}; }}
  __device__ static float row_scale(const Args& g, int row) {{ return {row_scale}; }}
  __device__ static float block_scale(const Args& g, int row, int kb) {{ return {block_scale}; }}
  __device__ static float ln_gamma(const Args& g, int k) {{ return {gamma}; }}
  __device__ static float ln_beta(const Args& g, int k) {{ return {beta}; }}
  __device__ static float fold_colsum(const Args& g, int n) {{ return {colsum}; }}
  __device__ static float fold_bias(const Args& g, int n) {{ return {bias}; }}
  __device__ static void epilogue(const Args& g, int bat, int m, int n, float acc, float acc1 = 0.f) {{
    const long o = ((long)bat * M + m) * N + n;
    {body_text}
    {store}
  }}{value}
}};
}}  // namespace
'''
    return struct, params + prefetch.params(p), names


def _tile_load_b(b: dict, K: int) -> str:
    """The tiled kernel's B element (k, n): a view's element, or a quantized weight's dequantized value."""
    if b.get("quant") == "fp8":
        return f"return e4m3_to_float(g.b[(long)n * {K} + k].x) * g.b_scale[n];"
    if b.get("quant") == "nvfp4":
        return (f"const unsigned byte = g.b[(long)n * {K // 2} + k / 2].x;\n"
                f"    return e2m1_to_float((k & 1) ? byte >> 4 : byte & 15u) * "
                f"e4m3_to_float(g.b_block[(long)n * {K // 16} + k / 16]) * g.b_global[0];")
    return (f'return to_float(g.b[{atoms_code("(long)bat", b["batch"])} + {atoms_code("(long)k", b["k"])}\n'
            f'                        + {atoms_code("(long)n", b["n"])}]);')


def cuda_source(p: dict, symbol: str) -> str:
    if p.get("mma"):
        struct, params, names = problem_struct(p, "mma")
        split = p["mma"]["split"]
        cluster = f" __cluster_dims__(1, 1, {split})" if split > 1 else ""
        threads = gemm_mma.WARP_GROUP * p["mma"].get("wg", 1)
        if p["mma"].get("wgmma"):  # sm_90a warp-group MMA (kernels/cuda/gemm_wgmma.cuh)
            return f'''#include "gemm_wgmma.cuh"

{struct}
extern "C" __global__ void __launch_bounds__({threads}, 1){cluster} {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  {prefetch.code(p)}
  gemm_wgmma<P>(g);
}}
'''
        return f'''#include "gemm_mma.cuh"

{struct}
extern "C" __global__ void __launch_bounds__({threads}){cluster} {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  {prefetch.code(p)}
  gemm_mma<P>(g);
}}
'''
    struct, params, names = problem_struct(p, "tile")
    return f'''#include "gemm.cuh"

{struct}
extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  {prefetch.code(p)}
  gemm_tile<P>(g);
}}
'''


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_f32(from_f32(x, dtype), dtype)


def reference(p: dict, args: dict) -> None:
    M, N, K, batch = p["M"], p["N"], p["K"], list(p["batch"])
    a, b, ln = p["a"], p["b"], p["ln"]
    A = load_atoms(args["a"], a["dtype"], list(a["batch"]) + list(a["m"]) + list(a["k"]), batch + [M, K])
    for i in range(p.get("a_mirror", 0)):  # A's row as read, before the norm (one-row GEMVs)
        store(args[f"a_mirror{i}"], "float32", A.reshape(-1))
    fold = None
    if ln and ln.get("fold"):  # statistics now, applied to the sums (the kernel's formula: E[x^2] - mean^2)
        mean = np.zeros(A.shape[:-1] + (1,), np.float32) if ln.get("rms") else A.mean(axis=-1, keepdims=True,
                                                                                  dtype=np.float32)
        var = np.maximum(np.square(A).mean(axis=-1, keepdims=True, dtype=np.float32) - mean * mean, 0)
        fold = (mean, np.float32(1) / np.sqrt(var + np.float32(ln["eps"])))
    elif ln:
        mean = np.float32(0) if ln.get("rms") else A.mean(axis=-1, keepdims=True, dtype=np.float32)
        var = np.square(A - mean).mean(axis=-1, keepdims=True, dtype=np.float32)
        A = (A - mean) * (np.float32(1) / np.sqrt(var + np.float32(ln["eps"])))
        A = A * load(args["ln_gamma"], "float32", [K])
        if ln["has_beta"]:
            A = A + load(args["ln_beta"], "float32", [K])
    aq = p.get("aq")
    if aq == "nvfp4":
        A = fake_quant_nvfp4_act(A, load(args["a_scale"], "float32", [1])[0])
    elif aq:
        scale = load(args["a_scale"], "float32", [1])[0] if aq == "tensor" else act_row_scales(A)
        A = fake_quant_act(A, scale)
    width = 2 * N if p.get("gated") else N  # a gated GEMM computes [gate | up] and combines the halves
    # The tensor-core path multiplies A' and B rounded to its operand type; a quantized B enters decoded
    # exactly (fp8: the E4M3 values; nvfp4: E2M1 x block scale) and its per-row / global scale multiplies
    # the f32 sum.
    mma = p["mma"]["dtype"] if p.get("mma") else None
    scale = None
    if b.get("quant") == "fp8":
        row = load(args["b_scale"], "float32", [width])
        W = dequant_fp8(raw(args["b"], width * K).reshape(width, K), np.ones_like(row) if mma else row)
        B, scale = np.broadcast_to(W.T, batch + [K, width]), row
    elif b.get("quant") == "nvfp4":
        packed = raw(args["b"], width * K // 2).reshape(width, K // 2)
        block = raw(args["b_block"], width * K // 16).reshape(width, K // 16)
        g = np.float32(load(args["b_global"], "float32", [1])[0])
        W = dequant_nvfp4(packed, block, 1.0 if mma else float(g))
        B, scale = np.broadcast_to(W.T, batch + [K, width]), g
    else:
        B = load_atoms(args["b"], b["dtype"], list(b["batch"]) + list(b["k"]) + list(b["n"]), batch + [K, width])
    if mma:  # quantized operands enter exactly: FP8 activations as E4M3 values times their (applied) scale
        A, B = (A if aq else _round(A, mma)), (B if b.get("quant") else _round(B, mma))
    acc = np.matmul(A.astype(np.float32), B).astype(np.float32)
    if mma and scale is not None:
        acc = (acc * scale).astype(np.float32)
    if fold is not None:  # a gated GEMM's gate and up columns alike (colsum and bias over all 2N)
        mean, rstd = fold
        if not ln.get("rms"):
            acc = acc - mean * load(args["ln_colsum"], "float32", [width])
        acc = (rstd * acc).astype(np.float32)
        if ln["has_beta"]:
            acc = (acc + load(args["ln_bias"], "float32", [width])).astype(np.float32)
    if p.get("gated"):
        acc = (np.ascontiguousarray(acc[..., :N]), np.ascontiguousarray(acc[..., N:]))
    out_shape = batch + [M, N]
    inputs = [load_atoms(args[f"e{i}"], e["dtype"], e["atoms"], out_shape) for i, e in enumerate(p["epi_inputs"])]
    result = np.broadcast_to(ex.evaluate(p["expr"], inputs, acc), out_shape)
    stored = to_f32(from_f32(np.asarray(result, np.float32), p["out_dtype"]), p["out_dtype"])
    if p.get("down"):
        add_projection(p["down"]["b"], args, "w2", stored.reshape(N), p["down"]["N"], ["y"])
        return
    store(args["c"], p["out_dtype"], result)
    if p.get("mirror"):
        store(args["mirror"], "float32", stored)
    state.cache_store_reference(p, args, result, p["out_dtype"])


def projection_decls(b: dict, name: str) -> list[tuple[str, str]]:
    """(ctype, name) of a fused projection's weight argument and, for fp8, its per-row scale `{name}_scale`."""
    return [(f"const {CTYPES[b['dtype']]}", name)] + ([("const float", f"{name}_scale")] if b.get("quant") else [])


def add_projection(b: dict, args: dict, name: str, x: np.ndarray, N: int, outs: list[str]) -> None:
    """out += W x for each float32 accumulator in outs: the reference of a projection fused into another kernel
    (gemv `down`, attention `oproj`), W [N, len(x)] the argument `name` (fp8: with its scale `{name}_scale`)."""
    K = x.shape[0]
    if b.get("quant") == "fp8":
        W = dequant_fp8(raw(args[name], N * K).reshape(N, K), load(args[f"{name}_scale"], "float32", [N]))
    else:
        W = load(args[name], b["dtype"], [N, K])
    add = np.matmul(W.astype(np.float32), x).astype(np.float32)
    for out in outs:
        store(args[out], "float32", (load(args[out], "float32", [N]) + add).astype(np.float32))
