"""Safetensors checkpoints + config.json -> ir.Graph, for Hugging Face transformers model families.

`flashrt build DIR` (config.json and model.safetensors, or shards listed by model.safetensors.index.json) or
`flashrt build model.safetensors --config config.json` builds the model's graph from its config, out of the
same ONNX-named primitive ops the ONNX importer produces, so passes, fusion and kernels treat both alike.

Families (config["model_type"], or the architectures list when model_type is absent):

| family | inputs (int64 unless noted) | outputs |
|---|---|---|
| bert | input_ids [1,T], attention_mask [1,T], token_type_ids [1,T] (when type_vocab_size > 1) | last_hidden_state |
| llama, qwen3, gemma | input_ids [1,T] (positions 0..T-1, causal) | last_hidden_state, logits (*) |
| vit, siglip_vision_model, siglip (its vision_config) | pixel_values float32 [1,C,H,W] | last_hidden_state |
| pi0 (lerobot's "type": "pi0"; its action expert) | state, noise, prefix_keys, prefix_values (float32) | actions |

pi0: aot/importers/pi0_expert.py, with --denoise-steps N.
(*) logits only for a *ForCausalLM checkpoint, from lm_head.weight or, with tie_word_embeddings, from the
embedding table (stored a second time, transposed, for the GEMM). last_hidden_state is after the final norm.

T comes from --shapes input_ids:1xT (required: engines are static); attention_mask and token_type_ids take the
same shape. The vision towers' image size is the config's (no position-embedding interpolation), so
pixel_values needs no --shapes; a different size is an error. Pooler heads (BERT pooler, ViT pooler, SigLIP's
attention-pooling head) are not built.

How the layers are written:
- embeddings: Gather of the table by the int64 ids; learned position tables are sliced to 0..T-1 at import;
  Gemma multiplies by sqrt(hidden_size).
- attention: MatMul/Mul(scale)/Add(mask)/Softmax/MatMul with Reshape/Transpose for the heads; grouped-query
  attention repeats K/V heads by Reshape+Expand+Reshape (transformers' repeat_kv); BERT's padding mask is
  (1 - mask) * -65504 broadcast over the keys; the decoders' causal (and sliding-window) mask is a constant
  [1,1,T,T] of 0 / -65504 (finite in fp16, so no -inf even at fp16 precision).
- RoPE: cos/sin tables for positions 0..T-1 are constants, from rope_theta and the rope type (default,
  linear, dynamic, yarn, longrope, llama3; rope_parameters or the older rope_scaling); rotate_half is
  Slice/Neg/Concat.
- norms: LayerNormalization (BERT, ViT, SigLIP); RMSNormalization (Llama, Qwen3 and its per-head q/k norm,
  Gemma with scale 1 + w).
- activations: Gelu (approximate='tanh' for gelu_pytorch_tanh / gelu_new / gelu_fast and Gemma's legacy
  "gelu"), SiLU as Mul(x, Sigmoid(x)), Relu.
- patch embedding: a Conv with stride = kernel.

Every weight the config implies is checked (present, expected shape, a float dtype) before any is read; the
safetensors files are read by the small validating reader below (header length, JSON, dtype, shape * itemsize
= byte span, spans inside the file and disjoint). Errors are ModelErrors naming the file and the tensor."""

import glob
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from flashrt.aot.importers.onnx_import import infer_and_fold
from flashrt.aot.importers.onnx_ops import dtype_of
from flashrt.aot.importers.pi0_expert import build_pi0_expert
from flashrt.aot.ir import Graph, Node, Value
from flashrt.errors import ModelError

__all__ = ["FAMILIES", "import_safetensors", "read_safetensors_header", "Checkpoint"]

# safetensors dtype -> itemsize; the float ones flashrt reads as weights
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100 << 20
# the masking value: float16's lowest, finite in every engine precision (transformers uses the compute dtype's
# lowest; both give exactly zero probability next to any real score)
NEG = -65504.0


# ---- the safetensors reader ---------------------------------------------------------------------------


@dataclass
class TensorInfo:
    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors of one .safetensors file (validated) and its __metadata__."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: {size} bytes is too short for a safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > size - 8:
                raise ModelError(f"{path}: the header length field says {n} bytes, but the file has only {size - 8} "
                                 "bytes after it (truncated file or not a safetensors file)")
            if n > MAX_HEADER:
                raise ModelError(f"{path}: the header length field says {n} bytes (more than {MAX_HEADER}); "
                                 "not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: the safetensors header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: the header's __metadata__ is not an object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: its header entry is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise ModelError(f"{where}: unknown dtype {dtype!r} (safetensors dtypes: {', '.join(ITEMSIZE)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
                or offs[0] > offs[1]):
            raise ModelError(f"{where}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end")
        need = math.prod(shape) * ITEMSIZE[dtype]
        if offs[1] - offs[0] != need:
            raise ModelError(f"{where}: the header says {dtype} {shape} ({need} bytes) but its data_offsets "
                             f"{offs} span {offs[1] - offs[0]} bytes")
        if offs[1] > data_size:
            raise ModelError(f"{where}: its data [{offs[0]}, {offs[1]}) lies past the end of the file's "
                             f"{data_size} data bytes (the file is truncated or its header is wrong)")
        tensors[name] = TensorInfo(path, name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ModelError(f"{path}: the data of tensors '{a}' and '{b}' overlap (the header is wrong)")
    return tensors, meta


def _bf16_to_f32(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)


class Checkpoint:
    """The tensors of one or more safetensors files (a sharded checkpoint: through its index)."""

    def __init__(self, files: list[str], index: str | None = None):
        self.files = files
        self.index = index
        self.where = index or (files[0] if len(files) == 1 else os.path.dirname(files[0]) or ".")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            tensors, _ = read_safetensors_header(path)
            for name, t in tensors.items():
                if name in self.tensors:
                    raise ModelError(f"{path}: tensor '{name}' is also in {self.tensors[name].file}")
                self.tensors[name] = t

    @classmethod
    def from_index(cls, index: str) -> "Checkpoint":
        doc = _read_json(index)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise ModelError(f"{index}: no weight_map of tensor name -> shard file")
        folder = os.path.dirname(os.path.abspath(index))
        shards = []
        for shard in sorted(set(wmap.values())):
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ModelError(f"{index}: shard '{shard}' is not a file name in the index's folder")
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise ModelError(f"{index}: shard file '{shard}' does not exist")
            shards.append(path)
        ck = cls(shards, index)
        for name, shard in wmap.items():
            t = ck.tensors.get(name)
            if t is None or os.path.basename(t.file) != shard:
                raise ModelError(f"{index}: the index puts tensor '{name}' in '{shard}', which does not hold it")
        return ck

    def find(self, key: str) -> TensorInfo | None:
        t = self.tensors.get(key)
        if t is None and ".LayerNorm." in key:  # old BERT checkpoints: LayerNorm.gamma / LayerNorm.beta
            t = self.tensors.get(key.replace(".weight", ".gamma").replace(".bias", ".beta"))
        return t

    def load(self, key: str) -> np.ndarray:
        """A tensor as float32."""
        t = self.find(key)
        try:
            with open(t.file, "rb") as f:
                f.seek(t.start)
                raw = f.read(t.end - t.start)
        except OSError as e:
            raise ModelError(f"{t.file}: cannot read tensor '{t.name}': {e.strerror or e}") from None
        if len(raw) != t.end - t.start:
            raise ModelError(f"{t.file}: tensor '{t.name}': the file ends inside its data (truncated)")
        if t.dtype == "BF16":
            arr = _bf16_to_f32(raw)
        else:
            arr = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[t.dtype]).astype(np.float32)
        return arr.reshape(t.shape)


# ---- locating the files -------------------------------------------------------------------------------


def _locate(path: str, config: str | None) -> tuple[str, Checkpoint, list[str]]:
    """(config path, checkpoint, files to hash) for a checkpoint folder, a .safetensors file or an index."""
    if os.path.isdir(path):
        cfg = config or os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise ModelError(f"--config {config}: no such file" if config else
                             f"{path}: no config.json in the folder (or give one with --config)")
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        preferred = os.path.join(path, "model.safetensors.index.json")
        if preferred in indexes:
            indexes = [preferred]
        if len(indexes) > 1:
            raise ModelError(f"{path}: several safetensors indexes ({', '.join(map(os.path.basename, indexes))}); "
                             "build one of them: flashrt build FOLDER/NAME.safetensors.index.json")
        if indexes:
            ck = Checkpoint.from_index(indexes[0])
            return cfg, ck, [cfg, indexes[0], *ck.files]
        single = os.path.join(path, "model.safetensors")
        files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ModelError(f"{path}: no *.safetensors files in the folder")
        return cfg, Checkpoint(files), [cfg, *files]
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file or folder")
    cfg = config or os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(cfg):
        raise ModelError(f"{path}: a safetensors file needs its config.json: give it with --config PATH"
                         if config is None else f"--config {config}: no such file")
    if path.lower().endswith(".index.json"):
        ck = Checkpoint.from_index(path)
        return cfg, ck, [cfg, path, *ck.files]
    return cfg, Checkpoint([path]), [cfg, path]


def _sha256(files: list[str]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode() + b"\0")
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                fh.update(chunk)
        h.update(fh.digest())
    return h.hexdigest()


# ---- config access --------------------------------------------------------------------------------------


class Config:
    def __init__(self, data: dict, path: str, scope: str = ""):
        self.data, self.path, self.scope = data, path, scope

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default=None):
        v = self.data.get(key)
        return default if v is None else v

    def _where(self, key: str) -> str:
        return f"{self.path}: {self.scope}{key}"

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        v = self.get(key, default)
        if v is None:
            raise ModelError(f"{self._where(key)} is missing")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ModelError(f"{self._where(key)} is {v!r}; expected an integer >= {minimum}")
        return v

    def float(self, key: str, default: float | None = None) -> float:
        v = self.get(key, default)
        if v is None:
            raise ModelError(f"{self._where(key)} is missing")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ModelError(f"{self._where(key)} is {v!r}; expected a number")
        return float(v)

    def pair(self, key: str, default=None) -> tuple[int, int]:
        v = self.get(key, default)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            a, b = v
        else:
            a = b = v
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (a, b)):
            raise ModelError(f"{self._where(key)} is {v!r}; expected a positive integer or a pair of them")
        return a, b

    def sub(self, key: str) -> "Config":
        v = self.data.get(key)
        if not isinstance(v, dict):
            raise ModelError(f"{self._where(key)} is missing or not an object")
        return Config(v, self.path, f"{self.scope}{key}.")


# ---- graph construction ---------------------------------------------------------------------------------


@dataclass
class _WeightSpec:
    key: str  # full checkpoint name
    shape: tuple[int, ...]  # expected, from the config
    transform: object  # np.ndarray -> np.ndarray, or None


class _Net:
    """Nodes, inputs, constants and the weights they read (loaded only after all are checked)."""

    def __init__(self, name: str, prefix: str):
        self.name, self.prefix = name, prefix
        self.nodes: list[Node] = []
        self.values: dict[str, Value] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.specs: dict[str, _WeightSpec] = {}
        self.used: set[str] = set()

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def input(self, name: str, dtype: str, shape: tuple) -> str:
        self.used.add(name)
        self.values[name] = Value(name, dtype, tuple(shape))
        self.inputs.append(name)
        return name

    def const(self, value, base: str = "const", dtype=np.float32) -> str:
        arr = np.asarray(value, dtype)
        name = self._fresh(base)
        self.constants[name] = arr
        self.values[name] = Value(name, dtype_of(arr), tuple(arr.shape))
        return name

    def ints(self, dims, base: str = "shape") -> str:
        return self.const(list(dims), base, np.int64)

    def weight(self, key: str, shape: tuple, transform=None, tag: str = "") -> str:
        """A constant read from checkpoint tensor prefix+key, expected to have `shape`."""
        full = self.prefix + key
        name = f"{full}{tag}"
        if name not in self.specs:
            self.used.add(name)
            self.specs[name] = _WeightSpec(full, tuple(shape), transform)
        return name

    def op(self, op: str, inputs: list[str], name: str, attrs: dict | None = None, out: str | None = None) -> str:
        node_name = self._fresh(name)
        output = out or node_name
        if out:
            self.used.add(out)
        self.nodes.append(Node(op, node_name, list(inputs), [output], dict(attrs or {})))
        return output

    # layers

    def linear(self, x: str, key: str, n_in: int, n_out: int, bias: bool) -> str:
        w = self.weight(f"{key}.weight", (n_out, n_in), lambda a: np.ascontiguousarray(a.T), ":T")
        y = self.op("MatMul", [x, w], key)
        if bias:
            y = self.op("Add", [y, self.weight(f"{key}.bias", (n_out,))], f"{key}/bias")
        return y

    def layer_norm(self, x: str, key: str, dim: int, eps: float, out: str | None = None) -> str:
        return self.op("LayerNormalization", [x, self.weight(f"{key}.weight", (dim,)),
                                              self.weight(f"{key}.bias", (dim,))], key,
                       {"axis": -1, "epsilon": eps}, out)

    def rms_norm(self, x: str, key: str, dim: int, eps: float, plus_one: bool = False, out: str | None = None) -> str:
        scale = (self.weight(f"{key}.weight", (dim,), lambda a: 1.0 + a, ":1+w") if plus_one
                 else self.weight(f"{key}.weight", (dim,)))
        return self.op("RMSNormalization", [x, scale], key, {"axis": -1, "epsilon": eps}, out)

    def act(self, x: str, kind: str, name: str) -> str:
        if kind in ("silu", "swish"):
            return self.op("Mul", [x, self.op("Sigmoid", [x], f"{name}/sigmoid")], f"{name}/silu")
        if kind == "gelu":
            return self.op("Gelu", [x], f"{name}/gelu")
        if kind == "gelu_tanh":
            return self.op("Gelu", [x], f"{name}/gelu", {"approximate": "tanh"})
        if kind == "relu":
            return self.op("Relu", [x], f"{name}/relu")
        raise AssertionError(kind)

    def reshape(self, x: str, dims, name: str) -> str:
        return self.op("Reshape", [x, self.ints(dims, f"{name}/shape")], name)

    def transpose(self, x: str, perm, name: str) -> str:
        return self.op("Transpose", [x], name, {"perm": list(perm)})

    def heads(self, x: str, T: int, n: int, d: int, name: str, norm=None) -> str:
        """[1, T, n*d] -> [1, n, T, d] (optionally RMS-normalized over d first: Qwen3's q/k norm)."""
        y = self.reshape(x, (1, T, n, d), f"{name}/split_heads")
        if norm is not None:
            y = norm(y)
        return self.transpose(y, (0, 2, 1, 3), f"{name}/heads")

    def attention(self, q: str, k: str, v: str, T: int, n_heads: int, n_kv: int, d: int, scale: float,
                  mask: str | None, name: str) -> str:
        """q [1,H,T,d], k/v [1,KV,T,d] -> context [1, T, H*d]."""
        rep = n_heads // n_kv
        if rep > 1:  # transformers' repeat_kv: [1,KV,T,d] -> [1,KV,1,T,d] -> [1,KV,rep,T,d] -> [1,H,T,d]
            k, v = (self.reshape(self.op("Expand", [self.reshape(x, (1, n_kv, 1, T, d), f"{name}/{t}_kv"),
                                                    self.ints((1, n_kv, rep, T, d), f"{name}/{t}_rep")],
                                         f"{name}/{t}_expand"),
                                 (1, n_heads, T, d), f"{name}/{t}_repeat_kv") for x, t in ((k, "k"), (v, "v")))
        kt = self.transpose(k, (0, 1, 3, 2), f"{name}/k_transpose")
        s = self.op("MatMul", [q, kt], f"{name}/scores")
        s = self.op("Mul", [s, self.const(scale, f"{name}/scale")], f"{name}/scale")
        if mask is not None:
            s = self.op("Add", [s, mask], f"{name}/mask")
        p = self.op("Softmax", [s], f"{name}/softmax", {"axis": -1})
        ctx = self.op("MatMul", [p, v], f"{name}/context")
        ctx = self.transpose(ctx, (0, 2, 1, 3), f"{name}/merge_heads")
        return self.reshape(ctx, (1, T, n_heads * d), f"{name}/merge")

    def rope(self, x: str, cos: str, sin: str, d: int, name: str) -> str:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])."""
        h = d // 2
        lo = self.op("Slice", [x, self.ints([0]), self.ints([h]), self.ints([-1])], f"{name}/lo")
        hi = self.op("Slice", [x, self.ints([h]), self.ints([d]), self.ints([-1])], f"{name}/hi")
        rot = self.op("Concat", [self.op("Neg", [hi], f"{name}/neg"), lo], f"{name}/rotate_half", {"axis": -1})
        return self.op("Add", [self.op("Mul", [x, cos], f"{name}/cos"), self.op("Mul", [rot, sin], f"{name}/sin")],
                       f"{name}/rope")

    def patch_embed(self, px: str, key: str, C: int, D: int, p: tuple[int, int], n_patches: int) -> str:
        """Conv with stride = kernel, then [1, D, h, w] -> [1, h*w, D]."""
        y = self.op("Conv", [px, self.weight(f"{key}.weight", (D, C, *p)), self.weight(f"{key}.bias", (D,))], key,
                    {"kernel_shape": list(p), "strides": list(p)})
        y = self.reshape(y, (1, D, n_patches), f"{key}/flatten")
        return self.transpose(y, (0, 2, 1), f"{key}/tokens")


# ---- families ------------------------------------------------------------------------------------------


def _seq_len(shapes: dict, names: list[str], where: str) -> int:
    """T from --shapes input_ids:1xT (the other token inputs must agree)."""
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ModelError(f"--shapes names {unknown}, which are not inputs of the {where} model (inputs: {names})")
    if names[0] not in shapes:
        raise ModelError(f"input '{names[0]}' needs a sequence length (engines are static): give it with "
                         f"--shapes {names[0]}:1x128")
    for n in names:
        if n in shapes:
            s = tuple(shapes[n])
            if len(s) != 2 or s[0] != 1 or s[1] < 1:
                raise ModelError(f"--shapes gives input '{n}' shape {'x'.join(map(str, s))}; it must be 1xT "
                                 "(batch 1, T tokens)")
            if s != tuple(shapes[names[0]]):
                raise ModelError(f"--shapes gives input '{n}' shape {'x'.join(map(str, s))} but '{names[0]}' "
                                 f"{'x'.join(map(str, shapes[names[0]]))}; they must agree")
    return int(shapes[names[0]][1])


def _activation(cfg: Config, key: str, family: str) -> str:
    name = cfg.get(key)
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
    if family == "gemma" and name == "gelu":  # transformers maps Gemma's legacy "gelu" to the tanh form
        return "gelu_tanh"
    if name not in table:
        raise ModelError(f"{cfg.path}: {cfg.scope}{key} {name!r} is not supported (supported: {', '.join(table)})")
    return table[name]


def _find_prefix(ck: Checkpoint, key: str, prefixes: list[str]) -> str:
    for p in prefixes:
        if ck.find(p + key) is not None:
            return p
    return prefixes[0]  # reported as missing under the primary naming


def _bert(net: _Net, cfg: Config, shapes: dict) -> None:
    H, L, nh = cfg.int("hidden_size"), cfg.int("num_hidden_layers"), cfg.int("num_attention_heads")
    F, V, P = cfg.int("intermediate_size"), cfg.int("vocab_size"), cfg.int("max_position_embeddings")
    types = cfg.int("type_vocab_size", 2, minimum=0)
    eps = cfg.float("layer_norm_eps", 1e-12)
    act = _activation(cfg, "hidden_act", "bert")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{cfg.path}: position_embedding_type {cfg.get('position_embedding_type')!r} is not "
                         "supported (only 'absolute')")
    if cfg.get("is_decoder", False):
        raise ModelError(f"{cfg.path}: is_decoder BERT models are not supported (encoder only)")
    if H % nh:
        raise ModelError(f"{cfg.path}: hidden_size {H} is not a multiple of num_attention_heads {nh}")
    d = H // nh
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if types > 1 else [])
    T = _seq_len(shapes, names, "bert")
    if T > P:
        raise ModelError(f"--shapes input_ids:1x{T}: longer than max_position_embeddings {P} of {cfg.path}")
    ids = net.input("input_ids", "int64", (1, T))
    mask = net.input("attention_mask", "int64", (1, T))
    x = net.op("Gather", [net.weight("embeddings.word_embeddings.weight", (V, H)), ids],
               "embeddings.word_embeddings", {"axis": 0})
    pos = net.weight("embeddings.position_embeddings.weight", (P, H), lambda a: a[None, :T].copy(), f":0..{T - 1}")
    x = net.op("Add", [x, pos], "embeddings.position_embeddings")
    if types > 1:
        tt = net.input("token_type_ids", "int64", (1, T))
        te = net.op("Gather", [net.weight("embeddings.token_type_embeddings.weight", (types, H)), tt],
                    "embeddings.token_type_embeddings", {"axis": 0})
        x = net.op("Add", [x, te], "embeddings.token_types")
    elif types == 1:
        x = net.op("Add", [x, net.weight("embeddings.token_type_embeddings.weight", (1, H))],
                   "embeddings.token_types")
    x = net.layer_norm(x, "embeddings.LayerNorm", H, eps)
    m = net.op("Cast", [mask], "extended_mask/cast", {"to": 1})
    m = net.op("Sub", [net.const(1.0, "one"), m], "extended_mask/invert")
    m = net.op("Mul", [m, net.const(NEG, "mask_value")], "extended_mask/bias")
    m = net.reshape(m, (1, 1, 1, T), "extended_mask")
    for i in range(L):
        p = f"encoder.layer.{i}"
        q = net.heads(net.linear(x, f"{p}.attention.self.query", H, H, True), T, nh, d, f"{p}.q")
        k = net.heads(net.linear(x, f"{p}.attention.self.key", H, H, True), T, nh, d, f"{p}.k")
        v = net.heads(net.linear(x, f"{p}.attention.self.value", H, H, True), T, nh, d, f"{p}.v")
        ctx = net.attention(q, k, v, T, nh, nh, d, d ** -0.5, m, f"{p}.attention.self")
        a = net.op("Add", [net.linear(ctx, f"{p}.attention.output.dense", H, H, True), x], f"{p}.attention.residual")
        x = net.layer_norm(a, f"{p}.attention.output.LayerNorm", H, eps)
        h = net.act(net.linear(x, f"{p}.intermediate.dense", H, F, True), act, f"{p}.intermediate")
        o = net.op("Add", [net.linear(h, f"{p}.output.dense", F, H, True), x], f"{p}.output.residual")
        x = net.layer_norm(o, f"{p}.output.LayerNorm", H, eps, out="last_hidden_state" if i == L - 1 else None)
    if L == 0:
        net.op("Identity", [x], "last_hidden_state", out="last_hidden_state")
    net.outputs = ["last_hidden_state"]


def _rope_parameters(cfg: Config) -> dict:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelError(f"{cfg.path}: rope_parameters / rope_scaling is not an object")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelError(f"{cfg.path}: per-layer-type RoPE parameters are not supported")
    return params


def rope_tables(cfg: Config, head_dim: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, head_dim] for positions 0..T-1, as transformers computes them (modeling_rope_utils)."""
    params = _rope_parameters(cfg)
    theta = float(params.get("rope_theta") or cfg.float("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ModelError(f"{cfg.path}: partial_rotary_factor {partial} is not supported")
    dim = head_dim
    max_pos = cfg.int("max_position_embeddings", 2048)
    orig = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos))
    exps = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv = 1.0 / theta ** exps
    scaling = 1.0

    def need(key):
        if params.get(key) is None:
            raise ModelError(f"{cfg.path}: RoPE type '{rtype}' needs '{key}' in rope_parameters / rope_scaling")
        return float(params[key])

    if rtype == "default":
        pass
    elif rtype == "linear":
        inv = inv / need("factor")
    elif rtype == "dynamic":
        factor = need("factor")
        seq = max(T, max_pos)
        base = theta * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / base ** exps
    elif rtype == "llama3":
        factor, lo, hi = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old = float(orig)
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l)
    elif rtype == "yarn":
        factor = float(params["factor"]) if params.get("factor") is not None else max_pos / float(orig)
        attn = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        if attn is None:
            attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
                else get_mscale(factor)
        fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def corr(rot):
            return (dim * math.log(float(orig) / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr(fast), corr(slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        inv = (1.0 / (factor * theta ** exps)) * (1 - extra) + (1.0 / theta ** exps) * extra
        scaling = float(attn)
    elif rtype == "longrope":
        factor = float(params["factor"]) if params.get("factor") is not None else max_pos / float(orig)
        attn = params.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(float(orig)))
        ext = np.asarray(params["long_factor"] if T > orig else params["short_factor"], np.float64)
        if ext.shape != (dim // 2,):
            raise ModelError(f"{cfg.path}: longrope factors have {ext.size} entries; head_dim {dim} needs {dim // 2}")
        inv = 1.0 / (ext * theta ** exps)
        scaling = float(attn)
    else:
        raise ModelError(f"{cfg.path}: RoPE type '{rtype}' is not supported (default, linear, dynamic, yarn, "
                         "longrope, llama3)")
    inv = inv.astype(np.float32)  # transformers keeps inv_freq in float32
    freqs = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    return (np.cos(emb) * scaling).astype(np.float32), (np.sin(emb) * scaling).astype(np.float32)


def _causal_mask(T: int, window: int | None) -> np.ndarray:
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    ok = j <= i
    if window:
        ok &= j > i - window
    return np.where(ok, 0.0, NEG).astype(np.float32).reshape(1, 1, T, T)


def _decoder(net: _Net, cfg: Config, shapes: dict, family: str, causal_lm: bool) -> None:
    H, L, nh = cfg.int("hidden_size"), cfg.int("num_hidden_layers"), cfg.int("num_attention_heads")
    F, V = cfg.int("intermediate_size"), cfg.int("vocab_size")
    nkv = cfg.int("num_key_value_heads", nh)
    d = cfg.int("head_dim", H // nh if H % nh == 0 else None)
    eps = cfg.float("rms_norm_eps", 1e-6)
    act = _activation(cfg, "hidden_activation" if cfg.has("hidden_activation") else "hidden_act", family)
    if nh % nkv:
        raise ModelError(f"{cfg.path}: num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    if d % 2:
        raise ModelError(f"{cfg.path}: head_dim {d} is odd; RoPE needs an even head_dim")
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False)) if family == "llama" else False
    T = _seq_len(shapes, ["input_ids"], family)
    gemma = family == "gemma"

    ids = net.input("input_ids", "int64", (1, T))
    embed = net.weight("embed_tokens.weight", (V, H))
    x = net.op("Gather", [embed, ids], "embed_tokens", {"axis": 0})
    if gemma:
        x = net.op("Mul", [x, net.const(np.float32(H ** 0.5), "embed_scale")], "embed_tokens/scale")
    cos_t, sin_t = rope_tables(cfg, d, T)
    cos = net.const(cos_t.reshape(1, 1, T, d), "rope_cos")
    sin = net.const(sin_t.reshape(1, 1, T, d), "rope_sin")

    window = None
    if family == "qwen3" and cfg.get("use_sliding_window", False):
        window = cfg.int("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = cfg.int("max_window_layers", L, minimum=0) if window else L
        layer_types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(L)]
    if not isinstance(layer_types, list) or len(layer_types) != L:
        raise ModelError(f"{cfg.path}: layer_types must list num_hidden_layers ({L}) entries")
    bidirectional = gemma and bool(cfg.get("use_bidirectional_attention", False))
    masks: dict[str, str | None] = {}
    for lt in set(layer_types):
        if lt not in ("full_attention", "sliding_attention"):
            raise ModelError(f"{cfg.path}: layer type {lt!r} is not supported")
        w = window if lt == "sliding_attention" else None
        if bidirectional:
            masks[lt] = None
        else:
            masks[lt] = net.const(_causal_mask(T, w if w and w < T else None), f"causal_mask_{lt}")

    for i in range(L):
        p = f"layers.{i}"
        h = net.rms_norm(x, f"{p}.input_layernorm", H, eps, gemma)
        qn = kn = None
        if family == "qwen3":
            def qn(y, p=p):
                return net.rms_norm(y, f"{p}.self_attn.q_norm", d, eps)

            def kn(y, p=p):
                return net.rms_norm(y, f"{p}.self_attn.k_norm", d, eps)

        q = net.heads(net.linear(h, f"{p}.self_attn.q_proj", H, nh * d, attn_bias), T, nh, d, f"{p}.q", qn)
        k = net.heads(net.linear(h, f"{p}.self_attn.k_proj", H, nkv * d, attn_bias), T, nkv, d, f"{p}.k", kn)
        v = net.heads(net.linear(h, f"{p}.self_attn.v_proj", H, nkv * d, attn_bias), T, nkv, d, f"{p}.v")
        q = net.rope(q, cos, sin, d, f"{p}.q")
        k = net.rope(k, cos, sin, d, f"{p}.k")
        ctx = net.attention(q, k, v, T, nh, nkv, d, d ** -0.5, masks[layer_types[i]], f"{p}.self_attn")
        x = net.op("Add", [x, net.linear(ctx, f"{p}.self_attn.o_proj", nh * d, H, attn_bias)], f"{p}.residual1")
        h = net.rms_norm(x, f"{p}.post_attention_layernorm", H, eps, gemma)
        g = net.act(net.linear(h, f"{p}.mlp.gate_proj", H, F, mlp_bias), act, f"{p}.mlp")
        u = net.linear(h, f"{p}.mlp.up_proj", H, F, mlp_bias)
        m = net.linear(net.op("Mul", [g, u], f"{p}.mlp.gated"), f"{p}.mlp.down_proj", F, H, mlp_bias)
        x = net.op("Add", [x, m], f"{p}.residual2")
    x = net.rms_norm(x, "norm", H, eps, gemma, out="last_hidden_state")
    net.outputs = ["last_hidden_state"]
    if causal_lm:
        tied = bool(cfg.get("tie_word_embeddings", gemma))
        if tied:
            head = net.weight("embed_tokens.weight", (V, H), lambda a: np.ascontiguousarray(a.T), ":T")
        else:
            head = "lm_head.weight:T"
            net.specs[head] = _WeightSpec("lm_head.weight", (V, H), lambda a: np.ascontiguousarray(a.T))
            net.used.add(head)
        net.op("MatMul", [x, head], "lm_head", out="logits")
        net.outputs.append("logits")


def _vision(net: _Net, cfg: Config, shapes: dict, family: str) -> None:
    H, L, nh = cfg.int("hidden_size"), cfg.int("num_hidden_layers"), cfg.int("num_attention_heads")
    F, C = cfg.int("intermediate_size"), cfg.int("num_channels", 3)
    img = cfg.pair("image_size", 224)
    p = cfg.pair("patch_size", 16)
    vit = family == "vit"
    eps = cfg.float("layer_norm_eps", 1e-12 if vit else 1e-6)
    act = _activation(cfg, "hidden_act", family)
    if H % nh:
        raise ModelError(f"{cfg.path}: hidden_size {H} is not a multiple of num_attention_heads {nh}")
    if img[0] % p[0] or img[1] % p[1]:
        raise ModelError(f"{cfg.path}: image_size {list(img)} is not a multiple of patch_size {list(p)}")
    d = H // nh
    want = (1, C, *img)
    unknown = sorted(set(shapes) - {"pixel_values"})
    if unknown:
        raise ModelError(f"--shapes names {unknown}, which are not inputs of the {family} model "
                         "(inputs: ['pixel_values'])")
    if "pixel_values" in shapes and tuple(shapes["pixel_values"]) != want:
        raise ModelError(f"--shapes pixel_values:{'x'.join(map(str, shapes['pixel_values']))} differs from the "
                         f"config's {'x'.join(map(str, want))}; position embeddings are not interpolated")
    N = (img[0] // p[0]) * (img[1] // p[1])
    px = net.input("pixel_values", "float32", want)
    if vit:
        x = net.patch_embed(px, "embeddings.patch_embeddings.projection", C, H, p, N)
        x = net.op("Concat", [net.weight("embeddings.cls_token", (1, 1, H)), x], "embeddings.cls_token",
                   {"axis": 1})
        x = net.op("Add", [x, net.weight("embeddings.position_embeddings", (1, N + 1, H))],
                   "embeddings.position_embeddings")
        T = N + 1
    else:
        x = net.patch_embed(px, "embeddings.patch_embedding", C, H, p, N)
        x = net.op("Add", [x, net.weight("embeddings.position_embedding.weight", (N, H), lambda a: a[None], ":1xNxD")],
                   "embeddings.position_embedding")
        T = N
    for i in range(L):
        if vit:
            pre = f"encoder.layer.{i}"
            ln1, ln2 = f"{pre}.layernorm_before", f"{pre}.layernorm_after"
            qk = [f"{pre}.attention.attention.{n}" for n in ("query", "key", "value")]
            bias = bool(cfg.get("qkv_bias", True))
            out, fc1, fc2 = f"{pre}.attention.output.dense", f"{pre}.intermediate.dense", f"{pre}.output.dense"
        else:
            pre = f"encoder.layers.{i}"
            ln1, ln2 = f"{pre}.layer_norm1", f"{pre}.layer_norm2"
            qk = [f"{pre}.self_attn.{n}_proj" for n in ("q", "k", "v")]
            bias = True
            out, fc1, fc2 = f"{pre}.self_attn.out_proj", f"{pre}.mlp.fc1", f"{pre}.mlp.fc2"
        h = net.layer_norm(x, ln1, H, eps)
        q, k, v = (net.heads(net.linear(h, key, H, H, bias), T, nh, d, f"{pre}.{t}") for key, t in zip(qk, "qkv"))
        ctx = net.attention(q, k, v, T, nh, nh, d, d ** -0.5, None, f"{pre}.attention")
        x = net.op("Add", [x, net.linear(ctx, out, H, H, True)], f"{pre}.residual1")
        h = net.layer_norm(x, ln2, H, eps)
        h = net.linear(net.act(net.linear(h, fc1, H, F, True), act, fc1), fc2, F, H, True)
        x = net.op("Add", [x, h], f"{pre}.residual2")
    net.layer_norm(x, "layernorm" if vit else "post_layernorm", H, eps, out="last_hidden_state")
    net.outputs = ["last_hidden_state"]


FAMILIES = ("bert", "llama", "qwen3", "gemma", "vit", "siglip_vision_model", "siglip", "pi0")
_ARCH_FAMILY = {"Bert": "bert", "Llama": "llama", "Qwen3": "qwen3", "Gemma": "gemma", "ViT": "vit",
                "SiglipVision": "siglip_vision_model", "Siglip": "siglip"}


def _family(cfg: Config) -> str:
    mt = cfg.get("model_type")
    if mt is None and cfg.get("type") == "pi0":  # lerobot's policy config
        mt = "pi0"
    if mt is None:
        for arch in cfg.get("architectures") or []:
            for stem, fam in _ARCH_FAMILY.items():
                if isinstance(arch, str) and arch.startswith(stem) and arch[len(stem):].startswith(("Model", "For")):
                    mt = fam
                    break
            if mt:
                break
    if mt not in FAMILIES:
        what = f"model_type {mt!r}" if mt is not None else "a config without model_type or known architectures"
        raise ModelError(f"{cfg.path}: {what} is not a family flashrt builds from safetensors (it builds "
                         f"{', '.join(FAMILIES)}); export other models to ONNX")
    return mt


def _check_and_load(net: _Net, ck: Checkpoint) -> None:
    faults = []
    for spec in net.specs.values():
        t = ck.find(spec.key)
        where = "" if t is None or t.file == ck.where else f"{t.file}: "
        if t is None:
            faults.append(f"tensor '{spec.key}' is missing (expected shape {list(spec.shape)})")
        elif t.shape != spec.shape:
            faults.append(f"{where}tensor '{t.name}' has shape {list(t.shape)}, expected {list(spec.shape)} "
                          "from the config")
        elif t.dtype not in WEIGHT_DTYPES:
            faults.append(f"{where}tensor '{t.name}' has dtype {t.dtype}; flashrt reads F32, F16, BF16 (and F64) "
                          "weights")
    if faults:
        more = f" (and {len(faults) - 4} more faults)" if len(faults) > 4 else ""
        raise ModelError(f"{ck.where}: " + "; ".join(faults[:4]) + more)
    for name, spec in net.specs.items():
        arr = ck.load(spec.key)
        if spec.transform is not None:
            arr = np.ascontiguousarray(spec.transform(arr), dtype=np.float32)
        net.constants[name] = arr
        net.values[name] = Value(name, dtype_of(arr), tuple(arr.shape))


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({str(e)[:120]})") from None


def import_safetensors(path: str, config: str | None = None, shapes: dict | None = None,
                       denoise_steps: int | None = None) -> tuple[Graph, str]:
    """Build the graph of a safetensors checkpoint (a folder, a .safetensors file or an index) from its config.
    denoise_steps: flow-matching steps of the pi0 action expert (aot/importers/pi0_expert.py).
    Returns the graph and a sha256 over the config and the weight files."""
    shapes = dict(shapes or {})
    cfg_path, ck, files = _locate(path, config)
    data = _read_json(cfg_path)
    if not isinstance(data, dict):
        raise ModelError(f"{cfg_path}: not a JSON object")
    top = Config(data, cfg_path)
    family = _family(top)
    archs = [a for a in top.get("architectures") or [] if isinstance(a, str)]
    cfg = top
    if family == "siglip":
        cfg = top.sub("vision_config")
    name = archs[0] if archs else family
    loop_steps = None
    if denoise_steps is not None and family != "pi0":
        raise ModelError(f"--denoise-steps applies to the pi0 action-expert family; {cfg_path} is a {family} model")

    if family == "pi0":
        net = _Net("pi0_action_expert", _find_prefix(ck, "action_in_proj.weight", ["model.", ""]))
        loop_steps = build_pi0_expert(net, cfg, shapes, denoise_steps)
    elif family == "bert":
        net = _Net(name, _find_prefix(ck, "embeddings.word_embeddings.weight", ["", "bert."]))
        _bert(net, cfg, shapes)
    elif family in ("llama", "qwen3", "gemma"):
        net = _Net(name, _find_prefix(ck, "embed_tokens.weight", ["model.", "", "model.language_model."]))
        causal_lm = any(a.endswith("ForCausalLM") for a in archs)
        _decoder(net, cfg, shapes, family, causal_lm)
    else:
        fam = "vit" if family == "vit" else "siglip"
        anchor = "embeddings.patch_embeddings.projection.weight" if fam == "vit" else \
            "embeddings.patch_embedding.weight"
        prefixes = ["", "vit."] if fam == "vit" else ["vision_model.", ""]
        net = _Net(name, _find_prefix(ck, anchor, prefixes))
        _vision(net, cfg, shapes, fam)

    _check_and_load(net, ck)
    graph = Graph(name, net.inputs, net.outputs, net.nodes, net.values, net.constants, loop_steps=loop_steps)
    infer_and_fold(graph)
    for o in graph.outputs:
        if o in graph.constants:
            raise ModelError(f"{path}: output '{o}' does not depend on the inputs")
    graph.remove_dead()
    return graph, _sha256(files)
