"""Build targets: product names and the GPU architectures their cubins are built for."""

import os
import re

from flashrt.errors import BuildError
from flashrt.kernels.prefetch import FAMILIES

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


def sm_number(arch: str) -> int:
    """'sm_90a' -> 90, 'sm_110a' -> 110."""
    return int(re.match(r"\d+", arch_number(arch)).group())


def fp8_mma(arch: str) -> str:
    """How an E4M3 mma.sync (m16n8k32) runs on arch, read off ptxas's SASS: "native" (QMMA: sm_89, sm_120,
    sm_121), "converted" (sm_90, sm_100, sm_103, sm_110: ptxas widens the fragments to f16 for HMMA; FP8 at full
    rate there takes FP8 wgmma (QGMMA, with FP8 activations) / tcgen05, which flashrt does not generate yet), or
    "none" (before sm_89)."""
    sm = sm_number(arch)
    if sm < 89:
        return "none"
    return "native" if sm == 89 or sm // 10 == 12 else "converted"


def wgmma_enabled(archs: list[str]) -> bool:
    """Whether GEMMs may use the sm_90a wgmma kernel (kernels/cuda/gemm_wgmma.cuh): when every target is sm_90a
    (wgmma exists nowhere else), unless FLASHRT_WGMMA=0 at build time (the mma.sync kernels, for comparison)."""
    return os.environ.get("FLASHRT_WGMMA") != "0" and bool(archs) and all(a == "sm_90a" for a in archs)


def wgmma_fp8_enabled(archs: list[str]) -> bool:
    """Whether the wgmma GEMM also takes fp8 weights (decoded to 16 bits in shared memory; run on an H100 on
    2026-12-07: within 14% of bf16, where mma.sync's fp8 path took 1.3-1.7x). FLASHRT_WGMMA_FP8=0 keeps fp8
    weights on mma.sync (for comparison)."""
    return wgmma_enabled(archs) and os.environ.get("FLASHRT_WGMMA_FP8") != "0"


def wgmma_nvfp4_enabled(archs: list[str]) -> bool:
    """Whether the wgmma GEMM also takes nvfp4 weights (E2M1 x block scale decoded to 16 bits in shared memory,
    as the fp8 path): opt-in with FLASHRT_WGMMA_NVFP4=1 until it has run on a GPU."""
    return wgmma_enabled(archs) and os.environ.get("FLASHRT_WGMMA_NVFP4") == "1"


def fused_mlp_enabled() -> bool:
    """Whether decode MLPs fuse the down projection into the gated GEMV (kernels/gemm.py `down`; off:
    FLASHRT_FUSE_MLP=0, for measuring what the fusion gains)."""
    return os.environ.get("FLASHRT_FUSE_MLP", "1") != "0"


def mlp_gated_rows(default: int) -> int:
    """Weight rows per warp (R) of a gated GEMV with the down projection fused in (FLASHRT_MLP_R=2 or 4 to
    measure the other)."""
    value = os.environ.get("FLASHRT_MLP_R")
    return int(value) if value in ("2", "4") else default


def fused_oproj_enabled() -> bool:
    """Whether one-token attention fuses the o-projection that follows it (kernels/attention.py `oproj`; run on an
    H100 2026-12-07 with the prefetch below: decode 0.874 -> 0.758 ms, benchmarks/NOTES.md v13). FLASHRT_FUSE_OPROJ=0
    keeps the o-projection a GEMV of its own (for A/B timing); --deterministic too."""
    return os.environ.get("FLASHRT_FUSE_OPROJ", "1") != "0"


def attention_prefetch_enabled() -> bool:
    """Whether dynamic-length attention prefetches the cached rows before pos into L2 before it waits
    (kernels/attention.py `prefetch`; FLASHRT_ATTN_PREFETCH=0: not, for A/B timing)."""
    return os.environ.get("FLASHRT_ATTN_PREFETCH", "1") != "0"


# L2 bytes of the smallest part of each architecture flashrt targets (H100 / H200 50 MB; Jetson Thor 32 MiB, as
# its driver reports it; the RTX 50 series 32 to 96 MB; B200 126 MB)
L2_BYTES = {"sm_90a": 50 << 20, "sm_100a": 126 << 20, "sm_110a": 32 << 20, "sm_120a": 32 << 20}


def l2_prefetch_hosts() -> tuple[str, ...]:
    """The kernel families that may prefetch later weights (FLASHRT_L2_PREFETCH_HOSTS=attention,gemv,...; default
    all that can). Attention alone, for example, streams the MLP's weights while its own DRAM traffic is light
    (benchmarks/NOTES.md v14)."""
    value = os.environ.get("FLASHRT_L2_PREFETCH_HOSTS")
    if not value:
        return FAMILIES
    hosts = tuple(h.strip() for h in value.split(","))
    if not set(hosts) <= set(FAMILIES):
        raise BuildError(f"FLASHRT_L2_PREFETCH_HOSTS={value!r}: expected a comma-separated subset of "
                         f"{', '.join(FAMILIES)}")
    return hosts


def l2_prefetch_budget(archs: list[str]) -> int:
    """Bytes of later launches' weights that may sit in L2 ahead of use (aot/prefetch.py; 0: none):
    FLASHRT_L2_PREFETCH_MB MiB (at most the smallest target's L2), or with "auto" half of it. Opt-in: measured
    without gain so far (benchmarks/NOTES.md v14); sm_90+ only (the bulk L2 prefetch instruction)."""
    value = os.environ.get("FLASHRT_L2_PREFETCH_MB", "0").strip()
    if value != "auto" and not value.isdigit():
        raise BuildError(f"FLASHRT_L2_PREFETCH_MB={value!r}: expected a whole number of MiB or 'auto'")
    if not archs or any(sm_number(a) < 90 for a in archs):
        return 0
    l2 = min(L2_BYTES.get(a, 32 << 20) for a in archs)
    return l2 // 2 if value == "auto" else min(int(value) << 20, l2)
