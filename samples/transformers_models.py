"""Realistic sample models at real shapes, random weights (seeded), no download: built with transformers' own
classes, written as safetensors + config.json (save_pretrained) and as ONNX from torch.onnx.export (both the
dynamo exporter and the legacy TorchScript one), with a PyTorch fp32 reference output for a seeded input.

  vit     ViT-B/16 vision tower (ViTModel, 224 px: 12 layers, hidden 768, 12 heads, MLP 3072, 197 tokens, with
          its pooler). Input pixel_values [1, 3, 224, 224]; outputs last_hidden_state [1, 197, 768] and
          pooler_output [1, 768].
  qwen3   Qwen3-0.6B-shaped decoder (Qwen3ForCausalLM: 28 layers, hidden 1024, 16 heads, 8 KV heads, head dim
          128, SwiGLU MLP 3072, RMSNorm with q/k norm, vocab 151936 with tied embeddings, RoPE theta 1e6).
          Input input_ids [1, 64] (int64); output logits [1, 64, 151936]. Causal, no KV cache (use_cache=False).
  gemma   Gemma-300M-shaped action expert (GemmaModel: 18 layers, hidden 1024, 8 heads, 1 KV head, head dim 256,
          GELU-tanh gated MLP 4096). As a standalone sample it is the Gemma decoder stack over the 50 action
          tokens' embeddings: input inputs_embeds [1, 50, 1024] (float32), output last_hidden_state
          [1, 50, 1024]. GemmaModel's own causal mask is kept (pi0's action expert attends bidirectionally among
          the action tokens and to the prefix's KV; neither is modelled here). The token embedding table is
          unused by this input path, so its vocabulary is cut to 256 rows.

--scale full gives the real shapes above (what the lent GPU runs); --scale small the same architectures with
2 layers and narrower widths (CI): ViT hidden 64, 4 heads, MLP 256, 64 px (17 tokens); Qwen3 hidden 128, 4 heads,
2 KV heads, head dim 32, MLP 384, vocab 1024, 16 tokens; Gemma hidden 128, 4 heads, 1 KV head, head dim 64,
MLP 512, 50 tokens. Each model goes to OUT/<model>/:

  hf/config.json, hf/model.safetensors   save_pretrained (the safetensors source)
  dynamo/<model>.onnx                    torch.onnx.export(dynamo=True), opset 18 (+ <model>.onnx.data when the
                                         weights exceed 1.5 GB)
  legacy/<model>.onnx                    torch.onnx.export(dynamo=False), opset 18 (the TorchScript exporter
                                         writes one external file per tensor beside it past 2 GB; it stores
                                         Qwen3's tied lm_head a second time, transposed)
  inputs.npz, outputs.npz                the seeded input and PyTorch's fp32 eager outputs, by ONNX name
  hf_inputs.npz, hf_outputs.npz          the same for the checkpoint in the signature flashrt's safetensors
                                         importer builds (see hf_reference)

Static shapes, batch 1, eval mode, attention implementation 'eager' (plain MatMul / Softmax ops); --attn sdpa
exports with transformers' SDPA attention instead (at opset 18 both exporters decompose it into MatMul /
Softmax, plus an IsNaN / Where guard for fully masked rows). The decoders are called with an all-ones
attention_mask (a traced constant): without one, transformers probes position_ids for packed sequences with
torch.diff, which the TorchScript exporter cannot export ("Exporting the operator 'aten::diff' to ONNX opset
version 18 is not supported").

Weights: transformers' init, then re-drawn from a seeded generator so that every tensor matters and
activations keep unit scale through depth: Linear / Conv / Embedding weights N(0, 1/fan_in), biases
N(0, 0.1^2), LayerNorm weight 1 + N(0, 0.1^2) and bias N(0, 0.1^2), and every other parameter (RMSNorm
weights, ViT's class token and position embeddings) its init plus N(0, 0.1^2).

Write the full-size models (about 12 GB in all; what the lent GPU runs):

  python samples/transformers_models.py --scale full --out /tmp/full

Build them with flashrt and compare with PyTorch on the GPU (one JSON line per model x source x precision):

  python samples/transformers_models.py --scale full --out /tmp/full --check cuda --precisions fp32 bf16

and the small ones the tests use:

  python samples/transformers_models.py --scale small --out /tmp/small [--models vit qwen3] [--exporters dynamo]

From Python: write_all(out_dir, scale="small"), or make_model / write_model for one model.
"""

import argparse
import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MODELS = ("vit", "qwen3", "gemma")
EXPORTERS = ("dynamo", "legacy")
OPSET = 18
SEED = 0
EXTERNAL_DATA_BYTES = 1_500_000_000  # dynamo exports keep weights inside the .onnx file below this size


@dataclass
class Spec:
    """One sample model: its transformers config and its (static) ONNX signature."""

    name: str
    config: object
    input_name: str
    input_shape: tuple
    output_names: tuple


def spec(name: str, scale: str = "small") -> Spec:
    from transformers import GemmaConfig, Qwen3Config, ViTConfig

    full = scale == "full"
    if scale not in ("full", "small"):
        raise ValueError(f"scale must be 'full' or 'small', not {scale!r}")
    if name == "vit":
        cfg = ViTConfig(hidden_size=768 if full else 64, num_hidden_layers=12 if full else 2,
                        num_attention_heads=12 if full else 4, intermediate_size=3072 if full else 256,
                        image_size=224 if full else 64, patch_size=16, num_channels=3, qkv_bias=True,
                        hidden_act="gelu", layer_norm_eps=1e-12)
        side = cfg.image_size
        return Spec(name, cfg, "pixel_values", (1, 3, side, side), ("last_hidden_state", "pooler_output"))
    if name == "qwen3":
        cfg = Qwen3Config(vocab_size=151936 if full else 1024, hidden_size=1024 if full else 128,
                          num_hidden_layers=28 if full else 2, num_attention_heads=16 if full else 4,
                          num_key_value_heads=8 if full else 2, head_dim=128 if full else 32,
                          intermediate_size=3072 if full else 384, hidden_act="silu", rms_norm_eps=1e-6,
                          max_position_embeddings=40960, tie_word_embeddings=True, attention_bias=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, use_cache=False)
        return Spec(name, cfg, "input_ids", (1, 64 if full else 16), ("logits",))
    if name == "gemma":
        cfg = GemmaConfig(vocab_size=256, hidden_size=1024 if full else 128, num_hidden_layers=18 if full else 2,
                          num_attention_heads=8 if full else 4, num_key_value_heads=1, head_dim=256 if full else 64,
                          intermediate_size=4096 if full else 512, hidden_act="gelu_pytorch_tanh",
                          rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          use_cache=False, pad_token_id=0)
        return Spec(name, cfg, "inputs_embeds", (1, 50, cfg.hidden_size), ("last_hidden_state",))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float, mean=None) -> None:
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        p.copy_(noise if mean is None else mean + noise)

    done = set()
    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda kv: kv[0]):
            own = dict(m.named_parameters(recurse=False))
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                w = own["weight"]
                fan_in = w.shape[1] if isinstance(m, nn.Embedding) else math.prod(w.shape[1:])
                normal(w, 1 / math.sqrt(fan_in))
                if own.get("bias") is not None:
                    normal(own["bias"], 0.1)
            elif isinstance(m, nn.LayerNorm):
                normal(own["weight"], 0.1, mean=1.0)
                normal(own["bias"], 0.1)
            else:
                continue
            done.update(id(p) for p in own.values() if p is not None)
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(p) not in done:  # RMSNorm weights (Qwen3: ones, Gemma: zeros as 1 + w), ViT cls/position
                normal(p, 0.1, mean=p.clone())
                done.add(id(p))


def make_model(name: str, scale: str = "small", attn: str = "eager", seed: int = SEED) -> tuple[nn.Module, Spec]:
    """The transformers module (eval, fp32, seeded random weights) and its Spec."""
    from transformers import GemmaModel, Qwen3ForCausalLM, ViTModel

    s = spec(name, scale)
    s.config._attn_implementation = attn
    torch.manual_seed(seed)
    cls = {"vit": ViTModel, "qwen3": Qwen3ForCausalLM, "gemma": GemmaModel}[name]
    kwargs = {"add_pooling_layer": True} if name == "vit" else {}
    model = cls(s.config, **kwargs).float().eval()
    _randomize(model, seed)
    if name == "qwen3":
        model.tie_weights()
    return model, s


class ExportWrapper(nn.Module):
    """One tensor in, the spec's outputs as a tuple out (plain forward, no cache, no dict outputs)."""

    def __init__(self, model: nn.Module, s: Spec):
        super().__init__()
        self.model, self.s = model, s

    def forward(self, x):
        # An all-ones attention mask (the ordinary inference call) is a traced constant; without it transformers
        # probes position_ids for packed sequences with torch.diff, which the TorchScript exporter cannot export.
        kwargs = {} if self.s.name == "vit" else {
            "use_cache": False, "attention_mask": torch.ones(x.shape[:2], dtype=torch.int64, device=x.device)}
        out = self.model(**{self.s.input_name: x}, **kwargs)
        if self.s.name == "vit":
            return out.last_hidden_state, out.pooler_output
        if self.s.name == "qwen3":
            return out.logits
        return out.last_hidden_state


def example_input(s: Spec, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if s.input_name == "input_ids":
        return torch.randint(0, s.config.vocab_size, s.input_shape, generator=g, dtype=torch.int64)
    return torch.randn(s.input_shape, generator=g, dtype=torch.float32)


def reference(model: nn.Module, s: Spec, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = ExportWrapper(model, s)(x)
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.detach().float().numpy() for n, o in zip(s.output_names, out)}


def hf_reference(model: nn.Module, s: Spec, seed: int = SEED) -> tuple[dict, dict]:
    """Inputs and PyTorch outputs in the signature flashrt's safetensors importer gives the checkpoint: the
    decoders take input_ids [1, T] (Gemma included: its embedding, scaled by sqrt(hidden), is part of the graph)
    and give last_hidden_state (after the final norm) and, for a *ForCausalLM, logits; ViT gives
    last_hidden_state and pooler_output (flashrt builds no pooler: compare the names both have)."""
    if s.name == "gemma":
        g = torch.Generator().manual_seed(seed + 2)
        x = torch.randint(0, s.config.vocab_size, s.input_shape[:2], generator=g, dtype=torch.int64)
    else:
        x = example_input(s, seed)
    with torch.no_grad():
        if s.name == "vit":
            out = model(pixel_values=x)
            outs = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        elif s.name == "qwen3":
            hidden = model.model(input_ids=x, use_cache=False).last_hidden_state
            outs = {"last_hidden_state": hidden, "logits": model.lm_head(hidden)}
        else:
            outs = {"last_hidden_state": model(input_ids=x, use_cache=False).last_hidden_state}
    name = "pixel_values" if s.name == "vit" else "input_ids"
    return {name: x.numpy()}, {k: v.float().numpy() for k, v in outs.items()}


def export_onnx(model: nn.Module, s: Spec, x: torch.Tensor, path: str, exporter: str, opset: int = OPSET) -> str:
    """torch.onnx.export with the dynamo exporter or the legacy TorchScript one; static shapes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    wrapper = ExportWrapper(model, s).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(wrapper, (x,), path, dynamo=True, opset_version=opset, input_names=[s.input_name],
                              output_names=list(s.output_names), external_data=nbytes > EXTERNAL_DATA_BYTES,
                              optimize=True)
        elif exporter == "legacy":
            torch.onnx.export(wrapper, (x,), path, dynamo=False, opset_version=opset, input_names=[s.input_name],
                              output_names=list(s.output_names), do_constant_folding=True)
        else:
            raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    return path


def op_counts(path: str) -> dict[str, int]:
    """ONNX op types of a model file and how often each occurs (top-level graph)."""
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(path, load_external_data=False).graph.node:
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def write_model(name: str, out: str, scale: str = "small", exporters=EXPORTERS, attn: str = "eager",
                seed: int = SEED, safetensors: bool = True) -> dict:
    """Write OUT/<name>/ (hf/, <exporter>/<name>.onnx, inputs.npz, outputs.npz); returns the paths."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, s = make_model(name, scale, attn, seed)
    root = os.path.join(out, name)
    os.makedirs(root, exist_ok=True)
    x = example_input(s, seed)
    ref = reference(model, s, x)
    paths = {"dir": root, "inputs": os.path.join(root, "inputs.npz"), "outputs": os.path.join(root, "outputs.npz")}
    np.savez(paths["inputs"], **{s.input_name: x.numpy()})
    np.savez(paths["outputs"], **ref)
    if safetensors:
        paths["hf"] = os.path.join(root, "hf")
        model.save_pretrained(paths["hf"], safe_serialization=True)
        hf_in, hf_out = hf_reference(model, s, seed)
        paths["hf_inputs"], paths["hf_outputs"] = (os.path.join(root, f"hf_{k}.npz") for k in ("inputs", "outputs"))
        np.savez(paths["hf_inputs"], **hf_in)
        np.savez(paths["hf_outputs"], **hf_out)
    for exporter in exporters:
        paths[exporter] = export_onnx(model, s, x, os.path.join(root, exporter, f"{name}.onnx"), exporter)
    with open(os.path.join(root, "sample.json"), "w") as f:
        json.dump({"model": name, "scale": scale, "attn": attn, "seed": seed, "opset": OPSET,
                   "inputs": {s.input_name: list(s.input_shape)}, "outputs": list(s.output_names),
                   "files": {k: os.path.relpath(v, root) for k, v in paths.items() if k != "dir"}}, f, indent=1)
    return paths


def write_all(out: str, scale: str = "small", models=MODELS, exporters=EXPORTERS, attn: str = "eager",
              seed: int = SEED) -> dict[str, dict]:
    return {m: write_model(m, out, scale, exporters, attn, seed) for m in models}


def check_model(paths: dict, name: str, sources=("dynamo", "legacy", "safetensors"), precisions=("fp32",),
                device: str = "cpu", targets=("sm_90a",), engine_dir: str | None = None) -> list[dict]:
    """Build each source of one written model with flashrt, run it on `device` ("cpu": the reference
    executor; "cuda": the GPU loader) and compare with PyTorch's outputs: a row per build, with rel-L2 and
    cosine per output, or the error."""
    import time

    import flashrt
    from flashrt.aot.build import build_engine

    rows = []
    for source in sources:
        pre = "hf_" if source == "safetensors" else ""
        feeds = dict(np.load(paths[f"{pre}inputs"]))
        ref = dict(np.load(paths[f"{pre}outputs"]))
        src = paths["hf"] if source == "safetensors" else paths[source]
        shapes = {"input_ids": feeds["input_ids"].shape} if source == "safetensors" and "input_ids" in feeds else {}
        for precision in precisions:
            row = {"model": name, "source": source, "precision": precision, "device": device}
            out = os.path.join(engine_dir or paths["dir"], f"{name}_{source}_{precision}.frt")
            try:
                t = time.perf_counter()
                r = build_engine(src, list(targets), out, shapes, precision)
                row.update(built=True, build_s=round(time.perf_counter() - t, 1), launches=r.launches,
                           engine_bytes=r.size)
                engine = flashrt.load(out, device=device)
                t = time.perf_counter()
                got = engine.run(feeds)
                row["run_s"] = round(time.perf_counter() - t, 3)
                row["outputs"] = {}
                for k, v in got.items():
                    a, b = np.asarray(v, np.float64).ravel(), np.asarray(ref[k], np.float64).ravel()
                    row["outputs"][k] = {"rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
                                         "cosine": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)),
                                         "finite": bool(np.isfinite(a).all())}
                del engine
            except Exception as e:  # report and go on with the next build
                row.update(built=row.get("built", False), error=f"{type(e).__name__}: {str(e)[:2000]}")
            finally:
                if os.path.exists(out) and engine_dir is None:
                    os.remove(out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["small", "full"], default="small")
    ap.add_argument("--out", required=True, help="folder to write the models into")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--exporters", nargs="+", choices=EXPORTERS, default=list(EXPORTERS))
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--ops", action="store_true", help="print the ONNX op types and counts of each export")
    ap.add_argument("--check", choices=["cpu", "cuda"],
                    help="also build every written source with flashrt and compare its outputs with PyTorch's, "
                         "running on the CPU reference executor or the GPU (one JSON line per build)")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "fp16", "bf16"], default=["fp32"])
    ap.add_argument("--target", default="sm_90a", help="flashrt target of the --check builds")
    ap.add_argument("--results", help="with --check: write all rows to this JSON file")
    a = ap.parse_args()
    rows = []
    for m in a.models:
        paths = write_model(m, a.out, a.scale, a.exporters, a.attn, a.seed)
        print(f"{m}: {paths['dir']}", flush=True)
        for e in a.exporters:
            print(f"  {e}: {paths[e]}")
            if a.ops:
                print("    " + ", ".join(f"{k} {v}" for k, v in op_counts(paths[e]).items()))
        if a.check:
            rows += check_model(paths, m, (*a.exporters, "safetensors"), a.precisions, a.check, (a.target,))
            if a.results:
                with open(a.results, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
