"""Tensor views over buffers. A view's logical dims are each a list of (size, stride) atoms, so a reshape of a
transposed or sliced tensor stays a view: kernels address it by decomposing an index over the atoms.
Layout changes (transpose, reshape, slice, expand, select) then launch nothing wherever the consumer reads
views, which GEMM operands, epilogue inputs and elementwise inputs all do."""

import math
from dataclasses import dataclass

import numpy as np

from flashrt.kernels.dtypes import ITEMSIZE

Atom = tuple[int, int]  # (size, stride in elements)


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


def contiguous_strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def _clean(atoms) -> list[Atom]:
    return [(int(s), int(st)) for s, st in atoms if s != 1]


@dataclass(eq=False)
class TensorRef:
    buffer: Buffer
    shape: tuple[int, ...]
    dims: tuple[tuple[Atom, ...], ...]  # per logical dim, its atoms (sizes multiply to the dim's size)
    offset: int = 0  # elements

    @classmethod
    def contiguous_view(cls, buffer: Buffer, shape, offset: int = 0) -> "TensorRef":
        shape = tuple(int(d) for d in shape)
        return cls(buffer, shape, tuple(((d, s),) for d, s in zip(shape, contiguous_strides(shape))), offset)

    @property
    def dtype(self) -> str:
        return self.buffer.dtype

    def atoms(self) -> list[Atom]:
        return _clean(a for d in self.dims for a in d)

    def contiguous(self) -> bool:
        atoms = self.atoms()
        return [st for _, st in atoms] == contiguous_strides([s for s, _ in atoms])

    def span_bytes(self) -> int:
        if math.prod(self.shape) == 0:
            return 0
        return (sum((s - 1) * st for s, st in self.atoms()) + 1) * ITEMSIZE[self.dtype]

    def atoms_over(self, out_shape) -> list[list[int]]:
        """Atoms for iterating over out_shape (numpy broadcasting), flattened in row-major order."""
        pad = len(out_shape) - len(self.shape)
        flat: list[Atom] = []
        for i, d in enumerate(out_shape):
            j = i - pad
            if j < 0 or (self.shape[j] == 1 and d != 1):
                flat.append((d, 0))
            else:
                flat.extend(self.dims[j])
        atoms = _clean(flat)
        return [list(a) for a in atoms] or [[1, 0]]

    def dim_atoms(self, dim: int) -> list[list[int]]:
        return [list(a) for a in _clean(self.dims[dim])] or [[1, 0]]

    def batch_atoms(self, batch: tuple) -> list[list[int]]:
        """Atoms of all but the last two dims, broadcast over a GEMM's batch shape."""
        head = TensorRef(self.buffer, self.shape[:-2], self.dims[:-2], self.offset)
        return head.atoms_over(batch)

    # ---- views ----------------------------------------------------------------------------------

    def transpose(self, perm) -> "TensorRef":
        return TensorRef(self.buffer, tuple(self.shape[p] for p in perm), tuple(self.dims[p] for p in perm),
                         self.offset)

    def reshape(self, shape) -> "TensorRef | None":
        """The same elements under a new shape, as a view; None when no view expresses it."""
        shape = tuple(int(d) for d in shape)
        queue = self.atoms()
        dims = []
        for n in shape:
            got: list[Atom] = []
            need = n
            while need > 1:
                if not queue:
                    return None
                size, stride = queue.pop(0)
                if need % size == 0:
                    got.append((size, stride))
                    need //= size
                elif size % need == 0:
                    got.append((need, stride * (size // need)))
                    queue.insert(0, (size // need, stride))
                    need = 1
                else:
                    return None
            dims.append(tuple(got) if got else ((n, 0),))
        if queue:
            return None
        return TensorRef(self.buffer, shape, tuple(dims), self.offset)

    def expand(self, shape) -> "TensorRef":
        shape = tuple(shape)
        pad = len(shape) - len(self.shape)
        dims = []
        for i, d in enumerate(shape):
            j = i - pad
            dims.append(((d, 0),) if j < 0 or (self.shape[j] == 1 and d != 1) else self.dims[j])
        return TensorRef(self.buffer, shape, tuple(dims), self.offset)

    def slice(self, axis: int, start: int, step: int, count: int) -> "TensorRef | None":
        atoms = _clean(self.dims[axis])
        if count == 0 or step <= 0:
            return None
        if len(atoms) > 1:
            return None
        stride = atoms[0][1] if atoms else 0
        dims = list(self.dims)
        dims[axis] = ((count, stride * step),)
        shape = list(self.shape)
        shape[axis] = count
        return TensorRef(self.buffer, tuple(shape), tuple(dims), self.offset + start * stride)
