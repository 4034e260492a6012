"""`flashrt compare`: run the source model and an engine on the same inputs and measure how far apart they are.

The source runs in fp32 as its own framework runs it: an `.onnx` file through onnxruntime (CPUExecutionProvider),
a safetensors checkpoint (a folder with config.json, a `.safetensors` file with `config`, or a
`.safetensors.index.json`) through transformers (the class named by config.json's architectures, fp32, eval,
eager attention). Engine inputs and outputs are matched to the source's by name; for transformers models the
inputs are input_ids, attention_mask, token_type_ids, pixel_values and the outputs last_hidden_state, logits.

With `per_region`, an ONNX source also gives the value of every region's output (the manifest's
`regions[*].output.value`, where that name is a value of the ONNX graph) as extra graph outputs of one
onnxruntime run, and the CPU engine runs launch by launch so that each region's output is read from the arena
right after its last launch (the memory plan reuses arena space, so after the whole run it may be gone).

Metrics are computed in float64 on flattened arrays: max |got - ref|, rel-L2 = ||got - ref|| / ||ref||, and the
cosine of got and ref. This module imports onnx, onnxruntime, torch and transformers only when it needs them;
the runtime never imports it."""

import hashlib
import math
import os
import tempfile

import numpy as np

from flashrt.errors import DeviceError, FlashRTError, ModelError

__all__ = ["compare", "max_abs", "rel_l2", "cosine", "metrics", "within", "judge"]

SEED = 0
# transformers inputs and outputs an engine built from a safetensors checkpoint may have
HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
HF_OUTPUTS = ("last_hidden_state", "logits")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
_READABLE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32,
             "int64": np.int64, "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


# ---- metrics ------------------------------------------------------------------------------------------------


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1)


def max_abs(got, ref) -> float:
    """max |got - ref| (NaN if either holds a NaN)."""
    a, b = _f64(got), _f64(ref)
    if a.size == 0:
        return 0.0
    with np.errstate(all="ignore"):
        return float(np.max(np.abs(a - b)))


def rel_l2(got, ref) -> float:
    """||got - ref|| / ||ref||; 0 when both are zero, inf when only ref is."""
    a, b = _f64(got), _f64(ref)
    with np.errstate(all="ignore"):
        num, den = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def cosine(got, ref) -> float:
    """got . ref / (|got| |ref|); 1 when both are zero, 0 when only one is."""
    a, b = _f64(got), _f64(ref)
    with np.errstate(all="ignore"):
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 or nb == 0.0:
            return 1.0 if na == nb else 0.0
        return float(np.dot(a, b) / (na * nb))


def metrics(got, ref) -> dict:
    b = _f64(ref)
    with np.errstate(all="ignore"):
        ref_max = float(np.max(np.abs(b))) if b.size else 0.0
    return {"max_abs": max_abs(got, ref), "rel_l2": rel_l2(got, ref), "cosine": cosine(got, ref),
            "ref_max_abs": ref_max, "finite": bool(np.isfinite(_f64(got)).all())}


def within(m: dict, rtol: float | None = None, atol: float | None = None, min_cosine: float | None = None):
    """Whether one entry's metrics meet the tolerances: max_abs <= atol + rtol * max|ref| (when rtol or atol is
    given) and cosine >= min_cosine (when given). None when no tolerance is given. NaN never passes."""
    if rtol is None and atol is None and min_cosine is None:
        return None
    ok = True
    if rtol is not None or atol is not None:
        limit = (atol or 0.0) + (rtol or 0.0) * m["ref_max_abs"]
        ok = ok and m["max_abs"] <= limit  # False for NaN
    if min_cosine is not None:
        ok = ok and m["cosine"] >= min_cosine
    return bool(ok)


def judge(result: dict, rtol: float | None = None, atol: float | None = None,
          min_cosine: float | None = None) -> bool | None:
    """Mark every output and region of a compare() result with "passed" (True/False, or None without
    tolerances) and record the tolerances; returns whether every output passed (None without tolerances).
    Regions are marked for information: the verdict is the outputs'."""
    result["tolerances"] = {"rtol": rtol, "atol": atol, "min_cosine": min_cosine}
    for entry in result["outputs"] + result.get("regions", []):
        if "skipped" not in entry:
            entry["passed"] = within(entry, rtol, atol, min_cosine)
    verdicts = [e["passed"] for e in result["outputs"]]
    result["passed"] = None if not verdicts or verdicts[0] is None else all(verdicts)
    return result["passed"]


# ---- the source model ---------------------------------------------------------------------------------------


def _kind(model: str) -> str:
    lower = model.lower()
    if not os.path.exists(model):
        raise ModelError(f"{model}: no such model file or folder")
    if os.path.isdir(model) or lower.endswith((".safetensors", ".safetensors.index.json")):
        return "safetensors"
    if os.path.isfile(model) and lower.endswith(".onnx"):
        return "onnx"
    raise ModelError(f"{model}: unrecognized model format; compare takes an .onnx file, a .safetensors file (with "
                     "--config) or a checkpoint folder (config.json + *.safetensors)")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _onnx_values(model) -> tuple[set, dict]:
    """Names computed by a node of the graph, and the type info shape inference gives for them."""
    import onnx

    produced = {name for node in model.graph.node for name in node.output if name}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # inference is only a nicety here: onnxruntime accepts untyped outputs
        inferred = []
    return produced, {vi.name: vi for vi in inferred}


def _onnx_session(path: str, extra: list[str], inferred: dict, model=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # basic rewrites only (constant folding, no-op removal): no fused approximations in the reference
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    providers = ["CPUExecutionProvider"]
    try:
        if not extra:
            return ort.InferenceSession(path, opts, providers=providers)
        import onnx

        for name in extra:  # typed where shape inference knew the value; onnxruntime accepts untyped ones
            model.graph.output.extend([inferred[name] if name in inferred else onnx.ValueInfoProto(name=name)])
        if model.ByteSize() < (1 << 31) - (64 << 20):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="flashrt-compare-") as tmp:  # past protobuf's 2 GB: external data
            onnx.save_model(model, os.path.join(tmp, "model.onnx"), save_as_external_data=True,
                            location="model.onnx.data")
            return ort.InferenceSession(os.path.join(tmp, "model.onnx"), opts, providers=providers)
    except Exception as e:
        raise ModelError(f"{path}: onnxruntime cannot load the model ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


def _run_onnx(path: str, feeds: dict, extra_candidates: list[str]) -> tuple[dict, set, str, list[str]]:
    """(source values by name, the names of extra_candidates that are ONNX values, a description, the model's
    own outputs)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("comparing with an ONNX model needs onnxruntime: pip install onnxruntime") from None
    model, known, inferred = None, set(), {}
    if extra_candidates:
        try:
            import onnx

            model = onnx.load(path)
        except ImportError:
            raise ModelError("--per-region needs the onnx package: pip install onnx") from None
        except Exception as e:
            raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:160]})") from None
        produced, inferred = _onnx_values(model)
        outputs = [o.name for o in model.graph.output]
        known = {n for n in extra_candidates if n in produced}
        extra = sorted(n for n in known if n not in outputs)
    else:
        extra, outputs = [], None
    sess = _onnx_session(path, extra, inferred, model)
    ort_feeds = {}
    missing = []
    for i in sess.get_inputs():
        if i.name not in feeds:
            missing.append(i.name)
            continue
        arr = feeds[i.name]
        want = _ORT_DTYPES.get(i.type)
        ort_feeds[i.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    if missing:
        raise ModelError(f"{path}: the model takes input(s) {missing} that the engine does not have "
                         f"(engine inputs: {sorted(feeds)})")
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, ort_feeds)
    except Exception as e:
        raise ModelError(f"{path}: onnxruntime failed to run the model ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    own = outputs if outputs is not None else names
    return dict(zip(names, values)), known, f"onnxruntime {ort.__version__} (CPUExecutionProvider)", own


def _hf_folder(model: str, config: str | None, tmp: str) -> tuple[str, list[str]]:
    """A folder transformers' from_pretrained reads (symlinks in tmp to the config and the weight files, as
    flashrt build finds them), and the files to hash."""
    from flashrt.aot.importers.safetensors_import import _locate

    cfg, ck, files = _locate(model, config)
    os.symlink(os.path.abspath(cfg), os.path.join(tmp, "config.json"))
    if ck.index:
        os.symlink(os.path.abspath(ck.index), os.path.join(tmp, "model.safetensors.index.json"))
        for f in ck.files:
            os.symlink(os.path.abspath(f), os.path.join(tmp, os.path.basename(f)))
    elif len(ck.files) == 1:
        os.symlink(os.path.abspath(ck.files[0]), os.path.join(tmp, "model.safetensors"))
    else:
        raise ModelError(f"{model}: several .safetensors files and no model.safetensors.index.json; transformers "
                         "cannot load that checkpoint")
    return tmp, files


def _sane_defaults(feeds: dict, vocab: int | None = None) -> tuple[dict, str]:
    """The seeded inputs, made meaningful where a name says what an input is: no padding (attention_mask ones),
    token type 0, ids inside the vocabulary when it is known (the generic random integers 0..7 would mask at
    random and index past small tables). Returns the inputs and what was changed."""
    rng = np.random.default_rng(SEED)
    out, changed = dict(feeds), []
    for name, arr in feeds.items():
        if arr.dtype.kind not in "iu":
            continue
        if name == "input_ids" and vocab:
            out[name] = rng.integers(0, int(vocab), arr.shape).astype(arr.dtype)
            changed.append(f"input_ids < {vocab}")
        elif name == "attention_mask":
            out[name] = np.ones_like(arr)
            changed.append("attention_mask 1")
        elif name == "token_type_ids":
            out[name] = np.zeros_like(arr)
            changed.append("token_type_ids 0")
    return out, ", ".join(changed)


def _load_hf(folder: str, want_logits: bool):
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelError("comparing with a safetensors checkpoint needs torch and transformers: "
                         "pip install torch transformers") from None
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder)
        archs = [a for a in (getattr(hf_config, "architectures", None) or []) if hasattr(transformers, a)]
        if archs:
            cls = getattr(transformers, archs[0])
        else:
            cls = transformers.AutoModelForCausalLM if want_logits else transformers.AutoModel
        model = cls.from_pretrained(folder, attn_implementation="eager")
    except Exception as e:
        raise ModelError(f"transformers cannot load the checkpoint ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    model = model.float().eval()
    return torch, transformers, model, hf_config


def _run_hf(torch, model, feeds: dict, names: list[str]) -> dict:
    args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    base = model.base_model
    if "pixel_values" in args and hasattr(model, "vision_model") and hasattr(model, "text_model"):
        base = model.vision_model  # a full SigLIP checkpoint: flashrt builds its vision tower
    out = {}
    try:
        with torch.no_grad():
            if "last_hidden_state" in names:
                out["last_hidden_state"] = base(**args).last_hidden_state.float().numpy()
            if "logits" in names:
                if not hasattr(model, "lm_head"):
                    raise ModelError(f"the engine has an output 'logits' but {type(model).__name__} has no lm_head")
                out["logits"] = model(**args).logits.float().numpy()
    except FlashRTError:
        raise
    except Exception as e:
        raise ModelError(f"{type(model).__name__} failed to run ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    return out


# ---- the engine ---------------------------------------------------------------------------------------------


def _arena_value(arena: np.ndarray, out: dict):
    """A region's output read from the arena as float32 (bfloat16 decoded), or None for a dtype not decoded."""
    from flashrt.kernels.dtypes import bf16_to_f32

    dt = _READABLE.get(out.get("dtype"))
    if dt is None:
        return None
    count = math.prod(out["shape"])
    start = int(out["offset"])
    raw = arena[start:start + count * np.dtype(dt).itemsize]
    if raw.size != count * np.dtype(dt).itemsize:
        return None
    arr = raw.view(dt).reshape(out["shape"])
    return bf16_to_f32(arr) if out["dtype"] == "bfloat16" else arr.copy()


def _run_stepwise(eng, feeds: dict, snapshot_after: dict) -> tuple[dict, dict]:
    """Run a CPU engine; (outputs, region index -> its output read right after its last launch)."""
    regions = eng.manifest["regions"]
    snaps = {}

    def snapshot(i: int) -> None:
        for r in snapshot_after.get(i, ()):
            snaps[r] = _arena_value(eng.arena, regions[r]["output"])

    return eng.run(feeds, after_launch=snapshot), snaps


def _entry(name: str, got: np.ndarray, ref: np.ndarray) -> dict:
    return dict({"name": name, "shape": list(got.shape), "dtype": str(got.dtype)}, **metrics(got, ref))


# ---- compare ------------------------------------------------------------------------------------------------


def compare(model: str, engine_path: str, inputs: dict | None = None, device: str = "cpu",
            per_region: bool = False, config: str | None = None) -> dict:
    """Run the source `model` and the engine at `engine_path` (on `device`) on `inputs` (default: the engine's
    seeded example inputs) and measure each output's error; with per_region (device "cpu", ONNX sources) also
    each region's output. Returns {"model", "engine", "device", "source", "precision", "inputs", "outputs",
    "regions" (with per_region), "notes"}; each output and region entry has max_abs, rel_l2, cosine,
    ref_max_abs and finite, or "skipped" with the reason."""
    import flashrt

    if device not in ("cpu", "cuda"):
        raise FlashRTError(f"--device {device}: expected cpu or cuda")
    if per_region and device != "cpu":
        raise FlashRTError("--per-region reads every region's output from the CPU reference executor's arena; "
                           "it runs with --device cpu only")
    if config is not None and not (os.path.isdir(model) or model.lower().endswith((".safetensors", ".json"))):
        raise FlashRTError(f"--config {config}: applies to safetensors checkpoints, not to {model}")
    kind = _kind(model)
    if not os.path.isfile(engine_path):
        raise FlashRTError(f"{engine_path}: no such engine file")
    try:
        eng = flashrt.load(engine_path, device=device)
    except FlashRTError:
        raise
    except Exception as e:  # no driver, no GPU: the loader's own failure, as one line
        raise DeviceError(f"--device {device}: cannot run {engine_path} here ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    try:
        return _compare(model, kind, eng, engine_path, inputs, device, per_region, config)
    finally:
        close = getattr(eng, "close", None)
        if close is not None:
            close()


def _compare(model, kind, eng, engine_path, inputs, device, per_region, config) -> dict:
    manifest = eng.manifest
    prov = manifest.get("provenance", {})
    notes = []
    given = inputs is not None
    feeds = dict(inputs) if given else eng.example_inputs(SEED)
    eng.check_inputs(feeds)  # names, dtypes and shapes, before any source model runs
    out_names = [t.name for t in eng.outputs]
    regions = manifest.get("regions", []) if per_region else []
    wanted = [r["output"]["value"] for r in regions if isinstance(r.get("output"), dict)]

    def other_source(sha: str) -> str:
        """Why, when the engine's provenance names another source, or ''."""
        if prov.get("source_sha256") and prov["source_sha256"] != sha:
            return (f"the engine's provenance records a different source ({prov.get('source_name')}, sha256 "
                    f"{prov['source_sha256'][:12]}…; this model's is {sha[:12]}…)")
        return ""

    def hinted(e: ModelError, why: str) -> ModelError:
        return ModelError(f"{e}; note: {why}") if why else e

    changed = ""
    if kind == "onnx":
        if not given:
            feeds, changed = _sane_defaults(feeds)
        why = other_source(_file_sha256(model))
        try:
            source_values, known, source, own = _run_onnx(model, feeds, wanted)
            missing = [n for n in out_names if n not in own]
            if missing:
                raise ModelError(f"{model}: the engine's output(s) {missing} are not outputs of the model "
                                 f"(its outputs: {own})")
        except ModelError as e:
            raise hinted(e, why) from None
        source += ", fp32"
    else:
        from flashrt.aot.importers.safetensors_import import _sha256

        with tempfile.TemporaryDirectory(prefix="flashrt-compare-") as tmp:
            folder, files = _hf_folder(model, config, tmp)
            why = other_source(_sha256(files))
            try:
                unknown = [t.name for t in eng.inputs if t.name not in HF_INPUTS]
                if unknown:
                    raise ModelError(f"{engine_path}: input(s) {unknown} have no transformers counterpart (compare "
                                     f"maps {', '.join(HF_INPUTS)})")
                unknown = [n for n in out_names if n not in HF_OUTPUTS]
                if unknown:
                    raise ModelError(f"{engine_path}: output(s) {unknown} have no transformers counterpart "
                                     f"(compare maps {', '.join(HF_OUTPUTS)})")
                torch, transformers, hf_model, hf_config = _load_hf(folder, "logits" in out_names)
                if not given:
                    vocab = getattr(hf_config, "vocab_size", None)
                    feeds, changed = _sane_defaults(feeds, vocab if isinstance(vocab, int) else None)
                source_values = _run_hf(torch, hf_model, feeds, out_names)
            except ModelError as e:
                raise hinted(e, why) from None
        source = f"transformers {transformers.__version__} {type(hf_model).__name__} (fp32, eager attention)"
        known = set()
        if per_region:
            notes.append("--per-region: region values have no counterpart in a PyTorch model; "
                         "comparing the final outputs only")
            regions = []
    if why:
        notes.append(why)

    # the engine
    snapshot_after: dict[int, list[int]] = {}
    for j, r in enumerate(regions):
        out = r.get("output")
        if isinstance(out, dict) and out.get("value") in known and r.get("launches"):
            snapshot_after.setdefault(max(r["launches"]), []).append(j)
    if per_region:
        got, snaps = _run_stepwise(eng, feeds, snapshot_after)
    else:
        got, snaps = eng.run(feeds), {}

    result = {"model": model, "engine": engine_path, "device": device, "source": source,
              "precision": prov.get("precision"),
              "inputs": "given" if given else f"seeded random (seed {SEED}{'; ' + changed if changed else ''})",
              "input_shapes": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()},
              "outputs": [], "notes": notes}
    for name in out_names:
        a, ref = got[name], np.asarray(source_values[name])
        if a.size != ref.size:
            raise ModelError(f"output '{name}': the engine gives shape {list(a.shape)}, the source "
                             f"{list(ref.shape)}")
        result["outputs"].append(_entry(name, a, ref))
    if per_region and kind == "onnx":
        result["regions"] = []
        for j, r in enumerate(regions):
            out = r.get("output") if isinstance(r.get("output"), dict) else {}
            value = out.get("value")
            base = {"name": value, "region": r.get("name"), "kind": r.get("kind"), "precision": r.get("precision"),
                    "launch": max(r["launches"]) if r.get("launches") else None}
            if value not in known and "/merged" in str(value):
                result["regions"].append(dict(base, skipped="several source MatMuls merged into one GEMM (aot/passes.py"
                                                           " merge_sibling_matmuls); their values are its slices"))
                continue
            if value not in known:
                result["regions"].append(dict(base, skipped="not a value of the source model"))
                continue
            a = snaps.get(j)
            ref = np.asarray(source_values[value])
            if a is None:
                reason = f"arena dtype {out.get('dtype')} not decoded" if j in snaps else "no launch"
                result["regions"].append(dict(base, skipped=reason))
            elif a.size != ref.size:
                result["regions"].append(dict(base, skipped=f"engine shape {list(a.shape)}, source shape "
                                                            f"{list(ref.shape)}"))
            else:
                result["regions"].append(dict(_entry(value, a, ref), **base))
    return result
