"""The memory plan: one activation arena with offsets from liveness, and the weight blob.

State (KV caches, the position counter) comes first in the arena and is never shared. Then each entry point's
inputs and outputs get ranges of their own (never shared), so a caller may redirect them to its own device
memory; intermediates share space when their lifetimes (first write .. last read, in launch order) do not
overlap. Placement is greedy, largest first, at the lowest offset that fits. Entry points run one at a time,
so their activations overlap: the arena is the state plus the largest entry's plan."""

from dataclasses import dataclass

import numpy as np

from flashrt.aot.partition import Program

ALIGN = 256


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class MemoryPlan:
    arena_bytes: int
    weights: bytes
    intermediate_bytes: int  # what the intermediates would take without reuse


def plan_memory(programs: Program | list[Program], state: list | None = None) -> MemoryPlan:
    programs = programs if isinstance(programs, list) else [programs]
    base = 0
    for buf in state or []:
        buf.offset = base
        base = _align(base + buf.nbytes)
    arena, total = base, 0
    for program in programs:
        end, used = _plan_activations(program, base)
        arena, total = max(arena, end), total + used

    blob = bytearray()
    weights = [b for program in programs for b in program.buffers if b.kind == "weight"]
    for buf in sorted(weights, key=lambda b: (b.name, b.dtype)):
        if buf.offset >= 0:
            continue
        buf.offset = len(blob)
        blob += np.ascontiguousarray(buf.data).tobytes()
        blob += bytes(_align(len(blob)) - len(blob))
    return MemoryPlan(arena, bytes(blob), total)


def _plan_activations(program: Program, pos: int) -> tuple[int, int]:
    """Place one entry's inputs, outputs and intermediates from `pos`; returns (end, bytes without reuse)."""
    for _, buf, _ in program.inputs + program.outputs:
        buf.offset = pos
        pos = _align(pos + buf.nbytes)
    io_end = pos

    life: dict[int, list] = {}
    for i, call in enumerate(program.calls):
        for ref in call.args:
            if ref.buffer.kind == "arena":
                span = life.setdefault(id(ref.buffer), [ref.buffer, i, i])
                span[1], span[2] = min(span[1], i), max(span[2], i)
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    total = 0
    for buf, first, last in sorted(life.values(), key=lambda s: (-s[0].nbytes, s[1], s[0].name)):
        size = _align(max(buf.nbytes, 1))
        total += size
        busy = sorted((o, e) for o, e, f, la in placed if f <= last and first <= la)
        offset = io_end
        for o, e in busy:
            if offset + size <= o:
                break
            offset = max(offset, e)
        buf.offset = offset
        placed.append((offset, offset + size, first, last))
        pos = max(pos, offset + size)
    return pos, total
