"""Generated behaviour of simulated participants (issue 30, item 4): response types, hand-computed metrics,
bootstrap CIs over participants and paired post − base differences over studies."""

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from psych201_jax.analysis.behaviour import (
    PAIRED_METRICS,
    SimulatedParticipant,
    Slot,
    behaviour_by_study,
    diversity,
    exact_match_rate,
    paired_differences,
    pooled_categories,
    pooled_wasserstein,
    study_behaviour,
    study_crps,
)
from psych201_jax.analysis.responses import (
    ResponseType,
    classify_study,
    crps_fair,
    entropy_bits,
    jensen_shannon,
    normalise,
    parse_number,
    total_variation,
    wasserstein_1,
)

pytestmark = pytest.mark.quick

CAT, ORD, NUM, FREE = ResponseType.CATEGORY, ResponseType.ORDINAL, ResponseType.NUMBER, ResponseType.FREE_TEXT


def person(name, *slots, study="s", experiment="e"):
    """A participant from (human, samples...) tuples."""
    return SimulatedParticipant(study, experiment, name, tuple(Slot(h, tuple(xs)) for h, *xs in slots))


# ------------------------------------------------------------------------------- normalising and types


def test_numbers_parse_plainly_and_nothing_else_does():
    assert parse_number("3") == parse_number("3.0") == parse_number(" 3 ") == 3.0
    assert parse_number("-.5") == -0.5 and parse_number("1e3") == 1000.0 and parse_number("+2") == 2.0
    for text in ("1,000", "3 ms", "50%", "nan", "inf", "1e999", "", "three", "1_000", "3.0.1"):
        assert parse_number(text) is None, text


def test_normalise_per_type():
    assert normalise(" J ", CAT) == normalise("j", CAT) == "j"
    assert normalise(" 3 ", ORD) == normalise("3.0", NUM) == 3.0
    assert normalise(" none ", NUM) == "none"  # unparsable: its text, never equal to a number
    assert normalise(" I pressed J ", FREE) == "I pressed J"  # free text keeps its case


def test_classify_realistic_response_sets():
    assert classify_study(["J", "F", "f", "J", " j"]) == CAT
    assert classify_study([str(i) for i in (1, 4, 7, 2, 5, 6, 3)]) == ORD  # Likert 1..7
    assert classify_study(["532.1", "610.4", "498", "1203.7"]) == NUM  # reaction times
    assert classify_study(["0", "10"]) == ORD and classify_study(["0", "11"]) == NUM  # at most 11 levels
    assert classify_study(["0", "50", "100"]) == NUM  # integers of a wide span: an amount
    assert classify_study(["I chose the left option because it paid more.", "It seemed safer to me."]) == FREE
    assert classify_study([f"word{i}" for i in range(21)]) == FREE  # 21 distinct single words
    assert classify_study([f"word{i}" for i in range(20)]) == CAT
    assert classify_study(["not sure at all", "yes"]) == FREE  # a four-word answer is a sentence
    assert classify_study(["1", "2", "7"], options=["1", "2", "7"]) == CAT  # explicit options win


def test_classify_numeric_share_threshold():
    numbers = [str(i % 7 + 1) for i in range(19)]
    assert classify_study([*numbers, "none"]) == ORD  # 19 of 20 = 95 % parse
    assert classify_study([*numbers[:18], "none", "n/a"]) == CAT  # 18 of 20 do not
    with pytest.raises(ValueError):
        classify_study([])


# ---------------------------------------------------------------------------------------- primitives


def test_crps_fair_by_hand():
    # x = (1, 3), y = 2: (1/2)(1 + 1) − (|1−3| + |3−1|) / (2·2·1) = 1 − 4/4 = 0
    assert crps_fair([1, 3], 2) == pytest.approx(0.0)
    # x = (0, 4, 4), y = 1: (1 + 3 + 3)/3 − (4·4) / (2·3·2) = 7/3 − 16/12 = 1
    assert crps_fair([0, 4, 4], 1) == pytest.approx(1.0)
    # a point mass: |5 − 2| = 3
    assert crps_fair([5, 5], 2) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        crps_fair([1.0], 1.0)


def test_tv_and_js_by_hand():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    assert total_variation(p, q) == pytest.approx(0.5)  # ½ (0.5 + 0 + 0.5)
    # m = (¼, ½, ¼): KL(p‖m) = ½ log2(0.5/0.25) + ½ log2(1) = ½, KL(q‖m) = ½ → JS = ½
    assert jensen_shannon(p, q) == pytest.approx(0.5)
    assert jensen_shannon([1, 1, 0], [0, 2, 2]) == pytest.approx(0.5)  # counts are normalised first
    assert total_variation([1, 0], [0, 3]) == pytest.approx(1.0) and jensen_shannon([1, 0], [0, 3]) == pytest.approx(1)
    assert total_variation([2, 1], [4, 2]) == pytest.approx(0.0) and jensen_shannon([2, 1], [4, 2]) == pytest.approx(0)


def test_wasserstein_by_hand_and_against_scipy():
    assert wasserstein_1([0, 1], [1, 2]) == pytest.approx(1.0)  # a shift by 1
    # u = (0, 0, 3), v = (1): ⅔·|0 − 1| + ⅓·|3 − 1| = 4/3
    assert wasserstein_1([0, 0, 3], [1]) == pytest.approx(4 / 3)
    # weights 3:1 on (0, 1) against 1: ¾·1 = 0.75
    assert wasserstein_1([0, 1], [1], u_weights=[3, 1]) == pytest.approx(0.75)
    assert wasserstein_1([0, 1], [1], u_weights=[3, 1]) == pytest.approx(
        scipy.stats.wasserstein_distance([0, 1], [1], [3, 1])
    )
    assert math.isnan(wasserstein_1([], [1.0]))


def test_entropy_bits_by_hand():
    assert entropy_bits(["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert entropy_bits(["a", "a", "a"]) == 0.0
    assert entropy_bits(["a", "b", "c", "d"]) == pytest.approx(2.0)
    assert entropy_bits(["a", "a", "b", "c"]) == pytest.approx(1.5)  # −(½ log2 ½ + 2·¼ log2 ¼)
    assert math.isnan(entropy_bits([]))


# --------------------------------------------------------------------------------------- study metrics


def test_exact_match_identical_disjoint_and_by_hand():
    same = [person("a", ("J", "J", "j", " J ")), person("b", ("F", "F", "f"))]
    assert exact_match_rate(same, CAT) == 1.0
    disjoint = [person("a", ("J", "F", "K")), person("b", ("F", "J"))]
    assert exact_match_rate(disjoint, CAT) == 0.0
    # slot 1: 2 of 4 match, slot 2: 0 of 2 → mean(½, 0) = ¼ (a slot, not a sample, weighs 1)
    mixed = [person("a", ("J", "J", "F", "J", "F"), ("F", "J", "J"))]
    assert exact_match_rate(mixed, CAT) == pytest.approx(0.25)
    assert exact_match_rate([person("a", ("3", "3.0", " 3 ", "three"))], NUM) == pytest.approx(2 / 3)
    assert math.isnan(exact_match_rate([person("a", ("J",))], CAT))  # no samples: undefined


def test_crps_counts_and_excludes_unparsable_samples():
    ps = [person("a", ("2", "1", "3", "abc")), person("b", ("5", "x", "4"), ("n/a", "1", "2"))]
    r = study_crps(ps)
    # slot 1: crps_fair((1, 3); 2) = 0 with "abc" left out (read as 0 it would be 1/3); slot 2 has one parsable
    # sample and slot 3 an unparsable human response: both skipped
    assert r.crps == pytest.approx(0.0)
    assert (r.n_slots, r.n_skipped_slots, r.n_unparsable_samples) == (1, 2, 2)


def _jf_study():
    # human pool J:1 F:2 = (⅓, ⅔); sample pool (each slot weighs 1): J 1 + ½, F ½ + 1 = (½, ½)
    return [person("a", ("J", "J", "J"), ("F", "J", "F")), person("b", ("F", "F", "F", "F", "F"))]


def test_pooled_categories_by_hand():
    tv, js = pooled_categories(_jf_study(), n_boot=200, seed=1)
    assert tv.value == pytest.approx(1 / 6)  # ½ (|⅓ − ½| + |⅔ − ½|)
    # m = (5/12, 7/12)
    kl_s = 0.5 * math.log2(0.5 / (5 / 12)) + 0.5 * math.log2(0.5 / (7 / 12))
    kl_h = (1 / 3) * math.log2((1 / 3) / (5 / 12)) + (2 / 3) * math.log2((2 / 3) / (7 / 12))
    assert js.value == pytest.approx(0.5 * kl_s + 0.5 * kl_h)


def test_pooled_wasserstein_by_hand():
    ps = [person("a", ("1", "2", "2")), person("b", ("3", "3", "x"))]
    # human (1, 3), samples (2, 3) with "x" left out: F_h − F_s = ½ on [1, 2), 0 on [2, 3) → W1 = ½
    w = pooled_wasserstein(ps, n_boot=200, seed=0)
    assert w.value == pytest.approx(0.5)
    assert w.value == pytest.approx(scipy.stats.wasserstein_distance([1, 3], [2, 3]))


def _numeric_study(seed, n=12):
    rng = np.random.default_rng(seed)
    return [
        person(f"p{i}", *[(f"{rng.normal(500, 80):.1f}", *[f"{rng.normal(560, 60):.1f}" for _ in range(4)])] * 3)
        for i in range(n)
    ]


def test_bootstrap_ci_contains_the_point_and_is_seeded():
    ps = _numeric_study(0)
    a, b = pooled_wasserstein(ps, n_boot=300, seed=7), pooled_wasserstein(ps, n_boot=300, seed=7)
    assert a == b
    assert a.ci[0] <= a.value <= a.ci[1] and a.ci[0] < a.ci[1]
    assert pooled_wasserstein(ps, n_boot=300, seed=8).ci != a.ci
    tv, js = pooled_categories(_jf_study() * 3, n_boot=300, seed=3)
    assert tv.ci[0] <= tv.value <= tv.ci[1] and js.ci[0] <= js.value <= js.ci[1]
    one = pooled_wasserstein(ps[:1], n_boot=300, seed=7)
    assert not math.isnan(one.value) and all(math.isnan(x) for x in one.ci)  # one participant: no CI


def test_diversity_by_hand():
    ps = [
        person("a", ("a", "a", "a", "b", "b")),  # samples: 1 bit, 2 distinct
        person("b", ("b", "c", "c", "c", "c")),  # 0 bits, 1 distinct
        person("c", ("a", "a", "a"), experiment="other"),  # 0 bits, 1 distinct; alone at its position
    ]
    d = diversity(ps, CAT)
    assert d.sample_entropy == pytest.approx(1 / 3) and d.sample_distinct == pytest.approx(4 / 3)
    # one position with ≥ 2 participants, ("e", 0): humans a, b → 1 bit, 2 distinct
    assert (d.human_entropy, d.human_distinct, d.n_human_positions) == (pytest.approx(1.0), 2, 1)


def test_study_behaviour_types_and_counts():
    ps = [
        *_numeric_study(1, n=20),  # 60 human reaction times
        person("u", ("512.0", "500", "n/a", "1,000"), ("none", "1", "2")),
    ]
    ps = [SimulatedParticipant("rt", p.experiment, p.participant, p.slots) for p in ps]
    b = study_behaviour(ps, n_boot=100, seed=0)
    assert b.kind == NUM and b.n_participants == 21 and b.n_slots == 62 and b.n_samples == 20 * 12 + 5
    assert (b.n_unparsable_samples, b.n_unparsable_human) == (2, 1)  # "n/a", "1,000"; "none" (61 of 62 parse)
    assert math.isnan(b.tv.value) and math.isnan(b.js.value) and not math.isnan(b.wasserstein.value)
    assert b.crps_scaled == pytest.approx(b.crps.crps / b.human_sd)
    row = b.as_row()
    assert row["kind"] == "number" and row["n_unparsable_samples"] == 2
    assert all(isinstance(v, str | int | float) for v in row.values()) and "wasserstein_lo" in row
    with pytest.raises(ValueError):
        study_behaviour([*ps, person("x", ("1", "1"), study="other")])


def test_behaviour_by_study_classifies_each_study():
    ps = [
        *(person(f"c{i}", ("J", "J", "F"), ("F", "F", "F"), study="choice") for i in range(3)),
        *(person(f"l{i}", (str(i + 1), "4", "5"), study="likert") for i in range(3)),
        *(
            person(f"f{i}", ("I liked the blue one best.", "Blue, clearly, because of the colour."), study="why")
            for i in range(3)
        ),
    ]
    out = behaviour_by_study(ps, n_boot=50)
    assert [(s, b.kind) for s, b in out.items()] == [("choice", CAT), ("likert", ORD), ("why", FREE)]
    assert not math.isnan(out["choice"].tv.value) and math.isnan(out["choice"].crps.crps)
    assert out["why"].exact_match == 0.0 and math.isnan(out["why"].wasserstein.value)
    forced = behaviour_by_study(ps, options={"likert": ["1", "2", "3", "4", "5"]}, n_boot=50)
    assert forced["likert"].kind == CAT


# ------------------------------------------------------------------------------------------------- pairs


def test_paired_differences_signs_and_means():
    human = ["J", "F", "J", "F"]
    base, post = {}, {}
    for s in ("s1", "s2", "s3"):
        diverse = [person(f"p{i}", (h, "J", "F", "J", "F"), study=s) for i, h in enumerate(human)]
        narrow = [person(f"p{i}", (h, "J", "J", "J", "J"), study=s) for i, h in enumerate(human)]
        base[s] = study_behaviour(diverse, n_boot=50)
        post[s] = study_behaviour(narrow, n_boot=50)
    extra = study_behaviour([person("a", ("1", "2", "3"), study="only_base")], n_boot=50)
    diffs = {d.metric: d for d in paired_differences(post, {**base, "only_base": extra}, n_boot=200, seed=0)}
    assert tuple(diffs) == PAIRED_METRICS
    h = diffs["sample_entropy"]
    assert h.mean == pytest.approx(-1.0) and h.n_studies == 3  # 1 bit (J, F, J, F) → 0 bits
    assert diffs["sample_distinct"].mean == pytest.approx(-1.0)
    # exact match: base ½ on every slot; post 1 where the human said J, 0 where F → ½: no difference
    assert diffs["exact_match"].mean == pytest.approx(0.0)
    # pooled: human (½, ½); base samples (½, ½): TV 0; post (1, 0): TV ½
    assert diffs["tv"].mean == pytest.approx(0.5) and diffs["tv"].ci == (pytest.approx(0.5), pytest.approx(0.5))
    assert diffs["wasserstein"].n_studies == 0 and math.isnan(diffs["wasserstein"].mean)
    assert diffs["tv"].as_row()["n_studies"] == 3
    mismatched = {"s1": study_behaviour([person("a", ("1", "2"), study="s1")], n_boot=10)}
    with pytest.raises(ValueError):
        paired_differences(mismatched, base)


# ------------------------------------------------------------------------------------------- properties

_weights = st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=6)
_values = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(_weights, _weights, _values, _values, st.floats(-1e3, 1e3))
def test_distance_properties(p, q, u, v, y):
    n = min(len(p), len(q))
    p, q = np.array(p[:n]), np.array(q[:n])
    if p.sum() > 0 and q.sum() > 0:
        tv, js = float(total_variation(p, q)), float(jensen_shannon(p, q))
        assert 0 <= tv <= 1 + 1e-12 and 0 <= js <= 1
        assert js <= tv + 1e-9  # Lin (1991): JS in bits ≤ ½‖p − q‖₁
    w = wasserstein_1(u, v)
    assert w == pytest.approx(wasserstein_1(v, u), abs=1e-9) and w >= 0
    assert w == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-9, abs=1e-9)
    if len(u) >= 2:
        # |x_i − x_j| ≤ |x_i − y| + |x_j − y| makes the spread term ≤ the mean error: 0 ≤ CRPS_fair ≤ MAE
        mae = float(np.mean(np.abs(np.array(u) - y)))
        assert -1e-9 * (1 + mae) <= crps_fair(u, y) <= mae + 1e-9
