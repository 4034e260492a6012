"""On an sm_90a GPU (H100 / H200): the wgmma GEMM (kernels/cuda/gemm_wgmma.cuh) launched alone matches the GEMM
family's numpy reference: the probe's 8 shapes (benchmarks/wgmma_probe.py) with bias / residual epilogues, split-K
on and off, every tile, fp16, tails in M, N and K, a batched case, RMSNorm / LayerNorm folded into the weight,
gated (SwiGLU) GEMMs and fp8 weights (FLASHRT_WGMMA_FP8's path). The output is poisoned (NaN) before each launch
and the inputs are fresh random values per seed. Skipped without such a GPU.

  FLASHRT_WGMMA is not needed here: the cases ask gemm_mma.config for the wgmma kernel directly.
  python -m pytest -q tests/test_gpu_gemm_wgmma.py"""

import numpy as np
import pytest
from conftest import GPU_ARCH, requires_gpu
from test_gpu_gemm import BIAS_GELU, LN, RESIDUAL, RMS, SILU, check_case, compile_cases, make_args, problem

from flashrt.kernels import gemm_mma

PROBE_SHAPES = [(50, 2560, 1024), (50, 1024, 2048), (50, 8192, 1024), (50, 1024, 4096),
                (197, 2304, 768), (197, 768, 768), (197, 6144, 768), (197, 768, 3072)]


def wgmma_problem(M: int, N: int, K: int, **kw) -> dict:
    p = problem(M, N, K, wgmma=True, **kw)
    assert p["mma"].get("wgmma"), p["mma"]
    return p


def cases() -> list[tuple[str, dict]]:
    out = []
    for M, N, K in PROBE_SHAPES:
        chosen = wgmma_problem(M, N, K, expr=RESIDUAL)
        split = chosen["mma"]["split"]
        out.append((f"residual M{M} N{N} K{K} split{split}", chosen))
        other = 1 if split > 1 else 4  # split-K off where the chooser splits, on where it does not
        stages = min(chosen["mma"]["stages"], -(-K // 64) // other + 2)
        out.append((f"bias-gelu M{M} N{N} K{K} split{other}",
                    wgmma_problem(M, N, K, expr=BIAS_GELU, config={"split": other, "stages": stages})))
    for (bm, bn), split in zip(gemm_mma.WGMMA_TILES * 2, (1, 1, 1, 1, 2, 4, 8, 3)):
        out.append((f"tile {bm}x{bn} split{split} M197 N1000 K1000 residual",  # tails in M, N and K (1000 % 64)
                    wgmma_problem(197, 1000, 1000, expr=RESIDUAL,
                                  config={"bm": bm, "bn": bn, "wg": bm // 64, "split": split, "stages": 3})))
    out.append(("stages 3 split8 M50 N1024 K4096", wgmma_problem(50, 1024, 4096, config={"stages": 3})))
    out.append(("fp16 residual M50 N1024 K1024", wgmma_problem(50, 1024, 1024, dtype="float16", expr=RESIDUAL)))
    out.append(("fp16 M197 N768 K3072", wgmma_problem(197, 768, 3072, dtype="float16")))
    out.append(("batched 4x M50 N1024 K1024 residual", wgmma_problem(50, 1024, 1024, batch=(4,), expr=RESIDUAL)))
    out.append(("batched 3x M197 N768 K768 split4", wgmma_problem(197, 768, 768, batch=(3,),
                                                                  config={"split": 4, "stages": 3})))
    out.append(("M1 N256 K64", wgmma_problem(1, 256, 64)))
    # norm prologues folded into the weight (ln.fold): the workloads' norm GEMMs, split-K on and off, two warp
    # groups, tails, a batch; A has mean 0.5, so LayerNorm's mean * colsum term matters
    for M, N, K, ln in ((50, 2560, 1024, RMS), (50, 8192, 1024, RMS), (197, 2304, 768, LN), (197, 3072, 768, LN)):
        chosen = wgmma_problem(M, N, K, ln={**ln, "fold": True}, expr=SILU if ln is RMS else BIAS_GELU)
        out.append((f"fold {'rms' if ln is RMS else 'layernorm'} M{M} N{N} K{K} split{chosen['mma']['split']}",
                    chosen))
    for bm, bn, split in ((64, 128, 1), (128, 64, 4), (128, 128, 3)):
        out.append((f"fold layernorm tile {bm}x{bn} split{split} M197 N1000 K1000",
                    wgmma_problem(197, 1000, 1000, ln={**LN, "fold": True},
                                  config={"bm": bm, "bn": bn, "wg": bm // 64, "split": split, "stages": 3})))
    out.append(("fold rms batched 2x M50 N1024 K1024", wgmma_problem(50, 1024, 1024, batch=(2,),
                                                                    ln={**RMS, "fold": True})))
    # gated (SwiGLU): silu(gate) * up of B's two halves per block, with and without a folded norm
    for M, N, K, ln in ((50, 4096, 1024, RMS), (197, 3072, 768, RMS), (197, 1000, 1000, LN), (50, 1024, 1024, None)):
        fold = {**ln, "fold": True} if ln else None
        chosen = wgmma_problem(M, N, K, ln=fold, expr=SWIGLU, gated=True)
        out.append((f"gated {'fold ' if ln else ''}M{M} N{N} K{K} split{chosen['mma']['split']}", chosen))
    out.append(("gated tile 128x64 split2 M197 N1000 K1000",
                wgmma_problem(197, 1000, 1000, expr=SWIGLU, gated=True,
                              config={"bm": 128, "bn": 64, "wg": 2, "split": 2, "stages": 3})))
    # quantized weights decoded into the B tile: fp8 (b_mode 1: E4M3 rows) and nvfp4 (b_mode 2: E2M1 x block
    # scale; opt-in FLASHRT_WGMMA_NVFP4=1); plain, folded, gated, tails (nvfp4 needs K % 64), two warp groups
    for quant, b_mode, tail in (("fp8", 1, (197, 1008, 1008)), ("nvfp4", 2, (197, 1000, 1024))):
        for M, N, K, ln, gated in ((50, 1024, 4096, None, False), (50, 2560, 1024, RMS, False),
                                   (50, 4096, 1024, RMS, True), (197, 768, 3072, None, False),
                                   (197, 3072, 768, LN, True), (*tail, None, False)):
            fold = {**ln, "fold": True} if ln else None
            chosen = wgmma_problem(M, N, K, ln=fold, quant=quant, gated=gated, expr=SWIGLU if gated else RESIDUAL,
                                   **{f"wgmma_{quant}": True})
            assert chosen["mma"]["b_mode"] == b_mode
            out.append((f"{quant} {'gated ' if gated else ''}{'fold ' if ln else ''}M{M} N{N} K{K} "
                        f"BM{chosen['mma']['bm']} BN{chosen['mma']['bn']} split{chosen['mma']['split']}", chosen))
    out.append(("fold layernorm no beta M100 N512 K512", wgmma_problem(100, 512, 512,
                                                                      ln={**LN, "has_beta": False, "fold": True})))
    return out


SWIGLU = [["acc"], ["sigmoid", 0], ["mul", 0, 1], ["acc", 1], ["mul", 2, 3]]

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(GPU_ARCH not in (None, "sm_90a"), reason="wgmma: sm_90a only")]
CASES = cases() if GPU_ARCH == "sm_90a" else []


@pytest.fixture(scope="module")
def compiled():
    return compile_cases(CASES)


@pytest.mark.parametrize("name, p", CASES, ids=[n for n, _ in CASES])
def test_wgmma_gemm_matches_reference(compiled, name, p):
    check_case(compiled, name, p)


def test_wgmma_gemm_is_deterministic(compiled):
    """Split-K sums the cluster's partial tiles in rank order: repeated runs give identical bits."""
    launcher, fns = compiled
    name, p = next((n, p) for n, p in CASES if p["mma"]["split"] == 8)
    host = make_args(p, 3)
    first = launcher.run(fns[name], p, host)
    for _ in range(3):
        np.testing.assert_array_equal(launcher.run(fns[name], p, host), first)
