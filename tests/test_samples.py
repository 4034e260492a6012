"""The transformers sample models (samples/transformers_models.py) at small scale: ViT, a Qwen3 decoder and a
Gemma action expert, each exported to ONNX by the dynamo and the legacy TorchScript exporter and saved as a
safetensors checkpoint, built by flashrt (fp32 and bf16) and run on the CPU reference executor (and, where a
GPU is present, the CUDA loader); the outputs must match PyTorch's fp32 eager outputs."""

import sys

import numpy as np
import pytest
from conftest import GPU_ARCH, SAMPLES, rel_l2, requires_gpu

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")  # the dynamo exporter's dependency

import flashrt  # noqa: E402
from flashrt.aot.build import build_engine  # noqa: E402

sys.path.insert(0, str(SAMPLES))
import transformers_models as tm  # noqa: E402

MODELS = tm.MODELS
SOURCES = ("dynamo", "legacy", "safetensors")
FP32_REL_L2, FP32_COSINE = 1e-4, 0.9999
BF16_REL_L2 = 3e-2


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="session")
def transformer_samples(tmp_path_factory) -> dict:
    """The three small models, written once: {model: paths (see transformers_models.write_model)}."""
    return tm.write_all(str(tmp_path_factory.mktemp("transformer_samples")), "small")


@pytest.fixture(scope="session")
def sample_engines(transformer_samples, tmp_path_factory):
    """build(model, source, precision) -> (engine path, feeds, reference outputs); each engine built once."""
    out = tmp_path_factory.mktemp("transformer_engines")
    built = {}

    def build(model: str, source: str, precision: str):
        key = (model, source, precision)
        if key not in built:
            paths = transformer_samples[model]
            pre = "hf_" if source == "safetensors" else ""
            feeds = dict(np.load(paths[f"{pre}inputs"]))
            ref = dict(np.load(paths[f"{pre}outputs"]))
            src = paths["hf"] if source == "safetensors" else paths[source]
            shapes = {"input_ids": feeds["input_ids"].shape} if source == "safetensors" and "input_ids" in feeds \
                else {}
            path = out / f"{model}_{source}_{precision}.frt"
            build_engine(src, ["sm_90a"], str(path), shapes, precision)
            built[key] = (path, feeds, ref)
        return built[key]

    return build


def check(got: dict, ref: dict, precision: str, what: str) -> None:
    assert got, f"{what}: no outputs"
    for name, value in got.items():
        assert name in ref, f"{what}: output {name} has no PyTorch reference (references: {sorted(ref)})"
        assert value.shape == ref[name].shape, f"{what} {name}: shape {value.shape} != {ref[name].shape}"
        assert np.all(np.isfinite(value)), f"{what} {name}: non-finite values"
        err, cos = rel_l2(value, ref[name]), cosine(value, ref[name])
        if precision == "fp32":
            assert err <= FP32_REL_L2 and cos >= FP32_COSINE, f"{what} {name}: rel-L2 {err:.2e}, cosine {cos:.7f}"
        else:
            assert err <= BF16_REL_L2, f"{what} {name}: rel-L2 {err:.2e}, cosine {cos:.7f}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("model", MODELS)
def test_matches_pytorch_on_cpu(sample_engines, model, source, precision):
    path, feeds, ref = sample_engines(model, source, precision)
    engine = flashrt.load(path, device="cpu")
    got = engine.run(feeds)
    # the ONNX exports give every reference output; the safetensors graphs give last_hidden_state (+ logits)
    want = set(ref) if source != "safetensors" else set(ref) - {"pooler_output"}
    assert set(got) == want, f"{model} {source}: outputs {sorted(got)}, expected {sorted(want)}"
    check(got, ref, precision, f"{model} {source} {precision}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("model", MODELS)
def test_matches_pytorch_on_gpu(sample_engines, model, source):
    if GPU_ARCH != "sm_90a":
        pytest.skip(f"the engines here are built for sm_90a; this GPU is {GPU_ARCH}")
    path, feeds, ref = sample_engines(model, source, "fp32")
    check(flashrt.load(path, device="cuda").run(feeds), ref, "fp32", f"{model} {source} cuda")


def test_export_signatures(transformer_samples):
    """Static shapes, batch 1, the documented input and output names, no KV-cache outputs."""
    import onnx

    for model, paths in transformer_samples.items():
        s = tm.spec(model, "small")
        for exporter in tm.EXPORTERS:
            g = onnx.load(paths[exporter]).graph
            inputs = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
            assert [i.name for i in inputs] == [s.input_name]
            dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
            assert tuple(dims) == s.input_shape, f"{model} {exporter}: input dims {dims}"
            assert [o.name for o in g.output] == list(s.output_names)
