"""ONNX node-test conformance in CI: every test listed in data/onnx_node_passing.txt (written by
`python tests/onnx_conformance.py`) is rebuilt and rerun on the CPU executor and must still pass; every node test
whose ops the importer does not claim must still be refused at build with a ModelError.

With a cold kernel cache each test costs about 0.4 s of CPU (its nvcc compiles; attention tests several
seconds), so once the list is longer than CI_LIMIT a deterministic subset runs (round-robin over the op under test,
see ci_selection) to keep this module near a minute on a 2-core machine; FLASHRT_ONNX_CONFORMANCE=all runs the
whole list."""

import os

import pytest
from onnx_conformance import PASS, check_unclaimed_rejected, ci_selection, is_claimed, model_ops, node_test_dir, \
    node_test_names, op_under_test, read_passing, run_node_test, supported_ops

CI_LIMIT = 150
PASSING = read_passing()


def _selected() -> list[str]:
    if len(PASSING) <= CI_LIMIT or os.environ.get("FLASHRT_ONNX_CONFORMANCE") == "all":
        return PASSING
    root = node_test_dir()
    return ci_selection(PASSING, CI_LIMIT, lambda n: op_under_test(root, n) if (root / n).is_dir() else "?")


SELECTED = _selected()


@pytest.fixture(scope="module")
def node_dir():
    return node_test_dir()


def test_passing_list_is_sorted_unique_and_nonempty():
    assert PASSING, "tests/data/onnx_node_passing.txt is empty or missing: run python tests/onnx_conformance.py"
    assert PASSING == sorted(set(PASSING))


def test_passing_tests_exist_in_installed_onnx(node_dir):
    missing = sorted(set(PASSING) - set(node_test_names(node_dir)))
    assert not missing, f"node tests no longer in the installed onnx: {missing}"


def test_ci_selection_is_deterministic_and_covers_every_op():
    names = [f"test_{op}_{i}" for op in "abcde" for i in range(10 if op == "a" else 3)]
    picked = ci_selection(names, 8, lambda n: n.split("_")[1])
    assert len(picked) == 8 and picked == sorted(set(picked)) and set(picked) <= set(names)
    assert {n.split("_")[1] for n in picked} == set("abcde")
    assert picked == ci_selection(list(reversed(names)), 8, lambda n: n.split("_")[1])
    assert ci_selection(names, 100, str) == names


@pytest.mark.parametrize("name", SELECTED)
def test_node_conformance(node_dir, name, tmp_path):
    res = run_node_test(node_dir / name, tmp_path)
    assert res.status == PASS, f"{name} ({res.op}): {res.status} at {res.stage}: {res.reason}\n{res.detail}"


def test_unclaimed_ops_are_a_clear_build_error(node_dir, tmp_path):
    """An op the importer does not handle is refused with a ModelError at build, never compiled into an engine."""
    supported = supported_ops()
    bad = {}
    for name in node_test_names(node_dir):
        ops, foreign = model_ops(node_dir / name / "model.onnx")
        if not is_claimed(ops, foreign, supported):
            why = check_unclaimed_rejected(node_dir / name, tmp_path)
            if why:
                bad[name] = why
    assert not bad, f"{len(bad)} unclaimed node tests were not refused: {dict(list(bad.items())[:10])}"
