"""samples/vla.py (a pi0-like VLA: SigLIP-shaped vision per camera -> Gemma-shaped prefix -> Gemma-shaped action
expert, 10 flow-matching steps unrolled in one ONNX graph) at ci scale: the reference is not degenerate, onnxruntime
agrees with it, flashrt engines at fp32 / bf16 / fp8 on the CPU executor meet the accuracy goals, and the launch
list runs the prefix once: launches = prefix + steps * per-step."""

import sys

import numpy as np
import pytest
import torch
from conftest import SAMPLES, onnxruntime_outputs, rel_l2

import flashrt
from flashrt.aot.build import build_engine

sys.path.insert(0, str(SAMPLES))
import vla  # noqa: E402

FP32_REL_L2, BF16_COSINE, FP8_COSINE = 1e-4, 0.99, 0.998


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(model, inputs, reference actions, onnx path, output folder)."""
    out = tmp_path_factory.mktemp("vla")
    model = vla.make_model("ci")
    inputs = vla.example_inputs(model)
    return model, inputs, vla.reference(model, inputs), vla.export_onnx(model, str(out / "vla.onnx"), inputs), out


@pytest.fixture(scope="module")
def engine_path(case):
    _, _, _, path, out = case
    built = {}

    def build(precision: str) -> str:
        if precision not in built:
            built[precision] = build_engine(path, ["sm_90a"], str(out / f"vla_{precision}.frt"), None, precision).path
        return built[precision]

    return build


def test_reference_is_not_degenerate(case):
    model, inputs, ref, _, _ = case
    c = model.c
    noise = inputs["noise"].numpy()
    assert ref.shape == (1, c["horizon"], c["action_dim"]) and np.isfinite(ref).all()
    flow = ref - noise
    assert flow.std() > 0.3 * noise.std(), "the flow barely moves the noise"
    assert flow.std(axis=1).min() > 0.05, "the displacement is constant over the action chunk"
    # the images and the prompt both steer the actions (through the prefix K/V)
    for key, other in (("images", torch.flip(inputs["images"], dims=[1])), ("prompt_ids", inputs["prompt_ids"] // 2)):
        moved = vla.reference(model, dict(inputs, **{key: other}))
        assert rel_l2(moved - noise, flow) > 0.05, f"{key} does not affect the actions"


def test_export_signature_and_onnxruntime(case):
    import onnx

    model, inputs, ref, path, _ = case
    g = onnx.load(path).graph
    c = model.c
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert shapes == {"images": [1, c["cameras"], 3, c["image"], c["image"]], "prompt_ids": [1, c["prompt"]],
                      "noise": [1, c["horizon"], c["action_dim"]]}
    assert [o.name for o in g.output] == ["actions"]
    got = onnxruntime_outputs(path, {k: v.numpy() for k, v in inputs.items()})["actions"]
    assert rel_l2(got, ref) < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_engine_matches_reference(case, engine_path, precision):
    _, inputs, ref, _, _ = case
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = flashrt.load(engine_path(precision), device="cpu").run(feeds)["actions"]
    m = vla.metrics(got, ref, feeds["noise"])
    assert m["finite"], m
    if precision == "fp32":
        assert m["rel_l2"] <= FP32_REL_L2 and m["flow_rel_l2"] <= 10 * FP32_REL_L2, m
    else:
        assert m["cosine"] >= (BF16_COSINE if precision == "bf16" else FP8_COSINE), m


def test_prefix_runs_once(case, engine_path):
    """The launches of the 10-step engine are the prefix's once plus a fixed number per denoise step."""
    model, _, _, _, out = case
    split = vla.launches_per_step("ci", str(out))
    total = vla.engine_launches(engine_path("fp32"))
    print(f"\nvla ci fp32: {total} launches = prefix {split['prefix']} + {model.c['steps']} x {split['per_step']}")
    assert split["per_step"] > 0 and split["prefix"] > 0
    assert total == split["prefix"] + model.c["steps"] * split["per_step"]


def test_expert_reads_prefix_kv_in_place(case, engine_path):
    """The expert layers of every denoise step attend to [the prefix K/V; their own K/V] with no Concat launch: the
    attention reads both in place, two sources per operand."""
    from flashrt.engine_format.reader import read_engine

    model, _, _, _, _ = case
    c = model.c
    prefix = c["cameras"] * (c["image"] // c["patch"]) ** 2 + c["prompt"]
    for precision in ("fp32", "bf16"):
        m = read_engine(engine_path(precision)).manifest
        fused = [m["kernels"][r["kernel"]]["params"] for r in m["regions"]
                 if r["kind"] == "attention" and "Concat" in r["ops"]]
        assert len(fused) == c["steps"] * c["expert"]["layers"], precision
        for p in fused:
            assert [s["keys"] for s in p["k"]["sources"]] == [s["keys"] for s in p["v"]["sources"]] \
                == [prefix, c["horizon"]]
