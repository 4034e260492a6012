"""Which decode fusion makes PDL on / off differ (benchmarks/NOTES.md v14): the CI-size sample decoder
built with each of them, run with PDL off twice and on once over a prefill and 12 decode steps; prints the
largest logit difference off vs off (the run-to-run spread of the float atomics), on vs off, and rel-L2 vs the
CPU reference. A race shows as on vs off far above off vs off.
    PYTHONPATH=. python3 scripts/pdl_diag.py [variant ...]      (default: all of VARIANTS)"""

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_state  # noqa: E402  (puts samples/ on sys.path)
import decoder as dec  # noqa: E402

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from flashrt.runtime.cuda import device_arch  # noqa: E402

VARIANTS = {"mlp_only": {}, "oproj": {"FLASHRT_FUSE_OPROJ": "1"}, "attn_prefetch": {"FLASHRT_ATTN_PREFETCH": "1"},
            "both": {"FLASHRT_FUSE_OPROJ": "1", "FLASHRT_ATTN_PREFETCH": "1"}}


def main() -> None:
    d = tempfile.mkdtemp()
    model = dec.make_model("ci")
    onnx_path = test_state.export_dynamic(model, os.path.join(d, "decoder.onnx"))
    major, minor = device_arch()
    prompt = dec.example_prompt(model, 7).numpy()
    for name in sys.argv[1:] or VARIANTS:
        env = VARIANTS[name]
        for k in ("FLASHRT_FUSE_OPROJ", "FLASHRT_ATTN_PREFETCH"):
            os.environ[k] = env.get(k, "0")
        path = os.path.join(d, f"{name}.frt")
        build_engine(onnx_path, [f"sm_{major}{minor}a"], path, precision="bf16", max_context=24, prefill_len=8)
        engines = {"cpu": flashrt.load(path, device="cpu")}
        for key, pdl in (("off1", "0"), ("off2", "0"), ("on", "1")):
            os.environ["FLASHRT_PDL"] = pdl
            engines[key] = flashrt.load(path, device="cuda")
        os.environ.pop("FLASHRT_PDL")
        outs = {k: e.run({"input_ids": prompt}, entry="prefill")["logits"] for k, e in engines.items()}
        worst = {"off_off": 0.0, "on_off": 0.0, "rel_cpu": 0.0}
        for _ in range(12):
            scale = float(np.abs(outs["off1"]).max())
            worst["off_off"] = max(worst["off_off"], float(np.abs(outs["off1"] - outs["off2"]).max()) / scale)
            worst["on_off"] = max(worst["on_off"], float(np.abs(outs["on"] - outs["off1"]).max()) / scale)
            worst["rel_cpu"] = max(worst["rel_cpu"], float(np.linalg.norm(outs["on"] - outs["cpu"])
                                                           / np.linalg.norm(outs["cpu"])))
            token = np.array([[int(np.argmax(outs["cpu"][0, -1]))]])
            outs = {k: e.run({"input_ids": token}, entry="decode")["logits"] for k, e in engines.items()}
        print(json.dumps({"variant": name, **worst}), flush=True)


if __name__ == "__main__":
    main()
