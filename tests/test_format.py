"""The engine format: fields round-trip, and damaged files are rejected with errors naming the field."""

import hashlib
import json
import struct

import pytest

from flashrt.engine_format.format import HEADER, SECTION, Launch, Relocation
from flashrt.engine_format.reader import read_engine
from flashrt.engine_format.writer import engine_bytes
from flashrt.errors import EngineFormatError


def tiny_engine(**overrides) -> bytes:
    manifest = {
        "format": {"major": 1, "minor": 9},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [4], "offset": 256, "nbytes": 16}],
        "memory": {"arena_bytes": 512, "weights_bytes": 256},
        "kernels": [{"symbol": "k0", "family": "eltwise",
                     "params": {"shape": [4], "inputs": [{"dtype": "float32", "atoms": [[4, 1]]}],
                                "expr": [["in", 0], ["relu", 0]], "out_dtype": "float32"},
                     "args": [{"name": "in0", "type": "ptr", "offset": 0},
                              {"name": "out", "type": "ptr", "offset": 8}]}],
        "regions": [{"name": "r", "kind": "eltwise", "kernel": 0, "launches": [0], "ops": ["Relu"],
                     "source_nodes": ["relu"], "precision": "float32"}],
        "weights": [], "targets": ["sm_90a"], "kernel_resources": {}, "provenance": {"nvcc_version": "13.0.88"},
    }
    manifest.update(overrides)
    args = (0).to_bytes(8, "little") + (256).to_bytes(8, "little")
    return engine_bytes(manifest, {"sm_90a": b"\x7fELF-cubin"}, bytes(256),
                        [Launch(0, (1, 1, 1), (256, 1, 1), 0, 0, 16, 0, 2)],
                        [Relocation(0, 0, 16), Relocation(8, 0, 16)], args)


def test_round_trip():
    data = tiny_engine()
    ef = read_engine(data)
    assert (ef.major, ef.minor) == (1, 9)
    assert ef.targets == ["sm_90a"] and ef.cubin("sm_90a") == b"\x7fELF-cubin"
    assert ef.inputs[0].name == "x" and ef.inputs[0].shape == (4,) and ef.outputs[0].offset == 256
    assert ef.launches == [Launch(0, (1, 1, 1), (256, 1, 1), 0, 0, 16, 0, 2)]
    assert ef.relocations == [Relocation(0, 0, 16), Relocation(8, 0, 16)]
    assert ef.kernels[0].arg_offsets == [0, 8] and ef.kernels[0].args_size == 16
    for s in ef.sections:
        assert s.offset % 256 == 0 and s.alignment == 256
        assert hashlib.sha256(bytes(ef.section_bytes(s))).digest() == s.sha256
    assert data == tiny_engine(), "serialization is deterministic"


def test_cpu_executor_runs_handwritten_engine():
    import numpy as np

    from flashrt.runtime.cpu import CPUEngine

    eng = CPUEngine(read_engine(tiny_engine()))
    x = np.array([-1, 2, -3, 4], np.float32)
    np.testing.assert_array_equal(eng.run({"x": x})["y"], np.maximum(x, 0))


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def _fix_table_sha(data: bytes) -> bytes:
    count = struct.unpack_from("<I", data, 12)[0]
    table = data[64:64 + count * SECTION.size]
    return _patch(data, 32, hashlib.sha256(table).digest())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"NOTANENGINE" + d[11:], "not a FlashRT engine"),
    (lambda d: d[:40], "shorter than the 64-byte header"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: _patch(d, 8, struct.pack("<H", 2)), "newer than this reader"),
    (lambda d: _patch(d, 10, struct.pack("<H", 10)), "newer than this reader"),
    (lambda d: _patch(d, 64 + 2 * SECTION.size + 10, b"\xff"), "section table checksum"),
    (lambda d: _patch(d, len(d) - 3, b"\x01"), "checksum mismatch"),
])
def test_damaged_files_are_rejected(mutate, message):
    with pytest.raises(EngineFormatError, match=message):
        read_engine(mutate(tiny_engine()))


def test_relocation_out_of_bounds_is_rejected():
    data = tiny_engine(memory={"arena_bytes": 264, "weights_bytes": 256},
                       outputs=[{"name": "y", "dtype": "float32", "shape": [2], "offset": 256, "nbytes": 8}])
    with pytest.raises(EngineFormatError, match=r"relocation\[1\].*exceed the arena"):
        read_engine(data)


def test_manifest_lies_are_named():
    bad_kernel = tiny_engine(regions=[{"name": "r", "launches": [5]}])
    with pytest.raises(EngineFormatError, match=r"regions\[0\].launches names launch 5"):
        read_engine(bad_kernel)
    bad_nbytes = tiny_engine(inputs=[{"name": "x", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 12}])
    with pytest.raises(EngineFormatError, match=r"inputs\[0\] 'x': nbytes 12 != 16"):
        read_engine(bad_nbytes)
    bad_targets = tiny_engine(targets=["sm_120a"])
    with pytest.raises(EngineFormatError, match="targets"):
        read_engine(bad_targets)


def test_header_layout_matches_spec():
    data = tiny_engine()
    magic, major, minor, count, table_offset, size, _ = HEADER.unpack_from(data)
    assert magic == b"FLASHRT\0" and (major, minor) == (1, 9) and table_offset == 64 and size == len(data)
    kinds = [SECTION.unpack_from(data, 64 + i * SECTION.size)[0] for i in range(count)]
    assert kinds == [1, 2, 3, 4, 5, 6]
    manifest_entry = SECTION.unpack_from(data, 64)
    manifest = json.loads(data[manifest_entry[2]:manifest_entry[2] + manifest_entry[3]])
    assert manifest["format"] == {"major": 1, "minor": 9}


def test_older_minor_version_is_read():
    data = _patch(tiny_engine(format={"major": 1, "minor": 0}), 10, struct.pack("<H", 0))
    assert read_engine(data).minor == 0
