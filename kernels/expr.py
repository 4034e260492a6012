"""Elementwise expressions: the fused body of eltwise kernels and of GEMM epilogues.

An expression is a list of instructions; each refers to earlier ones by index, the last is the result:
  ["in", k]       the k-th tensor input, broadcast to the iteration space
  ["in_rot", k]   RoPE's rotate_half of the k-th input along the last axis of the iteration space (size 2h):
                  -x[..., j + h] for j < h, x[..., j - h] after (elementwise kernels only)
  ["acc"]         the GEMM accumulator (epilogues only); ["acc", 1] the second one of a gated GEMM
  ["const", c]    a float32 constant
  [op, i] / [op, i, j]   a unary / binary op below; ["where", c, i, j] picks i where c != 0
Comparisons and logic ops give 1.0 or 0.0.
The same list is emitted as CUDA (float32 registers) and evaluated in numpy (float32 arrays)."""

import math
import struct

import numpy as np

from flashrt.errors import EngineFormatError


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 in float64: |error| <= 1.5e-7, below float32 resolution of erf's range.
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(np.float32)


def _e4m3(x: np.ndarray) -> np.ndarray:
    """Round to the nearest FP8 E4M3 value (ties to even), saturating at +-448; NaN stays NaN. Exact: the
    quantum of |x|'s binade (2^(e-3), subnormals 2^-9) scales x to an integer grid that rint rounds."""
    x = np.asarray(x, np.float32)
    c = np.clip(x, np.float32(-448), np.float32(448))
    _, e = np.frexp(c)  # c = m * 2^e with 0.5 <= |m| < 1: floor(log2 |c|) = e - 1
    s = np.maximum(e - 1, -6) - 3
    return np.ldexp(np.rint(np.ldexp(c, -s)), s).astype(np.float32)


# the same rounding in CUDA: ilogbf is floor(log2 |c|) (a huge negative number for 0), ldexpf and rintf are exact
_E4M3_C = "fminf(fmaxf({a}, -448.f), 448.f)"
_E4M3_S = f"(max(ilogbf({_E4M3_C}), -6) - 3)"
E4M3_CUDA = f"({{a}} != {{a}} ? {{a}} : ldexpf(rintf(ldexpf({_E4M3_C}, -{_E4M3_S})), {_E4M3_S}))"


def _gelu(x: np.ndarray) -> np.ndarray:
    return (np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(1 / math.sqrt(2))))).astype(np.float32)


UNARY = {
    "relu": ("frt_relu({a})", lambda a: np.where(a < 0, np.float32(0), a)),
    "sigmoid": ("frt_sigmoid({a})", lambda a: (1 / (1 + np.exp(-a))).astype(np.float32)),
    "tanh": ("tanhf({a})", np.tanh),
    "erf": ("erff({a})", _erf),
    "gelu": ("frt_gelu({a})", _gelu),
    "neg": ("(-{a})", np.negative),
    "exp": ("expf({a})", np.exp),
    "sqrt": ("sqrtf({a})", np.sqrt),
    "recip": ("(1.f / {a})", lambda a: (np.float32(1) / a).astype(np.float32)),
    "abs": ("fabsf({a})", np.abs),
    "id": ("({a})", lambda a: a),
    "sin": ("sinf({a})", np.sin),
    "cos": ("cosf({a})", np.cos),
    "floor": ("floorf({a})", np.floor),
    "ceil": ("ceilf({a})", np.ceil),
    "trunc": ("truncf({a})", np.trunc),
    "softplus": ("frt_softplus({a})", lambda a: np.where(a > 20, a, np.log1p(np.exp(np.minimum(a, 20))))),
    "not": ("({a} == 0.f ? 1.f : 0.f)", lambda a: (a == 0).astype(np.float32)),
    "ne0": ("({a} != 0.f ? 1.f : 0.f)", lambda a: (a != 0).astype(np.float32)),
    "isnan": ("({a} != {a} ? 1.f : 0.f)", lambda a: np.isnan(a).astype(np.float32)),
    "e4m3": (E4M3_CUDA, _e4m3),  # FP8 fake quantization (QuantizeLinear -> DequantizeLinear), scale applied outside
}
BINARY = {
    "add": ("({a} + {b})", np.add),
    "sub": ("({a} - {b})", np.subtract),
    "mul": ("({a} * {b})", np.multiply),
    "div": ("({a} / {b})", np.divide),
    "pow": ("powf({a}, {b})", np.power),
    "max": ("fmaxf({a}, {b})", np.fmax),
    "min": ("fminf({a}, {b})", np.fmin),
    "eq": ("({a} == {b} ? 1.f : 0.f)", lambda a, b: (a == b).astype(np.float32)),
    "lt": ("({a} < {b} ? 1.f : 0.f)", lambda a, b: (a < b).astype(np.float32)),
    "gt": ("({a} > {b} ? 1.f : 0.f)", lambda a, b: (a > b).astype(np.float32)),
    "le": ("({a} <= {b} ? 1.f : 0.f)", lambda a, b: (a <= b).astype(np.float32)),
    "ge": ("({a} >= {b} ? 1.f : 0.f)", lambda a, b: (a >= b).astype(np.float32)),
    "and": ("(({a} != 0.f) && ({b} != 0.f) ? 1.f : 0.f)", lambda a, b: ((a != 0) & (b != 0)).astype(np.float32)),
    "or": ("(({a} != 0.f) || ({b} != 0.f) ? 1.f : 0.f)", lambda a, b: ((a != 0) | (b != 0)).astype(np.float32)),
}
TERNARY = {"where": ("({a} != 0.f ? {b} : {c})", lambda a, b, c: np.where(a != 0, b, c))}


def c_float(value: float) -> str:
    """An exact CUDA float literal for a float32 value (a hex literal, so it stays a constant expression)."""
    value = struct.unpack("<f", struct.pack("<f", float(value)))[0]
    if math.isfinite(value):
        return f"{value.hex()}f"
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return f"__uint_as_float(0x{bits:08x}u)"


def emit(expr: list, load_input, acc: str = "acc", prefix: str = "v") -> tuple[list[str], str]:
    """CUDA statements computing expr; load_input(k) gives the C expression of input k, load_input(k, True) its
    rotate_half (["in_rot", k])."""
    lines = []
    for i, ins in enumerate(expr):
        op = ins[0]
        if op == "in":
            rhs = load_input(ins[1])
        elif op == "in_rot":
            rhs = load_input(ins[1], True)
        elif op == "acc":
            rhs = acc if len(ins) == 1 or ins[1] == 0 else f"{acc}{ins[1]}"
        elif op == "const":
            rhs = c_float(ins[1])
        elif op in UNARY:
            rhs = UNARY[op][0].format(a=f"{prefix}{ins[1]}")
        elif op in BINARY:
            rhs = BINARY[op][0].format(a=f"{prefix}{ins[1]}", b=f"{prefix}{ins[2]}")
        else:
            rhs = TERNARY[op][0].format(a=f"{prefix}{ins[1]}", b=f"{prefix}{ins[2]}", c=f"{prefix}{ins[3]}")
        lines.append(f"const float {prefix}{i} = {rhs};")
    return lines, f"{prefix}{len(expr) - 1}"


MAX_EXPR_LEN = 4096  # instructions; real fused expressions have a few dozen


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(expr, n_inputs: int, allow_acc: bool, allow_rot: bool = False) -> None:
    """Reject an expression a file could carry that evaluate() or emit() would fail on: unknown ops, wrong
    operand counts or types, references to later (or out-of-range) instructions and inputs."""
    if not isinstance(expr, list) or not expr or len(expr) > MAX_EXPR_LEN:
        raise EngineFormatError(f"elementwise expression is empty, not a list or longer than {MAX_EXPR_LEN} "
                                f"instructions: {str(expr)[:80]}")
    for i, ins in enumerate(expr):
        ok = isinstance(ins, list) and ins and isinstance(ins[0], str)
        if ok:
            op, operands = ins[0], ins[1:]
            if op == "in" or (op == "in_rot" and allow_rot):
                ok = len(operands) == 1 and _index(operands[0]) and 0 <= operands[0] < n_inputs
            elif op == "acc":
                ok = allow_acc and (not operands or (len(operands) == 1 and _index(operands[0])
                                                     and operands[0] in (0, 1)))
            elif op == "const":
                c = operands[0] if len(operands) == 1 else None
                ok = (isinstance(c, float) or _index(c)) and not (_index(c) and abs(c) > 2**128)
            else:
                arity = 1 if op in UNARY else 2 if op in BINARY else 3 if op in TERNARY else -1
                ok = len(operands) == arity and all(_index(j) and 0 <= j < i for j in operands)
        if not ok:
            raise EngineFormatError(f"elementwise expression instruction {i} is invalid: {str(ins)[:80]}")


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def evaluate(expr: list, inputs: list[np.ndarray], acc=None) -> np.ndarray:
    """acc: the accumulator array, or a tuple of them for ["acc", i]. ["in_rot", k] needs input k at the full
    iteration shape."""
    validate(expr, len(inputs), acc is not None, allow_rot=True)
    vals: list[np.ndarray] = []
    with np.errstate(all="ignore"):
        for ins in expr:
            op = ins[0]
            if op == "in":
                v = inputs[ins[1]]
            elif op == "in_rot":
                v = rotate_half(inputs[ins[1]])
            elif op == "acc":
                v = acc[ins[1] if len(ins) > 1 else 0] if isinstance(acc, tuple) else acc
            elif op == "const":
                v = np.float32(ins[1])
            elif op in UNARY:
                v = UNARY[op][1](vals[ins[1]])
            elif op in BINARY:
                v = BINARY[op][1](vals[ins[1]], vals[ins[2]])
            else:
                v = TERNARY[op][1](vals[ins[1]], vals[ins[2]], vals[ins[3]])
            vals.append(np.asarray(v, dtype=np.float32))
    return vals[-1]
