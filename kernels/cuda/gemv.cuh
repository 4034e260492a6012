// Batch-1 GEMV / small-M GEMM (M <= 8) that streams the weights once at memory bandwidth.
//   C[m, n] = P::epilogue(m, n, sum_k A'(m, k) * W[n, k])       W stored [N, K], K contiguous
// A' is A, normalized (P::LN) and FP8- or NVFP4-quantized (P::AQ, kernels/quant.py) as it is staged.
// 256 threads = 8 warps = (8 / S) row groups x S K-splits. A warp owns R weight rows (GATED: R / 2 gate rows
// n.. and the matching up rows N + n..) over one K range; each lane reads 16 bytes of every row per step.
// The grid is one wave, sized so that each warp issues ALL of its weight loads (R x STEPS 16-byte loads per
// lane) before anything else: the whole matrix is in flight at once, and the norm prologue and the staging of
// the activations in shared memory run while the loads are outstanding. Partial sums: warp shuffle, then
// across the S K-splits through shared memory. Quantized weights are widened with the hardware's
// e4m3x2 -> f16x2 conversion (exact), NVFP4 nibbles first re-encoded as e4m3 (value * 2^-6, exact).
#pragma once
#include "common.cuh"

// 16 bytes of weights as floats, in K order, and the factor the caller multiplies their dot product by
// (NVFP4 values come out scaled by 2^-6)
__device__ __forceinline__ void e4m3x4_to_float(unsigned w, float* out) {
#if __CUDA_ARCH__ >= 890
  unsigned h[2];
  asm("{ .reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
      "cvt.rn.f16x2.e4m3x2 %0, lo;\n\tcvt.rn.f16x2.e4m3x2 %1, hi; }"
      : "=r"(h[0]), "=r"(h[1]) : "r"(w));
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    asm("{ .reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi; }"
        : "=f"(out[2 * i]), "=f"(out[2 * i + 1]) : "r"(h[i]));
  }
#else  // no E4M3 conversion instruction: decode in software
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = e4m3_to_float((w >> (8 * i)) & 0xffu);
#endif
}
__device__ __forceinline__ void widen(const uint4& v, float (&out)[8], const bf16_t* w) { unpack(v, out, w); }
__device__ __forceinline__ void widen(const uint4& v, float (&out)[8], const f16_t* w) { unpack(v, out, w); }
__device__ __forceinline__ void widen(const uint4& v, float (&out)[4], const float* w) { unpack(v, out, w); }
__device__ __forceinline__ void widen(const uint4& v, float (&out)[16], const fp8_t*) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) e4m3x4_to_float(w[i], out + 4 * i);
}
__device__ __forceinline__ void widen(const uint4& v, float (&out)[32], const nvfp4x2_t*) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // 8 nibbles, value j in bits 4j..4j+3: even values, then odd ones
    const unsigned nib[2] = {w[i] & 0x0F0F0F0Fu, (w[i] >> 4) & 0x0F0F0F0Fu};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // e2m1 s.ee.m -> e4m3 s.0ee.m00: the same value * 2^-6, subnormals included
      const unsigned e4m3 = ((nib[h] & 0x07070707u) << 2) | ((nib[h] & 0x08080808u) << 4);
      float f[4];
      e4m3x4_to_float(e4m3, f);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[8 * i + 2 * j + h] = f[j];
    }
  }
}

// One 32-bit word of weights as floats (the down projection's loads)
__device__ __forceinline__ void widen_word(unsigned w, float (&out)[1], const float*) { out[0] = __uint_as_float(w); }
__device__ __forceinline__ void widen_word(unsigned w, float (&out)[2], const bf16_t*) {
  out[0] = __uint_as_float(w << 16); out[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void widen_word(unsigned w, float (&out)[2], const f16_t*) {
  out[0] = to_float(f16_t{(unsigned short)(w & 0xffffu)}); out[1] = to_float(f16_t{(unsigned short)(w >> 16)});
}
__device__ __forceinline__ void widen_word(unsigned w, float (&out)[4], const fp8_t*) { e4m3x4_to_float(w, out); }

// y[0..3] += v[0..3]: one vector atomic on sm_90+ (y 16-byte aligned)
__device__ __forceinline__ void atomic_add4(float* y, const float (&v)[4]) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(y), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
#else
#pragma unroll
  for (int q = 0; q < 4; ++q) atomicAdd(y + q, v[q]);
#endif
}

template <class P>
__device__ __forceinline__ void gemv(const typename P::Args& g) {
  using TW = typename P::TW;
  constexpr int M = P::M, N = P::N, K = P::K, R = P::R, S = P::S;
  constexpr int VEC = Vec<TW>::N, GROUPS = 8 / S, KS = K / S, STEPS = (KS + 32 * VEC - 1) / (32 * VEC);
  constexpr int BITS = 128 / VEC;  // bits per weight: 32, 16, 8 (fp8), 4 (nvfp4)
  constexpr long ROW_BYTES = (long)K * BITS / 8;
  constexpr int ROWS = P::GATED ? 2 * N : N, PAIRS = P::GATED ? R / 2 : R;
  static_assert(!P::GATED || R % 2 == 0, "a gated GEMV computes gate and up rows in pairs");
  __shared__ float red[S][GROUPS][M][R];
  __shared__ float h_s[P::DOWN_N > 0 ? GROUPS * PAIRS : 1];  // DOWN: this block's values of C
  __shared__ float row_mean[M], row_rstd[M];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp / S, ks = warp % S;
  const int n0 = (blockIdx.x * GROUPS + group) * PAIRS;  // first output column of this warp
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = P::GATED && r >= PAIRS ? N + n0 + r - PAIRS : n0 + r;

  griddep_launch_dependents();  // one wave: the next kernel's blocks only take what this grid leaves free
  // 1. every weight load of this warp, and NVFP4's per-16 scales
  const unsigned char* __restrict__ w = reinterpret_cast<const unsigned char*>(P::weights(g));
  uint4 wv[R][STEPS];
  unsigned short bs[R][STEPS];
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    const int k = ks * KS + (step * 32 + lane) * VEC;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool ok = k < (ks + 1) * KS && n0 + (r % PAIRS) < N;
      wv[r][step] = ok ? ld_weight16(w + rows[r] * ROW_BYTES + (long)k * BITS / 8) : make_uint4(0, 0, 0, 0);
      if constexpr (P::QUANT == 2) bs[r][step] = ok ? P::block_scales(g, rows[r], k / 16) : 0;
    }
  }

  // 1b. DOWN: this block's J columns of the fused down projection (W2 [DOWN_N, N]), the J values it will add
  // into each output row: thread t owns rows 4 (t + 256 c) .. + 3
  constexpr int J = GROUPS * PAIRS, DN = P::DOWN_N > 0 ? P::DOWN_N : 1, DCH = (DN + 1023) / 1024;
  constexpr int DWORDS = P::DOWN_N > 0 ? J * (int)sizeof(typename P::TW2) / 4 : 1;
  static_assert(P::DOWN_N == 0 || (M == 1 && P::GATED && N % J == 0 && J * sizeof(typename P::TW2) % 8 == 0),
                "a fused down projection: one gated row, whole J-column blocks of 8-byte multiples");
  unsigned dw[DCH][4][DWORDS];
  if constexpr (P::DOWN_N > 0) {
    const unsigned char* __restrict__ w2 = reinterpret_cast<const unsigned char*>(P::down_weights(g));
#pragma unroll
    for (int c = 0; c < DCH; ++c)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 4 * (threadIdx.x + 256 * c) + q;
        const unsigned char* src = w2 + ((long)row * N + (long)blockIdx.x * J) * sizeof(typename P::TW2);
        if constexpr (DWORDS % 4 == 0) {
#pragma unroll
          for (int i = 0; i < DWORDS; i += 4) {
            const uint4 v = row < DN ? ld_weight16(src + 4 * i) : make_uint4(0, 0, 0, 0);
            dw[c][q][i] = v.x; dw[c][q][i + 1] = v.y; dw[c][q][i + 2] = v.z; dw[c][q][i + 3] = v.w;
          }
        } else {
#pragma unroll
          for (int i = 0; i < DWORDS; i += 2) {
            const uint2 v = row < DN ? ld_weight8(src + 4 * i) : make_uint2(0, 0);
            dw[c][q][i] = v.x; dw[c][q][i + 1] = v.y;
          }
        }
      }
  }

  // 2. the activations, normalized, in shared memory (while the weights are on their way). Under programmatic
  // dependent launch everything above overlaps the previous kernel: only the constant weights were read.
  griddep_wait();
  constexpr bool STAGE = M * K * 4 <= 32768;
  __shared__ __align__(16) float a_s[STAGE ? M * K : 4];
  if constexpr (STAGE) {
    for (int i = threadIdx.x; i < M * K; i += blockDim.x) a_s[i] = P::load_a(g, i / K, i % K);
    __syncthreads();
  }
  if constexpr (P::A_MIRRORS > 0) {  // A's row as read, as float32, for the accumulators of later fused kernels
    static_assert(M == 1, "a_mirror: one row");
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < K; k += gridDim.x * blockDim.x)
      P::a_mirror(g, k, STAGE ? a_s[k] : P::load_a(g, 0, k));
    __syncthreads();  // before anything below rewrites the staged row in place (NVFP4 quantization)
  }
  if constexpr (P::LN) {  // norm statistics of the M rows, one warp per row
    for (int m = warp; m < M; m += 8) {
      float mean = 0.f;
      if constexpr (!P::RMS) {
        float s = 0.f;
        for (int k = lane; k < K; k += 32) s += STAGE ? a_s[m * K + k] : P::load_a(g, m, k);
        mean = warp_sum(s) / K;
      }
      float q = 0.f;
      for (int k = lane; k < K; k += 32) {
        const float d = (STAGE ? a_s[m * K + k] : P::load_a(g, m, k)) - mean;
        q += d * d;
      }
      q = warp_sum(q);
      if (lane == 0) { row_mean[m] = mean; row_rstd[m] = 1.f / sqrtf(q / K + P::EPS); }
    }
    __syncthreads();
    if constexpr (STAGE) {
      for (int i = threadIdx.x; i < M * K; i += blockDim.x) {
        const int m = i / K, k = i % K;
        a_s[i] = (a_s[i] - row_mean[m]) * row_rstd[m] * P::ln_gamma(g, k) + P::ln_beta(g, k);
      }
      __syncthreads();
    }
  }
  __shared__ float row_qs[M];  // FP8 scale of each activation row (P::AQ 1, 2)
  if constexpr (P::AQ == 1 || P::AQ == 2) {
    for (int m = warp; m < M; m += 8) {
      float qs = P::a_scale(g);
      if constexpr (P::AQ == 2) {  // max |A'| of the normalized row
        float amax = 0.f;
        for (int k = lane; k < K; k += 32) {
          float v;
          if constexpr (STAGE) {
            v = a_s[m * K + k];
          } else {
            v = P::load_a(g, m, k);
            if constexpr (P::LN) v = (v - row_mean[m]) * row_rstd[m] * P::ln_gamma(g, k) + P::ln_beta(g, k);
          }
          amax = fmaxf(amax, fabsf(v));
        }
        qs = act_row_scale(warp_max(amax));
      }
      if (lane == 0) row_qs[m] = qs;
    }
    __syncthreads();
    if constexpr (STAGE) {  // quantize the staged activations once
      for (int i = threadIdx.x; i < M * K; i += blockDim.x) a_s[i] = e4m3_round(a_s[i] / row_qs[i / K]) * row_qs[i / K];
      __syncthreads();
    }
  }
  if constexpr (P::AQ == 3 && STAGE) {  // NVFP4: each thread quantizes whole 16-value blocks of the staged rows
    for (int b = threadIdx.x; b < M * K / 16; b += blockDim.x) {
      float* x = a_s + b * 16;
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(x[j]));
      const float bg = nvfp4_block_scale(amax, P::a_scale(g));
#pragma unroll
      for (int j = 0; j < 16; ++j) x[j] = nvfp4_round(x[j], bg);
    }
    __syncthreads();
  }

  // 3. the dot products
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    const int k = ks * KS + (step * 32 + lane) * VEC;
    if (k < (ks + 1) * KS) {
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
            if constexpr (P::AQ == 1 || P::AQ == 2) v = e4m3_round(v / row_qs[m]) * row_qs[m];
            a[j] = v;
          }
          if constexpr (P::AQ == 3) {  // NVFP4 blocks of 16 along K: a lane holds whole blocks, or part of one
#pragma unroll
            for (int b = 0; b < VEC; b += 16) {
              float amax = 0.f;
              if constexpr (VEC >= 16) {
#pragma unroll
                for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(a[b + j]));
              } else {  // the block's other values, from their source
                const int kb = k & ~15;
                for (int j = 0; j < 16; ++j) {
                  float v = P::load_a(g, m, kb + j);
                  if constexpr (P::LN) v = (v - row_mean[m]) * row_rstd[m] * P::ln_gamma(g, kb + j) + P::ln_beta(g, kb + j);
                  amax = fmaxf(amax, fabsf(v));
                }
              }
              const float bg = nvfp4_block_scale(amax, P::a_scale(g));
#pragma unroll
              for (int j = 0; j < (VEC < 16 ? VEC : 16); ++j) a[b + j] = nvfp4_round(a[b + j], bg);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[VEC];
          widen(wv[r][step], wf, P::weights(g));
          if constexpr (P::QUANT == 2) {  // NVFP4: one E4M3 scale per 16 values along K (times 2^6, see widen)
#pragma unroll
            for (int b = 0; b < VEC / 16; ++b) {
              float part = 0.f;
#pragma unroll
              for (int j = 0; j < 16; ++j) part = fmaf(a[16 * b + j], wf[16 * b + j], part);
              acc[m][r] = fmaf(part, e4m3_to_float((bs[r][step] >> (8 * b)) & 0xffu) * 64.f, acc[m][r]);
            }
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[m][r] = fmaf(a[j], wf[j], acc[m][r]);
          }
        }
      }
    }
  }

  // 4. reduce over the warp and the K-splits, then the epilogue
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float s = warp_sum(acc[m][r]);
      if (lane == 0) red[ks][group][m][r] = s;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < GROUPS * M * PAIRS; i += blockDim.x) {
    const int gi = i / (M * PAIRS), m = (i / PAIRS) % M, r = i % PAIRS, n = (blockIdx.x * GROUPS + gi) * PAIRS + r;
    if (n < N) {
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int j = 0; j < S; ++j) {
        s0 += red[j][gi][m][r];
        if constexpr (P::GATED) s1 += red[j][gi][m][PAIRS + r];
      }
      if constexpr (P::DOWN_N > 0)
        h_s[i] = P::hidden(g, m, n, s0 * P::row_scale(g, n), s1 * P::row_scale(g, N + n));
      else if constexpr (P::GATED)
        P::epilogue(g, 0, m, n, s0 * P::row_scale(g, n), s1 * P::row_scale(g, N + n));
      else
        P::epilogue(g, 0, m, n, s0 * P::row_scale(g, n));
    }
  }

  // 5. DOWN: y[row] += sum_j h[j] W2[row, blockIdx.x J + j] for this block's J values of h, four rows per atomic
  if constexpr (P::DOWN_N > 0) {
    __syncthreads();
    float* __restrict__ y = P::down_out(g);
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      const int row0 = 4 * (threadIdx.x + 256 * c);
      if (row0 >= DN) break;
      float part[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float s = 0.f;
        constexpr int PER_WORD = J / DWORDS;  // weights per 32-bit word: 1, 2 or 4
#pragma unroll
        for (int i = 0; i < DWORDS; ++i) {
          float wf[PER_WORD];
          widen_word(dw[c][q][i], wf, P::down_weights(g));
#pragma unroll
          for (int j = 0; j < PER_WORD; ++j) s = fmaf(h_s[i * PER_WORD + j], wf[j], s);
        }
        part[q] = row0 + q < DN ? s * P::down_scale(g, row0 + q) : 0.f;
      }
      if (DN % 4 == 0) {
        atomic_add4(y + row0, part);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (row0 + q < DN) atomicAdd(y + row0 + q, part[q]);
      }
    }
  }
}
