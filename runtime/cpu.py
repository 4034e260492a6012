"""The CPU reference executor: runs an engine's launch list with each kernel family's numpy reference,
on the same file the GPU runs. Arguments are decoded from the packed bytes and relocations exactly as
the GPU loader patches them, and every view is bounds-checked (kernels/memory.py)."""

import struct

import numpy as np

from flashrt.engine_format.format import BASE_ARENA
from flashrt.engine_format.reader import EngineFile
from flashrt.errors import EngineFormatError
from flashrt.kernels.memory import Pointer
from flashrt.kernels.registry import family
from flashrt.runtime.engine import Engine

_SCALARS = {"i32": "<i", "u32": "<I", "f32": "<f", "i64": "<q"}


class CPUEngine(Engine):
    device = "cpu"

    def __init__(self, engine_file: EngineFile):
        super().__init__(engine_file)
        self.arena = np.zeros(engine_file.arena_bytes, np.uint8)
        self.weights = engine_file.weights()  # read-only view of the file
        self.steps = []
        for i, launch in enumerate(engine_file.launches):
            k = engine_file.kernels[launch.kernel]
            fam = family(k.family)
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

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        stored = self.check_inputs(feeds)
        for t in self.inputs:
            self.arena[t.offset:t.offset + t.nbytes] = stored[t.name].view(np.uint8).reshape(-1)
        for i, k, fam, args in self.steps:
            try:
                fam.reference(k.params, args)
            except EngineFormatError:
                raise
            except (KeyError, TypeError, ValueError, IndexError, OverflowError, MemoryError, AttributeError) as e:
                raise EngineFormatError(f"launch[{i}] ({k.family} kernel {k.symbol}): invalid parameters or "
                                        f"arguments: {type(e).__name__}: {str(e)[:160]}") from None
        return {t.name: self.host_output(t, self.arena[t.offset:t.offset + t.nbytes]) for t in self.outputs}
