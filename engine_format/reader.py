"""Read and validate a .frt file. Every offset, size, count and index is checked before use; any fault
is an EngineFormatError naming the field and the values (SPEC.md §9 step 1)."""

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass, field

import numpy as np

from flashrt.engine_format.format import (
    ARG_SIZES, BASE_ARENA, BASE_WEIGHTS, DTYPE_SIZES, FORMAT_MAJOR, FORMAT_MINOR, HEADER, LAUNCH, MAGIC,
    MAX_SECTIONS, MIN_ALIGNMENT, RELOCATION, SECTION, Launch, Relocation, SectionKind, arg_layout,
)
from flashrt.errors import EngineFormatError

MAX_BYTES = 1 << 44  # no arena or tensor is larger than 16 TiB; larger numbers are damage
MAX_RANK = 8
MAX_SMEM = 232448  # the largest dynamic shared memory of any supported architecture
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
       "int8": np.int8, "bool": np.bool_}
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


@dataclass
class Section:
    kind: int
    name: str
    offset: int
    size: int
    alignment: int
    sha256: bytes


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class StateInfo:
    """A persistent tensor (a KV cache): zero at load and after reset; `axis` is its sequence axis."""
    tensor: TensorInfo
    axis: int


@dataclass
class EntryInfo:
    """An entry point: its I/O and its run of the launch list. Stateful entries write `tokens` new tokens at
    most; `length` is the arena offset of the int32 count of valid ones (None: always `tokens`)."""
    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    first: int
    count: int
    tokens: int | None = None
    length: int | None = None
    needs_context: bool = False
    token_axes: dict = field(default_factory=dict)


@dataclass
class KernelInfo:
    symbol: str
    family: str
    params: dict
    arg_names: list[str]
    arg_types: list[str]
    arg_offsets: list[int]
    args_size: int


@dataclass
class EngineFile:
    path: str
    major: int
    minor: int
    sections: list[Section]
    manifest: dict
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    kernels: list[KernelInfo]
    launches: list[Launch]
    relocations: list[Relocation]
    arena_bytes: int
    weights_bytes: int
    _data: object = field(repr=False, default=None)  # bytes or mmap, kept alive for the views below
    entries: list[EntryInfo] = field(default_factory=list)
    state: list[StateInfo] = field(default_factory=list)
    max_context: int | None = None
    position_offset: int | None = None  # arena offset of the int32 position counter

    def entry(self, name: str | None) -> EntryInfo:
        if name is None:
            return self.entries[0]
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def section_bytes(self, s: Section) -> memoryview:
        return memoryview(self._data)[s.offset:s.offset + s.size]

    def section(self, kind: int, name: str | None = None) -> Section | None:
        for s in self.sections:
            if s.kind == kind and (name is None or s.name == name):
                return s
        return None

    @property
    def targets(self) -> list[str]:
        return [s.name for s in self.sections if s.kind == SectionKind.CUBIN]

    def cubin(self, arch: str) -> bytes:
        s = self.section(SectionKind.CUBIN, arch)
        if s is None:
            raise EngineFormatError(f"{self.path}: no cubin for {arch}; the engine has {self.targets}")
        return bytes(self.section_bytes(s))

    def weights(self) -> np.ndarray:
        s = self.section(SectionKind.WEIGHTS)
        return np.frombuffer(self._data, dtype=np.uint8, count=s.size, offset=s.offset)

    def arguments(self) -> bytes:
        return bytes(self.section_bytes(self.section(SectionKind.ARGUMENTS)))

    def selftest(self) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """The bundled (meta, inputs, expected outputs), validated; None when the engine has none."""
        s = self.section(SectionKind.SELFTEST)
        if s is None:
            return None
        raw = self.section_bytes(s)
        where = f"{self.path}: selftest section"
        if s.size < 4:
            raise EngineFormatError(f"{where} is {s.size} bytes, shorter than its length field")
        n = int.from_bytes(raw[:4], "little")
        start = -(-(4 + n) // 256) * 256
        if 4 + n > s.size or start > s.size:
            raise EngineFormatError(f"{where}: JSON length {n} exceeds the section ({s.size} bytes)")
        try:
            meta = json.loads(bytes(raw[4:4 + n]).decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise EngineFormatError(f"{where}: invalid JSON: {str(e)[:120]}") from None
        if not isinstance(meta, dict):
            raise EngineFormatError(f"{where}: JSON is not an object")
        blob = raw[start:]
        tol = meta.get("max_rel_l2")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0 <= tol < 1e6:
            raise EngineFormatError(f"{where}: max_rel_l2 = {tol!r} is not a non-negative number")
        tensors = []
        for key, sig in (("inputs", self.inputs), ("outputs", self.outputs)):
            items = _field(self.path, meta, key, list, "selftest")
            found = {}
            for i, t in enumerate(items):
                info = _tensor(self.path, t, f"selftest {key}[{i}]", len(blob), "selftest data")
                found[info.name] = info
            want = {t.name: t for t in sig}
            if set(found) != set(want):
                raise EngineFormatError(f"{where}: {key} {sorted(found)} differ from the engine's {sorted(want)}")
            arrays = {}
            for name, info in found.items():
                host = "float32" if want[name].dtype == "bfloat16" else want[name].dtype
                if info.shape != want[name].shape or info.dtype != host:
                    raise EngineFormatError(f"{where}: {key[:-1]} '{name}' is {info.dtype}{list(info.shape)}, "
                                            f"expected {host}{list(want[name].shape)}")
                arrays[name] = np.frombuffer(blob, dtype=_NP[host], count=int(np.prod(info.shape)),
                                             offset=info.offset).reshape(info.shape)
            tensors.append(arrays)
        return meta, tensors[0], tensors[1]

    def launch_args(self, launch: Launch) -> bytes:
        s = self.section(SectionKind.ARGUMENTS)
        start = s.offset + launch.args_offset
        return bytes(memoryview(self._data)[start:start + launch.args_size])


def _fail(path: str, msg: str):
    raise EngineFormatError(f"{path}: {msg}")


FLOAT_STATE = ("float32", "float16", "bfloat16")


def _loc(where: str) -> str:
    """Where a JSON field lives, for messages: the manifest, or the self-test bundle's JSON."""
    return where if where.startswith("selftest") else f"manifest {where}" if where else "manifest"


def _field(path: str, obj, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        _fail(path, f"{_loc(where)} lacks field '{key}'")
    value = obj[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        _fail(path, f"{_loc(where)}.{key} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def _uint(path: str, obj, key: str, where: str, limit: int = MAX_BYTES) -> int:
    value = _field(path, obj, key, int, where)
    if not 0 <= value <= limit:
        _fail(path, f"{_loc(where)}.{key} = {value} is out of range 0..{limit}")
    return value


def _tensor(path: str, obj, where: str, region_bytes: int, region: str) -> TensorInfo:
    name = _field(path, obj, "name", str, where)
    dtype = _field(path, obj, "dtype", str, where)
    if dtype not in DTYPE_SIZES:
        _fail(path, f"{_loc(where)} '{name}' has unknown dtype {dtype[:40]!r}")
    shape = _field(path, obj, "shape", list, where)
    if len(shape) > MAX_RANK or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_BYTES
                                        for d in shape):
        _fail(path, f"{_loc(where)} '{name}' has invalid shape {str(shape)[:80]}")
    offset = _uint(path, obj, "offset", where)
    nbytes = _uint(path, obj, "nbytes", where)
    expect = DTYPE_SIZES[dtype] * int(np.prod(shape, dtype=object))
    if nbytes != expect:
        _fail(path, f"{_loc(where)} '{name}': nbytes {nbytes} != {expect} implied by {dtype}{shape}")
    if offset + nbytes > region_bytes:
        _fail(path, f"{_loc(where)} '{name}': bytes {offset}..{offset + nbytes} exceed the {region} "
                    f"({region_bytes} bytes)")
    return TensorInfo(name, dtype, tuple(shape), offset, nbytes)


def read_engine(source: str | os.PathLike | bytes, verify_checksums: bool = True) -> EngineFile:
    """Open and fully validate an engine (a path, or the file's bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        path, data = "<bytes>", bytes(source)
    else:
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise EngineFormatError(f"{path}: cannot read engine file: {e.strerror or e}") from None
    return _parse(path, data, verify_checksums)


def _parse(path: str, data, verify: bool) -> EngineFile:
    size = len(data)
    if size < HEADER.size:
        _fail(path, f"not a FlashRT engine: {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, major, minor, count, table_offset, file_size, table_sha = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        _fail(path, f"not a FlashRT engine: magic is {magic!r}, expected {MAGIC!r}")
    if major != FORMAT_MAJOR or minor > FORMAT_MINOR:
        _fail(path, f"engine format version {major}.{minor} is newer than this reader "
                    f"(reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}); "
                    f"upgrade flashrt to a version that reads format {major}.{minor}"
              if (major, minor) > (FORMAT_MAJOR, FORMAT_MINOR) else
              f"engine format version {major}.{minor} is not readable (this reader reads {FORMAT_MAJOR}.x)")
    if file_size != size:
        _fail(path, f"truncated or padded: header.file_size = {file_size} but the file has {size} bytes")
    if not 1 <= count <= MAX_SECTIONS:
        _fail(path, f"header.section_count = {count} is out of range 1..{MAX_SECTIONS}")
    if table_offset != HEADER.size:
        _fail(path, f"header.table_offset = {table_offset}, expected {HEADER.size}")
    table_end = table_offset + count * SECTION.size
    if table_end > size:
        _fail(path, f"section table ({count} entries) ends at {table_end}, past the end of the file ({size})")
    if hashlib.sha256(data[table_offset:table_end]).digest() != table_sha:
        _fail(path, "section table checksum mismatch (header.table_sha256)")

    sections, prev_end, names = [], table_end, set()
    for i in range(count):
        kind, flags, off, sz, align, name_b, sha = SECTION.unpack_from(data, table_offset + i * SECTION.size)
        where = f"section[{i}]"
        try:
            name = name_b.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            _fail(path, f"{where}.name is not UTF-8: {name_b!r}")
        if flags:
            _fail(path, f"{where} ('{name}').flags = {flags}, expected 0 (format {FORMAT_MAJOR}.x defines no flags)")
        if align < MIN_ALIGNMENT or align & (align - 1) or align > MAX_BYTES:
            _fail(path, f"{where} ('{name}').alignment = {align}, expected a power of two >= {MIN_ALIGNMENT}")
        if off % align:
            _fail(path, f"{where} ('{name}').offset = {off} is not a multiple of its alignment {align}")
        if off < prev_end:
            _fail(path, f"{where} ('{name}').offset = {off} overlaps the previous section or table (ends {prev_end})")
        if sz > size or off + sz > size:
            _fail(path, f"{where} ('{name}') spans {off}..{off + sz}, past the end of the file ({size})")
        if any(data[prev_end:off]):
            _fail(path, f"{where} ('{name}'): the padding at {prev_end}..{off} before it is not zero")
        if (kind, name) in names:
            _fail(path, f"{where}: duplicate section kind {kind} name '{name}'")
        names.add((kind, name))
        if verify and hashlib.sha256(data[off:off + sz]).digest() != sha:
            _fail(path, f"{where} ('{name}') checksum mismatch: the section is corrupted")
        prev_end = off + sz
        sections.append(Section(kind, name, off, sz, align, sha))
    if any(data[prev_end:size]):
        _fail(path, f"the bytes at {prev_end}..{size} after the last section are not zero")

    def only(kind: SectionKind) -> Section:
        found = [s for s in sections if s.kind == kind]
        if len(found) != 1:
            _fail(path, f"expected exactly one {kind.name.lower()} section, found {len(found)}")
        return found[0]

    m_sec, w_sec, l_sec, r_sec, a_sec = (only(k) for k in (SectionKind.MANIFEST, SectionKind.WEIGHTS,
                                                             SectionKind.LAUNCHES, SectionKind.RELOCATIONS,
                                                             SectionKind.ARGUMENTS))
    selftests = [s for s in sections if s.kind == SectionKind.SELFTEST]
    if len(selftests) > 1:
        _fail(path, f"expected at most one selftest section, found {len(selftests)}")
    cubins = [s for s in sections if s.kind == SectionKind.CUBIN]
    if not cubins:
        _fail(path, "the engine has no cubin section")
    try:
        manifest = json.loads(bytes(data[m_sec.offset:m_sec.offset + m_sec.size]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(path, f"manifest is not valid UTF-8 JSON: {str(e)[:120]}")
    if not isinstance(manifest, dict):
        _fail(path, f"manifest is a JSON {type(manifest).__name__}, expected an object")
    fmt = _field(path, manifest, "format", dict, "")
    if [fmt.get("major"), fmt.get("minor")] != [major, minor] or not all(
            type(fmt.get(k)) is int for k in ("major", "minor")):
        _fail(path, f"manifest format {str(fmt)[:80]} disagrees with the header's {major}.{minor}")

    memory = _field(path, manifest, "memory", dict, "")
    arena_bytes = _uint(path, memory, "arena_bytes", "memory")
    weights_bytes = _uint(path, memory, "weights_bytes", "memory")
    if weights_bytes != w_sec.size:
        _fail(path, f"manifest memory.weights_bytes = {weights_bytes} but the weights section has {w_sec.size}")

    io = {}
    for key in ("inputs", "outputs"):
        items = _field(path, manifest, key, list, "")
        io[key] = [_tensor(path, t, f"{key}[{i}]", arena_bytes, "arena") for i, t in enumerate(items)]
    all_io = io["inputs"] + io["outputs"]
    if len({t.name for t in all_io}) != len(all_io):
        _fail(path, "manifest inputs/outputs have duplicate names")
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in all_io if t.nbytes)
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            _fail(path, f"manifest tensors '{n0}' and '{n1}' overlap in the arena")
    for i, w in enumerate(_field(path, manifest, "weights", list, "")):
        _tensor(path, w, f"weights[{i}]", weights_bytes, "weights section")
    targets = _field(path, manifest, "targets", list, "")
    if not all(isinstance(t, str) for t in targets) or sorted(targets) != sorted(s.name for s in cubins):
        _fail(path, f"manifest targets {str(targets)[:120]} disagree with the cubin sections "
                    f"{[s.name for s in cubins]}")

    kernels = []
    for i, k in enumerate(_field(path, manifest, "kernels", list, "")):
        where = f"kernels[{i}]"
        symbol = _field(path, k, "symbol", str, where)
        if not _SYMBOL.fullmatch(symbol):
            _fail(path, f"manifest {where}.symbol {symbol[:64]!r} is not a kernel name")
        family = _field(path, k, "family", str, where)
        params = _field(path, k, "params", dict, where)
        arg_names, arg_types, arg_offsets = [], [], []
        for j, a in enumerate(_field(path, k, "args", list, where)):
            arg_names.append(_field(path, a, "name", str, f"{where}.args[{j}]"))
            t = _field(path, a, "type", str, f"{where}.args[{j}]")
            if t not in ARG_SIZES:
                _fail(path, f"manifest {where}.args[{j}].type {t!r} is not one of {sorted(ARG_SIZES)}")
            arg_types.append(t)
            arg_offsets.append(_uint(path, a, "offset", f"{where}.args[{j}]"))
        expect_offsets, args_size = arg_layout(arg_types)
        if arg_offsets != expect_offsets:
            _fail(path, f"manifest {where}.args offsets {str(arg_offsets)[:120]} differ from the ABI layout "
                        f"{str(expect_offsets)[:120]}")
        kernels.append(KernelInfo(symbol, family, params, arg_names, arg_types, arg_offsets, args_size))

    if l_sec.size % LAUNCH.size:
        _fail(path, f"launches section size {l_sec.size} is not a multiple of {LAUNCH.size}")
    if r_sec.size % RELOCATION.size:
        _fail(path, f"relocations section size {r_sec.size} is not a multiple of {RELOCATION.size}")
    launches = [Launch.unpack(bytes(data[l_sec.offset + i:l_sec.offset + i + LAUNCH.size]))
                for i in range(0, l_sec.size, LAUNCH.size)]
    relocations = [Relocation.unpack(bytes(data[r_sec.offset + i:r_sec.offset + i + RELOCATION.size]))
                   for i in range(0, r_sec.size, RELOCATION.size)]
    next_reloc = 0
    for i, ln in enumerate(launches):
        where = f"launch[{i}]"
        if ln.kernel >= len(kernels):
            _fail(path, f"{where}.kernel = {ln.kernel}, but the kernel table has {len(kernels)} entries")
        k = kernels[ln.kernel]
        if min(ln.grid) < 1 or ln.grid[0] > 2**31 - 1 or max(ln.grid[1:]) > 65535:
            _fail(path, f"{where}.grid = {ln.grid} is out of range")
        if min(ln.block) < 1 or ln.block[0] * ln.block[1] * ln.block[2] > 1024 or ln.block[2] > 64:
            _fail(path, f"{where}.block = {ln.block} is out of range")
        if ln.smem > MAX_SMEM:
            _fail(path, f"{where}.smem = {ln.smem} exceeds {MAX_SMEM}")
        if ln.args_size != k.args_size:
            _fail(path, f"{where}.args_size = {ln.args_size}, but kernel '{k.symbol}' takes {k.args_size}")
        if ln.args_offset + ln.args_size > a_sec.size:
            _fail(path, f"{where} arguments {ln.args_offset}..{ln.args_offset + ln.args_size} exceed the "
                        f"arguments section ({a_sec.size})")
        if ln.reloc_first != next_reloc:
            _fail(path, f"{where}.reloc_first = {ln.reloc_first}, expected {next_reloc}")
        ptr_slots = {o for o, t in zip(k.arg_offsets, k.arg_types) if t == "ptr"}
        if ln.reloc_count != len(ptr_slots) or ln.reloc_first + ln.reloc_count > len(relocations):
            _fail(path, f"{where}.reloc_count = {ln.reloc_count}, expected {len(ptr_slots)} within "
                        f"{len(relocations)} relocations")
        run = relocations[ln.reloc_first:ln.reloc_first + ln.reloc_count]
        if {r.slot for r in run} != ptr_slots:
            _fail(path, f"{where} relocation slots {sorted(r.slot for r in run)} differ from kernel '{k.symbol}' "
                        f"pointer parameters {sorted(ptr_slots)}")
        args_at = a_sec.offset + ln.args_offset
        for j, r in enumerate(run):
            limit = {BASE_ARENA: arena_bytes, BASE_WEIGHTS: weights_bytes}.get(r.base)
            if limit is None:
                _fail(path, f"relocation[{ln.reloc_first + j}].base = {r.base}, expected 0 (arena) or 1 (weights)")
            value = int.from_bytes(data[args_at + r.slot:args_at + r.slot + 8], "little")
            if value + r.extent > limit:
                _fail(path, f"relocation[{ln.reloc_first + j}] of {where}: bytes {value}..{value + r.extent} "
                            f"exceed the {'arena' if r.base == BASE_ARENA else 'weights'} ({limit} bytes)")
        next_reloc += ln.reloc_count
    if next_reloc != len(relocations):
        _fail(path, f"{len(relocations)} relocations, but the launches use {next_reloc}")

    regions = _field(path, manifest, "regions", list, "")
    for i, r in enumerate(regions):
        _field(path, r, "name", str, f"regions[{i}]")
        for j in _field(path, r, "launches", list, f"regions[{i}]"):
            if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < len(launches):
                _fail(path, f"manifest regions[{i}].launches names launch {str(j)[:40]}; there are {len(launches)}")
    _field(path, manifest, "provenance", dict, "")
    entries, state, max_context, position = _entries_and_state(path, manifest, io, len(launches), arena_bytes)

    return EngineFile(path, major, minor, sections, manifest, io["inputs"], io["outputs"], kernels, launches,
                      relocations, arena_bytes, weights_bytes, data, entries, state, max_context, position)


def _entries_and_state(path: str, manifest: dict, io: dict, n_launches: int, arena_bytes: int):
    """The entry points (§11; one implicit `main` entry without the key) and the persistent state."""
    if "entries" not in manifest:
        if "state" in manifest or "context" in manifest:
            _fail(path, "manifest has state but no entries")
        return [EntryInfo("main", io["inputs"], io["outputs"], 0, n_launches)], [], None, None
    context = _field(path, manifest, "context", dict, "")
    max_context = _uint(path, context, "max", "context", 2**31 - 1)
    position = _uint(path, context, "position", "context")
    if max_context < 1 or position + 4 > arena_bytes or position % 4:
        _fail(path, f"manifest context {str(context)[:80]}: max must be >= 1 and position a 4-byte aligned offset "
                    f"within the arena ({arena_bytes} bytes)")
    fixed = [(position, position + 4, "the position counter")]
    state = []
    for i, t in enumerate(_field(path, manifest, "state", list, "")):
        info = _tensor(path, t, f"state[{i}]", arena_bytes, "arena")
        axis = _uint(path, t, "axis", f"state[{i}]", 64)
        if axis >= len(info.shape) or info.shape[axis] != max_context or info.dtype not in FLOAT_STATE:
            _fail(path, f"manifest state[{i}] '{info.name}': a {info.dtype}{list(info.shape)} cache with sequence "
                        f"axis {axis} does not hold context.max = {max_context} rows of a float type")
        state.append(StateInfo(info, axis))
        fixed.append((info.offset, info.offset + info.nbytes, f"state '{info.name}'"))
    entries, names, first = [], set(), 0
    items = _field(path, manifest, "entries", list, "")
    if not 1 <= len(items) <= 64:
        _fail(path, f"manifest entries has {len(items)} entry points, expected 1..64")
    for i, e in enumerate(items):
        where = f"entries[{i}]"
        name = _field(path, e, "name", str, where)
        if name in names or not _SYMBOL.fullmatch(name):
            _fail(path, f"manifest {where}.name {name[:40]!r} is repeated or not an identifier")
        names.add(name)
        tensors = {key: [_tensor(path, t, f"{where}.{key}[{j}]", arena_bytes, "arena")
                         for j, t in enumerate(_field(path, e, key, list, where))] for key in ("inputs", "outputs")}
        span = _field(path, e, "launches", list, where)
        if len(span) != 2 or not all(type(x) is int for x in span) or span[0] != first or span[1] < 1 \
                or span[0] + span[1] > n_launches:
            _fail(path, f"manifest {where}.launches = {str(span)[:40]}: entries must cover the launch list in "
                        f"order from launch {first} ({n_launches} launches)")
        first += span[1]
        tokens = _uint(path, e, "tokens", where, 2**31 - 1)
        length = e.get("length")
        if length is not None and (type(length) is not int or length % 4 or not 0 <= length <= arena_bytes - 4):
            _fail(path, f"manifest {where}.length = {str(length)[:40]} is not an aligned int32 offset in the arena")
        needs_context = _field(path, e, "needs_context", bool, where)
        axes = _field(path, e, "token_axes", dict, where)
        shapes = {t.name: t.shape for t in tensors["inputs"] + tensors["outputs"]}
        for key, axis in axes.items():
            if key not in shapes or type(axis) is not int or not 0 <= axis < len(shapes[key]) \
                    or shapes[key][axis] != tokens:
                _fail(path, f"manifest {where}.token_axes names {str(key)[:40]} axis {str(axis)[:20]}, which is not "
                            f"a {tokens}-token axis of an input or output")
        mine = tensors["inputs"] + tensors["outputs"]
        if len({t.name for t in mine}) != len(mine):
            _fail(path, f"manifest {where} inputs/outputs have duplicate names")
        ranges = sorted(fixed + [(t.offset, t.offset + t.nbytes, f"'{t.name}'") for t in mine if t.nbytes]
                        + ([(length, length + 4, "the token count")] if length is not None else []))
        for (_, e0, n0), (s1, _, n1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                _fail(path, f"manifest {where}: {n0} and {n1} overlap in the arena")
        entries.append(EntryInfo(name, tensors["inputs"], tensors["outputs"], span[0], span[1], tokens, length,
                                 needs_context, dict(axes)))
    if first != n_launches:
        _fail(path, f"manifest entries cover launches 0..{first}, but there are {n_launches}")
    if (io["inputs"], io["outputs"]) != (entries[0].inputs, entries[0].outputs):
        _fail(path, "manifest inputs/outputs differ from entries[0]'s")
    return entries, state, max_context, position
