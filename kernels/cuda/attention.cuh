// Fused attention, one kernel: O[bh, t, :] = softmax_j(score(Q[bh, t, :] . K[bh, j, :])) @ V[bh, j, :]
// where score() is the generated epilogue (scale, mask, ...). Grid (ceil(T / TQ), BH); 256 threads = 8 warps
// = TQ queries x KW key segments. A warp streams its key segment 32 keys at a time: lane j scores key j
// (the full dot product), the warp keeps an online softmax (running max and sum), and accumulates P.V with
// lanes splitting the value dims. The KW partial results of a query merge through shared memory.
#pragma once
#include "common.cuh"

template <class P>
__device__ __forceinline__ void attention(const typename P::Args& g) {
  constexpr int TQ = P::TQ, KW = P::KW, HD = P::HD, VD = P::VD, S = P::S, T = P::T;
  constexpr int VPL = (VD + 31) / 32;  // value dims per lane
  constexpr int SEG = (S + KW - 1) / KW;
  __shared__ float q_s[TQ][HD];
  __shared__ float part_m[TQ][KW], part_l[TQ][KW];
  __shared__ float part_o[TQ][KW][VPL * 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qi = warp / KW, kw = warp % KW;
  const int bh = blockIdx.y, t = blockIdx.x * TQ + qi;

  for (int i = threadIdx.x; i < TQ * HD; i += blockDim.x) {
    const int tq = blockIdx.x * TQ + i / HD;
    q_s[i / HD][i % HD] = tq < T ? P::load_q(g, bh, tq, i % HD) : 0.f;
  }
  __syncthreads();

  float m = -INFINITY, l = 0.f, o[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) o[i] = 0.f;
  const int j0 = kw * SEG, j1 = min(S, j0 + SEG);
  if (t < T) {
    for (int jb = j0; jb < j1; jb += 32) {
      const int j = jb + lane;
      float s = -INFINITY;
      if (j < j1) {
        float dot = 0.f;
        P::dot_qk(g, bh, j, q_s[qi], dot);
        s = P::score(g, bh, t, j, dot);
      }
      const float cmax = warp_max(s);
      const float m_new = fmaxf(m, cmax);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep zeros, not NaN
      const float p = expf(s - base);
      const float alpha = expf(m - base);
      l = l * alpha + warp_sum(p);
#pragma unroll
      for (int i = 0; i < VPL; ++i) o[i] *= alpha;
#pragma unroll
      for (int jj = 0; jj < 32; ++jj) {  // unrolled, so the value loads of all 32 keys are in flight together
        const float pj = __shfl_sync(0xffffffffu, p, jj);
        if (jb + jj < j1) {
#pragma unroll
          for (int i = 0; i < VPL; ++i) {
            const int d = i * 32 + lane;
            if (d < VD) o[i] = fmaf(pj, P::load_v(g, bh, jb + jj, d), o[i]);
          }
        }
      }
      m = m_new;
    }
  }
  if (lane == 0) { part_m[qi][kw] = m; part_l[qi][kw] = l; }
#pragma unroll
  for (int i = 0; i < VPL; ++i) part_o[qi][kw][i * 32 + lane] = o[i];
  __syncthreads();
  if (kw == 0 && t < T) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < KW; ++w) mx = fmaxf(mx, part_m[qi][w]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, scale[KW];
#pragma unroll
    for (int w = 0; w < KW; ++w) { scale[w] = expf(part_m[qi][w] - base); sum += part_l[qi][w] * scale[w]; }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int d = i * 32 + lane;
      if (d < VD) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < KW; ++w) acc += part_o[qi][w][d] * scale[w];
        P::store(g, bh, t, d, acc * inv);
      }
    }
  }
}
