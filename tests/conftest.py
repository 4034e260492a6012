import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import flashrt  # noqa: F401  (before the checkout's root leaves sys.path, below)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

# `python -m pytest` (and PYTHONPATH=.) put the checkout's root on sys.path, where its folders `kernels`, `runtime`
# and `aot` (flashrt.kernels, ... once installed) shadow packages of those names: transformers imports
# Hugging Face's `kernels`. flashrt is imported first, so its subpackages no longer need the root there.
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]


def cuda_device_arch():
    """The GPU's sm_XX name, or None where no GPU (or no cuda-bindings) is present."""
    try:
        from flashrt.runtime.cuda import device_arch

        major, minor = device_arch(0)
    except Exception:
        return None
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


GPU_ARCH = cuda_device_arch()
requires_gpu = pytest.mark.skipif(GPU_ARCH is None, reason="no NVIDIA GPU here")


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, else from the nvidia-cuda-cuobjdump wheel (the test extras), with the nvdisasm it runs
    (NVDISASM_PATH where that is a wheel's); None where either is missing."""
    from flashrt.aot.codegen import wheel_tool

    exe = shutil.which("cuobjdump") or wheel_tool("cuobjdump")
    disasm = shutil.which("nvdisasm") or wheel_tool("nvdisasm")
    if exe is None or disasm is None:
        return None
    if not shutil.which("nvdisasm"):
        os.environ["NVDISASM_PATH"] = os.path.dirname(disasm)
    return exe


CUOBJDUMP = _cuobjdump()
requires_cuobjdump = pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump / nvdisasm to read the SASS")


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    """The sample models, freshly written (the checked-in copies are what README's command uses)."""
    import sys

    sys.path.insert(0, str(SAMPLES))
    import make_models

    out = tmp_path_factory.mktemp("samples")
    make_models.write(make_models.tiny_encoder(), str(out / "tiny_encoder.onnx"))
    make_models.write(make_models.mlp(), str(out / "mlp.onnx"))
    return out


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def onnxruntime_outputs(model: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def flashrt_cli() -> list[str]:
    exe = shutil.which("flashrt")
    return [exe] if exe else [os.sys.executable, "-m", "flashrt.cli.main"]
