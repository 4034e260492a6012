"""Validation of the kernel `params` an engine file carries, before a numpy reference sees them.

The params come from the file, so they may be damaged or hostile: of the wrong JSON type (a list or a float
where an integer belongs, a bool for an int), negative, huge, or individually plausible but together asking
for tens of GB of host memory or hours of compute (huge dimensions with zero strides pass every extent check).
`check(family, params)` checks every param the family's reference reads, and caps the elements of every array
the reference materializes and the arithmetic it does; any fault is an EngineFormatError naming the param
and its value. Params the reference does not read (launch tiling and the like) are not checked here.

The caps are far above what a batch-1 engine needs (a 150k x 1024 embedding is 1.5e8 elements; the largest
GEMM of a 7B model at a 2k-token prompt is ~1e11 multiply-adds), and far below what would take a host down."""

import math

from flashrt.errors import EngineFormatError
from flashrt.kernels import prefetch
from flashrt.kernels.attention import MAX_SOURCES
from flashrt.kernels.dtypes import ITEMSIZE
from flashrt.kernels.layernorm import MAX_PARTS
from flashrt.kernels.memory import MAX_VIEW_ELEMENTS, MAX_VIEW_RANK
from flashrt.kernels.quant import ACT_QUANT

MAX_DIM = 2**31 - 1  # the kernels hold sizes in 32-bit ints
MAX_STRIDE = 2**44  # elements; no engine region is larger than 16 TiB
MAX_GEMM_WORK = 2**38  # multiply-adds of one GEMM / attention launch (~ a minute of numpy at worst)
MAX_ELEMENTWISE_WORK = 2**30  # elements x (expression instructions + inputs) of one launch
MAX_EXPR_LEN = 4096  # instructions of one fused elementwise expression
MAX_LIST = 4096  # inputs of a concat / elementwise kernel, epilogue inputs, ...
DTYPES = tuple(ITEMSIZE)
INDEX_DTYPES = ("int64", "int32", "int16", "int8", "uint8")


class _Bad(Exception):
    def __init__(self, path: str, msg: str):
        super().__init__(f"params{path} {msg}")


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _type(v) -> str:
    return "bool" if isinstance(v, bool) else type(v).__name__


# ----------------------------------------------------------------------------------------------- validators
# Each is a function (value, path) -> value that raises _Bad.

def Int(lo: int, hi: int):
    def check(v, path):
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Bad(path, f"= {_show(v)} is a {_type(v)}, expected an integer {lo}..{hi}")
        if not lo <= v <= hi:
            raise _Bad(path, f"= {v} is out of range {lo}..{hi}")
        return v
    return check


def Num(lo: float, hi: float):
    def check(v, path):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _Bad(path, f"= {_show(v)} is a {_type(v)}, expected a number")
        if not lo <= v <= hi:  # also rejects NaN
            raise _Bad(path, f"= {v!r} is out of range {lo:g}..{hi:g}")
        return float(v)
    return check


def Bool(v, path):
    if not isinstance(v, bool):
        raise _Bad(path, f"= {_show(v)} is a {_type(v)}, expected true or false")
    return v


def Enum(*values):
    def check(v, path):
        if not isinstance(v, str) or v not in values:
            raise _Bad(path, f"= {_show(v)} is not one of {list(values)}")
        return v
    return check


Dtype = Enum(*DTYPES)
IndexDtype = Enum(*INDEX_DTYPES)


def List(item, min_len: int = 0, max_len: int = MAX_LIST):
    def check(v, path):
        if not isinstance(v, list):
            raise _Bad(path, f"= {_show(v)} is a {_type(v)}, expected a list")
        if not min_len <= len(v) <= max_len:
            raise _Bad(path, f"has {len(v)} entries, expected {min_len}..{max_len}")
        return [item(x, f"{path}[{i}]") for i, x in enumerate(v)]
    return check


def Pair(first, second):
    def check(v, path):
        if not isinstance(v, list) or len(v) != 2:
            raise _Bad(path, f"= {_show(v)} is not a [size, stride] pair")
        return [first(v[0], f"{path}[0]"), second(v[1], f"{path}[1]")]
    return check


def Dict(required: dict, optional: dict | None = None):
    optional = optional or {}

    def check(v, path):
        if not isinstance(v, dict):
            raise _Bad(path, f"= {_show(v)} is a {_type(v)}, expected an object")
        out = {}
        for key, item in required.items():
            if key not in v:
                raise _Bad(f"{path}.{key}", "is missing")
            out[key] = item(v[key], f"{path}.{key}")
        for key, item in optional.items():
            if key in v:
                out[key] = item(v[key], f"{path}.{key}")
        return out
    return check


def Nullable(item):
    def check(v, path):
        return None if v is None else item(v, path)
    return check


DIM = Int(1, MAX_DIM)
DIM0 = Int(0, MAX_DIM)
# A view's (size, stride) atoms; the memory module checks the view against its relocation's extent.
ATOMS = List(Pair(DIM0, Int(0, MAX_STRIDE)), max_len=MAX_VIEW_RANK)
SHAPE = List(DIM0, max_len=MAX_VIEW_RANK)
EXPR = List(lambda v, path: v, min_len=1, max_len=MAX_EXPR_LEN)  # instructions: expr.validate checks them
OPERAND = {"dtype": Dtype, "atoms": ATOMS}

# the weight of a projection fused into another kernel (gemv `down`, attention `oproj`)
PROJ_WEIGHT = Dict({"dtype": Enum("float32", "bfloat16", "float16", "fp8_e4m3")}, {"quant": Enum("fp8")})


def _proj_weight(b: dict, path: str) -> None:
    if (b["dtype"] == "fp8_e4m3") != (b.get("quant") == "fp8"):
        raise _Bad(path, f"= {_show(b)}: an fp8_e4m3 weight needs quant 'fp8', and only it")


def L2_NEXT(v, path):
    """kernels/prefetch.py's spans: byte counts, each a positive multiple of 16, under 1 GiB in all."""
    sizes = List(Int(16, 1 << 30), min_len=1, max_len=256)(v, path)
    if why := prefetch.problem(sizes):
        raise _Bad(path, f"= {_show(v)}: {why}")
    return sizes


_GEMM = Dict(
    {"M": DIM, "N": DIM, "K": DIM, "batch": List(DIM, max_len=MAX_VIEW_RANK - 2),
     "a": Dict({"dtype": Dtype, "batch": ATOMS, "m": ATOMS, "k": ATOMS}),
     "b": Dict({"dtype": Dtype, "batch": ATOMS, "k": ATOMS, "n": ATOMS}, {"quant": Enum("fp8", "nvfp4")}),
     "ln": Nullable(Dict({"eps": Num(0.0, 1e30), "has_beta": Bool}, {"rms": Bool, "fold": Bool})),
     "epi_inputs": List(Dict(OPERAND)), "expr": EXPR, "out_dtype": Dtype},
    {"gated": Bool, "mma": Dict({"dtype": Enum("bfloat16", "float16", "e4m3")},  # the reference rounds to it
                                {"wgmma": Bool}),
     "aq": Nullable(Enum(*ACT_QUANT)), "cache": lambda v, path: CACHE(v, path), "mirror": Bool, "a_mirror": Int(1, 2),
     "down": Dict({"N": DIM, "b": PROJ_WEIGHT}), "l2_next": L2_NEXT})


# ------------------------------------------------------------------------------------------ relations / caps

def _elements(fields: str, what: str, *dims: int) -> int:
    """Cap an array the reference materializes; `fields` names the params that size it."""
    n, sized = math.prod(dims), math.prod(max(d, 1) for d in dims)  # numpy sizes empty arrays' other dims too
    if sized > MAX_VIEW_ELEMENTS:
        count = f"{n} elements" if n == sized else f"{sized} elements counting each 0 as 1"
        raise _Bad(f" {fields}", f"make the {what} {' x '.join(map(str, dims))} = {count}, more than the CPU "
                                 f"reference executor's limit of {MAX_VIEW_ELEMENTS} per array")
    return n


def _work(fields: str, what: str, n: int, limit: int) -> None:
    if n > limit:
        raise _Bad(f" {fields}", f"ask for {n} {what}, more than the CPU reference executor's limit of {limit} "
                                 f"per launch")


def _expr(p: dict, n_inputs: int, allow_acc: bool, elements: int, allow_rot: bool = False) -> None:
    from flashrt.kernels import expr as ex

    try:
        ex.validate(p["expr"], n_inputs, allow_acc, allow_rot)
    except EngineFormatError as e:
        raise _Bad(".expr", f"is invalid: {e}") from None
    _work("expr", "element operations (elements x (instructions + inputs))",
          elements * (len(p["expr"]) + n_inputs + 1), MAX_ELEMENTWISE_WORK)


def _gemm(p: dict) -> None:
    raw_mma = p.get("mma") if isinstance(p, dict) else None
    p = _GEMM(p, "")
    if p.get("mma", {}).get("dtype") == "e4m3" and (not p.get("aq") or p.get("gated")
                                                     or p["b"].get("quant") != "fp8"):
        raise _Bad(".mma.dtype", "= 'e4m3' needs FP8 activations (params.aq) times an fp8 weight (params.b.quant)")
    if p.get("mma", {}).get("wgmma"):
        _wgmma(p, raw_mma)
    elif p["ln"] and p["ln"].get("fold"):
        raise _Bad(".ln.fold", "= true (the norm folded into the weight) needs the wgmma kernel (params.mma.wgmma)")
    M, N, K, batch = p["M"], p["N"], p["K"], p["batch"]
    if p.get("aq") == "nvfp4" and K % 16:
        raise _Bad(".K", f"= {K}: NVFP4 activations need K to be a multiple of 16 (params.aq = 'nvfp4')")
    nb = math.prod(batch)
    width = 2 * N if p.get("gated") else N
    _elements("batch, M, K", "A operand", nb, M, K)
    _elements("batch, K, N", "B operand", nb, K, width)
    out = _elements("batch, M, N", "output", nb, M, width)
    _work("batch, M, N, K", "multiply-adds (batch x M x N x K)", nb * M * width * K, MAX_GEMM_WORK)
    _expr(p, len(p["epi_inputs"]), True, out)
    if "cache" in p and (nb * M != 1 or p.get("gated")):
        raise _Bad(".cache", "(fused KV-cache writes) needs a one-row GEMV that is not gated")
    _cache(p, nb * M * N)
    for key in ("mirror", "a_mirror"):
        if p.get(key) and (nb * M != 1 or p.get("gated")):
            raise _Bad(f".{key}", "(a row also stored as float32) needs a one-row GEMV that is not gated")
    down = p.get("down")
    if down is not None:
        if nb * M != 1 or not p.get("gated") or "cache" in p or p.get("mirror"):
            raise _Bad(".down", "(a fused down projection) needs a one-row gated GEMV without cache or mirror")
        _proj_weight(down["b"], ".down.b")
        _elements("down.N, N", "down projection weight", down["N"], N)


def _gemm_family(p: dict) -> None:
    """The gemm family's kernels compute a gated GEMM only in the wgmma kernel (the gemv family has its own)."""
    _gemm(p)
    for key in ("cache", "mirror", "a_mirror", "down"):
        if isinstance(p, dict) and key in p:
            raise _Bad(f".{key}", "is a gemv family param")
    if p.get("gated") and not (p.get("mma") or {}).get("wgmma"):
        raise _Bad(".gated", "= true in the gemm family needs the wgmma kernel (params.mma.wgmma)")


def _wgmma(p: dict, raw_mma: dict) -> None:
    """The sm_90a wgmma GEMM (kernels/cuda/gemm_wgmma.cuh) stages 16-bit A and B by 16-byte chunks (mma.a_mode and
    b_mode 0, read from the unfiltered params; b_mode 1 / 2 for an fp8 / nvfp4 B, nvfp4 with K % 64 == 0); a norm
    only comes folded (ln.fold), no activation quantization."""
    mma, why = {**raw_mma, **p["mma"]}, None
    if mma["dtype"] not in ("bfloat16", "float16"):
        why = f"mma.dtype = {mma['dtype']!r} (16-bit operands only)"
    elif p["a"]["dtype"] != mma["dtype"] or (not p["b"].get("quant") and p["b"]["dtype"] != mma["dtype"]) or \
            (p["b"].get("quant") == "nvfp4" and p["K"] % 64):
        why = f"operands a: {p['a']['dtype']}, b: {p['b']['dtype']} (both {mma['dtype']}, or an fp8 / nvfp4 b)"
    elif mma.get("a_mode", 0) != 0 or mma.get("b_mode", 0) != {None: 0, "fp8": 1, "nvfp4": 2}[p["b"].get("quant")]:
        why = (f"mma.a_mode = {_show(mma.get('a_mode'))}, b_mode = {_show(mma.get('b_mode'))} (16-byte chunks: 0, "
               "and b_mode 0, or 1 / 2 for an fp8 / nvfp4 b)")
    elif (p["ln"] and not p["ln"].get("fold")) or p.get("aq"):
        why = "a norm prologue not folded into the weight, or activation quantization"
    if why:
        raise _Bad(".mma.wgmma", f"= true cannot be used with {why}")


_KV_VIEW = {"bh": ATOMS, "d": ATOMS, "s": ATOMS}
_KV_SOURCES = Dict({"dtype": Dtype, "sources": List(Dict({"keys": DIM, **_KV_VIEW}), 1, MAX_SOURCES)})


def _kv_operand(v, path):
    """K or V: one view {dtype, bh, d, s}, or {dtype, sources: [{keys, bh, d, s}]} concatenated along the keys."""
    if isinstance(v, dict) and "sources" in v:
        extra = sorted(set(v) & set(_KV_VIEW))
        if extra:
            raise _Bad(f"{path}.{extra[0]}", "is given beside sources (each source has its own view)")
        out = _KV_SOURCES(v, path)
        for i, src in enumerate(out["sources"]):
            keys = math.prod(size for size, _ in src["s"])
            if keys != src["keys"]:
                raise _Bad(f"{path}.sources[{i}].s", f"covers {keys} keys, not keys = {src['keys']}")
        return out
    return Dict({"dtype": Dtype, **_KV_VIEW})(v, path)


def _attention(p: dict) -> None:
    op = {"dtype": Dtype}
    p = Dict({"BH": DIM, "T": DIM, "S": DIM, "HD": DIM, "VD": DIM,
              "q": Dict({**op, "bh": ATOMS, "t": ATOMS, "d": ATOMS}), "k": _kv_operand, "v": _kv_operand,
              "epi_inputs": List(Dict(OPERAND)), "expr": EXPR, "out_dtype": Dtype},
             {"dyn": Nullable(Dict({"causal": Bool})),
              "mma": Dict({"dtype": Enum("bfloat16", "float16")}),  # mma.dtype: the reference rounds P to it
              "oproj": Dict({"N": DIM, "b": PROJ_WEIGHT, "outs": Int(1, 2)}), "prefetch": Bool,
              "l2_next": L2_NEXT})(p, "")
    BH, T, S, HD, VD = p["BH"], p["T"], p["S"], p["HD"], p["VD"]
    for name in ("k", "v"):
        keys = [src["keys"] for src in p[name].get("sources", [])]
        if keys and sum(keys) != S:
            raise _Bad(f".{name}.sources", f"have {str(keys)[:80]} keys, adding up to {sum(keys)}, not S = {S}")
    _elements("BH, T, HD", "Q operand", BH, T, HD)
    _elements("BH, HD, S", "K operand", BH, HD, S)
    _elements("BH, S, VD", "V operand", BH, S, VD)
    _elements("BH, T, VD", "output", BH, T, VD)
    scores = _elements("BH, T, S", "score matrix", BH, T, S)
    _work("BH, T, S, HD, VD", "multiply-adds (BH x T x S x (HD + VD))", BH * T * S * (HD + VD), MAX_GEMM_WORK)
    _expr(p, len(p["epi_inputs"]), True, scores)
    if "oproj" in p:
        if "mma" in p or T != 1:
            raise _Bad(".oproj", "(a fused o-projection) needs one query (T = 1) and the SIMT kernel (no mma)")
        _proj_weight(p["oproj"]["b"], ".oproj.b")
        _elements("oproj.N, BH, VD", "o-projection weight", p["oproj"]["N"], BH, VD)


def _rotates(expr: list) -> bool:
    """Whether an expression reads an input through rotate_half (["in_rot", k])."""
    return any(ins[0] == "in_rot" for ins in expr if isinstance(ins, list) and ins)


def _eltwise(p: dict) -> None:
    p = Dict({"shape": SHAPE, "inputs": List(Dict(OPERAND)), "expr": EXPR, "out_dtype": Dtype},
             {"cache": CACHE})(p, "")
    out = _elements("shape", "output", *p["shape"])
    if _rotates(p["expr"]) and (not p["shape"] or p["shape"][-1] % 2):
        raise _Bad(".expr", f"rotates a last axis of shape {p['shape']} by half (it must be even)")
    _expr(p, len(p["inputs"]), False, out, allow_rot=True)
    _cache(p, out)


def _softmax(p: dict) -> None:
    p = Dict({"rows": DIM, "L": DIM, "inner": DIM, "in_dtype": Dtype, "out_dtype": Dtype},
             {"masked_rows_zero": Bool})(p, "")
    if p["rows"] % p["inner"]:
        raise _Bad(".rows", f"= {p['rows']} is not a multiple of inner = {p['inner']}")
    _elements("rows, L", "input", p["rows"], p["L"])


CACHE = List(Dict({"start": DIM0, "outer": DIM, "inner": DIM, "S": DIM}), min_len=1, max_len=64)
CACHE_DTYPES = ("float32", "float16", "bfloat16")


def _cache(p: dict, elements: int, path: str = "") -> None:
    """Fused cache writes (kernels/state.py, `cache` validated by CACHE): each range lies in the kernel's flat
    output, of a float type; the caches are capped like any array."""
    if p.get("cache") and p["out_dtype"] not in CACHE_DTYPES:
        raise _Bad(f"{path}.cache", f"writes KV-cache rows of out_dtype {p['out_dtype']!r} (caches are "
                                    f"{', '.join(CACHE_DTYPES)})")
    for i, c in enumerate(p.get("cache", [])):
        _elements("outer, S, inner", "cache", c["outer"], c["S"], c["inner"])
        if c["start"] + c["outer"] * c["inner"] > elements:
            raise _Bad(f"{path}.cache[{i}]", f"writes elements {c['start']}..{c['start'] + c['outer'] * c['inner']} "
                                             f"of an output of {elements}")


def _layernorm_part(p: dict, path: str) -> None:
    p = Dict({"rows": DIM, "K": DIM, "eps": Num(0.0, 1e30), "has_beta": Bool, "in_dtype": Dtype,
              "out_dtype": Dtype}, {"rms": Bool, "gamma_dtype": Dtype, "cache": CACHE,
                                    "epi": Dict({"expr": EXPR, "inputs": List(Dict(OPERAND))})})(p, path)
    n = _elements("rows, K", "input", p["rows"], p["K"])
    if "epi" in p:
        epi = p["epi"]
        if _rotates(epi["expr"]) and p["K"] % 2:
            raise _Bad(f"{path}.epi.expr", f"rotates rows of K = {p['K']} by half (K must be even)")
        try:
            _expr(epi, len(epi["inputs"]) + 1, False, n, allow_rot=True)
        except _Bad as e:
            raise _Bad(f"{path}.epi{str(e)[len('params'):]}", "") from None
    _cache(p, n, path)


def _layernorm(p: dict) -> None:
    if isinstance(p, dict) and "parts" in p:
        for i, part in enumerate(List(lambda v, path: v, min_len=1, max_len=MAX_PARTS)(p["parts"], ".parts")):
            if isinstance(part, dict) and "parts" in part:
                raise _Bad(f".parts[{i}]", "has parts of its own")
            _layernorm_part(part, f".parts[{i}]")
        return
    _layernorm_part(p, "")


def _gather(p: dict) -> None:
    p = Dict({"outer": DIM0, "D": DIM, "inner": DIM0, "J": DIM0, "data_dtype": Dtype, "index_dtype": IndexDtype,
              "out_dtype": Dtype})(p, "")
    _elements("outer, D, inner", "data view", p["outer"], p["D"], p["inner"])
    _elements("outer, J, inner", "output", p["outer"], p["J"], p["inner"])


def _concat(p: dict) -> None:
    p = Dict({"shape": List(DIM0, min_len=1, max_len=MAX_VIEW_RANK), "axis": Int(0, MAX_VIEW_RANK),
              "inputs": List(Dict({**OPERAND, "size": DIM0}), min_len=1), "out_dtype": Dtype},
             {"vec": Int(8, 8)})(p, "")
    shape, axis = p["shape"], p["axis"]
    if axis >= len(shape):
        raise _Bad(".axis", f"= {axis} is not an axis of shape {shape}")
    sizes = [x["size"] for x in p["inputs"]]
    if sum(sizes) != shape[axis]:
        raise _Bad(".inputs", f"sizes {str(sizes)[:80]} add up to {sum(sizes)}, not shape[{axis}] = {shape[axis]}")
    if p.get("vec"):
        from flashrt.kernels.concat import vector_ok

        if not vector_ok(p):
            raise _Bad(".vec", "= 8 needs a 1-D concat of contiguous 16- / 32-bit float inputs whose sizes are "
                               "multiples of 8")
    _elements("shape", "output", *shape)


def _reduce(p: dict) -> None:
    p = Dict({"outer": DIM0, "R": DIM, "op": Enum("sum", "mean", "max", "min"), "atoms": ATOMS,
              "in_dtype": Dtype, "out_dtype": Dtype})(p, "")
    _elements("outer, R", "input", p["outer"], p["R"])
    # sum and mean accumulate sequentially over R in Python: count each step as 1024 elements of work
    _work("outer, R", "element operations (R x (outer + 1024))", p["R"] * (p["outer"] + 1024),
          MAX_ELEMENTWISE_WORK)


def _state(p: dict) -> None:
    op = Dict({"op": Enum("positions", "write", "advance")}, {"T": DIM, "S": DIM, "outer": DIM, "inner": DIM,
              "dtype": Enum("float32", "float16", "bfloat16"), "pairs": List(Dict({"atoms": ATOMS}), min_len=1),
              "has_length": Bool, "count": Nullable(Int(0, MAX_DIM)),
              "out_dtype": Enum("int64", "int32", "float32", "float16", "bfloat16")})(p, "")["op"]
    need = {"positions": ("T", "out_dtype"), "write": ("T", "S", "outer", "inner", "dtype", "pairs", "has_length"),
            "advance": ("count",)}[op]
    for key in need:
        if key not in p:
            raise _Bad(f".{key}", f"is missing (a {op} kernel needs {', '.join(need)})")
    if op == "write":
        _elements("outer, S, inner", "cache", p["outer"], p["S"], p["inner"])
        _elements("outer, T, inner", "rows", p["outer"], p["T"], p["inner"])
    elif op == "positions":
        _elements("T", "output", p["T"])


CHECKS = {"gemm": _gemm_family, "gemv": _gemm, "attention": _attention, "eltwise": _eltwise, "softmax": _softmax,
          "layernorm": _layernorm, "gather": _gather, "concat": _concat, "reduce": _reduce,
          "state": _state}


def check(family: str, params) -> None:
    """Raise EngineFormatError ("params.<field> ...") unless `params` are safe to hand to the family's
    reference. A family without a check here gets only the memory module's view checks."""
    fn = CHECKS.get(family)
    if fn is None:
        return
    try:
        if not isinstance(params, dict):
            raise _Bad("", f"is a {_type(params)}, expected an object")
        fn(params)
    except _Bad as e:
        raise EngineFormatError(str(e)) from None
