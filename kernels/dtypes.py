"""Storage dtypes of engine tensors, and exact float32 <-> storage conversions in numpy.

bfloat16 is stored as uint16 (the upper half of a float32) so that the runtime needs no ml_dtypes;
rounding is to nearest-even, as the GPU's cvt.rn instructions do."""

import numpy as np

CTYPES = {"float32": "float", "bfloat16": "bf16_t", "float16": "f16_t", "int64": "long long", "int32": "int",
          "int8": "signed char", "uint8": "unsigned char", "bool": "bool_t", "fp8_e4m3": "fp8_t",
          "nvfp4": "nvfp4x2_t"}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8, "uint8": 1, "int8": 1, "bool": 1,
            "fp8_e4m3": 1, "nvfp4": 1}  # nvfp4: one byte holds two values
STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16, "int32": np.int32,
           "int64": np.int64, "uint8": np.uint8, "int8": np.int8, "bool": np.bool_, "fp8_e4m3": np.uint8,
           "nvfp4": np.uint8}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), rounded).astype(np.uint16)


def to_f32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a stored array as float32."""
    if dtype == "bfloat16":
        return bf16_to_f32(stored)
    return stored.astype(np.float32)


def from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values converted to a storage dtype, as the kernels store them: floats rounded to nearest
    even, integers truncated toward zero (saturating), bool as x != 0."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        return f32_to_bf16(x)
    if dtype == "bool":
        return x != 0
    if dtype in ("float32", "float16"):
        return x.astype(STORAGE[dtype])
    info = np.iinfo(STORAGE[dtype])
    with np.errstate(invalid="ignore"):
        t = np.nan_to_num(np.trunc(x), nan=0.0).astype(np.float64)
    return np.clip(t, info.min, info.max).astype(STORAGE[dtype])
