"""Time the tensor-core GEMM kernel alone on the GEMM shapes of the expert and ViT workloads, for the cost
model's choice and a grid of alternative tiles / split-K factors (each checked against the numpy reference).

  python3 benchmarks/gemm_sweep.py [--out DIR] [--quick]      (on the GPU machine; writes DIR/gemm_sweep.json)
  python3 benchmarks/gemm_sweep.py --wgmma [--shapes ...]     (sm_90a: the wgmma kernel's choice next to the
                                                               mma.sync one, both without the norm prologue)
  python3 benchmarks/gemm_sweep.py --wgmma-fused               (sm_90a: the norm GEMMs as mma.sync with its
                                          prologue, plain wgmma, wgmma with the norm folded, and gated + folded)"""

import argparse
import itertools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from test_gpu_gemm import RESIDUAL, RMS, SILU, GemmLauncher, check_close, make_args, problem, reference  # noqa: E402

from flashrt.kernels import gemm_mma  # noqa: E402

# name: (M, N, K, norm prologue, epilogue) -- the GEMMs of one layer (bench workloads, batch 1)
SHAPES = {
    "expert qkv": (50, 2560, 1024, RMS, None),
    "expert o": (50, 1024, 2048, None, RESIDUAL),
    "expert gate/up": (50, 8192, 1024, RMS, None),
    "expert down": (50, 1024, 4096, None, RESIDUAL),
    "vit qkv": (197, 2304, 768, RMS, None),
    "vit o": (197, 768, 768, None, RESIDUAL),
    "vit fc1": (197, 3072, 768, RMS, SILU),
    "vit fc2": (197, 768, 3072, None, RESIDUAL),
}


def variants(M: int, N: int, K: int, ln, expr, quant, quick: bool) -> list[dict]:
    chosen = problem(M, N, K, ln=ln, quant=quant, expr=expr)
    out = [chosen]
    if quick:
        return out
    kt = -(-K // gemm_mma.BK)
    for (bm, bn), split, wg in itertools.product(gemm_mma.TILES, (1, 2, 3, 4, 6, 8), (1, 2)):
        if (bm > 2 * M + 16 and bm > 16) or split > kt or (bm, bn) in ((16, 128), (128, 32)):
            continue
        p = problem(M, N, K, ln=ln, quant=quant, expr=expr)
        a_mode = 1 if ln else 0
        stages = next((s for s in (4, 3, 2) if gemm_mma.smem_bytes(K, bm, bn, split, s, a_mode, p["mma"]["b_mode"], wg)
                       <= 200 * 1024), None)
        if stages is None:
            continue
        p["mma"].update(bm=bm, bn=bn, split=split, a_mode=a_mode, stages=stages, wg=wg)
        if p["mma"] != chosen["mma"]:
            out.append(p)
    return out


def checked_time(launcher, fn, p: dict, host: dict, want, name: str) -> tuple[bool, float]:
    """(the kernel matched the reference, its seconds per launch); a mismatch is printed, not raised."""
    ok = True
    try:
        check_close(launcher.run(fn, p, host), want, name)
    except AssertionError as e:
        ok = False
        print("MISMATCH", name, p["mma"], str(e)[:200], flush=True)
    return ok, launcher.time(fn, p, host)


def compare_wgmma(launcher: GemmLauncher, names: list[str]) -> list[dict]:
    """The wgmma kernel (kernels/cuda/gemm_wgmma.cuh) and the mma.sync one, each as its chooser configures it, on
    the same plain GEMM + epilogue (wgmma has no norm prologue, so neither gets one here)."""
    rows = []
    for name in names:
        M, N, K, _, expr = SHAPES[name]
        ps = [problem(M, N, K, expr=expr), problem(M, N, K, expr=expr, wgmma=True)]
        fns = launcher.compile(ps)
        host = make_args(ps[0], 0)
        want = reference(ps[0], host)
        times = []
        for p, fn in zip(ps, fns):
            ok, t = checked_time(launcher, fn, p, host, want, name)
            kernel = "wgmma" if p["mma"].get("wgmma") else "mma.sync"
            times.append(t)
            rows.append({"shape": name, "kernel": kernel, "M": M, "N": N, "K": K, "mma": p["mma"], "us": t * 1e6,
                         "tflops": 2 * M * N * K / t / 1e12, "ok": ok})
        c = ps[1]["mma"]
        print(f"{name:15s} mma.sync {times[0] * 1e6:6.2f} us  wgmma {times[1] * 1e6:6.2f} us "
              f"({times[0] / times[1]:.2f}x; BM{c['bm']} BN{c['bn']} SK{c['split']} ST{c['stages']})", flush=True)
    return rows


SWIGLU = [["acc"], ["sigmoid", 0], ["mul", 0, 1], ["acc", 1], ["mul", 2, 3]]


def compare_fused(launcher: GemmLauncher) -> list[dict]:
    """What the norm prologue and the gated epilogue cost the wgmma kernel: each norm GEMM of SHAPES as mma.sync
    with its prologue (the FLASHRT_WGMMA=0 build), plain wgmma (no norm), wgmma with the norm folded, and for
    the gate/up GEMMs the gated + folded kernel (N / 2 outputs of silu(g) * u). Each against its reference."""
    rows = []
    for name, (M, N, K, ln, _) in SHAPES.items():
        if not ln:
            continue
        ps = {"mma.sync+norm": problem(M, N, K, ln=ln), "wgmma plain": problem(M, N, K, wgmma=True),
              "wgmma fold": problem(M, N, K, ln={**ln, "fold": True}, wgmma=True)}
        if N >= 2 * K:  # gate/up
            ps["wgmma gated+fold"] = problem(M, N // 2, K, ln={**ln, "fold": True}, wgmma=True, gated=True,
                                             expr=SWIGLU)
        fns = launcher.compile(list(ps.values()))
        line = []
        for (kind, p), fn in zip(ps.items(), fns):
            host = make_args(p, 0)
            ok, t = checked_time(launcher, fn, p, host, reference(p, host), f"{name} {kind}")
            rows.append({"shape": name, "kernel": kind, "M": M, "N": p["N"], "K": K, "mma": p["mma"], "us": t * 1e6,
                         "ok": ok})
            line.append(f"{kind} {t * 1e6:6.2f}")
        print(f"{name:15s} " + "  ".join(line) + " us", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", HERE))
    ap.add_argument("--quick", action="store_true", help="only the cost model's choices")
    ap.add_argument("--quant", nargs="*", default=["", "fp8"], help="'' (bf16 weights), fp8, nvfp4")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--wgmma", action="store_true", help="the sm_90a wgmma kernel next to mma.sync (no sweep)")
    ap.add_argument("--wgmma-fused", action="store_true", help="norm fold / gated costs of the wgmma kernel")
    args = ap.parse_args()
    launcher = GemmLauncher()
    if args.wgmma_fused:
        with open(os.path.join(args.out, "gemm_sweep_wgmma_fused.json"), "w") as f:
            json.dump(compare_fused(launcher), f, indent=1)
        return
    if args.wgmma:
        with open(os.path.join(args.out, "gemm_sweep_wgmma.json"), "w") as f:
            json.dump(compare_wgmma(launcher, args.shapes), f, indent=1)
        return
    rows = []
    for quant in args.quant:
        for name in args.shapes:
            M, N, K, ln, expr = SHAPES[name]
            t0 = time.time()
            ps = variants(M, N, K, ln, expr, quant or None, args.quick)
            fns = launcher.compile(ps)
            host = make_args(ps[0], 0)
            want = reference(ps[0], host)
            for i, (p, fn) in enumerate(zip(ps, fns)):
                ok, t = checked_time(launcher, fn, p, host, want, name)
                c = p["mma"]
                est = gemm_mma.estimate(p, c)
                rows.append({"shape": name, "quant": quant or "bf16", "M": M, "N": N, "K": K, "chosen": i == 0,
                             "mma": c, "us": t * 1e6, "est_us": est * 1e6, "tflops": 2 * M * N * K / t / 1e12,
                             "ok": ok})
            best = min((r for r in rows if r["shape"] == name and r["quant"] == (quant or "bf16")),
                       key=lambda r: r["us"])
            first = next(r for r in rows if r["shape"] == name and r["quant"] == (quant or "bf16") and r["chosen"])
            print(f"{name:15s} {quant or 'bf16':5s} chosen {first['us']:6.2f} us ({first['tflops']:5.1f} TFLOP/s, "
                  f"est {first['est_us']:.2f}) {first['mma']}\n{'':21s} best {best['us']:6.2f} us "
                  f"({best['tflops']:5.1f} TFLOP/s) {best['mma']}  [{len(ps)} variants, {time.time() - t0:.0f} s]",
                  flush=True)
    with open(os.path.join(args.out, "gemm_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
