"""Segment-aware causal (optionally sliding-window) attention with GQA, behind a small backend registry.

Semantics shared by every backend: query i sees key j iff both carry the same nonzero segment id,
j <= i (packed segments are contiguous, so index order is position order) and, with a sliding window W,
i - W < j (the key lies within the last W positions including i itself, as in HF OLMo 3 / Qwen2).
Scores and softmax are float32, the scale is ``scale`` (default head_dim**-0.5; Gemma: query_pre_attn_scalar**-0.5),
an optional soft cap bounds the scaled scores before masking (``cap * tanh(s / cap)``, Gemma 2's
attn_logit_softcapping), the output has q's dtype, and padding queries (segment 0) produce zeros. Backends
without the soft cap (``SOFTCAP_BACKENDS`` lists those with it) never run without it: "auto" then runs
"xla", and naming one raises a one-line ValueError.

Backends: "dense" builds the full [T, T] mask (reference for tests); "xla" is a blockwise online-softmax
that keeps memory at O(T * block) and iterates, per query block, only over key blocks that can be
visible (causality, window and the start of the earliest segment in the block bound the range).
Accelerator kernels ("splash" on TPU, "pallas_gpu" and "cudnn" on GPU) live in ``kernels.py``; "cpu" is a
native C++ kernel for XLA:CPU (``cpu_kernel.py``, built on first use). "auto" (the job's default) is "cpu"
where that kernel runs and wins (a CPU process with AVX-512, at most one device in the current mesh, a working
C++ compiler) and "xla" elsewhere. All are registered at the end of this module; more can be added with
``register_backend``.

``attention_at`` is the same attention for queries at chosen positions only (the last layer of a scoring
forward, where only scored positions need an output): the native kernel where the backend resolves to "cpu",
else plain XLA.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from psych201_jax.model.layers import soft_cap

AttentionFn = Callable[..., jnp.ndarray]
_BACKENDS: dict[str, AttentionFn] = {}
# Backends that implement the attention-logit soft cap (Pallas GPU and cuDNN do not).
SOFTCAP_BACKENDS = {"dense", "xla", "splash", "cpu"}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Adds ``fn(q, k, v, segment_ids, *, sliding_window, block_q, block_k, scale, softcap) -> out`` under
    ``name`` (``scale`` None: head_dim**-0.5; a backend without the soft cap raises when given one)."""
    _BACKENDS[name] = fn


def for_softcap(requested: str, resolved: str, softcap: float | None) -> str:
    """The backend that runs a call with ``softcap``: ``resolved`` when it has the cap (or there is none),
    "xla" when "auto" resolved to one without it; a backend named explicitly without it raises."""
    if softcap is None or resolved in SOFTCAP_BACKENDS:
        return resolved
    if requested == "auto":
        return "xla"
    from psych201_jax.model import kernels as attention_kernels

    attention_kernels.require_no_softcap(resolved, softcap)
    return resolved


def available_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def runnable_backends() -> tuple[str, ...]:
    """The registered backends that can run on this process's platform (kernels are platform-bound)."""
    from psych201_jax.model import cpu_kernel
    from psych201_jax.model import kernels as attention_kernels

    names = attention_kernels.runnable_backends(available_backends())
    return tuple(n for n in names if n != "cpu" or cpu_kernel.available())


def resolve_backend(name: str, n_devices: int | None = None) -> str:
    """The backend ``name`` runs as: "auto" is "cpu" on a CPU process whose mesh (``n_devices``, default: the
    current abstract mesh's) has at most one device, where the native kernel builds for AVX-512; else "xla"."""
    if name != "auto":
        return name
    from psych201_jax.model import cpu_kernel

    if n_devices is None:  # no mesh set: the arrays may still be sharded over every device of the process
        mesh = jax.sharding.get_abstract_mesh()
        n_devices = jax.device_count() if mesh.empty else mesh.size
    return "cpu" if jax.default_backend() == "cpu" and n_devices <= 1 and cpu_kernel.preferred() else "xla"


def auto_fallback_reason(n_devices: int) -> str:
    """Why "auto" runs "xla" on a one-device CPU process (the native kernel did not build), or ""."""
    from psych201_jax.model import cpu_kernel

    if jax.default_backend() != "cpu" or n_devices > 1:
        return ""
    return cpu_kernel.unavailable_reason()


def attention(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "b t hk d"],
    v: Float[Array, "b t hk d"],
    segment_ids: Int[Array, "b t"],
    *,
    sliding_window: int | None = None,
    backend: str = "xla",
    block_q: int | None = None,
    block_k: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Array, "b t hq d"]:
    """q [B, T, Hq, hd], k/v [B, T, Hk, hd] (Hq % Hk == 0), segment_ids int32[B, T] -> [B, T, Hq, hd].
    ``scale``: of the scores (None: head_dim**-0.5); ``softcap``: the attention-logit soft cap (None: none).

    Tiles default to 512 x 512. On a 2-core AVX-512 CPU (the workloads of ``benchmarks.benchmark``'s attention
    rows and two more, 8/4 heads of 64, timed at each tile size) 512 ran one 6.7K-token segment at 153
    GFLOP/s against 126 at 256 and 138 at 768, a packed row of six 2K-7K segments at 125 against 109, and
    2K segments alike (79); only 600-token segments ran faster at 256 (37 against 33 GFLOP/s), where
    attention is a small share of the work.
    """
    block_q, block_k = block_q or 512, block_k or 512
    name = for_softcap(backend, resolve_backend(backend), softcap)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    kwargs: dict[str, int | float | None] = dict(sliding_window=sliding_window, block_q=block_q, block_k=block_k)
    if scale is not None or softcap is not None:  # backends registered before these arguments still run
        kwargs.update(scale=scale, softcap=softcap)
    return _BACKENDS[name](q, k, v, segment_ids, **kwargs)


def _visible(q_idx, k_idx, q_seg, k_seg, sliding_window, window_idx=None):
    """Mask [B, Tq, Tk] from query indices [Tq] or [B, Tq], key indices [Tk] and segment ids [B, Tq]/[B, Tk].
    ``window_idx`` (like q_idx; default q_idx): the index the sliding window ends at."""
    qi = (q_idx if q_idx.ndim == 2 else q_idx[None])[:, :, None]
    wi = qi if window_idx is None else (window_idx if window_idx.ndim == 2 else window_idx[None])[:, :, None]
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    mask &= k_idx[None, None, :] <= qi
    if sliding_window is not None:
        mask &= k_idx[None, None, :] > wi - sliding_window
    return mask


def _grouped(q, num_kv_heads):
    """[B, T, Hq, hd] -> [B, T, Hk, G, hd]; query head h uses kv head h // G (HF repeat_kv order)."""
    b, t, hq, hd = q.shape
    return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, hd)


def _dense(q, k, v, segment_ids, *, sliding_window, block_q, block_k, scale=None, softcap=None):
    """Reference: full fp32 score matrix and mask."""
    del block_q, block_k
    b, t, hq, hd = q.shape
    idx = jnp.arange(t)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", _grouped(q, k.shape[2]), k, preferred_element_type=jnp.float32)
    s = soft_cap(s * (hd**-0.5 if scale is None else scale), softcap)
    mask = _visible(idx, idx, segment_ids, segment_ids, sliding_window)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(denom == 0, 1.0, denom), v.astype(jnp.float32))
    return o.reshape(b, t, hq, hd).astype(q.dtype)


def _segment_starts(segment_ids):
    """int32 [B, T]: the index at which each position's segment starts (segments are contiguous)."""
    idx = jnp.arange(segment_ids.shape[1])
    starts = jnp.where((idx == 0)[None] | (segment_ids != jnp.roll(segment_ids, 1, axis=1)), idx[None], 0)
    return jax.lax.cummax(starts, axis=1)


def _key_block_ranges(segment_ids, t, bq, bk, nq, sliding_window):
    """First and last key block (int32[nq] each) that queries of each query block can see.

    The earliest visible key of query i is max(start of i's segment, i - W + 1); the latest is i. Blocks
    whose queries are all padding get an empty range (first > last).
    """
    idx = jnp.arange(t)
    seg_start = _segment_starts(segment_ids)
    lo = seg_start if sliding_window is None else jnp.maximum(seg_start, idx[None] - sliding_window + 1)
    real = segment_ids != 0
    pad = nq * bq - t
    lo = jnp.pad(jnp.where(real, lo, t), ((0, 0), (0, pad)), constant_values=t)
    hi = jnp.pad(jnp.where(real, idx[None], -1), ((0, 0), (0, pad)), constant_values=-1)
    lo = lo.reshape(-1, nq, bq).min(axis=(0, 2))
    hi = hi.reshape(-1, nq, bq).max(axis=(0, 2))
    return (lo // bk).astype(jnp.int32), jnp.where(hi < 0, -1, hi // bk).astype(jnp.int32)


def _interior_ranges(segment_ids, t, bq, bk, nq, sliding_window, first, last):
    """The interior of each query block's key range [first, last]: key blocks (int32[nq] lo, hi) that every
    query of the block sees whole, so they need no mask.

    A query block has an interior only if, in every row, all its queries share one segment; its interior key
    blocks lie inside that segment, at or before the block's first query and, with a window W, after its
    last query's window start. No interior is (last + 1, last).
    """
    q_seg = jnp.pad(segment_ids, ((0, 0), (0, nq * bq - t))).reshape(-1, nq, bq)
    uniform = ((q_seg[:, :, 0] == q_seg[:, :, -1]) & (q_seg[:, :, 0] != 0)).all(axis=0)
    seg_start = jnp.pad(_segment_starts(segment_ids), ((0, 0), (0, nq * bq - t)))
    block_start = jnp.arange(nq) * bq
    lo = -(-seg_start[:, block_start].max(axis=0) // bk)  # the first key block wholly in the segment
    if sliding_window is not None:  # every key k of the block must satisfy last query - W < k
        lo = jnp.maximum(lo, (block_start + bq - sliding_window) // bk + 1)
    hi = (block_start + 1) // bk - 1  # keys up to the block's first query are visible to all its queries
    lo, hi = jnp.maximum(lo, first), jnp.minimum(hi, last)
    empty = ~uniform | (lo > hi)
    return jnp.where(empty, last + 1, lo).astype(jnp.int32), jnp.where(empty, last, hi).astype(jnp.int32)


def _online_softmax_init(b, hk, rows, hd):
    """Running (max, denominator, accumulator) of ``rows`` (query, group) pairs per kv head."""
    return (
        jnp.full((b, hk, rows), -jnp.inf, jnp.float32),
        jnp.zeros((b, hk, rows), jnp.float32),
        jnp.zeros((b, hk, rows, hd), jnp.float32),
    )


def _online_softmax_step(carry, q_blk, kp, vp, start, bk, mask, scale, softcap=None):
    """One key block of the online softmax: q_blk [B, Hk, R, hd] (R = query rows x G, query-major) against
    keys/values ``start:start + bk`` of kp/vp [B, Hk, N, hd]; ``mask`` [B, R / G, bk] or None (all visible).
    The scale is applied inside the exp, not as a pass over the scores (with a ``softcap``, the scores are
    scaled and capped first, and the exp takes them as they are)."""
    m, denom, acc = carry
    k_blk = jax.lax.dynamic_slice_in_dim(kp, start, bk, axis=2)
    v_blk = jax.lax.dynamic_slice_in_dim(vp, start, bk, axis=2)
    s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    if softcap is not None:
        s, scale = soft_cap(s * scale, softcap), 1.0
    if mask is not None:  # each query's row repeats for its G heads
        s = jnp.where(jnp.repeat(mask, q_blk.shape[2] // mask.shape[1], axis=1)[:, None], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp((s - m_safe[..., None]) * scale)  # softmax(scale * s): the max of s is the max of scale*s
    correction = jnp.exp((m - m_safe) * scale)
    denom = denom * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vp.dtype), v_blk, preferred_element_type=jnp.float32)
    return m_new, denom, acc * correction[..., None] + pv


def _online_softmax_out(carry, bq, hq):
    """Normalised output [B, bq, Hq, hd] (float32) of a finished online softmax; rows that saw no key are 0."""
    _, denom, acc = carry
    b, hk, rows, hd = acc.shape
    out = (acc / jnp.where(denom == 0, 1.0, denom)[..., None]).reshape(b, hk, bq, rows // bq, hd)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, bq, hq, hd)


def _online_softmax_lse(carry, bq, hq, scale, softcap=None):
    """float32 [B, bq, Hq] log-sum-exp of the scaled (and capped) scores of a finished online softmax (its max
    is of the unscaled scores, or of the capped ones with a ``softcap``); -inf for rows that saw no key."""
    m, denom, _ = carry
    b, hk, rows = m.shape
    lse = jnp.where(denom > 0, m * (1.0 if softcap is not None else scale) + jnp.log(denom), -jnp.inf)
    return jnp.transpose(lse.reshape(b, hk, bq, rows // bq), (0, 2, 1, 3)).reshape(b, bq, hq)


def _blockwise(q, k, v, segment_ids, *, sliding_window, block_q, block_k, scale=None, softcap=None):
    """Online-softmax attention over [block_q x block_k] tiles, skipping key blocks no query can see.

    Layout for the CPU's matmuls: heads lead ([B, Hk, T, hd]) and the G query heads sharing a kv head are
    folded into the rows of one [G * block_q, hd] x [hd, block_k] matmul per kv head; the scale is applied
    inside the exp, not as a pass over the scores; key blocks that every query of the block sees whole skip
    the mask. Measured on a 2-core CPU (``benchmarks.benchmark``'s attention row): 1.7x the previous
    [B, T, Hk, G, hd] tiles; 0.85-0.9x torch's CPU SDPA.
    """
    b, t, hq, hd = q.shape
    hk = k.shape[2]
    g = hq // hk
    bq, bk = min(block_q, t), min(block_k, t)
    nq, nk = -(-t // bq), -(-t // bk)
    scale = hd**-0.5 if scale is None else scale

    def pad_to(x, n):
        return jnp.pad(x, ((0, 0), (0, n - t)) + ((0, 0),) * (x.ndim - 2))

    qp = jnp.transpose(_grouped(pad_to(q, nq * bq), hk), (0, 2, 1, 3, 4))  # [B, Hk, nq*bq, G, hd]
    kp, vp = (jnp.transpose(pad_to(x, nk * bk), (0, 2, 1, 3)) for x in (k, v))  # [B, Hk, nk*bk, hd]
    q_seg, k_seg = pad_to(segment_ids, nq * bq), pad_to(segment_ids, nk * bk)
    first, last = _key_block_ranges(segment_ids, t, bq, bk, nq, sliding_window)
    inner_first, inner_last = _interior_ranges(segment_ids, t, bq, bk, nq, sliding_window, first, last)

    def query_block(args):
        i, j0, j1, a0, a1 = args
        q_blk = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=2).reshape(b, hk, bq * g, hd)
        qs_blk = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
        q_idx = i * bq + jnp.arange(bq)

        def key_block(j, carry, masked=True):
            mask = None
            if masked:
                ks_blk = jax.lax.dynamic_slice_in_dim(k_seg, j * bk, bk, axis=1)
                mask = _visible(q_idx, j * bk + jnp.arange(bk), qs_blk, ks_blk, sliding_window)  # [B, bq, bk]
            return _online_softmax_step(carry, q_blk, kp, vp, j * bk, bk, mask, scale, softcap)

        init = _online_softmax_init(b, hk, bq * g, hd)
        # Edge blocks masked, the interior (wholly visible: same values as masked) without the mask.
        carry = jax.lax.fori_loop(j0, a0, key_block, init)
        carry = jax.lax.fori_loop(a0, a1 + 1, lambda j, c: key_block(j, c, masked=False), carry)
        carry = jax.lax.fori_loop(a1 + 1, j1 + 1, key_block, carry)
        return _online_softmax_out(carry, bq, hq).astype(q.dtype)

    ranges = (jnp.arange(nq, dtype=jnp.int32), first, last, inner_first, inner_last)
    blocks = jax.lax.map(query_block, ranges)  # [nq, B, bq, Hq, hd]
    return jnp.transpose(blocks, (1, 0, 2, 3, 4)).reshape(b, nq * bq, hq, hd)[:, :t]


def _visible_range(k_segment, q_index, q_segment, sliding_window, window_index=None):
    """(real, start) [B, C]: whether a query at key position ``q_index`` with ``q_segment`` sees any key (it is
    not padding, lies in the row and carries the key segment at its position), and the first key it sees (its
    segment's start or its window's, the window ending at ``window_index``, default q_index); segments are
    contiguous, so it sees the keys [start, q_index]."""
    n = k_segment.shape[1]
    at = jnp.clip(q_index, 0, n - 1)
    start = jnp.take_along_axis(_segment_starts(k_segment), at, axis=1)
    if sliding_window is not None:
        start = jnp.maximum(start, (q_index if window_index is None else window_index) - sliding_window + 1)
    at_key = jnp.take_along_axis(k_segment, at, axis=1)
    return (q_segment != 0) & (q_segment == at_key) & (q_index >= 0) & (q_index < n), start


def _on_kernel(q, k, v, q_index, real, start, sliding_window, scale=None, softcap=None):
    """``cpu_kernel.attend`` (its tiles are fixed in its source) with the ranges of ``_visible_range``."""
    from psych201_jax.model import cpu_kernel

    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"attention backend 'cpu': sliding_window must be >= 1, got {sliding_window}")
    lo, hi = jnp.where(real, start, 0), jnp.where(real, q_index, -1)
    return cpu_kernel.attend(q, k, v, lo, hi, scale=scale, softcap=softcap)


def _native(q, k, v, segment_ids, *, sliding_window=None, block_q=None, block_k=None, scale=None, softcap=None):
    """The native CPU kernel: every position of a packed row is a query."""
    del block_q, block_k
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    real, start = _visible_range(segment_ids, idx, segment_ids, sliding_window)
    return _on_kernel(q, k, v, idx, real, start, sliding_window, scale, softcap)


def attention_at(
    q: Float[Array, "b c hq d"],
    q_index: Int[Array, "b c"],
    q_segment: Int[Array, "b c"],
    k: Float[Array, "b n hk d"],
    v: Float[Array, "b n hk d"],
    k_segment: Int[Array, "b n"],
    *,
    sliding_window: int | None = None,
    backend: str = "xla",
    block_q: int = 128,
    block_k: int = 512,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Array, "b c hq d"]:
    """Attention of C queries at key positions ``q_index`` (the shared semantics, q_segment 0 = padding) over
    all N keys: the last layer of a scoring forward needs its queries only where a response is scored. A query
    at a position outside [0, N) or whose q_segment is not the key segment there sees nothing (output 0).

    Where ``backend`` resolves to "cpu", the native kernel, each query seeing one range of keys. Otherwise
    (every other backend) an online softmax over [block_q x block_k] tiles, every tile masked; each block of
    queries visits the key blocks from the start of its earliest query's segment (or window) to its latest
    query, so queries sorted by position (the scoring plan's order) touch few keys. Any order is correct.
    Short query blocks keep each block's key range close to its own queries' prefixes (measured on CPU, 5,120
    plan entries over a 98,304-token row of 18 transcripts: 0.34 s at 128 x 512 against 0.46 s at 256 x 256).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    real, start = _visible_range(k_segment, q_index, q_segment, sliding_window)  # the same on every backend
    if for_softcap(backend, resolve_backend(backend), softcap) == "cpu":
        return _on_kernel(q, k, v, q_index, real, start, sliding_window, scale, softcap)
    tiles = dict(block_q=block_q, block_k=block_k, scale=scale, softcap=softcap)
    return _online_at(q, q_index, q_segment, k, v, k_segment, real, start, q_index, sliding_window, **tiles)[0]


def attention_at_lse(
    q: Float[Array, "b c hq d"],
    at: tuple[Int[Array, "b c"], Int[Array, "b c"], Int[Array, "b c"]],
    kv: tuple[Float[Array, "b n hk d"], Float[Array, "b n hk d"], Int[Array, "b n"]],
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Float[Array, "b c hq d"], Float[Array, "b c hq"]]:
    """``attention_at`` (its online softmax) for a query that stands later in the text than the keys it may
    see (the sampler's decode step: a generated token sees its participant's keys up to the end of its
    prefix). ``at``: (q_index, q_segment, window_index) [B, C], the last key position it may see, its segment
    and its own index, where its sliding window ends; ``kv``: (k, v, k_segment). Also returns the float32
    log-sum-exp of each query's visible scaled (capped) scores [B, C, Hq] (-inf where it sees none), so that a
    softmax over further keys can be merged with this one."""
    (q_index, q_segment, window_index), (k, v, k_segment) = at, kv
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    real, start = _visible_range(k_segment, q_index, q_segment, sliding_window, window_index)
    tiles = dict(block_q=128, block_k=512, scale=scale, softcap=softcap)
    return _online_at(q, q_index, q_segment, k, v, k_segment, real, start, window_index, sliding_window, **tiles)


def _online_at(
    q,
    q_index,
    q_segment,
    k,
    v,
    k_segment,
    real,
    start,
    window_index,
    sliding_window,
    *,
    block_q,
    block_k,
    scale,
    softcap,
):
    """The online softmax of ``attention_at`` over the ranges of ``_visible_range``: (output [B, C, Hq, hd],
    log-sum-exp [B, C, Hq]); the sliding window ends at ``window_index``."""
    b, c, hq, hd = q.shape
    n, hk = k.shape[1], k.shape[2]
    g = hq // hk
    bq, bk = min(block_q, c), min(block_k, n)
    nq, nk = -(-c // bq), -(-n // bk)
    scale = hd**-0.5 if scale is None else scale
    pad_q, pad_k = ((0, 0), (0, nq * bq - c)), ((0, 0), (0, nk * bk - n))
    qp = jnp.transpose(_grouped(jnp.pad(q, pad_q + ((0, 0), (0, 0))), hk), (0, 2, 1, 3, 4))  # [B, Hk, C', G, hd]
    kp, vp = (jnp.transpose(jnp.pad(x, pad_k + ((0, 0), (0, 0))), (0, 2, 1, 3)) for x in (k, v))  # [B, Hk, N', hd]
    q_seg = jnp.pad(jnp.where(real, q_segment, 0), pad_q)
    q_idx, k_seg, start = jnp.pad(q_index, pad_q), jnp.pad(k_segment, pad_k), jnp.pad(start, pad_q)
    w_idx = jnp.pad(window_index, pad_q)
    real = q_seg != 0
    lo = jnp.where(real, start, n).reshape(b, nq, bq).min(axis=(0, 2))
    hi = jnp.where(real, q_idx, -1).reshape(b, nq, bq).max(axis=(0, 2))
    first, last = (lo // bk).astype(jnp.int32), jnp.where(hi < 0, -1, hi // bk).astype(jnp.int32)

    def query_block(args):
        i, j0, j1 = args
        q_blk = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=2).reshape(b, hk, bq * g, hd)
        qi_blk, qs_blk, wi_blk = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1) for x in (q_idx, q_seg, w_idx))

        def key_block(j, carry):
            ks_blk = jax.lax.dynamic_slice_in_dim(k_seg, j * bk, bk, axis=1)
            mask = _visible(qi_blk, j * bk + jnp.arange(bk), qs_blk, ks_blk, sliding_window, wi_blk)  # [B, bq, bk]
            return _online_softmax_step(carry, q_blk, kp, vp, j * bk, bk, mask, scale, softcap)

        carry = jax.lax.fori_loop(j0, j1 + 1, key_block, _online_softmax_init(b, hk, bq * g, hd))
        return _online_softmax_out(carry, bq, hq).astype(q.dtype), _online_softmax_lse(carry, bq, hq, scale, softcap)

    blocks, lse = jax.lax.map(query_block, (jnp.arange(nq, dtype=jnp.int32), first, last))  # [nq, B, bq, Hq, ..]
    out = jnp.transpose(blocks, (1, 0, 2, 3, 4)).reshape(b, nq * bq, hq, hd)[:, :c]
    return out, jnp.transpose(lse, (1, 0, 2, 3)).reshape(b, nq * bq, hq)[:, :c]


register_backend("dense", _dense)
register_backend("xla", _blockwise)


def _register_kernel_backends() -> None:
    from psych201_jax.model import kernels as attention_kernels

    attention_kernels.register_all(register_backend)
    register_backend("cpu", _native)
    register_backend("auto", _BACKENDS["xla"])  # a name only: ``attention`` resolves it before dispatch


_register_kernel_backends()
