"""The benchmark's three batch-1 workloads as PyTorch modules (the shapes of ../shared/reference/torch_baseline.py):

  decode   a decode step of a Qwen3-0.6B-shaped decoder: 28 layers, hidden 1024, 16 heads, 8 KV heads,
           head dim 128, MLP 3072, one new token over a 512-token KV cache
  expert   a denoise step of a Gemma-300M-shaped action expert: 18 layers, hidden 1024, 8 heads, 1 KV head,
           head dim 256, MLP 4096, 50 action tokens attending to an 816-token prefix
  vit      a ViT-B/16-shaped encoder: 12 layers, hidden 768, 12 heads, MLP 3072, 197 tokens

`Stack` is the measured PyTorch model (SDPA, as the reference baseline); `export_module` gives the same weights
in a module written with plain ops for torch.onnx.export (attention as matmul/softmax, GQA by repeat)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

WORKLOADS = {
    "decode": dict(L=28, d=1024, h=16, kvh=8, hd=128, mlp=3072, T=1, ctx=512),
    "decode4k": dict(L=28, d=1024, h=16, kvh=8, hd=128, mlp=3072, T=1, ctx=4096),
    "expert": dict(L=18, d=1024, h=8, kvh=1, hd=256, mlp=4096, T=50, ctx=816),
    "vit": dict(L=12, d=768, h=12, kvh=12, hd=64, mlp=3072, T=197, ctx=0),
}


class Block(nn.Module):
    def __init__(self, d, h, kvh, hd, mlp):
        super().__init__()
        self.h, self.kvh, self.hd = h, kvh, hd
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, (h + 2 * kvh) * hd, bias=False)
        self.o = nn.Linear(h * hd, d, bias=False)
        self.gu = nn.Linear(d, 2 * mlp, bias=False)
        self.dn = nn.Linear(mlp, d, bias=False)
        for n in (self.n1, self.n2):
            nn.init.normal_(n.weight, 1.0, 0.1)

    def forward(self, x, kc, vc):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.hd).transpose(1, 2)
        if kc is not None:
            k, v = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        g, u = self.gu(self.n2(x)).chunk(2, -1)
        return x + self.dn(F.silu(g) * u)


class Stack(nn.Module):
    def __init__(self, L, **kw):
        super().__init__()
        self.blocks = nn.ModuleList(Block(**kw) for _ in range(L))

    def forward(self, x, kcs, vcs):
        for i, b in enumerate(self.blocks):
            x = b(x, kcs[i] if kcs else None, vcs[i] if vcs else None)
        return x


class _ExportStack(nn.Module):
    """The same computation in plain ops, with the caches as separate positional inputs."""

    def __init__(self, stack: Stack, has_cache: bool):
        super().__init__()
        self.stack, self.has_cache = stack, has_cache

    @staticmethod
    def _rms(n: nn.RMSNorm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight

    def forward(self, x, *caches):
        L = len(self.stack.blocks)
        for i, b in enumerate(self.stack.blocks):
            B, T, D = x.shape
            q, k, v = (b.qkv(self._rms(b.n1, x))
                       .split([b.h * b.hd, b.kvh * b.hd, b.kvh * b.hd], -1))
            q = q.view(B, T, b.h, b.hd).transpose(1, 2)
            k = k.view(B, T, b.kvh, b.hd).transpose(1, 2)
            v = v.view(B, T, b.kvh, b.hd).transpose(1, 2)
            if self.has_cache:
                k, v = torch.cat([caches[i], k], 2), torch.cat([caches[L + i], v], 2)
            if b.h != b.kvh:
                rep = b.h // b.kvh
                S = k.shape[2]
                k = k[:, :, None].expand(B, b.kvh, rep, S, b.hd).reshape(B, b.h, S, b.hd)
                v = v[:, :, None].expand(B, b.kvh, rep, S, b.hd).reshape(B, b.h, S, b.hd)
            s = torch.matmul(q, k.transpose(2, 3)) * (b.hd ** -0.5)
            a = torch.matmul(torch.softmax(s, -1), v)
            x = x + b.o(a.transpose(1, 2).reshape(B, T, -1))
            g, u = b.gu(self._rms(b.n2, x)).chunk(2, -1)
            x = x + b.dn(g * torch.sigmoid(g) * u)
        return x


def make(name: str, device: str = "cpu", seed: int = 0):
    """(stack, example inputs (x, kcs, vcs)) for a workload, fp32, random weights."""
    cfg = dict(WORKLOADS[name])
    T, ctx = cfg.pop("T"), cfg.pop("ctx")
    torch.manual_seed(seed)
    stack = Stack(**cfg).to(device).eval()
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(1, T, cfg["d"], generator=g).to(device)
    kcs = [torch.randn(1, cfg["kvh"], ctx, cfg["hd"], generator=g).to(device) for _ in range(cfg["L"])] if ctx else []
    vcs = [torch.randn(1, cfg["kvh"], ctx, cfg["hd"], generator=g).to(device) for _ in range(cfg["L"])] if ctx else []
    return stack, (x, kcs, vcs)


def export_onnx(stack: Stack, inputs, path: str, dynamic_cache: bool = False) -> list[str]:
    """Write the workload as ONNX (legacy exporter, opset 17); returns the input names. dynamic_cache: the caches'
    length axis is dynamic, as a stateful build (--max-context) wants."""
    x, kcs, vcs = inputs
    names = ["x"] + [f"k{i}" for i in range(len(kcs))] + [f"v{i}" for i in range(len(vcs))]
    module = _ExportStack(stack, bool(kcs)).eval()
    axes = {n: {2: "past"} for n in names[1:]} if dynamic_cache else None
    with torch.no_grad():
        torch.onnx.export(module, (x, *kcs, *vcs), path, input_names=names, output_names=["y"], opset_version=17,
                          dynamo=False, do_constant_folding=True, dynamic_axes=axes)
    return names
