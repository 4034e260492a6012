"""Build every sample at every precision for this GPU, run each once through the CUDA loader and compare with
the CPU reference executor. Meant to run under compute-sanitizer:

  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/run_samples_cuda.py
"""

import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from flashrt.runtime.cuda import device_arch  # noqa: E402


def main() -> int:
    major, minor = device_arch()
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    tmp, worst = tempfile.mkdtemp(), 0.0
    for model, shapes in (("tiny_encoder", None), ("mlp", {"x": (3, 32)})):
        for precision in ("fp32", "bf16", "fp16"):
            path = os.path.join(tmp, f"{model}_{precision}.frt")
            build_engine(os.path.join(ROOT, "samples", f"{model}.onnx"), [arch], path, shapes, precision)
            gpu, cpu = flashrt.load(path, device="cuda"), flashrt.load(path, device="cpu")
            feeds = gpu.example_inputs(3)
            got, want = gpu.run(feeds), cpu.run(feeds)
            for k in want:
                err = float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k]))
                worst = max(worst, err if precision == "fp32" else 0.0)
                print(f"{model:13s} {precision} {k:7s} rel-L2 gpu vs cpu {err:.2e}")
            gpu.close()
    print(f"worst fp32 rel-L2 {worst:.2e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
