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


MAX_VIEW_ELEMENTS = 1 << 28  # elements of one view a reference materializes (1 GiB as float32)
MAX_VIEW_RANK = 16


def _ints(ptr: Pointer, what: str, values) -> list[int]:
    """Sizes or strides from a file: a list of non-negative ints (bool, float, str or nested lists are damage)."""
    if not isinstance(values, (list, tuple)) or len(values) > MAX_VIEW_RANK or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 0 for v in values):
        raise EngineFormatError(f"kernel argument '{ptr.name}': {what} {str(values)[:80]} is not a list of at most "
                                f"{MAX_VIEW_RANK} non-negative integers")
    return [int(v) for v in values]


def _span(ptr: Pointer, dtype: str, shape, strides) -> int:
    """The bytes a view of `shape` (element `strides`) at ptr reaches, checked against the relocation's extent
    and the buffer; 0 for an empty view."""
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise EngineFormatError(f"kernel argument '{ptr.name}': unknown dtype {str(dtype)[:40]!r}")
    shape, strides = _ints(ptr, "shape", shape), _ints(ptr, "strides", strides)
    if len(shape) != len(strides):
        raise EngineFormatError(f"kernel argument '{ptr.name}': shape {shape} and strides {strides} differ in rank")
    count = math.prod(max(d, 1) for d in shape)  # an empty view's other sizes must be sane too (numpy sizes them)
    if count > MAX_VIEW_ELEMENTS:
        raise EngineFormatError(f"kernel argument '{ptr.name}': a {dtype}{shape} view has {count} elements, more "
                                f"than the CPU reference executor's limit of {MAX_VIEW_ELEMENTS}")
    if 0 in shape:
        return 0
    item = ITEMSIZE[dtype]
    last = sum((d - 1) * s for d, s in zip(shape, strides))
    need = (last + 1) * item
    if need > ptr.extent:
        raise EngineFormatError(f"kernel argument '{ptr.name}': a {dtype}{shape} view with strides {strides} needs "
                                f"{need} bytes but the relocation grants {ptr.extent}")
    if ptr.offset < 0 or ptr.offset + ptr.extent > ptr.buffer.size:
        raise EngineFormatError(f"kernel argument '{ptr.name}': bytes {ptr.offset}..{ptr.offset + ptr.extent} lie "
                                f"outside its buffer ({ptr.buffer.size} bytes)")
    if ptr.offset % item:
        raise EngineFormatError(f"kernel argument '{ptr.name}': offset {ptr.offset} is not aligned to the "
                                f"{item}-byte {dtype} elements it points to")
    return need


def contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return strides[::-1]


def load(ptr: Pointer, dtype: str, shape, strides=None) -> np.ndarray:
    """The (possibly strided, broadcast) tensor at ptr, as float32."""
    shape = _ints(ptr, "shape", shape)
    strides = contiguous_strides(shape) if strides is None else _ints(ptr, "strides", strides)
    need = _span(ptr, dtype, shape, strides)
    if need == 0:
        return np.zeros(shape, np.float32)
    item = ITEMSIZE[dtype]
    flat = ptr.buffer[ptr.offset:ptr.offset + need].view(STORAGE[dtype])
    view = np.lib.stride_tricks.as_strided(flat, shape=shape, strides=[s * item for s in strides], writeable=False)
    return to_f32(view, dtype)


def load_atoms(ptr: Pointer, dtype: str, atoms, shape) -> np.ndarray:
    """The view described by (size, stride) atoms, reshaped to `shape`, as float32."""
    if not isinstance(atoms, (list, tuple)) or not all(isinstance(a, (list, tuple)) and len(a) == 2 for a in atoms):
        raise EngineFormatError(f"kernel argument '{ptr.name}': atoms {str(atoms)[:80]} are not (size, stride) pairs")
    sizes = _ints(ptr, "atom sizes", [a[0] for a in atoms])
    strides = _ints(ptr, "atom strides", [a[1] for a in atoms])
    shape = _ints(ptr, "shape", shape)
    if math.prod(sizes) != math.prod(shape):
        raise EngineFormatError(f"kernel argument '{ptr.name}': atoms {str(atoms)[:80]} do not cover shape {shape}")
    return load(ptr, dtype, sizes, strides).reshape(shape)


def raw(ptr: Pointer, nbytes: int) -> np.ndarray:
    """The first nbytes bytes at ptr, as uint8 (quantized weights)."""
    nbytes = int(nbytes)
    if nbytes < 0 or nbytes > ptr.extent or ptr.offset + nbytes > ptr.buffer.size:
        raise EngineFormatError(f"kernel argument '{ptr.name}': {nbytes} bytes exceed the {ptr.extent} the "
                                "relocation grants")
    return ptr.buffer[ptr.offset:ptr.offset + nbytes]


def store(ptr: Pointer, dtype: str, values: np.ndarray) -> None:
    """Write float32 values, rounded to dtype, contiguously at ptr."""
    shape = list(values.shape)
    need = _span(ptr, dtype, shape, contiguous_strides(shape))
    if need and not ptr.buffer.flags.writeable:
        raise EngineFormatError(f"kernel argument '{ptr.name}' is an output but points into the read-only weights")
    if need:
        ptr.buffer[ptr.offset:ptr.offset + need] = np.ascontiguousarray(from_f32(values, dtype)).view(np.uint8).ravel()
