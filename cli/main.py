"""The `flashrt` command line. Every user error is one line on stderr and a non-zero exit, never a traceback."""

import json
import os
import re
import sys
import time

import click
import numpy as np

from flashrt.errors import FlashRTError


class _Progress:
    """Build progress on a terminal: one rewritten line with the stage, kernels compiled and cache hits."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.monotonic()

    def __call__(self, stage: str, done: int, total: int, hits: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if stage == "compile":
            text = f"compile: {done}/{total} kernels ({hits} cache hits)"
        elif stage == "link":
            text = f"link: {done}/{total} targets"
        else:
            text = f"{stage}..."
        click.echo(f"\r\033[K[{elapsed:5.1f}s] {text}", nl=False, err=True)

    def finish(self) -> None:
        if self.enabled:
            click.echo("\r\033[K", nl=False, err=True)


def _fail(message: str, code: int = 1):
    click.echo(f"flashrt: error: {message}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="flashrt", prog_name="flashrt")
def cli() -> None:
    """FlashRT: compile models into self-contained batch-1 GPU engines (.frt) and run them."""


@cli.command()
def targets() -> None:
    """List the known targets and their GPU architectures."""
    from flashrt.aot.targets import TARGETS

    for name, (arch, desc) in TARGETS.items():
        click.echo(f"{name:10s} {arch:9s} {desc}")
    click.echo("Any sm_XX or sm_XXa (XX >= 75) is accepted as a raw architecture.")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--target", "-t", "target_list", multiple=True, help="thor, rtx5090, h100, ... or sm_XX[a]; repeats.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine file (default: MODEL with .frt).")
@click.option("--shapes", help="Static sizes for dynamic inputs: name:1x3x224x224,other:1x16")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "fp8", "nvfp4", "auto"]), default="fp32",
              show_default=True, help="fp8/nvfp4: quantized GEMM weights, bf16 activations (the model's Q/DQ "
                                      "and --calib add FP8 activations); auto: the planner picks per region and "
                                      "target, FP8 activations where E4M3 mma is native (flashrt inspect shows why)")
@click.option("--bundle-test", is_flag=True, help="Store sample inputs and expected outputs for `flashrt verify`.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help=".npz of inputs for --bundle-test.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="config.json of a .safetensors MODEL (default: the one beside it).")
@click.option("--max-context", type=int, help="Stateful decoder: KV caches of this many tokens live in the engine "
                                               "(an ONNX export with past/present cache inputs and outputs).")
@click.option("--prefill-len", type=int, default=0, show_default=True,
              help="With --max-context: also a prefill entry point taking up to this many tokens.")
@click.option("--calib", "calib_path", type=click.Path(dir_okay=False),
              help=".npz of representative inputs (one sample, or n stacked): static FP8 activation scales for "
                   "every GEMM (with --precision fp8, nvfp4 or auto).")
@click.option("--min-cosine", type=float, help="With --calib: GEMMs stay bf16 (most sensitive first) until the "
                                               "outputs' cosine to fp32 on the calib inputs reaches this "
                                               "[default: 0.999 for fp8, 0.99 for nvfp4 and auto]")
@click.option("--deterministic", is_flag=True, help="No float atomics: every run gives the same bits (decode keeps "
              "its o-projection and MLP down projection as launches of their own).")
@click.option("--denoise-steps", type=int, help="pi0 action-expert checkpoint: flow-matching steps in the engine "
                                                "(one launch list per action chunk) [default: the config's "
                                                "num_steps, else 10]")
def build(model: str, target_list: tuple, output: str | None, shapes: str | None, precision: str,
          bundle_test: bool, inputs_path: str | None, config_path: str | None, max_context: int | None,
          prefill_len: int, calib_path: str | None, min_cosine: float | None, denoise_steps: int | None,
          deterministic: bool) -> None:
    """Compile MODEL (.onnx, .safetensors, or a checkpoint folder with config.json) into an engine."""
    from flashrt.aot.build import build_engine
    from flashrt.aot.importers.onnx_import import parse_shapes

    if inputs_path and not bundle_test:
        raise FlashRTError("--inputs applies to --bundle-test; add --bundle-test or drop --inputs")
    test_inputs = _load_inputs(inputs_path) if inputs_path else None
    progress = _Progress(sys.stderr.isatty())
    try:
        result = build_engine(model, list(target_list) or ["thor"], output, parse_shapes(shapes), precision, progress,
                              bundle_test, test_inputs, config=config_path, max_context=max_context,
                              prefill_len=prefill_len, calib=calib_path, min_cosine=min_cosine,
                              denoise_steps=denoise_steps, deterministic=deterministic)
    finally:
        progress.finish()
    for w in result.warnings:
        click.echo(f"flashrt: warning: {w}", err=True)
    click.echo(f"built {result.path}: {result.launches} launches for {result.compute_nodes} compute nodes, "
               f"{result.kernels} kernels, targets {', '.join(result.targets)}, {result.size / 1e6:.2f} MB")


_LAYER = re.compile(r"(?:layers?|blocks?)[./_]?(\d+)(?=[./_]|$)")


def _variant(kernel: dict) -> str:
    """Which implementation a kernel is, for the GEMM families: wgmma (sm_90a), mma.sync, SIMT tiles, GEMV; with
    a fused norm (folded into the weight or a prologue), gating and quantized operands."""
    p, family = kernel.get("params") or {}, kernel["family"]
    if family not in ("gemm", "gemv") or not isinstance(p, dict):
        return family
    mma = p.get("mma") if isinstance(p.get("mma"), dict) else None
    name = "gemv" if family == "gemv" else "wgmma" if mma and mma.get("wgmma") else "mma.sync" if mma else "simt"
    ln = p.get("ln") if isinstance(p.get("ln"), dict) else None
    extras = [("norm folded" if ln.get("fold") else "norm prologue") if ln else "", "gated" if p.get("gated") else "",
              f"{p['b']['quant']} weight" if isinstance(p.get("b"), dict) and p["b"].get("quant") else "",
              f"{p['aq']} activations" if p.get("aq") else ""]
    return ", ".join([name] + [e for e in extras if e])


def _kernels_per_layer(regions: list[dict], entry: str | None) -> dict:
    """Launches per transformer layer, from the layer index in each region's source node names (a region
    belongs to the layer most of its source nodes name); {} when the names carry no layer index."""
    per: dict[int, int] = {}
    for r in regions:
        if entry is not None and r.get("entry", entry) != entry:
            continue
        found = [int(m.group(1)) for n in r["source_nodes"] for m in [_LAYER.search(n)] if m]
        if found:
            layer = max(set(found), key=found.count)
            per[layer] = per.get(layer, 0) + len(r["launches"])
    if not per:
        return {}
    counts = sorted(per.values())
    return {"layers": len(per), "median": counts[len(counts) // 2], "min": counts[0], "max": counts[-1]}


def _inspect_dict(ef) -> dict:
    m = ef.manifest
    return {
        "path": ef.path,
        "format": f"{ef.major}.{ef.minor}",
        "inputs": m["inputs"], "outputs": m["outputs"],
        "targets": ef.targets,
        "provenance": m["provenance"],
        "memory": m["memory"],
        "regions": m["regions"],
        "kernels": [{"symbol": k["symbol"], "family": k["family"], "variant": _variant(k),
                     "resources": {a: m.get("kernel_resources", {}).get(a, {}).get(k["symbol"], {})
                                   for a in ef.targets}} for k in m["kernels"]],
        "launches": len(ef.launches),
        "entries": [{"name": e.name, "launches": e.count, "tokens": e.tokens,
                     "inputs": [t.name for t in e.inputs], "outputs": [t.name for t in e.outputs]}
                    for e in ef.entries],
        "state": m.get("state", []), "context": m.get("context"),
        "kernels_per_layer": {e.name: _kernels_per_layer(m["regions"], e.name if len(ef.entries) > 1 else None)
                              for e in ef.entries},
        "sections": [{"kind": s.kind, "name": s.name, "offset": s.offset, "size": s.size,
                      "sha256": s.sha256.hex()} for s in ef.sections],
    }


@cli.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(engine: str, as_json: bool) -> None:
    """Show an engine's signature, targets, provenance, regions, kernels, memory and sections."""
    from flashrt.engine_format.reader import read_engine

    info = _inspect_dict(read_engine(engine))
    if as_json:
        click.echo(json.dumps(info, indent=1, sort_keys=True))
        return
    p = info["provenance"]
    click.echo(f"engine {info['path']} (format {info['format']})")
    click.echo(f"  source     {p.get('source_name')} sha256 {str(p.get('source_sha256'))[:16]}…")
    click.echo(f"  built by   flashrt {p.get('flashrt_version')}, nvcc {p.get('nvcc_version')}, "
               f"precision {p.get('precision')}, min driver {p.get('min_driver')}")
    click.echo(f"  targets    {', '.join(info['targets'])}")
    for key in ("inputs", "outputs"):
        for t in info[key]:
            click.echo(f"  {key[:-1]:6s}     {t['name']}: {t['dtype']}{t['shape']}")
    if info["context"]:
        for e in info["entries"]:
            click.echo(f"  entry      {e['name']}: {e['launches']} launches, up to {e['tokens']} token(s), "
                       f"inputs {', '.join(e['inputs'])} -> {', '.join(e['outputs'])}")
        state_mb = sum(t["nbytes"] for t in info["state"]) / 1e6
        click.echo(f"  state      {len(info['state'])} caches of {info['context']['max']} tokens, {state_mb:.3f} MB")
    mem = info["memory"]
    click.echo(f"  memory     weights {mem['weights_bytes'] / 1e6:.3f} MB, arena {mem['arena_bytes'] / 1e6:.3f} MB")
    click.echo(f"  regions    {len(info['regions'])} ({info['launches']} launches, "
               f"{p.get('compute_nodes', '?')} compute nodes in the source)")
    for name, k in info["kernels_per_layer"].items():
        if k:
            spread = f" (min {k['min']}, max {k['max']})" if k["min"] != k["max"] else ""
            click.echo(f"  per layer  {name}: {k['median']} launches per layer over {k['layers']} layers{spread}")
    for r in info["regions"]:
        nodes = ", ".join(r["source_nodes"])
        click.echo(f"    [{r['launches'][0]:3d}] {r['kind']:9s} {r['precision']:8s} {'+'.join(r['ops'])}  <- {nodes}")
        if r.get("reason"):
            click.echo(f"          {r['reason']}")
    click.echo(f"  kernels    {len(info['kernels'])}")
    for k in info["kernels"]:
        res = "; ".join(f"{a}: {v.get('registers', '?')} regs, {v.get('shared_bytes', '?')} B smem, "
                        f"{v.get('spill_bytes', 0)} B spill" for a, v in k["resources"].items())
        click.echo(f"    {k['symbol']}  {k['variant']}  {res}")
    click.echo("  sections")
    for s in info["sections"]:
        click.echo(f"    kind {s['kind']} {s['name']:12s} offset {s['offset']:>10d} size {s['size']:>10d}")


def _load_inputs(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise FlashRTError(f"--inputs {path}: not a readable .npz file ({e})") from None


def _rate_unit(eng) -> str:
    """tokens/s for a decoder, chunks/s for an engine that runs a loop's steps (a flow-matching action chunk)."""
    if eng.stateful:
        return "tokens/s"
    steps = eng.manifest["provenance"].get("loop_steps")
    return f"chunks/s ({steps} steps per chunk)" if steps else "runs/s"


@cli.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True)
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help=".npz of inputs (default: random).")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), help="Write the outputs to this .npz.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@click.option("--entry", help="Entry point (stateful engines: prefill or decode; default: the first).")
@click.option("--steps", default=1, show_default=True,
              help="Run this many times; a stateful engine then decodes greedily, feeding back each step's argmax.")
def run(engine: str, device: str, inputs_path: str | None, output_path: str | None, seed: int, as_json: bool,
        entry: str | None, steps: int) -> None:
    """Run ENGINE on the CPU reference executor or the GPU: once, or --steps times (tokens/s, chunks/s, runs/s)."""
    import flashrt
    from flashrt.runtime.engine import host_dtype

    if steps < 1:
        raise FlashRTError(f"--steps {steps}: expected at least 1")
    eng = flashrt.load(engine, device=device)
    entry = eng.entry_info(entry).name
    feeds = _load_inputs(inputs_path) if inputs_path else eng.example_inputs(seed, entry)
    t0 = time.perf_counter()
    outputs = eng.run(feeds, entry=entry)
    elapsed = time.perf_counter() - t0
    tokens = []
    t1 = time.perf_counter()
    for _ in range(steps - 1):
        if eng.stateful:  # greedy: the first output's last row is the next token's logits
            decode = eng.entry_info("decode")
            logits = next(iter(outputs.values()))
            tokens.append(int(np.argmax(logits.reshape(-1, logits.shape[-1])[-1])))
            name = decode.inputs[0].name
            outputs = eng.run({name: np.array([[tokens[-1]]], dtype=host_dtype(decode.inputs[0].dtype))},
                              entry="decode")
        else:
            outputs = eng.run(feeds, entry=entry)
    rest = time.perf_counter() - t1
    if output_path:
        tmp = output_path + ".partial.npz"
        np.savez(tmp, **outputs)
        os.replace(tmp, output_path)
    summary = {name: {"dtype": str(a.dtype), "shape": list(a.shape),
                      "mean": float(np.mean(a)) if a.size else 0.0, "std": float(np.std(a)) if a.size else 0.0,
                      "min": float(np.min(a)) if a.size else 0.0, "max": float(np.max(a)) if a.size else 0.0,
                      "finite": bool(np.isfinite(a).all())} for name, a in outputs.items()}
    rate = (steps - 1) / rest if steps > 1 and rest > 0 else None
    unit = _rate_unit(eng)
    if as_json:
        click.echo(json.dumps({"device": device, "entry": entry, "seconds": elapsed, "outputs": summary,
                               "steps": steps, "rate": rate, "unit": unit, "tokens": tokens}, indent=1,
                              sort_keys=True))
        return
    click.echo(f"ran {engine} ({entry}) on {device} in {elapsed * 1e3:.2f} ms (first run, includes warm-up)")
    if rate is not None:
        click.echo(f"then {steps - 1} more step(s): {rate:.1f} {unit} (host round trip per step included)"
                   + (f"; tokens {tokens[:16]}{' ...' if len(tokens) > 16 else ''}" if tokens else ""))
    for name, s in summary.items():
        click.echo(f"  {name}: {s['dtype']}{s['shape']} mean {s['mean']:.6g} std {s['std']:.6g} "
                   f"min {s['min']:.6g} max {s['max']:.6g}")


@cli.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True)
def verify(engine: str, device: str) -> None:
    """Check an engine on arrival: checksums, a cubin for this GPU, and its bundled self-test."""
    from flashrt.runtime.selftest import verify as run_verify

    report = run_verify(engine, device)
    click.echo(f"checksums: ok ({report.sections} sections)")
    click.echo(f"cubin: {report.arch} for this GPU" if report.arch else "device: cpu (reference executor)")
    if not report.bundled:
        _fail(f"{engine}: no self-test bundled; build with --bundle-test to verify it on a device")
    for o in report.outputs:
        click.echo(f"{'PASS' if o.passed else 'FAIL'} {o.name}: rel-L2 {o.rel_l2:.3e} (limit {report.max_rel_l2:.1e}), "
                   f"max abs {o.max_abs:.3e}")
    if not report.passed:
        _fail(f"{engine}: self-test failed on {device}")
    click.echo(f"verify: PASS on {device}")


@cli.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--iters", default=1000, show_default=True, help="CUDA graph replays to time.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--profile", is_flag=True, help="Also time each region alone, mapped to its source nodes.")
@click.option("--entry", help="Entry point to time (stateful engines: decode by default).")
@click.option("--context", type=int, help="Stateful engines: the position to time at (default: half of "
                                          "--max-context); the caches hold zeros.")
def bench(engine: str, iters: int, as_json: bool, profile: bool, entry: str | None, context: int | None) -> None:
    """Latency of ENGINE on the GPU: p50/p90/p99 over CUDA graph replays (inputs as they are in the arena)."""
    import flashrt

    eng = flashrt.load(engine, device="cuda")
    entry = eng.entry_info(entry if entry or not eng.stateful else "decode").name
    e = eng.entry_info(entry)
    if eng.stateful:
        context = eng.file.max_context // 2 if context is None else context
        if not 0 <= context <= eng.file.max_context - e.tokens:
            raise FlashRTError(f"--context {context}: expected 0 .. {eng.file.max_context - e.tokens} "
                               f"(--max-context {eng.file.max_context}, {e.tokens} token(s) per {entry} run)")
        eng.load_state({}, context)
    elif context is not None:
        raise FlashRTError("--context applies to stateful engines (built with --max-context)")
    eng.run(eng.example_inputs(entry=entry), entry=entry)
    if eng.stateful:
        eng.load_state({}, context)
    lat = sorted(eng.latencies(iters, entry=entry))
    pct = {p: lat[min(len(lat) - 1, int(len(lat) * p / 100))] for p in (50, 90, 99)}
    result = {"gpu_arch": eng.arch, "iters": iters, "entry": entry, "launches": e.count,
              "p50_ms": pct[50], "p90_ms": pct[90], "p99_ms": pct[99],
              "per_second": 1e3 / pct[50] * (e.tokens or 1), "unit": _rate_unit(eng)}
    if eng.stateful:
        result["context"] = context
    if profile:
        times = dict(zip(range(e.first, e.first + e.count), eng.profile(entry=entry)))
        regions = eng.manifest["regions"]
        result["regions"] = sorted(({"name": r["name"], "kind": r["kind"], "ms": sum(times[i] for i in r["launches"]),
                                     "source_nodes": r["source_nodes"]} for r in regions
                                    if all(i in times for i in r["launches"])), key=lambda r: -r["ms"])
    eng.close()
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    where = f" ({entry} at position {context})" if eng.stateful else ""
    click.echo(f"{engine}{where} on {result['gpu_arch']}: {result['launches']} launches, p50 {pct[50] * 1e3:.1f} us, "
               f"p90 {pct[90] * 1e3:.1f} us, p99 {pct[99] * 1e3:.1f} us over {iters} graph replays: "
               f"{result['per_second']:.1f} {result['unit']}")
    if profile:
        total = sum(r["ms"] for r in result["regions"])
        click.echo(f"regions launched one by one: {total * 1e3:.1f} us in all")
        for r in result["regions"][:25]:
            click.echo(f"  {r['ms'] * 1e3:8.2f} us  {r['kind']:9s} {r['name']}  <- {', '.join(r['source_nodes'][:4])}")


def _num(x: float | None, fmt: str) -> str:
    if x is None:
        return "-"
    return format(x, fmt) if np.isfinite(x) else str(x)


def _compare_row(e: dict, width: int) -> str:
    name = e["name"] or f"({e['region']})"
    name = name if len(name) <= width else "…" + name[-(width - 1):]
    launch = "  -" if e.get("launch") is None else f"{e['launch']:3d}"
    where = f"  [{launch}] {e['kind']} {e['precision']}" if "region" in e else ""
    if "skipped" in e:
        return f"{name:{width}s}  skipped: {e['skipped']}{where}"
    verdict = {True: "pass", False: "FAIL", None: "-"}[e.get("passed")]
    return (f"{name:{width}s}  {_num(e['max_abs'], '10.3e')}  {_num(e['rel_l2'], '10.3e')}  "
            f"{_num(e['cosine'], '12.9f')}  {verdict:6s}{where}".rstrip())


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False),
              help=".npz of inputs (default: the engine's seeded random inputs).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the engine runs (the source always runs on the CPU, in fp32).")
@click.option("--per-region", is_flag=True, help="Also compare every region's output (ONNX sources, --device cpu).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--rtol", type=float, help="Pass when max abs error <= atol + rtol * max|reference|.")
@click.option("--atol", type=float, help="See --rtol (either may be given alone; the other is then 0).")
@click.option("--min-cosine", type=float, help="Pass when the cosine of engine and reference is at least this.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="config.json of a .safetensors MODEL (default: the one beside it).")
def compare(model: str, engine: str, inputs_path: str | None, device: str, per_region: bool, as_json: bool,
            rtol: float | None, atol: float | None, min_cosine: float | None, config_path: str | None) -> None:
    """Run the source MODEL (onnxruntime or PyTorch, fp32) and ENGINE on the same inputs; show each output's
    max abs error, rel-L2 and cosine. Exit 0 when every output meets the tolerances given (always, without
    any), 1 when one does not, 2 on an error. With --per-region, regions are marked for information."""
    from flashrt.aot.compare import compare as run_compare
    from flashrt.aot.compare import judge

    try:
        for flag, v in (("--rtol", rtol), ("--atol", atol)):
            if v is not None and not (v >= 0 and np.isfinite(v)):
                raise FlashRTError(f"{flag} {v}: expected a finite number >= 0")
        if min_cosine is not None and not -1 <= min_cosine <= 1:
            raise FlashRTError(f"--min-cosine {min_cosine}: expected a number in [-1, 1]")
        feeds = _load_inputs(inputs_path) if inputs_path else None
        result = run_compare(model, engine, feeds, device, per_region, config=config_path)
    except FlashRTError as e:
        _fail(str(e).replace("\n", " "), 2)
    passed = judge(result, rtol, atol, min_cosine)
    if as_json:
        def clean(x):  # strict JSON: non-finite numbers become null (each entry's "finite" says so)
            if isinstance(x, float) and not np.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        click.echo(json.dumps(clean(result), indent=1, allow_nan=False))
    else:
        click.echo(f"{engine} ({result['precision']}, {device}) vs {model}: {result['source']}")
        shapes = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in result["input_shapes"].items())
        click.echo(f"inputs: {result['inputs']}: {shapes}")
        for note in result["notes"]:
            click.echo(f"note: {note}")
        entries = result["outputs"] + result.get("regions", [])
        width = min(48, max([len("output")] + [len(e["name"] or "") for e in entries]))
        click.echo(f"{'output':{width}s}  {'max abs':>10s}  {'rel-L2':>10s}  {'cosine':>12s}  result")
        for e in result["outputs"]:
            click.echo(_compare_row(e, width))
        if "regions" in result:
            click.echo(f"regions ({len(result['regions'])}, in launch order): each region's output against the "
                       "source value of that name; [launch] kind precision")
            for e in result["regions"]:
                click.echo(_compare_row(e, width))
        tol = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in result["tolerances"].items() if v is not None)
        if passed is not None:
            bad = [e["name"] for e in result["outputs"] if not e["passed"]]
            click.echo(f"PASS: every output within {tol}" if passed else f"FAIL: {', '.join(bad)} outside {tol}")
    if passed is False:
        sys.exit(1)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except FlashRTError as e:
        _fail(str(e).replace("\n", " "))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # a bug: still one line, with a way to get the traceback
        if os.environ.get("FLASHRT_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {str(e)[:200]} (set FLASHRT_DEBUG=1 for the traceback)", 3)


if __name__ == "__main__":
    main()
