"""`flashrt compare`: the source model (onnxruntime / transformers, fp32) against an engine on the CPU executor,
per output and per region; tolerances decide the exit code; errors are one line."""

import json
import subprocess

import numpy as np
import pytest
from conftest import ROOT, flashrt_cli

import flashrt
from flashrt.aot.build import build_engine
from flashrt.aot.compare import compare, cosine, judge, max_abs, metrics, rel_l2, within
from flashrt.errors import FlashRTError

ENCODER, MLP = ROOT / "samples" / "tiny_encoder.onnx", ROOT / "samples" / "mlp.onnx"


def _cli(*args):
    return subprocess.run(flashrt_cli() + ["compare", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """name -> engine path: the tiny encoder at fp32 and bf16, the MLP at fp32."""
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, model, shapes, precision in (("enc_fp32", ENCODER, {}, "fp32"), ("enc_bf16", ENCODER, {}, "bf16"),
                                           ("mlp_fp32", MLP, {"x": (1, 32)}, "fp32")):
        out[name] = root / f"{name}.frt"
        build_engine(str(model), ["sm_90a"], str(out[name]), shapes, precision)
    return out


def test_metric_helpers():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    got = ref + np.array([[0.0, 0.5], [0.0, -1.0]], np.float32)
    assert max_abs(got, ref) == 1.0
    assert rel_l2(got, ref) == pytest.approx(np.sqrt(1.25) / np.sqrt(30.0))
    assert cosine(ref, ref * 3) == pytest.approx(1.0) and cosine(ref, -ref) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.ones(3), np.zeros(3)) == 0.0
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0 and rel_l2(np.ones(3), np.zeros(3)) == np.inf
    m = metrics(got, ref)
    assert m["ref_max_abs"] == 4.0 and m["finite"]
    assert within(m, atol=1.0) and not within(m, atol=0.9) and within(m, rtol=0.25) and not within(m, rtol=0.2)
    assert within(m, atol=0.5, rtol=0.125) and within(m) is None
    nan = metrics(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    assert not nan["finite"] and within(nan, atol=1e9) is False and within(nan, min_cosine=-1.0) is False


@pytest.mark.parametrize("name, model", [("enc_fp32", ENCODER), ("mlp_fp32", MLP)])
def test_fp32_engine_passes_tight_tolerances(engines, name, model):
    result = compare(str(model), str(engines[name]))
    assert [o["name"] for o in result["outputs"]] == [t.name for t in flashrt.load(engines[name], "cpu").outputs]
    for o in result["outputs"]:
        assert o["max_abs"] < 1e-5 and o["rel_l2"] < 1e-5 and o["cosine"] > 1 - 1e-9, o
    assert judge(result, rtol=1e-5, atol=1e-6, min_cosine=0.9999999) is True
    assert all(o["passed"] for o in result["outputs"]) and "regions" not in result
    proc = _cli(model, engines[name], "--rtol", "1e-5", "--atol", "1e-6", "--min-cosine", "0.9999999")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout


def test_bf16_engine_against_cosine_limits(engines):
    strict = _cli(ENCODER, engines["enc_bf16"], "--min-cosine", "0.9999999")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "FAIL" in strict.stdout and strict.stderr == ""
    loose = _cli(ENCODER, engines["enc_bf16"], "--min-cosine", "0.99")
    assert loose.returncode == 0 and "PASS" in loose.stdout, loose.stdout + loose.stderr
    none = _cli(ENCODER, engines["enc_bf16"])  # no tolerance: a report, exit 0
    assert none.returncode == 0 and "PASS" not in none.stdout and "FAIL" not in none.stdout
    for line in ("hidden", "probs"):
        assert any(row.split()[0] == line for row in none.stdout.splitlines()), none.stdout


def test_rtol_atol_decide_the_exit_code(engines):
    result = compare(str(ENCODER), str(engines["enc_bf16"]))
    worst = max(o["max_abs"] for o in result["outputs"])
    assert _cli(ENCODER, engines["enc_bf16"], "--atol", worst * 1.01).returncode == 0
    assert _cli(ENCODER, engines["enc_bf16"], "--atol", worst * 0.5).returncode == 1
    assert _cli(ENCODER, engines["enc_bf16"], "--rtol", "1e-6", "--atol", "1e-7").returncode == 1


def test_per_region_fp32_and_bf16(engines):
    regions = flashrt.load(engines["enc_fp32"], device="cpu").manifest["regions"]
    reused = {r["output"]["offset"] for r in regions}
    assert len(reused) < len(regions), "the memory plan should reuse arena space (what the snapshots are for)"
    fp32 = compare(str(ENCODER), str(engines["enc_fp32"]), per_region=True)
    assert [r["region"] for r in fp32["regions"]] == [r["name"] for r in regions]
    merged = [r for r in fp32["regions"] if "merged into one GEMM" in r.get("skipped", "")]
    assert len(merged) == 2  # the q/k/v GEMM of each layer
    for r in (r for r in fp32["regions"] if r not in merged):
        assert "skipped" not in r and r["finite"], r
        assert r["rel_l2"] < 1e-5 and r["max_abs"] < 1e-5 and r["cosine"] > 1 - 1e-9, r
    bf16 = compare(str(ENCODER), str(engines["enc_bf16"]), per_region=True)
    assert len(bf16["regions"]) == len(regions)
    assert all("skipped" not in r and r["finite"] and 1e-4 < r["rel_l2"] < 0.05 for r in bf16["regions"]
               if "merged into one GEMM" not in r.get("skipped", ""))
    # the final outputs measured through the stepwise run equal a plain run's
    plain = compare(str(ENCODER), str(engines["enc_bf16"]))
    assert [o["max_abs"] for o in plain["outputs"]] == [o["max_abs"] for o in bf16["outputs"]]

    proc = _cli(ENCODER, engines["enc_bf16"], "--per-region")
    assert proc.returncode == 0, proc.stderr
    for r in regions:
        assert any(row.startswith(r["output"]["value"] + " ") for row in proc.stdout.splitlines()), r["output"]


def test_per_region_skips_values_the_source_lacks(engines, monkeypatch):
    real = flashrt.load

    def renamed(path, device="cuda"):
        eng = real(path, device=device)
        eng.manifest["regions"][3]["output"]["value"] = "matmul_27/contiguous"
        return eng

    monkeypatch.setattr(flashrt, "load", renamed)
    result = compare(str(ENCODER), str(engines["enc_fp32"]), per_region=True)
    skipped = [r for r in result["regions"] if "skipped" in r and "/merged" not in r["name"]]
    assert [r["name"] for r in skipped] == ["matmul_27/contiguous"]
    assert "not a value of the source model" in skipped[0]["skipped"]


def test_json_output(engines, tmp_path):
    x = np.random.default_rng(5).standard_normal((1, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = _cli(ENCODER, engines["enc_bf16"], "--json", "--per-region", "--min-cosine", "0.99", "--inputs",
                tmp_path / "in.npz")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["passed"] is True and doc["tolerances"] == {"rtol": None, "atol": None, "min_cosine": 0.99}
    assert doc["inputs"] == "given" and doc["precision"] == "bf16" and doc["device"] == "cpu"
    assert {o["name"] for o in doc["outputs"]} == {"hidden", "probs"}
    assert len(doc["regions"]) == len(flashrt.load(engines["enc_bf16"], device="cpu").manifest["regions"])
    # the given inputs were used: the same numbers as running both sides by hand
    import onnxruntime as ort

    want = ort.InferenceSession(str(ENCODER), providers=["CPUExecutionProvider"]).run(["hidden"], {"x": x})[0]
    got = flashrt.load(engines["enc_bf16"], device="cpu").run({"x": x})["hidden"]
    hidden = next(o for o in doc["outputs"] if o["name"] == "hidden")
    assert hidden["max_abs"] == pytest.approx(max_abs(got, want), rel=1e-3)  # ORT optimizations differ
    assert hidden["cosine"] == pytest.approx(cosine(got, want), abs=1e-8)


def _error(*args) -> str:
    proc = _cli(*args)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashrt: error: "), proc.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors(engines, tmp_path):
    enc = engines["enc_fp32"]
    np.savez(tmp_path / "wrong_name.npz", y=np.zeros((1, 16, 64), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((1, 16, 63), np.float32))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "missing input(s) ['x']" in _error(ENCODER, enc, "--inputs", tmp_path / "wrong_name.npz")
    assert "[1, 16, 63]" in _error(ENCODER, enc, "--inputs", tmp_path / "wrong_shape.npz")
    assert "not a readable .npz" in _error(ENCODER, enc, "--inputs", tmp_path / "junk.npz")
    assert "--device cpu only" in _error(ENCODER, enc, "--per-region", "--device", "cuda")
    assert "no such model" in _error(tmp_path / "absent.onnx", enc)
    assert "no such engine" in _error(ENCODER, tmp_path / "absent.frt")
    assert "not a FlashRT engine" in _error(ENCODER, ENCODER)
    assert "unrecognized model format" in _error(ROOT / "README.md", enc)
    assert "applies to safetensors" in _error(ENCODER, enc, "--config", tmp_path / "config.json")
    assert "--min-cosine" in _error(ENCODER, enc, "--min-cosine", "1.5")
    assert "--atol" in _error(ENCODER, enc, "--atol", "-1")
    msg = _error(MLP, enc)  # the wrong model for this engine
    assert "provenance records a different source (tiny_encoder.onnx" in msg
    with pytest.raises(FlashRTError, match="--device cpu only"):
        compare(str(ENCODER), str(enc), device="cuda", per_region=True)


def test_safetensors_checkpoint(tmp_path):
    """A tiny BERT written by transformers: its folder, and its .safetensors file with --config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=16)
    transformers.BertModel(cfg).eval().save_pretrained(tmp_path / "bert")
    engine = tmp_path / "bert.frt"
    build_engine(str(tmp_path / "bert"), ["sm_90a"], str(engine), {"input_ids": (1, 8)}, "fp32")

    result = compare(str(tmp_path / "bert"), str(engine))
    assert "BertModel" in result["source"] and [o["name"] for o in result["outputs"]] == ["last_hidden_state"]
    out = result["outputs"][0]
    assert out["shape"] == [1, 8, 16] and out["cosine"] > 1 - 1e-9 and out["rel_l2"] < 1e-5, out
    assert result["notes"] == []

    ids = np.random.default_rng(3).integers(0, 32, (1, 8))
    mask = np.ones((1, 8), np.int64)
    mask[0, 6:] = 0  # padding
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (np.arange(8) >= 4).astype(np.int64)[None]}
    np.savez(tmp_path / "in.npz", **feeds)
    weights = tmp_path / "elsewhere.safetensors"
    weights.write_bytes((tmp_path / "bert" / "model.safetensors").read_bytes())
    proc = _cli(weights, engine, "--config", tmp_path / "bert" / "config.json", "--inputs", tmp_path / "in.npz",
                "--per-region", "--json", "--min-cosine", "0.99999", "--rtol", "1e-5")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["passed"] is True and doc["inputs"] == "given" and "regions" not in doc
    assert any("final outputs only" in n for n in doc["notes"]), doc["notes"]
    assert proc.stderr == "", proc.stderr

    msg = _error(weights, engine)  # no config.json beside it
    assert "--config" in msg


def test_causal_lm_checkpoint_gives_logits(tmp_path):
    """A *ForCausalLM checkpoint: the engine's last_hidden_state and logits against the model's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "llama")
    engine = tmp_path / "llama.frt"
    build_engine(str(tmp_path / "llama"), ["sm_90a"], str(engine), {"input_ids": (1, 8)}, "fp32")
    result = compare(str(tmp_path / "llama"), str(engine))
    assert "LlamaForCausalLM" in result["source"]
    assert [o["name"] for o in result["outputs"]] == ["last_hidden_state", "logits"]
    assert result["outputs"][1]["shape"] == [1, 8, 64]
    assert judge(result, rtol=1e-4, atol=1e-5, min_cosine=0.99999) is True, result["outputs"]
