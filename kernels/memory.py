"""Bounds-checked views of engine memory for the numpy references.

A kernel argument of type ptr reaches a reference as a Pointer: a flat byte buffer (arena or
weights), a byte offset and the extent the relocation table grants. Every view is checked against
that extent, so a damaged or hostile engine raises EngineFormatError instead of reading out of bounds."""

import math
from dataclasses import dataclass

import numpy as np

from flashrt.errors import EngineFormatError
from flashrt.kernels.dtypes import ITEMSIZE, STORAGE, from_f32, to_f32


@dataclass(frozen=True)
class Pointer:
    buffer: np.ndarray  # flat uint8
    offset: int
    extent: int
    name: str = "?"


def _span(ptr: Pointer, dtype: str, shape, strides) -> int:
    if dtype not in ITEMSIZE:
        raise EngineFormatError(f"kernel argument '{ptr.name}': unknown dtype {dtype!r}")
    if len(shape) != len(strides) or any(int(d) < 0 for d in shape) or any(int(s) < 0 for s in strides):
        raise EngineFormatError(f"kernel argument '{ptr.name}': bad shape {shape} / strides {strides}")
    if any(int(d) == 0 for d in shape):
        return 0
    last = sum((int(d) - 1) * int(s) for d, s in zip(shape, strides))
    need = (last + 1) * ITEMSIZE[dtype]
    if need > ptr.extent or ptr.offset + ptr.extent > ptr.buffer.size:
        raise EngineFormatError(f"kernel argument '{ptr.name}': a {dtype}{list(shape)} view needs {need} bytes "
                                f"but the relocation grants {ptr.extent}")
    return need


def contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return strides[::-1]


def load(ptr: Pointer, dtype: str, shape, strides=None) -> np.ndarray:
    """The (possibly strided, broadcast) tensor at ptr, as float32."""
    shape = [int(d) for d in shape]
    strides = contiguous_strides(shape) if strides is None else [int(s) for s in strides]
    need = _span(ptr, dtype, shape, strides)
    if need == 0:
        return np.zeros(shape, np.float32)
    item = ITEMSIZE[dtype]
    flat = ptr.buffer[ptr.offset:ptr.offset + need].view(STORAGE[dtype])
    view = np.lib.stride_tricks.as_strided(flat, shape=shape, strides=[s * item for s in strides], writeable=False)
    return to_f32(view, dtype)


def load_atoms(ptr: Pointer, dtype: str, atoms, shape) -> np.ndarray:
    """The view described by (size, stride) atoms, reshaped to `shape`, as float32."""
    sizes = [int(a[0]) for a in atoms]
    if math.prod(sizes) != math.prod(int(d) for d in shape):
        raise EngineFormatError(f"kernel argument '{ptr.name}': atoms {atoms} do not cover shape {list(shape)}")
    return load(ptr, dtype, sizes, [int(a[1]) for a in atoms]).reshape([int(d) for d in shape])


def store(ptr: Pointer, dtype: str, values: np.ndarray) -> None:
    """Write float32 values, rounded to dtype, contiguously at ptr."""
    shape = values.shape
    need = _span(ptr, dtype, shape, contiguous_strides(shape))
    if need:
        ptr.buffer[ptr.offset:ptr.offset + need] = np.ascontiguousarray(from_f32(values, dtype)).view(np.uint8).ravel()
