"""Assembles a kernel's self-contained CUDA translation unit: the shared headers of kernels/cuda inlined
ahead of the generated code, so the text alone determines the cubin (and its cache key)."""

import math
import re
from functools import cache
from pathlib import Path

CUDA_DIR = Path(__file__).parent / "cuda"
_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"\s*$', re.M)


@cache
def _header(name: str) -> str:
    return (CUDA_DIR / name).read_text()


def inline_headers(text: str, seen: set | None = None) -> str:
    seen = set() if seen is None else seen

    def expand(match: re.Match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        body = _header(name).replace("#pragma once\n", "")
        return f"// ---- {name}\n" + inline_headers(body, seen)

    return _INCLUDE.sub(expand, text)


def atoms_code(index: str, atoms: list[list[int]], in_range: bool = False) -> str:
    """C expression: the element offset of linear index `index` decomposed row-major over (size, stride) atoms."""
    return offset_code(index, [a[0] for a in atoms], [a[1] for a in atoms], in_range)


def offset_code(index: str, shape: list[int], strides: list[int], in_range: bool = False) -> str:
    """C expression: the element offset of linear (row-major over shape) index `index` under strides.
    in_range: the index is below the shape's size, so the outermost dim of size > 1 needs no modulo."""
    terms, div, total = [], 1, math.prod(shape)
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size > 1 and stride != 0:
            q = index if div == 1 else f"({index} / {div}L)"
            outermost = in_range and div * size == total
            terms.append(f"({q} * {stride}L)" if outermost else f"(({q} % {size}L) * {stride}L)")
        div *= size
    return " + ".join(reversed(terms)) or "0L"
