"""FlashRT: an ahead-of-time compiler of batch-1 inference engines, and their loader."""

from flashrt.errors import EngineFormatError, FlashRTError

__version__ = "0.1.0"


def load(path, device: str = "cuda"):
    """Load an engine file; `device` is "cuda" (the GPU loader) or "cpu" (the reference executor)."""
    from flashrt.runtime import load as _load

    return _load(path, device=device)


__all__ = ["load", "FlashRTError", "EngineFormatError", "__version__"]
