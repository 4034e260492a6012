// Tiled SIMT GEMM with fused prologue (LayerNorm or RMSNorm over K, then FP8 / NVFP4 quantization of A')
// and a generated elementwise epilogue.
//   C[b, m, n] = P::epilogue(b, m, n, sum_k A'(b, m, k) * B(b, k, n))
// 256 threads as 16 x 16, each computing TM x TN outputs: a (16*TM) x (16*TN) tile per block.
// P is a generated struct: compile-time shapes and the strided, dtype-converting loads and stores.
#pragma once
#include "common.cuh"

template <class P>
__device__ __forceinline__ void gemm_tile(const typename P::Args& g) {
  constexpr int TM = P::TM, TN = P::TN, BM = 16 * TM, BN = 16 * TN, BK = 16;
  __shared__ float As[BK][BM + 1];  // transposed tile of A: As[k][m]
  __shared__ float Bs[BK][BN];
  __shared__ float row_mean[BM], row_rstd[BM], row_qs[BM];  // norm statistics, FP8 scale of A' (P::AQ)
  const int bat = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  griddep_launch_dependents();
  griddep_wait();  // A, B (a weight or an activation) and the epilogue inputs may come from earlier kernels

  constexpr bool FP8_A = P::AQ == 1 || P::AQ == 2;  // FP8 A' (per tensor or per row); P::AQ == 3: NVFP4
  if constexpr (P::LN || FP8_A) {  // per-row statistics of this block's rows, one warp per row
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < BM; r += 8) {
      const int m = m0 + r;
      float mean = 0.f, rstd = 0.f, qs = P::a_scale(g);
      if (m < P::M) {
        if constexpr (P::LN) {
          if constexpr (!P::RMS) {
            float s = 0.f;
            for (int k = lane; k < P::K; k += 32) s += P::load_a(g, bat, m, k);
            mean = warp_sum(s) / P::K;
          }
          float q = 0.f;
          for (int k = lane; k < P::K; k += 32) { float d = P::load_a(g, bat, m, k) - mean; q += d * d; }
          rstd = 1.f / sqrtf(warp_sum(q) / P::K + P::EPS);
        }
        if constexpr (P::AQ == 2) {  // max |A'| of the row, A' normalized
          float amax = 0.f;
          for (int k = lane; k < P::K; k += 32) {
            float v = P::load_a(g, bat, m, k);
            if constexpr (P::LN) v = (v - mean) * rstd * P::ln_gamma(g, k) + P::ln_beta(g, k);
            amax = fmaxf(amax, fabsf(v));
          }
          qs = act_row_scale(warp_max(amax));
        }
      }
      if (lane == 0) { row_mean[r] = mean; row_rstd[r] = rstd; row_qs[r] = qs; }
    }
    __syncthreads();
  }

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < P::K; k0 += BK) {
    for (int i = threadIdx.x; i < BM * BK; i += 256) {
      const int mm = i / BK, kk = i % BK, m = m0 + mm, k = k0 + kk;
      float v = 0.f;
      if (m < P::M && k < P::K) {
        v = P::load_a(g, bat, m, k);
        if constexpr (P::LN) v = (v - row_mean[mm]) * row_rstd[mm] * P::ln_gamma(g, k) + P::ln_beta(g, k);
        if constexpr (FP8_A) v = e4m3_round(v / row_qs[mm]) * row_qs[mm];
      }
      if constexpr (P::AQ == 3) {  // 16 consecutive threads hold one row's 16-value block (BK = 16)
        float a = fabsf(v);
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        v = nvfp4_round(v, nvfp4_block_scale(a, P::a_scale(g)));
      }
      As[kk][mm] = v;
    }
    for (int i = threadIdx.x; i < BK * BN; i += 256) {
      // walk the tile in the order B is laid out in memory, so the loads coalesce either way
      const int kk = P::B_K_CONTIG ? i % BK : i / BN, nn = P::B_K_CONTIG ? i / BK : i % BN;
      const int k = k0 + kk, n = n0 + nn;
      Bs[kk][nn] = (k < P::K && n < P::N) ? P::load_b(g, bat, k, n) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < P::M && n < P::N) P::epilogue(g, bat, m, n, acc[i][j]);
    }
}
