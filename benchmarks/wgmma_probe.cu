// wgmma probe (sm_90a): C[M,N] = A[M,K] . W[N,K]^T, bf16 in and out, f32 accumulation, for batch-1 shapes.
// Compiled once per configuration by benchmarks/wgmma_probe.py with -DPROBE_{BN,WM,WN,MT,ST,SPLIT,RED}=...
//
// Block: WM x WN consumer warp groups (warps 0 .. 4*WM*WN-1) plus one producer warp (the last one).
//   Block tile BM x BN, BM = 64 * WM * MT. Warp group (wm, wn) owns MT m64 tiles x BN/WN columns and issues
//   wgmma.mma_async.m64n{BN/WN}k16.f32.bf16.bf16 with A and B both read from shared memory through matrix descriptors.
//   Both operands are K-major (A row-major [M][K], W row-major [N][K]), so neither is transposed.
// Pipeline: the producer's lane 0 issues TMA (cp.async.bulk.tensor.2d) into an ST-stage ring; a stage holds one box of
//   A (BM rows x 64 k) and one of W (BN rows x 64 k). 64 bf16 = 128 bytes, exactly one 128-byte swizzle row: with
//   CU_TENSOR_MAP_SWIZZLE_128B, row r's 16-byte chunk j lands at chunk j ^ (r % 8) (stage bases are 1024-byte aligned).
//   The wgmma descriptor says the same (layout "128B swizzle", SBO = 1024 bytes between 8-row groups, LBO unused for
//   swizzled K-major); the k16 step kk starts 32*kk bytes into the rows: the hardware applies the XOR to the final
//   address, which is why the tile must be 1024-byte aligned and the start may move inside a swizzle row.
//   TMA zero-fills the rows of A past M (the box may overhang the tensor; the transaction still counts the full box).
//   full[s]: the producer's arrive.expect_tx + the copies' complete_tx. empty[s]: one arrival per consumer warp after
//   wgmma.wait_group shows its reads of stage s are done. Consumers keep one wgmma group in flight (wait_group 1), so
//   the tensor core does not drain between k tiles and a stage is handed back one k tile late.
// Split-K (SPLIT > 1): the SPLIT blocks along z are one thread-block cluster (1, 1, SPLIT); each reduces K / SPLIT
//   and the partial tiles are summed through distributed shared memory, two ways (RED):
//   0 pull: each block parks its f32 tile over its idle ring, a cluster barrier with release semantics publishes it
//     (ptxas puts a MEMBAR.ALL.GPU before it), and each block sums 1/SPLIT of the valid rows over all SPLIT tiles
//     with ld.shared::cluster;
//   1 push: a relaxed cluster barrier says every ring is idle, then block q owns columns [q, q + 1) * BN / SPLIT and
//     every block sends its partial sums of those columns into q's shared memory with st.async, counted on q's
//     mbarrier (complete_tx bytes; q declared the byte count at start), so no fence wider than the cluster is needed.
//   Both end on a relaxed cluster barrier so no block leaves while its shared memory is still read or written.
//   SPLIT == 1 stores bf16 pairs straight from the accumulator fragments (no cluster).
// Every mbarrier wait traps after ~2 s, so a wrong phase or byte count surfaces as a launch error, not a hang.
// What a loader must do for this kernel: encode two CUtensorMaps per GEMM node at load time, once the device addresses
//   are known (cuTensorMapEncodeTiled: bf16, rank 2, dims {K, rows}, strides {2K bytes}, box {64, BM} for A and
//   {64, BN} for W, SWIZZLE_128B, OOB fill zero), and put the 128-byte maps by value into the 64-byte-aligned
//   parameter slots (the kernel takes them as __grid_constant__); launch with the dynamic shared memory opted in and,
//   for SPLIT > 1, the cluster dimension as a launch attribute.
#include <cuda.h>
#include <cuda_bf16.h>
#include <stdint.h>

#ifndef PROBE_BN
#define PROBE_BN 128
#endif
#ifndef PROBE_WM
#define PROBE_WM 1
#endif
#ifndef PROBE_WN
#define PROBE_WN 1
#endif
#ifndef PROBE_MT
#define PROBE_MT 1
#endif
#ifndef PROBE_ST
#define PROBE_ST 4
#endif
#ifndef PROBE_SPLIT
#define PROBE_SPLIT 1
#endif
#ifndef PROBE_RED
#define PROBE_RED 0
#endif

namespace probe {

constexpr int BN = PROBE_BN, WM = PROBE_WM, WN = PROBE_WN, MT = PROBE_MT, ST = PROBE_ST, SPLIT = PROBE_SPLIT;
constexpr int RED = PROBE_RED;                  // split-K reduction: 0 pull (ld.shared::cluster), 1 push (st.async)
constexpr int BK = 64;                          // k per stage: one 128-byte swizzle row of bf16
constexpr int BM = 64 * WM * MT;
constexpr int WGN = BN / WN;                    // the wgmma N of one warp group
constexpr int NACC = WGN / 2;                   // f32 accumulators per thread per m64 tile
constexpr int CONSUMERS = 128 * WM * WN;
constexpr int THREADS = CONSUMERS + 32;
constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
constexpr int RED_LD = BN + 8;                  // f32 row stride of the split-K tile (conflict-free float2 stores)
constexpr int RED_BYTES = SPLIT > 1 ? BM * RED_LD * 4 : 0;
constexpr int BAR_OFFSET = ST * STAGE_BYTES > RED_BYTES ? ST * STAGE_BYTES : RED_BYTES;
constexpr int SMEM_BYTES = BAR_OFFSET + (2 * ST + 1) * 8 + 1024;  // + slack to align the ring to 1024 bytes
static_assert(WGN == 64 || WGN == 128 || WGN == 256, "wgmma N per warp group: 64, 128 or 256");
static_assert(BM <= 256 && BN <= 256, "a TMA box has at most 256 rows");
static_assert(SPLIT >= 1 && SPLIT <= 8, "portable cluster sizes");
static_assert(RED == 0 || BN % (8 * SPLIT) == 0, "push: whole fragment column pairs per block");
static_assert(ST >= 2, "the producer refills a stage one k tile after its use: one stage would deadlock");
static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// CLUSTER: acquire at cluster scope, for a barrier other blocks' st.async complete (release at cluster scope)
template <bool CLUSTER>
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  if constexpr (CLUSTER)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.b32 %0, 1, 0, p;\n}"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  else
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.b32 %0, 1, 0, p;\n}"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done;
}

// A wrong parity or byte count would spin forever: trap after ~2 s of waiting so the host sees an error, not a hang.
template <bool CLUSTER = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint64_t start = 0;
  while (!mbar_try_wait<CLUSTER>(bar, parity)) {
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (start == 0) start = now;
    else if (now - start > 2000000000ull) __trap();
  }
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar) : "memory");
}

// K-major operand, 128-byte swizzle: start address >> 4 in bits 0-13, LBO (unused here, 16 bytes) in 16-29,
// SBO = 1024 bytes (8 rows of 128 bytes) in 32-45, base offset 0 (1024-aligned tiles), swizzle mode 1 in bits 62-63
__device__ __forceinline__ uint64_t sw128_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// ties the accumulators to this point so the compiler cannot move their reads or writes across a wgmma wait / fence
__device__ __forceinline__ void fence_acc(float (&acc)[MT][NACC]) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < NACC; ++i) asm volatile("" : "+f"(acc[m][i])::"memory");
}

#define WG_D8(i)                                                                                                \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define WG_D32(i) WG_D8(i), WG_D8(i + 8), WG_D8(i + 16), WG_D8(i + 24)

// d[64 x N] += A[64 x 16] . B[16 x N] (scale-d 1, no negation, no transposes); d in the m64nNk16 accumulator layout:
// d[4j + h] is row 16 * warp + lane / 4 + 8 * (h / 2), column 8j + 2 * (lane % 4) + h % 2
template <int N>
__device__ void wgmma(float* d, uint64_t a, uint64_t b);

template <>
__device__ __forceinline__ void wgmma<64>(float* d, uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, 1, 1, 1, 0, 0;"
      : WG_D32(0)
      : "l"(a), "l"(b));
}

template <>
__device__ __forceinline__ void wgmma<128>(float* d, uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, 1, 1, 1, 0, 0;"
      : WG_D32(0), WG_D32(32)
      : "l"(a), "l"(b));
}

template <>
__device__ __forceinline__ void wgmma<256>(float* d, uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, 1, 1, 1, 0, 0;"
      : WG_D32(0), WG_D32(32), WG_D32(64), WG_D32(96)
      : "l"(a), "l"(b));
}

__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");  // ptxas: MEMBAR.ALL.GPU first
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

__device__ __forceinline__ uint32_t map_rank(uint32_t addr, uint32_t rank) {  // this offset in block `rank`
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  return remote;
}

__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
  return v;
}

// 8 bytes into another block's shared memory, counted on that block's mbarrier (complete_tx)
__device__ __forceinline__ void st_async_f2(uint32_t addr, uint32_t bar, float x, float y) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];"
               ::"r"(addr), "f"(x), "f"(y), "r"(bar) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

}  // namespace probe

using namespace probe;

// read by the loader: the launch shape this configuration was compiled for
extern "C" __device__ int probe_info[4] = {THREADS, SMEM_BYTES, BM, BN};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    wgmma_gemm(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_w,
               __nv_bfloat16* __restrict__ c, int M, int N, int K) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t ring = smem_u32(smem);
  // mbarriers: full[s] at full + 8 s, empty[s] at empty + 8 s, done (split-K push) after them
  const uint32_t full = ring + BAR_OFFSET, empty = full + 8 * ST, done = empty + 8 * ST;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int ktiles = K / BK / SPLIT, k0 = blockIdx.z * ktiles;
  const int rows = min(BM, M - m0);  // valid rows of this block's tile
  const bool producer = warp == CONSUMERS / 32;

  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, CONSUMERS / 32);
    }
    if (SPLIT > 1 && RED == 1) {
      mbar_init(done, 1);
      mbar_expect_tx(done, rows * BN * 4);  // SPLIT partial sums of rows x BN / SPLIT f32
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  float acc[MT][NACC];
  const int wg = warp / 4, wm = wg / WN, wn = wg % WN;
  if (producer) {
    if (lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tm_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tm_w)) : "memory");
      for (int kt = 0; kt < ktiles; ++kt) {
        const int s = kt % ST;
        if (kt >= ST) mbar_wait(empty + 8 * s, (kt / ST - 1) & 1);
        const uint32_t stage = ring + s * STAGE_BYTES;
        mbar_expect_tx(full + 8 * s, STAGE_BYTES);
        tma_load_2d(stage, &tm_a, (k0 + kt) * BK, m0, full + 8 * s);
        tma_load_2d(stage + A_BYTES, &tm_w, (k0 + kt) * BK, n0, full + 8 * s);
      }
    }
    __syncwarp();
  } else {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < NACC; ++i) acc[m][i] = 0.f;
    fence_acc(acc);
    const uint32_t a_off = wm * MT * 64 * 128, b_off = A_BYTES + wn * WGN * 128;
    for (int kt = 0; kt < ktiles; ++kt) {
      const int s = kt % ST;
      mbar_wait(full + 8 * s, (kt / ST) & 1);
      const uint64_t da = sw128_desc(ring + s * STAGE_BYTES + a_off);
      const uint64_t db = sw128_desc(ring + s * STAGE_BYTES + b_off);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
        for (int m = 0; m < MT; ++m) wgmma<WGN>(acc[m], da + ((m * 64 * 128 + kk * 32) >> 4), db + ((kk * 32) >> 4));
      wgmma_commit();
      wgmma_wait<1>();  // k tile kt - 1 is done: hand its stage back
      if (kt > 0 && lane == 0) mbar_arrive(empty + 8 * ((kt - 1) % ST));
    }
    wgmma_wait<0>();
    fence_acc(acc);
  }

  const int fr = (warp % 4) * 16 + lane / 4, fc = wn * WGN + 2 * (lane % 4);  // this thread's fragment origin
  if constexpr (SPLIT == 1) {
    if (producer) return;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int r = (wm * MT + m) * 64 + fr;
#pragma unroll
      for (int j = 0; j < WGN / 8; ++j) {
        __nv_bfloat16* p = c + static_cast<size_t>(m0 + r) * N + n0 + fc + 8 * j;
        if (r < rows) *reinterpret_cast<uint32_t*>(p) = pack_bf16(acc[m][4 * j], acc[m][4 * j + 1]);
        if (r + 8 < rows) *reinterpret_cast<uint32_t*>(p + 8 * N) = pack_bf16(acc[m][4 * j + 2], acc[m][4 * j + 3]);
      }
    }
  } else if constexpr (RED == 0) {
    // pull: park the f32 tile [BM][RED_LD] over the ring, then sum this block's share of it over the cluster
    float* red = reinterpret_cast<float*>(smem);
    if (!producer) {
      asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory");  // all warp groups' wgmma reads are done
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // generic writes after async-proxy reads
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int r = (wm * MT + m) * 64 + fr;
#pragma unroll
        for (int j = 0; j < WGN / 8; ++j) {
          *reinterpret_cast<float2*>(red + r * RED_LD + fc + 8 * j) = make_float2(acc[m][4 * j], acc[m][4 * j + 1]);
          *reinterpret_cast<float2*>(red + (r + 8) * RED_LD + fc + 8 * j) =
              make_float2(acc[m][4 * j + 2], acc[m][4 * j + 3]);
        }
      }
    }
    cluster_arrive_release();
    cluster_wait();
    if (!producer) {
      for (int i = blockIdx.z * CONSUMERS + threadIdx.x; i < rows * (BN / 4); i += SPLIT * CONSUMERS) {
        const int r = i / (BN / 4), c4 = i % (BN / 4) * 4;
        const uint32_t addr = ring + (r * RED_LD + c4) * 4;
        float4 v[SPLIT];
#pragma unroll
        for (int q = 0; q < SPLIT; ++q) v[q] = ld_cluster_f4(map_rank(addr, q));
#pragma unroll
        for (int q = 1; q < SPLIT; ++q) v[0] = add4(v[0], v[q]);
        *reinterpret_cast<uint2*>(c + static_cast<size_t>(m0 + r) * N + n0 + c4) =
            make_uint2(pack_bf16(v[0].x, v[0].y), pack_bf16(v[0].z, v[0].w));
      }
    }
    cluster_arrive_relaxed();  // the loads above have returned: nobody reads a block that has left
    cluster_wait();
  } else {
    // push: block q finishes columns [q SN, (q + 1) SN) of the tile; every block sends its partial sums of those
    // columns to block q's buffer [SPLIT][BM][SN] (over q's ring), counted on q's `done` barrier
    constexpr int SN = BN / SPLIT;
    cluster_arrive_relaxed();  // after wgmma.wait_group 0: this block's ring is no longer read
    cluster_wait();
    if (!producer) {
      const uint32_t from = blockIdx.z * BM * SN;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int r = (wm * MT + m) * 64 + fr;
#pragma unroll
        for (int j = 0; j < WGN / 8; ++j) {
          const int col = fc + 8 * j, q = col / SN;
          const uint32_t dst = map_rank(ring + (from + r * SN + col % SN) * 4, q), bar = map_rank(done, q);
          if (r < rows) st_async_f2(dst, bar, acc[m][4 * j], acc[m][4 * j + 1]);
          if (r + 8 < rows) st_async_f2(dst + 8 * SN * 4, bar, acc[m][4 * j + 2], acc[m][4 * j + 3]);
        }
      }
      mbar_wait<true>(done, 0);
      const float* buf = reinterpret_cast<const float*>(smem);
      for (int i = threadIdx.x; i < rows * (SN / 4); i += CONSUMERS) {
        const int r = i / (SN / 4), c4 = i % (SN / 4) * 4;
        float4 s = *reinterpret_cast<const float4*>(buf + r * SN + c4);
#pragma unroll
        for (int q = 1; q < SPLIT; ++q) s = add4(s, *reinterpret_cast<const float4*>(buf + (q * BM + r) * SN + c4));
        *reinterpret_cast<uint2*>(c + static_cast<size_t>(m0 + r) * N + n0 + blockIdx.z * SN + c4) =
            make_uint2(pack_bf16(s.x, s.y), pack_bf16(s.z, s.w));
      }
    }
    cluster_arrive_relaxed();  // every block has received everything: no st.async is still in flight
    cluster_wait();
  }
}

// the same launch with no work: the per-launch floor of a graph node with this grid, block, shared memory, cluster
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    wgmma_empty(const __grid_constant__ CUtensorMap, const __grid_constant__ CUtensorMap, __nv_bfloat16*, int, int,
                int) {}
