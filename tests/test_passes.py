"""Pattern passes: exporter decompositions are raised to the ops that fuse, and stay correct."""

import numpy as np
import onnx
import pytest
from conftest import onnxruntime_outputs, rel_l2
from onnx import TensorProto, helper, numpy_helper

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine

K, N = 64, 32


def _rmsnorm_model(variant: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(K)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32) / 8, "proj")]
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="upcast")]
    if variant == "pow_reciprocal":
        nodes += [helper.make_node("Pow", ["xf", "two"], ["sq"], name="pow")]
    else:
        nodes += [helper.make_node("Mul", ["xf", "xf"], ["sq"], name="square")]
    nodes += [helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1, name="mean"),
              helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
              helper.make_node("Sqrt", ["ve"], ["rs"], name="sqrt")]
    if variant == "pow_reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rs"], ["inv"], name="recip"),
                  helper.make_node("Mul", ["xf", "inv"], ["normed"], name="scale_x")]
    else:
        nodes += [helper.make_node("Div", ["xf", "rs"], ["normed"], name="div_x")]
    nodes += [helper.make_node("Mul", ["w", "normed"], ["h"], name="weight"),
              helper.make_node("MatMul", ["h", "proj"], ["q"], name="q_proj"),
              helper.make_node("Sigmoid", ["q"], ["sig"], name="sig"),
              helper.make_node("Mul", ["q", "sig"], ["y"], name="silu")]
    g = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("variant", ["pow_reciprocal", "mul_div"])
def test_rmsnorm_decomposition_is_raised_and_fused(tmp_path, variant):
    path = tmp_path / "m.onnx"
    onnx.save(_rmsnorm_model(variant), path)
    out = tmp_path / "m.frt"
    build_engine(str(path), ["sm_90a"], str(out))
    regions = read_engine(out).manifest["regions"]
    assert len(regions) == 1, [r["ops"] for r in regions]  # norm in the prologue, SiLU in the epilogue
    assert regions[0]["ops"] == ["RMSNormalization", "MatMul", "Sigmoid", "Mul"]
    assert {"pow", "square", "mean", "sqrt", "weight"} & set(regions[0]["source_nodes"])
    eng = flashrt.load(out, device="cpu")
    feeds = eng.example_inputs()
    want = onnxruntime_outputs(path, feeds)["y"]
    assert rel_l2(eng.run(feeds)["y"], want) < 1e-5
