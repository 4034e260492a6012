// mma.sync helpers shared by the tensor-core kernels (gemm_mma.cuh, attention_mma.cuh): cp.async, ldmatrix,
// m16n8k16 bf16 / f16 and m16n8k32 E4M3 mma with f32 accumulators, 16-bit packing, E4M3 widening,
// thread-block cluster access.
#pragma once
#include "common.cuh"

namespace mma {

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// transposed: thread t gets rows 2 (t % 4) and 2 (t % 4) + 1 of column t / 4 of each 8 x 8 matrix (the B
// fragment of a [k][n] tile stored n-contiguous)
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

template <class T> __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                            unsigned b1);
template <> __device__ __forceinline__ void mma16816<bf16_t>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                             unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16_t>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                            unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#if __CUDA_ARCH__ >= 890
__device__ __forceinline__ void mma16832_e4m3(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// two floats -> two T packed (lo in the low half), round to nearest even
template <class T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<bf16_t>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ unsigned pack2<f16_t>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <class T> __device__ __forceinline__ float unpack_lo(unsigned v) { return to_float(T{(unsigned short)(v & 0xffffu)}); }
template <class T> __device__ __forceinline__ float unpack_hi(unsigned v) { return to_float(T{(unsigned short)(v >> 16)}); }

// two E4M3 bytes (lo in the low byte) -> two T, exactly (every E4M3 value is a bf16 and an f16 value)
template <class T> __device__ __forceinline__ unsigned e4m3x2_to(unsigned short v);
#if __CUDA_ARCH__ >= 890
template <> __device__ __forceinline__ unsigned e4m3x2_to<f16_t>(unsigned short v) {
  unsigned h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h) : "h"(v));
  return h;
}
template <> __device__ __forceinline__ unsigned e4m3x2_to<bf16_t>(unsigned short v) {
  const unsigned h = e4m3x2_to<f16_t>(v);
  return pack2<bf16_t>(unpack_lo<f16_t>(h), unpack_hi<f16_t>(h));
}
#else
template <> __device__ __forceinline__ unsigned e4m3x2_to<f16_t>(unsigned short v) {
  return pack2<f16_t>(e4m3_to_float(v & 0xffu), e4m3_to_float(v >> 8));
}
template <> __device__ __forceinline__ unsigned e4m3x2_to<bf16_t>(unsigned short v) {
  return pack2<bf16_t>(e4m3_to_float(v & 0xffu), e4m3_to_float(v >> 8));
}
#endif

// ---- thread-block clusters (sm_90+): rank, barrier, reads of another block's shared memory
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
__device__ __forceinline__ unsigned cluster_addr(const void* p, unsigned rank) {
  unsigned r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(smem_addr(p)), "r"(rank));
  return r;
}
// a float in the shared memory of cluster block `rank`, at the address `p` has in this block
__device__ __forceinline__ float ld_cluster(const float* p, unsigned rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(cluster_addr(p, rank)) : "memory");
  return v;
}
__device__ __forceinline__ float4 ld_cluster_f4(unsigned addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
  return v;
}

// Four consecutive outputs of row m, columns n..n+3 (those < N), at dst = C + (b, m, n): 16-bit C with N % 4 == 0
// in one 8-byte store where C is 8-byte aligned (always, unless a caller bound an odd pointer).
template <class OutT, int N>
__device__ __forceinline__ void store4(OutT* c, OutT* dst, int n, const float (&v)[4]) {
  if constexpr (sizeof(OutT) == 2 && N % 4 == 0) {
    if ((reinterpret_cast<unsigned long long>(c) & 7) == 0) {
      unsigned h[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) h[j] = from_float<OutT>(v[j]).x;
      asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(dst), "r"(h[0] | h[1] << 16), "r"(h[2] | h[3] << 16)
                   : "memory");
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (n + j < N) dst[j] = from_float<OutT>(v[j]);
}

}  // namespace mma
