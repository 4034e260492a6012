"""ONNX op semantics for the importer: output shapes and dtypes, and numpy evaluation for constant folding.

Data-movement ops (Gather, Slice, Concat, Expand, reductions, ...) infer their shapes by evaluating the
numpy definition on zero-filled inputs of the right shapes, so shape rules and folding cannot disagree;
ops whose evaluation would be costly (MatMul, Gemm, Conv) have explicit rules."""

import math

import numpy as np

from flashrt.aot.ir import Graph, Node
from flashrt.errors import ModelError

ELEMENTWISE_UNARY = {"Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Sqrt", "Reciprocal", "Abs", "Identity",
                     "Sin", "Cos", "Not", "IsNaN", "Cast", "Softplus", "HardSigmoid", "LeakyRelu", "Floor", "Ceil",
                     "FakeQuantFP8", "FakeQuantNVFP4", "RotateHalf"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
                      "GreaterOrEqual", "And", "Or", "Mod"}
ELEMENTWISE_OTHER = {"Where", "CastLike"}
SHAPE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Expand", "Concat",
             "Gather", "GatherND", "Shape", "Size", "Range", "ConstantOfShape", "Trilu"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}
SUPPORTED = (ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | ELEMENTWISE_OTHER | SHAPE_OPS | REDUCE_OPS
             | {"MatMul", "Gemm", "Softmax", "LayerNormalization", "RMSNormalization", "Constant", "Conv",
                "Attention", "RotaryEmbedding", "Loop", "If"})

ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16",
               11: "float64"}
_NP = {"float32": np.float32, "uint8": np.uint8, "int8": np.int8, "int32": np.int32, "int64": np.int64,
       "bool": np.bool_, "float16": np.float16, "float64": np.float64, "bfloat16": np.float32}
MAX_ABSTRACT_ELEMENTS = 1 << 26


def np_dtype(name: str):
    return _NP[name]


def dtype_of(arr: np.ndarray) -> str:
    return {np.dtype(v): k for k, v in _NP.items() if k != "bfloat16"}.get(arr.dtype, str(arr.dtype))


def _axis(axis: int, rank: int, node: Node) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ModelError(f"node '{node.name}' ({node.op}): axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def reshape_target(node: Node, in_shape: tuple, target: np.ndarray) -> tuple:
    allowzero = node.attrs.get("allowzero", 0)
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
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


def conv_patch_params(node: Node, x_shape: tuple, w_shape: tuple) -> tuple[int, int]:
    """(patch height, width) of a Conv that is a patch embedding; anything else is a ModelError."""
    at = node.attrs
    kernel = tuple(at.get("kernel_shape", w_shape[2:]))
    strides = tuple(at.get("strides", (1,) * len(kernel)))
    pads = tuple(at.get("pads", (0,) * 2 * len(kernel)))
    dil = tuple(at.get("dilations", (1,) * len(kernel)))
    ok = (len(x_shape) == 4 and len(w_shape) == 4 and len(kernel) == 2 and strides == kernel and not any(pads)
          and all(d == 1 for d in dil) and at.get("group", 1) == 1 and at.get("auto_pad", b"NOTSET") in
          (b"NOTSET", "NOTSET", b"VALID", "VALID") and x_shape[1] == w_shape[1]
          and x_shape[2] % kernel[0] == 0 and x_shape[3] % kernel[1] == 0)
    if not ok:
        raise ModelError(f"node '{node.name}' (Conv): flashrt supports Conv as a patch embedding only (2-D, stride "
                         f"= kernel, no padding or dilation, group 1, size divisible); got input {list(x_shape)}, "
                         f"weight {list(w_shape)}, strides {list(strides)}, pads {list(pads)}")
    return kernel


def _reduce_axes(node: Node, args: list, rank: int) -> tuple[int, ...] | None:
    axes = node.attrs.get("axes")
    if len(args) > 1 and args[1] is not None:
        axes = [int(a) for a in np.asarray(args[1]).reshape(-1)]
    if axes is None or len(axes) == 0:
        return None if not node.attrs.get("noop_with_empty_axes", 0) else ()
    return tuple(sorted(_axis(a, rank, node) for a in axes))


def _slice_index(node: Node, shape: tuple, args: list) -> tuple:
    starts, ends = np.asarray(args[1]).reshape(-1), np.asarray(args[2]).reshape(-1)
    axes = np.asarray(args[3]).reshape(-1) if len(args) > 3 and args[3] is not None else np.arange(len(starts))
    steps = np.asarray(args[4]).reshape(-1) if len(args) > 4 and args[4] is not None else np.ones(len(starts), int)
    index = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ModelError(f"node '{node.name}' (Slice): step 0")
        a = _axis(int(a), len(shape), node)
        index[a] = slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)), int(st))
    return tuple(index)


def _cast(arr: np.ndarray, to: int, node: Node) -> np.ndarray:
    if to not in ONNX_DTYPES:
        raise ModelError(f"node '{node.name}' (Cast): target type {to} is not supported")
    name = ONNX_DTYPES[to]
    if name in ("bfloat16",):
        return arr.astype(np.float32)
    with np.errstate(all="ignore"):
        return arr.astype(_NP[name])


def _split_sizes(node: Node, args: list, dim: int) -> list[int]:
    if len(args) > 1 and args[1] is not None:
        return [int(s) for s in np.asarray(args[1]).reshape(-1)]
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    n = node.attrs.get("num_outputs", len(node.outputs))
    chunk = -(-dim // n)
    return [min(chunk, dim - i * chunk) for i in range(n)]


def fold(node: Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """numpy evaluation of node on constant (or abstract zero) inputs."""
    from flashrt.kernels.quant import act_row_scales, fake_quant_act, fake_quant_nvfp4_act

    op, at = node.op, node.attrs
    a = args[0] if args else None
    with np.errstate(all="ignore"):
        if op == "Identity":
            return [a.copy()]
        unary = {"Relu": lambda x: np.where(x < 0, 0, x).astype(x.dtype), "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
                 "Tanh": np.tanh, "Neg": np.negative, "Exp": np.exp, "Sqrt": np.sqrt, "Abs": np.abs,
                 "Reciprocal": lambda x: 1 / x, "Sin": np.sin, "Cos": np.cos, "Floor": np.floor, "Ceil": np.ceil,
                 "Softplus": lambda x: np.log1p(np.exp(x)),
                 "LeakyRelu": lambda x: np.where(x < 0, x * at.get("alpha", 0.01), x),
                 "HardSigmoid": lambda x: np.clip(x * at.get("alpha", 0.2) + at.get("beta", 0.5), 0, 1)}
        if op in unary:
            return [np.asarray(unary[op](a)).astype(a.dtype)]
        if op == "RotateHalf":  # RoPE's rotate_half (aot/passes.py)
            from flashrt.kernels.expr import rotate_half

            return [rotate_half(a)]
        if op == "FakeQuantFP8":  # FP8 E4M3 activation quantization, kernels/quant.py
            scale = act_row_scales(a) if at.get("scale") == "row" else args[1]
            return [fake_quant_act(a, scale).astype(a.dtype)]
        if op == "FakeQuantNVFP4":  # NVFP4 activation quantization (16-value blocks along the last axis)
            if a.shape[-1] % 16:
                raise ModelError(f"node '{node.name}' (FakeQuantNVFP4): the last axis ({a.shape[-1]}) is not a "
                                 "multiple of 16, the NVFP4 block")
            return [fake_quant_nvfp4_act(a, args[1]).astype(a.dtype)]
        if op in ("Erf", "Gelu"):
            from flashrt.kernels.expr import _erf, _gelu

            if op == "Gelu" and at.get("approximate", "none") in ("tanh", b"tanh"):
                x = a.astype(np.float32)
                return [(0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))).astype(a.dtype)]
            return [(_erf if op == "Erf" else _gelu)(a.astype(np.float32)).astype(a.dtype)]
        if op == "Not":
            return [np.logical_not(a)]
        if op == "IsNaN":
            return [np.isnan(a)]
        if op == "Cast":
            return [_cast(a, at["to"], node)]
        if op == "CastLike":
            return [a.astype(args[1].dtype)]
        compare = {"Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
                   "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or}
        if op in compare:
            return [compare[op](a, args[1])]
        binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power, "Max": np.maximum,
                  "Min": np.minimum,
                  "Div": lambda x, y: (np.trunc(x / np.where(y == 0, 1, y)).astype(x.dtype) if x.dtype.kind in "iu"
                                       else x / y),
                  "Mod": lambda x, y: np.fmod(x, y) if at.get("fmod", 0) else np.mod(x, y)}
        if op in binary:
            out = args[0]
            for b in args[1:]:
                out = binary[op](out, b)
            return [np.asarray(out).astype(a.dtype)]
        if op == "Where":
            return [np.where(a, args[1], args[2])]
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
            mx = a.max(axis=axis, keepdims=True)
            if at.get("_masked_rows_zero"):
                mx = np.where(np.isneginf(mx), 0, mx)
            e = np.exp(a - mx)
            s = e.sum(axis=axis, keepdims=True)
            if at.get("_masked_rows_zero"):
                s = np.where(s == 0, 1, s)
            return [(e / s).astype(a.dtype)]
        if op in ("LayerNormalization", "RMSNormalization"):
            axis = at.get("axis", -1) % a.ndim
            axes = tuple(range(axis, a.ndim))
            x = a.astype(np.float32)
            mean = x.mean(axis=axes, keepdims=True) if op == "LayerNormalization" else np.zeros((), np.float32)
            inv = 1 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + at.get("epsilon", 1e-5))
            y = (x - mean) * inv * args[1]
            if op == "LayerNormalization" and len(args) > 2 and args[2] is not None:
                y = y + args[2]
            return [y.astype(a.dtype), mean.astype(np.float32), inv.astype(np.float32)][:len(node.outputs)]
        if op == "Reshape":
            return [a.reshape(reshape_target(node, a.shape, args[1]))]
        if op == "Transpose":
            perm = at.get("perm", list(range(a.ndim))[::-1])
            if sorted(perm) != list(range(a.ndim)):
                raise ModelError(f"node '{node.name}' (Transpose): perm {perm} does not fit rank {a.ndim}")
            return [np.transpose(a, perm)]
        if op == "Flatten":
            axis = at.get("axis", 1)
            if not -a.ndim <= axis <= a.ndim:
                raise ModelError(f"node '{node.name}' (Flatten): axis {axis} is out of range for rank {a.ndim}")
            axis = axis + a.ndim if axis < 0 else axis
            return [a.reshape(math.prod(a.shape[:axis]), math.prod(a.shape[axis:]))]
        if op == "Squeeze":
            axes = at.get("axes") if len(args) < 2 or args[1] is None else list(np.asarray(args[1]).reshape(-1))
            if axes is None:
                return [a.reshape([d for d in a.shape if d != 1])]
            axes = {_axis(int(x), a.ndim, node) for x in axes}
            if any(a.shape[x] != 1 for x in axes):
                raise ModelError(f"node '{node.name}' (Squeeze): axes {sorted(axes)} of {list(a.shape)} are not 1")
            return [a.reshape([d for i, d in enumerate(a.shape) if i not in axes])]
        if op == "Unsqueeze":
            axes = at.get("axes") if len(args) < 2 or args[1] is None else list(np.asarray(args[1]).reshape(-1))
            if axes is None:
                raise ModelError(f"node '{node.name}' (Unsqueeze): missing axes")
            r = a.ndim + len(axes)
            axes = {_axis(int(x), r, node) for x in axes}
            it = iter(a.shape)
            return [a.reshape([1 if i in axes else next(it) for i in range(r)])]
        if op == "Slice":
            return [a[_slice_index(node, a.shape, args)]]
        if op == "Split":
            axis = _axis(at.get("axis", 0), a.ndim, node)
            sizes = _split_sizes(node, args, a.shape[axis])
            if sum(sizes) != a.shape[axis] or len(sizes) != len(node.outputs):
                raise ModelError(f"node '{node.name}' (Split): sizes {sizes} do not split dimension {a.shape[axis]} "
                                 f"into {len(node.outputs)} outputs")
            return list(np.split(a, np.cumsum(sizes)[:-1], axis=axis))
        if op == "Concat":
            axis = _axis(at["axis"], a.ndim, node)
            return [np.concatenate([x for x in args if x is not None], axis=axis)]
        if op == "Expand":
            shape = tuple(int(d) for d in np.asarray(args[1]).reshape(-1))
            try:
                return [np.broadcast_to(a, np.broadcast_shapes(a.shape, shape)).copy()]
            except ValueError:
                raise ModelError(f"node '{node.name}' (Expand): {list(a.shape)} does not expand to {list(shape)}") \
                    from None
        if op == "Gather":
            axis = _axis(at.get("axis", 0), a.ndim, node)
            idx = np.asarray(args[1]).astype(np.int64)
            if idx.size and (idx.min() < -a.shape[axis] or idx.max() >= a.shape[axis]):
                raise ModelError(f"node '{node.name}' (Gather): index out of range for dimension {a.shape[axis]}")
            return [np.take(a, idx, axis=axis)]
        if op == "GatherND":
            if at.get("batch_dims", 0):
                raise ModelError(f"node '{node.name}' (GatherND): batch_dims > 0 is not supported")
            return [np.asarray(a[gathernd_index(node, a.shape, args[1])])]
        if op == "Shape":
            start, end = at.get("start", 0), at.get("end", None)
            return [np.array(a.shape[start:end], np.int64)]
        if op == "Size":
            return [np.array(a.size, np.int64)]
        if op == "Range":
            return [np.arange(a.reshape(()), args[1].reshape(()), args[2].reshape(())).astype(a.dtype)]
        if op == "ConstantOfShape":
            value = at.get("value")
            fill = np.zeros(1, np.float32) if value is None else _tensor_attr(value)
            return [np.full(tuple(int(d) for d in a.reshape(-1)), fill.reshape(-1)[0], dtype=fill.dtype)]
        if op == "Trilu":
            k = int(np.asarray(args[1]).reshape(())) if len(args) > 1 and args[1] is not None else 0
            return [np.triu(a, k) if at.get("upper", 1) else np.tril(a, k)]
        if op in REDUCE_OPS:
            axes = _reduce_axes(node, args, a.ndim)
            if axes == ():
                return [a.copy()]
            fn = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min}[op]
            return [np.asarray(fn(a, axis=axes, keepdims=bool(at.get("keepdims", 1)))).astype(a.dtype)]
        if op == "Conv":
            kh, kw = conv_patch_params(node, a.shape, args[1].shape)
            n, c, h, w = a.shape
            patches = a.reshape(n, c, h // kh, kh, w // kw, kw).transpose(0, 2, 4, 1, 3, 5)
            y = patches.reshape(n, h // kh, w // kw, -1) @ args[1].reshape(args[1].shape[0], -1).T
            if len(args) > 2 and args[2] is not None:
                y = y + args[2]
            return [y.transpose(0, 3, 1, 2).astype(a.dtype)]
    raise ModelError(f"node '{node.name}': cannot evaluate {op}")


def gathernd_index(node: Node, shape: tuple, indices: np.ndarray) -> tuple:
    """The numpy index that GatherND(data, indices) with batch_dims 0 takes from data of this shape."""
    idx = np.asarray(indices).astype(np.int64)
    r = idx.shape[-1]
    if r > len(shape):
        raise ModelError(f"node '{node.name}' (GatherND): indices address {r} dims of a rank-{len(shape)} tensor")
    lim = np.array(shape[:r], np.int64)
    if idx.size and ((idx < -lim).any() or (idx >= lim).any()):
        raise ModelError(f"node '{node.name}' (GatherND): an index is out of range for {list(shape[:r])}")
    idx = np.where(idx < 0, idx + lim, idx)
    return tuple(idx[..., i] for i in range(r))


def _tensor_attr(value) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(value)


def constant_value(node: Node) -> np.ndarray:
    at = node.attrs
    if "value" in at:
        return _tensor_attr(at["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in at:
            return np.array(at[key], dtype=dtype)
    raise ModelError(f"node '{node.name}' (Constant): no supported value attribute (found {sorted(at)})")


def infer(node: Node, graph: Graph) -> list[tuple[str, tuple]]:
    """(dtype, shape) of each output of node."""
    ins = [graph.values[i] if i else None for i in node.inputs]
    op, a = node.op, ins[0] if ins else None
    if op in ELEMENTWISE_UNARY and op not in ("Cast", "Not", "IsNaN"):
        return [(a.dtype, a.shape)]
    if op in ELEMENTWISE_BINARY or op == "Where":
        try:
            shape = tuple(np.broadcast_shapes(*[v.shape for v in ins if v]))
        except ValueError:
            raise ModelError(f"node '{node.name}' ({op}): input shapes "
                             f"{[list(v.shape) for v in ins if v]} do not broadcast") from None
        if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or"):
            return [("bool", shape)]
        return [((ins[1] if op == "Where" else a).dtype, shape)]
    if op == "Softmax":
        _axis(node.attrs.get("axis", -1), len(a.shape), node)
        return [(a.dtype, a.shape)]
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
    if op == "Conv":
        kh, kw = conv_patch_params(node, a.shape, ins[1].shape)
        return [(a.dtype, (a.shape[0], ins[1].shape[0], a.shape[2] // kh, a.shape[3] // kw))]
    if op in ("LayerNormalization", "RMSNormalization"):
        axis = _axis(node.attrs.get("axis", -1), len(a.shape), node)
        stat = a.shape[:axis] + (1,) * (len(a.shape) - axis)
        return [(a.dtype, a.shape), ("float32", stat), ("float32", stat)][:len(node.outputs)]
    # everything else: evaluate the numpy definition on zeros of the input shapes (constants as they are)
    args = []
    for name, v in zip(node.inputs, ins):
        if v is None:
            args.append(None)
        elif name in graph.constants:
            args.append(graph.constants[name])
        else:
            if math.prod(v.shape) > MAX_ABSTRACT_ELEMENTS:
                raise ModelError(f"node '{node.name}' ({op}): input '{name}' {list(v.shape)} is too large")
            args.append(np.zeros(v.shape, _NP[v.dtype]))
    if op in ("Reshape", "Slice", "Expand", "Range", "ConstantOfShape", "Split", "Squeeze", "Unsqueeze", "Trilu") \
            or op in REDUCE_OPS:
        for i, name in enumerate(node.inputs[1:], 1):
            if name and name not in graph.constants:
                raise ModelError(f"node '{node.name}' ({op}): input {i} ('{name}') must be a constant "
                                 "(batch-1 engines have static shapes)")
    results = fold(node, args)
    out = []
    for arr in results:
        dtype = dtype_of(arr)
        if a is not None and a.dtype == "bfloat16" and dtype == "float32" and op != "Cast":
            dtype = "bfloat16"
        if op == "Cast" and node.attrs.get("to") == 16:
            dtype = "bfloat16"
        out.append((dtype, tuple(int(d) for d in arr.shape)))
    return out
