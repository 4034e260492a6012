"""The partitioner: groups graph nodes into regions, one kernel launch each, and binds every tensor to a
buffer view.

Fusion rules (v0):
- MatMul + the elementwise ops that consume only its result (bias, activation, scale, residual add,
  ...) -> one GEMM with an epilogue expression; a LayerNormalization whose only users are GEMMs is
  recomputed in their prologue and launches nothing.
- Chains and DAGs of elementwise ops over one iteration space -> one elementwise kernel.
- Reshape / Flatten / Squeeze / Unsqueeze / Identity / Transpose are views: they change shape and
  strides and launch nothing; GEMM operands and elementwise inputs read any strided view, so a
  transpose feeding them is free. A kernel that needs contiguous rows gets a copy only when its input
  is not already contiguous.
A group is emitted at the position of its last node, which keeps the launch order topological."""

import math
from dataclasses import dataclass, field

import numpy as np

from flashrt.aot.ir import Graph, Node
from flashrt.errors import ModelError
from flashrt.kernels.dtypes import ITEMSIZE, from_f32

ACT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = {"float32", "float16", "bfloat16"}
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"}
RESHAPE_OPS = VIEW_OPS - {"Transpose"}
UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Neg": "neg", "Exp": "exp",
         "Sqrt": "sqrt", "Reciprocal": "recip", "Abs": "abs"}
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "max", "Min": "min"}
ELEMENTWISE = set(UNARY) | set(BINARY) | {"Gelu"}
MAX_EXPR = 64


@dataclass(eq=False)
class Buffer:
    name: str
    kind: str  # "arena" | "input" | "output" | "weight"
    dtype: str
    nelems: int
    data: np.ndarray | None = None  # weights: the stored array
    offset: int = -1  # bytes, set by the memory plan

    @property
    def nbytes(self) -> int:
        return self.nelems * ITEMSIZE[self.dtype]


@dataclass(eq=False)
class TensorRef:
    buffer: Buffer
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0  # elements

    @property
    def dtype(self) -> str:
        return self.buffer.dtype

    def contiguous(self) -> bool:
        return tuple(self.strides) == tuple(contiguous_strides(self.shape)) or math.prod(self.shape) <= 1

    def span_bytes(self) -> int:
        if math.prod(self.shape) == 0:
            return 0
        return (sum((d - 1) * s for d, s in zip(self.shape, self.strides)) + 1) * ITEMSIZE[self.dtype]


@dataclass(eq=False)
class KernelCall:
    name: str
    family: str
    params: dict
    args: list[TensorRef]  # the kernel's pointer arguments, in arg_spec order
    ops: list[str]
    source_nodes: list[str]


@dataclass
class Program:
    calls: list[KernelCall]
    inputs: list[tuple[str, Buffer, tuple]]
    outputs: list[tuple[str, Buffer, tuple]]
    buffers: list[Buffer] = field(default_factory=list)
    compute_nodes: int = 0


def contiguous_strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def broadcast_strides(ref: TensorRef, out_shape: tuple) -> list[int]:
    """ref's strides for iterating over out_shape under numpy broadcasting."""
    pad = len(out_shape) - len(ref.shape)
    strides = []
    for i in range(len(out_shape)):
        j = i - pad
        strides.append(0 if j < 0 or ref.shape[j] == 1 else ref.strides[j])
    return strides


@dataclass(eq=False)
class Group:
    kind: str  # "gemm" | "eltwise" | "layernorm" | "softmax" | "view"
    nodes: list[Node]
    prologue: Node | None = None  # a fused LayerNormalization for gemm


class Partitioner:
    def __init__(self, graph: Graph, precision: str):
        if precision not in ACT_DTYPES:
            raise ModelError(f"precision {precision!r} is not one of {sorted(ACT_DTYPES)}")
        self.g = graph
        self.act = ACT_DTYPES[precision]
        self.users = graph.consumers()
        self.outputs = set(graph.outputs)
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.refs: dict[str, TensorRef] = {}
        self.weights: dict[tuple[str, str], Buffer] = {}
        self.calls: list[KernelCall] = []
        self.buffers: list[Buffer] = []
        self.output_buffers: dict[str, Buffer] = {}

    # ---- planning -------------------------------------------------------------------------------

    def _fusable(self, node: Node, shape: tuple) -> bool:
        out = self.g.values[node.outputs[0]]
        return node.op in ELEMENTWISE and out.shape == shape and out.dtype in FLOAT_DTYPES

    def _grow(self, seed: Node, assigned: set) -> list[Node]:
        """Largest elementwise DAG grown from seed whose only escaping value is its last node's output."""
        shape = self.g.values[seed.outputs[0]].shape
        members, produced = [seed], {seed.outputs[0]}
        best, size = [seed], 1
        while size < MAX_EXPR:
            cands = [u for v in produced for u in self.users.get(v, [])
                     if id(u) not in assigned and u not in members and self._fusable(u, shape)]
            if not cands:
                break
            nxt = min(cands, key=lambda n: self.index[id(n)])
            members.append(nxt)
            produced.add(nxt.outputs[0])
            size += len(nxt.inputs) + 1
            last = max(members, key=lambda n: self.index[id(n)])
            escaping = {v for v in produced if v in self.outputs
                        or any(u not in members for u in self.users.get(v, []))}
            if escaping == {last.outputs[0]}:
                best = sorted(members, key=lambda n: self.index[id(n)])
        return best

    def _ln_prologue_ok(self, ln: Node) -> bool:
        y = ln.outputs[0]
        users = self.users.get(y, [])
        x = self.g.values[ln.inputs[0]]
        axis = ln.attrs.get("axis", -1) % len(x.shape)
        return (axis == len(x.shape) - 1 and y not in self.outputs and bool(users)
                and not any(o and self.users.get(o) for o in ln.outputs[1:])
                and all(u.op == "MatMul" and u.inputs[0] == y and u.inputs[1] != y for u in users)
                and all(i in self.g.constants for i in ln.inputs[1:] if i))

    def plan(self) -> list[Group]:
        assigned: set[int] = set()
        groups: list[Group] = []
        fused_ln: dict[str, Node] = {}
        for node in self.g.nodes:
            if id(node) in assigned:
                continue
            for v in node.outputs[:1]:
                if self.g.values[v].dtype not in FLOAT_DTYPES and node.op not in VIEW_OPS:
                    raise ModelError(f"node '{node.name}' ({node.op}) computes a {self.g.values[v].dtype} tensor "
                                     "at run time; flashrt computes float tensors only")
            if node.op in VIEW_OPS:
                group = Group("view", [node])
            elif node.op == "LayerNormalization":
                if len(node.outputs) > 1 and any(o and self.users.get(o) for o in node.outputs[1:]):
                    raise ModelError(f"node '{node.name}' (LayerNormalization): its Mean/InvStdDev outputs are "
                                     "used; flashrt supports only the normalized output")
                if self._ln_prologue_ok(node):
                    fused_ln[node.outputs[0]] = node
                    assigned.add(id(node))
                    continue
                group = Group("layernorm", [node])
            elif node.op == "Softmax":
                group = Group("softmax", [node])
            elif node.op == "MatMul":
                members = self._grow(node, assigned)
                group = Group("gemm", members, fused_ln.get(node.inputs[0]))
            elif node.op in ELEMENTWISE:
                group = Group("eltwise", self._grow(node, assigned))
            else:
                raise ModelError(f"node '{node.name}': op {node.op} has no kernel")
            for n in group.nodes:
                assigned.add(id(n))
            groups.append(group)
        return sorted(groups, key=lambda gr: self.index[id(gr.nodes[-1])])

    # ---- buffers ---------------------------------------------------------------------------------

    def _reshape_only_output(self, value: str) -> str | None:
        """A graph output that `value` reaches through reshape-only views (other users may read it too)."""
        if value in self.outputs:
            ok = list(self.g.outputs).count(value) == 1 and value not in self.output_buffers
            return value if ok else None
        for user in self.users.get(value, []):
            if user.op in RESHAPE_OPS:
                found = self._reshape_only_output(user.outputs[0])
                if found is not None:
                    return found
        return None

    def new_output(self, value: str) -> TensorRef:
        """A fresh contiguous buffer for the value a kernel writes; a graph output's own buffer when the
        value is (a reshape of) one, so no copy is needed."""
        v = self.g.values[value]
        n = math.prod(v.shape)
        out = self._reshape_only_output(value)
        if out is not None:
            buf = Buffer(out, "output", self.g.values[out].dtype, n)
            self.output_buffers[out] = buf
        else:
            buf = Buffer(value, "arena", self.act, n)
        self.buffers.append(buf)
        return TensorRef(buf, v.shape, tuple(contiguous_strides(v.shape)))

    def weight(self, name: str, dtype: str, array: np.ndarray | None = None) -> TensorRef:
        arr = np.asarray(self.g.constants[name] if array is None else array)
        key = (name, dtype)
        if key not in self.weights:
            data = np.ascontiguousarray(from_f32(arr.astype(np.float32), dtype))
            buf = Buffer(name, "weight", dtype, arr.size, data)
            self.weights[key] = buf
            self.buffers.append(buf)
        return TensorRef(self.weights[key], tuple(arr.shape), tuple(contiguous_strides(arr.shape)))

    def ref(self, value: str, weight_dtype: str = "float32") -> TensorRef:
        if value in self.g.constants:
            return self.weight(value, weight_dtype)
        return self.refs[value]

    def contiguous(self, ref: TensorRef, name: str, source: list[str]) -> TensorRef:
        if ref.contiguous():
            return ref
        buf = Buffer(f"{name}/contiguous", "arena", ref.dtype, math.prod(ref.shape))
        self.buffers.append(buf)
        out = TensorRef(buf, ref.shape, tuple(contiguous_strides(ref.shape)))
        self._eltwise_call(f"{name}/copy", ref.shape, [ref], [["in", 0]], out, ["Copy"], source)
        return out

    # ---- emission --------------------------------------------------------------------------------

    def _eltwise_call(self, name, shape, inputs, expr, out, ops, source):
        params = {"shape": list(shape), "out_dtype": out.dtype, "expr": expr,
                  "inputs": [{"dtype": r.dtype, "strides": broadcast_strides(r, shape)} for r in inputs]}
        self.calls.append(KernelCall(name, "eltwise", params, list(inputs) + [out], ops, _unique(source)))

    def _expression(self, nodes: list[Node], acc_value: str | None, out_shape: tuple):
        """Expression instructions for an elementwise DAG, and the tensor inputs it reads."""
        expr, slot, inputs, input_slot = [], {}, [], {}
        if acc_value is not None:
            expr.append(["acc"])
            slot[acc_value] = 0

        def operand(value: str) -> int:
            if value in slot:
                return slot[value]
            const = self.g.constants.get(value)
            if const is not None and const.size == 1:
                expr.append(["const", float(np.float32(const.reshape(())))])
            else:
                if value not in input_slot:
                    input_slot[value] = len(inputs)
                    inputs.append(self.ref(value))
                expr.append(["in", input_slot[value]])
            slot[value] = len(expr) - 1
            return slot[value]

        for n in nodes:
            args = [operand(i) for i in n.inputs if i]
            if n.op == "Gelu" and n.attrs.get("approximate", "none") == "tanh":
                x = args[0]  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                base = len(expr)
                expr += [["mul", x, x], ["mul", base, x], ["const", 0.044715], ["mul", base + 1, base + 2],
                         ["add", x, base + 3], ["const", math.sqrt(2 / math.pi)], ["mul", base + 4, base + 5],
                         ["tanh", base + 6], ["const", 1.0], ["add", base + 7, base + 8], ["const", 0.5],
                         ["mul", x, base + 10], ["mul", base + 11, base + 9]]
            elif n.op == "Gelu":
                expr.append(["gelu", args[0]])
            elif n.op in UNARY:
                expr.append([UNARY[n.op], args[0]])
            else:
                acc = args[0]
                for b in args[1:]:
                    expr.append([BINARY[n.op], acc, b])
                    acc = len(expr) - 1
            slot[n.outputs[0]] = len(expr) - 1
        return expr, inputs

    def emit_view(self, node: Node) -> None:
        x = self.ref(node.inputs[0], self.act)
        out = self.g.values[node.outputs[0]].shape
        if node.op == "Transpose":
            perm = node.attrs.get("perm", list(range(len(x.shape)))[::-1])
            self.refs[node.outputs[0]] = TensorRef(x.buffer, tuple(x.shape[p] for p in perm),
                                                   tuple(x.strides[p] for p in perm), x.offset)
            return
        x = self.contiguous(x, node.name, node.source)
        self.refs[node.outputs[0]] = TensorRef(x.buffer, out, tuple(contiguous_strides(out)), x.offset)

    def emit_eltwise(self, group: Group) -> None:
        last = group.nodes[-1].outputs[0]
        shape = self.g.values[last].shape
        expr, inputs = self._expression(group.nodes, None, shape)
        out = self.new_output(last)
        name = group.nodes[-1].name
        self._eltwise_call(name, shape, inputs, expr, out, [n.op for n in group.nodes],
                           [s for n in group.nodes for s in n.source])
        self.refs[last] = out

    def emit_gemm(self, group: Group) -> None:
        mm, epi = group.nodes[0], group.nodes[1:]
        ln = group.prologue
        a = self.ref(ln.inputs[0] if ln else mm.inputs[0], self.act)
        b = self.ref(mm.inputs[1], self.act)
        if len(a.shape) == 1:
            a = TensorRef(a.buffer, (1,) + a.shape, (0,) + a.strides, a.offset)
        if len(b.shape) == 1:
            b = TensorRef(b.buffer, b.shape + (1,), b.strides + (0,), b.offset)
        M, K = a.shape[-2:]
        N = b.shape[-1]
        batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        kshape = batch + (M, N)
        a_bs = broadcast_strides(a, batch + a.shape[-2:])[:len(batch)]
        b_bs = broadcast_strides(b, batch + b.shape[-2:])[:len(batch)]

        last = (epi[-1] if epi else mm).outputs[0]
        onnx_shape = self.g.values[last].shape
        expr, inputs = self._expression(epi, mm.outputs[0], onnx_shape)
        epi_inputs = []
        for r in inputs:
            st = broadcast_strides(r, onnx_shape)
            if len(onnx_shape) != len(kshape):  # a 1-D MatMul operand dropped M or N: reinsert a 0 stride
                st = st + [0] if len(self.g.values[mm.inputs[1]].shape) == 1 else st[:-1] + [0, st[-1]]
            epi_inputs.append({"dtype": r.dtype, "strides": st})
        args = [a, b]
        ln_params = None
        if ln:
            gamma = self.g.constants[ln.inputs[1]]
            args.append(self.weight(ln.inputs[1], "float32", np.broadcast_to(gamma, (K,))))
            has_beta = len(ln.inputs) > 2 and bool(ln.inputs[2])
            if has_beta:
                args.append(self.weight(ln.inputs[2], "float32", np.broadcast_to(self.g.constants[ln.inputs[2]], (K,))))
            ln_params = {"eps": float(np.float32(ln.attrs.get("epsilon", 1e-5))), "has_beta": has_beta}
        out = self.new_output(last)
        params = {"M": M, "N": N, "K": K, "batch": list(batch), "out_dtype": out.dtype, "expr": expr,
                  "a": {"dtype": a.dtype, "batch_strides": a_bs, "sm": a.strides[-2], "sk": a.strides[-1]},
                  "b": {"dtype": b.dtype, "batch_strides": b_bs, "sk": b.strides[-2], "sn": b.strides[-1]},
                  "ln": ln_params, "epi_inputs": epi_inputs}
        nodes = ([ln] if ln else []) + group.nodes
        self.calls.append(KernelCall(mm.name, "gemm", params, args + inputs + [out], [n.op for n in nodes],
                                     _unique(s for n in nodes for s in n.source)))
        self.refs[last] = out

    def emit_layernorm(self, group: Group) -> None:
        (n,) = group.nodes
        x = self.contiguous(self.ref(n.inputs[0], self.act), n.name, n.source)
        axis = n.attrs.get("axis", -1) % len(x.shape)
        rows, K = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
        for i in n.inputs[1:]:
            if i and i not in self.g.constants:
                raise ModelError(f"node '{n.name}' (LayerNormalization): scale and bias must be constants")
        args = [x, self.weight(n.inputs[1], "float32", np.broadcast_to(self.g.constants[n.inputs[1]],
                                                                        x.shape[axis:]).reshape(K))]
        has_beta = len(n.inputs) > 2 and bool(n.inputs[2])
        if has_beta:
            args.append(self.weight(n.inputs[2], "float32",
                                    np.broadcast_to(self.g.constants[n.inputs[2]], x.shape[axis:]).reshape(K)))
        out = self.new_output(n.outputs[0])
        params = {"rows": rows, "K": K, "eps": float(np.float32(n.attrs.get("epsilon", 1e-5))),
                  "has_beta": has_beta, "in_dtype": x.dtype, "out_dtype": out.dtype}
        self.calls.append(KernelCall(n.name, "layernorm", params, args + [out], [n.op], n.source))
        self.refs[n.outputs[0]] = out

    def emit_softmax(self, group: Group) -> None:
        (n,) = group.nodes
        x = self.contiguous(self.ref(n.inputs[0], self.act), n.name, n.source)
        axis = n.attrs.get("axis", -1) % len(x.shape)
        L, inner = x.shape[axis], math.prod(x.shape[axis + 1:])
        out = self.new_output(n.outputs[0])
        params = {"rows": math.prod(x.shape) // max(L, 1), "L": L, "inner": inner,
                  "in_dtype": x.dtype, "out_dtype": out.dtype}
        self.calls.append(KernelCall(n.name, "softmax", params, [x, out], [n.op], n.source))
        self.refs[n.outputs[0]] = out

    def run(self) -> Program:
        inputs = []
        for name in self.g.inputs:
            v = self.g.values[name]
            buf = Buffer(name, "input", v.dtype, math.prod(v.shape))
            self.buffers.append(buf)
            self.refs[name] = TensorRef(buf, v.shape, tuple(contiguous_strides(v.shape)))
            inputs.append((name, buf, v.shape))
        emit = {"view": self.emit_view, "gemm": self.emit_gemm, "eltwise": self.emit_eltwise,
                "layernorm": self.emit_layernorm, "softmax": self.emit_softmax}
        for group in self.plan():
            if group.kind == "view":
                self.emit_view(group.nodes[0])
            else:
                emit[group.kind](group)
        outputs = []
        for name in self.g.outputs:
            shape = self.g.values[name].shape
            ref = self.refs[name]
            own = self.output_buffers.get(name)
            if own is None or ref.buffer is not own or not ref.contiguous():
                own = Buffer(name, "output", self.g.values[name].dtype, math.prod(shape))
                self.buffers.append(own)
                out = TensorRef(own, shape, tuple(contiguous_strides(shape)))
                self._eltwise_call(f"{name}/output", shape, [ref], [["in", 0]], out, ["Copy"], [name])
            outputs.append((name, own, shape))
        compute = sum(1 for n in self.g.nodes if n.op not in VIEW_OPS)
        return Program(self.calls, inputs, outputs, self.buffers, compute)


def partition(graph: Graph, precision: str) -> Program:
    return Partitioner(graph, precision).run()
