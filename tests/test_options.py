"""Option-restricted argmax: options per study, brute force over full logits, mesh = one device, job + analysis."""

import csv
import itertools
import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psych201_jax import defaults
from psych201_jax.conditions import DEFAULT_TEMPERATURES
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint
from psych201_jax.runs import job
from psych201_jax.runs import store as results
from psych201_jax.runs.config import ScoreJob
from psych201_jax.scoring import options as options_lib
from psych201_jax.scoring import packing, scorer, stream
from psych201_jax.scoring.head import option_logits, option_max
from psych201_jax.testing import tiny_models
from psych201_jax.types import ParticipantSpans

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = ("thoma2025riskychoice", "busch2024_stroop")  # single letters; left/right/down
ROW_LENGTHS = (2048, 4096, 8192)
TOKENS_PER_BATCH = 8192
GRID = (0.5, 1.0, 2.0)  # the fixture's temperature grid


def _spans(study, name, tokens, responses):
    n = max(responses) + 1
    return ParticipantSpans(
        study=study,
        experiment="e",
        participant=name,
        token_ids=np.asarray(tokens, np.int32),
        response_index=np.asarray(responses, np.int32),
        n_responses=n,
        responses_text=n,
        responses_scored=n,
        lost_truncation=0,
    )


def test_collect_options_keeps_single_token_responses(caplog):
    items = [
        # responses: 0 = [10] (single), 1 = [12, 13] (two tokens), 2 = [14] (single)
        _spans("a", "p1", [5, 10, 11, 12, 13, 14], [-1, 0, -1, 1, 1, 2]),
        # response 0 sits at position 0 (nothing predicts it: no scored token), response 1 = [20]
        _spans("a", "p2", [7, 10, 20], [0, -1, 1]),
        records.Rejected(study="a", experiment="e", participant="p3", source="f", line=3, reason="bad"),
        _spans("b", "p1", [5, 1, 2, 6], [-1, 0, 0, -1]),
        _spans("c", "p1", [5, 32, 30, 30, 31, 29, 30, 31], [-1, 0, 1, 2, 3, 4, 5, 6]),
    ]
    got = options_lib.collect_options(items)
    assert got.keys() == {"a", "b", "c"}
    np.testing.assert_array_equal(got["a"], [10, 14, 20])
    assert got["b"].dtype == np.int32 and got["b"].size == 0
    np.testing.assert_array_equal(got["c"], [29, 30, 31, 32])
    with caplog.at_level(logging.WARNING):
        capped = options_lib.collect_options(items, max_options=3)
    np.testing.assert_array_equal(capped["c"], [29, 30, 31])  # 30 x3, 31 x2; 29 and 32 once: lowest id
    assert "most frequent" in caplog.text and "study c" in caplog.text


def test_option_max_ties_vocabulary_shards_and_no_options():
    unembedding = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    unembedding = unembedding.at[5].set(unembedding[3])  # ids 3 and 5 tie
    h = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
    ids = jnp.asarray([1, 3, 5, 0], jnp.int32)  # the last one is padding
    mask = jnp.asarray([[False, True, True, False], [True, True, True, False], [False] * 4])
    best, best_id = option_max(option_logits(h, unembedding, ids, mask), ids)
    logits = np.asarray(h @ unembedding.T)
    assert int(best_id[0]) == 3 and float(best[0]) == pytest.approx(logits[0, 3])
    assert int(best_id[1]) == [1, 3][int(np.argmax(logits[1, [1, 3]]))]
    assert int(best_id[2]) == -1 and float(best[2]) == -np.inf
    # A vocabulary shard holding ids 4..7 sees only id 5.
    _, shard_id = option_max(option_logits(h, unembedding[4:], ids, mask, offset=4), ids)
    np.testing.assert_array_equal(np.asarray(shard_id), [5, 5, -1])


def test_plan_steps_take_the_largest_option_capacity():
    tables = [np.array([[2, 4096, 256, 32], [2, 4096, 512, 64]]), np.array([[2, 4096, 256, 128]])]
    steps = stream.plan_steps(tables, (0, 1), 0, 2)
    assert [(s.capacity, s.option_capacity, s.slots) for s in steps] == [(512, 128, (1, 0))]


@pytest.fixture(scope="module")
def scored(data_root, tmp_path_factory):
    """Two participants of each study (packed together) scored with options and a temperature grid, and
    the JAX model."""
    root = tmp_path_factory.mktemp("options_model")
    hf_dir = tiny_models.make_tiny_hf_checkpoint(
        "qwen3", str(root / "hf"), defaults.DEFAULT_TOKENIZER, max_position_embeddings=max(ROW_LENGTHS)
    )
    checkpoint.convert(hf_dir, str(root / "converted"), "float32")
    model, _ = checkpoint.load_model(str(root / "converted"), dtype="float32")
    tok = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    recs = [r for s in STUDIES for r in itertools.islice(records.iter_records(f"{data_root}/{s}"), 2)]
    items = list(spans.tokenize_records(recs, tok, spans.SpanRules("reference")))
    options = options_lib.collect_options(items)
    assert all(len(options[s]) >= 2 for s in STUDIES), options
    batches = packing.pack(items, ROW_LENGTHS, tokens_per_batch=TOKENS_PER_BATCH)
    assert any({k[0] for k, _ in b.slot_keys} == set(STUDIES) for b in batches), "studies must share a batch"
    sc = scorer.Scorer(model, vocab_chunk=1000, options=options, temperatures=GRID)
    out = list(stream.score_spans(items, sc, row_lengths=ROW_LENGTHS, tokens_per_batch=TOKENS_PER_BATCH))
    return model, items, options, {r.key: r for r in out}, batches


def _per_response(values, responses, n_responses):
    """Sums of per-token ``values`` [S, ...] per response [R, ...] (float64), NaN where a response has none."""
    sums = np.zeros((n_responses, *values.shape[1:]))
    np.add.at(sums, responses, values)
    sums[np.bincount(responses, minlength=n_responses) == 0] = np.nan
    return sums


def _check_calibration(r, logits, targets, responses, n_responses, study_options):
    """The result's nll_t, entropy and option_mass against the full float64 logits [S, V] of its tokens."""

    def log_softmax(z):
        return z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1))[:, None]

    logp, tokens = log_softmax(logits), np.arange(len(targets))
    per_token = {
        "nll_t": np.stack([-log_softmax(logits / t)[tokens, targets] for t in GRID], axis=1),
        "entropy": -(np.exp(logp) * logp).sum(-1),
        "option_mass": np.exp(logp[:, study_options]).sum(-1),
    }
    np.testing.assert_array_equal(r.nll_t[:, GRID.index(1.0)], r.nll)  # T = 1 is the NLL itself
    for name, values in per_token.items():
        expected = _per_response(values, responses, n_responses)
        np.testing.assert_allclose(getattr(r, name), expected, rtol=1e-4, atol=1e-3, err_msg=name)


def test_option_argmax_is_the_argmax_of_full_logits_over_the_study_options(scored):
    """And the result's calibration statistics are those of the full logits, response by response."""
    model, items, options, got, _ = scored

    # The plain full-vocabulary path on one participant at a time (end-padded to one shape): [1, L, V].
    def logits_of(m, tokens, positions, segment_ids):
        hidden = m(tokens, positions, segment_ids)
        return jnp.einsum("btd,vd->btv", hidden, m.unembedding(), preferred_element_type=jnp.float32)

    full_logits = nnx.jit(logits_of)
    length = max(ROW_LENGTHS)
    n_compared = n_tokens = 0
    for p in items:
        r = got[p.key]
        assert r.option_argmax.dtype == np.int32 and r.option_argmax.shape == r.argmax.shape
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(p.token_ids)] = p.token_ids
        segment_ids = (np.arange(length) < len(p.token_ids)).astype(np.int32)[None]
        logits = np.asarray(full_logits(model, tokens, np.arange(length)[None], segment_ids))[0]
        positions = np.flatnonzero(p.response_index[1:] >= 0) + 1
        restricted = logits[positions - 1][:, options[p.study]]  # [S, n options]
        expected = options[p.study][np.argmax(restricted, axis=1)]
        top2 = np.sort(restricted, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-4  # packed vs unpacked float32 may reorder near-ties only
        np.testing.assert_array_equal(r.option_argmax[clear], expected[clear], err_msg=str(p.key))
        chosen = restricted[np.arange(len(positions)), np.searchsorted(options[p.study], r.option_argmax)]
        np.testing.assert_allclose(chosen, restricted.max(axis=1), rtol=0, atol=1e-4)
        n_compared += int(clear.sum())
        n_tokens += len(positions)
        all_logits = logits[positions - 1].astype(np.float64)
        _check_calibration(
            r, all_logits, p.token_ids[positions], p.response_index[positions], p.n_responses, options[p.study]
        )
    assert n_tokens > 150 and n_compared > 0.9 * n_tokens


def test_study_without_options_has_no_option_in_the_mask(scored):
    """Its entries get option_argmax -1 (``option_max`` with an empty mask row)."""
    _, _, options, _, batches = scored
    only_thoma = {"thoma2025riskychoice": options["thoma2025riskychoice"]}
    for batch in batches:
        ids, mask = options_lib.option_plan(batch, only_thoma)
        assert ids.shape == (32,) and mask.shape == (batch.capacity, 32)
        slot_study = np.asarray([key[0] for key, _ in batch.slot_keys])
        thoma = batch.score_valid & (slot_study[batch.score_slot] == "thoma2025riskychoice")
        assert not mask[~thoma].any() and (mask[thoma].sum(axis=1) == 3).all()


@pytest.mark.slow
def test_mesh_paths_give_the_single_device_option_argmax():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "mp_driver.py"), "options"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["with_option"] > 0.5 * report["tokens"] and report["made_up_chosen"] > 0, report
    for mesh, r in report["meshes"].items():
        assert r["option_equal"] and r["argmax_equal"], (mesh, r)
        assert set(r["calibration_max_rel"]) == {"nll_t", "entropy", "option_mass"}, (mesh, r)
        # NLL_T moves by a logit's rounding over T: at the grid's T = 0.25, four times the 1e-5 of the others.
        limits = {"nll_t": 1e-5 / min(DEFAULT_TEMPERATURES), "entropy": 1e-5, "option_mass": 1e-5}
        assert all(r["calibration_max_rel"][k] <= limits[k] for k in limits), (mesh, r)
    assert report["meshes"]["1x1x1"]["max_abs"] == 0.0


def test_job_stores_option_argmax_and_analysis_reports_option_accuracy(tmp_path):
    cfg = ScoreJob().with_overrides(
        dict(
            out=str(tmp_path / "res"),
            data=os.path.join(defaults.SAMPLE_DATA, "thoma2025riskychoice"),
            options="study",
            log_every_s=1e9,
        )
    )
    job.run(cfg)
    assert results.read_manifest(cfg.out)["determinants"]["options"] == "study"
    rows = list(results.iter_rows(cfg.out))
    assert rows and all(r["status"] == "scored" for r in rows)
    letters = set()
    for r in rows:
        assert len(r["option_argmax"]) == len(r["argmax"]) == len(r["target"])
        letters.update(r["target"])
    assert {x for r in rows for x in r["option_argmax"]} <= letters  # every response is one letter

    report_dir = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "psych201_jax.cli.analyze",
            f"--results={cfg.out}",
            f"--out={report_dir}",
            "--bootstrap=10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(report_dir / "study_scores.csv") as fh:
        (study,) = list(csv.DictReader(fh))
    expected = np.mean([o == t for r in rows for o, t in zip(r["option_argmax"], r["target"])])
    assert float(study["option_accuracy"]) == pytest.approx(expected)
    assert float(study["option_accuracy"]) >= float(study["accuracy"])


def test_unknown_options_value_is_refused(tmp_path):
    out = str(tmp_path / "res")
    with pytest.raises(job.ConfigError, match="config.options='all' is not one of"):
        job.run(ScoreJob().with_overrides(dict(out=out, options="all")))
    assert not os.path.exists(out)


def test_heads_sharing_one_forward_equal_each_scorer_alone(scored):
    """A sweep worker's shared pass: one forward per batch, a plain, an options and a temperature-grid head
    on it; each head's results are bit-identical to its own scorer's."""
    model, items, options, _, batches = scored
    kwargs = dict(row_lengths=ROW_LENGTHS, tokens_per_batch=TOKENS_PER_BATCH)
    base = scorer.Scorer(model, vocab_chunk=1000)
    heads = [base, base.with_head(options=options), base.with_head(temperatures=(0.5, 1.0, 2.0))]
    shared = list(stream.score_spans_heads(items, heads, **kwargs))
    alone = [
        scorer.Scorer(model, vocab_chunk=1000),
        scorer.Scorer(model, vocab_chunk=1000, options=options),
        scorer.Scorer(model, vocab_chunk=1000, temperatures=(0.5, 1.0, 2.0)),
    ]
    fields = ("nll", "n_scored", "argmax", "target", "option_argmax", "nll_t", "entropy", "option_mass")
    for h, sc in enumerate(alone):
        single = {r.key: r for r in stream.score_spans(items, sc, **kwargs)}
        for per_head in shared:
            mine, theirs = per_head[h], single[per_head[h].key]
            for f in fields:
                a, b = getattr(mine, f), getattr(theirs, f)
                assert (a is None) == (b is None), (h, f)
                assert a is None or np.array_equal(a, b, equal_nan=True), (h, f)
    assert shared[0][1].option_argmax is not None and shared[0][0].option_argmax is None
    assert shared[0][2].nll_t is not None and shared[0][1].nll_t is None
    # One forward program per batch shape for all three heads.
    assert base.compilations()["forward"] == len({(b.rows, b.row_length) for b in batches})
