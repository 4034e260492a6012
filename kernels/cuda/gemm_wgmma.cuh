// Tensor-core GEMM for sm_90a with wgmma (warp-group MMA, both operands from shared memory), ported from
// benchmarks/wgmma_probe.cu:
//   C[b, m, n] = P::epilogue(b, m, n, sum_k A(b, m, k) * B(b, k, n))
// for 16-bit operands of type T staged by 16-byte cp.async chunks (gemm_mma's A_MODE 0 / B_MODE 0; B_MODE 1:
// fp8 weight rows, below), no activation quantization. A norm prologue comes folded (P::NORM_FOLD, kernels/gemm.py): the build multiplied
// gamma into B, so A is multiplied as it is and each row's statistics (sum and sum of squares over K) are
// gathered from the A tiles in shared memory as they pass; the epilogue applies
//   rstd[m] * (acc - mean[m] * colsum[n]) + bias[n]     (RMSNorm: mean 0, no colsum, no bias)
// with colsum = sum_k B[k, n] and bias = beta . W computed at build time.
// Gated (P::GATED, SwiGLU-style): B holds 2N rows, [gate | up]; a block's BN tile columns are BN / 2 gate rows
// and the BN / 2 up rows of the same outputs, so the epilogue sees both accumulators of an output together:
//   C[m, n] = P::value(b, m, n, gate sum, up sum) for the BN / 2 outputs n of the block.
// FP8 weights (P::B_MODE 1, opt-in: FLASHRT_WGMMA_FP8=1): each stage also holds the raw E4M3 rows (BN x 64
// bytes, cp.async); after tile i lands, every thread decodes the 8 values of the chunk the 16-bit copy would
// have written into the B tile (exact in bf16 / f16), then a proxy fence and a barrier before the wgmma; each
// output column's weight scale multiplies its sum (as the mma.sync kernel's b_mode 1).
// NVFP4 weights (P::B_MODE 2, opt-in: FLASHRT_WGMMA_NVFP4=1): the same with the packed rows (BN x 32 bytes) and
// their E4M3 block scales (BN x 4 bytes) in the stage; a thread's 8 values are E2M1 x their block's scale, exact
// in bf16 / f16 (at most 6 significant bits), and the tensor's global scale multiplies every sum.
//
// Block: WG warp groups stacked along M (BM = 64 WG), each issuing wgmma.mma_async.m64n{BN}k16 on its 64 rows
// of A and all BN rows of B (both K-major: A row-major [m][k], B stored [n][k], no transposes).
// Staging: every thread copies 16-byte chunks with cp.async into an ST-stage ring; a stage is the A tile
// (BM rows x 64 k) then the B tile (BN rows x 64 k), each row 128 bytes in the 128-byte swizzled layout TMA's
// SWIZZLE_128B writes and the wgmma descriptor reads: 16-byte chunk j of row r at chunk j ^ (r % 8) of the
// row (the probe's numpy model, wgmma_probe.py --selfcheck, matched the hardware). Stages are 1024-byte
// aligned (the swizzle atom is 8 rows x 128 bytes). Rows past M / N are zero-filled (src-size 0).
// Pipeline, iteration i: cp.async.wait_group (tile i landed), fence.proxy.async (generic-proxy writes before
// the async-proxy wgmma reads), __syncthreads; then the copies of tile i + ST - 2 into the stage of tile
// i - 2, which every warp group has finished: each passed wgmma.wait_group 1 in iteration i - 1 (one wgmma
// group stays in flight so the tensor core does not drain between k tiles). So ST >= 3.
// Split-K (SPLIT > 1): the cluster's blocks (along z) each reduce a K range, park their f32 tile over the
// idle ring and sum 1/SPLIT of it over the cluster in rank order (DSMEM "pull"; the probe measured it faster
// than st.async push everywhere), then run the epilogue; SPLIT == 1 goes through the same shared tile.
#pragma once
#include "mma.cuh"

namespace wg {

// K-major operand, 128-byte swizzle: start address >> 4 in bits 0-13, LBO (unused for swizzled K-major, 16
// bytes) in 16-29, SBO = 1024 bytes (8 rows of 128 bytes) in 32-45, base offset 0, swizzle mode 1 in 62-63
__device__ __forceinline__ unsigned long long sw128_desc(unsigned saddr) {
  return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ties the accumulators to this point so the compiler cannot move their reads or writes across a wait / fence
template <int NACC> __device__ __forceinline__ void fence_acc(float (&acc)[NACC]) {
#pragma unroll
  for (int i = 0; i < NACC; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

#define WG_D8(i)                                                                                                \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define WG_D32(i) WG_D8(i), WG_D8(i + 8), WG_D8(i + 16), WG_D8(i + 24)
#define WG_REGS32                                                                                   \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_REGS64                                                                                      \
  WG_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
            "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// d[64 x N] += A[64 x 16] . B[16 x N] (scale-d 1, no negation, no transposes); d in the m64nNk16 accumulator
// layout: d[4j + h] is row 16 * (warp % 4) + lane / 4 + 8 * (h / 2), column 8j + 2 * (lane % 4) + h % 2
template <class T, int N> __device__ void mma(float* d, unsigned long long a, unsigned long long b);
template <> __device__ __forceinline__ void mma<bf16_t, 64>(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_REGS32 "}, %32, %33, 1, 1, 1, 0, 0;\n"
               : WG_D32(0) : "l"(a), "l"(b));
}
template <> __device__ __forceinline__ void mma<f16_t, 64>(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {" WG_REGS32 "}, %32, %33, 1, 1, 1, 0, 0;\n"
               : WG_D32(0) : "l"(a), "l"(b));
}
template <> __device__ __forceinline__ void mma<bf16_t, 128>(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" WG_REGS64 "}, %64, %65, 1, 1, 1, 0, 0;\n"
               : WG_D32(0), WG_D32(32) : "l"(a), "l"(b));
}
template <> __device__ __forceinline__ void mma<f16_t, 128>(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {" WG_REGS64 "}, %64, %65, 1, 1, 1, 0, 0;\n"
               : WG_D32(0), WG_D32(32) : "l"(a), "l"(b));
}
#undef WG_D8
#undef WG_D32
#undef WG_REGS32
#undef WG_REGS64

}  // namespace wg

template <class P>
struct WgmmaShape {
  static constexpr int BM = 64 * P::WG, BN = P::BN, BK = 64, ST = P::STAGES;
  static constexpr int KT = (P::K + BK - 1) / BK;  // k-tiles of the whole K
  static constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  // quantized weight rows as stored: fp8 BN x 64 bytes; nvfp4 BN x 32 bytes, then BN x 4 scale bytes (padded to
  // the 1024-byte alignment of the stages)
  static constexpr int NVFP4_ROW = BK / 2, NVFP4_SCALES = BN * NVFP4_ROW;
  static constexpr int RAW_BYTES = P::B_MODE == 1 ? BN * BK : P::B_MODE == 2 ? (BN * (NVFP4_ROW + 4) + 1023) / 1024 * 1024 : 0;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + RAW_BYTES;
  static constexpr int RED_LD = BN + 8;            // f32 partial tile row stride
  static constexpr int RED_BYTES = BM * RED_LD * 4;
  static constexpr int RING_BYTES = ST * STAGE_BYTES;
  // + 1024: the ring is aligned to 1024 bytes inside the dynamic shared memory (mirrored in gemm_mma.py)
  static constexpr int SMEM_BYTES = (RING_BYTES > RED_BYTES ? RING_BYTES : RED_BYTES) + 1024;
};

template <class P>
__device__ __forceinline__ void gemm_wgmma(const typename P::Args& g) {
  using T = typename P::T;
  using S = WgmmaShape<P>;
  constexpr int BM = S::BM, BN = S::BN, BK = S::BK, ST = S::ST, SPLIT = P::SPLIT;
  constexpr int THREADS = 128 * P::WG, NACC = BN / 2;
  static_assert(P::BM == BM && (BN == 64 || BN == 128) && (P::WG == 1 || P::WG == 2), "tile: BM 64 / 128, BN 64 / 128");
  static_assert(ST >= 3, "the copies of tile i + ST - 2 go to the stage of tile i - 2");
  static_assert(P::A_MODE == 0 && !P::LN && P::AQ == 0 && !P::FP8 && P::K % 8 == 0,
                "wgmma: 16-byte chunks of 16-bit A, norm prologues folded, no activation quantization");
  static_assert(P::B_MODE == 0 || (P::B_MODE == 1 && P::QUANT == 1 && P::K % 16 == 0) ||
                (P::B_MODE == 2 && P::QUANT == 2 && P::K % 64 == 0),
                "wgmma: B by 16-byte chunks of 16-bit values, of fp8 rows or of nvfp4 rows (K % 64 == 0)");
  constexpr bool FOLD = P::NORM_FOLD != 0, GATED = P::GATED, FP8B = P::B_MODE == 1, FP4B = P::B_MODE == 2;
  constexpr int OUT_BN = GATED ? BN / 2 : BN;  // outputs per block along N
  static_assert(S::SMEM_BYTES <= 227 * 1024, "shared memory per block");
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(sizeof(T) == 0, "wgmma needs sm_90a");
#endif
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  const unsigned ring = mma::smem_addr(smem);

  const int tid = threadIdx.x, wgi = tid / 128, lane = tid % 32, warp = tid / 32 % 4;
  int rank = 0;
  if constexpr (SPLIT > 1) rank = mma::cluster_rank();
  const int bat = blockIdx.z / SPLIT, m0 = blockIdx.y * BM, n0 = blockIdx.x * OUT_BN;
  const int kt0 = rank * S::KT / SPLIT, kt1 = (rank + 1) * S::KT / SPLIT, nkt = kt1 - kt0;

  // ---- stage loads: thread t copies chunk t % 8 of rows t / 8 + RSTEP i, to chunk (t % 8) ^ (row % 8) ----
  constexpr int RSTEP = THREADS / 8, A_CH = BM / RSTEP, B_CH = BN / RSTEP;
  static_assert(BM % RSTEP == 0 && BN % RSTEP == 0 && RSTEP % 8 == 0, "whole rows per pass, one swizzle phase");
  const int ck = (tid % 8) * 8, cr = tid / 8;
  const unsigned dst0 = cr * 128 + (((tid % 8) ^ (cr % 8)) * 16);  // row cr + RSTEP i: + RSTEP i * 128
  const T* a_rows[A_CH];
  const T* b_rows[B_CH];
#pragma unroll
  for (int i = 0; i < A_CH; ++i) {
    const int m = m0 + cr + RSTEP * i;
    a_rows[i] = m < P::M ? P::a_row(g, bat, m) : nullptr;
  }
  // B's row in tile column j (gated: the up rows N + n after OUT_BN gate rows), -1 past N
  auto b_tile_row = [&](int j) {
    const bool up = GATED && j >= OUT_BN;
    const int n = n0 + (up ? j - OUT_BN : j);
    return n < P::N ? (up ? P::N + n : n) : -1;
  };
  if constexpr (!FP8B && !FP4B) {
#pragma unroll
    for (int i = 0; i < B_CH; ++i) {
      const int row = b_tile_row(cr + RSTEP * i);
      b_rows[i] = row >= 0 ? P::b_row(g, bat, row) : nullptr;
    }
  }
  auto cp16 = [](unsigned dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
  };
  auto load_a_tile = [&](int kt, int s) {
    const int k = kt * BK + ck;
    const long ko = P::a_kofs(k);
    const unsigned dst = ring + s * S::STAGE_BYTES + dst0;
#pragma unroll
    for (int i = 0; i < A_CH; ++i) {
      const bool ok = a_rows[i] != nullptr && k < P::K;
      cp16(dst + RSTEP * i * 128, ok ? a_rows[i] + ko : g.a, ok);
    }
  };
  // fp8 rows: thread t copies 16-byte chunk t % 4 (16 values) of raw rows t / 4 + RAW_RSTEP i
  constexpr int RAW_RSTEP = THREADS / 4, RAW_CH = FP8B ? BN / RAW_RSTEP : 1;
  static_assert(!FP8B || BN % RAW_RSTEP == 0, "whole raw rows per pass");
  const unsigned char* raw_rows[RAW_CH];
  if constexpr (FP8B) {
#pragma unroll
    for (int i = 0; i < RAW_CH; ++i) {
      const int row = b_tile_row(tid / 4 + RAW_RSTEP * i);
      raw_rows[i] = row >= 0 ? reinterpret_cast<const unsigned char*>(g.b) + (long)row * P::K : nullptr;
    }
  }
  auto load_b_tile = [&](int kt, int s) {
    if constexpr (FP4B) {  // 16-byte chunk c: half c % 2 of row c / 2's 32 bytes; then each row's 4 scale bytes
      const unsigned raw = ring + s * S::STAGE_BYTES + S::A_BYTES + S::B_BYTES;
      const unsigned char* b = reinterpret_cast<const unsigned char*>(g.b);
      for (int c = tid; c < 2 * BN; c += THREADS) {
        const int row = b_tile_row(c / 2), k = kt * BK + (c % 2) * 32;
        const bool ok = row >= 0 && k < P::K;
        cp16(raw + c * 16, ok ? b + ((long)row * P::K + k) / 2 : b, ok);
      }
      for (int r = tid; r < BN; r += THREADS) {
        const int row = b_tile_row(r), k = kt * BK;
        const bool ok = row >= 0 && k < P::K;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(raw + S::NVFP4_SCALES + r * 4),
                     "l"(ok ? (const void*)(g.b_block + ((long)row * P::K + k) / 16) : (const void*)g.b_block),
                     "r"(ok ? 4 : 0));
      }
    } else if constexpr (FP8B) {
      const int k = kt * BK + (tid % 4) * 16;
      const unsigned dst = ring + s * S::STAGE_BYTES + S::A_BYTES + S::B_BYTES + (tid / 4) * BK + (tid % 4) * 16;
#pragma unroll
      for (int i = 0; i < RAW_CH; ++i) {
        const bool ok = raw_rows[i] != nullptr && k < P::K;
        cp16(dst + RAW_RSTEP * i * BK, ok ? raw_rows[i] + k : reinterpret_cast<const void*>(g.b), ok);
      }
    } else {
      const int k = kt * BK + ck;
      const long ko = P::b_kofs(k);
      const unsigned dst = ring + s * S::STAGE_BYTES + S::A_BYTES + dst0;
#pragma unroll
      for (int i = 0; i < B_CH; ++i) {
        const bool ok = b_rows[i] != nullptr && k < P::K;
        cp16(dst + RSTEP * i * 128, ok ? b_rows[i] + ko : g.b, ok);
      }
    }
  };

  // Programmatic dependent launch (a no-op without it): constant weight tiles load before the wait.
  griddep_launch_dependents();
  if constexpr (P::B_CONST) {
#pragma unroll
    for (int i = 0; i < ST - 2; ++i)
      if (i < nkt) load_b_tile(kt0 + i, i);
  }
  griddep_wait();
  // commit group i holds A tile i (group 0 also any prefetched weight tiles) and B tile i
#pragma unroll
  for (int i = 0; i < ST - 2; ++i) {
    if (i < nkt) {
      load_a_tile(kt0 + i, i);
      if constexpr (!P::B_CONST) load_b_tile(kt0 + i, i);
    }
    mma::cp_async_commit();
  }

  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
  wg::fence_acc(acc);
  // folded norm: this thread's partial sum and sum of squares of rows cr + RSTEP i over its 8-value chunk of
  // every k tile: the chunk its own cp.async wrote (visible to it after its wait), so no extra barrier
  float row_s[A_CH], row_q[A_CH];
#pragma unroll
  for (int i = 0; i < A_CH; ++i) row_s[i] = row_q[i] = 0.f;

  // ---- main loop ----------------------------------------------------------------------------------
  for (int i = 0; i < nkt; ++i) {
    const int s = i % ST;
    mma::cp_async_wait<ST - 3>();
    wg::fence_proxy_async();
    __syncthreads();  // tile i visible to all; every warp group is done with tile i - 2
    if (i + ST - 2 < nkt) {
      load_a_tile(kt0 + i + ST - 2, (i + ST - 2) % ST);
      load_b_tile(kt0 + i + ST - 2, (i + ST - 2) % ST);
    }
    mma::cp_async_commit();
    if constexpr (FP8B) {  // tile i's E4M3 rows -> the B tile, each thread the chunks its 16-bit copy would write
      const unsigned char* raw = smem + s * S::STAGE_BYTES + S::A_BYTES + S::B_BYTES;
      unsigned char* bt = smem + s * S::STAGE_BYTES + S::A_BYTES;
#pragma unroll
      for (int r = 0; r < B_CH; ++r) {
        const uint2 v = *reinterpret_cast<const uint2*>(raw + (cr + RSTEP * r) * BK + (tid % 8) * 8);
        uint4 o;
        o.x = mma::e4m3x2_to<T>((unsigned short)(v.x & 0xffffu));
        o.y = mma::e4m3x2_to<T>((unsigned short)(v.x >> 16));
        o.z = mma::e4m3x2_to<T>((unsigned short)(v.y & 0xffffu));
        o.w = mma::e4m3x2_to<T>((unsigned short)(v.y >> 16));
        *reinterpret_cast<uint4*>(bt + dst0 + RSTEP * r * 128) = o;
      }
    } else if constexpr (FP4B) {  // tile i's E2M1 rows x their E4M3 block scales -> the B tile, as the fp8 decode
      const unsigned char* raw = smem + s * S::STAGE_BYTES + S::A_BYTES + S::B_BYTES;
      unsigned char* bt = smem + s * S::STAGE_BYTES + S::A_BYTES;
#pragma unroll
      for (int r = 0; r < B_CH; ++r) {
        const int row = cr + RSTEP * r;  // values (tid % 8) * 8 .. + 7 of the tile row: 4 bytes, one block scale
        const unsigned w = *reinterpret_cast<const unsigned*>(raw + row * S::NVFP4_ROW + (tid % 8) * 4);
        const float sc = e4m3_to_float(raw[S::NVFP4_SCALES + row * 4 + (tid % 8) / 2]);
        unsigned o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte j: value 2j in the low nibble, 2j + 1 in the high one
          const unsigned byte = (w >> (8 * j)) & 0xffu;
          o[j] = mma::pack2<T>(e2m1_to_float(byte & 15u) * sc, e2m1_to_float(byte >> 4) * sc);
        }
        *reinterpret_cast<uint4*>(bt + dst0 + RSTEP * r * 128) = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
    if constexpr (FP8B || FP4B) {
      wg::fence_proxy_async();  // generic writes before the async-proxy wgmma reads
      __syncthreads();
    }
    const unsigned stage = ring + s * S::STAGE_BYTES;
    const unsigned long long da = wg::sw128_desc(stage + wgi * 64 * 128), db = wg::sw128_desc(stage + S::A_BYTES);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) wg::mma<T, BN>(acc, da + 2 * kk, db + 2 * kk);  // + 32 bytes per k16
    wg::commit();
    wg::wait<1>();
    if constexpr (FOLD) {  // while tile i's wgmma runs (after the wait: so the compiler
      // cannot interleave these loads with its issue); zero-filled rows and k add nothing
      const unsigned char* chunk = smem + s * S::STAGE_BYTES + dst0;
#pragma unroll
      for (int r = 0; r < A_CH; ++r) {
        const uint4 v = *reinterpret_cast<const uint4*>(chunk + RSTEP * r * 128);
        const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float x0 = mma::unpack_lo<T>(w[j]), x1 = mma::unpack_hi<T>(w[j]);
          row_s[r] += x0 + x1;
          row_q[r] += x0 * x0 + x1 * x1;
        }
      }
    }
  }
  wg::wait<0>();
  wg::fence_acc(acc);
  if constexpr (FOLD) {  // the 8 lanes of a row (lanes equal but for bits 0-2) sum their chunks
#pragma unroll
    for (int i = 0; i < A_CH; ++i)
#pragma unroll
      for (int o = 1; o < 8; o *= 2) {
        row_s[i] += __shfl_xor_sync(0xffffffffu, row_s[i], o);
        row_q[i] += __shfl_xor_sync(0xffffffffu, row_q[i], o);
      }
  }

  // ---- epilogue: the f32 tile over the ring, reduced over the cluster, P::value -----------------------
  mma::cp_async_wait<0>();  // only empty groups remain
  __syncthreads();          // every warp group's wgmma reads of the ring are done
  wg::fence_proxy_async();  // generic writes after async-proxy reads
  float* red = reinterpret_cast<float*>(smem);
  {
    const int r = wgi * 64 + warp * 16 + lane / 4, c = 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      *reinterpret_cast<float2*>(red + r * S::RED_LD + c + 8 * j) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(red + (r + 8) * S::RED_LD + c + 8 * j) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  if constexpr (FOLD) {  // row statistics in the tile's padding columns BN, BN + 1
    if (tid % 8 == 0)
#pragma unroll
      for (int i = 0; i < A_CH; ++i)
        *reinterpret_cast<float2*>(red + (cr + RSTEP * i) * S::RED_LD + BN) = make_float2(row_s[i], row_q[i]);
  }
  if constexpr (SPLIT > 1) mma::cluster_sync();
  else __syncthreads();
  // folded norm: each row's mean and 1 / sqrt(var + eps) over the whole K (the cluster's partial sums, in rank
  // order); var = E[x^2] - mean^2 in f32
  constexpr int STAT_ROWS = FOLD ? BM : 1;
  __shared__ float row_mean[STAT_ROWS], row_rstd[STAT_ROWS];
  if constexpr (FOLD) {
    if (tid < BM) {
      float sum = 0.f, sq = 0.f;
#pragma unroll
      for (int src = 0; src < SPLIT; ++src) {
        float2 v;
        if constexpr (SPLIT > 1) {
          v.x = mma::ld_cluster(red + tid * S::RED_LD + BN, src);
          v.y = mma::ld_cluster(red + tid * S::RED_LD + BN + 1, src);
        } else {
          v = *reinterpret_cast<const float2*>(red + tid * S::RED_LD + BN);
        }
        sum += v.x;
        sq += v.y;
      }
      // no IEEE division or sqrt here: under -dc their slow paths are extern calls, and ptxas serializes every
      // wgmma of a kernel that makes one (C7509)
      constexpr float INV_K = 1.f / P::K;
      const float mean = P::NORM_FOLD == 1 ? 0.f : sum * INV_K;
      row_mean[tid] = mean;
      row_rstd[tid] = rsqrtf(fmaxf(sq * INV_K - mean * mean, 0.f) + P::EPS);
    }
    __syncthreads();
  }
  // This block finishes 1/SPLIT of the tile's float4 groups: all epilogue values first (their input loads
  // issue together), then the stores (as gemm_mma.cuh).
  constexpr int GROUPS = BM * OUT_BN / 4, PER_THREAD = ((GROUPS + SPLIT - 1) / SPLIT + THREADS - 1) / THREADS;
  const int q0 = rank * GROUPS / SPLIT, q1 = (rank + 1) * GROUPS / SPLIT;
  float out[PER_THREAD][4];
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int q = q0 + tid + THREADS * i, r = q / (OUT_BN / 4), c = (q % (OUT_BN / 4)) * 4, m = m0 + r, n = n0 + c;
    if (q >= q1 || m >= P::M || n >= P::N) continue;
    // the f32 sums of tile columns c..c+3 (gated: and of their up columns c + OUT_BN..), over the cluster in
    // rank order, so the result does not depend on timing
    auto sum4 = [&](int col) {
      float4 v;
      if constexpr (SPLIT > 1) {
        v = mma::ld_cluster_f4(mma::cluster_addr(red + r * S::RED_LD + col, 0));
        for (int src = 1; src < SPLIT; ++src) {
          const float4 p = mma::ld_cluster_f4(mma::cluster_addr(red + r * S::RED_LD + col, src));
          v.x += p.x; v.y += p.y; v.z += p.z; v.w += p.w;
        }
      } else {
        v = *reinterpret_cast<const float4*>(red + r * S::RED_LD + col);
      }
      return v;
    };
    const float4 v = sum4(c);
    float vals[4] = {v.x, v.y, v.z, v.w}, ups[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (GATED) {
      const float4 u = sum4(c + OUT_BN);
      ups[0] = u.x; ups[1] = u.y; ups[2] = u.z; ups[3] = u.w;
    }
    // the sum of B's row `row`: times the fp8 weight row's scale (nvfp4: the global scale), then the folded
    // norm (the reference's order)
    auto finish = [&](float v, int row) {
      if constexpr (FP8B || FP4B) v *= P::row_scale(g, row);
      if constexpr (FOLD) v = row_rstd[r] * (v - row_mean[r] * P::fold_colsum(g, row)) + P::fold_bias(g, row);
      return v;
    };
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (n + j < P::N) {
        vals[j] = finish(vals[j], n + j);
        if constexpr (GATED) ups[j] = finish(ups[j], P::N + n + j);  // gated: output n's up sum is B's row N + n
      }
#pragma unroll
    for (int j = 0; j < 4; ++j) out[i][j] = n + j < P::N ? P::value(g, bat, m, n + j, vals[j], ups[j]) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int q = q0 + tid + THREADS * i, r = q / (OUT_BN / 4), c = (q % (OUT_BN / 4)) * 4, m = m0 + r, n = n0 + c;
    if (q >= q1 || m >= P::M || n >= P::N) continue;
    mma::store4<typename P::OutT, P::N>(g.c, g.c + ((long)bat * P::M + m) * P::N + n, n, out[i]);
  }
  // no block leaves while another still reads its tile (the reads completed before their arrive)
  if constexpr (SPLIT > 1) mma::cluster_sync_relaxed();
}
