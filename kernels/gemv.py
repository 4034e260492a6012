"""GEMV family: batch-1 matrix-vector (and M <= 8 small-M) products that stream a weight matrix stored
[N, K] (K contiguous) once, with the GEMM family's norm prologue and epilogue expression. The compiler
picks it over the tiled GEMM when the activations have at most 8 rows and the weight is a constant.

params: as the gemm family's with batch = [] (batch rows folded into M) plus
  R  weight rows per warp,  S  warps splitting K (8 / S row groups per 256-thread block)
  gated  (optional) the weight holds [gate | up] rows (2N of them); the epilogue reads ["acc"] (gate) and
         ["acc", 1] (up) and writes N outputs
args: a, b, [ln_gamma, [ln_beta]], e0..e{n-1}, c"""

import math

from flashrt.kernels import gemm

FAMILY = "gemv"
MAX_M = 8


VALUES_PER_16B = {"float32": 4, "bfloat16": 8, "float16": 8, "fp8_e4m3": 16, "nvfp4": 32}


def choose_config(M: int, N: int, K: int, vec: int) -> tuple[int, int]:
    """(R, S): split K over as many warps (up to 8) as leave each a full 16-byte-per-lane step (vec values),
    then give a warp 2 rows when that still leaves >= 2 blocks per multiprocessor of a 132-SM GPU."""
    S = 8
    while S > 1 and (K // S < 32 * vec or K % (S * vec)):
        S //= 2
    groups = 8 // S
    R = 2 if math.ceil(N / (groups * 2)) >= 264 else 1
    return R, S


def eligible(M: int, K: int, vec: int) -> bool:
    return M <= MAX_M and K % vec == 0


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return gemm.arg_spec(p)


def launch_config(p: dict):
    groups = 8 // p["S"]
    per_block = groups if p.get("gated") else groups * p["R"]
    return (math.ceil(p["N"] / per_block), 1, 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    struct, params, names = gemm.problem_struct(p, "gemv")
    return f'''#include "gemv.cuh"

{struct}
extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  const P::Args g{{{", ".join(names)}}};
  gemv<P>(g);
}}
'''


def reference(p: dict, args: dict) -> None:
    gemm.reference(p, args)
