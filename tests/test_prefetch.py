"""The L2 weight-prefetch plan (aot/prefetch.py) and its kernel param `l2_next` (kernels/prefetch.py)."""

import numpy as np
import pytest

from flashrt.aot import prefetch as plan
from flashrt.aot.build import build_engine
from flashrt.aot.partition import KernelCall
from flashrt.aot.views import Buffer, TensorRef
from flashrt.kernels import prefetch
from flashrt.runtime import load

MB = 1 << 20


def _call(family: str, *weights: Buffer) -> KernelCall:
    x = TensorRef.contiguous_view(Buffer("x", "arena", "bfloat16", 1024), (1024,))
    return KernelCall(family, family, {}, [x] + [TensorRef.contiguous_view(w, (w.nelems,)) for w in weights], [], [])


def _layer(i: int) -> list[KernelCall]:
    qkv, o, mlp = (Buffer(f"{name}{i}", "weight", "uint8", mb * MB) for name, mb in (("qkv", 8), ("o", 4), ("mlp", 18)))
    gamma = Buffer(f"gamma{i}", "weight", "float32", 1024)  # too small to prefetch
    return [_call("gemv", qkv, gamma), _call("attention"), _call("gemv", o), _call("gemv", mlp, gamma)]


def test_window_rule():
    """Each host takes the later weights that fit the budget counted from the next launch, each weight once."""
    calls = _layer(0) + _layer(1) + [_call("eltwise")]
    plan.plan_l2_prefetch(calls, 24 * MB)
    names = [[r.buffer.name for r in c.args if r.buffer.name.startswith(("qkv", "o", "mlp"))] for c in calls]
    sizes = [c.params.get("l2_next") for c in calls]
    # QKV0 reads qkv0 and prefetches o0 + mlp0 (22 MB; + qkv1 would be 30); attention0 and o0 have nothing that
    # fits; MLP0 prefetches qkv1 + o1 (12 MB; + mlp1 would be 30); QKV1 prefetches mlp1
    assert sizes == [[4 * MB, 18 * MB], None, None, [8 * MB, 4 * MB], [18 * MB], None, None, None, None]
    assert names[0] == ["qkv0", "o0", "mlp0"] and names[3] == ["mlp0", "qkv1", "o1"] and names[4] == ["qkv1", "mlp1"]
    assert all(c.family in prefetch.FAMILIES for c, s in zip(calls, sizes) if s)
    assert "prefetches 23.1 MB of later launches' weights into L2 (o0, mlp0" in calls[0].reason  # shown by inspect


def test_loop_steps_prefetch_their_weights_again():
    """A loop's next step re-reads its weights after all the others: more than the budget streamed through L2
    since, so they are prefetched again; a weight read again soon after is not."""
    a, b, c = (Buffer(name, "weight", "uint8", 10 * MB) for name in "abc")
    calls = [_call("gemv", w) for w in (a, b, c, a, b, c)]
    plan.plan_l2_prefetch(calls, 16 * MB)
    assert [c.params.get("l2_next") for c in calls] == [[10 * MB]] * 5 + [None]
    assert [c.args[-1].buffer.name for c in calls[:5]] == ["b", "c", "a", "b", "c"]
    calls = [_call("gemv", w) for w in (a, b, a)]
    plan.plan_l2_prefetch(calls, 16 * MB)
    assert [c.params.get("l2_next") for c in calls] == [[10 * MB], None, None]  # a: 10 MB read since, resident


def test_no_budget_no_prefetch():
    calls = _layer(0)
    plan.plan_l2_prefetch(calls, 0)
    plan.plan_l2_prefetch(calls[:1], 64 * MB)  # nothing after it
    assert not any("l2_next" in c.params for c in calls)


def test_span_sizes_are_checked():
    assert prefetch.code({"l2_next": [32, 16]}).count("l2_prefetch_share") == 2
    with pytest.raises(ValueError, match="multiple of 16"):
        prefetch.code({"l2_next": [24]})


def test_engine_with_prefetch_computes_the_same(samples, tmp_path, monkeypatch):
    """An engine built with the prefetch (all three GPU targets compile it) gives the CPU reference's outputs bit
    for bit: the hint changes no result."""
    monkeypatch.setattr(plan, "MIN_BYTES", 0)  # the sample's weights are a few KB
    paths = {}
    for budget in ("0", "1"):
        monkeypatch.setenv("FLASHRT_L2_PREFETCH_MB", budget)
        paths[budget] = str(tmp_path / f"mlp_{budget}.frt")
        build_engine(str(samples / "mlp.onnx"), ["h100", "thor", "rtx5090"], paths[budget], {"x": (4, 32)}, "bf16")
    on, off = load(paths["1"], device="cpu"), load(paths["0"], device="cpu")
    hosts = [k for k in on.file.kernels if k.params.get("l2_next")]
    assert hosts and not any(k.params.get("l2_next") for k in off.file.kernels)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_array_equal(on.run({"x": x})["y"], off.run({"x": x})["y"])
