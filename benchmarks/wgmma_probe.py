"""Standalone wgmma (sm_90a) GEMM probe at the batch-1 shapes of the expert and ViT workloads:
C[M,N] = A[M,K] . W[N,K]^T, bf16 operands and result, f32 accumulation (kernel and design: wgmma_probe.cu).

  PYTHONPATH=. python3 benchmarks/wgmma_probe.py [--out DIR] [--shapes NAME ...] [--quick]   (H100/H200, < 90 s)
  python3 benchmarks/wgmma_probe.py --selfcheck       (no GPU: numpy model of swizzle, descriptors, fragments, split-K)
  python3 benchmarks/wgmma_probe.py --compile-only    (no GPU: ptxas registers / spills per configuration)

Each configuration is compiled to its own cubin (nvcc -cubin, sm_90a, in parallel), then the configurations of a shape
run in a worker subprocess (least risky first), so a crash or a sticky CUDA error costs one configuration, not the run:
the parent starts a new worker for the rest. Per configuration: one launch on poisoned C checked against numpy (f64
sum of the bf16 inputs; rows past M must stay untouched), then CUDA-graph timings of the kernel and of an empty kernel
with the same launch shape (the per-node floor). The graph cycles through copies of W totalling >= 256 MB, so every
launch streams its weights from DRAM, not from the 50 MB L2; A and C stay the same (as activations would be in L2).
One JSON line per (shape, config) on stdout; all rows in DIR/wgmma_probe.json (DIR: --out, else $OUT, else .)."""

import argparse
import ctypes
import hashlib
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "wgmma_probe.cu")
L2_DEFEAT = 256 << 20  # bytes of W copies a graph cycles through
SMEM_LIMIT = 227 * 1024  # dynamic shared memory per block on sm_90
BUDGET_S = 85.0  # the whole run, compile included
LINE_TIMEOUT_S = 20.0  # a worker silent this long is killed (the kernel traps after 2 s of a stuck mbarrier wait)

SHAPES = {  # name: (M, N, K)
    "expert qkv": (50, 2560, 1024),
    "expert o": (50, 1024, 2048),
    "expert gate/up": (50, 8192, 1024),
    "expert down": (50, 1024, 4096),
    "vit qkv": (197, 2304, 768),
    "vit o": (197, 768, 768),
    "vit fc1": (197, 6144, 768),
    "vit fc2": (197, 768, 3072),
}


class Config(NamedTuple):
    bn: int  # block tile N
    wm: int  # consumer warp groups along M
    wn: int  # consumer warp groups along N (each issues m64n{bn/wn}k16)
    mt: int  # m64 tiles per warp group: BM = 64 * wm * mt
    st: int  # pipeline stages
    split: int  # split-K blocks (a thread-block cluster along z)
    red: int = 0  # split-K reduction: 0 pull (ld.shared::cluster), 1 push (st.async)

    @property
    def bm(self) -> int:
        return 64 * self.wm * self.mt

    @property
    def name(self) -> str:
        split = "" if self.split == 1 else f" SK{self.split} {('pull', 'push')[self.red]}"
        return f"BN{self.bn} BM{self.bm} WG{self.wm}x{self.wn} MT{self.mt} ST{self.st}{split}"

    @property
    def slug(self) -> str:
        return "_".join(str(v) for v in self)

    def smem(self) -> int:  # mirrors SMEM_BYTES in the .cu (the loader reads the compiled value)
        ring = self.st * (self.bm + self.bn) * 128
        red = self.bm * (self.bn + 8) * 4 if self.split > 1 else 0
        return max(ring, red) + (2 * self.st + 1) * 8 + 1024

    def grid(self, M: int, N: int) -> tuple[int, int, int]:
        return -(-M // self.bm), N // self.bn, self.split

    def fit(self, K: int) -> "Config":
        """This config with its stages clipped to the k tiles a block has; ValueError if it cannot run."""
        ktiles = K // 64 // self.split
        cfg = self._replace(st=max(2, min(self.st, ktiles)))
        if K % (64 * self.split) or ktiles < 1:
            raise ValueError(f"K={K} is not a multiple of 64 * split")
        if cfg.smem() > SMEM_LIMIT:
            raise ValueError(f"{cfg.smem()} bytes of shared memory")
        if cfg.red and cfg.bn % (8 * cfg.split):
            raise ValueError("push needs BN / split to be a multiple of 8")
        return cfg

    def defines(self) -> list[str]:
        names = ("BN", "WM", "WN", "MT", "ST", "SPLIT", "RED")
        return [f"-DPROBE_{n}={v}" for n, v in zip(names, self)]


C = Config
# per shape, least risky first: no split, then split-K pulled through DSMEM, then pushed by st.async
CONFIGS = {
    "expert qkv": [C(128, 1, 1, 1, 4, 1), C(64, 1, 1, 1, 4, 1), C(128, 1, 1, 1, 4, 4), C(64, 1, 1, 1, 4, 2),
                   C(128, 1, 1, 1, 4, 4, 1), C(256, 1, 1, 1, 4, 8, 1)],
    "expert o": [C(128, 1, 1, 1, 4, 1), C(64, 1, 1, 1, 4, 8), C(128, 1, 1, 1, 4, 8), C(64, 1, 1, 1, 4, 8, 1),
                 C(128, 1, 1, 1, 4, 8, 1)],
    "expert gate/up": [C(128, 1, 1, 1, 4, 1), C(64, 1, 1, 1, 4, 1), C(64, 1, 1, 1, 8, 1), C(128, 1, 1, 1, 4, 2),
                       C(128, 1, 1, 1, 4, 2, 1), C(256, 1, 2, 1, 4, 4, 1)],
    "expert down": [C(128, 1, 1, 1, 4, 1), C(64, 1, 1, 1, 4, 8), C(64, 1, 1, 1, 6, 8), C(64, 1, 1, 1, 4, 8, 1),
                    C(128, 1, 1, 1, 4, 8, 1)],
    "vit qkv": [C(128, 2, 1, 2, 4, 1), C(128, 2, 1, 1, 4, 1), C(128, 1, 1, 1, 4, 1), C(128, 2, 1, 2, 4, 6),
                C(128, 2, 1, 1, 4, 3), C(128, 2, 1, 2, 3, 4, 1)],
    "vit o": [C(128, 2, 1, 2, 4, 1), C(64, 1, 1, 1, 4, 1), C(64, 2, 1, 2, 4, 6), C(128, 1, 1, 1, 4, 4),
              C(64, 2, 1, 1, 4, 4, 1)],
    "vit fc1": [C(128, 2, 1, 2, 4, 1), C(128, 2, 1, 1, 4, 1), C(64, 2, 1, 2, 4, 1), C(256, 2, 1, 1, 4, 1),
                C(128, 2, 1, 2, 4, 2), C(128, 2, 1, 2, 4, 2, 1)],
    "vit fc2": [C(128, 2, 1, 2, 4, 1), C(128, 2, 1, 2, 4, 8), C(64, 2, 1, 2, 4, 8), C(128, 2, 1, 1, 4, 8),
                C(64, 2, 1, 2, 4, 8, 1), C(128, 2, 1, 1, 4, 8, 1)],
}


def configs_for(shape: str, quick: bool) -> list[Config]:
    K = SHAPES[shape][2]
    cfgs = [c.fit(K) for c in CONFIGS[shape]]
    return cfgs[:1] + [c for c in cfgs if c.red][:1] if quick else cfgs


# ---------------------------------------------------------------------------------------------------- compiling


def find_nvcc() -> str | None:
    return os.environ.get("FLASHRT_NVCC") or shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def compile_config(nvcc: str, cfg: Config, cache: str) -> dict:
    """{"cubin": path, "regs", "stack", "spill_stores", "spill_loads", "warnings"} of wgmma_gemm for this config
    (nvcc's -arch=sm_90a shorthand also runs a plain sm_90 pass on some versions: name the target with -gencode)."""
    src = open(SOURCE).read()
    flags = ["-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v", *cfg.defines()]
    key = hashlib.sha256("\0".join([src, nvcc, *flags]).encode()).hexdigest()[:20]
    cubin, meta = os.path.join(cache, f"{cfg.slug}-{key}.cubin"), os.path.join(cache, f"{cfg.slug}-{key}.json")
    if os.path.exists(cubin) and os.path.exists(meta):
        return json.load(open(meta))
    with tempfile.TemporaryDirectory(prefix="wgmma-probe-") as tmp:
        out = os.path.join(tmp, "k.cubin")
        proc = subprocess.run([nvcc, *flags, SOURCE, "-o", out], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed for {cfg.name}:\n{proc.stderr[-3000:]}")
        info = {"cubin": cubin, **parse_ptxas(proc.stderr, "wgmma_gemm")}
        shutil.copyfile(out, cubin + ".tmp")
        os.replace(cubin + ".tmp", cubin)
    with open(meta, "w") as f:
        json.dump(info, f)
    return info


def parse_ptxas(log: str, kernel: str) -> dict:
    part = log.split(f"Function properties for {kernel}", 1)[-1]
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, part)) else None  # noqa: E731
    warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
    return {"regs": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
            "spill_stores": num(r"(\d+) bytes spill stores"), "spill_loads": num(r"(\d+) bytes spill loads"),
            "warnings": warnings}


def compile_all(cfgs: list[Config]) -> dict[Config, dict]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc: put CUDA 12.8+ nvcc on PATH or set FLASHRT_NVCC")
    cache = os.path.join(tempfile.gettempdir(), "wgmma_probe_cubins")
    os.makedirs(cache, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        infos = list(pool.map(lambda c: compile_config(nvcc, c, cache), cfgs))
    return dict(zip(cfgs, infos))


# ---------------------------------------------------------------------------------------------------- bf16


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (round to nearest even)"""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def problem(M: int, N: int, K: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A, W as bf16 bits and the f64 reference of A . W^T on the bf16 values"""
    rng = np.random.default_rng(seed)
    a = to_bf16(rng.uniform(-1, 1, (M, K)).astype(np.float32))
    w = to_bf16(rng.uniform(-1, 1, (N, K)).astype(np.float32))
    return a, w, from_bf16(a).astype(np.float64) @ from_bf16(w).astype(np.float64).T


# ---------------------------------------------------------------------------------------------------- GPU worker


def worker(spec: dict) -> None:
    """Runs the configs of one shape in this process; prints START <i> / ROW <json> lines. Exits with status 3
    after the first failure (a CUDA error may be sticky): the parent restarts a worker for the remaining configs."""
    from cuda.bindings import driver as cu

    def ck(result, what="CUDA"):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what}: {err}")
        return rest[0] if len(rest) == 1 else rest

    ck(cu.cuInit(0))
    dev = ck(cu.cuDeviceGet(0))
    ck(cu.cuCtxSetCurrent(ck(cu.cuDevicePrimaryCtxRetain(dev))))
    shape = spec["shape"]
    M, N, K = SHAPES[shape]
    a, w, ref = problem(M, N, K)
    m_rows = -(-M // 256) * 256  # C rows allocated: any BM tiles them, rows past M must stay poisoned

    def upload(host: np.ndarray) -> int:
        ptr = int(ck(cu.cuMemAlloc(host.nbytes)))
        ck(cu.cuMemcpyHtoD(ptr, host.ctypes.data, host.nbytes))
        return ptr

    d_a, d_c = upload(a), int(ck(cu.cuMemAlloc(m_rows * N * 2)))
    copies = max(1, math.ceil(L2_DEFEAT / w.nbytes))
    d_w = [upload(w)]
    for _ in range(copies - 1):
        d_w.append(int(ck(cu.cuMemAlloc(w.nbytes))))
        ck(cu.cuMemcpyDtoD(d_w[-1], d_w[0], w.nbytes))
    launches = copies * max(1, 256 // copies)
    stream = ck(cu.cuStreamCreate(0))

    def tensor_map(ptr: int, rows: int, box_rows: int):
        return ck(cu.cuTensorMapEncodeTiled(
            cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ptr,
            [cu.cuuint64_t(K), cu.cuuint64_t(rows)], [cu.cuuint64_t(K * 2)],
            [cu.cuuint32_t(64), cu.cuuint32_t(box_rows)], [cu.cuuint32_t(1), cu.cuuint32_t(1)],
            cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), "cuTensorMapEncodeTiled")

    def read_c() -> np.ndarray:
        out = np.empty((m_rows, N), np.uint16)
        ck(cu.cuStreamSynchronize(stream), "kernel")
        ck(cu.cuMemcpyDtoH(out.ctypes.data, d_c, out.nbytes))
        return out

    def time_graph(launch, reps: int = 5) -> float:
        """µs per launch: median over `reps` replays of a graph of `launches` launches (W copy i % copies)"""
        ck(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
        for i in range(launches):
            launch(i % copies)
        graph = ck(cu.cuStreamEndCapture(stream))
        exe = ck(cu.cuGraphInstantiate(graph, 0))
        start, end = ck(cu.cuEventCreate(0)), ck(cu.cuEventCreate(0))
        ck(cu.cuGraphLaunch(exe, stream))
        times = []
        for _ in range(reps):
            ck(cu.cuEventRecord(start, stream))
            ck(cu.cuGraphLaunch(exe, stream))
            ck(cu.cuEventRecord(end, stream))
            ck(cu.cuStreamSynchronize(stream), "graph replay")
            times.append(ck(cu.cuEventElapsedTime(start, end)) * 1e3 / launches)
        cu.cuGraphExecDestroy(exe)
        cu.cuGraphDestroy(graph)
        return sorted(times)[len(times) // 2]

    def measure(cfg: Config, info: dict, row: dict) -> None:
        """fills `row` as it goes, so a failure keeps what was measured before it"""
        module = ck(cu.cuModuleLoadData(open(info["cubin"], "rb").read()), "cuModuleLoadData")
        gemm, empty = (ck(cu.cuModuleGetFunction(module, n)) for n in (b"wgmma_gemm", b"wgmma_empty"))
        ptr, _ = ck(cu.cuModuleGetGlobal(module, b"probe_info"))
        probe_info = np.empty(4, np.int32)
        ck(cu.cuMemcpyDtoH(probe_info.ctypes.data, ptr, probe_info.nbytes))
        threads, smem, bm, bn = (int(v) for v in probe_info)
        row.update(threads=threads, smem=smem)
        assert (bm, bn, smem) == (cfg.bm, cfg.bn, cfg.smem()), "the .cu and Config.smem disagree"
        attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        for fn in (gemm, empty):
            ck(cu.cuFuncSetAttribute(fn, attr, smem), "cuFuncSetAttribute")

        tm_a = tensor_map(d_a, M, bm)
        tm_w = [tensor_map(p, N, bn) for p in d_w]
        scalars = [ctypes.c_uint64(d_c), ctypes.c_int32(M), ctypes.c_int32(N), ctypes.c_int32(K)]
        params = [(ctypes.c_void_p * 6)(tm_a.getPtr(), t.getPtr(), *(ctypes.addressof(s) for s in scalars))
                  for t in tm_w]
        launch_cfg = cu.CUlaunchConfig()
        launch_cfg.gridDimX, launch_cfg.gridDimY, launch_cfg.gridDimZ = cfg.grid(M, N)
        launch_cfg.blockDimX, launch_cfg.blockDimY, launch_cfg.blockDimZ = threads, 1, 1
        launch_cfg.sharedMemBytes, launch_cfg.hStream = smem, stream
        launch_cfg.numAttrs = 0
        if cfg.split > 1:
            cluster = cu.CUlaunchAttribute()
            cluster.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            cluster.value.clusterDim.x, cluster.value.clusterDim.y, cluster.value.clusterDim.z = 1, 1, cfg.split
            launch_cfg.attrs, launch_cfg.numAttrs = [cluster], 1

        def launch(copy: int, fn=gemm) -> None:
            ck(cu.cuLaunchKernelEx(launch_cfg, fn, ctypes.addressof(params[copy]), 0), "cuLaunchKernelEx")

        ck(cu.cuMemsetD8(d_c, 0xFF, m_rows * N * 2))
        launch(0)
        first = read_c()
        got = from_bf16(first[:M]).astype(np.float64)
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
        row.update(max_abs_err=err, max_ref=scale, rel_err=err / scale,
                   rows_past_M_untouched=bool((first[M:] == 0xFFFF).all()))
        row["us_empty"] = round(time_graph(lambda i: launch(i, empty)), 3)
        us = time_graph(launch)
        row["deterministic"] = bool((read_c()[:M] == first[:M]).all())  # the timed launches wrote C too
        row.update(us=round(us, 3), tflops=round(2 * M * N * K / us / 1e6, 1),
                   weight_GBps=round(w.nbytes / us / 1e3, 1))
        row["ok"] = err <= 1e-2 * scale and row["rows_past_M_untouched"] and row["deterministic"]

    print("READY", flush=True)
    for index, values, info in spec["jobs"]:
        cfg = Config(*values)
        print("START", index, flush=True)
        row = base_row(shape, cfg, None)
        row.update(regs=info["regs"], spill_bytes=(info["spill_stores"] or 0) + (info["spill_loads"] or 0),
                   ptxas_warnings=info["warnings"], w_copies=copies, launches=launches)
        try:
            measure(cfg, info, row)
        except Exception as e:  # noqa: BLE001  (reported; then this worker stops: the context may be unusable)
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            print("ROW", json.dumps(row), flush=True)
            sys.exit(3)
        print("ROW", json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------------- parent


def gpu_problem() -> str | None:
    """None if device 0 is a Hopper GPU we can drive, else why not"""
    try:
        from cuda.bindings import driver as cu
    except ImportError as e:
        return f"cuda-bindings is not importable ({e})"
    try:
        (err,) = cu.cuInit(0)
    except Exception as e:  # noqa: BLE001  (no libcuda: the bindings raise their own loader errors)
        return f"no CUDA driver ({type(e).__name__}: {str(e)[:200]})"
    if err != cu.CUresult.CUDA_SUCCESS:
        return f"cuInit failed ({err})"
    err, count = cu.cuDeviceGetCount()
    if err != cu.CUresult.CUDA_SUCCESS or count == 0:
        return "no CUDA device"
    attr = cu.CUdevice_attribute
    _, dev = cu.cuDeviceGet(0)
    major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)[1]
    minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)[1]
    if (major, minor) != (9, 0):
        return f"wgmma needs sm_90 (H100/H200); device 0 is sm_{major}{minor}"
    return None


def device_name() -> str:
    from cuda.bindings import driver as cu

    return cu.cuDeviceGetName(64, cu.cuDeviceGet(0)[1])[1].split(b"\0")[0].decode()


def run_shape(shape: str, jobs: list[tuple[int, Config, dict]], deadline: float, hung: set,
              history: list[dict]) -> list[dict]:
    """Rows of one shape's configs, run in a worker subprocess that is restarted after a failure (`history`: the
    rows of earlier shapes)."""
    rows: dict[int, dict] = {}
    while todo := [(i, c, info) for i, c, info in jobs if i not in rows]:
        seen = [*history, *rows.values()]
        for i, c, _ in todo:
            reason = ("skipped: time budget spent" if time.time() > deadline - 3 else
                      "skipped: a config of this kind hung earlier" if kind(c) in hung else
                      "skipped: 3 configs of this kind failed with errors, none passed" if given_up(c, seen)
                      else None)
            if reason:
                rows[i] = emit(base_row(shape, c, reason))
        if todo := [j for j in todo if j[0] not in rows]:
            run_worker(shape, todo, deadline, hung, rows)
    return [rows[i] for i, _, _ in jobs]


def run_worker(shape: str, todo: list[tuple[int, Config, dict]], deadline: float, hung: set, rows: dict) -> None:
    """One worker over `todo` until it finishes, fails or stalls; fills rows[index] for every config it ran."""
    configs = {i: c for i, c, _ in todo}
    spec = {"shape": shape, "jobs": [(i, list(c), info) for i, c, info in todo]}
    err_log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=err_log, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
    current, error = None, None
    while True:
        try:
            line = lines.get(timeout=max(1.0, min(LINE_TIMEOUT_S, deadline - time.time())))
        except queue.Empty:
            proc.kill()
            if current is not None and time.time() < deadline:
                hung.add(kind(configs[current]))
            error = "time budget spent: killed" if time.time() > deadline else \
                f"no progress in {LINE_TIMEOUT_S:.0f} s: killed (hang?)"
            break
        if line is None:
            break
        tag, _, rest = line.strip().partition(" ")
        if tag == "START":
            current = int(rest)
        elif tag == "ROW":
            rows[current], current = emit(json.loads(rest)), None
    proc.wait()
    err_log.seek(0)
    stderr = err_log.read()[-400:]
    if current is not None:
        rows[current] = emit(base_row(shape, configs[current], error or f"worker exited {proc.returncode}: {stderr}"))
    elif not any(i in rows for i in configs):  # it never started a config: no point in another try
        for i, c in configs.items():
            rows[i] = emit(base_row(shape, c, f"worker failed at start ({error or proc.returncode}): {stderr}"))


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def kind(cfg: Config) -> tuple[bool, int]:
    """configs that share a code path: after one hangs, the others are skipped (each hang costs LINE_TIMEOUT_S)"""
    return cfg.split > 1, cfg.red


def given_up(cfg: Config, history: list[dict]) -> bool:
    """a code path that only ever raised errors (a trap, say: each costs seconds) is not tried a fourth time"""
    same = [r for r in history if kind(Config(*(r[f] for f in Config._fields))) == kind(cfg)]
    return not any(r["ok"] for r in same) and sum(r["error"] is not None for r in same) >= 3


def pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def base_row(shape: str, cfg: Config, error: str | None) -> dict:
    """the row of a config before (or instead of) its measurement"""
    M, N, K = SHAPES[shape]
    return {"shape": shape, "M": M, "N": N, "K": K, "config": cfg.name, **cfg._asdict(), "bm": cfg.bm,
            "grid": list(cfg.grid(M, N)), "ok": False, "error": error}


def summary(rows: list[dict]) -> None:
    for shape in dict.fromkeys(r["shape"] for r in rows):
        good = [r for r in rows if r["shape"] == shape and r.get("ok")]
        bad = sum(1 for r in rows if r["shape"] == shape and not r.get("ok"))
        if not good:
            print(f"# {shape}: no passing config ({bad} failed)", file=sys.stderr)
            continue
        b = min(good, key=lambda r: r["us"])
        print(f"# {shape:15s} best {b['us']:7.2f} us  {b['tflops']:6.1f} TFLOP/s  {b['weight_GBps']:7.1f} GB/s  "
              f"(empty {b['us_empty']:.2f} us)  {b['config']}  [{bad} failed]", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="two configs per shape: the first and the first push")
    ap.add_argument("--selfcheck", action="store_true", help="numpy model of the kernel's addressing (no GPU)")
    ap.add_argument("--compile-only", action="store_true", help="compile every config, print ptxas numbers")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.selfcheck:
        return selfcheck(args.shapes)
    t0 = time.time()
    cfgs = {s: configs_for(s, args.quick) for s in args.shapes}
    if not args.compile_only and (why := gpu_problem()):
        print(f"wgmma_probe: cannot run here: {why}. (--selfcheck and --compile-only need no GPU.)", file=sys.stderr)
        sys.exit(1)
    infos = compile_all(sorted({c for cs in cfgs.values() for c in cs}))
    print(f"# compiled {len(infos)} configs in {time.time() - t0:.1f} s", file=sys.stderr)
    if args.compile_only:
        for c, i in infos.items():
            print(json.dumps({"config": c.name, "threads": 128 * c.wm * c.wn + 32, "smem": c.smem(), **i}))
        return
    deadline, hung, rows, device = t0 + BUDGET_S, set(), [], device_name()
    os.makedirs(args.out, exist_ok=True)
    for shape, cs in cfgs.items():
        rows += run_shape(shape, [(i, c, infos[c]) for i, c in enumerate(cs)], deadline, hung, rows)
        with open(os.path.join(args.out, "wgmma_probe.json"), "w") as f:  # after each shape: a crash keeps rows
            json.dump({"device": device, "nvcc": find_nvcc(), "seconds": round(time.time() - t0, 1), "rows": rows},
                      f, indent=1)
    summary(rows)


# ---------------------------------------------------------------------------------------------------- self-check


def sw128_desc(saddr: int) -> int:
    """mirror of sw128_desc in the .cu"""
    return ((saddr & 0x3FFFF) >> 4) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)


def tma_sw128_offsets(rows: int) -> np.ndarray:
    """byte offset of element (r, k) of a [rows][64] bf16 box written by TMA with SWIZZLE_128B to a 1024-aligned
    address: the 16-byte chunk k / 8 of row r goes to chunk (k / 8) ^ (r % 8) of the row's 128 bytes"""
    r, k = np.arange(rows)[:, None], np.arange(64)[None, :]
    return r * 128 + ((k // 8) ^ (r % 8)) * 16 + (k % 8) * 2


def wgmma_operand_addresses(desc: int, rows: int) -> np.ndarray:
    """byte address of element (i, k) of the rows x 16 K-major operand a descriptor names (PTX ISA, canonical
    K-major layout with 128-byte swizzling, T = 8 bf16 per 16 bytes: ((8,m),(T,2k)):((8T,SBO),(1,T)) in elements,
    then Swizzle<3,4,3> on the byte address: bits 4-6 ^= bits 7-9)"""
    assert desc >> 62 == 1 and (desc >> 49) & 7 == 0, "128-byte swizzle, base offset 0"
    start, sbo = (desc & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    i, k = np.arange(rows)[:, None], np.arange(16)[None, :]
    addr = start + (i % 8) * 128 + (i // 8) * sbo + (k // 8) * 16 + (k % 8) * 2
    return addr ^ (((addr >> 7) & 7) << 4)


def emulate(cfg: Config, M: int, N: int, K: int, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """C as the kernel would write it (NaN where it writes nothing), block by block"""
    out = np.full((M, N), np.nan)
    for m0 in range(0, M, cfg.bm):
        rows = min(cfg.bm, M - m0)
        for n0 in range(0, N, cfg.bn):
            out[m0:m0 + rows, n0:n0 + cfg.bn] = emulate_block(cfg, K, a[m0:m0 + rows], w[n0:n0 + cfg.bn])
    return out


def emulate_block(cfg: Config, K: int, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One block tile (the `rows` = len(a) valid rows) following the kernel's index arithmetic: TMA boxes into the
    ring, wgmma through the descriptors, the accumulator fragment layout, the epilogue / split-K exchange."""
    bm, bn, wgn, rows = cfg.bm, cfg.bn, cfg.bn // cfg.wn, len(a)
    consumers, stage_bytes, a_bytes = 128 * cfg.wm * cfg.wn, (bm + bn) * 128, bm * 128
    red_ld, sn, ktiles = bn + 8, bn // cfg.split, K // 64 // cfg.split
    ring_base = 3 * 1024  # any 1024-aligned shared address
    tid = np.arange(consumers)
    warp, lane = tid // 32, tid % 32
    wm, wn = (warp // 4) // cfg.wn, (warp // 4) % cfg.wn
    fr, fc = (warp % 4) * 16 + lane // 4, wn * wgn + 2 * (lane % 4)  # fragment origin per thread

    acc = np.zeros((cfg.split, consumers, cfg.mt, wgn // 2))
    for z in range(cfg.split):
        smem = np.zeros((ring_base + cfg.st * stage_bytes) // 2)  # bf16 values by 2-byte slot
        d = np.zeros((bm, bn))
        for kt in range(ktiles):
            k = (z * ktiles + kt) * 64
            stage = ring_base + kt % cfg.st * stage_bytes
            box_a = np.zeros((bm, 64))
            box_a[:rows] = a[:, k:k + 64]  # TMA zero-fills rows past M
            smem[(stage + tma_sw128_offsets(bm)) // 2] = box_a
            smem[(stage + a_bytes + tma_sw128_offsets(bn)) // 2] = w[:, k:k + 64]
            for g in range(cfg.wm * cfg.wn):
                gm, gn = g // cfg.wn, g % cfg.wn
                da = sw128_desc(stage + gm * cfg.mt * 64 * 128)
                db = sw128_desc(stage + a_bytes + gn * wgn * 128)
                for kk in range(4):
                    b_op = smem[wgmma_operand_addresses(db + ((kk * 32) >> 4), wgn) // 2]
                    for m in range(cfg.mt):
                        a_op = smem[wgmma_operand_addresses(da + ((m * 64 * 128 + kk * 32) >> 4), 64) // 2]
                        r = (gm * cfg.mt + m) * 64
                        d[r:r + 64, gn * wgn:(gn + 1) * wgn] += a_op @ b_op.T
        for m in range(cfg.mt):  # d[4j + h] is (fr + 8 (h / 2), fc + 8j + h % 2) of the warp group's m tile
            for i in range(wgn // 2):
                j, h = i // 4, i % 4
                acc[z, :, m, i] = d[(wm * cfg.mt + m) * 64 + fr + 8 * (h // 2), fc + 8 * j + h % 2]

    tile, writes = np.full((rows, bn), np.nan), np.zeros((rows, bn), int)

    def put(r: int, c: int, vals: np.ndarray) -> None:
        tile[r, c:c + len(vals)] = vals
        writes[r, c:c + len(vals)] += 1

    if cfg.split == 1:
        for t, m, j in np.ndindex(consumers, cfg.mt, wgn // 8):
            r = (wm[t] * cfg.mt + m) * 64 + fr[t]
            if r < rows:
                put(r, fc[t] + 8 * j, acc[0, t, m, 4 * j:4 * j + 2])
            if r + 8 < rows:
                put(r + 8, fc[t] + 8 * j, acc[0, t, m, 4 * j + 2:4 * j + 4])
    elif cfg.red == 0:
        red = np.zeros((cfg.split, bm * red_ld))
        for z, t, m, j in np.ndindex(cfg.split, consumers, cfg.mt, wgn // 8):
            r = (wm[t] * cfg.mt + m) * 64 + fr[t]
            red[z, r * red_ld + fc[t] + 8 * j:][:2] = acc[z, t, m, 4 * j:4 * j + 2]
            red[z, (r + 8) * red_ld + fc[t] + 8 * j:][:2] = acc[z, t, m, 4 * j + 2:4 * j + 4]
        for z, t in np.ndindex(cfg.split, consumers):
            for i in range(z * consumers + t, rows * (bn // 4), cfg.split * consumers):
                r, c4 = i // (bn // 4), i % (bn // 4) * 4
                put(r, c4, red[:, r * red_ld + c4:r * red_ld + c4 + 4].sum(0))
    else:
        buf = np.full((cfg.split, cfg.split * bm * sn), np.nan)  # block q's receive buffer
        got = np.zeros(cfg.split, int)  # bytes complete_tx'd on block q's `done` barrier
        for z, t, m, j in np.ndindex(cfg.split, consumers, cfg.mt, wgn // 8):
            r, col = (wm[t] * cfg.mt + m) * 64 + fr[t], fc[t] + 8 * j
            q, dst = col // sn, z * bm * sn + r * sn + col % sn
            for dr in (0, 8):
                if r + dr < rows:
                    buf[q, dst + dr * sn:][:2] = acc[z, t, m, 4 * j + dr // 4:4 * j + dr // 4 + 2]
                    got[q] += 8
        assert (got == rows * bn * 4).all(), f"pushed bytes {got} != expect_tx {rows * bn * 4}: a hang"
        assert buf.shape[1] * 4 <= max(cfg.st * stage_bytes, bm * red_ld * 4), "receive buffer past the ring"
        for q, t in np.ndindex(cfg.split, consumers):
            for i in range(t, rows * (sn // 4), consumers):
                r, c4 = i // (sn // 4), i % (sn // 4) * 4
                put(r, q * sn + c4, sum(buf[q, (p * bm + r) * sn + c4:][:4] for p in range(cfg.split)))
    assert (writes <= 1).all(), "an output element is written twice"
    return tile


def selfcheck(shapes: list[str]) -> None:
    """Emulates every configuration of the given shapes on a small K (a few k tiles per block, ring wrap-around
    included) and checks C = A . W^T exactly (f64 sums of bf16 values), each element of rows < M written once."""
    failures = 0
    for shape in shapes:
        M = SHAPES[shape][0]
        for cfg0 in CONFIGS[shape]:
            K = 64 * cfg0.split * (cfg0.st + 1)
            cfg, N = cfg0.fit(K), 2 * cfg0.bn
            a, w, ref = problem(M, N, K, seed=1)
            got = emulate(cfg, M, N, K, from_bf16(a).astype(np.float64), from_bf16(w).astype(np.float64))
            ok = np.isfinite(got).all() and np.allclose(got, ref, rtol=1e-12, atol=1e-9)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {shape:15s} {cfg.name:40s} M={M} N={N} K={K}", flush=True)
    if failures:
        sys.exit(f"{failures} configurations failed the self-check")


if __name__ == "__main__":
    main()
