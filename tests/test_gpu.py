"""On an NVIDIA GPU: the CUDA loader runs the same engine as the CPU executor and matches it.
Skipped where no GPU is present (CI); run on the lent GPU machine (see README)."""

import numpy as np
import pytest
from conftest import GPU_ARCH, onnxruntime_outputs, rel_l2, requires_gpu

import flashrt
from flashrt.aot.build import build_engine
from flashrt.errors import DeviceError, InputError

pytestmark = [pytest.mark.gpu, requires_gpu]
GPU_VS_CPU = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 5e-3, "fp8": 1e-2, "nvfp4": 1e-2, "auto": 1e-2}
VS_ORT = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2, "fp8": 6e-2, "nvfp4": 2e-1, "auto": 6e-2}


@pytest.fixture(scope="module")
def engines(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_engines")
    built = {}
    for model, shapes in (("tiny_encoder", {}), ("mlp", {"x": (4, 32)})):
        for precision in GPU_VS_CPU:
            path = out / f"{model}_{precision}.frt"
            build_engine(str(samples / f"{model}.onnx"), [GPU_ARCH, "thor"], str(path), shapes, precision)
            built[(model, precision)] = path
    return built


@pytest.mark.parametrize("model", ["tiny_encoder", "mlp"])
@pytest.mark.parametrize("precision", list(GPU_VS_CPU))
def test_cuda_matches_cpu_and_onnxruntime(samples, engines, model, precision):
    gpu = flashrt.load(engines[(model, precision)], device="cuda")
    cpu = flashrt.load(engines[(model, precision)], device="cpu")
    assert gpu.arch == GPU_ARCH
    for seed in range(3):
        feeds = gpu.example_inputs(seed)
        got, want, ref = gpu.run(feeds), cpu.run(feeds), onnxruntime_outputs(samples / f"{model}.onnx", feeds)
        for name in want:
            assert np.isfinite(got[name]).all()
            assert rel_l2(got[name], want[name]) <= GPU_VS_CPU[precision], (name, rel_l2(got[name], want[name]))
            assert rel_l2(got[name], ref[name]) <= VS_ORT[precision]
    gpu.close()


def test_graph_replays_are_deterministic_and_fresh(engines):
    eng = flashrt.load(engines[("tiny_encoder", "bf16")], device="cuda")
    a, b = eng.example_inputs(1), eng.example_inputs(2)
    first = eng.run(a)
    other = eng.run(b)
    again = eng.run(a)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])
    eng.close()


def test_device_pointer_path(engines):
    from cuda.bindings import driver as cu

    eng = flashrt.load(engines[("mlp", "fp32")], device="cuda")
    feeds = eng.example_inputs(5)
    want = eng.run(feeds)
    x, (yinfo,) = feeds["x"], eng.outputs
    err, dx = cu.cuMemAlloc(x.nbytes)
    assert err == cu.CUresult.CUDA_SUCCESS
    err, dy = cu.cuMemAlloc(yinfo.nbytes)
    assert err == cu.CUresult.CUDA_SUCCESS
    cu.cuMemcpyHtoD(dx, x.ctypes.data, x.nbytes)
    cu.cuMemsetD8(dy, 0xFF, yinfo.nbytes)  # poison: every element must be written
    with pytest.raises(InputError, match="not 16-byte aligned"):
        eng.bind({"x": int(dx) + 4})
    eng.bind({"x": int(dx), "y": int(dy)})
    err, stream = cu.cuStreamCreate(0)
    for _ in range(3):
        eng.launch(stream)
    cu.cuStreamSynchronize(stream)
    y = np.empty(yinfo.shape, np.float32)
    cu.cuMemcpyDtoH(y.ctypes.data, dy, y.nbytes)
    np.testing.assert_array_equal(y, want["y"])
    assert eng.tensor_pointer("y") == int(dy)
    eng.unbind()
    np.testing.assert_array_equal(eng.run(feeds)["y"], want["y"])
    eng.close()
    # the caller's memory outlives the engine: the loader never releases the primary context
    cu.cuMemcpyDtoH(y.ctypes.data, dy, y.nbytes)
    np.testing.assert_array_equal(y, want["y"])
    for res in (cu.cuMemFree(dx), cu.cuMemFree(dy), cu.cuStreamDestroy(stream)):
        assert res[0] == cu.CUresult.CUDA_SUCCESS


def test_engine_without_a_cubin_for_this_gpu(samples, tmp_path):
    path = tmp_path / "thor_only.frt"
    build_engine(str(samples / "mlp.onnx"), ["sm_120a"], str(path), {"x": (1, 32)})
    plain = GPU_ARCH[:-1] if GPU_ARCH.endswith("a") else GPU_ARCH
    with pytest.raises(DeviceError, match=rf"this GPU is {plain}, but the engine has cubins only for sm_120a; "
                                          rf"rebuild with --target {GPU_ARCH}"):
        flashrt.load(path, device="cuda")


def test_replay_latency_is_reported(engines, capsys):
    """Not a timed assertion: prints the per-run latency of graph replays for the closing note."""
    import time

    for key in (("tiny_encoder", "fp32"), ("tiny_encoder", "bf16")):
        eng = flashrt.load(engines[key], device="cuda")
        feeds = eng.example_inputs()
        for _ in range(10):
            eng.run(feeds)
            eng.launch()  # the first launch of a graph uploads it: keep that out of the timing
        eng.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            eng.launch()
        eng.synchronize()
        dt = (time.perf_counter() - t0) / 200
        with capsys.disabled():
            print(f"\n{key}: {len(eng.file.launches)} launches, {dt * 1e6:.1f} us per graph replay")
        eng.close()


def test_bench_cli_reports_percentiles_and_regions(engines):
    import json
    import subprocess

    from conftest import flashrt_cli

    proc = subprocess.run(flashrt_cli() + ["bench", str(engines[("tiny_encoder", "bf16")]), "--iters", "200",
                                           "--json", "--profile"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert len(r["regions"]) == r["launches"] and all(x["ms"] > 0 and x["source_nodes"] for x in r["regions"])
