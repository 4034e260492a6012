"""Composite ONNX ops (opset 23 Attention and RotaryEmbedding) rewritten into the primitive ops the compiler
fuses (views, GEMMs with epilogues, Softmax, Concat), following the ONNX reference implementation."""

import math

import numpy as np

from flashrt.aot.importers.onnx_ops import dtype_of
from flashrt.aot.ir import Graph, Node, Value
from flashrt.errors import ModelError

COMPOSITE = {"Attention", "RotaryEmbedding"}


class _Builder:
    def __init__(self, graph: Graph, node: Node):
        self.g, self.node, self.nodes, self.count = graph, node, [], 0

    def fresh(self, base: str) -> str:
        while True:
            self.count += 1
            name = f"{self.node.name}/{base}_{self.count}"
            if name not in self.g.values and name not in self.g.constants:
                return name

    def const(self, value, dtype=np.int64) -> str:
        name = self.fresh("const")
        arr = np.asarray(value, dtype=dtype)
        self.g.constants[name] = arr
        self.g.values[name] = Value(name, dtype_of(arr), tuple(arr.shape))
        return name

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op.lower())
        self.nodes.append(Node(op, f"{self.node.name}/{op}_{len(self.nodes)}", inputs, [out], attrs,
                               list(self.node.source)))
        return out

    def shape(self, value: str) -> tuple:
        return self.g.values[value].shape


def _heads(b: _Builder, x: str, heads: int) -> str:
    """[B, S, H*D] -> [B, H, S, D]."""
    bsz, s, hidden = b.shape(x)
    y = b.op("Reshape", [x, b.const([bsz, s, heads, hidden // heads])])
    return b.op("Transpose", [y], perm=[0, 2, 1, 3])


def rotary_embedding(graph: Graph, node: Node) -> list[Node]:
    b = _Builder(graph, node)
    x, cos, sin = node.inputs[:3]
    pos = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    at = node.attrs
    shape = b.shape(x)
    if len(shape) == 4:
        xt = b.op("Transpose", [x], perm=[0, 2, 1, 3])  # [B, S, H, D]
    elif len(shape) == 3:
        heads = at.get("num_heads", 0)
        if not heads:
            raise ModelError(f"node '{node.name}' (RotaryEmbedding): 3-D input needs num_heads")
        xt = b.op("Reshape", [x, b.const([shape[0], shape[1], heads, shape[2] // heads])])
    else:
        raise ModelError(f"node '{node.name}' (RotaryEmbedding): input must be 3-D or 4-D, got {list(shape)}")
    bsz = shape[0]
    if len(shape) == 4:
        h, s, d = shape[1], shape[2], shape[3]
    else:
        h = at["num_heads"]
        s, d = shape[1], shape[2] // h
    rot = at.get("rotary_embedding_dim", 0) or d
    half = rot // 2
    if pos is not None:
        cos = b.op("Gather", [cos, pos], axis=0)
        sin = b.op("Gather", [sin, pos], axis=0)
    cos_shape = graph.values[node.inputs[1]].shape
    if cos_shape[-1] != half:
        raise ModelError(f"node '{node.name}' (RotaryEmbedding): cos_cache's last dimension {cos_shape[-1]} is not "
                         f"rotary_embedding_dim/2 = {half}")
    cos = b.op("Unsqueeze", [cos, b.const([-2])])  # [B, S, 1, half]
    sin = b.op("Unsqueeze", [sin, b.const([-2])])

    def sl(t, start, end, step=1):
        return b.op("Slice", [t, b.const([start]), b.const([end]), b.const([-1]), b.const([step])])

    x_rot = sl(xt, 0, rot)
    if at.get("interleaved", 0):
        x1, x2 = sl(x_rot, 0, rot, 2), sl(x_rot, 1, rot, 2)
    else:
        x1, x2 = sl(x_rot, 0, half), sl(x_rot, half, rot)
    real = b.op("Sub", [b.op("Mul", [cos, x1]), b.op("Mul", [sin, x2])])
    imag = b.op("Add", [b.op("Mul", [sin, x1]), b.op("Mul", [cos, x2])])
    if at.get("interleaved", 0):
        pair = b.op("Concat", [b.op("Unsqueeze", [real, b.const([-1])]), b.op("Unsqueeze", [imag, b.const([-1])])],
                    axis=-1)
        rotated = b.op("Reshape", [pair, b.const([bsz, s, h, rot])])
    else:
        rotated = b.op("Concat", [real, imag], axis=-1)
    if rot < d:
        rotated = b.op("Concat", [rotated, sl(xt, rot, d)], axis=-1)
    if len(shape) == 4:
        b.op("Transpose", [rotated], node.outputs[0], perm=[0, 2, 1, 3])
    else:
        b.op("Reshape", [rotated, b.const(list(shape))], node.outputs[0])
    return b.nodes


def attention(graph: Graph, node: Node) -> list[Node]:
    b = _Builder(graph, node)
    at = node.attrs
    q, k, v = node.inputs[:3]
    opt = (node.inputs + [""] * 7)[3:7]
    mask, past_k, past_v, nonpad = opt
    if nonpad:
        raise ModelError(f"node '{node.name}' (Attention): nonpad_kv_seqlen is not supported")
    qk_out = node.outputs[3] if len(node.outputs) > 3 and node.outputs[3] else ""
    qk_mode = at.get("qk_matmul_output_mode", 0)
    if at.get("left_window_size", -1) != -1 or at.get("right_window_size", -1) != -1:
        raise ModelError(f"node '{node.name}' (Attention): sliding windows are not supported")
    rank = len(b.shape(q))
    if rank == 3:
        qh, kvh = at.get("q_num_heads"), at.get("kv_num_heads")
        if not qh or not kvh:
            raise ModelError(f"node '{node.name}' (Attention): 3-D inputs need q_num_heads and kv_num_heads")
        q, k, v = _heads(b, q, qh), _heads(b, k, kvh), _heads(b, v, kvh)
    elif rank != 4:
        raise ModelError(f"node '{node.name}' (Attention): Q must be 3-D or 4-D, got {list(b.shape(q))}")
    q_shape = graph.values[node.inputs[0]].shape
    bsz = q_shape[0]
    if rank == 4:
        qh, sq, hd = q_shape[1], q_shape[2], q_shape[3]
        kvh = graph.values[node.inputs[1]].shape[1]
        vd = graph.values[node.inputs[2]].shape[3]
    else:
        sq, hd = q_shape[1], q_shape[2] // qh
        vd = graph.values[node.inputs[2]].shape[2] // kvh
    past_len = 0
    if past_k:
        past_len = graph.values[past_k].shape[2]
        k = b.op("Concat", [past_k, k], axis=2)
        v = b.op("Concat", [past_v, v], axis=2)
    if len(node.outputs) > 1 and node.outputs[1]:
        b.op("Identity", [k], node.outputs[1])
    if len(node.outputs) > 2 and node.outputs[2]:
        b.op("Identity", [v], node.outputs[2])
    skv = graph.values[node.inputs[1]].shape[2 if rank == 4 else 1] + past_len
    if qh % kvh:
        raise ModelError(f"node '{node.name}' (Attention): q heads {qh} are not a multiple of kv heads {kvh}")
    if qh != kvh:  # GQA: repeat each kv head for its group of q heads
        rep = qh // kvh
        for name in ("k", "v"):
            t = k if name == "k" else v
            width = hd if name == "k" else vd
            t = b.op("Unsqueeze", [t, b.const([2])])
            t = b.op("Expand", [t, b.const([bsz, kvh, rep, skv, width])])
            t = b.op("Reshape", [t, b.const([bsz, qh, skv, width])])
            k, v = (t, v) if name == "k" else (k, t)
    scale = at.get("scale", 1.0 / math.sqrt(hd))
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(scale, np.float32)])
    softcap = at.get("softcap", 0.0)
    if softcap and softcap > 0:  # before the mask, so masked positions stay -inf
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, b.const(softcap, np.float32)])]),
                              b.const(softcap, np.float32)])
    if qk_out and (qk_mode == 0 or (qk_mode == 1 and softcap and softcap > 0)):
        b.op("Identity", [scores], qk_out)
    if at.get("is_causal", 0):
        allowed = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + past_len
        scores = b.op("Add", [scores, b.const(np.where(allowed, 0.0, -np.inf), np.float32)])
    if mask:
        if graph.values[mask].dtype == "bool":
            mask = b.op("Where", [mask, b.const(0.0, np.float32), b.const(-np.inf, np.float32)])
        mshape = graph.values[node.inputs[3]].shape
        if mshape[-1] < skv:  # a shorter mask leaves the remaining keys masked
            pad = b.const(np.full(tuple(mshape[:-1]) + (skv - mshape[-1],), -np.inf), np.float32)
            mask = b.op("Concat", [mask, pad], axis=-1)
        scores = b.op("Add", [scores, mask])
    if qk_out and qk_mode in (1, 2) and not (qk_mode == 1 and softcap and softcap > 0):
        b.op("Identity", [scores], qk_out)
    probs = b.op("Softmax", [scores], axis=-1, _masked_rows_zero=1)
    if qk_out and qk_mode == 3:
        b.op("Identity", [probs], qk_out)
    if qk_out and qk_mode not in (0, 1, 2, 3):
        raise ModelError(f"node '{node.name}' (Attention): qk_matmul_output_mode {qk_mode} is not one of 0..3")
    y = b.op("MatMul", [probs, v])
    if rank == 3:
        y = b.op("Transpose", [y], perm=[0, 2, 1, 3])
        b.op("Reshape", [y, b.const([bsz, sq, qh * vd])], node.outputs[0])
    else:
        b.op("Identity", [y], node.outputs[0])
    return b.nodes


def decompose(graph: Graph, node: Node) -> list[Node]:
    return {"Attention": attention, "RotaryEmbedding": rotary_embedding}[node.op](graph, node)
