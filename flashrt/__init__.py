"""FlashRT: an ahead-of-time compiler of batch-1 inference engines, and their loader."""

import os as _os

# Running from a source checkout without installing (PYTHONPATH=.): the subpackages are the top-level
# folders beside this one, as pyproject's package-dir maps them for an install.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "aot")) and _os.path.isfile(
        _os.path.join(_root, "engine_format", "SPEC.md")):
    __path__.append(_root)

from flashrt.errors import EngineFormatError, FlashRTError  # noqa: E402

__version__ = "0.1.0"


def load(path, device: str = "cuda"):
    """Load an engine file; `device` is "cuda" (the GPU loader) or "cpu" (the reference executor)."""
    from flashrt.runtime import load as _load

    return _load(path, device=device)


__all__ = ["load", "FlashRTError", "EngineFormatError", "__version__"]
