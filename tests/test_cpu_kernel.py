"""The native CPU attention kernel (psych201_jax/model/cpu_kernel.py, cpu_attention.cc) against the dense
reference, its isolation of segments, the "auto" backend's choice and the build's failure report."""

import functools
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psych201_jax.model import attention as attn_lib
from psych201_jax.model import cpu_kernel
from psych201_jax.model.attention import attention
from psych201_jax.testing.attention import leakage_check, random_qkv, segment_rows

# float32 outputs of O(1): the kernel's exp (Cephes, about 1 ulp) and summation order differ from XLA's; jax 0.12's
# dense reference differed by up to 2.4e-6 (20 ulp) where jax 0.10 and 0.11 stayed under 2e-6. A bug is >= 1e-3.
ATOL = 5e-6
_native = attn_lib._BACKENDS["cpu"]  # the backend as registered: ranges from segment ids, then the kernel


pytestmark = pytest.mark.skipif(not cpu_kernel.has_compiler(), reason="no C++ compiler on this machine")


def test_kernel_builds_here():
    """CI has a compiler, so the kernel must build: a silent fallback to "xla" would hide a broken source."""
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


@pytest.mark.parametrize(
    "t,hq,hk,d,window",
    [
        (300, 4, 2, 64, None),  # less than one key tile (256) past the first: partial tiles, padding
        (300, 4, 2, 64, 1),  # each query sees only itself
        (300, 2, 2, 32, 16),  # no GQA; head dim padded to 64 inside
        (700, 8, 2, 128, None),  # several key tiles and query blocks; interior tiles run unmasked
        (700, 8, 1, 80, 300),  # the window cuts inside tiles; head dim padded to 128
        (700, 6, 6, 16, 257),
    ],
)
def test_matches_dense(t, hq, hk, d, window):
    q, k, v = random_qkv(3, t, hq, hk, d, seed=t + hq + d)
    third = t // 3
    seg = segment_rows(
        t,
        [
            [(1, third), (2, 1), (3, t - third - 40)],  # then 39 padding tokens
            [(0, 7), (1, t - 7)],  # padding first
            [(5, t)],
        ],
    )
    dense = attention(q, k, v, seg, sliding_window=window, backend="dense")
    out = jax.jit(functools.partial(_native, sliding_window=window))(q, k, v, seg)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=ATOL, rtol=0)
    assert (np.asarray(out)[np.asarray(seg) == 0] == 0).all()


def test_edge_shapes_match_dense():
    """T = 1, T at exact block and tile multiples, head dims 192/256, a group of 8, an all-padding row."""
    for b, t, hq, hk, d in [(1, 1, 8, 1, 64), (2, 64, 4, 2, 192), (2, 256, 8, 1, 256), (1, 512, 2, 1, 64)]:
        q, k, v = random_qkv(b, t, hq, hk, d, seed=t + d)
        seg = segment_rows(t, [[(1, t // 2 + 1), (2, t - t // 2 - 1)], []][:b])  # row 1, if any: all padding
        out = np.asarray(_native(q, k, v, seg))
        np.testing.assert_allclose(out, np.asarray(attention(q, k, v, seg, backend="dense")), atol=ATOL, rtol=0)


def test_nan_inputs_give_nan_rows_not_finite_ones():
    """A NaN in q or k poisons exactly the rows that see it (as in the dense reference); none turns into 0."""
    q, k, v = random_qkv(1, 80, 2, 1, 64, seed=9)
    seg = jnp.ones((1, 80), jnp.int32)
    for name, bad in (("q", (q.at[0, 30, 0, 5].set(jnp.nan), k)), ("k", (q, k.at[0, 10, 0, 3].set(jnp.nan)))):
        got = np.isnan(np.asarray(_native(bad[0], bad[1], v, seg)))
        want = np.isnan(np.asarray(attention(bad[0], bad[1], v, seg, backend="dense")))
        assert want.any() and (got == want).all(), name


def test_mismatched_shapes_are_refused():
    q, k, v = random_qkv(1, 80, 2, 1, 64)
    lo, hi = jnp.zeros((1, 80), jnp.int32), jnp.arange(80, dtype=jnp.int32)[None]
    call = jax.ffi.ffi_call(cpu_kernel.TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    for args in (
        (q, k, v[:, :8], lo, hi),
        (q, k, v, lo[:, :10], hi[:, :10]),
        (q, k, v, lo, hi[:, :10]),
        (q, k, v[:, :, :, :32], lo, hi),
        (q, k[:1, :, :, :32], v[:1, :, :, :32], lo, hi),
    ):
        with pytest.raises(Exception, match="key ranges lo/hi \\[B, C\\]"):
            jax.block_until_ready(call(*args, scale=np.float32(0.125)))


def test_key_ranges_are_clamped_to_the_row():
    """Ranges past either end of the row read no memory outside it: they see the keys they overlap."""
    q, k, v = random_qkv(1, 100, 2, 1, 64, seed=2)
    lo = jnp.full((1, 100), -50, jnp.int32)
    hi = jnp.arange(100, dtype=jnp.int32)[None] + 10**6 * (jnp.arange(100) % 2 == 0)
    got = np.asarray(cpu_kernel.attend(q, k, v, lo, hi))
    seg_all = jnp.ones((1, 100), jnp.int32)
    dense = np.asarray(attention(q, k, v, seg_all, backend="dense"))
    np.testing.assert_allclose(got[0, 1::2], dense[0, 1::2], atol=ATOL, rtol=0)  # [0, i]: causal
    qn, kn, vn = (np.asarray(x[0], np.float64) for x in (q, k, v))  # [T, H, d]; one kv head
    s = np.einsum("thd,jd->thj", qn, kn[:, 0]) / 8.0  # even queries see every key of the row
    p = np.exp(s - s.max(-1, keepdims=True))
    full = np.einsum("thj,jd->thd", p / p.sum(-1, keepdims=True), vn[:, 0])
    np.testing.assert_allclose(got[0, 0::2], full[0::2], atol=ATOL, rtol=0)


def test_bfloat16_in_bfloat16_out():
    q, k, v = random_qkv(2, 200, 4, 2, 64, seed=5, dtype=jnp.bfloat16)
    seg = segment_rows(200, [[(1, 80), (2, 120)], [(1, 150)]])
    out = _native(q, k, v, seg, sliding_window=40)
    dense = attention(q, k, v, seg, sliding_window=40, backend="dense")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(dense, np.float32), atol=2e-2, rtol=0)


@pytest.mark.parametrize("hd,window", [(64, None), (64, 64), (128, None)])
def test_no_leakage_between_segments(hd, window):
    leakage_check(_native, window, jnp.float32, hd=hd)


def test_auto_picks_the_kernel_on_one_cpu_device_with_avx512_only(monkeypatch):
    assert cpu_kernel.simd_width() in (4, 8, 16)
    wide = cpu_kernel.simd_width() >= cpu_kernel.AUTO_SIMD_WIDTH  # AVX-512 on this machine
    assert attn_lib.resolve_backend("auto", 1) == ("cpu" if wide else "xla")
    assert attn_lib.resolve_backend("auto", 8) == "xla"  # the kernel sees whole arrays, not shards
    assert attn_lib.resolve_backend("xla", 1) == "xla"
    assert attn_lib.auto_fallback_reason(1) == ""
    assert "cpu" in attn_lib.runnable_backends()
    monkeypatch.setattr(cpu_kernel, "_SIMD_WIDTH", [8])  # an AVX2 build: correct, but "auto" keeps "xla"
    assert attn_lib.resolve_backend("auto", 1) == "xla" and attn_lib.auto_fallback_reason(1) == ""
    monkeypatch.setattr(cpu_kernel, "_registration", lambda: "RuntimeError: no C++ compiler found (set $CXX)")
    assert attn_lib.resolve_backend("auto", 1) == "xla"
    assert "no C++ compiler" in attn_lib.auto_fallback_reason(1)
    assert "cpu" not in attn_lib.runnable_backends()
    q, k, v = random_qkv(1, 64, 2, 1, 64)
    with pytest.raises(ValueError, match="attention backend 'cpu' is unavailable: RuntimeError: no C"):
        attention(q, k, v, jnp.ones((1, 64), jnp.int32), backend="cpu")


def test_a_multi_device_mesh_gets_xla_from_auto_and_an_error_from_cpu():
    """Traced under a 2-device mesh (abstract: this process may have one device), "auto" is "xla" and an
    explicit "cpu" raises instead of letting XLA gather every shard to every device."""
    q, k, v = random_qkv(2, 64, 2, 1, 64)
    seg = jnp.ones((2, 64), jnp.int32)
    mesh = jax.sharding.AbstractMesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.sharding.use_abstract_mesh(mesh):
        assert attn_lib.resolve_backend("auto") == "xla"
        with pytest.raises(ValueError, match="runs on one device, not a 2-device mesh"):
            jax.eval_shape(lambda *a: attention(*a, backend="cpu"), q, k, v, seg)
    assert attn_lib.resolve_backend("auto") == ("cpu" if cpu_kernel.preferred() else "xla")


def test_a_build_failure_names_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="failed \\(exit status \\d+\\): .*broken.cc"):
        cpu_kernel._build()
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library left to load


def test_the_library_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu_kernel._build()
    assert first.parent == tmp_path / "psych201_jax" / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert cpu_kernel._build() == first and first.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    edited = tmp_path / "cpu_attention.cc"
    edited.write_text(cpu_kernel.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", edited)
    assert cpu_kernel._build() != first


@pytest.mark.parametrize("hq,hk,d,window", [(4, 2, 64, None), (4, 1, 16, 7), (8, 2, 128, 300)])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_attention_at_on_the_kernel_matches_dense(hq, hk, d, window, order):
    """``attention_at`` with backend "cpu" (the last layer of a scoring forward on a CPU): queries at chosen
    positions of flattened rows, spanning several key tiles and query blocks, some of them padding, give the
    dense attention's rows there; the XLA path on the same inputs agrees."""
    b, t = 2, 700
    q, k, v = random_qkv(b, t, hq, hk, d, seed=hq + d)
    seg = segment_rows(t, [[(1, 250), (2, 3), (3, 400)], [(0, 20), (4, 600)]])  # 47 and 80 padding tokens at the end
    dense = np.asarray(attention(q, k, v, seg, sliding_window=window, backend="dense"))
    flat_seg = np.where(np.asarray(seg) > 0, np.asarray(seg) + 10 * np.arange(b)[:, None], 0).reshape(1, b * t)
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(b * t, 300, replace=False))[None]
    if order == "shuffled":
        index = rng.permuted(index, axis=1)
    valid = (rng.random(index.shape) < 0.9) & (np.take_along_axis(flat_seg, index, axis=1) > 0)
    q_seg = np.where(valid, np.take_along_axis(flat_seg, index, axis=1), 0)
    flat = lambda x: jnp.asarray(x).reshape(1, b * t, *x.shape[2:])  # noqa: E731
    q_at = jnp.take_along_axis(flat(q), jnp.asarray(index)[..., None, None], axis=1)
    args = (q_at, jnp.asarray(index), jnp.asarray(q_seg), flat(k), flat(v), jnp.asarray(flat_seg))
    fns = {
        name: functools.partial(attn_lib.attention_at, sliding_window=window, backend=name) for name in ("cpu", "xla")
    }
    assert cpu_kernel.TARGET in str(jax.make_jaxpr(fns["cpu"])(*args))  # the kernel, not a fallback to XLA
    got = {name: np.asarray(jax.jit(fn)(*args)) for name, fn in fns.items()}
    want = np.where(
        valid[..., None, None], np.take_along_axis(dense.reshape(1, b * t, hq, d), index[..., None, None], 1), 0
    )
    assert np.abs(want).sum() > 0
    np.testing.assert_allclose(got["cpu"], want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got["cpu"], got["xla"], atol=ATOL, rtol=0)


def test_cxx_may_carry_arguments(monkeypatch, tmp_path):
    """``$CXX`` as a command with arguments (a ccache or env wrapper) builds; the wrapper is part of the key."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "env c++")
    assert cpu_kernel._compiler()[1:] == ["c++"]
    wrapped = cpu_kernel._build()
    monkeypatch.delenv("CXX")
    assert wrapped.exists() and cpu_kernel._build() != wrapped


def test_a_hung_compiler_times_out_and_stale_partials_go(monkeypatch, tmp_path):
    """A compiler past the build timeout fails the build (the job then runs "xla") and leaves no library; a
    partial library left by a killed build more than a day ago is removed by the next build."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels = tmp_path / "psych201_jax" / "kernels"
    kernels.mkdir(parents=True)
    old, fresh = kernels / f"{cpu_kernel._PARTIAL}old.so", kernels / f"{cpu_kernel._PARTIAL}fresh.so"
    for path in (old, fresh):
        path.write_bytes(b"")
    os.utime(old, (0, 0))
    monkeypatch.setattr(cpu_kernel, "_BUILD_TIMEOUT_S", 0.01)
    with pytest.raises(subprocess.TimeoutExpired):
        cpu_kernel._build()
    assert sorted(p.name for p in kernels.iterdir()) == [fresh.name]


def _ranges_reference(q, k, v, lo, hi):
    """float64 numpy: query (b, c) attends to keys [lo, hi] of row b, clamped to the row; none gives 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, g = k.shape[1], q.shape[2] // k.shape[2]
    out = np.zeros_like(q)
    for b, c in np.ndindex(*q.shape[:2]):
        first, last = max(lo[b, c], 0), min(hi[b, c], n - 1)
        if first > last:
            continue
        for h in range(q.shape[2]):
            s = k[b, first : last + 1, h // g] @ q[b, c, h] / np.sqrt(q.shape[3])
            p = np.exp(s - s.max())
            out[b, c, h] = p @ v[b, first : last + 1, h // g] / p.sum()
    return out


@pytest.mark.parametrize(
    "b,c,n,case",
    [
        (2, 200, 70, "random"),  # more queries than keys; empty, reversed and out-of-row ranges
        (1, 130, 1500, "sparse"),  # short ranges far apart: the tiles between them are skipped
        (1, 64, 1000, "whole"),  # unmasked tiles where hi is not the query's own index; rows ending mid-tile
        (1, 0, 300, "random"),  # no queries
        (1, 5, 0, "random"),  # no keys: every query sees nothing
    ],
)
def test_kernel_ranges_match_a_float64_reference(b, c, n, case):
    rng = np.random.default_rng(c + n)
    q = rng.standard_normal((b, c, 4, 64), np.float32)
    k, v = (rng.standard_normal((b, n, 2, 64), np.float32) for _ in range(2))
    if case == "random":
        lo, hi = rng.integers(-20, n + 20, (2, b, c))
    elif case == "sparse":
        lo = rng.integers(0, n, (b, c))
        hi = np.minimum(lo + rng.integers(0, 40, (b, c)), n - 1)
    else:
        lo, hi = np.zeros((b, c), int), np.full((b, c), 767)
        hi[0, 5], hi[0, 40:] = 900, 300  # tile 1 is whole for 40 rows only: the rest must mask it
    got = np.asarray(
        cpu_kernel.attend(*map(jnp.asarray, (q, k, v)), jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32))
    )
    assert got.shape == q.shape
    np.testing.assert_allclose(got, _ranges_reference(q, k, v, lo, hi), atol=ATOL, rtol=0)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_at_queries_that_see_nothing_agree_across_backends(window):
    """A query labelled with another segment than the key's at its position, one at a padding key and ones
    outside the row give 0 on the kernel and on XLA alike; a proper one next to them is unaffected."""
    rng = np.random.default_rng(1)
    k_seg = jnp.asarray(np.concatenate([np.full(300, 1), np.full(250, 2), np.zeros(50)]).astype(np.int32)[None])
    index = jnp.asarray([[10, 350, 320, 599, 650, -3]], jnp.int32)
    q_seg = jnp.asarray([[1, 1, 2, 1, 1, 1]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 64), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, 600, 1, 64), np.float32)) for _ in range(2))
    got = {
        name: np.asarray(attn_lib.attention_at(q, index, q_seg, k, v, k_seg, sliding_window=window, backend=name))
        for name in ("cpu", "xla")
    }
    np.testing.assert_allclose(got["cpu"], got["xla"], atol=ATOL, rtol=0)
    assert (got["cpu"][0, 1] == 0).all() and (got["cpu"][0, 3:] == 0).all()
    assert (got["cpu"][0, [0, 2]] != 0).any(axis=(1, 2)).all()


def test_an_unparsable_cxx_is_a_failed_build_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", '"g++')  # an unbalanced quote
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found \\(\\$CXX='\"g\\+\\+' does not parse"):
        cpu_kernel._build()
    assert "does not parse" in cpu_kernel._registration.__wrapped__()  # a reason, so the job runs "xla"
