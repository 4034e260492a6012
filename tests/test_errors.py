"""Bad input: every error names what is wrong; the CLI prints one line, exits non-zero, writes nothing."""

import re
import subprocess

import numpy as np
import onnx
import pytest
from conftest import flashrt_cli
from onnx import TensorProto, helper, numpy_helper

import flashrt
from flashrt.aot.build import build_engine
from flashrt.errors import BuildError, EngineFormatError, InputError, ModelError
from flashrt.runtime.cuda import pick_cubin_arch
from flashrt.errors import DeviceError


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _save(tmp_path, model, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, p)
    return p


def _cli(*args, cwd=None):
    return subprocess.run(flashrt_cli() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_unsupported_ops_are_all_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Hardmax", ["x"], ["c"], name="hardmax_a"),
             helper.make_node("Hardmax", ["c"], ["c2"], name="hardmax_b"),
             helper.make_node("LpNormalization", ["c2"], ["n"], name="lpnorm"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    path = _save(tmp_path, _model(nodes, [x], [y], [w]))
    out = tmp_path / "out.frt"
    with pytest.raises(ModelError) as e:
        build_engine(str(path), ["thor"], str(out))
    msg = str(e.value)
    assert "Hardmax (nodes: hardmax_a, hardmax_b)" in msg and "LpNormalization (nodes: lpnorm)" in msg
    assert not out.exists()
    line = _one_line_error(_cli("build", path, "-o", out), "unsupported ops", "hardmax_a", "lpnorm")
    assert "Relu" not in line.split("unsupported ops")[1]
    assert not out.exists() and not list(tmp_path.glob(".flashrt-*"))


def test_dynamic_dimension_needs_shapes(samples, tmp_path):
    out = tmp_path / "mlp.frt"
    proc = _cli("build", samples / "mlp.onnx", "-o", out)
    _one_line_error(proc, "input 'x' dimension 0 ('batch') is dynamic", "--shapes x:1x32")
    assert not out.exists()
    assert _cli("build", samples / "mlp.onnx", "-o", out, "--shapes", "x:2x32").returncode == 0
    assert out.exists()
    _one_line_error(_cli("build", samples / "mlp.onnx", "--shapes", "x:2x31"), "dimension 1 = 31", "fixes it to 32")
    _one_line_error(_cli("build", samples / "mlp.onnx", "--shapes", "y:2x32"), "not inputs of the model")
    _one_line_error(_cli("build", samples / "mlp.onnx", "--shapes", "x:2by32"), "NAME:DxDxD")


@pytest.mark.parametrize("case", ["cycle", "dangling", "bad_initializer", "not_onnx"])
def test_malformed_models(tmp_path, case):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    if case == "cycle":
        nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                 helper.make_node("Relu", ["a"], ["b"], name="n2"),
                 helper.make_node("Relu", ["a"], ["y"], name="n3")]
        path, needle = _save(tmp_path, _model(nodes, [x], [y])), "cycle"
    elif case == "dangling":
        nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")]
        path, needle = _save(tmp_path, _model(nodes, [x], [y])), "node 'adder' (Add) reads 'ghost'"
    elif case == "bad_initializer":
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 2], raw_data=np.ones(3, np.float32).tobytes())
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
        path, needle = _save(tmp_path, _model(nodes, [x], [y], [w])), "initializer 'w'"
    else:
        path = tmp_path / "m.onnx"
        path.write_bytes(b"\x00\x01garbage" * 10)
        needle = "not a readable ONNX model"
    with pytest.raises(ModelError, match=re.escape(needle)):
        build_engine(str(path), ["thor"], str(tmp_path / "o.frt"))
    _one_line_error(_cli("build", path, "-o", tmp_path / "o.frt"), needle.split("'")[0])
    assert not (tmp_path / "o.frt").exists()


def test_unknown_target_and_missing_model(tmp_path, samples):
    with pytest.raises(BuildError, match="unknown --target 'pascal'"):
        build_engine(str(samples / "tiny_encoder.onnx"), ["pascal"], str(tmp_path / "x.frt"))
    _one_line_error(_cli("build", tmp_path / "nope.onnx"), "no such model file")


@pytest.fixture(scope="module")
def encoder_engine(samples, tmp_path_factory):
    path = tmp_path_factory.mktemp("e") / "enc.frt"
    build_engine(str(samples / "tiny_encoder.onnx"), ["sm_90a"], str(path))
    return path


def test_run_input_errors(encoder_engine):
    eng = flashrt.load(encoder_engine, device="cpu")
    good = eng.example_inputs()
    with pytest.raises(InputError, match=r"missing input\(s\) \['x'\]"):
        eng.run({})
    with pytest.raises(InputError, match=r"unknown input\(s\) \['z'\]"):
        eng.run({**good, "z": good["x"]})
    with pytest.raises(InputError, match=r"input 'x' has shape \[1, 16, 63\], expected \[1, 16, 64\]"):
        eng.run({"x": np.zeros((1, 16, 63), np.float32)})
    with pytest.raises(InputError, match="input 'x' has dtype float64, expected float32"):
        eng.run({"x": good["x"].astype(np.float64)})


def test_cli_run_input_errors(encoder_engine, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((1, 16, 63), np.float32))
    _one_line_error(_cli("run", encoder_engine, "--device", "cpu", "--inputs", bad), "input 'x' has shape")
    np.savez(bad, y=np.zeros((1, 16, 64), np.float32))
    _one_line_error(_cli("run", encoder_engine, "--device", "cpu", "--inputs", bad), "missing input")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    _one_line_error(_cli("run", encoder_engine, "--device", "cpu", "--inputs", tmp_path / "junk.npz"), "junk.npz")


def test_bad_engine_files(encoder_engine, tmp_path):
    data = encoder_engine.read_bytes()
    cases = {"not_engine.frt": b"hello world, not an engine at all" * 4, "truncated.frt": data[: len(data) // 2],
             "corrupt.frt": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]}
    needles = {"not_engine.frt": "not a FlashRT engine", "truncated.frt": "truncated",
               "corrupt.frt": "checksum mismatch"}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(EngineFormatError, match=needles[name]):
            flashrt.load(p, device="cpu")
        _one_line_error(_cli("run", p, "--device", "cpu"), name, needles[name])
        _one_line_error(_cli("inspect", p), needles[name])
    _one_line_error(_cli("inspect", tmp_path / "missing.frt"), "missing.frt", "cannot read engine file")


def test_no_cubin_for_this_gpu_names_arch_and_fix():
    with pytest.raises(DeviceError, match=r"this GPU is sm_90, but the engine has cubins only for sm_110a, sm_120a; "
                                          r"rebuild with --target sm_90a"):
        pick_cubin_arch(["sm_110a", "sm_120a"], 9, 0)
    assert pick_cubin_arch(["sm_110a", "sm_90a"], 9, 0) == "sm_90a"


def test_missing_nvcc_says_how_to_get_one(monkeypatch, samples, tmp_path):
    from flashrt.aot import codegen

    codegen.find_toolchain.cache_clear()
    monkeypatch.delenv("FLASHRT_NVCC", raising=False)
    monkeypatch.setattr(codegen.shutil, "which", lambda name: None)
    monkeypatch.setattr(codegen, "_wheel_nvcc", lambda: None)
    try:
        with pytest.raises(BuildError, match=r"no nvcc found: install the CUDA compiler wheels with pip install"):
            build_engine(str(samples / "tiny_encoder.onnx"), ["thor"], str(tmp_path / "x.frt"))
        assert not (tmp_path / "x.frt").exists()
    finally:
        codegen.find_toolchain.cache_clear()


def test_cpu_executor_rejects_a_lying_manifest(encoder_engine, tmp_path):
    """A manifest whose kernel params ask for more memory than the relocation grants: an EngineFormatError,
    never an out-of-bounds read."""
    import json

    from flashrt.engine_format.reader import read_engine
    from flashrt.engine_format.writer import engine_bytes

    ef = read_engine(encoder_engine)
    manifest = json.loads(json.dumps(ef.manifest))
    gemm = next(k for k in manifest["kernels"] if k["family"] == "gemm")
    gemm["params"]["K"] *= 64
    gemm["params"]["a"]["k"] = [[gemm["params"]["K"], 1]]
    cubins = {t: ef.cubin(t) for t in ef.targets}
    data = engine_bytes(manifest, cubins, bytes(ef.weights()), ef.launches, ef.relocations, ef.arguments())
    eng = flashrt.load(_write(tmp_path / "lie.frt", data), device="cpu")
    with pytest.raises(EngineFormatError, match="relocation grants"):
        eng.run(eng.example_inputs())


def _write(path, data):
    path.write_bytes(data)
    return path
