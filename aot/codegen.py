"""Code generation and compilation: one CUDA translation unit per unique kernel, compiled by nvcc to a
relocatable cubin per target through a content-addressed cache, then linked into one cubin per target.

The cache key is the SHA-256 of the full source text (headers inlined), the architecture, the flags and
nvcc's version, so a rebuild compiles nothing that did not change."""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flashrt.aot.targets import arch_number
from flashrt.errors import BuildError
from flashrt.kernels.registry import family
from flashrt.kernels.source import inline_headers

NVCC_FLAGS = ["-O3", "-std=c++17", "-dc", "-cubin", "-Xptxas", "-v"]


@dataclass(frozen=True)
class Toolchain:
    nvcc: str
    version: str  # e.g. "13.0.88"


def cache_dir() -> Path:
    root = os.environ.get("FLASHRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashrt")
    return Path(root) / "cubins"


def _wheel_nvcc() -> str | None:
    return wheel_tool("nvcc")


def wheel_tool(name: str) -> str | None:
    """A CUDA command-line tool from NVIDIA's pip wheels (nvidia/cu*/bin, or nvidia/cuda_nvcc/bin for nvcc)."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in list(getattr(nvidia, "__path__", [])):
        for cand in sorted(glob.glob(os.path.join(root, "cu*", "bin", name)), reverse=True):
            if os.access(cand, os.X_OK):
                return cand
        cand = os.path.join(root, f"cuda_{name}", "bin", name)
        if os.access(cand, os.X_OK):
            return cand
    return None


@cache
def find_toolchain() -> Toolchain:
    """nvcc from $FLASHRT_NVCC, else PATH, else the nvidia-cuda-nvcc wheel."""
    candidates = [os.environ.get("FLASHRT_NVCC"), shutil.which("nvcc"), _wheel_nvcc()]
    nvcc = next((c for c in candidates if c), None)
    if nvcc is None:
        raise BuildError("no nvcc found: install the CUDA compiler wheels with "
                         "pip install 'flashrt[build]' (nvidia-cuda-nvcc, nvidia-cuda-cccl), "
                         "put a CUDA 12.8+ toolkit's nvcc on PATH, or set FLASHRT_NVCC")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"nvcc at {nvcc} does not run: {e}") from None
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    if not m:
        raise BuildError(f"nvcc at {nvcc} printed no version: {out.strip()[:120]!r}")
    return Toolchain(nvcc, m.group(1))


def min_driver(nvcc_version: str) -> str:
    """The oldest Linux driver that loads cubins of this toolkit (CUDA's release notes, table 3)."""
    major_minor = tuple(int(x) for x in nvcc_version.split(".")[:2])
    table = {(12, 8): "570.26", (12, 9): "575.51.03", (13, 0): "580.65.06", (13, 1): "590.44.01"}
    known = [v for k, v in sorted(table.items()) if k <= major_minor]
    return known[-1] if known else "570.26"


@dataclass(frozen=True)
class KernelSource:
    symbol: str
    family: str
    params_json: str
    text: str


def kernel_source(family_name: str, params: dict) -> KernelSource:
    params_json = json.dumps(params, sort_keys=True, separators=(",", ":"))
    symbol = f"frt_{family_name}_{hashlib.sha256((family_name + params_json).encode()).hexdigest()[:16]}"
    text = inline_headers(family(family_name).cuda_source(params, symbol))
    return KernelSource(symbol, family_name, params_json, text)


def _gencode(arch: str) -> str:
    n = arch_number(arch)
    return f"-gencode=arch=compute_{n},code=sm_{n}"


def nvlink_path(tc: Toolchain) -> str:
    """nvlink beside nvcc: linking device code needs no host compiler or assembler."""
    path = os.path.join(os.path.dirname(os.path.realpath(tc.nvcc)), "nvlink")
    if not os.access(path, os.X_OK):
        raise BuildError(f"nvlink is missing beside {tc.nvcc}; reinstall the CUDA toolkit or the nvcc wheel")
    return path


def _run_nvcc(tc: Toolchain, args: list[str], cwd: str, what: str) -> str:
    return _run_tool(tc.nvcc, args, cwd, what)


def _run_tool(tool: str, args: list[str], cwd: str, what: str) -> str:
    try:
        proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{os.path.basename(tool)} timed out on {what}") from None
    except OSError as e:
        raise BuildError(f"cannot run {tool}: {e.strerror or e}") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        first = next((line for line in msg if "error" in line), msg[0] if msg else "")
        raise BuildError(f"{os.path.basename(tool)} failed on {what}: {first[:300]}")
    return proc.stdout + proc.stderr


def _parse_resources(log: str) -> dict:
    res, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)|Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1) or m.group(2)
            res.setdefault(current, {})
            continue
        if current is None:
            continue
        if m := re.search(r"(\d+) bytes spill stores", line):
            res[current]["spill_bytes"] = int(m.group(1))
        if m := re.search(r"(\d+) bytes stack frame", line):
            res[current]["local_bytes"] = int(m.group(1))
        if m := re.search(r"Used (\d+) registers", line):
            res[current]["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            res[current]["shared_bytes"] = int(sm.group(1)) if sm else 0
    return res


def compile_kernel(tc: Toolchain, src: KernelSource, arch: str) -> tuple[Path, dict, bool]:
    """The relocatable cubin of one kernel for one arch (from cache if present); (path, resources, hit)."""
    key = hashlib.sha256("\0".join([src.text, arch, tc.version, " ".join(NVCC_FLAGS)]).encode()).hexdigest()
    directory = cache_dir() / key[:2]
    obj, meta = directory / f"{key}.cubin", directory / f"{key}.json"
    if obj.exists() and meta.exists():
        return obj, json.loads(meta.read_text()), True
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flashrt-nvcc-") as tmp:
        Path(tmp, "kernel.cu").write_text(src.text)
        log = _run_nvcc(tc, [*NVCC_FLAGS, _gencode(arch), "kernel.cu", "-o", "kernel.cubin"], tmp,
                        f"kernel {src.symbol} ({src.family}) for {arch}")
        resources = _parse_resources(log).get(src.symbol, {})
        staged = Path(tmp, "kernel.cubin")
        # publish atomically so concurrent builds never read a partial cache entry
        tmp_obj = directory / f".{key}.{os.getpid()}.cubin"
        shutil.copyfile(staged, tmp_obj)
        os.replace(tmp_obj, obj)
        tmp_meta = directory / f".{key}.{os.getpid()}.json"
        tmp_meta.write_text(json.dumps(resources, sort_keys=True))
        os.replace(tmp_meta, meta)
    return obj, resources, False


def link(tc: Toolchain, objects: list[Path], arch: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="flashrt-nvlink-") as tmp:
        names = []
        for i, o in enumerate(objects):
            name = f"k{i}.cubin"
            shutil.copyfile(o, os.path.join(tmp, name))
            names.append(name)
        _run_tool(nvlink_path(tc), [f"-arch=sm_{arch_number(arch)}", *names, "-o", "engine.cubin"], tmp,
                  f"the {arch} link step")
        return Path(tmp, "engine.cubin").read_bytes()


def build_cubins(sources: list[KernelSource], archs: list[str], progress=None) -> tuple[dict[str, bytes], dict, str]:
    """Compile every kernel for every arch and link one cubin per arch.
    Returns ({arch: cubin}, {arch: {symbol: resources}}, nvcc version)."""
    tc = find_toolchain()
    jobs = [(src, arch) for arch in archs for src in sources]
    done = hits = 0
    results: dict[tuple[str, str], tuple[Path, dict]] = {}
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(compile_kernel, tc, src, arch): (src.symbol, arch) for src, arch in jobs}
        for fut in futures:
            path, res, hit = fut.result()
            results[futures[fut]] = (path, res)
            done += 1
            hits += hit
            if progress:
                progress("compile", done, len(jobs), hits)
    cubins, resources = {}, {}
    for arch in archs:
        objs = [results[(s.symbol, arch)][0] for s in sources]
        cubins[arch] = link(tc, objs, arch)
        resources[arch] = {s.symbol: results[(s.symbol, arch)][1] for s in sources}
        if progress:
            progress("link", archs.index(arch) + 1, len(archs), 0)
    return cubins, resources, tc.version


if __name__ == "__main__":  # python -m flashrt.aot.codegen: print the toolchain in use
    tc = find_toolchain()
    print(tc.nvcc, tc.version, file=sys.stdout)
