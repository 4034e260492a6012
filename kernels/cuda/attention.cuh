// Fused attention, one kernel: O[bh, t, :] = softmax_j(score(Q[bh, t, :] . K[bh, j, :])) @ V[bh, j, :]
// where score() is the generated epilogue (scale, mask, ...). Grid (ceil(T / TQ) * CL, BH); a block has
// TQ x KW warps = TQ queries x KW key segments. With CL > 1 the CL blocks of a thread-block cluster split one
// query block's keys and merge their partial softmax results through distributed shared memory, so decode
// (T small, one query block per head) still fills the GPU without a workspace or a second launch.
// A warp streams its key segment 32 keys at a time: lane j scores key j (the full dot product), the warp keeps
// an online softmax (running max and sum) and accumulates P.V with lanes splitting the value dims.
// Keys a query row does not see (P::visible: the dynamic KV length) are never loaded.
#pragma once
#include "mma.cuh"

// Merge n partial results (max m_i, sum l_i, unnormalized outputs o_i) of one query: weights e^(m_i - max)
// and 1 / sum; a query that saw no key (all m_i = -inf) gets zeros, not NaN.
struct SoftmaxMerge {
  float base, sum, inv;
  template <class GetM, class GetL>
  __device__ __forceinline__ SoftmaxMerge(int n, GetM get_m, GetL get_l) {
    float mx = -INFINITY;
    for (int i = 0; i < n; ++i) mx = fmaxf(mx, get_m(i));
    base = mx == -INFINITY ? 0.f : mx;
    sum = 0.f;
    for (int i = 0; i < n; ++i) sum += get_l(i) * expf(get_m(i) - base);
    inv = sum > 0.f ? 1.f / sum : 0.f;
  }
};

template <class P>
__device__ __forceinline__ void attention(const typename P::Args& g) {
  constexpr int TQ = P::TQ, KW = P::KW, CL = P::CL, HD = P::HD, VD = P::VD, T = P::T;
  constexpr int VPL = P::VPL, NT = TQ * KW * 32;
  __shared__ float q_s[TQ][HD];
  __shared__ float part_m[TQ][KW], part_l[TQ][KW];
  __shared__ float part_o[TQ][KW][VPL * 32];
  __shared__ float blk_m[TQ], blk_l[TQ];  // the block's merged result of each query (cluster merge)
  __shared__ float blk_o[CL > 1 ? TQ : 1][VPL * 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qi = warp / KW, kw = warp % KW;
  const int qb = blockIdx.x / CL, rank = CL > 1 ? (int)mma::cluster_rank() : 0;
  const int bh = blockIdx.y, t = qb * TQ + qi;
  griddep_launch_dependents();
  if constexpr (P::PREFETCH) {
    // The cache rows before pos do not change during a run: this run writes rows pos and later, and only the
    // entry's last launch (the state advance) writes pos. So the block streams its share of them (the chunk
    // computed below) into L2 while the previous kernel still runs.
    if (threadIdx.x == 0) {
      const int pos0 = P::pos(g);
      const int n = P::visible(pos0, min(T, (qb + 1) * TQ) - 1), ch = (n + CL - 1) / CL;
      const int a0 = min(n, rank * ch);
      P::prefetch(g, bh, a0, min(min(n, a0 + ch), pos0));
    }
  }
  griddep_wait();  // Q, the KV cache's new rows (and pos) come from earlier kernels
  const int pos = P::pos(g);

  for (int i = threadIdx.x; i < TQ * HD; i += NT) {
    const int tq = qb * TQ + i / HD;
    q_s[i / HD][i % HD] = tq < T ? P::load_q(g, bh, tq, i % HD) : 0.f;
  }
  __syncthreads();

  // The block's keys are those its last query row sees; the cluster's blocks take equal chunks of them and
  // the block's warps equal segments of the chunk, each clipped to what the warp's own row sees.
  const int n_keys = P::visible(pos, min(T, (qb + 1) * TQ) - 1);
  const int chunk = (n_keys + CL - 1) / CL;
  const int c0 = min(n_keys, rank * chunk), c1 = min(n_keys, c0 + chunk);
  const int seg = (c1 - c0 + KW - 1) / KW;
  const int j0 = min(c1, c0 + kw * seg);
  const int j1 = t < T ? min(min(c1, j0 + seg), P::visible(pos, t)) : j0;

  float m = -INFINITY, l = 0.f, o[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) o[i] = 0.f;
  // Decode (T <= 8): loads are never under a branch: a lane past the segment's end reads its last key instead
  // (visible, so finite) and weighs it 0, which lets all the key and value loads of a step be in flight
  // together (measured 2.5x faster on an H200). Prefill keeps the guarded loads: fewer registers, and with
  // many blocks per multiprocessor occupancy hides the latency (the unguarded form was 1.75x slower on ViT).
  constexpr bool UNGUARDED = T <= 8;
  for (int jb = j0; jb < j1; jb += 32) {
    const int j = UNGUARDED ? min(jb + lane, j1 - 1) : jb + lane;
    float dot = 0.f;
    if (UNGUARDED || j < j1) P::dot_qk(g, bh, j, q_s[qi], dot);
    const float s = jb + lane < j1 ? P::score(g, bh, t, j, dot) : -INFINITY;
    const float m_new = fmaxf(m, warp_max(s));
    const float base = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep zeros, not NaN
    const float p = expf(s - base);
    const float alpha = expf(m - base);
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int i = 0; i < VPL; ++i) o[i] *= alpha;
#pragma unroll
    for (int jj = 0; jj < 32; ++jj) {  // unrolled, so the value loads of all 32 keys are in flight together
      const float pj = __shfl_sync(0xffffffffu, p, jj);  // 0 past the segment's end
      if (UNGUARDED || jb + jj < j1) {
        float vv[VPL];
        P::load_v(g, bh, min(jb + jj, j1 - 1), lane, vv);
#pragma unroll
        for (int i = 0; i < VPL; ++i) o[i] = fmaf(pj, vv[i], o[i]);
      }
    }
    m = m_new;
  }
  if (lane == 0) { part_m[qi][kw] = m; part_l[qi][kw] = l; }
#pragma unroll
  for (int i = 0; i < VPL; ++i) part_o[qi][kw][P::dim(lane, i)] = o[i];
  __syncthreads();

  if (kw == 0) {  // merge the block's KW segments of each query
    const SoftmaxMerge mg(KW, [&](int w) { return part_m[qi][w]; }, [&](int w) { return part_l[qi][w]; });
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int d = P::dim(lane, i);
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < KW; ++w) acc += part_o[qi][w][d] * expf(part_m[qi][w] - mg.base);
      if constexpr (CL == 1) {
        if (t < T && d < VD) P::store(g, bh, t, d, acc * mg.inv);
      } else {
        blk_o[qi][d] = acc;  // relative to e^base, with the block's sum: merged again across the cluster
      }
    }
    if (CL > 1 && lane == 0) {
      blk_m[qi] = mg.base;
      blk_l[qi] = mg.sum;
    }
  }
  if constexpr (CL > 1) {
    mma::cluster_sync();
    // the cluster's blocks each finish a share of the (query, value dim) outputs from all CL partials
    for (int i = rank * NT + threadIdx.x; i < TQ * VD; i += CL * NT) {
      const int qj = i / VD, d = i % VD, tj = qb * TQ + qj;
      if (tj >= T) continue;
      float ms[CL], ls[CL];
#pragma unroll
      for (int r = 0; r < CL; ++r) {
        ls[r] = mma::ld_cluster(&blk_l[qj], r);
        ms[r] = ls[r] == 0.f ? -INFINITY : mma::ld_cluster(&blk_m[qj], r);  // no key in that block
      }
      const SoftmaxMerge mg(CL, [&](int r) { return ms[r]; }, [&](int r) { return ls[r]; });
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < CL; ++r)
        if (ls[r] != 0.f) acc += mma::ld_cluster(&blk_o[qj][d], r) * expf(ms[r] - mg.base);
      P::store(g, bh, tj, d, acc * mg.inv);
    }
    mma::cluster_sync();  // no block leaves while another may still read its shared memory
  }
}
