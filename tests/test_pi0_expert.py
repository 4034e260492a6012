"""The pi0 action-expert family (aot/importers/pi0_expert.py): a lerobot-named checkpoint with random weights
(samples/pi0.py), `--denoise-steps N` in one engine, against transformers' Gemma decoder layers driven the way
lerobot's PI0FlowMatching samples actions (the suffix of state + action tokens over the prefix's KV cache, the
block mask that hides the actions from the state token, N Euler steps)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import GPU_ARCH, ROOT, flashrt_cli, requires_gpu

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine
from flashrt.errors import FlashRTError

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "samples"))
import pi0  # noqa: E402

C = pi0.CONFIGS["ci"]
P = C["prefix"]
SHAPES = {"prefix_keys": (C["expert"]["num_hidden_layers"], 1, P, C["expert"]["head_dim"])}


def _make(tmp_path, seed: int = 0):
    model = pi0.make_model("ci", seed)
    return pi0.save_checkpoint(model, tmp_path / "pi0"), model


def _feeds(seed: int = 1) -> dict:
    return pi0.example_inputs(pi0.make_model("ci"), seed)


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("precision, steps, tol", [("fp32", None, 1e-4), ("fp32", 5, 1e-4), ("bf16", 3, 0.999)])
def test_denoise_steps_match_transformers(tmp_path, precision, steps, tol):
    folder, model = _make(tmp_path)
    out = tmp_path / "pi0.frt"
    build_engine(str(folder), ["sm_90a"], str(out), SHAPES, precision, denoise_steps=steps)
    eng = flashrt.load(out, device="cpu")
    feeds = _feeds()
    got = eng.run(feeds)["actions"]
    ref = pi0.reference(model, feeds, steps or C["num_steps"])
    assert got.shape == ref.shape == (1, C["chunk_size"], C["max_action_dim"])
    if precision == "fp32":
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    else:
        assert _cosine(got - feeds["noise"], ref - feeds["noise"]) >= tol  # the flow's displacement
    assert not np.allclose(ref, feeds["noise"], atol=1e-2)  # the steps moved the chunk


def test_step_invariant_work_is_built_once(tmp_path):
    """The state token's pass is shared by every step: each extra step adds the action rows' launches only,
    and the engine is one launch list."""
    folder, *_ = _make(tmp_path)
    launches = {}
    for steps in (1, 2, 4):
        out = tmp_path / f"pi0_{steps}.frt"
        build_engine(str(folder), ["sm_90a"], str(out), SHAPES, "bf16", denoise_steps=steps)
        launches[steps] = len(read_engine(out).launches)
    per_step = launches[2] - launches[1]
    assert launches[4] - launches[2] == 2 * per_step
    assert launches[1] - per_step > 0  # the state token's layers: built once, outside the steps
    # per step and layer: norm+QKV, attention, o-proj + residual, norm + gated MLP, down + residual (+ RoPE, and
    # the K/V concat where attention does not read the prefix in place); plus the in/out projections
    L = C["expert"]["num_hidden_layers"]
    assert per_step <= 8 * L + 6, launches


@pytest.mark.parametrize("args, msg", [
    ([], "input 'prefix_keys' needs the prefix length"),
    (["--shapes", "prefix_keys:2x1x11x16"], "expected 2x1xPx32"),
    (["--shapes", "prefix_keys:2x1x11x32,noise:1x4x6"], "--shapes noise:1x4x6 differs from the config's 1x8x6"),
    (["--shapes", "prefix_keys:2x1x11x32", "--denoise-steps", "0"], "--denoise-steps 0: expected at least 1"),
])
def test_bad_input_is_named(tmp_path, args, msg):
    folder, *_ = _make(tmp_path)
    proc = subprocess.run(flashrt_cli() + ["build", str(folder), "-t", "sm_90a", "-o", str(tmp_path / "x.frt"),
                                           *args], capture_output=True, text=True)
    assert proc.returncode != 0 and msg in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.frt").exists()


def test_denoise_steps_rejected_elsewhere(tmp_path):
    folder, *_ = _make(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(FlashRTError, match="--denoise-steps applies to safetensors pi0 checkpoints"):
        build_engine(str(tmp_path / "m.onnx"), ["sm_90a"], None, None, "fp32", denoise_steps=2)
    (folder / "config.json").write_text(json.dumps({**cfg, "type": None, "model_type": "gemma"}))
    with pytest.raises(FlashRTError, match="--denoise-steps applies to the pi0 action-expert family"):
        build_engine(str(folder), ["sm_90a"], None, {"input_ids": (1, 4)}, "fp32", denoise_steps=2)


@requires_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_engine_matches_its_cpu_reference(tmp_path, precision):
    """The same engine on the GPU and on the CPU reference executor (RoPE's rotated loads, the prefix K/V
    read in place by attention, the unrolled steps in one CUDA graph)."""
    folder, model = _make(tmp_path)
    out = tmp_path / "pi0.frt"
    build_engine(str(folder), [GPU_ARCH], str(out), SHAPES, precision, denoise_steps=4)
    feeds = _feeds(3)
    cpu = flashrt.load(out, device="cpu").run(feeds)["actions"]
    gpu = flashrt.load(out, device="cuda").run(feeds)["actions"]
    assert _cosine(gpu - feeds["noise"], cpu - feeds["noise"]) >= 0.9999
    if precision == "bf16":
        ref = pi0.reference(model, feeds, 4)
        assert _cosine(gpu - feeds["noise"], ref - feeds["noise"]) >= 0.999


def test_cli_runs_a_chunk_and_reports_chunks_per_second(tmp_path):
    folder, *_ = _make(tmp_path)
    out = tmp_path / "pi0.frt"
    build = subprocess.run(flashrt_cli() + ["build", str(folder), "-t", "sm_90a", "-o", str(out), "--denoise-steps",
                                            "2", "--shapes", "prefix_keys:2x1x11x32"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert read_engine(out).manifest["provenance"]["loop_steps"] == 2
    proc = subprocess.run(flashrt_cli() + ["run", str(out), "--device", "cpu", "--steps", "2"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "chunks/s (2 steps per chunk)" in proc.stdout and "actions: float32[1, 8, 6]" in proc.stdout, proc.stdout


@pytest.mark.parametrize("steps", [1, 3])
def test_static_torch_baseline_matches_the_reference(steps):
    """benchmarks/pi0_bench.py's torch.compile baseline (pi0.Pi0ExpertStatic: the same chunk in plain torch ops at
    fixed shapes) computes what transformers' layers driven lerobot's way compute, in float32 on the CPU."""
    import torch

    model = pi0.make_model("ci")
    t = {k: torch.from_numpy(v) for k, v in _feeds().items()}
    want = pi0.reference(model, _feeds(), steps)
    with torch.no_grad():
        got = pi0.Pi0ExpertStatic(model)(t["state"], t["noise"], t["prefix_keys"], t["prefix_values"],
                                         pi0.step_embeddings(model, steps)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
