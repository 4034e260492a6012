"""A pi0-like vision-language-action model in plain PyTorch (fp32, seeded random weights) as one stateless ONNX
graph: images [1, cameras, 3, H, W], prompt_ids [1, 48] (int64), noise [1, 50, 32] -> actions [1, 50, 32].

  vision   SigLIP-so400m-shaped tower, run per camera (pi0 loops over its cameras): patch-14 Conv, learned
           position embedding, pre-LayerNorm blocks (eps 1e-6) with biased q/k/v/o and a GELU-tanh MLP,
           post-LayerNorm, then a linear projector to the prefix width
  prefix   Gemma-2B-shaped: token embedding scaled by sqrt(hidden) after the image tokens, RMSNorm (1 + w), RoPE
           (theta 10000) at positions 0..S-1, bidirectional attention with one KV head, GeGLU (gelu tanh) MLP;
           each layer's K (after RoPE) and V are kept for the expert
  expert   Gemma-300M-shaped action expert: action_in_proj, pi0's sinusoidal time embedding concatenated with the
           action embedding -> action_time_mlp (swish), then layers whose 50 action tokens attend to
           [the same layer's prefix K/V; their own K/V at positions S..S+49], bidirectionally; action_out_proj
  flow     10 Euler steps written as a Python loop (the export unrolls it): dt = -1/10, t = 1, 0.9, ..., 0.1,
           x <- x + dt * v(x, t) from x = noise; the prefix runs once, before the loop

CONFIGS["full"] has pi0's shapes (3 cameras at 224 px -> 768 image tokens + 48 prompt tokens = 816; vision 27 x 1152,
16 heads of 72, MLP 4304; prefix vocab 257152, 18 x 2048, 8 heads, 1 KV head, head dim 256, MLP 16384; expert
18 x 1024, 8 heads, 1 KV head, head dim 256, MLP 4096; 3.3 B parameters, the ONNX weights in a .data file beside
it); CONFIGS["ci"] two layers per stack, narrow widths, the same head dims and KV structure.

Weights: Linear/Conv N(0, 1/fan_in) (unit-scale activations at any width), biases and the vision position
embedding N(0, 0.1^2), the token embedding N(0, 1/hidden) (unit scale after the sqrt(hidden) factor), LayerNorm
1 + N(0, 0.1^2) / N(0, 0.1^2), Gemma RMSNorm w ~ N(0, 0.1^2) (used as 1 + w).

  python samples/vla.py --scale ci --out /tmp/vla --check cpu --precision fp32 bf16 fp8 --split-launches

prints a JSON line per precision: cosine and rel-L2 of the actions to the PyTorch reference, the same for the
flow's displacement (actions - noise, the part the model computes), and the engine's launches; --split-launches
adds the launches of the prefix and of each denoise step (from engines of the same model with 1 and 2 flow steps).
"""

import argparse
import contextlib
import io
import json
import math
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from decoder import cosine, save_external

VISION_FULL = dict(layers=27, hidden=1152, heads=16, mlp=4304)
PREFIX_FULL = dict(vocab=257152, layers=18, hidden=2048, heads=8, kv_heads=1, head_dim=256, mlp=16384)
EXPERT_FULL = dict(layers=18, hidden=1024, heads=8, kv_heads=1, head_dim=256, mlp=4096)
CONFIGS = {
    "full": dict(cameras=3, image=224, patch=14, prompt=48, horizon=50, action_dim=32, steps=10,
                 vision=VISION_FULL, prefix=PREFIX_FULL, expert=EXPERT_FULL),
    "ci": dict(cameras=2, image=56, patch=14, prompt=48, horizon=50, action_dim=32, steps=10,
               vision=dict(layers=2, hidden=144, heads=2, mlp=304),
               prefix=dict(vocab=512, layers=2, hidden=256, heads=2, kv_heads=1, head_dim=256, mlp=1024),
               expert=dict(layers=2, hidden=128, heads=2, kv_heads=1, head_dim=256, mlp=512)),
}
SEED = 0
OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30
LN_EPS, RMS_EPS, THETA = 1e-6, 1e-6, 10000.0


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax(q k^T / sqrt(d)) v over [1, heads, *, d]; fewer KV heads are repeated (expand +
    reshape, transformers' repeat_kv). Returns [1, tokens, heads * d]."""
    B, H, T, D = q.shape
    kv, S = k.shape[1], k.shape[2]
    if kv != H:
        k = k[:, :, None].expand(B, kv, H // kv, S, D).reshape(B, H, S, D)
        v = v[:, :, None].expand(B, kv, H // kv, S, D).reshape(B, H, S, D)
    s = torch.matmul(q, k.transpose(2, 3)) * (D ** -0.5)
    return torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(B, T, H * D)


class SiglipLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d = c["hidden"]
        self.heads = c["heads"]
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(d, eps=LN_EPS)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, c["mlp"]), nn.Linear(c["mlp"], d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        y = self.norm1(x)
        q, k, v = (p(y).view(B, T, self.heads, D // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(attention(q, k, v))
        return x + self.fc2(gelu_tanh(self.fc1(self.norm2(x))))


class Vision(nn.Module):
    """One camera [1, 3, H, W] -> [1, (H/patch)^2, prefix hidden]."""

    def __init__(self, c: dict, out_dim: int):
        super().__init__()
        v, n = c["vision"], (c["image"] // c["patch"]) ** 2
        self.patch = nn.Conv2d(3, v["hidden"], c["patch"], stride=c["patch"])
        self.position = nn.Parameter(torch.zeros(1, n, v["hidden"]))
        self.layers = nn.ModuleList(SiglipLayer(v) for _ in range(v["layers"]))
        self.post_norm = nn.LayerNorm(v["hidden"], eps=LN_EPS)
        self.projector = nn.Linear(v["hidden"], out_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch(image).flatten(2).transpose(1, 2) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.projector(self.post_norm(x))


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * (1.0 + self.weight)


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-ops at fp32 (and in the export)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class GemmaLayer(nn.Module):
    """A Gemma block; forward(x, cos, sin, prefix_kv) attends to cat(prefix K/V, own K/V) and also returns its
    own K (after RoPE) and V."""

    def __init__(self, c: dict):
        super().__init__()
        d, self.h, self.kv, self.hd = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"]
        self.input_norm, self.post_norm = GemmaRMSNorm(d), GemmaRMSNorm(d)
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)
        self.gate, self.up = nn.Linear(d, c["mlp"], bias=False), nn.Linear(d, c["mlp"], bias=False)
        self.down = nn.Linear(c["mlp"], d, bias=False)

    def forward(self, x, cos, sin, prefix_kv=None):
        B, T, _ = x.shape
        y = self.input_norm(x)
        q = rope(self.q_proj(y).view(B, T, self.h, self.hd).transpose(1, 2), cos, sin)
        k = rope(self.k_proj(y).view(B, T, self.kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v_proj(y).view(B, T, self.kv, self.hd).transpose(1, 2)
        keys, values = (k, v) if prefix_kv is None else (torch.cat([prefix_kv[0], k], 2),
                                                         torch.cat([prefix_kv[1], v], 2))
        x = x + self.o_proj(attention(q, keys, values))
        y = self.post_norm(x)
        return x + self.down(gelu_tanh(self.gate(y)) * self.up(y)), (k, v)


def time_embedding(t: float, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """pi0's sinusoidal embedding of the flow time: [1, dim] = [sin(2 pi t / period), cos(...)]."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period * t).float()[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class VLA(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        p, e = c["prefix"], c["expert"]
        if p["head_dim"] != e["head_dim"] or p["kv_heads"] != e["kv_heads"] or p["layers"] != e["layers"]:
            raise ValueError("the expert attends to the prefix's K/V: head_dim, kv_heads and layers must match")
        self.vision = Vision(c, p["hidden"])
        self.embed = nn.Embedding(p["vocab"], p["hidden"])
        self.prefix = nn.ModuleList(GemmaLayer(p) for _ in range(p["layers"]))
        self.expert = nn.ModuleList(GemmaLayer(e) for _ in range(e["layers"]))
        self.expert_norm = GemmaRMSNorm(e["hidden"])
        self.action_in_proj = nn.Linear(c["action_dim"], e["hidden"])
        self.action_time_mlp_in = nn.Linear(2 * e["hidden"], e["hidden"])
        self.action_time_mlp_out = nn.Linear(e["hidden"], e["hidden"])
        self.action_out_proj = nn.Linear(e["hidden"], c["action_dim"])

    def prefix_tokens(self) -> int:
        return self.c["cameras"] * (self.c["image"] // self.c["patch"]) ** 2 + self.c["prompt"]

    def prefix_kv(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> list:
        """Each prefix layer's (K after RoPE, V) over [image tokens of every camera; prompt tokens]."""
        cams = [self.vision(images[:, i]) for i in range(images.shape[1])]
        x = torch.cat([*cams, self.embed(prompt_ids) * math.sqrt(self.c["prefix"]["hidden"])], dim=1)
        cos, sin = rope_tables(torch.arange(x.shape[1], device=x.device), self.c["prefix"]["head_dim"])
        kvs = []
        for layer in self.prefix:
            x, kv = layer(x, cos, sin)
            kvs.append(kv)
        return kvs

    def velocity(self, x: torch.Tensor, t: float, kvs: list, cos, sin) -> torch.Tensor:
        e = self.c["expert"]["hidden"]
        time = time_embedding(t, e).to(x.device, x.dtype)[:, None].expand(1, x.shape[1], e)
        h = self.action_time_mlp_in(torch.cat([self.action_in_proj(x), time], dim=-1))
        h = self.action_time_mlp_out(F.silu(h))
        for layer, kv in zip(self.expert, kvs):
            h, _ = layer(h, cos, sin, kv)
        return self.action_out_proj(self.expert_norm(h))

    def forward(self, images: torch.Tensor, prompt_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        kvs = self.prefix_kv(images, prompt_ids)
        S, H = self.prefix_tokens(), noise.shape[1]
        cos, sin = rope_tables(torch.arange(S, S + H, device=noise.device), self.c["expert"]["head_dim"])
        steps = self.c["steps"]
        dt, x = -1.0 / steps, noise
        for i in range(steps):
            x = x + dt * self.velocity(x, 1.0 + i * dt, kvs, cos, sin)
        return x


def make_model(scale: str = "ci", seed: int = SEED, steps: int | None = None) -> VLA:
    """The VLA (eval, fp32) with the seeded weights of the module docstring; `steps` overrides the number of
    flow steps (the weights do not depend on it)."""
    torch.manual_seed(seed)
    model = VLA(dict(CONFIGS[scale], **({} if steps is None else {"steps": steps}))).eval()
    g = torch.Generator().manual_seed(seed)
    mods = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            m, noise = mods[id(p)], torch.randn(p.shape, generator=g)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith("weight"):
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif isinstance(m, nn.Embedding):
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif isinstance(m, nn.LayerNorm) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:  # biases, LayerNorm bias, position embedding, Gemma RMSNorm w (used as 1 + w)
                p.copy_(0.1 * noise)
    return model


def example_inputs(model: VLA, seed: int = SEED) -> dict[str, torch.Tensor]:
    c, g = model.c, torch.Generator().manual_seed(seed + 1)
    return {"images": torch.rand(1, c["cameras"], 3, c["image"], c["image"], generator=g) * 2 - 1,
            "prompt_ids": torch.randint(0, c["prefix"]["vocab"], (1, c["prompt"]), generator=g),
            "noise": torch.randn(1, c["horizon"], c["action_dim"], generator=g)}


@torch.no_grad()
def reference(model: VLA, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The actions [1, horizon, action_dim] of the PyTorch fp32 module."""
    return model(inputs["images"], inputs["prompt_ids"], inputs["noise"]).numpy()


def export_onnx(model: VLA, path: str, inputs: dict[str, torch.Tensor] | None = None) -> str:
    """Legacy exporter, opset 17, constants folded; the weights go to path + '.data' past 1 GiB."""
    inputs = inputs or example_inputs(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    target = os.path.join(tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path))), "model.onnx") if big \
        else path
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (inputs["images"], inputs["prompt_ids"], inputs["noise"]), target, dynamo=False,
                          opset_version=OPSET, input_names=["images", "prompt_ids", "noise"],
                          output_names=["actions"], do_constant_folding=True)
    if big:
        save_external(target, path)
    return path


def engine_launches(path: str) -> int:
    """The number of kernel launches in an engine's launch list (its manifest's regions)."""
    from flashrt.engine_format.reader import read_engine

    with open(path, "rb") as f:
        manifest = read_engine(f.read()).manifest
    return sum(len(r["launches"]) for r in manifest["regions"])


def launches_per_step(scale: str, out: str, precision: str = "fp32", target: str = "sm_90a") -> dict:
    """Launches of the engines of the same model with 1 and 2 flow steps: the prefix's (run once) and each
    denoise step's, from L(steps) = prefix + steps * per_step."""
    from flashrt.aot.build import build_engine

    counts = []
    for steps in (1, 2):
        model = make_model(scale, steps=steps)
        path = export_onnx(model, os.path.join(out, f"vla_{scale}_steps{steps}.onnx"))
        counts.append(build_engine(path, [target], path[:-5] + f"_{precision}.frt", None, precision).launches)
    return {"prefix": 2 * counts[0] - counts[1], "per_step": counts[1] - counts[0]}


def metrics(got: np.ndarray, ref: np.ndarray, noise: np.ndarray) -> dict:
    def rel(a, b):
        return float(np.linalg.norm(np.float64(a) - b) / max(np.linalg.norm(np.float64(b)), 1e-30))

    return {"cosine": cosine(got, ref), "rel_l2": rel(got, ref), "flow_cosine": cosine(got - noise, ref - noise),
            "flow_rel_l2": rel(got - noise, ref - noise), "finite": bool(np.isfinite(got).all())}


def check(scale: str, out: str, device: str, precisions, target: str = "sm_90a", split: bool = False) -> list[dict]:
    """Export, build each precision, run on `device` and compare the actions with the reference; with `split`,
    also count the prefix's and each denoise step's launches (two more exports and builds)."""
    import flashrt
    from flashrt.aot.build import build_engine

    model = make_model(scale)
    inputs = example_inputs(model)
    ref = reference(model, inputs)
    path = export_onnx(model, os.path.join(out, f"vla_{scale}.onnx"), inputs)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    rows = []
    for precision in precisions:
        row = {"model": "vla", "scale": scale, "precision": precision, "device": device}
        t = time.perf_counter()
        r = build_engine(path, [target], os.path.join(out, f"vla_{scale}_{precision}.frt"), None, precision)
        row.update(build_s=round(time.perf_counter() - t, 1), launches=r.launches)
        engine = flashrt.load(r.path, device=device)
        t = time.perf_counter()
        got = engine.run(feeds)["actions"]
        row["run_s"] = round(time.perf_counter() - t, 3)
        row.update(metrics(got, ref, feeds["noise"]))
        if split and precision == precisions[0]:
            split = launches_per_step(scale, out, precision, target)
            row.update(prefix_launches=split["prefix"], launches_per_step=split["per_step"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(CONFIGS), default="ci")
    ap.add_argument("--out", required=True, help="folder for the ONNX export and the engines")
    ap.add_argument("--check", choices=["cpu", "cuda"], help="build with flashrt and compare with the reference")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16", "fp8"])
    ap.add_argument("--target", default="sm_90a")
    ap.add_argument("--split-launches", action="store_true",
                    help="with --check: also count the prefix's and each denoise step's launches")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.check:
        check(a.scale, a.out, a.check, a.precision, a.target, a.split_launches)
    else:
        print(export_onnx(make_model(a.scale), os.path.join(a.out, f"vla_{a.scale}.onnx")))


if __name__ == "__main__":
    main()
