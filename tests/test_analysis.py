"""The analysis metrics (metrics, stats, pairs, domains, persona) against hand-computed values on small results."""

import math

import numpy as np
import pytest
import scipy.stats

from psych201_jax.analysis import domains, metrics, pairs, persona, runs, stats
from psych201_jax.runs import store as results
from psych201_jax.testing.results import load, tokens, write_results

# Base and post-trained NLLs, hand-checked below:
#   s1: p1 base [1, 2] post [2, 3]; p2 base [3] post [5]        s2: p3 base [2, 4] post [2, 6]
BASE_ROWS = [
    ("s1", "p1", [1.0, 2.0], tokens([1, 2, 3], [1, 2, 4])),
    ("s1", "p2", [3.0], tokens([5], [5])),
    ("s2", "p3", [2.0, 4.0], tokens([7, 8], [7, 9])),
]
POST_ROWS = [
    ("s1", "p1", [2.0, 3.0], tokens([1, 0, 0], [1, 2, 4], [1, 2, 3])),
    ("s1", "p2", [5.0], tokens([0], [5], [5])),
    ("s2", "p3", [2.0, 6.0], tokens([0, 0], [7, 9], [7, 0])),
]


@pytest.fixture
def pair(tmp_path):
    base = load(write_results(str(tmp_path / "base"), "Base-1B", BASE_ROWS))
    post = load(
        write_results(str(tmp_path / "post"), "Post-1B", POST_ROWS, kind="Instruction-tuned", base_hf_id="Base-1B")
    )
    return post, base


def test_run_from_rows(pair):
    post, base = pair
    assert base.model == "Base-1B" and base.kind == "base" and base.n_rejected == 1
    assert post.info["base_hf_id"] == "Base-1B" and post.condition.persona == "none"
    assert [p.key for p in base.participants] == [("s1", "s1/", "p1"), ("s1", "s1/", "p2"), ("s2", "s2/", "p3")]
    assert base.participants[0].n_tokens == 3 and base.participants[0].n_correct == 2
    assert base.participants[0].n_option_correct is None
    # p1's tokens: a 2-token response then a 1-token one; only the latter is an option choice (3 vs 4).
    assert (post.participants[0].n_option_correct, post.participants[0].n_option_tokens) == (0, 1)


def test_study_and_model_scores(pair):
    _, base = pair
    rows = metrics.study_scores(base)
    assert [r["study"] for r in rows] == ["s1", "s2"]
    s1, s2 = rows
    assert s1["n_participants"] == 2 and s1["n_responses"] == 3
    assert s1["mean_nll"] == pytest.approx((1 + 2 + 3) / 3)  # response-pooled
    assert s1["participant_mean_nll"] == pytest.approx(((1 + 2) / 2 + 3) / 2)  # mean of participant means
    assert s1["sd_nll"] == pytest.approx(1.0)
    assert s2["mean_nll"] == pytest.approx(3.0)
    score = metrics.model_score(rows)
    assert score["score"] == pytest.approx((2.0 + 3.0) / 2)
    assert score["score_participant"] == pytest.approx((2.25 + 3.0) / 2)
    assert score["n_studies"] == 2 and score["n_responses"] == 5 and score["n_participants"] == 3
    # accuracy: s1 3 of 4 tokens, s2 1 of 2 → mean over studies; no option_argmax → n/a
    assert s1["accuracy"] == pytest.approx(0.75) and s2["accuracy"] == pytest.approx(0.5)
    assert score["accuracy"] == pytest.approx(0.625)
    assert math.isnan(score["option_accuracy"])


def test_option_accuracy(pair):
    post, _ = pair
    rows = metrics.study_scores(post)
    # Only single-token responses are option choices: s1 p1's second response (3 vs 4) and p2's (5 vs 5)
    # → 1 of 2; s2 p3's two responses [7, 0] vs [7, 9] → 1 of 2.
    assert rows[0]["option_accuracy"] == pytest.approx(1 / 2) and rows[1]["option_accuracy"] == pytest.approx(1 / 2)
    assert metrics.model_score(rows)["option_accuracy"] == pytest.approx(1 / 2)
    assert metrics.model_score(rows)["accuracy"] == pytest.approx((1 / 4 + 0 / 2) / 2)


def test_unscored_response_is_left_out(tmp_path):
    run = load(write_results(str(tmp_path / "r"), "M", [("s1", "p1", [1.0, None, 3.0])]))
    (row,) = metrics.study_scores(run)
    assert row["n_responses"] == 2 and row["n_unscored_responses"] == 1
    assert row["mean_nll"] == pytest.approx(2.0)


def test_reference_pair_d_both_ddofs(pair):
    post, base = pair
    # s1: base [1, 2, 3] mean 2, squared deviations 1 + 0 + 1 = 2; post [2, 3, 5] mean 10/3,
    #     squared deviations (4/3)² + (1/3)² + (5/3)² = 42/9.
    # s2: base [2, 4] mean 3, squared deviations 2; post [2, 6] mean 4, squared deviations 8.
    d1_s1 = (10 / 3 - 2) / math.sqrt(((42 / 9) / 2 + 2 / 2) / 2)
    d1_s2 = (4 - 3) / math.sqrt((8 / 1 + 2 / 1) / 2)
    d0_s1 = (10 / 3 - 2) / math.sqrt(((42 / 9) / 3 + 2 / 3) / 2)
    d0_s2 = (4 - 3) / math.sqrt((8 / 2 + 2 / 2) / 2)
    post_m, base_m = metrics.nll_moments(post), metrics.nll_moments(base)
    ref1 = pairs.reference_pair_d(post_m, base_m, ddof=1)
    ref0 = pairs.reference_pair_d(post_m, base_m, ddof=0)
    assert ref1.per_study == pytest.approx({"s1": d1_s1, "s2": d1_s2})
    assert ref1.d == pytest.approx((d1_s1 + d1_s2) / 2) and ref1.reason == ""
    assert ref0.d == pytest.approx((d0_s1 + d0_s2) / 2)
    assert ref0.d != pytest.approx(ref1.d)


def test_reference_pair_d_needs_two_studies(tmp_path, pair):
    _, base = pair
    post = load(write_results(str(tmp_path / "one"), "Post-1B", POST_ROWS[:2], kind="Reasoning", base_hf_id="Base-1B"))
    ref = pairs.reference_pair_d(metrics.nll_moments(post), metrics.nll_moments(base), ddof=1)
    assert math.isnan(ref.d) and "1 common studies" in ref.reason
    assert list(ref.per_study) == ["s1"]  # still reported per study
    loose = pairs.reference_pair_d(metrics.nll_moments(post), metrics.nll_moments(base), ddof=1, min_studies=1)
    assert loose.d == pytest.approx(ref.per_study["s1"])


def test_nan_study_d_is_skipped_like_pandas():
    one = {"a": stats.moments(np.array([1.0])), "b": stats.moments(np.array([1.0, 3.0]))}
    two = {"a": stats.moments(np.array([2.0])), "b": stats.moments(np.array([2.0, 4.0]))}
    ref = pairs.reference_pair_d(two, one, ddof=1)  # study a: one response each → SD undefined
    assert math.isnan(ref.per_study["a"])
    assert ref.d == pytest.approx((3 - 2) / math.sqrt((2 + 2) / 2))


def test_accuracy_pair_d_sign(pair):
    post, base = pair
    # tokens: s1 base [1, 1, 0, 1] (p = 3/4), post [1, 0, 0, 0] (p = 1/4): ddof=1 variances 1/4 and 1/4;
    #         s2 base [1, 0] (p = 1/2, variance 1/2), post [0, 0] (variance 0).
    d_s1 = (0.25 - 0.75) / math.sqrt((0.25 + 0.25) / 2)
    d_s2 = (0.0 - 0.5) / math.sqrt((0.0 + 0.5) / 2)
    ref = pairs.reference_pair_d(metrics.accuracy_moments(post), metrics.accuracy_moments(base), ddof=1)
    assert ref.per_study == pytest.approx({"s1": d_s1, "s2": d_s2})
    assert ref.d == pytest.approx(-1.0) and ref.d < 0  # negative = post-training is worse


def test_paired_statistics(pair):
    post, base = pair
    summary, studies = pairs.pair_statistics(post, base, metrics.resolve_ddof("reference"), n_boot=200, seed=0)
    s1, s2 = studies
    # s1 differences post − base: p1 [1, 1], p2 [2] → mean 4/3, squared deviations 6/9, ddof=1 variance 1/3
    assert s1["n_responses"] == 3 and s1["n_participants"] == 2
    assert s1["mean_diff"] == pytest.approx(4 / 3)
    assert s1["sd_diff"] == pytest.approx(math.sqrt(1 / 3))
    assert s1["paired_d"] == pytest.approx((4 / 3) / math.sqrt(1 / 3))
    # s2 differences [0, 2] → mean 1, variance 2
    assert s2["mean_diff"] == pytest.approx(1.0) and s2["paired_d"] == pytest.approx(1 / math.sqrt(2))
    assert summary["mean_diff"] == pytest.approx((4 / 3 + 1) / 2)
    assert summary["mean_paired_d"] == pytest.approx(((4 / 3) / math.sqrt(1 / 3) + 1 / math.sqrt(2)) / 2)
    assert summary["matched_responses"] == 5 and summary["unaligned_participants"] == 0
    assert summary["n_common_studies"] == 2 and not math.isnan(summary["d_pair"])
    assert summary["accuracy_d"] == pytest.approx(-1.0)
    assert summary["ci_studies_lo"] <= summary["mean_diff"] <= summary["ci_studies_hi"]


def test_unmatched_responses_are_counted(tmp_path):
    base = load(
        write_results(
            str(tmp_path / "b"),
            "B",
            [("s1", "p1", [1.0, 2.0]), ("s1", "p2", [1.0, 1.0]), ("s1", "p3", [1.0, None]), ("s1", "only-base", [4.0])],
        )
    )
    post = load(
        write_results(
            str(tmp_path / "p"),
            "P",
            [("s1", "p1", [2.0, 4.0]), ("s1", "p2", [5.0]), ("s1", "p3", [3.0, 3.0]), ("s1", "only-post", [1.0])],
            kind="Reasoning",
            base_hf_id="B",
        )
    )
    (m,) = pairs.match_runs(post, base).values()
    assert m.only_a == 1 and m.only_b == 1
    assert m.unaligned == 1  # p2: 1 response vs 2
    assert m.dropped == 2 + 1  # p2's responses, and p3's second response (unscored by the base)
    assert m.differences().tolist() == [1.0, 2.0, 2.0]
    loose = pairs.match_runs(post, base, prefix=True)["s1"]
    assert loose.unaligned == 0 and loose.differences().tolist() == [1.0, 2.0, 4.0, 2.0]


def test_bootstrap_ci_contains_truth_and_is_deterministic():
    rng = np.random.default_rng(1)
    values = 1.0 + 0.1 * rng.standard_normal(60)
    ci = stats.bootstrap_ci(values, 2000, seed=3)
    assert ci[0] < 1.0 < ci[1] and ci[1] - ci[0] < 0.1
    assert stats.bootstrap_ci(values, 2000, seed=3) == ci
    assert stats.bootstrap_ci(values, 2000, seed=4) != ci
    assert all(math.isnan(x) for x in stats.bootstrap_ci([1.0], 100, seed=0))


def test_two_level_bootstrap():
    rng = np.random.default_rng(2)
    groups = []
    for _ in range(20):
        counts = rng.integers(1, 5, size=15).astype(float)
        sums = np.array([np.sum(0.5 + 0.2 * rng.standard_normal(int(c))) for c in counts])
        groups.append((sums, counts))
    ci = stats.bootstrap_two_level_ci(groups, 1000, seed=0)
    assert ci[0] < 0.5 < ci[1]
    assert stats.bootstrap_two_level_ci(groups, 1000, seed=0) == ci
    # constant differences: every resample gives the same mean
    const = [(np.array([1.5, 0.5]), np.array([3.0, 1.0])), (np.array([1.0]), np.array([2.0]))]
    assert stats.bootstrap_two_level_ci(const, 100, seed=0) == pytest.approx((0.5, 0.5))


def test_wilcoxon_exact_case():
    # 5 positive effects: W− = 0, exact two-sided p = 2 / 2**5
    stat, p = stats.wilcoxon_test([0.1, 0.2, 0.3, 0.4, 0.5])
    assert stat == 0.0 and p == pytest.approx(2 / 32)
    values = [0.3, -0.1, 0.25, 0.4, -0.05, 0.2, 0.15]
    ref = scipy.stats.wilcoxon(values)
    assert stats.wilcoxon_test(values) == pytest.approx((ref.statistic, ref.pvalue))
    assert all(math.isnan(x) for x in stats.wilcoxon_test([0.0, 0.0, 0.0]))


CATEGORY_ROWS = [
    {"experiment": "s1", "dataset": "Psych-201", "Risky Choice": "1", "Memory": "0", "Moral Judgment": "0"},
    {"experiment": "s2", "dataset": "Psych-201", "Risky Choice": "0", "Memory": "1", "Moral Judgment": "0"},
    {"experiment": "s3", "dataset": "Psych-101", "Risky Choice": "0", "Memory": "0", "Moral Judgment": "1"},
    {"experiment": "s4", "dataset": "Psych-101", "Risky Choice": "0", "Memory": "0", "Moral Judgment": "0"},
]


def test_domain_matrix_join_and_drops():
    cats = domains.parse_categories(CATEGORY_ROWS)
    assert cats.names == ("Risky Choice", "Memory", "Moral Judgment") and cats.of["s4"] == ()
    per_pair = {"A": {"s1": 0.2, "s2": 0.4, "s3": 1.0, "s4": 5.0, "s5": 7.0}, "B": {"s1": 0.6, "s5": 9.0}}
    cols, matrix, average = domains.domain_matrix(per_pair, cats, drop=domains.REFERENCE_DROPPED_DOMAINS)
    assert cols == ["Risky Choice", "Memory"]
    assert matrix[0].tolist() == pytest.approx([0.2, 0.4])
    assert matrix[1, 0] == pytest.approx(0.6) and math.isnan(matrix[1, 1])
    assert average.tolist() == pytest.approx([0.4, 0.4])  # nanmean over pairs
    cols, matrix, _ = domains.domain_matrix(per_pair, cats, other=True)
    assert cols == ["Risky Choice", "Memory", "Moral Judgment", "Other"]
    assert matrix[0, 2] == pytest.approx(1.0)
    assert matrix[0, 3] == pytest.approx((5.0 + 7.0) / 2)  # uncategorised + absent from the CSV


def test_bundled_categories():
    cats = runs.load_categories()
    assert len(cats.names) == 11 and len(cats.of) == 157
    counts = {n: sum(n in c for c in cats.of.values()) for n in cats.names}
    assert counts["Reinforcement Learning"] == 59 and counts["Psycholinguistics"] == 17
    assert sum(1 for c in cats.of.values() if not c) == 9
    assert cats.of["franke2024bayesian"] == ("Psycholinguistics",)


def test_persona_common_subset(tmp_path):
    none = load(
        write_results(
            str(tmp_path / "none"),
            "M",
            [
                ("s1", "p1", [2.0, 4.0]),
                ("s1", "p2", [3.0, 3.0]),
                ("s1", "p3", [6.0]),
                ("gunadi2021deferral", "p9", [1.0, 2.0]),
            ],
        )
    )
    matched = load(
        write_results(
            str(tmp_path / "matched"),
            "M",
            [("s1", "p1", [1.0, 3.0]), ("s1", "p2", [3.0]), ("gunadi2021deferral", "p9", [9.0, 9.0])],
            persona="matched",
        )
    )
    summary, studies = persona.persona_statistics(none, matched, ddof=0, n_boot=100, seed=0)
    assert [s["study"] for s in studies] == ["s1"]  # the reference's exclusions
    (s1,) = studies
    # reference subsets: none [2, 4, 3, 3, 6] mean 3.6, squared deviations 9.2; matched [1, 3, 3] mean 7/3,
    # squared deviations 24/9; ddof 0
    assert s1["reference_d"] == pytest.approx((3.6 - 7 / 3) / math.sqrt((9.2 / 5 + (24 / 9) / 3) / 2))
    # common subset (p1, p2; p2 on its first response): none [2, 4, 3] vs matched [1, 3, 3]
    assert s1["common_d"] == pytest.approx((3 - 7 / 3) / math.sqrt((2 / 3 + (24 / 9) / 3) / 2))
    assert s1["n_common"] == 2 and s1["only_control"] == 1 and s1["only_persona"] == 0
    assert s1["dropped_responses"] == 1
    # per participant: p1 3 − 2 = 1, p2 3 − 3 = 0
    assert s1["mean_benefit"] == pytest.approx(0.5) and s1["share_helped"] == pytest.approx(0.5)
    assert s1["sd_benefit"] == pytest.approx(0.5)  # ddof 0
    assert summary["reference_d"] == pytest.approx(s1["reference_d"])
    assert summary["n_common_participants"] == 2 and summary["only_control"] == 1
    assert math.isnan(summary["ci_studies_lo"])  # one study: no CI over studies


def test_find_pairs_and_persona_comparisons(tmp_path):
    base = load(write_results(str(tmp_path / "b"), "B", BASE_ROWS))
    chat = load(write_results(str(tmp_path / "c"), "P", POST_ROWS, kind="Reasoning", base_hf_id="B", template="chat"))
    orphan = load(write_results(str(tmp_path / "o"), "Q", POST_ROWS, kind="Code", base_hf_id="Missing"))
    matched = load(write_results(str(tmp_path / "m"), "B", BASE_ROWS, persona="matched"))
    shuffled = load(write_results(str(tmp_path / "s"), "B", BASE_ROWS, persona="shuffled"))
    subset = load(write_results(str(tmp_path / "u"), "B", BASE_ROWS[:2], persona_subset=True))
    found, unpaired = pairs.find_pairs([base, chat, orphan, matched, shuffled])
    assert [(p.model, b.model) for p, b in found] == [("P", "B")]  # chat post → the base's plain run
    assert [(r.model, "Missing" in why) for r, why in unpaired] == [("Q", True)]
    comparisons = persona.find_persona_comparisons([base, chat, orphan, matched, shuffled, subset])
    assert [(c, a.condition.persona, a.condition.persona_subset, b.condition.persona) for c, a, b in comparisons] == [
        ("matched_vs_none", "none", False, "matched"),
        ("matched_vs_none_subset", "none", True, "matched"),
        ("matched_vs_shuffled", "shuffled", False, "matched"),
    ]
    assert subset.condition != base.condition  # not a duplicate of the plain run


def test_resolve_ddof():
    assert metrics.resolve_ddof("reference") == {"pair": 1, "domain": 0, "persona": 0, "accuracy": 1}
    assert set(metrics.resolve_ddof("0").values()) == {0}
    with pytest.raises(ValueError):
        metrics.resolve_ddof("2")


def test_reads_rows_of_the_results_writer(tmp_path):
    """Rows as ``results.ResultsWriter`` commits them (not hand-written JSON) load into a Run."""
    from psych201_jax.types import ParticipantResult, ParticipantSpans, Rejected

    spans = ParticipantSpans(
        study="s1",
        experiment="s1/",
        participant="p1",
        token_ids=np.arange(6, dtype=np.int32),
        response_index=np.array([-1, 0, -1, 1, 1, -1], dtype=np.int32),
        n_responses=2,
        responses_text=2,
        responses_scored=2,
        lost_truncation=0,
    )
    scored = ParticipantResult(
        spans=spans,
        nll=np.array([1.5, np.nan]),
        n_scored=np.array([1, 0], dtype=np.int32),
        argmax=np.array([4, 7], dtype=np.int32),
        target=np.array([4, 8], dtype=np.int32),
    )
    config = {
        "model_info": {"hf_id": "M", "family": "F", "generation": "G", "size_b": 2.0, "kind": "base", "base_hf_id": ""},
        "protocol": "robust",
        "template": "none",
        "persona": "none",
        "dtype": "bfloat16",
        "data": "d",
    }
    writer = results.ResultsWriter(str(tmp_path), {"fingerprint": "f", "determinants": {}, "config": config})
    writer.commit(
        [scored, Rejected(study="s1", experiment="s1/", participant="p2", source="src", line=2, reason="empty")]
    )
    run = load(str(tmp_path))
    assert run.model == "M" and run.condition.protocol == "robust" and run.condition.dtype == "bfloat16"
    assert run.n_rejected == 1 and run.info["size_b"] == 2.0
    (p,) = run.participants
    assert p.nll[0] == 1.5 and math.isnan(p.nll[1]) and (p.n_tokens, p.n_correct) == (2, 1)
    (row,) = metrics.study_scores(run)
    assert row["n_responses"] == 1 and row["n_unscored_responses"] == 1 and row["mean_nll"] == 1.5


def test_option_accuracy_without_options_is_nan_and_left_out(tmp_path):
    """A study with no single-token options (option_argmax all -1) has no option accuracy."""
    rows = [("s1", "p1", [1.0], tokens([4], [4], [4])), ("s2", "p2", [1.0], tokens([5], [6], [-1]))]
    run = load(write_results(str(tmp_path / "r"), "M-1B", rows))
    by_study = {r["study"]: r for r in metrics.study_scores(run)}
    assert by_study["s1"]["option_accuracy"] == 1.0 and math.isnan(by_study["s2"]["option_accuracy"])
    assert metrics.model_score(list(by_study.values()))["option_accuracy"] == 1.0
