"""Constants and record layouts of the .frt format (engine_format/SPEC.md)."""

import enum
import struct
from dataclasses import dataclass

MAGIC = b"FLASHRT\0"
FORMAT_MAJOR = 1
FORMAT_MINOR = 9

HEADER = struct.Struct("<8sHHIQQ32s")  # magic, major, minor, section_count, table_offset, file_size, table_sha256
SECTION = struct.Struct("<IIQQQ32s32s")  # kind, flags, offset, size, alignment, name, sha256
LAUNCH = struct.Struct("<I3I3IIIIII")  # kernel, grid, block, smem, args_offset, args_size, reloc_first, reloc_count
RELOCATION = struct.Struct("<IIQ")  # slot, base, extent
assert HEADER.size == 64 and SECTION.size == 96 and LAUNCH.size == 48 and RELOCATION.size == 16

MIN_ALIGNMENT = 256
MAX_SECTIONS = 4096
BASE_ARENA = 0
BASE_WEIGHTS = 1
ARG_SIZES = {"ptr": 8, "i32": 4, "u32": 4, "f32": 4, "i64": 8}
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1, "int8": 1, "bool": 1,
               "fp8_e4m3": 1, "nvfp4": 1}  # nvfp4: packed, two values per byte; shapes count bytes


class SectionKind(enum.IntEnum):
    MANIFEST = 1
    CUBIN = 2
    WEIGHTS = 3
    LAUNCHES = 4
    RELOCATIONS = 5
    ARGUMENTS = 6
    SELFTEST = 7


@dataclass(frozen=True)
class Launch:
    kernel: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int
    args_offset: int
    args_size: int
    reloc_first: int
    reloc_count: int

    def pack(self) -> bytes:
        return LAUNCH.pack(self.kernel, *self.grid, *self.block, self.smem, self.args_offset,
                           self.args_size, self.reloc_first, self.reloc_count)

    @classmethod
    def unpack(cls, raw: bytes) -> "Launch":
        v = LAUNCH.unpack(raw)
        return cls(v[0], tuple(v[1:4]), tuple(v[4:7]), v[7], v[8], v[9], v[10], v[11])


@dataclass(frozen=True)
class Relocation:
    slot: int
    base: int
    extent: int

    def pack(self) -> bytes:
        return RELOCATION.pack(self.slot, self.base, self.extent)

    @classmethod
    def unpack(cls, raw: bytes) -> "Relocation":
        return cls(*RELOCATION.unpack(raw))


def arg_layout(types: list[str]) -> tuple[list[int], int]:
    """Byte offsets of kernel parameters of these types, naturally aligned, and the total size."""
    offsets, pos = [], 0
    for t in types:
        size = ARG_SIZES[t]
        pos = (pos + size - 1) // size * size
        offsets.append(pos)
        pos += size
    return offsets, pos
