"""A Concat along the key axis that only attention reads is read in place (aot/partition.py): the action expert's
pattern -- T action tokens attending to [prefix K/V given as inputs; their own K/V from the QKV GEMM], GQA by
Unsqueeze-Expand-Reshape -- at small size, built for sm_90a at fp32 (SIMT attention) and bf16 (tensor-core
attention; the float32 prefix inputs converted to bf16 in one first launch), run on the CPU reference executor
against onnxruntime. The Concat stays a launch where its output has another consumer. Where a GPU is present, the
same engines run through the CUDA loader."""

import numpy as np
import onnx
import pytest
from conftest import GPU_ARCH, onnxruntime_outputs, rel_l2, requires_gpu
from onnx import TensorProto, helper, numpy_helper

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine

HIDDEN, HEADS, HD, T, P = 64, 4, 32, 20, 37  # 4 heads over 1 KV head; 20 action tokens, a 37-token prefix
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
VARIANTS = {"expert": {}, "hd64": {"hd": 64}, "sink": {"sink": True}, "other consumer": {"other_consumer": True}}


def expert_model(hd: int = HD, sink: bool = False, other_consumer: bool = False) -> onnx.ModelProto:
    """One action-expert attention block. sink: a constant key/value row before the prefix (3 sources, one a
    weight); other_consumer: the K Concat's output also feeds a ReduceMean that is a second output."""
    rng = np.random.default_rng(0)
    S = int(sink) + P + T

    def weight(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def ints(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    inits = [weight("w_qkv", HIDDEN, (HEADS + 2) * hd, scale=HIDDEN ** -0.5),
             weight("w_o", HEADS * hd, HIDDEN, scale=(HEADS * hd) ** -0.5),
             ints("split", [HEADS * hd, hd, hd]), ints("q_shape", [1, T, HEADS, hd]), ints("kv_shape", [1, T, 1, hd]),
             ints("axes", [2]), ints("expand", [1, 1, HEADS, S, hd]), ints("heads", [1, HEADS, S, hd]),
             ints("merge", [1, T, HEADS * hd]), numpy_helper.from_array(np.array(hd ** -0.5, np.float32), "scale")]
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "w_qkv"], ["qkv"]), mk("Split", ["qkv", "split"], ["q", "k", "v"], axis=-1),
             mk("Reshape", ["q", "q_shape"], ["q4"]), mk("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3])]
    for n in "kv":
        if sink:
            inits.append(weight(f"sink_{n}", 1, 1, 1, hd, scale=1.0))
        nodes += [mk("Reshape", [n, "kv_shape"], [f"{n}4"]), mk("Transpose", [f"{n}4"], [f"{n}h"], perm=[0, 2, 1, 3]),
                  mk("Concat", [f"sink_{n}"] * sink + [f"prefix_{n}", f"{n}h"], [f"{n}c"], axis=2, name=f"concat_{n}"),
                  mk("Unsqueeze", [f"{n}c", "axes"], [f"{n}u"]), mk("Expand", [f"{n}u", "expand"], [f"{n}e"]),
                  mk("Reshape", [f"{n}e", "heads"], [f"{n}r"])]
    nodes += [mk("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]), mk("MatMul", ["qh", "kt"], ["s"]),
              mk("Mul", ["s", "scale"], ["s2"]), mk("Softmax", ["s2"], ["p"], axis=-1),
              mk("MatMul", ["p", "vr"], ["o"]),
              mk("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), mk("Reshape", ["ot", "merge"], ["om"]),
              mk("MatMul", ["om", "w_o"], ["proj"]), mk("Add", ["x", "proj"], ["y"])]
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, [1, T, HIDDEN])] + \
        [helper.make_tensor_value_info(f"prefix_{n}", f32, [1, 1, P, hd]) for n in "kv"]
    outputs = [helper.make_tensor_value_info("y", f32, [1, T, HIDDEN])]
    if other_consumer:
        nodes.append(mk("ReduceMean", ["kc"], ["k_mean"], axes=[2], keepdims=0))
        outputs.append(helper.make_tensor_value_info("k_mean", f32, [1, 1, hd]))
    graph = helper.make_graph(nodes, "expert_block", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build(variant, precision, arch) -> (onnx path, engine path), each built once."""
    out = tmp_path_factory.mktemp("kv_concat")
    cache = {}

    def build(variant: str, precision: str, arch: str = "sm_90a"):
        key = (variant, precision, arch)
        if key not in cache:
            onnx_path = out / f"{variant.replace(' ', '_')}.onnx"
            if not onnx_path.exists():
                onnx.save(expert_model(**VARIANTS[variant]), onnx_path)
            path = out / f"{variant.replace(' ', '_')}_{precision}_{arch}.frt"
            build_engine(str(onnx_path), [arch], str(path), None, precision)
            cache[key] = (onnx_path, path)
        return cache[key]

    return build


def matches_onnxruntime(onnx_path, path, precision: str, device: str = "cpu") -> None:
    engine = flashrt.load(path, device=device)
    for seed in (0, 1):
        feeds = engine.example_inputs(seed)
        got, want = engine.run(feeds), onnxruntime_outputs(onnx_path, feeds)
        assert set(got) == set(want)
        for name in want:
            err = rel_l2(got[name], want[name])
            assert err <= TOLERANCE[precision], f"{path.name} {device} {name}: rel-L2 {err:.2e}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["expert", "hd64", "sink"])
def test_concat_is_read_in_place(built, variant, precision):
    onnx_path, path = built(variant, precision)
    ef = read_engine(path)
    regions = ef.manifest["regions"]
    assert not any("Concat" in r["ops"] for r in regions if r["kind"] != "attention"), "a Concat launch is left"
    (attention,) = [r for r in regions if r["kind"] == "attention"]
    assert attention["ops"][:2] == ["Concat", "Concat"] and {"concat_k", "concat_v"} <= set(attention["source_nodes"])
    kernel = ef.manifest["kernels"][attention["kernel"]]
    p = kernel["params"]
    keys = [1] * (variant == "sink") + [P, T]
    assert [s["keys"] for s in p["k"]["sources"]] == keys and [s["keys"] for s in p["v"]["sources"]] == keys
    names = [f"{n}{i or ''}" for n in "kv" for i in range(len(keys))]
    assert [a["name"] for a in kernel["args"]] == ["q"] + names + ["out"]
    assert ("mma" in p) == (precision == "bf16")
    if "mma" in p:  # every source (the converted prefix, the QKV GEMM's output, the sink weight) 16-byte aligned
        assert p["mma"]["k_chunks"] and p["mma"]["v_chunks"]
    # fp32: no launch but the block's own; bf16: the float32 prefix inputs converted to bf16, both in the first one
    converts = [r for r in regions if r["kind"] == "concat"]
    if precision == "fp32":
        assert not converts and len(ef.launches) == 3  # QKV GEMM, attention, o-proj + residual
    else:
        assert [(c["ops"], c["launches"]) for c in converts] == [(["Cast", "Cast"], [0])]
        assert set(converts[0]["source_nodes"]) == {"concat_k", "concat_v"} and len(ef.launches) == 4
        # whole inputs into 16-byte aligned slots: 8 elements per thread (head dims 32 / 64: multiples of 8)
        assert ef.manifest["kernels"][converts[0]["kernel"]]["params"]["vec"] == 8
    matches_onnxruntime(onnx_path, path, precision)


def test_concat_vector_path_is_validated():
    from flashrt.errors import EngineFormatError
    from flashrt.kernels import params

    p = {"shape": [48], "axis": 0, "out_dtype": "bfloat16", "vec": 8,
         "inputs": [{"dtype": "float32", "size": 16, "atoms": [[16, 1]]}, {"dtype": "float32", "size": 32,
                                                                             "atoms": [[32, 1]]}]}
    params.check("concat", p)
    for bad in ({**p, "inputs": [{**p["inputs"][0], "size": 12, "atoms": [[12, 1]]}, p["inputs"][1]], "shape": [44]},
                {**p, "inputs": [{**p["inputs"][0], "atoms": [[8, 2], [2, 1]]}, p["inputs"][1]]},
                {**p, "out_dtype": "int64"}, {**p, "vec": 4}):
        with pytest.raises(EngineFormatError, match=r"params\.vec"):
            params.check("concat", bad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_concat_with_another_consumer_stays(built, precision):
    """K's Concat also feeds a ReduceMean: it stays a launch and attention reads its output; V's is read in place."""
    onnx_path, path = built("other consumer", precision)
    ef = read_engine(path)
    regions = ef.manifest["regions"]
    concats = [r for r in regions if r["ops"] == ["Concat"]]
    assert [r["source_nodes"] for r in concats] == [["concat_k"]]
    (attention,) = [r for r in regions if r["kind"] == "attention"]
    p = ef.manifest["kernels"][attention["kernel"]]["params"]
    assert "sources" not in p["k"] and [s["keys"] for s in p["v"]["sources"]] == [P, T]
    assert "concat_v" in attention["source_nodes"] and "concat_k" not in attention["source_nodes"]
    converts = [r for r in regions if r["ops"] == ["Cast"]]  # only V's prefix needs a bf16 copy
    assert len(converts) == (precision == "bf16")
    matches_onnxruntime(onnx_path, path, precision)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_cpu_and_onnxruntime(built, variant, precision):
    onnx_path, path = built(variant, precision, GPU_ARCH)
    matches_onnxruntime(onnx_path, path, precision, device="cuda")
    feeds = flashrt.load(path, device="cpu").example_inputs(2)
    cpu = flashrt.load(path, device="cpu").run(feeds)
    cuda = flashrt.load(path, device="cuda").run(feeds)
    for name in cpu:
        assert rel_l2(cuda[name], cpu[name]) <= TOLERANCE[precision], name
