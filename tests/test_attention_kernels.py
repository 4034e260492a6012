"""The attention kernel family on the CPU: the numpy reference (the spec) against a plain per-row softmax,
the dynamic KV length (pos, causal or not, stale cache never reaching a result), params checks, the launch
configurations, the tensor-core kernel's selection and its reference rounding of P, K and V read from several
sources (a Concat read in place: exactly the attention over their concatenation), and the CUDA sources compiling
for every target. `attention_case`, MMA_CASES and SOURCE_CASES also feed the GPU test."""

import math
import re
import shutil

import numpy as np
import pytest
from conftest import CUOBJDUMP, SAMPLES, rel_l2, requires_cuobjdump

from flashrt.errors import EngineFormatError
from flashrt.kernels import attention, gemm_mma, params
from flashrt.kernels.dtypes import from_f32, to_f32
from flashrt.kernels.memory import Pointer
from flashrt.kernels.source import atoms_code

SCALE = 0.125


def attention_case(heads: int, kv_heads: int, T: int, S: int, HD: int, dyn=None, pos: int = 0, mask=False,
                   dtype: str = "bfloat16", seed: int = 0, config=None, mma: bool = True,
                   layout: str = "rows", VD: int | None = None) -> tuple[dict, dict]:
    """(params, host byte arrays) of a decoder-style attention: Q [T, heads, HD], K and V caches [S, kv_heads, HD]
    read as per-head (GQA broadcast) views, scores scaled, output [heads, T, HD] (V's head dim VD if given).
    mask: True or "add" adds a [T, S] float mask (broadcast over heads); "bool" keeps the scores where a
      [heads, T, S] boolean mask is set and puts -inf elsewhere (row 0 of head 0 fully masked).
    layout: "rows" as above; "padded": every row of Q, K, V one element longer than HD, the pad NaN (views no
      longer 16-byte aligned along the head dim: element loads); "kt": K stored transposed, [kv_heads, HD, S].
    With dyn, cache rows no query sees hold NaN (stale data the kernel must never read).
    mma: the tensor-core kernel where it applies (attention.mma_config), else the SIMT kernel with `config`
    (TQ, KW, CL) or attention.choose_config's."""
    rng = np.random.default_rng(seed)
    ratio, pad, VD = heads // kv_heads, int(layout == "padded"), VD or HD
    row, vrow = HD + pad, VD + pad
    p = {"BH": heads, "T": T, "S": S, "HD": HD, "VD": VD,
         "q": {"dtype": dtype, "bh": [[heads, row]], "t": [[T, heads * row]], "d": [[HD, 1]]},
         "k": {"dtype": dtype, "bh": [[kv_heads, row], [ratio, 0]], "d": [[HD, 1]], "s": [[S, kv_heads * row]]},
         "v": {"dtype": dtype, "bh": [[kv_heads, vrow], [ratio, 0]], "s": [[S, kv_heads * vrow]], "d": [[VD, 1]]},
         "epi_inputs": [], "expr": [["acc"], ["const", SCALE], ["mul", 0, 1]], "out_dtype": dtype}
    if layout == "kt":
        p["k"] = {"dtype": dtype, "bh": [[kv_heads, HD * S], [ratio, 0]], "d": [[HD, S]], "s": [[S, 1]]}
    q = np.full((T, heads, row), np.nan, np.float32)
    k = np.full((S, kv_heads, row), np.nan, np.float32)
    v = np.full((S, kv_heads, vrow), np.nan, np.float32)
    q[..., :HD] = rng.standard_normal((T, heads, HD))
    k[..., :HD] = rng.standard_normal((S, kv_heads, HD)) * 2
    v[..., :VD] = rng.standard_normal((S, kv_heads, VD))
    host = {}
    if dyn is not None:
        p["dyn"] = dyn
        host["pos"] = np.array([pos], np.int32)
        k[max(pos + T, 0):] = np.nan
        v[max(pos + T, 0):] = np.nan
    if layout == "kt":
        k = np.ascontiguousarray(k.transpose(1, 2, 0))
    host.update({"q": from_f32(q, dtype), "k": from_f32(k, dtype), "v": from_f32(v, dtype),
                 "out": np.zeros(heads * T * VD, from_f32(np.zeros(1, np.float32), dtype).dtype)})
    if mask in (True, "add"):
        p["epi_inputs"] = [{"dtype": "float32", "atoms": [[heads, 0], [T, S], [S, 1]]}]
        p["expr"] = [["acc"], ["const", SCALE], ["mul", 0, 1], ["in", 0], ["add", 2, 3]]
        host["e0"] = np.where(rng.random((T, S)) < 0.2, -1e4, rng.standard_normal((T, S))).astype(np.float32)
    elif mask == "bool":
        p["epi_inputs"] = [{"dtype": "bool", "atoms": [[heads, T * S], [T, S], [S, 1]]}]
        p["expr"] = [["acc"], ["const", SCALE], ["mul", 0, 1], ["in", 0], ["const", float("-inf")],
                     ["where", 3, 2, 4]]
        keep = rng.random((heads, T, S)) < 0.7
        keep[0, 0] = False
        host["e0"] = keep
    c = attention.mma_config(p) if mma else None
    if c:
        p["mma"] = c
    else:
        tq, kw, cl = config or attention.choose_config(T, S, heads)
        p.update({"TQ": tq, "KW": kw, "CL": cl, "k_aligned": True})
    return p, host


def run_reference(p: dict, host: dict) -> np.ndarray:
    args = {}
    for name, _ in attention.arg_spec(p):
        data = np.array(np.ascontiguousarray(host[name]).view(np.uint8).ravel())
        args[name] = Pointer(data, 0, data.size, name)
    attention.reference(p, args)
    return to_f32(args["out"].buffer.view(host["out"].dtype), p["out_dtype"]).reshape(p["BH"], p["T"], p["VD"])


def naive(p: dict, host: dict) -> np.ndarray:
    """Row by row in float64: softmax over exactly the keys the row sees (any attention_case layout and mask)."""
    heads, T, S, HD, VD = p["BH"], p["T"], p["S"], p["HD"], p["VD"]
    kv_heads = p["k"]["bh"][0][0]
    q, k, v = (to_f32(host[n], p["q"]["dtype"]).astype(np.float64) for n in ("q", "k", "v"))
    if p["k"]["s"] == [[S, 1]]:  # layout "kt"
        k = k.reshape(kv_heads, HD, S).transpose(2, 0, 1)
    q, k, v = q[..., :HD], k[..., :HD], v[..., :VD]
    out = np.zeros((heads, T, VD))
    for h in range(heads):
        kh = h // (heads // kv_heads)
        for t in range(T):
            n = S
            if p.get("dyn"):
                pos = int(host["pos"][0])
                n = min(S, max(0, pos + t + 1 if p["dyn"]["causal"] else pos + T))
            s = k[:n, kh] @ q[t, h] * SCALE
            if p["epi_inputs"] and p["epi_inputs"][0]["dtype"] == "bool":
                s = np.where(host["e0"][h, t, :n], s, -np.inf)
            elif p["epi_inputs"]:
                s = s + host["e0"][t, :n]
            if n == 0 or np.isneginf(s).all():
                continue
            w = np.exp(s - s.max())
            out[h, t] = (w / w.sum()) @ v[:n, kh]
    return out


def close(got: np.ndarray, want: np.ndarray, tol: float = 1e-2) -> None:
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= tol, err


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pos", [0, 3, 29])
def test_dynamic_length_reference(causal, pos):
    T, S = 3, 32
    p, host = attention_case(4, 2, T, S, 16, dyn={"causal": causal}, pos=pos, mask=True, dtype="bfloat16")
    got = run_reference(p, host)
    close(got, naive(p, host))
    if pos + T < S:  # stale keys hold NaN: not one reaches a result
        assert np.isnan(to_f32(host["k"], "bfloat16")[pos + T:]).all()


def test_dynamic_length_follows_pos_not_capacity():
    p, host = attention_case(2, 1, 1, 16, 8, dyn={"causal": True}, pos=4, dtype="float32")
    host["k"][5:] = 0  # keys beyond pos + t hold other data: the result must not change
    host["v"][5:] = 100
    a = run_reference(p, host)
    host["pos"][0] = 5  # one more key visible: now v = 100 enters
    b = run_reference(p, host)
    close(a, naive({**p}, {**host, "pos": np.array([4], np.int32)}), 1e-5)
    assert np.abs(b).max() > 1 and np.abs(a).max() < 10


def test_rows_that_see_no_key_get_zeros():
    p, host = attention_case(2, 2, 4, 8, 8, dyn={"causal": True}, pos=-2, dtype="float32")
    got = run_reference(p, host)
    assert (got[:, :2] == 0).all()  # rows 0 and 1 see j <= -1 and j <= 0 - 1
    assert np.abs(got[:, 2:]).max() > 0
    close(got, naive(p, host), 1e-5)


def test_static_reference_matches_naive():
    p, host = attention_case(4, 4, 5, 40, 16, mask=True, dtype="float32")
    close(run_reference(p, host), naive(p, host), 1e-5)


def test_pos_argument_follows_v():
    p, _ = attention_case(2, 1, 1, 16, 8, dyn={"causal": False})
    assert [n for n, _ in attention.arg_spec(p)] == ["q", "k", "v", "pos", "out"]
    p, _ = attention_case(2, 1, 1, 16, 8, mask=True)
    assert [n for n, _ in attention.arg_spec(p)] == ["q", "k", "v", "e0", "out"]


@pytest.mark.parametrize("bad, message", [("yes", "params.dyn"), ({"causal": 1}, "params.dyn.causal"),
                                          ({}, "params.dyn.causal")])
def test_params_reject_bad_dyn(bad, message):
    p, _ = attention_case(2, 1, 1, 16, 8)
    params.check("attention", {**p, "dyn": None})
    params.check("attention", {**p, "dyn": {"causal": True}})
    with pytest.raises(EngineFormatError, match=message.replace(".", r"\.")):
        params.check("attention", {**p, "dyn": bad})


@pytest.mark.parametrize("T, S, heads", [(1, 512, 16), (1, 513, 16), (4, 512, 16), (8, 4096, 32), (1, 64, 16),
                                          (50, 866, 8), (197, 197, 12)])
def test_config_fills_the_gpu_and_keeps_warps_busy(T, S, heads):
    tq, kw, cl = attention.choose_config(T, S, heads)
    assert tq * kw <= 8 and cl in (1, 2, 4, 8)
    blocks = math.ceil(T / tq) * cl * heads
    # clusters grow until one of these holds
    assert cl == 8 or blocks >= attention.SMS or S < 2 * cl * attention.MIN_KEYS_PER_WARP
    if cl > 1 or kw > 1:
        assert S / (cl * kw) >= attention.MIN_KEYS_PER_WARP
    if T == 1 and S >= 512:
        assert blocks >= 128


# ---------------------------------------------------------------------------------- the tensor-core kernel

# name: attention_case arguments covering the tensor-core kernel's variants (register plans, staging modes,
# clusters, masks, the dynamic length); compiled for every target here, run on the GPU by test_gpu_attention
MMA_CASES = {
    "expert": ((8, 1, 50, 866, 256), {"mask": True}),  # Q from shared memory, 32-key tiles, cluster of 8
    "vit": ((12, 12, 197, 197, 64), {}),  # Q in registers, 64-key tiles, cluster of 2
    "gqa causal prefill": ((16, 8, 100, 512, 128), {"dyn": {"causal": True}, "pos": 37}),
    "rows see no key": ((4, 2, 32, 128, 64), {"dyn": {"causal": True}, "pos": -20}),
    "dyn not causal": ((4, 2, 24, 256, 64), {"dyn": {"causal": False}, "pos": 100}),
    "hd256 bool mask causal": ((8, 1, 64, 900, 256), {"mask": "bool", "dyn": {"causal": True}, "pos": 500}),
    "f16 bool mask": ((4, 2, 40, 100, 128), {"dtype": "float16", "mask": "bool"}),
    "odd sizes hd80": ((3, 1, 45, 301, 80), {"mask": True}),
    "hd16": ((4, 4, 17, 17, 16), {}),
    "padded rows": ((4, 2, 33, 70, 64), {"layout": "padded", "mask": True}),  # element loads for Q, K, V
    "padded rows hd256": ((4, 1, 33, 70, 256), {"layout": "padded"}),
    "K transposed": ((4, 2, 33, 70, 128), {"layout": "kt"}),  # element loads for K only
    "hd64 vd256": ((4, 2, 40, 300, 64), {"VD": 256}),  # Q from shared memory for the O registers' sake
    "hd256 vd64": ((4, 2, 40, 300, 256), {"VD": 64}),  # Q in registers, 32-key tiles
}


def mma_case(name: str) -> tuple[dict, dict]:
    args, kwargs = MMA_CASES[name]
    p, host = attention_case(*args, **kwargs)
    assert "mma" in p, name
    return p, host


def split_case(p: dict, host: dict, cuts: list[int], padded: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """An attention_case (layout "rows" or "padded") with K and V cut along the keys at `cuts` into sources, each
    in a buffer of its own (k, k1, ...; v, v1, ...), as the partitioner reads a Concat in place. The sources
    numbered in `padded` keep rows one element longer than the head dim (a NaN pad, so not 16-byte aligned:
    element loads). The same attention as the uncut case's."""
    S, HD, VD, dtype = p["S"], p["HD"], p["VD"], p["k"]["dtype"]
    (kvh, krow), (vrow, ratio) = p["k"]["bh"][0], (p["v"]["bh"][0][1], p["k"]["bh"][1][0])
    assert p["k"]["s"] == [[S, kvh * krow]], "layout rows or padded"
    k = to_f32(host["k"], dtype).reshape(S, kvh, krow)[..., :HD]
    v = to_f32(host["v"], dtype).reshape(S, kvh, vrow)[..., :VD]
    bounds, out = [0, *cuts, S], {n: a for n, a in host.items() if n not in ("k", "v")}
    sources: dict[str, list] = {"k": [], "v": []}
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        for name, data, width in (("k", k, HD), ("v", v, VD)):
            row = width + int(i in padded)
            buf = np.full((b - a, kvh, row), np.nan, np.float32)
            buf[..., :width] = data[a:b]
            out[name if i == 0 else f"{name}{i}"] = from_f32(buf, dtype)
            sources[name].append({"keys": b - a, "bh": [[kvh, row], [ratio, 0]], "d": [[width, 1]],
                                  "s": [[b - a, kvh * row]]})
    cut = {**p, "k": {"dtype": dtype, "sources": sources["k"]}, "v": {"dtype": dtype, "sources": sources["v"]}}
    if "mma" in p:
        c = attention.mma_config(cut)
        cut["mma"] = {**p["mma"], "k_chunks": c["k_chunks"], "v_chunks": c["v_chunks"]}
    return cut, out


# name: (attention_case arguments, cuts, padded sources): K and V from several sources (a Concat read in place),
# with the boundary inside a key tile; compiled for every target here, run on the GPU by test_gpu_attention
SOURCE_CASES = {
    "expert mma": ((8, 1, 50, 866, 256), {"mask": True}, [816], ()),  # 816 keys of prefix + 50 own, 32-key tiles
    "expert mma element loads": ((8, 1, 50, 866, 256), {"mask": True}, [816], (1,)),
    "vit mma 3 sources": ((12, 12, 197, 197, 64), {}, [100, 150], ()),
    "gqa causal prefill mma element loads": ((16, 8, 100, 512, 128), {"dyn": {"causal": True}, "pos": 37}, [200],
                                             (0,)),
    "expert simt": ((8, 1, 50, 866, 256), {"mask": True, "mma": False}, [816], ()),
    "expert simt element loads": ((8, 1, 50, 866, 256), {"mask": True, "mma": False}, [816], (0,)),
    "decode simt cluster": ((16, 8, 1, 513, 128), {}, [500], ()),
    "decode simt dyn 3 sources": ((16, 8, 4, 512, 128), {"dyn": {"causal": True}, "pos": 300}, [256, 290], ()),
    "f32 simt": ((4, 1, 20, 57, 32), {"dtype": "float32"}, [37], ()),
}


def source_case(name: str) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """((params, host) with the sources, (params, host) of the same attention in one view)."""
    args, kwargs, cuts, padded = SOURCE_CASES[name]
    p, host = attention_case(*args, **kwargs)
    return split_case(p, host, cuts, padded), (p, host)


@pytest.mark.parametrize("name", list(SOURCE_CASES))
def test_sources_reference_equals_one_view(name):
    """K and V from several sources give exactly the attention over their concatenation."""
    (p, host), (p1, host1) = source_case(name)
    params.check("attention", p)
    assert ("mma" in p) == ("mma" in p1)
    np.testing.assert_array_equal(run_reference(p, host), run_reference(p1, host1))


def test_sources_arguments_and_staging():
    (p, _), _ = source_case("vit mma 3 sources")
    assert [n for n, _ in attention.arg_spec(p)] == ["q", "k", "k1", "k2", "v", "v1", "v2", "out"]
    assert p["mma"]["k_chunks"] and p["mma"]["v_chunks"]
    (p, _), _ = source_case("decode simt dyn 3 sources")
    assert [n for n, _ in attention.arg_spec(p)] == ["q", "k", "k1", "k2", "v", "v1", "v2", "pos", "out"]
    (p, _), _ = source_case("expert mma element loads")  # one source not 16-byte aligned: element loads for all
    assert not p["mma"]["k_chunks"] and not p["mma"]["v_chunks"] and p["mma"]["q_chunks"]
    (p, _), _ = source_case("expert mma")
    assert attention.mma_config(p, (0, [0, 8], [0, 8]))["k_chunks"]
    c = attention.mma_config(p, (0, [0, 4], 0))  # source 1 of K starts 8 bytes into a 16-byte chunk
    assert not c["k_chunks"] and c["v_chunks"]


def test_params_check_sources():
    (p, _), _ = source_case("expert mma")
    k = p["k"]

    def bad(k_operand: dict, message: str) -> None:
        with pytest.raises(EngineFormatError, match=message):
            params.check("attention", {**p, "k": k_operand})

    params.check("attention", p)
    bad({**k, "sources": [{**k["sources"][0], "keys": 815}, k["sources"][1]]}, r"params\.k\.sources\[0\]\.s covers 816")
    bad({**k, "sources": k["sources"][:1]}, r"params\.k\.sources have \[816\] keys, adding up to 816, not S = 866")
    bad({**k, "bh": [[8, 0]]}, r"params\.k\.bh is given beside sources")
    bad({**k, "sources": []}, r"params\.k\.sources has 0 entries")
    bad({**k, "sources": [{**k["sources"][0], "keys": 0}]}, r"params\.k\.sources\[0\]\.keys = 0")
    many = [{**k["sources"][1], "keys": 1, "s": [[1, 0]]}] * (attention.MAX_SOURCES + 1)
    bad({**k, "sources": many}, r"params\.k\.sources has 9 entries")
    bad({"dtype": "bfloat16", "sources": "x"}, r"params\.k\.sources")


@pytest.mark.parametrize("name", list(MMA_CASES))
def test_mma_reference_matches_naive(name):
    """With "mma" the reference rounds P to the operand type: still within the family's tolerance of the exact
    float64 softmax, for every layout, mask and dynamic length the GPU test runs."""
    p, host = mma_case(name)
    close(run_reference(p, host), naive(p, host))


def test_mma_reference_rounds_p():
    """out = round(e) V / sum(round(e)) with e = exp(s - max) and round() to the operand type: a P.V whose
    weights are the 16-bit values the tensor cores multiply, normalized by their own sum."""
    p, host = attention_case(2, 2, 16, 40, 16, dtype="float16")
    assert p["mma"]["dtype"] == "float16"
    q, k, v = (to_f32(host[n], "float16").astype(np.float64) for n in ("q", "k", "v"))
    s = np.einsum("thd,shd->hts", q, k) * SCALE
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    rounded = e.astype(np.float16).astype(np.float64)
    want = np.einsum("hts,shd->htd", rounded, v) / rounded.sum(axis=-1, keepdims=True)
    plain = np.einsum("hts,shd->htd", e, v) / e.sum(axis=-1, keepdims=True)
    host["out"] = np.zeros(host["out"].size, np.float32)
    got = run_reference({**p, "out_dtype": "float32"}, host)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert np.abs(got - plain).max() > 1e-4  # the rounding is visible, so the test tells the two apart


def test_mma_config_selects_prefill_shapes():
    cases = {name: mma_case(name)[0]["mma"] for name in ("expert", "vit", "hd64 vd256", "hd256 vd64")}
    assert cases["expert"] == {"dtype": "bfloat16", "warps": 4, "bk": 32, "cl": 8, "q_regs": False,
                               "q_chunks": True, "k_chunks": True, "v_chunks": True}
    assert (cases["vit"]["bk"], cases["vit"]["cl"], cases["vit"]["q_regs"]) == (64, 2, True)
    assert not cases["hd64 vd256"]["q_regs"] and cases["hd256 vd64"]["q_regs"]
    # the SIMT kernel keeps decode, float32, mixed operand types and head dims that are not multiples of 16
    assert "mma" not in attention_case(16, 8, 8, 512, 128)[0]
    assert "mma" in attention_case(16, 8, 16, 512, 128)[0]
    assert "mma" not in attention_case(4, 2, 50, 100, 64, dtype="float32")[0]
    assert "mma" not in attention_case(4, 2, 50, 100, 24)[0]
    assert "mma" not in attention_case(4, 2, 50, 100, 320)[0]
    p, _ = attention_case(4, 2, 50, 100, 64, mma=False)
    assert attention.mma_config({**p, "v": {**p["v"], "dtype": "float32"}}) is None


def test_mma_staging_follows_views_and_offsets():
    c = mma_case("padded rows")[0]["mma"]
    assert not (c["q_chunks"] or c["k_chunks"] or c["v_chunks"])
    c = mma_case("K transposed")[0]["mma"]
    assert c["q_chunks"] and not c["k_chunks"] and c["v_chunks"]
    p, _ = attention_case(4, 2, 50, 100, 64, mma=False)
    c = attention.mma_config(p, (0, 4, 8))  # K's view starts 8 bytes into a 16-byte chunk
    assert c["q_chunks"] and not c["k_chunks"] and c["v_chunks"]


@pytest.mark.parametrize("atoms", [[[866, 256]], [[2, 64], [4, 0]], [[1, 5], [3, 10], [4, 1]], [[7, 3], [5, 40]]])
def test_in_range_offsets_drop_only_the_outer_modulo(atoms):
    """The tensor-core kernel's Q / K / V offsets: for an index inside the view, atoms_code(in_range=True)
    gives the offset of the default form with fewer 64-bit modulos (none at all for a single atom)."""
    def c_eval(code: str, i: int) -> int:  # the generated C over non-negative integers, in Python
        return eval(re.sub(r"(\d+)L", r"\1", code).replace("(long)", "").replace("/", "//"), {}, {"i": i})

    fast, full = atoms_code("(long)i", atoms, in_range=True), atoms_code("(long)i", atoms)
    assert [c_eval(fast, i) for i in range(math.prod(a[0] for a in atoms))] == \
        [c_eval(full, i) for i in range(math.prod(a[0] for a in atoms))]
    assert fast.count("%") == full.count("%") - 1
    if len(atoms) == 1:
        assert "%" not in fast


@pytest.mark.parametrize("name", list(MMA_CASES))
def test_mma_launch_config(name):
    p, _ = mma_case(name)
    c = p["mma"]
    (gx, gy, gz), block, smem = attention.launch_config(p)
    assert block == (32 * c["warps"], 1, 1) and 1 <= c["warps"] <= attention.MMA_MAX_WARPS
    assert gx == math.ceil(p["T"] / (16 * c["warps"])) * c["cl"] and gy == p["BH"] and gz == 1
    assert c["cl"] in (1, 2, 4, 8) and gx % c["cl"] == 0
    assert smem == attention.mma_smem_bytes(p) <= gemm_mma.SMEM_CAP  # below every target's opt-in limit
    if c["cl"] > 1:  # the cluster grew only while the grid was short of the GPU and every block had 2 tiles
        assert gx // c["cl"] * gy * c["cl"] // 2 < attention.SMS and math.ceil(p["S"] / c["bk"]) >= 2 * c["cl"]


def test_params_check_accepts_mma_and_rejects_a_bad_dtype():
    p, _ = mma_case("vit")
    params.check("attention", p)
    with pytest.raises(EngineFormatError, match=r"params\.mma\.dtype"):
        params.check("attention", {**p, "mma": {**p["mma"], "dtype": "float32"}})
    with pytest.raises(EngineFormatError, match=r"params\.mma"):
        params.check("attention", {**p, "mma": "yes"})


def test_bf16_engine_uses_the_tensor_core_attention(tmp_path):
    """The tiny encoder's attention (16 tokens, head dim 16): the tensor-core kernel in bf16 and fp16 engines,
    the SIMT kernel at fp32; the bf16 engine's outputs stay close to the fp32 engine's on the CPU executor."""
    import flashrt
    from flashrt.aot.build import build_engine
    from flashrt.engine_format.reader import read_engine

    def attention_params(precision: str) -> tuple[str, list[dict]]:
        path = str(tmp_path / f"enc_{precision}.frt")
        build_engine(str(SAMPLES / "tiny_encoder.onnx"), ["h100"], path, None, precision)
        return path, [k["params"] for k in read_engine(path).manifest["kernels"] if k["family"] == "attention"]

    bf16, found = attention_params("bf16")
    assert found and all(p["mma"]["dtype"] == "bfloat16" for p in found)
    assert all(p["mma"]["dtype"] == "float16" for p in attention_params("fp16")[1])
    fp32, found = attention_params("fp32")
    assert found and not any("mma" in p for p in found)
    a, b = flashrt.load(bf16, device="cpu"), flashrt.load(fp32, device="cpu")
    feeds = b.example_inputs(0)
    got, want = a.run(feeds), b.run(feeds)
    for name in want:
        assert rel_l2(got[name], want[name]) < 2e-2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a", "sm_110a", "sm_120a"])
def test_compiles_for_every_target_without_spills(arch):
    """Both kernels: the SIMT one on decode (a cluster of 8) and prefill, the tensor-core one on every
    MMA_CASES variant, both on every SOURCE_CASES variant; no spills, and the tensor-core kernel's shared memory
    all dynamic (its launch size)."""
    from flashrt.aot.codegen import build_cubins, kernel_source

    simt = [attention_case(16, 8, 1, 512, 128, dyn={"causal": True})[0],
            attention_case(8, 1, 50, 866, 256, mask=True, mma=False)[0]]
    cases = simt + [mma_case(name)[0] for name in MMA_CASES] + [source_case(name)[0][0] for name in SOURCE_CASES]
    sources = [kernel_source("attention", p) for p in cases]
    _, resources, _ = build_cubins(sources, [arch])
    for s, p in zip(sources, cases):
        r = resources[arch][s.symbol]
        assert r.get("spill_bytes", 0) == 0 and 0 < r["registers"] <= 255, (p.get("mma"), r)
        if "mma" in p:
            assert r["shared_bytes"] == 0, r


@requires_cuobjdump
def test_tensor_core_kernel_sass():
    """The machine code does what the design says: HMMA for both products, ldmatrix (transposed for V),
    16-byte cp.async where the views allow it and none where every operand needs element loads."""
    import subprocess

    from flashrt.aot.codegen import compile_kernel, find_toolchain, kernel_source

    def sass(p: dict) -> str:
        path, _, _ = compile_kernel(find_toolchain(), kernel_source("attention", p), "sm_90a")
        return subprocess.run([CUOBJDUMP, "-sass", str(path)], capture_output=True, text=True, check=True).stdout

    p = mma_case("expert")[0]
    code = sass(p)
    bk = p["mma"]["bk"]  # the key loop's body holds one tile's mma: HD / 16 x BK / 8 for S, BK / 16 x VD / 8 for O
    assert code.count("HMMA.16816.F32.BF16") == p["HD"] // 16 * bk // 8 + bk // 16 * p["VD"] // 8
    assert "LDSM.16.M88.4" in code and "LDSM.16.MT88.4" in code
    assert "LDGSTS.E.BYPASS.128" in code
    code = sass(mma_case("padded rows")[0])
    assert "HMMA.16816.F32.BF16" in code and "LDGSTS" not in code
    # K and V from two sources: the key rows of a tile still copied by cp.async, or all by element
    assert "LDGSTS.E.BYPASS.128" in sass(source_case("expert mma")[0][0])
    assert "LDGSTS" not in sass(split_case(*mma_case("padded rows"), [30], (0, 1))[0])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])
def test_pre_hopper_targets_compile_without_spills(arch):
    """Before sm_90 (no clusters; nvcc spills the Hopper register plans) the tensor-core kernel keeps head dims
    <= 128 and re-reads Q from shared memory; the larger variants fall back to the SIMT kernel."""
    from flashrt.aot.codegen import build_cubins, kernel_source

    cases = []
    for name in MMA_CASES:
        p = mma_case(name)[0]
        c = attention.mma_config(p, hopper=False)
        assert (c is None) == (max(p["HD"], p["VD"]) > 128), name
        if c:
            assert c["cl"] == 1 and not c["q_regs"]
            cases.append({**p, "mma": c})
    sources = [kernel_source("attention", p) for p in cases]
    _, resources, _ = build_cubins(sources, [arch])
    for s, p in zip(sources, cases):
        r = resources[arch][s.symbol]
        assert r.get("spill_bytes", 0) == 0, (p["mma"], r)
