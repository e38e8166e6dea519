// headint: the register-blocked GEMM micro-kernel of the CPU attention kernel.
//
// C[M x N] (+)= A[M x K] * B[K x N] on fp32 tiles (M, N, K up to a few hundred):
//   A(m, k) = A[m * ars + k * acs]  any strides (row-major, transposed, a view into an input);
//                                   each element is broadcast to a vector, so A is read once
//   B       row-major, leading dim ldb, read in whole vectors: columns up to round_up(N, VW)
//   C       row-major, leading dim ldc, the same columns written
// The micro-kernel keeps an MR x NV block of C in registers and streams K: MR = 6 rows by
// NV = GEMM_NV vectors, 4 where there are 32 vector registers (AVX-512, AArch64: 24
// accumulators + 4 B vectors + 1 broadcast) and 2 where there are 16 (AVX2, SSE). Its loops have
// constant trip counts and are unrolled, so the block lives in registers.
#pragma once

#include "cpu_simd.h"

namespace headint_cpu {

template <int MR, int NV, bool ACC>
static inline __attribute__((always_inline)) void micro(int K, const float* __restrict A, int64_t ars, int64_t acs,
                                                        const float* __restrict B, int64_t ldb, float* __restrict C,
                                                        int64_t ldc) {
  // Every loop over r / v is unrolled (the pragmas: GCC's unrolling heuristics differ by -mtune,
  // and a block left in an array on the stack costs a load and a store per FMA).
  vf c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? vload(C + r * ldc + v * VW) : vsplat(0.f);
  for (int k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * VW);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf a = vsplat(A[r * ars + k * acs]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * VW, c[r][v]);
}

constexpr int GEMM_MR = 6;
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int GEMM_NV = 4;
#else
constexpr int GEMM_NV = 2;
#endif

// All rows of one panel of NV vectors.
template <int NV, bool ACC>
static void gemm_panel(int M, int K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                       int64_t ldc) {
  int m = 0;
  for (; m + GEMM_MR <= M; m += GEMM_MR) micro<GEMM_MR, NV, ACC>(K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc);
  const float* a = A + m * ars;
  float* c = C + m * ldc;
  switch (M - m) {
    case 5: micro<5, NV, ACC>(K, a, ars, acs, B, ldb, c, ldc); break;
    case 4: micro<4, NV, ACC>(K, a, ars, acs, B, ldb, c, ldc); break;
    case 3: micro<3, NV, ACC>(K, a, ars, acs, B, ldb, c, ldc); break;
    case 2: micro<2, NV, ACC>(K, a, ars, acs, B, ldb, c, ldc); break;
    case 1: micro<1, NV, ACC>(K, a, ars, acs, B, ldb, c, ldc); break;
    default: break;
  }
}

// C (+)= A * B; ACC = false overwrites C (no initialisation needed), ACC = true adds to it.
template <bool ACC>
static void gemm(int M, int N, int K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                 int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!ACC)
      for (int m = 0; m < M; ++m) std::memset(C + m * ldc, 0, sizeof(float) * round_up(N, VW));
    return;
  }
  const int nv = static_cast<int>((N + VW - 1) / VW);
  int v = 0;
  for (; v + GEMM_NV <= nv; v += GEMM_NV) gemm_panel<GEMM_NV, ACC>(M, K, A, ars, acs, B + v * VW, ldb, C + v * VW, ldc);
  switch (nv - v) {
    case 3: gemm_panel<3, ACC>(M, K, A, ars, acs, B + v * VW, ldb, C + v * VW, ldc); break;
    case 2: gemm_panel<2, ACC>(M, K, A, ars, acs, B + v * VW, ldb, C + v * VW, ldc); break;
    case 1: gemm_panel<1, ACC>(M, K, A, ars, acs, B + v * VW, ldb, C + v * VW, ldc); break;
    default: break;
  }
}

}  // namespace headint_cpu
