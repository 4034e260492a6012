"""Packaging promises: the runtime imports no compiler dependency; nvcc comes from the wheel when not on PATH."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_runtime_imports_no_build_dependencies(samples, tmp_path):
    from flashrt.aot.build import build_engine

    engine = tmp_path / "e.frt"
    build_engine(str(samples / "tiny_encoder.onnx"), ["sm_90a"], str(engine), precision="bf16")
    code = f"""
import sys, json
import flashrt, flashrt.runtime, flashrt.runtime.cpu, flashrt.runtime.cuda, flashrt.engine_format
eng = flashrt.load({str(engine)!r}, device="cpu")
out = eng.run(eng.example_inputs())
banned = ["onnx", "safetensors", "click", "torch", "onnxruntime", "ml_dtypes", "flashrt.aot", "flashrt.cli"]
print(json.dumps(sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in banned))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _wheel_nvcc():
    from flashrt.aot.codegen import _wheel_nvcc

    return _wheel_nvcc()


@pytest.mark.skipif(_wheel_nvcc() is None, reason="the nvcc wheel is not installed (pip install -e .[build])")
def test_build_with_the_nvcc_wheel_and_no_nvcc_on_path(tmp_path):
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "nvcc"))]
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHRT_NVCC", "CUDA_HOME", "CUDA_PATH")}
    env.update(PATH=os.pathsep.join(path), FLASHRT_CACHE_DIR=str(tmp_path / "cache"))
    engine = tmp_path / "w.frt"
    code = ("import shutil, sys; assert shutil.which('nvcc') is None; from flashrt.cli.main import main; "
            f"sys.argv = ['flashrt', 'build', '-t', 'thor', '-t', 'h100', {str(ROOT / 'samples' / 'mlp.onnx')!r}, "
            f"'--shapes', 'x:1x32', '-o', {str(engine)!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    from flashrt.engine_format.reader import read_engine

    ef = read_engine(engine)
    assert ef.targets == ["sm_110a", "sm_90a"]
    assert ef.manifest["provenance"]["nvcc_version"].startswith("13.")
