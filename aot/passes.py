"""Graph passes: merge common subexpressions, lower Gemm to MatMul + epilogue ops, and raise exporter
decompositions (GELU's erf form) to the high-level ops that kernels implement, so they fuse the same way as the
ONNX op would."""

import math

import numpy as np

from flashrt.aot.ir import Graph, Node, Value


def _fresh(graph: Graph, base: str) -> str:
    name, i = base, 0
    while name in graph.values:
        i += 1
        name = f"{base}_{i}"
    return name


def _const(graph: Graph, base: str, value: np.ndarray) -> str:
    name = _fresh(graph, base)
    graph.constants[name] = value
    graph.values[name] = Value(name, str(value.dtype), tuple(value.shape))
    return name


def _tmp(graph: Graph, base: str, like: str, shape=None) -> str:
    name = _fresh(graph, base)
    v = graph.values[like]
    graph.values[name] = Value(name, v.dtype, tuple(shape) if shape is not None else v.shape)
    return name


def lower_gemm(graph: Graph) -> None:
    """Gemm(A, B, C; alpha, beta, transA, transB) -> [Transpose] MatMul [Mul alpha] [Add beta*C]."""
    out = []
    for n in graph.nodes:
        if n.op != "Gemm":
            out.append(n)
            continue
        src = [n.name]
        a, b = n.inputs[0], n.inputs[1]
        if n.attrs.get("transA", 0):
            t = _tmp(graph, f"{n.name}/At", a, graph.values[a].shape[::-1])
            out.append(Node("Transpose", f"{n.name}/transA", [a], [t], {"perm": [1, 0]}, src))
            a = t
        if n.attrs.get("transB", 0):
            if b in graph.constants:
                b = _const(graph, f"{b}/T", np.ascontiguousarray(graph.constants[b].T))
            else:
                t = _tmp(graph, f"{n.name}/Bt", b, graph.values[b].shape[::-1])
                out.append(Node("Transpose", f"{n.name}/transB", [b], [t], {"perm": [1, 0]}, src))
                b = t
        y = n.outputs[0]
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        has_c = len(n.inputs) > 2 and n.inputs[2] and beta != 0.0
        steps = [("MatMul", None)]
        if alpha != 1.0:
            steps.append(("Mul", _const(graph, f"{n.name}/alpha", np.array(alpha, np.float32))))
        if has_c:
            c = n.inputs[2]
            if beta != 1.0:
                if c in graph.constants:
                    c = _const(graph, f"{c}/beta", (graph.constants[c] * beta).astype(np.float32))
                else:
                    bc = _tmp(graph, f"{n.name}/betaC", c)
                    out.append(Node("Mul", f"{n.name}/beta", [c, _const(graph, f"{n.name}/beta_v",
                                                                          np.array(beta, np.float32))], [bc], {}, src))
                    c = bc
            steps.append(("Add", c))
        cur = None
        for i, (op, other) in enumerate(steps):
            dst = y if i == len(steps) - 1 else _tmp(graph, f"{n.name}/{op.lower()}", y)
            ins = [a, b] if op == "MatMul" else [cur, other]
            out.append(Node(op, n.name if op == "MatMul" else f"{n.name}/{op.lower()}", ins, [dst], {}, src))
            cur = dst
    graph.nodes = out


def _scalar(graph: Graph, name: str) -> float | None:
    v = graph.constants.get(name)
    if v is None or v.size != 1 or v.dtype.kind != "f":
        return None
    return float(v.reshape(()))


def raise_gelu(graph: Graph) -> None:
    """x * 0.5 * (1 + erf(x / sqrt(2))) in the orders exporters write it -> Gelu(x)."""
    users = graph.consumers()
    prod = graph.producers()
    outputs = set(graph.outputs)

    def only_user(value: str, op: str) -> Node | None:
        us = users.get(value, [])
        return us[0] if len(us) == 1 and us[0].op == op and value not in outputs else None

    def other(node: Node, value: str) -> str:
        return node.inputs[1] if node.inputs[0] == value else node.inputs[0]

    dead: set[int] = set()
    for erf in [n for n in graph.nodes if n.op == "Erf"]:
        scale = prod.get(erf.inputs[0])
        if scale is None or scale.op not in ("Div", "Mul") or id(scale) in dead:
            continue
        x = next((i for i in scale.inputs if i not in graph.constants), None)
        c = _scalar(graph, other(scale, x)) if x else None
        if c is None or (scale.op == "Div" and scale.inputs[0] != x):
            continue
        if not math.isclose(c if scale.op == "Mul" else 1 / c, 1 / math.sqrt(2), rel_tol=1e-3):
            continue
        add = only_user(erf.outputs[0], "Add")
        if add is None or _scalar(graph, other(add, erf.outputs[0])) != 1.0:
            continue
        m1 = only_user(add.outputs[0], "Mul")
        if m1 is None:
            continue
        m1_other = other(m1, add.outputs[0])
        chain = [scale, erf, add, m1]
        if m1_other == x:  # x * (1 + erf) then * 0.5
            m2 = only_user(m1.outputs[0], "Mul")
            if m2 is None or _scalar(graph, other(m2, m1.outputs[0])) != 0.5:
                continue
            chain.append(m2)
            final = m2
        else:  # (x * 0.5) * (1 + erf)
            half = prod.get(m1_other)
            if (half is None or half.op != "Mul" or x not in half.inputs or _scalar(graph, other(half, x)) != 0.5
                    or len(users.get(m1_other, [])) != 1):
                continue
            chain.append(half)
            final = m1
        if len(users.get(scale.outputs[0], [])) != 1:
            continue
        gelu = Node("Gelu", f"{erf.name}/gelu", [x], [final.outputs[0]], {},
                    [s for n in chain for s in n.source])
        for n in chain:
            dead.add(id(n))
        idx = graph.nodes.index(final)
        graph.nodes[idx] = gelu
    graph.nodes = [n for n in graph.nodes if id(n) not in dead]
    graph.remove_dead()


def remove_noops(graph: Graph) -> None:
    """Identity, and Cast to the type a value already has, disappear: their users read the input."""
    outputs = set(graph.outputs)
    rename: dict[str, str] = {}
    kept = []
    for n in graph.nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
        src, dst = (n.inputs[0], n.outputs[0]) if n.inputs and n.outputs else ("", "")
        same = n.op in ("Cast", "CastLike") and graph.values[src].dtype == graph.values[dst].dtype
        noop = n.op == "Identity" or same
        if noop and dst not in outputs:
            rename[dst] = src
            continue
        kept.append(n)
    graph.nodes = kept


def raise_rmsnorm(graph: Graph) -> None:
    """x * 1/sqrt(mean(x^2, -1) + eps) [* w], as exporters write RMSNorm, -> RMSNormalization(x, w)."""
    users = graph.consumers()
    prod = graph.producers()
    outputs = set(graph.outputs)

    def sole(value: str, *ops: str) -> Node | None:
        us = users.get(value, [])
        return us[0] if len(us) == 1 and us[0].op in ops and value not in outputs else None

    def other(node: Node, value: str) -> str:
        return node.inputs[1] if node.inputs[0] == value else node.inputs[0]

    replaced: dict[int, Node] = {}
    dead: set[int] = set()
    for r in [n for n in graph.nodes if n.op == "ReduceMean"]:
        sq = prod.get(r.inputs[0])
        if sq is None or id(sq) in dead or len(users.get(sq.outputs[0], [])) != 1:
            continue
        if sq.op == "Pow" and _scalar(graph, sq.inputs[1]) == 2.0:
            x = sq.inputs[0]
        elif sq.op == "Mul" and sq.inputs[0] == sq.inputs[1]:
            x = sq.inputs[0]
        else:
            continue
        rank = len(graph.values[x].shape)
        axes = r.attrs.get("axes")
        if len(r.inputs) > 1 and r.inputs[1] in graph.constants:
            axes = [int(a) for a in graph.constants[r.inputs[1]].reshape(-1)]
        if axes is None or [a % rank for a in axes] != [rank - 1] or not r.attrs.get("keepdims", 1):
            continue
        add = sole(r.outputs[0], "Add")
        eps = _scalar(graph, other(add, r.outputs[0])) if add else None
        sqrt = sole(add.outputs[0], "Sqrt") if eps is not None else None
        if sqrt is None:
            continue
        nxt = sole(sqrt.outputs[0], "Reciprocal", "Div")
        chain = [sq, r, add, sqrt]
        if nxt is None:
            continue
        if nxt.op == "Div" and nxt.inputs[1] == sqrt.outputs[0] and nxt.inputs[0] == x:
            norm = nxt
        else:
            if nxt.op == "Div" and not (nxt.inputs[1] == sqrt.outputs[0] and _scalar(graph, nxt.inputs[0]) == 1.0):
                continue
            norm = sole(nxt.outputs[0], "Mul")
            if norm is None or other(norm, nxt.outputs[0]) != x:
                continue
            chain.append(nxt)
        chain.append(norm)
        final, scale = norm, None
        k = graph.values[x].shape[-1]
        wmul = sole(norm.outputs[0], "Mul")
        if wmul is not None:
            w = other(wmul, norm.outputs[0])
            wv = graph.constants.get(w)
            if wv is not None and (wv.size == 1 or (wv.size == k and wv.shape[-1] == k)):
                scale, final = np.broadcast_to(wv.reshape(-1), (k,)).astype(np.float32), wmul
                chain.append(wmul)
        if scale is None:
            scale = np.ones(k, np.float32)
        if graph.values[final.outputs[0]].shape != graph.values[x].shape:
            continue
        scale_name = _const(graph, f"{r.name}/rms_scale", np.ascontiguousarray(scale))
        rms = Node("RMSNormalization", f"{r.name}/rmsnorm", [x, scale_name], [final.outputs[0]],
                   {"axis": -1, "epsilon": float(eps)}, [s for n in chain for s in n.source])
        for n in chain:
            dead.add(id(n))
        replaced[id(final)] = rms
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if id(n) not in dead or id(n) in replaced]
    graph.remove_dead()


def raise_rotate_half(graph: Graph) -> int:
    """RoPE's rotate_half as exporters write it, Concat([Neg(x[..., h:]), x[..., :h]], axis=-1) over Slices of
    one x whose last axis is 2h, -> RotateHalf(x): elementwise kernels read x half a row away instead of
    launching a slice, a negation and a concatenation. Returns how many were raised."""
    users, prod = graph.consumers(), graph.producers()

    def halves(value: str) -> tuple[str, int, int] | None:  # (x, start, end) of a unit-step last-axis Slice
        s = prod.get(value)
        if s is None or s.op != "Slice" or len(s.inputs) < 4 or not all(i in graph.constants for i in s.inputs[1:]):
            return None
        x = s.inputs[0]
        rank, d = len(graph.values[x].shape), graph.values[x].shape[-1]
        starts, ends, axes = (graph.constants[i].reshape(-1) for i in s.inputs[1:4])
        steps = graph.constants[s.inputs[4]].reshape(-1) if len(s.inputs) > 4 and s.inputs[4] else [1]
        if len(starts) != 1 or int(axes[0]) % rank != rank - 1 or int(steps[0]) != 1:
            return None
        start, end = (int(v) + d if int(v) < 0 else int(v) for v in (starts[0], ends[0]))
        return x, min(start, d), min(end, d)

    raised = 0
    for n in graph.nodes:
        if n.op != "Concat" or len(n.inputs) != 2 or n.outputs[0] in graph.outputs:
            continue
        shape = graph.values[n.outputs[0]].shape
        if n.attrs.get("axis", 0) % len(shape) != len(shape) - 1 or shape[-1] % 2:
            continue
        neg = prod.get(n.inputs[0])
        if neg is None or neg.op != "Neg" or len(users.get(neg.outputs[0], [])) != 1:
            continue
        hi, lo, h = halves(neg.inputs[0]), halves(n.inputs[1]), shape[-1] // 2
        if hi is None or lo is None or hi != (lo[0], h, 2 * h) or lo[1:] != (0, h) \
                or graph.values[lo[0]].shape != shape:
            continue
        n.op, n.inputs, n.attrs = "RotateHalf", [lo[0]], {}
        n.source = list(n.source) + list(neg.source)
        raised += 1
    if raised:
        graph.remove_dead()
    return raised


COMMUTATIVE = {"Add", "Mul", "Max", "Min", "And", "Or", "Equal"}


def _frozen(v):
    """A hashable stand-in for an attribute value; TypeError for kinds CSE does not compare."""
    if v is None or isinstance(v, (str, bytes, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    raise TypeError(type(v).__name__)


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _fingerprint(a: np.ndarray) -> bytes:
    """A cheap sample of a constant's bytes: only constants that agree on it are compared in full."""
    flat = np.ascontiguousarray(a).reshape(-1)
    return flat[::max(1, flat.size // 64)][:65].tobytes() + flat[-1:].tobytes()


def merge_constants(graph: Graph) -> dict[str, str]:
    """Constants with the same dtype, shape and bytes become one (the first); returns old name -> kept name."""
    groups: dict[tuple, list[str]] = {}
    for name, arr in graph.constants.items():
        key = (graph.values[name].dtype, arr.dtype.str, arr.shape, _fingerprint(arr))
        groups.setdefault(key, []).append(name)
    rename = {}
    for names in groups.values():
        kept: list[str] = []
        for name in names:
            data = _bytes(graph.constants[name])
            same = next((k for k in kept if np.array_equal(_bytes(graph.constants[k]), data)), None)
            if same is None:
                kept.append(name)
            else:
                rename[name] = same
    for name in rename:
        del graph.constants[name]
        del graph.values[name]
    return rename


def eliminate_common_subexpressions(graph: Graph) -> tuple[int, int]:
    """Identical constants become one, then so do nodes with the same op, attributes and inputs (in either order
    for commutative ops). One pass in topological order reaches the fixpoint: a node's inputs are renamed to the
    kept duplicates before it is compared, so chains of duplicates collapse together. Node names merged into a
    kept node join its source list. Returns (nodes removed, constants removed)."""
    rename = merge_constants(graph)
    n_constants = len(rename)
    outputs = set(graph.outputs)
    seen: dict[tuple, Node] = {}
    kept, before = [], len(graph.nodes)
    for n in graph.nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
        ins = tuple(sorted(n.inputs)) if n.op in COMMUTATIVE else tuple(n.inputs)
        try:
            key = (n.op, ins, _frozen(n.attrs),
                   tuple((graph.values[o].dtype, graph.values[o].shape) if o else None for o in n.outputs))
        except TypeError:
            kept.append(n)
            continue
        first = seen.setdefault(key, n)
        if first is n or any(o in outputs for o in n.outputs):
            kept.append(n)
            continue
        for o, f in zip(n.outputs, first.outputs):
            if o:
                rename[o] = f
                graph.values.pop(o, None)
        first.source.extend(s for s in n.source if s not in first.source)
    graph.nodes = kept
    return before - len(kept), n_constants


def merge_sibling_matmuls(graph: Graph) -> int:
    """x @ W1, x @ W2, ... (constant 2-D weights, each with or without a constant bias Add of its own) ->
    x @ [W1 | W2 | ...] (+ [b1 | b2 | ...]) and last-axis Slices: one GEMM instead of several, and a separate
    gate / up pair becomes the split form the gated GEMV fuses. Returns the number of MatMuls merged away."""
    users = graph.consumers()
    merged = 0
    for x in list(graph.values):
        if x in graph.constants:
            continue
        mms = [n for n in users.get(x, []) if n.op == "MatMul" and n.inputs[0] == x and n.inputs[1] in graph.constants
               and graph.constants[n.inputs[1]].ndim == 2 and graph.constants[n.inputs[1]].dtype.kind == "f"
               and n.outputs[0] not in graph.outputs]
        if len(mms) < 2 or len({graph.constants[n.inputs[1]].dtype for n in mms}) != 1:
            continue
        biases = []
        for n in mms:
            nxt = users.get(n.outputs[0], [])
            b = None
            if len(nxt) == 1 and nxt[0].op == "Add" and nxt[0].outputs[0] not in graph.outputs:
                other = [i for i in nxt[0].inputs if i != n.outputs[0]]
                n_out = graph.constants[n.inputs[1]].shape[1]
                if len(other) == 1 and other[0] in graph.constants and \
                        graph.constants[other[0]].reshape(-1).shape == (n_out,):
                    b = nxt[0]
            biases.append(b)
        if any(b is None for b in biases) and not all(b is None for b in biases):
            continue
        weights = [graph.constants[n.inputs[1]] for n in mms]
        y0 = graph.values[mms[0].outputs[0]]
        total = sum(w.shape[1] for w in weights)
        w_cat = _const(graph, f"{mms[0].inputs[1]}/merged", np.concatenate(weights, axis=1))
        y = _tmp(graph, f"{mms[0].outputs[0]}/merged", mms[0].outputs[0], y0.shape[:-1] + (total,))
        first = min(graph.nodes.index(n) for n in mms)
        new = [Node("MatMul", f"{mms[0].name}/merged", [x, w_cat], [y], {}, [s for n in mms for s in n.source])]
        tails = mms
        if biases[0] is not None:
            b_cat = _const(graph, f"{mms[0].name}/merged_bias", np.concatenate(
                [graph.constants[[i for i in b.inputs if i != n.outputs[0]][0]].reshape(-1)
                 for n, b in zip(mms, biases)]).astype(np.float32))
            yb = _tmp(graph, f"{y}/bias", y)
            new.append(Node("Add", f"{mms[0].name}/merged_bias", [y, b_cat], [yb], {},
                            [s for b in biases for s in b.source]))
            y, tails = yb, biases
        off = 0
        slices = []
        for n, tail, w in zip(mms, tails, weights):
            starts = _const(graph, f"{n.name}/start", np.array([off], np.int64))
            ends = _const(graph, f"{n.name}/end", np.array([off + w.shape[1]], np.int64))
            axes = _const(graph, f"{n.name}/axis", np.array([-1], np.int64))
            slices.append(Node("Slice", f"{n.name}/slice", [y, starts, ends, axes], [tail.outputs[0]], {},
                               list(n.source)))
            off += w.shape[1]
        drop = {id(n) for n in mms} | {id(b) for b in biases if b is not None}
        rest = [n for n in graph.nodes if id(n) not in drop]
        at = sum(1 for n in graph.nodes[:first] if id(n) not in drop)
        graph.nodes = rest[:at] + new + slices + rest[at:]
        merged += len(mms) - 1
        users = graph.consumers()
    graph.remove_dead()
    return merged


def run_passes(graph: Graph) -> dict[str, int]:
    """The graph passes in order; returns what common-subexpression elimination removed (the engine's
    provenance records it). CSE runs last: the raising passes match single-user chains that merging could break
    up, and Gemm lowering materializes a transposed copy of B per node, also for a B that nodes share."""
    remove_noops(graph)
    lower_gemm(graph)
    raise_gelu(graph)
    raise_rmsnorm(graph)
    raise_rotate_half(graph)
    merge_sibling_matmuls(graph)
    nodes, constants = eliminate_common_subexpressions(graph)
    return {"nodes_removed": nodes, "constants_removed": constants}
