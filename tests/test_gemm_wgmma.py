"""The sm_90a wgmma GEMM path (kernels/cuda/gemm_wgmma.cuh) without a GPU: when it is chosen (FLASHRT_WGMMA=1 and
only sm_90a targets), params validation, the shared-memory layout its cp.async copies write against the probe's
model of TMA's 128-byte swizzle and the wgmma descriptors (benchmarks/wgmma_probe.py), engines built with it on
the CPU reference executor, and compilation for sm_90a with no spills and HGMMA in the SASS."""

import importlib.util
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import CUOBJDUMP, ROOT, flashrt_cli, onnxruntime_outputs, rel_l2
from test_gemm_mma import RMS, gemm_params

import flashrt
from flashrt.aot.build import build_engine
from flashrt.aot.targets import wgmma_enabled
from flashrt.engine_format.reader import read_engine
from flashrt.errors import EngineFormatError
from flashrt.kernels import gemm, gemm_mma, params

# the probe's 8 shapes (benchmarks/wgmma_probe.py SHAPES) and its best measured (bm, bn, split) per shape
# (benchmarks/wgmma_probe_h200_2026-12-02.json); the chooser picks BN128 SK2 for gate/up (7.9 us vs 6.8)
PROBE_BEST = {(50, 2560, 1024): (64, 128, 4), (50, 1024, 2048): (64, 64, 8), (50, 1024, 4096): (64, 64, 8),
              (197, 2304, 768): (128, 128, 3), (197, 768, 768): (64, 128, 4), (197, 6144, 768): (128, 128, 1),
              (197, 768, 3072): (128, 128, 8)}
PROBE_SHAPES = list(PROBE_BEST) + [(50, 8192, 1024)]


def wgmma_params(M: int, N: int, K: int, **kw) -> dict:
    p = gemm_params(M, N, K, **kw)
    p["mma"] = gemm_mma.config(p, 0, 0, p["a"]["dtype"], True, wgmma=True)
    return p


def load_probe():
    spec = importlib.util.spec_from_file_location("wgmma_probe", ROOT / "benchmarks" / "wgmma_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- selection

def test_enabled_for_sm90a_only_builds_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FLASHRT_WGMMA", raising=False)
    assert wgmma_enabled(["sm_90a"])
    monkeypatch.setenv("FLASHRT_WGMMA", "1")
    assert wgmma_enabled(["sm_90a"])
    assert not wgmma_enabled(["sm_90a", "sm_100a"]) and not wgmma_enabled(["sm_90"]) and not wgmma_enabled([])
    monkeypatch.setenv("FLASHRT_WGMMA", "0")
    assert not wgmma_enabled(["sm_90a"])


@pytest.mark.parametrize("M, N, K", PROBE_SHAPES)
def test_config_follows_the_probe(M, N, K):
    p = wgmma_params(M, N, K)
    c = p["mma"]
    assert c["wgmma"] and c["a_mode"] == 0 and c["b_mode"] == 0 and c["bm"] == 64 * c["wg"]
    if (M, N, K) in PROBE_BEST:
        assert (c["bm"], c["bn"], c["split"]) == PROBE_BEST[(M, N, K)]
    grid, block, smem = gemm.launch_config(p)
    assert grid[0] * grid[1] * grid[2] <= gemm_mma.SMS and block == (128 * c["wg"], 1, 1)
    assert smem == gemm_mma.wgmma_smem_bytes(c["bm"], c["bn"], c["stages"]) <= gemm_mma.WGMMA_SMEM_CAP + 1024
    assert 3 <= c["stages"] <= gemm_mma.WGMMA_MAX_STAGES
    params.check("gemm", p)
    # without the flag: the mma.sync kernel, exactly as before
    assert "wgmma" not in gemm_mma.config(p, 0, 0, "bfloat16", True)


def test_config_falls_back_where_wgmma_does_not_apply():
    for p in (gemm_params(50, 2560, 1024, ln=RMS), gemm_params(50, 1024, 4096, quant="fp8"),
              gemm_params(50, 1024, 4096, quant="nvfp4"), {**gemm_params(50, 1024, 4096), "aq": "tensor"}):
        c = gemm_mma.config(p, 0, 0, "bfloat16", True, wgmma=True)
        assert c and "wgmma" not in c
    misaligned = gemm_params(50, 1024, 1024)
    assert "wgmma" not in gemm_mma.config(misaligned, 4, 0, "bfloat16", wgmma=True)  # A not 16-byte aligned
    bn = {"dtype": "bfloat16", "batch": [[1, 0]], "k": [[1024, 512]], "n": [[512, 1]]}  # B n-contiguous
    assert "wgmma" not in gemm_mma.config(gemm_params(50, 512, 1024, b=bn), 0, 0, "bfloat16", wgmma=True)
    assert gemm_mma.config(gemm_params(50, 512, 1024, dtype="float32"), 0, 0, "float32", wgmma=True) is None
    big = wgmma_params(4096, 4096, 1024)["mma"]  # past one wave: the largest tile, no split
    assert (big["bm"], big["bn"], big["split"]) == (128, 128, 1)


@pytest.mark.parametrize("ln", [RMS, {"eps": 1e-5, "has_beta": True, "rms": False},
                                {"eps": 1e-5, "has_beta": False, "rms": False}], ids=["rms", "layernorm", "no-beta"])
def test_folded_norm_reference_equals_the_norm_prologue(ln):
    """ln.fold's reference (statistics applied to the sums of A times gamma * W) gives the norm-prologue GEMM's
    result on the same data, with colsum and bias made as aot/partition.py fold_norm makes them; A's rows have a
    large mean (3), where LayerNorm's mean * colsum term matters most."""
    from flashrt.kernels.dtypes import from_f32, to_f32
    from flashrt.kernels.memory import Pointer

    M, N, K = 40, 96, 256
    rng = np.random.default_rng(0)
    A = to_f32(from_f32(rng.standard_normal((M, K)).astype(np.float32) + 3, "bfloat16"), "bfloat16")
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    gamma = (1 + 0.2 * rng.standard_normal(K)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(K)).astype(np.float32)

    def run(p, arrays):
        bufs = {k: np.ascontiguousarray(v).view(np.uint8).reshape(-1).copy() for k, v in arrays.items()}
        bufs["c"] = np.zeros(M * N * 4, np.uint8)
        gemm.reference(p, {k: Pointer(v, 0, v.size, k) for k, v in bufs.items()})
        return bufs["c"].view(np.float32).reshape(M, N)

    base = {**gemm_params(M, N, K, dtype="float32"), "ln": ln}  # the float32 path: no operand rounding
    arrays = {"a": A, "b": W.T, "ln_gamma": gamma}
    if ln["has_beta"]:
        arrays["ln_beta"] = beta
    want = run(base, arrays)
    folded_nk = from_f32(np.ascontiguousarray((W * gamma[:, None]).T), "bfloat16")
    p = {**gemm_params(M, N, K), "ln": {**ln, "fold": True}, "out_dtype": "float32"}
    p["mma"] = gemm_mma.config(p, 0, 0, "bfloat16", True, wgmma=True)
    assert p["mma"]["wgmma"] and [n for n, _ in gemm.arg_spec(p)][2:-1] == \
        ([] if ln["rms"] else ["ln_colsum"]) + (["ln_bias"] if ln["has_beta"] else [])
    params.check("gemm", p)
    arrays = {"a": from_f32(A, "bfloat16"), "b": folded_nk}
    if not ln["rms"]:
        arrays["ln_colsum"] = to_f32(folded_nk, "bfloat16").sum(axis=1, dtype=np.float64).astype(np.float32)
    if ln["has_beta"]:
        arrays["ln_bias"] = (beta.astype(np.float64) @ W).astype(np.float32)
    got = run(p, arrays)
    assert rel_l2(got, want) < 4e-3, rel_l2(got, want)
    if not ln["rms"]:  # "rms" is optional in params (absent: LayerNorm)
        without = {**p, "ln": {k: v for k, v in p["ln"].items() if k != "rms"}}
        params.check("gemm", without)
        assert gemm.arg_spec(without) == gemm.arg_spec(p)
    # without the wgmma kernel a folded norm is refused: no other kernel applies its statistics
    assert gemm_mma.config({**p, "mma": None}, 0, 0, "bfloat16", True) is None
    with pytest.raises(EngineFormatError, match=r"params\.ln\.fold"):
        params.check("gemm", {k: v for k, v in p.items() if k != "mma"})


def test_params_check_rejects_wgmma_with_incompatible_modes():
    p = wgmma_params(50, 1024, 1024)
    params.check("gemm", p)
    bad = [{**p, "ln": RMS}, {**p, "aq": "tensor"},
           {**p, "mma": {**p["mma"], "a_mode": 1}}, {**p, "mma": {**p["mma"], "b_mode": 3}},
           {**p, "mma": {**p["mma"], "dtype": "e4m3"}},
           {**p, "a": {**p["a"], "dtype": "float32"}}]
    q = gemm_params(50, 1024, 1024, quant="fp8")
    bad.append({**q, "mma": {**p["mma"], "b_mode": 0}})
    for b in bad:  # (e4m3 without FP8 activations fails the mma.dtype check first)
        with pytest.raises(EngineFormatError, match=r"params\.mma\.(wgmma|dtype)"):
            params.check("gemm", b)
    with pytest.raises(EngineFormatError, match=r"params\.mma\.wgmma"):
        params.check("gemm", {**p, "mma": {**p["mma"], "wgmma": 1}})
    # a gated GEMM only in the wgmma kernel (the gemv family has its own)
    gated = {**p, "gated": True, "b": {**p["b"], "n": [[2048, 1024]]}}
    params.check("gemm", gated)
    params.check("gemv", {k: v for k, v in gated.items() if k != "mma"})
    for bad in ({k: v for k, v in gated.items() if k != "mma"}, {**gated, "mma": {**p["mma"], "wgmma": False}}):
        with pytest.raises(EngineFormatError, match=r"params\.gated"):
            params.check("gemm", bad)


# ---------------------------------------------------------------------------------------------- layout

def cp_async_offsets(threads: int, rows: int) -> np.ndarray:
    """Byte offset in a stage tile of element (r, k) of a [rows][64] tile, as gemm_wgmma.cuh's copies write it:
    thread t copies chunk t % 8 of rows t / 8 + (threads / 8) i to dst0 + (threads / 8) i * 128, with
    dst0 = (t / 8) * 128 + ((t % 8) ^ ((t / 8) % 8)) * 16."""
    out = np.full((rows, 64), -1)
    rstep = threads // 8
    for t in range(threads):
        ck, cr = t % 8, t // 8
        dst0 = cr * 128 + ((ck ^ (cr % 8)) * 16)
        for i in range(rows // rstep):
            out[cr + rstep * i, ck * 8:ck * 8 + 8] = dst0 + rstep * i * 128 + np.arange(8) * 2
    return out


@pytest.mark.parametrize("wg, rows", [(1, 64), (1, 128), (2, 128), (2, 64)])
def test_copies_write_the_tma_swizzle_the_descriptors_read(wg, rows):
    probe = load_probe()
    got = cp_async_offsets(128 * wg, rows)
    np.testing.assert_array_equal(got, probe.tma_sw128_offsets(rows))
    # through the descriptors: each k16 step of an m64 tile of A (warp group g's rows) and of the BN rows of B
    rng = np.random.default_rng(0)
    tile = rng.standard_normal((rows, 64))
    base = 5 * 1024  # any 1024-aligned stage address
    smem = np.zeros(base // 2 + rows * 64)
    smem[(base + got) // 2] = tile
    for kk in range(4):
        desc = gemm_probe_desc(probe, base, kk)
        np.testing.assert_array_equal(smem[probe.wgmma_operand_addresses(desc, rows) // 2],
                                      tile[:, kk * 16:kk * 16 + 16])
        if rows == 128:  # the second warp group's A: 64 rows on, 8 KB into the stage
            desc = gemm_probe_desc(probe, base + 64 * 128, kk)
            np.testing.assert_array_equal(smem[probe.wgmma_operand_addresses(desc, 64) // 2],
                                          tile[64:, kk * 16:kk * 16 + 16])


def gemm_probe_desc(probe, saddr: int, kk: int) -> int:
    return probe.sw128_desc(saddr) + 2 * kk  # the kernel's da + 2 kk: 32 bytes per k16 step


# ---------------------------------------------------------------------------------------------- engines

def test_engine_built_with_wgmma_matches_onnxruntime(samples, tmp_path, monkeypatch):
    # mlp at 80 rows (fewer would take the GEMV kernel): GEMMs with bias / activation epilogues, K 32 and 64
    model, shapes = samples / "mlp.onnx", {"x": (80, 32)}
    monkeypatch.setenv("FLASHRT_WGMMA", "0")
    default = tmp_path / "mma_sync.frt"
    build_engine(str(model), ["sm_90a"], str(default), shapes, "bf16")
    monkeypatch.delenv("FLASHRT_WGMMA")
    path = tmp_path / "wgmma.frt"
    build_engine(str(model), ["h100"], str(path), shapes, "bf16")
    ef = read_engine(path)
    gemms = [k for k in ef.manifest["kernels"] if k["family"] == "gemm"]
    assert any(k["params"]["mma"].get("wgmma") for k in gemms)
    # the first GEMM reads the float32 input: element loads (a_mode 2), so mma.sync
    assert all(bool(k["params"]["mma"].get("wgmma")) == (k["params"]["a"]["dtype"] == "bfloat16") for k in gemms)
    assert not any(k["params"].get("mma", {}).get("wgmma") for k in read_engine(default).manifest["kernels"])
    resources = ef.manifest["kernel_resources"]["sm_90a"]
    assert all(r["spill_bytes"] == 0 for r in resources.values())
    engine = flashrt.load(path, device="cpu")
    for seed in (0, 1):
        feeds = engine.example_inputs(seed)
        got, want = engine.run(feeds), onnxruntime_outputs(model, feeds)
        for name in want:
            assert rel_l2(got[name], want[name]) <= 2e-2
    # a target other than sm_90a in the build: no wgmma anywhere
    mixed = tmp_path / "mixed.frt"
    build_engine(str(model), ["h100", "b200"], str(mixed), shapes, "bf16")
    assert not any(k["params"].get("mma", {}).get("wgmma") for k in read_engine(mixed).manifest["kernels"])


def test_encoder_engine_folds_its_norms_into_wgmma_gemms(samples, tmp_path, monkeypatch):
    """The tiny encoder's LayerNorm-prologue GEMMs on bf16 activations take wgmma with the norm folded into the
    weight (ln.fold); the first one reads the float32 input (element loads), so it keeps mma.sync and its
    prologue. The engine matches onnxruntime."""
    path = tmp_path / "enc.frt"
    build_engine(str(samples / "tiny_encoder.onnx"), ["h200"], str(path), None, "bf16")
    ef = read_engine(path)
    gemms = [k for k in ef.manifest["kernels"] if k["family"] == "gemm"]
    for k in gemms:
        p, wg = k["params"], bool(k["params"]["mma"].get("wgmma"))
        assert wg == (p["a"]["dtype"] == "bfloat16"), p["mma"]
        assert not p["ln"] or p["ln"].get("fold", False) == wg
    kernels = ef.manifest["kernels"]
    folded = {i for i, k in enumerate(kernels) if k["family"] == "gemm" and (k["params"]["ln"] or {}).get("fold")}
    assert folded and all([a["name"] for a in kernels[i]["args"]][2:4] == ["ln_colsum", "ln_bias"] for i in folded)
    assert {r["kernel"] for r in ef.manifest["regions"] if "gamma folded into the weight" in r["reason"]} == folded
    engine = flashrt.load(path, device="cpu")
    feeds = engine.example_inputs(0)
    got, want = engine.run(feeds), onnxruntime_outputs(samples / "tiny_encoder.onnx", feeds)
    for name in want:
        assert rel_l2(got[name], want[name]) <= 2e-2


def test_swiglu_blocks_become_gated_wgmma_gemms(tmp_path, monkeypatch):
    """A pre-norm SwiGLU block at 40 tokens (past the GEMV's 8 rows): with wgmma, RMSNorm + x @ [Wg | Wu] +
    silu(g) * u is one gated GEMM with the norm folded (no elementwise launch); FLASHRT_WGMMA=0 keeps mma.sync
    and the separate elementwise kernel. Both match onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d, f, T = 64, 96, 40
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "gamma"),
             numpy_helper.from_array((rng.standard_normal((d, 2 * f)) * 0.1).astype(np.float32), "w_gu"),
             numpy_helper.from_array((rng.standard_normal((f, d)) * 0.1).astype(np.float32), "w_down"),
             numpy_helper.from_array(np.array([f, f], np.int64), "halves")]
    inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) * 0.2).astype(np.float32), "w_in"))
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"]),  # the stream in bf16 (the float32 input is not)
             helper.make_node("RMSNormalization", ["h", "gamma"], ["n"], epsilon=1e-6, axis=-1),
             helper.make_node("MatMul", ["n", "w_gu"], ["gu"]),
             helper.make_node("Split", ["gu", "halves"], ["g", "u"], axis=-1),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("Mul", ["silu", "u"], ["act"]), helper.make_node("MatMul", ["act", "w_down"], ["dn"]),
             helper.make_node("Add", ["h", "dn"], ["y"])]
    graph = helper.make_graph(nodes, "swiglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, d])], inits)
    model = tmp_path / "swiglu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), model)
    kinds = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHRT_WGMMA", flag)
        path = tmp_path / f"swiglu{flag}.frt"
        build_engine(str(model), ["h100"], str(path), None, "bf16")
        ef = read_engine(path)
        kinds[flag] = [r["kind"] for r in ef.manifest["regions"]]
        gated = [k["params"] for k in ef.manifest["kernels"] if k["params"].get("gated")]
        if flag == "1":
            assert len(gated) == 1 and gated[0]["mma"]["wgmma"] and gated[0]["ln"]["fold"] and gated[0]["N"] == f
        else:
            assert not gated
        engine = flashrt.load(path, device="cpu")
        feeds = {"x": np.random.default_rng(1).standard_normal((1, T, d)).astype(np.float32)}
        assert rel_l2(engine.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"]) <= 2e-2
    assert "eltwise" in kinds["0"] and "eltwise" not in kinds["1"] and len(kinds["1"]) < len(kinds["0"])
    # fp8 weights in the wgmma kernel (the default): the gated GEMM with the folded norm over E4M3 rows
    monkeypatch.setenv("FLASHRT_WGMMA", "1")
    monkeypatch.delenv("FLASHRT_WGMMA_FP8", raising=False)
    path = tmp_path / "swiglu_fp8.frt"
    build_engine(str(model), ["h100"], str(path), None, "fp8")
    gemms = [k["params"] for k in read_engine(path).manifest["kernels"] if k["family"] == "gemm"]
    gated = [p for p in gemms if p.get("gated")]
    assert len(gated) == 1 and gated[0]["mma"]["b_mode"] == 1 and gated[0]["ln"]["fold"]
    assert gated[0]["b"]["quant"] == "fp8" and all(bool(p["mma"].get("wgmma")) == (p["a"]["dtype"] == "bfloat16")
                                                    for p in gemms)
    engine = flashrt.load(path, device="cpu")
    feeds = {"x": np.random.default_rng(1).standard_normal((1, T, d)).astype(np.float32)}
    assert rel_l2(engine.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"]) <= 4e-2
    # nvfp4 weights in the wgmma kernel (opt-in): the same model, E2M1 rows with their block scales
    monkeypatch.setenv("FLASHRT_WGMMA_NVFP4", "1")
    path = tmp_path / "swiglu_nvfp4.frt"
    build_engine(str(model), ["h100"], str(path), None, "nvfp4")
    gemms = [k["params"] for k in read_engine(path).manifest["kernels"] if k["family"] == "gemm"]
    gated = [p for p in gemms if p.get("gated")]
    assert len(gated) == 1 and gated[0]["mma"]["b_mode"] == 2 and gated[0]["ln"]["fold"]
    assert gated[0]["b"]["quant"] == "nvfp4" and gated[0]["mma"]["wgmma"]
    engine = flashrt.load(path, device="cpu")
    assert rel_l2(engine.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"]) <= 0.12  # E2M1 codes: 0.105
    # flashrt inspect names each GEMM kernel's implementation
    out = subprocess.run(flashrt_cli() + ["inspect", "--json", str(tmp_path / "swiglu1.frt")], capture_output=True,
                         text=True, check=True).stdout
    variants = sorted(k["variant"] for k in json.loads(out)["kernels"] if k["family"] == "gemm")
    assert variants == ["mma.sync", "wgmma", "wgmma, norm folded, gated"], variants


# ---------------------------------------------------------------------------------------------- compile

def variants() -> list[dict]:
    """Every tile / split / dtype / epilogue shape the chooser produces for the probe's shapes, plus tails, a batch,
    fp16 and the smallest stage count."""
    out = [wgmma_params(M, N, K) for M, N, K in PROBE_SHAPES]
    out += [wgmma_params(197, 1000, 1000), wgmma_params(50, 1024, 1024, dtype="float16"),
            wgmma_params(197, 197, 64, batch=(12,))]
    layernorm = {"eps": 1e-5, "has_beta": True, "rms": False, "fold": True}
    out += [wgmma_params(50, 2560, 1024, ln={**RMS, "fold": True}), wgmma_params(197, 2304, 768, ln=layernorm),
            wgmma_params(197, 3072, 768, ln=layernorm)]
    swiglu = [["acc"], ["sigmoid", 0], ["mul", 0, 1], ["acc", 1], ["mul", 2, 3]]
    quantized = [("fp8", 1, (197, 768, 3072, None, False)), ("nvfp4", 2, (197, 3072, 768, layernorm, False))]
    for quant, b_mode, last in quantized:  # weights decoded into the B tile: fp8 (b_mode 1), nvfp4 (b_mode 2)
        for M, N, K, ln, gated in ((50, 1024, 4096, None, False), (50, 4096, 1024, {**RMS, "fold": True}, True), last):
            p = {**gemm_params(M, N, K, ln=ln, quant=quant), "gated": gated, "expr": swiglu if gated else [["acc"]]}
            p["b"] = {**p["b"], "n": [[2 * N if gated else N, K]]}
            p["mma"] = gemm_mma.config(p, 0, 0, "bfloat16", True, wgmma=True, **{f"wgmma_{quant}": True})
            assert p["mma"]["wgmma"] and p["mma"]["b_mode"] == b_mode
            out.append(p)
    for M, N, K, ln in ((50, 4096, 1024, {**RMS, "fold": True}), (197, 3072, 768, layernorm), (197, 1000, 1000, None)):
        p = {**gemm_params(M, N, K, ln=ln), "gated": True, "expr": swiglu}
        p["b"] = {**p["b"], "n": [[2 * N, K]]}
        p["mma"] = gemm_mma.config(p, 0, 0, "bfloat16", True, wgmma=True)
        assert p["mma"]["wgmma"]
        out.append(p)
    p = wgmma_params(50, 1024, 4096)
    out.append({**p, "mma": {**p["mma"], "stages": 3}})
    for bm, bn in gemm_mma.WGMMA_TILES:
        p = wgmma_params(197, 768, 3072)
        out.append({**p, "mma": {**p["mma"], "bm": bm, "bn": bn, "wg": bm // 64, "split": 2}})
    return out


def sass_tool() -> str | None:
    return CUOBJDUMP


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_every_variant_compiles_for_sm90a_without_spills(tmp_path):
    from flashrt.aot.codegen import build_cubins, kernel_source

    cases = variants()
    sources = [kernel_source("gemm", p) for p in cases]
    cubins, resources, _ = build_cubins(sources, ["sm_90a"])
    for s, p in zip(sources, cases):
        r = resources["sm_90a"][s.symbol]
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, (p["mma"], r)
    tool = sass_tool()
    if tool is None:
        pytest.skip("no cuobjdump to read the SASS")
    path = tmp_path / "wgmma.cubin"
    path.write_bytes(cubins["sm_90a"])
    sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    per_kernel = [f for f in sass.split("Function : ")[1:] if f.startswith("frt_")]  # not nvcc's helpers
    assert len(per_kernel) >= len({s.symbol for s in sources})
    for body in per_kernel:
        assert "HGMMA.64x" in body, body.splitlines()[0]
