"""The attention kernel family on the CPU: the numpy reference (the spec) against a plain per-row softmax,
the dynamic KV length (pos, causal or not, stale cache never reaching a result), params checks, the launch
configuration, and the CUDA source compiling for every target. `attention_case` also feeds the GPU test."""

import math

import numpy as np
import pytest

from flashrt.errors import EngineFormatError
from flashrt.kernels import attention, params
from flashrt.kernels.dtypes import from_f32, to_f32
from flashrt.kernels.memory import Pointer

SCALE = 0.125
NAN_BF16 = np.uint16(0x7FC0)


def attention_case(heads: int, kv_heads: int, T: int, S: int, HD: int, dyn=None, pos: int = 0, mask: bool = False,
                   dtype: str = "bfloat16", seed: int = 0, config=None) -> tuple[dict, dict]:
    """(params, host byte arrays) of a decoder-style attention: Q [T, heads, HD], K and V caches [S, kv_heads, HD]
    read as per-head (GQA broadcast) views, scores scaled (and with an additive [T, S] mask), output
    [heads, T, HD]. With dyn, cache rows no query sees hold NaN (stale data the kernel must never read)."""
    rng = np.random.default_rng(seed)
    ratio = heads // kv_heads
    tq, kw, cl = config or attention.choose_config(T, S, heads)
    p = {"BH": heads, "T": T, "S": S, "HD": HD, "VD": HD, "TQ": tq, "KW": kw, "CL": cl,
         "q": {"dtype": dtype, "bh": [[heads, HD]], "t": [[T, heads * HD]], "d": [[HD, 1]]},
         "k": {"dtype": dtype, "bh": [[kv_heads, HD], [ratio, 0]], "d": [[HD, 1]], "s": [[S, kv_heads * HD]]},
         "v": {"dtype": dtype, "bh": [[kv_heads, HD], [ratio, 0]], "s": [[S, kv_heads * HD]], "d": [[HD, 1]]},
         "epi_inputs": [], "expr": [["acc"], ["const", SCALE], ["mul", 0, 1]], "out_dtype": dtype,
         "k_aligned": True}
    q = rng.standard_normal((T, heads, HD)).astype(np.float32)
    k = (rng.standard_normal((S, kv_heads, HD)) * 2).astype(np.float32)
    v = rng.standard_normal((S, kv_heads, HD)).astype(np.float32)
    host = {"q": from_f32(q, dtype), "k": from_f32(k, dtype), "v": from_f32(v, dtype),
            "out": np.zeros(heads * T * HD, from_f32(np.zeros(1, np.float32), dtype).dtype)}
    if dyn is not None:
        p["dyn"] = dyn
        host["pos"] = np.array([pos], np.int32)
        if dtype == "bfloat16":
            host["k"][max(pos + T, 0):] = NAN_BF16
            host["v"][max(pos + T, 0):] = NAN_BF16
    if mask:
        p["epi_inputs"] = [{"dtype": "float32", "atoms": [[heads, 0], [T, S], [S, 1]]}]
        p["expr"] = [["acc"], ["const", SCALE], ["mul", 0, 1], ["in", 0], ["add", 2, 3]]
        host["e0"] = np.where(rng.random((T, S)) < 0.2, -1e4, rng.standard_normal((T, S))).astype(np.float32)
    return p, host


def run_reference(p: dict, host: dict) -> np.ndarray:
    args = {}
    for name, _ in attention.arg_spec(p):
        data = np.array(np.ascontiguousarray(host[name]).view(np.uint8).ravel())
        args[name] = Pointer(data, 0, data.size, name)
    attention.reference(p, args)
    return to_f32(args["out"].buffer.view(host["out"].dtype), p["out_dtype"]).reshape(p["BH"], p["T"], p["VD"])


def naive(p: dict, host: dict) -> np.ndarray:
    """Row by row in float64: softmax over exactly the keys the row sees."""
    heads, T, HD = p["BH"], p["T"], p["HD"]
    kv_heads = p["k"]["bh"][0][0]
    q, k, v = (to_f32(host[n], p["q"]["dtype"]).astype(np.float64) for n in ("q", "k", "v"))
    out = np.zeros((heads, T, HD))
    for h in range(heads):
        kh = h // (heads // kv_heads)
        for t in range(T):
            n = p["S"]
            if p.get("dyn"):
                pos = int(host["pos"][0])
                n = min(p["S"], max(0, pos + t + 1 if p["dyn"]["causal"] else pos + T))
            if n == 0:
                continue
            s = k[:n, kh] @ q[t, h] * SCALE
            if p["epi_inputs"]:
                s = s + host["e0"][t, :n]
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


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a", "sm_110a", "sm_120a"])
def test_compiles_for_every_target_without_spills(arch):
    from flashrt.aot.codegen import compile_kernel, find_toolchain, kernel_source

    tc = find_toolchain()
    for p, _ in (attention_case(16, 8, 1, 512, 128, dyn={"causal": True}),  # decode: a cluster of 8
                 attention_case(8, 1, 50, 866, 256, mask=True)):  # prefill with a mask, K/V one head broadcast
        _, res, _ = compile_kernel(tc, kernel_source("attention", p), arch)
        assert res["registers"] > 0 and res.get("spill_bytes", 0) == 0, res
