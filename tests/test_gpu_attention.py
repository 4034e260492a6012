"""On an NVIDIA GPU: the attention kernels against the numpy reference, into poisoned (NaN) outputs. The SIMT
kernel on decode (cluster split over the keys, the dynamic KV length) and prefill; the tensor-core kernel on
every MMA_CASES variant (the expert and ViT shapes, odd sizes, additive and boolean masks, GQA views, element
loads for views that are not 16-byte aligned, dynamic-length causal prefill) and every cluster size; both kernels
with K and V read from several sources (SOURCE_CASES: a Concat read in place, the boundary inside a key tile,
cp.async and element loads). Stale cache rows and row pads hold NaN, so a kernel that reads a key or element it
must not see fails. Skipped without a GPU."""

import numpy as np
import pytest
from conftest import requires_gpu
from test_attention_kernels import MMA_CASES, SOURCE_CASES, attention_case, mma_case, naive, source_case

from flashrt.kernels.dtypes import STORAGE, to_f32

pytestmark = [pytest.mark.gpu, requires_gpu]


def check(p: dict, host: dict, tol: float = 1e-2) -> np.ndarray:
    from gpu_kernel import Kernel, reference

    dtype = p["out_dtype"]
    got = to_f32(Kernel("attention", p).run(host, "out").view(STORAGE[dtype]), dtype)
    want = to_f32(reference("attention", p, host, "out").view(STORAGE[dtype]), dtype)
    assert np.isfinite(got).all()  # every output written over the NaN poison, no stale key read
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= tol, err
    return got.reshape(p["BH"], p["T"], p["VD"])


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("S", [512, 513])
def test_decode_static(T, S):
    check(*attention_case(16, 8, T, S, 128, seed=T))  # Qwen3-0.6B: 16 heads over 8 KV heads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("pos", [0, 1, 37, 255, 511])
def test_decode_dynamic_length(causal, T, pos):
    S = 512
    pos = min(pos, S - T)  # pos = S - T fills the cache
    check(*attention_case(16, 8, T, S, 128, dyn={"causal": causal}, pos=pos, seed=pos))


def test_dynamic_length_with_mask_and_no_visible_key():
    check(*attention_case(16, 8, 4, 512, 128, dyn={"causal": True}, pos=100, mask=True))
    p, host = attention_case(16, 8, 2, 512, 128, dyn={"causal": True}, pos=-1)  # row 0 sees no key
    check(p, host)


@pytest.mark.parametrize("config", [(1, 8, 1), (1, 2, 8), (1, 1, 4), (1, 4, 2)])
def test_decode_any_split(config):
    check(*attention_case(16, 8, 1, 300, 128, dyn={"causal": True}, pos=250, config=config))


def test_prefill_expert_simt():  # T = 50 over an 866-key prefix + suffix, HD 256, one K/V head broadcast over 8
    check(*attention_case(8, 1, 50, 866, 256, mask=True, mma=False))


def test_prefill_vit_simt():
    check(*attention_case(12, 12, 197, 197, 64, mma=False))


@pytest.mark.parametrize("name", list(MMA_CASES))
def test_tensor_core(name):
    p, host = mma_case(name)
    got = check(p, host)
    assert np.linalg.norm(got - naive(p, host)) <= 1e-2 * np.linalg.norm(naive(p, host)) + 1e-30
    if name == "rows see no key":  # pos = -20: causal rows 0 .. 19 see no key and get zeros
        assert (got[:, :20] == 0).all() and np.abs(got[:, 20:]).max() > 0
    if name.startswith("hd256 bool"):  # row 0 of head 0 is masked everywhere: zeros
        assert (got[0, 0] == 0).all()


@pytest.mark.parametrize("cl", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["expert", "vit", "gqa causal prefill"])
def test_tensor_core_any_cluster(name, cl):
    """Every cluster size splits the key tiles (some blocks of a cluster may get none) to the same result."""
    p, host = mma_case(name)
    check({**p, "mma": {**p["mma"], "cl": cl}}, host)


@pytest.mark.parametrize("pos", [0, 1, 15, 200, 512 - 128])
def test_tensor_core_causal_prefill_positions(pos):
    """The stateful decoder's prefill entry: T = 128 queries at cache position pos (the last fills the cache)."""
    check(*attention_case(16, 8, 128, 512, 128, dyn={"causal": True}, pos=pos, seed=pos))


@pytest.mark.parametrize("name", list(SOURCE_CASES))
def test_sources(name):
    """K and V cut into sources along the keys: the reference's result, and the kernel's own result on the one-view
    layout (the same values staged and summed in the same order: equal up to rare output roundings), so a key
    read from the wrong source or row shows even where the tolerance against the reference would hide it."""
    (p, host), (p1, host1) = source_case(name)
    got, one = check(p, host), check(p1, host1)
    err = np.linalg.norm(got - one) / max(np.linalg.norm(one), 1e-30)
    assert err <= 1e-4, (err, np.abs(got - one).max())


@pytest.mark.parametrize("quant, outs, config, N", [(None, 1, (1, 4, 8), 1024), (None, 2, (1, 4, 8), 1024),
                                                    ("fp8", 2, (1, 4, 4), 1024), (None, 1, (1, 1, 4), 256),
                                                    (None, 2, (1, 2, 1), 96)])
def test_decode_with_fused_oproj(quant, outs, config, N):
    """attention `oproj`: the head outputs (never stored) times W_o, added into one or two float32 accumulators
    with atomics; rows beyond the register budget (N / CL > 32 * KW) come through L2. The cache past pos holds
    NaN, so a stale key read would poison every row."""
    from gpu_kernel import Kernel, reference

    from flashrt.aot.quantize import quantize_fp8
    from flashrt.kernels.dtypes import from_f32

    heads, HD = 16, 128
    p, host = attention_case(heads, 8, 1, 512, HD, dyn={"causal": True}, pos=300, mma=False, config=config)
    rng = np.random.default_rng(N + outs)
    w = (rng.standard_normal((N, heads * HD)) / np.sqrt(heads * HD)).astype(np.float32)
    if quant == "fp8":
        host["w_o"], host["w_o_scale"] = quantize_fp8(w)
        b = {"dtype": "fp8_e4m3", "quant": "fp8"}
    else:
        host["w_o"], b = from_f32(w, "bfloat16"), {"dtype": "bfloat16"}
    p["oproj"] = {"N": N, "b": b, "outs": outs}
    del host["out"]
    for i in range(outs):
        host[f"y{i}"] = rng.standard_normal(N).astype(np.float32)
    kernel = Kernel("attention", p)
    for i in range(outs):
        got = kernel.run(host, f"y{i}", poison=None).view(np.float32)
        want = reference("attention", p, host, f"y{i}").view(np.float32)
        moved = np.linalg.norm(want - host[f"y{i}"])
        assert np.isfinite(got).all() and moved > 0.1 * np.linalg.norm(host[f"y{i}"])
        assert np.linalg.norm(got - want) <= 1e-3 * moved, np.linalg.norm(got - want) / moved
