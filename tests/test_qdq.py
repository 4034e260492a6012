"""Pre-quantized ONNX (QuantizeLinear / DequantizeLinear): weights keep the model's own codes and scales (fp8,
FLOAT4E2M1 blocks, ModelOpt's NVFP4 pattern), activation Q/DQ pairs and ModelOpt's dynamic NVFP4 activations
become an exact quantization that the consuming GEMM applies to its A operand, and what flashrt cannot fuse is
rejected by name. Oracles: onnxruntime, or the ONNX reference implementation
where onnxruntime has no kernel (FLOAT4E2M1 DequantizeLinear)."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import onnxruntime_outputs
from onnx import TensorProto, helper, numpy_helper

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine
from flashrt.errors import ModelError
from flashrt.kernels import expr as ex

K, N = 64, 48


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def save(path, nodes, inits, x_shape=(4, K), y_shape=(4, N), opset=21, extra_opsets=()):
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    onnx.save(helper.make_model(g, opset_imports=opsets, ir_version=10), str(path))
    return path


def weight_bytes(engine_path, suffix: str) -> np.ndarray:
    eng = read_engine(engine_path)
    (w,) = [w for w in eng.manifest["weights"] if w["name"].endswith(suffix)]
    return np.asarray(eng.weights()[w["offset"]:w["offset"] + w["nbytes"]]).view(np.uint8)


def ort_unoptimized(model, feeds: dict) -> dict:
    """onnxruntime without graph optimizations: onnxruntime 1.31's CPU graph optimizer rewrites a float8
    QuantizeLinear -> DequantizeLinear -> MatMul into something that computes a different result (errors of
    several units here); its unoptimized kernels agree with the ONNX reference implementation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def run_cpu(engine_path, x):
    return flashrt.load(engine_path, device="cpu").run({"x": x})["y"]


def test_e4m3_expression_op_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(codes[np.isfinite(codes)])
    ties = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
    x = np.concatenate([rng.standard_normal(50000) * 10.0 ** rng.uniform(-4, 3, 50000), grid, ties, -ties,
                        [448, 464, 465, 1e30, -np.inf, np.nan, 2.0**-10, 3 * 2.0**-10]]).astype(np.float32)
    got = ex.evaluate([["in", 0], ["e4m3", 0]], [x])
    want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got, want)  # NaN positions compare equal too
    assert "rintf" in ex.emit([["in", 0], ["e4m3", 0]], lambda k: "x")[0][-1]


def fp8_weight(rng, shape, axis):
    w = rng.standard_normal(shape).astype(np.float32)
    amax = np.abs(w).max(axis=1 - axis)
    scale = (amax / 448).astype(np.float32)
    shape_b = [1, 1]
    shape_b[axis] = -1
    codes = (w / scale.reshape(shape_b)).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale


@pytest.mark.parametrize("form", ["matmul_axis1", "gemm_transB_axis0", "per_tensor"])
def test_fp8_weights_keep_their_codes(tmp_path, form):
    rng = np.random.default_rng(1)
    if form == "gemm_transB_axis0":
        codes, scale = fp8_weight(rng, (N, K), 0)
        dq = helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, name="dq_w")
        mm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="proj")
        codes_nk = codes
    else:
        codes, scale = fp8_weight(rng, (K, N), 1)
        if form == "per_tensor":
            scale = np.array(scale.max(), np.float32)
            codes = (codes.astype(np.float32) * 0 + rng.standard_normal((K, N)) * 40).astype(ml_dtypes.float8_e4m3fn)
        dq = helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1, name="dq_w")
        mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
        codes_nk = np.ascontiguousarray(codes.T)
    model = save(tmp_path / "m.onnx", [dq, mm], [numpy_helper.from_array(codes, "wq"),
                                                 numpy_helper.from_array(scale, "ws")])
    x = rng.standard_normal((4, K)).astype(np.float32)
    ref = onnxruntime_outputs(model, {"x": x})["y"]
    for precision in ("fp8", "auto"):
        out = tmp_path / f"m_{precision}.frt"
        build_engine(str(model), ["sm_90a"], str(out), None, precision)
        np.testing.assert_array_equal(weight_bytes(out, "/fp8"), codes_nk.view(np.uint8).ravel())
        stored_scale = weight_bytes(out, "/fp8_scale").view(np.float32)
        np.testing.assert_array_equal(stored_scale, np.broadcast_to(scale.reshape(-1), (N,)))
        (region,) = read_engine(out).manifest["regions"]
        assert "dq_w" in region["reason"], region["reason"]
        assert cosine(run_cpu(out, x), ref) > 0.9999
    out = tmp_path / "m_fp32.frt"  # other precisions compute with the dequantized weight
    build_engine(str(model), ["sm_90a"], str(out), None, "fp32")
    np.testing.assert_allclose(run_cpu(out, x), ref, rtol=1e-5, atol=1e-5)


def test_fp8_scale_along_k_is_dequantized_with_a_warning(tmp_path):
    rng = np.random.default_rng(2)
    codes, scale = fp8_weight(rng, (K, N), 0)  # one scale per input channel
    model = save(tmp_path / "m.onnx", [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, name="dqk"),
                                       helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
                 [numpy_helper.from_array(codes, "wq"), numpy_helper.from_array(scale, "ws")])
    out = tmp_path / "m.frt"
    result = build_engine(str(model), ["sm_90a"], str(out), None, "fp8")
    assert any("dqk" in w and "input channels" in w for w in result.warnings), result.warnings
    (region,) = read_engine(out).manifest["regions"]
    assert region["reason"].startswith("fp8 (requested)")  # requantized per output channel by the planner
    x = rng.standard_normal((4, K)).astype(np.float32)
    assert cosine(run_cpu(out, x), onnxruntime_outputs(model, {"x": x})["y"]) > 0.999


def fp4_weight(rng):
    """A FLOAT4E2M1 weight [N, K] with E4M3 block codes [N, K/16] and a float32 global scale."""
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    w4 = codes.view(ml_dtypes.float4_e2m1fn)
    block = (rng.uniform(0.5, 300, (N, K // 16))).astype(ml_dtypes.float8_e4m3fn)
    return codes, w4, block, np.float32(0.003)


@pytest.mark.parametrize("pattern", ["modelopt", "float_block_scales"])
def test_nvfp4_weights_keep_their_codes(tmp_path, pattern):
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(3)
    codes, w4, block, g = fp4_weight(rng)
    inits = [numpy_helper.from_array(w4, "w4")]
    if pattern == "modelopt":  # FLOAT4E2M1 weight -> DQ(block scales = DQ(e4m3 codes, fp32 global)) -> MatMul
        nodes = [helper.make_node("DequantizeLinear", ["bs8", "g"], ["bs"], name="dq_scale", domain="trt"),
                 helper.make_node("DequantizeLinear", ["w4", "bs"], ["w"], axis=1, block_size=16, name="dq_w",
                                  domain="trt")]
        inits += [numpy_helper.from_array(block, "bs8"), numpy_helper.from_array(np.array(g), "g")]
    else:
        nodes = [helper.make_node("DequantizeLinear", ["w4", "bs"], ["w"], axis=1, block_size=16, name="dq_w")]
        g = np.float32(2.0**-7)  # float block scales that are E4M3 values times a power of two
        inits.append(numpy_helper.from_array(block.astype(np.float32) * g, "bs"))
    nodes += [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = save(tmp_path / "m.onnx", nodes, inits, opset=23, extra_opsets=["trt"] if pattern == "modelopt" else [])
    out = tmp_path / "m.frt"
    build_engine(str(model), ["sm_90a"], str(out), None, "nvfp4")
    packed = weight_bytes(out, "/nvfp4")
    np.testing.assert_array_equal(packed, (codes[:, 0::2] | (codes[:, 1::2] << 4)).ravel())  # low nibble first
    stored_block = weight_bytes(out, "/nvfp4_block")
    stored_g = weight_bytes(out, "/nvfp4_global").view(np.float32)[0]
    if pattern == "modelopt":
        np.testing.assert_array_equal(stored_block, block.view(np.uint8).ravel())
        assert stored_g == g
    else:  # the float scales decompose exactly into E4M3 codes and a global scale
        from flashrt.kernels.quant import E4M3
        np.testing.assert_array_equal(E4M3[stored_block] * stored_g, (block.astype(np.float32) * g).ravel())
    x = rng.standard_normal((4, K)).astype(np.float32)
    if pattern == "modelopt":  # the reference evaluator knows no trt domain: the standard ops are the same math
        m = onnx.load(str(model))
        for n in m.graph.node:
            n.domain = ""
        m.opset_import.pop()
        ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    else:
        ref = ReferenceEvaluator(str(model)).run(None, {"x": x})[0]
    assert cosine(run_cpu(out, x), ref) > 0.9999


def test_activation_qdq_is_an_exact_fused_fake_quantization(tmp_path):
    rng = np.random.default_rng(4)
    w1 = numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32) / 8, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32) / 8, "w2")
    s = numpy_helper.from_array(np.array(0.0123, np.float32), "s")
    zp = numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "zp")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["rq"], name="q_act"),
             helper.make_node("DequantizeLinear", ["rq", "s", "zp"], ["rd"], name="dq_act"),
             helper.make_node("MatMul", ["rd", "w2"], ["y"], name="fc2")]
    model = save(tmp_path / "m.onnx", nodes, [w1, w2, s, zp])
    out = tmp_path / "m.frt"
    build_engine(str(model), ["sm_90a"], str(out), None, "fp32")
    manifest = read_engine(out).manifest
    regions = manifest["regions"]
    # applied by fc2 to its A operand as it stages it, after fc1's ReLU epilogue wrote A: no extra kernel
    assert len(regions) == 2 and regions[1]["ops"] == ["FakeQuantFP8", "MatMul"], regions
    assert manifest["kernels"][regions[1]["kernel"]]["params"]["aq"] == "tensor"
    x = rng.standard_normal((4, K)).astype(np.float32) * 4
    ref = ort_unoptimized(model, {"x": x})["y"]
    np.testing.assert_allclose(run_cpu(out, x), ref, rtol=1e-4, atol=1e-4)
    # the fake quantization is really there: without it the result differs by the FP8 rounding
    h = np.maximum(x @ numpy_helper.to_array(w1), 0)
    assert np.abs(h @ numpy_helper.to_array(w2) - ref).max() > 1e-3


def _fp4_activation_nodes(block_size=16, s_scale="g"):
    """ModelOpt's dynamic NVFP4 activations before fc: TRT_FP4DynamicQuantize, the block scales' DequantizeLinear
    by the global scale, the values' blocked DequantizeLinear."""
    return [helper.make_node("TRT_FP4DynamicQuantize", ["x", "g"], ["xq", "xs"], domain="trt", name="act_fp4",
                             axis=-1, block_size=16, scale_type=17),
            helper.make_node("DequantizeLinear", ["xs", s_scale], ["bs"], domain="trt", name="dq_scales"),
            helper.make_node("DequantizeLinear", ["xq", "bs"], ["xd"], domain="trt", name="dq_values", axis=-1,
                             block_size=block_size),
            helper.make_node("MatMul", ["xd", "w"], ["y"], name="fc")]


def test_dynamic_fp4_activations_are_quantized_by_the_gemm(tmp_path):
    """TensorRT's NVFP4 activation recipe, computed independently here with ml_dtypes: per 16 values the E4M3
    block scale of max |x| / 6 / g, then E2M1 values; flashrt's GEMM computes the block scales as it stages A."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)).astype(np.float32) / 8
    x = rng.standard_normal((4, K)).astype(np.float32) * np.linspace(0.1, 4, K, dtype=np.float32)
    g = np.float32(np.abs(x).max() / (6 * 448))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(g, np.float32), "g")]
    model = save(tmp_path / "m.onnx", _fp4_activation_nodes(), inits, extra_opsets=["trt"])
    out = tmp_path / "m.frt"
    build_engine(str(model), ["sm_120a"], str(out), None, "fp32")
    manifest = read_engine(out).manifest
    (region,) = manifest["regions"]
    assert region["ops"] == ["FakeQuantNVFP4", "MatMul"] and region["source_nodes"][0] == "act_fp4"
    assert manifest["kernels"][region["kernel"]]["params"]["aq"] == "nvfp4"
    blocks = x.reshape(4, K // 16, 16)
    scale = (np.abs(blocks).max(-1, keepdims=True) / 6 / g).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * g
    values = np.clip(blocks / scale, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    want = (values * scale).reshape(4, K) @ w
    np.testing.assert_allclose(run_cpu(out, x), want, rtol=1e-5, atol=1e-5)
    assert np.abs(x @ w - want).max() > 1e-2  # the quantization is really there


@pytest.mark.parametrize("nodes, match", [
    (_fp4_activation_nodes(block_size=32), "dq_values.*block_size 16 along axis -1"),
    (_fp4_activation_nodes(s_scale="g2"), "dq_scales.*same constant global scale"),
])
def test_unsupported_fp4_activation_patterns_are_named(tmp_path, nodes, match):
    inits = [numpy_helper.from_array(np.ones((K, N), np.float32), "w"),
             numpy_helper.from_array(np.array(0.01, np.float32), "g"),
             numpy_helper.from_array(np.array(0.02, np.float32), "g2")]
    model = save(tmp_path / "m.onnx", nodes, inits, extra_opsets=["trt"])
    with pytest.raises(ModelError, match=match):
        build_engine(str(model), ["sm_90a"], str(tmp_path / "m.frt"), None, "nvfp4")
    assert not (tmp_path / "m.frt").exists()
