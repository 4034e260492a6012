"""Engines under load, on the GPU: a long soak, several engines on threads, and load/unload cycles.

  python scripts/gpu_soak.py [--runs 100000] [--cycles 1000] [--out soak.json]

Builds the sample engines for this GPU, then
  1. runs one engine --runs times: outputs must equal the first run's bit for bit; device memory (cuMemGetInfo)
     and host memory (VmRSS) must not grow;
  2. runs four engines at once, each on its own thread and stream, and compares with serial runs;
  3. loads and closes an engine --cycles times: device and host memory must return to where they were.
Prints one JSON object and exits non-zero if any check fails."""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from flashrt.runtime.cuda import cu, device_arch  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def device_used_mb() -> float:
    free, total = cu.cuMemGetInfo()[1:]
    return (total - free) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--out")
    a = ap.parse_args()
    major, minor = device_arch()
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    tmp = tempfile.mkdtemp()
    engines = {}
    for model, shapes, precision in (("tiny_encoder", None, "bf16"), ("tiny_encoder", None, "fp32"),
                                     ("mlp", {"x": (4, 32)}, "fp16"), ("mlp", {"x": (1, 32)}, "fp32")):
        path = os.path.join(tmp, f"{model}_{precision}_{len(engines)}.frt")
        build_engine(os.path.join(ROOT, "samples", f"{model}.onnx"), [arch], path, shapes, precision)
        engines[path] = precision
    paths = list(engines)
    report, ok = {"gpu_arch": arch}, True

    # 1. soak
    eng = flashrt.load(paths[0], device="cuda")
    feeds = eng.example_inputs(1)
    first = eng.run(feeds)
    for _ in range(200):
        eng.run(feeds)
    dev0, rss0 = device_used_mb(), rss_mb()
    mismatches = 0
    t0 = time.perf_counter()
    for _ in range(a.runs):
        out = eng.run(feeds)
        if any(not np.array_equal(out[k], first[k]) for k in first):
            mismatches += 1
    dt = time.perf_counter() - t0
    dev1, rss1 = device_used_mb(), rss_mb()
    report["soak"] = {"runs": a.runs, "mismatches": mismatches, "seconds": dt, "us_per_run": dt / a.runs * 1e6,
                      "device_mb_before": dev0, "device_mb_after": dev1, "rss_mb_before": rss0, "rss_mb_after": rss1}
    ok &= mismatches == 0 and dev1 - dev0 < 1 and rss1 - rss0 < 16
    eng.close()

    # 2. concurrent engines, one thread and stream each
    loaded = [flashrt.load(p, device="cuda") for p in paths]
    inputs = [e.example_inputs(7 + i) for i, e in enumerate(loaded)]
    serial = [e.run(x) for e, x in zip(loaded, inputs)]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(2000):
            out = loaded[i].run(inputs[i])
            if any(not np.array_equal(out[k], serial[i][k]) for k in out):
                errors.append(f"engine {i} differs from its serial run")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(loaded))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["threads"] = {"engines": len(loaded), "runs_each": 2000, "seconds": time.perf_counter() - t0,
                         "errors": errors}
    ok &= not errors
    for e in loaded:
        e.close()

    # 3. load / unload cycles
    for _ in range(20):
        flashrt.load(paths[0], device="cuda").close()
    dev0, rss0 = device_used_mb(), rss_mb()
    t0 = time.perf_counter()
    for _ in range(a.cycles):
        e = flashrt.load(paths[0], device="cuda")
        e.run(feeds)
        e.close()
    dev1, rss1 = device_used_mb(), rss_mb()
    report["load_unload"] = {"cycles": a.cycles, "seconds": time.perf_counter() - t0, "device_mb_before": dev0,
                             "device_mb_after": dev1, "rss_mb_before": rss0, "rss_mb_after": rss1}
    ok &= dev1 - dev0 < 1 and rss1 - rss0 < 32
    report["passed"] = bool(ok)
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
