"""A pi0 action-expert checkpoint with random weights (lerobot's "type": "pi0" config and tensor names) and its
PyTorch reference, for tests/test_pi0_expert.py and benchmarks/pi0_bench.py.

The reference is lerobot's PI0FlowMatching.sample_actions over a prefix KV cache, on transformers' Gemma
decoder layers: the suffix is [state token; action tokens], the state token does not see the action tokens,
the actions see everything, N Euler steps from t = 1 with dt = -1/N.

  CONFIGS["ci"]    hidden 64, 2 layers, 4 heads over 1 KV head, head dim 32; chunk 8 x 6; an 11-token prefix
  CONFIGS["full"]  pi0's Gemma-300M expert: hidden 1024, 18 layers, 8 heads over 1 KV head, head dim 256, MLP
                   4096; a 50 x 32 chunk, 32-dim state; an 816-token prefix (3 cameras x 256 + 48 prompt)"""

import inspect
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import DynamicCache, GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaModel, GemmaRotaryEmbedding

CONFIGS = {
    "ci": dict(expert=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=32), chunk_size=8, max_state_dim=5, max_action_dim=6,
               num_steps=3, prefix=11),
    "full": dict(expert=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=8,
                             num_key_value_heads=1, head_dim=256), chunk_size=50, max_state_dim=32,
                 max_action_dim=32, num_steps=10, prefix=816),
}
# the decoder layer's KV-cache argument: `cache` in transformers 5.x, `past_key_values` / `past_key_value` before
CACHE_ARG = next(n for n in ("cache", "past_key_values", "past_key_value")
                 if n in inspect.signature(GemmaDecoderLayer.forward).parameters)


class Pi0Expert(torch.nn.Module):
    """The expert's Gemma layers and pi0's projections (lerobot's module names)."""

    def __init__(self, c: dict):
        super().__init__()
        e = c["expert"]
        self.c = c
        self.cfg = GemmaConfig(vocab_size=16, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", **e)
        self.cfg._attn_implementation = "eager"
        W, A, S = e["hidden_size"], c["max_action_dim"], c["max_state_dim"]
        self.expert = GemmaModel(self.cfg)
        self.state_proj = torch.nn.Linear(S, W)
        self.action_in_proj = torch.nn.Linear(A, W)
        self.action_out_proj = torch.nn.Linear(W, A)
        self.action_time_mlp_in = torch.nn.Linear(2 * W, W)
        self.action_time_mlp_out = torch.nn.Linear(W, W)
        self.rotary = GemmaRotaryEmbedding(self.cfg)

    def forward(self, state, noise, prefix_keys, prefix_values, steps: int):
        H, P = self.c["chunk_size"], prefix_keys.shape[2]
        x = noise
        T = 1 + H
        pos = torch.arange(P, P + T, device=noise.device)[None]
        mask = torch.zeros(1, 1, T, P + T, device=noise.device, dtype=noise.dtype)
        mask[0, 0, 0, P + 1:] = torch.finfo(noise.dtype).min  # the state token does not see the action tokens
        dt = -1.0 / steps
        t = torch.tensor(1.0, dtype=torch.float32)
        for _ in range(steps):  # lerobot: while t >= -dt / 2, t accumulated in float32
            a = self.action_in_proj(x)
            te = time_embedding(t[None], a.shape[-1]).to(a)[:, None].expand(1, H, -1)
            a = self.action_time_mlp_out(torch.nn.functional.silu(self.action_time_mlp_in(torch.cat([a, te], 2))))
            h = torch.cat([self.state_proj(state)[:, None], a], 1)
            cache = DynamicCache(config=self.cfg) if "config" in inspect.signature(DynamicCache).parameters \
                else DynamicCache()
            for i in range(self.cfg.num_hidden_layers):
                cache.update(prefix_keys[i][None], prefix_values[i][None], i)
            cos_sin = self.rotary(h, pos)
            for layer in self.expert.layers:
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, **{CACHE_ARG: cache})
                h = h[0] if isinstance(h, tuple) else h
            v = self.action_out_proj(self.expert.norm(h)[:, -H:])
            x = x + dt * v
            t = t + dt
        return x


class Pi0ExpertStatic(torch.nn.Module):
    """Pi0Expert's chunk with the same weights in plain torch ops at fixed shapes (no cache objects, no
    transformers call per layer), so torch.compile captures a whole step once: the compiled PyTorch baseline of
    benchmarks/pi0_bench.py. The step times' embeddings come in as `temb` [steps, width] (step_embeddings)."""

    def __init__(self, model: Pi0Expert):
        super().__init__()
        self.m = model
        # one Euler step: benchmarks/pi0_bench.py puts its torch.compile'd form here (the whole chunk unrolled is
        # too large a graph for max-autotune to compile in minutes)
        self.step_fn = self.step

    def forward(self, state, noise, prefix_keys, prefix_values, temb):
        m, c = self.m, self.m.c
        H, P = c["chunk_size"], prefix_keys.shape[2]
        T = 1 + H
        pos = torch.arange(P, P + T, device=noise.device)[None]
        cos, sin = (t[:, None] for t in m.rotary(noise, pos))  # [1, 1, T, d]
        mask = torch.zeros(1, 1, T, P + T, device=noise.device, dtype=noise.dtype)
        mask[0, 0, 0, P + 1:] = torch.finfo(noise.dtype).min
        state_token = m.state_proj(state)[:, None]
        x, dt = noise, -1.0 / temb.shape[0]
        for step in range(temb.shape[0]):
            x = self.step_fn(x, temb[step], state_token, cos, sin, mask, prefix_keys, prefix_values, dt)
        return x

    def step(self, x, temb_row, state_token, cos, sin, mask, prefix_keys, prefix_values, dt: float):
        """x <- x + dt v(x, t) for the step whose time embedding is temb_row [width] (dt = -1 / steps)."""
        m, c = self.m, self.m.c
        e, H = c["expert"], c["chunk_size"]
        nh, d, eps, T = e["num_attention_heads"], e["head_dim"], m.cfg.rms_norm_eps, 1 + H
        a = m.action_in_proj(x)
        a = torch.cat([a, temb_row.to(a)[None, None].expand(1, H, -1)], 2)
        h = torch.cat([state_token, m.action_time_mlp_out(torch.nn.functional.silu(m.action_time_mlp_in(a)))], 1)
        for i, layer in enumerate(m.expert.layers):
            att = layer.self_attn
            n = gemma_rms(h, layer.input_layernorm.weight, eps)
            q = att.q_proj(n).view(1, T, nh, d).transpose(1, 2)
            k = att.k_proj(n).view(1, T, -1, d).transpose(1, 2)
            v = att.v_proj(n).view(1, T, -1, d).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            keys, values = torch.cat([prefix_keys[i][None], k], 2), torch.cat([prefix_values[i][None], v], 2)
            o = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d ** -0.5,
                                                                 enable_gqa=True)
            h = h + att.o_proj(o.transpose(1, 2).reshape(1, T, nh * d))
            n = gemma_rms(h, layer.post_attention_layernorm.weight, eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(torch.nn.functional.gelu(mlp.gate_proj(n), approximate="tanh") * mlp.up_proj(n))
        return x + dt * m.action_out_proj(gemma_rms(h, m.expert.norm.weight, eps)[:, -H:])


def gemma_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: in float32, times (1 + w), back to x's type."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def step_embeddings(model: Pi0Expert, steps: int) -> torch.Tensor:
    """Each Euler step's time embedding [steps, width], with t accumulated in float32 from 1 by -1/steps (as
    Pi0Expert.forward and lerobot do)."""
    t, dt, out = torch.tensor(1.0, dtype=torch.float32), -1.0 / steps, []
    for _ in range(steps):
        out.append(time_embedding(t[None], model.c["expert"]["hidden_size"]))
        t = t + dt
    return torch.cat(out, 0)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """lerobot's create_sinusoidal_pos_embedding (periods 4e-3 .. 4, float64)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    x = (1.0 / period * 2 * math.pi)[None, :] * t.double()[:, None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=1).float()


def make_model(scale: str, seed: int = 0) -> Pi0Expert:
    """Random weights at unit activation scale: N(0, 1/fan_in) matrices, norms and biases N(0, 0.1^2)."""
    torch.manual_seed(seed)
    model = Pi0Expert(CONFIGS[scale]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.endswith("norm.weight"):
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, 0.1)
    return model


def save_checkpoint(model: Pi0Expert, folder: Path) -> Path:
    """config.json + model.safetensors with lerobot's names (under "model.")."""
    c, folder = model.c, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.paligemma_with_expert.gemma_expert.model.{k}": v.detach().float().cpu().numpy()
               for k, v in model.expert.state_dict().items()}
    for name in ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"):
        for k, v in getattr(model, name).state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().float().cpu().numpy()
    save_file(tensors, str(folder / "model.safetensors"))
    policy = {"type": "pi0", "chunk_size": c["chunk_size"], "max_state_dim": c["max_state_dim"],
              "max_action_dim": c["max_action_dim"], "num_steps": c["num_steps"],
              "proj_width": c["expert"]["hidden_size"],
              "gemma_expert_config": {**c["expert"], "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh"}}
    (folder / "config.json").write_text(json.dumps(policy, indent=1))
    return folder


def example_inputs(model: Pi0Expert, seed: int = 1) -> dict[str, np.ndarray]:
    c, rng = model.c, np.random.default_rng(seed)
    L, kv, d = (c["expert"][k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim"))
    return {"state": rng.standard_normal((1, c["max_state_dim"])).astype(np.float32),
            "noise": rng.standard_normal((1, c["chunk_size"], c["max_action_dim"])).astype(np.float32),
            "prefix_keys": rng.standard_normal((L, kv, c["prefix"], d)).astype(np.float32),
            "prefix_values": rng.standard_normal((L, kv, c["prefix"], d)).astype(np.float32)}


def shapes(c: dict) -> dict[str, tuple]:
    """--shapes for a build of a CONFIGS entry: the prefix length."""
    return {"prefix_keys": (c["expert"]["num_hidden_layers"], c["expert"]["num_key_value_heads"], c["prefix"],
                            c["expert"]["head_dim"])}


@torch.no_grad()
def reference(model: Pi0Expert, feeds: dict, steps: int) -> np.ndarray:
    """The action chunk in float32 on the CPU."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    return model.float()(t["state"], t["noise"], t["prefix_keys"], t["prefix_values"], steps).numpy()
