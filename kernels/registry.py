"""The kernel families: name -> module with arg_spec, launch_config, cuda_source and a numpy reference
taking the same arguments. The runtime's CPU executor uses only arg_spec and reference."""

from types import ModuleType

from flashrt.errors import EngineFormatError
from flashrt.kernels import attention, concat, eltwise, gather, gemm, gemv, layernorm, reduce, softmax, state

FAMILIES: dict[str, ModuleType] = {
    m.FAMILY: m for m in (gemm, gemv, attention, eltwise, softmax, layernorm, gather, concat, reduce, state)}


def family(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise EngineFormatError(f"unknown kernel family {name!r}; this flashrt knows {sorted(FAMILIES)}") from None
