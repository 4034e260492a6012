"""End-to-end VLA benchmark on the lent GPU (issue 6): images + prompt -> a 50x32 action chunk (10 flow-matching
steps) with the pi0-like model of samples/vla.py, as PyTorch eager, torch.compile and flashrt engines (one graph
launch per chunk), with the fp32 PyTorch reference for accuracy.

  python3 benchmarks/vla_bench.py [--scale full] [--layers N] [--precisions bf16 fp8] [--no-compile] [--out DIR]

--layers N keeps the full widths but cuts every stack (vision, prefix, expert) to N layers, for runs that must fit
a short device budget; the result says so. Writes DIR/vla_results.json and prints a markdown table."""

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "samples"))

import vla  # noqa: E402

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from bench import accuracy, bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="full", choices=sorted(vla.CONFIGS))
    ap.add_argument("--layers", type=int, help="cut every stack to this many layers (full widths kept)")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp8"])
    ap.add_argument("--vocab", type=int, help="cut the prefix vocabulary (the embedding table) to this size")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", HERE))
    a = ap.parse_args()
    cfg = copy.deepcopy(vla.CONFIGS[a.scale])
    if a.layers:
        for stack in ("vision", "prefix", "expert"):
            cfg[stack]["layers"] = a.layers
    if a.vocab:
        cfg["prefix"]["vocab"] = a.vocab
    vla.CONFIGS["bench"] = cfg
    model = vla.make_model("bench")
    inputs = vla.example_inputs(model)
    nparam = sum(p.numel() for p in model.parameters())
    label = f"{a.scale}" + (f", {a.layers} layers per stack" if a.layers else "") + \
        (f", vocab {a.vocab}" if a.vocab else "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        onnx_path = vla.export_onnx(model, os.path.join(tmp, "vla.onnx"), inputs)
        export_s = time.time() - t0
        print(f"exported in {export_s:.0f} s ({nparam / 1e9:.2f} B parameters)", flush=True)
        gpu = {k: v.cuda() for k, v in inputs.items()}
        model = model.cuda()
        with torch.no_grad():
            ref = model(gpu["images"], gpu["prompt_ids"], gpu["noise"]).float()
        m = model.to(torch.bfloat16)
        args = (gpu["images"].bfloat16(), gpu["prompt_ids"], gpu["noise"].bfloat16())
        compile_ms = None
        with torch.inference_mode():
            ms = bench(lambda: m(*args), iters=5, warm=2, reps=3)
            rows.append({"impl": "torch eager", "precision": "bf16", "ms": ms,
                         **dict(zip(("rel_l2", "cosine"), accuracy(m(*args).float(), ref)))})
            print(json.dumps(rows[-1]), flush=True)
            if not a.no_compile:
                torch._dynamo.reset()
                cm = torch.compile(m)
                t0 = time.time()
                for _ in range(2):
                    cm(*args)
                torch.cuda.synchronize()
                compile_ms = bench(lambda: cm(*args), iters=10, warm=2, reps=3)
                rows.append({"impl": "torch.compile", "precision": "bf16", "ms": compile_ms,
                             "compile_s": time.time() - t0,
                             **dict(zip(("rel_l2", "cosine"), accuracy(cm(*args).float(), ref)))})
                print(json.dumps(rows[-1]), flush=True)
                del cm
        m = model = None  # free the GPU copy before the engines load
        torch.cuda.empty_cache()
        major, minor = torch.cuda.get_device_capability()
        for precision in a.precisions:
            path = os.path.join(tmp, f"vla_{precision}.frt")
            t0 = time.time()
            build_engine(onnx_path, [f"sm_{major}{minor}a"], path, None, precision)
            build_s = time.time() - t0
            eng = flashrt.load(path, device="cuda")
            out = eng.run({k: v.numpy() for k, v in inputs.items()})["actions"]
            rel, cos = accuracy(torch.from_numpy(out).cuda(), ref)
            lat = sorted(eng.latencies(50, 5))
            ms = lat[len(lat) // 2]
            row = {"impl": "flashrt", "precision": precision, "ms": ms, "rel_l2": rel, "cosine": cos,
                   "kernels": len(eng.file.launches), "build_s": build_s, "export_s": export_s}
            if compile_ms:
                row["speedup_vs_compile"] = compile_ms / ms
            rows.append(row)
            print(json.dumps(row), flush=True)
            eng.close()
    gpu_name = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    lines = [f"## VLA action chunk ({label}; {nparam / 1e9:.2f} B parameters), {gpu_name}, {date}", "",
             "| impl | precision | ms per chunk | chunks/s | vs torch.compile | launches | cosine vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{compile_ms / r['ms']:.2f}x" if compile_ms else "-"
        lines.append(f"| {r['impl']} | {r['precision']} | {r['ms']:.2f} | {1e3 / r['ms']:.1f} | {speed} | "
                     f"{r.get('kernels', '-')} | {r['cosine']:.6f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(a.out, "vla_results.json"), "w") as f:
        json.dump({"gpu": gpu_name, "date": date, "config": label, "params": nparam, "rows": rows,
                   "torch": torch.__version__}, f, indent=1)
    with open(os.path.join(a.out, "VLA_RESULTS.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
