"""Accelerator attention backends (psych201_jax/model/kernels.py) against the dense reference.

On CPU: splash (TPU) and the Pallas GPU kernel run in Pallas interpret mode; the cuDNN wrapper runs over an
emulator of the private packed-attention contract (offsets + lengths per row), which checks the derivation
of offsets/lengths from segment ids and the wrapper's handling of padding, overflow, window and dtype.
On a TPU / GPU (``JAX_PLATFORMS=tpu`` / ``JAX_PLATFORMS=cuda``) the real kernels run the same parity and
leakage checks at longer rows; elsewhere those tests skip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psych201_jax.model import attention as attn_lib
from psych201_jax.model import kernels as ak
from psych201_jax.model.attention import attention
from psych201_jax.testing.attention import F32_ATOL, leakage_check, random_qkv, segment_rows

PLATFORM = jax.default_backend()
BF16_ATOL = 2e-2


def _close(out, ref, atol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    err = float(np.abs(out - ref).max())
    assert err <= atol, err
    return err


# ------------------------------------------------------------------------------------------ cuDNN emulator

PADDING_CAUSAL = "PADDING_CAUSAL"


def _emulated_cudnn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    q_seqlen=None,
    kv_seqlen=None,
    q_offsets=None,
    kv_offsets=None,
    *,
    scale,
    mask_type,
    qkv_layout,
    sliding_window_length,
):
    """The documented contract of jax._src.cudnn.fused_attention_stablehlo.dot_product_attention with
    sequence packing: per row, segment m covers [q_offsets[b, m], q_offsets[b, m] + q_seqlen[b, m]); -1
    entries are unused; attention is causal within each segment with the window (pos - W, pos]. Tokens
    outside every segment, or inside two, come back as NaN (cuDNN leaves them undefined)."""
    assert bias is None and mask is None and qkv_layout == "BTNH" and mask_type == PADDING_CAUSAL
    assert query.dtype in (jnp.bfloat16, jnp.float16) and key.dtype == value.dtype == query.dtype
    b, t, _, hd = query.shape
    assert abs(scale - hd**-0.5) < 1e-12
    m = q_seqlen.shape[1]
    for x, shape in ((q_seqlen, (b, m)), (kv_seqlen, (b, m)), (q_offsets, (b, m + 1)), (kv_offsets, (b, m + 1))):
        assert x.dtype == jnp.int32 and x.shape == shape
    assert q_offsets is kv_offsets and q_seqlen is kv_seqlen  # self-attention: one packing for q and kv
    off, ln, idx = q_offsets[:, :-1], q_seqlen, jnp.arange(t)
    inside = ((off >= 0) & (ln >= 0))[:, :, None] & (idx >= off[:, :, None]) & (idx < (off + ln)[:, :, None])
    seg = jnp.max(jnp.where(inside, jnp.arange(1, m + 1)[None, :, None], 0), axis=1).astype(jnp.int32)
    out = attn_lib._dense(query, key, value, seg, sliding_window=sliding_window_length, block_q=0, block_k=0)
    defined = (seg != 0) & (jnp.sum(inside, axis=1) == 1)  # overlapping segments: undefined, NaN too
    return jnp.where(defined[:, :, None, None], out, jnp.nan)


EMULATED_CUDNN = (_emulated_cudnn, PADDING_CAUSAL)

# ------------------------------------------------------------------------------------------ CPU backends

# name -> (backend fn, dtype and head_dim it is tested in)
CPU_BACKENDS = {
    "splash_interpret": (ak.make_splash_backend(block_q=128, block_kv=128, interpret=True), jnp.float32, 128),
    "pallas_gpu_interpret": (ak.make_pallas_gpu_backend(block_q=64, block_k=64, interpret=True), jnp.float32, 64),
    "cudnn_emulated": (ak.make_cudnn_backend(max_segments=4, _api=EMULATED_CUDNN), jnp.bfloat16, 32),
}


@pytest.mark.parametrize(
    "t,hq,hk,window",
    [(256, 2, 2, None), (256, 4, 2, None), (256, 2, 2, 64), (256, 4, 2, 64), (512, 2, 2, None), (512, 4, 2, 64)],
)
def test_splash_interpret_matches_dense(t, hq, hk, window):
    q, k, v = random_qkv(2, t, hq, hk, 128, seed=t + hq)
    n = t // 8
    seg = segment_rows(
        t, [[(1, 3 * n), (2, n), (3, 1), (4, 2 * n - 1), (0, 2 * n)], [(0, 5), (1, n), (2, 4 * n), (3, 3 * n - 5)]]
    )
    dense = attention(q, k, v, seg, sliding_window=window, backend="dense")
    blocks = (128, 128) if t == 256 else (256, 128)
    fn = jax.jit(
        functools.partial(
            ak.splash_attention, sliding_window=window, block_q=blocks[0], block_kv=blocks[1], interpret=True
        )
    )
    out = fn(q, k, v, seg)
    assert out.dtype == q.dtype and out.shape == q.shape
    _close(out, dense, F32_ATOL)
    assert (np.asarray(out)[np.asarray(seg) == 0] == 0).all()


def test_splash_interpret_odd_length_bf16_and_vmap():
    t = 203  # padded to 256 inside the backend
    q, k, v = random_qkv(2, t, 4, 2, 128, seed=5, dtype=jnp.bfloat16)
    seg = segment_rows(t, [[(0, 7), (1, 90), (2, 60), (3, 40)], [(1, 150), (2, 53)]])
    backend = CPU_BACKENDS["splash_interpret"][0]
    dense = attention(q, k, v, seg, sliding_window=32, backend="dense")
    out = jax.jit(functools.partial(backend, sliding_window=32))(q, k, v, seg)
    assert out.dtype == jnp.bfloat16
    _close(out, dense, BF16_ATOL)
    # Batched by an outer vmap (one row per mapped example) gives the same numbers.
    per_row = jax.vmap(lambda a, b, c, s: backend(a[None], b[None], c[None], s[None], sliding_window=32)[0])
    np.testing.assert_array_equal(np.asarray(jax.jit(per_row)(q, k, v, seg), np.float32), np.asarray(out, np.float32))


@pytest.mark.parametrize("t,hq,hk", [(256, 2, 2), (256, 4, 2), (203, 4, 1)])
def test_pallas_gpu_interpret_matches_dense(t, hq, hk):
    q, k, v = random_qkv(2, t, hq, hk, 64, seed=t + hq + hk)
    seg = segment_rows(t, [[(1, 100), (2, 1), (3, 70), (0, t - 171)], [(0, 3), (1, 60), (2, t - 63)]])
    dense = attention(q, k, v, seg, backend="dense")
    out = jax.jit(functools.partial(ak.pallas_gpu_attention, block_q=64, block_k=32, interpret=True))(q, k, v, seg)
    assert out.dtype == q.dtype and out.shape == q.shape
    _close(out, dense, F32_ATOL)
    assert (np.asarray(out)[np.asarray(seg) == 0] == 0).all()


def test_pallas_gpu_refuses_a_sliding_window():
    q, k, v = random_qkv(1, 128, 2, 2, 64)
    seg = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="'pallas_gpu' has no sliding window"):
        ak.pallas_gpu_attention(q, k, v, seg, sliding_window=64, interpret=True)
    with pytest.raises(ValueError, match="pallas_gpu"):
        attention(q, k, v, seg, sliding_window=64, backend="pallas_gpu")


def test_registered_kernels_refuse_the_wrong_platform_and_unknown_names():
    q, k, v = random_qkv(1, 128, 2, 2, 64, dtype=jnp.bfloat16)
    seg = jnp.ones((1, 128), jnp.int32)
    assert {"splash", "pallas_gpu"} <= set(attn_lib.available_backends())
    assert set(attn_lib.runnable_backends()) >= {"dense", "xla"}
    wanted = {"splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}
    for name in ("splash", "pallas_gpu", "cudnn"):
        if name not in attn_lib.available_backends() or wanted[name] == PLATFORM:
            continue
        assert name not in attn_lib.runnable_backends()
        with pytest.raises(ValueError, match=f"'{name}' runs only on {wanted[name].upper()}"):
            attention(q, k, v, seg, backend=name)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, seg, backend="flash")


# ------------------------------------------------------------------------------------------ cuDNN wrapper


def _offsets_reference(seg_row, m):
    """Plain-Python maximal runs of nonzero ids -> (offsets[m + 1], lengths[m], overflow)."""
    runs, i, t = [], 0, len(seg_row)
    while i < t:
        j = i
        while j + 1 < t and seg_row[j + 1] == seg_row[i]:
            j += 1
        if seg_row[i] != 0:
            runs.append((i, j - i + 1))
        i = j + 1
    kept = runs[:m]
    offsets = [r[0] for r in kept] + [-1] * (m + 1 - len(kept))
    lengths = [r[1] for r in kept] + [-1] * (m - len(kept))
    return offsets, lengths, len(runs) > m


def test_segment_offsets_examples_and_random_rows():
    seg = segment_rows(
        12,
        [
            [(1, 3), (2, 4), (3, 5)],
            [(0, 2), (1, 1), (0, 3), (2, 6)],
            [(0, 12)],
            [(7, 12)],
            [(1, 1), (2, 1), (3, 1), (4, 1), (0, 8)],
        ],
    )
    offsets, lengths, overflow = ak.segment_offsets(seg, 3)
    assert offsets.dtype == lengths.dtype == jnp.int32
    np.testing.assert_array_equal(
        np.asarray(offsets), [[0, 3, 7, -1], [2, 6, -1, -1], [-1, -1, -1, -1], [0, -1, -1, -1], [0, 1, 2, -1]]
    )
    np.testing.assert_array_equal(np.asarray(lengths), [[3, 4, 5], [1, 6, -1], [-1, -1, -1], [12, -1, -1], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(overflow), [False, False, False, False, True])

    rng = np.random.default_rng(0)
    rows = rng.choice(4, size=(32, 40), p=[0.4, 0.2, 0.2, 0.2]).astype(np.int32)
    rows = np.where(rng.random((32, 40)) < 0.7, np.roll(rows, 1, axis=1), rows)  # longer runs
    for m in (2, 40):
        got = [np.asarray(x) for x in jax.jit(ak.segment_offsets, static_argnums=1)(jnp.asarray(rows), m)]
        for r, row in enumerate(rows):
            off, ln, over = _offsets_reference(row.tolist(), m)
            assert got[0][r].tolist() == off and got[1][r].tolist() == ln and bool(got[2][r]) == over


@pytest.mark.parametrize("hq,hk,window", [(4, 2, None), (4, 1, 7)])
def test_cudnn_wrapper_on_emulated_kernel(hq, hk, window):
    t = 160
    q, k, v = random_qkv(2, t, hq, hk, 16, seed=hq + hk, dtype=jnp.bfloat16)
    seg = segment_rows(t, [[(0, 4), (1, 50), (2, 1), (3, 60), (0, 45)], [(5, 100), (9, 60)]])
    backend = ak.make_cudnn_backend(max_segments=3, _api=EMULATED_CUDNN)
    out = jax.jit(functools.partial(backend, sliding_window=window))(q, k, v, seg)
    dense = attention(q, k, v, seg, sliding_window=window, backend="dense")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(dense, np.float32))


def test_cudnn_wrapper_refuses_float32_and_overflow():
    t = 64
    q, k, v = random_qkv(1, t, 2, 2, 16, dtype=jnp.bfloat16)
    seg = segment_rows(t, [[(1, 10), (2, 10), (3, 10), (0, 34)]])
    with pytest.raises(ValueError, match="'cudnn' takes bfloat16/float16 only"):
        ak.cudnn_attention(q.astype(jnp.float32), k, v, seg, _api=EMULATED_CUDNN)
    with pytest.raises(ValueError, match="3 segments > max_segments=2"):
        ak.cudnn_attention(q, k, v, seg, max_segments=2, _api=EMULATED_CUDNN)
    # Under jit the count is not known while tracing: the overflowing row becomes NaN, never silently short.
    seg2 = jnp.concatenate([seg, segment_rows(t, [[(1, 64)]])])
    q2, k2, v2 = (jnp.concatenate([x, x]) for x in (q, k, v))
    out = np.asarray(
        jax.jit(functools.partial(ak.cudnn_attention, max_segments=2, _api=EMULATED_CUDNN))(q2, k2, v2, seg2),
        np.float32,
    )
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


# ------------------------------------------------------------------------------------------ leakage


@pytest.mark.parametrize(
    "name,window",
    [
        ("splash_interpret", None),
        ("splash_interpret", 64),
        ("pallas_gpu_interpret", None),
        ("cudnn_emulated", None),
        ("cudnn_emulated", 64),
    ],
)
def test_no_leakage_between_segments_cpu(name, window):
    backend, dtype, hd = CPU_BACKENDS[name]
    leakage_check(backend, window, dtype, hd=hd, atol=F32_ATOL if dtype == jnp.float32 else BF16_ATOL)


# ------------------------------------------------------------------------------------------ on hardware


def _hardware_skip(name):
    want = ak.PLATFORM_OF[name]
    if PLATFORM != want:
        return f"needs a {want.upper()} (this run: {PLATFORM}; set JAX_PLATFORMS={'cuda' if want == 'gpu' else want})"
    if name not in attn_lib.available_backends():
        return f"{name} not registered in this jax"
    if name == "cudnn":
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        if tuple(int(x) for x in str(cc).split(".")) < (9, 0):
            return f"cuDNN sequence packing needs Hopper or newer (compute capability {cc})"
    return None


HW_CASES = [("splash", None), ("splash", 256), ("pallas_gpu", None), ("cudnn", None), ("cudnn", 256)]


@pytest.mark.parametrize("name,window", HW_CASES)
def test_hardware_backend_matches_reference(name, window):
    reason = _hardware_skip(name)
    if reason:
        pytest.skip(reason)
    t, hq, hk, hd = 2048, 8, 2, 128
    q, k, v = random_qkv(2, t, hq, hk, hd, seed=21, dtype=jnp.bfloat16)
    seg = segment_rows(t, [[(1, 700), (2, 1), (3, 300), (4, 900), (0, 147)], [(0, 100), (1, 1948)]])
    out = jax.jit(lambda a, b, c, s: attention(a, b, c, s, sliding_window=window, backend=name))(q, k, v, seg)
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = attention(*up, seg, sliding_window=window, backend="xla", block_q=256, block_k=256)
    assert out.dtype == jnp.bfloat16
    _close(out, ref, 3e-2)
    assert (np.asarray(out, np.float32)[np.asarray(seg) == 0] == 0).all()


@pytest.mark.parametrize("name,window", HW_CASES)
def test_hardware_backend_no_leakage(name, window):
    reason = _hardware_skip(name)
    if reason:
        pytest.skip(reason)
    leakage_check(functools.partial(attention, backend=name), window, jnp.bfloat16, atol=BF16_ATOL)
