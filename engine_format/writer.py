"""Serialize an engine into the .frt layout of SPEC.md. Deterministic: equal inputs give equal bytes."""

import hashlib
import json
import os
import tempfile

from flashrt.engine_format.format import (
    FORMAT_MAJOR, FORMAT_MINOR, HEADER, MAGIC, MIN_ALIGNMENT, SECTION, Launch, Relocation, SectionKind,
)


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def selftest_bytes(meta: dict, blob: bytes) -> bytes:
    """The selftest section (SPEC.md §10): length-prefixed JSON, padding to 256, then the data blob."""
    head = manifest_bytes(meta)
    start = -(-(4 + len(head)) // 256) * 256
    return len(head).to_bytes(4, "little") + head + bytes(start - 4 - len(head)) + blob


def engine_bytes(manifest: dict, cubins: dict[str, bytes], weights: bytes, launches: list[Launch],
                 relocations: list[Relocation], arguments: bytes, selftest: bytes | None = None) -> bytes:
    sections: list[tuple[int, str, bytes]] = [(SectionKind.MANIFEST, "manifest", manifest_bytes(manifest))]
    for arch in sorted(cubins):
        sections.append((SectionKind.CUBIN, arch, cubins[arch]))
    sections += [
        (SectionKind.WEIGHTS, "weights", weights),
        (SectionKind.LAUNCHES, "launches", b"".join(x.pack() for x in launches)),
        (SectionKind.RELOCATIONS, "relocations", b"".join(r.pack() for r in relocations)),
        (SectionKind.ARGUMENTS, "arguments", arguments),
    ]
    if selftest is not None:
        sections.append((SectionKind.SELFTEST, "selftest", selftest))
    table_offset = HEADER.size
    pos = table_offset + SECTION.size * len(sections)
    entries, body = [], bytearray()
    for kind, name, data in sections:
        start = -(-pos // MIN_ALIGNMENT) * MIN_ALIGNMENT
        body += bytes(start - pos) + data
        pos = start + len(data)
        name_b = name.encode()
        if len(name_b) > 32:
            raise ValueError(f"section name {name!r} is longer than 32 bytes")
        entries.append(SECTION.pack(int(kind), 0, start, len(data), MIN_ALIGNMENT, name_b.ljust(32, b"\0"),
                                    hashlib.sha256(data).digest()))
    table = b"".join(entries)
    header = HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, len(sections), table_offset, pos,
                         hashlib.sha256(table).digest())
    return header + table + bytes(body)


def write_engine(path: str | os.PathLike, data: bytes) -> None:
    """Write atomically: the file at `path` is either the complete engine or untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".flashrt-", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
