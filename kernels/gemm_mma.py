"""The tensor-core path of the GEMM family (kernels/cuda/gemm_mma.cuh): how each operand is staged, the tile
shape, split-K and pipeline depth, chosen per problem by a small cost model of a 132-SM GPU, and the
generated struct members the template reads.

params["mma"] = {dtype, bm, bn, split, stages, wg, a_mode, b_mode, b_const}:
  dtype      the mma operand type: "bfloat16" | "float16" (the reference rounds A' and B' to it), or "e4m3"
             (FP8 activations, params["aq"], times an fp8 weight: both exact, mma.sync m16n8k32)
  bm, bn     block tile (BK = 64); split: blocks of one cluster sharing a tile's K (1..8)
  wg         warp groups of 4 warps (1 or 2) that take turns over a tile's k-steps
  a_mode     0 cp.async chunks, 1 norm prologue on a shared-memory A panel, 2 element loads
  b_mode     0 cp.async chunks, 1 fp8, 2 nvfp4 (raw bytes decoded in shared memory), 3 element loads
  b_const    B is a constant weight: its first tiles load before the kernel waits for its predecessor
  wgmma      (optional, true) the sm_90a warp-group MMA kernel (kernels/cuda/gemm_wgmma.cuh) instead of
             mma.sync: a_mode 0, b_mode 0 (or 1: an fp8 weight, FLASHRT_WGMMA_FP8=0: not; 2: an nvfp4
             weight, opt-in FLASHRT_WGMMA_NVFP4=1), a norm only folded
             (ln.fold, kernels/gemm.py), no activation quantization, and gated GEMMs (only there); bm = 64 wg
             (wg warp groups stacked along M), bn 64 / 128, stages >= 3. Used wherever it applies when every target is
             sm_90a (FLASHRT_WGMMA=0 turns it off: aot/targets.py)"""

import itertools
import math

from flashrt.kernels.dtypes import CTYPES, ITEMSIZE
from flashrt.kernels.source import atoms_code

OPERAND_DTYPES = ("bfloat16", "float16")
MMA_DTYPES = OPERAND_DTYPES + ("e4m3",)
BK = 64
WARP_GROUP = 128  # threads
# Split-K cluster sizes: powers of two up to the portable cluster size 8. A cluster's blocks share a GPC (about
# 16 SMs on an H100 / H200): sizes 3, 5, 6 leave SMs idle and measured 20-60% slower than 2, 4, 8.
SPLITS = (1, 2, 4, 8)
# Dynamic shared memory per block: below every target's opt-in limit (sm_120: 99 KB), with room for the
# kernel's static arrays.
SMEM_CAP = 96 * 1024
SMEM_PER_SM = 228 * 1024
TILES = [(16, 64), (16, 128), (32, 32), (32, 64), (32, 128), (64, 32), (64, 64), (64, 128), (128, 32), (128, 64)]
VALUE_BITS = {"fp8": 8, "nvfp4": 4}

# Cost model of the target GPU (H100 / H200 class), fitted to kernel timings on an H200 (benchmarks/gemm_sweep.py).
# A lone 4-warp block is latency-bound: a k-step costs its tensor work or its bytes at per-block rates, whichever
# is larger; blocks resident together on a multiprocessor overlap up to its throughput; a second warp group
# hides part of the latency. Per block: a fixed cost (launch, pipeline fill, epilogue), a cluster's, outputs.
SMS = 132
TC_FLOPS_PER_BLOCK = 1e12
SM_BYTES_PER_BLOCK = 80e9
TC_FLOPS_PER_SM = 5e12
SM_BYTES_PER_SM = 100e9
WG2_GAIN = 1.2  # latency-bound k-step speedup of two warp groups
KSTEP_FIXED_S = 0.03e-6
BLOCK_FIXED_S = 1.5e-6
CLUSTER_FIXED_S = 2e-6
OUTPUTS_PER_S = 2e9  # epilogue outputs per second of a block
DECODE_VALUES_PER_S = 2.4e10  # quantized values a block decodes into shared memory per second


def chunked(k_atoms: list, other_atoms: list, offset: int, vec: int) -> bool:
    """Whether every `vec` consecutive k of the view are contiguous and 16-byte aligned: the last k atom has
    stride 1 and a size divisible by vec, every other stride and the offset are multiples of vec."""
    if not k_atoms or k_atoms[-1][1] != 1 or k_atoms[-1][0] % vec:
        return False
    return offset % vec == 0 and all(st % vec == 0 for _, st in list(k_atoms[:-1]) + list(other_atoms))


def inner_is(atoms: list) -> bool:
    return bool(atoms) and atoms[-1][1] == 1


def staging(p: dict, a_offset: int, b_offset: int, dtype: str) -> tuple[bool, int]:
    """(A can be copied in 16-byte chunks, b_mode) for the params of a GEMM with operand type dtype."""
    a, b, K = p["a"], p["b"], p["K"]
    a_chunks = a["dtype"] == dtype and K % 8 == 0 and chunked(a["k"], a["m"] + a["batch"], a_offset, 8)
    quant = b.get("quant")
    if quant == "fp8":
        b_mode = 1 if K % 16 == 0 and b_offset % 16 == 0 else 3
    elif quant == "nvfp4":
        b_mode = 2 if K % 64 == 0 and b_offset % 16 == 0 else 3
    elif b["dtype"] == dtype and K % 8 == 0 and chunked(b["k"], b["n"] + b["batch"], b_offset, 8):
        b_mode = 0
    else:
        b_mode = 3
    return a_chunks, b_mode


def smem_bytes(K: int, bm: int, bn: int, split: int, stages: int, a_mode: int, b_mode: int, wg: int = 1,
               fp8: bool = False) -> int:
    """Dynamic shared memory of a configuration; mirrors MmaShape in gemm_mma.cuh."""
    lds, kts = BK + 8, math.ceil(math.ceil(K / BK) / split)
    lds8 = BK + 16
    a_elems = bm * (kts * BK + 8) if a_mode == 1 else 0 if fp8 and a_mode == 2 else stages * bm * lds
    b_elems = 0 if fp8 else stages * bn * lds
    a8 = 0 if not fp8 else bm * (kts * BK + 16) if a_mode == 1 else stages * bm * lds8
    raw = {1: bn * (lds8 if fp8 else BK), 2: bn * BK // 32 * (16 + 4)}.get(b_mode, 0)
    return max((a_elems + b_elems) * 2 + stages * raw + a8, wg * bm * (bn + 8) * 4)


def estimate(p: dict, c: dict) -> float:
    """Modelled seconds of one launch of configuration c: the busiest multiprocessor's waves of resident blocks."""
    M, N, K, nb = p["M"], p["N"], p["K"], math.prod(p["batch"])
    bm, bn, split, wg = c["bm"], c["bn"], c["split"], c.get("wg", 1)
    kts = math.ceil(math.ceil(K / BK) / split)
    blocks = math.ceil(M / bm) * math.ceil(N / bn) * nb * split
    fp8 = c["dtype"] == "e4m3"
    smem = smem_bytes(K, bm, bn, split, c["stages"], c["a_mode"], c["b_mode"], wg, fp8)
    # blocks resident together; norm-panel blocks measured no overlap (their panel load, statistics and
    # cluster barriers serialize), so they count as one at a time
    resident = 1 if c["a_mode"] == 1 else max(1, min(16 // (4 * wg), SMEM_PER_SM // (smem + 2048)))
    per_sm = math.ceil(blocks / SMS)
    together = min(per_sm, resident)
    a_item = ITEMSIZE[p["a"]["dtype"]]
    b_bits = VALUE_BITS.get(p["b"].get("quant"), 8 * ITEMSIZE[p["b"]["dtype"]])
    a_bytes = min(bm, M) * BK * a_item * (4 if c["a_mode"] == 2 else 1)  # element loads: a quarter of the rate
    b_bytes = min(bn, N) * BK * b_bits / 8 * (4 if c["b_mode"] == 3 else 1)
    flops = 2 * bm * bn * BK
    t_lat = max(flops / TC_FLOPS_PER_BLOCK, (a_bytes + b_bytes) / SM_BYTES_PER_BLOCK) / (WG2_GAIN if wg == 2 else 1)
    t_thr = together * max(flops / TC_FLOPS_PER_SM, (a_bytes + b_bytes) / SM_BYTES_PER_SM)
    t_step = max(t_lat, t_thr) + KSTEP_FIXED_S
    if c["b_mode"] == 2 or (c["b_mode"] == 1 and not fp8):  # weights decoded into the shared T tile
        t_step += together * bn * BK / DECODE_VALUES_PER_S / wg
    if p.get("aq"):  # A' quantized to E4M3 as it is staged
        t_step += together * bm * BK / DECODE_VALUES_PER_S / wg
    t_wave = kts * t_step + together * bm * bn / split / OUTPUTS_PER_S + BLOCK_FIXED_S
    if c["a_mode"] == 1 or (c["a_mode"] == 2 and p["ln"]):  # the panel, or the statistics pass, before k-step 1
        t_wave += together * a_bytes * kts / SM_BYTES_PER_SM
    return math.ceil(per_sm / together) * t_wave + (CLUSTER_FIXED_S if split > 1 else 0.0)


# ---- the wgmma kernel (sm_90a). Tiles, splits and stages from benchmarks/wgmma_probe_h200_2026-12-02.json: the
# best config per shape filled the 132 SMs in one wave (80-128 blocks: expert qkv BN128 SK4, o / down BN64 SK8,
# gate/up BN64 SK1; ViT qkv BM128 BN128 SK3, o BM64 BN128 SK4, fc1 BM128 BN128, fc2 BM128 BN128 SK8); the rule in
# wgmma_config reproduces 7 of those 8 (gate/up: BN128 SK2, 7.9 us measured vs 6.8 for BN64 ST8).
WGMMA_TILES = [(64, 64), (64, 128), (128, 64), (128, 128)]
WGMMA_SPLITS = (1, 2, 3, 4, 8)  # cluster size 3 was the best ViT qkv split in the probe
WGMMA_SMEM_CAP = 200 * 1024  # of sm_90's 227 KB per block
WGMMA_MAX_STAGES = 8


def wgmma_smem_bytes(bm: int, bn: int, stages: int, b_mode: int = 0) -> int:
    """Dynamic shared memory of the wgmma kernel; mirrors WgmmaShape in gemm_wgmma.cuh (+ 1024: ring alignment;
    b_mode 1 / 2: each stage also holds the fp8 / nvfp4 rows as stored, nvfp4's with their block scales)."""
    raw = {1: bn * BK, 2: -(-bn * (BK // 2 + 4) // 1024) * 1024}.get(b_mode, 0)
    stage = (bm + bn) * BK * 2 + raw
    return max(stages * stage, bm * (bn + 8) * 4) + 1024


def out_bn(p: dict, bn: int) -> int:
    """Outputs per block along N: a gated GEMM's BN tile columns are BN / 2 gate rows and their up rows."""
    return bn // 2 if p.get("gated") else bn


def wgmma_config(p: dict, a_offset: int, b_offset: int, dtype: str, b_const: bool = False,
                 fp8_weights: bool = False, nvfp4_weights: bool = False) -> dict | None:
    """The wgmma configuration, or None where that kernel does not apply (16-bit A and B by 16-byte chunks, a
    norm only folded into B, no activation quantization; gated: BN / 2 outputs per block; fp8_weights: an fp8
    B (b_mode 1) too, decoded in shared memory; aot/targets.py wgmma_fp8_enabled; nvfp4_weights: an nvfp4 B
    (b_mode 2) likewise, opt-in: wgmma_nvfp4_enabled). Rule: the most blocks
    that still fit one wave of the 132 SMs; ties: the least padding, the larger tile, the smaller split, the wider
    BN. Past one wave: no split, the least padding, the largest tile."""
    if dtype not in OPERAND_DTYPES or (p["ln"] and not p["ln"].get("fold")) or p.get("aq"):
        return None
    a_chunks, b_mode = staging(p, a_offset, b_offset, dtype)
    if not a_chunks or not (b_mode == 0 or (b_mode == 1 and fp8_weights) or (b_mode == 2 and nvfp4_weights)):
        return None
    M, N, K, nb = p["M"], p["N"], p["K"], math.prod(p["batch"])
    kt = math.ceil(K / BK)
    best = None
    for bm, bn in WGMMA_TILES:
        if (bm == 128 and M <= 64) or math.ceil(M / bm) > 65535:
            continue
        for split in WGMMA_SPLITS:
            if split > 1 and (kt % split or kt // split < 2) or nb * split > 65535:
                continue
            blocks = math.ceil(M / bm) * math.ceil(N / out_bn(p, bn)) * nb * split
            kts = math.ceil(kt / split)
            stages = max(s for s in range(3, WGMMA_MAX_STAGES + 1)
                         if s == 3 or (s <= kts + 2 and wgmma_smem_bytes(bm, bn, s, b_mode) <= WGMMA_SMEM_CAP))
            one_wave = blocks <= SMS
            if not one_wave and split > 1:
                continue
            padded = math.ceil(M / bm) * bm * math.ceil(N / out_bn(p, bn)) * bn
            key = (not one_wave, -blocks if one_wave else 0, padded, -bm * bn, split, -bn)
            if best is None or key < best[0]:
                best = (key, {"dtype": dtype, "bm": bm, "bn": bn, "split": split, "stages": stages, "wg": bm // 64,
                              "a_mode": 0, "b_mode": b_mode, "b_const": b_const or b_mode in (1, 2),
                              "wgmma": True})
    return best[1] if best else None


def config(p: dict, a_offset: int, b_offset: int, dtype: str, b_const: bool = False,
           fp8_mma: bool = False, clusters: bool = True, wgmma: bool = False, wgmma_fp8: bool = False,
           wgmma_nvfp4: bool = False) -> dict | None:
    """The cheapest configuration by the cost model, or None where the tensor-core path does not apply
    (operand type not 16-bit, a grid beyond CUDA's limits). b_const: B is a constant weight, so the kernel
    may prefetch it before waiting for the previous kernel (programmatic dependent launch). fp8_mma: every
    target has E4M3 mma.sync (sm_89+), so FP8 activations times an fp8 weight multiply as E4M3. clusters:
    every target has thread-block clusters (sm_90+), which split-K reduces through. wgmma: every target is
    sm_90a and the wgmma kernel is enabled (aot/targets.py wgmma_enabled): it is used where it applies."""
    if dtype not in OPERAND_DTYPES:
        return None
    if p.get("gated") or (p["ln"] and p["ln"].get("fold")):  # only the wgmma kernel has these
        return wgmma_config(p, a_offset, b_offset, dtype, b_const, wgmma_fp8, wgmma_nvfp4) if wgmma else None
    if wgmma and (c := wgmma_config(p, a_offset, b_offset, dtype, b_const, wgmma_fp8, wgmma_nvfp4)):
        return c
    M, N, K, nb = p["M"], p["N"], p["K"], math.prod(p["batch"])
    a_chunks, b_mode = staging(p, a_offset, b_offset, dtype)
    fp8 = fp8_mma and p.get("aq") in ("tensor", "row") and p["b"].get("quant") == "fp8" and b_mode == 1
    kt = math.ceil(K / BK)
    best = None
    # a norm prologue or per-row FP8 scales need A's whole rows first: the panel (a_mode 1) wherever it fits,
    # element loads (2) only where it never does
    whole_rows = bool(p["ln"]) or p.get("aq") == "row"
    for a_mode in ([1, 2] if whole_rows and a_chunks else [2] if whole_rows or not a_chunks else [0]):
        for (bm, bn), wg in itertools.product(TILES, (1, 2)):
            if math.ceil(M / bm) > 65535:
                continue
            for split in (s for s in SPLITS if s <= kt and nb * s <= 65535 and (clusters or s == 1)):
                kts = math.ceil(kt / split)
                if split > 1 and (kts - 1) * split >= kt:  # an empty split
                    continue
                stages = next((s for s in range(min(4, max(2, kts + 1)), 1, -1)
                               if smem_bytes(K, bm, bn, split, s, a_mode, b_mode, wg, fp8) <= SMEM_CAP), None)
                if stages is None:
                    continue
                c = {"dtype": "e4m3" if fp8 else dtype, "bm": bm, "bn": bn, "split": split, "stages": stages, "wg": wg,
                     "a_mode": a_mode, "b_mode": b_mode, "b_const": b_const or bool(p["b"].get("quant"))}
                padded = math.ceil(M / bm) * bm * math.ceil(N / bn) * bn  # ties: least padding, then big tiles
                key = (round(estimate(p, c) * 1e8), split, padded, -bm * bn, -wg)
                if best is None or key < best[0]:
                    best = (key, c)
        if best is not None:
            break
    return best[1] if best else None


def launch_config(p: dict) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    c = p["mma"]
    grid = (math.ceil(p["N"] / out_bn(p, c["bn"])), math.ceil(p["M"] / c["bm"]), math.prod(p["batch"]) * c["split"])
    wg = c.get("wg", 1)
    if c.get("wgmma"):
        return grid, (WARP_GROUP * wg, 1, 1), wgmma_smem_bytes(c["bm"], c["bn"], c["stages"], c["b_mode"])
    smem = smem_bytes(p["K"], c["bm"], c["bn"], c["split"], c["stages"], c["a_mode"], c["b_mode"], wg,
                      c["dtype"] == "e4m3")
    return grid, (WARP_GROUP * wg, 1, 1), smem


def members(p: dict) -> tuple[str, str]:
    """The struct P members gemm_mma<P> reads besides the GEMM family's common ones: shapes and modes, and
    the operand accessors (chunk addresses for cp.async, element loads for the generic path)."""
    c, a, b, K = p["mma"], p["a"], p["b"], p["K"]
    a_row = f'{atoms_code("(long)bat", a["batch"])} + {atoms_code("(long)m", a["m"])}'
    a_k = atoms_code("(long)k", a["k"])
    b_row = f'{atoms_code("(long)bat", b["batch"])} + {atoms_code("(long)n", b["n"])}'
    b_k = atoms_code("(long)k", b["k"])
    quant = b.get("quant")
    if quant == "fp8":
        load_bq = f"return e4m3_to_float(g.b[(long)n * {K} + k].x);"
    elif quant == "nvfp4":
        load_bq = (f"const unsigned byte = g.b[(long)n * {K // 2} + k / 2].x;\n"
                   f"    return e2m1_to_float((k & 1) ? byte >> 4 : byte & 15u) * "
                   f"e4m3_to_float(g.b_block[(long)n * {K // 16} + k / 16]);")
    else:
        load_bq = f"return to_float(g.b[{b_row} + {b_k}]);"
    b_row_ptr = "nullptr" if quant else f"g.b + ({b_row})"
    fp8 = c["dtype"] == "e4m3"
    stage = (a["dtype"] if a["dtype"] in OPERAND_DTYPES else "bfloat16") if fp8 else c["dtype"]
    shape = f"""using T = {CTYPES[stage]};  // the type A is staged in
  static constexpr bool FP8 = {"true" if fp8 else "false"};
  static constexpr int M = {p["M"]}, N = {p["N"]}, K = {K};
  static constexpr int BM = {c["bm"]}, BN = {c["bn"]}, SPLIT = {c["split"]}, STAGES = {c["stages"]};
  static constexpr int WG = {c.get("wg", 1)};
  static constexpr int A_MODE = {c["a_mode"]}, B_MODE = {c["b_mode"]};
  using OutT = {CTYPES[p["out_dtype"]]};
  static constexpr bool B_CONST = {"true" if c.get("b_const") else "false"};
  static constexpr bool GATED = {"true" if p.get("gated") else "false"};  // wgmma only
  static constexpr bool A_M_INNER = {"true" if inner_is(a["m"]) and p.get("aq") != "nvfp4" else "false"};
  static constexpr bool B_N_INNER = {"true" if inner_is(b["n"]) else "false"};"""
    a_t, b_t = CTYPES[a["dtype"]], CTYPES[b["dtype"]]
    loads = f"""__device__ static const {a_t}* a_row(const Args& g, int bat, int m) {{ return g.a + ({a_row}); }}
  __device__ static long a_kofs(int k) {{ return {a_k}; }}
  __device__ static float load_a(const Args& g, int bat, int m, int k) {{ return to_float(g.a[{a_row} + {a_k}]); }}
  __device__ static const {b_t}* b_row(const Args& g, int bat, int n) {{ return {b_row_ptr}; }}
  __device__ static long b_kofs(int k) {{ return {b_k}; }}
  __device__ static float load_bq(const Args& g, int bat, int k, int n) {{
    {load_bq}
  }}"""
    return shape, loads
