"""Sample models built into engines and run on the CPU reference executor match onnxruntime."""

import numpy as np
import pytest
from conftest import onnxruntime_outputs, rel_l2

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}


@pytest.fixture(scope="module")
def engines(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    built = {}
    for model, shapes in (("tiny_encoder", {}), ("mlp", {"x": (4, 32)})):
        for precision in TOLERANCE:
            path = out / f"{model}_{precision}.frt"
            build_engine(str(samples / f"{model}.onnx"), ["sm_90a"], str(path), shapes, precision)
            built[(model, precision)] = path
    return built


@pytest.mark.parametrize("model", ["tiny_encoder", "mlp"])
@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_matches_onnxruntime(samples, engines, model, precision):
    engine = flashrt.load(engines[(model, precision)], device="cpu")
    for seed in (0, 1):
        feeds = engine.example_inputs(seed)
        got = engine.run(feeds)
        want = onnxruntime_outputs(samples / f"{model}.onnx", feeds)
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
            err = rel_l2(got[name], want[name])
            assert err <= TOLERANCE[precision], f"{model} {precision} output {name}: rel-L2 {err:.2e}"


def test_regions_fuse_and_map_to_source_nodes(engines):
    ef = read_engine(engines[("tiny_encoder", "fp32")])
    m = ef.manifest
    regions = m["regions"]
    assert len(ef.launches) < m["provenance"]["compute_nodes"], "fusion launches fewer kernels than compute nodes"
    ops = ["+".join(r["ops"]) for r in regions]
    # q, k, v projections of one input merged into one GEMM (with their biases) that recomputes the LayerNorm in
    # its prologue; GELU's erf decomposition raised and fused; residual fused
    assert ops.count("LayerNormalization+MatMul+Add") == 2
    qkv = next(r for r in regions if "+".join(r["ops"]) == "LayerNormalization+MatMul+Add")
    assert all(any(f"attn.{p}.matmul" in n for n in qkv["source_nodes"]) for p in "qkv")
    assert ops.count("LayerNormalization+MatMul+Add+Gelu") == 2
    assert ops.count("MatMul+Add+Add") == 4
    assert all(r["source_nodes"] for r in regions)
    gelu = next(r for r in regions if "Gelu" in r["ops"])
    assert any(n.startswith("erf") for n in gelu["source_nodes"]), "the raised GELU keeps its source node names"


def test_identical_regions_share_one_kernel(engines):
    ef = read_engine(engines[("tiny_encoder", "fp32")])
    assert len(ef.kernels) < len(ef.launches)
    symbols = [ef.kernels[ln.kernel].symbol for ln in ef.launches]
    assert len(set(symbols)) == len(ef.kernels)


def test_memory_plan_reuses_the_arena(engines):
    m = read_engine(engines[("tiny_encoder", "fp32")]).manifest
    assert m["memory"]["arena_bytes"] < m["provenance"]["intermediate_bytes_without_reuse"]


def test_weights_stored_in_the_precision(engines):
    fp32 = read_engine(engines[("tiny_encoder", "fp32")]).manifest
    bf16 = read_engine(engines[("tiny_encoder", "bf16")]).manifest
    assert bf16["memory"]["weights_bytes"] < 0.6 * fp32["memory"]["weights_bytes"]
    dtypes = {w["dtype"] for w in bf16["weights"]}
    assert dtypes == {"bfloat16", "float32"}  # matrices in bf16; LayerNorm and bias vectors stay float32


def test_layout_changes_are_free(engines):
    """Attention's head split (Reshape+Transpose), K^T, and head merge (Transpose+Reshape) reach the GEMMs as
    views: no copy kernel anywhere in the encoder."""
    ef = read_engine(engines[("tiny_encoder", "fp32")])
    copies = [r for r in ef.manifest["regions"] if r["ops"] == ["Copy"]]
    assert copies == [], [r["source_nodes"] for r in copies]


def test_runs_are_repeatable(engines):
    engine = flashrt.load(engines[("tiny_encoder", "bf16")], device="cpu")
    feeds = engine.example_inputs(3)
    a, b = engine.run(feeds), engine.run(feeds)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
