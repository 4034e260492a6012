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

constexpr int MAX_OPROJ_LOADS = 16;  // 16-byte o-projection weight loads a thread holds (64 registers)

template <class P>
__device__ __forceinline__ void attention(const typename P::Args& g) {
  constexpr int TQ = P::TQ, KW = P::KW, CL = P::CL, HD = P::HD, VD = P::VD, T = P::T;
  constexpr int VPL = P::VPL, NT = TQ * KW * 32;
  __shared__ float q_s[TQ][HD];
  __shared__ float part_m[TQ][KW], part_l[TQ][KW];
  __shared__ float part_o[TQ][KW][VPL * 32];
  __shared__ float blk_m[TQ], blk_l[TQ];  // the block's merged result of each query (cluster merge)
  __shared__ float blk_o[CL > 1 ? TQ : 1][VPL * 32];
  // OPROJ (one query): the head's merged output, rounded as it would be stored, then this block's share of the
  // o-projection's rows, added into the float32 accumulators with atomics
  constexpr int ON = P::OPROJ_N > 0 ? P::OPROJ_N : CL, OROWS = ON / CL, ORPT = (OROWS + NT - 1) / NT;
  constexpr int OCH = P::OPROJ_N > 0 ? VD * (int)sizeof(typename P::TWO) / 16 : 1;
  static_assert(P::OPROJ_N == 0 || (TQ == 1 && T == 1 && ON % CL == 0 && VD * sizeof(typename P::TWO) % 16 == 0),
                "a fused o-projection: one query, whole rows per block, 16-byte weight rows");
  // the first OREG row iterations' weights wait in registers; later ones are prefetched into L2 only
  constexpr int OREG = ORPT < MAX_OPROJ_LOADS / OCH ? ORPT : MAX_OPROJ_LOADS / OCH;
  __shared__ float o_s[P::OPROJ_N > 0 ? VD : 1];
  uint4 wo[OREG > 0 ? OREG : 1][OCH];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qi = warp / KW, kw = warp % KW;
  const int qb = blockIdx.x / CL, rank = CL > 1 ? (int)mma::cluster_rank() : 0;
  const int bh = blockIdx.y, t = qb * TQ + qi;
  griddep_launch_dependents();
  if constexpr (P::OPROJ_N > 0) {  // the o-projection's weights (constant) stream while the previous kernel runs
    const unsigned char* __restrict__ w = reinterpret_cast<const unsigned char*>(P::oproj_weights(g));
#pragma unroll
    for (int r = 0; r < ORPT; ++r) {
      const int row = rank * OROWS + r * NT + threadIdx.x;
      const bool ok = r * NT + (int)threadIdx.x < OROWS;
      const unsigned char* src = w + ((long)row * P::OPROJ_K + (long)bh * VD) * sizeof(typename P::TWO);
      if (r < OREG) {
#pragma unroll
        for (int c = 0; c < OCH; ++c) wo[r < OREG ? r : 0][c] = ok ? ld_weight16(src + 16 * c) : make_uint4(0, 0, 0, 0);
      } else if (ok) {
        l2_prefetch_span(src, 16 * OCH);
      }
    }
  }
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
        if (t < T && d < VD) {
          if constexpr (P::OPROJ_N > 0) o_s[d] = P::round_out(acc * mg.inv);
          else P::store(g, bh, t, d, acc * mg.inv);
        }
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
    // the cluster's blocks each finish a share of the (query, value dim) outputs from all CL partials (with an
    // o-projection, each block all of them: it multiplies them by its own rows)
    constexpr bool ALL = P::OPROJ_N > 0;
    for (int i = (ALL ? 0 : rank * NT) + threadIdx.x; i < TQ * VD; i += (ALL ? 1 : CL) * NT) {
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
      if constexpr (ALL) o_s[d] = P::round_out(acc * mg.inv);
      else P::store(g, bh, tj, d, acc * mg.inv);
    }
    mma::cluster_sync();  // no block leaves while another may still read its shared memory
  }
  if constexpr (P::OPROJ_N > 0) {
    __syncthreads();
#pragma unroll
    for (int r = 0; r < ORPT; ++r) {
      const int row = rank * OROWS + r * NT + threadIdx.x;
      if (r * NT + (int)threadIdx.x >= OROWS) break;
      float s = 0.f;
      constexpr int PER = 16 / (int)sizeof(typename P::TWO);  // weights per 16 bytes
      const unsigned char* src = reinterpret_cast<const unsigned char*>(P::oproj_weights(g) + (long)row * P::OPROJ_K
                                                                        + (long)bh * VD);
#pragma unroll
      for (int c = 0; c < OCH; ++c) {
        float wf[PER];
        unpack(r < OREG ? wo[r < OREG ? r : 0][c] : ld_weight16(src + 16 * c), wf, P::oproj_weights(g));
#pragma unroll
        for (int j = 0; j < PER; ++j) s = fmaf(o_s[c * PER + j], wf[j], s);
      }
      s *= P::oproj_scale(g, row);
#pragma unroll
      for (int k = 0; k < P::OPROJ_OUTS; ++k) atomicAdd(P::oproj_out(g, k) + row, s);
    }
  }
}
