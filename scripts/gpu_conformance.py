"""ONNX node tests on the GPU: every test directory under DIR (default: the passing list's tests in the local
node-test cache) is built for this GPU and run through the CUDA loader; outputs are compared with the test's
expected outputs the way tests/onnx_conformance.py compares the CPU executor's.

  python3 scripts/gpu_conformance.py [--dir DIR] [--out results.json]
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import onnx_conformance as oc  # noqa: E402

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from flashrt.runtime.cuda import device_arch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    major, minor = device_arch()
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    root = Path(a.dir) if a.dir else oc.node_test_dir()
    names = sorted(p.name for p in root.iterdir() if (p / "model.onnx").exists())
    import onnx

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model = onnx.load(str(root / name / "model.onnx"))
            sets = oc.load_data_sets(root / name, model)
            shapes = {k: tuple(v.shape) for k, v in sets[0][0].items() if isinstance(v, np.ndarray)}
            path = os.path.join(tmp, "e.frt")
            try:
                build_engine(str(root / name / "model.onnx"), [arch], path, shapes, "fp32")
                eng = flashrt.load(path, device="cuda")
                problems = [oc.compare(eng.run(feeds), expected) for feeds, expected in sets]
                eng.close()
                bad = [p for p in problems if p]
                results[name] = "PASS" if not bad else "MISMATCH " + bad[0][:300]
            except flashrt.FlashRTError as e:
                results[name] = "REJECTED " + str(e)[:200]
            except Exception as e:  # noqa: BLE001
                results[name] = f"CRASH {type(e).__name__}: {str(e)[:200]}"
    counts = {}
    for r in results.values():
        counts[r.split()[0]] = counts.get(r.split()[0], 0) + 1
    for name, r in results.items():
        if not r.startswith("PASS"):
            print(name, r)
    print(json.dumps({"arch": arch, "tests": len(results), **counts}))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0 if counts.get("CRASH", 0) == 0 and counts.get("MISMATCH", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
