"""What every engine shares: the I/O signature and input checking."""

import numpy as np

from types import ModuleType

from flashrt.engine_format.reader import EngineFile, EntryInfo, TensorInfo
from flashrt.errors import EngineFormatError, InputError
from flashrt.kernels.dtypes import STORAGE, bf16_to_f32, f32_to_bf16
from flashrt.kernels import prefetch
from flashrt.kernels.params import check as check_params
from flashrt.kernels.registry import family

HOST_DTYPES = {"bfloat16": np.float32}  # bfloat16 tensors are exchanged as float32 arrays


def host_dtype(dtype: str) -> np.dtype:
    return np.dtype(HOST_DTYPES.get(dtype, STORAGE[dtype]))


class Engine:
    def __init__(self, engine_file: EngineFile):
        self.file = engine_file
        self.manifest = engine_file.manifest
        self.position = 0  # tokens in the state (a host mirror of the device counter; 0 without state)

    # ---- entry points and state (engine_format/SPEC.md §11) ----------------------------------------

    @property
    def entries(self) -> list[str]:
        return [e.name for e in self.file.entries]

    @property
    def stateful(self) -> bool:
        return self.file.max_context is not None

    def entry_info(self, name: str | None) -> EntryInfo:
        try:
            return self.file.entry(name)
        except KeyError:
            raise InputError(f"unknown entry point '{name}'; the engine has {self.entries}") from None

    def prepare(self, feeds: dict, entry: str | None) -> tuple[EntryInfo, dict[str, np.ndarray], int]:
        """Check a run's inputs before anything runs (so a refused run leaves the state unchanged): the stored
        input bytes, padded to the entry's token count, and the number of valid new tokens."""
        e = self.entry_info(entry)
        if e.tokens is None:
            return e, self.check_inputs(feeds, e.inputs), 0
        if not isinstance(feeds, dict):
            raise InputError(f"inputs must be a dict of name -> numpy array, got {type(feeds).__name__}")
        n, padded = e.tokens, dict(feeds)
        counts = {k: feeds[k].shape[a] for k, a in e.token_axes.items()
                  if isinstance(feeds.get(k), np.ndarray) and feeds[k].ndim > a}
        if counts:
            n = max(counts.values())
            if min(counts.values()) != n:
                raise InputError(f"entry '{e.name}': inputs give different token counts {counts}")
            if n > e.tokens:
                raise InputError(f"entry '{e.name}' takes at most {e.tokens} tokens (--prefill-len), got {n}")
            if n < 1:
                raise InputError(f"entry '{e.name}' needs at least one token")
            for k, a in e.token_axes.items():
                if k in counts:
                    width = [(0, 0)] * feeds[k].ndim
                    width[a] = (0, e.tokens - n)
                    padded[k] = np.pad(feeds[k], width)
        stored = self.check_inputs(padded, e.inputs)
        if e.needs_context and self.position == 0:
            raise InputError(f"entry '{e.name}' continues a sequence, but the engine's state is empty: run "
                             "'prefill' first (or load_state)")
        if self.position + n > self.file.max_context:
            raise InputError(f"entry '{e.name}': {n} more token(s) at position {self.position} would pass the "
                             f"engine's --max-context {self.file.max_context}; reset() to start a new sequence")
        return e, stored, n

    def finish(self, e: EntryInfo, n: int, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """After a stateful run: advance the host mirror and cut token-axis outputs to the valid tokens."""
        if e.tokens is None:
            return outputs
        self.position += n
        for k, a in e.token_axes.items():
            if k in outputs:
                outputs[k] = np.take(outputs[k], np.arange(n), axis=a)
        return outputs

    def state_arrays(self, arrays: dict, position: int) -> list[tuple[int, np.ndarray]]:
        """(arena offset, stored bytes) of every state tensor, from caller arrays holding `position` rows of
        some caches (the rest zero) -- for load_state."""
        if not self.stateful:
            raise InputError("this engine has no state")
        if not isinstance(position, int) or not 0 <= position <= self.file.max_context:
            raise InputError(f"load_state: position {position!r} is not 0..{self.file.max_context}")
        names = [s.tensor.name for s in self.file.state]
        unknown = [k for k in arrays if k not in names]
        if unknown:
            raise InputError(f"load_state: unknown state tensor(s) {unknown}; the engine has {names}")
        out = []
        for s in self.file.state:
            t = s.tensor
            full = np.zeros(t.shape, np.float32)
            if t.name in arrays:
                arr = np.asarray(arrays[t.name], np.float32)
                want = list(t.shape)
                want[s.axis] = position
                if list(arr.shape) != want:
                    raise InputError(f"load_state: '{t.name}' has shape {list(arr.shape)}, expected {want} "
                                     f"({position} rows along axis {s.axis})")
                index = [slice(None)] * len(t.shape)
                index[s.axis] = slice(0, position)
                full[tuple(index)] = arr
            stored = f32_to_bf16(full) if t.dtype == "bfloat16" else full.astype(STORAGE[t.dtype])
            out.append((t.offset, np.ascontiguousarray(stored).view(np.uint8).reshape(-1)))
        out.append((self.file.position_offset, np.frombuffer(np.int32(position).tobytes(), np.uint8)))
        return out

    def state_ranges(self) -> list[tuple[int, int]]:
        """(offset, nbytes) of the state reset() clears: the caches and the position counter."""
        if not self.stateful:
            return []
        return [(s.tensor.offset, s.tensor.nbytes) for s in self.file.state] + [(self.file.position_offset, 4)]

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
        self._check_prefetch_spans()

    def _check_prefetch_spans(self) -> None:
        """Each L2 prefetch span (kernels/prefetch.py) lies within what its relocation grants: the GPU issues the
        prefetch, the CPU reference never reads it."""
        ef = self.file
        for i, launch in enumerate(ef.launches):
            k = ef.kernels[launch.kernel]
            sizes = prefetch.sizes(k.params)
            if not sizes:
                continue
            relocs = {r.slot: r for r in ef.relocations[launch.reloc_first:launch.reloc_first + launch.reloc_count]}
            offsets = dict(zip(k.arg_names, k.arg_offsets))
            for j, n in enumerate(sizes):
                r = relocs.get(offsets.get(f"l2_next{j}"))
                if r is None or r.extent < n:
                    raise EngineFormatError(f"{ef.path}: launch[{i}] ({k.family} kernel {k.symbol}): l2_next[{j}] "
                                            f"= {n} bytes exceeds its relocation's "
                                            f"{'missing extent' if r is None else f'{r.extent} bytes'}")

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.file.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.file.outputs

    def example_inputs(self, seed: int = 0, entry: str | None = None) -> dict[str, np.ndarray]:
        """Seeded random inputs of the right shapes and dtypes."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.entry_info(entry).inputs:
            dt = host_dtype(t.dtype)
            if dt.kind == "f":
                feeds[t.name] = rng.standard_normal(t.shape).astype(dt)
            elif dt.kind == "b":
                feeds[t.name] = rng.integers(0, 2, t.shape).astype(dt)
            else:
                feeds[t.name] = rng.integers(0, 8, t.shape).astype(dt)
        return feeds

    def check_inputs(self, feeds: dict, tensors: list[TensorInfo] | None = None) -> dict[str, np.ndarray]:
        """The inputs as stored bytes per input name; errors name the input, what was given and expected."""
        tensors = self.inputs if tensors is None else tensors
        if not isinstance(feeds, dict):
            raise InputError(f"inputs must be a dict of name -> numpy array, got {type(feeds).__name__}")
        names = [t.name for t in tensors]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing:
            raise InputError(f"missing input(s) {missing}; the engine takes {names}")
        if extra:
            raise InputError(f"unknown input(s) {extra}; the engine takes {names}")
        out = {}
        for t in tensors:
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
