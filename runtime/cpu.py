"""The CPU reference executor: runs an engine's launch list with each kernel family's numpy reference,
on the same file the GPU runs. Arguments are decoded from the packed bytes and relocations exactly as
the GPU loader patches them, and every view is bounds-checked (kernels/memory.py)."""

import math
import struct
from types import ModuleType

import numpy as np

from flashrt.engine_format.format import BASE_ARENA
from flashrt.engine_format.reader import EngineFile
from flashrt.errors import EngineFormatError
from flashrt.kernels.memory import MAX_VIEW_ELEMENTS, Pointer
from flashrt.runtime.engine import Engine

_SCALARS = {"i32": "<i", "u32": "<I", "f32": "<f", "i64": "<q"}
# The largest input or output the executor exchanges with its caller (elements), as for any view it makes.
MAX_IO_ELEMENTS = MAX_VIEW_ELEMENTS


class CPUEngine(Engine):
    device = "cpu"

    def __init__(self, engine_file: EngineFile):
        super().__init__(engine_file)
        path = engine_file.path
        for key, tensors in (("inputs", engine_file.inputs), ("outputs", engine_file.outputs)):
            for j, t in enumerate(tensors):
                count = math.prod(max(d, 1) for d in t.shape)
                if count > MAX_IO_ELEMENTS:
                    raise EngineFormatError(f"{path}: manifest {key}[{j}] '{t.name}' has shape {list(t.shape)} "
                                            f"({count} elements), more than the CPU reference executor's limit "
                                            f"of {MAX_IO_ELEMENTS}")
        try:
            self.arena = np.zeros(engine_file.arena_bytes, np.uint8)
        except MemoryError:
            raise EngineFormatError(f"{path}: manifest memory.arena_bytes = {engine_file.arena_bytes}: this host "
                                    f"cannot allocate an arena that large") from None
        self.weights = engine_file.weights()  # read-only view of the file
        self.steps = []
        checked: dict[int, ModuleType] = {}
        for i, launch in enumerate(engine_file.launches):
            k = engine_file.kernels[launch.kernel]
            if launch.kernel not in checked:
                checked[launch.kernel] = self._check_kernel(launch.kernel)
            fam = checked[launch.kernel]
            raw = engine_file.launch_args(launch)
            run = engine_file.relocations[launch.reloc_first:launch.reloc_first + launch.reloc_count]
            relocs = {r.slot: r for r in run}
            args = {}
            for name, typ, off in zip(k.arg_names, k.arg_types, k.arg_offsets):
                if typ == "ptr":
                    r = relocs[off]
                    buf = self.arena if r.base == BASE_ARENA else self.weights
                    value = int.from_bytes(raw[off:off + 8], "little")
                    args[name] = Pointer(buf, value, r.extent, f"launch[{i}].{name}")
                else:
                    args[name] = struct.unpack_from(_SCALARS[typ], raw, off)[0]
            self.steps.append((i, k, fam, args))
        self._check_prefetch_spans()

    def run(self, feeds: dict, after_launch=None, entry: str | None = None) -> dict[str, np.ndarray]:
        """Run an entry point's launches (the first entry by default); after_launch(i), if given, is called
        after launch i (accuracy tools read the arena there, before a later launch reuses it)."""
        e, stored, n = self.prepare(feeds, entry)
        for t in e.inputs:
            self.arena[t.offset:t.offset + t.nbytes] = stored[t.name].view(np.uint8).reshape(-1)
        if e.length is not None:
            self.arena[e.length:e.length + 4] = np.frombuffer(np.int32(n).tobytes(), np.uint8)
        for i, k, fam, args in self.steps[e.first:e.first + e.count]:
            try:
                with np.errstate(all="ignore"):  # a model's overflow or NaN is data, not a fault of the file
                    fam.reference(k.params, args)
            except EngineFormatError as e:
                raise EngineFormatError(f"{self.file.path}: launch[{i}] ({k.family} kernel {k.symbol}): {e}") from None
            except (KeyError, TypeError, ValueError, IndexError, ArithmeticError, MemoryError, AttributeError) as e:
                # A safety net for what the params and view checks missed. Chained (from e), unlike the
                # deliberate errors above, so that tests/test_fuzz.py can tell such a gap from a check.
                raise EngineFormatError(f"{self.file.path}: launch[{i}] ({k.family} kernel {k.symbol}): invalid "
                                        f"parameters or arguments: {type(e).__name__}: {str(e)[:160]}") from e
            if after_launch is not None:
                after_launch(i)
        out = {t.name: self.host_output(t, self.arena[t.offset:t.offset + t.nbytes]) for t in e.outputs}
        return self.finish(e, n, out)

    def reset(self) -> None:
        """Clear the state: empty caches, position 0."""
        for offset, nbytes in self.state_ranges():
            self.arena[offset:offset + nbytes] = 0
        self.position = 0

    def load_state(self, arrays: dict, position: int) -> None:
        """Set the caches to `position` rows given per state tensor (the rest zero) and the position."""
        for offset, data in self.state_arrays(arrays, position):
            self.arena[offset:offset + data.size] = data
        self.position = position
