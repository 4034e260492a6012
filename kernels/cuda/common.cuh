// Shared device helpers for FlashRT kernels: storage types, exact conversions, math.
// Conversions use the PTX cvt instructions with round-to-nearest-even, which the numpy references
// reproduce bit for bit (flashrt/kernels/dtypes.py).
#pragma once

struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((unsigned)v.x) << 16); }
__device__ __forceinline__ float to_float(f16_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
  return f;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
  bf16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
  return r;
}
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float v) {
  f16_t r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
  return r;
}

__device__ __forceinline__ float frt_relu(float x) { return x < 0.f ? 0.f : x; }
__device__ __forceinline__ float frt_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float frt_gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
