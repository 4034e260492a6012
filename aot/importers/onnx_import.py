"""ONNX -> ir.Graph: validation, static shapes (with --shapes for dynamic dims), shape inference and
constant folding. Produces primitive ops under their ONNX names; aot/passes raises them."""

import hashlib
import math
import os

import numpy as np

from flashrt.aot.ir import Graph, Node, Value
from flashrt.errors import ModelError

MIN_OPSET = 13
ELEMENTWISE_UNARY = {"Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Sqrt", "Reciprocal", "Abs", "Identity"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
SHAPE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}
SUPPORTED = ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | SHAPE_OPS | {
    "MatMul", "Gemm", "Softmax", "LayerNormalization", "Constant"}

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


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
    """Topological order; a dangling input or a cycle is a ModelError naming the node."""
    producer = {}
    for n in nodes:
        for o in n.output:
            if o:
                if o in producer or o in known:
                    raise ModelError(f"{path}: value '{o}' is produced twice (node '{n.name or n.op_type}')")
                producer[o] = n
    for n in nodes:
        for i in n.input:
            if i and i not in known and i not in producer:
                raise ModelError(f"{path}: node '{n.name or n.op_type}' ({n.op_type}) reads '{i}', "
                                 "which no node, input or initializer provides")
    order, state = [], {}
    for root in nodes:
        if state.get(id(root)) == 2:
            continue
        stack = [(root, iter([i for i in root.input if i in producer]))]
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
                stack.append((dep, iter([i for i in dep.input if i in producer])))
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

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ModelError(f"{path}: ONNX opset {opset} is too old; flashrt reads opset {MIN_OPSET}+ "
                         "(re-export with opset_version=17 or newer)")

    unsupported: dict[str, list[str]] = {}
    for n in g.node:
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
        values[name] = Value(name, str(arr.dtype) if arr.dtype != np.float64 else "float64", tuple(arr.shape))

    nodes = []
    for i, n in enumerate(_sort_nodes(path, list(g.node), set(values))):
        name = n.name or f"{n.op_type}_{i}"
        nodes.append(Node(n.op_type, name, list(n.input), list(n.output), _attrs(n)))

    graph = Graph(g.name or os.path.basename(path), inputs, [o.name for o in g.output], nodes, values, constants)
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

def _axis(axis: int, rank: int, node: Node) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ModelError(f"node '{node.name}' ({node.op}): axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def _reshape_target(node: Node, in_shape: tuple, target: np.ndarray) -> tuple:
    allowzero = node.attrs.get("allowzero", 0)
    dims = [int(d) for d in target.reshape(-1)]
    out = [in_shape[i] if d == 0 and not allowzero and i < len(in_shape) else d for i, d in enumerate(dims)]
    if out.count(-1) > 1:
        raise ModelError(f"node '{node.name}' (Reshape): shape {dims} has more than one -1")
    total = math.prod(in_shape)
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise ModelError(f"node '{node.name}' (Reshape): cannot reshape {list(in_shape)} to {dims}")
        out[out.index(-1)] = total // known
    if math.prod(out) != total or any(d < 0 for d in out):
        raise ModelError(f"node '{node.name}' (Reshape): cannot reshape {list(in_shape)} to {dims}")
    return tuple(out)


def _squeeze_axes(node: Node, graph: Graph, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1]:
        if node.inputs[1] not in graph.constants:
            raise ModelError(f"node '{node.name}' ({node.op}): axes must be a constant")
        return [int(a) for a in graph.constants[node.inputs[1]].reshape(-1)]
    return node.attrs.get("axes")


def _matmul_shape(node: Node, a: tuple, b: tuple) -> tuple:
    if not a or not b:
        raise ModelError(f"node '{node.name}' (MatMul): operands must have rank >= 1, got {list(a)} and {list(b)}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ModelError(f"node '{node.name}' (MatMul): inner dimensions differ: {list(a)} @ {list(b)}")
    try:
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    except ValueError:
        raise ModelError(f"node '{node.name}' (MatMul): batch dimensions of {list(a)} and {list(b)} "
                         "do not broadcast") from None
    out = tuple(batch) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def infer_shape(node: Node, graph: Graph) -> list[tuple[str, tuple]]:
    """(dtype, shape) of each output of node."""
    ins = [graph.values[i] if i else None for i in node.inputs]
    op, a = node.op, ins[0] if ins else None
    if op in ELEMENTWISE_UNARY or op in {"Softmax"}:
        if op == "Softmax":
            _axis(node.attrs.get("axis", -1), len(a.shape), node)
        return [(a.dtype, a.shape)]
    if op in ELEMENTWISE_BINARY:
        try:
            shape = tuple(np.broadcast_shapes(*[v.shape for v in ins if v]))
        except ValueError:
            raise ModelError(f"node '{node.name}' ({op}): input shapes "
                             f"{[list(v.shape) for v in ins if v]} do not broadcast") from None
        return [(a.dtype, shape)]
    if op == "MatMul":
        return [(a.dtype, _matmul_shape(node, a.shape, ins[1].shape))]
    if op == "Gemm":
        ta, tb = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
        if len(a.shape) != 2 or len(ins[1].shape) != 2:
            raise ModelError(f"node '{node.name}' (Gemm): operands must be 2-D, got {list(a.shape)} and "
                             f"{list(ins[1].shape)}")
        m, k = a.shape[::-1] if ta else a.shape
        k2, n = ins[1].shape[::-1] if tb else ins[1].shape
        if k != k2:
            raise ModelError(f"node '{node.name}' (Gemm): inner dimensions differ ({k} vs {k2})")
        return [(a.dtype, (m, n))]
    if op == "LayerNormalization":
        axis = _axis(node.attrs.get("axis", -1), len(a.shape), node)
        stat = a.shape[:axis] + (1,) * (len(a.shape) - axis)
        return [(a.dtype, a.shape), ("float32", stat), ("float32", stat)][:len(node.outputs)]
    if op == "Reshape":
        if node.inputs[1] not in graph.constants:
            raise ModelError(f"node '{node.name}' (Reshape): the target shape must be a constant")
        return [(a.dtype, _reshape_target(node, a.shape, graph.constants[node.inputs[1]]))]
    if op == "Transpose":
        perm = node.attrs.get("perm", list(range(len(a.shape)))[::-1])
        if sorted(perm) != list(range(len(a.shape))):
            raise ModelError(f"node '{node.name}' (Transpose): perm {perm} does not fit rank {len(a.shape)}")
        return [(a.dtype, tuple(a.shape[p] for p in perm))]
    if op == "Flatten":
        r = len(a.shape)
        axis = node.attrs.get("axis", 1)
        if not -r <= axis <= r:
            raise ModelError(f"node '{node.name}' (Flatten): axis {axis} is out of range for rank {r}")
        axis = axis + r if axis < 0 else axis
        return [(a.dtype, (math.prod(a.shape[:axis]), math.prod(a.shape[axis:])))]
    if op == "Squeeze":
        axes = _squeeze_axes(node, graph, len(a.shape))
        if axes is None:
            return [(a.dtype, tuple(d for d in a.shape if d != 1))]
        axes = {_axis(x, len(a.shape), node) for x in axes}
        if any(a.shape[x] != 1 for x in axes):
            raise ModelError(f"node '{node.name}' (Squeeze): axes {sorted(axes)} of {list(a.shape)} are not all 1")
        return [(a.dtype, tuple(d for i, d in enumerate(a.shape) if i not in axes))]
    if op == "Unsqueeze":
        axes = _squeeze_axes(node, graph, len(a.shape))
        if axes is None:
            raise ModelError(f"node '{node.name}' (Unsqueeze): missing axes")
        r = len(a.shape) + len(axes)
        axes = sorted(_axis(x, r, node) for x in axes)
        out, it = [], iter(a.shape)
        for i in range(r):
            out.append(1 if i in axes else next(it))
        return [(a.dtype, tuple(out))]
    raise ModelError(f"node '{node.name}': no shape rule for {op}")  # unreachable for SUPPORTED ops


def _constant_value(node: Node) -> np.ndarray:
    from onnx import numpy_helper

    at = node.attrs
    if "value" in at:
        return numpy_helper.to_array(at["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in at:
            return np.array(at[key], dtype=dtype)
    raise ModelError(f"node '{node.name}' (Constant): no supported value attribute (found {sorted(at)})")


def fold(node: Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants."""
    op, at = node.op, node.attrs
    a = args[0] if args else None
    with np.errstate(all="ignore"):
        if op == "Constant":
            return [_constant_value(node)]
        unary = {"Relu": lambda x: np.where(x < 0, 0, x).astype(x.dtype), "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
                 "Tanh": np.tanh, "Neg": np.negative, "Exp": np.exp, "Sqrt": np.sqrt, "Abs": np.abs,
                 "Reciprocal": lambda x: 1 / x, "Identity": lambda x: x.copy()}
        if op in unary:
            return [np.asarray(unary[op](a)).astype(a.dtype)]
        if op in ("Erf", "Gelu"):
            from flashrt.kernels.expr import _erf, _gelu

            return [(_erf if op == "Erf" else _gelu)(a.astype(np.float32)).astype(a.dtype)]
        binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power, "Max": np.maximum,
                  "Min": np.minimum,
                  "Div": lambda x, y: (np.trunc(x / y).astype(x.dtype) if x.dtype.kind in "iu" else x / y)}
        if op in binary:
            out = args[0]
            for b in args[1:]:
                out = binary[op](out, b)
            return [np.asarray(out).astype(a.dtype)]
        if op == "MatMul":
            return [np.matmul(a, args[1])]
        if op == "Gemm":
            x = a.T if at.get("transA", 0) else a
            w = args[1].T if at.get("transB", 0) else args[1]
            y = at.get("alpha", 1.0) * (x @ w)
            if len(args) > 2 and args[2] is not None:
                y = y + at.get("beta", 1.0) * args[2]
            return [y.astype(a.dtype)]
        if op == "Softmax":
            axis = at.get("axis", -1)
            e = np.exp(a - a.max(axis=axis, keepdims=True))
            return [(e / e.sum(axis=axis, keepdims=True)).astype(a.dtype)]
        if op == "LayerNormalization":
            axis = at.get("axis", -1) % a.ndim
            axes = tuple(range(axis, a.ndim))
            mean = a.mean(axis=axes, keepdims=True)
            inv = 1 / np.sqrt(((a - mean) ** 2).mean(axis=axes, keepdims=True) + at.get("epsilon", 1e-5))
            y = (a - mean) * inv * args[1]
            if len(args) > 2 and args[2] is not None:
                y = y + args[2]
            return [y.astype(a.dtype), mean.astype(np.float32), inv.astype(np.float32)][:len(node.outputs)]
        if op == "Reshape":
            return [a.reshape(_reshape_target(node, a.shape, args[1]))]
        if op == "Transpose":
            return [np.transpose(a, at.get("perm"))]
        if op in ("Flatten", "Squeeze", "Unsqueeze"):
            return [a.reshape(node.attrs["_shape"])]
    raise ModelError(f"node '{node.name}': cannot fold {op}")


def infer_and_fold(graph: Graph) -> None:
    kept = []
    for node in graph.nodes:
        if node.op == "Constant":
            (value,) = fold(node, [])
            graph.constants[node.outputs[0]] = value
            graph.values[node.outputs[0]] = Value(node.outputs[0], str(value.dtype), tuple(value.shape))
            continue
        outs = infer_shape(node, graph)
        for name, (dtype, shape) in zip(node.outputs, outs):
            if name:
                graph.values[name] = Value(name, dtype, tuple(int(d) for d in shape))
        if node.op in ("Flatten", "Squeeze", "Unsqueeze"):
            node.attrs["_shape"] = outs[0][1]
        if all(i == "" or i in graph.constants for i in node.inputs) and node.inputs:
            results = fold(node, [graph.constants.get(i) if i else None for i in node.inputs])
            for name, arr in zip(node.outputs, results):
                if name:
                    graph.constants[name] = arr
            continue
        kept.append(node)
    graph.nodes = kept
