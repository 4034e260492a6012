"""The build driver: model file -> .frt engine (import, passes, partition, memory plan, codegen, assemble)."""

import os
from dataclasses import dataclass
from collections.abc import Callable

import flashrt
from flashrt.aot.codegen import build_cubins, kernel_source, min_driver
from flashrt.aot.importers.onnx_import import import_onnx
from flashrt.aot.importers.safetensors_import import import_safetensors
from flashrt.aot.memory import plan_memory
from flashrt.aot.partition import Program, partition
from flashrt.aot.passes import run_passes
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


def assemble(program: Program, arena_bytes: int, weights: bytes, cubins: dict[str, bytes], resources: dict,
             provenance: dict) -> dict:
    """The engine's parts, as engine_format.writer.engine_bytes takes them."""

    kernel_index: dict[tuple[str, str], int] = {}
    kernels, launches, relocs, args_blob, regions = [], [], [], bytearray(), []
    for call in program.calls:
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
        out = call.args[-1]
        regions.append({"name": call.name, "kind": call.family, "kernel": kernel_index[key],
                        "launches": [len(launches) - 1], "ops": call.ops, "source_nodes": call.source_nodes,
                        "precision": call.args[-1].dtype, "reason": call.reason,
                        "output": {"value": out.buffer.name, "dtype": out.dtype, "shape": list(out.shape),
                                   "offset": out.buffer.offset + out.offset * ITEMSIZE[out.dtype]}})
        args_blob += packed
        args_blob += bytes(-len(args_blob) % 8)

    def io(entries):
        return [{"name": n, "dtype": b.dtype, "shape": list(s), "offset": b.offset, "nbytes": b.nbytes}
                for n, b, s in entries]

    weight_table = sorted(({"name": b.name, "dtype": b.dtype, "shape": list(b.data.shape), "offset": b.offset,
                            "nbytes": b.nbytes} for b in program.buffers if b.kind == "weight"),
                          key=lambda w: w["offset"])
    manifest = {
        "format": {"major": FORMAT_MAJOR, "minor": FORMAT_MINOR},
        "inputs": io(program.inputs),
        "outputs": io(program.outputs),
        "memory": {"arena_bytes": arena_bytes, "weights_bytes": len(weights)},
        "kernels": kernels,
        "regions": regions,
        "weights": weight_table,
        "targets": sorted(cubins),
        "kernel_resources": resources,
        "provenance": provenance,
    }
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
                 test_inputs: dict | None = None, config: str | None = None) -> BuildResult:
    """Compile `model` into an engine at `output`. With bundle_test, the engine carries sample inputs
    (test_inputs, or seeded random ones) and the outputs the CPU reference executor gives for them.
    `model` is an .onnx file, or a safetensors checkpoint (a folder with config.json, a .safetensors file or a
    .safetensors.index.json) whose graph is built from its config (`config`: a config.json elsewhere)."""
    def stage(name: str) -> None:
        if progress:
            progress(name, 0, 0, 0)

    archs = sorted({resolve_target(t) for t in (targets or ["thor"])})
    lower = model.lower()
    safetensors = os.path.isdir(model) or lower.endswith((".safetensors", ".safetensors.index.json"))
    if not os.path.exists(model):
        raise BuildError(f"{model}: no such model file")
    if not safetensors and not (os.path.isfile(model) and lower.endswith(".onnx")):
        raise BuildError(f"{model}: unrecognized model format; flashrt builds .onnx files, .safetensors files and "
                         "checkpoint folders (config.json + *.safetensors)")
    if config is not None and not safetensors:
        raise BuildError(f"--config {config}: applies to safetensors checkpoints, not to {model}")
    model = os.path.normpath(model) if os.path.isdir(model) else model
    output = output or (model if os.path.isdir(model) else os.path.splitext(model)[0]) + ".frt"
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise BuildError(f"-o {output}: directory {out_dir} does not exist")

    stage("import")
    graph, sha = import_safetensors(model, config, shapes) if safetensors else import_onnx(model, shapes)
    stage("passes")
    run_passes(graph)
    stage("partition")
    program = partition(graph, precision)
    stage("memory")
    plan = plan_memory(program)
    sources, seen = [], set()
    for call in program.calls:
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
                        "shapes": {k: list(v) for k, v in sorted((shapes or {}).items())}},
        "nvcc_version": nvcc_version,
        "min_driver": min_driver(nvcc_version),
        "precision": precision,
        "compute_nodes": program.compute_nodes,
        "intermediate_bytes_without_reuse": plan.intermediate_bytes,
    }
    stage("write")
    parts = assemble(program, plan.arena_bytes, plan.weights, cubins, resources, provenance)
    data = engine_bytes(**parts)
    if bundle_test:
        stage("self-test")
        data = engine_bytes(**parts, selftest=make_selftest(data, precision, test_inputs))
    write_engine(output, data)
    return BuildResult(output, len(data), len(program.calls), len(program.calls), len(sources),
                       program.compute_nodes, archs, program.warnings)
