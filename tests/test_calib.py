"""--calib: static per-tensor FP8 activation scales from representative inputs (amax / 448 of every GEMM's
activation operand), inserted as fused fake quantization; bad calibration files are named errors."""

import numpy as np
import pytest
from conftest import ROOT, onnxruntime_outputs

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine
from flashrt.errors import ModelError

ENCODER = ROOT / "samples" / "tiny_encoder.onnx"


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ln1_amax(tmp_path, samples) -> float:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(ENCODER))
    m.graph.output.append(onnx.helper.make_tensor_value_info("block0.ln1_3", onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(tmp_path / "probe.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    return max(float(np.abs(sess.run(["block0.ln1_3"], {"x": s})[0]).max()) for s in samples)


def test_calibrated_fp8_activations(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((3, 1, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=samples)
    out = tmp_path / "enc.frt"
    # a loose cosine target: the sensitivity planner (aot/sensitivity.py) quantizes every activation
    build_engine(str(ENCODER), ["sm_90a"], str(out), None, "fp8", calib=str(tmp_path / "calib.npz"), min_cosine=0.5)
    engine = read_engine(out)
    manifest = engine.manifest
    quantized = [r for r in manifest["regions"] if "FakeQuantFP8" in r["ops"]]
    assert len(quantized) >= 3  # each applied by its GEMMs to their A operand (static scale)
    assert all(manifest["kernels"][r["kernel"]]["params"]["aq"] == "tensor" for r in quantized)
    # the first GEMMs (Q, K, V) read the first LayerNorm's output: its scale is that value's amax / 448 over the
    # samples, as onnxruntime computes it
    first_ln = ln1_amax(tmp_path, samples)
    blob = engine.weights().tobytes()
    scales = [float(np.frombuffer(blob, np.float32, 1, w["offset"])[0]) for w in manifest["weights"]
              if w["name"].endswith("/fp8_scale")]
    assert any(abs(s - first_ln / 448) <= 1e-6 * first_ln / 448 for s in scales), (first_ln / 448, scales)
    eng = flashrt.load(out, device="cpu")
    feeds = {"x": samples[1]}
    ref = onnxruntime_outputs(ENCODER, feeds)
    got = eng.run(feeds)
    for name in ref:  # FP8 weights and activations: 0.99876 on "hidden" (the weight-only fp8 engine: 0.9996)
        assert cosine(got[name], ref[name]) >= 0.998, name
    # and the activations really are quantized: the engine differs from the weight-only fp8 engine
    plain = tmp_path / "plain.frt"
    build_engine(str(ENCODER), ["sm_90a"], str(plain), None, "fp8")
    assert not np.array_equal(flashrt.load(plain, device="cpu").run(feeds)["hidden"], got["hidden"])


@pytest.mark.parametrize("arrays, match", [
    ({"y": np.zeros((1, 16, 64), np.float32)}, r"\['y'\] are not inputs of the model"),
    ({}, r"input 'x' is missing; expected float32 \[1, 16, 64\]"),
    ({"x": np.zeros((1, 16, 32), np.float32)}, r"input 'x' has shape \[1, 16, 32\]; expected float32 \[1, 16, 64\]"),
    ({"x": np.zeros((1, 16, 64), np.float64)}, r"input 'x' is float64; expected float32"),
])
def test_bad_calibration_files_are_named(tmp_path, arrays, match):
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(ModelError, match=match):
        build_engine(str(ENCODER), ["sm_90a"], str(tmp_path / "e.frt"), None, "fp8", calib=str(tmp_path / "calib.npz"))
    assert not (tmp_path / "e.frt").exists()


def test_calib_needs_a_quantized_precision(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((1, 16, 64), np.float32))
    with pytest.raises(ModelError, match="--calib .* --precision fp8, nvfp4 or auto"):
        build_engine(str(ENCODER), ["sm_90a"], str(tmp_path / "e.frt"), None, "bf16", calib=str(tmp_path / "calib.npz"))


def test_cli_calib_option(tmp_path):
    from click.testing import CliRunner

    from flashrt.cli.main import cli

    np.savez(tmp_path / "calib.npz", x=np.ones((1, 16, 64), np.float32))
    res = CliRunner().invoke(cli, ["build", str(ENCODER), "-t", "sm_90a", "-o", str(tmp_path / "e.frt"),
                                   "--precision", "fp8", "--calib", str(tmp_path / "calib.npz")])
    assert res.exit_code == 0, res.output
    assert any("FakeQuantFP8" in r["ops"] for r in read_engine(tmp_path / "e.frt").manifest["regions"])
