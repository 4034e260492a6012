"""Engines that can be trusted: reproducible builds, the self-test bundle and `flashrt verify`."""

import subprocess

import numpy as np
import pytest
from conftest import ROOT, flashrt_cli

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine


def _cli(*args, env=None):
    import os

    return subprocess.run(flashrt_cli() + [str(a) for a in args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_builds_are_byte_identical_across_processes_and_caches(tmp_path):
    model = ROOT / "samples" / "tiny_encoder.onnx"
    outs = []
    for i, cache in enumerate(["cold", "cold", "warm"]):  # second build reuses the first's cache: warm
        out = tmp_path / f"e{i}.frt"
        env = {"FLASHRT_CACHE_DIR": str(tmp_path / ("cache0" if cache == "warm" else f"cache{i}"))}
        proc = _cli("build", model, "-t", "thor", "-t", "h100", "--precision", "bf16", "--bundle-test", "-o", out,
                    env=env)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_bundle_and_verify_on_cpu(tmp_path):
    model = ROOT / "samples" / "mlp.onnx"
    x = np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    engine = tmp_path / "m.frt"
    proc = _cli("build", model, "--shapes", "x:2x32", "--bundle-test", "--inputs", tmp_path / "in.npz", "-o", engine)
    assert proc.returncode == 0, proc.stderr
    meta, inputs, expected = read_engine(engine).selftest()
    np.testing.assert_array_equal(inputs["x"], x)
    np.testing.assert_array_equal(expected["y"], flashrt.load(engine, device="cpu").run({"x": x})["y"])
    proc = _cli("verify", engine, "--device", "cpu")
    assert proc.returncode == 0 and "PASS y: rel-L2" in proc.stdout and "verify: PASS on cpu" in proc.stdout


def test_verify_fails_on_wrong_expectations_and_missing_bundle(tmp_path):
    from flashrt.engine_format.writer import engine_bytes, selftest_bytes

    engine = tmp_path / "m.frt"
    build_engine(str(ROOT / "samples" / "mlp.onnx"), ["sm_90a"], str(engine), {"x": (1, 32)}, bundle_test=True)
    ef = read_engine(engine)
    meta, inputs, expected = ef.selftest()
    wrong = np.ascontiguousarray(expected["y"] + 0.1, np.float32)
    blob = bytearray(inputs["x"].tobytes())
    blob += bytes(-len(blob) % 256)
    meta["outputs"][0]["offset"] = len(blob)
    blob += wrong.tobytes()
    parts = dict(manifest=ef.manifest, cubins={t: ef.cubin(t) for t in ef.targets}, weights=bytes(ef.weights()),
                 launches=ef.launches, relocations=ef.relocations, arguments=ef.arguments())
    bad = tmp_path / "bad.frt"
    bad.write_bytes(engine_bytes(**parts, selftest=selftest_bytes(meta, bytes(blob))))
    proc = _cli("verify", bad, "--device", "cpu")
    assert proc.returncode != 0 and "FAIL y: rel-L2" in proc.stdout and "self-test failed" in proc.stderr
    plain = tmp_path / "plain.frt"
    plain.write_bytes(engine_bytes(**parts))
    proc = _cli("verify", plain, "--device", "cpu")
    assert proc.returncode != 0 and "no self-test bundled" in proc.stderr


def test_verify_reports_corruption(tmp_path):
    engine = tmp_path / "m.frt"
    build_engine(str(ROOT / "samples" / "mlp.onnx"), ["sm_90a"], str(engine), {"x": (1, 32)}, bundle_test=True)
    data = bytearray(engine.read_bytes())
    data[-10] ^= 0x40  # inside the self-test data
    engine.write_bytes(bytes(data))
    proc = _cli("verify", engine, "--device", "cpu")
    assert proc.returncode != 0 and "selftest" in proc.stderr and "checksum mismatch" in proc.stderr


@pytest.mark.parametrize("flag", ["--inputs"])
def test_inputs_without_bundle_is_an_error(tmp_path, flag):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 32), np.float32))
    proc = _cli("build", ROOT / "samples" / "mlp.onnx", "--shapes", "x:1x32", flag, tmp_path / "in.npz",
                "-o", tmp_path / "o.frt")
    assert proc.returncode != 0 and "--bundle-test" in proc.stderr and not (tmp_path / "o.frt").exists()
