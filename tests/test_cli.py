"""The CLI end to end: build with progress, inspect, run, targets."""

import json
import os
import subprocess

import numpy as np
from conftest import ROOT, flashrt_cli


def _cli(*args, **kw):
    return subprocess.run(flashrt_cli() + [str(a) for a in args], capture_output=True, text=True, **kw)


def test_targets_lists_the_architectures():
    out = _cli("targets").stdout
    for name, arch in (("thor", "sm_110a"), ("rtx5090", "sm_120a"), ("h100", "sm_90a"), ("h200", "sm_90a")):
        assert any(line.split()[:2] == [name, arch] for line in out.splitlines()), out


def test_readme_build_command_and_default_output(tmp_path):
    """README's command, and the default output name next to the model."""
    proc = _cli("build", "--target", "thor", ROOT / "samples" / "tiny_encoder.onnx", "-o", tmp_path / "model.frt")
    assert proc.returncode == 0, proc.stderr
    assert "built" in proc.stdout and (tmp_path / "model.frt").exists()
    model = tmp_path / "enc.onnx"
    model.write_bytes((ROOT / "samples" / "tiny_encoder.onnx").read_bytes())
    assert _cli("build", model).returncode == 0
    assert (tmp_path / "enc.frt").exists()


def test_multi_target_inspect_and_run(tmp_path):
    engine = tmp_path / "m.frt"
    proc = _cli("build", ROOT / "samples" / "mlp.onnx", "--target", "thor", "--target", "rtx5090", "-t", "h100",
                "--shapes", "x:3x32", "--precision", "bf16", "-o", engine)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(_cli("inspect", engine, "--json").stdout)
    assert info["targets"] == ["sm_110a", "sm_120a", "sm_90a"]
    assert info["inputs"][0]["shape"] == [3, 32] and info["provenance"]["precision"] == "bf16"
    assert info["provenance"]["build_flags"]["shapes"] == {"x": [3, 32]}
    assert len(info["provenance"]["source_sha256"]) == 64 and info["provenance"]["min_driver"]
    assert all(r["source_nodes"] for r in info["regions"])
    assert all(set(k["resources"]) == set(info["targets"]) and k["resources"]["sm_90a"]["registers"] > 0
               for k in info["kernels"])
    text = _cli("inspect", engine).stdout
    assert "regions" in text and "sections" in text and "weights" in text

    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.savez(inputs, x=x)
    proc = _cli("run", engine, "--device", "cpu", "--inputs", inputs, "--output", outputs, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["outputs"]["y"]["shape"] == [3, 8] and summary["outputs"]["y"]["finite"]
    with np.load(outputs) as got:
        assert got["y"].shape == (3, 8) and np.all((got["y"] > 0) & (got["y"] < 1))
    proc = _cli("run", engine, "--device", "cpu")  # seeded random inputs
    assert proc.returncode == 0 and "y: float32[3, 8]" in proc.stdout


def test_progress_on_a_terminal(tmp_path):
    """Under a pseudo-terminal the build reports stage, kernels compiled of total and cache hits."""
    import pty

    env = dict(os.environ, FLASHRT_CACHE_DIR=str(tmp_path / "cache"))
    main, sub = pty.openpty()
    proc = subprocess.run(flashrt_cli() + ["build", str(ROOT / "samples" / "mlp.onnx"), "--shapes", "x:1x32",
                                           "-o", str(tmp_path / "p.frt")], stdout=subprocess.PIPE, stderr=sub,
                          env=env)
    os.close(sub)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "import" in text and "compile: 4/4 kernels (0 cache hits)" in text and "link: 1/1 targets" in text
