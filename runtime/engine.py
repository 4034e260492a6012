"""What every engine shares: the I/O signature and input checking."""

import numpy as np

from types import ModuleType

from flashrt.engine_format.reader import EngineFile, TensorInfo
from flashrt.errors import EngineFormatError, InputError
from flashrt.kernels.dtypes import STORAGE, bf16_to_f32, f32_to_bf16
from flashrt.kernels.params import check as check_params
from flashrt.kernels.registry import family

HOST_DTYPES = {"bfloat16": np.float32}  # bfloat16 tensors are exchanged as float32 arrays


def host_dtype(dtype: str) -> np.dtype:
    return np.dtype(HOST_DTYPES.get(dtype, STORAGE[dtype]))


class Engine:
    def __init__(self, engine_file: EngineFile):
        self.file = engine_file
        self.manifest = engine_file.manifest

    def _check_kernel(self, index: int) -> ModuleType:
        """The kernel's family, after checking its params and that its argument list is the family's."""
        k = self.file.kernels[index]
        where = f"{self.file.path}: manifest kernels[{index}] ({k.family} kernel {k.symbol})"
        try:
            fam = family(k.family)
            check_params(k.family, k.params)
        except EngineFormatError as e:
            raise EngineFormatError(f"{where}: {e}") from None
        try:
            spec = [(str(n), str(t)) for n, t in fam.arg_spec(k.params)]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a family without a params check
            raise EngineFormatError(f"{where}: invalid params: {type(e).__name__}: {str(e)[:160]}") from e
        have = list(zip(k.arg_names, k.arg_types))
        if have != spec:
            raise EngineFormatError(f"{where}: args {_show(have)} differ from the family's parameters {_show(spec)}")
        return fam

    def check_kernels(self) -> None:
        """Every kernel's params and argument list, checked before anything runs (both executors)."""
        for index in range(len(self.file.kernels)):
            self._check_kernel(index)

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.file.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.file.outputs

    def example_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded random inputs of the right shapes and dtypes."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            dt = host_dtype(t.dtype)
            if dt.kind == "f":
                feeds[t.name] = rng.standard_normal(t.shape).astype(dt)
            elif dt.kind == "b":
                feeds[t.name] = rng.integers(0, 2, t.shape).astype(dt)
            else:
                feeds[t.name] = rng.integers(0, 8, t.shape).astype(dt)
        return feeds

    def check_inputs(self, feeds: dict) -> dict[str, np.ndarray]:
        """The inputs as stored bytes per input name; errors name the input, what was given and expected."""
        if not isinstance(feeds, dict):
            raise InputError(f"inputs must be a dict of name -> numpy array, got {type(feeds).__name__}")
        names = [t.name for t in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing:
            raise InputError(f"missing input(s) {missing}; the engine takes {names}")
        if extra:
            raise InputError(f"unknown input(s) {extra}; the engine takes {names}")
        out = {}
        for t in self.inputs:
            arr = feeds[t.name]
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input '{t.name}' is a {type(arr).__name__}, expected a numpy array")
            expect = host_dtype(t.dtype)
            if t.dtype == "bfloat16" and arr.dtype.name == "bfloat16":  # an ml_dtypes array: already bf16 bits
                out[t.name] = np.ascontiguousarray(arr).view(np.uint16)
                if tuple(arr.shape) != tuple(t.shape):
                    raise InputError(f"input '{t.name}' has shape {list(arr.shape)}, expected {list(t.shape)}")
                continue
            if arr.dtype != expect:
                raise InputError(f"input '{t.name}' has dtype {arr.dtype}, expected {expect}")
            if tuple(arr.shape) != tuple(t.shape):
                raise InputError(f"input '{t.name}' has shape {list(arr.shape)}, expected {list(t.shape)}")
            stored = f32_to_bf16(arr) if t.dtype == "bfloat16" else np.ascontiguousarray(arr)
            out[t.name] = stored
        return out

    @staticmethod
    def host_output(t: TensorInfo, raw: np.ndarray) -> np.ndarray:
        """Stored bytes of output t -> the numpy array handed to the caller."""
        arr = raw.view(STORAGE[t.dtype]).reshape(t.shape)
        return bf16_to_f32(arr) if t.dtype == "bfloat16" else arr.copy()


def _show(pairs: list) -> str:
    text = ", ".join(f"{n}:{t}" for n, t in pairs)
    return f"[{text if len(text) <= 200 else text[:197] + '...'}]"
