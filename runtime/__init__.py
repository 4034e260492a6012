"""The engine loader: `load(path, device)` -> an engine with run(); needs only numpy (and cuda-bindings
for device="cuda"). Imports nothing from the compiler."""

import os

from flashrt.errors import FlashRTError


def load(path: str | os.PathLike, device: str = "cuda"):
    from flashrt.engine_format.reader import read_engine

    engine_file = read_engine(path)
    if device == "cpu":
        from flashrt.runtime.cpu import CPUEngine

        return CPUEngine(engine_file)
    if device == "cuda" or device.startswith("cuda:"):
        from flashrt.runtime.cuda import CUDAEngine

        ordinal = int(device.split(":", 1)[1]) if ":" in device else 0
        return CUDAEngine(engine_file, ordinal)
    raise FlashRTError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


__all__ = ["load"]
