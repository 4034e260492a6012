"""ONNX control flow whose behaviour is fixed at build time, expanded into the parent graph during constant folding.

Loop with a constant trip count is unrolled: iteration i's body nodes are copied under fresh value names
('<loop>/<i>/<name>'), the body's iteration-number input bound to the int64 constant i, its loop-carried inputs to
the values of the previous iteration (the Loop's initial values for i = 0), and names it reads from the enclosing
scope by name. Scan outputs (body outputs after the carried ones) are stacked along a new axis 0. Iterations are
emitted one at a time, each followed by the Loop node again as its continuation: by the time the continuation is
reached, the folder has evaluated the iteration, so a loop-carried condition that folds to a constant is checked
per iteration (per-step values that depend on weights and the iteration number only, as a flow-matching time
embedding, fold to constants the same way). If with a constant condition is replaced by the branch it takes.

Anything whose control flow depends on the inputs is a ModelError naming the node."""

import math

import numpy as np

from flashrt.aot.importers.onnx_ops import dtype_of
from flashrt.aot.ir import Graph, Node, Value
from flashrt.errors import ModelError

CONTROL_FLOW = {"Loop", "If"}
MAX_UNROLLED_NODES = 100_000  # trip count x body nodes, for a Loop and everything nested in it


def subgraphs(node) -> list:
    """The GraphProto attributes (Loop's body, If's branches, ...) of an ONNX NodeProto."""
    from onnx import AttributeProto

    out = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def all_nodes(graph_proto):
    """Every NodeProto of a GraphProto, including those of subgraphs, at any depth."""
    for n in graph_proto.node:
        yield n
        for g in subgraphs(n):
            yield from all_nodes(g)


def outer_references(node) -> list[str]:
    """The names a node's subgraphs read from the enclosing scope: dependencies the node's inputs do not list."""
    return list(dict.fromkeys(name for g in subgraphs(node) for name in free_names(g)))


def free_names(sub) -> list[str]:
    """The names a subgraph reads from its enclosing scopes."""
    defined = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
    refs = [name for n in sub.node for name in list(n.input) + outer_references(n) if name and name not in defined]
    return list(dict.fromkeys(refs + [o.name for o in sub.output if o.name not in defined]))


def expand(graph: Graph, node: Node) -> list[Node]:
    """The nodes that replace a Loop or If node (an unrolled Loop iteration is followed by the Loop again)."""
    return _expand_loop(graph, node) if node.op == "Loop" else _inline_if(graph, node)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _body_size(g) -> int:
    return sum(1 + sum(_body_size(s) for s in subgraphs(n)) for n in g.node)


def _what(node: Node) -> str:
    return f"node '{node.name}' ({node.op})"


def _bool_constant(graph: Graph, name: str, node: Node, role: str) -> bool:
    if name not in graph.constants:
        raise ModelError(f"{_what(node)}: the {role} '{name}' depends on the graph's inputs; flashrt compiles "
                         "control flow that is fixed at build time (constant trip count and conditions)")
    value = graph.constants[name]
    if value.size != 1:
        raise ModelError(f"{_what(node)}: the {role} '{name}' has {value.size} elements, not 1")
    return bool(value.reshape(-1)[0])


class _Scope:
    """Value names of a subgraph being copied into the parent graph: the copy's own (renamed) values first, then the
    enclosing scopes' renamings; a name found in neither is a parent-graph value and keeps its name."""

    def __init__(self, graph: Graph, outer: dict[str, str], taken: set[str]):
        self.graph, self.outer, self.taken, self.local = graph, outer, taken, {}

    def resolve(self, name: str) -> str:
        return self.local.get(name) or self.outer.get(name, name)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken or name in self.graph.values:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.constants[name] = value
        self.graph.values[name] = Value(name, dtype_of(value), tuple(value.shape))
        return name

    def bind_initializers(self, sub, prefix: str) -> None:
        from onnx import numpy_helper

        for t in sub.initializer:
            self.local[t.name] = self.constant(f"{prefix}/{t.name}", numpy_helper.to_array(t))

    def copy_nodes(self, sub, prefix: str, direct: dict[str, str], budget: int) -> list[Node]:
        """sub's nodes, renamed; a value named in `direct` (a subgraph output) is produced under the name given
        there instead of a fresh one, so the last iteration / the taken branch writes the node's outputs."""
        from flashrt.aot.importers.onnx_import import _sort_nodes  # here: onnx_import imports this module

        known = {i.name for i in sub.input} | {t.name for t in sub.initializer} | set(free_names(sub))
        out = []
        for k, bn in enumerate(_sort_nodes(prefix, list(sub.node), known)):
            inputs = [self.resolve(i) if i else "" for i in bn.input]
            outputs = []
            for o in bn.output:
                if o:
                    self.local[o] = direct.pop(o, None) or self.fresh(f"{prefix}/{o}")
                outputs.append(self.local[o] if o else "")
            attrs = _attrs(bn)
            if bn.op_type in CONTROL_FLOW:
                attrs.update(_scope={**self.outer, **self.local}, _taken=self.taken, _budget=budget)
            out.append(Node(bn.op_type, f"{prefix}/{bn.name or f'{bn.op_type}_{k}'}", inputs, outputs, attrs))
        return out


def _taken(graph: Graph, node: Node) -> set[str]:
    """Names a copy must not take: those of the parent graph, including values not yet inferred."""
    if "_taken" in node.attrs:
        return node.attrs["_taken"]
    return set(graph.values) | {o for n in graph.nodes for o in n.outputs}


def _identity(node: Node, src: str, dst: str) -> Node:
    return Node("Identity", f"{node.name}/{dst}", [src], [dst], {}, list(node.source))


def _expand_loop(graph: Graph, node: Node) -> list[Node]:
    at = node.attrs
    body = at["body"]
    n_carried = len(node.inputs) - 2
    n_scan = len(body.output) - 1 - n_carried
    if "_iteration" not in at:  # the Loop as the model wrote it: validate, then start at iteration 0
        if len(node.inputs) < 2 or len(body.input) != len(node.inputs) or n_scan < 0 \
                or len(node.outputs) != n_carried + n_scan:
            raise ModelError(f"{_what(node)}: body has {len(body.input)} inputs and {len(body.output)} outputs for "
                             f"{len(node.inputs)} Loop inputs and {len(node.outputs)} outputs")
        trip_name = node.inputs[0]
        if not trip_name:
            raise ModelError(f"{_what(node)}: no trip count (M is empty); flashrt unrolls loops with a constant trip "
                             "count")
        if trip_name not in graph.constants:
            raise ModelError(f"{_what(node)}: the trip count '{trip_name}' depends on the graph's inputs; flashrt "
                             "unrolls loops with a constant trip count")
        trip_value = graph.constants[trip_name]
        if trip_value.size != 1 or trip_value.dtype.kind not in "iu":
            raise ModelError(f"{_what(node)}: the trip count '{trip_name}' is not an integer scalar")
        trip = max(int(trip_value.reshape(-1)[0]), 0)
        if "_scope" not in at:  # a top-level Loop: the engine runs its steps in one launch list
            graph.loop_steps = max(graph.loop_steps or 0, trip)
        budget = int(at.get("_budget", MAX_UNROLLED_NODES))
        size = _body_size(body)
        if trip * max(size, 1) > budget:
            raise ModelError(f"{_what(node)}: unrolling {trip:,} iterations of a {size}-node body gives "
                             f"{trip * size:,} nodes, over flashrt's limit of {budget:,} (nested loops share it)")
        if trip == 0 and n_scan:
            raise ModelError(f"{_what(node)}: a trip count of 0 leaves its scan outputs without a shape")
        scope = _Scope(graph, at.get("_scope", {}), _taken(graph, node))
        scope.bind_initializers(body, f"{node.name}/body")
        state = {"trip": trip, "consts": dict(scope.local), "taken": scope.taken, "scan": [[] for _ in range(n_scan)],
                 "nested_budget": budget // max(trip, 1), "true": scope.constant(f"{node.name}/true", np.array(True))}
        at = dict(at, _iteration=0, _state=state)
    state, it = at["_state"], at["_iteration"]
    carried = node.inputs[2:]
    cond = node.inputs[1]
    done = it >= state["trip"] or (cond and not _bool_constant(graph, cond, node, "loop condition"))
    if done:
        out = [_identity(node, src, dst) for src, dst in zip(carried, node.outputs) if dst and src != dst]
        for j, values in enumerate(state["scan"]):
            dst = node.outputs[n_carried + j]
            if not dst:
                continue
            scope = _Scope(graph, {}, state["taken"])
            axis0 = scope.constant(f"{node.name}/axis0", np.array([0], np.int64))
            rows = [scope.fresh(f"{v}/row") for v in values] if len(values) > 1 else [dst]
            out += [Node("Unsqueeze", f"{node.name}/scan{j}/{i}", [v, axis0], [r], {}, list(node.source))
                    for i, (v, r) in enumerate(zip(values, rows))]
            if len(values) > 1:
                out.append(Node("Concat", f"{node.name}/scan{j}", rows, [dst], {"axis": 0}, list(node.source)))
        return out

    scope = _Scope(graph, at.get("_scope", {}), state["taken"])
    scope.local = dict(state["consts"])
    iter_shape = tuple(d.dim_value for d in body.input[0].type.tensor_type.shape.dim)
    scope.local[body.input[0].name] = scope.constant(f"{node.name}/{it}/iteration",
                                                     np.full(iter_shape if math.prod(iter_shape) == 1 else (), it,
                                                             np.int64))
    scope.local[body.input[1].name] = state["true"]  # this iteration runs, so its condition is true
    for b, v in zip(body.input[2:], carried):
        scope.local[b.name] = v
    last = it == state["trip"] - 1
    direct = {}
    if last:  # the final iteration writes the Loop's carried outputs itself: no copy at the end
        for o, dst in zip(body.output[1:1 + n_carried], node.outputs):
            if dst:
                direct.setdefault(o.name, dst)
    nodes = scope.copy_nodes(body, f"{node.name}/{it}", direct, state["nested_budget"])
    result = [scope.resolve(o.name) for o in body.output]
    for j, v in enumerate(result[1 + n_carried:]):
        state["scan"][j].append(v)
    nxt = Node("Loop", node.name, [node.inputs[0], "" if last else result[0], *result[1:1 + n_carried]],
               node.outputs, dict(at, _iteration=it + 1), list(node.source))
    return nodes + [nxt]


def _inline_if(graph: Graph, node: Node) -> list[Node]:
    at = node.attrs
    taken = _bool_constant(graph, node.inputs[0], node, "condition")
    branch = at["then_branch" if taken else "else_branch"]
    if len(branch.output) != len(node.outputs):
        raise ModelError(f"{_what(node)}: the {'then' if taken else 'else'} branch has {len(branch.output)} outputs "
                         f"for {len(node.outputs)} If outputs")
    scope = _Scope(graph, at.get("_scope", {}), _taken(graph, node))
    prefix = f"{node.name}/{'then' if taken else 'else'}"
    scope.bind_initializers(branch, prefix)
    direct: dict[str, str] = {}
    for o, dst in zip(branch.output, node.outputs):
        if dst:
            direct.setdefault(o.name, dst)
    budget = int(at.get("_budget", MAX_UNROLLED_NODES))
    size = _body_size(branch)
    if size > budget:
        raise ModelError(f"{_what(node)}: its branch has {size:,} nodes, over flashrt's limit of {budget:,}")
    nodes = scope.copy_nodes(branch, prefix, direct, budget)
    for o, dst in zip(branch.output, node.outputs):
        src = scope.resolve(o.name)
        if dst and src != dst:
            nodes.append(_identity(node, src, dst))
    return nodes
