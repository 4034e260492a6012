"""Errors a user can act on. Each message is one line naming the input, node, field or file at fault."""


class FlashRTError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ModelError(FlashRTError):
    """The source model is malformed or uses something the compiler does not support."""


class BuildError(FlashRTError):
    """The build could not finish (toolchain missing, compile failure, bad option)."""


class EngineFormatError(FlashRTError):
    """An engine file is damaged, truncated, hostile or of an unreadable version."""


class InputError(FlashRTError):
    """The inputs given to an engine do not match its signature."""


class DeviceError(FlashRTError):
    """The device cannot run this engine (no cubin for it, driver too old, CUDA failure)."""
