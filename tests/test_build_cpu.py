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


def _norm_model(path, pairs: int, read_twice: bool = False, rope: bool = False):
    """`pairs` independent LayerNorm -> elementwise chains over slices of one input; the elementwise reads the
    norm's output twice (through a Reshape) with read_twice, or is a RoPE (x cos + rotate_half(x) sin) with rope."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(pairs):
        nodes += [h.make_node("Slice", ["x", f"s{i}", f"e{i}", "ax"], [f"x{i}"]),
                  h.make_node("LayerNormalization", [f"x{i}", f"g{i}"], [f"y{i}"], axis=-1)]
        inits += [nh.from_array(np.array([2 * i], np.int64), f"s{i}"),
                  nh.from_array(np.array([2 * i + 2], np.int64), f"e{i}"),
                  nh.from_array(rng.standard_normal(64).astype(np.float32), f"g{i}")]
        if read_twice:
            nodes += [h.make_node("Reshape", [f"y{i}", "shape"], [f"a{i}"]),
                      h.make_node("Mul", [f"y{i}", f"a{i}"], [f"z{i}"])]
        elif rope:
            nodes += [h.make_node("Slice", [f"y{i}", "h", "end", "last"], [f"hi{i}"]),
                      h.make_node("Slice", [f"y{i}", "zero", "h", "last"], [f"lo{i}"]),
                      h.make_node("Neg", [f"hi{i}"], [f"nhi{i}"]),
                      h.make_node("Concat", [f"nhi{i}", f"lo{i}"], [f"rot{i}"], axis=-1),
                      h.make_node("Mul", [f"y{i}", "cos"], [f"c{i}"]),
                      h.make_node("Mul", [f"rot{i}", "sin"], [f"r{i}"]),
                      h.make_node("Add", [f"c{i}", f"r{i}"], [f"z{i}"])]
        else:
            nodes.append(h.make_node("Mul", [f"y{i}", "cos"], [f"z{i}"]))
        outs.append(h.make_tensor_value_info(f"z{i}", TensorProto.FLOAT, [1, 2, 64]))
    inits += [nh.from_array(np.array([1, 2, 64], np.int64), "shape"), nh.from_array(np.array([1], np.int64), "ax"),
              nh.from_array(rng.standard_normal(64).astype(np.float32), "cos"),
              nh.from_array(rng.standard_normal(64).astype(np.float32), "sin"),
              nh.from_array(np.array([32], np.int64), "h"), nh.from_array(np.array([64], np.int64), "end"),
              nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([-1], np.int64), "last")]
    graph = h.make_graph(nodes, "norms", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2 * pairs, 64])],
                         outs, inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))


def _fp32_engine_matching_onnxruntime(folder, tol: float):
    """Build folder/m.onnx at fp32, check the CPU engine's outputs against onnxruntime's (rel-L2 <= tol) on seeded
    inputs, and return the engine."""
    build_engine(str(folder / "m.onnx"), ["sm_90a"], str(folder / "m.frt"), precision="fp32")
    engine = flashrt.load(folder / "m.frt", device="cpu")
    feeds = engine.example_inputs(0)
    got, want = engine.run(feeds), onnxruntime_outputs(folder / "m.onnx", feeds)
    for name in want:
        assert rel_l2(got[name], want[name]) <= tol, name
    return engine


@pytest.mark.parametrize("pairs, read_twice, rope", [(2, False, True), (1, True, False), (11, False, False)])
def test_norm_epilogues_match_onnxruntime(tmp_path, pairs, read_twice, rope):
    """A norm whose output only an elementwise group reads computes it as its epilogue (RoPE's rotate_half
    included), and consecutive ones share a launch (at most layernorm.MAX_PARTS); a norm output read twice by
    the group stays a separate launch."""
    from flashrt.kernels.layernorm import MAX_PARTS

    _norm_model(tmp_path / "m.onnx", pairs, read_twice, rope)
    engine = _fp32_engine_matching_onnxruntime(tmp_path, 1e-5)
    kernels = [engine.file.kernels[launch.kernel] for launch in engine.file.launches]
    norms = [k.params.get("parts", [k.params]) for k in kernels if k.family == "layernorm"]
    assert sum(len(p) for p in norms) == pairs
    if read_twice:
        assert all("epi" not in q for p in norms for q in p)
    else:
        assert all("epi" in q for p in norms for q in p) and len(norms) == -(-pairs // MAX_PARTS)


@pytest.mark.parametrize("axis, copies", [(-1, 2), (1, 3)])
def test_concat_of_one_value_is_a_view(tmp_path, axis, copies):
    """Concat(x, x, ...) (RoPE's cat(freqs, freqs)) launches nothing: its readers see x through a view with a
    stride-0 atom; the result, and a graph output that is such a Concat, match onnxruntime."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes = [h.make_node("Mul", ["x", "f"], ["m"]),
             h.make_node("Concat", ["m"] * copies, ["emb"], axis=axis),
             h.make_node("Cos", ["emb"], ["cos"]), h.make_node("Sin", ["emb"], ["sin"])]
    shape = [1, 3 * copies, 8] if axis == 1 else [1, 3, 8 * copies]
    outs = [h.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("cos", "sin", "emb")]
    f = nh.from_array(np.random.default_rng(0).standard_normal(8).astype(np.float32), "f")
    graph = h.make_graph(nodes, "cat", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])], outs, [f])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    engine = _fp32_engine_matching_onnxruntime(tmp_path, 1e-6)
    assert "concat" not in {engine.file.kernels[launch.kernel].family for launch in engine.file.launches}
