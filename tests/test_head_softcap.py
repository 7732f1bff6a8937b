"""Gemma 2's final-logit soft cap inside the vocabulary-chunked head, and the attention soft cap's backends.

The head caps each chunk's logits before the logsumexp, so every statistic (NLL, argmax, the temperature
grid, entropy, option argmax and option mass) is the one of the capped logits; checked against brute force
over full float64 logits, and shown to differ from the uncapped head (the cap bites). The attention soft cap
runs on "dense", "xla" and the native CPU kernel (each against a plain formula) and on splash (against
"dense", in Pallas interpret mode); Pallas GPU and cuDNN have none: "auto" never picks them with a cap, and
naming one raises one line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psych201_jax.conditions import DEFAULT_TEMPERATURES
from psych201_jax.model import attention as attn_lib
from psych201_jax.model import kernels
from psych201_jax.scoring.head import score_head

CAP = 3.0


def _case(seed=0, c=48, d=32, vocab=777, k=16):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(c, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(vocab, d)) / 2, jnp.float32)  # logits of std ~2.8: the cap of 3 bites
    target = jnp.asarray(rng.integers(0, vocab, c), jnp.int32)
    valid = jnp.asarray(rng.random(c) < 0.8)
    option_ids = jnp.asarray(np.sort(rng.choice(vocab, k, replace=False)), jnp.int32)
    option_mask = jnp.asarray(rng.random((c, k)) < 0.5)
    return h, w, target, valid, option_ids, option_mask


def _brute_force(h, w, target, option_ids, option_mask, cap):
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    if cap is not None:
        logits = np.tanh(logits / cap) * cap
    rows = np.arange(len(logits))

    def lse(z):
        return np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)

    nll_t = np.stack([lse(logits / t) - logits[rows, np.asarray(target)] / t for t in DEFAULT_TEMPERATURES], 1)
    logp = logits - lse(logits)[:, None]
    entropy = -(np.exp(logp) * logp).sum(1)
    mass = np.where(np.asarray(option_mask), np.exp(logp)[:, np.asarray(option_ids)], 0.0).sum(1)
    return logits, lse(logits) - logits[rows, np.asarray(target)], nll_t, entropy, mass


@pytest.mark.parametrize("chunk", [100, 256, 1024])
def test_final_softcap_applies_to_every_head_statistic(chunk):
    h, w, target, valid, option_ids, option_mask = _case()
    c = h.shape[0]
    slot = jnp.arange(c, dtype=jnp.int32)  # one entry per slot: the sums are the per-entry values
    kwargs = dict(vocab_axes=(), axis_sizes={}, vocab_chunk=chunk, temperatures=DEFAULT_TEMPERATURES)
    out = score_head(h, w, target, valid, slot, option_ids, option_mask, softcap=CAP, **kwargs)
    logits, nll, nll_t, entropy, mass = _brute_force(h, w, target, option_ids, option_mask, CAP)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out.nll)[v], nll[v], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.nll_t)[v], nll_t[v], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropy)[v], entropy[v], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.option_mass)[v], mass[v], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.argmax)[v], logits.argmax(1)[v])
    options = np.where(np.asarray(option_mask), logits[:, np.asarray(option_ids)], -np.inf)
    best = np.where(np.isfinite(options).any(1), np.asarray(option_ids)[options.argmax(1)], -1)
    np.testing.assert_array_equal(np.asarray(out.option_argmax)[v], best[v])
    # The cap bites: without it every statistic but the argmaxes (the cap is monotone) moves.
    plain = score_head(h, w, target, valid, slot, option_ids, option_mask, **kwargs)
    for name in ("nll", "nll_t", "entropy", "option_mass"):
        assert np.abs(np.asarray(getattr(plain, name)) - np.asarray(getattr(out, name)))[v].max() > 1e-2, name


def _scores_reference(q, k, v, seg, scale, cap, window=None):
    """Plain float64 attention with the soft cap, for one row of one kv head group."""
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, hd = qf.shape
    g = hq // kf.shape[2]
    kf, vf = np.repeat(kf, g, axis=2), np.repeat(vf, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    s = np.tanh(s / cap) * cap
    i = np.arange(t)
    segs = np.asarray(seg)
    mask = (segs[:, :, None] == segs[:, None, :]) & (segs[:, :, None] != 0) & (i[None, None, :] <= i[None, :, None])
    if window is not None:
        mask &= i[None, None, :] > i[None, :, None] - window
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, vf)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_softcap_dense_xla_cpu_and_attention_at_agree_with_the_formula(window):
    rng = np.random.default_rng(1)
    b, t, hq, hk, hd = 1, 150, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, hd)) * 2, jnp.float32) for h in (hq, hk, hk))
    seg = jnp.asarray(np.r_[np.full(90, 1), np.full(50, 2), np.zeros(10)][None], jnp.int32)
    scale, cap = 24**-0.5, 5.0
    ref = _scores_reference(q, k, v, seg, scale, cap, window)
    real = np.asarray(seg)[0] != 0
    from psych201_jax.model import cpu_kernel

    for backend in ("dense", "xla", "cpu") if cpu_kernel.available() else ("dense", "xla"):
        out = attn_lib.attention(
            q, k, v, seg, sliding_window=window, backend=backend, block_q=64, block_k=32, scale=scale, softcap=cap
        )
        np.testing.assert_allclose(np.asarray(out)[0, real], ref[0, real], atol=2e-5)
        uncapped = attn_lib.attention(q, k, v, seg, sliding_window=window, backend=backend, scale=scale)
        assert np.abs(np.asarray(uncapped) - np.asarray(out))[0, real].max() > 1e-2  # the cap bites
    idx = jnp.asarray(np.arange(0, 140, 7)[None], jnp.int32)
    q_at = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
    q_seg = jnp.take_along_axis(seg, idx, axis=1)
    for backend in ("xla", "cpu") if cpu_kernel.available() else ("xla",):
        at = attn_lib.attention_at(
            q_at, idx, q_seg, k, v, seg, sliding_window=window, backend=backend, block_q=8, scale=scale, softcap=cap
        )
        np.testing.assert_allclose(np.asarray(at)[0], ref[0, np.asarray(idx)[0]], atol=2e-5)


def test_backends_without_the_softcap_fall_back_or_refuse():
    """The native CPU kernel and splash have the cap; "auto" would run "xla" where it resolved to a backend
    without it; naming one (Pallas GPU, cuDNN) raises."""
    assert attn_lib.for_softcap("auto", "cpu", 50.0) == "cpu"
    assert attn_lib.for_softcap("auto", "pallas_gpu", 50.0) == "xla"
    assert attn_lib.for_softcap("splash", "splash", 50.0) == "splash"
    for name in ("pallas_gpu", "cudnn"):
        with pytest.raises(ValueError, match=f"'{name}' has no attention-logit soft cap"):
            attn_lib.for_softcap(name, name, 50.0)
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="'pallas_gpu' has no attention-logit soft cap"):
        kernels.pallas_gpu_attention(q, q, q, seg, softcap=50.0, interpret=True)
    with pytest.raises(ValueError, match="'cudnn' has no attention-logit soft cap"):
        kernels.cudnn_attention(q, q, q, seg, softcap=50.0, _api=object())
    out = jax.jit(lambda q: attn_lib.attention(q, q, q, seg, backend="auto", softcap=50.0))(q)
    assert out.shape == q.shape


def test_splash_interpret_softcap_matches_dense():
    """Splash's own soft cap (attn_logits_soft_cap) on the scaled scores equals ours (Pallas interpret mode)."""
    rng = np.random.default_rng(2)
    t = 256
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, h, 128)), jnp.float32) for h in (2, 1, 1))
    seg = jnp.asarray(np.r_[np.full(200, 1), np.full(56, 2)][None], jnp.int32)
    kwargs = dict(sliding_window=64, scale=0.1, softcap=3.0)
    dense = attn_lib.attention(q, k, v, seg, backend="dense", **kwargs)
    out = kernels.splash_attention(q, k, v, seg, block_q=128, block_kv=128, interpret=True, **kwargs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)


@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_query_pre_attn_scale_on_every_cpu_backend(backend):
    """Gemma's scale (query_pre_attn_scalar**-0.5, not head_dim**-0.5) reaches the native kernel and "xla"."""
    from psych201_jax.model import cpu_kernel

    if backend == "cpu" and not cpu_kernel.available():
        pytest.skip(f"native CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
    rng = np.random.default_rng(3)
    t = 96
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, h, 32)), jnp.float32) for h in (4, 2, 2))
    seg = jnp.asarray(np.r_[np.full(60, 1), np.full(30, 2), np.zeros(6)][None], jnp.int32)
    scale = 24**-0.5
    dense = np.asarray(attn_lib.attention(q, k, v, seg, sliding_window=16, backend="dense", scale=scale))
    out = np.asarray(attn_lib.attention(q, k, v, seg, sliding_window=16, backend=backend, scale=scale))
    np.testing.assert_allclose(out, dense, atol=2e-5)
    default = np.asarray(attn_lib.attention(q, k, v, seg, sliding_window=16, backend=backend))
    assert np.abs(default - dense).max() > 1e-3  # the scale is not head_dim's
    idx = jnp.asarray(np.arange(0, 90, 5)[None], jnp.int32)
    at = attn_lib.attention_at(
        jnp.take_along_axis(q, idx[:, :, None, None], axis=1),
        idx,
        jnp.take_along_axis(seg, idx, axis=1),
        k,
        v,
        seg,
        sliding_window=16,
        backend=backend,
        scale=scale,
    )
    np.testing.assert_allclose(np.asarray(at)[0], dense[0, np.asarray(idx)[0]], atol=2e-5)
