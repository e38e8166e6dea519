// headint: fused intervened attention for CPU tensors.
//
// FlashAttention-style tiled online-softmax attention with head interventions applied inside
// the tiles: GQA, causal / sliding window (queries aligned to the end of the keys), a general
// keep (bool) or additive (float) mask read through its strides (stride 0 on broadcast dims),
// compact knockout words (q_bits[i] & k_bits[j] != 0 removes edge i -> j), a per-(b, h) score
// scale, logit soft-capping (s -> softcap * tanh(s / softcap), before the masks), attention sinks
// (a per-(b, h) logit in the softmax denominator that carries no value), a value head dim Dv that
// may differ from the query/key head dim D, and the head_mask / head_patch blend in the epilogue.
//
// Forward  : parallel over (b, h, query tile); keys are streamed in tiles with a running
//            max / sum; no Tq x Tk matrix exists beyond one BQ x BK tile per thread.
// Backward : probabilities are recomputed per tile from the saved lse.
//            pass 0 (b, h, rows)     : delta = rowsum(dA * A), dhead_mask = rowsum(dO * (A - patch)),
//                                      dsink = -sum_i exp(sink - lse_i) * delta_i
//            pass 1 (b, kvh, k tile) : dK, dV (loops over the query heads of the GQA group) - no races
//            pass 2 (b, h, q tile)   : dQ and per-tile partial sums of dscore_scale
// All arithmetic is fp32 (tiles of fp16 / bf16 / fp64 operands are converted on load).
//
// The inner loops are explicit SIMD through GCC/Clang vector extensions: VW floats per vector
// (16 with AVX-512, 8 with AVX, 4 otherwise), a 4 x (2 * VW) register-blocked GEMM micro-kernel
// and a vectorised exp.
//
// Outputs are allocated by the Python launcher (so tests can poison them) and written here.
//
// Operands: the ops take the tensor operands as one list `Tensor?[] operands` indexed by
// `enum Operand`, whose order and names (OPERAND_NAMES, reported by `operand_names()`) are those
// of the tensor fields of headint.ops.arguments.AttentionArgs; the scalars follow in field order.
// The Python side checks both when it loads the kernel (headint.ops.cpu_backend.build).
// The backward writes the gradients into `grads`, indexed like `operands` (empty where none).
//
// NaN semantics (see headint.attention): q, k, v enter every product with their non-finite
// elements zeroed; a row is "bad" if it reads a key (kept, score above -inf) while its query is
// non-finite, or the key or value it reads is non-finite, or a score it reads is NaN / +inf.
// A bad row's pre-blend output is NaN and its lse is NaN (so the backward sends NaN exactly
// along the edges it read); removed keys are never read.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace headint_cpu {

// Tensor operands, in the field order of headint.ops.arguments.AttentionArgs.
enum Operand : int { Q, K, V, MASK, Q_BITS, K_BITS, HEAD_MASK, HEAD_PATCH, SCORE_SCALE, SINKS, N_OPERANDS };
static const char* const OPERAND_NAMES[N_OPERANDS] = {
    "q", "k", "v", "mask", "q_bits", "k_bits", "head_mask", "head_patch", "score_scale", "sinks"};

using OperandList = c10::List<c10::optional<at::Tensor>>;

// The operand list, checked once: `has(X)` / `get(X)` / `opt(X)` by enum.
struct Operands {
  c10::optional<at::Tensor> t[N_OPERANDS];
  explicit Operands(const OperandList& list) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == N_OPERANDS, "headint cpu attention: expected ", N_OPERANDS,
                " operands, got ", list.size());
    for (int i = 0; i < N_OPERANDS; ++i) {
      c10::optional<at::Tensor> x = list.get(i);
      if (x.has_value() && x->defined()) t[i] = *x;
    }
    for (Operand o : {Q, K, V}) TORCH_CHECK(has(o), "headint cpu attention: operand ", OPERAND_NAMES[o], " is missing");
  }
  bool has(Operand o) const { return t[o].has_value(); }
  const at::Tensor& get(Operand o) const { return *t[o]; }
  const c10::optional<at::Tensor>& opt(Operand o) const { return t[o]; }
};

// ------------------------------------------------------------------------------------------
// SIMD helpers
// ------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif

typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));    // unaligned-safe
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(4)));

constexpr int BQ = 64;  // query rows per tile
constexpr int BK = 64;  // keys per tile (multiple of VW)
constexpr int SMALL_NQ = 4;  // query tiles with at most this many rows use the dot-product path
static_assert(BK % VW == 0, "BK must be a multiple of the vector width");

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

static inline vf vload(const float* p) { vf r; std::memcpy(&r, p, sizeof(vf)); return r; }
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
static inline vf vsplat(float x) { vf r = {}; return r + x; }
static inline vf vselect(vi m, vf a, vf b) {  // m ? a : b (m lanes are 0 or -1)
  vi ai = (vi)a, bi = (vi)b;
  return (vf)((ai & m) | (bi & ~m));
}
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline vi vload_i(const int32_t* p) { vi r; std::memcpy(&r, p, sizeof(vi)); return r; }
static inline bool vany(vi m) { for (int i = 0; i < VW; ++i) if (m[i]) return true; return false; }
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr float QNAN = std::numeric_limits<float>::quiet_NaN();
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < VW; ++i) s += v[i]; return s; }
static inline float hmax(vf v) { float s = v[0]; for (int i = 1; i < VW; ++i) s = v[i] > s ? v[i] : s; return s; }

// exp(x) for a vector, relative error ~2e-7; exp(-inf) and anything below -87.3 give exactly 0.
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

// C[M x N] (+)= A[M x K] * B[K x N]; A(m, k) = A[m * ars + k * acs] (any strides), B row-major
// with leading dim ldb, C row-major with leading dim ldc; N must be a multiple of VW.
template <int MR, int NV>
static inline void micro(int K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
                         float* C, int64_t ldc) {
  vf c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = vload(C + r * ldc + v * VW);
  for (int k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * VW);
    for (int r = 0; r < MR; ++r) {
      const vf a = vsplat(A[r * ars + k * acs]);
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * VW, c[r][v]);
}

template <int MR>
static inline void gemm_rows(int N, int K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
                             float* C, int64_t ldc) {
  int n = 0;
  for (; n + 2 * VW <= N; n += 2 * VW) micro<MR, 2>(K, A, ars, acs, B + n, ldb, C + n, ldc);
  for (; n < N; n += VW) micro<MR, 1>(K, A, ars, acs, B + n, ldb, C + n, ldc);
}

// C += A * B (C must be initialised by the caller).
static void gemm_acc(int M, int N, int K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
                     float* C, int64_t ldc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) gemm_rows<4>(N, K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc);
  switch (M - m) {
    case 3: gemm_rows<3>(N, K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc); break;
    case 2: gemm_rows<2>(N, K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc); break;
    case 1: gemm_rows<1>(N, K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc); break;
    default: break;
  }
}

static void gemm_set(int M, int N, int K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
                     float* C, int64_t ldc) {
  for (int m = 0; m < M; ++m) std::memset(C + m * ldc, 0, sizeof(float) * N);
  gemm_acc(M, N, K, A, ars, acs, B, ldb, C, ldc);
}

// A 64-byte aligned fp32 scratch buffer.
struct Buf {
  float* p = nullptr;
  explicit Buf(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
    std::memset(p, 0, bytes == 0 ? 64 : bytes);
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* operator()() const { return p; }
};

// ------------------------------------------------------------------------------------------
// Operand access through strides
// ------------------------------------------------------------------------------------------
enum MaskKind { MASK_NONE, MASK_BOOL, MASK_F32, MASK_F16, MASK_BF16, MASK_F64 };

template <typename T>
struct View4 {  // [B, H, T, D] (any strides)
  const T* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  View4() = default;
  explicit View4(const at::Tensor& t) : p(t.data_ptr<T>()) {
    for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
  }
  const T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s[0] + h * s[1] + i * s[2]; }
};

template <typename T>
struct OutView4 {
  T* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  OutView4() = default;
  explicit OutView4(const at::Tensor& t) : p(t.data_ptr<T>()) {
    for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
  }
  T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s[0] + h * s[1] + i * s[2]; }
};

// Everything a tile needs to know about the intervention of one (b, h) pair.
struct Plan {
  int64_t B, Hq, Hkv, group, Tq, Tk, D, Dp, Dv, Dvp, off;  // Dp / Dvp: D / Dv rounded up to VW
  bool causal;
  int64_t window;  // <= 0: none
  float scale;
  float softcap = 0.f;  // <= 0: none
  // mask
  MaskKind mk = MASK_NONE;
  const char* mask_p = nullptr;
  int64_t ms[4] = {0, 0, 0, 0};  // element strides
  // knockout words
  const int32_t* qb_p = nullptr;
  int64_t qbs[3] = {0, 0, 0};
  const int32_t* kb_p = nullptr;
  int64_t kbs[3] = {0, 0, 0};
  // head mask [B, H, Tq], score scale [B, H]: fp32 (fp64 when the attention runs in fp64)
  const void* hm_p = nullptr;
  bool hm_f64 = false;
  int64_t hms[3] = {0, 0, 0};
  const void* ss_p = nullptr;
  bool ss_f64 = false;
  int64_t sss[2] = {0, 0};
  // sinks [B, H]: fp32 (fp64 when the attention runs in fp64)
  const void* sk_p = nullptr;
  bool sk_f64 = false;
  int64_t sks[2] = {0, 0};

  // Keys j kept structurally for query row i: lo(i) <= j <= hi(i) (empty when hi < lo).
  int64_t lo(int64_t i) const {
    if (window <= 0) return 0;
    return std::max<int64_t>(0, i + off - window + 1);
  }
  int64_t hi(int64_t i) const {
    const int64_t p = i + off;
    if (causal) return std::min<int64_t>(Tk - 1, p);
    if (window > 0) return std::min<int64_t>(Tk - 1, p + window - 1);
    return Tk - 1;
  }
  float score_scale(int64_t b, int64_t h) const {
    if (!ss_p) return 1.0f;
    const int64_t o = b * sss[0] + h * sss[1];
    return ss_f64 ? static_cast<float>(static_cast<const double*>(ss_p)[o]) : static_cast<const float*>(ss_p)[o];
  }
  float sink(int64_t b, int64_t h) const {  // -inf: no sink
    if (!sk_p) return NEG_INF;
    const int64_t o = b * sks[0] + h * sks[1];
    return sk_f64 ? static_cast<float>(static_cast<const double*>(sk_p)[o]) : static_cast<const float*>(sk_p)[o];
  }
  // Soft-cap the first nk scores of a row in place; with `dcap`, store d cap / d s = 1 - tanh^2 there.
  void cap_scores(float* row, int nk, float* dcap = nullptr) const {
    const float c = softcap, inv = 1.0f / softcap;
    for (int jj = 0; jj < nk; ++jj) {
      const float t = std::tanh(row[jj] * inv);
      row[jj] = c * t;
      if (dcap) dcap[jj] = 1.0f - t * t;
    }
  }
  float head_mask(int64_t b, int64_t h, int64_t i) const {
    if (!hm_p) return 1.0f;
    const int64_t o = b * hms[0] + h * hms[1] + i * hms[2];
    return hm_f64 ? static_cast<float>(static_cast<const double*>(hm_p)[o]) : static_cast<const float*>(hm_p)[o];
  }
  bool has_elementwise() const { return mk != MASK_NONE || qb_p != nullptr; }
  // Is every edge of rows [i0, i0+nq) x keys [j0, j0+nk) kept by causality / window?
  bool structurally_full(int64_t i0, int nq, int64_t j0, int nk) const {
    return lo(i0 + nq - 1) <= j0 && j0 + nk - 1 <= hi(i0);
  }
  // Query rows touching keys [j0, j0 + nk)?
  bool rows_touch(int64_t i0, int nq, int64_t j0, int nk) const {
    return !(hi(i0 + nq - 1) < j0 || lo(i0) > j0 + nk - 1);
  }

  // Load the knockout words of keys [j0, j0 + nk) of head (b, h) into kb.
  void load_kbits(int64_t b, int64_t h, int64_t j0, int nk, int32_t* kb) const {
    const int32_t* p = kb_p + b * kbs[0] + h * kbs[1] + j0 * kbs[2];
    for (int jj = 0; jj < nk; ++jj) kb[jj] = p[jj * kbs[2]];
  }

  // row[jj] (jj < nk, key j0 + jj, query i of head (b, h)) gets -inf where the edge is removed
  // and the additive mask added. `full` says the structural test can be skipped.
  void apply_bias(float* row, int64_t b, int64_t h, int64_t i, int64_t j0, int nk, bool full,
                  const int32_t* kb) const {
    // additive mask first, removals last: a removed key's score is -inf whatever the mask adds
    if (mk != MASK_NONE && mk != MASK_BOOL) {
      const int64_t base = b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
      const int64_t s = ms[3];
      switch (mk) {
        case MASK_F32: {
          const float* m = reinterpret_cast<const float*>(mask_p) + base;
          for (int jj = 0; jj < nk; ++jj) row[jj] += m[jj * s];
          break;
        }
        case MASK_F16: {
          const at::Half* m = reinterpret_cast<const at::Half*>(mask_p) + base;
          for (int jj = 0; jj < nk; ++jj) row[jj] += static_cast<float>(m[jj * s]);
          break;
        }
        case MASK_BF16: {
          const at::BFloat16* m = reinterpret_cast<const at::BFloat16*>(mask_p) + base;
          for (int jj = 0; jj < nk; ++jj) row[jj] += static_cast<float>(m[jj * s]);
          break;
        }
        case MASK_F64: {
          const double* m = reinterpret_cast<const double*>(mask_p) + base;
          for (int jj = 0; jj < nk; ++jj) row[jj] += static_cast<float>(m[jj * s]);
          break;
        }
        default: break;
      }
    }
    if (!full) {
      const int64_t l = lo(i), u = hi(i);
      for (int jj = 0; jj < nk; ++jj) {
        const int64_t j = j0 + jj;
        if (j < l || j > u) row[jj] = NEG_INF;
      }
    }
    if (mk == MASK_BOOL) {
      const bool* m = reinterpret_cast<const bool*>(mask_p) + b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
      const int64_t s = ms[3];
      for (int jj = 0; jj < nk; ++jj)
        if (!m[jj * s]) row[jj] = NEG_INF;
    }
    if (qb_p) {
      const int32_t w = qb_p[b * qbs[0] + h * qbs[1] + i * qbs[2]];
      if (w != 0)
        for (int jj = 0; jj < nk; ++jj)
          if (w & kb[jj]) row[jj] = NEG_INF;
    }
  }

  // Does a row with scores `row` (BK entries, removed = -inf) read something non-finite?
  // qbad: its query had a non-finite element; kvbad[j]: -1 if key j's k or v had one.
  static bool row_is_bad(const float* row, bool qbad, const int32_t* kvbad) {
    const vf ninf = vsplat(NEG_INF), pinf = vsplat(POS_INF);
    vi qb = {};
    qb = qb - (qbad ? 1 : 0);
    vi acc = {};
    for (int c = 0; c < BK; c += VW) {
      const vf x = vload(row + c);
      const vi rd = x != ninf;  // read (NaN included)
      acc |= rd & ((x != x) | (x == pinf) | vload_i(kvbad + c) | qb);
    }
    return vany(acc);
  }
};

static MaskKind mask_kind(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value() || !mask->defined()) return MASK_NONE;
  switch (mask->scalar_type()) {
    case at::kBool: return MASK_BOOL;
    case at::kFloat: return MASK_F32;
    case at::kHalf: return MASK_F16;
    case at::kBFloat16: return MASK_BF16;
    case at::kDouble: return MASK_F64;
    default: TORCH_CHECK(false, "headint cpu attention: unsupported mask dtype ", mask->scalar_type());
  }
  return MASK_NONE;
}

static bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

static Plan make_plan(const Operands& ops, double scale, bool causal, c10::optional<int64_t> window_opt,
                      c10::optional<double> softcap) {
  const at::Tensor& q = ops.get(Q);
  const at::Tensor& k = ops.get(K);
  const at::Tensor& v = ops.get(V);
  const c10::optional<at::Tensor>& sinks = ops.opt(SINKS);
  const c10::optional<at::Tensor>& mask = ops.opt(MASK);
  const c10::optional<at::Tensor>& q_bits = ops.opt(Q_BITS);
  const c10::optional<at::Tensor>& k_bits = ops.opt(K_BITS);
  const c10::optional<at::Tensor>& head_mask = ops.opt(HEAD_MASK);
  const c10::optional<at::Tensor>& score_scale = ops.opt(SCORE_SCALE);
  const int64_t window = window_opt.has_value() ? *window_opt : 0;
  TORCH_CHECK(!window_opt.has_value() || *window_opt > 0, "headint cpu attention: window must be positive");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "headint cpu attention: q, k, v must be 4-d");
  TORCH_CHECK(!softcap.has_value() || (*softcap > 0 && std::isfinite(*softcap)),
              "headint cpu attention: softcap must be positive and finite");
  Plan P;
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Tq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Tk = k.size(2);
  TORCH_CHECK(P.Hkv > 0 && P.Hq % P.Hkv == 0, "headint cpu attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(k.size(3) == P.D && k.size(0) == P.B, "headint cpu attention: q / k shapes disagree");
  TORCH_CHECK(v.size(0) == P.B && v.size(1) == P.Hkv && v.size(2) == P.Tk,
              "headint cpu attention: k / v shapes disagree ([B, Hkv, Tk, D] / [B, Hkv, Tk, Dv])");
  P.Dv = v.size(3);
  P.group = P.Hq / P.Hkv;
  P.Dp = ((P.D + VW - 1) / VW) * VW;
  P.Dvp = ((P.Dv + VW - 1) / VW) * VW;
  P.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  P.off = P.Tk - P.Tq;
  P.causal = causal;
  P.window = window;
  P.scale = static_cast<float>(scale);
  P.mk = mask_kind(mask);
  if (P.mk != MASK_NONE) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == P.B && mask->size(1) == P.Hq && mask->size(2) == P.Tq &&
                    mask->size(3) == P.Tk,
                "headint cpu attention: mask must be a [B, Hq, Tq, Tk] view");
    P.mask_p = static_cast<const char*>(mask->data_ptr());
    for (int i = 0; i < 4; ++i) P.ms[i] = mask->stride(i);
  }
  TORCH_CHECK(present(q_bits) == present(k_bits), "headint cpu attention: q_bits and k_bits go together");
  if (present(q_bits)) {
    TORCH_CHECK(q_bits->scalar_type() == at::kInt && k_bits->scalar_type() == at::kInt,
                "headint cpu attention: knockout words must be int32");
    TORCH_CHECK(q_bits->dim() == 3 && k_bits->dim() == 3 && q_bits->size(2) == P.Tq && k_bits->size(2) == P.Tk,
                "headint cpu attention: knockout words must be [B, Hq, Tq] / [B, Hq, Tk]");
    P.qb_p = q_bits->data_ptr<int32_t>();
    P.kb_p = k_bits->data_ptr<int32_t>();
    for (int i = 0; i < 3; ++i) {
      P.qbs[i] = q_bits->stride(i);
      P.kbs[i] = k_bits->stride(i);
    }
  }
  if (present(head_mask)) {
    TORCH_CHECK((head_mask->scalar_type() == at::kFloat || head_mask->scalar_type() == at::kDouble) &&
                    head_mask->dim() == 3,
                "headint cpu attention: head_mask must be float32/float64 [B, Hq, Tq]");
    P.hm_p = head_mask->data_ptr();
    P.hm_f64 = head_mask->scalar_type() == at::kDouble;
    for (int i = 0; i < 3; ++i) P.hms[i] = head_mask->stride(i);
  }
  if (present(score_scale)) {
    TORCH_CHECK((score_scale->scalar_type() == at::kFloat || score_scale->scalar_type() == at::kDouble) &&
                    score_scale->dim() == 2,
                "headint cpu attention: score_scale must be float32/float64 [B, Hq]");
    P.ss_p = score_scale->data_ptr();
    P.ss_f64 = score_scale->scalar_type() == at::kDouble;
    for (int i = 0; i < 2; ++i) P.sss[i] = score_scale->stride(i);
  }
  if (present(sinks)) {
    TORCH_CHECK((sinks->scalar_type() == at::kFloat || sinks->scalar_type() == at::kDouble) && sinks->dim() == 2 &&
                    sinks->size(0) == P.B && sinks->size(1) == P.Hq,
                "headint cpu attention: sinks must be float32/float64 [B, Hq]");
    P.sk_p = sinks->data_ptr();
    P.sk_f64 = sinks->scalar_type() == at::kDouble;
    for (int i = 0; i < 2; ++i) P.sks[i] = sinks->stride(i);
  }
  return P;
}

// Row-major tile load: dst[r * ld + d] = mul * src(row r, d) for r < n, d < D.
// With `bad`: non-finite elements load as 0 and bad[r] = -1 if row r had one (else 0).
template <typename T>
static inline void load_rows(const View4<T>& x, int64_t b, int64_t h, int64_t i0, int n, int64_t D, float mul,
                             float* dst, int64_t ld, int32_t* bad = nullptr) {
  const int64_t sd = x.s[3], sr = x.s[2];
  const T* base = x.row(b, h, i0);
  for (int r = 0; r < n; ++r) {
    const T* src = base + r * sr;
    float* o = dst + r * ld;
    if (bad) {
      int32_t any = 0;
      for (int64_t d = 0; d < D; ++d) {
        float val = static_cast<float>(src[d * sd]);
        if (!std::isfinite(val)) {
          any = -1;
          val = 0.f;
        }
        o[d] = mul * val;
      }
      bad[r] = any;
    } else if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) o[d] = mul * static_cast<float>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = mul * static_cast<float>(src[d * sd]);
    }
  }
}

// Transposed tile load: dst[d * ld + r] = src(row r, d) for r < n (zero for n <= r < ld), d < D.
// Non-finite elements load as 0; with `bad`, bad[r] |= -1 if row r had one.
template <typename T>
static inline void load_cols(const View4<T>& x, int64_t b, int64_t h, int64_t j0, int n, int64_t D, float* dst,
                             int64_t ld, int32_t* bad = nullptr) {
  const int64_t sd = x.s[3], sr = x.s[2];
  const T* base = x.row(b, h, j0);
  if (n < ld)
    for (int64_t d = 0; d < D; ++d) std::memset(dst + d * ld + n, 0, sizeof(float) * (ld - n));
  for (int r = 0; r < n; ++r) {
    const T* src = base + r * sr;
    int32_t any = 0;
    for (int64_t d = 0; d < D; ++d) {
      float val = static_cast<float>(src[d * sd]);
      if (!std::isfinite(val)) {
        any = -1;
        val = 0.f;
      }
      dst[d * ld + r] = val;
    }
    if (bad) bad[r] |= any;
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <typename T>
static void forward_impl(const Plan& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& head_patch, at::Tensor& out, at::Tensor& lse,
                         at::Tensor& attn) {
  const View4<T> Q(q), K(k), V(v);
  View4<T> PT;
  const bool has_patch = present(head_patch);
  if (has_patch) PT = View4<T>(*head_patch);
  const bool blend = P.hm_p != nullptr;
  OutView4<T> O(out), A;
  if (blend) A = OutView4<T>(attn);
  float* lse_p = lse.data_ptr<float>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const int64_t nQT = (P.Tq + BQ - 1) / BQ;
  const int64_t D = P.D, Dp = P.Dp, Dv = P.Dv, Dvp = P.Dvp;

  at::parallel_for(0, P.B * P.Hq * nQT, 1, [&](int64_t begin, int64_t end) {
    Buf qt(BQ * Dp), kt(Dp * BK), krow(BK * Dp), vt(BK * Dvp), st(BQ * BK), ot(BQ * Dvp), mrow(BQ), lrow(BQ);
    std::vector<int32_t> kb(BK), qbad(BQ), kvbad(BK), rowbad(BQ);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / (P.Hq * nQT), h = (w / nQT) % P.Hq, t = w % nQT;
      const int64_t kvh = h / P.group;
      const int64_t i0 = t * BQ;
      const int nq = static_cast<int>(std::min<int64_t>(BQ, P.Tq - i0));
      const float ss = P.score_scale(b, h);
      load_rows(Q, b, h, i0, nq, D, P.scale, qt(), Dp, qbad.data());
      std::memset(ot(), 0, sizeof(float) * BQ * Dvp);
      for (int r = 0; r < BQ; ++r) {
        mrow()[r] = NEG_INF;
        lrow()[r] = 0.f;
        rowbad[r] = 0;
      }
      const int64_t jlo = P.lo(i0), jhi = P.hi(i0 + nq - 1);
      for (int64_t j0 = jlo; j0 <= jhi; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, jhi + 1 - j0));
        std::fill(kvbad.begin(), kvbad.end(), 0);
        if (nq <= SMALL_NQ) {
          // few query rows (decoding): dot products on row-major K, no transposed copy to amortise
          load_rows(K, b, kvh, j0, nk, D, 1.0f, krow(), Dp, kvbad.data());
          for (int r = 0; r < nq; ++r) {
            const float* qr = qt() + r * Dp;
            float* srow = st() + r * BK;
            for (int jj = 0; jj < nk; ++jj) {
              const float* kr = krow() + jj * Dp;
              vf acc = vload(qr) * vload(kr);
              for (int64_t c = VW; c < Dp; c += VW) acc += vload(qr + c) * vload(kr + c);
              srow[jj] = hsum(acc);
            }
          }
        } else {
          load_cols(K, b, kvh, j0, nk, D, kt(), BK, kvbad.data());
          gemm_set(nq, BK, static_cast<int>(D), qt(), Dp, 1, kt(), BK, st(), BK);
        }
        {
          int32_t vbad[BK];
          load_rows(V, b, kvh, j0, nk, Dv, 1.0f, vt(), Dvp, vbad);
          for (int jj = 0; jj < nk; ++jj) kvbad[jj] |= vbad[jj];
        }
        const bool full = P.structurally_full(i0, nq, j0, nk);
        const bool bias = !full || P.has_elementwise();
        if (P.qb_p) P.load_kbits(b, h, j0, nk, kb.data());
        for (int r = 0; r < nq; ++r) {
          float* row = st() + r * BK;
          if (ss != 1.0f)
            for (int c = 0; c < BK; c += VW) vstore(row + c, vload(row + c) * ss);
          if (P.softcap > 0.f) P.cap_scores(row, nk);
          if (bias) P.apply_bias(row, b, h, i0 + r, j0, nk, full, kb.data());
          for (int c = nk; c < BK; ++c) row[c] = NEG_INF;
          if (!rowbad[r] && Plan::row_is_bad(row, qbad[r] != 0, kvbad.data())) rowbad[r] = 1;
          if (rowbad[r]) {  // its output is NaN: the row contributes nothing more
            std::memset(row, 0, sizeof(float) * BK);
            continue;
          }
          vf mx = vload(row);
          for (int c = VW; c < BK; c += VW) mx = vmax(mx, vload(row + c));
          const float mold = mrow()[r];
          const float mnew = std::max(mold, hmax(mx));
          if (mnew == NEG_INF) {  // nothing kept so far in this row
            std::memset(row, 0, sizeof(float) * BK);
            continue;
          }
          const vf mv = vsplat(mnew);
          vf acc = vsplat(0.f);
          for (int c = 0; c < BK; c += VW) {
            vf p = vexp(vload(row + c) - mv);
            acc += p;
            vstore(row + c, p);
          }
          const float alpha = mold == NEG_INF ? 0.f : std::exp(mold - mnew);
          lrow()[r] = lrow()[r] * alpha + hsum(acc);
          mrow()[r] = mnew;
          if (alpha != 1.0f) {
            float* o = ot() + r * Dvp;
            const vf av = vsplat(alpha);
            for (int64_t c = 0; c < Dvp; c += VW) vstore(o + c, vload(o + c) * av);
          }
        }
        gemm_acc(nq, static_cast<int>(Dvp), nk, st(), BK, 1, vt(), Dvp, ot(), Dvp);
      }
      // the sink joins each row's denominator (and running max) and adds no value; a NaN / +inf
      // sink makes every row of the head NaN
      const float sk = P.sink(b, h);
      if (P.sk_p)
        for (int r = 0; r < nq; ++r) {
          if (std::isnan(sk) || sk == POS_INF) rowbad[r] = 1;
          if (rowbad[r] || sk == NEG_INF) continue;
          const float mold = mrow()[r], mnew = std::max(mold, sk);
          const float alpha = mold == NEG_INF ? 0.f : std::exp(mold - mnew);
          lrow()[r] = lrow()[r] * alpha + std::exp(sk - mnew);
          mrow()[r] = mnew;
          float* o = ot() + r * Dvp;
          for (int64_t c = 0; c < Dvp; ++c) o[c] *= alpha;
        }
      // epilogue: normalise, lse, blend
      for (int r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        const float l = lrow()[r];
        const float inv = rowbad[r] ? QNAN : (l > 0.f ? 1.0f / l : 0.f);
        lse_p[b * ls0 + h * ls1 + i * ls2] = rowbad[r] ? QNAN : (l > 0.f ? mrow()[r] + std::log(l) : NEG_INF);
        const float* o = ot() + r * Dvp;
        T* dst = O.row(b, h, i);
        const int64_t sd = O.s[3];
        if (!blend) {
          for (int64_t d = 0; d < Dv; ++d) dst[d * sd] = static_cast<T>(o[d] * inv);
        } else {
          const float m = P.head_mask(b, h, i);
          T* adst = A.row(b, h, i);
          const int64_t asd = A.s[3];
          const T* pp = has_patch ? PT.row(b, h, i) : nullptr;
          const int64_t psd = PT.s[3];
          for (int64_t d = 0; d < Dv; ++d) {
            const T a = static_cast<T>(o[d] * inv);
            adst[d * asd] = a;
            const float pv = pp ? static_cast<float>(pp[d * psd]) : 0.f;
            dst[d * sd] = static_cast<T>(m * static_cast<float>(a) + (1.0f - m) * pv);
          }
        }
      }
    }
  });
}

void attention_fwd(const OperandList& operands, double scale, bool causal, c10::optional<int64_t> window,
                   c10::optional<double> softcap, at::Tensor out, at::Tensor lse, at::Tensor attn) {
  const Operands ops(operands);
  const at::Tensor &q = ops.get(Q), &k = ops.get(K), &v = ops.get(V);
  const c10::optional<at::Tensor>& head_patch = ops.opt(HEAD_PATCH);
  const c10::optional<at::Tensor>& head_mask = ops.opt(HEAD_MASK);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "headint cpu attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "headint cpu attention: q, k, v must share a dtype");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && lse.scalar_type() == at::kFloat,
              "headint cpu attention: bad output dtypes");
  const Plan P = make_plan(ops, scale, causal, window, softcap);
  TORCH_CHECK(out.dim() == 4 && out.size(3) == P.Dv, "headint cpu attention: out must be [B, Hq, Tq, Dv]");
  TORCH_CHECK(!present(head_patch) || present(head_mask), "headint cpu attention: head_patch needs head_mask");
  TORCH_CHECK(!present(head_patch) || head_patch->scalar_type() == q.scalar_type(),
              "headint cpu attention: head_patch must have q's dtype");
  TORCH_CHECK(!present(head_mask) || (attn.dim() == 4 && attn.scalar_type() == q.scalar_type()),
              "headint cpu attention: attn output must be [B, Hq, Tq, Dv] when head_mask is given");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "headint_attention_fwd", [&] {
    forward_impl<scalar_t>(P, q, k, v, head_patch, out, lse, attn);
  });
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
// P = exp(cap(raw * ss) + bias - lse) in `prob` (raw kept in `row`), dS = P * (dP - delta) * cap' * ss in `dp`
// (cap the soft-cap, cap' = 1 - tanh^2; the identity and 1 without one).
// Returns sum_j dS_j * raw_j (before the ss factor) for dscore_scale.
static inline float probs_and_ds(const Plan& P, float* row, float* dp, float* prob, int64_t b, int64_t h, int64_t i,
                                 int64_t j0, int nk, bool full, bool bias, const int32_t* kb, float ss, float lse,
                                 float delta) {
  // row: raw scores (fp32, q*scale . k); output: prob (P), dp <- dS * ss
  // Entries a row does not read (score -inf) get P = dS = 0 exactly, also in a NaN row (lse NaN).
  if (lse == NEG_INF) {
    std::memset(prob, 0, sizeof(float) * BK);
    std::memset(dp, 0, sizeof(float) * BK);
    return 0.f;
  }
  const vf ssv = vsplat(ss), lv = vsplat(lse), dv = vsplat(delta);
  for (int c = 0; c < BK; c += VW) vstore(prob + c, vload(row + c) * ssv);
  float dcap[BK];
  const bool capped = P.softcap > 0.f;
  if (capped) {
    std::fill(dcap, dcap + BK, 1.0f);
    P.cap_scores(prob, nk, dcap);
  }
  if (bias) P.apply_bias(prob, b, h, i, j0, nk, full, kb);
  for (int c = nk; c < BK; ++c) prob[c] = NEG_INF;
  vf acc = vsplat(0.f);
  const vf zero = vsplat(0.f), ninf = vsplat(NEG_INF);
  for (int c = 0; c < BK; c += VW) {
    const vf s = vload(prob + c);
    const vi rd = s != ninf;
    const vf p = vselect(rd, vexp(s - lv), zero);
    vstore(prob + c, p);
    vf g = p * (vload(dp + c) - dv);
    if (capped) g = g * vload(dcap + c);
    const vf ds = vselect(rd, g, zero);
    acc += vselect(rd, ds * vload(row + c), zero);
    vstore(dp + c, ds * ssv);
  }
  return hsum(acc);
}

// Store a float into an fp32 or fp64 tensor element.
static inline void store_f(void* p, bool f64, int64_t off, double val) {
  if (f64)
    static_cast<double*>(p)[off] = val;
  else
    static_cast<float*>(p)[off] = static_cast<float>(val);
}

template <typename T>
static void backward_impl(const Plan& P, const Operands& ops, const at::Tensor& dout, const at::Tensor& attn,
                          const at::Tensor& lse, at::TensorList grads) {
  const at::Tensor &q = ops.get(Q), &k = ops.get(K), &v = ops.get(V);
  const View4<T> Q(q), K(k), V(v), DO(dout), AT(attn);
  View4<T> PT;
  const bool has_patch = ops.has(HEAD_PATCH);
  if (has_patch) PT = View4<T>(ops.get(HEAD_PATCH));
  OutView4<T> DQ(grads[Operand::Q]), DK(grads[Operand::K]), DV(grads[Operand::V]);
  const at::Tensor& dhm = grads[HEAD_MASK];
  const at::Tensor& dss = grads[SCORE_SCALE];
  const at::Tensor& dsk = grads[SINKS];
  OutView4<T> DPT;
  if (has_patch) DPT = OutView4<T>(grads[HEAD_PATCH]);
  const float* lse_p = lse.data_ptr<float>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const int64_t B = P.B, Hq = P.Hq, Tq = P.Tq, Tk = P.Tk, D = P.D, Dp = P.Dp, Dv = P.Dv, Dvp = P.Dvp;
  const bool want_dhm = P.hm_p != nullptr;
  const bool want_dss = P.ss_p != nullptr;
  const bool want_dsk = P.sk_p != nullptr;

  // pass 0: delta[b, h, i] = sum_d m * dO * A ; dhead_mask = sum_d dO * (A - patch) ; dpatch = (1 - m) dO
  at::Tensor delta_t = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  float* delta = delta_t.data_ptr<float>();
  void* dhm_p = want_dhm ? dhm.data_ptr() : nullptr;
  const bool dhm_f64 = want_dhm && dhm.scalar_type() == at::kDouble;
  const int64_t dhs0 = want_dhm ? dhm.stride(0) : 0, dhs1 = want_dhm ? dhm.stride(1) : 0,
                dhs2 = want_dhm ? dhm.stride(2) : 0;
  at::parallel_for(0, B * Hq * Tq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / (Hq * Tq), h = (w / Tq) % Hq, i = w % Tq;
      const T* go = DO.row(b, h, i);
      const T* a = AT.row(b, h, i);
      const T* pp = has_patch ? PT.row(b, h, i) : nullptr;
      float s_da = 0.f, s_dm = 0.f;
      for (int64_t d = 0; d < Dv; ++d) {
        const float g = static_cast<float>(go[d * DO.s[3]]);
        const float av = static_cast<float>(a[d * AT.s[3]]);
        s_da += g * av;
        s_dm += g * (av - (pp ? static_cast<float>(pp[d * PT.s[3]]) : 0.f));
      }
      const float m = P.head_mask(b, h, i);
      delta[w] = m * s_da;
      if (want_dhm) store_f(dhm_p, dhm_f64, b * dhs0 + h * dhs1 + i * dhs2, s_dm);
      if (has_patch) {
        T* dp = DPT.row(b, h, i);
        for (int64_t d = 0; d < Dv; ++d)
          dp[d * DPT.s[3]] = static_cast<T>((1.0f - m) * static_cast<float>(go[d * DO.s[3]]));
      }
    }
  });
  // dsink[b, h] = -sum_i p_sink_i * delta_i with p_sink_i = exp(sink - lse_i) (lse includes the sink):
  // the sink's logit moves every probability of its row by -p_sink * p_j. Rows with lse = -inf
  // (nothing kept, a -inf sink) have no sink probability; NaN rows give NaN.
  if (want_dsk) {
    void* o = dsk.data_ptr();
    const bool f64 = dsk.scalar_type() == at::kDouble;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h) {
        const float sk = P.sink(b, h);
        double acc = 0.0;
        for (int64_t i = 0; i < Tq; ++i) {
          const float l = lse_p[b * ls0 + h * ls1 + i * ls2];
          if (l == NEG_INF) continue;
          acc += static_cast<double>(std::exp(sk - l)) * delta[(b * Hq + h) * Tq + i];
        }
        store_f(o, f64, b * dsk.stride(0) + h * dsk.stride(1), -acc);
      }
  }

  // loads Qsc = q * scale and dA = m * dO of q rows [i0, i0 + nq) of head (b, h)
  // (q and k load with non-finite elements zeroed, as in the forward: no NaN leaks along unread edges)
  auto load_q_da = [&](int64_t b, int64_t h, int64_t i0, int nq, float* qt, float* dat) {
    int32_t bad[BQ];
    load_rows(Q, b, h, i0, nq, D, P.scale, qt, Dp, bad);
    load_rows(DO, b, h, i0, nq, Dv, 1.0f, dat, Dvp);
    if (P.hm_p)
      for (int r = 0; r < nq; ++r) {
        const float m = P.head_mask(b, h, i0 + r);
        float* row = dat + r * Dvp;
        for (int64_t d = 0; d < Dv; ++d) row[d] *= m;
      }
  };

  const int64_t nQT = (Tq + BQ - 1) / BQ;
  const int64_t nKT = (Tk + BK - 1) / BK;

  // pass 1: dK, dV over (b, kv head, key tile)
  at::parallel_for(0, B * P.Hkv * nKT, 1, [&](int64_t begin, int64_t end) {
    Buf kt(Dp * BK), vtt(Dvp * BK), qt(BQ * Dp), dat(BQ * Dvp), st(BQ * BK), dpt(BQ * BK), pt(BQ * BK),
        dkt(BK * Dp), dvt(BK * Dvp);
    std::vector<int32_t> kb(BK);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / (P.Hkv * nKT), kvh = (w / nKT) % P.Hkv, t = w % nKT;
      const int64_t j0 = t * BK;
      const int nk = static_cast<int>(std::min<int64_t>(BK, Tk - j0));
      load_cols(K, b, kvh, j0, nk, D, kt(), BK);
      load_cols(V, b, kvh, j0, nk, Dv, vtt(), BK);
      std::memset(dkt(), 0, sizeof(float) * BK * Dp);
      std::memset(dvt(), 0, sizeof(float) * BK * Dvp);
      for (int64_t g = 0; g < P.group; ++g) {
        const int64_t h = kvh * P.group + g;
        const float ss = P.score_scale(b, h);
        if (P.qb_p) P.load_kbits(b, h, j0, nk, kb.data());
        for (int64_t qt_i = 0; qt_i < nQT; ++qt_i) {
          const int64_t i0 = qt_i * BQ;
          const int nq = static_cast<int>(std::min<int64_t>(BQ, Tq - i0));
          if (!P.rows_touch(i0, nq, j0, nk)) continue;
          load_q_da(b, h, i0, nq, qt(), dat());
          gemm_set(nq, BK, static_cast<int>(D), qt(), Dp, 1, kt(), BK, st(), BK);
          gemm_set(nq, BK, static_cast<int>(Dv), dat(), Dvp, 1, vtt(), BK, dpt(), BK);
          const bool full = P.structurally_full(i0, nq, j0, nk);
          const bool bias = !full || P.has_elementwise();
          for (int r = 0; r < nq; ++r) {
            const int64_t i = i0 + r;
            probs_and_ds(P, st() + r * BK, dpt() + r * BK, pt() + r * BK, b, h, i, j0, nk, full, bias, kb.data(),
                         ss, lse_p[b * ls0 + h * ls1 + i * ls2], delta[(b * Hq + h) * Tq + i]);
          }
          // dV += P^T dA ; dK += (dS * ss)^T Qsc
          gemm_acc(nk, static_cast<int>(Dvp), nq, pt(), 1, BK, dat(), Dvp, dvt(), Dvp);
          gemm_acc(nk, static_cast<int>(Dp), nq, dpt(), 1, BK, qt(), Dp, dkt(), Dp);
        }
      }
      for (int jj = 0; jj < nk; ++jj) {
        T* a = DK.row(b, kvh, j0 + jj);
        T* c = DV.row(b, kvh, j0 + jj);
        const float* sk = dkt() + jj * Dp;
        const float* sv = dvt() + jj * Dvp;
        for (int64_t d = 0; d < D; ++d) a[d * DK.s[3]] = static_cast<T>(sk[d]);
        for (int64_t d = 0; d < Dv; ++d) c[d * DV.s[3]] = static_cast<T>(sv[d]);
      }
    }
  });

  // pass 2: dQ (and dscore_scale partial sums) over (b, h, query tile)
  std::vector<float> dss_part(want_dss ? B * Hq * nQT : 0, 0.f);
  at::parallel_for(0, B * Hq * nQT, 1, [&](int64_t begin, int64_t end) {
    Buf kt(Dp * BK), kr(BK * Dp), vtt(Dvp * BK), qt(BQ * Dp), dat(BQ * Dvp), st(BQ * BK), dpt(BQ * BK),
        pt(BQ * BK), dqt(BQ * Dp);
    std::vector<int32_t> kb(BK);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / (Hq * nQT), h = (w / nQT) % Hq, t = w % nQT;
      const int64_t kvh = h / P.group;
      const int64_t i0 = t * BQ;
      const int nq = static_cast<int>(std::min<int64_t>(BQ, Tq - i0));
      const float ss = P.score_scale(b, h);
      load_q_da(b, h, i0, nq, qt(), dat());
      std::memset(dqt(), 0, sizeof(float) * BQ * Dp);
      float dss_acc = 0.f;
      const int64_t jlo = P.lo(i0), jhi = P.hi(i0 + nq - 1);
      for (int64_t j0 = jlo; j0 <= jhi; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, jhi + 1 - j0));
        load_cols(K, b, kvh, j0, nk, D, kt(), BK);
        int32_t kbad[BK];
        load_rows(K, b, kvh, j0, nk, D, 1.0f, kr(), Dp, kbad);
        load_cols(V, b, kvh, j0, nk, Dv, vtt(), BK);
        if (P.qb_p) P.load_kbits(b, h, j0, nk, kb.data());
        gemm_set(nq, BK, static_cast<int>(D), qt(), Dp, 1, kt(), BK, st(), BK);
        gemm_set(nq, BK, static_cast<int>(Dv), dat(), Dvp, 1, vtt(), BK, dpt(), BK);
        const bool full = P.structurally_full(i0, nq, j0, nk);
        const bool bias = !full || P.has_elementwise();
        for (int r = 0; r < nq; ++r) {
          const int64_t i = i0 + r;
          dss_acc += probs_and_ds(P, st() + r * BK, dpt() + r * BK, pt() + r * BK, b, h, i, j0, nk, full, bias,
                                  kb.data(), ss, lse_p[b * ls0 + h * ls1 + i * ls2], delta[(b * Hq + h) * Tq + i]);
        }
        gemm_acc(nq, static_cast<int>(Dp), nk, dpt(), BK, 1, kr(), Dp, dqt(), Dp);
      }
      if (want_dss) dss_part[w] = dss_acc;
      for (int r = 0; r < nq; ++r) {
        T* dst = DQ.row(b, h, i0 + r);
        const float* s = dqt() + r * Dp;
        for (int64_t d = 0; d < D; ++d) dst[d * DQ.s[3]] = static_cast<T>(s[d] * P.scale);
      }
    }
  });
  if (want_dss) {
    void* o = dss.data_ptr();
    const bool f64 = dss.scalar_type() == at::kDouble;
    const int64_t s0 = dss.stride(0), s1 = dss.stride(1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h) {
        double s = 0.0;
        for (int64_t t = 0; t < nQT; ++t) s += dss_part[(b * Hq + h) * nQT + t];
        store_f(o, f64, b * s0 + h * s1, s);
      }
  }
}

void attention_bwd(const at::Tensor& dout, const at::Tensor& attn, const at::Tensor& lse, const OperandList& operands,
                   double scale, bool causal, c10::optional<int64_t> window, c10::optional<double> softcap,
                   at::TensorList grads) {
  const Operands ops(operands);
  const at::Tensor &q = ops.get(Q), &k = ops.get(K), &v = ops.get(V);
  TORCH_CHECK(q.device().is_cpu(), "headint cpu attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  dout.scalar_type() == q.scalar_type() && attn.scalar_type() == q.scalar_type(),
              "headint cpu attention: dout, q, k, v, attn must share a dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "headint cpu attention: lse must be float32");
  TORCH_CHECK(dout.dim() == 4 && dout.sizes() == attn.sizes() && dout.size(0) == q.size(0) && dout.size(1) == q.size(1) &&
                  dout.size(2) == q.size(2) && dout.size(3) == v.size(3),
              "headint cpu attention: dout / attn must be [B, Hq, Tq, Dv]");
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == N_OPERANDS, "headint cpu attention: expected ", N_OPERANDS,
              " gradient slots, got ", grads.size());
  for (Operand o : {Q, K, V, HEAD_MASK, HEAD_PATCH, SCORE_SCALE, SINKS}) {
    if (!ops.has(o)) continue;
    const at::Tensor& g = grads[o];
    TORCH_CHECK(g.sizes() == ops.get(o).sizes() && g.scalar_type() == ops.get(o).scalar_type(),
                "headint cpu attention: gradient slot ", OPERAND_NAMES[o], " must match its operand's shape and dtype");
  }
  const Plan P = make_plan(ops, scale, causal, window, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "headint_attention_bwd", [&] {
    backward_impl<scalar_t>(P, ops, dout, attn, lse, grads);
  });
}

std::vector<std::string> operand_names() { return std::vector<std::string>(OPERAND_NAMES, OPERAND_NAMES + N_OPERANDS); }

int64_t vector_width() { return VW; }

}  // namespace headint_cpu

TORCH_LIBRARY(headint_cpu, m) {
  // operands: indexed by enum Operand; the scalars in AttentionArgs field order
  m.def(
      "attention_fwd(Tensor?[] operands, float scale, bool causal, int? window, float? softcap, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!) attn) -> ()",
      &headint_cpu::attention_fwd);
  m.def(
      "attention_bwd(Tensor dout, Tensor attn, Tensor lse, Tensor?[] operands, float scale, bool causal, int? window, "
      "float? softcap, "
      "Tensor(a!)[] grads) -> ()",
      &headint_cpu::attention_bwd);
  m.def("operand_names() -> str[]", &headint_cpu::operand_names);
  m.def("vector_width() -> int", &headint_cpu::vector_width);
}
