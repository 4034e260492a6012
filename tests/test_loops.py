"""Loops in one launch list: ONNX Loop with a constant trip count unrolled at import, If with a constant condition
inlined, per-step constants (time embeddings) folded, and common-subexpression elimination computing
step-invariant work once. onnxruntime on the source model is the oracle; the CPU reference executor runs the
engine."""

import numpy as np
import onnx
import pytest
from conftest import onnxruntime_outputs, rel_l2
from onnx import TensorProto, helper, numpy_helper

import flashrt
from flashrt.aot.build import build_engine
from flashrt.aot.importers.onnx_import import import_onnx
from flashrt.aot.ir import Graph, Node, Value
from flashrt.aot.passes import eliminate_common_subexpressions
from flashrt.engine_format.reader import read_engine
from flashrt.errors import ModelError

STEPS, TOKENS, WIDTH, PREFIX, PREFIX_WIDTH, FREQS = 10, 50, 32, 16, 24, 8
DT = -1.0 / STEPS
FP32 = TensorProto.FLOAT


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[0] ** -0.5)).astype(np.float32)

    return {"wk": w(PREFIX_WIDTH, WIDTH), "wv": w(PREFIX_WIDTH, WIDTH), "bk": w(WIDTH, scale=0.1),
            "freqs": np.exp(-np.arange(FREQS, dtype=np.float32) * 0.5).astype(np.float32) * 10,
            "wt1": w(2 * FREQS, WIDTH), "bt1": w(WIDTH, scale=0.1), "wt2": w(WIDTH, WIDTH),
            "wq": w(WIDTH, WIDTH), "w1": w(WIDTH, 2 * WIDTH), "b1": w(2 * WIDTH, scale=0.1), "w2": w(2 * WIDTH, WIDTH)}


def _const(name: str, value, dtype=np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name))


def _velocity_nodes(k: str, v: str) -> list[onnx.NodeProto]:
    """Body of one denoise step: i, x -> t = 1 + i*dt, sinusoidal embedding of t, time MLP, attention of x over the
    prefix keys/values k, v (outer-scope names), MLP velocity, x + dt*v; also the step's mean as a scan value."""
    mk = helper.make_node
    return [
        mk("Cast", ["i"], ["i_f"], to=FP32),
        _const("dt", DT), _const("one", 1.0), _const("scale", WIDTH ** -0.5),
        mk("Mul", ["i_f", "dt"], ["i_dt"]), mk("Add", ["one", "i_dt"], ["t"]),
        mk("Mul", ["t", "freqs"], ["arg"]), mk("Sin", ["arg"], ["sin"]), mk("Cos", ["arg"], ["cos"]),
        mk("Concat", ["sin", "cos"], ["emb"], axis=0), mk("Unsqueeze", ["emb", "axis0"], ["emb2"]),
        mk("MatMul", ["emb2", "wt1"], ["th"]), mk("Add", ["th", "bt1"], ["thb"]), mk("Sigmoid", ["thb"], ["tsig"]),
        mk("Mul", ["thb", "tsig"], ["tsilu"]), mk("MatMul", ["tsilu", "wt2"], ["temb"]),
        mk("MatMul", ["x_in", "wq"], ["q"]), mk("Transpose", [k], ["kt"], perm=[0, 2, 1]),
        mk("MatMul", ["q", "kt"], ["s"]), mk("Mul", ["s", "scale"], ["ss"]), mk("Softmax", ["ss"], ["p"], axis=-1),
        mk("MatMul", ["p", v], ["att"]), mk("Add", ["x_in", "att"], ["h0"]), mk("Add", ["h0", "temb"], ["h"]),
        mk("MatMul", ["h", "w1"], ["u"]), mk("Add", ["u", "b1"], ["ub"]), mk("Tanh", ["ub"], ["ut"]),
        mk("MatMul", ["ut", "w2"], ["vel"]), mk("Mul", ["vel", "dt"], ["step"]), mk("Add", ["x_in", "step"], ["x_out"]),
        mk("ReduceMean", ["x_out"], ["x_mean"], axes=[2], keepdims=0),
        mk("Identity", ["cond_in"], ["cond_out"]),
    ]


def _projection_nodes(prefix: str) -> list[onnx.NodeProto]:
    mk = helper.make_node
    return [mk("MatMul", [prefix, "wk"], ["k_mm"], name="prefix_k"), mk("Add", ["k_mm", "bk"], ["k"], name="prefix_kb"),
            mk("MatMul", [prefix, "wv"], ["v"], name="prefix_v")]


def flow_model(projection_in_body: bool = False, trip: int = STEPS, trip_from_input: bool = False) -> onnx.ModelProto:
    """x (noise) -> Loop(trip) of x <- x + dt * v(x, t); the prefix projection before the loop (outer scope) or,
    with projection_in_body, repeated inside the body as a naive export would write it."""
    body_nodes = _velocity_nodes("k", "v")
    if projection_in_body:
        body_nodes = _projection_nodes("prefix") + body_nodes
    body = helper.make_graph(
        body_nodes, "denoise_step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", FP32, [1, TOKENS, WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", FP32, [1, TOKENS, WIDTH]),
         helper.make_tensor_value_info("x_mean", FP32, [1, TOKENS])])
    nodes = [] if projection_in_body else _projection_nodes("prefix")
    inputs = [helper.make_tensor_value_info("x", FP32, [1, TOKENS, WIDTH]),
              helper.make_tensor_value_info("prefix", FP32, [1, PREFIX, PREFIX_WIDTH])]
    trip_name = "trip"
    if trip_from_input:  # a trip count read from an input's values: not fixed at build time
        inputs.append(helper.make_tensor_value_info("steps", TensorProto.INT64, []))
        trip_name = "steps"
    nodes += [_const("true", True, np.bool_),
              helper.make_node("Loop", [trip_name, "true", "x"], ["x_final", "means"], name="denoise", body=body)]
    inits = [numpy_helper.from_array(a, n) for n, a in _weights().items()]
    inits += [numpy_helper.from_array(np.array(trip, np.int64), "trip"),
              numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    graph = helper.make_graph(nodes, "flow", inputs,
                              [helper.make_tensor_value_info("x_final", FP32, [1, TOKENS, WIDTH]),
                               helper.make_tensor_value_info("means", FP32, [trip, 1, TOKENS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float32),
            "prefix": rng.standard_normal((1, PREFIX, PREFIX_WIDTH)).astype(np.float32)}


def _build_and_compare(model_path, tmp_path, feeds=None):
    engine_path = tmp_path / "engine.frt"
    build_engine(str(model_path), ["sm_90a"], str(engine_path))
    engine = flashrt.load(engine_path, device="cpu")
    feeds = feeds or _feeds()
    got, want = engine.run(feeds), onnxruntime_outputs(model_path, feeds)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert rel_l2(got[name], want[name]) <= 1e-5, f"{name}: rel-L2 {rel_l2(got[name], want[name]):.2e}"
    return read_engine(engine_path).manifest


def _regions_from(manifest: dict, source: str) -> list[dict]:
    return [r for r in manifest["regions"] if any(s == source or s.endswith("/" + source) for s in r["source_nodes"])]


MATMULS = 2 + 5 * STEPS  # prefix K and V once; per step q, scores, p@v, two MLP layers (the time MLP folds)
LAUNCHES = 2 + 6 * STEPS + 1  # prefix K, V; per step q, attention, residual adds, 2 MLP GEMMs, mean; scan concat


def _matmuls(manifest: dict) -> int:
    return sum(r["ops"].count("MatMul") for r in manifest["regions"])


@pytest.mark.parametrize("projection_in_body", [False, True], ids=["outer_scope_projection", "projection_per_step"])
def test_denoise_loop_is_one_launch_list(tmp_path, projection_in_body):
    path = tmp_path / "flow.onnx"
    onnx.save(flow_model(projection_in_body), str(path))
    manifest = _build_and_compare(path, tmp_path)
    prefix_k = _regions_from(manifest, "prefix_k")
    assert len(prefix_k) == 1, "the prefix projection is computed once"
    assert _matmuls(manifest) == MATMULS
    assert len(manifest["regions"]) <= LAUNCHES
    assert not any(op in ("Sin", "Cos", "Sigmoid") for r in manifest["regions"] for op in r["ops"]), \
        "the time embedding and time MLP fold to constants"
    cse = manifest["provenance"]["common_subexpressions"]
    if projection_in_body:  # 3 projection nodes and K's transpose repeat in steps 1..9
        assert cse["nodes_removed"] == 4 * (STEPS - 1)
        assert len(prefix_k[0]["source_nodes"]) >= STEPS, "the merged region names every step's copy"
    else:  # only the transpose of the outer-scope K repeats
        assert cse["nodes_removed"] == STEPS - 1
    assert cse["constants_removed"] > 0  # the body's Constant nodes (dt, 1, scale) per step
    assert manifest["provenance"]["loop_steps"] == STEPS  # `flashrt run` / `bench` report chunks/s


class _Flow:
    """The same denoiser in PyTorch, unrolled by the exporter's trace; the prefix projection is written inside the
    velocity function, so a naive export repeats it per step."""

    @staticmethod
    def module():
        import torch

        class Flow(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for n, a in _weights().items():
                    self.register_buffer(n, torch.from_numpy(a))

            def velocity(self, x, prefix, t):
                k = prefix @ self.wk + self.bk
                v = prefix @ self.wv
                arg = t * self.freqs
                emb = torch.cat([torch.sin(arg), torch.cos(arg)])[None]
                temb = torch.nn.functional.silu(emb @ self.wt1 + self.bt1) @ self.wt2
                p = torch.softmax((x @ self.wq) @ k.transpose(1, 2) * WIDTH ** -0.5, dim=-1)
                h = x + p @ v + temb
                return torch.tanh(h @ self.w1 + self.b1) @ self.w2

            def forward(self, x, prefix):
                means = []
                for i in range(STEPS):
                    t = torch.full((), 1.0 + i * DT)
                    x = x + DT * self.velocity(x, prefix, t)
                    means.append(x.mean(-1))
                return x, torch.stack(means)

        return Flow().eval()


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo_unoptimized"])
def test_torch_unrolled_export(tmp_path, exporter):
    torch = pytest.importorskip("torch")
    path = tmp_path / "flow.onnx"
    feeds = _feeds()
    args = (torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["prefix"]))
    kwargs = {"dynamo": exporter != "legacy", "opset_version": 17 if exporter == "legacy" else 18}
    if exporter == "dynamo_unoptimized":
        kwargs["optimize"] = False  # no exporter-side CSE: the projection stays repeated per step
    try:
        torch.onnx.export(_Flow.module(), args, str(path), input_names=["x", "prefix"],
                          output_names=["x_final", "means"], **kwargs)
    except Exception as e:  # the dynamo exporter needs onnxscript
        if exporter == "legacy":
            raise
        pytest.skip(f"torch.onnx.export(dynamo=True) unavailable: {type(e).__name__}: {str(e)[:100]}")
    manifest = _build_and_compare(path, tmp_path)
    assert _matmuls(manifest) == MATMULS, "step-invariant projections computed once, time MLP folded"
    assert len(manifest["regions"]) <= LAUNCHES
    cse = manifest["provenance"]["common_subexpressions"]
    if exporter == "dynamo_unoptimized":
        assert cse["nodes_removed"] >= 3 * (STEPS - 1)


def test_iteration_folds_a_loop_carried_condition(tmp_path):
    """cond_out = (i < 2) folds per iteration: the loop stops after 3 of its 10 iterations, as onnxruntime does."""
    mk = helper.make_node
    body = helper.make_graph(
        [mk("Mul", ["x_in", "x_in"], ["sq"]), mk("Add", ["sq", "x_in"], ["x_out"]),
         mk("Less", ["i", "two"], ["cond_out"]), mk("Identity", ["x_out"], ["scan"])],
        "step", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("x_in", FP32, [4, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", FP32, [4, 8]), helper.make_tensor_value_info("scan", FP32, [4, 8])])
    graph = helper.make_graph(
        [mk("Loop", ["trip", "cond", "x"], ["y", "ys"], name="until", body=body)], "g",
        [helper.make_tensor_value_info("x", FP32, [4, 8])],
        [helper.make_tensor_value_info("y", FP32, [4, 8]), helper.make_tensor_value_info("ys", FP32, None)],
        [numpy_helper.from_array(np.array(10, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond"),
         numpy_helper.from_array(np.array(2, np.int64), "two")])
    path = tmp_path / "until.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    feeds = {"x": np.random.default_rng(0).uniform(-0.5, 0.5, (4, 8)).astype(np.float32)}
    manifest = _build_and_compare(path, tmp_path, feeds)
    assert manifest["outputs"][1]["shape"] == [3, 4, 8]


def _nested_model() -> onnx.ModelProto:
    """Loop(3) whose body runs an inner Loop(2) reading a value of the outer body, and an If on (i == 0) with an
    initializer of its own; the graph's output comes from a top-level If whose condition folds from a shape."""
    mk, vi = helper.make_node, helper.make_tensor_value_info
    inner = helper.make_graph(
        [mk("Add", ["y_in", "h"], ["y_out"])], "inner",
        [vi("j", TensorProto.INT64, []), vi("c2", TensorProto.BOOL, []), vi("y_in", FP32, [2, 4])],
        [vi("c2", TensorProto.BOOL, []), vi("y_out", FP32, [2, 4])])
    then_branch = helper.make_graph([mk("Add", ["yi", "one"], ["z_then"])], "then", [], [vi("z_then", FP32, [2, 4])])
    else_branch = helper.make_graph([mk("Tanh", ["yi"], ["yt"]), mk("Mul", ["yt", "w"], ["z_else"])], "else", [],
                                    [vi("z_else", FP32, [2, 4])],
                                    [numpy_helper.from_array(np.array([1.5, -2, 0.5, 3], np.float32), "w")])
    body = helper.make_graph(
        [mk("Mul", ["xa", "two"], ["h"]),
         mk("Loop", ["inner_trip", "", "xa"], ["yi"], name="inner", body=inner),
         mk("Equal", ["i", "zero"], ["is0"]),
         mk("If", ["is0"], ["z"], name="first", then_branch=then_branch, else_branch=else_branch)],
        "outer", [vi("i", TensorProto.INT64, []), vi("c", TensorProto.BOOL, []), vi("xa", FP32, [2, 4])],
        [vi("c", TensorProto.BOOL, []), vi("z", FP32, [2, 4]), vi("z", FP32, [2, 4])])
    pick_a = helper.make_graph([mk("Sigmoid", ["x_end"], ["out_a"])], "a", [], [vi("out_a", FP32, [2, 4])])
    pick_b = helper.make_graph([mk("Neg", ["x_end"], ["out_b"])], "b", [], [vi("out_b", FP32, [2, 4])])
    graph = helper.make_graph(
        [mk("Loop", ["trip", "", "x"], ["x_end", "zs"], name="outer", body=body),
         mk("Size", ["x"], ["size"]), mk("Greater", ["size", "zero"], ["big"]),
         mk("If", ["big"], ["out"], name="pick", then_branch=pick_a, else_branch=pick_b)],
        "nested", [vi("x", FP32, [2, 4])], [vi("out", FP32, [2, 4]), vi("zs", FP32, [3, 2, 4])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip"),
         numpy_helper.from_array(np.array(2, np.int64), "inner_trip"),
         numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.float32(2), "two"),
         numpy_helper.from_array(np.float32(1), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_nested_loops_and_constant_ifs(tmp_path):
    path = tmp_path / "nested.onnx"
    onnx.save(_nested_model(), str(path))
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    manifest = _build_and_compare(path, tmp_path, feeds)
    ops = [op for r in manifest["regions"] for op in r["ops"]]
    assert "Neg" not in ops and ops.count("Tanh") == 2, "only the taken branches are compiled"


# ---- errors ------------------------------------------------------------------------------------------------------

def _import_error(model: onnx.ModelProto, tmp_path) -> str:
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError) as e:
        import_onnx(str(path))
    return str(e.value)


def test_trip_count_from_an_input_is_a_clear_error(tmp_path):
    message = _import_error(flow_model(trip_from_input=True), tmp_path)
    assert "node 'denoise' (Loop)" in message and "trip count 'steps' depends on the graph's inputs" in message


def test_trip_count_over_the_unroll_limit_is_a_clear_error(tmp_path):
    message = _import_error(flow_model(trip=1_000_000), tmp_path)
    assert "node 'denoise' (Loop)" in message and "1,000,000 iterations" in message and "limit" in message


def _with_node_replaced(model: onnx.ModelProto, name: str, *new_nodes: onnx.NodeProto) -> onnx.ModelProto:
    nodes = []
    for n in model.graph.node:
        nodes.extend(new_nodes if n.name == name else [n])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_data_dependent_conditions_are_clear_errors(tmp_path):
    model = flow_model()
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    reduce = helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="total")
    positive = helper.make_node("Greater", ["total", "zero_f"], ["go"], name="positive")
    zero = _const("zero_f", 0.0)
    loop.input[1] = "go"
    model = _with_node_replaced(model, "denoise", zero, reduce, positive, loop)
    message = _import_error(model, tmp_path)
    assert "node 'denoise' (Loop)" in message and "loop condition 'go' depends on the graph's inputs" in message

    vi = helper.make_tensor_value_info
    branch = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "b", [], [vi("y", FP32, [2])])
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                               helper.make_node("Greater", ["s", "zero"], ["c"]),
                               helper.make_node("If", ["c"], ["y"], name="choose", then_branch=branch,
                                                else_branch=branch)],
                              "g", [vi("x", FP32, [2])], [vi("y", FP32, [2])],
                              [numpy_helper.from_array(np.float32(0), "zero")])
    message = _import_error(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    assert "node 'choose' (If)" in message and "condition 'c' depends on the graph's inputs" in message


def test_unsupported_op_inside_a_loop_body_is_named(tmp_path):
    model = flow_model()
    body = next(n for n in model.graph.node if n.op_type == "Loop").attribute[0].g
    body.node.append(helper.make_node("Hardmax", ["x_out"], ["hm"], name="body_hardmax"))
    message = _import_error(model, tmp_path)
    assert "unsupported ops: Hardmax (nodes: body_hardmax)" in message


# ---- common-subexpression elimination on the IR -----------------------------------------------------------------

def _graph(nodes: list[Node], constants: dict[str, np.ndarray], outputs: list[str]) -> Graph:
    values = {"x": Value("x", "float32", (2, 4))}
    for name, arr in constants.items():
        values[name] = Value(name, str(arr.dtype), arr.shape)
    for n in nodes:
        for o in n.outputs:
            values[o] = Value(o, "float32", (2, 4))
    return Graph("g", ["x"], outputs, nodes, values, dict(constants))


def test_cse_merges_duplicate_chains_and_constants():
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    nodes = [Node("MatMul", "mm1", ["x", "w1"], ["a1"]), Node("MatMul", "mm2", ["x", "w2"], ["a2"]),
             Node("Add", "add1", ["a1", "x"], ["b1"]), Node("Add", "add2", ["x", "a2"], ["b2"]),  # commuted
             Node("Mul", "mul", ["b1", "b2"], ["y"]),
             Node("Sub", "sub1", ["y", "zero"], ["z1"]), Node("Sub", "sub2", ["y", "negzero"], ["z2"]),
             Node("Add", "out", ["z1", "z2"], ["z"])]
    g = _graph(nodes, {"w1": w, "w2": w.copy(), "zero": np.float32(0.0), "negzero": np.float32(-0.0)}, ["z"])
    assert eliminate_common_subexpressions(g) == (2, 1)
    assert sorted(g.constants) == ["negzero", "w1", "zero"], "-0.0 and 0.0 differ in their bytes: both stay"
    assert [n.name for n in g.nodes] == ["mm1", "add1", "mul", "sub1", "sub2", "out"]
    assert g.nodes[2].inputs == ["b1", "b1"]
    assert g.nodes[0].source == ["mm1", "mm2"] and g.nodes[1].source == ["add1", "add2"]
    assert eliminate_common_subexpressions(g) == (0, 0), "one pass reaches the fixpoint"


def test_cse_keeps_nodes_that_differ_or_produce_graph_outputs():
    nodes = [Node("Softmax", "s0", ["x"], ["a"], {"axis": -1}), Node("Softmax", "s1", ["x"], ["b"], {"axis": 0}),
             Node("Sub", "d0", ["a", "b"], ["c"]), Node("Sub", "d1", ["b", "a"], ["d"]),  # not commutative
             Node("Relu", "r0", ["c"], ["y0"]), Node("Relu", "r1", ["c"], ["y1"])]
    g = _graph(nodes, {}, ["d", "y0", "y1"])
    assert eliminate_common_subexpressions(g) == (0, 0)
    assert len(g.nodes) == 6


def test_merged_constant_read_as_gemm_weight_and_as_operand(tmp_path):
    """CSE makes c and its copy c2 one constant, read by a GEMM (stored transposed) and by an Add (as it is): the
    two reads must not share one buffer."""
    c = np.arange(16, dtype=np.float32).reshape(4, 4)
    mk = helper.make_node
    graph = helper.make_graph(
        [mk("MatMul", ["x", "c"], ["y"]), mk("Relu", ["x"], ["r"]), mk("Add", ["r", "c2"], ["z"]),
         mk("Add", ["y", "z"], ["out"])], "g",
        [helper.make_tensor_value_info("x", FP32, [4, 4])], [helper.make_tensor_value_info("out", FP32, [4, 4])],
        [numpy_helper.from_array(c, "c"), numpy_helper.from_array(c.copy(), "c2")])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    manifest = _build_and_compare(path, tmp_path, {"x": np.random.default_rng(0).standard_normal((4, 4))
                                                   .astype(np.float32)})
    assert manifest["provenance"]["common_subexpressions"]["constants_removed"] == 1
