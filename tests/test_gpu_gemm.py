"""On an NVIDIA GPU: the tensor-core GEMM (kernels/cuda/gemm_mma.cuh) launched alone on many shapes and staging
modes matches the GEMM family's numpy reference. The output is poisoned (NaN) before each launch, so an element
the kernel does not write fails. Skipped where no GPU (or no cuda-bindings) is present.

`GemmLauncher` is also the harness of benchmarks/gemm_sweep.py (timing over a CUDA graph)."""

import ctypes
import itertools

import numpy as np
import pytest
from conftest import GPU_ARCH, requires_gpu

from flashrt.aot.codegen import build_cubins, kernel_source
from flashrt.aot.quantize import quantize_fp8, quantize_nvfp4
from flashrt.kernels import gemm, gemm_mma
from flashrt.kernels.dtypes import ITEMSIZE, STORAGE, from_f32, to_f32
from flashrt.kernels.memory import Pointer

RMS = {"eps": 1e-6, "has_beta": False, "rms": True}
LN = {"eps": 1e-5, "has_beta": True, "rms": False}
BIAS_GELU = [["acc"], ["in", 0], ["add", 0, 1], ["gelu", 2]]
SILU = [["acc"], ["sigmoid", 0], ["mul", 0, 1]]
RESIDUAL = [["acc"], ["in", 0], ["add", 0, 1]]


def problem(M: int, N: int, K: int, batch=(), ln=None, quant=None, expr=None, a=None, b=None, dtype="bfloat16",
            config=None, aq=None, fp8_mma=False, wgmma=False, gated=False, wgmma_fp8=False,
            wgmma_nvfp4=False) -> dict:
    """GEMM family params: A [batch, M, K] and B stored [N, K] (a weight) unless views are given; the epilogue
    inputs follow from the expression (bias [N] for BIAS_GELU, a residual [batch, M, N] for RESIDUAL);
    aq: FP8 activations ("tensor" | "row"), multiplied as E4M3 with an fp8 weight when fp8_mma; config
    overrides fields of the chosen mma configuration (no mma key: the SIMT tiled kernel, as for float32);
    wgmma: the sm_90a wgmma kernel where it applies (kernels/cuda/gemm_wgmma.cuh); gated: B holds [gate | up]
    (2N rows), the expression reads both accumulators (wgmma only); wgmma_fp8 / wgmma_nvfp4: an fp8 / nvfp4
    weight may take wgmma."""
    nb = int(np.prod(batch)) if batch else 1
    a = a or {"dtype": dtype, "batch": [[nb, M * K]] if batch else [[1, 0]], "m": [[M, K]], "k": [[K, 1]]}
    if quant:
        b = {"dtype": {"fp8": "fp8_e4m3", "nvfp4": "nvfp4"}[quant], "quant": quant, "batch": [[1, 0]],
             "k": [[K, 1]], "n": [[2 * N if gated else N, K]]}
    weight = b is None
    width = 2 * N if gated else N
    b = b or {"dtype": dtype, "batch": [[nb, 0]], "k": [[K, 1]], "n": [[width, K]]}  # one weight for every batch
    expr = expr or [["acc"]]
    epi = []
    if expr is BIAS_GELU:
        epi = [{"dtype": "float32", "atoms": [[nb * M, 0], [N, 1]]}]
    elif expr is RESIDUAL:
        epi = [{"dtype": dtype, "atoms": [[nb * M * N, 1]]}]
    p = {"M": M, "N": N, "K": K, "batch": list(batch), "a": a, "b": b, "ln": ln, "out_dtype": dtype,
         "epi_inputs": epi, "expr": expr, "aq": aq}
    if gated:
        p["gated"] = True
    mma = gemm_mma.config(p, 0, 0, dtype, b_const=weight, fp8_mma=fp8_mma, wgmma=wgmma, wgmma_fp8=wgmma_fp8,
                          wgmma_nvfp4=wgmma_nvfp4)
    if mma:
        p["mma"] = {**mma, **(config or {})}
    return p


def _extent(atoms: list) -> int:
    return 1 + sum((size - 1) * stride for size, stride in atoms)


def make_args(p: dict, seed: int) -> dict[str, np.ndarray]:
    """Host bytes (uint8) of every kernel argument, filled with data; the output poisoned with 0xFF (NaN)."""
    rng = np.random.default_rng(seed)
    M, N, K, nb = p["M"], p["N"], p["K"], int(np.prod(p["batch"])) if p["batch"] else 1
    a, b = p["a"], p["b"]

    def values(n: int, dtype: str, scale: float = 1.0, mean: float = 0.0) -> np.ndarray:
        x = (rng.standard_normal(n) * scale + mean).astype(np.float32)
        return np.ascontiguousarray(from_f32(x, dtype)).view(np.uint8)

    out = {"a": values(_extent(a["batch"] + a["m"] + a["k"]), a["dtype"], mean=0.5 if p["ln"] else 0.0)}
    quant = b.get("quant")
    w = (rng.standard_normal((2 * N if p.get("gated") else N, K)) * 0.05).astype(np.float32)
    if quant == "fp8":
        q, scale = quantize_fp8(w)
        out.update(b=q.reshape(-1), b_scale=scale.view(np.uint8))
    elif quant == "nvfp4":
        packed, block, g = quantize_nvfp4(w)
        out.update(b=packed.reshape(-1), b_block=block.reshape(-1), b_global=np.array([g], np.float32).view(np.uint8))
    else:
        out["b"] = values(_extent(b["batch"] + b["k"] + b["n"]), b["dtype"], 0.05)
    if p.get("aq") == "tensor":  # A' up to ~4 sigma in range, the rest saturates at +-448
        out["a_scale"] = np.array([4.0 / 448], np.float32).view(np.uint8)
    elif p.get("aq") == "nvfp4":  # the global scale of ~5 sigma: block scales well inside E4M3's range
        out["a_scale"] = np.array([5.0 / (6 * 448)], np.float32).view(np.uint8)
    if p["ln"] and p["ln"].get("fold"):  # gamma already in b; colsum of b's values (~ sqrt(K) 0.05), beta . W
        width = 2 * N if p.get("gated") else N
        if not p["ln"]["rms"]:
            out["ln_colsum"] = values(width, "float32", 0.05 * K ** 0.5)
        if p["ln"]["has_beta"]:
            out["ln_bias"] = values(width, "float32", 0.1)
    elif p["ln"]:
        out["ln_gamma"] = values(K, "float32", 0.2, 1.0)
        if p["ln"]["has_beta"]:
            out["ln_beta"] = values(K, "float32", 0.1)
    for i, e in enumerate(p["epi_inputs"]):
        out[f"e{i}"] = values(_extent(e["atoms"]), e["dtype"])
    out["c"] = np.full(nb * M * N * ITEMSIZE[p["out_dtype"]], 0xFF, np.uint8)
    assert [n for n, _ in gemm.arg_spec(p)] == list(out), "argument order"
    return out


def reference(p: dict, host: dict[str, np.ndarray]) -> np.ndarray:
    bufs = {k: v.copy() for k, v in host.items()}
    gemm.reference(p, {k: Pointer(v, 0, v.size, k) for k, v in bufs.items()})
    return decode(bufs["c"], p["out_dtype"])


def decode(c: np.ndarray, dtype: str) -> np.ndarray:
    return to_f32(c.view(STORAGE[dtype]), dtype)


class GemmLauncher:
    """Compiles GEMM family kernels for this GPU and launches them on host-provided argument bytes."""

    def __init__(self):
        from cuda.bindings import driver as cu

        from flashrt.runtime.cuda import _check, primary_context

        self.cu, self.check = cu, _check
        _, self.ctx = primary_context(0)
        _check(cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.stream = _check(cu.cuStreamCreate(0), "cuStreamCreate")
        self.modules = []

    def compile(self, params_list: list[dict]) -> list:
        """One module holding the kernels of all params; returns their functions."""
        cu = self.cu
        sources = [kernel_source("gemm", p) for p in params_list]
        unique = list({s.symbol: s for s in sources}.values())  # equal params: one kernel (the link needs it)
        cubins, resources, _ = build_cubins(unique, [GPU_ARCH])
        for s in sources:
            r = resources[GPU_ARCH][s.symbol]
            assert r["spill_bytes"] == 0, (s.symbol, r)
        module = self.check(cu.cuModuleLoadData(cubins[GPU_ARCH]), "cuModuleLoadData")
        self.modules.append(module)
        fns = []
        for p, s in zip(params_list, sources):
            fn = self.check(cu.cuModuleGetFunction(module, s.symbol.encode()), "cuModuleGetFunction")
            smem = gemm.launch_config(p)[2]
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(cu.cuFuncSetAttribute(fn, attr, max(smem, 1)), "cuFuncSetAttribute")
            fns.append(fn)
        return fns

    def upload(self, host: dict[str, np.ndarray]) -> dict[str, int]:
        cu, dev = self.cu, {}
        for name, arr in host.items():
            ptr = self.check(cu.cuMemAlloc(max(arr.nbytes, 16)), "cuMemAlloc")
            self.check(cu.cuMemcpyHtoD(ptr, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")
            dev[name] = int(ptr)
        return dev

    def free(self, dev: dict[str, int]) -> None:
        for ptr in dev.values():
            self.cu.cuMemFree(ptr)

    def launch(self, fn, p: dict, dev: dict[str, int], keep: list) -> None:
        grid, block, smem = gemm.launch_config(p)
        values = (ctypes.c_uint64 * len(dev))(*dev.values())
        params = (ctypes.c_void_p * len(dev))(*[ctypes.addressof(values) + 8 * i for i in range(len(dev))])
        keep += [values, params]
        self.check(self.cu.cuLaunchKernel(fn, *grid, *block, smem, self.stream, ctypes.addressof(params), 0),
                   "cuLaunchKernel")

    def run(self, fn, p: dict, host: dict[str, np.ndarray]) -> np.ndarray:
        dev = self.upload(host)
        keep = []
        self.launch(fn, p, dev, keep)
        self.check(self.cu.cuStreamSynchronize(self.stream), "running the kernel")
        c = np.empty_like(host["c"])
        self.check(self.cu.cuMemcpyDtoH(c.ctypes.data, dev["c"], c.nbytes), "cuMemcpyDtoH")
        self.free(dev)
        return decode(c, p["out_dtype"])

    def time(self, fn, p: dict, host: dict[str, np.ndarray], launches: int = 20, reps: int = 10) -> float:
        """Median seconds per launch, from CUDA events around a graph of `launches` back-to-back launches."""
        cu, check = self.cu, self.check
        dev, keep = self.upload(host), []
        check(cu.cuStreamBeginCapture(self.stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
              "cuStreamBeginCapture")
        for _ in range(launches):
            self.launch(fn, p, dev, keep)
        graph = check(cu.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        exe = check(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        start, stop = check(cu.cuEventCreate(0), "cuEventCreate"), check(cu.cuEventCreate(0), "cuEventCreate")
        times = []
        for _ in range(reps + 2):
            check(cu.cuEventRecord(start, self.stream), "cuEventRecord")
            check(cu.cuGraphLaunch(exe, self.stream), "cuGraphLaunch")
            check(cu.cuEventRecord(stop, self.stream), "cuEventRecord")
            check(cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
            times.append(check(cu.cuEventElapsedTime(start, stop), "cuEventElapsedTime") / 1e3 / launches)
        cu.cuGraphExecDestroy(exe)
        cu.cuGraphDestroy(graph)
        cu.cuEventDestroy(start)
        cu.cuEventDestroy(stop)
        self.free(dev)
        return sorted(times[2:])[reps // 2]


def check_close(got: np.ndarray, want: np.ndarray, what) -> None:
    assert not np.isnan(got).any(), f"{what}: {int(np.isnan(got).sum())} elements not written (or NaN)"
    err = np.abs(got.astype(np.float64) - want)
    scale = np.abs(want).max() + 1e-6
    rel = float(np.linalg.norm(got.astype(np.float64) - want) / (np.linalg.norm(want) + 1e-30))
    # the same products summed in another order, then rounded to bf16 / f16 once: ~1 ulp of the output
    assert rel <= 4e-3 and err.max() <= 2e-2 * scale, (what, rel, float(err.max() / scale))


# (name, params): shapes from the benchmark workloads and the brief, every staging mode, split-K, tails
def cases() -> list[tuple[str, dict]]:
    out = []
    for M in (16, 50, 197, 256):
        for K, N in ((64, 768), (768, 2304), (1024, 1024), (3072, 768), (4096, 1024), (1024, 8192)):
            out.append((f"plain M{M} K{K} N{N}", problem(M, N, K)))
    for M, K, N in ((50, 1024, 2560), (197, 768, 3072), (16, 4096, 1024)):
        out.append((f"rms M{M} K{K} N{N}", problem(M, N, K, ln=RMS, expr=SILU)))
        out.append((f"layernorm M{M} K{K} N{N}", problem(M, N, K, ln=LN, expr=BIAS_GELU)))
        out.append((f"rms generic-A M{M} K{K} N{N}", problem(M, N, K, ln=RMS, config={"a_mode": 2})))
    for q in ("fp8", "nvfp4"):
        for M, K, N in ((50, 4096, 1024), (197, 768, 2304), (16, 1024, 3072)):
            out.append((f"{q} M{M} K{K} N{N}", problem(M, N, K, quant=q, expr=RESIDUAL)))
        out.append((f"{q} rms M50 K1024 N2560", problem(50, 2560, 1024, ln=RMS, quant=q)))
    out.append(("nvfp4 K%64!=0 M50 K1056 N1024", problem(50, 1024, 1056, quant="nvfp4")))
    for split in (1, 2, 3, 5, 8):
        out.append((f"split{split} M50 K4096 N1024", problem(50, 1024, 4096, expr=RESIDUAL, config={"split": split})))
        out.append((f"split{split} rms M50 K1024 N2560",
                    problem(50, 2560, 1024, ln=RMS, config={"split": split, "stages": 2})))
    for (bm, bn), wg in itertools.product(gemm_mma.TILES, (1, 2)):
        out.append((f"tile {bm}x{bn} wg{wg} M197 K1000 N1000",
                    problem(197, 1000, 1000, config={"bm": bm, "bn": bn, "wg": wg})))
    for wg in (1, 2):  # both warp-group counts through the norm panel, split-K, the quantized and generic paths
        out.append((f"wg{wg} rms split3 M50 K1024 N2560",
                    problem(50, 2560, 1024, ln=LN, expr=BIAS_GELU, config={"wg": wg, "split": 3, "stages": 2})))
        out.append((f"wg{wg} fp8 split4 M50 K4096 N1024",
                    problem(50, 1024, 4096, quant="fp8", expr=RESIDUAL, config={"wg": wg, "split": 4})))
        out.append((f"wg{wg} nvfp4 M197 K768 N2304", problem(197, 2304, 768, quant="nvfp4", config={"wg": wg})))
        out.append((f"wg{wg} generic rms M16 K1024 N768",
                    problem(16, 768, 1024, ln=RMS, config={"wg": wg, "a_mode": 2, "b_mode": 3, "bm": 16})))
    # attention-style batched views: scores Q K^T ([12, 197, 64] x [12, 64, 197]) and P V, heads interleaved
    q = {"dtype": "bfloat16", "batch": [[12, 64]], "m": [[197, 768]], "k": [[64, 1]]}
    kt = {"dtype": "bfloat16", "batch": [[12, 64]], "k": [[64, 1]], "n": [[197, 768]]}
    out.append(("batched QK^T [12,197,64]x[12,64,197]", problem(197, 197, 64, batch=(12,), a=q, b=kt)))
    pm = {"dtype": "bfloat16", "batch": [[12, 197 * 197]], "m": [[197, 197]], "k": [[197, 1]]}
    v = {"dtype": "bfloat16", "batch": [[12, 64]], "k": [[197, 768]], "n": [[64, 1]]}
    out.append(("batched PV [12,197,197]x[12,197,64]", problem(197, 64, 197, batch=(12,), a=pm, b=v)))
    # attention output transposed back to [T, heads * hd] as the o-projection's A (k over two atoms)
    ao = {"dtype": "bfloat16", "batch": [[1, 0]], "m": [[50, 256]], "k": [[8, 50 * 256], [256, 1]]}
    out.append(("o-proj over transposed heads", problem(50, 1024, 2048, a=ao, expr=RESIDUAL)))
    out.append(("float32 A, rounded to bf16", problem(64, 256, 512, a={"dtype": "float32", "batch": [[1, 0]],
                                                                        "m": [[64, 512]], "k": [[512, 1]]})))
    out.append(("fp16 operands", problem(50, 1024, 1024, ln=RMS, dtype="float16", expr=SILU)))
    out.append(("generic A and B loads", problem(50, 768, 1024, expr=RESIDUAL, config={"a_mode": 2, "b_mode": 3})))
    out.append(("fp8 generic B loads", problem(50, 768, 1024, quant="fp8", config={"b_mode": 3})))
    # FP8 activations: static / per-row scales, as E4M3 x E4M3 (fp8_mma) or staged exactly in bf16; every A path
    for aq, fp8 in itertools.product(("tensor", "row"), (False, True)):
        tag = f"aq-{aq}{'-e4m3' if fp8 else ''}"
        kw = {"aq": aq, "fp8_mma": fp8, "quant": "fp8"}
        out.append((f"{tag} M50 K4096 N1024", problem(50, 1024, 4096, expr=RESIDUAL, **kw)))
        out.append((f"{tag} rms M50 K1024 N2560", problem(50, 2560, 1024, ln=RMS, **kw)))
        out.append((f"{tag} layernorm split4 M197 K768 N2304",
                    problem(197, 2304, 768, ln=LN, expr=BIAS_GELU, config={"split": 4, "stages": 2}, **kw)))
        out.append((f"{tag} generic-A rms split2 M50 K1024 N768",
                    problem(50, 768, 1024, ln=RMS, config={"a_mode": 2, "split": 2}, **kw)))
        for wg in (1, 2):
            out.append((f"{tag} wg{wg} M197 K3072 N768", problem(197, 768, 3072, config={"wg": wg}, **kw)))
        out.append((f"{tag} K%64!=0 M50 K1040 N512", problem(50, 512, 1040, **kw)))
        if not fp8:  # bf16 and nvfp4 weights with FP8 activations: exact E4M3 values in the bf16 mma
            out.append((f"{tag} bf16 weight M50 K1024 N1024", problem(50, 1024, 1024, aq=aq)))
            out.append((f"{tag} nvfp4 weight rms M50 K1024 N2560", problem(50, 2560, 1024, ln=RMS, aq=aq,
                                                                           quant="nvfp4")))
    # NVFP4 activations (E2M1 values x run-time E4M3 block scales, staged exactly in bf16): every A path
    for name, kw in [("ring", {}), ("rms panel", {"ln": RMS}), ("layernorm panel split4", {"ln": LN, "config": {
            "split": 4, "stages": 2}}), ("generic-A rms split2", {"ln": RMS, "config": {"a_mode": 2, "split": 2}}),
            ("wg2", {"config": {"wg": 2}})]:
        out.append((f"aq-nvfp4 {name} nvfp4 weight M50 K1024 N768", problem(50, 768, 1024, aq="nvfp4", quant="nvfp4",
                                                                            **kw)))
    out.append(("aq-nvfp4 bf16 weight M197 K768 N2304", problem(197, 2304, 768, aq="nvfp4", expr=RESIDUAL)))
    out.append(("aq-nvfp4 transposed A M50 K1024 N512",
                problem(50, 512, 1024, aq="nvfp4", a={"dtype": "bfloat16", "batch": [[1, 0]], "m": [[50, 1]],
                                                      "k": [[1024, 50]]})))
    for aq in ("tensor", "row", "nvfp4"):  # the SIMT tiled kernel (float32 operands)
        out.append((f"tiled aq-{aq} rms M40 K512 N300", problem(40, 300, 512, ln=RMS, aq=aq, dtype="float32")))
    return out


pytestmark = [pytest.mark.gpu, requires_gpu]
CASES = cases() if GPU_ARCH else []


def compile_cases(cases: list[tuple[str, dict]]) -> tuple["GemmLauncher", dict]:
    """One module of every case's kernel: (the launcher, name -> function)."""
    launcher = GemmLauncher()
    fns = launcher.compile([p for _, p in cases])
    return launcher, dict(zip([n for n, _ in cases], fns))


def check_case(compiled: tuple, name: str, p: dict) -> None:
    """The case's kernel against the numpy reference on two seeds of fresh inputs."""
    launcher, fns = compiled
    for seed in (0, 1):
        host = make_args(p, seed)
        got = launcher.run(fns[name], p, host)
        check_close(got, reference(p, host), (name, p.get("mma"), seed))


@pytest.fixture(scope="module")
def compiled():
    return compile_cases(CASES)


@pytest.mark.parametrize("name, p", CASES, ids=[n for n, _ in CASES])
def test_mma_gemm_matches_reference(compiled, name, p):
    check_case(compiled, name, p)


def test_mma_gemm_is_deterministic(compiled):
    """Split-K sums the cluster's partial tiles in rank order: repeated runs give identical bits."""
    launcher, fns = compiled
    name, p = next((n, p) for n, p in CASES if n.startswith("split8"))
    host = make_args(p, 3)
    first = launcher.run(fns[name], p, host)
    for _ in range(3):
        np.testing.assert_array_equal(launcher.run(fns[name], p, host), first)
