"""Accelerator attention backends for ``psych201_jax.model.attention``; every one honours segment ids.

Each backend implements exactly the semantics of ``attention.py`` (same nonzero segment, causal, optional
sliding window ``i - W < j <= i``, the given scale (default head_dim**-0.5), float32 softmax statistics,
output in q's dtype, padding queries zero) on top of a vendor kernel. Only splash has the attention-logit
soft cap (its ``attn_logits_soft_cap``); Pallas GPU and cuDNN raise when asked for one:

``splash``      TPU. Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) with
                ``SegmentIds(q=segment_ids, kv=segment_ids)``, ``CausalMask`` or, with a window,
                ``LocalMask(window_size=(W - 1, 0))`` (which is causal as well), one per query head in a
                ``MultiHeadMask``. GQA natively (the MHA kernel maps query head h to kv head h // G, HF
                ``repeat_kv`` order). The kernel is per example, so it is vmapped over the batch. Blocks are
                skipped by the static causal/window structure only; blocks that hold only other segments
                are computed and masked (the segment mask is data, not structure).
``pallas_gpu``  GPU. Pallas Triton ``jax.experimental.pallas.ops.gpu.attention.mha`` with
                ``segment_ids`` and ``causal=True``. It has no sliding window: asking for one raises a
                ``ValueError`` (never full attention in silence). GQA by repeating kv heads. Key blocks are
                skipped only above the diagonal.
``cudnn``       GPU (Hopper or newer for packing). The private
                ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` with sequence packing:
                per row, the start offset and length of each segment (``segment_offsets``), padded to a static
                ``max_segments`` (default 64) with -1, ``mask_type=PADDING_CAUSAL`` and
                ``sliding_window_length=W``. bf16/fp16 inputs only (a float32 call raises). A row with more
                segments than ``max_segments`` raises eagerly and, under ``jax.jit``, turns that row's output
                into NaN, so an overflow can never drop a participant in silence. Registered only where the
                private API takes ``q_offsets``/``kv_offsets`` (jax >= 0.5, PR #25812).

The registered instances use safe defaults; other settings are registered under a name of one's own, e.g.
``attention.register_backend("cudnn", make_cudnn_backend(max_segments=256))``. Kernel backends ignore the
``block_q``/``block_k`` arguments of ``attention()`` (those are the ``xla`` tile sizes); their block sizes
are set by the factories. They are forward-only (the scorer never differentiates attention). Outside their
platform they raise a ``ValueError`` that names the backend; the ``interpret=True`` factories run the same
kernels in Pallas interpret mode on any platform (tests on CPU).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

LANES = 128  # splash blocks must be multiples of the TPU lane width


def _platform() -> str:
    return jax.default_backend()


def _require_platform(backend: str, wanted: str) -> None:
    if _platform() != wanted:
        raise ValueError(
            f"attention backend {backend!r} runs only on {wanted.upper()} (this process runs on "
            f"{_platform()!r}); use 'xla' here, or the interpret=True factory for tests"
        )


def require_no_softcap(backend: str, softcap: float | None) -> None:
    """A one-line ValueError where a backend without the attention-logit soft cap is asked for one."""
    if softcap is not None:
        raise ValueError(
            f"attention backend {backend!r} has no attention-logit soft cap (Gemma 2's attn_logit_softcapping="
            f"{softcap}); use 'xla' or 'auto'"
        )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_time(x: jnp.ndarray, t_to: int) -> jnp.ndarray:
    """Pads axis 1 (time) with zeros up to ``t_to``; padded tokens get segment id 0."""
    t = x.shape[1]
    if t_to == t:
        return x
    return jnp.pad(x, ((0, 0), (0, t_to - t)) + ((0, 0),) * (x.ndim - 2))


def _zero_padding(out: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Padding queries (segment 0) output zeros, whatever the kernel left there (NaN-safe)."""
    return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


# ----------------------------------------------------------------------------------------------- splash (TPU)


@functools.lru_cache(maxsize=64)
def _splash_kernel(
    t: int,
    num_q_heads: int,
    sliding_window: int | None,
    block_q: int,
    block_kv: int,
    block_kv_compute: int,
    interpret: bool,
    softcap: float | None = None,
):
    """Builds (once per shape) a single-device splash MHA kernel; its mask metadata is concrete, so the
    cached kernel can be closed over by any later trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if sliding_window is None:
        head_mask: sa.Mask = sa.CausalMask(shape=(t, t))
    else:
        head_mask = sa.LocalMask(shape=(t, t), window_size=(sliding_window - 1, 0), offset=0)
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv_compute)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(
            sa.MultiHeadMask([head_mask] * num_q_heads),
            block_sizes=blocks,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
            attn_logits_soft_cap=softcap,
        )


def _splash_blocks(t: int, block_q: int, block_kv: int, block_kv_compute: int | None):
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        if b <= 0 or b % LANES:
            raise ValueError(f"attention backend 'splash': {name}={b} must be a positive multiple of {LANES}")
    t_min = _round_up(t, LANES)
    bq, bkv = min(block_q, t_min), min(block_kv, t_min)
    bkv_c = bkv if block_kv_compute is None else min(block_kv_compute, bkv)
    if bkv % bkv_c or bkv_c % LANES:
        raise ValueError(
            f"attention backend 'splash': block_kv_compute={bkv_c} must be a multiple of {LANES} "
            f"dividing block_kv={bkv}"
        )
    return bq, bkv, bkv_c, _round_up(t, math.lcm(bq, bkv))


def splash_attention(
    q,
    k,
    v,
    segment_ids,
    *,
    sliding_window=None,
    block_q: int = 512,
    block_kv: int = 512,
    block_kv_compute: int | None = None,
    interpret: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
):
    """TPU splash attention with segment ids; shapes and semantics of ``attention.attention``."""
    if not interpret:
        _require_platform("splash", "tpu")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"attention backend 'splash': sliding_window must be >= 1, got {sliding_window}")
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    t, hq, hd = q.shape[1:]
    bq, bkv, bkv_c, tp = _splash_blocks(t, block_q, block_kv, block_kv_compute)
    kernel = _splash_kernel(tp, hq, sliding_window, bq, bkv, bkv_c, interpret, softcap)
    # splash applies no softmax scale: scale q (in float32, then back to its dtype) as MaxText does; its soft
    # cap then bounds the scaled scores, as HF's does.
    qs = (q.astype(jnp.float32) * (hd**-0.5 if scale is None else scale)).astype(q.dtype)
    heads_first = lambda x: jnp.swapaxes(_pad_time(x, tp), 1, 2)  # noqa: E731  [B, H, Tp, hd]
    seg = _pad_time(segment_ids.astype(jnp.int32), tp)

    def one_example(q1, k1, v1, s1):
        return kernel(q1, k1, v1, sa.SegmentIds(q=s1, kv=s1))

    out = jax.vmap(one_example)(heads_first(qs), heads_first(k), heads_first(v), seg)  # [B, Hq, Tp, hd]
    out = jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)
    return _zero_padding(out, segment_ids)


def make_splash_backend(
    *, block_q: int = 512, block_kv: int = 512, block_kv_compute: int | None = None, interpret: bool = False
):
    """``attention`` backend: splash with the given blocks (multiples of 128; clipped to the row)."""

    def backend(q, k, v, segment_ids, *, sliding_window, scale=None, softcap=None):
        return splash_attention(
            q,
            k,
            v,
            segment_ids,
            sliding_window=sliding_window,
            block_q=block_q,
            block_kv=block_kv,
            block_kv_compute=block_kv_compute,
            interpret=interpret,
            scale=scale,
            softcap=softcap,
        )

    return _as_backend(backend)


# ------------------------------------------------------------------------------------ Pallas Triton (GPU)


def pallas_gpu_attention(
    q,
    k,
    v,
    segment_ids,
    *,
    sliding_window=None,
    block_q: int = 128,
    block_k: int = 128,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
):
    """GPU Pallas (Triton) flash attention with segment ids; no sliding window, no soft cap."""
    require_no_softcap("pallas_gpu", softcap)
    if sliding_window is not None:
        raise ValueError(
            f"attention backend 'pallas_gpu' has no sliding window (sliding_window="
            f"{sliding_window} requested, e.g. an OLMo 3 sliding layer); use 'cudnn' or 'xla'"
        )
    if not interpret:
        _require_platform("pallas_gpu", "gpu")
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    t, hq, hd = q.shape[1:]
    g = hq // k.shape[2]
    if g > 1:  # GQA: query head h uses kv head h // g
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    tp = _round_up(t, math.lcm(block_q, block_k))
    bq, bk = min(block_q, tp), min(block_k, tp)
    seg = _pad_time(segment_ids.astype(jnp.int32), tp)
    out = gpu_attention.mha(
        _pad_time(q, tp),
        _pad_time(k, tp),
        _pad_time(v, tp),
        seg,
        sm_scale=hd**-0.5 if scale is None else scale,
        causal=True,
        block_sizes=gpu_attention.BlockSizes(block_q=bq, block_k=bk),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    return _zero_padding(out[:, :t].astype(q.dtype), segment_ids)


def make_pallas_gpu_backend(
    *,
    block_q: int = 128,
    block_k: int = 128,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
):
    def backend(q, k, v, segment_ids, *, sliding_window, scale=None, softcap=None):
        return pallas_gpu_attention(
            q,
            k,
            v,
            segment_ids,
            sliding_window=sliding_window,
            block_q=block_q,
            block_k=block_k,
            num_warps=num_warps,
            num_stages=num_stages,
            interpret=interpret,
            scale=scale,
            softcap=softcap,
        )

    return _as_backend(backend)


# ------------------------------------------------------------------------------------------ cuDNN (GPU)


def _segment_edges(seg):
    """First and last token of every maximal run of one nonzero id: bool[B, T] each."""
    real = seg != 0
    before = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    after = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    return real & (seg != before), real & (seg != after)


def segment_offsets(segment_ids: jnp.ndarray, max_segments: int):
    """Packed-layout metadata of cuDNN's fused attention from segment ids [B, T].

    A segment is a maximal run of one nonzero id. Returns ``offsets`` int32[B, M + 1] (start index of each
    segment within its row, then -1), ``lengths`` int32[B, M] (-1 past the row's last segment) and
    ``overflow`` bool[B] (the row has more than M = ``max_segments`` segments; those past M are missing
    from ``offsets``/``lengths``). This is the format documented in
    ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` (q_offsets/q_seqlen).
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    b = seg.shape[0]
    is_start, is_end = _segment_edges(seg)
    first_m = lambda m: jnp.nonzero(m, size=max_segments, fill_value=-1)[0].astype(jnp.int32)  # noqa: E731
    starts, ends = jax.vmap(first_m)(is_start), jax.vmap(first_m)(is_end)
    lengths = jnp.where(starts >= 0, ends - starts + 1, -1).astype(jnp.int32)
    offsets = jnp.concatenate([starts, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    overflow = jnp.sum(is_start, axis=1) > max_segments
    return offsets, lengths, overflow


def _cudnn_api():
    """The private packed cuDNN attention and its MaskType, or None where it lacks sequence packing."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None
    fn = getattr(fa, "dot_product_attention", None)
    mask_type = getattr(getattr(fa, "MaskType", None), "PADDING_CAUSAL", None)
    if fn is None or mask_type is None:
        return None
    params = inspect.signature(fn).parameters
    needed = (
        "q_seqlen",
        "kv_seqlen",
        "q_offsets",
        "kv_offsets",
        "scale",
        "mask_type",
        "qkv_layout",
        "sliding_window_length",
    )
    if not all(p in params for p in needed):
        return None
    return fn, mask_type


def cudnn_available() -> bool:
    """The private packed cuDNN API exists in this jax (says nothing about the hardware)."""
    return _cudnn_api() is not None


def cudnn_attention(
    q,
    k,
    v,
    segment_ids,
    *,
    sliding_window=None,
    max_segments: int = 64,
    repeat_kv: bool = False,
    _api=None,
    scale: float | None = None,
    softcap: float | None = None,
):
    """cuDNN flash attention with sequence packing (offsets + lengths derived from segment ids); no soft cap.

    GQA is passed to cuDNN as is (it takes fewer kv heads); ``repeat_kv=True`` repeats them instead."""
    require_no_softcap("cudnn", softcap)
    api = _api or _cudnn_api()
    if api is None:
        raise ValueError(
            "attention backend 'cudnn': this jax has no packed cuDNN attention "
            "(jax._src.cudnn.fused_attention_stablehlo.dot_product_attention with q_offsets)"
        )
    if _api is None:
        _require_platform("cudnn", "gpu")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention backend 'cudnn' takes bfloat16/float16 only, got {q.dtype}; "
            "use 'xla' or 'pallas_gpu' for float32"
        )
    if max_segments < 2:
        raise ValueError("attention backend 'cudnn': max_segments must be >= 2 (packed layout)")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"attention backend 'cudnn': sliding_window must be >= 1, got {sliding_window}")
    fn, padding_causal = api
    offsets, lengths, overflow = segment_offsets(segment_ids, max_segments)
    try:
        concrete_overflow = np.asarray(overflow)  # eager call: check now
    except jax.errors.TracerArrayConversionError:  # under jit: the NaN rows below
        concrete_overflow = None
    if concrete_overflow is not None and concrete_overflow.any():
        n = int(jnp.max(jnp.sum(_segment_edges(jnp.asarray(segment_ids, jnp.int32))[0], axis=1)))
        raise ValueError(
            f"attention backend 'cudnn': a row has {n} segments > max_segments={max_segments}; "
            "register make_cudnn_backend(max_segments=...) with a larger bound"
        )
    hq, hd = q.shape[2], q.shape[3]
    if repeat_kv and hq != k.shape[2]:
        k, v = jnp.repeat(k, hq // k.shape[2], axis=2), jnp.repeat(v, hq // k.shape[2], axis=2)
    out = fn(
        q,
        k,
        v,
        q_seqlen=lengths,
        kv_seqlen=lengths,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=hd**-0.5 if scale is None else scale,
        mask_type=padding_causal,
        qkv_layout="BTNH",
        sliding_window_length=sliding_window,
    )
    out = _zero_padding(out.astype(q.dtype), segment_ids)
    return jnp.where(overflow[:, None, None, None], jnp.array(jnp.nan, out.dtype), out)


def make_cudnn_backend(*, max_segments: int = 64, repeat_kv: bool = False, _api=None):
    def backend(q, k, v, segment_ids, *, sliding_window, scale=None, softcap=None):
        return cudnn_attention(
            q,
            k,
            v,
            segment_ids,
            sliding_window=sliding_window,
            max_segments=max_segments,
            repeat_kv=repeat_kv,
            _api=_api,
            scale=scale,
            softcap=softcap,
        )

    return _as_backend(backend)


# ------------------------------------------------------------------------------------------ registration


def _as_backend(fn):
    """Adapts to ``fn(q, k, v, segment_ids, *, sliding_window, block_q, block_k, scale, softcap)``."""

    @functools.wraps(fn)
    def backend(q, k, v, segment_ids, *, sliding_window=None, block_q=None, block_k=None, scale=None, softcap=None):
        del block_q, block_k  # the xla tile sizes; kernel blocks come from the factory
        return fn(q, k, v, segment_ids, sliding_window=sliding_window, scale=scale, softcap=softcap)

    return backend


PLATFORM_OF = {"splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu", "cpu": "cpu"}


def register_all(register) -> None:
    """Registers the kernel backends with ``register(name, fn)`` (``attention.register_backend``)."""
    register("splash", make_splash_backend())
    register("pallas_gpu", make_pallas_gpu_backend())
    if cudnn_available():
        register("cudnn", make_cudnn_backend())


def runnable_backends(registered) -> tuple[str, ...]:
    """The names in ``registered`` that can run on this process's platform."""
    return tuple(n for n in registered if PLATFORM_OF.get(n, _platform()) == _platform())
