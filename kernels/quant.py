"""Low-precision weight formats, decoded exactly in numpy (no ml_dtypes, so the runtime can use them):

  fp8     FP8 E4M3 (OCP "fn": no infinities, 0x7F/0xFF NaN), one float32 scale per output channel:
          W[n, k] = e4m3(q[n, k]) * scale[n]
  nvfp4   NVFP4 as TensorRT / ModelOpt define it: E2M1 values packed two per byte (the first value in the
          low nibble), one E4M3 scale per 16 consecutive values along K, one float32 global scale:
          W[n, k] = e2m1(q[n, k]) * e4m3(block[n, k // 16]) * global
Weights are stored [N, K] (K contiguous), as the GEMV streams them.

Activations (a GEMM's A operand, quantized by the GEMM itself while it stages A; see kernels/gemm.py's `aq`):
  fp8 tensor   one static float32 scale s (from calibration, or the model's QuantizeLinear):  A' = e4m3(A / s) * s
  fp8 row      one scale per row, computed at run time: s[m] = max_k |A[m, k]| / 448 (1 for an all-zero row)
  nvfp4        NVFP4 as TensorRT's TRT_FP4DynamicQuantize computes it: per 16 values along K a block scale
               b = e4m3(max |A| / 6 / g) computed at run time, with the static float32 global scale g;
               A' = e2m1(A / (b g)) * (b g)
The GEMM multiplies the E4M3 (E2M1 x E4M3) values and applies s (g) to the float32 sums."""

import numpy as np

from flashrt.kernels.expr import _e4m3

NVFP4_BLOCK = 16
FP8_MAX = 448.0
E2M1_MAX = 6.0


def _e4m3_table() -> np.ndarray:
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return (sign * value).astype(np.float32)


E4M3 = _e4m3_table()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


ACT_QUANT = ("tensor", "row", "nvfp4")  # kernels/gemm.py params["aq"]
SCALED_ACT_QUANT = ("tensor", "nvfp4")  # those with a static scale argument, a_scale


def act_row_scales(x: np.ndarray) -> np.ndarray:
    """Per-row FP8 scales of x [..., K]: max |x| over the last axis (NaN ignored, as the kernels' fmaxf from 0
    does) / 448, and 1 where that is 0 (an all-zero row, or one whose max underflows). Shape [..., 1]."""
    amax = np.fmax.reduce(np.abs(np.asarray(x, np.float32)), axis=-1, keepdims=True, initial=np.float32(0))
    scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def fake_quant_act(x: np.ndarray, scale) -> np.ndarray:
    """e4m3(x / scale) * scale in float32: an activation as an FP8 GEMM sees it (scale broadcasts)."""
    x, scale = np.asarray(x, np.float32), np.asarray(scale, np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return (_e4m3(x / scale) * scale).astype(np.float32)


def e2m1_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest E2M1 value (ties to even), saturating at +-6; NaN stays NaN. Exact: the quantum of
    |x|'s binade (0.5 below 2, then 1, then 2) scales x to an integer grid that rint rounds."""
    x = np.asarray(x, np.float32)
    c = np.clip(x, np.float32(-E2M1_MAX), np.float32(E2M1_MAX))
    _, e = np.frexp(c)  # floor(log2 |c|) = e - 1
    s = np.maximum(e - 1, 0) - 1
    return np.ldexp(np.rint(np.ldexp(c, -s)), s).astype(np.float32)


def fake_quant_nvfp4_act(x: np.ndarray, global_scale) -> np.ndarray:
    """x [..., K] (K % 16 == 0) as an NVFP4 activation: per 16 values along the last axis, the E4M3 block scale
    of max |x| / 6 / global, then E2M1 values times (block scale x global), in float32."""
    x = np.asarray(x, np.float32)
    g = np.float32(global_scale)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = np.fmax.reduce(np.abs(blocks), axis=-1, keepdims=True, initial=np.float32(0))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = (_e4m3(amax / np.float32(E2M1_MAX) / g) * g).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1))
        return (e2m1_round(blocks / scale) * scale).astype(np.float32).reshape(x.shape)


def dequant_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q uint8 [N, K], scale float32 [N] -> float32 [N, K]."""
    return E4M3[q] * scale.reshape(-1, 1)


def unpack_e2m1(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> E2M1 values as float32 [N, K] (low nibble first)."""
    lo, hi = E2M1[packed & 0xF], E2M1[packed >> 4]
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)


def dequant_nvfp4(packed: np.ndarray, block: np.ndarray, global_scale: float) -> np.ndarray:
    """packed uint8 [N, K/2], block uint8 (E4M3) [N, K/16], global float -> float32 [N, K]."""
    values = unpack_e2m1(packed)
    scales = np.repeat(E4M3[block], NVFP4_BLOCK, axis=1)
    return (values * scales * np.float32(global_scale)).astype(np.float32)
