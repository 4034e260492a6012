// Shared device helpers for FlashRT kernels: storage types, exact conversions, math.
// Conversions use the PTX cvt instructions with round-to-nearest-even, which the numpy references
// reproduce bit for bit (flashrt/kernels/dtypes.py).
#pragma once

struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };
struct bool_t { unsigned char x; };
struct fp8_t { unsigned char x; };      // FP8 E4M3 ("fn")
struct nvfp4x2_t { unsigned char x; };  // two E2M1 values, the first in the low nibble

// Exact decodings, matching flashrt/kernels/quant.py
__device__ __forceinline__ float e4m3_to_float(unsigned v) {
  const unsigned e = (v >> 3) & 15u, m = v & 7u;
  float mag = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
  if (e == 15u && m == 7u) mag = __int_as_float(0x7fc00000);
  return (v & 0x80u) ? -mag : mag;
}
__device__ __forceinline__ float e2m1_to_float(unsigned v) {
  const unsigned e = (v >> 1) & 3u, m = v & 1u;
  const float mag = e ? __uint_as_float(((e + 126u) << 23) | (m << 22)) : (float)m * 0.5f;
  return (v & 8u) ? -mag : mag;
}

// FP8 E4M3 rounding of a float (ties to even, saturating at +-448, NaN kept), as kernels/expr.py's _e4m3:
// ilogbf is floor(log2 |c|) (hugely negative for 0); ldexpf and rintf are exact
__device__ __forceinline__ float e4m3_round(float x) {
  const float c = fminf(fmaxf(x, -448.f), 448.f);
  const int s = max(ilogbf(c), -6) - 3;
  return x != x ? x : ldexpf(rintf(ldexpf(c, -s)), s);
}
// The FP8 scale of an activation row from its max |x| (kernels/quant.py act_row_scales); 1 where it would be 0
__device__ __forceinline__ float act_row_scale(float amax) {
  const float s = amax / 448.f;
  return s > 0.f ? s : 1.f;
}
// E2M1 rounding (ties to even, saturating at +-6, NaN kept), as kernels/quant.py's e2m1_round
__device__ __forceinline__ float e2m1_round(float x) {
  const float c = fminf(fmaxf(x, -6.f), 6.f);
  const int s = max(ilogbf(c), 0) - 1;
  return x != x ? x : ldexpf(rintf(ldexpf(c, -s)), s);
}
// NVFP4 activation blocks (kernels/quant.py fake_quant_nvfp4_act): the scale of a 16-value block with max |x|
// amax under global scale g is b g, b = e4m3(amax / 6 / g) (1 where b g is 0); x becomes e2m1(x / (b g)) (b g).
__device__ __forceinline__ float nvfp4_block_scale(float amax, float g) {
  const float bg = e4m3_round(amax / 6.f / g) * g;
  return bg > 0.f ? bg : 1.f;
}
__device__ __forceinline__ float nvfp4_round(float x, float bg) { return e2m1_round(x / bg) * bg; }
#if __CUDA_ARCH__ >= 890
// two floats -> two E4M3 bytes (lo in the low byte), round to nearest even, saturating
__device__ __forceinline__ unsigned short e4m3x2_bits(float lo, float hi) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((unsigned)v.x) << 16); }
__device__ __forceinline__ float to_float(f16_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
  return f;
}

__device__ __forceinline__ float to_float(bool_t v) { return v.x ? 1.f : 0.f; }
__device__ __forceinline__ float to_float(long long v) { return (float)v; }
__device__ __forceinline__ float to_float(int v) { return (float)v; }
__device__ __forceinline__ float to_float(signed char v) { return (float)v; }
__device__ __forceinline__ float to_float(unsigned char v) { return (float)v; }

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

template <> __device__ __forceinline__ bool_t from_float<bool_t>(float v) { return bool_t{(unsigned char)(v != 0.f)}; }
// float -> integer: truncation toward zero, saturating, NaN -> 0 (cvt.rzi.sat), as kernels/dtypes.py does
template <> __device__ __forceinline__ long long from_float<long long>(float v) { return v != v ? 0 : (long long)v; }
template <> __device__ __forceinline__ int from_float<int>(float v) { return v != v ? 0 : (int)v; }
template <> __device__ __forceinline__ signed char from_float<signed char>(float v) {
  return v != v ? 0 : (signed char)fminf(fmaxf(truncf(v), -128.f), 127.f);
}
template <> __device__ __forceinline__ unsigned char from_float<unsigned char>(float v) {
  return v != v ? 0 : (unsigned char)fminf(fmaxf(truncf(v), 0.f), 255.f);
}

// an integer index read from any integer storage type
__device__ __forceinline__ long long to_index(long long v) { return v; }
__device__ __forceinline__ long long to_index(int v) { return v; }
__device__ __forceinline__ long long to_index(float v) { return (long long)v; }

__device__ __forceinline__ float frt_relu(float x) { return x < 0.f ? 0.f : x; }
// fast reciprocal (2 ulp): an IEEE division's slow path is a call, which makes ptxas serialize the wgmma GEMM's
// tensor-core ops when its epilogue holds a SiLU
__device__ __forceinline__ float frt_sigmoid(float x) { return __fdividef(1.f, 1.f + expf(-x)); }
__device__ __forceinline__ float frt_gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float frt_softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

// 16-byte vectors of a storage type: how many elements, and their float values
template <typename T> struct Vec;
template <> struct Vec<float> { static constexpr int N = 4; };
template <> struct Vec<bf16_t> { static constexpr int N = 8; };
template <> struct Vec<f16_t> { static constexpr int N = 8; };
template <> struct Vec<fp8_t> { static constexpr int N = 16; };
template <> struct Vec<nvfp4x2_t> { static constexpr int N = 32; };

__device__ __forceinline__ void unpack(const uint4& v, float (&out)[4], const float*) {
  out[0] = __uint_as_float(v.x); out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z); out[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[8], const bf16_t*) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) { out[2 * i] = __uint_as_float(w[i] << 16); out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
}
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[16], const fp8_t*) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = e4m3_to_float((w[i / 4] >> (8 * (i % 4))) & 0xffu);
}
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[32], const nvfp4x2_t*) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 32; ++i) out[i] = e2m1_to_float((w[i / 8] >> (4 * (i % 8))) & 0xfu);
}
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[8], const f16_t*) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = to_float(f16_t{(unsigned short)(w[i] & 0xffffu)});
    out[2 * i + 1] = to_float(f16_t{(unsigned short)(w[i] >> 16)});
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Programmatic dependent launch (sm_90+): no-ops unless the launch allows the next kernel to start early.
// A kernel reads nothing an earlier kernel wrote, and writes nothing, before griddep_wait(); every thread calls it,
// before any early return: a kernel only waits for its predecessor, so the ordering is transitive only if every
// kernel completes after the one before it (the loader launches an engine this way only where its manifest says
// "pdl": true, engine_format/SPEC.md §5).
// Before sm_90 there is no such launch, and these compile to nothing.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// 8 consecutive elements converted between 16- / 32-bit float types with 16-byte loads and stores (both pointers
// 16-byte aligned)
template <typename TI, typename TO>
__device__ __forceinline__ void convert8(const TI* __restrict__ src, TO* __restrict__ dst) {
  static_assert((sizeof(TI) == 2 || sizeof(TI) == 4) && (sizeof(TO) == 2 || sizeof(TO) == 4), "16- or 32-bit");
  union { uint4 u[sizeof(TI) / 2]; TI v[8]; } in;
  union { uint4 u[sizeof(TO) / 2]; TO v[8]; } out;
#pragma unroll
  for (int i = 0; i < (int)sizeof(TI) / 2; ++i) in.u[i] = reinterpret_cast<const uint4*>(src)[i];
#pragma unroll
  for (int j = 0; j < 8; ++j) out.v[j] = from_float<TO>(to_float(in.v[j]));
#pragma unroll
  for (int i = 0; i < (int)sizeof(TO) / 2; ++i) reinterpret_cast<uint4*>(dst)[i] = out.u[i];
}

// A constant weight's 16 bytes, loaded so that the load stays where it is written: ptxas sinks read-only loads
// (ld.global.nc, __ldg) below griddepcontrol.wait, which would delay weight streaming under programmatic
// dependent launch until the previous kernel has finished; a plain ld.global it keeps in place.
__device__ __forceinline__ uint4 ld_weight16(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_weight8(const void* p) {
  uint2 v;
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
// A hint to stream [p, p + bytes) into L2 (nothing before sm_90): the bulk prefetch takes 16-byte aligned spans,
// so the span is widened to 16-byte boundaries (the caller's allocation is 16-byte aligned and sized)
__device__ __forceinline__ void l2_prefetch_span(const void* p, long bytes) {
#if __CUDA_ARCH__ >= 900
  const unsigned long long a = reinterpret_cast<unsigned long long>(p), lo = a & ~15ull;
  const unsigned long long hi = (a + bytes + 15) & ~15ull;
  for (unsigned long long at = lo; at < hi; at += 1u << 20) {  // at most 1 MiB per instruction
    const unsigned n = (unsigned)(hi - at < (1ull << 20) ? hi - at : (1ull << 20));
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(at), "r"(n) : "memory");
  }
#endif
}
// This block's share of spans laid end to end ([0, total) bytes, each span's begin and size multiples of 16):
// the part of [begin, begin + bytes) that falls in it, from span p, prefetched into L2 by the block's first thread
__device__ __forceinline__ void l2_prefetch_share(const void* p, unsigned begin, unsigned bytes, unsigned total) {
  // 32-bit arithmetic: a 64-bit division would be a call, and nothing may call before griddepcontrol.wait
  const unsigned blocks = gridDim.x * gridDim.y * gridDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned share = ((total + blocks - 1) / blocks + 15) & ~15u;
  const unsigned lo = max(block * share, begin), hi = min(block * share + share, begin + bytes);
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0 && lo < hi)
    l2_prefetch_span(static_cast<const char*>(p) + (lo - begin), (long)(hi - lo));
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
