"""The compiler's IR: a typed SSA graph with static shapes, nodes in topological order, constants folded."""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Value:
    name: str
    dtype: str  # "float32", "int64", ...
    shape: tuple[int, ...]


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]  # "" marks an omitted optional input
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    source: list[str] = field(default_factory=list)  # source-model node names this node stands for

    def __post_init__(self):
        if not self.source:
            self.source = [self.name]


@dataclass
class Graph:
    name: str
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    values: dict[str, Value]
    constants: dict[str, np.ndarray]
    prequantized: object = None  # aot.quantize.PrequantTable: weights the model holds quantized
    weight_plan: dict | None = None  # aot.sensitivity: weight -> WeightChoice, from --calib's cosine target
    loop_steps: int | None = None  # steps of an unrolled loop (a flow-matching chunk's denoise steps), for display

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def remove_dead(self) -> None:
        """Drop nodes whose outputs nothing uses, and constants nothing reads."""
        live = set(self.outputs)
        kept = []
        for n in reversed(self.nodes):
            if any(o in live for o in n.outputs):
                kept.append(n)
                live.update(i for i in n.inputs if i)
        self.nodes = kept[::-1]
        self.constants = {k: v for k, v in self.constants.items() if k in live}
