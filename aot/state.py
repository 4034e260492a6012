"""Engine state for decoders: an exported KV-cache model becomes an engine whose caches live in the arena.

A decoder exported with its caches as inputs and outputs (`present = Concat(past, new)` along the sequence
axis, HF/torch style) is imported once per entry point (prefill: T tokens, decode: 1 token) with the past length
set to max_context - T, so every Concat output is a cache of exactly max_context rows. Then:
  - each `Concat(past, new)` whose first operand is a graph input becomes a cache write: `new` is written at the
    run-time position into a state tensor holding the whole cache; `past` stops being an input and `present`
    an output;
  - a `position_ids` input becomes the run-time positions pos .. pos + T - 1, computed on the device;
  - attention over a cache reads the keys 0 .. pos + t for query t (the kernels take the length at run time),
    so the static causal mask the export folded into a constant is checked to be exactly that pattern and
    dropped.
The entry's last launch advances the device-side position counter by the tokens written."""

from dataclasses import dataclass

import numpy as np

from flashrt.aot.ir import Graph, Node
from flashrt.errors import ModelError

CACHE_WRITE = "FlashrtCacheWrite"
POSITIONS = "FlashrtPositions"
POSITION_INPUTS = ("position_ids", "positions", "position")
PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Expand", "Cast",
                "Slice", "Split"}
SCORE_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Tanh", "Cast"}


@dataclass
class StateTensor:
    name: str  # the past input's name
    dtype: str
    shape: tuple[int, ...]  # the whole cache: the present value's shape
    axis: int  # the sequence axis


def state_inputs(path: str) -> dict[str, int]:
    """Inputs of an ONNX file that are the first operand of a Concat (a past cache): name -> concat axis."""
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    inputs = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in g.input}
    found = {}
    for n in g.node:
        if n.op_type == "Concat" and n.input and n.input[0] in inputs:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            found[n.input[0]] = axis % inputs[n.input[0]]
    return found


def entry_shapes(path: str, tokens: int, max_context: int) -> dict[str, tuple[int, ...]]:
    """Static shapes of the model's inputs for an entry of `tokens` new tokens: a dynamic leading dim is the
    batch (1); a cache input's dynamic sequence axis is max_context - tokens; other dynamic dims are tokens.
    A static dim that contradicts this is an error naming the input."""
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    caches = state_inputs(path)
    init = {t.name for t in g.initializer}
    past = max_context - tokens
    if past < 0:
        raise ModelError(f"--max-context {max_context} is smaller than the {tokens} tokens of an entry")
    shapes = {}
    for vi in g.input:
        if vi.name in init:
            continue
        dims = list(vi.type.tensor_type.shape.dim)
        shape = []
        for i, d in enumerate(dims):
            fixed = d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            want = past if vi.name in caches and i == caches[vi.name] else None
            if want is not None:
                if fixed is not None and fixed != want:
                    raise ModelError(f"input '{vi.name}' fixes its cache length (dimension {i}) to {fixed}, but "
                                     f"--max-context {max_context} with {tokens}-token entries needs {want}; export "
                                     "the model with a dynamic past-sequence axis")
                shape.append(want)
            elif fixed is not None:
                shape.append(fixed)
            else:
                shape.append(1 if i == 0 else tokens)
        shapes[vi.name] = tuple(shape)
    return shapes


def make_stateful(graph: Graph, tokens: int, max_context: int, entry: str) -> list[StateTensor]:
    """Rewrite `graph` (imported for `tokens` new tokens) into its stateful form; returns its state tensors."""
    users = graph.consumers()
    states: list[StateTensor] = []
    for name in list(graph.inputs):
        concat = [n for n in users.get(name, []) if n.op == "Concat" and n.inputs[0] == name]
        if not concat:
            continue
        node = concat[0]
        if len(users[name]) != 1 or len(node.inputs) != 2:
            raise ModelError(f"cache input '{name}' must feed exactly one Concat(past, new) (node '{node.name}'), "
                             f"found {len(users[name])} users and {len(node.inputs)} Concat inputs")
        present = graph.values[node.outputs[0]]
        axis = node.attrs.get("axis", 0) % len(present.shape)
        if present.shape[axis] != max_context:
            raise ModelError(f"node '{node.name}': the cache '{name}' concatenates to {present.shape[axis]} rows "
                             f"along axis {axis}, expected --max-context {max_context}")
        if present.dtype not in ("float32", "float16", "bfloat16"):
            raise ModelError(f"cache input '{name}' is {present.dtype}; caches must be floating point")
        graph.inputs.remove(name)
        if node.outputs[0] in graph.outputs:
            graph.outputs.remove(node.outputs[0])
        i = graph.nodes.index(node)
        graph.nodes[i] = Node(CACHE_WRITE, node.name, [node.inputs[1]], list(node.outputs),
                              {"axis": axis, "state": name}, list(node.source))
        states.append(StateTensor(name, present.dtype, present.shape, axis))
    if not states:
        raise ModelError("--max-context builds a stateful decoder, but no input of the model is a KV cache "
                         "(an input that is the first operand of a Concat whose output the model attends over)")
    for name in list(graph.inputs):
        if name in POSITION_INPUTS:
            v = graph.values[name]
            if int(np.prod(v.shape)) != tokens or v.dtype not in ("int64", "int32"):
                raise ModelError(f"position input '{name}' has shape {list(v.shape)} {v.dtype}; expected {tokens} "
                                 "int64 positions, one per new token")
            graph.inputs.remove(name)
            graph.nodes.insert(0, Node(POSITIONS, f"{name}/{entry}", [], [name], {}, [name]))
    if not graph.outputs:
        raise ModelError("the stateful model has no outputs left besides its caches")
    _drop_cache_masks(graph, {s.name for s in states}, tokens, max_context)
    graph.remove_dead()
    return states


def _drop_cache_masks(graph: Graph, state_names: set, T: int, S: int) -> None:
    """Check and remove the constant masks of attention over a cache (the kernel masks by run-time length)."""
    users = graph.consumers()
    caches = {n.outputs[0] for n in graph.nodes if n.op == CACHE_WRITE and n.attrs["state"] in state_names}
    reach = set(caches)
    for n in graph.nodes:  # values that are views of a cache
        if n.op in PASS_THROUGH and n.inputs and n.inputs[0] in reach:
            reach.update(n.outputs)
    visible = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]  # [T, S]: j <= P + t
    for mm in [n for n in graph.nodes if n.op == "MatMul" and n.inputs[1] in reach]:
        value = mm.outputs[0]
        while len(users.get(value, [])) == 1 and users[value][0].op in SCORE_OPS:
            node = users[value][0]
            others = [x for x in node.inputs if x and x != value]
            runtime = [x for x in others if x not in graph.constants]
            if runtime:
                raise ModelError(f"node '{node.name}' ({node.op}) applies run-time tensor '{runtime[0]}' to the "
                                 "scores of attention over a KV cache; a stateful engine masks by position only")
            masks = [x for x in others if graph.constants[x].size > 1]
            if not masks:
                value = node.outputs[0]
                continue
            _check_mask(node, masks[0], graph.constants[masks[0]], value, visible)
            out = node.outputs[0]  # bypass the mask: its users read the unmasked scores
            for u in users.get(out, []):
                u.inputs = [value if x == out else x for x in u.inputs]
            users = graph.consumers()


def _check_mask(node: Node, operand: str, c: np.ndarray, scores: str, visible: np.ndarray) -> None:
    """A constant mask must be the causal-over-cache pattern: keys j <= P + t visible, the rest masked."""
    T, S = visible.shape
    try:
        m = np.broadcast_to(c, np.broadcast_shapes(c.shape, (T, S)))
    except ValueError:
        raise ModelError(f"node '{node.name}': mask '{operand}' of shape {list(c.shape)} does not broadcast over "
                         f"the [{T}, {S}] scores of attention over a KV cache") from None
    m = m.reshape(-1, T, S)
    if node.op == "Where":
        want = visible if node.inputs[1] == scores else ~visible
        ok = node.inputs[0] == operand and m.dtype == np.bool_ and all((x == want).all() for x in m)
    elif node.op == "Add":
        ok = all(((x == 0) == visible).all() and (x[~visible] <= -1e4).all() for x in m)
    else:
        ok = False
    if not ok:
        raise ModelError(f"node '{node.name}' ({node.op}): mask '{operand}' on the scores of attention over a KV "
                         f"cache is not the causal pattern (new token t sees the past and new tokens <= t); a "
                         "stateful engine supports that mask only")
