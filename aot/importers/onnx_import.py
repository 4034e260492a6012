"""ONNX -> ir.Graph: validation, static shapes (with --shapes for dynamic dims), shape inference and
constant folding. Produces primitive ops under their ONNX names; aot/passes raises them."""

import hashlib
import math
import os

import numpy as np

from flashrt.aot.importers.onnx_decompose import COMPOSITE, decompose
from flashrt.aot.importers.onnx_loop import CONTROL_FLOW, all_nodes, expand, outer_references
from flashrt.aot.importers.onnx_qdq import rewrite_qdq
from flashrt.aot.importers.onnx_ops import ONNX_DTYPES, SUPPORTED, constant_value, dtype_of, fold, infer, np_dtype
from flashrt.aot.ir import Graph, Node, Value
from flashrt.errors import ModelError

__all__ = ["SUPPORTED", "import_onnx", "parse_shapes"]

MIN_OPSET = 13
_ONNX_DTYPES = {k: v for k, v in ONNX_DTYPES.items() if v != "float64"}


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dtype_name(elem_type: int, what: str) -> str:
    if elem_type not in _ONNX_DTYPES:
        raise ModelError(f"{what} has ONNX element type {elem_type}, which flashrt does not support")
    return _ONNX_DTYPES[elem_type]


def parse_shapes(spec: str | None) -> dict[str, tuple[int, ...]]:
    """'x:1x3x224x224,mask:1x16' -> {'x': (1, 3, 224, 224), 'mask': (1, 16)}."""
    out: dict[str, tuple[int, ...]] = {}
    if not spec:
        return out
    for item in spec.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise ModelError(f"--shapes entry {item!r} is not NAME:DxDxD (e.g. x:1x3x224x224)") from None
        out[name] = shape
    return out


def _sort_nodes(path: str, nodes: list, known: set[str]) -> list:
    """Topological order; a dangling input or a cycle is a ModelError naming the node. A node with subgraphs
    (Loop, If) also depends on the values they read from the enclosing scope."""
    reads = {id(n): list(n.input) + outer_references(n) if n.op_type in CONTROL_FLOW else n.input for n in nodes}
    producer = {}
    for n in nodes:
        for o in n.output:
            if o:
                if o in producer or o in known:
                    raise ModelError(f"{path}: value '{o}' is produced twice (node '{n.name or n.op_type}')")
                producer[o] = n
    for n in nodes:
        for i in reads[id(n)]:
            if i and i not in known and i not in producer:
                raise ModelError(f"{path}: node '{n.name or n.op_type}' ({n.op_type}) reads '{i}', "
                                 "which no node, input or initializer provides")
    order, state = [], {}
    for root in nodes:
        if state.get(id(root)) == 2:
            continue
        stack = [(root, iter([i for i in reads[id(root)] if i in producer]))]
        state[id(root)] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[id(node)] = 2
                order.append(node)
                continue
            dep = producer[nxt]
            s = state.get(id(dep))
            if s == 1:
                raise ModelError(f"{path}: the graph has a cycle through node '{dep.name or dep.op_type}'")
            if s is None:
                state[id(dep)] = 1
                stack.append((dep, iter([i for i in reads[id(dep)] if i in producer])))
    return order


def import_onnx(path: str, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[Graph, str]:
    """Load an ONNX file; returns the graph and the file's sha256."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelError("importing ONNX needs the onnx package: pip install 'flashrt[build]'") from None
    shapes = dict(shapes or {})
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ModelError(f"{path}: cannot read model: {e.strerror or e}") from None
    sha = hashlib.sha256(raw).hexdigest()
    try:
        model = onnx.load_model_from_string(raw)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:  # protobuf raises several types for damaged files
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:160]})") from None
    g = model.graph
    prequantized = rewrite_qdq(model, path)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ModelError(f"{path}: ONNX opset {opset} is too old; flashrt reads opset {MIN_OPSET}+ "
                         "(re-export with opset_version=17 or newer)")

    unsupported: dict[str, list[str]] = {}
    for n in all_nodes(g):
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        if op not in SUPPORTED:
            unsupported.setdefault(op, []).append(n.name or "<unnamed>")
    if unsupported:
        parts = "; ".join(f"{op} (nodes: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
                          for op, names in sorted(unsupported.items()))
        raise ModelError(f"{path}: unsupported ops: {parts}")

    constants: dict[str, np.ndarray] = {}
    for t in g.initializer:
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:
            need = math.prod(t.dims)
            raise ModelError(f"{path}: initializer '{t.name}' data does not match its shape {list(t.dims)} "
                             f"({need} values expected): {str(e)[:100]}") from None
        if tuple(arr.shape) != tuple(t.dims):
            raise ModelError(f"{path}: initializer '{t.name}' has {arr.size} values, shape {list(t.dims)} "
                             f"needs {math.prod(t.dims)}")
        _dtype_name(t.data_type, f"initializer '{t.name}'")
        constants[t.name] = arr

    input_names = [vi.name for vi in g.input if vi.name not in constants]
    unknown = sorted(set(shapes) - set(input_names))
    if unknown:
        raise ModelError(f"--shapes names {unknown}, which are not inputs of the model (inputs: {input_names})")
    values: dict[str, Value] = {}
    inputs = []
    for vi in g.input:
        if vi.name in constants:
            continue
        tt = vi.type.tensor_type
        dtype = _dtype_name(tt.elem_type, f"input '{vi.name}'")
        dims = list(tt.shape.dim)
        if vi.name in shapes:
            shape = shapes.pop(vi.name)
            if len(shape) != len(dims):
                raise ModelError(f"--shapes gives input '{vi.name}' rank {len(shape)} ({'x'.join(map(str, shape))}),"
                                 f" but the model declares rank {len(dims)}")
            for i, (d, s) in enumerate(zip(dims, shape)):
                if d.HasField("dim_value") and d.dim_value != s:
                    raise ModelError(f"--shapes gives input '{vi.name}' dimension {i} = {s}, but the model fixes "
                                     f"it to {d.dim_value}")
        else:
            shape = []
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                else:
                    label = f" ('{d.dim_param}')" if d.dim_param else ""
                    example = "x".join(str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else "1"
                                       for x in dims)
                    raise ModelError(f"input '{vi.name}' dimension {i}{label} is dynamic; give it a size with "
                                     f"--shapes {vi.name}:{example}")
            shape = tuple(shape)
        values[vi.name] = Value(vi.name, dtype, tuple(shape))
        inputs.append(vi.name)
    for name, arr in constants.items():
        values[name] = Value(name, dtype_of(arr), tuple(arr.shape))

    nodes = []
    for i, n in enumerate(_sort_nodes(path, list(g.node), set(values))):
        name = n.name or f"{n.op_type}_{i}"
        nodes.append(Node(n.op_type, name, list(n.input), list(n.output), _attrs(n)))

    graph = Graph(g.name or os.path.basename(path), inputs, [o.name for o in g.output], nodes, values, constants,
                  prequantized)
    for o in graph.outputs:
        if o not in values and o not in {x for n in nodes for x in n.outputs}:
            raise ModelError(f"{path}: graph output '{o}' is not produced by any node")
    infer_and_fold(graph)
    for o in graph.outputs:
        if o in graph.constants:
            raise ModelError(f"{path}: graph output '{o}' is a constant; flashrt engines compute their outputs")
    graph.remove_dead()
    return graph, sha


# ---- shape inference and constant folding -------------------------------------------------------

SHAPE_ONLY = {"Shape", "Size"}  # their value depends on static shapes only: always constants


def infer_and_fold(graph: Graph) -> None:
    kept = []
    work = list(reversed(graph.nodes))
    while work:
        node = work.pop()
        if node.op in COMPOSITE:
            work.extend(reversed(decompose(graph, node)))
            continue
        if node.op in CONTROL_FLOW:
            work.extend(reversed(expand(graph, node)))
            continue
        if node.op == "Constant":
            value = constant_value(node)
            graph.constants[node.outputs[0]] = value
            graph.values[node.outputs[0]] = Value(node.outputs[0], dtype_of(value), tuple(value.shape))
            continue
        outs = infer(node, graph)
        for name, (dtype, shape) in zip(node.outputs, outs):
            if name:
                graph.values[name] = Value(name, dtype, tuple(int(d) for d in shape))
        constant_inputs = all(i == "" or i in graph.constants for i in node.inputs) and node.inputs
        if constant_inputs or node.op in SHAPE_ONLY:
            args = [graph.constants.get(i) if i else None for i in node.inputs]
            if node.op in SHAPE_ONLY:
                v = graph.values[node.inputs[0]]
                args = [np.zeros(v.shape, np_dtype(v.dtype))]
            for name, arr in zip(node.outputs, fold(node, args)):
                if name:
                    graph.constants[name] = arr
            continue
        kept.append(node)
    graph.nodes = kept
