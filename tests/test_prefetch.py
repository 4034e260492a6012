"""The L2 weight-prefetch plan (aot/prefetch.py) and its kernel param `l2_next` (kernels/prefetch.py)."""

import numpy as np
import pytest

from flashrt.aot import prefetch as plan
from flashrt.aot.build import build_engine
from flashrt.aot.partition import KernelCall
from flashrt.aot.targets import l2_prefetch_budget, l2_prefetch_hosts
from flashrt.aot.views import Buffer, TensorRef
from flashrt.errors import BuildError, EngineFormatError
from flashrt.kernels import prefetch
from flashrt.kernels.params import check as check_params
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


def test_hosts_can_be_restricted(monkeypatch):
    """Attention alone as host (FLASHRT_L2_PREFETCH_HOSTS=attention): it takes what the QKV GEMV would have."""
    calls = _layer(0) + _layer(1)
    monkeypatch.setenv("FLASHRT_L2_PREFETCH_HOSTS", "attention")
    plan.plan_l2_prefetch(calls, 24 * MB, l2_prefetch_hosts())
    assert [c.params.get("l2_next") for c in calls] == [None, [4 * MB, 18 * MB], None, None,
                                                         None, [4 * MB, 18 * MB], None, None]
    monkeypatch.setenv("FLASHRT_L2_PREFETCH_HOSTS", "attention,softmax")
    with pytest.raises(BuildError, match="FLASHRT_L2_PREFETCH_HOSTS"):
        l2_prefetch_hosts()


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


def test_engine_with_prefetch(samples, tmp_path, monkeypatch):
    """An engine built with the prefetch: all three GPU targets compile it, the loaders accept its extra arguments
    (the CPU reference ignores them: the same outputs), and each region still names the value it writes."""
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
    outputs = [[r["output"] for r in e.manifest["regions"]] for e in (on, off)]
    assert outputs[0] == outputs[1]


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLASHRT_L2_PREFETCH_MB", "auto")
    assert l2_prefetch_budget(["sm_90a"]) == 25 * MB and l2_prefetch_budget(["sm_90a", "sm_110a"]) == 16 * MB
    assert l2_prefetch_budget(["sm_89"]) == 0  # no bulk L2 prefetch before sm_90
    monkeypatch.setenv("FLASHRT_L2_PREFETCH_MB", "4096")
    assert l2_prefetch_budget(["sm_120a"]) == 32 * MB  # at most the smallest target's L2
    for bad in ("1.5", "-1", "lots"):
        monkeypatch.setenv("FLASHRT_L2_PREFETCH_MB", bad)
        with pytest.raises(BuildError, match="FLASHRT_L2_PREFETCH_MB"):
            l2_prefetch_budget(["sm_90a"])


def test_bad_spans_are_rejected_at_load(samples, tmp_path, monkeypatch):
    """A damaged engine: a span that is not a multiple of 16, or larger than its argument's relocation."""
    monkeypatch.setattr(plan, "MIN_BYTES", 0)
    monkeypatch.setenv("FLASHRT_L2_PREFETCH_MB", "1")
    path = tmp_path / "mlp.frt"
    build_engine(str(samples / "mlp.onnx"), ["h100"], str(path), {"x": (4, 32)}, "bf16")
    with pytest.raises(EngineFormatError, match="l2_next"):
        check_params("gemv", {**_host_params(path), "l2_next": [24]})
    engine = load(str(path), device="cpu")
    k = next(k for k in engine.file.kernels if k.params.get("l2_next"))
    k.params["l2_next"][0] += 1 << 20  # past the weight it points at
    with pytest.raises(EngineFormatError, match=r"l2_next\[0\] = .* exceeds its relocation"):
        engine._check_prefetch_spans()


def _host_params(path) -> dict:
    return next(k.params for k in load(str(path), device="cpu").file.kernels if k.params.get("l2_next"))
