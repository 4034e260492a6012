"""Build targets: product names and the GPU architectures their cubins are built for."""

import re

from flashrt.errors import BuildError

TARGETS = {
    "thor": ("sm_110a", "NVIDIA Jetson Thor (Blackwell)"),
    "rtx5090": ("sm_120a", "NVIDIA GeForce RTX 5090 (Blackwell)"),
    "b200": ("sm_100a", "NVIDIA B200 (Blackwell)"),
    "h100": ("sm_90a", "NVIDIA H100 (Hopper)"),
    "h200": ("sm_90a", "NVIDIA H200 (Hopper)"),
    "l40s": ("sm_89", "NVIDIA L40S (Ada)"),
    "a100": ("sm_80", "NVIDIA A100 (Ampere)"),
}
_ARCH = re.compile(r"sm_(\d{2,3})(a?)")


def resolve_target(name: str) -> str:
    """A --target value (product name or raw sm_XX[a]) -> the architecture name."""
    key = name.strip().lower()
    if key in TARGETS:
        return TARGETS[key][0]
    m = _ARCH.fullmatch(key)
    if m and int(m.group(1)) >= 75:
        return key
    raise BuildError(f"unknown --target {name!r}; use one of {', '.join(TARGETS)} or an architecture "
                     "such as sm_90a (see `flashrt targets`)")


def arch_number(arch: str) -> str:
    """'sm_90a' -> '90a'."""
    return arch[3:]
