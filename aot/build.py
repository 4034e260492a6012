"""The build driver: model file -> .frt engine (import, passes, partition, memory plan, codegen, assemble)."""

import os
from dataclasses import dataclass
from collections.abc import Callable

import flashrt
from flashrt.aot.codegen import build_cubins, kernel_source, min_driver
from flashrt.aot.importers.onnx_import import import_onnx
from flashrt.aot.importers.safetensors_import import import_safetensors
from flashrt.aot.memory import plan_memory
from flashrt.aot.partition import EntryState, Program, Shared, partition
from flashrt.aot.state import StateTensor, entry_shapes, make_stateful
from flashrt.aot.views import Buffer
from flashrt.aot.passes import run_passes
from flashrt.aot.sensitivity import calibrate_and_plan
from flashrt.aot.targets import resolve_target
from flashrt.engine_format.format import BASE_ARENA, BASE_WEIGHTS, FORMAT_MAJOR, FORMAT_MINOR, Launch, Relocation, \
    arg_layout
from flashrt.engine_format.writer import engine_bytes, selftest_bytes, write_engine
from flashrt.errors import BuildError
from flashrt.kernels.dtypes import ITEMSIZE
from flashrt.kernels.registry import family

Progress = Callable[[str, int, int, int], None]


@dataclass
class BuildResult:
    path: str
    size: int
    regions: int
    launches: int
    kernels: int
    compute_nodes: int
    targets: list[str]
    warnings: list[str]


@dataclass
class Entry:
    """One entry point of an engine: its program and, for a stateful decoder, its token bookkeeping."""
    name: str
    program: Program
    state: EntryState | None = None
    token_axes: dict[str, int] | None = None


def assemble(entries: list[Entry] | Program, arena_bytes: int, weights: bytes, cubins: dict[str, bytes],
             resources: dict, provenance: dict, state: dict | None = None) -> dict:
    """The engine's parts, as engine_format.writer.engine_bytes takes them. `state`: the manifest's `state` and
    `context` (engine_format/SPEC.md §11) for a stateful engine."""
    if isinstance(entries, Program):
        entries = [Entry("main", entries)]
    kernel_index: dict[tuple[str, str], int] = {}
    kernels, launches, relocs, args_blob, regions, spans = [], [], [], bytearray(), [], []
    for entry_name, call in ((e.name, c) for e in entries for c in e.program.calls):
        fam = family(call.family)
        src = kernel_source(call.family, call.params)
        key = (call.family, src.params_json)
        spec = fam.arg_spec(call.params)
        offsets, size = arg_layout([t for _, t in spec])
        if key not in kernel_index:
            kernel_index[key] = len(kernels)
            kernels.append({"symbol": src.symbol, "family": call.family, "params": call.params,
                            "args": [{"name": n, "type": t, "offset": o} for (n, t), o in zip(spec, offsets)]})
        grid, block, smem = fam.launch_config(call.params)
        packed = bytearray(size)
        first = len(relocs)
        ptr_args = [o for (_, t), o in zip(spec, offsets) if t == "ptr"]
        if len(ptr_args) != len(call.args):
            raise BuildError(f"internal: region '{call.name}' has {len(call.args)} tensors for "
                             f"{len(ptr_args)} pointer parameters")
        for slot, ref in zip(ptr_args, call.args):
            base = BASE_WEIGHTS if ref.buffer.kind == "weight" else BASE_ARENA
            byte_offset = ref.buffer.offset + ref.offset * ITEMSIZE[ref.dtype]
            packed[slot:slot + 8] = byte_offset.to_bytes(8, "little")
            relocs.append(Relocation(slot, base, ref.span_bytes()))
        launches.append(Launch(kernel_index[key], grid, block, smem, len(args_blob), size, first, len(ptr_args)))
        # the region's value: its last argument before any fused cache writes and L2 prefetch spans, but for a
        # fused o-projection its first accumulator (a second one belongs to the MLP after it)
        named = {n: ref for (n, t), ref in zip([s for s in spec if s[1] == "ptr"], call.args)}
        own = [ref for n, ref in named.items() if not n.startswith(("l2_next", "cache"))]
        out = named["y0"] if call.params.get("oproj") else own[-1]
        regions.append({"name": call.name, "kind": call.family, "kernel": kernel_index[key],
                        "launches": [len(launches) - 1], "ops": call.ops, "source_nodes": call.source_nodes,
                        "precision": call.params.get("out_dtype", out.dtype), "reason": call.reason,
                        "output": {"value": out.buffer.name, "dtype": out.dtype, "shape": list(out.shape),
                                   "offset": out.buffer.offset + out.offset * ITEMSIZE[out.dtype]},
                        **({"entry": entry_name} if len(entries) > 1 else {})})
        args_blob += packed
        args_blob += bytes(-len(args_blob) % 8)

    def io(tensors):
        return [{"name": n, "dtype": b.dtype, "shape": list(s), "offset": b.offset, "nbytes": b.nbytes}
                for n, b, s in tensors]

    weight_table = {b.offset: {"name": b.name, "dtype": b.dtype, "shape": list(b.data.shape), "offset": b.offset,
                               "nbytes": b.nbytes} for e in entries for b in e.program.buffers if b.kind == "weight"}
    weight_table = [weight_table[o] for o in sorted(weight_table)]
    first = 0
    for e in entries:
        spans.append([first, len(e.program.calls)])
        first += len(e.program.calls)
    manifest = {
        "format": {"major": FORMAT_MAJOR, "minor": FORMAT_MINOR},
        "inputs": io(entries[0].program.inputs),
        "outputs": io(entries[0].program.outputs),
        "memory": {"arena_bytes": arena_bytes, "weights_bytes": len(weights)},
        "kernels": kernels,
        "regions": regions,
        "weights": weight_table,
        "targets": sorted(cubins),
        "kernel_resources": resources,
        "provenance": provenance,
        "pdl": True,  # every kernel waits (griddepcontrol.wait) before touching what an earlier launch wrote
    }
    if state is not None:
        manifest.update(state)
        manifest["entries"] = [
            {"name": e.name, "inputs": io(e.program.inputs), "outputs": io(e.program.outputs), "launches": span,
             "tokens": e.state.tokens, "length": e.state.length.offset if e.state.length else None,
             "needs_context": e.state.length is None, "token_axes": e.token_axes or {}}
            for e, span in zip(entries, spans)]
    return {"manifest": manifest, "cubins": cubins, "weights": weights, "launches": launches,
            "relocations": relocs, "arguments": bytes(args_blob)}


SELFTEST_REL_L2 = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}


def make_selftest(engine: bytes, precision: str, feeds: dict | None) -> bytes:
    """Run the engine on the CPU reference executor and bundle the inputs with the outputs it gives."""
    import numpy as np

    from flashrt.engine_format.reader import read_engine
    from flashrt.runtime.cpu import CPUEngine

    cpu = CPUEngine(read_engine(engine))
    feeds = cpu.example_inputs(0) if feeds is None else feeds
    cpu.check_inputs(feeds)
    outputs = cpu.run(feeds)
    blob, meta = bytearray(), {"inputs": [], "outputs": [], "max_rel_l2": SELFTEST_REL_L2[precision],
                               "source": "flashrt CPU reference executor on this engine"}
    for key, arrays, sig in (("inputs", feeds, cpu.inputs), ("outputs", outputs, cpu.outputs)):
        for t in sig:
            a = np.ascontiguousarray(arrays[t.name])
            meta[key].append({"name": t.name, "dtype": str(a.dtype), "shape": list(a.shape), "offset": len(blob),
                              "nbytes": a.nbytes})
            blob += a.tobytes()
            blob += bytes(-len(blob) % 256)
    return selftest_bytes(meta, bytes(blob))


def build_engine(model: str, targets: list[str], output: str | None = None, shapes: dict | None = None,
                 precision: str = "fp32", progress: Progress | None = None, bundle_test: bool = False,
                 test_inputs: dict | None = None, config: str | None = None, max_context: int | None = None,
                 prefill_len: int = 0, calib: str | None = None, min_cosine: float | None = None,
                 denoise_steps: int | None = None, deterministic: bool = False) -> BuildResult:
    """Compile `model` into an engine at `output`. With bundle_test, the engine carries sample inputs
    (test_inputs, or seeded random ones) and the outputs the CPU reference executor gives for them.
    `model` is an .onnx file, or a safetensors checkpoint (a folder with config.json, a .safetensors file or a
    .safetensors.index.json) whose graph is built from its config (`config`: a config.json elsewhere).
    With max_context, a decoder exported with KV-cache inputs becomes a stateful engine (aot/state.py) with a
    `decode` entry point (1 token) and, when prefill_len > 0, a `prefill` entry point (up to prefill_len tokens).
    With calib (an .npz of representative inputs), GEMM activations get static FP8 scales (aot/calibrate.py) and
    the GEMMs whose quantization would cost the most accuracy stay bf16, so that the outputs keep min_cosine
    (default: 0.999 for fp8, 0.99 for nvfp4 and auto) to the float32 model on those inputs (aot/sensitivity.py).
    denoise_steps: the flow-matching steps of a pi0 action-expert checkpoint (aot/importers/pi0_expert.py).
    deterministic: no kernel adds into a result with float atomics (the decode fusions through float32
    accumulators), so every run gives the same bits."""
    def stage(name: str) -> None:
        if progress:
            progress(name, 0, 0, 0)

    if min_cosine is not None and calib is None:
        raise BuildError("--min-cosine sets the accuracy target of --calib; give --calib inputs.npz too")
    archs = sorted({resolve_target(t) for t in (targets or ["thor"])})
    lower = model.lower()
    safetensors = os.path.isdir(model) or lower.endswith((".safetensors", ".safetensors.index.json"))
    if not os.path.exists(model):
        raise BuildError(f"{model}: no such model file")
    if not safetensors and not (os.path.isfile(model) and lower.endswith(".onnx")):
        raise BuildError(f"{model}: unrecognized model format; flashrt builds .onnx files, .safetensors files and "
                         "checkpoint folders (config.json + *.safetensors)")
    if denoise_steps is not None and not safetensors:
        raise BuildError(f"--denoise-steps applies to safetensors pi0 checkpoints; {model} is ONNX, whose loop is "
                         "its own (an ONNX Loop with a constant trip count, or the unrolled steps)")
    if denoise_steps is not None and max_context is not None:
        raise BuildError("--denoise-steps builds a stateless action expert; it cannot be combined with --max-context")
    if config is not None and not safetensors:
        raise BuildError(f"--config {config}: applies to safetensors checkpoints, not to {model}")
    model = os.path.normpath(model) if os.path.isdir(model) else model
    output = output or (model if os.path.isdir(model) else os.path.splitext(model)[0]) + ".frt"
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise BuildError(f"-o {output}: directory {out_dir} does not exist")

    merged, loop_steps = 0, None
    if calib is not None and max_context is not None:
        raise BuildError("--calib applies to stateless builds; it cannot be combined with --max-context")
    if max_context is not None:
        entries, state, caches, sha, merged = _stateful_entries(model, safetensors, shapes, precision, max_context,
                                                                prefill_len, stage, archs, deterministic)
        persistent = list(state.values())
    else:
        if prefill_len:
            raise BuildError("--prefill-len applies to stateful decoders; give --max-context too")
        stage("import")
        graph, sha = import_safetensors(model, config, shapes, denoise_steps) if safetensors else \
            import_onnx(model, shapes)
        stage("passes")
        merged = run_passes(graph)
        loop_steps = graph.loop_steps
        if calib is not None:
            stage("calibrate")
            calibrate_and_plan(graph, calib, precision, min_cosine, archs)
        stage("partition")
        entries, state, persistent = [Entry("main", partition(graph, precision, targets=archs,
                                                              deterministic=deterministic))], None, []
        caches = []
    stage("memory")
    programs = [e.program for e in entries]
    plan = plan_memory(programs, persistent)
    sources, seen = [], set()
    for call in (c for p in programs for c in p.calls):
        src = kernel_source(call.family, call.params)
        if src.symbol not in seen:
            seen.add(src.symbol)
            sources.append(src)
    cubins, resources, nvcc_version = build_cubins(sources, archs, progress)
    provenance = {
        "flashrt_version": flashrt.__version__,
        "source_name": os.path.basename(model),
        "source_sha256": sha,
        "build_flags": {"targets": archs, "precision": precision,
                        "shapes": {k: list(v) for k, v in sorted((shapes or {}).items())},
                        **({"max_context": max_context, "prefill_len": prefill_len} if max_context else {}),
                        **({"deterministic": True} if deterministic else {})},
        "nvcc_version": nvcc_version,
        "min_driver": min_driver(nvcc_version),
        "precision": precision,
        "compute_nodes": programs[0].compute_nodes,
        "intermediate_bytes_without_reuse": plan.intermediate_bytes,
        "common_subexpressions": merged,
        **({"loop_steps": loop_steps} if loop_steps else {}),
    }
    stage("write")
    manifest_state = None
    if state is not None:
        manifest_state = {
            "state": [{"name": c.name, "dtype": state[c.name].dtype, "shape": list(c.shape),
                       "offset": state[c.name].offset, "nbytes": state[c.name].nbytes, "axis": c.axis}
                      for c in caches],
            "context": {"max": max_context, "position": state["__position"].offset}}
    parts = assemble(entries, plan.arena_bytes, plan.weights, cubins, resources, provenance, manifest_state)
    data = engine_bytes(**parts)
    if bundle_test:
        stage("self-test")
        data = engine_bytes(**parts, selftest=make_selftest(data, precision, test_inputs))
    write_engine(output, data)
    launches = sum(len(p.calls) for p in programs)
    warnings = list(dict.fromkeys(w for p in programs for w in p.warnings))
    return BuildResult(output, len(data), launches, launches, len(sources), programs[0].compute_nodes, archs,
                       warnings)


def _stateful_entries(model: str, safetensors: bool, shapes: dict | None, precision: str, max_context: int,
                      prefill_len: int, stage, targets: list[str], deterministic: bool = False
                      ) -> tuple[list[Entry], dict[str, Buffer], list[StateTensor], str, int]:
    """Import the decoder once per entry point and partition each against shared weights and state."""
    if safetensors:
        raise BuildError("--max-context: stateful builds take an ONNX decoder exported with KV-cache inputs "
                         "(past/present); safetensors checkpoints build stateless engines")
    if shapes:
        raise BuildError("--shapes cannot be combined with --max-context: the entry points' shapes follow from "
                         "--max-context and --prefill-len")
    if not isinstance(max_context, int) or max_context < 2:
        raise BuildError(f"--max-context {max_context}: expected an integer >= 2")
    if not 0 <= prefill_len <= max_context:
        raise BuildError(f"--prefill-len {prefill_len}: expected 0 .. --max-context ({max_context})")
    shared = Shared()
    position = Buffer("__position", "state", "int32", 1)
    entries, sha, merged, infos = [], "", 0, {}
    for name, tokens in ([("prefill", prefill_len)] if prefill_len else []) + [("decode", 1)]:
        stage(f"import ({name})")
        graph, sha = import_onnx(model, entry_shapes(model, tokens, max_context))
        caches = make_stateful(graph, tokens, max_context, name)
        stage(f"passes ({name})")
        merged = run_passes(graph)
        stage(f"partition ({name})")
        length = Buffer(f"__length_{name}", "state", "int32", 1) if name == "prefill" else None
        entry = EntryState(position, length, tokens)
        program = partition(graph, precision, shared, entry, targets, deterministic)
        infos.update({c.name: c for c in caches})
        axes = {}
        for n, _, shape in program.inputs + program.outputs:
            axis = next((i for i, d in enumerate(shape) if i > 0 and d == tokens), None)
            if axis is not None and tokens > 1:
                axes[n] = axis
        entries.append(Entry(name, program, entry, axes))
        if length is not None:
            shared.state[length.name] = length
    shared.state[position.name] = position
    return entries, shared.state, [infos[k] for k in sorted(infos)], sha, merged
