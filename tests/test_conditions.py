"""Persona conditions: matched, shuffled (seeded derangement within a study), and the subset restriction."""

import itertools

from psych201_jax.data import metadata, records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.types import Excluded


def _recs(data_root, study, n):
    return [r for r in itertools.islice(records.iter_records(f"{data_root}/{study}"), n)]


def test_shuffled_is_a_seeded_derangement_within_each_study(data_root):
    recs = _recs(data_root, "thoma2025riskychoice", 40) + _recs(data_root, "busch2024_stroop", 20)
    mapping = metadata.shuffled_personas(recs, seed=3)
    assert set(mapping) == {r.key for r in recs}
    by_key = {r.key: r for r in recs}
    for key, persona in mapping.items():
        donors = [r for r in recs if r.metadata is persona]
        assert len(donors) == 1 and donors[0].key != key and donors[0].study == by_key[key].study
    assert len({id(p) for p in mapping.values()}) == len(recs)  # a permutation: every persona used once
    assert metadata.shuffled_personas(recs, seed=3) == mapping
    assert metadata.shuffled_personas(recs, seed=4) != mapping


def test_selectors(data_root, qwen_tokenizer_dir):
    with_meta = _recs(data_root, "thoma2025riskychoice", 3)
    without = _recs(data_root, "franke2024bayesian", 2)
    recs = with_meta + without
    assert metadata.persona_selector("none") is None
    subset = metadata.persona_selector("none", subset_only=True)
    assert [subset(r) for r in with_meta] == [None] * 3 and all(isinstance(subset(r), Excluded) for r in without)
    shuffled = metadata.persona_selector("shuffled", records=recs, seed=0)
    assert all(shuffled(r) is not r.metadata and metadata.has_persona(shuffled(r)) for r in with_meta)
    lonely = metadata.persona_selector("shuffled", records=with_meta[:1], seed=0)
    assert "no other participant" in lonely(with_meta[0]).reason

    tok = TokenizerInfo(qwen_tokenizer_dir)
    out = list(spans.tokenize_records(recs, tok, spans.SpanRules("reference"), persona_of=subset))
    assert [type(o).__name__ for o in out] == ["ParticipantSpans"] * 3 + ["Rejected"] * 2
    assert all("excluded by the persona condition" in o.reason for o in out[3:])
    plain = list(spans.tokenize_records(with_meta, tok, spans.SpanRules("reference")))
    assert all((a.token_ids == b.token_ids).all() for a, b in zip(out[:3], plain))
    swapped = list(spans.tokenize_records(with_meta, tok, spans.SpanRules("reference"), persona_of=shuffled))
    matched = list(
        spans.tokenize_records(
            with_meta, tok, spans.SpanRules("reference"), persona_of=metadata.persona_selector("matched")
        )
    )
    assert all(len(s.token_ids) > len(p.token_ids) for s, p in zip(swapped, plain))
    assert any(
        len(s.token_ids) != len(m.token_ids) or (s.token_ids != m.token_ids).any() for s, m in zip(swapped, matched)
    )


def test_robust_budget_is_the_same_with_and_without_persona_in_a_job(tmp_path):
    """Persona prefix, BOS and chat header are outside the budget: both runs keep the same responses."""
    import os

    from psych201_jax import defaults
    from psych201_jax.runs import job
    from psych201_jax.runs import store as results
    from psych201_jax.runs.config import ScoreJob

    kept = {}
    for template in ("none", "chat"):
        for persona in ("none", "matched"):
            cfg = ScoreJob().with_overrides(
                dict(
                    out=str(tmp_path / f"{template}-{persona}"),
                    protocol="robust",
                    template=template,
                    persona=persona,
                    max_tokens=250,
                    log_every_s=1e9,
                    data=os.path.join(defaults.SAMPLE_DATA, "thoma2025riskychoice"),
                )
            )
            job.run(cfg)
            rows = list(results.iter_rows(cfg.out))
            assert all(r["status"] == "scored" for r in rows), [r.get("reason") for r in rows]
            kept[template, persona] = {r["participant"]: len(r["nll"]) for r in rows}
        assert kept[template, "none"] == kept[template, "matched"]
        assert all(0 < n < 9 for n in kept[template, "none"].values())  # the budget did cut (9 in the text)
