"""Weight quantization (build time, ml_dtypes): FP8 E4M3 with per-output-channel scales, and NVFP4 (E2M1
values, E4M3 scales per 16 values along K, a float32 global scale). The layouts and decodings are in
kernels/quant.py; this file only encodes, with round-to-nearest-even as the hardware converts."""

from dataclasses import dataclass, field

import numpy as np

from flashrt.kernels.quant import E2M1_MAX, FP8_MAX, NVFP4_BLOCK


def _e4m3_bits(x: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.clip(x, -FP8_MAX, FP8_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w float [N, K] -> (q uint8 [N, K], scale float32 [N]) with the row's max |w| mapped to 448."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    return _e4m3_bits(w / scale[:, None]), scale


def quantize_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """w float [N, K], K % 16 == 0 -> (packed uint8 [N, K/2], block scales uint8 E4M3 [N, K/16], global)."""
    import ml_dtypes

    w = np.asarray(w, np.float32)
    n, k = w.shape
    amax = float(np.abs(w).max())
    global_scale = np.float32(amax / (E2M1_MAX * FP8_MAX)) if amax > 0 else np.float32(1.0)
    blocks = w.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = np.abs(blocks).max(axis=2)
    block_bits = _e4m3_bits(block_amax / E2M1_MAX / global_scale)
    from flashrt.kernels.quant import E4M3

    block_scale = E4M3[block_bits] * global_scale  # the scale the kernel will use, after E4M3 rounding
    safe = np.where(block_scale > 0, block_scale, 1.0)[:, :, None]
    q = (blocks / safe).reshape(n, k)
    codes = np.clip(q, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, block_bits, float(global_scale)


def weight_key(w_nk: np.ndarray) -> tuple:
    """Identifies a float weight by its values in the engine's [N, K] orientation (robust to the renames and
    transposes that passes apply to constants)."""
    import hashlib

    w = np.ascontiguousarray(w_nk, np.float32)
    return w.shape, hashlib.sha256(w.tobytes()).hexdigest()


@dataclass
class Prequantized:
    """A weight the model already holds quantized: fmt "fp8" (data uint8 [N, K] E4M3 codes, scales [float32
    [N]]) or "nvfp4" (data packed uint8 [N, K/2], scales [E4M3 block codes uint8 [N, K/16], global float])."""
    fmt: str
    data: np.ndarray
    scales: list
    source: str  # the DequantizeLinear node


@dataclass
class PrequantTable:
    weights: dict = field(default_factory=dict)  # weight_key -> Prequantized
    warnings: list = field(default_factory=list)

    def add(self, w_nk: np.ndarray, q: Prequantized) -> None:
        self.weights[weight_key(w_nk)] = q

    def find(self, w_nk: np.ndarray) -> Prequantized | None:
        return self.weights.get(weight_key(w_nk)) if self.weights else None
