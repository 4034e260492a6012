"""GEMV family: batch-1 matrix-vector (and M <= 8 small-M) products that stream a weight matrix stored
[N, K] (K contiguous) once, with the GEMM family's norm prologue and epilogue expression. The compiler
picks it over the tiled GEMM when the activations have at most 8 rows and the weight is a constant.

params: as the gemm family's with batch = [] (batch rows folded into M) plus
  R  weight rows per warp,  S  warps splitting K (8 / S row groups per 256-thread block)
  gated  (optional) the weight holds [gate | up] rows (2N of them); the epilogue reads ["acc"] (gate) and
         ["acc", 1] (up) and writes N outputs; R (even) counts both: R / 2 gate rows and their up rows
The kernel calls griddepcontrol: it may be launched with programmatic dependent launch (it reads only its
constant weights before waiting for the previous kernel).
args: as the gemm family's"""

import math

from flashrt.kernels import gemm, prefetch

FAMILY = "gemv"
MAX_M = 8


VALUES_PER_16B = {"float32": 4, "bfloat16": 8, "float16": 8, "fp8_e4m3": 16, "nvfp4": 32}
SMS = 132  # multiprocessors of the GPU the grid is sized for (H100 / H200)
MAX_LOADS = 16  # 16-byte weight loads a lane keeps in flight (64 registers)


def choose_config(M: int, N: int, K: int, vec: int, gated: bool = False) -> tuple[int, int]:
    """(R, S): every lane issues all of its R x ceil(K / (S * 32 * vec)) weight loads at once, so the most
    bytes per lane (up to MAX_LOADS loads, M x R accumulators <= 32, 8 for NVFP4) that still give (nearly) every
    multiprocessor a block; S > 1 splits K over a block's warps when the rows alone cannot fill the GPU."""
    best = None
    for S in (1, 2, 4, 8):
        if K % (S * vec) or (S > 1 and K // S < 32 * vec):
            continue
        for R in ((2, 4) if gated else (1, 2, 4)):
            if R * math.ceil(K // S / (32 * vec)) > MAX_LOADS or M * R > (8 if vec == 32 else 32):
                continue
            blocks = math.ceil(N / ((8 // S) * (R // 2 if gated else R)))
            # 124 of 132 SMs count as full; at equal bytes per lane more rows per warp read the staged
            # activations fewer times per weight (measured 5-20% faster on an H200, benchmarks/NOTES.md v3)
            key = (min(blocks, SMS - 8), R * K / S, R)
            best = max(best or (key, R, S), (key, R, S))
    if best is None:
        return (2 if gated else 1), 1
    return best[1], best[2]


def eligible(M: int, K: int, vec: int) -> bool:
    return M <= MAX_M and K % vec == 0


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return gemm.arg_spec(p)


def launch_config(p: dict):
    groups = 8 // p["S"]
    per_block = groups * (p["R"] // 2 if p.get("gated") else p["R"])
    return (math.ceil(p["N"] / per_block), 1, 1), (256, 1, 1), 0


def staged(p: dict) -> bool:
    """Whether the activations fit in shared memory (gemv.cuh's STAGE); then two blocks share a multiprocessor."""
    return p["M"] * p["K"] * 4 <= 32768


def cuda_source(p: dict, symbol: str) -> str:
    struct, params, names = gemm.problem_struct(p, "gemv")
    scales = "0"
    if p["b"].get("quant") == "nvfp4":  # the two E4M3 scales of a lane's 32 values, one byte each
        at = f"(long)row * {p['K'] // 16} + kb"
        scales = f"(unsigned short)(g.b_block[{at}] | (g.b_block[{at} + 1] << 8))"
    return f'''#include "gemv.cuh"

{struct}
namespace {{
struct G : P {{
  __device__ static unsigned short block_scales(const Args& g, int row, int kb) {{ return {scales}; }}
}};
}}  // namespace
extern "C" __global__ void __launch_bounds__(256, {2 if staged(p) else 1}) {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  {prefetch.code(p)}
  gemv<G>(g);
}}
'''


def reference(p: dict, args: dict) -> None:
    gemm.reference(p, args)
