"""On an NVIDIA GPU: the GEMV kernel on the decode shapes of a Qwen3-0.6B-sized layer (qkv with an RMSNorm
prologue, o-proj and down with a residual, gated SwiGLU gate/up with an RMSNorm), bf16 / fp8 / nvfp4 weights,
M = 1 and M = 4 rows, against the numpy reference, into poisoned outputs. `gemv_case` also feeds
benchmarks/kernel_bench.py. Skipped without a GPU."""

import numpy as np
import pytest
from conftest import requires_gpu

from flashrt.aot.quantize import quantize_fp8, quantize_nvfp4
from flashrt.kernels import gemv
from flashrt.kernels.dtypes import from_f32, to_f32

SHAPES = {"qkv": (4096, 1024, "rms", False), "o_proj": (1024, 2048, None, False),
          "gate_up": (3072, 1024, "rms", True), "down": (1024, 3072, None, False),
          "small": (128, 1024, "rms", False)}  # a few blocks: the fixed cost of a launch
SWIGLU = [["acc"], ["sigmoid", 0], ["mul", 0, 1], ["acc", 1], ["mul", 2, 3]]
RESIDUAL = [["acc"], ["in", 0], ["add", 0, 1]]


def gemv_case(shape: str, quant: str | None, M: int = 1, seed: int = 0, config=None,
              aq: str | None = None) -> tuple[dict, dict]:
    """(params, host byte arrays) of one decode GEMV; the output is "c". aq: FP8 activations."""
    N, K, norm, gated = SHAPES[shape]
    rng = np.random.default_rng(seed)
    rows = 2 * N if gated else N
    w = (rng.standard_normal((rows, K)) / np.sqrt(K)).astype(np.float32)
    vec = gemv.VALUES_PER_16B[{"fp8": "fp8_e4m3", "nvfp4": "nvfp4"}.get(quant, "bfloat16")]
    R, S = config or gemv.choose_config(M, N, K, vec, gated)
    host = {"a": from_f32(rng.standard_normal((M, K)).astype(np.float32), "bfloat16"),
            "c": np.zeros(M * N, np.uint16)}
    b = {"batch": [[1, 0]], "k": [[K, 1]], "n": [[rows, K]]}
    if quant == "fp8":
        host["b"], host["b_scale"] = quantize_fp8(w)
        b.update(dtype="fp8_e4m3", quant="fp8")
    elif quant == "nvfp4":
        packed, block, global_scale = quantize_nvfp4(w)
        host["b"], host["b_block"], host["b_global"] = packed, block, np.array([global_scale], np.float32)
        b.update(dtype="nvfp4", quant="nvfp4")
    else:
        host["b"] = from_f32(w, "bfloat16")
        b.update(dtype="bfloat16")
    p = {"M": M, "N": N, "K": K, "batch": [], "R": R, "S": S, "out_dtype": "bfloat16", "b": b,
         "a": {"dtype": "bfloat16", "batch": [[1, 0]], "m": [[M, K]], "k": [[K, 1]]},
         "ln": {"eps": 1e-6, "has_beta": False, "rms": True} if norm else None,
         "epi_inputs": [], "expr": SWIGLU if gated else [["acc"]]}
    if gated:
        p["gated"] = True
    if aq:
        p["aq"] = aq
        if aq == "tensor":
            host["a_scale"] = np.array([3.0 / 448], np.float32)
        elif aq == "nvfp4":
            host["a_scale"] = np.array([5.0 / (6 * 448)], np.float32)
    if norm:
        host["ln_gamma"] = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    else:
        p["epi_inputs"] = [{"dtype": "bfloat16", "atoms": [[M, N], [N, 1]]}]
        p["expr"] = RESIDUAL
        host["e0"] = from_f32(rng.standard_normal((M, N)).astype(np.float32), "bfloat16")
    return p, host


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("quant", [None, "fp8", "nvfp4"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv_matches_reference(shape, quant, M):
    from gpu_kernel import Kernel, reference

    p, host = gemv_case(shape, quant, M, seed=M)
    got = to_f32(Kernel("gemv", p).run(host, "c").view(np.uint16), "bfloat16")
    want = to_f32(reference("gemv", p, host, "c").view(np.uint16), "bfloat16")
    assert np.isfinite(got).all()  # every output written over the NaN poison
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-2, err
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max() + 1e-3


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M", [1, 8])  # M = 8 at K = 3072 does not stage A in shared memory: the other path
@pytest.mark.parametrize("aq", ["tensor", "row", "nvfp4"])
@pytest.mark.parametrize("shape, quant", [("qkv", "fp8"), ("down", "fp8"), ("gate_up", None), ("o_proj", "nvfp4")])
def test_gemv_fp8_activations_match_reference(shape, quant, aq, M):
    from gpu_kernel import Kernel, reference

    p, host = gemv_case(shape, quant, M, seed=M, aq=aq)
    got = to_f32(Kernel("gemv", p).run(host, "c").view(np.uint16), "bfloat16")
    want = to_f32(reference("gemv", p, host, "c").view(np.uint16), "bfloat16")
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-2


def down_case(quant: str | None, config, seed: int = 0, N2: int = 1024) -> tuple[dict, dict]:
    """A gated gate/up GEMV with the down projection fused in (params `down`): y [N2] float32 starts as a
    residual and receives W2 h."""
    p, host = gemv_case("gate_up", quant, 1, seed=seed, config=config)
    rng = np.random.default_rng(seed + 100)
    N = p["N"]
    w2 = (rng.standard_normal((N2, N)) / np.sqrt(N)).astype(np.float32)
    if quant == "fp8":
        host["w2"], host["w2_scale"] = quantize_fp8(w2)
        p["down"] = {"N": N2, "b": {"dtype": "fp8_e4m3", "quant": "fp8"}}
    else:
        host["w2"] = from_f32(w2, "bfloat16")
        p["down"] = {"N": N2, "b": {"dtype": "bfloat16"}}
    del host["c"]
    host["y"] = rng.standard_normal(N2).astype(np.float32)
    return p, host


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("N2", [1024, 1500, 1002])  # 1500: a partial second chunk of rows; 1002: scalar atomics
@pytest.mark.parametrize("quant, config", [(None, (2, 1)), (None, (4, 1)), (None, (2, 2)),  # J x bytes: 8 or more
                                           ("fp8", (2, 1)), ("fp8", (4, 1))])
def test_gemv_fused_down_matches_reference(quant, config, N2):
    from gpu_kernel import Kernel, reference

    p, host = down_case(quant, config, seed=config[0] + config[1], N2=N2)
    kernel = Kernel("gemv", p)
    got = kernel.run(host, "y", poison=None).view(np.float32)
    want = reference("gemv", p, host, "y").view(np.float32)
    moved = np.linalg.norm(want - host["y"])  # the down projection's share of y
    assert moved > 0.1 * np.linalg.norm(host["y"])
    assert np.linalg.norm(got - want) <= 1e-3 * moved, np.linalg.norm(got - want) / moved
    again = kernel.run(host, "y", poison=None).view(np.float32)  # atomics: another order, the same sum to rounding
    assert np.linalg.norm(again - got) <= 1e-5 * moved


@pytest.mark.gpu
@requires_gpu
def test_gemv_mirror_writes_the_stored_output_as_float32():
    from gpu_kernel import Kernel, reference

    p, host = gemv_case("o_proj", None, 1, seed=5)
    p["mirror"] = True
    host["mirror"] = np.zeros(p["N"], np.float32)
    kernel = Kernel("gemv", p)
    c = to_f32(kernel.run(host, "c").view(np.uint16), "bfloat16")
    mirror = kernel.run(host, "mirror").view(np.float32)
    want = to_f32(reference("gemv", p, host, "c").view(np.uint16), "bfloat16")
    assert np.isfinite(mirror).all()
    np.testing.assert_array_equal(mirror, c)  # the stored value exactly, widened
    assert np.linalg.norm(c - want) / np.linalg.norm(want) <= 1e-2


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("quant", [None, "fp8"])
def test_gemv_a_mirror_writes_the_input_row_as_float32(quant):
    """gemv `a_mirror` (2 copies): A's row as read, before the norm prologue, as float32; C as without it (the
    QKV GEMV of a decode layer, with its new K/V rows' cache writes left out)."""
    from gpu_kernel import Kernel, reference

    p, host = gemv_case("qkv", quant, 1, seed=7)
    p["a_mirror"] = 2
    for i in range(2):
        host[f"a_mirror{i}"] = np.zeros(p["K"], np.float32)
    kernel = Kernel("gemv", p)
    a = to_f32(host["a"], "bfloat16").reshape(-1)
    for i in range(2):
        np.testing.assert_array_equal(kernel.run(host, f"a_mirror{i}").view(np.float32), a)
    got = to_f32(kernel.run(host, "c").view(np.uint16), "bfloat16")
    want = to_f32(reference("gemv", p, host, "c").view(np.uint16), "bfloat16")
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-2


def test_config_issues_all_loads_within_the_register_budget():
    for N, K, _, gated in SHAPES.values():
        for vec in (8, 16, 32):
            R, S = gemv.choose_config(1, N, K, vec, gated)
            loads = R * -(-K // S // (32 * vec))
            assert loads <= gemv.MAX_LOADS and (R % 2 == 0 or not gated)
            blocks = -(-N // ((8 // S) * (R // 2 if gated else R)))
            assert blocks >= min(gemv.SMS - 8, N // 8), (N, K, vec, R, S, blocks)
