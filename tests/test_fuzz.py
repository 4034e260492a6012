"""Damaged and hostile engines: the reader and the CPU reference executor never crash, hang or read out of
bounds; every failure is an EngineFormatError that names the field and its values.

Hypothesis drives scripts/fuzz_engine.py's mutators (bit flips, truncations, overwritten header fields and
section-table entries, swapped sections, value-level manifest / launch / relocation / argument / self-test
mutations with checksums recomputed, coordinated hostile params) over small real engines, derandomized so CI is
reproducible and bounded (about 30 s on two cores). `python scripts/fuzz_engine.py --minutes N` runs the same
mutators with random seeds for as long as asked. The regression tests below pin each bug the fuzzer found."""

import faulthandler
import importlib.util
import json
import tempfile

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashrt.errors import EngineFormatError

_spec = importlib.util.spec_from_file_location("fuzz_engine", ROOT / "scripts" / "fuzz_engine.py")
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

HANG_SECONDS = 120  # one mutant taking longer is a hang: the watchdog dumps every thread's stack and exits

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    return fz.build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz_scratch"))


def _check(data: bytes, tmp_dir: str | None) -> str:
    """exercise() under a watchdog: "ok" or "EngineFormatError"; anything else fails the test."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        return fz.exercise(data, tmp_dir)
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_seed_engines_run_clean(seeds):
    assert set(seeds) == {name for name, *_ in fz.SEEDS}
    for name, data in seeds.items():
        assert _check(data, None) == "ok", name
    with tempfile.TemporaryDirectory() as tmp:
        assert _check(seeds["mlp_bf16_bundle"], tmp) == "ok"


def test_every_kernel_family_has_a_params_check():
    from flashrt.kernels.params import CHECKS
    from flashrt.kernels.registry import FAMILIES

    assert sorted(FAMILIES) == sorted(CHECKS), "add the new family's params check to kernels/params.py"


def test_seeds_cover_every_kernel_family(seeds):
    from flashrt.engine_format.reader import read_engine
    from flashrt.kernels.registry import FAMILIES

    used = {k.family for data in seeds.values() for k in read_engine(data).kernels}
    assert used == set(FAMILIES), f"no seed engine uses {sorted(set(FAMILIES) - used)}"


@pytest.mark.parametrize("kind", sorted(fz.MUTATORS))
@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_one_mutation(seeds, scratch, kind, data):
    ch = fz.Choices(draw=data.draw)
    seed = seeds[ch.pick(sorted(seeds))]
    mutant, _ = fz.mutate(seed, ch, [kind])
    _check(mutant, scratch if ch.chance(10) else None)


@settings(FUZZ, max_examples=2500)
@given(data=st.data())
def test_mixed_mutations(seeds, scratch, data):
    ch = fz.Choices(draw=data.draw)
    seed = seeds[ch.pick(sorted(seeds))]
    mutant, _ = fz.mutate(seed, ch)
    _check(mutant, scratch if ch.chance(10) else None)


# ------------------------------------------------------------------------------ regressions: one per finding

def _edit(data: bytes, manifest=None, relocations=None, arguments=None, extra_sections=()) -> bytes:
    """The engine with its manifest (and relocation records / argument bytes) edited, checksums recomputed."""
    major, minor, sections = fz.decode(data)
    if manifest is not None:
        s = fz.find(sections, fz.KIND_MANIFEST)
        m = json.loads(s[4])
        manifest(m)
        s[4] = fz.manifest_json(m)
    if relocations is not None:
        s = fz.find(sections, fz.KIND_RELOCS)
        recs = [list(fz.RELOC.unpack(s[4][i:i + 16])) for i in range(0, len(s[4]), 16)]
        relocations(recs)
        s[4] = b"".join(fz.RELOC.pack(*r) for r in recs)
    if arguments is not None:
        s = fz.find(sections, fz.KIND_ARGS)
        buf = bytearray(s[4])
        arguments(buf)
        s[4] = bytes(buf)
    sections += [list(x) for x in extra_sections]
    return fz.encode(major, minor, sections)


def _kernel(m: dict, family: str) -> dict:
    return next(k for k in m["kernels"] if k["family"] == family)["params"]


def _gemm_huge_k(m):
    p = _kernel(m, "gemm")
    p["K"], p["ln"] = 2**31 - 1, None
    for op in ("a", "b"):
        p[op]["k"] = [[2**31 - 1, 0]]


def _eltwise_huge(m):
    p = _kernel(m, "eltwise")
    p["shape"] = [2**31 - 1] + p["shape"][1:]
    for x in p["inputs"]:
        x["atoms"] = [[2**31 - 1, 0]] + x["atoms"]


def _reduce_huge_r(m):
    p = _kernel(m, "reduce")
    p["outer"], p["R"], p["atoms"] = 0, 2**28, [[0, 1], [2**28, 0]]


def _set(family, key, value):
    def edit(m):
        _kernel(m, family)[key] = value
    return edit


def _set_expr(family, expr):
    return _set(family, "expr", expr)


def _rename_arg(m):
    k = next(k for k in m["kernels"] if k["family"] == "gemm")
    k["args"][0]["name"] = "x"


def _first_io_dtype(m):
    m["inputs"][0]["dtype"] = "complex64"


def _huge_input(m):
    """A 2^40-element input at the end of a grown arena: consistent, so only the executor's cap stops it."""
    t = m["inputs"][0]
    t["shape"] = [2**30] + t["shape"]
    t["nbytes"] = 4 * int(np.prod(t["shape"]))
    t["offset"] = -(-m["memory"]["arena_bytes"] // 256) * 256
    m["memory"]["arena_bytes"] = t["offset"] + t["nbytes"]


def _gemm_work(m):
    """Every operand within the per-array cap, but 2^42 multiply-adds."""
    p = _kernel(m, "gemm")
    p["M"] = p["N"] = p["K"] = 2**14
    p["ln"] = None
    p["a"]["m"], p["a"]["k"], p["b"]["k"], p["b"]["n"] = [[2**14, 0]], [[2**14, 0]], [[2**14, 0]], [[2**14, 0]]
    for e in p["epi_inputs"]:
        e["atoms"] = [[2**14, 0], [2**14, 0]]


def _targets_mixed(m):
    m["targets"] = ["sm_90a", 5]


def _format_bool(m):
    m["format"]["major"] = True


CASES = [  # (seed, edit keyword arguments, what the error must say)
    ("encoder_fp32", {"manifest": _gemm_huge_k}, r"params batch, M, K make the A operand 1 x 16 x 2147483647 "),
    ("encoder_fp32", {"manifest": _gemm_work}, r"params batch, M, N, K ask for 4398046511104 multiply-adds"),
    ("ops_fp16_bundle", {"manifest": _eltwise_huge}, r"params shape make the output 2147483647 x "),
    ("ops_fp16_bundle", {"manifest": _reduce_huge_r}, r"params outer, R ask for \d+ element operations"),
    ("encoder_fp32", {"manifest": _set("gemm", "M", [16])}, r"params.M = \[16\] is a list, expected an integer"),
    ("encoder_fp32", {"manifest": _set("gemm", "M", 16.0)}, r"params.M = 16.0 is a float"),
    ("encoder_fp32", {"manifest": _set("gemm", "M", True)}, r"params.M = True is a bool"),
    ("encoder_fp32", {"manifest": _set("gemm", "M", -16)}, r"params.M = -16 is out of range"),
    ("encoder_fp32", {"manifest": _set("gemm", "ln", {"eps": 1e-5, "has_beta": 1})}, r"params.ln.has_beta = 1"),
    ("encoder_fp32", {"manifest": _set("layernorm", "eps", float("nan"))}, r"params.eps = nan is out of range"),
    ("encoder_fp32", {"manifest": _set("layernorm", "cache", [{"start": "0", "outer": 1, "inner": 1, "S": 1}])},
     r"params.cache\[0\].start = '0' is a str"),
    ("encoder_fp32", {"manifest": _set("layernorm", "parts", "x")}, r"params.parts = 'x' is a str, expected a list"),
    ("ops_fp16_bundle", {"manifest": _set("eltwise", "cache", [{"start": 2**30, "outer": 1, "inner": 1, "S": 1}])},
     r"params.cache\[0\] writes elements 1073741824"),
    ("encoder_fp32", {"manifest": _set("softmax", "inner", 3)}, r"params.rows = 1 is not a multiple of inner"),
    ("encoder_fp32", {"manifest": _set("softmax", "in_dtype", "float64")}, r"params.in_dtype = 'float64' is not one"),
    ("ops_fp16_bundle", {"manifest": _set("gather", "index_dtype", "float32")}, r"params.index_dtype = 'float32'"),
    ("ops_fp16_bundle", {"manifest": _set("gather", "D", 0)}, r"params.D = 0 is out of range"),
    ("ops_fp16_bundle", {"manifest": _set("concat", "axis", 7)}, r"params.axis = 7 is not an axis"),
    ("ops_fp16_bundle", {"manifest": _set("reduce", "op", "prod")}, r"params.op = 'prod' is not one of"),
    ("ops_fp16_bundle", {"manifest": _set_expr("eltwise", [["in", 0], ["add", 0, 5]])},
     r"params.expr is invalid: elementwise expression instruction 1"),
    ("ops_fp16_bundle", {"manifest": _set_expr("eltwise", [["in", 9]])}, r"expression instruction 0 is invalid"),
    ("ops_fp16_bundle", {"manifest": _set_expr("eltwise", [["in", True]])}, r"expression instruction 0 is invalid"),
    ("ops_fp16_bundle", {"manifest": _set_expr("eltwise", [["const", 10**400]])}, r"instruction 0 is invalid"),
    ("ops_fp16_bundle", {"manifest": _set_expr("eltwise", [["acc"]])}, r"instruction 0 is invalid"),
    ("encoder_fp32", {"manifest": _rename_arg}, r"args \[x:ptr, .*\] differ from the family's parameters \[a:ptr"),
    ("encoder_fp32", {"manifest": _first_io_dtype}, r"inputs\[0\] 'x' has unknown dtype 'complex64'"),
    ("encoder_fp32", {"manifest": _huge_input}, r"inputs\[0\] 'x' has shape .* more than the CPU reference"),
    ("encoder_fp32", {"manifest": _targets_mixed}, r"manifest targets \['sm_90a', 5\] disagree"),
    ("encoder_fp32", {"manifest": _format_bool}, r"manifest format .* disagrees with the header"),
    # the last relocation is the last launch's output: point it into the (read-only) weights
    ("encoder_fp32", {"relocations": lambda r: r[-1].__setitem__(1, 1)}, r"points into the read-only weights"),
    # the first launch's first pointer, moved off its element alignment
    ("encoder_fp32", {"arguments": lambda b: b.__setitem__(0, b[0] + 2)}, r"offset 2 is not aligned"),
    ("mlp_bf16_bundle", {"extra_sections": [(7, 0, 256, b"selftest2".ljust(32, b"\0"), b"\0" * 8)]},
     r"expected at most one selftest section, found 2"),
    ("mlp_bf16_bundle", {"extra_sections": [(99, 1, 256, b"x".ljust(32, b"\0"), b"")]}, r"\.flags = 1, expected 0"),
]


@pytest.mark.parametrize("seed, edits, message", CASES, ids=[f"{i}-{c[2][:30]}" for i, c in enumerate(CASES)])
def test_hostile_engine_is_rejected_naming_the_field(seeds, seed, edits, message):
    data = _edit(seeds[seed], **edits)
    with pytest.raises(EngineFormatError, match=message) as e:
        fz.run_mutant(data)
    assert e.value.__cause__ is None, "a deliberate check, not the executor's safety net"


def test_huge_arena_is_an_engine_format_error_or_lazily_allocated(seeds):
    data = _edit(seeds["encoder_fp32"], manifest=lambda m: m["memory"].__setitem__("arena_bytes", 2**44))
    assert _check(data, None) in ("ok", "EngineFormatError")


def test_nonzero_padding_and_trailing_bytes_are_rejected(seeds):
    data = seeds["mlp_bf16_bundle"]
    _, _, offset, size, *_ = fz.SECTION.unpack_from(data, fz.HEADER.size)  # section 0: the manifest
    end = offset + size  # the padding after it
    assert data[end:end + 2] == b"\0\0"
    with pytest.raises(EngineFormatError, match=r"padding at \d+\.\.\d+ before it is not zero"):
        fz.run_mutant(data[:end] + b"\x01" + data[end + 1:])
    with pytest.raises(EngineFormatError, match=r"after the last section are not zero"):
        grown = data + b"\0" * 255 + b"\x01"
        fz.run_mutant(fz.fix_table_sha(grown[:24] + len(grown).to_bytes(8, "little") + grown[32:]))


def test_selftest_that_lies_about_its_outputs_fails_verify_not_the_process(seeds, tmp_path):
    """Expected outputs bit-flipped (checksums recomputed): verify reports a mismatch; nothing raises."""
    from flashrt.runtime.selftest import verify

    major, minor, sections = fz.decode(seeds["mlp_bf16_bundle"])
    s = fz.find(sections, fz.KIND_SELFTEST)
    raw = bytearray(s[4])
    n = int.from_bytes(raw[:4], "little")
    out = json.loads(raw[4:4 + n])["outputs"][0]
    raw[-(-(4 + n) // 256) * 256 + out["offset"] + 3] ^= 0x40  # the exponent of the first expected value
    s[4] = bytes(raw)
    path = tmp_path / "lying.frt"
    path.write_bytes(fz.encode(major, minor, sections))
    report = verify(str(path), device="cpu")
    assert report.bundled and not report.passed
