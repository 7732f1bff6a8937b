// Segment-aware causal (optionally sliding-window) GQA attention for XLA:CPU, float32: the "cpu" backend of
// psych201_jax/model/attention.py (``attention`` and ``attention_at``), called through the XLA FFI
// (psych201_jax/model/cpu_kernel.py builds it).
//
// Why a native kernel: XLA:CPU runs every elementwise fusion of an online softmax as a pass over memory, so the
// blockwise XLA backend spends 30-40% of its time outside its matmuls. Here each work item (batch row, kv head,
// block of BQ queries with their G query heads) keeps its score tile in cache and runs the softmax on it in place.
//
// Semantics: query c of batch row b sees the keys [lo[b, c], hi[b, c]] of its row (none where lo > hi: the output
// is 0). The caller derives the ranges from the shared rule (same nonzero segment, j <= i and, with a window W,
// i - W < j): segments are contiguous, so the keys a query sees are one range. The scale (head_dim**-0.5 of the
// unpadded head, or Gemma's query_pre_attn_scalar**-0.5) is folded into the packed queries; a positive soft cap
// passes the scaled scores through softcap * tanh(s / softcap) before the mask (Gemma 2's attention-logit cap).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// One SIMD register of floats: 16 with AVX-512, 8 with AVX2, else 4 (SSE, NEON). The micro-kernels' shapes follow
// from it so that their accumulators fit the register file (32 zmm, 16 ymm, 16-32 xmm).
#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int kRows = 8, kColVecs = 2;    // QK^T micro-kernel: 8 rows x 32 keys (16 accumulators)
constexpr int kRowsPV = 6, kVecsPV = 4;   // PV micro-kernel: 6 rows x 64 head dims (24 accumulators)
#elif defined(__AVX2__)
constexpr int W = 8;
constexpr int kRows = 6, kColVecs = 2;    // 6 x 16 (12)
constexpr int kRowsPV = 6, kVecsPV = 2;   // 6 x 16 (12)
#else
constexpr int W = 4;
constexpr int kRows = 6, kColVecs = 2;    // 6 x 8 (12)
constexpr int kRowsPV = 6, kVecsPV = 2;   // 6 x 8 (12)
#endif
typedef float vf __attribute__((vector_size(W * 4), aligned(4)));  // unaligned loads and stores
typedef int32_t vi __attribute__((vector_size(W * 4), aligned(4)));

constexpr int kBlockQ = 64;              // queries per work item (times G query heads = score rows)
constexpr int kBlockK = 256;             // keys per score tile
constexpr int kPanel = kColVecs * W;     // keys per K^T panel (the QK^T micro-kernel's columns)
constexpr int kColsPV = kVecsPV * W;     // head dims per PV micro-kernel pass (64 divides by it)
constexpr int kChunkPV = 64;             // keys per PV pass, so that the value rows stay in L1 across row blocks
static_assert(kBlockK % kPanel == 0 && kPanel % (2 * W) == 0 && 64 % kColsPV == 0, "tile shapes");

inline vf splat(float x) { return vf{} + x; }
// A broadcast straight from memory: with AVX-512 one load-port uop, where a scalar load plus a register
// broadcast takes the shuffle port the FMAs need.
#ifdef __AVX512F__
inline vf bcast(const float* p) { return (vf)_mm512_set1_ps(*p); }
#else
inline vf bcast(const float* p) { return splat(*p); }
#endif
inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }

#ifdef __AVX512F__
inline float hmax(vf x) { return _mm512_reduce_max_ps((__m512)x); }
inline float hsum(vf x) { return _mm512_reduce_add_ps((__m512)x); }
#else
inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = std::max(m, x[i]);
  return m;
}

inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += x[i];
  return s;
}
#endif

// exp(x) for x <= 0: Cephes expf's polynomial on x - n ln2, |x - n ln2| <= ln2 / 2, about 1 ulp; x < -87.3 (masked
// scores are -inf) gives exactly 0.
inline vf exp_poly(vf r) {
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.f;
}

#ifdef __AVX512F__
inline vf exp_nonpositive(vf x) {
  const __m512 xc = _mm512_max_ps((__m512)x, _mm512_set1_ps(-87.3f));  // max(-inf, c) = c
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 y = _mm512_scalef_ps((__m512)exp_poly((vf)r), n);
  return (vf)_mm512_maskz_mov_ps(_mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), y);
}
#else
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.3f);
  const vf xc = x < lo ? lo : x;
  const vf fx = xc * 1.44269504088896341f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);  // truncation: fx >= -125.5
  n = n > fx ? n - 1.f : n;                                               // floor
  const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vf out = exp_poly(r) * scale;
  return x < lo ? splat(0.f) : out;
}
#endif

// softcap * tanh(s / softcap) in place over n scores (n a multiple of W), as tanh(|y|) = (1 - e) / (1 + e) with
// e = exp(-2 |y|) <= 1, the sign put back.
inline void cap_scores(float* s, int64_t n, float softcap) {
  const float minus_two_over_cap = -2.f / softcap;
  for (int64_t i = 0; i < n; i += W) {
    const vf x = load(s + i);
    const vf ax = x < 0.f ? -x : x;
    const vf e = exp_nonpositive(ax * minus_two_over_cap);
    const vf t = (1.f - e) / (1.f + e) * softcap;
    store(s + i, x < 0.f ? -t : t);
  }
}

struct Problem {
  const float *q, *k, *v;
  float* out;
  int64_t b, c, n, hq, hk, d;  // c queries and n keys per batch row
  float scale;
  float softcap;  // > 0: the scaled scores pass through softcap * tanh(s / softcap) (0: no cap)
  std::vector<int64_t> lo, hi;  // [b * c]: the first and last key each query sees, clamped to the row (lo > hi: none)
  int64_t tiles;                // key tiles of kBlockK per row, the last zero-padded
  std::vector<float> kt;    // [b, hk, tiles, kBlockK / kPanel, d, kPanel]: keys transposed in panels (qk_tile)
  std::vector<float> vp;    // [b, hk, tiles * kBlockK, d]: values, one head's rows contiguous
};

// Packs tile ``tile`` of kv head ``h`` of batch row ``bi`` into pb.kt and pb.vp.
void pack_tile(Problem& pb, int64_t bi, int64_t h, int64_t tile) {
  const int64_t d = pb.d, stride = pb.hk * d, j0 = tile * kBlockK;
  const int64_t bh = bi * pb.hk + h;
  float* kt = pb.kt.data() + (bh * pb.tiles + tile) * d * kBlockK;
  float* vp = pb.vp.data() + (bh * pb.tiles * kBlockK + j0) * d;
  const float* k = pb.k + (bi * pb.n * pb.hk + h) * d;
  const float* v = pb.v + (bi * pb.n * pb.hk + h) * d;
  for (int64_t jb = 0; jb < kBlockK; jb += W) {  // W key rows at a time stay in L1 while they are transposed
    float* panel = kt + jb / kPanel * kPanel * d + jb % kPanel;
    for (int64_t e = 0; e < d; ++e)
      for (int64_t jj = 0; jj < W; ++jj) {
        const int64_t j = j0 + jb + jj;
        panel[e * kPanel + jj] = j < pb.n ? k[j * stride + e] : 0.f;
      }
  }
  for (int64_t jj = 0; jj < kBlockK; ++jj) {
    if (j0 + jj < pb.n)
      std::memcpy(vp + jj * d, v + (j0 + jj) * stride, d * sizeof(float));
    else
      std::memset(vp + jj * d, 0, d * sizeof(float));
  }
}

// S[R, nk_pad] = Qs[R, d] x K^T, K^T in panels of kPanel keys ([nk_pad / kPanel][d][kPanel], so a panel is
// contiguous and stays in L1 without set conflicts while every row block passes over it); R a multiple of kRows,
// nk_pad of kPanel.
void qk_tile(const float* qs, const float* kt, float* s, int64_t rows, int64_t nk_pad, int64_t d) {
  for (int64_t c = 0; c < nk_pad; c += kPanel) {
    const float* panel = kt + c * d;
    for (int64_t r = 0; r < rows; r += kRows) {
      vf acc[kRows][kColVecs] = {};
      const float* qr = qs + r * d;
      for (int64_t x = 0; x < d; ++x) {
        vf b[kColVecs];
        for (int u = 0; u < kColVecs; ++u) b[u] = load(panel + x * kPanel + u * W);
        for (int i = 0; i < kRows; ++i) {
          const vf a = bcast(qr + i * d + x);
          for (int u = 0; u < kColVecs; ++u) acc[i][u] += a * b[u];
        }
      }
      for (int i = 0; i < kRows; ++i)
        for (int u = 0; u < kColVecs; ++u) store(s + (r + i) * nk_pad + c + u * W, acc[i][u]);
    }
  }
}

// acc[R, d] += P[R, nk] x V[nk, d] (V packed: rows of d floats, so a chunk's rows share no L1 sets); d a multiple
// of kColsPV.
void pv_tile(const float* p, int64_t p_stride, const float* v, float* acc, int64_t rows, int64_t nk, int64_t d) {
  for (int64_t j0 = 0; j0 < nk; j0 += kChunkPV) {
    const int64_t j1 = std::min(nk, j0 + kChunkPV);
    for (int64_t c = 0; c < d; c += kColsPV) {
      int64_t r = 0;
      for (; r + kRowsPV <= rows; r += kRowsPV) {
        vf a[kRowsPV][kVecsPV];
        for (int i = 0; i < kRowsPV; ++i)
          for (int u = 0; u < kVecsPV; ++u) a[i][u] = load(acc + (r + i) * d + c + u * W);
        for (int64_t j = j0; j < j1; ++j) {
          vf b[kVecsPV];
          for (int u = 0; u < kVecsPV; ++u) b[u] = load(v + j * d + c + u * W);
          for (int i = 0; i < kRowsPV; ++i) {
            const vf w = bcast(p + (r + i) * p_stride + j);
            for (int u = 0; u < kVecsPV; ++u) a[i][u] += w * b[u];
          }
        }
        for (int i = 0; i < kRowsPV; ++i)
          for (int u = 0; u < kVecsPV; ++u) store(acc + (r + i) * d + c + u * W, a[i][u]);
      }
      for (; r < rows; ++r) {
        vf a[kVecsPV];
        for (int u = 0; u < kVecsPV; ++u) a[u] = load(acc + r * d + c + u * W);
        for (int64_t j = j0; j < j1; ++j) {
          const vf w = bcast(p + r * p_stride + j);
          for (int u = 0; u < kVecsPV; ++u) a[u] += w * load(v + j * d + c + u * W);
        }
        for (int u = 0; u < kVecsPV; ++u) store(acc + r * d + c + u * W, a[u]);
      }
    }
  }
}

struct Scratch {
  std::vector<float> qs, s, acc, m, l;
  std::vector<int64_t> row_lo, row_hi;
  std::vector<char> nan;  // a row that met a NaN score: its output is NaN, as in the dense reference
};

// One work item: batch row ``bi``, kv head ``h``, queries [i0, i0 + nq).
void work_item(const Problem& pb, int64_t bi, int64_t h, int64_t i0, Scratch& w) {
  const int64_t g = pb.hq / pb.hk, d = pb.d, nq = std::min<int64_t>(kBlockQ, pb.c - i0);
  const int64_t rows = (nq * g + kRows - 1) / kRows * kRows;
  const int64_t* lo = pb.lo.data() + bi * pb.c;
  const int64_t* hi = pb.hi.data() + bi * pb.c;
  float* out = pb.out + (bi * pb.c + i0) * pb.hq * d;

  // Key range of the block and whether every row sees each tile whole.
  int64_t first = pb.n, last = -1, max_lo = -1, min_hi = pb.n;
  for (int64_t i = i0; i < i0 + nq; ++i) {
    if (lo[i] > hi[i]) continue;  // sees nothing (padding): its rows are computed but never written
    first = std::min(first, lo[i]);
    last = std::max(last, hi[i]);
    max_lo = std::max(max_lo, lo[i]);
    min_hi = std::min(min_hi, hi[i]);
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t x = 0; x < g; ++x) std::memset(out + (i * pb.hq + h * g + x) * d, 0, d * sizeof(float));
  if (last < 0) return;

  w.qs.assign(rows * d, 0.f);
  w.s.resize(rows * kBlockK);
  w.acc.assign(rows * d, 0.f);
  w.m.assign(rows, -INFINITY);
  w.l.assign(rows, 0.f);
  w.row_lo.assign(rows, pb.n);
  w.row_hi.assign(rows, -1);
  w.nan.assign(rows, 0);
  for (int64_t i = 0; i < nq; ++i) {
    const float* qrow = pb.q + ((bi * pb.c + i0 + i) * pb.hq + h * g) * d;
    for (int64_t x = 0; x < g; ++x) {
      const int64_t r = i * g + x;
      for (int64_t e = 0; e < d; ++e) w.qs[r * d + e] = qrow[x * d + e] * pb.scale;
      if (lo[i0 + i] <= hi[i0 + i]) w.row_lo[r] = lo[i0 + i], w.row_hi[r] = hi[i0 + i];
    }
  }

  const int64_t bh = bi * pb.hk + h;
  for (int64_t tile = first / kBlockK; tile <= last / kBlockK; ++tile) {
    const int64_t j0 = tile * kBlockK, nk = std::min<int64_t>(kBlockK, last + 1 - j0);
    const int64_t nk_pad = (nk + kPanel - 1) / kPanel * kPanel;
    bool seen = false;  // queries at far-apart positions (attention_at) can leave tiles between them unseen
    for (int64_t i = i0; i < i0 + nq && !seen; ++i) seen = lo[i] <= std::min(hi[i], j0 + nk - 1) && hi[i] >= j0;
    if (!seen) continue;
    const bool whole = nk == kBlockK && max_lo <= j0 && min_hi >= j0 + nk - 1;
    const float* kt = pb.kt.data() + (bh * pb.tiles + tile) * d * kBlockK;
    const float* vp = pb.vp.data() + (bh * pb.tiles * kBlockK + j0) * d;
    qk_tile(w.qs.data(), kt, w.s.data(), rows, nk_pad, d);
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = w.s.data() + r * nk_pad;
      if (pb.softcap > 0.f) cap_scores(srow, nk_pad, pb.softcap);  // before the mask, as HF's
      if (!whole) {  // -inf outside [row_lo, row_hi] and past nk
        const int64_t a = std::clamp<int64_t>(w.row_lo[r] - j0, 0, nk_pad);
        const int64_t b = std::clamp<int64_t>(std::min(w.row_hi[r] + 1 - j0, nk), a, nk_pad);
        for (int64_t jj = 0; jj < a; ++jj) srow[jj] = -INFINITY;
        for (int64_t jj = b; jj < nk_pad; ++jj) srow[jj] = -INFINITY;
      }
      vf mx = splat(-INFINITY);
      vi nan = vi{};
      for (int64_t c = 0; c < nk_pad; c += W) {
        const vf x = load(srow + c);
        mx = x > mx ? x : mx;
        nan |= x != x;
      }
      for (int e = 0; e < W; ++e) w.nan[r] |= nan[e] != 0;  // max and exp skip NaN; the row must not
      const float m_new = std::max(w.m[r], hmax(mx));
      if (m_new == -INFINITY) {  // nothing visible yet: P = 0
        std::memset(srow, 0, nk_pad * sizeof(float));
        continue;
      }
      vf sum0 = splat(0.f), sum1 = splat(0.f);
      const vf mv = splat(m_new);
      for (int64_t c = 0; c < nk_pad; c += 2 * W) {  // nk_pad is a multiple of 2 W: two independent chains
        const vf p0 = exp_nonpositive(load(srow + c) - mv), p1 = exp_nonpositive(load(srow + c + W) - mv);
        store(srow + c, p0);
        store(srow + c + W, p1);
        sum0 += p0;
        sum1 += p1;
      }
      const vf sum = sum0 + sum1;
      const float corr = w.m[r] == -INFINITY ? 0.f : std::exp(w.m[r] - m_new);
      w.l[r] = w.l[r] * corr + hsum(sum);
      w.m[r] = m_new;
      if (corr != 1.f) {
        float* arow = w.acc.data() + r * d;
        for (int64_t e = 0; e < d; ++e) arow[e] *= corr;
      }
    }
    pv_tile(w.s.data(), nk_pad, vp, w.acc.data(), rows, nk, d);
  }
  for (int64_t i = 0; i < nq; ++i) {
    if (lo[i0 + i] > hi[i0 + i]) continue;
    for (int64_t x = 0; x < g; ++x) {
      const int64_t r = i * g + x;
      const float inv = w.nan[r] ? NAN : w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
      float* orow = out + (i * pb.hq + h * g + x) * d;
      for (int64_t e = 0; e < d; ++e) orow[e] = w.acc[r * d + e] * inv;
    }
  }
}

// Runs fn(item) for item in [0, n) on the caller and the XLA intra-op pool; returns when every claimed item is done.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, active{0};
  };
  auto state = std::make_shared<State>();
  // A helper that starts after the work is gone claims nothing and never calls ``fn`` (whose references may be
  // gone by then); the caller waits only for helpers that are running.
  auto worker = [state, n, fn]() {
    state->active.fetch_add(1);
    Scratch scratch;
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) fn(i, scratch);
    state->active.fetch_sub(1);
  };
  for (int64_t i = 1; i < std::min<int64_t>(pool.num_threads(), n); ++i) {
    auto copy = worker;
    pool.Schedule(std::move(copy));
  }
  worker();
  while (state->active.load() != 0) std::this_thread::yield();
}

void run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
         ffi::Buffer<ffi::S32>& lo, ffi::Buffer<ffi::S32>& hi, ffi::ResultBuffer<ffi::F32>& out, float scale,
         float softcap) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Problem pb{};
  pb.q = q.typed_data(), pb.k = k.typed_data(), pb.v = v.typed_data(), pb.out = out->typed_data();
  pb.b = qd[0], pb.c = qd[1], pb.n = kd[1], pb.hq = qd[2], pb.hk = kd[2], pb.d = qd[3], pb.scale = scale;
  pb.softcap = softcap;
  pb.lo.resize(pb.b * pb.c);
  pb.hi.resize(pb.b * pb.c);
  for (int64_t i = 0; i < pb.b * pb.c; ++i) {  // clamped to the row: no range reads outside its keys
    pb.lo[i] = std::max<int64_t>(lo.typed_data()[i], 0);
    pb.hi[i] = std::min<int64_t>(hi.typed_data()[i], pb.n - 1);
  }
  pb.tiles = (pb.n + kBlockK - 1) / kBlockK;
  pb.kt.resize(pb.b * pb.hk * pb.tiles * pb.d * kBlockK);
  pb.vp.resize(pb.kt.size());
  parallel_for(pool, pb.b * pb.hk * pb.tiles, [&pb](int64_t item, Scratch&) {
    pack_tile(pb, item / (pb.hk * pb.tiles), item / pb.tiles % pb.hk, item % pb.tiles);
  });
  const int64_t nqb = (pb.c + kBlockQ - 1) / kBlockQ, n = pb.b * pb.hk * nqb;
  // Latest query blocks first: in causal attention they see the most keys, so the pool's last items are short.
  parallel_for(pool, n, [&pb, nqb](int64_t item, Scratch& scratch) {
    const int64_t qb = nqb - 1 - item % nqb, rest = item / nqb;
    work_item(pb, rest / pb.hk, rest % pb.hk, qb * kBlockQ, scratch);
  });
}

// Checks the shapes (a mismatch would read out of bounds) and runs; memory for the packed keys and values is the
// one allocation that can fail, and an exception must not cross into XLA.
ffi::Error attention_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                          ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ld = lo.dimensions(), hd = hi.dimensions();
  const bool shapes = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && ld.size() == 2 && hd.size() == 2 &&
                      std::equal(kd.begin(), kd.end(), vd.begin()) && std::equal(ld.begin(), ld.end(), hd.begin()) &&
                      kd[0] == qd[0] && kd[3] == qd[3] && ld[0] == qd[0] && ld[1] == qd[1] && kd[2] > 0;
  if (!shapes || qd[3] % 64 != 0 || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument(
        "cpu attention: q [B, C, Hq, D], k/v [B, N, Hk, D], key ranges lo/hi [B, C], D % 64 == 0, Hq % Hk == 0");
  try {
    run(pool, q, k, v, lo, hi, out, scale, softcap);
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("cpu attention: out of memory for the packed keys and values");
  }
  return ffi::Error::Success();
}

ffi::Error uncapped_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                         ffi::ResultBuffer<ffi::F32> out, float scale) {
  return attention_impl(pool, q, k, v, lo, hi, out, scale, 0.f);
}

}  // namespace

// Floats per SIMD register this build uses (16: AVX-512): "auto" picks the kernel only where it beats XLA.
extern "C" int Psych201CpuAttentionSimdWidth() { return W; }

// Two targets: without and with the attention-logit soft cap (Gemma 2), so the uncapped call keeps its attributes.
static auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<float>("scale");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Psych201CpuAttention, uncapped_impl, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Psych201CpuAttentionCapped, attention_impl, binding().Attr<float>("softcap"));
