"""A Qwen3-0.6B-shaped causal LM in plain PyTorch (fp32, seeded random weights), exported to ONNX in the KV-cache
form: inputs input_ids [1, T], position_ids [1, T] and per layer past_key_{i} / past_value_{i} [1, KV, P, D];
outputs logits [1, T, V] and per layer present_key_{i} / present_value_{i} = cat(past, new) along the sequence
(new K after RoPE). RoPE's cos/sin are computed from position_ids inside the graph, so positions are a run-time
input; GQA repeats the KV heads with expand + reshape (transformers' repeat_kv).

  full  vocab 151936, 28 layers, hidden 1024, 16 heads, 8 KV heads, head dim 128, SwiGLU MLP 3072, RMSNorm
        eps 1e-6 with q/k RMSNorm per head, RoPE theta 1e6, untied lm_head (what the lent GPU runs)
  ci    vocab 512, 2 layers, hidden 256, 4 heads, 2 KV heads, head dim 128, MLP 512 (what CI runs)

The reference is the same module in PyTorch fp32: greedy(model, prompt, steps) decodes with its own KV cache and
gives the tokens and each step's logits; teacher_forced_logits(model, prompt, tokens) gives the logits of the same
steps from one pass over prompt + tokens.

--check builds a stateless engine that replays the whole greedy run teacher-forced in one call: past = the
reference's K/V of the prompt's first P tokens, T = steps new tokens (the prompt's last token, then the reference's
tokens), so logits[t] is step t's prediction. It prints per precision the worst cosine over the steps and how
often the top-1 token agrees:

  python samples/decoder.py --scale ci --out /tmp/dec --check cpu --precision fp32 bf16 fp8
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

CONFIGS = {
    "full": dict(vocab=151936, layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, mlp=3072, eps=1e-6,
                 theta=1e6),
    "ci": dict(vocab=512, layers=2, hidden=256, heads=4, kv_heads=2, head_dim=128, mlp=512, eps=1e-6, theta=1e6),
}
SEED = 0
OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30  # past this many weight bytes the ONNX file keeps its weights beside it


class RMSNorm(nn.Module):
    """x / rms(x) * w, in the decomposed form transformers writes (Pow, ReduceMean, Add, Sqrt, Div, Mul)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, h, kv, hd = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"]
        self.h, self.kv, self.hd = h, kv, hd
        self.input_norm, self.post_norm = RMSNorm(d, c["eps"]), RMSNorm(d, c["eps"])
        self.q_proj, self.k_proj = nn.Linear(d, h * hd, bias=False), nn.Linear(d, kv * hd, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv * hd, bias=False), nn.Linear(h * hd, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd, c["eps"]), RMSNorm(hd, c["eps"])
        self.gate, self.up = nn.Linear(d, c["mlp"], bias=False), nn.Linear(d, c["mlp"], bias=False)
        self.down = nn.Linear(c["mlp"], d, bias=False)

    def forward(self, x, cos, sin, past_k, past_v, mask):
        B, T, _ = x.shape
        y = self.input_norm(x)
        q = self.q_norm(self.q_proj(y).view(B, T, self.h, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(y).view(B, T, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(y).view(B, T, self.kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        present = (k, v)
        rep, S = self.h // self.kv, k.shape[2]
        k = k[:, :, None].expand(B, self.kv, rep, S, self.hd).reshape(B, self.h, S, self.hd)
        v = v[:, :, None].expand(B, self.kv, rep, S, self.hd).reshape(B, self.h, S, self.hd)
        s = torch.matmul(q, k.transpose(2, 3)) * (self.hd ** -0.5)
        if mask is not None:
            s = s + mask
        a = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(B, T, self.h * self.hd)
        x = x + self.o_proj(a)
        y = self.post_norm(x)
        x = x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))
        return x, present


class Decoder(nn.Module):
    """forward(input_ids, position_ids, *past) -> (logits, present_key_0, present_value_0, ...), past given as
    past_key_0, past_value_0, past_key_1, ... [1, kv_heads, P, head_dim] (P may be 0)."""

    def __init__(self, c: dict):
        super().__init__()
        self.c = dict(c)
        self.embed = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["hidden"], c["eps"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        hd = c["head_dim"]
        self.register_buffer("inv_freq", 1.0 / c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        T, P = input_ids.shape[1], past[0].shape[2]
        freqs = position_ids[:, :, None].float() * self.inv_freq  # [1, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [1, 1, T, D]
        cos, sin = emb.cos(), emb.sin()
        mask = None
        if T > 1:  # new token t sees the P past keys and new keys 0..t
            future = torch.ones(T, P + T, dtype=torch.bool).triu(P + 1)
            mask = torch.zeros(T, P + T).masked_fill(future, float("-inf"))
        x = self.embed(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, past[2 * i], past[2 * i + 1], mask)
            presents += kv
        return (self.lm_head(self.norm(x)), *presents)


def make_model(scale: str = "ci", seed: int = SEED) -> Decoder:
    """The decoder (eval, fp32): linears and embedding N(0, 0.02^2) (Qwen3's initializer_range), norm weights
    1 + N(0, 0.1^2)."""
    torch.manual_seed(seed)
    model = Decoder(CONFIGS[scale]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise)
    return model


def empty_past(model: Decoder) -> list[torch.Tensor]:
    c = model.c
    return [torch.zeros(1, c["kv_heads"], 0, c["head_dim"]) for _ in range(2 * c["layers"])]


def io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "position_ids", *(f"past_{n}" for n in kv)], ["logits", *(f"present_{n}" for n in kv)]


def export_onnx(model: Decoder, path: str, T: int, P: int) -> str:
    """Export for static T new tokens over P cached ones (legacy exporter, opset 17, constants folded)."""
    c = model.c
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ids = torch.zeros(1, T, dtype=torch.int64)
    pos = torch.arange(P, P + T, dtype=torch.int64)[None]
    past = [torch.randn(1, c["kv_heads"], P, c["head_dim"]) for _ in range(2 * c["layers"])]
    inputs, outputs = io_names(c["layers"])
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    target = os.path.join(tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path))), "model.onnx") if big \
        else path
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, pos, *past), target, dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, do_constant_folding=True)
    if big:  # the legacy exporter writes one file per tensor past 2 GB: gather them into one beside the model
        save_external(target, path)
    return path


def save_external(src: str, path: str) -> None:
    """Re-save the ONNX model src (weights in files beside it) as path + path.data, and remove src's folder."""
    import onnx

    onnx.save_model(onnx.load(src), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)
    shutil.rmtree(os.path.dirname(src))


@torch.no_grad()
def greedy(model: Decoder, prompt_ids: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding with the module's own KV cache: (tokens [steps], logits [steps, V]); step 0's logits are
    the prefill's last position, step s > 0 the decode of token s - 1."""
    P = prompt_ids.shape[1]
    out = model(prompt_ids, torch.arange(P)[None], *empty_past(model))
    logits, past = out[0][:, -1], list(out[1:])
    tokens, rows = [], []
    for s in range(steps):
        rows.append(logits[0].numpy())
        tokens.append(int(logits[0].argmax()))
        if s + 1 < steps:
            out = model(torch.tensor([[tokens[-1]]]), torch.tensor([[P + s]]), *past)
            logits, past = out[0][:, -1], list(out[1:])
    return np.array(tokens, np.int64), np.stack(rows)


@torch.no_grad()
def teacher_forced_logits(model: Decoder, prompt_ids: torch.Tensor, tokens) -> np.ndarray:
    """The logits of each step of greedy(...) from one causal pass over prompt + tokens[:-1]: [len(tokens), V]."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)[None]
    ids = torch.cat([prompt_ids, tokens[:, :-1]], dim=1)
    logits = model(ids, torch.arange(ids.shape[1])[None], *empty_past(model))[0]
    return logits[0, prompt_ids.shape[1] - 1:].numpy()


def example_prompt(model: Decoder, length: int = 16, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, model.c["vocab"], (1, length), generator=g)


@torch.no_grad()
def replay_feeds(model: Decoder, prompt_ids: torch.Tensor, tokens) -> dict[str, np.ndarray]:
    """Feeds that replay greedy(...) teacher-forced through an export with P = len(prompt) - 1 and
    T = len(tokens): past = the module's K/V of the prompt but its last token; new tokens = the prompt's last
    token, then tokens[:-1]."""
    P = prompt_ids.shape[1] - 1
    past = list(model(prompt_ids[:, :P], torch.arange(P)[None], *empty_past(model))[1:])
    ids = torch.cat([prompt_ids[:, P:], torch.as_tensor(np.asarray(tokens[:-1]), dtype=torch.int64)[None]], dim=1)
    names = io_names(model.c["layers"])[0]
    values = [ids, torch.arange(P, P + ids.shape[1])[None], *past]
    return {n: v.numpy() for n, v in zip(names, values)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def step_metrics(logits: np.ndarray, ref: np.ndarray) -> dict:
    """Per-step cosine of the logits [steps, V] to the reference's, top-1 agreement, and the largest reference
    margin (top-1 minus top-2 logit, in units of the step's logit std) among the steps whose top-1 differs: a
    random model's logits have near-ties that any weight rounding flips."""
    cos = [cosine(a, b) for a, b in zip(logits, ref)]
    agree = logits.argmax(-1) == ref.argmax(-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / ref.std(axis=-1)
    return {"min_cosine": min(cos), "mean_cosine": float(np.mean(cos)), "top1_agree": float(np.mean(agree)),
            "flip_max_margin": float(margin[~agree].max()) if not agree.all() else 0.0, "steps": len(cos)}


def check(scale: str, out: str, device: str, precisions, steps: int = 64, prompt_len: int = 16,
          target: str = "sm_90a") -> list[dict]:
    """Export, build each precision, replay the greedy run teacher-forced and compare with the reference."""
    import flashrt
    from flashrt.aot.build import build_engine

    model = make_model(scale)
    prompt = example_prompt(model, prompt_len)
    tokens, ref = greedy(model, prompt, steps)
    path = export_onnx(model, os.path.join(out, f"decoder_{scale}.onnx"), steps, prompt_len - 1)
    feeds = replay_feeds(model, prompt, tokens)
    rows = []
    for precision in precisions:
        row = {"model": "decoder", "scale": scale, "precision": precision, "device": device, "T": steps,
               "P": prompt_len - 1}
        t = time.perf_counter()
        r = build_engine(path, [target], os.path.join(out, f"decoder_{scale}_{precision}.frt"), None, precision)
        row.update(build_s=round(time.perf_counter() - t, 1), launches=r.launches)
        engine = flashrt.load(r.path, device=device)
        t = time.perf_counter()
        got = engine.run(feeds)
        row["run_s"] = round(time.perf_counter() - t, 3)
        row.update(step_metrics(got["logits"][0], ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(CONFIGS), default="ci")
    ap.add_argument("--out", required=True, help="folder for the ONNX export and the engines")
    ap.add_argument("--check", choices=["cpu", "cuda"], help="build with flashrt and compare with the reference")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16", "fp8"])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--target", default="sm_90a")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.check:
        check(a.scale, a.out, a.check, a.precision, a.steps, a.prompt_len, a.target)
    else:
        model = make_model(a.scale)
        print(export_onnx(model, os.path.join(a.out, f"decoder_{a.scale}.onnx"), 1, a.prompt_len))


if __name__ == "__main__":
    main()
