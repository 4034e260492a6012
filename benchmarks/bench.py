"""Batch-1 benchmark on the lent GPU: PyTorch eager, torch.compile(max-autotune) and flashrt engines for the three
workloads of benchmarks/workloads.py, in one process, with CUDA events, warm-up and medians.

  python3 benchmarks/bench.py [--workloads decode expert vit] [--precisions bf16] [--no-torch] [--out DIR]
                              [--profile] [--ablate]
  python3 benchmarks/bench.py --build-only [--arch sm_90a] [--workloads ...] [--precisions ...]

Prints one table and writes it (GPU name, date) to DIR/RESULTS.md (default: $OUT, else benchmarks/).
--build-only (no GPU) builds the same engines and discards them: with FLASHRT_CACHE_DIR set to a folder of the
repository, the device can then be handed that compiled-cubin cache (run's `carry`) and skip every nvcc run,
which on a fresh machine took most of a 10-minute call (benchmarks/NOTES.md v14)."""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import workloads as W  # noqa: E402

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402


def bench(fn, iters=100, warm=20, reps=5) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / iters)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    buffers = [torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda") for _ in range(2)]
    t = bench(lambda: buffers[1].copy_(buffers[0]), iters=20, warm=3)
    buffers.clear()
    return 2 * 2 * 1024**3 / (t / 1e3) / 1e12


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a, b = out.double().flatten(), ref.double().flatten()
    return float((a - b).norm() / b.norm()), float(torch.dot(a, b) / (a.norm() * b.norm()))


def kernel_groups(eng, entry) -> dict[str, list[int]]:
    """An entry's launch indices per kind of kernel, labelled family + ops (e.g. "gemv MatMul+Add")."""
    span = range(entry.first, entry.first + entry.count)
    groups: dict[str, list[int]] = {}
    for r in eng.manifest["regions"]:
        if all(i in span for i in r["launches"]):
            groups.setdefault(r["kind"] + " " + ("+".join(r["ops"]))[:48], []).extend(r["launches"])
    return groups


def run_workload(name: str, precisions: list[str], with_torch: bool, tmp: str, bw: float,
                 profile: bool = False, ablate: bool = False) -> list[dict]:
    stack, inputs = W.make(name)
    nparam = sum(p.numel() for p in stack.parameters())
    onnx_path = os.path.join(tmp, f"{name}.onnx")
    x, kcs, vcs = inputs
    stateful = name.startswith("decode")  # the caches live in the engine (--max-context): no copy per step
    t0 = time.time()
    names = W.export_onnx(stack, inputs, onnx_path, dynamic_cache=stateful)
    export_s = time.time() - t0
    gx = [t.cuda() for t in (x, *kcs, *vcs)]
    stack = stack.cuda()
    with torch.no_grad():
        ref = stack(gx[0], gx[1:1 + len(kcs)], gx[1 + len(kcs):]).float()
    rows = []
    floor = {"bf16": nparam * 2 / (bw * 1e12) * 1e3, "fp8": nparam / (bw * 1e12) * 1e3,
             "nvfp4": nparam * 0.5625 / (bw * 1e12) * 1e3}
    base = {"workload": name, "params_M": nparam / 1e6, "floor_ms_bf16": floor["bf16"], "floor_ms_fp8": floor["fp8"]}
    compile_ms = None
    if with_torch:
        m = stack.to(torch.bfloat16)
        bx = [t.to(torch.bfloat16) for t in gx]
        args = (bx[0], bx[1:1 + len(kcs)], bx[1 + len(kcs):])
        with torch.inference_mode():
            ms = bench(lambda: m(*args), iters=50)
            rows.append({**base, "impl": "torch eager", "precision": "bf16", "ms": ms,
                         **dict(zip(("rel_l2", "cosine"), accuracy(m(*args).float(), ref)))})
            torch._dynamo.reset()
            cm = torch.compile(m, mode="max-autotune")
            t0 = time.time()
            for _ in range(3):
                cm(*args)
            torch.cuda.synchronize()
            compile_ms = bench(lambda: cm(*args), iters=100)
            rows.append({**base, "impl": "torch.compile max-autotune", "precision": "bf16", "ms": compile_ms,
                         "compile_s": time.time() - t0,
                         **dict(zip(("rel_l2", "cosine"), accuracy(cm(*args).float(), ref)))})
        stack = stack.float()
        del m, cm
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    for precision in precisions:
        engine_path = os.path.join(tmp, f"{name}_{precision}.frt")
        t0 = time.time()
        ctx = len(kcs) and kcs[0].shape[2]
        try:
            build_engine(onnx_path, [arch], engine_path, None, precision,
                         **({"max_context": ctx + 1} if stateful else {}))
        except flashrt.FlashRTError as e:
            rows.append({**base, "impl": "flashrt", "precision": precision, "error": str(e)})
            continue
        build_s = time.time() - t0
        eng = flashrt.load(engine_path, device="cuda")
        if stateful:  # the given caches become the engine's state at position ctx; one decode step is timed
            caches = {n: t.numpy() for n, t in zip(names[1:], (*kcs, *vcs))}
            eng.load_state(caches, ctx)
            out = torch.from_numpy(eng.run({"x": x.numpy()}, entry="decode")["y"]).cuda()
            eng.load_state(caches, ctx)
            lat = sorted(eng.latencies(1000, entry="decode"))
            ms = lat[len(lat) // 2]
            launches = eng.file.entry("decode").count
        else:
            out = torch.empty(ref.shape, dtype=torch.float32, device="cuda")
            eng.bind({**{n: t.data_ptr() for n, t in zip(names, gx)}, "y": out.data_ptr()})
            stream = torch.cuda.current_stream().cuda_stream
            ms = bench(lambda e=eng, s=stream: e.launch(s), iters=200)
            launches = len(eng.file.launches)
        torch.cuda.synchronize()
        rel, cos = accuracy(out, ref)
        row = {**base, "impl": "flashrt", "precision": precision, "ms": ms, "rel_l2": rel, "cosine": cos,
               "kernels": launches, "build_s": build_s, "export_s": export_s,
               "pct_floor": 100 * floor.get(precision, floor["bf16"]) / ms}
        if compile_ms:
            row["speedup_vs_compile"] = compile_ms / ms
        entry = eng.file.entries[-1]  # the timed one: the only entry, or decode
        if profile:  # time per kernel family, each launch alone (events around it; no graph)
            times = dict(zip(range(entry.first, entry.first + entry.count), eng.profile(entry=entry.name)))
            by_kind = {k: sum((times[i] for i in ix), 0.0) for k, ix in kernel_groups(eng, entry).items()}
            row["profile_ms"] = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
            row["profile_total_ms"] = sum(times.values())
        if ablate:  # in-graph cost per kernel family: full replay minus a replay without that family's launches
            groups = {k: [i - entry.first for i in ix] for k, ix in kernel_groups(eng, entry).items() if ix}
            marginal = eng.ablate(groups, entry=entry.name)
            row["ablate_ms"] = dict(sorted(marginal.items(), key=lambda kv: -kv[1]))
            row["ablate_total_ms"] = sum(marginal.values())
        rows.append(row)
        eng.close()
        os.unlink(engine_path)
    return rows


def build_only(names: list[str], precisions: list[str], arch: str) -> None:
    """The engines run_workload builds, built for arch and discarded (their cubins stay in the cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            stack, inputs = W.make(name)
            onnx_path = os.path.join(tmp, f"{name}.onnx")
            stateful = name.startswith("decode")
            W.export_onnx(stack, inputs, onnx_path, dynamic_cache=stateful)
            ctx = len(inputs[1]) and inputs[1][0].shape[2]
            for precision in precisions:
                t0 = time.time()
                build_engine(onnx_path, [arch], os.path.join(tmp, "e.frt"), None, precision,
                             **({"max_context": ctx + 1} if stateful else {}))
                print(f"{name} {precision}: built in {time.time() - t0:.0f} s", flush=True)


def table(rows: list[dict], gpu: str, bw: float, date: str | None = None) -> str:
    compile_ms = {r["workload"]: r["ms"] for r in rows if r["impl"].startswith("torch.compile") and "ms" in r}
    floors = {"bf16": "floor_ms_bf16", "fp8": "floor_ms_fp8"}
    lines = [f"## {gpu}, {date or datetime.date.today().isoformat()}", "",
             f"Copy bandwidth {bw:.2f} TB/s (bytes read + written). Floors: weight bytes / bandwidth.", "",
             "| workload | impl | precision | ms | vs torch.compile | % of floor | kernels | rel-L2 vs fp32 | cosine "
             "| tokens/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['impl']} | {r['precision']} | error: {r['error'][:80]} |||||| ")
            continue
        speedup = f"{compile_ms[r['workload']] / r['ms']:.2f}x" if r["workload"] in compile_ms else "-"
        floor = r.get(floors.get(r["precision"], ""), None)
        if r["precision"] == "nvfp4":  # 4.5 bits per weight: E2M1 values plus one E4M3 scale per 16
            floor = r["floor_ms_bf16"] * 4.5 / 16
        pct = f"{100 * floor / r['ms']:.0f}%" if floor else "-"
        lines.append(
            f"| {r['workload']} | {r['impl']} | {r['precision']} | {r['ms']:.3f} | {speedup} | {pct} | "
            f"{r.get('kernels', '-')} | {r['rel_l2']:.2e} | {r['cosine']:.6f} | "
            f"{1e3 / r['ms'] if r['workload'].startswith('decode') else 0:.0f} |".replace("| 0 |", "| - |"))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=list(W.WORKLOADS))
    ap.add_argument("--precisions", nargs="+", default=["bf16"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time each flashrt kernel alone, summed per kind")
    ap.add_argument("--ablate", action="store_true",
                    help="in-graph cost per kind: graph replay ms minus that of a graph without the kind's kernels")
    ap.add_argument("--out", default=os.environ.get("OUT", HERE))
    ap.add_argument("--build-only", action="store_true", help="build the engines for --arch only (no GPU)")
    ap.add_argument("--arch", default="sm_90a")
    a = ap.parse_args()
    if a.build_only:
        build_only(a.workloads, a.precisions, a.arch)
        return 0
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.workloads:
            rows += run_workload(name, a.precisions, not a.no_torch, tmp, bw, a.profile, a.ablate)
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, gpu, bw)
    print(text)
    with open(os.path.join(a.out, "RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"gpu": gpu, "date": datetime.date.today().isoformat(), "copy_TBps": bw, "rows": rows,
                   "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
