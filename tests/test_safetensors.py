"""Safetensors import: small random-weight checkpoints of each family, written by transformers' own model classes
(save_pretrained), built by flashrt from the checkpoint folder and run on the CPU reference executor, must match
the transformers model per token; bad checkpoints are errors naming the file and the fault, writing nothing."""

import json
import shutil
import struct

import numpy as np
import pytest
from conftest import flashrt_cli, rel_l2

import flashrt
from flashrt.aot.build import build_engine
from flashrt.aot.importers.safetensors_import import import_safetensors
from flashrt.errors import BuildError, ModelError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MIN_COSINE, MAX_REL_L2 = 0.9999, 1e-4
T = 8  # tokens; every decoder shares hidden 64, 4 heads of 16, FFN 128, so the compiled kernels are shared
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
LM = dict(SMALL, vocab_size=128, max_position_embeddings=64)
VISION = dict(SMALL, image_size=32, patch_size=8)


def token_cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity of every token's vector (the last axis)."""
    a = np.asarray(got, np.float64).reshape(-1, got.shape[-1])
    b = np.asarray(want, np.float64).reshape(-1, want.shape[-1])
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def assert_close(got: dict, want: dict, what: str) -> dict:
    assert set(got) == set(want), f"{what}: outputs {sorted(got)}, expected {sorted(want)}"
    report = {}
    for name, ref in want.items():
        assert got[name].shape == ref.shape, f"{what} {name}: shape {got[name].shape} != {ref.shape}"
        cos, err = float(token_cosines(got[name], ref).min()), rel_l2(got[name], ref)
        assert cos >= MIN_COSINE and err <= MAX_REL_L2, f"{what} {name}: min token cosine {cos:.7f}, rel-L2 {err:.2e}"
        report[name] = (cos, err)
    return report


def perturbed(model):
    """Norm scales/biases and biases away from their 1/0 initial values, and sharper attention (larger query and
    key projections: with transformers' small initial weights attention is nearly uniform and positions, RoPE
    and masks would hardly show in the outputs), so the tests see them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(8.0)
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            if "cls_token" in name or "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def reference(model, feeds: dict) -> dict:
    args = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if hasattr(model, "lm_head"):  # *ForCausalLM: the engine gives the final hidden state and the logits
            hidden = model.model(**args).last_hidden_state
            return {"last_hidden_state": hidden.numpy(), "logits": model(**args).logits.numpy()}
        return {"last_hidden_state": model(**args).last_hidden_state.numpy()}


def ids(seed: int = 0, vocab: int = 128) -> dict:
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (1, T)).astype(np.int64)}


def pixels(seed: int = 0) -> dict:
    return {"pixel_values": np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)}


def bert_feeds(seed: int = 0) -> dict:
    mask = np.ones((1, T), np.int64)
    mask[0, T - 2:] = 0  # two padding tokens
    types = (np.arange(T) >= T // 2).astype(np.int64)[None]
    return dict(ids(seed), attention_mask=mask, token_type_ids=types)


def llama_rope(kind: str):
    rope = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16},
            "linear": {"rope_type": "linear", "factor": 4.0},
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            "dynamic": {"rope_type": "dynamic", "factor": 2.0}}[kind]
    extra = {"max_position_embeddings": 4} if kind == "dynamic" else {}  # T > max: dynamic NTK rescales
    cfg = transformers.LlamaConfig(**dict(LM, **extra), rope_theta=500000.0, rope_scaling=rope)
    return transformers.LlamaModel(cfg)


CASES = {
    # GQA (4 query heads over 2 KV heads), attention and MLP biases, an untied lm_head
    "llama_gqa": lambda: (transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LM, num_key_value_heads=2, attention_bias=True, mlp_bias=True)), ids()),
    "llama_rope_llama3": lambda: (llama_rope("llama3"), ids()),
    "llama_rope_linear": lambda: (llama_rope("linear"), ids()),
    "llama_rope_yarn": lambda: (llama_rope("yarn"), ids()),
    "llama_rope_dynamic": lambda: (llama_rope("dynamic"), ids()),
    # q/k norm, tied embeddings, a sliding-window layer (window 4 < T)
    "qwen3": lambda: (transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **LM, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=4, max_window_layers=1)), ids()),
    # scaled embedding, (1 + w) RMSNorm, GELU-tanh gated MLP, multi-query attention, tied lm_head
    "gemma": lambda: (transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **LM, num_key_value_heads=1, head_dim=16)), ids()),
    "bert": lambda: (transformers.BertModel(transformers.BertConfig(**LM)), bert_feeds()),
    "vit": lambda: (transformers.ViTModel(transformers.ViTConfig(**VISION)), pixels()),
    "siglip_vision": lambda: (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)), pixels()),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, model, feeds); each written once (llama_gqa as a sharded checkpoint with its index)."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            model, feeds = CASES[name]()
            folder = root / name
            shard = {"max_shard_size": "40KB"} if name == "llama_gqa" else {}
            perturbed(model).save_pretrained(folder, **shard)
            made[name] = (folder, model, feeds)
        return made[name]

    return get


def build_and_run(src, out, feeds: dict, **kw) -> dict:
    shapes = {"input_ids": feeds["input_ids"].shape} if "input_ids" in feeds else {}
    build_engine(str(src), ["sm_90a"], str(out), shapes, "fp32", **kw)
    return flashrt.load(out, device="cpu").run(feeds)


@pytest.mark.parametrize("name", list(CASES))
def test_family_matches_transformers(checkpoints, tmp_path, name):
    folder, model, feeds = checkpoints(name)
    got = build_and_run(folder, tmp_path / f"{name}.frt", feeds)
    assert_close(got, reference(model, feeds), name)


def test_sharded_checkpoint_reads_through_its_index(checkpoints):
    folder, _, _ = checkpoints("llama_gqa")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the test checkpoint should have several shards"


def test_siglip_full_model_builds_its_vision_tower(tmp_path):
    """A SiglipModel checkpoint (model_type 'siglip'): the vision_config and the vision_model.* tensors."""
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(vision_config=VISION, text_config=dict(SMALL, vocab_size=64,
                                                                            max_position_embeddings=16))
    model = perturbed(transformers.SiglipModel(cfg))
    model.save_pretrained(tmp_path / "siglip")
    feeds = pixels(1)
    got = build_and_run(tmp_path / "siglip", tmp_path / "siglip.frt", feeds)
    with torch.no_grad():
        want = model.vision_model(pixel_values=torch.from_numpy(feeds["pixel_values"])).last_hidden_state.numpy()
    assert_close(got, {"last_hidden_state": want}, "siglip (full model)")


def test_rope_scaling_is_applied(checkpoints):
    """The llama3 rope table differs from the default one at these positions: the test can tell them apart."""
    from flashrt.aot.importers.safetensors_import import Config, rope_tables

    folder, _, _ = checkpoints("llama_rope_llama3")
    data = json.loads((folder / "config.json").read_text())
    scaled = rope_tables(Config(data, "config.json"), 16, T)[0]
    data.pop("rope_parameters", None), data.pop("rope_scaling", None)
    plain = rope_tables(Config(dict(data, rope_theta=500000.0), "config.json"), 16, T)[0]
    assert np.abs(scaled - plain).max() > 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    """BF16 / F16 tensors are read exactly: the engine (fp32) matches the model with those weights in fp32."""
    torch.manual_seed(0)
    model = perturbed(transformers.BertModel(transformers.BertConfig(**LM)))
    model.to(getattr(torch, dtype)).save_pretrained(tmp_path / "ckpt")
    header, _ = header_of(tmp_path / "ckpt" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16" if dtype == "bfloat16" else "F16"}
    feeds = bert_feeds(2)
    got = build_and_run(tmp_path / "ckpt", tmp_path / "half.frt", feeds)
    assert_close(got, reference(model.float(), feeds), dtype)


def test_safetensors_file_with_config_option(checkpoints, tmp_path):
    """model.safetensors alone (elsewhere) + --config; the CLI passes --config through."""
    import subprocess

    folder, model, feeds = checkpoints("bert")
    (tmp_path / "weights").mkdir()
    st = tmp_path / "weights" / "bert.safetensors"
    shutil.copy(folder / "model.safetensors", st)
    with pytest.raises(ModelError, match="--config"):
        import_safetensors(str(st), None, {"input_ids": (1, T)})
    got = build_and_run(st, tmp_path / "a.frt", feeds, config=str(folder / "config.json"))
    assert_close(got, reference(model, feeds), "bert .safetensors + config")

    out = tmp_path / "cli.frt"
    proc = subprocess.run(flashrt_cli() + ["build", str(st), "--config", str(folder / "config.json"), "-t", "sm_90a",
                                           "--shapes", f"input_ids:1x{T}", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_close(flashrt.load(out, device="cpu").run(feeds), reference(model, feeds), "bert via the CLI")


def test_provenance_hashes_config_and_weights(checkpoints, tmp_path):
    folder, _, _ = checkpoints("bert")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    _, sha = import_safetensors(str(folder), None, {"input_ids": (1, T)})
    assert import_safetensors(str(copy), None, {"input_ids": (1, T)})[1] == sha
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(cfg, layer_norm_eps=1e-6)))
    assert import_safetensors(str(copy), None, {"input_ids": (1, T)})[1] != sha


# ---- bad input ------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_bert(tmp_path):
    """A small valid BERT checkpoint folder, to be damaged by each test."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def header_of(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_with_header(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def fails(src, tmp_path, *needles, config=None, shapes=None):
    out = tmp_path / "out.frt"
    with pytest.raises((ModelError, BuildError)) as e:
        build_engine(str(src), ["sm_90a"], str(out), {"input_ids": (1, 4)} if shapes is None else shapes, "fp32",
                     config=config)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert not out.exists(), "nothing is written at -o on failure"
    assert "\n" not in msg
    return msg


def test_truncated_file(tiny_bert, tmp_path):
    st = tiny_bert / "model.safetensors"
    header, data = header_of(st)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    st.write_bytes(st.read_bytes()[:-100])
    fails(tiny_bert, tmp_path, str(st), f"'{last}'", "truncated")


def test_header_that_lies_about_a_shape(tiny_bert, tmp_path):
    st = tiny_bert / "model.safetensors"
    header, data = header_of(st)
    header["encoder.layer.0.attention.self.query.weight"]["shape"] = [16, 17]
    write_with_header(st, header, data)
    fails(tiny_bert, tmp_path, str(st), "'encoder.layer.0.attention.self.query.weight'", "[16, 17]", "span")


def test_header_that_lies_about_offsets(tiny_bert, tmp_path):
    st = tiny_bert / "model.safetensors"
    header, data = header_of(st)
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = [x - 4 for x in header[b]["data_offsets"]]
    write_with_header(st, header, data)
    fails(tiny_bert, tmp_path, str(st), "overlap", f"'{a}'", f"'{b}'")


def test_header_length_past_the_end(tiny_bert, tmp_path):
    st = tiny_bert / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    fails(tiny_bert, tmp_path, str(st), "header length")


def test_header_not_json(tiny_bert, tmp_path):
    st = tiny_bert / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[8] = ord("#")
    st.write_bytes(bytes(raw))
    fails(tiny_bert, tmp_path, str(st), "not valid JSON")


def test_unknown_family(tiny_bert, tmp_path):
    cfg = json.loads((tiny_bert / "config.json").read_text())
    (tiny_bert / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2", architectures=["GPT2Model"])))
    fails(tiny_bert, tmp_path, str(tiny_bert / "config.json"), "'gpt2'", "llama")


def test_missing_weight(tiny_bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    st = tiny_bert / "model.safetensors"
    tensors = load_file(st)
    del tensors["encoder.layer.0.intermediate.dense.weight"]
    save_file(tensors, st)
    fails(tiny_bert, tmp_path, str(st), "'encoder.layer.0.intermediate.dense.weight'", "missing", "[32, 16]")


def test_misshaped_weight(tiny_bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    st = tiny_bert / "model.safetensors"
    tensors = load_file(st)
    tensors["encoder.layer.0.output.dense.weight"] = np.zeros((16, 31), np.float32)
    save_file(tensors, st)
    fails(tiny_bert, tmp_path, str(st), "'encoder.layer.0.output.dense.weight'", "[16, 31]", "expected [16, 32]")


def test_weight_of_an_unreadable_dtype(tiny_bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    st = tiny_bert / "model.safetensors"
    tensors = load_file(st)
    tensors["embeddings.LayerNorm.weight"] = np.ones(16, np.int32)
    save_file(tensors, st)
    fails(tiny_bert, tmp_path, str(st), "'embeddings.LayerNorm.weight'", "I32")


def test_shard_missing_from_index(tiny_bert, tmp_path):
    (tiny_bert / "model.safetensors").rename(tiny_bert / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00001.safetensors",
                                            "pooler.dense.weight": "model-00002-of-00002.safetensors"}}
    (tiny_bert / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(tiny_bert, tmp_path, "model.safetensors.index.json", "'model-00002-of-00002.safetensors'")


def test_sequence_length_is_required(tiny_bert, tmp_path):
    fails(tiny_bert, tmp_path, "input_ids", "--shapes input_ids:1x", shapes={})
    fails(tiny_bert, tmp_path, "max_position_embeddings", shapes={"input_ids": (1, 17)})
    fails(tiny_bert, tmp_path, "'nope'", shapes={"input_ids": (1, 4), "nope": (1, 4)})


def test_config_missing_or_bad(tiny_bert, tmp_path):
    fails(tiny_bert / "model.safetensors", tmp_path, "--config", config=str(tmp_path / "absent.json"))
    (tiny_bert / "config.json").write_text("{not json")
    fails(tiny_bert, tmp_path, str(tiny_bert / "config.json"), "not valid JSON")
    (tiny_bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    fails(tiny_bert, tmp_path, "num_hidden_layers", "missing")


def test_cli_error_is_one_line(tiny_bert, tmp_path):
    import subprocess

    cfg = json.loads((tiny_bert / "config.json").read_text())
    (tiny_bert / "config.json").write_text(json.dumps(dict(cfg, model_type="mystery")))
    out = tmp_path / "x.frt"
    proc = subprocess.run(flashrt_cli() + ["build", str(tiny_bert), "--shapes", "input_ids:1x4", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'mystery'" in lines[0], proc.stderr
    assert not out.exists()
