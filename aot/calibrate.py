"""Static FP8 activation calibration (--calib inputs.npz): run the graph in float32 on the CPU (numpy, the same
op semantics constant folding uses) over representative inputs, record the amax of every GEMM's activation
operand (the A of each MatMul with a constant 2-D weight), and insert FakeQuantFP8(x, s) = e4m3(x / s) * s
with s = amax / 448 on it. The GEMMs reading it apply it to A as they stage it (after a fused norm), so the
engine computes exact FP8-activation numerics with no extra kernel."""

import math

import numpy as np

from flashrt.aot.importers.onnx_ops import fold, np_dtype
from flashrt.aot.ir import Graph, Node, Value
from flashrt.aot.partition import integer_derived
from flashrt.errors import ModelError
from flashrt.kernels.quant import FP8_MAX

CALIB_PRECISIONS = ("fp8", "nvfp4", "auto")


def load_calib(path: str, graph: Graph) -> list[dict[str, np.ndarray]]:
    """The calibration samples of an .npz: per input, an array of the input's shape (one sample) or with one
    leading dimension more (that many samples). Anything else is a one-line ModelError naming the input."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelError(f"--calib {path}: not a readable .npz file ({e})") from None
    unknown = sorted(set(arrays) - set(graph.inputs))
    if unknown:
        raise ModelError(f"--calib {path}: {unknown} are not inputs of the model (inputs: {graph.inputs})")
    counts = set()
    for name in graph.inputs:
        v = graph.values[name]
        want = f"{v.dtype} {list(v.shape)} (or [n, {', '.join(map(str, v.shape))}] for n samples)"
        if name not in arrays:
            raise ModelError(f"--calib {path}: input '{name}' is missing; expected {want}")
        a = arrays[name]
        if a.dtype != np.dtype(np_dtype(v.dtype)) or v.dtype == "bfloat16":
            raise ModelError(f"--calib {path}: input '{name}' is {a.dtype}; expected {want}")
        if tuple(a.shape) == v.shape:
            counts.add(1)
        elif tuple(a.shape[1:]) == v.shape and a.shape[0] > 0:
            counts.add(a.shape[0])
        else:
            raise ModelError(f"--calib {path}: input '{name}' has shape {list(a.shape)}; expected {want}")
    if len(counts) > 1:
        raise ModelError(f"--calib {path}: the inputs hold different numbers of samples ({sorted(counts)})")
    n = counts.pop() if counts else 1
    return [{k: (a if a.shape == graph.values[k].shape else a[i]) for k, a in arrays.items()} for i in range(n)]


def gemm_activations(graph: Graph) -> dict[str, list[Node]]:
    """The activation operand of each GEMM with a constant 2-D weight -> those GEMMs. Values computed from
    integers alone (positions and RoPE angles, kept float32 by the partitioner) are left exact, and those the
    model quantizes already (its Q/DQ pairs, dynamic NVFP4) keep the model's format."""
    out: dict[str, list[Node]] = {}
    exact = integer_derived(graph)
    exact |= {n.outputs[0] for n in graph.nodes if n.op in ("FakeQuantFP8", "FakeQuantNVFP4")}
    for n in graph.nodes:
        if n.op == "MatMul" and n.inputs[0] not in graph.constants and n.inputs[0] not in exact \
                and graph.values[n.inputs[0]].dtype in ("float32", "float16", "bfloat16") \
                and n.inputs[1] in graph.constants and graph.constants[n.inputs[1]].ndim == 2:
            out.setdefault(n.inputs[0], []).append(n)
    return out


def activation_amax(graph: Graph, samples: list[dict[str, np.ndarray]], values) -> dict[str, float]:
    """max |value| over the samples, for each of `values`, by evaluating the graph node by node."""
    amax = {v: 0.0 for v in values}
    users = graph.consumers()
    for feeds in samples:
        env = {k: np.asarray(a) for k, a in feeds.items()}
        remaining = {k: len(us) for k, us in users.items()}
        for node in graph.nodes:
            args = [None if not i else graph.constants[i] if i in graph.constants else env[i] for i in node.inputs]
            for name, arr in zip(node.outputs, fold(node, args)):
                if name:
                    env[name] = arr
            for v in node.outputs:
                if v in amax:
                    amax[v] = max(amax[v], float(np.abs(env[v].astype(np.float32)).max()))
            for i in node.inputs:  # free what nothing reads any more
                if i in remaining:
                    remaining[i] -= 1
                    if remaining[i] == 0 and i not in graph.outputs and i in env and i not in amax:
                        del env[i]
        for v in values:
            if v in feeds:
                amax[v] = max(amax[v], float(np.abs(feeds[v].astype(np.float32)).max()))
    return amax


def insert_fake_quant(graph: Graph, amax: dict[str, float], targets: dict[str, list[Node]]) -> int:
    """Fake-quantize each target activation with scale amax / 448 before its GEMMs; the number inserted."""
    inserted, new_nodes = 0, {}
    for value, gemms in targets.items():
        a = amax.get(value, 0.0)
        if not (a > 0 and math.isfinite(a)):
            continue  # an all-zero (or non-finite) activation has no scale to calibrate
        v = graph.values[value]
        scale, out = _fresh(graph, f"{value}/fp8_scale"), _fresh(graph, f"{value}/fp8")
        graph.constants[scale] = np.array(np.float32(a / FP8_MAX))
        graph.values[scale] = Value(scale, "float32", ())
        graph.values[out] = Value(out, v.dtype, v.shape)
        new_nodes[id(gemms[0])] = [Node("FakeQuantFP8", f"{value}/fp8", [value, scale], [out], {"scale": "tensor"},
                                        [s for g in gemms for s in g.source])]
        for g in gemms:
            g.inputs[0] = out
        inserted += 1
    graph.nodes = _insert_before(graph.nodes, new_nodes, targets)
    return inserted


def _insert_before(nodes: list[Node], new_nodes: dict[int, list[Node]], targets: dict) -> list[Node]:
    """Put each group of new nodes right before the earliest GEMM that reads its output."""
    position = {id(n): i for i, n in enumerate(nodes)}
    first_user = {}
    for gemms in targets.values():
        if id(gemms[0]) in new_nodes:
            earliest = min(gemms, key=lambda g: position[id(g)])
            first_user.setdefault(id(earliest), []).extend(new_nodes[id(gemms[0])])
    out = []
    for n in nodes:
        out += first_user.get(id(n), [])
        out.append(n)
    return out


def _fresh(graph: Graph, base: str) -> str:
    name, i = base, 0
    while name in graph.values or name in graph.constants:
        i += 1
        name = f"{base}_{i}"
    return name


def calibrate(graph: Graph, path: str, precision: str) -> int:
    """--calib: insert static FP8 fake quantization on every GEMM activation; the number of activations."""
    if precision not in CALIB_PRECISIONS:
        raise ModelError(f"--calib gives FP8 activation scales, which need --precision fp8, nvfp4 or auto "
                         f"(got {precision})")
    samples = load_calib(path, graph)
    targets = gemm_activations(graph)
    return insert_fake_quant(graph, activation_amax(graph, samples, set(targets)), targets)
