"""Every requested target's cubin is really in the engine: read the ELF back (machine, SM version, kernels)."""

import struct

import pytest
from conftest import ROOT

from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine

EM_CUDA = 190


def elf_info(data: bytes) -> tuple[int, int, set[str]]:
    """(e_machine, SM number from e_flags, names in the symbol table) of a 64-bit little-endian ELF."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    e_machine = struct.unpack_from("<H", data, 18)[0]
    e_flags = struct.unpack_from("<I", data, 48)[0]
    shoff = struct.unpack_from("<Q", data, 40)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for sh in sections:
        if sh[1] == 2:  # SHT_SYMTAB
            strtab = sections[sh[6]]
            for off in range(sh[4], sh[4] + sh[5], sh[9]):
                name_off = struct.unpack_from("<I", data, off)[0]
                start = strtab[4] + name_off
                names.add(data[start:data.index(b"\0", start)].decode())
    return e_machine, (e_flags >> 8) & 0xFF, names


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("cubins") / "enc.frt"
    build_engine(str(ROOT / "samples" / "tiny_encoder.onnx"), ["thor", "rtx5090", "h100", "b200"], str(path))
    return read_engine(path)


@pytest.mark.parametrize("arch, sm", [("sm_110a", 110), ("sm_120a", 120), ("sm_90a", 90), ("sm_100a", 100)])
def test_each_target_has_a_real_cubin(engine, arch, sm):
    machine, sm_version, symbols = elf_info(engine.cubin(arch))
    assert machine == EM_CUDA
    assert sm_version == sm
    missing = {k.symbol for k in engine.kernels} - symbols
    assert not missing, f"{arch} cubin lacks kernels {sorted(missing)}"


def test_cubin_sections_match_targets(engine):
    assert sorted(engine.targets) == ["sm_100a", "sm_110a", "sm_120a", "sm_90a"]
    resources = engine.manifest["kernel_resources"]
    for arch in engine.targets:
        for k in engine.kernels:
            r = resources[arch][k.symbol]
            assert r["registers"] > 0 and r["spill_bytes"] == 0, (arch, k.symbol, r)
