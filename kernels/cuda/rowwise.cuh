// Row-wise kernels: one warp per row. Rows of L elements at stride INNER (softmax over any axis). The LayerNorm
// family generates its row kernel whole (kernels/layernorm.py: its epilogue expression and cache writes).
#pragma once
#include "common.cuh"

template <typename TI, typename TO, long ROWS, int L, int INNER, bool MASKED_ROWS_ZERO>
__device__ __forceinline__ void softmax_rows(const TI* __restrict__ x, TO* __restrict__ y) {
  griddep_launch_dependents();
  griddep_wait();  // before the rows past the end return: the next kernel waits only for this one
  const long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= ROWS) return;
  const long base = (row / INNER) * (long)L * INNER + row % INNER;
  float mx = -INFINITY;
  for (int j = lane; j < L; j += 32) mx = fmaxf(mx, to_float(x[base + (long)j * INNER]));
  mx = warp_max(mx);
  if (MASKED_ROWS_ZERO && mx == -INFINITY) mx = 0.f;
  float s = 0.f;
  for (int j = lane; j < L; j += 32) s += expf(to_float(x[base + (long)j * INNER]) - mx);
  s = warp_sum(s);
  if (MASKED_ROWS_ZERO && s == 0.f) s = 1.f;
  const float inv = 1.f / s;
  for (int j = lane; j < L; j += 32) y[base + (long)j * INNER] = from_float<TO>(expf(to_float(x[base + (long)j * INNER]) - mx) * inv);
}
