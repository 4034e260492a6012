// Tensor-core flash attention for prefill-shaped problems (mma.sync m16n8k16, bf16 / f16 operands, f32
// accumulators): the function of attention.cuh, except that P is rounded to the operand type before P.V.
// Grid (ceil(T / BQ) * CL, BH); a block has WARPS warps, warp w owning query rows q0 + 16 w .. q0 + 16 w + 15.
// Per tile of BK keys each warp computes S = Q K^T (Q as A fragments: kept in registers when Q_REGS, else read
// from shared memory by ldmatrix at every tile), applies the score epilogue and the visibility mask to the
// accumulators, keeps an online softmax in registers (a row's values live in the 4 lanes of a quad), rounds P
// to the operand type in the layout of the A fragments of O += P V (V through ldmatrix.trans) and rescales O.
// K and V have one shared tile each, loaded a phase ahead: K of tile i + 1 arrives during softmax and P.V of
// tile i, V of tile i + 1 during S of tile i + 1. Views that are contiguous and 16-byte aligned along the head
// dim are copied by cp.async, any other view element by element. K and V may each be several sources along the
// key axis (a concatenation read in place): P::k_ptr / P::v_ptr pick the source of each key row.
// With CL > 1 the CL blocks of a thread-block cluster take equal runs of the key tiles and merge their
// (max, sum, unnormalized O) through distributed shared memory; every block finishes 1 / CL of the rows.
// Keys past the last one the block's last row sees are never read (zero-filled); a row masks the keys it
// does not see itself, and a row that sees none gets zeros.
#pragma once
#include "attention.cuh"
#include "mma.cuh"

// All shared memory is dynamic (the launch's size is the whole footprint): the Q, K, V tiles, reused after the
// key loop for the f32 partial O tile, then each row's max, sum and merge weights.
template <class P>
struct AttnMmaShape {
  static constexpr int BQ = 16 * P::WARPS, BK = P::BK, LDQ = P::HD + 8, LDK = P::HD + 8, LDV = P::VD + 8;
  static constexpr int LDO = P::VD + 4;
  static constexpr int STAGE_BYTES = (BQ * LDQ + BK * LDK + BK * LDV) * 2;
  static constexpr int MERGE_BYTES = BQ * LDO * 4;
  static constexpr int TILE_BYTES = STAGE_BYTES > MERGE_BYTES ? STAGE_BYTES : MERGE_BYTES;
  static constexpr int SMEM_BYTES = TILE_BYTES + (2 + P::CL) * BQ * 4;
};

__device__ __forceinline__ float exp2_approx(float x) {  // 2^x; -inf -> 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ROWS x COLS elements into a shared tile of row stride LD, tile row r from operand row row0 + r; rows at or
// past `valid` are zero-filled. at(row, col): a pointer to the operand element (any: a valid address for the
// zero-filling copies, which read nothing). CHUNKS: 16-byte cp.async copies
// (8 columns contiguous and aligned), else element copies walking rows fastest when ROW_INNER (the view's
// contiguous index) and columns fastest otherwise. The loops stay rolled: unrolled, the compiler keeps a
// 64-bit address per chunk live across the whole key loop.
template <class E, int ROWS, int COLS, int LD, int NT, bool CHUNKS, bool ROW_INNER, class At>
__device__ __forceinline__ void attn_load_tile(E* dst, const E* any, int row0, int valid, At at) {
  if constexpr (CHUNKS) {
    constexpr int CPR = COLS / 8;
#pragma unroll 1
    for (int c = threadIdx.x; c < ROWS * CPR; c += NT) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const bool ok = r < valid;
      mma::cp_async16(dst + r * LD + col, ok ? at(row0 + r, col) : any, ok);
    }
  } else {
#pragma unroll 1
    for (int e = threadIdx.x; e < ROWS * COLS; e += NT) {
      const int r = ROW_INNER ? e % ROWS : e / COLS, col = ROW_INNER ? e / ROWS : e % COLS;
      dst[r * LD + col] = r < valid ? *at(row0 + r, col) : E{0};
    }
  }
}

template <class P>
__device__ __forceinline__ void attention_mma(const typename P::Args& g) {
  using E = typename P::Elem;
  using Sh = AttnMmaShape<P>;
  constexpr int T = P::T, HD = P::HD, VD = P::VD, BK = P::BK, CL = P::CL, BQ = Sh::BQ, NT = 32 * P::WARPS;
  constexpr int LDQ = Sh::LDQ, LDK = Sh::LDK, LDV = Sh::LDV, LDO = Sh::LDO;
  constexpr int NK = BK / 8, NV = VD / 8, KS = HD / 16;  // key n-tiles of S, value n-tiles of O, k-steps of S
  constexpr float L2E = 1.4426950408889634f;
  static_assert(HD % 16 == 0 && VD % 16 == 0 && BK % 16 == 0 && BQ % CL == 0, "shape");
  extern __shared__ __align__(128) unsigned char smem[];
  E* const Qs = reinterpret_cast<E*>(smem);
  E* const Ks = Qs + BQ * LDQ;
  E* const Vs = Ks + BK * LDK;
  float* const Os = reinterpret_cast<float*>(smem);  // after the key loop
  float* const row_m = reinterpret_cast<float*>(smem + Sh::TILE_BYTES);
  float* const row_l = row_m + BQ;
  float* const weight = row_l + BQ;  // [BQ][CL]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rank = CL > 1 ? (int)mma::cluster_rank() : 0;
  const int bh = blockIdx.y, q0 = blockIdx.x / CL * BQ, w0 = q0 + 16 * warp;
  griddep_launch_dependents();
  griddep_wait();  // Q, K, V and pos come from earlier kernels
  const int pos = P::pos(g);

  // the block's keys are those its last row sees, in tiles; the cluster's blocks take equal runs of tiles
  const int n_keys = P::visible(pos, min(T, q0 + BQ) - 1);
  const int tiles = (n_keys + BK - 1) / BK, per = (tiles + CL - 1) / CL;
  const int tile0 = min(tiles, rank * per), tile1 = min(tiles, tile0 + per);
  // this thread's rows (fragment rows lane / 4 and lane / 4 + 8) and the keys each sees (none past T); a
  // warp skips the tiles none of its rows sees
  const int row0 = w0 + lane / 4, row1 = row0 + 8;
  const int vis0 = row0 < T ? P::visible(pos, row0) : 0, vis1 = row1 < T ? P::visible(pos, row1) : 0;
  const int warp_keys = w0 < T ? P::visible(pos, min(T, w0 + 16) - 1) : 0;

  auto q_at = [&](int t, int d) { return P::q_ptr(g, bh, t, d); };
  auto k_at = [&](int j, int d) { return P::k_ptr(g, bh, j, d); };
  auto v_at = [&](int j, int d) { return P::v_ptr(g, bh, j, d); };
  auto load_k = [&](int tile) {
    attn_load_tile<E, BK, HD, LDK, NT, P::K_CHUNKS, P::K_S_INNER>(Ks, g.k, tile * BK, n_keys - tile * BK, k_at);
  };
  auto load_v = [&](int tile) {
    attn_load_tile<E, BK, VD, LDV, NT, P::V_CHUNKS, P::V_S_INNER>(Vs, g.v, tile * BK, n_keys - tile * BK, v_at);
  };
  // commit groups: Q with the first K tile, then V; in the loop a K tile, then a V tile (maybe empty)
  attn_load_tile<E, BQ, HD, LDQ, NT, P::Q_CHUNKS, P::Q_T_INNER>(Qs, g.q, q0, T - q0, q_at);
  if (tile0 < tile1) load_k(tile0);
  mma::cp_async_commit();
  if (tile0 < tile1) load_v(tile0);
  mma::cp_async_commit();
  mma::cp_async_wait<1>();
  __syncthreads();

  unsigned qf[P::Q_REGS ? KS : 1][4];
  auto q_frag = [&](unsigned (&a)[4], int ks) {
    mma::ldmatrix_x4(a, Qs + (16 * warp + lane % 16) * LDQ + ks * 16 + (lane / 16) * 8);
  };
  if constexpr (P::Q_REGS)
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) q_frag(qf[ks], ks);

  float o[NV][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int ni = 0; ni < NV; ++ni)
#pragma unroll
    for (int c = 0; c < 4; ++c) o[ni][c] = 0.f;

  for (int tile = tile0; tile < tile1; ++tile) {
    const int j0 = tile * BK;
    const bool active = j0 < warp_keys;  // warp-uniform
    float s[NK][4];
    if (active) {  // S = Q K^T
#pragma unroll
      for (int nj = 0; nj < NK; ++nj)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[nj][c] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        unsigned a[4];
        if constexpr (P::Q_REGS) {
#pragma unroll
          for (int c = 0; c < 4; ++c) a[c] = qf[ks][c];
        } else {
          q_frag(a, ks);
        }
#pragma unroll
        for (int nj = 0; nj < NK; nj += 2) {
          unsigned b[4];
          const int key = nj * 8 + lane % 8 + (lane / 16) * 8;
          mma::ldmatrix_x4(b, Ks + key * LDK + ks * 16 + ((lane / 8) % 2) * 8);
          mma::mma16816<E>(s[nj], a, b[0], b[1]);
          mma::mma16816<E>(s[nj + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with the K tile
    if (tile + 1 < tile1) load_k(tile + 1);
    mma::cp_async_commit();

    unsigned pf[BK / 16][4];  // P as the A fragments of P.V
    if (active) {  // the score epilogue and mask, online softmax, P rounded to E
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nj = 0; nj < NK; ++nj)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c / 2, j = j0 + nj * 8 + 2 * (lane % 4) + c % 2;
          const float x = j < (h ? vis1 : vis0) ? P::score(g, bh, h ? row1 : row0, j, s[nj][c]) : -INFINITY;
          s[nj][c] = x;
          mx[h] = fmaxf(mx[h], x);
        }
      float base[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m[h], mx[h]);
        base[h] = m_new == -INFINITY ? 0.f : m_new * L2E;  // nothing seen yet: keep zeros, not NaN
        const float alpha = exp2_approx(m[h] * L2E - base[h]);
        m[h] = m_new;
        l[h] *= alpha;
#pragma unroll
        for (int ni = 0; ni < NV; ++ni) {
          o[ni][2 * h] *= alpha;
          o[ni][2 * h + 1] *= alpha;
        }
      }
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
        for (int c = 0; c < 4; ++c) {  // a0: row0, keys 0-7 of the k-step; a1: row1; a2, a3: keys 8-15
          const int h = c % 2, nj = 2 * kk + c / 2;
          pf[kk][c] = mma::pack2<E>(exp2_approx(fmaf(s[nj][2 * h], L2E, -base[h])),
                                    exp2_approx(fmaf(s[nj][2 * h + 1], L2E, -base[h])));
          l[h] += mma::unpack_lo<E>(pf[kk][c]) + mma::unpack_hi<E>(pf[kk][c]);  // the sum of what P.V adds
        }
    }
    mma::cp_async_wait<1>();  // the V tile (the next K tile may still be in flight)
    __syncthreads();
    if (active) {  // O += P V
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
        for (int ni = 0; ni < NV; ni += 2) {
          unsigned b[4];
          const int key = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
          mma::ldmatrix_x4_trans(b, Vs + key * LDV + ni * 8 + (lane / 16) * 8);
          mma::mma16816<E>(o[ni], pf[kk], b[0], b[1]);
          mma::mma16816<E>(o[ni + 1], pf[kk], b[2], b[3]);
        }
    }
    __syncthreads();  // every warp is done with the V tile
    if (tile + 1 < tile1) load_v(tile + 1);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // the next K tile
    __syncthreads();
  }

  // ---- merge: every block's (max, sum, unnormalized O) rows into shared memory; this block finishes rows
  // rank, rank + CL, ... from all CL partials
  mma::cp_async_wait<0>();
  __syncthreads();  // the staging tiles become the O tile
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  const int r = 16 * warp + lane / 4;
#pragma unroll
  for (int ni = 0; ni < NV; ++ni) {
    const int c = ni * 8 + 2 * (lane % 4);
    *reinterpret_cast<float2*>(Os + r * LDO + c) = make_float2(o[ni][0], o[ni][1]);
    *reinterpret_cast<float2*>(Os + (r + 8) * LDO + c) = make_float2(o[ni][2], o[ni][3]);
  }
  if (lane % 4 == 0) {
    row_m[r] = m[0]; row_l[r] = l[0];
    row_m[r + 8] = m[1]; row_l[r + 8] = l[1];
  }
  if constexpr (CL > 1) mma::cluster_sync();
  else __syncthreads();
  if (tid < BQ && tid % CL == rank) {  // each partial's weight in the row's result
    float ms[CL], ls[CL];
#pragma unroll
    for (int src = 0; src < CL; ++src) {
      ms[src] = CL > 1 ? mma::ld_cluster(&row_m[tid], src) : row_m[tid];
      ls[src] = CL > 1 ? mma::ld_cluster(&row_l[tid], src) : row_l[tid];
    }
    const SoftmaxMerge mg(CL, [&](int src) { return ms[src]; }, [&](int src) { return ls[src]; });
#pragma unroll
    for (int src = 0; src < CL; ++src) weight[tid * CL + src] = expf(ms[src] - mg.base) * mg.inv;
  }
  __syncthreads();
  constexpr int Q4 = VD / 4;
  for (int i = tid; i < BQ / CL * Q4; i += NT) {
    const int rr = i / Q4 * CL + rank, c = i % Q4 * 4, t = q0 + rr;
    if (t >= T) continue;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int src = 0; src < CL; ++src) {
      const float w = weight[rr * CL + src];
      if (w == 0.f) continue;  // no key of the row in that block (or a negligible share): skip the remote read
      const float4 v = CL > 1 ? mma::ld_cluster_f4(mma::cluster_addr(Os + rr * LDO + c, src))
                              : *reinterpret_cast<const float4*>(Os + rr * LDO + c);
      acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) P::store(g, bh, t, c + k, acc[k]);
  }
  if constexpr (CL > 1) mma::cluster_sync();  // no block leaves while another may still read its shared memory
}
