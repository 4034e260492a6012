"""The pi0 action-expert family (aot/importers/pi0_expert.py): a lerobot-named checkpoint with random weights,
`--denoise-steps N` in one engine, against transformers' Gemma decoder layers driven the way lerobot's
PI0FlowMatching samples actions (the suffix of state + action tokens over the prefix's KV cache, the block mask
that hides the actions from the state token, N Euler steps)."""

import inspect
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from conftest import GPU_ARCH, flashrt_cli, requires_gpu
from safetensors.numpy import save_file

import flashrt
from flashrt.aot.build import build_engine
from flashrt.engine_format.reader import read_engine
from flashrt.errors import FlashRTError

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, GemmaConfig  # noqa: E402
from transformers.models.gemma.modeling_gemma import (  # noqa: E402
    GemmaDecoderLayer, GemmaModel, GemmaRotaryEmbedding)

# the decoder layer's KV-cache argument: `cache` in transformers 5.x, `past_key_values` / `past_key_value` before
CACHE_ARG = next(n for n in ("cache", "past_key_values", "past_key_value")
                 if n in inspect.signature(GemmaDecoderLayer.forward).parameters)
EXPERT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")
POLICY = dict(type="pi0", chunk_size=8, max_state_dim=5, max_action_dim=6, num_steps=3, proj_width=64,
              gemma_expert_config=EXPERT)
P = 11  # prefix tokens


def _make(tmp_path, seed: int = 0):
    """A checkpoint folder (lerobot's tensor names under "model.") and the modules for the reference."""
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=16, **EXPERT)
    cfg._attn_implementation = "eager"
    expert = GemmaModel(cfg).eval()
    W, A, S = POLICY["proj_width"], POLICY["max_action_dim"], POLICY["max_state_dim"]
    proj = torch.nn.ModuleDict({"state_proj": torch.nn.Linear(S, W), "action_in_proj": torch.nn.Linear(A, W),
                                "action_out_proj": torch.nn.Linear(W, A),
                                "action_time_mlp_in": torch.nn.Linear(2 * W, W),
                                "action_time_mlp_out": torch.nn.Linear(W, W)})
    with torch.no_grad():  # unit-scale activations: N(0, 1/fan_in) weights, norms 1 + N(0, 0.1^2)
        for name, p in list(expert.named_parameters()) + list(proj.named_parameters()):
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)
            elif p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, 0.1)
    tensors = {f"model.paligemma_with_expert.gemma_expert.model.{k}": v.numpy()
               for k, v in expert.state_dict().items()}
    tensors.update({f"model.{k}": v.detach().numpy() for k, v in proj.state_dict().items()})
    folder = tmp_path / "pi0"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(POLICY))
    return folder, expert, proj, cfg


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:  # lerobot's create_sinusoidal_pos_embedding
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    x = (1.0 / period * 2 * math.pi)[None, :] * t.double()[:, None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=1).float()


@torch.no_grad()
def _reference(expert, proj, cfg, feeds: dict, steps: int) -> np.ndarray:
    """lerobot's sample_actions with a prefix KV cache, on transformers' Gemma layers (fp32)."""
    H = POLICY["chunk_size"]
    state, x = torch.from_numpy(feeds["state"]), torch.from_numpy(feeds["noise"]).clone()
    pk, pv = torch.from_numpy(feeds["prefix_keys"]), torch.from_numpy(feeds["prefix_values"])
    rotary = GemmaRotaryEmbedding(cfg)
    T = 1 + H
    pos = torch.arange(P, P + T)[None]
    mask = torch.zeros(1, 1, T, P + T)
    mask[0, 0, 0, P + 1:] = float("-inf")  # the state token does not see the action tokens
    dt, t = -1.0 / steps, torch.tensor(1.0)
    while t >= -dt / 2:
        a = proj["action_in_proj"](x)
        te = _time_embedding(t[None], a.shape[-1])[:, None].expand(1, H, -1)
        a = proj["action_time_mlp_out"](torch.nn.functional.silu(proj["action_time_mlp_in"](torch.cat([a, te], 2))))
        h = torch.cat([proj["state_proj"](state)[:, None], a], 1)
        cache = DynamicCache(config=cfg) if "config" in inspect.signature(DynamicCache).parameters else DynamicCache()
        for i in range(cfg.num_hidden_layers):
            cache.update(pk[i][None], pv[i][None], i)
        cos_sin = rotary(h, pos)
        for layer in expert.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, **{CACHE_ARG: cache})
            h = h[0] if isinstance(h, tuple) else h
        v = proj["action_out_proj"](expert.norm(h)[:, -H:])
        x += dt * v
        t += dt
    return x.numpy()


def _feeds(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    L, kv, d = EXPERT["num_hidden_layers"], EXPERT["num_key_value_heads"], EXPERT["head_dim"]
    return {"state": rng.standard_normal((1, POLICY["max_state_dim"])).astype(np.float32),
            "noise": rng.standard_normal((1, POLICY["chunk_size"], POLICY["max_action_dim"])).astype(np.float32),
            "prefix_keys": rng.standard_normal((L, kv, P, d)).astype(np.float32),
            "prefix_values": rng.standard_normal((L, kv, P, d)).astype(np.float32)}


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


SHAPES = {"prefix_keys": (2, 1, P, 32)}


@pytest.mark.parametrize("precision, steps, tol", [("fp32", None, 1e-4), ("fp32", 5, 1e-4), ("bf16", 3, 0.999)])
def test_denoise_steps_match_transformers(tmp_path, precision, steps, tol):
    folder, expert, proj, cfg = _make(tmp_path)
    out = tmp_path / "pi0.frt"
    build_engine(str(folder), ["sm_90a"], str(out), SHAPES, precision, denoise_steps=steps)
    eng = flashrt.load(out, device="cpu")
    feeds = _feeds()
    got = eng.run(feeds)["actions"]
    ref = _reference(expert, proj, cfg, feeds, steps or POLICY["num_steps"])
    assert got.shape == ref.shape == (1, POLICY["chunk_size"], POLICY["max_action_dim"])
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
    L = EXPERT["num_hidden_layers"]
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
    with pytest.raises(FlashRTError, match="--denoise-steps applies to safetensors pi0 checkpoints"):
        build_engine(str(tmp_path / "m.onnx"), ["sm_90a"], None, None, "fp32", denoise_steps=2) \
            if (tmp_path / "m.onnx").write_bytes(b"x") else None
    (folder / "config.json").write_text(json.dumps({**cfg, "type": None, "model_type": "gemma"}))
    with pytest.raises(FlashRTError, match="--denoise-steps applies to the pi0 action-expert family"):
        build_engine(str(folder), ["sm_90a"], None, {"input_ids": (1, 4)}, "fp32", denoise_steps=2)


@requires_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_engine_matches_its_cpu_reference(tmp_path, precision):
    """The same engine on the GPU and on the CPU reference executor (RoPE's rotated loads, the prefix K/V
    read in place by attention, the unrolled steps in one CUDA graph)."""
    folder, expert, proj, cfg = _make(tmp_path)
    out = tmp_path / "pi0.frt"
    build_engine(str(folder), [GPU_ARCH], str(out), SHAPES, precision, denoise_steps=4)
    feeds = _feeds(3)
    cpu = flashrt.load(out, device="cpu").run(feeds)["actions"]
    gpu = flashrt.load(out, device="cuda").run(feeds)["actions"]
    assert _cosine(gpu - feeds["noise"], cpu - feeds["noise"]) >= 0.9999
    if precision == "bf16":
        ref = _reference(expert, proj, cfg, feeds, 4)
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
