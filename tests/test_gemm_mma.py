"""The tensor-core GEMM path without a GPU: configuration choice, staging modes, the reference's rounding
semantics, params validation, engines that use it, and compilation for every target with no spills."""

import shutil

import numpy as np
import pytest
from conftest import SAMPLES, rel_l2

from flashrt.aot.quantize import quantize_fp8, quantize_nvfp4
from flashrt.errors import EngineFormatError
from flashrt.kernels import gemm, gemm_mma, params
from flashrt.kernels.dtypes import f32_to_bf16, bf16_to_f32
from flashrt.kernels.memory import Pointer
from flashrt.kernels.quant import E4M3, dequant_nvfp4

RMS = {"eps": 1e-6, "has_beta": False, "rms": True}


def gemm_params(M, N, K, batch=(), ln=None, quant=None, a=None, b=None, dtype="bfloat16") -> dict:
    a = a or {"dtype": dtype, "batch": [[1, 0]], "m": [[M, K]], "k": [[K, 1]]}
    if quant:
        b = {"dtype": {"fp8": "fp8_e4m3", "nvfp4": "nvfp4"}[quant], "quant": quant, "batch": [[1, 0]],
             "k": [[K, 1]], "n": [[N, K]]}
    b = b or {"dtype": dtype, "batch": [[1, 0]], "k": [[K, 1]], "n": [[N, K]]}
    return {"M": M, "N": N, "K": K, "batch": list(batch), "a": a, "b": b, "ln": ln, "out_dtype": dtype,
            "epi_inputs": [], "expr": [["acc"]]}


# ---------------------------------------------------------------------------------------------- config

WORKLOAD_SHAPES = [(50, 2560, 1024, RMS), (50, 1024, 2048, None), (50, 8192, 1024, RMS), (50, 1024, 4096, None),
                   (197, 2304, 768, RMS), (197, 768, 768, None), (197, 3072, 768, RMS), (197, 768, 3072, None)]


@pytest.mark.parametrize("M, N, K, ln", WORKLOAD_SHAPES)
@pytest.mark.parametrize("quant", [None, "fp8", "nvfp4"])
def test_config_fills_the_gpu_within_limits(M, N, K, ln, quant):
    p = gemm_params(M, N, K, ln=ln, quant=quant)
    c = gemm_mma.config(p, 0, 0, "bfloat16")
    p["mma"] = c
    grid, block, smem = gemm.launch_config(p)
    blocks = grid[0] * grid[1] * grid[2]
    assert block == (128 * c["wg"], 1, 1) and smem <= gemm_mma.SMEM_CAP
    assert 66 <= blocks <= 4 * 132, (c, blocks)  # most of the 132 multiprocessors busy, a few waves at most
    assert 1 <= c["split"] <= 8 and grid[2] % c["split"] == 0
    assert c["a_mode"] == (1 if ln else 0)  # contiguous, aligned activations: cp.async (panel under a norm)
    assert c["b_mode"] == {None: 0, "fp8": 1, "nvfp4": 2}[quant]
    assert (c["bm"], c["bn"]) in gemm_mma.TILES
    assert c["stages"] >= 2


def test_split_k_for_small_grids():
    """The expert's down projection (M=50, N=1024, K=4096) has 16 output tiles of 64 x 64: split K 8 ways."""
    c = gemm_mma.config(gemm_params(50, 1024, 4096), 0, 0, "bfloat16")
    assert c["split"] > 4
    big = gemm_mma.config(gemm_params(2048, 4096, 1024), 0, 0, "bfloat16")
    assert big["split"] == 1 and big["bm"] * big["bn"] >= 64 * 64


def test_staging_modes_follow_the_views():
    K = 1024
    # contiguous bf16 activations and a [N, K] weight: both by cp.async
    assert gemm_mma.staging(gemm_params(50, 512, K), 0, 0, "bfloat16") == (True, 0)
    # an offset that breaks 16-byte alignment, a transposed A (m contiguous), a float32 A: element loads
    assert gemm_mma.staging(gemm_params(50, 512, K), 4, 0, "bfloat16")[0] is False
    at = {"dtype": "bfloat16", "batch": [[1, 0]], "m": [[50, 1]], "k": [[K, 50]]}
    assert gemm_mma.staging(gemm_params(50, 512, K, a=at), 0, 0, "bfloat16")[0] is False
    a32 = {"dtype": "float32", "batch": [[1, 0]], "m": [[50, K]], "k": [[K, 1]]}
    assert gemm_mma.staging(gemm_params(50, 512, K, a=a32), 0, 0, "bfloat16")[0] is False
    # attention output heads transposed back: k over two atoms, each run of 8 still contiguous and aligned
    ao = {"dtype": "bfloat16", "batch": [[1, 0]], "m": [[50, 256]], "k": [[8, 12800], [256, 1]]}
    assert gemm_mma.staging(gemm_params(50, 1024, 2048, a=ao), 0, 0, "bfloat16")[0] is True
    # B with n contiguous (x @ W for an activation W [K, N]): element loads
    bn = {"dtype": "bfloat16", "batch": [[1, 0]], "k": [[K, 512]], "n": [[512, 1]]}
    assert gemm_mma.staging(gemm_params(50, 512, K, b=bn), 0, 0, "bfloat16")[1] == 3
    # quantized: decoded in shared memory; nvfp4 needs K % 64 for its 4-byte scale copies
    assert gemm_mma.staging(gemm_params(50, 512, K, quant="fp8"), 0, 0, "bfloat16")[1] == 1
    assert gemm_mma.staging(gemm_params(50, 512, K, quant="nvfp4"), 0, 0, "bfloat16")[1] == 2
    assert gemm_mma.staging(gemm_params(50, 512, 1056, quant="nvfp4"), 0, 0, "bfloat16")[1] == 3
    # fp32 engines keep the SIMT kernel
    assert gemm_mma.config(gemm_params(50, 512, K, dtype="float32"), 0, 0, "float32") is None


def test_norm_prologue_panel_falls_back_when_it_does_not_fit():
    """A norm prologue keeps the block's A panel in shared memory; a K too long for it even at split 8
    normalizes on the way in (a_mode 2)."""
    c = gemm_mma.config(gemm_params(50, 2560, 1024, ln=RMS), 0, 0, "bfloat16")
    assert c["a_mode"] == 1
    assert gemm_mma.smem_bytes(1024, c["bm"], c["bn"], c["split"], c["stages"], 1, 0) <= gemm_mma.SMEM_CAP
    huge = gemm_mma.config(gemm_params(64, 1024, 65536, ln=RMS), 0, 0, "bfloat16")
    assert huge["a_mode"] == 2


# ---------------------------------------------------------------------------------------------- reference

def _run_reference(p: dict, host: dict) -> np.ndarray:
    bufs = {k: np.ascontiguousarray(v).view(np.uint8).reshape(-1).copy() for k, v in host.items()}
    gemm.reference(p, {k: Pointer(v, 0, v.size, k) for k, v in bufs.items()})
    return bufs["c"].view(np.uint16)


def test_reference_rounds_the_normalized_activations_to_bf16():
    """With "mma", A' (after the norm) is rounded to bf16 before the product; without, it stays float32."""
    rng = np.random.default_rng(0)
    M, N, K = 4, 8, 64
    x = f32_to_bf16(rng.standard_normal((M, K)).astype(np.float32) + 3)
    w = f32_to_bf16(rng.standard_normal((N, K)).astype(np.float32))
    gamma = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    p = gemm_params(M, N, K, ln=RMS)
    p["out_dtype"] = "float32"
    host = {"a": x, "b": w, "ln_gamma": gamma, "c": np.zeros(M * N, np.float32)}
    xf, wf = bf16_to_f32(x), bf16_to_f32(w)
    normed = xf / np.sqrt(np.mean(xf * xf, axis=1, keepdims=True) + np.float32(1e-6)) * gamma
    rounded = bf16_to_f32(f32_to_bf16(normed))
    plain = _run_reference(p, host).view(np.float32).reshape(M, N)
    mma = _run_reference({**p, "mma": {"dtype": "bfloat16"}}, host).view(np.float32).reshape(M, N)
    np.testing.assert_allclose(plain, normed @ wf.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mma, rounded @ wf.T, rtol=1e-5, atol=1e-5)
    assert np.abs(mma - plain).max() > 1e-4  # the rounding is visible, so the test tells the two apart


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_reference_applies_the_quantized_scale_to_the_sum(quant):
    """With "mma", B enters as the exactly decoded codes and the per-row (fp8) / global (nvfp4) scale
    multiplies the float32 sum."""
    rng = np.random.default_rng(1)
    M, N, K = 8, 16, 128
    x = f32_to_bf16(rng.standard_normal((M, K)).astype(np.float32))
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    p = {**gemm_params(M, N, K, quant=quant), "out_dtype": "float32", "mma": {"dtype": "bfloat16"}}
    xf = bf16_to_f32(x)
    if quant == "fp8":
        q, scale = quantize_fp8(w)
        host = {"a": x, "b": q, "b_scale": scale}
        want = (xf @ E4M3[q].T) * scale
    else:
        packed, block, g = quantize_nvfp4(w)
        host = {"a": x, "b": packed, "b_block": block, "b_global": np.array([g], np.float32)}
        want = (xf @ dequant_nvfp4(packed, block, 1.0).T) * np.float32(g)
    host["c"] = np.zeros(M * N, np.float32)
    got = _run_reference(p, host).view(np.float32).reshape(M, N)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # decoded codes are exact in bf16: rounding them changes nothing
    codes = E4M3[q] if quant == "fp8" else dequant_nvfp4(packed, block, 1.0)
    np.testing.assert_array_equal(bf16_to_f32(f32_to_bf16(codes)), codes)


def test_params_check_accepts_mma_and_rejects_a_bad_dtype():
    p = gemm_params(50, 512, 1024)
    p["mma"] = gemm_mma.config(p, 0, 0, "bfloat16")
    params.check("gemm", p)
    with pytest.raises(EngineFormatError, match=r"params\.mma\.dtype"):
        params.check("gemm", {**p, "mma": {**p["mma"], "dtype": "float32"}})


# ---------------------------------------------------------------------------------------------- engines

def test_bf16_engine_uses_the_tensor_core_gemm(tmp_path):
    import flashrt
    from flashrt.aot.build import build_engine
    from flashrt.engine_format.reader import read_engine

    path = tmp_path / "enc_bf16.frt"
    build_engine(str(SAMPLES / "tiny_encoder.onnx"), ["h100"], str(path), None, "bf16")
    ef = read_engine(path)
    gemms = [k for k in ef.manifest["kernels"] if k["family"] == "gemm"]
    assert gemms and all(k["params"].get("mma", {}).get("dtype") == "bfloat16" for k in gemms)
    fp32 = tmp_path / "enc_fp32.frt"
    build_engine(str(SAMPLES / "tiny_encoder.onnx"), ["h100"], str(fp32), None, "fp32")
    assert not any("mma" in k["params"] for k in read_engine(fp32).manifest["kernels"])
    a, b = flashrt.load(path, device="cpu"), flashrt.load(fp32, device="cpu")
    feeds = b.example_inputs(0)
    got, want = a.run(feeds), b.run(feeds)
    for name in want:
        assert rel_l2(got[name], want[name]) < 2e-2


# ---------------------------------------------------------------------------------------------- compile

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a", "sm_110a", "sm_120a"])
def test_every_mode_compiles_without_spills(arch):
    from flashrt.aot.codegen import build_cubins, kernel_source

    cases = [gemm_params(50, 2560, 1024, ln=RMS), gemm_params(50, 1024, 4096), gemm_params(197, 3072, 768, ln=RMS),
             gemm_params(50, 1024, 4096, quant="fp8"), gemm_params(50, 1024, 4096, quant="nvfp4"),
             gemm_params(50, 1024, 1056, quant="nvfp4"), gemm_params(64, 1024, 65536, ln=RMS),
             gemm_params(50, 1024, 1024, ln=RMS, dtype="float16")]
    for p in cases:
        p["mma"] = gemm_mma.config(p, 0, 0, p["a"]["dtype"])
    for aq, ln, fp8 in [("tensor", None, True), ("row", RMS, True), ("row", None, False), ("tensor", RMS, False)]:
        p = {**gemm_params(197, 768, 3072, ln=ln, quant="fp8"), "aq": aq}  # FP8 activations, E4M3 mma or bf16
        cases.append({**p, "mma": gemm_mma.config(p, 0, 0, "bfloat16", fp8_mma=fp8)})
    big = gemm_params(256, 1024, 1024)  # the largest register tiles: 64 x 32 and 32 x 64 per warp
    cases += [{**big, "mma": {**gemm_mma.config(big, 0, 0, "bfloat16"), "bm": bm, "bn": bn, "wg": wg}}
              for bm, bn in ((128, 64), (64, 128), (16, 64)) for wg in (1, 2)]
    sources = [kernel_source("gemm", p) for p in cases]
    _, resources, _ = build_cubins(sources, [arch])
    for s, p in zip(sources, cases):
        r = resources[arch][s.symbol]
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, (p["mma"], r)
