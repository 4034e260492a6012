// Tensor-core GEMM (mma.sync m16n8k16, bf16 or f16 operands, f32 accumulators) with the SIMT GEMM's features:
//   C[b, m, n] = P::epilogue(b, m, n, row_scale(n) * sum_k A'(b, m, k) * B'(b, k, n))
// A' is A (or its LayerNorm / RMSNorm over K) rounded to the operand type T; B' is B rounded to T, or a
// quantized weight decoded exactly to T (fp8: the E4M3 value; nvfp4: E2M1 x its E4M3 block scale), whose
// per-row fp8 scale / nvfp4 global scale row_scale(n) multiplies the f32 sum.
//
// WG groups of 4 warps (128 * WG threads); each group's warps tile the block's BM x BN outputs as
// WARPS_M x WARPS_N, and the groups take turns over the 16-wide k-steps of every BK = 64 tile (their partial
// tiles are summed in the epilogue): two groups give a multiprocessor 8 warps to hide latency with.
// Shared tiles are row-major [rows][BK + 8] (k contiguous; the 16-byte pad makes ldmatrix conflict free):
// A as [m][k], B as [n][k], so plain (non-transposed) ldmatrix yields both mma fragments.
// Operand staging (compile-time modes chosen in Python):
//   A_MODE 0  cp.async of 16-byte chunks (8 contiguous, aligned elements) into a STAGES-deep ring
//          1  norm prologue: the block's whole A panel (BM x its K range) in shared memory via cp.async,
//             row statistics from shared memory, normalized in place once
//          2  element loads through P::load_a (any view, any dtype), norm applied on the way
//   B_MODE 0  cp.async chunks of a 16-bit B stored [n][k]      1 / 2  fp8 / nvfp4 bytes by cp.async into a
//          raw ring, decoded into the T tile by the threads that issued them      3  element loads
// Split-K: SPLIT blocks of a thread-block cluster (along z) share a tile; each reduces its K range, then the
// partial tiles are summed through distributed shared memory, each block running the epilogue on 1/SPLIT of
// the tile. Norm statistics are combined the same way (Chan's parallel mean / M2 merge); split-K needs sm_90+.
// Programmatic dependent launch ready: constant weight tiles (B_CONST) load before griddepcontrol.wait.
// FP8 activations (P::AQ, kernels/quant.py): A' is rounded to E4M3 after division by its scale (static per
// tensor, or each row's max |A'| / 448, reduced over the cluster) as it is staged; the scale multiplies the
// f32 sums. With an fp8 weight too (P::FP8) both operands enter mma.sync m16n8k32 as E4M3 bytes (native on
// sm_89 / sm_120; ptxas widens the fragments to f16 for HMMA on sm_90 / sm_100 / sm_110); otherwise the E4M3
// values are staged exactly in T.
#pragma once
#include "mma.cuh"

template <class P>
struct MmaShape {
  static constexpr int BM = P::BM, BN = P::BN, BK = 64, ST = P::STAGES, LDS = BK + 8;
  static constexpr int KT = (P::K + BK - 1) / BK;                    // k-tiles of the whole K
  static constexpr int KTS = (KT + P::SPLIT - 1) / P::SPLIT;         // at most this many per split
  static constexpr int LDP = KTS * BK + 8;                           // A panel row stride (A_MODE 1)
  // FP8: E4M3 byte tiles with rows of BK + 16 bytes (16-byte aligned, ldmatrix conflict free); A is staged in
  // T first (the cp.async ring or the norm panel) unless it is loaded element by element
  static constexpr int LDS8 = BK + 16, LDP8 = KTS * BK + 16;
  static constexpr int A_ELEMS = P::A_MODE == 1 ? BM * LDP : (P::FP8 && P::A_MODE == 2) ? 0 : ST * BM * LDS;
  static constexpr int B_ELEMS = P::FP8 ? 0 : ST * BN * LDS;
  static constexpr int A8_BYTES = !P::FP8 ? 0 : P::A_MODE == 1 ? BM * LDP8 : ST * BM * LDS8;
  static constexpr int NVFP4_CHUNKS = BN * BK / 32;                  // 16-byte chunks of an nvfp4 tile
  static constexpr int RAW_LD = P::FP8 ? LDS8 : BK;                  // fp8 weight row stride in the raw ring
  static constexpr int RAW_STAGE = P::B_MODE == 1 ? BN * RAW_LD : P::B_MODE == 2 ? NVFP4_CHUNKS * (16 + 4) : 0;
  static constexpr int RED_LD = BN + 8;                              // f32 partial tile row stride
  static constexpr int PIPE_BYTES = (A_ELEMS + B_ELEMS) * 2 + ST * RAW_STAGE + A8_BYTES;
  static constexpr int RED_BYTES = P::WG * BM * RED_LD * 4;      // one partial tile per warp group
  static constexpr int SMEM_BYTES = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;
};

// for (c = tid; c < TOTAL; c += THREADS) with a compile-time trip count, so the loop unrolls
#define MMA_FOR_CHUNKS(c, TOTAL)                                                          \
  _Pragma("unroll") for (int c##_i = 0; c##_i < ((TOTAL) + THREADS - 1) / THREADS; ++c##_i) \
    if (const int c = threadIdx.x + c##_i * THREADS; (TOTAL) % THREADS == 0 || c < (TOTAL))

template <class P>
__device__ __forceinline__ void gemm_mma(const typename P::Args& g) {
  using T = typename P::T;
  using S = MmaShape<P>;
  constexpr int BM = S::BM, BN = S::BN, BK = S::BK, ST = S::ST, LDS = S::LDS, LDP = S::LDP;
  constexpr int WG = P::WG, THREADS = 128 * WG, KS_PER_WG = BK / 16 / WG;
  constexpr int WARPS_M = BM == 16 ? 1 : 2, WARPS_N = 4 / WARPS_M;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, MI = WTM / 16, NI = WTN / 8;
  constexpr int SPLIT = P::SPLIT;
  static_assert(MI >= 1 && NI % 2 == 0 && WTM % 16 == 0 && BM <= 128 && ST >= 2 && (WG == 1 || WG == 2), "shape");
  static_assert(P::LN || P::AQ == 2 ? P::A_MODE != 0 : P::A_MODE != 1,
                "a norm prologue or per-row FP8 scales stage A in mode 1 or 2");
  static_assert(!P::FP8 || ((P::AQ == 1 || P::AQ == 2) && P::B_MODE == 1), "FP8 mma: FP8 activations, fp8 weight");
  static_assert(THREADS % BM == 0 && THREADS / BM <= 16, "row statistics: a row's threads within half a warp");
  static_assert((P::A_MODE == 2 || P::K % 8 == 0) && (P::B_MODE != 1 || P::K % 16 == 0) &&
                (P::B_MODE != 2 || P::K % 64 == 0), "16-byte chunks along K");
#if __CUDA_ARCH__ < 900
  static_assert(SPLIT == 1, "split-K reduces through thread-block clusters: sm_90 or newer");
#endif
#if __CUDA_ARCH__ < 890
  static_assert(!P::FP8, "E4M3 mma: sm_89 or newer");
#endif
  extern __shared__ __align__(128) unsigned char smem[];
  T* const As = reinterpret_cast<T*>(smem);
  T* const Bs = As + S::A_ELEMS;
  unsigned char* const Braw = reinterpret_cast<unsigned char*>(Bs + S::B_ELEMS);
  unsigned char* const A8 = Braw + ST * S::RAW_STAGE;  // FP8: A as E4M3 bytes (ring, or the panel)
  constexpr int LN_ROWS = P::LN ? BM : 1, QS_ROWS = P::AQ == 2 ? BM : 1;  // static arrays only where used
  __shared__ float row_mean[LN_ROWS], row_rstd[LN_ROWS], part_mean[LN_ROWS], part_m2[LN_ROWS];
  __shared__ float row_qs[QS_ROWS], part_amax[QS_ROWS];  // per-row FP8 scales of A' (P::AQ == 2)
  float a_qs = 1.f;  // the static FP8 scale (P::AQ == 1) or NVFP4 global scale (3) of A', read after griddep_wait
  auto qscale = [&](int r) {  // what the sums of A' row r are multiplied by
    if constexpr (P::AQ == 2) return row_qs[r];
    else return a_qs;
  };
  // NVFP4 A' (P::AQ == 3): the staged value of x in a 16-value block with max |x| amax, e2m1(x / (b g)) b with
  // b = e4m3(amax / 6 / g): exact in T, its global scale g applied to the sums (kernels/quant.py)
  auto nvfp4_stage = [&](float x, float amax) {
    const float b = e4m3_round(amax / 6.f / a_qs), bg = b * a_qs;
    return bg > 0.f ? e2m1_round(x / bg) * b : e2m1_round(x) / a_qs;
  };

  const int tid = threadIdx.x, warp = tid / 32 % 4, wg = tid / 128, lane = tid % 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  int rank = 0;
  if constexpr (SPLIT > 1) rank = mma::cluster_rank();
  const int bat = blockIdx.z / SPLIT, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int kt0 = rank * S::KT / SPLIT, kt1 = (rank + 1) * S::KT / SPLIT, nkt = kt1 - kt0;
  const int kbeg = kt0 * BK, kend = min(kt1 * BK, P::K);

  // ---- stage loads --------------------------------------------------------------------------------
  // 16-byte chunks of a BK-wide tile: thread t copies column (t % 8) * 8 of rows t / 8 + RSTEP i, so its
  // row addresses (views may decompose m / n over several atoms) are computed once, before the K loop.
  constexpr int RSTEP = THREADS / 8;
  constexpr int A_CH = P::A_MODE == 0 ? (BM + RSTEP - 1) / RSTEP : 1, B_CH = P::B_MODE == 0 ? (BN + RSTEP - 1) / RSTEP : 1;
  const int ck = (tid % 8) * 8, cr = tid / 8;
  const T* a_rows[A_CH];
  const T* b_rows[B_CH];
  if constexpr (P::A_MODE == 0)
#pragma unroll
    for (int i = 0; i < A_CH; ++i) {
      const int r = cr + RSTEP * i;
      a_rows[i] = r < BM && m0 + r < P::M ? P::a_row(g, bat, m0 + r) : nullptr;
    }
  if constexpr (P::B_MODE == 0)
#pragma unroll
    for (int i = 0; i < B_CH; ++i) {
      const int r = cr + RSTEP * i;
      b_rows[i] = r < BN && n0 + r < P::N ? P::b_row(g, bat, n0 + r) : nullptr;
    }

  auto load_a_tile = [&](int kt, int s) {  // A_MODE 0 / 2: tile kt into ring stage s
    T* dst = As + s * BM * LDS;
    const int k0 = kt * BK;
    if constexpr (P::A_MODE == 0) {
      const int k = k0 + ck;
      const long ko = P::a_kofs(k);
#pragma unroll
      for (int i = 0; i < A_CH; ++i) {
        const bool ok = a_rows[i] != nullptr && k < P::K;
        if (BM % RSTEP == 0 || cr + RSTEP * i < BM)
          mma::cp_async16(dst + (cr + RSTEP * i) * LDS + ck, ok ? a_rows[i] + ko : g.a, ok);
      }
    } else {
      for (int e = tid; e < BM * BK; e += THREADS) {
        const int r = P::A_M_INNER ? e % BM : e / BK, kk = P::A_M_INNER ? e / BM : e % BK;
        const int m = m0 + r, k = k0 + kk;
        float v = 0.f;
        if (m < P::M && k < P::K) {
          v = P::load_a(g, bat, m, k);
          if constexpr (P::LN) v = (v - row_mean[r]) * row_rstd[r] * P::ln_gamma(g, k) + P::ln_beta(g, k);
        }
        if constexpr (P::AQ == 3) {  // 16 consecutive threads hold one row's 16-value block (k inner)
          float a = fabsf(v);
#pragma unroll
          for (int o = 8; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
          dst[r * LDS + kk] = from_float<T>(nvfp4_stage(v, a));
          continue;
        }
        if constexpr (P::AQ) v = v / qscale(r);
        if constexpr (P::FP8) {
#if __CUDA_ARCH__ >= 890
          A8[s * BM * S::LDS8 + r * S::LDS8 + kk] = (unsigned char)(e4m3x2_bits(v, 0.f) & 0xffu);
#endif
        } else {
          dst[r * LDS + kk] = from_float<T>(P::AQ ? e4m3_round(v) : v);
        }
      }
    }
  };
  auto load_b_tile = [&](int kt, int s) {
    T* dst = Bs + s * BN * LDS;
    unsigned char* raw = Braw + s * S::RAW_STAGE;
    const int k0 = kt * BK;
    if constexpr (P::B_MODE == 0) {
      const int k = k0 + ck;
      const long ko = P::b_kofs(k);
#pragma unroll
      for (int i = 0; i < B_CH; ++i) {
        const bool ok = b_rows[i] != nullptr && k < P::K;
        if (BN % RSTEP == 0 || cr + RSTEP * i < BN)
          mma::cp_async16(dst + (cr + RSTEP * i) * LDS + ck, ok ? b_rows[i] + ko : g.b, ok);
      }
    } else if constexpr (P::B_MODE == 1) {  // fp8 rows of K bytes: 16-byte chunks of 16 values
      MMA_FOR_CHUNKS(c, BN * BK / 16) {
        const int r = c / (BK / 16), kk = (c % (BK / 16)) * 16, n = n0 + r, k = k0 + kk;
        const bool ok = n < P::N && k < P::K;
        mma::cp_async16(raw + r * S::RAW_LD + kk, ok ? (const void*)(g.b + (long)n * P::K + k) : (const void*)g.b,
                        ok);
      }
    } else if constexpr (P::B_MODE == 2) {  // nvfp4 rows of K/2 bytes: chunks of 32 values + their 2 scales
      MMA_FOR_CHUNKS(c, S::NVFP4_CHUNKS) {
        const int r = c / (BK / 32), kk = (c % (BK / 32)) * 32, n = n0 + r, k = k0 + kk;
        const bool ok = n < P::N && k < P::K;
        mma::cp_async16(raw + c * 16, ok ? (const void*)(g.b + ((long)n * P::K + k) / 2) : (const void*)g.b, ok);
        // the 4 scale bytes of the row's 64-value step (K % 64 == 0 keeps them 4-byte aligned)
        mma::cp_async4(raw + S::NVFP4_CHUNKS * 16 + c * 4,
                       ok ? (const void*)(g.b_block + ((long)n * P::K + k0) / 16) : (const void*)g.b_block, ok);
      }
    } else {
      for (int e = tid; e < BN * BK; e += THREADS) {
        const int r = P::B_N_INNER ? e % BN : e / BK, kk = P::B_N_INNER ? e / BN : e % BK;
        const int n = n0 + r, k = k0 + kk;
        dst[r * LDS + kk] = from_float<T>(n < P::N && k < P::K ? P::load_bq(g, bat, k, n) : 0.f);
      }
    }
  };
  // after the wait: each thread decodes the quantized chunks it copied itself, so no barrier is needed first
  auto decode_b = [&](int s) {
    T* dst = Bs + s * BN * LDS;
    const unsigned char* raw = Braw + s * S::RAW_STAGE;
    if constexpr (P::B_MODE == 1 && !P::FP8) {
      MMA_FOR_CHUNKS(c, BN * BK / 16) {
        const int r = c / (BK / 16), kk = (c % (BK / 16)) * 16;
        const uint4 v = *reinterpret_cast<const uint4*>(raw + r * BK + kk);
        const unsigned w[4] = {v.x, v.y, v.z, v.w};
        unsigned o[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          o[2 * i] = mma::e4m3x2_to<T>((unsigned short)(w[i] & 0xffffu));
          o[2 * i + 1] = mma::e4m3x2_to<T>((unsigned short)(w[i] >> 16));
        }
        uint4* d = reinterpret_cast<uint4*>(dst + r * LDS + kk);
        d[0] = make_uint4(o[0], o[1], o[2], o[3]);
        d[1] = make_uint4(o[4], o[5], o[6], o[7]);
      }
    } else if constexpr (P::B_MODE == 2) {
      MMA_FOR_CHUNKS(c, S::NVFP4_CHUNKS) {
        const int r = c / (BK / 32), half = c % (BK / 32);
        const uint4 v = *reinterpret_cast<const uint4*>(raw + c * 16);
        const unsigned w[4] = {v.x, v.y, v.z, v.w};
        const unsigned scales = *reinterpret_cast<const unsigned*>(raw + S::NVFP4_CHUNKS * 16 + c * 4);
        const float s0 = e4m3_to_float((scales >> (16 * half)) & 0xffu);
        const float s1 = e4m3_to_float((scales >> (16 * half + 8)) & 0xffu);
        unsigned o[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const float sc = i < 8 ? s0 : s1;
          const unsigned byte = (w[i / 4] >> (8 * (i % 4))) & 0xffu;
          o[i] = mma::pack2<T>(e2m1_to_float(byte & 15u) * sc, e2m1_to_float(byte >> 4) * sc);
        }
        uint4* d = reinterpret_cast<uint4*>(dst + r * LDS + half * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) d[i] = make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
      }
    }
  };

  // 8 values of A' (one 16-byte chunk of T) divided by their FP8 scale: E4M3 bytes to dst8 (P::FP8), or the
  // E4M3 values back in T to dst
  auto quant8 = [&](float (&f)[8], float scale, T* dst, unsigned char* dst8) {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] /= scale;
    if constexpr (P::FP8) {
#if __CUDA_ARCH__ >= 890
      unsigned w[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        w[i] = e4m3x2_bits(f[4 * i], f[4 * i + 1]) | (unsigned)e4m3x2_bits(f[4 * i + 2], f[4 * i + 3]) << 16;
      *reinterpret_cast<uint2*>(dst8) = make_uint2(w[0], w[1]);
#endif
    } else {
      unsigned w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = mma::pack2<T>(e4m3_round(f[2 * i]), e4m3_round(f[2 * i + 1]));
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  };
  // after the wait, A_MODE 0 with a static FP8 scale or NVFP4: each thread quantizes the chunks it copied
  // itself (NVFP4: with its neighbour lane, which copied the other half of each 16-value block)
  auto quant_a = [&](int s) {
    if constexpr (P::A_MODE == 0 && P::AQ == 3) {
      T* src = As + s * BM * LDS;
#pragma unroll
      for (int i = 0; i < A_CH; ++i) {
        const int r = cr + RSTEP * i;
        const bool valid = BM % RSTEP == 0 || r < BM;
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (valid) unpack(*reinterpret_cast<const uint4*>(src + r * LDS + ck), f, src);
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) a = fmaxf(a, fabsf(f[j]));
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));  // lane ^ 1: the same row, the block's other half
        if (valid) {
          unsigned w[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) w[j] = mma::pack2<T>(nvfp4_stage(f[2 * j], a), nvfp4_stage(f[2 * j + 1], a));
          *reinterpret_cast<uint4*>(src + r * LDS + ck) = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
    if constexpr (P::A_MODE == 0 && P::AQ == 1) {
      T* src = As + s * BM * LDS;
#pragma unroll
      for (int i = 0; i < A_CH; ++i) {
        const int r = cr + RSTEP * i;
        if (BM % RSTEP != 0 && r >= BM) continue;
        float f[8];
        unpack(*reinterpret_cast<const uint4*>(src + r * LDS + ck), f, src);
        quant8(f, a_qs, src + r * LDS + ck, A8 + s * BM * S::LDS8 + r * S::LDS8 + ck);
      }
    }
  };

  // ---- norm statistics ----------------------------------------------------------------------------
  // Each block reduces its rows over its own K range [kbeg, kend) to (mean, M2); a cluster merges them in
  // rank order (Chan et al.), so every block of the cluster gets the same statistics.
  // sum(r, j, mean, sq): thread j of TPR's partial sum over row r of (x - mean), or of (x - mean)^2 if sq
  auto stats = [&](auto sum) {
    constexpr int TPR = THREADS / BM;  // threads per row, consecutive lanes (at most 16: one warp's)
    const int r = tid / TPR, j = tid % TPR;
    const bool ok = m0 + r < P::M;
    float s = 0.f;
    if (!P::RMS && ok) s = sum(r, j, 0.f, false);
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float mean = kend > kbeg ? s / (kend - kbeg) : 0.f;
    float q = ok ? sum(r, j, mean, true) : 0.f;
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    if (j == 0) { part_mean[r] = mean; part_m2[r] = q; }
    if constexpr (SPLIT > 1) {
      mma::cluster_sync();
      if (tid < BM) {
        float n_acc = 0.f, mean_acc = 0.f, m2_acc = 0.f;
        for (int src = 0; src < SPLIT; ++src) {
          const int nb = min(((src + 1) * S::KT / SPLIT) * BK, P::K) - (src * S::KT / SPLIT) * BK;
          if (nb <= 0) continue;
          float mb, m2b;
          mb = mma::ld_cluster(&part_mean[tid], src);
          m2b = mma::ld_cluster(&part_m2[tid], src);
          const float n_ab = n_acc + nb, delta = mb - mean_acc;
          mean_acc += delta * (nb / n_ab);
          m2_acc += m2b + delta * delta * (n_acc * nb / n_ab);
          n_acc = n_ab;
        }
        row_mean[tid] = mean_acc;
        row_rstd[tid] = 1.f / sqrtf(m2_acc / P::K + P::EPS);
      }
    } else {
      __syncthreads();
      if (tid < BM) { row_mean[tid] = part_mean[tid]; row_rstd[tid] = 1.f / sqrtf(part_m2[tid] / P::K + P::EPS); }
    }
    __syncthreads();
  };

  // ---- per-row FP8 scales (P::AQ == 2): max |A'| over the block's K range, merged over the cluster -------
  // amax(r, j): thread j of TPR's partial max over row r
  auto row_scales = [&](auto amax) {
    constexpr int TPR = THREADS / BM;
    const int r = tid / TPR, j = tid % TPR;
    float a = m0 + r < P::M ? amax(r, j) : 0.f;
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if (j == 0) part_amax[r] = a;
    if constexpr (SPLIT > 1) {
      mma::cluster_sync();
      if (tid < BM) {
        float m = 0.f;
        for (int src = 0; src < SPLIT; ++src) {
          m = fmaxf(m, mma::ld_cluster(&part_amax[tid], src));
        }
        row_qs[tid] = act_row_scale(m);
      }
    } else {
      __syncthreads();
      if (tid < BM) row_qs[tid] = act_row_scale(part_amax[tid]);
    }
    __syncthreads();
  };

  // Programmatic dependent launch (a no-op without it): the next kernel may start its own constant-weight
  // prologue now; this one prefetches its weight tiles before waiting for the kernels that write A.
  griddep_launch_dependents();
  if constexpr (P::B_CONST) {
#pragma unroll
    for (int i = 0; i < ST - 1; ++i)
      if (i < nkt) load_b_tile(kt0 + i, i);
  }
  griddep_wait();
  if constexpr (P::AQ == 1 || P::AQ == 3) a_qs = P::a_scale(g);

  if constexpr (P::LN && P::A_MODE == 2)
    stats([&](int r, int j, float mean, bool sq) {
      float acc = 0.f;
      for (int k = kbeg + j; k < kend; k += THREADS / BM) {
        const float d = P::load_a(g, bat, m0 + r, k) - mean;
        acc += sq ? d * d : d;
      }
      return acc;
    });
  if constexpr (P::AQ == 2 && P::A_MODE == 2)
    row_scales([&](int r, int j) {
      float a = 0.f;
      for (int k = kbeg + j; k < kend; k += THREADS / BM) {
        float v = P::load_a(g, bat, m0 + r, k);
        if constexpr (P::LN) v = (v - row_mean[r]) * row_rstd[r] * P::ln_gamma(g, k) + P::ln_beta(g, k);
        a = fmaxf(a, fabsf(v));
      }
      return a;
    });

  // ---- prologue: the A panel (A_MODE 1) and the first ST - 1 tiles ----------------------------------
  constexpr int CPR = S::KTS * BK / 8;  // 16-byte chunks per panel row
  if constexpr (P::A_MODE == 1) {
    for (int c = tid; c < BM * CPR; c += THREADS) {
      const int r = c / CPR, kk = (c % CPR) * 8, m = m0 + r, k = kbeg + kk;
      const bool ok = m < P::M && k < kend;
      mma::cp_async16(As + r * LDP + kk, ok ? P::a_row(g, bat, m) + P::a_kofs(k) : g.a, ok);
    }
  }
  // commit group i holds A tile i (group 0 also the panel and any prefetched weight tiles), and B tile i
#pragma unroll
  for (int i = 0; i < ST - 1; ++i) {
    if (i < nkt) {
      if constexpr (P::A_MODE != 1) load_a_tile(kt0 + i, i);
      if constexpr (!P::B_CONST) load_b_tile(kt0 + i, i);
    }
    mma::cp_async_commit();
  }

  if constexpr (P::A_MODE == 1) {  // the panel: statistics, FP8 scales, then normalized / quantized in place once
    mma::cp_async_wait<ST - 2>();  // the first group holds the panel
    __syncthreads();
    if constexpr (P::LN)
      stats([&](int r, int j, float mean, bool sq) {
        float acc = 0.f;
        for (int c = j; c * 8 < kend - kbeg; c += THREADS / BM) {  // the panel is zero past kend
          const uint4 v = *reinterpret_cast<const uint4*>(As + r * LDP + c * 8);
          const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float d0 = mma::unpack_lo<T>(w[i]) - mean, d1 = mma::unpack_hi<T>(w[i]) - mean;
            acc += sq ? d0 * d0 + d1 * d1 : d0 + d1;
          }
        }
        return acc;
      });
    auto prime = [&](int r, int k, float x) {  // A'(r, k) from the panel's value x
      if constexpr (P::LN) x = (x - row_mean[r]) * row_rstd[r] * P::ln_gamma(g, k) + P::ln_beta(g, k);
      return x;
    };
    if constexpr (P::AQ == 2)
      row_scales([&](int r, int j) {
        float a = 0.f;
        for (int c = j; c * 8 < kend - kbeg; c += THREADS / BM) {
          float f[8];
          unpack(*reinterpret_cast<const uint4*>(As + r * LDP + c * 8), f, As);
#pragma unroll
          for (int i = 0; i < 8; ++i) a = fmaxf(a, fabsf(prime(r, kbeg + c * 8 + i, f[i])));
        }
        return a;
      });
    if constexpr (P::AQ == 3) {  // NVFP4: a thread per 16-value block (two chunks); K % 16 == 0
      for (int c = tid; c < BM * CPR / 2; c += THREADS) {
        const int r = c % BM, kk = (c / BM) * 16, k = kbeg + kk;
        if (m0 + r >= P::M || k >= kend) continue;  // zero there
        uint4* p = reinterpret_cast<uint4*>(As + r * LDP + kk);
        float lo[8], hi[8], a = 0.f;
        unpack(p[0], lo, As);
        unpack(p[1], hi, As);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          lo[i] = prime(r, k + i, lo[i]);
          hi[i] = prime(r, k + 8 + i, hi[i]);
          a = fmaxf(a, fmaxf(fabsf(lo[i]), fabsf(hi[i])));
        }
        unsigned w[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          w[i] = mma::pack2<T>(nvfp4_stage(lo[2 * i], a), nvfp4_stage(lo[2 * i + 1], a));
          w[4 + i] = mma::pack2<T>(nvfp4_stage(hi[2 * i], a), nvfp4_stage(hi[2 * i + 1], a));
        }
        p[0] = make_uint4(w[0], w[1], w[2], w[3]);
        p[1] = make_uint4(w[4], w[5], w[6], w[7]);
      }
    } else {
      for (int c = tid; c < BM * CPR; c += THREADS) {
        const int r = c % BM, kk = (c / BM) * 8, k = kbeg + kk;  // neighbours share a column: gamma stays cached
        T* p = As + r * LDP + kk;
        unsigned char* p8 = A8 + r * S::LDP8 + kk;
        if (m0 + r >= P::M || k >= kend) {
          if constexpr (P::FP8) *reinterpret_cast<uint2*>(p8) = make_uint2(0u, 0u);  // the byte panel starts unset
          continue;
        }
        float f[8];
        unpack(*reinterpret_cast<const uint4*>(p), f, p);
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = prime(r, k + i, f[i]);
        if constexpr (P::AQ) {
          quant8(f, qscale(r), p, p8);
        } else {
          unsigned w[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) w[i] = mma::pack2<T>(f[2 * i], f[2 * i + 1]);
          *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
    // the main loop's first barrier orders these writes before any ldmatrix
  }

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  // ---- main loop ----------------------------------------------------------------------------------
  for (int i = 0; i < nkt; ++i) {
    const int s = i % ST;
    mma::cp_async_wait<ST - 2>();
    decode_b(s);
    quant_a(s);
    __syncthreads();  // tile i visible to all; every warp is done with the stage the next load overwrites
    if (i + ST - 1 < nkt) {
      if constexpr (P::A_MODE != 1) load_a_tile(kt0 + i + ST - 1, (i + ST - 1) % ST);
      load_b_tile(kt0 + i + ST - 1, (i + ST - 1) % ST);
    }
    mma::cp_async_commit();

    if constexpr (P::FP8) {  // E4M3 bytes, k-steps of 32
#if __CUDA_ARCH__ >= 890
      constexpr int LDA8 = P::A_MODE == 1 ? S::LDP8 : S::LDS8, KS8 = BK / 32 / WG;
      const unsigned char* a_base = P::A_MODE == 1 ? A8 + i * BK : A8 + s * BM * S::LDS8;
      const unsigned char* b_base = Braw + s * S::RAW_STAGE;
#pragma unroll
      for (int kq = 0; kq < KS8; ++kq) {
        const int ks = wg * KS8 + kq;
        unsigned af[MI][4], bfr[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
          mma::ldmatrix_x4(af[mi], a_base + (wm * WTM + mi * 16 + lane % 16) * LDA8 + ks * 32 + (lane / 16) * 16);
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
          unsigned r[4];
          mma::ldmatrix_x4(r, b_base + (wn * WTN + ni * 8 + lane % 8 + (lane / 16) * 8) * S::RAW_LD + ks * 32 +
                                  ((lane / 8) % 2) * 16);
          bfr[ni][0] = r[0]; bfr[ni][1] = r[1]; bfr[ni + 1][0] = r[2]; bfr[ni + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma::mma16832_e4m3(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
      }
#endif
    } else {
      constexpr int LDA = P::A_MODE == 1 ? LDP : LDS;
      const T* a_base = P::A_MODE == 1 ? As + i * BK : As + s * BM * LDS;
      const T* b_base = Bs + s * BN * LDS;
#pragma unroll
      for (int kq = 0; kq < KS_PER_WG; ++kq) {
        const int ks = wg * KS_PER_WG + kq;
        unsigned af[MI][4], bfr[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
          mma::ldmatrix_x4(af[mi], a_base + (wm * WTM + mi * 16 + lane % 16) * LDA + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
          unsigned r[4];
          mma::ldmatrix_x4(r, b_base + (wn * WTN + ni * 8 + lane % 8 + (lane / 16) * 8) * LDS + ks * 16 +
                                  ((lane / 8) % 2) * 8);
          bfr[ni][0] = r[0]; bfr[ni][1] = r[1]; bfr[ni + 1][0] = r[2]; bfr[ni + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma::mma16816<T>(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
      }
    }
  }

  // ---- epilogue: partial tile to shared memory, reduce over the cluster, P::epilogue ----------------
  mma::cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  float* red_wg = red + wg * BM * S::RED_LD;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int r = wm * WTM + mi * 16 + lane / 4, c = wn * WTN + ni * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(red_wg + r * S::RED_LD + c) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(red_wg + (r + 8) * S::RED_LD + c) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
  if constexpr (WG == 2) {  // the second group's partial tile into the first's
    __syncthreads();
    for (int q = tid; q < BM * BN / 4; q += THREADS) {
      const int r = q / (BN / 4), c = (q % (BN / 4)) * 4;
      float4* d = reinterpret_cast<float4*>(red + r * S::RED_LD + c);
      const float4 o = *reinterpret_cast<const float4*>(red + (BM + r) * S::RED_LD + c);
      float4 v = *d;
      v.x += o.x; v.y += o.y; v.z += o.z; v.w += o.w;
      *d = v;
    }
  }
  if constexpr (SPLIT > 1) mma::cluster_sync();
  else __syncthreads();
  // This block finishes 1/SPLIT of the tile's float4 groups: all epilogue values first (their input loads
  // issue together), then the stores.
  constexpr int GROUPS = BM * BN / 4, PER_THREAD = ((GROUPS + SPLIT - 1) / SPLIT + THREADS - 1) / THREADS;
  const int q0 = rank * GROUPS / SPLIT, q1 = (rank + 1) * GROUPS / SPLIT;
  float out[PER_THREAD][4];
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int q = q0 + tid + THREADS * i, r = q / (BN / 4), c = (q % (BN / 4)) * 4, m = m0 + r, n = n0 + c;
    if (q >= q1 || m >= P::M || n >= P::N) continue;
    float4 v;
    if constexpr (SPLIT > 1) {
      v = mma::ld_cluster_f4(mma::cluster_addr(red + r * S::RED_LD + c, 0));
      for (int src = 1; src < SPLIT; ++src) {  // fixed order: the sum does not depend on timing
        const float4 p = mma::ld_cluster_f4(mma::cluster_addr(red + r * S::RED_LD + c, src));
        v.x += p.x; v.y += p.y; v.z += p.z; v.w += p.w;
      }
    } else {
      v = *reinterpret_cast<const float4*>(red + r * S::RED_LD + c);
    }
    const float vals[4] = {v.x, v.y, v.z, v.w};
    const float qs = qscale(r);  // A's FP8 scale (1 without P::AQ)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      out[i][j] = n + j < P::N ? P::value(g, bat, m, n + j, vals[j] * P::row_scale(g, n + j) * qs) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int q = q0 + tid + THREADS * i, r = q / (BN / 4), c = (q % (BN / 4)) * 4, m = m0 + r, n = n0 + c;
    if (q >= q1 || m >= P::M || n >= P::N) continue;
    mma::store4<typename P::OutT, P::N>(g.c, g.c + ((long)bat * P::M + m) * P::N + n, n, out[i]);
  }
  // no block leaves while another still reads its tile (the reads completed before their arrive)
  if constexpr (SPLIT > 1) mma::cluster_sync_relaxed();
}

#undef MMA_FOR_CHUNKS
