"""Packing: layout invariants, exact scoring plan, determinism, efficiency and unpacking."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psych201_jax.scoring import packing
from psych201_jax.scoring.head import HeadOutputs

pytestmark = pytest.mark.quick


@dataclasses.dataclass(frozen=True)
class Participant:
    key: str
    token_ids: np.ndarray
    response_index: np.ndarray
    n_responses: int


def make_participant(key, length, seed, response_rate=0.2, empty_responses=0):
    """Random tokens; responses are runs of 1-4 tokens in text order, plus some responses without tokens."""
    rng = np.random.default_rng(seed)
    responses = np.full(length, -1, np.int32)
    n = 0
    t = int(rng.integers(0, 3))  # a response may start at position 0 (unscorable token)
    while t < length:
        if rng.random() < response_rate:
            run = int(rng.integers(1, 5))
            responses[t : t + run] = n
            n += 1
            t += run + 1
        else:
            t += int(rng.integers(1, 6))
    return Participant(key, rng.integers(0, 50_000, length).astype(np.int32), responses, n + empty_responses)


@st.composite
def participant_sets(draw, max_len=256, max_count=12):
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_count))
    seed = draw(st.integers(0, 2**31 - 1))
    names = draw(st.permutations([f"s{i:02d}" for i in range(len(lengths))]))
    if draw(st.booleans()):  # keys may also be tuples, like (study, experiment, participant)
        names = [("study", "exp", name) for name in names]
    return [
        make_participant(name, n, seed + i, empty_responses=i % 2) for i, (name, n) in enumerate(zip(names, lengths))
    ]


def scorable(p):
    """{(key, t): (target, response)} of the participant's scorable tokens."""
    t = np.flatnonzero(p.response_index[1:] >= 0) + 1
    return {(p.key, int(i)): (int(p.token_ids[i]), int(p.response_index[i])) for i in t}


def check_layout_and_plan(participants, batches, row_lengths, capacity=None, min_capacity=256):
    by_key = {p.key: p for p in participants}
    placed, planned, unscorable = [], {}, set()
    for b in batches:
        assert b.tokens.dtype == b.segment_ids.dtype == b.positions.dtype == np.int32
        assert b.score_index.dtype == b.score_target.dtype == b.score_slot.dtype == np.int32
        assert b.score_valid.dtype == bool
        assert b.row_length in row_lengths
        if capacity is None:  # a quarter-octave step: (4..7) * 2**k / 4, at most 25% padding
            c, n = b.capacity, b.n_scored
            quarter = max((1 << (c.bit_length() - 1)) // 4, 1)
            assert c >= min_capacity and c % quarter == 0 and c <= max(min_capacity, 1.25 * n)
        else:
            assert b.capacity == capacity
        # Segments tile each row from the left; the rest of the row is padding.
        ends = np.zeros(b.rows, int)
        for s in b.segments:
            assert s.start == ends[s.row]
            sid = b.row_keys[s.row].index(s.key) + 1
            sl = slice(s.start, s.start + s.length)
            np.testing.assert_array_equal(b.tokens[s.row, sl], by_key[s.key].token_ids)
            assert (b.segment_ids[s.row, sl] == sid).all()
            np.testing.assert_array_equal(b.positions[s.row, sl], np.arange(s.length))
            ends[s.row] += s.length
        assert [len(k) for k in b.row_keys] == [sum(s.row == r for s in b.segments) for r in range(b.rows)]
        for r in range(b.rows):
            for a in (b.tokens, b.segment_ids, b.positions):
                assert (a[r, ends[r] :] == 0).all()
        if b.overflow_pass == 0:
            placed += [s.key for s in b.segments]
            assert b.real_tokens == ends.sum()
        unscorable |= set(b.unscorable)
        # Each valid entry reads the hidden state just before its token, inside the same segment.
        assert (b.score_slot[~b.score_valid] == 0).all()
        assert set(b.score_slot[b.score_valid].tolist()) == set(range(len(b.slot_keys)))
        for j in np.flatnonzero(b.score_valid):
            row, col = divmod(int(b.score_index[j]), b.row_length)
            assert col + 1 < b.row_length
            assert b.segment_ids[row, col] == b.segment_ids[row, col + 1] > 0
            t = int(b.positions[row, col + 1])
            assert t == b.score_position[j] >= 1
            assert b.tokens[row, col + 1] == b.score_target[j]
            key, response = b.slot_keys[b.score_slot[j]]
            assert key == b.row_keys[row][b.segment_ids[row, col] - 1]
            assert (key, t) not in planned
            planned[(key, t)] = (int(b.score_target[j]), response)
    assert sorted(placed) == sorted(by_key)
    expected = {}
    for p in participants:
        expected.update(scorable(p))
    assert planned == expected
    assert unscorable == {
        (p.key, int(p.response_index[0])) for p in participants if len(p.token_ids) and p.response_index[0] >= 0
    }


@settings(max_examples=40, deadline=None)
@given(participant_sets(), st.sampled_from([None, 4, 32]), st.sampled_from([128, 512, 2048]))
def test_layout_and_plan_are_exact(participants, capacity, tokens_per_batch):
    row_lengths = (64, 128, 256)
    batches = packing.pack(
        participants, row_lengths, tokens_per_batch=tokens_per_batch, capacity=capacity, min_capacity=16
    )
    check_layout_and_plan(participants, batches, row_lengths, capacity, min_capacity=16)
    for b in batches:
        assert b.rows <= max(1, tokens_per_batch // b.row_length)


@settings(max_examples=20, deadline=None)
@given(participant_sets(), st.randoms(use_true_random=False))
def test_deterministic_and_order_invariant(participants, rnd):
    shuffled = list(participants)
    rnd.shuffle(shuffled)
    first = packing.pack(participants, (64, 256), tokens_per_batch=512, min_capacity=8)
    for batches in (
        packing.pack(participants, (64, 256), tokens_per_batch=512, min_capacity=8),
        packing.pack(shuffled, (256, 64), tokens_per_batch=512, min_capacity=8),
    ):
        assert len(batches) == len(first)
        for a, b in zip(first, batches):
            for field in dataclasses.fields(packing.PackedBatch):
                x, y = getattr(a, field.name), getattr(b, field.name)
                if isinstance(x, np.ndarray):
                    assert x.dtype == y.dtype
                    np.testing.assert_array_equal(x, y)
                else:
                    assert x == y


def fake_outputs(batch, full=False):
    """A stand-in head: entry NLL = previous token id + target / 4, argmax = previous token id; ``full``
    adds the optional outputs, each a distinct function of the same entries: option_argmax = target,
    nll_t = NLL x (1, 2), entropy = 3 NLL, option_mass = 1 per entry."""
    previous = batch.tokens.reshape(-1)[batch.score_index].astype(np.float64)
    valid = batch.score_valid
    nll = np.where(valid, previous + batch.score_target / 4, 0.0)

    def slot_sums(x):
        sums = np.zeros((batch.capacity, *x.shape[1:]))
        np.add.at(sums, batch.score_slot, x)
        return sums

    argmax = np.where(valid, previous, -1).astype(np.int32)
    if not full:
        return HeadOutputs(nll=slot_sums(nll), argmax=argmax)
    return HeadOutputs(
        nll=slot_sums(nll),
        argmax=argmax,
        option_argmax=np.where(valid, batch.score_target, -1).astype(np.int32),
        nll_t=slot_sums(nll[:, None] * np.array([1.0, 2.0])),
        entropy=slot_sums(3 * nll),
        option_mass=slot_sums(valid.astype(np.float64)),
    )


@settings(max_examples=30, deadline=None)
@given(participant_sets(), st.sampled_from([None, 3, 16]), st.booleans())
def test_unpack_matches_per_participant_computation(participants, capacity, full):
    batches = packing.pack(participants, (64, 256), tokens_per_batch=512, capacity=capacity, min_capacity=8)
    results = packing.unpack(batches, [fake_outputs(b, full) for b in batches])
    assert sorted(results) == sorted(p.key for p in participants)
    for p in participants:
        nll = np.zeros(p.n_responses)
        count = np.zeros(p.n_responses, int)
        top = np.full(len(p.token_ids), -1)
        target = np.full(len(p.token_ids), -1)
        for t in range(1, len(p.token_ids)):
            r = p.response_index[t]
            if r >= 0:
                nll[r] += p.token_ids[t - 1] + p.token_ids[t] / 4
                count[r] += 1
                top[t] = p.token_ids[t - 1]
                target[t] = p.token_ids[t]
        nll[count == 0] = np.nan
        got = results[p.key]
        np.testing.assert_allclose(got.nll, nll, rtol=1e-12)
        np.testing.assert_array_equal(got.n_scored, count)
        np.testing.assert_array_equal(got.argmax, top)
        if not full:
            assert got.option_argmax is None and got.nll_t is None and got.entropy is None and got.option_mass is None
            continue
        assert got.option_argmax.dtype == np.int32 and got.nll_t.dtype == np.float64
        np.testing.assert_array_equal(got.option_argmax, target)
        np.testing.assert_allclose(got.nll_t, nll[:, None] * np.array([1.0, 2.0]), rtol=1e-12)
        np.testing.assert_allclose(got.entropy, 3 * nll, rtol=1e-12)
        np.testing.assert_array_equal(got.option_mass, np.where(count == 0, np.nan, count))


def test_overflow_passes_rerun_rows_and_keep_every_entry():
    participants = [make_participant(f"p{i}", 200, i, response_rate=0.9) for i in range(3)]
    batches = packing.pack(participants, (256,), tokens_per_batch=512, capacity=32)
    check_layout_and_plan(participants, batches, (256,), capacity=32)
    stats = packing.packing_stats(batches)
    assert stats["overflow_passes"] > 0
    assert stats["scored_tokens"] == sum(len(scorable(p)) for p in participants)
    assert stats["real_tokens"] == 600


def test_small_leftover_uses_a_small_shape():
    row_lengths = packing.choose_row_lengths(32768)
    participants = [make_participant("big", 30000, 0), make_participant("small", 700, 1)]
    batches = packing.pack(participants, row_lengths, tokens_per_batch=65536)
    check_layout_and_plan(participants, batches, row_lengths)
    # The two (30,700 tokens) fit one 30,720-token row; a batch of a single row beats two rows.
    assert [(b.rows, b.row_length) for b in batches] == [(1, 30720)]
    batches = packing.pack([participants[1]], row_lengths, tokens_per_batch=65536)
    assert [(b.rows, b.row_length, b.capacity) for b in batches] == [(1, 2048, 256)]


def test_a_small_job_is_not_half_padding():
    # 4 real-sized transcripts (sandbrink2024metacontrol: ~8.6K tokens each) under the job's defaults:
    # with power-of-two rows they filled a 65,536-token row to 53%, with quarter-octave rows a 40,960-token
    # row to 84%; eighth-octave rows: a 36,864-token row, 94%.
    participants = [make_participant(f"p{i}", 8600 + 20 * i, i) for i in range(4)]
    row_lengths = packing.choose_row_lengths(131072)
    batches = packing.pack(participants, row_lengths, tokens_per_batch=131072)
    check_layout_and_plan(participants, batches, row_lengths)
    assert [b.row_length for b in batches] == [36864]
    assert packing.packing_stats(batches)["efficiency"] >= 0.9


def test_efficiency_on_realistic_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(3500), 0.8, 1000), 1000, 30000).astype(int)
    participants = [make_participant(f"p{i}", int(n), i, response_rate=0.01) for i, n in enumerate(lengths)]
    batches = packing.pack(participants, packing.choose_row_lengths(32768), tokens_per_batch=65536)
    stats = packing.packing_stats(batches)
    assert stats["real_tokens"] == lengths.sum()
    assert stats["efficiency"] >= 0.97, stats
    assert len({(b.rows, b.row_length) for b in batches}) <= 2
    assert stats["scored_tokens"] == sum(len(scorable(p)) for p in participants)


def test_participant_longer_than_largest_row_is_an_error():
    participants = [make_participant("fits", 100, 0), make_participant("study/42", 300, 1)]
    with pytest.raises(ValueError, match=r"'study/42' has 300 tokens.*largest row length 256"):
        packing.pack(participants, (128, 256))


def test_invalid_inputs_are_errors():
    p = make_participant("a", 10, 0)
    with pytest.raises(ValueError, match="duplicate participant key 'a'"):
        packing.pack([p, p], (64,))
    bad = dataclasses.replace(p, response_index=np.full(10, p.n_responses, np.int32))
    with pytest.raises(ValueError, match="response_index outside"):
        packing.pack([bad], (64,))
    with pytest.raises(ValueError, match="equal length"):
        packing.pack([dataclasses.replace(p, response_index=p.response_index[:5])], (64,))


def test_choose_row_lengths():
    assert packing.choose_row_lengths(4096) == (2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096)
    assert packing.choose_row_lengths(36000)[-4:] == (28672, 30720, 32768, 36000)
    assert packing.choose_row_lengths(2048, min_len=1000)[:3] == (1024, 1152, 1280)
    assert packing.choose_row_lengths(2048, min_len=1000)[-1] == 2048
    assert packing.choose_row_lengths(1000) == (1000,)
