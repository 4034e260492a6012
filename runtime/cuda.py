"""The CUDA loader: cuda-bindings' driver API only. Load the cubin for this GPU, allocate the arena and
weights once, patch the relocations, and record the launch list into CUDA graphs replayed by every run:
one with the host copies (run) and one of kernels alone for callers holding device memory (launch).
On sm_90+, for engines whose manifest says their kernels wait for their predecessor (`"pdl": true`), every
launch of an entry after its first is a programmatic dependent launch (FLASHRT_PDL=0 turns that off)."""

import ctypes
import os

import numpy as np

from flashrt.engine_format.format import BASE_ARENA, Launch
from flashrt.engine_format.reader import EngineFile, EntryInfo
from flashrt.errors import DeviceError, InputError
from flashrt.runtime.engine import Engine, host_dtype

try:
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - depends on the machine
    cu = None

BIND_ALIGN = 16  # bytes: the widest vector access a kernel makes at a tensor's base


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        name = cu.cuGetErrorName(err)[1]
        raise DeviceError(f"{what} failed: {name.decode() if isinstance(name, bytes) else err}")
    return rest[0] if len(rest) == 1 else (rest or None)


_PRIMARY_CONTEXTS: dict[int, tuple] = {}


def primary_context(ordinal: int):
    """The device's primary context, retained once per process and never released: callers' own allocations
    in it (the device-pointer path) must outlive any engine."""
    if ordinal not in _PRIMARY_CONTEXTS:
        _check(cu.cuInit(0), "cuInit (is there an NVIDIA GPU and driver?)")
        dev = _check(cu.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        _PRIMARY_CONTEXTS[ordinal] = (dev, _check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain"))
    return _PRIMARY_CONTEXTS[ordinal]


def device_arch(ordinal: int = 0) -> tuple[int, int]:
    _check(cu.cuInit(0), "cuInit")
    dev = _check(cu.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    attr = cu.CUdevice_attribute
    major = _check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attribute")
    minor = _check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attribute")
    return major, minor


def pick_cubin_arch(targets: list[str], major: int, minor: int) -> str:
    """The engine's cubin for compute capability major.minor: sm_XYa, else sm_XY; cubins do not run on
    other architectures, so no fallback."""
    for name in (f"sm_{major}{minor}a", f"sm_{major}{minor}"):
        if name in targets:
            return name
    raise DeviceError(f"this GPU is sm_{major}{minor}, but the engine has cubins only for {', '.join(targets)}; "
                      f"rebuild with --target sm_{major}{minor}{'a' if major >= 9 else ''}")


def use_pdl(manifest: dict, major: int) -> bool:
    """Whether to launch an engine's kernels (each entry's after its first) with programmatic dependent launch, on a
    GPU of compute capability `major`: they may then start while their predecessor finishes, which is safe only
    for engines whose kernels all call griddepcontrol.wait first (manifest `pdl`, engine_format/SPEC.md §5).
    FLASHRT_PDL=0 turns it off."""
    return major >= 9 and manifest.get("pdl") is True and os.environ.get("FLASHRT_PDL") != "0"


class CUDAEngine(Engine):
    device = "cuda"

    def __init__(self, engine_file: EngineFile, ordinal: int = 0):
        super().__init__(engine_file)
        if cu is None:
            raise DeviceError("device='cuda' needs cuda-bindings: pip install cuda-bindings")
        self._allocs, self._host_allocs, self._graphs = [], [], []
        self._ctx = None
        try:
            self._dev, self._ctx = primary_context(ordinal)
        except DeviceError as e:
            raise DeviceError(f"CUDA is not available: {e}") from None
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        self._check_driver()
        self.check_kernels()  # the same params / argument checks the CPU executor makes, before any launch
        major, minor = device_arch(ordinal)
        self.arch = pick_cubin_arch(engine_file.targets, major, minor)
        self.pdl = use_pdl(self.manifest, major)
        self._module = _check(cu.cuModuleLoadData(engine_file.cubin(self.arch)), f"loading the {self.arch} cubin")
        self._functions = []
        for k in engine_file.kernels:
            fn = _check(cu.cuModuleGetFunction(self._module, k.symbol.encode()), f"kernel {k.symbol}")
            self._functions.append(fn)
        # the default dynamic shared memory limit is 48 KB minus the kernel's static shared memory: raise it for
        # every kernel that takes dynamic shared memory, to the most any of its launches asks for
        dynamic = {}
        for launch in engine_file.launches:
            dynamic[launch.kernel] = max(dynamic.get(launch.kernel, 0), launch.smem)
        for kernel, smem in dynamic.items():
            if smem:
                _check(cu.cuFuncSetAttribute(self._functions[kernel],
                                             cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                             smem), "raising the shared memory limit")
        self._stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self.arena = self._alloc(engine_file.arena_bytes)
        self.weights = self._alloc(engine_file.weights_bytes)
        if engine_file.weights_bytes:
            w = engine_file.weights()
            _check(cu.cuMemcpyHtoD(self.weights, w.ctypes.data, w.nbytes), "copying the weights")
        self._bound: dict[str, int] = {}
        self._bound_entry = engine_file.entries[0].name
        in_bytes = max(sum(t.nbytes for t in e.inputs) + 4 for e in engine_file.entries)  # + the token count
        out_bytes = max(sum(t.nbytes for t in e.outputs) for e in engine_file.entries)
        self._pinned_in = self._pinned(in_bytes)
        self._pinned_out = self._pinned(out_bytes)
        if self.stateful:
            _check(cu.cuMemsetD8(self.arena, 0, engine_file.arena_bytes), "clearing the engine state")
        self._host_graphs = {engine_file.entries[0].name: self._capture(True, engine_file.entries[0])}
        self._device_graphs: dict[str, object] = {}

    # ---- resources ---------------------------------------------------------------------------------

    def _check_driver(self) -> None:
        driver = _check(cu.cuDriverGetVersion(), "cuDriverGetVersion")
        prov = self.manifest.get("provenance", {})
        nvcc = str(prov.get("nvcc_version", "0.0"))
        try:
            need = int(nvcc.split(".")[0]) * 1000 + int(nvcc.split(".")[1]) * 10
        except (ValueError, IndexError):
            return
        if driver < need:
            raise DeviceError(f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, but the engine was "
                              f"built with nvcc {nvcc} and needs CUDA {need // 1000}.{need % 1000 // 10} "
                              f"(driver >= {prov.get('min_driver', '?')}); update the driver or rebuild with an "
                              "older nvcc")

    def _alloc(self, nbytes: int) -> int:
        ptr = _check(cu.cuMemAlloc(max(nbytes, 256)), f"allocating {nbytes} bytes of device memory")
        self._allocs.append(ptr)
        return int(ptr)

    def _pinned(self, nbytes: int) -> np.ndarray:
        ptr = _check(cu.cuMemHostAlloc(max(nbytes, 1), 0), "allocating pinned host memory")
        self._host_allocs.append(ptr)
        return np.frombuffer((ctypes.c_uint8 * max(nbytes, 1)).from_address(int(ptr)), np.uint8)

    def _patched_params(self, e: EntryInfo):
        """Argument bytes with device pointers in place, and kernelParams arrays pointing into them, for the
        launches of entry e (with its bound tensors redirected)."""
        ef = self.file
        blob = bytearray(ef.arguments())
        bound = self._bound if e.name == self._bound_entry else {}
        redirect = [(t.offset, t.offset + t.nbytes, bound[t.name]) for t in e.inputs + e.outputs if t.name in bound]
        launches = ef.launches[e.first:e.first + e.count]
        for launch in launches:
            for r in ef.relocations[launch.reloc_first:launch.reloc_first + launch.reloc_count]:
                at = launch.args_offset + r.slot
                value = int.from_bytes(blob[at:at + 8], "little")
                if r.base == BASE_ARENA:
                    target = self.arena + value
                    for start, end, ptr in redirect:
                        if start <= value < end:
                            target = ptr + (value - start)
                else:
                    target = self.weights + value
                blob[at:at + 8] = target.to_bytes(8, "little")
        buf = (ctypes.c_uint8 * max(len(blob), 1)).from_buffer(blob) if blob else None
        base = ctypes.addressof(buf) if buf is not None else 0
        params = []
        for launch in launches:
            k = ef.kernels[launch.kernel]
            arr = (ctypes.c_void_p * max(len(k.arg_offsets), 1))(
                *[base + launch.args_offset + o for o in k.arg_offsets])
            params.append(arr)
        return blob, buf, params

    def _capture(self, with_copies: bool, e: EntryInfo, skip: frozenset[int] = frozenset()):
        """Record entry e into a graph (kept in self._graphs) and instantiate it; with_copies: the host copies
        around the kernels; skip: indices of e's launches (from its first) to leave out (ablate)."""
        blob, buf, params = self._patched_params(e)
        s = self._stream
        _check(cu.cuStreamBeginCapture(s, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
               "cuStreamBeginCapture")
        try:
            if with_copies:
                pos = 0
                for t in e.inputs:
                    if t.nbytes:
                        _check(cu.cuMemcpyHtoDAsync(self.arena + t.offset, self._pinned_in.ctypes.data + pos,
                                                    t.nbytes, s), f"copying input '{t.name}'")
                    pos += t.nbytes
                if e.length is not None:  # the token count sits after the inputs in the pinned buffer
                    _check(cu.cuMemcpyHtoDAsync(self.arena + e.length, self._pinned_in.ctypes.data + pos, 4, s),
                           "copying the token count")
            kept = [lp for i, lp in enumerate(zip(self.file.launches[e.first:e.first + e.count], params))
                    if i not in skip]
            for i, (launch, p) in enumerate(kept):
                # the first launch follows the input copies (or the caller's work): a full dependency
                self._launch(launch, p, s, self.pdl and i > 0)
            if with_copies:
                pos = 0
                for t in e.outputs:
                    if t.nbytes:
                        _check(cu.cuMemcpyDtoHAsync(self._pinned_out.ctypes.data + pos, self.arena + t.offset,
                                                    t.nbytes, s), f"copying output '{t.name}'")
                    pos += t.nbytes
        finally:
            graph = _check(cu.cuStreamEndCapture(s), "cuStreamEndCapture")
        exe = _check(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        self._graphs.append((graph, exe))  # kernel nodes copied their parameters at capture
        return exe

    def _launch(self, launch: Launch, params, stream, pdl: bool) -> None:
        """Launch one record on `stream`; pdl: as a programmatic dependent launch of the previous kernel."""
        fn = self._functions[launch.kernel]
        if not pdl:
            _check(cu.cuLaunchKernel(fn, *launch.grid, *launch.block, launch.smem, stream, ctypes.addressof(params),
                                     0), f"launching kernel {launch.kernel}")
            return
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = launch.grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = launch.block
        cfg.sharedMemBytes, cfg.hStream = launch.smem, stream
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs, cfg.numAttrs = [attr], 1
        _check(cu.cuLaunchKernelEx(cfg, fn, ctypes.addressof(params), 0),
               f"launching kernel {launch.kernel} (programmatic dependent launch; FLASHRT_PDL=0 turns it off)")

    # ---- running -------------------------------------------------------------------------------------

    def run(self, feeds: dict, entry: str | None = None) -> dict[str, np.ndarray]:
        """Run an entry point (the first by default) on host arrays; returns host arrays."""
        if self._bound:
            raise InputError("this engine has bound device pointers; use launch(stream) or unbind() first")
        e, stored, n = self.prepare(feeds, entry)
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")  # callers may run engines from any thread
        pos = 0
        for t in e.inputs:
            self._pinned_in[pos:pos + t.nbytes] = stored[t.name].view(np.uint8).reshape(-1)
            pos += t.nbytes
        if e.length is not None:
            self._pinned_in[pos:pos + 4] = np.frombuffer(np.int32(n).tobytes(), np.uint8)
        if e.name not in self._host_graphs:
            self._host_graphs[e.name] = self._capture(True, e)
        _check(cu.cuGraphLaunch(self._host_graphs[e.name], self._stream), "cuGraphLaunch")
        _check(cu.cuStreamSynchronize(self._stream), "running the engine")
        out, pos = {}, 0
        for t in e.outputs:
            out[t.name] = self.host_output(t, self._pinned_out[pos:pos + t.nbytes])
            pos += t.nbytes
        return self.finish(e, n, out)

    def reset(self) -> None:
        """Clear the state: empty caches, position 0."""
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        _check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
        for offset, nbytes in self.state_ranges():
            _check(cu.cuMemsetD8(self.arena + offset, 0, nbytes), "clearing the engine state")
        self.position = 0

    def load_state(self, arrays: dict, position: int) -> None:
        """Set the caches to `position` rows given per state tensor (the rest zero) and the position."""
        parts = self.state_arrays(arrays, position)
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        _check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
        for offset, data in parts:
            _check(cu.cuMemcpyHtoD(self.arena + offset, data.ctypes.data, data.size), "writing the engine state")
        self.position = position

    def bind(self, pointers: dict[str, int], entry: str | None = None) -> None:
        """Redirect an entry's inputs/outputs to caller-owned device memory (name -> device pointer); re-records
        its kernel graph once, so each launch() costs one graph launch and no copies."""
        e = self.entry_info(entry)
        names = {t.name for t in e.inputs + e.outputs}
        unknown = [n for n in pointers if n not in names]
        if unknown:
            raise InputError(f"bind: unknown tensor(s) {unknown}; entry '{e.name}' has {sorted(names)}")
        # kernels were generated for the arena's 256-byte aligned slots: 16-byte vector loads need at least that
        unaligned = [f"{n} ({int(p):#x})" for n, p in pointers.items() if int(p) % BIND_ALIGN]
        if unaligned:
            raise InputError(f"bind: pointer(s) {', '.join(unaligned)} are not {BIND_ALIGN}-byte aligned "
                             "(cuMemAlloc's are 256-byte aligned)")
        if e.name != self._bound_entry:
            self._bound, self._bound_entry = {}, e.name
        self._bound.update({n: int(p) for n, p in pointers.items()})
        self._device_graphs.pop(e.name, None)

    def unbind(self) -> None:
        self._bound = {}
        self._device_graphs.pop(self._bound_entry, None)

    def tensor_pointer(self, name: str, entry: str | None = None) -> int:
        """Device address of an entry's input or output inside the engine's arena."""
        e = self.entry_info(entry)
        for t in e.inputs + e.outputs:
            if t.name == name:
                bound = self._bound if e.name == self._bound_entry else {}
                return bound.get(name, self.arena + t.offset)
        raise InputError(f"no input or output named '{name}' in entry '{e.name}'")

    def _device_graph(self, e: EntryInfo):
        if e.name not in self._device_graphs:
            self._device_graphs[e.name] = self._capture(False, e)
        return self._device_graphs[e.name]

    def launch(self, stream=None, entry: str | None = None) -> None:
        """Run an entry's kernels on `stream` (a CUstream or its handle) without host copies or
        synchronization. A stateful entry must not need a run-time token count (decode does not)."""
        e = self.entry_info(entry)
        if e.length is not None:
            raise InputError(f"entry '{e.name}' takes its token count from run(); launch() serves entries "
                             "with a fixed count (decode)")
        if e.tokens is not None:
            self.prepare({t.name: np.zeros(t.shape, host_dtype(t.dtype)) for t in e.inputs}, e.name)
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        _check(cu.cuGraphLaunch(self._device_graph(e), self._stream if stream is None else stream), "cuGraphLaunch")
        if e.tokens is not None:
            self.position += e.tokens

    def _restore_position(self) -> None:
        """Put the device position counter back to the host mirror (timing replays of a stateful entry)."""
        if self.stateful:
            _check(cu.cuMemsetD32Async(self.arena + self.file.position_offset, self.position, 1, self._stream),
                   "restoring the position")

    def latencies(self, iters: int = 1000, warmup: int = 50, entry: str | None = None) -> list[float]:
        """Milliseconds of each of `iters` replays of an entry's kernel graph, timed with CUDA events. A stateful
        entry replays at the current position: the counter is restored between replays, outside the timing."""
        e = self.entry_info(entry)
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        if e.tokens is not None:
            self.prepare({t.name: np.zeros(t.shape, host_dtype(t.dtype)) for t in e.inputs}, e.name)
        graph = self._device_graph(e)
        for _ in range(warmup):
            _check(cu.cuGraphLaunch(graph, self._stream), "cuGraphLaunch")
            self._restore_position()
        events = [_check(cu.cuEventCreate(0), "cuEventCreate") for _ in range(2 * iters)]
        for i in range(iters):
            _check(cu.cuEventRecord(events[2 * i], self._stream), "cuEventRecord")
            _check(cu.cuGraphLaunch(graph, self._stream), "cuGraphLaunch")
            _check(cu.cuEventRecord(events[2 * i + 1], self._stream), "cuEventRecord")
            self._restore_position()
        _check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
        out = [_check(cu.cuEventElapsedTime(events[2 * i], events[2 * i + 1]), "cuEventElapsedTime")
               for i in range(iters)]
        for ev in events:
            cu.cuEventDestroy(ev)
        return out

    def ablate(self, groups: dict[str, list[int]], iters: int = 200, entry: str | None = None) -> dict[str, float]:
        """In-graph cost of groups of an entry's launches (label -> indices from the entry's first launch): the
        median milliseconds of a replay of the entry's kernel graph minus that of a graph captured without the
        group's launches. Each round replays the full graph, then every ablated one, so drift cancels. Timing
        only: the ablated replays compute wrong results into the arena (and state); the position counter is
        restored between replays, as in latencies()."""
        e = self.entry_info(entry)
        if iters < 1:
            raise InputError(f"ablate: iters = {iters}; at least 1 replay per graph is needed")
        bad = sorted({i for ix in groups.values() for i in ix if not 0 <= i < e.count})
        if bad:
            raise InputError(f"ablate: launch indices {bad[:8]} are not 0..{e.count - 1} of entry '{e.name}'")
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        if e.tokens is not None:
            self.prepare({t.name: np.zeros(t.shape, host_dtype(t.dtype)) for t in e.inputs}, e.name)
        full = self._device_graph(e)
        owned = len(self._graphs)  # self._graphs[owned:]: the ablated graphs, destroyed below
        events = []
        try:
            graphs = [full] + [self._capture(False, e, frozenset(ix)) for ix in groups.values()]
            for _ in range(10):  # warm-up
                for g in graphs:
                    _check(cu.cuGraphLaunch(g, self._stream), "cuGraphLaunch")
                    self._restore_position()
            events = [_check(cu.cuEventCreate(0), "cuEventCreate") for _ in range(2 * iters * len(graphs))]
            pairs = iter(zip(events[::2], events[1::2]))
            for _ in range(iters):
                for g in graphs:
                    start, end = next(pairs)
                    _check(cu.cuEventRecord(start, self._stream), "cuEventRecord")
                    _check(cu.cuGraphLaunch(g, self._stream), "cuGraphLaunch")
                    _check(cu.cuEventRecord(end, self._stream), "cuEventRecord")
                    self._restore_position()
            _check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
            ms = [_check(cu.cuEventElapsedTime(a, b), "cuEventElapsedTime") for a, b in zip(events[::2], events[1::2])]
        finally:
            cu.cuStreamSynchronize(self._stream)
            for ev in events:
                cu.cuEventDestroy(ev)
            for graph, exe in self._graphs[owned:]:
                cu.cuGraphExecDestroy(exe)
                cu.cuGraphDestroy(graph)
            del self._graphs[owned:]
        medians = [sorted(ms[j::len(graphs)])[iters // 2] for j in range(len(graphs))]
        return {label: medians[0] - m for label, m in zip(groups, medians[1:])}

    def profile(self, iters: int = 20, entry: str | None = None) -> list[float]:
        """Median milliseconds of each launch of an entry, launched one by one between events (no graph, so
        the sum exceeds a replay by the launch gaps)."""
        e = self.entry_info(entry)
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        keep = self._patched_params(e)  # the argument bytes must outlive the launches that point into them
        params = keep[2]
        launches = self.file.launches[e.first:e.first + e.count]
        events = [_check(cu.cuEventCreate(0), "cuEventCreate") for _ in range(len(launches) + 1)]
        samples: list[list[float]] = [[] for _ in launches]
        for _ in range(iters + 1):
            self._restore_position()
            _check(cu.cuEventRecord(events[0], self._stream), "cuEventRecord")
            for i, (launch, p) in enumerate(zip(launches, params)):
                self._launch(launch, p, self._stream, False)  # events between launches: no overlap to allow
                _check(cu.cuEventRecord(events[i + 1], self._stream), "cuEventRecord")
            _check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
            for i in range(len(launches)):
                samples[i].append(_check(cu.cuEventElapsedTime(events[i], events[i + 1]), "cuEventElapsedTime"))
        self._restore_position()
        for ev in events:
            cu.cuEventDestroy(ev)
        return [sorted(s[1:])[len(s[1:]) // 2] for s in samples]

    def synchronize(self) -> None:
        _check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")

    def close(self) -> None:
        if cu is None or self._ctx is None:
            return
        cu.cuCtxSetCurrent(self._ctx)
        cu.cuStreamSynchronize(self._stream) if hasattr(self, "_stream") else None
        for graph, exe in self._graphs:
            cu.cuGraphExecDestroy(exe)
            cu.cuGraphDestroy(graph)
        for p in self._allocs:
            cu.cuMemFree(p)
        for p in self._host_allocs:
            cu.cuMemFreeHost(p)
        if getattr(self, "_module", None) is not None:
            cu.cuModuleUnload(self._module)
        if hasattr(self, "_stream"):
            cu.cuStreamDestroy(self._stream)
        self._graphs, self._allocs, self._host_allocs, self._module, self._ctx = [], [], [], None, None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
