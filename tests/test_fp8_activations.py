"""FP8 activations in the GEMMs (kernels/gemm.py `aq`): the rounding against ml_dtypes, the reference's
semantics, the configuration of the E4M3 x E4M3 tensor-core path, the planner's per-target choice, and engines
against onnxruntime on the CPU reference executor."""

import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT, onnxruntime_outputs
from test_gemm_mma import RMS, gemm_params

import flashrt
from flashrt.aot.build import build_engine
from flashrt.aot.quantize import quantize_fp8
from flashrt.aot.targets import fp8_mma
from flashrt.engine_format.reader import read_engine
from flashrt.errors import EngineFormatError
from flashrt.kernels import gemm, gemm_mma, params
from flashrt.kernels.dtypes import bf16_to_f32, f32_to_bf16
from flashrt.kernels.memory import Pointer
from flashrt.kernels.quant import act_row_scales, dequant_fp8, fake_quant_act

ENCODER = ROOT / "samples" / "tiny_encoder.onnx"


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fake_quant_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * np.logspace(-4, 3, 64)[:, None]).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-12, -1e-12]
    for scale in (act_row_scales(x), np.float32(0.5)):
        want = (np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale)
        np.testing.assert_array_equal(fake_quant_act(x, scale), want.astype(np.float32))
    assert np.array_equal(act_row_scales(np.zeros((2, 8), np.float32)), np.ones((2, 1), np.float32))
    row = np.array([[1.0, np.nan, -3.0]], np.float32)  # NaN ignored by the max, as CUDA's fmaxf does
    assert act_row_scales(row)[0, 0] == np.float32(3.0) / np.float32(448)


def _run_reference(p: dict, arrays: dict) -> np.ndarray:
    bufs = {k: np.ascontiguousarray(v).view(np.uint8).ravel().copy() for k, v in arrays.items()}
    gemm.reference(p, {k: Pointer(v, 0, v.size, k) for k, v in bufs.items()})
    return bf16_to_f32(bufs["c"].view(np.uint16))


@pytest.mark.parametrize("aq", ["tensor", "row"])
def test_reference_quantizes_the_normalized_rows(aq):
    """A' = e4m3(rmsnorm(A) / s) * s times the fp8 weight: the E4M3 x E4M3 mma path computes the same sums."""
    M, N, K = 24, 48, 128
    rng = np.random.default_rng(1)
    a = rng.standard_normal((M, K)).astype(np.float32) + 0.3
    gamma = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    q, w_scale = quantize_fp8(w)
    p = gemm_params(M, N, K, ln=RMS, quant="fp8")
    p["aq"] = aq
    p["mma"] = gemm_mma.config(p, 0, 0, "bfloat16", fp8_mma=True)
    assert p["mma"]["dtype"] == "e4m3"
    arrays = {"a": f32_to_bf16(a), "b": q, "b_scale": w_scale, "ln_gamma": gamma,
              "c": np.zeros(M * N, np.uint16)}
    s = np.float32(0.01)
    if aq == "tensor":
        arrays["a_scale"] = np.array([s], np.float32)
    got = _run_reference(p, arrays).reshape(M, N)
    a_bf = bf16_to_f32(f32_to_bf16(a))
    normed = a_bf / np.sqrt((a_bf ** 2).mean(-1, keepdims=True) + np.float32(1e-6)) * gamma
    scale = s if aq == "tensor" else np.abs(normed).max(-1, keepdims=True) / 448
    a_q = np.clip(normed / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale
    want = a_q @ dequant_fp8(q, w_scale).astype(np.float64).T
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_e4m3_mma_configuration():
    for M, N, K, ln in [(50, 2560, 1024, RMS), (50, 1024, 4096, None), (197, 768, 3072, None)]:
        for aq in ("tensor", "row"):
            p = gemm_params(M, N, K, ln=ln, quant="fp8")
            p["aq"] = aq
            c = gemm_mma.config(p, 0, 0, "bfloat16", fp8_mma=True)
            assert c["dtype"] == "e4m3" and c["b_mode"] == 1
            assert c["a_mode"] in ((1, 2) if ln or aq == "row" else (0,))  # per-row scales need whole rows
            p["mma"] = c
            assert gemm.launch_config(p)[2] <= gemm_mma.SMEM_CAP
            assert gemm_mma.config(p, 0, 0, "bfloat16")["dtype"] == "bfloat16"  # a target before sm_89
    plain = gemm_params(50, 1024, 1024, quant="fp8")  # no FP8 activations: weight-only
    assert gemm_mma.config(plain, 0, 0, "bfloat16", fp8_mma=True)["dtype"] == "bfloat16"


def test_params_check_the_activation_format():
    p = gemm_params(50, 1024, 1024, quant="fp8")
    p["mma"] = {**gemm_mma.config(p, 0, 0, "bfloat16"), "dtype": "e4m3"}
    with pytest.raises(EngineFormatError, match=r"params\.mma\.dtype = 'e4m3' needs FP8 activations"):
        params.check("gemm", p)
    p["aq"] = "per-block"
    with pytest.raises(EngineFormatError, match=r"params\.aq = 'per-block' is not one of"):
        params.check("gemm", p)


def test_fp8_mma_support_per_target():
    assert [fp8_mma(t) for t in ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_110a", "sm_120a")] == \
        ["none", "native", "converted", "converted", "converted", "native"]


def _gemm_kernels(path) -> list[tuple[dict, dict]]:
    m = read_engine(path).manifest
    return [(r, m["kernels"][r["kernel"]]["params"]) for r in m["regions"] if r["kind"] == "gemm"]


def test_auto_quantizes_activations_where_e4m3_mma_is_native(tmp_path):
    """At --precision auto the encoder's GEMMs (16 rows: tensor-core GEMMs) get fp8 weights and per-row FP8
    activations on the RTX 5090 (native E4M3 mma) and stay bf16 on the H100 (ptxas widens E4M3 mma.sync to f16
    there); --precision fp8 quantizes weights only, within the fp8 accuracy goal."""
    native, converted, weights = tmp_path / "native.frt", tmp_path / "converted.frt", tmp_path / "weights.frt"
    build_engine(str(ENCODER), ["rtx5090"], str(native), None, "auto")
    build_engine(str(ENCODER), ["h100"], str(converted), None, "auto")
    build_engine(str(ENCODER), ["rtx5090"], str(weights), None, "fp8")
    kernels = _gemm_kernels(native)
    assert kernels and all(p.get("aq") == "row" and p["mma"]["dtype"] == "e4m3" for _, p in kernels), kernels
    assert all(r["reason"].startswith("fp8 weight + fp8 activation: compute-bound GEMM") and
               r["reason"].endswith("fp8 activations (per-row scales computed in the kernel)") for r, _ in kernels)
    for region, p in _gemm_kernels(converted):
        assert not p.get("aq") and p["mma"]["dtype"] == "bfloat16" and p["b"]["dtype"] == "bfloat16"
        assert "E4M3 mma is not native on sm_90a" in region["reason"], region["reason"]
    for region, p in _gemm_kernels(weights):
        assert not p.get("aq") and p["b"].get("quant") == "fp8"
        assert "bfloat16 activations (FP8 ones: --precision auto" in region["reason"], region["reason"]
    feeds = flashrt.load(native, device="cpu").example_inputs(0)
    ref = onnxruntime_outputs(ENCODER, feeds)
    got = flashrt.load(native, device="cpu").run(feeds)
    for name in ref:  # FP8 weights and per-row FP8 activations in every GEMM: 0.9988 on "hidden" (ACCURACY.md)
        assert cosine(got[name], ref[name]) >= 0.998, name
    weight_only = flashrt.load(weights, device="cpu").run(feeds)
    assert not np.array_equal(weight_only["hidden"], got["hidden"])  # the activations really are quantized
    for name in ref:
        assert cosine(weight_only[name], ref[name]) >= 0.999, name


def test_a_target_without_fp8_instructions_warns(tmp_path):
    out = tmp_path / "e.frt"
    result = build_engine(str(ENCODER), ["rtx5090", "a100"], str(out), None, "auto")
    assert "sm_80: no FP8 instructions (sm_89+); quantized weights are decoded in software there" in result.warnings
    for region, p in _gemm_kernels(out):  # not every target native: bf16, no FP8 activations
        assert not p.get("aq") and "not native on sm_80" in region["reason"], region["reason"]


@pytest.mark.parametrize("arch", ["sm_90a", "sm_120a"])
def test_activation_quantization_compiles_in_every_gemm_kernel(arch):
    """NVFP4 and per-row FP8 activations in the tensor-core GEMM (ring, panel, element loads), the GEMV (staged
    and not) and the SIMT tiled GEMM: no spills."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc")
    from test_gpu_gemm import problem
    from test_gpu_gemv import gemv_case

    from flashrt.aot.codegen import build_cubins, kernel_source

    cases = [("gemm", problem(50, 768, 1024, aq="nvfp4", quant="nvfp4")),
             ("gemm", problem(50, 768, 1024, aq="nvfp4", ln=RMS)),
             ("gemm", problem(50, 768, 1024, aq="row", ln=RMS, config={"a_mode": 2})),
             ("gemm", problem(40, 300, 512, aq="nvfp4", dtype="float32")),
             ("gemv", gemv_case("qkv", "fp8", 1, aq="nvfp4")[0]), ("gemv", gemv_case("down", None, 8, aq="nvfp4")[0])]
    sources = [kernel_source(f, p) for f, p in cases]
    _, resources, _ = build_cubins(sources, [arch])
    for s in sources:
        assert resources[arch][s.symbol]["spill_bytes"] == 0, s.symbol
