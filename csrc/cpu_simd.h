// headint: SIMD vectors for the CPU attention kernel (GCC/Clang vector extensions).
//
// VW floats per vector: 16 with AVX-512, 8 with AVX, 4 otherwise (SSE / NEON). The build uses
// -march=native, so the compiler maps `vf` onto the machine's widest registers and every
// operation below onto its instructions; nothing here is specific to one instruction set.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace headint_cpu {

#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
// The same vectors at any address, for loads and stores. (Loading through memcpy into an
// under-aligned vector type instead makes GCC, under some -mtune settings, bounce every load
// through the stack and keep a micro-kernel's accumulators in memory.)
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef int32_t vi_u __attribute__((vector_size(VW * 4), aligned(4), may_alias));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr float QNAN = std::numeric_limits<float>::quiet_NaN();

static inline int64_t round_up(int64_t n, int64_t m) { return ((n + m - 1) / m) * m; }

static inline vf vload(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
static inline vi vload_i(const int32_t* p) { return *reinterpret_cast<const vi_u*>(p); }
static inline void vstore_i(int32_t* p, vi v) { *reinterpret_cast<vi_u*>(p) = v; }
// (`x - 0` is exact for every x, -0.0f included, so the compiler emits one broadcast; `0 + x`
// is not, and a lane-by-lane loop becomes a chain of masked inserts)
static inline vf vsplat(float x) { return x - (vf){}; }
static inline vi vsplat_i(int32_t x) { return x - (vi){}; }
static inline vi viota() {
  vi r;
  for (int i = 0; i < VW; ++i) r[i] = i;
  return r;
}
static inline vf vselect(vi m, vf a, vf b) {  // m ? a : b (m lanes are 0 or -1)
  vi ai = (vi)a, bi = (vi)b;
  return (vf)((ai & m) | (bi & ~m));
}
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline bool vany(vi m) {
  for (int i = 0; i < VW; ++i)
    if (m[i]) return true;
  return false;
}
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}
// -1 in the lanes holding a finite value, 0 for NaN / +-inf (x - x is NaN exactly there).
static inline vi vfinite(vf x) { return (x - x) == vsplat(0.f); }

// exp(x) for a vector, relative error ~2e-7; exp(-inf) and anything below -87.3 give exactly 0,
// NaN gives NaN.
static inline vf vexp(vf x) {
  const vf lo = vsplat(-87.33f), hi = vsplat(88.0f);
  vi tiny = x < lo;
  x = vselect(x > hi, hi, x);
  x = vselect(tiny, lo, x);
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  vf n = (x * vsplat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * vsplat(0.693359375f);
  r = r - n * vsplat(-2.12194440e-4f);
  vf p = vsplat(1.0f / 720.0f);
  p = p * r + vsplat(1.0f / 120.0f);
  p = p * r + vsplat(1.0f / 24.0f);
  p = p * r + vsplat(1.0f / 6.0f);
  p = p * r + vsplat(0.5f);
  p = p * r + vsplat(1.0f);
  p = p * r + vsplat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf res = p * (vf)e;
  return (vf)((vi)res & ~tiny);
}

}  // namespace headint_cpu
