// Batch-1 GEMV / small-M GEMM (M <= 8) that streams the weights once at memory bandwidth.
//   C[m, n] = P::epilogue(m, n, sum_k A'(m, k) * W[n, k])       W stored [N, K], K contiguous
// 256 threads = 8 warps = (8 / S) row groups x S K-splits. A warp owns R consecutive weight rows and one K
// range; each lane loads 16 bytes of every row per step (VEC elements), all steps unrolled so the loads are
// in flight together. Partial sums: warp shuffle, then across the S K-splits through shared memory.
// GATED: the weight holds [gate | up] (2N rows); a warp's R = 2 rows are n and N + n, and the epilogue gets
// both sums (SwiGLU / GeGLU in one kernel).
#pragma once
#include "common.cuh"

template <class P>
__device__ __forceinline__ void gemv(const typename P::Args& g) {
  using TW = typename P::TW;
  constexpr int M = P::M, N = P::N, K = P::K, R = P::R, S = P::S;
  constexpr int VEC = Vec<TW>::N, GROUPS = 8 / S, KS = K / S, STEPS = (KS + 32 * VEC - 1) / (32 * VEC);
  constexpr int BITS = 128 / VEC;                       // bits per weight: 32, 16, 8 (fp8), 4 (nvfp4)
  constexpr long ROW_BYTES = (long)K * BITS / 8;
  __shared__ float red[S][GROUPS][M][R];
  __shared__ float row_mean[M], row_rstd[M];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp / S, ks = warp % S;
  const int n0 = P::GATED ? blockIdx.x * GROUPS + group : (blockIdx.x * GROUPS + group) * R;
  constexpr int ROW_STEP = P::GATED ? N : 1, ROWS = P::GATED ? 2 * N : N;
  static_assert(!P::GATED || R == 2, "a gated GEMV computes two rows per warp");

  if constexpr (P::LN) {  // norm statistics of the M rows, one warp per row
    for (int m = warp; m < M; m += 8) {
      float mean = 0.f;
      if constexpr (!P::RMS) {
        float s = 0.f;
        for (int k = lane; k < K; k += 32) s += P::load_a(g, m, k);
        mean = warp_sum(s) / K;
      }
      float q = 0.f;
      for (int k = lane; k < K; k += 32) { const float d = P::load_a(g, m, k) - mean; q += d * d; }
      q = warp_sum(q);
      if (lane == 0) { row_mean[m] = mean; row_rstd[m] = 1.f / sqrtf(q / K + P::EPS); }
    }
    __syncthreads();
  }

  // With a norm prologue the normalized activations are staged once in shared memory, so the inner loop
  // reads them with 16-byte shared loads instead of recomputing the norm per weight vector. (Measured on an
  // H200: faster with a prologue, slower without one, where staging only adds K loads per block.)
  constexpr bool STAGE = P::LN && M * K * 4 <= 32768;
  __shared__ __align__(16) float a_s[STAGE ? M * K : 4];
  if constexpr (STAGE) {
    for (int i = threadIdx.x; i < M * K; i += blockDim.x) {
      const int m = i / K, k = i % K;
      float v = P::load_a(g, m, k);
      if constexpr (P::LN) v = (v - row_mean[m]) * row_rstd[m] * P::ln_gamma(g, k) + P::ln_beta(g, k);
      a_s[i] = v;
    }
    __syncthreads();
  }

  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  const TW* __restrict__ w = P::weights(g);
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    const int k = ks * KS + (step * 32 + lane) * VEC;
    if (k < (ks + 1) * KS) {
      uint4 wv[R];
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[r] = (n0 + r * ROW_STEP < ROWS && n0 < N)
                    ? __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(w) +
                                                           (long)(n0 + r * ROW_STEP) * ROW_BYTES + (long)k * BITS / 8))
                    : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float a[VEC];
        if constexpr (STAGE) {
#pragma unroll
          for (int j = 0; j < VEC; j += 4) {
            const float4 f = *reinterpret_cast<const float4*>(&a_s[m * K + k + j]);
            a[j] = f.x; a[j + 1] = f.y; a[j + 2] = f.z; a[j + 3] = f.w;
          }
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            float v = P::load_a(g, m, k + j);
            if constexpr (P::LN) v = (v - row_mean[m]) * row_rstd[m] * P::ln_gamma(g, k + j) + P::ln_beta(g, k + j);
            a[j] = v;
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[VEC];
          unpack(wv[r], wf, w);
          if constexpr (P::QUANT == 2) {  // NVFP4: one E4M3 scale per 16 values along K
#pragma unroll
            for (int b = 0; b < VEC / 16; ++b) {
              float part = 0.f;
#pragma unroll
              for (int j = 0; j < 16; ++j) part = fmaf(a[16 * b + j], wf[16 * b + j], part);
              acc[m][r] = fmaf(part, P::block_scale(g, n0 + r * ROW_STEP, k / 16 + b), acc[m][r]);
            }
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[m][r] = fmaf(a[j], wf[j], acc[m][r]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float s = warp_sum(acc[m][r]);
      if (lane == 0) red[ks][group][m][r] = s;
    }
  __syncthreads();
  if constexpr (P::GATED) {
    for (int i = threadIdx.x; i < GROUPS * M; i += blockDim.x) {
      const int gi = i / M, m = i % M, n = blockIdx.x * GROUPS + gi;
      if (n < N) {
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int j = 0; j < S; ++j) { s0 += red[j][gi][m][0]; s1 += red[j][gi][m][1]; }
        P::epilogue(g, 0, m, n, s0 * P::row_scale(g, n), s1 * P::row_scale(g, N + n));
      }
    }
  } else {
    for (int i = threadIdx.x; i < GROUPS * M * R; i += blockDim.x) {
      const int gi = i / (M * R), m = (i / R) % M, r = i % R, n = (blockIdx.x * GROUPS + gi) * R + r;
      if (n < N) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < S; ++j) s += red[j][gi][m][r];
        P::epilogue(g, 0, m, n, s * P::row_scale(g, n));
      }
    }
  }
}
