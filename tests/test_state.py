"""Stateful decoder engines (engine_format/SPEC.md §11): KV caches as engine state, prefill and decode entry
points, one launch list for every position, and the errors at the limits. Oracle: the same decoder in PyTorch
at fp32 (samples/decoder.py) with its own KV cache."""

import contextlib
import io
import os
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flashrt.aot.build import build_engine  # noqa: E402
from flashrt.errors import BuildError, InputError, ModelError  # noqa: E402
from flashrt.runtime import load  # noqa: E402
from conftest import SAMPLES  # noqa: E402
sys.path.insert(0, str(SAMPLES))
import decoder as dec  # noqa: E402

MAX_CONTEXT, PREFILL = 24, 8


def export_dynamic(model, path: str) -> str:
    """The decoder with dynamic sequence and past axes, as a KV-cache export for a stateful build."""
    c = model.c
    T, P = 3, 5
    ids = torch.zeros(1, T, dtype=torch.int64)
    pos = torch.arange(P, P + T)[None]
    past = [torch.randn(1, c["kv_heads"], P, c["head_dim"]) for _ in range(2 * c["layers"])]
    inputs, outputs = dec.io_names(c["layers"])
    axes = {"input_ids": {1: "seq"}, "position_ids": {1: "seq"}, "logits": {1: "seq"}}
    axes.update({n: {2: "past"} for n in inputs[2:]})
    axes.update({n: {2: "total"} for n in outputs[1:]})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, pos, *past), path, dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    return path


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")
    model = dec.make_model("ci")
    onnx_path = export_dynamic(model, str(d / "decoder.onnx"))
    engine = str(d / "decoder.frt")
    build_engine(onnx_path, ["sm_90a"], engine, precision="fp32", max_context=MAX_CONTEXT, prefill_len=PREFILL)
    return model, onnx_path, engine


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_prefill_then_decode_matches_pytorch(decoder):
    model, _, path = decoder
    eng = load(path, device="cpu")
    assert eng.entries == ["prefill", "decode"] and eng.stateful
    prompt = dec.example_prompt(model, 6)
    tokens, ref = dec.greedy(model, prompt, 10)
    out = eng.run({"input_ids": prompt.numpy()}, entry="prefill")
    assert out["logits"].shape == (1, 6, model.c["vocab"])
    with torch.no_grad():
        full = model(prompt, torch.arange(6)[None], *dec.empty_past(model))[0].numpy()
    assert rel(out["logits"], full) < 1e-4
    assert eng.position == 6
    for s in range(1, 10):  # teacher-forced: feed the reference's tokens
        out = eng.run({"input_ids": np.array([[tokens[s - 1]]])}, entry="decode")
        assert rel(out["logits"][0, -1], ref[s]) < 1e-4, s
    assert eng.position == 15


def test_one_launch_list_serves_every_position(decoder):
    """The decode entry's launches do not depend on the position: the same engine decodes at 1 and at 20."""
    model, _, path = decoder
    eng = load(path, device="cpu")
    e = eng.file.entry("decode")
    kinds = [eng.file.kernels[launch.kernel].family for launch in eng.file.launches[e.first:e.first + e.count]]
    assert kinds[-1] == "state" and kinds.count("attention") == model.c["layers"]
    kernels = [eng.file.kernels[launch.kernel] for launch in eng.file.launches[e.first:e.first + e.count]]
    # separate q/k/v projections merged into one GEMV, separate gate/up into the gated (SwiGLU) GEMV
    assert sum(k.family == "gemv" and bool(k.params.get("gated")) for k in kernels) == model.c["layers"]
    prompt = dec.example_prompt(model, 20)
    tokens, ref = dec.greedy(model, prompt, 3)
    eng.run({"input_ids": prompt[:, :8].numpy()}, entry="prefill")
    eng.run({"input_ids": prompt[:, 8:16].numpy()}, entry="prefill")  # a second chunk continues the sequence
    for t in range(16, 20):
        out = eng.run({"input_ids": prompt[:, t:t + 1].numpy()}, entry="decode")
    assert rel(out["logits"][0, -1], ref[0]) < 1e-4
    out = eng.run({"input_ids": np.array([[tokens[0]]])}, entry="decode")
    assert rel(out["logits"][0, -1], ref[1]) < 1e-4


def test_cache_concats_stay_cache_writes(decoder):
    """present = Concat(past, new) only feeds attention (and the present output), the shape attention could read
    in place; the stateful build turns it into a cache write first, so every attention reads the state at its
    run-time length, one view per operand. Decode's new K and V rows are stored by the kernels that produce them
    (a fused cache write); prefill writes each layer's rows in one state launch."""
    model, _, path = decoder
    eng = load(path, device="cpu")
    for entry in ("prefill", "decode"):
        e = eng.file.entry(entry)
        kernels = [eng.file.kernels[launch.kernel] for launch in eng.file.launches[e.first:e.first + e.count]]
        attention = [k.params for k in kernels if k.family == "attention"]
        assert len(attention) == model.c["layers"]
        assert all(p["dyn"] and "sources" not in p["k"] and "sources" not in p["v"] for p in attention)
        writes = sum(k.family == "state" and k.params["op"] == "write" for k in kernels)
        fused = [(k.family, len(part.get("cache", []))) for k in kernels for part in k.params.get("parts", [k.params])
                 if part.get("cache")]
        if entry == "prefill":
            assert writes == model.c["layers"] and not fused
        else:
            assert writes == 0 and sum(n for _, n in fused) == 2 * model.c["layers"], fused
            # per layer: V from the QKV GEMV, K from the launch of the q and k head norms with their RoPE
            assert sorted(fused) == sorted([("gemv", 1), ("layernorm", 1)] * model.c["layers"]), fused


def test_decode_layer_is_fused_through_float32_accumulators(decoder):
    """Decode's attention adds its o-projection into the residual stream (attention `oproj`) and its MLP (norm,
    gate/up, SwiGLU, down projection) is one launch (gemv `down`): both add their products with atomics into
    float32 accumulators that the layer's QKV GEMV filled with the residual it reads (`a_mirror`). Prefill's rows
    take the GEMMs, unfused."""
    model, _, path = decoder
    eng = load(path, device="cpu")
    layers = model.c["layers"]
    for entry, fused in (("prefill", 0), ("decode", layers)):
        e = eng.file.entry(entry)
        kernels = [eng.file.kernels[launch.kernel] for launch in eng.file.launches[e.first:e.first + e.count]]
        downs = [k.params for k in kernels if k.family == "gemv" and "down" in k.params]
        oprojs = [k.params["oproj"] for k in kernels if k.family == "attention" and "oproj" in k.params]
        mirrors = [k.params["a_mirror"] for k in kernels if k.family == "gemv" and "a_mirror" in k.params]
        assert len(downs) == len(oprojs) == len(mirrors) == fused
        assert all(p["gated"] and p["down"]["N"] == model.c["hidden"] for p in downs)
        assert all(o["outs"] == 2 and o["N"] == model.c["hidden"] for o in oprojs) and set(mirrors) <= {2}
        if entry == "decode":  # QKV, q/k norms + RoPE, attention + o-proj, MLP; the prologue (positions, cast,
            # times the frequencies, cos, sin, embedding); the lm head; the position's advance
            assert e.count == 4 * layers + 8, e.count


def test_deterministic_build_keeps_the_projections_apart(decoder, tmp_path):
    """--deterministic: no float atomics (no oproj / down / mirrors), the flag recorded, and the same decode
    logits as the fused engine up to the summation order."""
    model, onnx_path, fused_path = decoder
    path = str(tmp_path / "deterministic.frt")
    build_engine(onnx_path, ["sm_90a"], path, precision="fp32", max_context=MAX_CONTEXT, prefill_len=PREFILL,
                 deterministic=True)
    engines = [load(p, device="cpu") for p in (fused_path, path)]
    assert engines[1].manifest["provenance"]["build_flags"]["deterministic"] is True
    assert not any(k.params.get(x) for k in engines[1].file.kernels for x in ("oproj", "down", "mirror", "a_mirror"))
    e = engines[1].file.entry("decode")
    assert e.count == engines[0].file.entry("decode").count + 2 * model.c["layers"]
    prompt = dec.example_prompt(model, 5).numpy()
    logits = []
    for eng in engines:
        eng.run({"input_ids": prompt}, entry="prefill")
        logits.append(eng.run({"input_ids": prompt[:, -1:]}, entry="decode")["logits"])
    assert rel(logits[0], logits[1]) < 1e-5


def test_reset_and_load_state(decoder):
    model, _, path = decoder
    eng = load(path, device="cpu")
    prompt = dec.example_prompt(model, 5)
    first = eng.run({"input_ids": prompt.numpy()}, entry="prefill")["logits"]
    eng.run({"input_ids": prompt[:, :1].numpy()}, entry="decode")
    eng.reset()
    assert eng.position == 0
    again = eng.run({"input_ids": prompt.numpy()}, entry="prefill")["logits"]
    np.testing.assert_array_equal(first, again)
    # load_state: the caches of the prompt's first 4 tokens from PyTorch, then decode token 5
    with torch.no_grad():
        past = model(prompt[:, :4], torch.arange(4)[None], *dec.empty_past(model))[1:]
    names = dec.io_names(model.c["layers"])[0][2:]
    eng.load_state({n: p.numpy() for n, p in zip(names, past)}, 4)
    out = eng.run({"input_ids": prompt[:, 4:5].numpy()}, entry="decode")["logits"]
    assert rel(out[0, -1], first[0, -1]) < 1e-4


def test_errors_leave_state_unchanged(decoder):
    model, _, path = decoder
    eng = load(path, device="cpu")
    with pytest.raises(InputError, match="state is empty: run 'prefill' first"):
        eng.run({"input_ids": np.array([[1]])}, entry="decode")
    with pytest.raises(InputError, match=f"at most {PREFILL} tokens"):
        eng.run({"input_ids": np.zeros((1, PREFILL + 1), np.int64)}, entry="prefill")
    with pytest.raises(InputError, match="unknown entry point 'generate'"):
        eng.run({"input_ids": np.array([[1]])}, entry="generate")
    prompt = dec.example_prompt(model, MAX_CONTEXT)
    for i in range(0, MAX_CONTEXT - 1, PREFILL):
        eng.run({"input_ids": prompt[:, i:min(i + PREFILL, MAX_CONTEXT - 1)].numpy()}, entry="prefill")
    assert eng.position == MAX_CONTEXT - 1
    before = eng.arena.copy()
    with pytest.raises(InputError, match=f"--max-context {MAX_CONTEXT}"):
        eng.run({"input_ids": prompt[:, :2].numpy()}, entry="prefill")
    assert eng.position == MAX_CONTEXT - 1 and np.array_equal(before, eng.arena)
    eng.run({"input_ids": prompt[:, -1:].numpy()}, entry="decode")  # the last slot still works
    with pytest.raises(InputError, match="would pass the engine's --max-context"):
        eng.run({"input_ids": prompt[:, -1:].numpy()}, entry="decode")


def test_build_errors(decoder, tmp_path):
    _, onnx_path, _ = decoder
    with pytest.raises(BuildError, match="--prefill-len 40"):
        build_engine(onnx_path, ["sm_90a"], str(tmp_path / "x.frt"), max_context=MAX_CONTEXT, prefill_len=40)
    with pytest.raises(BuildError, match="--prefill-len applies to stateful decoders"):
        build_engine(onnx_path, ["sm_90a"], str(tmp_path / "x.frt"), prefill_len=4)
    tiny = os.path.join(os.path.dirname(__file__), "..", "samples", "tiny_encoder.onnx")
    with pytest.raises(ModelError, match="no input of the model is a KV cache"):
        build_engine(tiny, ["sm_90a"], str(tmp_path / "x.frt"), max_context=MAX_CONTEXT)
    assert not os.path.exists(tmp_path / "x.frt")


def _cuda_available() -> bool:
    try:
        from cuda.bindings import driver as cu

        return cu.cuInit(0)[0] == cu.CUresult.CUDA_SUCCESS and cu.cuDeviceGetCount()[1] > 0
    except Exception:
        return False


@pytest.mark.skipif(not _cuda_available(), reason="needs an NVIDIA GPU and cuda-bindings")
@pytest.mark.parametrize("fused", [False, True])  # the decode fusions off; on, with the opt-in L2 weight prefetch
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_matches_cpu_reference(decoder, tmp_path, precision, fused, monkeypatch):
    """The CUDA loader runs both entry points from one captured graph each, at every position, as the CPU
    reference executor does; launch() and latencies() keep the host's position in step."""
    from flashrt.runtime.cuda import device_arch

    model, onnx_path, _ = decoder
    major, minor = device_arch()
    path = str(tmp_path / "gpu.frt")
    for name in ("FLASHRT_FUSE_OPROJ", "FLASHRT_ATTN_PREFETCH", "FLASHRT_L2_PREFETCH_MB"):
        monkeypatch.setenv(name, "1" if fused else "0")
    build_engine(onnx_path, [f"sm_{major}{minor}a"], path, precision=precision, max_context=MAX_CONTEXT,
                 prefill_len=PREFILL)
    cpu, gpu = load(path, device="cpu"), load(path, device="cuda")
    prompt = dec.example_prompt(model, 7).numpy()
    a = cpu.run({"input_ids": prompt}, entry="prefill")["logits"]
    b = gpu.run({"input_ids": prompt}, entry="prefill")["logits"]
    assert rel(b, a) < 2e-2
    for t in range(12):
        token = np.array([[int(np.argmax(a[0, -1]))]])
        a = cpu.run({"input_ids": token}, entry="decode")["logits"]
        b = gpu.run({"input_ids": token}, entry="decode")["logits"]
        assert rel(b, a) < 2e-2, t
    assert gpu.position == cpu.position == 19
    gpu.latencies(20, 5, entry="decode")
    assert gpu.position == 19
    gpu.launch(entry="decode")
    gpu.synchronize()
    assert gpu.position == 20
    gpu.reset()
    b = gpu.run({"input_ids": prompt}, entry="prefill")["logits"]
    cpu.reset()
    a = cpu.run({"input_ids": prompt}, entry="prefill")["logits"]
    assert rel(b, a) < 2e-2
    with pytest.raises(InputError, match="takes its token count from run"):
        gpu.launch(entry="prefill")
    gpu.close()


def test_rope_angles_from_runtime_positions_stay_float32(tmp_path):
    """Positions cast to float, times the RoPE frequencies, then cos: bf16 storage of the angle would be off by
    up to ~1 at position 1000 (bf16 holds integers exactly only to 256); such values stay float32."""
    import onnx
    from onnx import TensorProto, helper

    inv = (1.0 / 1e6 ** (np.arange(0, 128, 2, dtype=np.float32) / 128)).reshape(1, 1, 64)
    nodes = [helper.make_node("Unsqueeze", ["pos", "ax"], ["p3"]),
             helper.make_node("Cast", ["p3"], ["pf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pf", "inv"], ["ang"]),
             helper.make_node("Concat", ["ang", "ang"], ["emb"], axis=-1),
             helper.make_node("Cos", ["emb"], ["c"]), helper.make_node("Mul", ["c", "x"], ["y"])]
    g = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("pos", TensorProto.INT64, [1, 8]),
                                          helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 128])],
                          [helper.make_tensor("ax", TensorProto.INT64, [1], [2]),
                           onnx.numpy_helper.from_array(inv, "inv")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "rope.onnx"))
    build_engine(str(tmp_path / "rope.onnx"), ["sm_90a"], str(tmp_path / "rope.frt"), precision="bf16")
    pos = np.array([[0, 1, 78, 255, 257, 1000, 4095, 8191]], np.int64)
    x = np.ones((1, 8, 128), np.float32)
    got = load(str(tmp_path / "rope.frt"), device="cpu").run({"pos": pos, "x": x})["y"]
    ref = np.cos(np.concatenate([pos[..., None] * inv.astype(np.float64)] * 2, -1))
    assert np.abs(got - ref).max() < 1e-2  # bf16 rounding of the product only


@pytest.mark.parametrize("precision, min_cos, min_top1", [("bf16", 0.999, 0.95), ("fp8", 0.995, None)])
def test_64_teacher_forced_decode_steps(decoder, tmp_path, precision, min_cos, min_top1):
    """The issue's goal, with real decode steps of the stateful engine: over 64 steps fed the reference's tokens,
    every step's logits cosine to PyTorch fp32 meets the goal, and the top-1 token agrees. (fp8's top-1 on this
    random ci model is a near-tie property of the weights: PyTorch with fp8-rounded weights agrees on 0.906 of
    the steps too -- tests/test_decoder_sample.py -- so only its cosine is asserted.)"""
    model, onnx_path, _ = decoder
    path = str(tmp_path / f"d_{precision}.frt")
    build_engine(onnx_path, ["sm_90a"], path, precision=precision, max_context=96, prefill_len=16)
    eng = load(path, device="cpu")
    prompt = dec.example_prompt(model, 16)
    tokens, ref = dec.greedy(model, prompt, 65)
    logits = eng.run({"input_ids": prompt.numpy()}, entry="prefill")["logits"][0, -1]
    cosines, agree = [], 0
    for s in range(1, 65):
        logits = eng.run({"input_ids": np.array([[tokens[s - 1]]])}, entry="decode")["logits"][0, -1]
        cosines.append(float(logits @ ref[s] / np.linalg.norm(logits) / np.linalg.norm(ref[s])))
        agree += int(np.argmax(logits) == tokens[s])
    assert min(cosines) >= min_cos, (min(cosines), int(np.argmin(cosines)))
    if min_top1 is not None:
        assert agree / 64 >= min_top1, agree


def test_targets_before_hopper_build_without_clusters(decoder, tmp_path):
    """A100 (sm_80) and L40S (sm_89) have no thread-block clusters or programmatic dependent launch: the decoder
    still builds for them, with split-K and key splits over clusters turned off, and computes the same outputs."""
    from flashrt.engine_format.reader import read_engine

    model, onnx_path, reference = decoder
    path = str(tmp_path / "pre_hopper.frt")
    build_engine(onnx_path, ["a100", "l40s"], path, precision="fp32", max_context=MAX_CONTEXT, prefill_len=PREFILL)
    manifest = read_engine(path).manifest
    assert manifest["targets"] == ["sm_80", "sm_89"]
    for k in manifest["kernels"]:
        assert k["params"].get("CL", 1) == 1 and k["params"].get("mma", {}).get("split", 1) == 1, k["params"]
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    a, b = load(path, device="cpu"), load(reference, device="cpu")
    np.testing.assert_array_equal(a.run({"input_ids": ids}, entry="prefill")["logits"],
                                  b.run({"input_ids": ids}, entry="prefill")["logits"])


def test_prefill_and_decode_share_unfolded_weights(decoder, tmp_path, monkeypatch):
    """On sm_90a the prefill GEMMs run on wgmma, but a norm is not folded into a weight the decode GEMVs also read:
    the engine stores each weight once, as many bytes as with the mma.sync kernels (FLASHRT_WGMMA=0)."""
    from flashrt.engine_format.reader import read_engine

    _, onnx_path, _ = decoder
    sizes = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FLASHRT_WGMMA", flag)
        path = str(tmp_path / f"wgmma{flag}.frt")
        build_engine(onnx_path, ["sm_90a"], path, precision="bf16", max_context=MAX_CONTEXT, prefill_len=16)
        manifest = read_engine(path).manifest  # 16 prefill rows: past the GEMV's 8, so GEMMs
        sizes[flag] = manifest["memory"]["weights_bytes"]
        assert not any((k["params"].get("ln") or {}).get("fold") for k in manifest["kernels"])
    assert sizes["1"] == sizes["0"]
