"""Inputs and the leakage check shared by the attention-backend tests (tests/test_attention_backends.py,
tests/test_cpu_kernel.py): random q/k/v, segment-id rows and the packed-row isolation check."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

F32_ATOL = 1e-5  # measured on CPU (interpret mode): splash <= 1.5e-6, pallas_gpu <= 6e-7


def random_qkv(b, t, hq, hk, hd, seed=0, dtype=jnp.float32):
    """Normal q [b, t, hq, hd], k and v [b, t, hk, hd] from ``seed``."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, h, hd)), dtype) for h in (hq, hk, hk))


def segment_rows(t, rows):
    """int32[B, T] from per-row lists of (segment id, length); id 0 = padding; the rest is padding."""
    seg = np.zeros((len(rows), t), np.int32)
    for r, runs in enumerate(rows):
        pos = 0
        for sid, n in runs:
            seg[r, pos : pos + n] = sid
            pos += n
    return jnp.asarray(seg)


def leakage_check(backend, window, dtype, *, t=256, hq=4, hk=2, hd=128, atol=F32_ATOL):
    """Changing one segment's q/k/v leaves every other segment's outputs bitwise unchanged, and each segment
    alone at the start of its own row gives its packed output."""
    lengths = (70, 100, 50)  # then 36 padding tokens in row 0
    row0 = [(1, lengths[0]), (2, lengths[1]), (3, lengths[2])]
    seg = segment_rows(t, [row0, [(1, 200), (2, 56)], [(0, 10), (4, 246)]])
    fn = jax.jit(functools.partial(backend, sliding_window=window))
    q, k, v = random_qkv(3, t, hq, hk, hd, seed=11, dtype=dtype)
    packed = np.asarray(fn(q, k, v, seg), np.float32)
    assert np.isfinite(packed).all()

    q2, k2, v2 = random_qkv(3, t, hq, hk, hd, seed=12, dtype=dtype)
    middle = np.zeros((3, t), bool)
    middle[0, lengths[0] : lengths[0] + lengths[1]] = True
    mix = lambda a, b: jnp.where(middle[:, :, None, None], b, a)  # noqa: E731
    changed = np.asarray(fn(mix(q, q2), mix(k, k2), mix(v, v2), seg), np.float32)
    np.testing.assert_array_equal(changed[~middle], packed[~middle])
    assert not np.allclose(changed[middle], packed[middle])

    # Alone: segment s at the start of row s (the rest padding), same compiled shape.
    starts = np.cumsum((0,) + lengths[:-1])
    take = lambda x: jnp.stack(
        [
            jnp.pad(x[0, s : s + n], ((0, t - n), (0, 0), (0, 0)))  # noqa: E731
            for s, n in zip(starts, lengths)
        ]
    )
    alone_seg = segment_rows(t, [[(1, n)] for n in lengths])
    alone = np.asarray(fn(take(q), take(k), take(v), alone_seg), np.float32)
    for r, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(
            alone[r, :n], packed[0, s : s + n], atol=atol, rtol=0 if dtype == jnp.float32 else 1e-2
        )  # bf16: tiling order, 1-2 ulp
        assert (alone[r, n:] == 0).all()
