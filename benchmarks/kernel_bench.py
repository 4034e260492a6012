"""Kernel-level timings on the GPU: the decode GEMVs (GB/s of weight bytes) and attention calls (µs), each from a
CUDA graph of many launches that cycle through enough copies of the operands to defeat the L2 cache.

  python3 benchmarks/kernel_bench.py [--gemv] [--attention] [--configs] [--out DIR]

--configs also times alternative (R, S) / (TQ, KW, CL) choices next to the default one, and for prefill
shapes the SIMT attention kernel and other cluster sizes next to the tensor-core one."""

import argparse
import functools
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from gpu_kernel import Kernel, reference, upload  # noqa: E402  (cuda-bindings: the GPU machine)
from test_attention_kernels import attention_case  # noqa: E402
from test_gpu_gemv import SHAPES, gemv_case  # noqa: E402

from flashrt.kernels import attention  # noqa: E402
from flashrt.kernels.dtypes import to_f32  # noqa: E402

L2_DEFEAT = 256 << 20  # bytes of operand copies a graph cycles through (the H200's L2 is 50 MB)
WEIGHT_ARGS = ("b", "b_scale", "b_block", "b_global")


def rel_err(kernel: Kernel, family: str, p: dict, host: dict, out: str) -> float:
    got = to_f32(kernel.run(host, out).view(np.uint16), "bfloat16")
    want = to_f32(reference(family, p, host, out).view(np.uint16), "bfloat16")
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


_UPLOADED: dict[int, list[dict[str, int]]] = {}


def timed(kernel: Kernel, host: dict, streamed: tuple[str, ...], pdl: bool = False) -> tuple[float, int]:
    """(µs per launch, bytes of the streamed operands per launch). The device copies of a case's operands are
    made once and shared by the configs timed on it."""
    nbytes = sum(host[n].nbytes for n in streamed)
    if id(host) not in _UPLOADED:
        copies = max(1, min(64, math.ceil(L2_DEFEAT / nbytes)))
        shared = {n: upload(host[n]) for n in host if n not in streamed}
        _UPLOADED[id(host)] = [{**shared, **{n: upload(host[n]) for n in streamed}} for _ in range(copies)]
    sets = _UPLOADED[id(host)]
    return kernel.time_graph(sets, launches=max(200, 2 * len(sets)), pdl=pdl), nbytes


def gemv_jobs(with_configs: bool) -> list[tuple[str, str | None, tuple[int, int], bool]]:
    """(shape, weight format, (R, S), whether it is the default config)"""
    jobs = []
    for shape in SHAPES:
        for quant in (None, "fp8", "nvfp4"):
            p, _ = _gemv_case(shape, quant)
            configs = [(p["R"], p["S"])]
            if with_configs:
                configs += [c for c in ((1, 1), (2, 1), (4, 1), (2, 2), (2, 4), (4, 4))
                            if c not in configs and (not p.get("gated") or c[0] % 2 == 0)]
            jobs += [(shape, quant, c, c == configs[0]) for c in configs]
    return jobs


@functools.cache
def _gemv_case(shape: str, quant: str | None) -> tuple[dict, dict]:
    return gemv_case(shape, quant)


def gemv_params(shape: str, quant: str | None, config: tuple[int, int]) -> tuple[dict, dict]:
    p, host = _gemv_case(shape, quant)
    return {**p, "R": config[0], "S": config[1]}, host


def gemv_rows(with_configs: bool) -> list[dict]:
    jobs = gemv_jobs(with_configs)
    kernels = compile_all([("gemv", gemv_params(s, q, c)[0]) for s, q, c, _ in jobs])
    rows = []
    for (shape, quant, config, default), kernel in zip(jobs, kernels):
        p, host = gemv_params(shape, quant, config)
        err = rel_err(kernel, "gemv", p, host, "c") if default else None
        us, nbytes = timed(kernel, host, tuple(n for n in WEIGHT_ARGS if n in host))
        pdl = timed(kernel, host, tuple(n for n in WEIGHT_ARGS if n in host), pdl=True)[0] if default else None
        rows.append({"kernel": "gemv", "shape": shape, "weights": quant or "bf16", "R": config[0],
                     "S": config[1], "default": default, "us": round(us, 2), "MB": round(nbytes / 1e6, 2),
                     "GB/s": round(nbytes / us / 1e3, 1), "us_pdl": pdl and round(pdl, 2),
                     "GB/s_pdl": pdl and round(nbytes / pdl / 1e3, 1), "rel_err": err,
                     "regs": kernel.resources.get("registers")})
    return rows


ATTENTION = {  # name: (heads, kv_heads, T, S, HD, dyn, pos, mask)
    "decode S=512": (16, 8, 1, 512, 128, None, 0, False),
    "decode dyn pos=511": (16, 8, 1, 512, 128, {"causal": True}, 511, False),
    "decode dyn pos=100": (16, 8, 1, 512, 128, {"causal": True}, 100, False),
    "decode T=4 dyn pos=508": (16, 8, 4, 512, 128, {"causal": True}, 508, False),
    "decode S=4096 dyn pos=4095": (16, 8, 1, 4096, 128, {"causal": True}, 4095, False),
    "expert T=50 S=866": (8, 1, 50, 866, 256, None, 0, True),
    "vit T=197": (12, 12, 197, 197, 64, None, 0, False),
    "prefill T=128 dyn pos=0": (16, 8, 128, 512, 128, {"causal": True}, 0, False),
    "prefill T=256 dyn pos=768": (16, 8, 256, 1024, 128, {"causal": True}, 768, False),
}


def attention_jobs(with_configs: bool, only: list[str] | None = None) -> list[tuple[str, tuple, bool]]:
    """(case name, config, whether it is the default config); a config is ("mma", CL) for the tensor-core
    kernel or (TQ, KW, CL) for the SIMT kernel. --configs adds the SIMT kernel next to the tensor-core one and
    other cluster sizes."""
    jobs = []
    for name, (h, kvh, T, S, HD, dyn, pos, mask) in ATTENTION.items():
        if only and name not in only:
            continue
        p, _ = attention_case(h, kvh, T, S, HD, dyn, pos, mask)
        configs = [("mma", p["mma"]["cl"]) if "mma" in p else (p["TQ"], p["KW"], p["CL"])]
        if with_configs and T == 1:
            configs += [c for c in ((1, 8, 1), (1, 4, 8), (1, 2, 8), (1, 8, 4), (1, 8, 8)) if c not in configs]
        if with_configs and "mma" in p:
            configs += [("mma", cl) for cl in (1, 2, 4, 8) if ("mma", cl) not in configs]
            configs.append(attention.choose_config(T, S, h))
        jobs += [(name, c, c == configs[0]) for c in configs]
    return jobs


@functools.cache
def attention_params(name: str, config: tuple) -> tuple[dict, dict]:
    if config[0] == "mma":
        p, host = attention_case(*ATTENTION[name])
        return {**p, "mma": {**p["mma"], "cl": config[1]}}, host
    return attention_case(*ATTENTION[name], config=config, mma=False)


def attention_rows(with_configs: bool, only: list[str] | None = None) -> list[dict]:
    jobs = attention_jobs(with_configs, only)
    kernels = compile_all([("attention", attention_params(n, c)[0]) for n, c, _ in jobs])
    rows = []
    for (name, config, default), kernel in zip(jobs, kernels):
        p, host = attention_params(name, config)
        err = rel_err(kernel, "attention", p, host, "out")
        us, nbytes = timed(kernel, host, ("k", "v"))
        pdl = timed(kernel, host, ("k", "v"), pdl=True)[0] if default else None
        rows.append({"kernel": "attention", "shape": name, "config": list(config), "default": default,
                     "us": round(us, 2), "us_pdl": pdl and round(pdl, 2), "rel_err": err,
                     "regs": kernel.resources.get("registers")})
    return rows


def precompile(specs: list[tuple[str, dict]], arch: str) -> None:
    """Fill the kernel cache in parallel (nvcc)."""
    from flashrt.aot.codegen import compile_kernel, find_toolchain, kernel_source

    tc = find_toolchain()
    with ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        list(pool.map(lambda s: compile_kernel(tc, kernel_source(*s), arch), specs))


def compile_all(specs: list[tuple[str, dict]]) -> list[Kernel]:
    from gpu_kernel import gpu_arch

    precompile(specs, gpu_arch())
    return [Kernel(*s) for s in specs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemv", action="store_true")
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--configs", action="store_true")
    ap.add_argument("--shapes", nargs="*", help=f"attention cases to run (default: all): {', '.join(ATTENTION)}")
    ap.add_argument("--out", default=os.environ.get("OUT", HERE))
    args = ap.parse_args()
    both = not (args.gemv or args.attention)
    rows = (gemv_rows(args.configs) if args.gemv or both else []) + \
        (attention_rows(args.configs, args.shapes) if args.attention or both else [])
    for r in rows:
        print(json.dumps(r))
    with open(os.path.join(args.out, "kernel_bench.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
