"""The .frt engine format: SPEC.md is the definition; this package reads and writes it (stdlib + numpy)."""

from flashrt.engine_format.format import (
    ARG_SIZES,
    BASE_ARENA,
    BASE_WEIGHTS,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    Launch,
    Relocation,
    SectionKind,
)
from flashrt.engine_format.reader import EngineFile, read_engine
from flashrt.engine_format.writer import write_engine

__all__ = [
    "ARG_SIZES", "BASE_ARENA", "BASE_WEIGHTS", "FORMAT_MAJOR", "FORMAT_MINOR",
    "Launch", "Relocation", "SectionKind", "EngineFile", "read_engine", "write_engine",
]
