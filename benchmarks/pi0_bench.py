"""The pi0 action expert's chunk on the lent GPU (issue 6): N flow-matching steps of a Gemma-300M-shaped expert
over an 816-token prefix cache -> a 50 x 32 action chunk, as PyTorch eager, torch.compile and flashrt engines
built from the safetensors checkpoint with --denoise-steps (no ONNX export, so full size fits a short call).

  python3 benchmarks/pi0_bench.py [--scale full] [--precisions bf16 fp8] [--no-compile] [--out DIR]

PyTorch runs samples/pi0.py's reference (transformers' Gemma layers, lerobot's loop) in bf16, and the same math at
fixed shapes in plain torch ops (pi0.Pi0ExpertStatic) eager and under torch.compile(mode="max-autotune"): the
compiled baseline (dynamo recompiles the reference's growing cache on every step and gives up). Accuracy is the
cosine of the flow's displacement (actions - noise) to the fp32 reference. Writes DIR/pi0_results.json and
prints a markdown table (rows also as JSON lines as they are measured)."""

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
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "samples"))
sys.path.insert(0, HERE)

import pi0  # noqa: E402

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402
from bench import accuracy, bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="full", choices=sorted(pi0.CONFIGS))
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp8"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", HERE))
    a = ap.parse_args()
    steps = pi0.CONFIGS[a.scale]["num_steps"]
    model = pi0.make_model(a.scale)
    feeds = pi0.example_inputs(model)
    nparam = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = pi0.save_checkpoint(model, os.path.join(tmp, "pi0"))
        gpu = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
        m = model.cuda()
        with torch.no_grad():
            ref = m.float()(gpu["state"], gpu["noise"], gpu["prefix_keys"], gpu["prefix_values"], steps).float()
        disp_ref = ref - gpu["noise"]
        m = m.to(torch.bfloat16)
        args = tuple(gpu[k].bfloat16() for k in ("state", "noise", "prefix_keys", "prefix_values"))
        compile_ms = None
        static = pi0.Pi0ExpertStatic(m)
        temb = pi0.step_embeddings(m, steps).cuda()

        def disp(out: torch.Tensor) -> dict:
            return dict(zip(("rel_l2", "cosine"), accuracy(out.float() - gpu["noise"], disp_ref)))

        with torch.inference_mode():
            ms = bench(lambda: m(*args, steps), iters=5, warm=2, reps=3)
            add({"impl": "torch eager (transformers layers)", "precision": "bf16", "ms": ms, **disp(m(*args, steps))})
            ms = bench(lambda: static(*args, temb), iters=10, warm=2, reps=3)
            add({"impl": "torch eager (static)", "precision": "bf16", "ms": ms, **disp(static(*args, temb))})
            if not a.no_compile:
                torch._dynamo.reset()
                compiled = torch.compile(static.step, mode="max-autotune")  # one step, called N times

                def step(*step_args):  # each step's output feeds the next: a new CUDA-graph step, output kept
                    torch.compiler.cudagraph_mark_step_begin()
                    return compiled(*step_args).clone()
                static.step_fn = step
                t0 = time.time()
                for _ in range(3):
                    static(*args, temb)
                torch.cuda.synchronize()
                compile_ms = bench(lambda: static(*args, temb), iters=20, warm=2, reps=3)
                add({"impl": "torch.compile max-autotune (static step)", "precision": "bf16", "ms": compile_ms,
                     "compile_s": time.time() - t0, **disp(static(*args, temb))})
                static.step_fn = static.step
        m = model = static = None  # free the GPU copy before the engines load
        torch.cuda.empty_cache()
        major, minor = torch.cuda.get_device_capability()
        for precision in a.precisions:
            path = os.path.join(tmp, f"pi0_{precision}.frt")
            t0 = time.time()
            build_engine(str(folder), [f"sm_{major}{minor}a"], path, pi0.shapes(pi0.CONFIGS[a.scale]), precision,
                         denoise_steps=steps)
            build_s = time.time() - t0
            eng = flashrt.load(path, device="cuda")
            out = torch.from_numpy(eng.run(feeds)["actions"]).cuda()
            rel, cos = accuracy(out - gpu["noise"], disp_ref)
            lat = sorted(eng.latencies(50, 5))
            row = {"impl": "flashrt", "precision": precision, "ms": lat[len(lat) // 2], "rel_l2": rel, "cosine": cos,
                   "kernels": len(eng.file.launches), "build_s": build_s}
            if compile_ms:
                row["speedup_vs_compile"] = compile_ms / row["ms"]
            add(row)
            eng.close()
    gpu_name, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    lines = [f"## pi0 action expert, {a.scale} ({nparam / 1e6:.0f} M parameters, {steps} steps), {gpu_name}, {date}",
             "", "| impl | precision | ms per chunk | chunks/s | vs torch.compile | launches | displacement cosine |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{compile_ms / r['ms']:.2f}x" if compile_ms else "-"
        lines.append(f"| {r['impl']} | {r['precision']} | {r['ms']:.2f} | {1e3 / r['ms']:.1f} | {speed} | "
                     f"{r.get('kernels', '-')} | {r['cosine']:.6f} |")
    print("\n".join(lines))
    with open(os.path.join(a.out, "pi0_results.json"), "w") as f:
        json.dump({"gpu": gpu_name, "date": date, "scale": a.scale, "params": nparam, "steps": steps, "rows": rows,
                   "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
