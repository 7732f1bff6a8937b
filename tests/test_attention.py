"""Segment-aware attention: blockwise == dense, segment isolation, windows, padding, memory shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psych201_jax.model import attention as attn_lib
from psych201_jax.model.attention import attention


def _qkv(b, t, hq, hk, hd, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, hd)), dtype) for h in (hq, hk, hk))
    return q, k, v


def _packed_segments(b, t, lengths_per_row):
    """int32[B, T] with contiguous segments 1, 2, ... of the given lengths, 0 after them."""
    seg = np.zeros((b, t), np.int32)
    for row, lengths in enumerate(lengths_per_row):
        pos = 0
        for i, n in enumerate(lengths):
            seg[row, pos : pos + n] = i + 1
            pos += n
    return jnp.asarray(seg)


SEGMENTS = [(40, 90, 3, 60), (200,), (1, 1, 150)]  # row 0 padded after 193, row 1 after 200, row 2 after 152


@pytest.mark.parametrize("hq,hk,window", [(4, 4, None), (4, 2, 7), (4, 1, 64), (4, 2, 1), (4, 1, None), (4, 4, 300)])
def test_blockwise_matches_dense(hq, hk, window):
    t = 203  # not a multiple of the blocks
    q, k, v = _qkv(3, t, hq, hk, 16)
    seg = _packed_segments(3, t, SEGMENTS)
    dense = attention(q, k, v, seg, sliding_window=window, backend="dense")
    for bq, bk in [(32, 32), (64, 16), (512, 512)]:
        xla = attention(q, k, v, seg, sliding_window=window, backend="xla", block_q=bq, block_k=bk)
        np.testing.assert_allclose(np.asarray(xla), np.asarray(dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 100, 300])
def test_interior_key_blocks_are_wholly_visible(window):
    """The key blocks the xla backend runs without a mask are visible to every query of their query block,
    in every row; long segments do have such blocks; and the output still equals dense."""
    t, bq, bk = 203, 32, 16
    seg = _packed_segments(3, t, [(150, 53), (203,), (7, 196)])
    nq = -(-t // bq)
    first, last = attn_lib._key_block_ranges(seg, t, bq, bk, nq, window)
    lo, hi = (np.asarray(x) for x in attn_lib._interior_ranges(seg, t, bq, bk, nq, window, first, last))
    idx = jnp.arange(t)
    mask = np.asarray(attn_lib._visible(idx, idx, seg, seg, window))  # [B, T, T]
    n_interior = 0
    for i in range(nq):
        for j in range(lo[i], hi[i] + 1):
            assert first[i] <= j <= last[i]
            assert mask[:, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].all(), (i, j)
            n_interior += 1
    assert n_interior >= 5
    q, k, v = _qkv(3, t, 4, 2, 16)
    xla = attention(q, k, v, seg, sliding_window=window, backend="xla", block_q=bq, block_k=bk)
    dense = attention(q, k, v, seg, sliding_window=window, backend="dense")
    np.testing.assert_allclose(np.asarray(xla), np.asarray(dense), atol=1e-5, rtol=0)


def _naive(q, k, v, window):
    """Single segment, plain numpy loops: the definition of causal (windowed) attention with GQA."""
    q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    t, hq, hd = q.shape
    g = hq // k.shape[1]
    out = np.zeros_like(q)
    for i in range(t):
        lo = 0 if window is None else max(0, i - window + 1)
        for h in range(hq):
            s = k[lo : i + 1, h // g] @ q[i, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[lo : i + 1, h // g]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_dense_matches_definition(window):
    q, k, v = _qkv(1, 37, 4, 2, 8, seed=3)
    seg = jnp.ones((1, 37), jnp.int32)
    for backend in ("dense", "xla"):
        out = attention(q, k, v, seg, sliding_window=window, backend=backend, block_q=16, block_k=8)
        np.testing.assert_allclose(np.asarray(out)[0], _naive(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "xla"])
@pytest.mark.parametrize("window", [None, 16])
def test_segments_are_isolated(backend, window):
    t, lengths = 160, (50, 70, 40)
    q, k, v = _qkv(1, t, 4, 2, 16, seed=1)
    seg = _packed_segments(1, t, [lengths])
    kwargs = dict(sliding_window=window, backend=backend, block_q=32, block_k=32)
    packed = np.asarray(attention(q, k, v, seg, **kwargs))

    # Changing everything in segment 1 must not change segments 2 and 3.
    q2, k2, v2 = _qkv(1, t, 4, 2, 16, seed=2)
    first = np.arange(t) < lengths[0]
    mix = lambda a, b: jnp.where(first[None, :, None, None], b, a)  # noqa: E731
    changed = np.asarray(attention(mix(q, q2), mix(k, k2), mix(v, v2), seg, **kwargs))
    np.testing.assert_array_equal(changed[:, lengths[0] :], packed[:, lengths[0] :])
    assert not np.allclose(changed[:, : lengths[0]], packed[:, : lengths[0]])

    # Each segment alone (its own row, one segment) gives the same output as packed.
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = attention(q[:, sl], k[:, sl], v[:, sl], jnp.ones((1, n), jnp.int32), **kwargs)
        np.testing.assert_allclose(np.asarray(alone), packed[:, sl], atol=1e-5)
        start += n


@pytest.mark.parametrize("backend", ["dense", "xla"])
def test_padding_is_finite_zero(backend):
    q, k, v = _qkv(2, 64, 2, 1, 8)
    seg = jnp.asarray(np.array([[0] * 10 + [1] * 30 + [0] * 24, [0] * 64], np.int32))
    out = np.asarray(attention(q, k, v, seg, backend=backend, block_q=16, block_k=16))
    assert np.isfinite(out).all()
    assert (out[0, :10] == 0).all() and (out[0, 40:] == 0).all() and (out[1] == 0).all()
    assert np.abs(out[0, 10:40]).sum() > 0


def test_bfloat16_inputs():
    q, k, v = _qkv(2, 100, 4, 2, 16, dtype=jnp.bfloat16)
    seg = _packed_segments(2, 100, [(30, 70), (100,)])
    xla = attention(q, k, v, seg, sliding_window=20, block_q=32, block_k=32)
    dense = attention(q, k, v, seg, sliding_window=20, backend="dense")
    assert xla.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(xla, np.float32), np.asarray(dense, np.float32), atol=2e-2)


def _largest_intermediate(jaxpr) -> int:
    """Largest number of elements of any value produced inside ``jaxpr`` (nested jaxprs included)."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    largest = max(largest, _largest_intermediate(sub))
    return largest


def test_blockwise_never_builds_a_full_score_matrix():
    t, block = 4096, 256
    q, k, v = (jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32) for _ in range(3))
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    fn = lambda q, k, v, s: attention(q, k, v, s, block_q=block, block_k=block)  # noqa: E731
    largest = _largest_intermediate(jax.make_jaxpr(fn)(q, k, v, seg).jaxpr)
    assert largest < t * t // 8, largest  # one [B, Hk, G, block, block] tile is 2 * 256 * 256


def test_unknown_backend_and_registry():
    q, k, v = _qkv(1, 8, 2, 2, 4)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="available"):
        attention(q, k, v, seg, backend="nope")
    attn_lib.register_backend("test_dense_alias", attn_lib._BACKENDS["dense"])
    assert "test_dense_alias" in attn_lib.available_backends()
    np.testing.assert_array_equal(
        np.asarray(attention(q, k, v, seg, backend="test_dense_alias")),
        np.asarray(attention(q, k, v, seg, backend="dense")),
    )
    del attn_lib._BACKENDS["test_dense_alias"]


@pytest.mark.parametrize("hq,hk,window", [(4, 2, None), (4, 1, 7), (4, 4, 64)])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_attention_at_equals_dense_at_the_queries(hq, hk, window, order):
    """Queries at chosen positions of two groups of rows (flattened) give the dense attention's rows there,
    for sorted (the scoring plan's order) and shuffled positions; padding queries give 0 and, however far
    they point, change nothing."""
    b, t, groups = 4, 203, 2
    rows = b // groups
    q, k, v = _qkv(b, t, hq, hk, 16, seed=3)
    seg = _packed_segments(b, t, SEGMENTS + [(120, 83)])
    dense = np.asarray(attention(q, k, v, seg, sliding_window=window, backend="dense"))
    rng = np.random.default_rng(4)
    flat_seg = np.where(np.asarray(seg) > 0, np.asarray(seg) + (np.arange(b) % rows)[:, None] * t, 0)
    flat_seg = flat_seg.reshape(groups, rows * t)
    index = np.stack([np.sort(rng.choice(rows * t, 90, replace=False)) for _ in range(groups)])
    if order == "shuffled":
        index = rng.permuted(index, axis=1)
    valid = rng.random(index.shape) < 0.9
    q_seg = np.where(valid, np.take_along_axis(flat_seg, index, axis=1), 0)
    flat = lambda x: jnp.asarray(x).reshape(groups, rows * t, *x.shape[2:])  # noqa: E731
    q_at = jnp.take_along_axis(flat(q), jnp.asarray(index)[..., None, None], axis=1)
    got = attn_lib.attention_at(
        q_at,
        jnp.asarray(index),
        jnp.asarray(q_seg),
        flat(k),
        flat(v),
        jnp.asarray(flat_seg),
        sliding_window=window,
        block_q=32,
        block_k=16,
    )
    want = np.take_along_axis(np.asarray(flat(dense)), index[..., None, None], axis=1)
    want = np.where(valid[..., None, None], want, 0.0)  # padding queries (and padding positions) are 0
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    assert np.abs(want).sum() > 0
