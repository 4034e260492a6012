"""Build the benchmark's three workloads (benchmarks/workloads.py: decode step, action-expert step, ViT) for this
GPU and run each engine once through the CUDA loader, checking the output against the PyTorch model on the CPU
(fp32). Meant to run under compute-sanitizer (issue 5's memcheck check):

  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_workloads.py [--precisions ...]
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import workloads as W  # noqa: E402

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from flashrt.runtime.cuda import device_arch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["decode", "expert", "vit"])
    ap.add_argument("--precisions", nargs="+", default=["bf16"])
    args = ap.parse_args()
    major, minor = device_arch()
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    tmp, worst = tempfile.mkdtemp(), 1.0
    for name in args.workloads:
        stack, (x, kcs, vcs) = W.make(name)
        stateful = name.startswith("decode")
        onnx_path = os.path.join(tmp, f"{name}.onnx")
        names = W.export_onnx(stack, (x, kcs, vcs), onnx_path, dynamic_cache=stateful)
        with torch.no_grad():
            want = stack(x, kcs, vcs).numpy().reshape(-1)
        for precision in args.precisions:
            path = os.path.join(tmp, f"{name}_{precision}.frt")
            ctx = kcs[0].shape[2] if kcs else 0
            build_engine(onnx_path, [arch], path, None, precision, **({"max_context": ctx + 1} if stateful else {}))
            eng = flashrt.load(path, device="cuda")
            if stateful:
                eng.load_state({n: t.numpy() for n, t in zip(names[1:], (*kcs, *vcs))}, ctx)
                got = eng.run({"x": x.numpy()}, entry="decode")["y"]
            else:
                got = eng.run({n: t.numpy() for n, t in zip(names, (x, *kcs, *vcs))})["y"]
            got = np.asarray(got, np.float64).reshape(-1)
            cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want) + 1e-30))
            worst = min(worst, cos)
            print(f"{name:7s} {precision:5s} {len(eng.file.launches):4d} launches  cosine vs torch fp32 {cos:.6f}",
                  flush=True)
            eng.close()
    print(f"worst cosine {worst:.6f}")
    return 0 if worst >= 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
