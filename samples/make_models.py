"""Write the sample ONNX models (random weights, seeded, no download) into samples/.

  tiny_encoder.onnx  a 2-block pre-LN transformer encoder (ViT-style, 16 tokens x 64 dims, 4 heads) with
                     a classifier head, written the way exporters write it: MatMul + Add biases, GELU as
                     its Erf decomposition, attention as MatMul / Div / Softmax / MatMul with Reshape and
                     Transpose for the heads. Outputs the final hidden states and class probabilities.
  mlp.onnx           Gemm / Relu / Gelu (opset 20 op) / Tanh / Sigmoid with a dynamic batch dimension
                     (build it with --shapes x:4x32).

Run: python samples/make_models.py [--out DIR] [--tokens T --dim D --heads H --blocks B]
"""

import argparse
import math
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def weight(self, base: str, shape, scale=None) -> str:
        scale = scale if scale is not None else 1 / math.sqrt(shape[0])
        return self.const(base, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        out = self.name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def linear(self, x: str, din: int, dout: int, base: str) -> str:
        y = self.op("MatMul", [x, self.weight(f"{base}.weight", (din, dout))], f"{base}.matmul")
        return self.op("Add", [y, self.weight(f"{base}.bias", (dout,), 0.02)], f"{base}.out")

    def layernorm(self, x: str, dim: int, base: str) -> str:
        gamma = self.const(f"{base}.gamma", (1 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32))
        beta = self.const(f"{base}.beta", (0.1 * self.rng.standard_normal(dim)).astype(np.float32))
        return self.op("LayerNormalization", [x, gamma, beta], base, axis=-1, epsilon=1e-5)


def tiny_encoder(tokens=16, dim=64, heads=4, blocks=2, classes=10, seed=0) -> onnx.ModelProto:
    b = _Builder(seed)
    hd = dim // heads
    x = "x"
    for i in range(blocks):
        p = f"block{i}"
        h = b.layernorm(x, dim, f"{p}.ln1")
        q, k, v = (b.linear(h, dim, dim, f"{p}.attn.{n}") for n in "qkv")
        split = b.const(f"{p}.heads_shape", np.array([1, tokens, heads, hd], np.int64))
        q = b.op("Transpose", [b.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
        s = b.op("Div", [b.op("MatMul", [q, k]), b.const(f"{p}.scale", np.array(math.sqrt(hd), np.float32))])
        a = b.op("MatMul", [b.op("Softmax", [s], axis=-1), v])
        a = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]),
                             b.const(f"{p}.merge_shape", np.array([1, tokens, dim], np.int64))])
        x = b.op("Add", [x, b.linear(a, dim, dim, f"{p}.attn.out")], f"{p}.residual1")
        h = b.linear(b.layernorm(x, dim, f"{p}.ln2"), dim, 4 * dim, f"{p}.mlp.fc1")
        erf = b.op("Erf", [b.op("Div", [h, b.const("sqrt2", np.array(math.sqrt(2), np.float32))])])
        g = b.op("Mul", [b.op("Mul", [h, b.op("Add", [erf, b.const("one", np.array(1, np.float32))])]),
                         b.const("half", np.array(0.5, np.float32))], f"{p}.mlp.gelu")
        x = b.op("Add", [x, b.linear(g, 4 * dim, dim, f"{p}.mlp.fc2")], f"{p}.residual2")
    hidden = b.layernorm(x, dim, "final_ln")
    b.nodes.append(helper.make_node("Identity", [hidden], ["hidden"], name="hidden_out"))
    flat = b.op("Flatten", [hidden], axis=1)
    logits = b.op("Gemm", [flat, b.weight("head.weight", (classes, tokens * dim), 1 / math.sqrt(tokens * dim)),
                           b.weight("head.bias", (classes,), 0.02)], "head", transB=1)
    b.nodes.append(helper.make_node("Softmax", [logits], ["probs"], name="probs_node", axis=-1))
    graph = helper.make_graph(
        b.nodes, "tiny_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, dim])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, tokens, dim]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])],
        b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="flashrt-samples",
                             ir_version=8)


def mlp(din=32, hidden=64, dout=8, seed=1) -> onnx.ModelProto:
    b = _Builder(seed)
    h = b.op("Relu", [b.op("Gemm", ["x", b.weight("fc1.weight", (hidden, din)), b.weight("fc1.bias", (hidden,))],
                           transB=1)])
    h = b.op("Gelu", [b.op("Gemm", [h, b.weight("fc2.weight", (hidden, hidden)), b.weight("fc2.bias", (hidden,))],
                           alpha=0.5, beta=2.0)])
    h = b.op("Tanh", [b.op("Gemm", [h, b.weight("fc3.weight", (hidden, hidden)), b.weight("fc3.bias", (hidden,))])])
    out = b.op("Gemm", [h, b.weight("fc4.weight", (hidden, dout)), b.weight("fc4.bias", (dout,))])
    b.nodes.append(helper.make_node("Sigmoid", [out], ["y"], name="y_node"))
    graph = helper.make_graph(b.nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", din])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dout])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="flashrt-samples",
                             ir_version=9)


def write(model: onnx.ModelProto, path: str) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print(write(tiny_encoder(a.tokens, a.dim, a.heads, a.blocks), os.path.join(a.out, "tiny_encoder.onnx")))
    print(write(mlp(), os.path.join(a.out, "mlp.onnx")))


if __name__ == "__main__":
    main()
