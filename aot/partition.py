"""The partitioner: groups graph nodes into regions, one kernel launch each, and binds every tensor to a view
of a buffer (aot/views.py).

Fusion rules:
- MatMul + the elementwise ops that consume only its result (bias, activation, scale, mask, residual add:
  any elementwise DAG over the GEMM's output) -> one GEMM with an epilogue expression; a LayerNorm or
  RMSNorm whose only users are GEMMs is recomputed in their prologue and launches nothing; so is an FP8
  quantization of a GEMM input (FakeQuantFP8, from the model's Q/DQ pairs or --calib): the GEMM rounds A to
  E4M3 as it stages it (norm + quant in one prologue), whatever produced A.
- Elementwise DAGs over one iteration space (Where, comparisons and Casts included) -> one kernel.
- A Concat along the key axis whose output feeds only attention K^T / V operands (directly or through
  Reshape / Transpose / Expand / Unsqueeze-like views: GQA's repeated heads) launches nothing: the attention
  reads each input in place as a source of its K or V (kernels/attention.py). Graph inputs among them that are
  not in the activation type (float32 prefix K/V of a bf16 engine) are converted once, all in the first launch.
- Reshape / Flatten / Squeeze / Unsqueeze / Identity / Transpose / Expand / Slice / Split and Gather of a
  constant index are views: no launch. GEMM operands, epilogue and elementwise inputs read any view, so the
  head split/merge of attention and the patch layout of a patch-embedding Conv cost nothing. Kernels that
  need contiguous rows (Softmax, LayerNorm, Gather's table) get a copy only when their input is not.
A group is emitted at the position of its last node, which keeps the launch order topological."""

import math
from dataclasses import dataclass, field

import numpy as np

from flashrt.aot.importers.onnx_ops import REDUCE_OPS, gathernd_index
from flashrt.aot.ir import Graph, Node
from flashrt.aot.quantize import quantize_fp8, quantize_nvfp4
from flashrt.aot.state import CACHE_WRITE, POSITIONS
from flashrt.aot.gemv_cost import choose_gemv_format
from flashrt.aot.prefetch import plan_l2_prefetch
from flashrt.aot.targets import (attention_prefetch_enabled, fp8_mma, fused_mlp_enabled, fused_oproj_enabled,
                                 l2_prefetch_budget, l2_prefetch_hosts, mlp_gated_rows, sm_number, wgmma_enabled,
                                 wgmma_fp8_enabled, wgmma_nvfp4_enabled)
from flashrt.aot.views import Buffer, TensorRef
from flashrt.errors import BuildError, ModelError
from flashrt.kernels import attention as attention_kernel
from flashrt.kernels import concat as concat_kernel
from flashrt.kernels import layernorm as layernorm_kernel
from flashrt.kernels import gemm_mma, gemv, registry
from flashrt.kernels.dtypes import ITEMSIZE, STORAGE, from_f32, to_f32
from flashrt.kernels.quant import dequant_fp8, dequant_nvfp4

ACT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "bfloat16", "nvfp4": "bfloat16",
              "auto": "bfloat16"}
QUANT_FORMATS = ("fp8", "nvfp4")
FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Expand", "Slice", "Split"}
RESHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
KV_VIEW_OPS = RESHAPE_OPS | {"Transpose", "Expand"}  # views between a fused Concat and the attention reading it
UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Neg": "neg", "Exp": "exp",
         "Sqrt": "sqrt", "Reciprocal": "recip", "Abs": "abs", "Sin": "sin", "Cos": "cos", "Not": "not",
         "IsNaN": "isnan", "Floor": "floor", "Ceil": "ceil", "Softplus": "softplus", "FakeQuantE4M3": "e4m3"}
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "max", "Min": "min",
          "Equal": "eq", "Less": "lt", "Greater": "gt", "LessOrEqual": "le", "GreaterOrEqual": "ge",
          "And": "and", "Or": "or"}
ELEMENTWISE = set(UNARY) | set(BINARY) | {"RotateHalf", "Gelu", "Where", "Cast", "CastLike", "LeakyRelu", "HardSigmoid",
                                          "FakeQuantFP8"}
NORMS = {"LayerNormalization", "RMSNormalization"}
ACT_QUANT = ("FakeQuantFP8", "FakeQuantNVFP4")  # quantizations of a GEMM's A that the GEMM applies as it stages A
MAX_EXPR = 96


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass(eq=False)
class KernelCall:
    name: str
    family: str
    params: dict
    args: list[TensorRef]  # the kernel's pointer arguments, in arg_spec order
    ops: list[str]
    source_nodes: list[str]
    reason: str = ""  # why this region has its precision (the planner's word, shown by inspect)


def _arg_names(call: KernelCall) -> list[str]:
    return [n for n, _ in registry.family(call.family).arg_spec(call.params)]


def _take_over(into: KernelCall, call: KernelCall) -> None:
    """into now also computes what call did: its ops and source nodes, and its name (the region's last node)."""
    into.ops += call.ops
    into.name = call.name
    into.source_nodes = _unique(into.source_nodes + call.source_nodes)


@dataclass
class Program:
    calls: list[KernelCall]
    inputs: list[tuple[str, Buffer, tuple]]
    outputs: list[tuple[str, Buffer, tuple]]
    buffers: list[Buffer] = field(default_factory=list)
    compute_nodes: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Shared:
    """What the entry points of one engine share: weight buffers (keyed with a digest of their bytes, as two
    imports of one model may fold different constants under one name) and the state buffers."""
    weights: dict = field(default_factory=dict)
    quant_weights: dict = field(default_factory=dict)
    state: dict[str, Buffer] = field(default_factory=dict)


@dataclass
class EntryState:
    """A stateful entry point: the device position counter, and the run-time count of valid new tokens
    (None when the entry always writes all of its tokens, as decode does)."""
    pos: Buffer
    length: Buffer | None
    tokens: int


FOLDED = "the norm's gamma folded into the weight (wgmma)"
# acc + in0 in either order: a GEMM's epilogue adding a residual
RESIDUAL_EXPRS = ([["acc"], ["in", 0], ["add", 0, 1]], [["acc"], ["in", 0], ["add", 1, 0]])


@dataclass(eq=False)
class Group:
    kind: str  # "gemm" | "eltwise" | "norm" | "softmax" | "view" | "gather" | "concat" | "reduce" | "conv"
    nodes: list[Node]
    prologue: Node | None = None  # a fused LayerNorm/RMSNorm for gemm
    halves: tuple[str, str] | None = None  # gated: the gate and up values
    quant: Node | None = None  # a fused FakeQuantFP8 / FakeQuantNVFP4 of the GEMM's A (after the norm)

    def a_source(self) -> str:
        """The value a GEMM group reads as A: the fused norm's input, else the fused quantization's, else its own."""
        mm = self.nodes[0]
        return self.prologue.inputs[0] if self.prologue else self.quant.inputs[0] if self.quant else mm.inputs[0]


class Partitioner:
    def __init__(self, graph: Graph, precision: str, shared: Shared | None = None, entry: EntryState | None = None,
                 targets: list[str] | None = None, deterministic: bool = False):
        if precision not in ACT_DTYPES:
            raise ModelError(f"precision {precision!r} is not one of {sorted(ACT_DTYPES)}")
        self.g = graph
        self.precision = precision
        self.act = ACT_DTYPES[precision]
        self.targets = list(targets or [])
        # E4M3 mma.sync on every target (sm_89+), and where it is native rather than widened to f16 by ptxas
        support = {t: fp8_mma(t) for t in targets or []}
        self.no_fp8 = sorted(t for t, v in support.items() if v == "none")
        self.fp8_mma = not self.no_fp8
        self.fp8_native = bool(support) and set(support.values()) == {"native"}
        self.clusters = all(sm_number(t) >= 90 for t in targets or [])  # thread-block clusters
        self.mma = all(sm_number(t) >= 80 for t in targets or [])  # bf16 mma.sync and cp.async
        self.wgmma = wgmma_enabled(self.targets)  # the sm_90a wgmma GEMM (off: FLASHRT_WGMMA=0)
        self.wgmma_fp8 = wgmma_fp8_enabled(self.targets)  # fp8 weights in it too (off: FLASHRT_WGMMA_FP8=0)
        self.wgmma_nvfp4 = wgmma_nvfp4_enabled(self.targets)  # and nvfp4 ones (opt-in: FLASHRT_WGMMA_NVFP4=1)
        # decode fusions that add into float32 accumulators with atomics (a run-to-run varying summation order)
        self.fuse_oproj = fused_oproj_enabled() and not deterministic
        self.fuse_mlp = fused_mlp_enabled() and not deterministic
        self.not_native = sorted(t for t, v in support.items() if v != "native")
        self.warnings: list[str] = list(graph.prequantized.warnings) if graph.prequantized else []
        if self.no_fp8 and precision in ("fp8", "nvfp4", "auto"):
            self.warnings.append(f"{', '.join(self.no_fp8)}: no FP8 instructions (sm_89+); quantized weights are "
                                 "decoded in software there")
        self.users = graph.consumers()
        self.norm_calls: dict[int, tuple[KernelCall, Node]] = {}  # id(output buffer) -> a standalone norm
        self.producers = graph.producers()
        self.outputs = set(graph.outputs)
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.refs: dict[str, TensorRef] = {}
        self.shared = shared
        self.entry = entry
        self.weights: dict[tuple, Buffer] = shared.weights if shared else {}
        self.quant_weights: dict[tuple, tuple[Buffer, list[Buffer]]] = \
            shared.quant_weights if shared else {}  # (data, its scale tensors)
        self.cache_written: set[int] = set()
        # Concats read in place by attention: node id -> [(view chain, key axis after each view)] per operand
        # reached; the operand values' sources (and the Concat), filled as the Concats are emitted; graph inputs
        # converted to another type in the first launch: name -> (buffer, element offset)
        self.kv_concats: dict[int, list[tuple[list[Node], list[int]]]] = {}
        self.kv_sources: dict[str, tuple[list[TensorRef], Node]] = {}
        self.converted: dict[str, tuple[Buffer, int]] = {}
        self.exact = integer_derived(graph)
        self.calls: list[KernelCall] = []
        self.buffers: list[Buffer] = []
        self.output_buffers: dict[str, Buffer] = {}

    def storage(self, value: str) -> str:
        dtype = self.g.values[value].dtype
        if dtype in FLOAT_DTYPES and value in self.exact:
            return "float32"
        return self.act if dtype in FLOAT_DTYPES else dtype

    # ---- planning -------------------------------------------------------------------------------

    def _fusable(self, node: Node, shape: tuple) -> bool:
        if node.op == "FakeQuantFP8" and (node.attrs.get("scale") == "row" or self._quant_prologue_ok(node)):
            return False  # the GEMMs reading it quantize A themselves, exactly (no bf16 round trip)
        return node.op in ELEMENTWISE and self.g.values[node.outputs[0]].shape == shape

    def _grow(self, seed: Node, assigned: set, shape: tuple, siblings: bool = False) -> list[Node]:
        """Largest elementwise DAG grown from seed whose only escaping value is its last node's output.
        siblings (elementwise kernels): also pull in a member's single-use elementwise producers and RoPE's
        RotateHalf (read as a rotated input), so x * cos + rotate_half(x) * sin is one kernel."""
        return self._grow_from([seed], {seed.outputs[0]}, assigned, shape, siblings) or [seed]

    def _grow_from(self, members: list[Node], produced: set, assigned: set, shape: tuple,
                   siblings: bool = False) -> list[Node] | None:
        """Grow `members` (which produce `produced`) by elementwise consumers of their values; the largest
        state whose only escaping value is the last member's output, or None."""
        members, produced = list(members), set(produced)
        best, size = None, len(members)

        def ok(n: Node) -> bool:
            if n.op == "RotateHalf":  # the kernel rotates a loaded input, not a computed value
                return siblings and n.inputs[0] not in produced and self.g.values[n.outputs[0]].shape == shape
            return self._fusable(n, shape)

        def pull(n: Node) -> None:  # single-use producers of n's inputs join with n
            for v in n.inputs:
                p = self.producers.get(v)
                if (p is not None and id(p) not in assigned and p not in members and ok(p)
                        and v not in self.outputs and all(u in members or u is n for u in self.users.get(v, []))):
                    members.append(p)
                    produced.add(v)
                    pull(p)

        if siblings:
            pull(members[0])
        while size < MAX_EXPR:
            cands = [u for v in produced for u in self.users.get(v, [])
                     if id(u) not in assigned and u not in members and ok(u)]
            if not cands:
                break
            nxt = min(cands, key=lambda n: self.index[id(n)])
            members.append(nxt)
            produced.add(nxt.outputs[0])
            if siblings:
                pull(nxt)
            size = sum(len(n.inputs) + 1 for n in members)
            last = max(members, key=lambda n: self.index[id(n)])
            escaping = {v for v in produced if v in self.outputs
                        or any(u not in members for u in self.users.get(v, []))}
            rotated_ok = all(n.inputs[0] not in produced for n in members if n.op == "RotateHalf")
            if escaping == {last.outputs[0]} and rotated_ok:
                best = sorted(members, key=lambda n: self.index[id(n)])
        return best

    def _gemm_inputs_only(self, value: str) -> bool:
        """value is read only as the A operand of MatMuls (or through a fusable FP8 quantization of it)."""
        users = self.users.get(value, [])
        return value not in self.outputs and bool(users) and all(
            (u.op == "MatMul" and u.inputs[0] == value and u.inputs[1] != value)
            or (u.op in ACT_QUANT and u.inputs[0] == value and self._quant_prologue_ok(u)) for u in users)

    def _norm_prologue_ok(self, norm: Node) -> bool:
        x = self.g.values[norm.inputs[0]]
        axis = norm.attrs.get("axis", -1) % len(x.shape)
        return (axis == len(x.shape) - 1 and self._gemm_inputs_only(norm.outputs[0])
                and not any(o and self.users.get(o) for o in norm.outputs[1:])
                and all(i in self.g.constants for i in norm.inputs[1:] if i))

    def _quant_prologue_ok(self, fq: Node) -> bool:
        """A FakeQuantFP8 / FakeQuantNVFP4 that the GEMMs reading it apply to A themselves: its only users are
        MatMuls' A (NVFP4: over K a multiple of 16, the block)."""
        y = fq.outputs[0]
        users = self.users.get(y, [])
        return (y not in self.outputs and bool(users) and fq.inputs[0] not in self.g.constants
                and (fq.op != "FakeQuantNVFP4" or self.g.values[y].shape[-1] % 16 == 0)
                and all(u.op == "MatMul" and u.inputs[0] == y and u.inputs[1] != y for u in users))

    def _gated_tail(self, mm: Node, assigned: set) -> tuple[list[Node], str, str] | None:
        """For y = x @ [Wg | Wu] split into halves g, u that only an elementwise DAG combines (SwiGLU, GeGLU):
        (the split nodes + the DAG, g, u), computed by one gated GEMV."""
        w = self.g.constants.get(mm.inputs[1])
        y = mm.outputs[0]
        if w is None or w.ndim != 2 or w.shape[1] % 2 or y in self.outputs:
            return None
        x = self.g.values[mm.inputs[0]]
        half = w.shape[1] // 2
        if math.prod(x.shape[:-1]) > gemv.MAX_M:  # the sm_90a wgmma GEMM computes both halves per block
            if not self.wgmma or self.act not in ("bfloat16", "float16") or w.shape[0] % 8:
                return None
        elif not gemv.eligible(1, w.shape[0], ITEMSIZE[self.act]):
            return None
        users = self.users.get(y, [])
        rank = len(self.g.values[y].shape)
        halves: dict[int, str] = {}
        for u in users:
            if u.op == "Split" and u.attrs.get("axis", 0) % rank == rank - 1 and len(u.outputs) == 2 \
                    and all(o and self.g.values[o].shape[-1] == half for o in u.outputs):
                halves[0], halves[half] = u.outputs
            elif u.op == "Slice" and len(u.inputs) >= 3:
                c = self.g.constants
                try:
                    start, end = int(c[u.inputs[1]].reshape(-1)[0]), int(c[u.inputs[2]].reshape(-1)[0])
                    axes = c[u.inputs[3]].reshape(-1) if len(u.inputs) > 3 and u.inputs[3] else [rank - 1]
                    steps = c[u.inputs[4]].reshape(-1) if len(u.inputs) > 4 and u.inputs[4] else [1]
                except (KeyError, IndexError):
                    return None
                if len(axes) != 1 or int(axes[0]) % rank != rank - 1 or int(steps[0]) != 1:
                    return None
                if (start, min(end, 2 * half)) in ((0, half), (half, 2 * half)):
                    halves[start] = u.outputs[0]
                else:
                    return None
            else:
                return None
        if set(halves) != {0, half} or len(users) > 2:
            return None
        g, up = halves[0], halves[half]
        best = self._grow_from([], {g, up}, assigned, self.g.values[g].shape)
        if best is None:
            return None
        splits = list({id(n): n for n in users}.values())
        return splits + best, g, up

    def _attention_tail(self, scores: list[Node]) -> list[Node] | None:
        """[Softmax, MatMul] when the score DAG feeds softmax(.) @ V and nothing else: one attention kernel."""
        out = scores[-1].outputs[0]
        shape = self.g.values[out].shape
        users = self.users.get(out, [])
        if len(shape) < 2 or out in self.outputs or len(users) != 1 or users[0].op != "Softmax":
            return None
        sm = users[0]
        if sm.attrs.get("axis", -1) % len(shape) != len(shape) - 1:
            return None
        p_users = self.users.get(sm.outputs[0], [])
        if sm.outputs[0] in self.outputs or len(p_users) != 1 or p_users[0].op != "MatMul":
            return None
        mm2 = p_users[0]
        v = self.g.values[mm2.inputs[1]]
        hd = self.g.values[scores[0].inputs[0]].shape[-1]
        if mm2.inputs[0] != sm.outputs[0] or mm2.inputs[1] == sm.outputs[0] or len(v.shape) < 2 \
                or hd > 512 or v.shape[-1] > 512 or len(self.g.values[scores[0].inputs[0]].shape) < 2:
            return None
        return [sm, mm2]

    def plan(self) -> list[Group]:
        assigned: set[int] = set()
        groups: list[Group] = []
        fused_norm: dict[str, Node] = {}
        fused_quant: dict[str, Node] = {}
        for node in self.g.nodes:
            if id(node) in assigned:
                continue
            for v in node.outputs:
                if v and math.prod(self.g.values[v].shape) == 0:
                    raise ModelError(f"node '{node.name}' ({node.op}): its output '{v}' has no elements; "
                                     "flashrt does not compute zero-size tensors")
            op = node.op
            if op in VIEW_OPS or (op == "Gather" and node.inputs[1] in self.g.constants
                                  and self.g.constants[node.inputs[1]].ndim == 0):
                group = Group("view", [node])
            elif op in ACT_QUANT and self._quant_prologue_ok(node):
                fused_quant[node.outputs[0]] = node
                assigned.add(id(node))
                continue
            elif op == "FakeQuantNVFP4" or (op == "FakeQuantFP8" and node.attrs.get("scale") == "row"):
                raise ModelError(f"node '{node.name}' ({op}): flashrt applies block / per-row activation "
                                 "quantization only inside the GEMMs that read it (K a multiple of 16 for NVFP4); "
                                 "this one has other users")
            elif op in NORMS:
                if len(node.outputs) > 1 and any(o and (self.users.get(o) or o in self.outputs)
                                                 for o in node.outputs[1:]):
                    raise ModelError(f"node '{node.name}' ({op}): its Mean/InvStdDev outputs are used; "
                                     "flashrt supports only the normalized output")
                if self._norm_prologue_ok(node):
                    fused_norm[node.outputs[0]] = node
                    assigned.add(id(node))
                    continue
                group = Group("norm", [node])
            elif op == "Softmax":
                group = Group("softmax", [node])
            elif op == "MatMul" and (gated := self._gated_tail(node, assigned)):
                tail, gate, up = gated
                quant = fused_quant.get(node.inputs[0])
                group = Group("gated", [node] + tail, fused_norm.get(quant.inputs[0] if quant else node.inputs[0]),
                              (gate, up), quant)
            elif op == "MatMul":
                shape = self.g.values[node.outputs[0]].shape
                members = self._grow(node, assigned, shape)
                quant = fused_quant.get(node.inputs[0])
                a_in = quant.inputs[0] if quant else node.inputs[0]
                attention = None if a_in in fused_norm or quant else self._attention_tail(members)
                if attention:
                    group = Group("attention", members + attention)
                else:
                    group = Group("gemm", members, fused_norm.get(a_in), quant=quant)
            elif op in ELEMENTWISE:
                group = Group("eltwise", self._grow(node, assigned, self.g.values[node.outputs[0]].shape, True))
            elif op == "GatherND":
                if node.inputs[1] not in self.g.constants:
                    raise ModelError(f"node '{node.name}' (GatherND): flashrt needs constant indices")
                group = Group("gather", [node])
            elif op in ("Gather", "Concat", "Conv"):
                group = Group(op.lower(), [node])
            elif op in REDUCE_OPS:
                group = Group("reduce", [node])
            elif op in (CACHE_WRITE, POSITIONS) and self.entry is not None:
                group = Group(op, [node])
            else:
                raise ModelError(f"node '{node.name}': {op} with run-time inputs has no kernel in flashrt")
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

    def new_output(self, value: str, nelems: int | None = None) -> Buffer:
        """A fresh buffer for the value a kernel writes; a graph output's own buffer when the value is (a
        reshape of) one, so no copy is needed."""
        v = self.g.values[value]
        n = math.prod(v.shape) if nelems is None else nelems
        out = self._reshape_only_output(value)
        if out is not None and self.g.values[out].dtype != "float64":
            buf = Buffer(out, "output", self.g.values[out].dtype, n)
            self.output_buffers[out] = buf
        else:
            buf = Buffer(value, "arena", self.storage(value), n)
        self.buffers.append(buf)
        return buf

    def new_output_ref(self, value: str) -> TensorRef:
        return TensorRef.contiguous_view(self.new_output(value), self.g.values[value].shape)

    def weight(self, name: str, dtype: str | None = None, array: np.ndarray | None = None) -> TensorRef:
        arr = np.asarray(self.g.constants[name] if array is None else array)
        if dtype is None:
            dtype = "float32" if arr.dtype.kind == "f" else {"b": "bool"}.get(arr.dtype.kind, str(arr.dtype))
            if dtype not in STORAGE:
                dtype = "int64" if arr.dtype.kind in "iu" else "float32"
        # a derived layout (a GEMM weight's transpose) must not share a buffer with the constant as it is
        key = (name, dtype, arr.shape, array is not None, _digest(arr) if self.shared else None)
        if key not in self.weights:
            if dtype in ("float32", "float16", "bfloat16"):
                data = from_f32(arr.astype(np.float32), dtype)
            else:
                data = arr.astype(STORAGE[dtype])
            buf = Buffer(name, "weight", dtype, arr.size, np.ascontiguousarray(data))
            self.weights[key] = buf
            self.buffers.append(buf)
        return TensorRef.contiguous_view(self.weights[key], arr.shape)

    def ref(self, value: str, weight_dtype: str | None = None) -> TensorRef:
        if value in self.g.constants:
            return self.weight(value, weight_dtype)
        return self.refs[value]

    def contiguous(self, ref: TensorRef, name: str, source: list[str]) -> TensorRef:
        if ref.contiguous():
            return ref
        buf = Buffer(f"{name}/contiguous", "arena", ref.dtype, math.prod(ref.shape))
        self.buffers.append(buf)
        out = TensorRef.contiguous_view(buf, ref.shape)
        self._eltwise_call(f"{name}/copy", ref.shape, [ref], [["in", 0]], out, ["Copy"], source)
        return out

    # ---- emission --------------------------------------------------------------------------------

    def _eltwise_call(self, name, shape, inputs, expr, out, ops, source):
        params = {"shape": list(shape), "out_dtype": out.dtype, "expr": expr,
                  "inputs": [{"dtype": r.dtype, "atoms": r.atoms_over(shape)} for r in inputs]}
        self.calls.append(KernelCall(name, "eltwise", params, list(inputs) + [out], ops, _unique(source)))

    def _expression(self, nodes: list[Node], acc_value: str | dict | None):
        """Expression instructions for an elementwise DAG, and the tensor inputs it reads. acc_value names the
        value the GEMM accumulator stands for ({gate: 0, up: 1} for a gated GEMM)."""
        expr, slot, inputs, input_slot = [], {}, [], {}
        accs = {acc_value: 0} if isinstance(acc_value, str) else dict(acc_value or {})
        for value, i in accs.items():
            expr.append(["acc"] if i == 0 else ["acc", i])
            slot[value] = len(expr) - 1

        def emit(*ins) -> int:
            expr.append(list(ins))
            return len(expr) - 1

        def operand(value: str) -> int:
            if value in slot:
                return slot[value]
            const = self.g.constants.get(value)
            if const is not None and const.size == 1:
                slot[value] = emit("const", float(np.float32(const.reshape(()).astype(np.float64))))
            else:
                if value not in input_slot:
                    input_slot[value] = len(inputs)
                    inputs.append(self.ref(value))
                slot[value] = emit("in", input_slot[value])
            return slot[value]

        for n in nodes:
            if n.op == "Where":
                args = [operand(i) for i in n.inputs]
                out = emit("where", *args)
            elif n.op in ("Cast", "CastLike"):
                x = operand(n.inputs[0])
                to = self.g.values[n.outputs[0]].dtype
                out = x if to in FLOAT_DTYPES else emit("ne0" if to == "bool" else "trunc", x)
            elif n.op == "Gelu" and n.attrs.get("approximate", "none") in ("tanh", b"tanh"):
                x = operand(n.inputs[0])  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                x3 = emit("mul", emit("mul", x, x), x)
                inner = emit("mul", emit("add", x, emit("mul", x3, emit("const", 0.044715))),
                             emit("const", math.sqrt(2 / math.pi)))
                t = emit("add", emit("tanh", inner), emit("const", 1.0))
                out = emit("mul", emit("mul", x, emit("const", 0.5)), t)
            elif n.op == "Gelu":
                out = emit("gelu", operand(n.inputs[0]))
            elif n.op == "FakeQuantFP8":  # static scale (per-row ones are fused into GEMMs only)
                x, scale = operand(n.inputs[0]), operand(n.inputs[1])
                out = emit("mul", emit("e4m3", emit("div", x, scale)), scale)
            elif n.op == "LeakyRelu":
                x = operand(n.inputs[0])
                neg = emit("lt", x, emit("const", 0.0))
                out = emit("where", neg, emit("mul", x, emit("const", n.attrs.get("alpha", 0.01))), x)
            elif n.op == "HardSigmoid":
                x = operand(n.inputs[0])
                y = emit("add", emit("mul", x, emit("const", n.attrs.get("alpha", 0.2))),
                         emit("const", n.attrs.get("beta", 0.5)))
                out = emit("min", emit("max", y, emit("const", 0.0)), emit("const", 1.0))
            elif n.op == "RotateHalf":  # the input read half a row away (eltwise kernels: _grow's siblings)
                operand(n.inputs[0])
                out = emit("in_rot", input_slot[n.inputs[0]])
            elif n.op in UNARY:
                out = emit(UNARY[n.op], operand(n.inputs[0]))
            else:
                args = [operand(i) for i in n.inputs if i]
                out = args[0]
                for b in args[1:]:
                    out = emit(BINARY[n.op], out, b)
            slot[n.outputs[0]] = out
        if slot[nodes[-1].outputs[0]] != len(expr) - 1:  # the result is an earlier value: make it the last
            emit("id", slot[nodes[-1].outputs[0]])
        return expr, inputs

    def emit_view(self, node: Node) -> None:
        op = node.op
        x = self.ref(node.inputs[0])
        outs = [self.g.values[o] for o in node.outputs]
        if op == "Transpose":
            perm = node.attrs.get("perm", list(range(len(x.shape)))[::-1])
            self.refs[node.outputs[0]] = x.transpose(perm)
            return
        if op == "Expand":
            self.refs[node.outputs[0]] = x.expand(outs[0].shape)
            return
        if op in ("Slice", "Split", "Gather"):
            for o, v in zip(node.outputs, outs):
                if not o:
                    continue
                view = self._slice_view(node, x, o, v.shape)
                if view is None:
                    x = self.contiguous(x, node.name, node.source)
                    view = self._slice_view(node, x, o, v.shape)
                if view is None:
                    raise ModelError(f"node '{node.name}' ({op}): this slicing (negative steps) is not supported "
                                     "on run-time tensors")
                self.refs[o] = view
            return
        view = x.reshape(outs[0].shape)
        if view is None:
            x = self.contiguous(x, node.name, node.source)
            view = x.reshape(outs[0].shape)
        self.refs[node.outputs[0]] = view

    def _slice_view(self, node: Node, x: TensorRef, out: str, out_shape: tuple) -> TensorRef | None:
        """Slice, Split output or constant-scalar Gather as a view of x."""
        rank = len(x.shape)
        if node.op == "Gather":
            axis = node.attrs.get("axis", 0) % rank
            idx = int(self.g.constants[node.inputs[1]])
            idx = idx + x.shape[axis] if idx < 0 else idx
            v = x.slice(axis, idx, 1, 1)
            return None if v is None else v.reshape(out_shape)
        if node.op == "Split":
            axis = node.attrs.get("axis", 0) % rank
            start = 0
            for o in node.outputs:
                size = self.g.values[o].shape[axis] if o else 0
                if o == out:
                    return x.slice(axis, start, 1, size)
                start += size
        c = self.g.constants
        starts, ends = (np.asarray(c[node.inputs[i]]).reshape(-1) for i in (1, 2))
        axes = np.asarray(c[node.inputs[3]]).reshape(-1) if len(node.inputs) > 3 and node.inputs[3] \
            else np.arange(len(starts))
        steps = np.asarray(c[node.inputs[4]]).reshape(-1) if len(node.inputs) > 4 and node.inputs[4] \
            else np.ones(len(starts), np.int64)
        view = x
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = int(a) % rank
            start, _, step = slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)),
                                   int(st)).indices(x.shape[a])
            view = view.slice(a, start, step, out_shape[a])
            if view is None:
                return None
        return view

    def emit_eltwise(self, group: Group) -> None:
        last = group.nodes[-1].outputs[0]
        shape = self.g.values[last].shape
        expr, inputs = self._expression(group.nodes, None)
        out = self.new_output_ref(last)
        if self._norm_epilogue(group, shape, expr, inputs, out):
            self.refs[last] = out
            return
        self._eltwise_call(group.nodes[-1].name, shape, inputs, expr, out, [n.op for n in group.nodes],
                           [s for n in group.nodes for s in n.source])
        self.refs[last] = out

    def _norm_epilogue(self, group: Group, shape: tuple, expr: list, inputs: list[TensorRef], out: TensorRef) -> bool:
        """An elementwise group that alone reads a standalone norm's output, in the norm's element order and over
        rows of the norm's K (the RoPE after Qwen3's per-head q / k norm, at decode): the norm's kernel computes
        the expression as its epilogue (kernels/layernorm.py `epi`), one launch instead of two."""
        for j, ref in enumerate(inputs):
            if id(ref.buffer) not in self.norm_calls or not shape:
                continue
            call, node = self.norm_calls[id(ref.buffer)]
            y = call.args[-1]
            if shape[-1] != call.params["K"]:
                continue
            if any(r.buffer is ref.buffer for i, r in enumerate(inputs) if i != j):
                continue  # the norm's output read twice (another view of it): only one becomes the epilogue's value
            if not (ref.contiguous() and ref.offset == y.offset and math.prod(ref.shape) == math.prod(y.shape)
                    == math.prod(shape) and self._only_read_by(node.outputs[0], group.nodes)):
                continue
            order = [j] + [i for i in range(len(inputs)) if i != j]  # the normalized value becomes input 0
            slot = {old: new for new, old in enumerate(order)}
            epi_expr = [[ins[0], slot[ins[1]]] if ins[0] in ("in", "in_rot") else list(ins) for ins in expr]
            others = [inputs[i] for i in order[1:]]
            call.params = {**call.params, "out_dtype": out.dtype,
                           "epi": {"expr": epi_expr,
                                   "inputs": [{"dtype": r.dtype, "atoms": r.atoms_over(shape)} for r in others]}}
            call.args = call.args[:-1] + others + [out]
            call.ops += [n.op for n in group.nodes]
            call.name = group.nodes[-1].name
            call.source_nodes = _unique(call.source_nodes + [s for n in group.nodes for s in n.source])
            self.calls.remove(call)  # now after its epilogue's inputs
            self.calls.append(call)
            del self.norm_calls[id(ref.buffer)]
            self._merge_norms(call)
            return True
        return False

    def _merge_norms(self, call: KernelCall) -> None:
        """Two norm-with-epilogue launches in a row that do not read each other (a layer's q and k head norms
        with their RoPE) become one launch of two parts (kernels/layernorm.py `parts`)."""
        prev = self.calls[-2] if len(self.calls) > 1 else None
        if prev is None or prev.family != "layernorm" or not (prev.params.get("epi") or prev.params.get("parts")) \
                or len(prev.params.get("parts", [prev.params])) >= layernorm_kernel.MAX_PARTS:
            return

        def split(c: KernelCall) -> tuple[set[int], list[TensorRef]]:  # its outputs' buffers, its inputs
            written = [a == "y" or a.startswith(("y_", "cache")) for a in _arg_names(c)]
            return ({id(r.buffer) for r, w in zip(c.args, written) if w},
                    [r for r, w in zip(c.args, written) if not w])

        (prev_out, prev_in), (call_out, call_in) = split(prev), split(call)
        if any(id(r.buffer) in prev_out for r in call_in) or any(id(r.buffer) in call_out for r in prev_in):
            return
        self.calls.pop()
        prev.params = {"parts": prev.params.get("parts", [prev.params]) + [call.params]}
        prev.args += call.args
        _take_over(prev, call)

    def _only_read_by(self, value: str, nodes: list[Node]) -> bool:
        """Whether every reader of value, through views, is one of nodes (and value is no graph output)."""
        members, todo = {id(n) for n in nodes}, [value]
        while todo:
            v = todo.pop()
            if v in self.outputs:
                return False
            for u in self.users.get(v, []):
                if u.op in VIEW_OPS:
                    todo.extend(u.outputs)
                elif id(u) not in members:
                    return False
        return True

    def _gemm_call(self, name: str, a: TensorRef, a_atoms: dict, b: TensorRef, b_atoms: dict, mnk: tuple,
                   batch: tuple, norm: Node | None, expr: list, epi_inputs: list[TensorRef], out: TensorRef,
                   ops: list[str], source: list[str], gated: bool = False, quant: tuple = ((), ""),
                   aq: tuple[str, TensorRef | None] | None = None,
                   folded: tuple[dict, list[TensorRef]] | None = None) -> None:
        """aq: A's quantization as plan_activation gives it ("tensor" / "nvfp4" and its scale, or "row", None).
        folded: the norm folded into b by fold_norm (its ln params and its colsum / bias refs)."""
        M, N, K = mnk
        kshape = tuple(batch) + (M, N)
        quant_refs, reason = quant
        args = [a, b] + list(quant_refs) + ([aq[1]] if aq and aq[1] is not None else [])
        norm_params = None
        if folded is not None:
            norm_params = folded[0]
            args += folded[1]
        elif norm is not None:
            gamma = np.broadcast_to(self.g.constants[norm.inputs[1]], (K,))
            args.append(self.weight(norm.inputs[1], "float32", gamma))
            has_beta = norm.op == "LayerNormalization" and len(norm.inputs) > 2 and bool(norm.inputs[2])
            if has_beta:
                args.append(self.weight(norm.inputs[2], "float32",
                                        np.broadcast_to(self.g.constants[norm.inputs[2]], (K,))))
            norm_params = {"eps": float(np.float32(norm.attrs.get("epsilon", 1e-5))), "has_beta": has_beta,
                           "rms": norm.op == "RMSNormalization"}
        params = {"M": M, "N": N, "K": K, "batch": list(batch), "out_dtype": out.dtype, "expr": expr,
                  "a": a_atoms, "b": b_atoms, "ln": norm_params,
                  "epi_inputs": [{"dtype": r.dtype, "atoms": r.atoms_over(kshape)} for r in epi_inputs]}
        if aq:
            params["aq"] = aq[0]
        family = "gemm"
        rows = math.prod(batch) * M
        vec = gemv.VALUES_PER_16B.get(b_atoms["dtype"], 1)
        if gated:
            params["gated"] = True
        if gated and rows <= gemv.MAX_M:
            params.update(R=2, S=gemv.choose_config(rows, 2 * N, K, vec)[1])
            family = "gemv"
        elif not gated and (b.buffer.kind == "weight" and b_atoms["batch"] == [[1, 0]] and b_atoms["k"] == [[K, 1]]
                and b_atoms["n"] == [[N, K]] and b.offset == 0 and gemv.eligible(rows, K, vec)):
            # batch-1 decode shapes: stream the weights once (kernels/gemv.py); batch rows fold into M
            family = "gemv"
            params["R"], params["S"] = gemv.choose_config(rows, N, K, vec)
            params["M"], params["batch"] = rows, []
            params["a"] = {**a_atoms, "batch": [[1, 0]], "m": _atoms(a_atoms["batch"] + a_atoms["m"])}
        elif self.mma and (mma := gemm_mma.config(params, a.offset, b.offset, self.act, b.buffer.kind == "weight",
                                                  self.fp8_mma, self.clusters, self.wgmma, self.wgmma_fp8,
                                                  self.wgmma_nvfp4)):
            params["mma"] = mma  # 16-bit activations: the tensor-core GEMM (kernels/gemm_mma.py)
        if (folded is not None or family == "gemm" and gated) and not params.get("mma", {}).get("wgmma"):
            raise BuildError(f"node '{name}': internal: a folded norm or a gated GEMM without the wgmma kernel")
        self.calls.append(KernelCall(name, family, params, args + list(epi_inputs) + [out], ops, _unique(source),
                                     reason))

    def emit_gemm(self, group: Group) -> None:
        mm, epi = group.nodes[0], group.nodes[1:]
        norm, fq = group.prologue, group.quant
        a = self.ref(group.a_source(), self.act)
        if len(a.shape) == 1:
            a = a.reshape((1,) + a.shape)
        w = self.g.constants.get(mm.inputs[1])
        quant, b_atoms, fmt, folded = ((), ""), None, None, None
        if mm.outputs[0] in self.exact:  # positions x frequencies: full precision (see integer_derived)
            a = self.ref(mm.inputs[0], "float32")
            if w is not None and w.ndim == 2:
                b = self.weight(mm.inputs[1], "float32", np.ascontiguousarray(w.T)).transpose((1, 0))
                quant, b_shape = ((), "float32: computed from integer positions"), tuple(w.shape)
            else:
                b = self.ref(mm.inputs[1], "float32")
                b = b.reshape(b.shape + (1,)) if len(b.shape) == 1 else b
                b_shape = b.shape
        elif w is not None and w.ndim == 2:  # weights are stored [N, K]: K contiguous, as GEMV streams them
            fmt, reason = self.plan_weight(mm, w.shape[0], w.shape[1], math.prod(a.shape[:-1]))
            if norm is not None and fq is None and (fold := self.fold_norm(mm, norm, w, a, fmt)) is not None:
                b, quant_refs, b_atoms, folded = fold
                quant = (quant_refs, (f"{reason}; " if reason else "") + FOLDED)
            elif fmt in QUANT_FORMATS:
                b, quant_refs, b_atoms = self.quant_weight(mm.inputs[1], np.ascontiguousarray(w.T), fmt)
                quant = (quant_refs, reason)
            else:
                b = self.weight(mm.inputs[1], self.act, np.ascontiguousarray(w.T)).transpose((1, 0))
                quant = ((), reason)
            b_shape = tuple(w.shape)
        else:
            b = self.ref(mm.inputs[1], self.act)
            if len(b.shape) == 1:
                b = b.reshape(b.shape + (1,))
            b_shape = b.shape
        batch = tuple(np.broadcast_shapes(a.shape[:-2], b_shape[:-2]))
        M, K, N = a.shape[-2], a.shape[-1], b_shape[-1]
        kshape = batch + (M, N)
        aq, reason = self.plan_activation(mm, fq, fmt, math.prod(a.shape[:-1]), quant[1])
        quant = (quant[0], reason)
        last = (epi[-1] if epi else mm).outputs[0]
        expr, inputs = self._expression(epi, mm.outputs[0]) if epi else ([["acc"]], [])
        onnx_shape = self.g.values[last].shape
        # epilogue inputs broadcast against the ONNX shape; the kernel iterates over kshape (a 1-D operand
        # drops M or N in ONNX): reach kshape through a reshape of the broadcast view
        epi_refs = [r.expand(onnx_shape).reshape(kshape) if onnx_shape != kshape else r for r in inputs]
        out_buf = self.new_output(last)
        out = TensorRef.contiguous_view(out_buf, kshape)
        nodes = [n for n in (norm, fq) if n] + group.nodes
        a_atoms = {"dtype": a.dtype, "batch": a.batch_atoms(batch), "m": a.dim_atoms(-2), "k": a.dim_atoms(-1)}
        if b_atoms is None:
            b_atoms = {"dtype": b.dtype, "batch": b.batch_atoms(batch), "k": b.dim_atoms(-2), "n": b.dim_atoms(-1)}
        self._gemm_call(mm.name, a, a_atoms, b, b_atoms, (M, N, K), batch, norm, expr, epi_refs, out,
                        [n.op for n in nodes], [s for n in nodes for s in n.source], quant=quant, aq=aq,
                        folded=folded)
        self.refs[last] = TensorRef.contiguous_view(out_buf, onnx_shape)
        if self.fuse_oproj:
            self._fuse_oproj(mm, last, onnx_shape)
        if self.fuse_mlp:
            self._fuse_down(mm, last, onnx_shape)

    # ---- decode fusions through float32 accumulators (one-row GEMVs, kernels/gemm.py down / a_mirror / mirror,
    # kernels/attention.py oproj). A residual stream y = r + sum of products is added into with atomics by the
    # kernels that compute the products; a kernel earlier in the list stores r into y first.

    @staticmethod
    def _arg_buffer(call: KernelCall, name: str) -> Buffer | None:
        names = _arg_names(call)
        return call.args[names.index(name)].buffer if name in names else None

    @staticmethod
    def _fused_weight(proj: KernelCall) -> tuple[dict, list[TensorRef]]:
        """A one-row GEMV's weight as a fused projection takes it: its `b` params ({dtype, quant?}) and arguments
        (the weight, and an fp8 weight's scale)."""
        quant = proj.params["b"].get("quant")
        return {"dtype": proj.params["b"]["dtype"], **({"quant": quant} if quant else {})}, \
            proj.args[1:3 if quant else 2]

    def _residual_projection(self, call: KernelCall, K: int) -> bool:
        """Whether call is a one-row GEMV y = r + a W^T (a projection and its residual, nothing else) over K."""
        p = call.params
        return call.family == "gemv" and p["M"] == 1 and p["K"] == K and not (
            p.get("gated") or p.get("aq") or p["ln"] or p.get("cache") or p.get("mirror") or p.get("a_mirror")) \
            and p["b"].get("quant") in (None, "fp8") and len(p["epi_inputs"]) == 1 and p["expr"] in RESIDUAL_EXPRS

    def _read_only_by(self, mm: Node) -> bool:
        """Whether mm's A, as its producer wrote it (through views), is read by mm alone."""
        value = mm.inputs[0]
        while (prod := self.producers.get(value)) is not None and prod.op in VIEW_OPS:
            value = prod.inputs[0]
        return self._only_read_by(value, [mm])

    def _accumulator(self, out: TensorRef, n: int) -> Buffer | None:
        """The float32 buffer that takes the place of a fused projection's output (a float32 graph output's own)."""
        if out.buffer.kind == "output":
            return out.buffer if out.dtype == "float32" else None
        acc = Buffer(out.buffer.name, "arena", "float32", n)
        self.buffers[self.buffers.index(out.buffer)] = acc
        return acc

    def _insert_arg(self, call: KernelCall, params: dict, name: str, ref: TensorRef) -> None:
        """Give call the new params and the argument `name` (the one argument they add) at its place."""
        call.params = params
        at = _arg_names(call).index(name)
        call.args = call.args[:at] + [ref] + call.args[at:]

    def _absorb(self, into: KernelCall, call: KernelCall, last: str, acc: Buffer, shape: tuple, what: str) -> None:
        _take_over(into, call)
        fused = f"{what} fused in: added into a float32 accumulator with atomics (run-to-run rounding; " \
                "--deterministic keeps it a launch of its own)"
        into.reason = "; ".join(_unique([x for x in (into.reason, call.reason, fused) if x]))
        self.calls.remove(call)
        self.refs[last] = TensorRef.contiguous_view(acc, shape)

    def _fuse_oproj(self, mm: Node, last: str, onnx_shape: tuple) -> None:
        """A one-token attention whose output only feeds the next launch, a one-row GEMV y = r + O W_o^T (the
        o-projection and its residual), where r is the A of an earlier one-row GEMV (the layer's QKV projection):
        the attention's clusters multiply their head's output by their share of W_o and add it into y with
        atomics (kernels/attention.py `oproj`), and the QKV GEMV stores r into y first (`a_mirror`)."""
        proj, att = self.calls[-1], self.calls[-2] if len(self.calls) > 1 else None
        if att is None or att.family != "attention":
            return
        a = att.params
        if a.get("mma") or a.get("oproj") or a["T"] != 1 or a.get("TQ") != 1:
            return
        BH, VD, CL, NT = a["BH"], a["VD"], a.get("CL", 1), 32 * a["KW"]
        if not self._residual_projection(proj, BH * VD):
            return
        p = proj.params
        N, item = p["N"], ITEMSIZE[p["b"]["dtype"]]
        o, r, out = proj.args[0], proj.args[-2], proj.args[-1]
        if o.buffer is not att.args[-1].buffer or o.offset or att.args[-1].offset or not o.contiguous() \
                or N % CL or VD * item % 16 or -(-(N // CL) // NT) > attention_kernel.MAX_OPROJ_ROWS:
            return
        if not (self._read_only_by(mm) and r.contiguous() and r.offset == 0 and r.buffer.nelems == N):
            return
        reader = next((c for c in self.calls[:-2] if c.family == "gemv" and c.args[0].buffer is r.buffer
                       and not c.args[0].offset and c.args[0].contiguous() and c.params["M"] == 1
                       and c.params["K"] == N and not c.params.get("gated") and not c.params.get("a_mirror")), None)
        acc = self._accumulator(out, N) if reader is not None else None
        if acc is None:
            return
        y = TensorRef.contiguous_view(acc, (N,))
        self._insert_arg(reader, {**reader.params, "a_mirror": 1}, "a_mirror0", y)
        b, weight = self._fused_weight(proj)
        att.params = {**a, "oproj": {"N": N, "b": b, "outs": 1}}
        att.args = att.args[:-1] + weight + [y]
        self._absorb(att, proj, last, acc, onnx_shape, "o-projection")

    def _fuse_down(self, mm: Node, last: str, onnx_shape: tuple) -> None:
        """A one-row GEMV y = r + h W2^T (an MLP's down projection with its residual) right after the gated GEMV
        that alone produces h: the gated kernel multiplies its own values of h by W2 and adds them into y with
        atomics (kernels/gemm.py `down`). y starts as r: r's GEMV stores it there too (`mirror`), or, where r is
        itself an accumulator of a fused attention + o-projection, that kernel adds into y as well and the GEMV
        that filled r's accumulator fills y too (`outs` 2, `a_mirror` 2). The MLP becomes one launch."""
        down, gated = self.calls[-1], self.calls[-2] if len(self.calls) > 1 else None
        if gated is None or gated.family != "gemv" or not gated.params.get("gated") or gated.params["M"] != 1:
            return
        N = gated.params["N"]
        if not self._residual_projection(down, N):
            return
        p = down.params
        N2 = p["N"]
        h, r, out, c = down.args[0], down.args[-2], down.args[-1], gated.args[-1]
        R = mlp_gated_rows(gated.params["R"])
        J = (8 // gated.params["S"]) * (R // 2)  # h values per block of the gated kernel
        if h.buffer is not c.buffer or h.offset or c.offset or not h.contiguous() or N % J \
                or J * ITEMSIZE[p["b"]["dtype"]] % 8:
            return
        if not (self._read_only_by(mm) and r.contiguous() and r.offset == 0 and r.buffer.nelems == N2):
            return
        earlier = list(reversed(self.calls[:-2]))
        producer = next((call for call in earlier if call.family == "gemv" and self._arg_buffer(call, "c") is r.buffer),
                        None)
        att = next((call for call in earlier if call.family == "attention" and call.params.get("oproj", {}).get(
            "outs") == 1 and call.args[-1].buffer is r.buffer), None)
        reader = next((call for call in earlier if call.params.get("a_mirror") == 1
                       and self._arg_buffer(call, "a_mirror0") is r.buffer), None)
        if producer is not None:
            if producer.params.get("gated") or producer.params.get("mirror") or producer.params["M"] != 1 \
                    or producer.params["N"] != N2:
                return
        elif att is None or reader is None:
            return
        acc = self._accumulator(out, N2)
        if acc is None:
            return
        y = TensorRef.contiguous_view(acc, (N2,))
        if producer is not None:
            self._insert_arg(producer, {**producer.params, "mirror": True}, "mirror", y)
        else:
            self._insert_arg(reader, {**reader.params, "a_mirror": 2}, "a_mirror1", y)
            att.params = {**att.params, "oproj": {**att.params["oproj"], "outs": 2}}
            att.args = att.args + [y]
        b, weight = self._fused_weight(down)
        gated.params = {**gated.params, "R": R, "down": {"N": N2, "b": b}}
        gated.args = gated.args[:-1] + weight + [y]
        self._absorb(gated, down, last, acc, onnx_shape, "down projection")

    def wgmma_takes(self, fmt: str) -> bool:
        """Whether the wgmma kernel takes a weight stored in fmt (the activation type, or fp8 / nvfp4 decoded in
        shared memory where enabled)."""
        return fmt == self.act or (fmt == "fp8" and self.wgmma_fp8) or (fmt == "nvfp4" and self.wgmma_nvfp4)

    def b_trial(self, fmt: str) -> dict:
        """The B operand's type params of a weight stored in fmt (for a trial configuration)."""
        return {"fp8": {"dtype": "fp8_e4m3", "quant": "fp8"}, "nvfp4": {"dtype": "nvfp4", "quant": "nvfp4"}}.get(
            fmt, {"dtype": self.act})

    def fold_norm(self, mm: Node, norm: Node, w: np.ndarray, a: TensorRef, fmt: str) -> tuple | None:
        """The norm prologue folded into the weight for the sm_90a wgmma kernel (kernels/gemm.py ln.fold), which
        stages A as it is and has no register pass to normalize it in: B = gamma * W stored in fmt (the activation
        type, or fp8 / nvfp4 where wgmma_takes it), colsum = sum_k B as stored (LayerNorm), bias = beta . W (with a
        beta). Returns (the weight ref, its quantization scale refs, its B params or None, (ln params, [colsum,
        bias refs])), or None where that kernel would not run it (decode GEMVs, other targets, the model's own
        quantized codes) or where the engine's entry points share weights (prefill + decode: the decode
        GEMVs read W itself, and a folded copy would store the weight twice)."""
        K, N = w.shape
        batch, M = tuple(a.shape[:-2]), a.shape[-2]
        quant = fmt in QUANT_FORMATS
        if not self.wgmma or self.shared is not None or not self.wgmma_takes(fmt) \
                or gemv.eligible(math.prod(a.shape[:-1]), K, gemv.VALUES_PER_16B.get(self.act, 1)):
            return None
        if quant and self.g.prequantized and self.g.prequantized.find(w.T) is not None:
            return None
        rms = norm.op == "RMSNormalization"
        has_beta = not rms and len(norm.inputs) > 2 and bool(norm.inputs[2])
        ln = {"eps": float(np.float32(norm.attrs.get("epsilon", 1e-5))), "has_beta": has_beta, "rms": rms,
              "fold": True}
        gamma = np.broadcast_to(np.asarray(self.g.constants[norm.inputs[1]], np.float32), (K,))
        folded_nk = np.ascontiguousarray((w.astype(np.float32) * gamma[:, None]).T)
        a_atoms = {"dtype": a.dtype, "batch": a.batch_atoms(batch), "m": a.dim_atoms(-2), "k": a.dim_atoms(-1)}
        b_trial = {**self.b_trial(fmt), "batch": [[math.prod(batch), 0]], "k": [[K, 1]], "n": [[N, K]]}
        params = {"M": M, "N": N, "K": K, "batch": list(batch), "a": a_atoms, "ln": ln, "b": b_trial}
        if gemm_mma.wgmma_config(params, a.offset, 0, self.act, True, self.wgmma_fp8, self.wgmma_nvfp4) is None:
            return None
        name = f"{mm.inputs[1]}*{norm.inputs[1]}"
        if quant:
            b, scale_refs, b_atoms = self.quant_weight(name, folded_nk, fmt)
            if fmt == "fp8":
                stored = dequant_fp8(b.buffer.data.reshape(N, K), scale_refs[0].buffer.data)
            else:
                block, global_scale = (r.buffer.data for r in scale_refs)
                stored = dequant_nvfp4(b.buffer.data.reshape(N, K // 2), block.reshape(N, K // 16),
                                       np.float32(global_scale.reshape(-1)[0]))
        else:
            b = self.weight(name, self.act, folded_nk).transpose((1, 0))
            scale_refs, b_atoms = [], None
            stored = to_f32(from_f32(folded_nk, self.act), self.act)
        extra = []
        if not rms:  # sum_k of B as stored (rounded): the mean's share cancels exactly
            extra.append(self.weight(f"{name}/{fmt}/colsum", "float32", stored.sum(axis=1, dtype=np.float64)))
        if has_beta:
            beta = np.broadcast_to(np.asarray(self.g.constants[norm.inputs[2]], np.float64), (K,))
            extra.append(self.weight(f"{name}/bias/{norm.inputs[2]}", "float32", beta @ w.astype(np.float64)))
        return b, scale_refs, b_atoms, (ln, extra)

    def plan_weight(self, mm: Node, K: int, N: int, rows: int) -> tuple[str, str]:
        """The storage format of a GEMM's constant weight [K, N] and the reason (the precision planner).
        Weight-only quantization: activations stay in the engine's activation type."""
        choice = self.g.weight_plan.get(mm.inputs[1]) if self.g.weight_plan else None
        if choice is not None:  # calibrated against a cosine target (aot/sensitivity.py)
            return choice.fmt or self.act, choice.reason
        mb = K * N * 2 / 1e6
        w = self.g.constants.get(mm.inputs[1])
        pre = self.g.prequantized.find(w.T) if self.g.prequantized and w is not None and w.ndim == 2 else None
        if pre is not None and self.precision not in QUANT_FORMATS and self.precision != "auto":
            return self.act, f"{self.act}: the model's {pre.fmt} weight ('{pre.source}') dequantized " \
                             f"(--precision {self.precision})"
        if pre is not None and K % (16 if pre.fmt == "fp8" else 32) == 0:
            return pre.fmt, f"{pre.fmt} (from the model's '{pre.source}'): its codes and scales, stored as they are"
        if self.precision not in QUANT_FORMATS and self.precision != "auto":
            return self.act, ""
        fp8_ok, nvfp4_ok = K % 16 == 0, K % 32 == 0
        if self.precision == "auto":
            if rows > gemv.MAX_M:
                if self.fp8_native and fp8_ok:
                    return "fp8", (f"fp8 weight + fp8 activation: compute-bound GEMM (M={rows}) on native E4M3 "
                                   "tensor cores: twice the bf16 rate, half the operand bytes")
                where = f"not native on {', '.join(self.not_native)}" if self.not_native else "not known native"
                return self.act, (f"bf16: compute-bound GEMM (M={rows}); E4M3 mma is {where} (full-rate FP8 "
                                  "there needs FP8 wgmma with FP8 activations / tcgen05, not generated yet), so fp8 "
                                  "would not pay")
            if not fp8_ok:
                return self.act, f"{self.act}: K={K} is not a multiple of 16"
            fmt, why = choose_gemv_format(K * N, self.targets, ["fp8", "nvfp4"] if nvfp4_ok else ["fp8"])
            return (self.act if fmt == "bf16" else fmt), f"{self.act if fmt == 'bf16' else fmt}: {why} (M={rows})"
        if self.precision == "nvfp4" and nvfp4_ok:
            return "nvfp4", f"nvfp4 (requested): {mb:.1f} MB of bf16 weights -> {mb * 0.5625 / 2:.1f} MB"
        if self.precision == "nvfp4":
            why = f"NVFP4 needs K to be a multiple of 32 (16-value blocks, 32 per 16-byte load); K={K}"
            if fp8_ok:
                self.warnings.append(f"node '{mm.name}': {why}; using fp8")
                return "fp8", f"fp8 (fallback): {why}"
            self.warnings.append(f"node '{mm.name}': {why}; keeping {self.act}")
            return self.act, f"{self.act} (fallback): {why}"
        if fp8_ok:
            return "fp8", f"fp8 (requested): {mb:.1f} MB of bf16 weights -> {mb / 2:.1f} MB"
        why = f"FP8 weights need K to be a multiple of 16; K={K}"
        self.warnings.append(f"node '{mm.name}': {why}; keeping {self.act}")
        return self.act, f"{self.act} (fallback): {why}"

    def plan_activation(self, mm: Node, fq: Node | None, fmt: str | None, rows: int,
                        reason: str) -> tuple[tuple[str, TensorRef | None] | None, str]:
        """A GEMM's FP8 activation quantization ("tensor" + its scale, or "row"; None: A as it is) and the reason.
        The model's (Q/DQ, --calib) where it has one. Else, at --precision auto, per-row scales computed in the
        kernel for the tensor-core GEMMs that plan_weight gave an fp8 weight because every target multiplies
        E4M3 natively (elsewhere FP8 activations would cost accuracy and gain no speed: GEMVs at M <= 8 stream
        weights, and E4M3 mma.sync is widened to f16 on sm_90 / sm_100 / sm_110). --precision fp8 keeps bf16
        activations: it is weight quantization, within the fp8 accuracy goal (benchmarks/ACCURACY.md)."""
        if fq is not None:
            if fq.attrs.get("scale") == "row":
                return ("row", None), reason
            scale = self.weight(fq.inputs[1], "float32", np.reshape(self.g.constants[fq.inputs[1]], (1,)))
            return ("nvfp4" if fq.op == "FakeQuantNVFP4" else "tensor", scale), reason
        planned = self.g.weight_plan is not None and mm.inputs[1] in self.g.weight_plan
        if fmt != "fp8" or rows <= gemv.MAX_M or self.precision not in ("fp8", "auto") or planned:
            return None, reason
        if self.precision == "fp8" or not self.fp8_native:
            return None, (f"{reason}; {self.act} activations (FP8 ones: --precision auto where every target has "
                          "native E4M3 mma, or --calib)")
        return ("row", None), f"{reason}; fp8 activations (per-row scales computed in the kernel)"

    def quant_weight(self, name: str, w_nk: np.ndarray, fmt: str) -> tuple[TensorRef, list[TensorRef], dict]:
        """A constant weight [rows, K] quantized to fmt: (the data ref, its scale refs, the B operand params)."""
        rows, K = w_nk.shape
        key = (name, fmt, w_nk.shape, _digest(w_nk) if self.shared else None)
        if key not in self.quant_weights:
            pre = self.g.prequantized.find(w_nk) if self.g.prequantized else None
            if pre is not None and pre.fmt == fmt:  # the model's own codes: no requantization
                parts = (pre.data, *pre.scales)
            else:
                parts = quantize_fp8(w_nk) if fmt == "fp8" else quantize_nvfp4(w_nk)
            if fmt == "fp8":
                q, scale = parts
                data = Buffer(f"{name}/fp8", "weight", "fp8_e4m3", q.size, q)
                extras = [Buffer(f"{name}/fp8_scale", "weight", "float32", rows, scale)]
            else:
                packed, block, global_scale = parts
                data = Buffer(f"{name}/nvfp4", "weight", "nvfp4", packed.size, packed)
                extras = [Buffer(f"{name}/nvfp4_block", "weight", "uint8", block.size, block),
                          Buffer(f"{name}/nvfp4_global", "weight", "float32", 1,
                                 np.array([global_scale], np.float32))]
            self.quant_weights[key] = (data, extras)
            self.buffers += [data] + extras
        data, extras = self.quant_weights[key]
        ref = TensorRef.contiguous_view(data, (data.nelems,))
        extra_refs = [TensorRef.contiguous_view(e, (e.nelems,)) for e in extras]
        b_atoms = {"dtype": data.dtype, "quant": fmt, "batch": [[1, 0]], "k": [[K, 1]], "n": [[rows, K]]}
        return ref, extra_refs, b_atoms

    def emit_gated(self, group: Group) -> None:
        """x @ [Wg | Wu] -> act(g) * u (any elementwise DAG of the halves) as one gated GEMV, or past the GEMV's
        rows as one gated wgmma GEMM (sm_90a) where that kernel applies; elsewhere the GEMM, then the DAG."""
        mm, norm, fq = group.nodes[0], group.prologue, group.quant
        dag = [n for n in group.nodes[1:] if n.op not in ("Split", "Slice")]
        gate, up = group.halves
        a = self.ref(group.a_source(), self.act)
        w = self.g.constants[mm.inputs[1]]
        K, F = w.shape[0], w.shape[1] // 2
        rows = math.prod(a.shape[:-1])
        fmt, reason = self.plan_weight(mm, K, 2 * F, rows)
        aq, reason = self.plan_activation(mm, fq, fmt, rows, reason)
        a2 = a.reshape((rows, K))
        folded = None
        if rows > gemv.MAX_M:
            if a2 is None:  # the GEMM reads A's view as it is
                self.emit_gated_unfused(group)
                return
            a_atoms = {"dtype": a2.dtype, "batch": [[1, 0]], "m": a2.dim_atoms(0), "k": a2.dim_atoms(1)}
            trial = {"M": rows, "N": F, "K": K, "batch": [], "a": a_atoms, "ln": None, "gated": True,
                     "b": {**self.b_trial(fmt), "batch": [[1, 0]], "k": [[K, 1]], "n": [[2 * F, K]]}}
            if not self.wgmma_takes(fmt) or aq or gemm_mma.wgmma_config(
                    trial, a2.offset, 0, self.act, True, self.wgmma_fp8, self.wgmma_nvfp4) is None:
                self.emit_gated_unfused(group)
                return
            if norm is not None:
                folded = self.fold_norm(mm, norm, w, a2, fmt)
                if folded is None:
                    self.emit_gated_unfused(group)
                    return
        if a2 is None:
            a2 = self.contiguous(a, mm.name, mm.source).reshape((rows, K))
        if folded is not None:
            b, quant_refs, b_atoms, folded = folded
            reason = (f"{reason}; " if reason else "") + FOLDED
        elif fmt in QUANT_FORMATS:
            b, quant_refs, b_atoms = self.quant_weight(mm.inputs[1], np.ascontiguousarray(w.T), fmt)
        else:
            b = self.weight(mm.inputs[1], self.act, np.ascontiguousarray(w.T)).transpose((1, 0))
            quant_refs, b_atoms = [], None
        b_atoms = b_atoms or {"dtype": b.dtype, "batch": [[1, 0]], "k": [[K, 1]], "n": [[2 * F, K]]}
        expr, inputs = self._expression(dag, {gate: 0, up: 1})
        last = dag[-1].outputs[0]
        out_buf = self.new_output(last)
        out = TensorRef.contiguous_view(out_buf, (rows, F))
        onnx_shape = self.g.values[last].shape
        epi_refs = [r.expand(onnx_shape).reshape((rows, F)) for r in inputs]
        a_atoms = {"dtype": a2.dtype, "batch": [[1, 0]], "m": a2.dim_atoms(0), "k": a2.dim_atoms(1)}
        nodes = [n for n in (norm, fq) if n] + group.nodes
        self._gemm_call(mm.name, a2, a_atoms, b, b_atoms, (rows, F, K), (), norm, expr, epi_refs, out,
                        [n.op for n in nodes], [s for n in nodes for s in n.source], gated=True,
                        quant=(quant_refs, reason), aq=aq, folded=folded)
        self.refs[last] = TensorRef.contiguous_view(out_buf, onnx_shape)

    def emit_gated_unfused(self, group: Group) -> None:
        """A gated group no gated kernel takes: the GEMM (its own group), the halves as views, then the DAG."""
        self.emit_gemm(Group("gemm", group.nodes[:1], group.prologue, quant=group.quant))
        for n in group.nodes[1:]:
            if n.op in ("Split", "Slice"):
                self.emit_view(n)
        self.emit_eltwise(Group("eltwise", [n for n in group.nodes[1:] if n.op not in ("Split", "Slice")]))

    def emit_conv(self, group: Group) -> None:
        """A patch-embedding Conv as a GEMM: patches [Hp*Wp, C*kh*kw], a view of the image, times W^T."""
        (n,) = group.nodes
        x = self.ref(n.inputs[0])
        w = self.g.constants.get(n.inputs[1])
        if w is None:
            raise ModelError(f"node '{n.name}' (Conv): the weight must be a constant")
        _, C, H, W = x.shape
        n_out, _, kh, kw = w.shape
        hp, wp = H // kh, W // kw
        if any(len(x.dim_atoms(d)) != 1 for d in (1, 2, 3)):
            x = self.contiguous(x, n.name, n.source)
        sc, sh, sw = (x.dim_atoms(d)[0][1] for d in (1, 2, 3))
        K = C * kh * kw
        a_atoms = {"dtype": x.dtype, "batch": [[1, 0]], "m": _atoms([[hp, kh * sh], [wp, kw * sw]]),
                   "k": _atoms([[C, sc], [kh, sh], [kw, sw]])}
        wref = self.weight(n.inputs[1], self.act, w.reshape(n_out, K))  # [n_out, K]: B[k, n] at n * K + k
        b_atoms = {"dtype": wref.dtype, "batch": [[1, 0]], "k": [[K, 1]], "n": [[n_out, K]]}
        epi_inputs, expr = [], [["acc"]]
        if len(n.inputs) > 2 and n.inputs[2]:
            epi_inputs = [self.weight(n.inputs[2], "float32").reshape((1, n_out))]
            expr = [["acc"], ["in", 0], ["add", 0, 1]]
        out_buf = self.new_output(n.outputs[0])
        out = TensorRef.contiguous_view(out_buf, (hp * wp, n_out))
        self._gemm_call(n.name, x, a_atoms, wref, b_atoms, (hp * wp, n_out, K), (), None, expr, epi_inputs, out,
                        ["Conv"], n.source)
        # the ONNX value [1, n_out, Hp, Wp] is a view of the [Hp*Wp, n_out] result
        self.refs[n.outputs[0]] = TensorRef(out_buf, (1, n_out, hp, wp),
                                            (((1, 0),), ((n_out, 1),), ((hp, wp * n_out),), ((wp, n_out),)))

    def emit_attention(self, group: Group) -> None:
        """softmax(score(Q K^T)) V as one kernel (kernels/attention.py); K and V are read through their views,
        so head splits, K^T and GQA's broadcast heads cost nothing."""
        m1, epi, m2 = group.nodes[0], group.nodes[1:-2], group.nodes[-1]
        q, kt, v = self.ref(m1.inputs[0], self.act), self.ref(m1.inputs[1], self.act), self.ref(m2.inputs[1], self.act)
        # a Concat read in place: its inputs' views (sources along the keys) instead of its output's
        k_list, k_concat = self.kv_sources.get(m1.inputs[1], ([kt], None))
        v_list, v_concat = self.kv_sources.get(m2.inputs[1], ([v], None))
        concats = _unique_nodes([c for c in (k_concat, v_concat) if c])
        batch = tuple(np.broadcast_shapes(q.shape[:-2], kt.shape[:-2], v.shape[:-2]))
        T, hd, S, vd = q.shape[-2], q.shape[-1], kt.shape[-1], v.shape[-1]
        expr, inputs = self._expression(epi, m1.outputs[0]) if epi else ([["acc"]], [])
        score_shape = batch + (T, S)
        out = self.new_output_ref(m2.outputs[0])
        def operand(refs: list[TensorRef], rows: str, cols: str) -> dict:  # K^T: rows d, cols s; V: rows s
            atoms = [{"bh": r.batch_atoms(batch), rows: r.dim_atoms(-2), cols: r.dim_atoms(-1)} for r in refs]
            if len(refs) == 1:
                return {"dtype": refs[0].dtype, **atoms[0]}
            keys = [r.shape[-1 if cols == "s" else -2] for r in refs]
            return {"dtype": refs[0].dtype, "sources": [{"keys": n, **a} for n, a in zip(keys, atoms)]}

        params = {"BH": math.prod(batch), "T": T, "S": S, "HD": hd, "VD": vd,
                  "q": {"dtype": q.dtype, "bh": q.batch_atoms(batch), "t": q.dim_atoms(-2), "d": q.dim_atoms(-1)},
                  "k": operand(k_list, "d", "s"), "v": operand(v_list, "s", "d"),
                  "epi_inputs": [{"dtype": r.dtype, "atoms": r.atoms_over(score_shape)} for r in inputs],
                  "expr": expr, "out_dtype": out.dtype}
        # prefill shapes on the tensor cores; key splits over a thread-block cluster need sm_90+ on every target
        offsets = (q.offset, [r.offset for r in k_list], [r.offset for r in v_list])
        mma = attention_kernel.mma_config(params, offsets, self.clusters) if self.mma else None
        if mma:
            params["mma"] = mma
        else:
            tq, kw, cl = attention_kernel.choose_config(T, S, math.prod(batch))
            params.update({"TQ": tq, "KW": kw, "CL": cl if self.clusters else 1,
                           "k_aligned": all(r.offset % 8 == 0 for r in k_list)})
        nodes = concats + group.nodes
        pos = []
        if self.entry is not None and any(r.buffer.kind == "state" for r in k_list + v_list):
            # attention over a cache: keys 0 .. pos + t for query t, read at run time (aot/state.py)
            params["dyn"] = {"causal": True}
            pos = [self.state_ref(self.entry.pos)]
            if attention_prefetch_enabled() and attention_kernel.can_prefetch(params):
                params["prefetch"] = True
        self.calls.append(KernelCall(m2.name, "attention", params, [q] + k_list + v_list + pos + inputs + [out],
                                     [n.op for n in nodes], _unique(s for n in nodes for s in n.source)))
        self.refs[m2.outputs[0]] = out

    def state_ref(self, buf: Buffer) -> TensorRef:
        return TensorRef.contiguous_view(buf, (buf.nelems,))

    def state_buffer(self, name: str, value: str) -> Buffer:
        """The persistent buffer of a cache, shared by the engine's entry points."""
        v = self.g.values[value]
        buf = self.shared.state.get(name)
        if buf is None:
            buf = Buffer(name, "state", self.storage(value), math.prod(v.shape))
            self.shared.state[name] = buf
        elif buf.nelems != math.prod(v.shape) or buf.dtype != self.storage(value):
            raise ModelError(f"cache '{name}' has {list(v.shape)} {self.storage(value)} in one entry point and "
                             f"{buf.nelems} {buf.dtype} elements in another")
        return buf

    def emit_cache_write(self, group: Group) -> None:
        """Concat(past, new) over a cache -> write new at the run-time position; caches of the same shape whose
        new rows are ready (a layer's K and V) share one launch."""
        node = group.nodes[0]
        if id(node) in self.cache_written:
            return
        axis, shape = node.attrs["axis"], self.g.values[node.outputs[0]].shape
        outer, S, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        batch = [node] + [n for n in self.g.nodes if n.op == CACHE_WRITE and n is not node
                          and id(n) not in self.cache_written and n.inputs[0] in self.refs
                          and self.g.values[n.outputs[0]].shape == shape and n.attrs["axis"] == axis
                          and self.storage(n.outputs[0]) == self.storage(node.outputs[0])]
        pairs, args = [], [self.state_ref(self.entry.pos)]
        if self.entry.length is not None:
            args.append(self.state_ref(self.entry.length))
        T = self.g.values[node.inputs[0]].shape[axis]
        unfused = []
        for n in batch:
            src = self.ref(n.inputs[0], self.act)
            dst = self.state_buffer(n.attrs["state"], n.outputs[0])
            self.refs[n.outputs[0]] = TensorRef.contiguous_view(dst, shape)
            self.cache_written.add(id(n))
            if T == 1 and self.entry.length is None and self._fuse_cache_write(n, src, dst, outer, S, inner):
                continue
            unfused.append(n)
            pairs.append({"atoms": src.atoms_over(src.shape)})
            args += [src, TensorRef.contiguous_view(dst, (dst.nelems,))]
        if not unfused:
            return
        params = {"op": "write", "T": T, "S": S, "outer": outer, "inner": inner,
                  "dtype": self.storage(node.outputs[0]), "pairs": pairs, "has_length": self.entry.length is not None}
        self.calls.append(KernelCall(unfused[0].name, "state", params, args, ["CacheWrite"] * len(unfused),
                                     _unique(s for n in unfused for s in n.source)))

    def _fuse_cache_write(self, n: Node, src: TensorRef, dst: Buffer, outer: int, S: int, inner: int) -> bool:
        """A one-token entry: have the GEMV, elementwise or norm kernel that produced the new row (as a contiguous
        run of its output) also store it into the cache at the position (kernels/state.py), one launch fewer
        per layer. False where the producer is another kind of kernel or the row is not such a run."""
        def outputs(c: KernelCall) -> list[tuple[TensorRef, dict, int]]:
            """(output, the params that list its cache writes, where their arguments go) of each part of c"""
            names = _arg_names(c)
            if "parts" in c.params:
                return [(c.args[names.index(f"y_{j}")], part,
                         max(i for i, a in enumerate(names) if a.endswith(f"_{j}")) + 1)
                        for j, part in enumerate(c.params["parts"])]
            name = {"gemv": "c", "eltwise": "out", "layernorm": "y"}[c.family]
            return [(c.args[names.index(name)], c.params, len(c.args))] if name in names else []  # `down`: no c

        found = next(((c, o) for c in reversed(self.calls) if c.family in ("gemv", "eltwise", "layernorm")
                      for o in outputs(c) if o[0].buffer is src.buffer), None)
        if found is None:
            return False
        call, (out, params, end) = found
        if call.params.get("gated") or call.family == "gemv" and call.params["M"] != 1:
            return False
        size = outer * inner
        start = src.offset - out.offset
        if not (out.contiguous() and src.contiguous() and out.dtype == dst.dtype and math.prod(src.shape) == size
                and 0 <= start <= math.prod(out.shape) - size):
            return False
        stores = params.setdefault("cache", [])
        call.args[end:end] = ([] if stores else [self.state_ref(self.entry.pos)]) + \
            [TensorRef.contiguous_view(dst, (dst.nelems,))]
        stores.append({"start": start, "outer": outer, "inner": inner, "S": S})
        call.ops.append("CacheWrite")
        call.source_nodes = _unique(call.source_nodes + list(n.source))
        return True

    def emit_positions(self, group: Group) -> None:
        node = group.nodes[0]
        v = self.g.values[node.outputs[0]]
        out = self.new_output_ref(node.outputs[0])
        params = {"op": "positions", "T": math.prod(v.shape), "out_dtype": out.dtype}
        self.calls.append(KernelCall(node.name, "state", params, [self.state_ref(self.entry.pos), out],
                                     ["Positions"], list(node.source)))
        self.refs[node.outputs[0]] = out

    def emit_norm(self, group: Group) -> None:
        (n,) = group.nodes
        x = self.contiguous(self.ref(n.inputs[0], self.act), n.name, n.source)
        axis = n.attrs.get("axis", -1) % len(x.shape)
        rows, K = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
        trailing = x.shape[axis:]
        has_beta = n.op == "LayerNormalization" and len(n.inputs) > 2 and bool(n.inputs[2])
        runtime = any(i and i not in self.g.constants for i in n.inputs[1:3])
        gamma_dtype = self.act if runtime else "float32"

        def affine(name: str) -> TensorRef:
            if name in self.g.constants:
                arr = np.broadcast_to(self.g.constants[name], trailing).reshape(K)
                return self.weight(name, gamma_dtype, arr)
            ref = self.ref(name).expand(trailing)
            flat = ref.reshape((K,))
            flat = flat if flat is not None and flat.contiguous() else None
            return flat or self.contiguous(ref, f"{n.name}/{name}", n.source).reshape((K,))

        args = [x, affine(n.inputs[1])] + ([affine(n.inputs[2])] if has_beta else [])
        if runtime and any(a.dtype != gamma_dtype for a in args[1:]):
            raise ModelError(f"node '{n.name}' ({n.op}): scale and bias must have the same type")
        out = self.new_output_ref(n.outputs[0])
        params = {"rows": rows, "K": K, "eps": float(np.float32(n.attrs.get("epsilon", 1e-5))),
                  "has_beta": has_beta, "rms": n.op == "RMSNormalization", "in_dtype": x.dtype,
                  "out_dtype": out.dtype, "gamma_dtype": gamma_dtype}
        call = KernelCall(n.name, "layernorm", params, args + [out], [n.op], list(n.source))
        self.calls.append(call)
        self.norm_calls[id(out.buffer)] = (call, n)  # for _norm_epilogue
        self.refs[n.outputs[0]] = out

    def emit_softmax(self, group: Group) -> None:
        (n,) = group.nodes
        x = self.contiguous(self.ref(n.inputs[0], self.act), n.name, n.source)
        axis = n.attrs.get("axis", -1) % len(x.shape)
        L, inner = x.shape[axis], math.prod(x.shape[axis + 1:])
        out = self.new_output_ref(n.outputs[0])
        params = {"rows": math.prod(x.shape) // max(L, 1), "L": L, "inner": inner,
                  "in_dtype": x.dtype, "out_dtype": out.dtype,
                  "masked_rows_zero": bool(n.attrs.get("_masked_rows_zero", 0))}
        self.calls.append(KernelCall(n.name, "softmax", params, [x, out], [n.op], n.source))
        self.refs[n.outputs[0]] = out

    def emit_gather(self, group: Group) -> None:
        (n,) = group.nodes
        if n.op == "GatherND":  # constant indices: a row gather over the addressed dims flattened
            data = self.ref(n.inputs[0], self.act if self.g.values[n.inputs[0]].dtype in FLOAT_DTYPES else None)
            idx = np.asarray(self.g.constants[n.inputs[1]])
            r = idx.shape[-1]
            flat = np.ravel_multi_index(gathernd_index(n, data.shape, idx), data.shape[:r]) if r else \
                np.zeros(idx.shape[:-1], np.int64)
            rows, inner = math.prod(data.shape[:r]), math.prod(data.shape[r:])
            data = self.contiguous(data, n.name, n.source).reshape((rows, inner))
            index = self.weight(f"{n.name}/flat_indices", "int64", np.asarray(flat, np.int64).reshape(-1))
            out = self.new_output_ref(n.outputs[0])
            params = {"outer": 1, "D": rows, "inner": inner, "J": int(np.asarray(flat).size),
                      "data_dtype": data.dtype, "index_dtype": "int64", "out_dtype": out.dtype}
            self.calls.append(KernelCall(n.name, "gather", params, [data, index, out], [n.op], n.source))
            self.refs[n.outputs[0]] = out
            return
        data_dtype = self.act if self.g.values[n.inputs[0]].dtype in FLOAT_DTYPES else None
        data = self.contiguous(self.ref(n.inputs[0], data_dtype), n.name, n.source)
        idx = self.contiguous(self.ref(n.inputs[1]), n.name, n.source)
        axis = n.attrs.get("axis", 0) % len(data.shape)
        out = self.new_output_ref(n.outputs[0])
        params = {"outer": math.prod(data.shape[:axis]), "D": data.shape[axis],
                  "inner": math.prod(data.shape[axis + 1:]), "J": math.prod(idx.shape), "data_dtype": data.dtype,
                  "index_dtype": idx.dtype,
                  "out_dtype": out.dtype}
        self.calls.append(KernelCall(n.name, "gather", params, [data, idx, out], [n.op], n.source))
        self.refs[n.outputs[0]] = out

    # ---- Concats read in place by attention ---------------------------------------------------------

    def _key_axis(self, node: Node, axis: int) -> int | None:
        """The axis of node's output that is axis of its input (a view op), when it stays one whole axis."""
        shape_in, shape_out = self.g.values[node.inputs[0]].shape, self.g.values[node.outputs[0]].shape
        if node.op == "Transpose":
            return list(node.attrs.get("perm", list(range(len(shape_in)))[::-1])).index(axis)
        if node.op == "Expand":
            out = axis + len(shape_out) - len(shape_in)
            return out if shape_out[out] == shape_in[axis] else None
        before = math.prod(shape_in[:axis])
        return next((i for i, d in enumerate(shape_out)
                     if d == shape_in[axis] and math.prod(shape_out[:i]) == before), None)

    def _kv_terminals(self, concat: Node, roles: dict[int, int]) -> list[tuple[list[Node], list[int]]] | None:
        """The (view chain, key axis after each view) to every attention operand the Concat's output reaches, or
        None unless it reaches nothing else: only views (KV_VIEW_OPS) in between, the key axis one whole axis
        ending as K^T's last axis or V's second last, no value a graph output."""
        shape = self.g.values[concat.outputs[0]].shape
        found: list[tuple[list[Node], list[int]]] = []

        def walk(value: str, axis: int, chain: list[Node], axes: list[int]) -> bool:
            users = self.users.get(value, [])
            if value in self.outputs or not users:
                return False
            for u in users:
                if u.inputs.count(value) != 1:
                    return False
                role = roles.get(id(u))
                if role is not None and u.inputs[1] == value:  # K^T (role 1) or V (role 2) of an attention
                    if axis != len(self.g.values[value].shape) - role:
                        return False
                    found.append((chain, axes))
                elif u.op in KV_VIEW_OPS and u.inputs[0] == value:
                    nxt = self._key_axis(u, axis)
                    if nxt is None or not walk(u.outputs[0], nxt, chain + [u], axes + [nxt]):
                        return False
                else:
                    return False
            return True

        return found if walk(concat.outputs[0], concat.attrs["axis"] % len(shape), [], []) else None

    def plan_kv_concats(self, groups: list[Group]) -> None:
        """Find the Concats that attention can read in place (kept in kv_concats; emit_concat decides, as the
        views of the inputs are known then), and convert the graph inputs among their sources that are not in
        the Concat's type, all in one first launch (they are ready before anything runs)."""
        roles = {}
        for g in groups:
            if g.kind == "attention":
                roles[id(g.nodes[0])], roles[id(g.nodes[-1])] = 1, 2
        convert: dict[str, list[str]] = {}  # target dtype -> graph inputs
        sources: dict[str, list[str]] = {}  # graph input -> the Concats reading it
        producers = self.g.producers()
        for g in groups:
            n = g.nodes[0]
            if g.kind != "concat":
                continue
            shape = self.g.values[n.outputs[0]].shape
            axis = n.attrs["axis"] % len(shape)
            parts = [i for i in n.inputs if i and self.g.values[i].shape[axis] > 0]
            terminals = self._kv_terminals(n, roles) if 2 <= len(parts) <= attention_kernel.MAX_SOURCES else None
            if not terminals:
                continue
            self.kv_concats[id(n)] = terminals
            target = self.storage(n.outputs[0])
            for root in parts:
                while root in producers and producers[root].op in VIEW_OPS:  # a view of a graph input?
                    root = producers[root].inputs[0]
                dtype = self.g.values[root].dtype
                if root in self.g.inputs and dtype in FLOAT_DTYPES and dtype != target:
                    if root not in sources:
                        convert.setdefault(target, []).append(root)
                    sources.setdefault(root, []).append(n.name)
        for dtype, names in convert.items():
            refs = [self.refs[name] for name in names]
            buf = Buffer(f"converted_inputs/{dtype}", "arena", dtype, sum(r.buffer.nelems for r in refs))
            self.buffers.append(buf)
            offset = 0  # slots back to back: a K/V input holds whole rows, so where its head dim allows 16-byte
            for name, r in zip(names, refs):  # copies at all (a multiple of 8), every slot starts 16-byte aligned
                self.converted[name] = (buf, offset)
                offset += r.buffer.nelems
            flat = [TensorRef.contiguous_view(r.buffer, (r.buffer.nelems,)) for r in refs]
            params = {"shape": [buf.nelems], "axis": 0, "out_dtype": dtype,
                      "inputs": [{"dtype": r.dtype, "size": r.shape[0], "atoms": r.atoms_over(r.shape)} for r in flat]}
            if concat_kernel.vector_ok(params):  # whole inputs into 16-byte aligned slots: 8 elements a thread
                params["vec"] = 8
            self.calls.append(KernelCall(f"converted_inputs/{dtype}", "concat", params,
                                         flat + [TensorRef.contiguous_view(buf, (buf.nelems,))], ["Cast"] * len(names),
                                         _unique(c for name in names for c in sources[name])))

    def _fuse_kv_concat(self, n: Node) -> bool:
        """Read the Concat in place: its inputs become sources of the attention operands it reaches, through the
        same views with the key axis resized; False (emit the Concat) where a source is not in the Concat's
        type, a state tensor (a dynamic length), or a view cannot express a step."""
        shape = self.g.values[n.outputs[0]].shape
        axis = n.attrs["axis"] % len(shape)
        target = self.storage(n.outputs[0])
        refs = []
        for i in (i for i in n.inputs if i and self.g.values[i].shape[axis] > 0):
            if i in self.g.constants:  # a weight in the Concat's type, made once the views are known to work
                shape_i = self.g.values[i].shape
                refs.append(TensorRef.contiguous_view(Buffer(i, "constant", target, math.prod(shape_i)), shape_i))
                continue
            r = self.ref(i)
            if r.dtype != target and r.buffer.kind == "input" and r.buffer.name in self.converted:
                buf, offset = self.converted[r.buffer.name]  # the copy has the input's layout: the same view
                r = TensorRef(buf, r.shape, r.dims, r.offset + offset)
            if r.dtype != target or r.buffer.kind == "state":
                return False
            refs.append(r)
        whole = TensorRef.contiguous_view(Buffer(n.outputs[0], "virtual", target, math.prod(shape)), shape)
        found = {}
        for chain, axes in self.kv_concats[id(n)]:
            views = []
            for r in refs + [whole]:  # `whole`: what emit_view makes of the chain, which must need no copy
                ax = axis
                for node, nxt in zip(chain, axes):
                    out = list(self.g.values[node.outputs[0]].shape)
                    out[nxt] = r.shape[ax]
                    if node.op == "Transpose":
                        r = r.transpose(node.attrs.get("perm", list(range(len(r.shape)))[::-1]))
                    elif node.op == "Expand":
                        r = r.expand(tuple(out))
                    else:
                        r = r.reshape(tuple(out))
                    if r is None:
                        return False
                    ax = nxt
                views.append(r)
            found[chain[-1].outputs[0] if chain else n.outputs[0]] = views[:-1]
        for value, views in found.items():
            views = [TensorRef(self.weight(r.buffer.name, target).buffer, r.shape, r.dims, r.offset)
                     if r.buffer.kind == "constant" else r for r in views]
            self.kv_sources[value] = (views, n)
        self.refs[n.outputs[0]] = whole
        return True

    def emit_concat(self, group: Group) -> None:
        (n,) = group.nodes
        if id(n) in self.kv_concats and self._fuse_kv_concat(n):
            return
        shape = self.g.values[n.outputs[0]].shape
        axis = n.attrs["axis"] % len(shape)
        values = [i for i in n.inputs if i]
        if len(values) > 1 and len(set(values)) == 1:  # Concat(x, x, ...) (RoPE's cat(freqs, freqs)): a view
            x = self.ref(values[0])
            dims = list(x.dims)
            dims[axis] = ((len(values), 0),) + tuple(dims[axis])  # the copy index, then x's own index
            self.refs[n.outputs[0]] = TensorRef(x.buffer, tuple(shape), tuple(dims), x.offset)
            return
        inputs = [self.ref(i) for i in n.inputs if i and self.g.values[i].shape[axis] > 0]
        out = self.new_output_ref(n.outputs[0])
        params = {"shape": list(shape), "axis": axis, "out_dtype": out.dtype,
                  "inputs": [{"dtype": r.dtype, "size": r.shape[axis], "atoms": r.atoms_over(r.shape)}
                             for r in inputs]}
        self.calls.append(KernelCall(n.name, "concat", params, inputs + [out], [n.op], n.source))
        self.refs[n.outputs[0]] = out

    def emit_reduce(self, group: Group) -> None:
        (n,) = group.nodes
        x = self.ref(n.inputs[0])
        rank = len(x.shape)
        axes = n.attrs.get("axes")
        if len(n.inputs) > 1 and n.inputs[1]:
            axes = [int(a) for a in np.asarray(self.g.constants[n.inputs[1]]).reshape(-1)]
        if not axes:
            if n.attrs.get("noop_with_empty_axes", 0):
                self.refs[n.outputs[0]] = x
                return
            axes = list(range(rank))
        axes = sorted({a % rank for a in axes})
        kept = [d for d in range(rank) if d not in axes]
        view = x.transpose(kept + axes)
        outer, R = math.prod(x.shape[d] for d in kept), math.prod(x.shape[d] for d in axes)
        out = self.new_output_ref(n.outputs[0])
        params = {"outer": outer, "R": R, "op": n.op[6:].lower(), "in_dtype": x.dtype, "out_dtype": out.dtype,
                  "atoms": view.atoms_over(view.shape)}
        self.calls.append(KernelCall(n.name, "reduce", params, [x, out], [n.op], n.source))
        self.refs[n.outputs[0]] = out

    def run(self) -> Program:
        inputs = []
        for name in self.g.inputs:
            v = self.g.values[name]
            if v.dtype == "float64":
                raise ModelError(f"input '{name}' is float64; flashrt engines take float32/16 or bfloat16")
            buf = Buffer(name, "input", v.dtype, math.prod(v.shape))
            self.buffers.append(buf)
            self.refs[name] = TensorRef.contiguous_view(buf, v.shape)
            inputs.append((name, buf, v.shape))
        emit = {"view": lambda g: self.emit_view(g.nodes[0]), "gemm": self.emit_gemm, "eltwise": self.emit_eltwise,
                "norm": self.emit_norm, "softmax": self.emit_softmax, "gather": self.emit_gather,
                "concat": self.emit_concat, "reduce": self.emit_reduce, "conv": self.emit_conv,
                "attention": self.emit_attention, "gated": self.emit_gated, CACHE_WRITE: self.emit_cache_write,
                POSITIONS: self.emit_positions}
        groups = self.plan()
        self.plan_kv_concats(groups)
        for group in groups:
            emit[group.kind](group)
        if any(r.buffer.kind in ("virtual", "constant") for c in self.calls for r in c.args):
            raise BuildError("internal: a Concat read in place by attention reached another kernel")
        outputs = []
        for name in self.g.outputs:
            v = self.g.values[name]
            if v.dtype == "float64":
                raise ModelError(f"output '{name}' is float64; flashrt engines produce float32/16 or bfloat16")
            ref = self.refs[name] if name not in self.g.constants else self.weight(name)
            own = self.output_buffers.get(name)
            if own is None or ref.buffer is not own or not ref.contiguous() or ref.offset:
                own = Buffer(name, "output", v.dtype, math.prod(v.shape))
                self.buffers.append(own)
                out = TensorRef.contiguous_view(own, v.shape)
                self._eltwise_call(f"{name}/output", v.shape, [ref], [["in", 0]], out, ["Copy"], [name])
            outputs.append((name, own, v.shape))
        if self.entry is not None:  # last: every kernel above reads the position the run started at
            count = None if self.entry.length else self.entry.tokens
            args = [self.state_ref(self.entry.pos)] + ([self.state_ref(self.entry.length)] if count is None else [])
            self.calls.append(KernelCall("advance_position", "state", {"op": "advance", "count": count}, args,
                                         ["AdvancePosition"], []))
        plan_l2_prefetch(self.calls, l2_prefetch_budget(self.targets), l2_prefetch_hosts())
        compute = sum(1 for n in self.g.nodes if n.op not in VIEW_OPS)
        return Program(self.calls, inputs, outputs, self.buffers, compute, self.warnings)


def integer_derived(graph: Graph) -> set[str]:
    """Float values computed by arithmetic on integer tensors and constants alone -- positions cast to float
    and the RoPE angles and cos/sin made from them. They stay float32 at every precision: bf16 holds
    integers exactly only up to 256, and cos(position x frequency) needs the position's every bit."""
    values, exact = graph.values, set()
    for n in graph.nodes:
        if n.op in ("Gather", "GatherND"):
            continue
        ins = [i for i in n.inputs if i and i not in graph.constants]
        if ins and all(i in exact or values[i].dtype not in FLOAT_DTYPES for i in ins):
            exact.update(o for o in n.outputs if o and values[o].dtype in FLOAT_DTYPES)
    return exact


def _unique_nodes(nodes: list[Node]) -> list[Node]:
    return list({id(n): n for n in nodes}.values())


def _atoms(atoms: list[list[int]]) -> list[list[int]]:
    return [a for a in atoms if a[0] != 1] or [[1, 0]]


def _digest(arr: np.ndarray) -> str:
    import hashlib

    a = np.ascontiguousarray(arr)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


def partition(graph: Graph, precision: str, shared: Shared | None = None, entry: EntryState | None = None,
              targets: list[str] | None = None, deterministic: bool = False) -> Program:
    return Partitioner(graph, precision, shared, entry, targets, deterministic).run()
