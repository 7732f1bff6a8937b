// Segment-aware causal (optionally sliding-window) GQA attention for XLA:CPU, float32: the "cpu" backend of
// psych201_jax/model/attention.py, called through the XLA FFI (psych201_jax/model/cpu_kernel.py builds it).
//
// Why a native kernel: XLA:CPU runs every elementwise fusion of an online softmax as a pass over memory, so the
// blockwise XLA backend spends 30-40% of its time outside its matmuls. Here each work item (batch row, kv head,
// block of BQ queries with their G query heads) keeps its score tile in cache and runs the softmax on it in place.
//
// Semantics (shared by every backend): query i sees key j iff both carry the same nonzero segment id, j <= i and,
// with a window W > 0, i - W < j. Segments are contiguous, so the visible keys of i are [lo(i), i] with lo(i) =
// max(start of i's segment, i - W + 1). Padding queries (segment 0) produce zeros. The scale (head_dim**-0.5 of the
// unpadded head) is folded into the packed queries.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats, unaligned loads and stores
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));

constexpr int kBlockQ = 64;    // queries per work item (times G query heads = score rows)
constexpr int kBlockK = 256;   // keys per score tile
constexpr int kRows = 8;       // rows of the QK^T micro-kernel (x 32 columns)
constexpr int kRowsPV = 6;     // rows of the PV micro-kernel (x 64 columns)
constexpr int kChunkPV = 64;   // keys per PV pass, so that the value rows stay in L1 across row blocks

inline v16 splat(float x) { return v16{} + x; }
// A broadcast straight from memory: with AVX-512 it folds into the FMA ({1to16}) instead of taking a shuffle port.
#ifdef __AVX512F__
inline v16 bcast(const float* p) { return (v16)_mm512_set1_ps(*p); }
#else
inline v16 bcast(const float* p) { return splat(*p); }
#endif
inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }

#ifdef __AVX512F__
inline float hmax(v16 x) { return _mm512_reduce_max_ps((__m512)x); }
inline float hsum(v16 x) { return _mm512_reduce_add_ps((__m512)x); }
#else
inline float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, x[i]);
  return m;
}

inline float hsum(v16 x) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}
#endif

// exp(x) for x <= 0: Cephes expf's polynomial on x - n ln2, |x - n ln2| <= ln2 / 2, about 1 ulp; x < -87.3 (masked
// scores are -inf) gives exactly 0.
inline v16 exp_poly(v16 r) {
  v16 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.f;
}

#ifdef __AVX512F__
inline v16 exp_nonpositive(v16 x) {
  const __m512 xc = _mm512_max_ps((__m512)x, _mm512_set1_ps(-87.3f));  // max(-inf, c) = c
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 y = _mm512_scalef_ps((__m512)exp_poly((v16)r), n);
  return (v16)_mm512_maskz_mov_ps(_mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), y);
}
#else
inline v16 exp_nonpositive(v16 x) {
  const v16 lo = splat(-87.3f);
  v16 xc = x < lo ? lo : x;
  v16 fx = xc * 1.44269504088896341f + 0.5f;
  v16 n = __builtin_convertvector(__builtin_convertvector(fx, i16), v16);
  n = n > fx ? n - 1.f : n;  // floor
  v16 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  v16 out = exp_poly(r) * scale;
  return x < lo ? splat(0.f) : out;
}
#endif

struct Problem {
  const float *q, *k, *v;
  const int32_t* seg;
  float* out;
  int64_t b, t, hq, hk, d, window;
  float scale;
  std::vector<int64_t> lo;  // [b * t]: the first key each query sees (t for padding queries)
  int64_t tiles;            // key tiles of kBlockK per row, the last zero-padded
  std::vector<float> kt;    // [b, hk, tiles, kBlockK / 32, d, 32]: keys transposed in panels of 32 (qk_tile)
  std::vector<float> vp;    // [b, hk, tiles * kBlockK, d]: values, one head's rows contiguous
};

// Packs tile ``tile`` of kv head ``h`` of batch row ``bi`` into pb.kt and pb.vp.
void pack_tile(Problem& pb, int64_t bi, int64_t h, int64_t tile) {
  const int64_t d = pb.d, stride = pb.hk * d, j0 = tile * kBlockK;
  const int64_t bh = bi * pb.hk + h;
  float* kt = pb.kt.data() + (bh * pb.tiles + tile) * d * kBlockK;
  float* vp = pb.vp.data() + (bh * pb.tiles * kBlockK + j0) * d;
  const float* k = pb.k + (bi * pb.t * pb.hk + h) * d;
  const float* v = pb.v + (bi * pb.t * pb.hk + h) * d;
  for (int64_t jb = 0; jb < kBlockK; jb += 16) {  // 16 key rows at a time stay in L1 while they are transposed
    float* panel = kt + jb / 32 * 32 * d + jb % 32;
    for (int64_t e = 0; e < d; ++e)
      for (int64_t jj = 0; jj < 16; ++jj) panel[e * 32 + jj] = j0 + jb + jj < pb.t ? k[(j0 + jb + jj) * stride + e] : 0.f;
  }
  for (int64_t jj = 0; jj < kBlockK; ++jj) {
    if (j0 + jj < pb.t)
      std::memcpy(vp + jj * d, v + (j0 + jj) * stride, d * sizeof(float));
    else
      std::memset(vp + jj * d, 0, d * sizeof(float));
  }
}

// S[R, nk_pad] = Qs[R, d] x K^T, K^T in panels of 32 keys ([nk_pad / 32][d][32], so a panel is contiguous and
// stays in L1 without set conflicts while every row block passes over it); R a multiple of kRows, nk_pad of 32.
void qk_tile(const float* qs, const float* kt, float* s, int64_t rows, int64_t nk_pad, int64_t d) {
  for (int64_t c = 0; c < nk_pad; c += 32) {
    const float* panel = kt + c * d;
    for (int64_t r = 0; r < rows; r += kRows) {
      v16 acc[kRows][2] = {};
      const float* qr = qs + r * d;
      for (int64_t x = 0; x < d; ++x) {
        v16 b0 = load(panel + x * 32), b1 = load(panel + x * 32 + 16);
        for (int i = 0; i < kRows; ++i) {
          v16 a = bcast(qr + i * d + x);
          acc[i][0] += a * b0;
          acc[i][1] += a * b1;
        }
      }
      for (int i = 0; i < kRows; ++i) {
        store(s + (r + i) * nk_pad + c, acc[i][0]);
        store(s + (r + i) * nk_pad + c + 16, acc[i][1]);
      }
    }
  }
}

// acc[R, d] += P[R, nk] x V[nk, d] (V packed: rows of d floats, so a chunk's rows share no L1 sets); d a multiple
// of 64.
void pv_tile(const float* p, int64_t p_stride, const float* v, float* acc, int64_t rows, int64_t nk, int64_t d) {
  const int64_t v_stride = d;
  for (int64_t j0 = 0; j0 < nk; j0 += kChunkPV) {
    const int64_t j1 = std::min(nk, j0 + kChunkPV);
    for (int64_t c = 0; c < d; c += 64) {
      int64_t r = 0;
      for (; r + kRowsPV <= rows; r += kRowsPV) {
        v16 a[kRowsPV][4];
        for (int i = 0; i < kRowsPV; ++i)
          for (int u = 0; u < 4; ++u) a[i][u] = load(acc + (r + i) * d + c + 16 * u);
        for (int64_t j = j0; j < j1; ++j) {
          const float* vr = v + j * v_stride + c;
          v16 b0 = load(vr), b1 = load(vr + 16), b2 = load(vr + 32), b3 = load(vr + 48);
          for (int i = 0; i < kRowsPV; ++i) {
            v16 w = bcast(p + (r + i) * p_stride + j);
            a[i][0] += w * b0;
            a[i][1] += w * b1;
            a[i][2] += w * b2;
            a[i][3] += w * b3;
          }
        }
        for (int i = 0; i < kRowsPV; ++i)
          for (int u = 0; u < 4; ++u) store(acc + (r + i) * d + c + 16 * u, a[i][u]);
      }
      for (; r < rows; ++r) {
        v16 a[4];
        for (int u = 0; u < 4; ++u) a[u] = load(acc + r * d + c + 16 * u);
        for (int64_t j = j0; j < j1; ++j) {
          const float* vr = v + j * v_stride + c;
          v16 w = bcast(p + r * p_stride + j);
          for (int u = 0; u < 4; ++u) a[u] += w * load(vr + 16 * u);
        }
        for (int u = 0; u < 4; ++u) store(acc + r * d + c + 16 * u, a[u]);
      }
    }
  }
}

struct Scratch {
  std::vector<float> qs, s, acc, m, l;
  std::vector<int64_t> row_lo, row_hi;
};

// One work item: batch row ``bi``, kv head ``h``, queries [i0, i0 + nq).
void work_item(const Problem& pb, int64_t bi, int64_t h, int64_t i0, Scratch& w) {
  const int64_t g = pb.hq / pb.hk, d = pb.d, nq = std::min<int64_t>(kBlockQ, pb.t - i0);
  const int64_t rows = (nq * g + kRows - 1) / kRows * kRows;
  const int64_t* lo = pb.lo.data() + bi * pb.t;
  float* out = pb.out + (bi * pb.t + i0) * pb.hq * d;

  // Key range of the block and whether every row sees each tile whole.
  int64_t first = pb.t, last = -1, max_lo = -1, min_real = pb.t;
  for (int64_t i = i0; i < i0 + nq; ++i) {
    if (lo[i] >= pb.t) continue;  // padding: its rows are computed but never written
    first = std::min(first, lo[i]);
    last = std::max(last, i);
    max_lo = std::max(max_lo, lo[i]);
    min_real = std::min(min_real, i);
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t x = 0; x < g; ++x) std::memset(out + (i * pb.hq + h * g + x) * d, 0, d * sizeof(float));
  if (last < 0) return;

  w.qs.assign(rows * d, 0.f);
  w.s.resize(rows * kBlockK);
  w.acc.assign(rows * d, 0.f);
  w.m.assign(rows, -INFINITY);
  w.l.assign(rows, 0.f);
  w.row_lo.assign(rows, pb.t);
  w.row_hi.assign(rows, -1);
  for (int64_t i = 0; i < nq; ++i) {
    const float* qrow = pb.q + ((bi * pb.t + i0 + i) * pb.hq + h * g) * d;
    for (int64_t x = 0; x < g; ++x) {
      const int64_t r = i * g + x;
      for (int64_t e = 0; e < d; ++e) w.qs[r * d + e] = qrow[x * d + e] * pb.scale;
      if (lo[i0 + i] < pb.t) w.row_lo[r] = lo[i0 + i], w.row_hi[r] = i0 + i;
    }
  }

  const int64_t bh = bi * pb.hk + h;
  for (int64_t tile = first / kBlockK; tile <= last / kBlockK; ++tile) {
    const int64_t j0 = tile * kBlockK, nk = std::min<int64_t>(kBlockK, last + 1 - j0), nk_pad = (nk + 31) / 32 * 32;
    const bool whole = nk == kBlockK && max_lo <= j0 && min_real >= j0 + nk - 1;
    const float* kt = pb.kt.data() + (bh * pb.tiles + tile) * d * kBlockK;
    const float* vp = pb.vp.data() + (bh * pb.tiles * kBlockK + j0) * d;
    qk_tile(w.qs.data(), kt, w.s.data(), rows, nk_pad, d);
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = w.s.data() + r * nk_pad;
      if (!whole) {  // -inf outside [row_lo, row_hi] and past nk
        const int64_t a = std::clamp<int64_t>(w.row_lo[r] - j0, 0, nk_pad);
        const int64_t b = std::clamp<int64_t>(std::min(w.row_hi[r] + 1 - j0, nk), a, nk_pad);
        for (int64_t jj = 0; jj < a; ++jj) srow[jj] = -INFINITY;
        for (int64_t jj = b; jj < nk_pad; ++jj) srow[jj] = -INFINITY;
      }
      v16 mx = splat(-INFINITY);
      for (int64_t c = 0; c < nk_pad; c += 16) {
        v16 x = load(srow + c);
        mx = x > mx ? x : mx;
      }
      const float m_new = std::max(w.m[r], hmax(mx));
      if (m_new == -INFINITY) {  // nothing visible yet: P = 0
        std::memset(srow, 0, nk_pad * sizeof(float));
        continue;
      }
      v16 sum0 = splat(0.f), sum1 = splat(0.f);
      const v16 mv = splat(m_new);
      for (int64_t c = 0; c < nk_pad; c += 32) {  // nk_pad is a multiple of 32: two independent chains
        v16 p0 = exp_nonpositive(load(srow + c) - mv), p1 = exp_nonpositive(load(srow + c + 16) - mv);
        store(srow + c, p0);
        store(srow + c + 16, p1);
        sum0 += p0;
        sum1 += p1;
      }
      const v16 sum = sum0 + sum1;
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
    if (lo[i0 + i] >= pb.t) continue;
    for (int64_t x = 0; x < g; ++x) {
      const int64_t r = i * g + x;
      const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
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

ffi::Error attention_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> out,
                          int64_t window, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[3] % 64 != 0 || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument("cpu attention: q [B, T, Hq, D], k/v [B, T, Hk, D], D % 64 == 0, Hq % Hk == 0");
  Problem pb{q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), out->typed_data(),
             qd[0],          qd[1],          qd[2],          kd[2],            qd[3],
             window,         scale,          {}};
  pb.lo.resize(pb.b * pb.t);
  for (int64_t bi = 0; bi < pb.b; ++bi) {
    const int32_t* s = pb.seg + bi * pb.t;
    int64_t start = 0;
    for (int64_t i = 0; i < pb.t; ++i) {
      if (i == 0 || s[i] != s[i - 1]) start = i;
      int64_t l = window > 0 ? std::max(start, i - window + 1) : start;
      pb.lo[bi * pb.t + i] = s[i] == 0 ? pb.t : l;
    }
  }
  pb.tiles = (pb.t + kBlockK - 1) / kBlockK;
  pb.kt.resize(pb.b * pb.hk * pb.tiles * pb.d * kBlockK);
  pb.vp.resize(pb.kt.size());
  parallel_for(pool, pb.b * pb.hk * pb.tiles, [&pb](int64_t item, Scratch&) {
    pack_tile(pb, item / (pb.hk * pb.tiles), item / pb.tiles % pb.hk, item % pb.tiles);
  });
  const int64_t nqb = (pb.t + kBlockQ - 1) / kBlockQ, n = pb.b * pb.hk * nqb;
  // Latest query blocks first: they see the most keys, so the pool's last items are the short ones.
  parallel_for(pool, n, [&pb, nqb](int64_t item, Scratch& scratch) {
    const int64_t qb = nqb - 1 - item % nqb, rest = item / nqb;
    work_item(pb, rest / pb.hk, rest % pb.hk, qb * kBlockQ, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Psych201CpuAttention, attention_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
