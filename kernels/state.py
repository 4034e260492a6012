"""State family: the small kernels that keep an engine's persistent state (engine_format/SPEC.md §11).

`pos` is a device int32 scalar in the arena: the number of tokens already in the engine's caches. Kernels read
it at run time, so one captured CUDA graph serves every position.

params: {"op": ...}
  positions  out[i] = pos + i for i < T                         T, out_dtype           args: pos, out
  write      dst[o, pos + t, i] = src[o, t, i] for t < n         T, S, outer, inner,     args: pos, [length],
             (n = length[0], or T without a length input;       dtype, pairs: [{atoms}],      src0, dst0,
             rows at pos + t >= S are skipped)                   has_length                    src1, dst1, ...
             each src is a view ((size, stride) atoms over [outer, T, inner]); each dst a contiguous
             [outer, S, inner] cache (the KV-cache write of a decoder: new K and V rows at the position)
  advance    pos += count (a constant), or pos += length[0]      count (null: length)  args: pos, [length]
The entry's last launch is its advance, so every kernel before it sees the position the run started at."""

import math

import numpy as np

from flashrt.errors import EngineFormatError
from flashrt.kernels.dtypes import CTYPES, ITEMSIZE
from flashrt.kernels.memory import Pointer, load_atoms, raw, store
from flashrt.kernels.source import atoms_code

FAMILY = "state"
MAX_BLOCKS = 1 << 16


def arg_spec(p: dict) -> list[tuple[str, str]]:
    if p["op"] == "positions":
        return [("pos", "ptr"), ("out", "ptr")]
    length = [("length", "ptr")] if (p["op"] == "write" and p["has_length"]) or \
        (p["op"] == "advance" and p["count"] is None) else []
    if p["op"] == "advance":
        return [("pos", "ptr")] + length
    pairs = [arg for i in range(len(p["pairs"])) for arg in ((f"src{i}", "ptr"), (f"dst{i}", "ptr"))]
    return [("pos", "ptr")] + length + pairs


def launch_config(p: dict):
    if p["op"] == "positions":
        return (math.ceil(p["T"] / 256), 1, 1), (256, 1, 1), 0
    if p["op"] == "advance":
        return (1, 1, 1), (32, 1, 1), 0
    total = p["outer"] * p["T"] * p["inner"]
    return (max(1, min(MAX_BLOCKS, math.ceil(total / 256))), len(p["pairs"]), 1), (256, 1, 1), 0


def cuda_source(p: dict, symbol: str) -> str:
    if p["op"] == "positions":
        to = CTYPES[p["out_dtype"]]
        value = f"({to})(*pos + i)" if p["out_dtype"] in ("int64", "int32") else f"from_float<{to}>((float)(*pos + i))"
        return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}(const int* __restrict__ pos, {to}* __restrict__ out) {{
  griddep_launch_dependents();
  griddep_wait();
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i < {p["T"]}) out[i] = {value};
}}
'''
    if p["op"] == "advance":
        step = str(p["count"]) if p["count"] is not None else "*length"
        length = ", const int* __restrict__ length" if p["count"] is None else ""
        return f'''#include "common.cuh"

extern "C" __global__ void {symbol}(int* __restrict__ pos{length}) {{
  griddep_launch_dependents();
  griddep_wait();
  if (threadIdx.x == 0) *pos += {step};
}}
'''
    ct = CTYPES[p["dtype"]]
    T, S, outer, inner = p["T"], p["S"], p["outer"], p["inner"]
    params = ["const int* __restrict__ pos"] + (["const int* __restrict__ length"] if p["has_length"] else [])
    cases = []
    for j, pair in enumerate(p["pairs"]):
        params += [f"const {ct}* __restrict__ src{j}", f"{ct}* __restrict__ dst{j}"]
        cases.append(f"    case {j}: dst{j}[d] = src{j}[{atoms_code('i', pair['atoms'])}]; break;")
    n = "min(*length, " + str(T) + ")" if p["has_length"] else str(T)
    return f'''#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) {symbol}({", ".join(params)}) {{
  griddep_launch_dependents();
  griddep_wait();
  const int p = *pos, n = {n};
  for (long i = (long)blockIdx.x * 256 + threadIdx.x; i < {outer * T * inner}L; i += (long)gridDim.x * 256) {{
    const long t = (i / {inner}L) % {T}L, o = i / {T * inner}L;
    if (t >= n || p + t >= {S}L) continue;
    const long d = (o * {S}L + p + t) * {inner}L + i % {inner}L;
    switch (blockIdx.y) {{
{chr(10).join(cases)}
    }}
  }}
}}
'''


def read_int(ptr: Pointer) -> int:
    return int(raw(ptr, 4).view(np.int32)[0])


def _write_int(ptr: Pointer, value: int) -> None:
    raw(ptr, 4)  # bounds
    if not ptr.buffer.flags.writeable:
        raise EngineFormatError(f"kernel argument '{ptr.name}' is state but points into the read-only weights")
    ptr.buffer[ptr.offset:ptr.offset + 4] = np.frombuffer(np.int32(value).tobytes(), np.uint8)


def reference(p: dict, args: dict) -> None:
    pos = read_int(args["pos"])
    if p["op"] == "positions":
        store(args["out"], p["out_dtype"], np.arange(pos, pos + p["T"], dtype=np.float64).astype(np.float32))
        return
    if p["op"] == "advance":
        _write_int(args["pos"], pos + (p["count"] if p["count"] is not None else read_int(args["length"])))
        return
    T, S, outer, inner, dtype = p["T"], p["S"], p["outer"], p["inner"], p["dtype"]
    n = min(read_int(args["length"]), T) if p["has_length"] else T
    rows = max(0, min(n, S - pos)) if pos >= 0 else 0
    if rows == 0:
        return
    for j, pair in enumerate(p["pairs"]):
        src = load_atoms(args[f"src{j}"], dtype, pair["atoms"], [outer, T, inner])
        write_rows(args[f"dst{j}"], dtype, [outer, S, inner], pos, src[:, :rows])


def write_rows(dst: Pointer, dtype: str, cache: list[int], pos: int, rows: np.ndarray) -> None:
    """Store rows [outer, n, inner] at positions pos .. pos + n - 1 of the [outer, S, inner] cache at dst."""
    outer, S, inner = cache
    item = ITEMSIZE[dtype]
    if dst.extent < outer * S * inner * item:
        raise EngineFormatError(f"kernel argument '{dst.name}': the relocation grants {dst.extent} bytes, the "
                                f"[{outer}, {S}, {inner}] {dtype} cache needs {outer * S * inner * item}")
    n = rows.shape[1]
    for o in range(outer):
        start = ((o * S + pos) * inner) * item
        store(Pointer(dst.buffer, dst.offset + start, n * inner * item, dst.name), dtype, rows[o])


# ---- cache writes fused into the kernel that produces the new rows (engine_format/SPEC.md §11, 1.7) ----
# A gemv, eltwise or layernorm launch with params["cache"] = [{start, outer, inner, S}] also stores elements
# start .. start + outer * inner - 1 of its flat output as `outer` rows of `inner` at the position of each cache.


def cache_arg_spec(p: dict, suffix: str = "") -> list[tuple[str, str]]:
    stores = p.get("cache") or []
    return ([(f"cache_pos{suffix}", "ptr")] + [(f"cache{j}{suffix}", "ptr") for j in range(len(stores))]
            if stores else [])


def cache_params(p: dict, ctype: str, suffix: str = "") -> list[str]:
    """Kernel parameter declarations of the fused cache writes (after the kernel's own)."""
    stores = p.get("cache") or []
    if not stores:
        return []
    return [f"const int* __restrict__ cache_pos{suffix}"] + [f"{ctype}* __restrict__ cache{j}{suffix}"
                                                             for j in range(len(stores))]


def cache_store_code(p: dict, index: str, value: str, prefix: str = "", suffix: str = "") -> str:
    """CUDA statements storing `value` (already of the cache's type), the flat output element `index`, into every
    cache whose range holds it; `prefix` qualifies the pointers (e.g. "g."), `suffix` ends their names."""
    lines = []
    for j, c in enumerate(p.get("cache") or []):
        start, n, inner, S = c["start"], c["outer"] * c["inner"], c["inner"], c["S"]
        lines.append(f"if ({index} >= {start}L && {index} < {start + n}L) {{  // KV-cache row at the position\n"
                     f"      const int cp = *{prefix}cache_pos{suffix};\n"
                     f"      const long cj = {index} - {start}L;\n"
                     f"      if (cp < {S}) {prefix}cache{j}{suffix}[(cj / {inner}L * {S}L + cp) * {inner}L"
                     f" + cj % {inner}L] = {value};\n    }}")
    return "\n    ".join(lines)


def cache_store_reference(p: dict, args: dict, flat: np.ndarray, dtype: str) -> None:
    """The fused cache writes of a reference that has computed its flat output `flat` (float)."""
    stores = p.get("cache") or []
    if not stores:
        return
    pos = read_int(args["cache_pos"])
    for j, c in enumerate(stores):
        start, outer, inner, S = c["start"], c["outer"], c["inner"], c["S"]
        if 0 <= pos < S:
            rows = np.asarray(flat).reshape(-1)[start:start + outer * inner].reshape(outer, 1, inner)
            write_rows(args[f"cache{j}"], dtype, [outer, S, inner], pos, rows)
