"""One kernel of a family on the GPU, outside any engine: compile (kernel cache), link, load, fill device buffers
from host bytes, launch, read back; and its time per launch from a CUDA graph of many launches. Used by the
kernel-level GPU tests and benchmarks/kernel_bench.py (needs cuda-bindings and a GPU)."""

import ctypes

import numpy as np
from cuda.bindings import driver as cu

from flashrt.aot.codegen import compile_kernel, find_toolchain, kernel_source, link
from flashrt.kernels.memory import Pointer
from flashrt.kernels.registry import family
from flashrt.runtime.cuda import _check, device_arch, primary_context


def gpu_arch() -> str:
    major, minor = device_arch(0)
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


class Kernel:
    def __init__(self, family_name: str, params: dict):
        _, ctx = primary_context(0)
        _check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        fam = family(family_name)
        self.family, self.params = fam, params
        src = kernel_source(family_name, params)
        tc = find_toolchain()
        obj, self.resources, _ = compile_kernel(tc, src, gpu_arch())
        self.module = _check(cu.cuModuleLoadData(link(tc, [obj], gpu_arch())), "cuModuleLoadData")
        self.function = _check(cu.cuModuleGetFunction(self.module, src.symbol.encode()), "cuModuleGetFunction")
        self.grid, self.block, self.smem = fam.launch_config(params)
        if self.smem:  # the default dynamic limit is 48 KB minus the static shared memory: opt in
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(cu.cuFuncSetAttribute(self.function, attr, self.smem), "cuFuncSetAttribute")
        self.arg_names = [name for name, _ in fam.arg_spec(params)]
        self.stream = _check(cu.cuStreamCreate(0), "cuStreamCreate")

    def launch(self, pointers: dict[str, int], pdl: bool = False) -> None:
        """One launch; pdl: let it start while the previous kernel on the stream still runs (programmatic
        dependent launch: the kernel's griddepcontrol.wait orders its dependent reads)."""
        values = (ctypes.c_uint64 * len(self.arg_names))(*[pointers[n] for n in self.arg_names])
        slots = (ctypes.c_void_p * len(values))(*[ctypes.addressof(values) + 8 * i for i in range(len(values))])
        if not pdl:
            _check(cu.cuLaunchKernel(self.function, *self.grid, *self.block, self.smem, self.stream,
                                     ctypes.addressof(slots), 0), "cuLaunchKernel")
            return
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = self.grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self.block
        cfg.sharedMemBytes, cfg.hStream = self.smem, self.stream
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs, cfg.numAttrs = [attr], 1
        _check(cu.cuLaunchKernelEx(cfg, self.function, ctypes.addressof(slots), 0), "cuLaunchKernelEx")

    def run(self, host: dict[str, np.ndarray], out: str, poison: int | None = 0xFF) -> np.ndarray:
        """Launch once on copies of the host byte arrays (the output filled with `poison` bytes first, or with its
        host bytes for an output the kernel also reads: poison None); the output's bytes after the launch."""
        ptrs = {}
        for name in self.arg_names:
            data = np.ascontiguousarray(host[name]).view(np.uint8).ravel()
            ptrs[name] = alloc(max(data.size, 16))
            if name == out and poison is not None:
                _check(cu.cuMemsetD8(ptrs[name], poison, data.size), "cuMemsetD8")
            else:
                _check(cu.cuMemcpyHtoD(ptrs[name], data.ctypes.data, data.size), "cuMemcpyHtoD")
        self.launch(ptrs)
        _check(cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        result = np.empty(host[out].nbytes, np.uint8)
        _check(cu.cuMemcpyDtoH(result.ctypes.data, ptrs[out], result.size), "cuMemcpyDtoH")
        for p in ptrs.values():
            cu.cuMemFree(p)
        return result

    def time_graph(self, pointer_sets: list[dict[str, int]], launches: int = 200, reps: int = 5,
                   pdl: bool = False) -> float:
        """Microseconds per launch: a CUDA graph of `launches` launches cycling through `pointer_sets` (so the
        operands can exceed the L2 cache), replayed `reps` times after a warm-up; the median replay."""
        _check(cu.cuStreamBeginCapture(self.stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
               "cuStreamBeginCapture")
        for i in range(launches):
            self.launch(pointer_sets[i % len(pointer_sets)], pdl and i > 0)
        graph = _check(cu.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        exe = _check(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        start, end = _check(cu.cuEventCreate(0), "cuEventCreate"), _check(cu.cuEventCreate(0), "cuEventCreate")
        _check(cu.cuGraphLaunch(exe, self.stream), "cuGraphLaunch")
        times = []
        for _ in range(reps):
            _check(cu.cuEventRecord(start, self.stream), "cuEventRecord")
            _check(cu.cuGraphLaunch(exe, self.stream), "cuGraphLaunch")
            _check(cu.cuEventRecord(end, self.stream), "cuEventRecord")
            _check(cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
            times.append(_check(cu.cuEventElapsedTime(start, end), "cuEventElapsedTime") * 1e3 / launches)
        cu.cuGraphExecDestroy(exe)
        cu.cuGraphDestroy(graph)
        return sorted(times)[len(times) // 2]


def alloc(nbytes: int) -> int:
    return int(_check(cu.cuMemAlloc(nbytes), "cuMemAlloc"))


def upload(data: np.ndarray) -> int:
    data = np.ascontiguousarray(data).view(np.uint8).ravel()
    ptr = alloc(max(data.size, 16))
    _check(cu.cuMemcpyHtoD(ptr, data.ctypes.data, data.size), "cuMemcpyHtoD")
    return ptr


def reference(family_name: str, params: dict, host: dict[str, np.ndarray], out: str) -> np.ndarray:
    """The family's numpy reference on the same host bytes; the output's bytes."""
    fam = family(family_name)
    args = {}
    for name, _ in fam.arg_spec(params):
        data = np.array(np.ascontiguousarray(host[name]).view(np.uint8).ravel())  # a writable copy
        args[name] = Pointer(data, 0, data.size, name)
    fam.reference(params, args)
    return args[out].buffer
