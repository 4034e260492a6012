"""Conformance against ONNX's own node tests (onnx/backend/test/data/node/*).

Every node test whose ops the importer claims (all default-domain op types of its graph are in
flashrt.aot.importers.onnx_import.SUPPORTED, read at run time) is built into an fp32 sm_90a engine, run on the
CPU reference executor with the test's inputs, and compared with the test's expected outputs. Outcomes:

    PASS      outputs match: shape, dtype, and numpy allclose with rtol=1e-3, atol=1e-5 (rtol 2**-6 for
              bfloat16 outputs, as onnx's backend test runner; exact for integer and bool outputs)
    REJECTED  a FlashRTError at build or run: the clear error a user gets (acceptable)
    MISMATCH  it ran but gave a wrong answer (a bug)
    CRASH     any other exception (a bug)

Tests whose ops the importer does not claim must be rejected at build with a ModelError (never built).

Where the installed onnx wheel ships the node test data, it is read from there. Newer wheels (1.19+) ship only
the Python that generates it (onnx.backend.test.case.node, the source of the checked-in .pb files); the data is
then generated from it once, the way onnx's own `backend-test-tools generate-data` does (each case seeded with
np.random.seed(0)), into the same layout under FLASHRT_CACHE_DIR (default ~/.cache/flashrt)/onnx-node-tests.

    python tests/onnx_conformance.py [-j 2] [--only NAME ...]

writes tests/data/onnx_node_passing.txt (the names that PASS) and tests/data/onnx_node_report.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RTOL, ATOL = 1e-3, 1e-5
TARGET, PRECISION = "sm_90a", "fp32"
DATA_DIR = Path(__file__).resolve().parent / "data"
PASSING_FILE = DATA_DIR / "onnx_node_passing.txt"
REPORT_FILE = DATA_DIR / "onnx_node_report.md"
DEFAULT_DOMAINS = ("", "ai.onnx")

PASS, REJECTED, MISMATCH, CRASH = "PASS", "REJECTED", "MISMATCH", "CRASH"


# ---- where the node tests are ---------------------------------------------------------------------------------

def supported_ops() -> set[str]:
    """The importer's claimed op set, read now (it grows as ops are added)."""
    from flashrt.aot.importers import onnx_import

    return set(onnx_import.SUPPORTED)


def shipped_node_dir() -> Path:
    import onnx

    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "node"


def _cache_root() -> Path:
    root = os.environ.get("FLASHRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashrt")
    return Path(root) / "onnx-node-tests"


def _write_value(path: Path, value, type_proto, name: str) -> None:
    """One input_*.pb / output_*.pb, exactly as onnx.backend.test.cmd_tools.generate_data writes it."""
    import onnx
    from onnx import numpy_helper

    if type_proto.HasField("map_type"):
        proto = numpy_helper.from_dict(value, name)
    elif type_proto.HasField("sequence_type"):
        proto = numpy_helper.from_list(value, name)
    elif type_proto.HasField("optional_type"):
        proto = numpy_helper.from_optional(value, name)
    elif isinstance(value, onnx.TensorProto):
        proto = value
    else:
        proto = numpy_helper.from_array(value, name)
    path.write_bytes(proto.SerializeToString())


def generate_node_tests(dest: Path) -> None:
    """Write every node test of the installed onnx's case definitions to dest/<test name>/ in the layout of
    onnx/backend/test/data/node (model.onnx, test_data_set_0/input_*.pb, output_*.pb)."""
    import warnings

    from onnx.backend.test.loader import load_node_model_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = load_node_model_tests()
    for case in cases:
        d = dest / case.name
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(case.model.SerializeToString())
        g = case.model.graph
        for k, (inputs, outputs) in enumerate(case.data_sets):
            ds = d / f"test_data_set_{k}"
            ds.mkdir()
            for j, value in enumerate(inputs):
                _write_value(ds / f"input_{j}.pb", value, g.input[j].type, g.input[j].name)
            for j, value in enumerate(outputs):
                _write_value(ds / f"output_{j}.pb", value, g.output[j].type, g.output[j].name)


def node_test_dir() -> Path:
    """The node tests of the installed onnx: its shipped data, else generated once from its case definitions."""
    shipped = shipped_node_dir()
    if shipped.is_dir() and any(shipped.iterdir()):
        return shipped
    import onnx

    root = _cache_root() / f"onnx-{onnx.__version__}-numpy-{np.__version__}"
    done = root / "node"
    if done.is_dir():
        return done
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".node-", dir=root))
    try:
        generate_node_tests(staging)
        try:
            os.replace(staging, done)  # atomic publish; a concurrent generator may have won the race
        except OSError:
            if not done.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def node_test_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "model.onnx").is_file())


# ---- claiming -------------------------------------------------------------------------------------------------

def _graph_ops(graph, ops: set[str], foreign: set[str]) -> None:
    from onnx import AttributeProto

    for n in graph.node:
        if n.domain in DEFAULT_DOMAINS:
            ops.add(n.op_type)
        else:
            foreign.add(f"{n.domain}::{n.op_type}")
        for a in n.attribute:  # control-flow bodies count too
            if a.type == AttributeProto.GRAPH:
                _graph_ops(a.g, ops, foreign)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _graph_ops(sub, ops, foreign)


def model_ops(model_path: Path) -> tuple[set[str], set[str]]:
    """(default-domain op types, other-domain 'domain::op' types) used anywhere in the model."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops: set[str] = set()
    foreign: set[str] = set()
    _graph_ops(model.graph, ops, foreign)
    return ops, foreign


def is_claimed(ops: set[str], foreign: set[str], supported: set[str]) -> bool:
    return bool(ops) and not foreign and ops <= supported


# ---- running one test -----------------------------------------------------------------------------------------

_EXPANDED = re.compile(r"^(.*)_expanded(?:_ver\d+)?$")


def op_under_test(root: Path, name: str) -> str:
    """The op a node test is about: its node's op type; for a function-expanded test (NAME_expanded[_verN]),
    the op of the test it expands, marked ' (expanded)'. Several ops are joined with '+'."""
    import onnx

    def top_level_ops(test: str) -> str:
        g = onnx.load(str(root / test / "model.onnx"), load_external_data=False).graph
        return "+".join(sorted({n.op_type if n.domain in DEFAULT_DOMAINS else f"{n.domain}::{n.op_type}"
                                for n in g.node}))

    m = _EXPANDED.match(name)
    if m and (root / m.group(1) / "model.onnx").is_file():
        return top_level_ops(m.group(1)) + " (expanded)"
    return top_level_ops(name)


@dataclass
class Result:
    name: str
    op: str                  # the op under test (op_under_test)
    ops: list[str]           # every op type in the graph
    status: str
    stage: str = ""          # build | run | compare
    reason: str = ""         # one line
    detail: str = ""         # a short traceback for CRASH
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"


def _read_value(path: Path, type_proto):
    """A .pb test value as numpy (tensor), list (sequence), dict (map) or value/None (optional)."""
    import onnx
    from onnx import numpy_helper

    raw = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        p = onnx.SequenceProto()
        p.ParseFromString(raw)
        return numpy_helper.to_list(p)
    if type_proto.HasField("optional_type"):
        p = onnx.OptionalProto()
        p.ParseFromString(raw)
        return numpy_helper.to_optional(p)
    if type_proto.HasField("map_type"):
        p = onnx.MapProto()
        p.ParseFromString(raw)
        return numpy_helper.to_dict(p)
    p = onnx.TensorProto()
    p.ParseFromString(raw)
    return numpy_helper.to_array(p)


def load_data_sets(test_dir: Path, model) -> list[tuple[dict, dict]]:
    """[(feeds, expected)] per test_data_set_*: inputs in the order of the graph's non-initializer inputs,
    outputs in the graph's output order."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = [vi for vi in g.input if vi.name not in inits]
    sets = []
    for ds in sorted(test_dir.glob("test_data_set_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])):
        n_in = len(list(ds.glob("input_*.pb")))
        n_out = len(list(ds.glob("output_*.pb")))
        feeds = {ins[j].name: _read_value(ds / f"input_{j}.pb", ins[j].type) for j in range(min(n_in, len(ins)))}
        expected = {g.output[j].name: _read_value(ds / f"output_{j}.pb", g.output[j].type)
                    for j in range(min(n_out, len(g.output)))}
        sets.append((feeds, expected))
    return sets


def compare(got: dict, expected: dict) -> str | None:
    """None when every expected output matches; else one line saying what differs."""
    problems = []
    for name, want in expected.items():
        if name not in got:
            problems.append(f"output '{name}' missing (engine gives {sorted(got)})")
            continue
        have = got[name]
        if not isinstance(want, np.ndarray):
            problems.append(f"output '{name}' expected a {type(want).__name__}, got {type(have).__name__}")
            continue
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"output '{name}' shape {list(have.shape)} != expected {list(want.shape)}")
            continue
        rtol = RTOL
        if want.dtype.name == "bfloat16":
            rtol = max(RTOL, 2**-6)  # two bfloat16 ulps, as onnx's own backend test runner allows
            if have.dtype == np.float32:
                want = want.astype(np.float32)  # the runtime hands bfloat16 outputs over as float32 (README)
        if have.dtype != want.dtype:
            problems.append(f"output '{name}' dtype {have.dtype} != expected {want.dtype}")
            continue
        if have.dtype.name == "bfloat16":
            have, want = have.astype(np.float32), want.astype(np.float32)
        if want.dtype.kind in "fc":
            bad = ~np.isclose(have, want, rtol=rtol, atol=ATOL, equal_nan=True)
        else:
            bad = have != want
        if bad.any():
            with np.errstate(all="ignore"):
                err = np.abs(have.astype(np.float64) - want.astype(np.float64))
            worst = np.where(bad, np.nan_to_num(err, nan=np.inf), -1.0)
            idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(worst)), have.shape))
            problems.append(f"output '{name}' {int(bad.sum())}/{have.size} elements differ, max |err| "
                            f"{float(worst.max()):.3g}; at {list(idx)} got {have[idx].item()!r} "
                            f"expected {want[idx].item()!r}")
    extra = sorted(set(got) - set(expected))
    if extra:
        problems.append(f"unexpected outputs {extra}")
    return "; ".join(problems) or None


def run_node_test(test_dir: Path | str, work_dir: Path | str | None = None) -> Result:
    """Build, load (cpu) and run one node test; classify the outcome."""
    import onnx

    import flashrt
    from flashrt.aot.build import build_engine
    from flashrt.errors import FlashRTError

    test_dir = Path(test_dir)
    t0, c0 = time.perf_counter(), os.times()
    res = Result(test_dir.name, "?", [], CRASH)
    stage = "load test data"
    tmp = tempfile.TemporaryDirectory(prefix="flashrt-onnx-node-", dir=work_dir)
    try:
        ops, foreign = model_ops(test_dir / "model.onnx")
        res.op, res.ops = op_under_test(test_dir.parent, test_dir.name), sorted(ops | foreign)
        model = onnx.load(str(test_dir / "model.onnx"))
        data_sets = load_data_sets(test_dir, model)
        if not data_sets:
            raise RuntimeError("the test has no test_data_set_*")
        # engines are static: every input's size comes from the test's (first) input arrays
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in data_sets[0][0].items() if isinstance(v, np.ndarray)}
        stage = "build"
        engine_path = os.path.join(tmp.name, "engine.frt")
        build_engine(str(test_dir / "model.onnx"), [TARGET], engine_path, shapes, PRECISION)
        stage = "run"
        engine = flashrt.load(engine_path, device="cpu")
        problems = []
        for k, (feeds, expected) in enumerate(data_sets):
            stage = "run"
            got = engine.run(feeds)
            stage = "compare"
            p = compare(got, expected)
            if p:
                problems.append(p if len(data_sets) == 1 else f"data set {k}: {p}")
        if problems:
            res.status, res.stage, res.reason = MISMATCH, "compare", "; ".join(problems)
        else:
            res.status, res.stage = PASS, ""
    except FlashRTError as e:
        res.status, res.stage, res.reason = REJECTED, stage, _one_line(e)
    except Exception as e:  # noqa: BLE001 - anything else is a bug to report
        res.status, res.stage, res.reason = CRASH, stage, _one_line(e)
        res.detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:]).strip()
    finally:
        tmp.cleanup()
    res.reason = res.reason.replace(str(test_dir), test_dir.name)[:600]  # no machine-specific paths
    res.seconds = time.perf_counter() - t0
    c1 = os.times()
    res.cpu_seconds = sum(c1[:4]) - sum(c0[:4])  # this process and its nvcc children
    return res


def check_unclaimed_rejected(test_dir: Path | str, work_dir: Path | str | None = None) -> str | None:
    """A test whose ops the importer does not claim must fail to build with a ModelError; None when it does,
    else what happened instead."""
    import onnx

    from flashrt.aot.build import build_engine
    from flashrt.errors import ModelError

    test_dir = Path(test_dir)
    try:
        model = onnx.load(str(test_dir / "model.onnx"))
        feeds = load_data_sets(test_dir, model)[0][0]
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in feeds.items() if isinstance(v, np.ndarray)}
    except Exception:  # noqa: BLE001 - data flashrt cannot even read: let the build say what it makes of it
        shapes = None
    with tempfile.TemporaryDirectory(prefix="flashrt-onnx-node-", dir=work_dir) as tmp:
        try:
            build_engine(str(test_dir / "model.onnx"), [TARGET], os.path.join(tmp, "engine.frt"), shapes, PRECISION)
        except ModelError:
            return None
        except Exception as e:  # noqa: BLE001
            return f"build raised {_one_line(e)[:300]} instead of a ModelError"
    return "built without error although the importer does not claim all its ops"


# ---- the whole suite ------------------------------------------------------------------------------------------

def _run_one(path: str) -> Result:
    return run_node_test(path)


def run_many(paths: list[str], jobs: int = 2, progress=None) -> list[Result]:
    """run_node_test for each path, in `jobs` worker processes (kernel compiles dominate a cold run)."""
    results: list[Result] = []
    if jobs > 1 and len(paths) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(jobs, len(paths)), maxtasksperchild=50) as pool:
            for r in pool.imap_unordered(_run_one, paths):
                results.append(r)
                if progress:
                    progress(r, len(results), len(paths))
    else:
        for p in paths:
            results.append(_run_one(p))
            if progress:
                progress(results[-1], len(results), len(paths))
    return results


def _print_progress(r: Result, done: int, total: int) -> None:
    print(f"[{done}/{total}] {r.status:8s} {r.name} {r.reason[:100]}", flush=True)


def ci_selection(names: list[str], limit: int, op_key) -> list[str]:
    """At most `limit` of names, deterministically: round-robin over op keys (op_key(name)), each op's tests in
    the order of their names' sha256, so every op keeps coverage when the list outgrows the CI budget."""
    if len(names) <= limit:
        return list(names)
    import hashlib

    groups: dict[str, list[str]] = defaultdict(list)
    for n in sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        groups[op_key(n)].append(n)
    picked: list[str] = []
    queues = [groups[k] for k in sorted(groups)]
    i = 0
    while len(picked) < limit:
        q = queues[i % len(queues)]
        if q:
            picked.append(q.pop(0))
        i += 1
    return sorted(picked)


def run_suite(names: list[str] | None = None, jobs: int = 2, progress=True) -> tuple[list[Result], dict]:
    """Run every claimed node test (or those named); returns (results, facts about the suite)."""
    root = node_test_dir()
    supported = supported_ops()
    all_names = node_test_names(root)
    claimed, unclaimed = [], []
    for name in all_names:
        ops, foreign = model_ops(root / name / "model.onnx")
        (claimed if is_claimed(ops, foreign, supported) else unclaimed).append(name)
    todo = claimed if names is None else [n for n in claimed if n in set(names)]
    t0 = time.perf_counter()
    results = run_many([str(root / n) for n in todo], jobs, _print_progress if progress else None)
    unclaimed_bad = {}
    if names is None:
        for n in unclaimed:
            bad = check_unclaimed_rejected(root / n)
            if bad:
                unclaimed_bad[n] = bad
    import onnx

    facts = {"root": str(root), "shipped": root == shipped_node_dir(), "onnx": onnx.__version__,
             "numpy": np.__version__, "total": len(all_names), "claimed": len(claimed),
             "unclaimed": len(unclaimed), "unclaimed_bad": unclaimed_bad, "supported": sorted(supported),
             "seconds": time.perf_counter() - t0}
    return sorted(results, key=lambda r: r.name), facts


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _reason_kind(reason: str) -> str:
    """A rejection message with its names and lists elided, so that like reasons group together."""
    kind = re.sub(r"^(\w+Error: )test_\w+/model\.onnx: ", r"\1", reason)
    kind = re.sub(r"'[^']*'", "'…'", kind)
    return re.sub(r"\[[^\]]*\]", "[…]", kind)


def write_report(results: list[Result], facts: dict, path: Path = REPORT_FILE) -> str:
    counts = Counter(r.status for r in results)
    by_op: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_op[r.op].append(r)
    lines = [
        "# ONNX node-test conformance",
        "",
        "Generated by `python tests/onnx_conformance.py`; the names that pass are in `onnx_node_passing.txt`, which",
        "`tests/test_onnx_conformance.py` re-runs in CI (a deterministic per-op subset once the list outgrows its",
        "CI_LIMIT; FLASHRT_ONNX_CONFORMANCE=all runs all).",
        "",
        f"- onnx {facts['onnx']} (numpy {facts['numpy']}); node tests "
        + ("read from the wheel's onnx/backend/test/data/node" if facts["shipped"] else
           "generated from the wheel's onnx.backend.test.case.node definitions (the wheel ships no data/node)"),
        f"- build: `build_engine(model, ['{TARGET}'], out, shapes_of_the_test_inputs, '{PRECISION}')`, "
        f"run: `flashrt.load(out, device='cpu')`; compare: same shape and dtype, "
        f"`allclose(rtol={RTOL:g}, atol={ATOL:g})` (rtol 2^-6 for bfloat16 outputs, as onnx's runner; exact for "
        "integer/bool outputs); bfloat16 outputs come back as float32 (the runtime's documented convention)",
        f"- node tests: {facts['total']}; claimed (every op in SUPPORTED): {facts['claimed']}; "
        f"run: {len(results)}",
        f"- **PASS {counts[PASS]}**, REJECTED {counts[REJECTED]}, MISMATCH {counts[MISMATCH]}, "
        f"CRASH {counts[CRASH]}",
        f"- unclaimed tests: {facts['unclaimed']}; refused at build with a ModelError: "
        f"{facts['unclaimed'] - len(facts['unclaimed_bad'])}"
        + (f"; **not rejected: {len(facts['unclaimed_bad'])}**" if facts["unclaimed_bad"] else " (all)"),
        f"- SUPPORTED at run time ({len(facts['supported'])}): {', '.join(facts['supported'])}",
        "",
        "## Per op",
        "",
        "| op | claimed | pass | rejected | mismatch | crash |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op in sorted(by_op):
        c = Counter(r.status for r in by_op[op])
        lines.append(f"| {op} | {len(by_op[op])} | {c[PASS]} | {c[REJECTED]} | {c[MISMATCH]} | {c[CRASH]} |")
    lines.append(f"| **all** | {len(results)} | {counts[PASS]} | {counts[REJECTED]} | {counts[MISMATCH]} | "
                 f"{counts[CRASH]} |")
    rejected = [r for r in results if r.status == REJECTED]
    if rejected:
        why: dict[str, list[Result]] = defaultdict(list)
        for r in rejected:
            why[_reason_kind(r.reason)].append(r)
        lines += ["", "## Why tests are rejected (names elided)", "", "| reason | tests | ops |", "|---|---:|---|"]
        for kind, rs in sorted(why.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            ops = sorted({r.op for r in rs})
            shown = ", ".join(ops[:12]) + (f", ... ({len(ops)} ops)" if len(ops) > 12 else "")
            lines.append(f"| {_md(kind)} | {len(rs)} | {_md(shown)} |")
    for status, title in ((CRASH, "Crashes (bugs)"), (MISMATCH, "Mismatches (bugs: wrong answers)"),
                          (REJECTED, "Rejected (a clear FlashRTError)")):
        bad = [r for r in results if r.status == status]
        if not bad:
            continue
        lines += ["", f"## {title}", "", "| test | op | stage | reason |", "|---|---|---|---|"]
        for r in sorted(bad, key=lambda r: (r.op, r.name)):
            lines.append(f"| {r.name} | {r.op} | {r.stage} | {_md(r.reason)} |")
        if status == CRASH:  # one traceback per distinct error
            seen: dict[str, list[Result]] = defaultdict(list)
            for r in bad:
                seen[r.reason].append(r)
            for reason, rs in seen.items():
                lines += ["", f"### {reason} ({len(rs)} test{'s' if len(rs) > 1 else ''}, e.g. {rs[0].name})", "",
                          "```", rs[0].detail, "```"]
    if facts["unclaimed_bad"]:
        lines += ["", "## Unclaimed tests that were not refused at build (bugs)", "", "| test | what happened |",
                  "|---|---|"]
        for n, why in sorted(facts["unclaimed_bad"].items()):
            lines.append(f"| {n} | {_md(why)} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def read_passing(path: Path = PASSING_FILE) -> list[str]:
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--only", nargs="*", help="run only these claimed tests; writes nothing")
    args = ap.parse_args(argv)
    results, facts = run_suite(args.only, args.jobs)
    counts = Counter(r.status for r in results)
    print(f"claimed {facts['claimed']} of {facts['total']}; ran {len(results)}: "
          + ", ".join(f"{s} {counts[s]}" for s in (PASS, REJECTED, MISMATCH, CRASH))
          + f"; unclaimed not rejected: {len(facts['unclaimed_bad'])}; {facts['seconds']:.0f}s")
    if args.only is None:
        PASSING_FILE.parent.mkdir(parents=True, exist_ok=True)
        PASSING_FILE.write_text("".join(f"{r.name}\n" for r in results if r.status == PASS))
        write_report(results, facts)
        print(f"wrote {PASSING_FILE} and {REPORT_FILE}")
    else:
        for r in results:
            if r.detail:
                print(r.detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
