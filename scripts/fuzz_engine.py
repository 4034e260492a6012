#!/usr/bin/env python3
"""Fuzz the engine reader and the CPU reference executor with mutated engines.

    python scripts/fuzz_engine.py --minutes 11          # random seeds; prints a summary, exit 1 on any failure
    python scripts/fuzz_engine.py --replay 1234567      # rerun one mutant in this process, with its traceback

The seeds are small real engines built from samples/. Each mutant is one to three mutations of a seed: bit
flips, truncations, overwritten header fields and section-table entries, swapped sections (these mostly stop
at a size or checksum check), and structured mutations of the manifest JSON, the launch and relocation
records, the argument bytes and the self-test bundle, with the section and table checksums recomputed so that
they reach the deep validation and the executor. Every mutant is read, loaded on the CPU reference executor,
self-tested where it carries a bundle and run on its example inputs. The only acceptable failure is an
EngineFormatError raised on purpose; anything else (another exception type, an EngineFormatError that merely
wraps an unexpected exception, a crash of the process, a hang) is a bug.

Mutants run in a worker process: a mutant that takes longer than --timeout seconds is reported as a hang and a
worker that dies (a segfault, the kernel's OOM killer) as a crash; the worker is then replaced. The worker's
address space is capped (--memory-gib), so a runaway allocation shows up as a MemoryError instead of taking the
machine down. tests/test_fuzz.py drives the same mutators through hypothesis.
"""

import argparse
import hashlib
import json
import math
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEADER = struct.Struct("<8sHHIQQ32s")
SECTION = struct.Struct("<IIQQQ32s32s")
LAUNCH_FIELDS = 12  # kernel, grid xyz, block xyz, smem, args_offset, args_size, reloc_first, reloc_count
RELOC = struct.Struct("<IIQ")
KIND_MANIFEST, KIND_CUBIN, KIND_WEIGHTS, KIND_LAUNCHES, KIND_RELOCS, KIND_ARGS, KIND_SELFTEST = range(1, 8)

SEEDS = [  # (name, model, shapes, precision, bundle_test); between them they use every kernel family
    ("mlp_bf16_bundle", "samples/mlp.onnx", {"x": (1, 32)}, "bf16", True),
    ("encoder_fp32", "samples/tiny_encoder.onnx", None, "fp32", False),
    ("ops_fp16_bundle", "ops", None, "fp16", True),
    ("decoder_state_bf16", "decoder", None, "bf16", False),
]


def ops_model():
    """A small ONNX model for the families the samples lack: an embedding Gather (int64 ids), Concat,
    ReduceMean / ReduceMax / ReduceSum, a Where / Greater / Pow elementwise chain, Softmax over a
    non-last axis and a Transpose copy."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "emb"),
             numpy_helper.from_array(np.array([2], np.int64), "axes2"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    node = helper.make_node
    nodes = [node("Gather", ["emb", "ids"], ["e"], axis=0),
             node("Concat", ["e", "x"], ["y"], axis=2),
             node("ReduceMean", ["y", "axes2"], ["r"], keepdims=1),
             node("Sub", ["y", "r"], ["c"]),
             node("Greater", ["c", "x2"], ["g"]),
             node("Pow", ["c", "two"], ["p"]),
             node("Where", ["g", "c", "p"], ["w"]),
             node("Softmax", ["w"], ["s"], axis=1),
             node("ReduceMax", ["s", "axes1"], ["out_max"], keepdims=0),
             node("Transpose", ["w"], ["out_t"], perm=[0, 2, 1]),
             node("ReduceSum", ["w", "axes2"], ["out_sum"], keepdims=0)]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "ops",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6]),
         helper.make_tensor_value_info("x", f32, [1, 6, 16]), helper.make_tensor_value_info("x2", f32, [1, 6, 32])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("out_max", "out_t", "out_sum")], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def decoder_model():
    """A one-layer attention decoder with KV-cache inputs (dynamic past axis) and positions, for a stateful
    seed: the state family's positions, cache write and advance kernels, and attention over a cache."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, n)
             for n in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.array([1, -1, 2, 8], np.int64), "heads"),
              numpy_helper.from_array(np.array([1, -1, 16], np.int64), "merged"),
              numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    node = helper.make_node
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [node("MatMul", ["x", f"w{name}"], [f"{name}_flat"]),
                  node("Reshape", [f"{name}_flat", "heads"], [f"{name}_split"]),
                  node("Transpose", [f"{name}_split"], [f"{name}_new"], perm=[0, 2, 1, 3])]
    nodes += [node("Concat", ["past_k", "k_new"], ["present_k"], axis=2),
              node("Concat", ["past_v", "v_new"], ["present_v"], axis=2),
              node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
              node("MatMul", ["q_new", "kt"], ["scores"]),
              node("Softmax", ["scores"], ["probs"], axis=-1),
              node("MatMul", ["probs", "present_v"], ["att"]),
              node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]),
              node("Reshape", ["att_t", "merged"], ["att_m"]),
              node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
              node("Unsqueeze", ["pos_f", "axis2"], ["pos_u"]),
              node("Add", ["att_m", "pos_u"], ["y"])]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("x", f32, [1, "seq", 16]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"]),
         helper.make_tensor_value_info("past_k", f32, [1, 2, "past", 8]),
         helper.make_tensor_value_info("past_v", f32, [1, 2, "past", 8])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("y", "present_k", "present_v")], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def build_seeds(out_dir: str | os.PathLike) -> dict[str, bytes]:
    """The seed engines, built once (the build cache makes a rebuild fast)."""
    import onnx

    from flashrt.aot.build import build_engine

    seeds = {}
    for name, model, shapes, precision, bundle in SEEDS:
        state = {}
        if model in ("ops", "decoder"):
            onnx.save(ops_model() if model == "ops" else decoder_model(), os.path.join(out_dir, f"{model}.onnx"))
            if model == "decoder":
                state = {"max_context": 8, "prefill_len": 4}
            model = os.path.join(out_dir, f"{model}.onnx")
        else:
            model = str(ROOT / model)
        path = os.path.join(out_dir, f"{name}.frt")
        build_engine(model, ["sm_90a"], path, shapes, precision, bundle_test=bundle, **state)
        seeds[name] = Path(path).read_bytes()
    return seeds


# ---------------------------------------------------------------------------------------------------- choices

class Choices:
    """Where a mutator's decisions come from: random.Random in this script, hypothesis' draws in the tests
    (so hypothesis can shrink a failing mutant to its smallest decisions)."""

    def __init__(self, rng: random.Random | None = None, draw=None):
        self.rng, self.draw = rng, draw

    def int(self, lo: int, hi: int) -> int:
        if hi < lo:
            raise ValueError(f"empty range {lo}..{hi}")  # a mutator met a structure too small to mutate
        if self.draw is not None:
            from hypothesis import strategies as st

            return self.draw(st.integers(lo, hi))
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        seq = list(seq)
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) < percent


def interesting_int(ch: Choices, old: int | None = None, bits: int | None = None) -> int:
    """An integer likely to break a check: boundaries, powers of two, neighbours and multiples of the old value."""
    table = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 255, 256, 257, 1023, 1024, 4095, 4096, 65535, 65536,
             2**20, 2**24, 2**28, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**44, 2**44 + 1, 2**48, 2**53,
             2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -256, -(2**31), -(2**63)]
    how = ch.int(0, 9)
    if old is not None and how <= 3:
        value = [old + 1, old - 1, old * 2, old // 2, old * 1024, old + ch.int(-300, 300)][ch.int(0, 5)]
    elif how <= 7:
        value = ch.pick(table)
    else:
        value = ch.int(-(2**16), 2**16) if ch.chance(50) else ch.int(0, 2**64 - 1)
    return value % (1 << bits) if bits else value


# ----------------------------------------------------------------------------------------- engine (de)coding

def decode(data: bytes):
    """(major, minor, sections) of a valid engine; each section [kind, flags, alignment, name32, data]."""
    _, major, minor, count, table_offset, _, _ = HEADER.unpack_from(data, 0)
    if table_offset != HEADER.size or count != table_count(data):
        raise ValueError("not decodable")
    sections = []
    for i in range(count):
        kind, flags, off, size, align, name, _ = SECTION.unpack_from(data, table_offset + i * SECTION.size)
        sections.append([kind, flags, align, name, bytes(data[off:off + size])])
    return major, minor, sections


def encode(major: int, minor: int, sections: list) -> bytes:
    """The engine bytes for these sections, laid out in order with correct section and table checksums."""
    pos = HEADER.size + SECTION.size * len(sections)
    entries, body = [], bytearray()
    for kind, flags, align, name, data in sections:
        a = align if 256 <= align <= 1 << 16 and not align & (align - 1) else 256
        start = -(-pos // a) * a
        body += bytes(start - pos) + data
        pos = start + len(data)
        entries.append(SECTION.pack(kind, flags, start, len(data), align, name, hashlib.sha256(data).digest()))
    table = b"".join(entries)
    return HEADER.pack(b"FLASHRT\0", major, minor, len(sections), HEADER.size, pos,
                       hashlib.sha256(table).digest()) + table + bytes(body)


def fix_table_sha(data: bytes) -> bytes:
    count = struct.unpack_from("<I", data, 12)[0]
    end = HEADER.size + count * SECTION.size
    if count > 4096 or end > len(data):
        return data
    return data[:32] + hashlib.sha256(data[HEADER.size:end]).digest() + data[64:]


def table_count(data: bytes) -> int:
    """The header's section count, clamped to the entries the bytes can hold (an earlier mutation may have
    broken it)."""
    if len(data) < HEADER.size + SECTION.size:
        return 0
    return max(0, min(struct.unpack_from("<I", data, 12)[0], (len(data) - HEADER.size) // SECTION.size, 64))


def find(sections: list, kind: int):
    return next((s for s in sections if s[0] == kind), None)


def manifest_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------------------- JSON mutations

def _nodes(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _nodes(obj[k], path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(obj, ch: Choices, focus: tuple = ()) -> tuple[object, str]:
    """One value-level change somewhere under `focus` (a path), or anywhere: numbers changed, keys dropped or
    added, list items removed or duplicated, types swapped. Returns (new object, description)."""
    obj = json.loads(json.dumps(obj))
    try:
        base = _get(obj, focus)
    except (KeyError, IndexError, TypeError):
        base, focus = obj, ()
    nodes = [(focus + p, v) for p, v in _nodes(base) if focus + p]
    if not nodes:
        return obj, "json:none"
    numeric = [(p, v) for p, v in nodes if isinstance(v, (int, float)) and not isinstance(v, bool)]
    path, value = ch.pick(numeric) if numeric and ch.chance(55) else ch.pick(nodes)
    parent, key = _get(obj, path[:-1]), path[-1]
    action = ch.int(0, 15)
    if action <= 5 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = interesting_int(ch, int(value) if math.isfinite(value) else None)
        desc = "number"
    elif action <= 5 and isinstance(value, list) and value and ch.chance(50):
        i = ch.int(0, len(value) - 1)
        value.insert(i, json.loads(json.dumps(value[i])))
        desc = "dup-item"
    elif action <= 5 and isinstance(value, list) and value:
        del value[ch.int(0, len(value) - 1)]
        desc = "del-item"
    elif action == 6:
        if isinstance(parent, dict):
            del parent[key]
        else:
            del parent[key]
        desc = "drop"
    elif action == 7:
        parent[key] = ch.pick([0.5, -0.0, 1e300, float("nan"), float("inf"), 3.0, -1.5, 1e-45])
        desc = "float"
    elif action == 8:
        parent[key] = ch.pick([True, False, None])
        desc = "bool/null"
    elif action == 9:
        parent[key] = ch.pick(["", "x", "float32", "bfloat16", "int64", "ptr", "gemm", "acc", "in", "7", "é\u0000"])
        desc = "string"
    elif action == 10:
        parent[key] = ch.pick([[], [0], [1, 2], [[0]], [-1], [2**31], [True], ["in", 0], ["acc"], [None]])
        desc = "list"
    elif action == 11:
        parent[key] = ch.pick([{}, {"a": 1}, {"dtype": "float32", "strides": []}, {"eps": 1e-5, "has_beta": True}])
        desc = "dict"
    elif action == 12 and len(nodes) > 1:
        _, other = ch.pick(nodes)
        parent[key] = json.loads(json.dumps(other))
        desc = "copy-node"
    elif action == 13 and isinstance(parent, dict):
        new_key = ch.pick(["extra", "M", "shape", "atoms", "dtype", "expr", "ln", "offset", "0", "gated", "rms",
                           "masked_rows_zero", "gamma_dtype", "has_beta"])
        parent[new_key] = ch.pick([True, False, "float16", interesting_int(ch)])
        desc = "add-key"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = -value if value else -1
        desc = "negate"
    else:
        parent[key] = [value] if ch.chance(50) else str(value)[:64]
        desc = "wrap"
    return obj, f"json:{desc}"


# ------------------------------------------------------------------------------------------------ mutators
# Each takes (engine bytes, choices) and returns (mutant bytes, description).

def m_bitflip(data: bytes, ch: Choices):
    if not data:
        return data, "bitflip:empty"
    buf = bytearray(data)
    n = ch.int(1, 8)
    region = ch.int(0, 2)  # header+table, anywhere, or a burst
    table_end = min(len(buf), HEADER.size + SECTION.size * 16)
    at = ch.int(0, len(buf) - 1)
    for _ in range(n):
        if region == 0:
            pos = ch.int(0, table_end - 1)
        elif region == 1:
            pos = ch.int(0, len(buf) - 1)
        else:
            pos = min(len(buf) - 1, at + ch.int(0, 16))
        buf[pos] ^= 1 << ch.int(0, 7)
    return bytes(buf), f"bitflip[{n}]"


def m_truncate(data: bytes, ch: Choices):
    how = ch.int(0, 3)
    if how == 0:
        cut = ch.int(0, min(len(data), 600))
    elif how == 1:
        cut = ch.int(0, len(data))
    else:
        cut = max(0, len(data) - ch.int(1, 600))
    out = data[:cut]
    if how == 3 and len(out) >= HEADER.size:  # make the header agree, so the section bounds checks are reached
        out = fix_table_sha(out[:24] + struct.pack("<Q", len(out)) + out[32:])
        return out, "truncate+size"
    if how == 2 and ch.chance(30):
        out = data + bytes(ch.int(1, 512))
        return out, "extend"
    return out, "truncate"


_HEADER_FIELDS = [(8, 16, "major"), (10, 16, "minor"), (12, 32, "section_count"), (16, 64, "table_offset"),
                  (24, 64, "file_size")]


def m_header(data: bytes, ch: Choices):
    if len(data) < HEADER.size:
        return data, "header:short"
    off, bits, name = ch.pick(_HEADER_FIELDS)
    old = int.from_bytes(data[off:off + bits // 8], "little")
    value = interesting_int(ch, old, bits)
    out = data[:off] + value.to_bytes(bits // 8, "little") + data[off + bits // 8:]
    if ch.chance(70):
        out = fix_table_sha(out)
    return out, f"header.{name}"


_ENTRY_FIELDS = [(0, 32, "kind"), (4, 32, "flags"), (8, 64, "offset"), (16, 64, "size"), (24, 64, "alignment"),
                 (32, 0, "name")]


def m_table(data: bytes, ch: Choices):
    count = table_count(data)
    if not count:
        return m_bitflip(data, ch)
    i = ch.int(0, count - 1)
    base = HEADER.size + i * SECTION.size
    off, bits, name = ch.pick(_ENTRY_FIELDS)
    if bits == 0:
        new = ch.pick([b"", b"manifest", b"weights", b"sm_90a", b"sm_100a", b"\xff\xfe", b"x" * 32])
        out = data[:base + 32] + new.ljust(32, b"\0")[:32] + data[base + 64:]
    else:
        old = int.from_bytes(data[base + off:base + off + bits // 8], "little")
        value = interesting_int(ch, old, bits)
        if name in ("offset", "size") and ch.chance(40):
            value = (old + ch.pick([256, -256, 512, 1, -1, 4096, -4096])) % (1 << 64)
        out = data[:base + off] + value.to_bytes(bits // 8, "little") + data[base + off + bits // 8:]
    if ch.chance(90):
        out = fix_table_sha(out)
    return out, f"table[{i}].{name}"


def m_swap_entries(data: bytes, ch: Choices):
    count = table_count(data)
    if not count:
        return m_bitflip(data, ch)
    i, j = ch.int(0, count - 1), ch.int(0, count - 1)
    entries = [data[HEADER.size + k * SECTION.size:HEADER.size + (k + 1) * SECTION.size] for k in range(count)]
    how = ch.int(0, 2)
    if how == 0:  # whole entries
        entries[i], entries[j] = entries[j], entries[i]
        desc = "swap-entries"
    elif how == 1:  # only the kinds: each section is now read as the other kind
        ki, kj = entries[i][:4], entries[j][:4]
        entries[i], entries[j] = kj + entries[i][4:], ki + entries[j][4:]
        desc = "swap-kinds"
    else:  # only the (offset, size, sha): each entry now points at the other's bytes
        si, sj = entries[i][8:24], entries[j][8:24]
        hi, hj = entries[i][64:], entries[j][64:]
        entries[i] = entries[i][:8] + sj + entries[i][24:64] + hj
        entries[j] = entries[j][:8] + si + entries[j][24:64] + hi
        desc = "swap-extents"
    out = data[:HEADER.size] + b"".join(entries) + data[HEADER.size + count * SECTION.size:]
    return fix_table_sha(out), desc


def m_section_bitflip(data: bytes, ch: Choices):
    """Bit flips inside one section, checksums recomputed."""
    major, minor, sections = decode(data)
    s = ch.pick([s for s in sections if s[4]])
    buf = bytearray(s[4])
    n = ch.int(1, 4)
    for _ in range(n):
        pos = ch.int(0, len(buf) - 1)
        buf[pos] ^= 1 << ch.int(0, 7)
    s[4] = bytes(buf)
    return encode(major, minor, sections), f"section-bitflip[{s[3].rstrip(bytes(1)).decode()}]"


def m_sections(data: bytes, ch: Choices):
    """Section-level surgery with consistent checksums: swap two sections' bytes, drop, duplicate, change a
    kind, add an unknown or a second self-test section, resize."""
    major, minor, sections = decode(data)
    how = ch.int(0, 6)
    i, j = ch.int(0, len(sections) - 1), ch.int(0, len(sections) - 1)
    if how == 0:
        sections[i][4], sections[j][4] = sections[j][4], sections[i][4]
        desc = "swap-data"
    elif how == 1 and len(sections) > 1:
        del sections[i]
        desc = "drop"
    elif how == 2:
        sections.insert(j, list(sections[i]))
        desc = "duplicate"
    elif how == 3:
        sections[i][0] = ch.pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 99, 2**32 - 1])
        desc = "kind"
    elif how == 4:
        kind = ch.pick([7, 8, 99])
        sections.append([kind, 0, 256, b"extra".ljust(32, b"\0"), ch.pick([b"", b"\0" * 300, b"junk"])])
        desc = "add"
    elif how == 5:
        s = sections[i]
        s[4] = s[4][:ch.int(0, len(s[4]))] if ch.chance(60) else s[4] + bytes(ch.int(1, 300))
        desc = "resize"
    else:
        sections[i][2] = ch.pick([512, 1024, 4096, 65536, 128, 0, 3])
        desc = "alignment"
    return encode(major, minor, sections), f"sections:{desc}"


def _manifest_focus(manifest: dict, ch: Choices) -> tuple:
    kernels = manifest.get("kernels") or []
    r = ch.int(0, 9)
    if r <= 4 and kernels:
        return ("kernels", ch.int(0, len(kernels) - 1), "params")
    if r == 5 and kernels:
        return ("kernels", ch.int(0, len(kernels) - 1))
    if r == 6:
        return (ch.pick(["inputs", "outputs"]),)
    if r == 7:
        return (ch.pick(["memory", "weights", "format", "targets"]),)
    return ()


def m_manifest(data: bytes, ch: Choices):
    major, minor, sections = decode(data)
    s = find(sections, KIND_MANIFEST)
    manifest = json.loads(s[4])
    new, desc = mutate_json(manifest, ch, _manifest_focus(manifest, ch))
    s[4] = manifest_json(new)
    return encode(major, minor, sections), f"manifest:{desc}"


def _records(raw: bytes, size: int) -> list[bytes]:
    return [raw[i:i + size] for i in range(0, len(raw) - len(raw) % size, size)]


def m_launches(data: bytes, ch: Choices):
    major, minor, sections = decode(data)
    s = find(sections, KIND_LAUNCHES)
    recs = [list(struct.unpack("<12I", r)) for r in _records(s[4], 48)]
    how = ch.int(0, 9)
    if not recs:
        return data, "launches:empty"
    i = ch.int(0, len(recs) - 1)
    if how <= 6:
        f = ch.int(0, LAUNCH_FIELDS - 1)
        recs[i][f] = interesting_int(ch, recs[i][f], 32)
        desc = f"field{f}"
    elif how == 7:
        j = ch.int(0, len(recs) - 1)
        recs[i], recs[j] = recs[j], recs[i]
        desc = "swap"
    elif how == 8:
        del recs[i]
        desc = "drop"
    else:
        recs.insert(i, list(recs[i]))
        desc = "dup"
    s[4] = b"".join(struct.pack("<12I", *r) for r in recs)
    return encode(major, minor, sections), f"launches:{desc}"


def m_relocations(data: bytes, ch: Choices):
    major, minor, sections = decode(data)
    s = find(sections, KIND_RELOCS)
    recs = [list(RELOC.unpack(r)) for r in _records(s[4], 16)]
    if not recs:
        return data, "relocations:empty"
    i = ch.int(0, len(recs) - 1)
    how = ch.int(0, 5)
    if how <= 3:
        f = ch.int(0, 2)
        recs[i][f] = interesting_int(ch, recs[i][f], 64 if f == 2 else 32)
        desc = ["slot", "base", "extent"][f]
    elif how == 4:
        j = ch.int(0, len(recs) - 1)
        recs[i], recs[j] = recs[j], recs[i]
        desc = "swap"
    else:
        recs[i][1] ^= 1  # arena <-> weights
        desc = "base-flip"
    s[4] = b"".join(RELOC.pack(*r) for r in recs)
    return encode(major, minor, sections), f"relocations:{desc}"


def m_arguments(data: bytes, ch: Choices):
    major, minor, sections = decode(data)
    s = find(sections, KIND_ARGS)
    if len(s[4]) < 8:
        return data, "arguments:short"
    buf = bytearray(s[4])
    at = ch.int(0, len(buf) // 8 - 1) * 8
    old = int.from_bytes(buf[at:at + 8], "little")
    value = interesting_int(ch, old, 64)
    if ch.chance(40):
        value = (old + ch.pick([1, 2, 4, -4, 256, -256, 4096, 1 << 20])) % (1 << 64)
    buf[at:at + 8] = value.to_bytes(8, "little")
    s[4] = bytes(buf)
    return encode(major, minor, sections), "arguments:pointer"


def m_selftest(data: bytes, ch: Choices):
    major, minor, sections = decode(data)
    s = find(sections, KIND_SELFTEST)
    if s is None or len(s[4]) < 4:
        return m_manifest(data, ch)
    raw = s[4]
    n = int.from_bytes(raw[:4], "little")
    meta = json.loads(raw[4:4 + n])
    blob = raw[-(-(4 + n) // 256) * 256:]
    how = ch.int(0, 9)
    if how <= 5:
        meta, desc = mutate_json(meta, ch)
        head = manifest_json(meta)
        start = -(-(4 + len(head)) // 256) * 256
        raw = len(head).to_bytes(4, "little") + head + bytes(start - 4 - len(head)) + blob
    elif how <= 7:
        raw = interesting_int(ch, n, 32).to_bytes(4, "little") + raw[4:]
        desc = "length"
    else:  # the data blob: values that lie (the verifier reports a mismatch; nothing may crash)
        buf = bytearray(raw)
        for _ in range(ch.int(1, 16)):
            pos = ch.int(0, len(buf) - 1)
            buf[pos] ^= 1 << ch.int(0, 7)
        raw, desc = bytes(buf), "bits"
    s[4] = raw
    return encode(major, minor, sections), f"selftest:{desc}"


_BIG = [2**16, 2**20, 2**24, 2**28, 2**30, 2**31 - 1, 2**31, 2**32, 2**40, 2**44, 2**62]


def m_hostile(data: bytes, ch: Choices):
    """Coordinated hostile changes that pass the reader's extent checks: huge dimensions with zero strides, huge
    I/O tensors with consistent sizes, a huge arena with huge relocation extents."""
    major, minor, sections = decode(data)
    ms = find(sections, KIND_MANIFEST)
    manifest = json.loads(ms[4])
    how = ch.int(0, 3)
    big = ch.pick(_BIG)
    if how <= 1 and manifest["kernels"]:
        k = ch.pick(manifest["kernels"])
        p = k["params"]
        fam = k["family"]
        if fam == "gemm":
            for dim in ch.pick([["K"], ["M"], ["N"], ["M", "K"], ["K", "N"], ["M", "N", "K"]]):
                p[dim] = big
                if dim == "K":
                    p["a"]["sk"], p["b"]["sk"] = 0, 0
                    if p["ln"] and ch.chance(50):
                        p["ln"] = None
                elif dim == "M":
                    p["a"]["sm"] = 0
                else:
                    p["b"]["sn"] = 0
                for e in p["epi_inputs"]:
                    e["strides"] = [0] * len(e["strides"])
            if ch.chance(30):
                p["batch"] = [ch.pick([2, 64, 4096, big])] + list(p["batch"][1:])
                p["a"]["batch_strides"] = [0] * len(p["batch"])
                p["b"]["batch_strides"] = [0] * len(p["batch"])
                for e in p["epi_inputs"]:
                    e["strides"] = [0] * (len(p["batch"]) + 2)
            desc = "gemm-dims"
        elif fam == "eltwise":
            i = ch.int(0, len(p["shape"]) - 1) if p["shape"] else 0
            p["shape"] = list(p["shape"]) or [1]
            p["shape"][i] = big
            for x in p["inputs"]:
                x["strides"] = [0] * len(p["shape"])
            if ch.chance(40):
                p["expr"] = p["expr"] + [["add", len(p["expr"]) - 1, len(p["expr"]) - 1]] * ch.pick([10, 1000, 5000])
            desc = "eltwise-shape"
        else:
            key = ch.pick(["rows", "L", "K", "inner"])
            p[key] = big
            desc = f"{fam}-{key}"
        if how == 1:  # and make the output extent and the arena agree
            manifest["memory"]["arena_bytes"] = min(2**44, manifest["memory"]["arena_bytes"] + big)
            rs = find(sections, KIND_RELOCS)
            recs = [list(RELOC.unpack(r)) for r in _records(rs[4], 16)]
            for r in recs:
                if r[1] == 0:
                    r[2] = min(big, 2**44 - 2**20)
            rs[4] = b"".join(RELOC.pack(*r) for r in recs)
            desc += "+extents"
    elif how == 2:
        t = ch.pick(manifest["inputs"] + manifest["outputs"])
        size = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}.get(t["dtype"], 1)
        t["shape"] = [ch.pick([0, 1, big])] + list(t["shape"])
        t["nbytes"] = size * math.prod(d if isinstance(d, int) else 1 for d in t["shape"])
        manifest["memory"]["arena_bytes"] = min(2**44, max(manifest["memory"]["arena_bytes"],
                                                             t["offset"] + t["nbytes"] + 4096))
        desc = "io-tensor"
    else:
        manifest["memory"]["arena_bytes"] = ch.pick([2**33, 2**40, 2**44])
        rs = find(sections, KIND_RELOCS)
        recs = [list(RELOC.unpack(r)) for r in _records(rs[4], 16)]
        for r in recs:
            if r[1] == 0 and ch.chance(50):
                r[2] = ch.pick([2**30, 2**33, 2**39])
        rs[4] = b"".join(RELOC.pack(*r) for r in recs)
        desc = "arena"
    ms[4] = manifest_json(manifest)
    return encode(major, minor, sections), f"hostile:{desc}"


RAW = {"bitflip": m_bitflip, "truncate": m_truncate, "header": m_header, "table": m_table,
       "swap": m_swap_entries}
STRUCTURED = {"section_bitflip": m_section_bitflip, "sections": m_sections, "manifest": m_manifest,
              "launches": m_launches, "relocations": m_relocations, "arguments": m_arguments,
              "selftest": m_selftest, "hostile": m_hostile}
MUTATORS = {**RAW, **STRUCTURED}
# How often each is picked: mostly structured ones, which reach the deep checks and the executor.
WEIGHTS = {"bitflip": 6, "truncate": 4, "header": 4, "table": 6, "swap": 4, "section_bitflip": 8, "sections": 6,
           "manifest": 30, "launches": 8, "relocations": 8, "arguments": 8, "selftest": 6, "hostile": 8}


def mutate(seed_bytes: bytes, ch: Choices, kinds: list[str] | None = None) -> tuple[bytes, list[str]]:
    """One to three mutations (of the named kinds, or weighted-random ones) applied in sequence."""
    data, done = seed_bytes, []
    if kinds is None:
        names = [n for n, w in WEIGHTS.items() for _ in range(w)]
        kinds = [ch.pick(names) for _ in range(ch.pick([1, 1, 1, 1, 2, 2, 3]))]
    for kind in kinds:
        try:
            data, desc = MUTATORS[kind](data, ch)
        except (ValueError, KeyError, IndexError, TypeError, ArithmeticError, struct.error, UnicodeDecodeError,
                AttributeError, RecursionError):
            # A structured mutator cannot decode what an earlier mutation broke: apply a raw one instead.
            data, desc = m_bitflip(data, ch)
        done.append(desc)
    return data, done


# ---------------------------------------------------------------------------------------------- the oracle

class Unguarded(Exception):
    """An EngineFormatError that only wraps an unexpected exception (a validation gap) counts as a bug."""


def run_mutant(data: bytes, tmp_dir: str | None = None) -> None:
    """Read, load on the CPU executor, self-test and run one mutant; raises whatever they raise. With tmp_dir the
    mutant goes through a file (mmap) and `flashrt verify`'s code path first."""
    import numpy as np

    from flashrt.engine_format.reader import read_engine
    from flashrt.runtime.cpu import CPUEngine

    if tmp_dir is not None:
        from flashrt.runtime.selftest import verify

        path = os.path.join(tmp_dir, "mutant.frt")
        with open(path, "wb") as f:
            f.write(data)
        verify(path, device="cpu")
        engine = CPUEngine(read_engine(path))
    else:
        engine = CPUEngine(read_engine(data))
    bundle = engine.file.selftest()
    runs = [engine.example_inputs()]
    if bundle is not None:
        runs.append({k: np.array(v) for k, v in bundle[1].items()})
    for feeds in runs:
        if engine.stateful:
            engine.reset()
        outputs = engine.run(feeds)
        want = {t.name: tuple(t.shape) for t in engine.outputs}
        got = {k: tuple(v.shape) for k, v in outputs.items()}
        if got != want:
            raise AssertionError(f"outputs {got} differ from the signature {want}")
        for e in engine.file.entries[1:]:  # the other entry points continue the sequence
            outputs = engine.run(engine.example_inputs(entry=e.name), entry=e.name)
            if {k: tuple(v.shape) for k, v in outputs.items()} != {t.name: tuple(t.shape) for t in e.outputs}:
                raise AssertionError(f"entry {e.name}: outputs differ from its signature")


def exercise(data: bytes, tmp_dir: str | None = None) -> str:
    """run_mutant, classified: "ok" or "EngineFormatError"; any other exception propagates, and an
    EngineFormatError that wraps an unexpected exception (the executor's safety net) becomes Unguarded."""
    from flashrt.errors import EngineFormatError, FlashRTError

    try:
        run_mutant(data, tmp_dir)
        return "ok"
    except EngineFormatError as e:
        cause = e.__cause__  # set only by the executor's safety net (raise ... from e), never by a check
        if cause is not None and not isinstance(cause, FlashRTError):
            raise Unguarded(f"{type(cause).__name__} wrapped as EngineFormatError: {e}") from e
        return "EngineFormatError"


def mutant_for(seed: int, seeds: dict[str, bytes]) -> tuple[str, bytes, list[str], bool]:
    rng = random.Random(seed)
    ch = Choices(rng)
    name = ch.pick(sorted(seeds))
    data, kinds = mutate(seeds[name], ch)
    via_file = ch.chance(10)
    return name, data, kinds, via_file


# ----------------------------------------------------------------------------------------- worker / driver

def _worker(conn, seed_dir: str, memory_gib: float) -> None:
    import warnings

    warnings.simplefilter("ignore")
    try:
        import resource

        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    seeds = {p.stem: p.read_bytes() for p in Path(seed_dir).glob("*.frt")}
    tmp = tempfile.mkdtemp(prefix="flashrt-fuzz-")
    while True:
        try:
            seed = conn.recv()
        except EOFError:
            return
        t0 = time.perf_counter()
        try:
            name, data, kinds, via_file = mutant_for(seed, seeds)
        except Exception as e:  # noqa: BLE001 - a bug of this script, reported apart from the findings
            conn.send(("mutator-error", [], 0.0, "".join(traceback.format_exception(e))[-3000:]))
            continue
        try:
            outcome, detail = exercise(data, tmp if via_file else None), ""
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            outcome = type(e).__name__ if not isinstance(e, Unguarded) else "Unguarded"
            detail = "".join(traceback.format_exception(e))[-3000:]
        conn.send((outcome, kinds, time.perf_counter() - t0, detail))


def run_fuzz(minutes: float, timeout: float, base_seed: int | None, memory_gib: float, seed_dir: str,
             verbose: bool) -> int:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    master = random.Random(base_seed)
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = defaultdict(Counter)
    failures, slow, harness_errors = [], [], []
    slowest = [0.0, None]
    worker, conn = None, None
    restarts = 0

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, seed_dir, memory_gib), daemon=True)
        p.start()
        child.close()
        return p, parent

    deadline = time.monotonic() + minutes * 60
    t_start = time.monotonic()
    last_report = t_start
    worker, conn = start()
    total = 0
    while time.monotonic() < deadline:
        seed = master.getrandbits(63)
        conn.send(seed)
        t0 = time.monotonic()
        result, hung = None, not conn.poll(timeout)
        if not hung:
            try:
                result = conn.recv()
            except (EOFError, ConnectionResetError, OSError):
                result = None
        elapsed = time.monotonic() - t0
        total += 1
        if result is None:
            worker.kill()
            worker.join()
            kind = "hang" if hung else f"crash(exit {worker.exitcode})"
            outcomes[kind] += 1
            failures.append((seed, kind, [], f"no answer after {elapsed:.1f} s"))
            restarts += 1
            worker, conn = start()
            continue
        outcome, kinds, secs, detail = result
        outcomes[outcome] += 1
        for k in kinds:
            by_kind[k.split(":")[0].split("[")[0].split(".")[0]][outcome] += 1
        if outcome == "mutator-error":
            harness_errors.append((seed, detail))
            continue
        if outcome not in ("ok", "EngineFormatError"):
            failures.append((seed, outcome, kinds, detail))
            if verbose:
                print(f"FAIL seed={seed} {outcome} {kinds}\n{detail}", flush=True)
        if secs > 5:
            slow.append((seed, round(secs, 1), kinds))
        if secs > slowest[0]:
            slowest[:] = [secs, seed]
        if time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            print(f"[{(last_report - t_start) / 60:5.1f} min] {total} mutants: {dict(outcomes)}", flush=True)
    conn.close()
    worker.kill()
    worker.join()

    wall = time.monotonic() - t_start
    print(f"\nflashrt engine fuzz: {total} mutants in {wall / 60:.1f} min ({total / wall:.0f}/s; "
          f"{total - len(harness_errors)} exercised, {len(harness_errors)} lost to mutator errors), "
          f"base seed {base_seed}, per-mutant timeout {timeout:g} s, worker memory cap {memory_gib:g} GiB")
    print("outcomes:")
    for k, v in outcomes.most_common():
        print(f"  {k:24s} {v}")
    print("by mutation (a mutant with several mutations counts under each):")
    for k in sorted(by_kind):
        print(f"  {k:24s} " + ", ".join(f"{o}={n}" for o, n in by_kind[k].most_common()))
    bad = sum(v for k, v in outcomes.items() if k not in ("ok", "EngineFormatError", "mutator-error"))
    hangs = sum(v for k, v in outcomes.items() if k == "hang")
    crashes = sum(v for k, v in outcomes.items() if k.startswith("crash"))
    print(f"crashes (process died): {crashes}; hangs (> {timeout:g} s): {hangs}; other exception types: "
          f"{bad - hangs - crashes}; worker restarts: {restarts}; mutator errors (script bugs): "
          f"{len(harness_errors)}; slowest mutant {slowest[0]:.2f} s (seed {slowest[1]})")
    if slow:
        worst = sorted(slow, key=lambda s: -s[1])[:5]
        print(f"slow mutants (> 5 s, within the timeout): {len(slow)}; slowest (seed, s, mutations): {worst}")
    for seed, detail in harness_errors[:3]:
        print(f"\nmutator error (a bug of this script, not a finding) seed={seed}:\n{detail}")
    for seed, outcome, kinds, detail in failures[:20]:
        print(f"\nFAILURE seed={seed} ({outcome}) {kinds}: rerun with --replay {seed}\n{detail}")
    return 1 if bad else 0


def replay(seed: int, seed_dir: str) -> int:
    seeds = {p.stem: p.read_bytes() for p in Path(seed_dir).glob("*.frt")}
    name, data, kinds, via_file = mutant_for(seed, seeds)
    print(f"seed {seed}: engine {name}, mutations {kinds}, via file: {via_file}, {len(data)} bytes")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            print("outcome:", exercise(data, tmp if via_file else None))
        except Exception:
            traceback.print_exc()
            return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="how long to fuzz (default 1)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one mutant may take before it counts "
                                                                "as a hang (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: random)")
    ap.add_argument("--memory-gib", type=float, default=12.0, help="the worker's address-space cap (default 12)")
    ap.add_argument("--seed-dir", default=None, help="where the seed engines are built (default: a temp dir)")
    ap.add_argument("--replay", type=int, default=None, help="rerun one mutant seed in this process")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each failure as it happens")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    base_seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    with tempfile.TemporaryDirectory(prefix="flashrt-fuzz-seeds-") as tmp:
        seed_dir = args.seed_dir or tmp
        os.makedirs(seed_dir, exist_ok=True)
        t0 = time.monotonic()
        seeds = build_seeds(seed_dir)
        print(f"seed engines: {', '.join(f'{k} ({len(v)} B)' for k, v in seeds.items())} "
              f"built in {time.monotonic() - t0:.1f} s", flush=True)
        if args.replay is not None:
            return replay(args.replay, seed_dir)
        return run_fuzz(args.minutes, args.timeout, base_seed, args.memory_gib, seed_dir, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
