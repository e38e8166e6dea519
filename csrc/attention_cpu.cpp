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
// The products are tile GEMMs on a register-blocked micro-kernel (cpu_gemm.h); everything
// between them (scale, soft-cap, masks, knockouts, the online softmax, NaN tracking) is vector
// code on the tile in L1. No Tq x Tk buffer exists: each thread holds a fixed set of tiles.
//
// Forward (parallel over (b, h, query tile), the longest tiles first, taken from a shared counter):
//   a query tile of fq queries is held transposed, Q^T [D x fq], so that queries run along the
//   vector lanes; for each tile of FK keys:
//     S^T [FK x fq] = K_tile Q^T             (K rows broadcast: read in place when clean fp32)
//     scale, soft-cap, masks, knockouts; running max / sum per query lane (no horizontal ops)
//     O^T [Dv x fq] = alpha * O^T + V_tile^T P^T
//   fq (64 ... 512) is as large as half the L2 cache and enough work items for the threads allow:
//   each query tile streams the keys and values it reads once, so larger tiles read them fewer
//   times (at T = 8192 on a 1 MB-L2 CPU, 512 queries per tile ran 1.3x faster than 128).
//   the epilogue normalises, writes lse, adds the sink, blends with the head patch.
// Backward (FlashAttention-2 order, 5 tile GEMMs per (query tile, key tile) pair):
//   pass 0 (b, h, rows)        : delta = rowsum(dA * A), dhead_mask = rowsum(dO * (A - patch)),
//                                dpatch = (1 - m) dO, dsink = -sum_i exp(sink - lse_i) * delta_i
//   pass 1 (b, kv head, key tile; the longest first): K^T, V^T of the key tile packed once; for
//     each query head of the GQA group and each query tile that reads the key tile:
//       S = Q K^T, dP = dA V^T        [BQ x BK], keys along the lanes
//       P = exp(s - lse), dS = P * (dP - delta) (probabilities recomputed from the saved lse)
//       dV += P^T dA, dK += dS^T Q    (accumulated in the thread's tile: no races)
//       dQ_tile = dS K, added to dQ (fp32) under a per-(b, h, query tile) spin lock
// All arithmetic is fp32 (tiles of fp16 / bf16 / fp64 operands are converted on load).
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
// along the edges it read); removed keys are never read; the gradient of a non-finite input
// element itself is zero, as in the reference. Which rows of q, k, v hold a non-finite element is
// found once per call (`Finite`); clean fp32 tiles are read in place.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "cpu_gemm.h"
#include "cpu_simd.h"

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

// Tile sizes. Forward: up to FQ queries (vector lanes; the call's size is chosen by
// forward_q_tile) x FK keys per tile. Backward: BQ queries x BK keys (vector lanes). Multiples of
// the vector width.
constexpr int FQ = 512;
constexpr int FQ_MIN = 64;
constexpr int FK = 64;
constexpr int BQ = 64;
constexpr int BK = 64;
static_assert(FQ % VW == 0 && BK % VW == 0, "tile widths must be multiples of the vector width");

// A 64-byte aligned fp32 scratch buffer (zeroed).
struct Buf {
  float* p = nullptr;
  explicit Buf(size_t n) {
    const size_t bytes = std::max<size_t>(64, ((n * sizeof(float) + 63) / 64) * 64);
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    std::memset(p, 0, bytes);
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* operator()() const { return p; }
};

// Run `body` on the intra-op threads (at most n_items of them); `body` takes its work items from
// a shared counter until none is left, so each thread gets work in proportion to its speed and
// the longest items, handed out first, do not end up on one thread.
template <typename F>
static void run_parallel(int64_t n_items, const F& body) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n_items);
  if (nt <= 1 || at::in_parallel_region()) {
    body();
    return;
  }
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { body(); });
}

// A tiny spin lock (held for the few hundred cycles of adding one dQ tile).
struct SpinLock {
  std::atomic<int32_t> v{0};
  void lock() {
    while (v.exchange(1, std::memory_order_acquire)) {
      while (v.load(std::memory_order_relaxed)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    }
  }
  void unlock() { v.store(0, std::memory_order_release); }
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

template <typename M>
static inline float mask_value(const char* p, int64_t off) {
  return static_cast<float>(reinterpret_cast<const M*>(p)[off]);
}

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
  // Soft-cap the first n scores of a row in place; with `dcap`, store d cap / d s = 1 - tanh^2 there.
  void cap_scores(float* row, int n, float* dcap = nullptr) const {
    const float c = softcap, inv = 1.0f / softcap;
    for (int jj = 0; jj < n; ++jj) {
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
  int32_t q_word(int64_t b, int64_t h, int64_t i) const { return qb_p[b * qbs[0] + h * qbs[1] + i * qbs[2]]; }
  bool has_elementwise() const { return mk != MASK_NONE || qb_p != nullptr; }
  // Is every edge of rows [i0, i0+nq) x keys [j0, j0+nk) kept by causality / window?
  bool structurally_full(int64_t i0, int nq, int64_t j0, int nk) const {
    return lo(i0 + nq - 1) <= j0 && j0 + nk - 1 <= hi(i0);
  }
  // Query rows touching keys [j0, j0 + nk)?
  bool rows_touch(int64_t i0, int nq, int64_t j0, int nk) const {
    return !(hi(i0 + nq - 1) < j0 || lo(i0) > j0 + nk - 1);
  }

  // Load the knockout words of keys [j0, j0 + nk) of head (b, h) into kb (zero up to `pad`).
  void load_kbits(int64_t b, int64_t h, int64_t j0, int nk, int32_t* kb, int pad) const {
    const int32_t* p = kb_p + b * kbs[0] + h * kbs[1] + j0 * kbs[2];
    for (int jj = 0; jj < nk; ++jj) kb[jj] = p[jj * kbs[2]];
    for (int jj = nk; jj < pad; ++jj) kb[jj] = 0;
  }

  // Additive mask: removed keys are set to -inf after it, so a removed key's score is -inf
  // whatever the mask adds there. `n` elements from `base` with element stride `s`.
  void add_mask(float* x, int64_t base, int64_t s, int n) const {
    switch (mk) {
      case MASK_F32:
        for (int e = 0; e < n; ++e) x[e] += mask_value<float>(mask_p, base + e * s);
        break;
      case MASK_F16:
        for (int e = 0; e < n; ++e) x[e] += mask_value<at::Half>(mask_p, base + e * s);
        break;
      case MASK_BF16:
        for (int e = 0; e < n; ++e) x[e] += mask_value<at::BFloat16>(mask_p, base + e * s);
        break;
      case MASK_F64:
        for (int e = 0; e < n; ++e) x[e] += mask_value<double>(mask_p, base + e * s);
        break;
      default: break;
    }
  }
  void keep_mask(float* x, int64_t base, int64_t s, int n) const {
    const bool* m = reinterpret_cast<const bool*>(mask_p) + base;
    for (int e = 0; e < n; ++e)
      if (!m[e * s]) x[e] = NEG_INF;
  }

  // Scores of one query row i against keys j0 + lane (keys along the lanes: the backward),
  // nv vectors: removed edges -> -inf, the additive mask added. `full`: no structural test needed.
  void bias_key_lanes(float* row, int64_t b, int64_t h, int64_t i, int64_t j0, int nk, int nv, bool full,
                      const int32_t* kb) const {
    const int64_t base = b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
    if (mk != MASK_NONE && mk != MASK_BOOL) add_mask(row, base, ms[3], nk);
    const vf ninf = vsplat(NEG_INF);
    if (!full) {
      const vi l = vsplat_i(static_cast<int32_t>(lo(i) - j0)), u = vsplat_i(static_cast<int32_t>(hi(i) - j0));
      for (int v = 0; v < nv; ++v) {
        const vi jv = viota() + v * VW;
        float* x = row + v * VW;
        vstore(x, vselect((jv < l) | (jv > u), ninf, vload(x)));
      }
    }
    if (mk == MASK_BOOL) keep_mask(row, base, ms[3], nk);
    if (qb_p) {
      const int32_t w = q_word(b, h, i);
      if (w != 0) {
        const vi wv = vsplat_i(w), zero = vsplat_i(0);
        for (int v = 0; v < nv; ++v) {
          float* x = row + v * VW;
          vstore(x, vselect((wv & vload_i(kb + v * VW)) != zero, ninf, vload(x)));
        }
      }
    }
  }

  // Scores of one key j against queries i0 + lane (queries along the lanes: the forward), the
  // vectors [u0, u1); lo_v / hi_v / qw: the lanes' structural key range (absolute key indices)
  // and knockout words, kbj the key's knockout word.
  void bias_query_lanes(float* row, int64_t b, int64_t h, int64_t j, int64_t i0, int nq, int u0, int u1, bool full,
                        const int32_t* lo_v, const int32_t* hi_v, const int32_t* qw, int32_t kbj) const {
    const int r0 = u0 * VW, r1 = std::min(nq, u1 * VW);
    const int64_t base = b * ms[0] + h * ms[1] + (i0 + r0) * ms[2] + j * ms[3];
    if (mk != MASK_NONE && mk != MASK_BOOL) add_mask(row + r0, base, ms[2], r1 - r0);
    const vf ninf = vsplat(NEG_INF);
    if (!full) {
      const vi jv = vsplat_i(static_cast<int32_t>(j));
      for (int v = u0; v < u1; ++v) {
        float* x = row + v * VW;
        vstore(x, vselect((jv < vload_i(lo_v + v * VW)) | (jv > vload_i(hi_v + v * VW)), ninf, vload(x)));
      }
    }
    if (mk == MASK_BOOL) keep_mask(row + r0, base, ms[2], r1 - r0);
    if (qb_p && kbj != 0) {
      const vi kv = vsplat_i(kbj), zero = vsplat_i(0);
      for (int v = u0; v < u1; ++v) {
        float* x = row + v * VW;
        vstore(x, vselect((kv & vload_i(qw + v * VW)) != zero, ninf, vload(x)));
      }
    }
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

// ------------------------------------------------------------------------------------------
// Non-finite inputs, found once per call
// ------------------------------------------------------------------------------------------
// Does row r of x (D elements, checked after conversion to fp32) hold a non-finite element?
template <typename T>
static inline bool row_has_nonfinite(const T* src, int64_t sd, int64_t D) {
  if (std::is_same<T, float>::value && sd == 1) {
    const float* s = reinterpret_cast<const float*>(src);
    vi bad = {};
    int64_t d = 0;
    for (; d + VW <= D; d += VW) bad |= ~vfinite(vload(s + d));
    bool any = vany(bad);
    for (; d < D; ++d) any |= !std::isfinite(s[d]);
    return any;
  }
  for (int64_t d = 0; d < D; ++d)
    if (!std::isfinite(static_cast<float>(src[d * sd]))) return true;
  return false;
}

// Which rows of q ([B, Hq, Tq]) and of k or v ([B, Hkv, Tk]) hold a non-finite element, as -1 / 0
// per row and as running counts per head (so "does rows [r0, r0 + n) hold one?" is O(1)).
struct Finite {
  int64_t Tq = 0, Tk = 0;
  std::vector<int32_t> qbad, kvbad;  // [B * Hq * Tq], [B * Hkv * Tk]
  std::vector<int32_t> qcnt, kvcnt;  // [B * Hq * (Tq + 1)], [B * Hkv * (Tk + 1)]
  bool q_any(int64_t bh, int64_t i0, int64_t n) const {
    const int32_t* c = qcnt.data() + bh * (Tq + 1);
    return c[i0 + n] != c[i0];
  }
  bool kv_any(int64_t bh, int64_t j0, int64_t n) const {
    const int32_t* c = kvcnt.data() + bh * (Tk + 1);
    return c[j0 + n] != c[j0];
  }
};

template <typename T>
static Finite find_nonfinite(const Plan& P, const View4<T>& Qv, const View4<T>& Kv, const View4<T>& Vv) {
  Finite F;
  F.Tq = P.Tq;
  F.Tk = P.Tk;
  F.qbad.assign(P.B * P.Hq * P.Tq, 0);
  F.kvbad.assign(P.B * P.Hkv * P.Tk, 0);
  F.qcnt.assign(P.B * P.Hq * (P.Tq + 1), 0);
  F.kvcnt.assign(P.B * P.Hkv * (P.Tk + 1), 0);
  const int64_t nq_heads = P.B * P.Hq, n_heads = nq_heads + P.B * P.Hkv;
  at::parallel_for(0, n_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      if (w < nq_heads) {
        const int64_t b = w / P.Hq, h = w % P.Hq;
        int32_t* bad = F.qbad.data() + w * P.Tq;
        int32_t* cnt = F.qcnt.data() + w * (P.Tq + 1);
        for (int64_t i = 0; i < P.Tq; ++i) {
          bad[i] = row_has_nonfinite(Qv.row(b, h, i), Qv.s[3], P.D) ? -1 : 0;
          cnt[i + 1] = cnt[i] + (bad[i] != 0);
        }
      } else {
        const int64_t bk = w - nq_heads, b = bk / P.Hkv, h = bk % P.Hkv;
        int32_t* bad = F.kvbad.data() + bk * P.Tk;
        int32_t* cnt = F.kvcnt.data() + bk * (P.Tk + 1);
        for (int64_t j = 0; j < P.Tk; ++j) {
          const bool x = row_has_nonfinite(Kv.row(b, h, j), Kv.s[3], P.D) ||
                         row_has_nonfinite(Vv.row(b, h, j), Vv.s[3], P.Dv);
          bad[j] = x ? -1 : 0;
          cnt[j + 1] = cnt[j] + x;
        }
      }
    }
  });
  return F;
}

// ------------------------------------------------------------------------------------------
// Tile loads
// ------------------------------------------------------------------------------------------
// A row-major fp32 tile: row r at p + r * ld.
struct Tile {
  const float* p;
  int64_t ld;
};

// Rows [r0, r0 + n) of x[b, h] (D elements each) as an fp32 row-major tile. In place (a pointer
// into x) when T is float, the rows are contiguous, the tile is `clean` of non-finite elements
// and, if `padded` (the tile is read in whole vectors), D is a multiple of VW; else converted into
// `scratch` with ld = round_up(D, VW) and zeros past D, non-finite elements zeroed if `sanitise`.
template <typename T>
static inline Tile rows_f32(const View4<T>& x, int64_t b, int64_t h, int64_t r0, int n, int64_t D, bool clean,
                            bool padded, bool sanitise, float* scratch) {
  const int64_t sd = x.s[3], sr = x.s[2];
  if (std::is_same<T, float>::value && sd == 1 && (clean || !sanitise) && (!padded || D % VW == 0))
    return {reinterpret_cast<const float*>(x.row(b, h, r0)), sr};
  const int64_t ld = round_up(D, VW);
  const T* base = x.row(b, h, r0);
  for (int r = 0; r < n; ++r) {
    const T* src = base + r * sr;
    float* o = scratch + r * ld;
    for (int64_t d = 0; d < D; ++d) {
      const float val = static_cast<float>(src[d * sd]);
      o[d] = (sanitise && !std::isfinite(val)) ? 0.f : val;
    }
    for (int64_t d = D; d < ld; ++d) o[d] = 0.f;
  }
  return {scratch, ld};
}

// dst[d * ld + r] = mul * x(row r0 + r, d) for r < n, d < D, zero for n <= r < ld; non-finite
// elements load as zero.
template <typename T>
static inline void cols_f32(const View4<T>& x, int64_t b, int64_t h, int64_t r0, int n, int64_t D, float mul,
                            float* dst, int64_t ld) {
  const int64_t sd = x.s[3], sr = x.s[2];
  const T* base = x.row(b, h, r0);
  if (n < ld)
    for (int64_t d = 0; d < D; ++d) std::memset(dst + d * ld + n, 0, sizeof(float) * (ld - n));
  for (int r = 0; r < n; ++r) {
    const T* src = base + r * sr;
    for (int64_t d = 0; d < D; ++d) {
      const float val = static_cast<float>(src[d * sd]);
      dst[d * ld + r] = std::isfinite(val) ? mul * val : 0.f;
    }
  }
}

// dst[d * ld + r] = t(r, d) for r < n, d < D; zero for n <= r < ld.
static inline void transpose_tile(const Tile& t, int n, int64_t D, float* dst, int64_t ld) {
  for (int64_t d = 0; d < D; ++d) {
    float* o = dst + d * ld;
    for (int r = 0; r < n; ++r) o[r] = t.p[r * t.ld + d];
    for (int64_t r = n; r < ld; ++r) o[r] = 0.f;
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
static int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(256) * 1024;  // unknown: assume a small one
  }();
  return bytes;
}

// Queries per forward tile: the largest of 512, 256, 128, 64 whose tiles (Q^T, S^T, O^T: (D + FK + Dv)
// floats per query) fill at most half the L2 cache, that leaves at least two work items per
// thread, and that is not twice the queries there are.
static int forward_q_tile(const Plan& P) {
  const int64_t budget = l2_cache_bytes() / 2, per_query = (P.D + FK + P.Dv) * int64_t(sizeof(float));
  const int64_t min_items = 2 * int64_t(at::get_num_threads());
  int fq = FQ;
  while (fq > FQ_MIN && (fq * per_query > budget || P.B * P.Hq * ((P.Tq + fq - 1) / fq) < min_items || fq / 2 >= P.Tq))
    fq /= 2;
  return fq;
}

template <typename T>
static void forward_impl(const Plan& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& head_patch, at::Tensor& out, at::Tensor& lse,
                         at::Tensor& attn) {
  const View4<T> Qv(q), Kv(k), Vv(v);
  View4<T> PT;
  const bool has_patch = present(head_patch);
  if (has_patch) PT = View4<T>(*head_patch);
  const bool blend = P.hm_p != nullptr;
  OutView4<T> O(out), A;
  if (blend) A = OutView4<T>(attn);
  float* lse_p = lse.data_ptr<float>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const int64_t D = P.D, Dp = P.Dp, Dv = P.Dv, Dvp = P.Dvp;
  const Finite F = find_nonfinite(P, Qv, Kv, Vv);
  const int fq = forward_q_tile(P);
  const int64_t nQT = (P.Tq + fq - 1) / fq, BH = P.B * P.Hq, n_items = BH * nQT;
  constexpr int NVQ = FQ / VW;
  std::atomic<int64_t> next{0};

  run_parallel(n_items, [&] {
    Buf qT(D * fq), kpack(FK * Dp), vpack(FK * Dvp), sT(FK * fq), oT(Dv * fq);
    alignas(64) int32_t lo_v[FQ], hi_v[FQ], qw[FQ], qbad[FQ], kb[FK];
    alignas(64) float m_run[FQ], l_run[FQ];
    alignas(64) int32_t bad[FQ];
    for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const int64_t t = nQT - 1 - w / BH;  // the last query tiles read the most keys: first
      const int64_t b = (w % BH) / P.Hq, h = w % P.Hq;
      const int64_t kvh = h / P.group;
      const int64_t i0 = t * fq;
      const int nq = static_cast<int>(std::min<int64_t>(fq, P.Tq - i0));
      const int nvq = (nq + VW - 1) / VW, nl = nvq * VW;  // query vectors / lanes in use
      const float ss = P.score_scale(b, h);
      const bool q_bad = F.q_any(b * P.Hq + h, i0, nq);
      cols_f32(Qv, b, h, i0, nq, D, P.scale, qT(), fq);
      for (int r = 0; r < nl; ++r) {
        const int64_t i = i0 + r;
        const bool in = r < nq;
        lo_v[r] = static_cast<int32_t>(P.lo(i));
        hi_v[r] = static_cast<int32_t>(P.hi(i));
        qw[r] = (in && P.qb_p) ? P.q_word(b, h, i) : 0;
        qbad[r] = in ? F.qbad[(b * P.Hq + h) * P.Tq + i] : 0;
        m_run[r] = NEG_INF;
        l_run[r] = 0.f;
        bad[r] = 0;
      }
      for (int64_t d = 0; d < Dv; ++d) std::memset(oT() + d * fq, 0, sizeof(float) * nl);

      const int64_t jlo = P.lo(i0), jhi = P.hi(i0 + nq - 1);
      for (int64_t j0 = jlo; j0 <= jhi; j0 += FK) {
        const int nk = static_cast<int>(std::min<int64_t>(FK, jhi + 1 - j0));
        // the query vectors [u0, u1) holding a lane that reads a key of this tile (lo / hi grow
        // with the query): the others have nothing to add here and are skipped
        int r_first = 0, r_last = nq - 1;
        while (r_first < nq - 1 && hi_v[r_first] < j0) ++r_first;
        while (r_last > 0 && lo_v[r_last] > j0 + nk - 1) --r_last;
        const int u0 = r_first / VW, u1 = r_last / VW + 1, nlu = (u1 - u0) * VW;
        const bool kv_bad = F.kv_any(b * P.Hkv + kvh, j0, nk);
        const Tile kt = rows_f32(Kv, b, kvh, j0, nk, D, !kv_bad, false, true, kpack());
        const Tile vt = rows_f32(Vv, b, kvh, j0, nk, Dv, !kv_bad, false, true, vpack());
        // S^T = K Q^T (q carries the scale)
        gemm<false>(nk, nlu, static_cast<int>(D), kt.p, kt.ld, 1, qT() + u0 * VW, fq, sT() + u0 * VW, fq);
        const bool full = P.structurally_full(i0, nq, j0, nk);
        const bool bias = !full || P.has_elementwise();
        if (P.qb_p) P.load_kbits(b, h, j0, nk, kb, nk);
        const bool inputs_bad = q_bad || kv_bad;
        const int32_t* kvbad = F.kvbad.data() + (b * P.Hkv + kvh) * P.Tk + j0;
        vf mt[NVQ];
        vi bt[NVQ];
        for (int u = u0; u < u1; ++u) {
          mt[u] = vsplat(NEG_INF);
          bt[u] = vload_i(bad + u * VW);
        }
        const vf ssv = vsplat(ss), pinf = vsplat(POS_INF), ninf = vsplat(NEG_INF);
        // scores: score scale, soft-cap, mask / removals; bad lanes; the tile's max per lane
        for (int c = 0; c < nk; ++c) {
          float* row = sT() + c * fq;
          if (ss != 1.0f)
            for (int u = u0; u < u1; ++u) vstore(row + u * VW, vload(row + u * VW) * ssv);
          if (P.softcap > 0.f) P.cap_scores(row + u0 * VW, nlu);
          if (bias)
            P.bias_query_lanes(row, b, h, j0 + c, i0, nq, u0, u1, full, lo_v, hi_v, qw, P.qb_p ? kb[c] : 0);
          for (int u = u0; u < u1; ++u) {
            const vf s = vload(row + u * VW);
            bt[u] |= ~(s < pinf);  // NaN or +inf read
            if (inputs_bad) bt[u] |= (s != ninf) & (vload_i(qbad + u * VW) | vsplat_i(kvbad[c]));
            mt[u] = vmax(mt[u], s);
          }
        }
        // online softmax: new running max, rescale factor, probabilities and their sums
        vf mu[NVQ], alpha[NVQ], lsum[NVQ];
        bool rescale = false;
        for (int u = u0; u < u1; ++u) {
          vstore_i(bad + u * VW, bt[u]);
          const vf mo = vload(m_run + u * VW), mn = vmax(mo, mt[u]);
          mu[u] = vselect(mn == ninf, vsplat(0.f), mn);  // nothing kept yet: exp(-inf - 0) = 0
          alpha[u] = vexp(mo - mu[u]);
          rescale |= vany(alpha[u] != vsplat(1.0f));
          vstore(m_run + u * VW, mn);
          lsum[u] = vsplat(0.f);
        }
        for (int c = 0; c < nk; ++c) {
          float* row = sT() + c * fq;
          for (int u = u0; u < u1; ++u) {
            const vf p = vexp(vload(row + u * VW) - mu[u]);
            lsum[u] += p;
            vstore(row + u * VW, p);
          }
        }
        for (int u = u0; u < u1; ++u) vstore(l_run + u * VW, vload(l_run + u * VW) * alpha[u] + lsum[u]);
        if (rescale)
          for (int64_t d = 0; d < Dv; ++d)
            for (int u = u0; u < u1; ++u) vstore(oT() + d * fq + u * VW, vload(oT() + d * fq + u * VW) * alpha[u]);
        // O^T += V^T P^T
        gemm<true>(static_cast<int>(Dv), nlu, nk, vt.p, 1, vt.ld, sT() + u0 * VW, fq, oT() + u0 * VW, fq);
      }
      // the sink joins each row's denominator (and running max) and adds no value; a NaN / +inf
      // sink makes every row of the head NaN
      const float sk = P.sink(b, h);
      if (P.sk_p)
        for (int r = 0; r < nq; ++r) {
          if (std::isnan(sk) || sk == POS_INF) bad[r] = -1;
          if (bad[r] || sk == NEG_INF) continue;
          const float mold = m_run[r], mnew = std::max(mold, sk);
          const float alpha = mold == NEG_INF ? 0.f : std::exp(mold - mnew);
          l_run[r] = l_run[r] * alpha + std::exp(sk - mnew);
          m_run[r] = mnew;
          for (int64_t d = 0; d < Dv; ++d) oT()[d * fq + r] *= alpha;
        }
      // epilogue: normalise, lse, blend
      for (int r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        const float l = l_run[r];
        const float inv = bad[r] ? QNAN : (l > 0.f ? 1.0f / l : 0.f);
        lse_p[b * ls0 + h * ls1 + i * ls2] = bad[r] ? QNAN : (l > 0.f ? m_run[r] + std::log(l) : NEG_INF);
        const float* o = oT() + r;
        T* dst = O.row(b, h, i);
        const int64_t sd = O.s[3];
        if (!blend) {
          for (int64_t d = 0; d < Dv; ++d) dst[d * sd] = static_cast<T>(o[d * fq] * inv);
        } else {
          const float m = P.head_mask(b, h, i);
          T* adst = A.row(b, h, i);
          const int64_t asd = A.s[3];
          const T* pp = has_patch ? PT.row(b, h, i) : nullptr;
          const int64_t psd = PT.s[3];
          for (int64_t d = 0; d < Dv; ++d) {
            const T a = static_cast<T>(o[d * fq] * inv);
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
// One query row i against keys j0 + lane (nv vectors): on entry `srow` holds q . k (raw, without
// the scale) and `dprow` dA . v; on exit srow holds P = exp(cap(raw * ss) + bias - lse) and dprow
// dS * ss * scale with dS = P * (dP - delta) * cap' (cap the soft-cap, cap' = 1 - tanh^2; the
// identity and 1 without one); entries the row does not read (score -inf, keys past nk) get
// P = dS = 0 exactly, also in a NaN row (lse NaN). Returns sum_j dS_j * raw_j * scale (for
// dscore_scale).
static inline float probs_and_ds(const Plan& P, float* srow, float* dprow, int64_t b, int64_t h, int64_t i,
                                 int64_t j0, int nk, int nv, bool full, bool bias, const int32_t* kb, float ss,
                                 float lse, float delta) {
  alignas(64) float raw[BK];
  alignas(64) float dcap[BK];
  const vf scv = vsplat(P.scale), ssv = vsplat(ss);
  for (int u = 0; u < nv; ++u) {
    const vf x = vload(srow + u * VW) * scv;
    vstore(raw + u * VW, x);
    vstore(srow + u * VW, x * ssv);
  }
  const bool capped = P.softcap > 0.f;
  if (capped) P.cap_scores(srow, nv * VW, dcap);
  for (int c = nk; c < nv * VW; ++c) srow[c] = NEG_INF;
  if (bias) P.bias_key_lanes(srow, b, h, i, j0, nk, nv, full, kb);
  const vf lv = vsplat(lse), dv = vsplat(delta), zero = vsplat(0.f), ninf = vsplat(NEG_INF), out_scale = ssv * scv;
  vf acc = zero;
  for (int u = 0; u < nv; ++u) {
    const vf s = vload(srow + u * VW);
    const vi rd = s != ninf;
    const vf p = vselect(rd, vexp(s - lv), zero);
    vf g = p * (vload(dprow + u * VW) - dv);
    if (capped) g = g * vload(dcap + u * VW);
    const vf ds = vselect(rd, g, zero);
    acc += vselect(rd, ds * vload(raw + u * VW), zero);
    vstore(srow + u * VW, p);
    vstore(dprow + u * VW, ds * out_scale);
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
  const View4<T> Qv(q), Kv(k), Vv(v), DO(dout), AT(attn);
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

  const Finite F = find_nonfinite(P, Qv, Kv, Vv);
  const int64_t nQT = (Tq + BQ - 1) / BQ;
  const int64_t nKT = (Tk + BK - 1) / BK;

  // dQ accumulates in fp32: in the gradient itself when it is an fp32 tensor with contiguous rows,
  // else in a buffer converted at the end
  const bool dq_in_place = std::is_same<T, float>::value && DQ.s[3] == 1;
  std::vector<float> dq_buf(dq_in_place ? 0 : B * Hq * Tq * D, 0.f);
  auto dq_row = [&](int64_t b, int64_t h, int64_t i) -> float* {
    if (dq_in_place) return reinterpret_cast<float*>(DQ.row(b, h, i));
    return dq_buf.data() + ((b * Hq + h) * Tq + i) * D;
  };
  if (dq_in_place)
    at::parallel_for(0, B * Hq * Tq, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) std::memset(dq_row(w / (Hq * Tq), (w / Tq) % Hq, w % Tq), 0, sizeof(float) * D);
    });
  std::unique_ptr<SpinLock[]> locks(new SpinLock[std::max<int64_t>(1, B * Hq * nQT)]);
  std::vector<float> dss_part(want_dss ? B * Hq * nKT : 0, 0.f);

  // pass 1: over (key tile, b, kv head), the first key tiles (read by the most queries) first
  const int64_t BHk = B * P.Hkv, n_items = nKT * BHk;
  std::atomic<int64_t> next{0};
  run_parallel(n_items, [&] {
    Buf kpack(BK * Dp), vpack(BK * Dvp), kT(D * BK), vT(Dv * BK), dkt(BK * Dp), dvt(BK * Dvp), qpack(BQ * Dp),
        dapack(BQ * Dvp), st(BQ * BK), dpt(BQ * BK), dqt(BQ * Dp);
    alignas(64) int32_t kb[BK];
    for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const int64_t t = w / BHk, b = (w % BHk) / P.Hkv, kvh = w % P.Hkv;
      const int64_t j0 = t * BK;
      const int nk = static_cast<int>(std::min<int64_t>(BK, Tk - j0));
      const int nvk = (nk + VW - 1) / VW, nlk = nvk * VW;
      const bool kv_bad = F.kv_any(b * P.Hkv + kvh, j0, nk);
      const Tile kr = rows_f32(Kv, b, kvh, j0, nk, D, !kv_bad, true, true, kpack());
      const Tile vr = rows_f32(Vv, b, kvh, j0, nk, Dv, !kv_bad, false, true, vpack());
      transpose_tile(kr, nk, D, kT(), BK);
      transpose_tile(vr, nk, Dv, vT(), BK);
      std::memset(dkt(), 0, sizeof(float) * BK * Dp);
      std::memset(dvt(), 0, sizeof(float) * BK * Dvp);
      for (int64_t g = 0; g < P.group; ++g) {
        const int64_t h = kvh * P.group + g;
        const float ss = P.score_scale(b, h);
        if (P.qb_p) P.load_kbits(b, h, j0, nk, kb, nlk);
        float dss_acc = 0.f;
        for (int64_t qt_i = 0; qt_i < nQT; ++qt_i) {
          const int64_t i0 = qt_i * BQ;
          const int nq = static_cast<int>(std::min<int64_t>(BQ, Tq - i0));
          if (!P.rows_touch(i0, nq, j0, nk)) continue;
          const Tile qr = rows_f32(Qv, b, h, i0, nq, D, !F.q_any(b * Hq + h, i0, nq), true, true, qpack());
          Tile da;
          if (P.hm_p) {  // dA = head_mask * dO
            for (int r = 0; r < nq; ++r) {
              const float m = P.head_mask(b, h, i0 + r);
              const T* src = DO.row(b, h, i0 + r);
              float* o = dapack() + r * Dvp;
              for (int64_t d = 0; d < Dv; ++d) o[d] = m * static_cast<float>(src[d * DO.s[3]]);
              for (int64_t d = Dv; d < Dvp; ++d) o[d] = 0.f;
            }
            da = {dapack(), Dvp};
          } else {
            da = rows_f32(DO, b, h, i0, nq, Dv, true, true, false, dapack());
          }
          gemm<false>(nq, nlk, static_cast<int>(D), qr.p, qr.ld, 1, kT(), BK, st(), BK);    // S = Q K^T
          gemm<false>(nq, nlk, static_cast<int>(Dv), da.p, da.ld, 1, vT(), BK, dpt(), BK);  // dP = dA V^T
          const bool full = P.structurally_full(i0, nq, j0, nk);
          const bool bias = !full || P.has_elementwise();
          for (int r = 0; r < nq; ++r) {
            const int64_t i = i0 + r;
            dss_acc += probs_and_ds(P, st() + r * BK, dpt() + r * BK, b, h, i, j0, nk, nvk, full, bias, kb, ss,
                                    lse_p[b * ls0 + h * ls1 + i * ls2], delta[(b * Hq + h) * Tq + i]);
          }
          gemm<true>(nk, static_cast<int>(Dvp), nq, st(), 1, BK, da.p, da.ld, dvt(), Dvp);  // dV += P^T dA
          gemm<true>(nk, static_cast<int>(Dp), nq, dpt(), 1, BK, qr.p, qr.ld, dkt(), Dp);   // dK += dS^T Q
          gemm<false>(nq, static_cast<int>(Dp), nk, dpt(), BK, 1, kr.p, kr.ld, dqt(), Dp);  // dQ_tile = dS K
          SpinLock& lock = locks[(b * Hq + h) * nQT + qt_i];
          lock.lock();
          for (int r = 0; r < nq; ++r) {
            float* dst = dq_row(b, h, i0 + r);
            const float* src = dqt() + r * Dp;
            int64_t d = 0;
            for (; d + VW <= D; d += VW) vstore(dst + d, vload(dst + d) + vload(src + d));
            for (; d < D; ++d) dst[d] += src[d];
          }
          lock.unlock();
        }
        if (want_dss) dss_part[(b * Hq + h) * nKT + t] = dss_acc;
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
  if (!dq_in_place)
    at::parallel_for(0, B * Hq * Tq, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / (Hq * Tq), h = (w / Tq) % Hq, i = w % Tq;
        T* dst = DQ.row(b, h, i);
        const float* src = dq_buf.data() + w * D;
        for (int64_t d = 0; d < D; ++d) dst[d * DQ.s[3]] = static_cast<T>(src[d]);
      }
    });
  // A non-finite input element enters every product as zero: its own gradient is zero (the
  // reference's, too), while the rest of a row that read it carries NaN.
  auto zero_nonfinite = [&](const View4<T>& x, OutView4<T>& g, int64_t b, int64_t h, int64_t i, int64_t n) {
    const T* src = x.row(b, h, i);
    T* dst = g.row(b, h, i);
    for (int64_t d = 0; d < n; ++d)
      if (!std::isfinite(static_cast<float>(src[d * x.s[3]]))) dst[d * g.s[3]] = static_cast<T>(0.f);
  };
  for (int64_t bh = 0; bh < B * Hq; ++bh)
    if (F.q_any(bh, 0, Tq))
      for (int64_t i = 0; i < Tq; ++i)
        if (F.qbad[bh * Tq + i]) zero_nonfinite(Qv, DQ, bh / Hq, bh % Hq, i, D);
  for (int64_t bh = 0; bh < B * P.Hkv; ++bh)
    if (F.kv_any(bh, 0, Tk))
      for (int64_t j = 0; j < Tk; ++j)
        if (F.kvbad[bh * Tk + j]) {
          zero_nonfinite(Kv, DK, bh / P.Hkv, bh % P.Hkv, j, D);
          zero_nonfinite(Vv, DV, bh / P.Hkv, bh % P.Hkv, j, Dv);
        }
  if (want_dss) {
    void* o = dss.data_ptr();
    const bool f64 = dss.scalar_type() == at::kDouble;
    const int64_t s0 = dss.stride(0), s1 = dss.stride(1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h) {
        double s = 0.0;
        for (int64_t t = 0; t < nKT; ++t) s += dss_part[(b * Hq + h) * nKT + t];
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
