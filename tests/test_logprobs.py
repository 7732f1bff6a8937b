"""Masked log-prob kernel against full-logits log_softmax; response sums; compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from psych201_jax.testing.oracle import masked_logprobs, response_sums

pytestmark = pytest.mark.quick


def full_logits_reference(hidden, unembedding, score_index, score_target):
    """-log_softmax over the full [B * L, V] logits (same dtype, float32 accumulation) and argmax."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = jnp.einsum(
        "td,vd->tv",
        flat,
        unembedding.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    logp = jax.nn.log_softmax(logits, axis=-1)[score_index]
    return -logp[jnp.arange(len(score_target)), score_target], jnp.argmax(logits[score_index], axis=-1)


def random_case(seed, batch=2, length=48, dim=32, vocab=1000, capacity=64, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), dtype)
    unembedding = jnp.asarray(rng.normal(size=(vocab, dim)) / 2, dtype)
    index = jnp.asarray(rng.integers(0, batch * length, capacity), jnp.int32)
    target = jnp.asarray(rng.integers(0, vocab, capacity), jnp.int32)
    valid = jnp.asarray(rng.random(capacity) < 0.8)
    return hidden, unembedding, index, target, valid


@pytest.mark.parametrize(
    "vocab,chunk,dtype,tol",
    [
        (1000, 256, jnp.float32, 1e-5),  # V not a multiple of the chunk
        (1024, 256, jnp.float32, 1e-5),  # V a multiple of the chunk
        (1000, 4096, jnp.float32, 1e-5),  # one chunk larger than V
        (777, 100, jnp.float32, 1e-5),
        (1000, 256, jnp.bfloat16, 1e-4),  # bf16 hidden and unembedding, float32 accumulation
    ],
)
def test_equals_full_log_softmax(vocab, chunk, dtype, tol):
    hidden, unembedding, index, target, valid = random_case(vocab, vocab=vocab, dtype=dtype)
    nll, argmax = masked_logprobs(hidden, unembedding, index, target, valid, vocab_chunk=chunk)
    ref_nll, ref_argmax = full_logits_reference(hidden, unembedding, index, target)
    assert nll.dtype == jnp.float32 and argmax.dtype == jnp.int32
    np.testing.assert_allclose(nll[valid], ref_nll[valid], rtol=0, atol=tol)
    np.testing.assert_array_equal(argmax[valid], ref_argmax[valid])


def test_bf16_hidden_with_float32_unembedding_computes_in_bf16():
    hidden, unembedding, index, target, valid = random_case(1, dtype=jnp.float32)
    hidden = hidden.astype(jnp.bfloat16)
    nll, argmax = masked_logprobs(hidden, unembedding, index, target, valid, vocab_chunk=128)
    ref_nll, ref_argmax = full_logits_reference(hidden, unembedding, index, target)
    np.testing.assert_allclose(nll[valid], ref_nll[valid], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(argmax[valid], ref_argmax[valid])


@pytest.mark.parametrize(
    "vocab,chunk,ties",
    [
        # chunks of 32 (no argmax blocks) at 0, 32, 64 and a last one of 4 at 96
        (100, 32, [(5, 40), (40, 70), (66, 70, 99), (97, 98)]),
        # chunks of 512 in blocks of 128 (head.ARGMAX_BLOCK), then 488 columns in blocks of 8: ties in one
        # block, across blocks, across chunks and into the last chunk
        (1000, 512, [(5, 100), (100, 130), (127, 128, 300), (200, 511, 600), (600, 990), (998, 999)]),
        # chunks of 100 in blocks of 4, then 77 columns without blocks
        (777, 100, [(5, 50), (99, 100), (650, 776), (700, 701)]),
    ],
)
def test_argmax_ties_go_to_the_lowest_index_across_chunks(vocab, chunk, ties):
    hidden, unembedding, index, target, _ = random_case(2, vocab=vocab, capacity=8)
    # Values on a 1/8 grid: every tied logit is exact whatever order a CPU's matmul tiles sum in (an AMD
    # EPYC's XLA matmul rounded equal rows at different columns differently, which made a "tie" no tie).
    hidden = jnp.round(hidden * 8) / 8
    valid = jnp.ones(8, bool)
    best = hidden.reshape(-1, hidden.shape[-1])[index] * 10
    for tied in ties:
        w = unembedding
        for v in tied:
            w = w.at[v].set(best[0])
        _, argmax = masked_logprobs(hidden, w, index, target, valid, vocab_chunk=chunk)
        _, ref_argmax = full_logits_reference(hidden, w, index, target)
        assert int(argmax[0]) == int(ref_argmax[0]) == tied[0]


def test_invalid_entries_are_ignored():
    hidden, unembedding, index, target, valid = random_case(3)
    nll, argmax = masked_logprobs(hidden, unembedding, index, target, valid, vocab_chunk=256)
    assert (nll[~valid] == 0).all() and (argmax[~valid] == -1).all()
    # Changing what invalid entries point at changes nothing for the valid ones.
    other_index = jnp.where(valid, index, 0)
    other_target = jnp.where(valid, target, 999)
    nll2, argmax2 = masked_logprobs(hidden, unembedding, other_index, other_target, valid, vocab_chunk=256)
    np.testing.assert_array_equal(nll, nll2)
    np.testing.assert_array_equal(argmax, argmax2)


@pytest.mark.parametrize("unembedding_spec", [P(), P("data"), P(None, "data")])
def test_runs_under_an_explicit_sharding_mesh(unembedding_spec):
    """Row-sharded hidden states and a replicated or vocabulary/feature-sharded unembedding."""
    hidden, unembedding, index, target, valid = random_case(5)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        nll, argmax = masked_logprobs(
            jax.device_put(hidden, NamedSharding(mesh, P("data"))),
            jax.device_put(unembedding, NamedSharding(mesh, unembedding_spec)),
            index,
            target,
            valid,
            vocab_chunk=300,
        )
        sums = response_sums(nll, jnp.zeros_like(index), valid, 4)
    ref_nll, ref_argmax = full_logits_reference(hidden, unembedding, index, target)
    np.testing.assert_allclose(nll[valid], ref_nll[valid], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(argmax[valid], ref_argmax[valid])
    np.testing.assert_allclose(sums[0], nll.sum(), rtol=1e-6)


def test_response_sums_equal_a_python_loop():
    rng = np.random.default_rng(4)
    capacity, num_slots = 200, 64
    nll = rng.random(capacity).astype(np.float32) * 5
    slot = rng.integers(0, 40, capacity).astype(np.int32)
    valid = rng.random(capacity) < 0.7
    expected = np.zeros(num_slots, np.float64)
    for n, s, v in zip(nll, slot, valid):
        if v:
            expected[s] += n
    got = response_sums(jnp.asarray(nll), jnp.asarray(slot), jnp.asarray(valid), num_slots)
    assert got.dtype == jnp.float32 and got.shape == (num_slots,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # bf16 NLL is summed in float32, not bf16.
    got16 = response_sums(jnp.asarray(nll, jnp.bfloat16), jnp.asarray(slot), jnp.asarray(valid), num_slots)
    assert got16.dtype == jnp.float32


def test_compiled_temp_memory_is_a_tenth_of_full_logits():
    tokens, dim, vocab = 16384, 64, 151936
    capacity = 1024  # 5% of tokens scored (819) rounded up to a power of two
    hidden = jax.ShapeDtypeStruct((1, tokens, dim), jnp.float32)
    unembedding = jax.ShapeDtypeStruct((vocab, dim), jnp.float32)
    ints = jax.ShapeDtypeStruct((capacity,), jnp.int32)
    flags = jax.ShapeDtypeStruct((capacity,), jnp.bool_)
    chunked = masked_logprobs.lower(hidden, unembedding, ints, ints, flags).compile().memory_analysis()
    full = jax.jit(full_logits_reference).lower(hidden, unembedding, ints, ints).compile()
    full = full.memory_analysis()
    if chunked is None or full is None:
        pytest.skip("memory_analysis() is not available on this backend")
    assert full.temp_size_in_bytes >= tokens * vocab * 4  # the full logits really are materialised
    assert chunked.temp_size_in_bytes <= full.temp_size_in_bytes / 10


@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (777, 100)])
def test_score_head_on_one_device_equals_the_plain_oracle(vocab, chunk):
    """The production head (shard_map body, one device, no vocabulary axes) against the plain formulas."""
    from psych201_jax.scoring.head import score_head
    from psych201_jax.testing.oracle import masked_option_argmax

    hidden, unembedding, index, target, valid = random_case(vocab + 7, vocab=vocab)
    slot = jnp.asarray(np.random.default_rng(3).integers(0, 10, len(index)), jnp.int32)
    option_ids = jnp.asarray(np.sort(np.random.default_rng(4).choice(vocab, 32, replace=False)), jnp.int32)
    option_mask = jnp.asarray(np.random.default_rng(5).random((len(index), 32)) < 0.5)
    h = hidden.reshape(-1, hidden.shape[-1])[index]
    kwargs = dict(vocab_axes=(), axis_sizes={}, vocab_chunk=chunk)
    out = score_head(h, unembedding, target, valid, slot, option_ids, option_mask, **kwargs)
    assert out.nll_t is None and out.entropy is None and out.option_mass is None  # no temperatures
    nll, argmax = masked_logprobs(hidden, unembedding, index, target, valid, vocab_chunk=chunk)
    np.testing.assert_allclose(out.nll, response_sums(nll, slot, valid, len(index)), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out.argmax, argmax)
    np.testing.assert_array_equal(
        out.option_argmax, masked_option_argmax(hidden, unembedding, index, valid, option_ids, option_mask)
    )
    plain = score_head(h, unembedding, target, valid, slot, **kwargs)  # without option inputs
    assert plain.option_argmax is None and plain.slot_sums().keys() == {"nll"}
    np.testing.assert_array_equal(plain.nll, out.nll)
    np.testing.assert_array_equal(plain.argmax, out.argmax)


def _brute_force_calibration(hidden, unembedding, index, target, temperatures, option_ids, option_mask):
    """Per entry, from the full float32 logits: NLL at each T, entropy at T = 1 and option mass."""
    flat = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])[np.asarray(index)]
    logits = flat @ np.asarray(unembedding, np.float64).T  # [C, V]
    nll_t = []
    for t in temperatures:
        z = logits / t
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        nll_t.append(lse - z[np.arange(len(z)), np.asarray(target)])
    logp = logits - (np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1))[:, None]
    entropy = -(np.exp(logp) * logp).sum(1)
    p = np.exp(logp)[:, np.asarray(option_ids)]
    mass = np.where(np.asarray(option_mask), p, 0.0).sum(1)
    return np.stack(nll_t, 1), entropy, mass


@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (777, 100)])
def test_temperature_grid_entropy_and_option_mass_equal_brute_force(vocab, chunk):
    """The head's calibration statistics in its one vocabulary pass against full float64 logits."""
    from psych201_jax.conditions import DEFAULT_TEMPERATURES
    from psych201_jax.scoring.head import score_head

    hidden, unembedding, index, target, valid = random_case(vocab + 11, vocab=vocab)
    capacity = len(index)
    slot = jnp.arange(capacity, dtype=jnp.int32)  # one entry per slot: the sums are the per-entry values
    option_ids = jnp.asarray(np.sort(np.random.default_rng(6).choice(vocab, 32, replace=False)), jnp.int32)
    option_mask = jnp.asarray(np.random.default_rng(7).random((capacity, 32)) < 0.5)
    out = score_head(
        hidden.reshape(-1, hidden.shape[-1])[index],
        unembedding,
        target,
        valid,
        slot,
        option_ids,
        option_mask,
        vocab_axes=(),
        axis_sizes={},
        vocab_chunk=chunk,
        temperatures=DEFAULT_TEMPERATURES,
    )
    sums, nll_t, entropy, mass = (np.asarray(x) for x in (out.nll, out.nll_t, out.entropy, out.option_mass))
    assert out.slot_sums().keys() == {"nll", "nll_t", "entropy", "option_mass"}
    assert out.entry_values().keys() == {"argmax", "option_argmax"}
    ref_t, ref_entropy, ref_mass = _brute_force_calibration(
        hidden, unembedding, index, target, DEFAULT_TEMPERATURES, option_ids, option_mask
    )
    v = np.asarray(valid)
    np.testing.assert_allclose(nll_t[v], ref_t[v], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(entropy[v], ref_entropy[v], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mass[v], ref_mass[v], rtol=1e-4, atol=1e-6)
    assert np.all(nll_t[~v] == 0) and np.all(entropy[~v] == 0)
    np.testing.assert_array_equal(nll_t[:, DEFAULT_TEMPERATURES.index(1.0)], sums)  # T = 1 is the NLL itself


def test_the_default_grid_has_17_log_spaced_values_with_half_one_and_two():
    from psych201_jax.conditions import DEFAULT_TEMPERATURES, temperature_grid

    grid = np.asarray(DEFAULT_TEMPERATURES)
    assert len(grid) == 17 and grid[0] == 0.25 and grid[-1] == 4.0 and {0.5, 1.0, 2.0} <= set(grid.tolist())
    np.testing.assert_allclose(np.diff(np.log(grid)), np.log(2) / 4)
    assert temperature_grid("none") == () and temperature_grid("0.5,1") == (0.5, 1.0)
