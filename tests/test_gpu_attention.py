"""On an NVIDIA GPU: the attention kernel (cluster split over the keys for decode, the dynamic KV length) on
decode and prefill shapes, against the numpy reference, into poisoned outputs. Stale cache rows hold NaN, so a
kernel that reads a key it must not see fails. Skipped without a GPU."""

import numpy as np
import pytest
from conftest import requires_gpu
from test_attention_kernels import attention_case

from flashrt.kernels.dtypes import to_f32

pytestmark = [pytest.mark.gpu, requires_gpu]


def check(p: dict, host: dict, tol: float = 1e-2) -> None:
    from gpu_kernel import Kernel, reference

    got = to_f32(Kernel("attention", p).run(host, "out").view(np.uint16), "bfloat16")
    want = to_f32(reference("attention", p, host, "out").view(np.uint16), "bfloat16")
    assert np.isfinite(got).all()  # every output written over the NaN poison, no stale key read
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= tol, err


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


def test_prefill_expert():  # T = 50 over an 866-key prefix + suffix, HD 256, one K/V head broadcast over 8
    check(*attention_case(8, 1, 50, 866, 256, mask=True))


def test_prefill_vit():
    check(*attention_case(12, 12, 197, 197, 64))
