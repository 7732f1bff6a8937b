"""Packed scoring end to end: parity with HF PyTorch and invariance to packing."""

import itertools
import random

import numpy as np
import pytest

from psych201_jax import defaults
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint
from psych201_jax.scoring import packing, scorer, stream
from psych201_jax.testing import tiny_models, torch_reference
from psych201_jax.types import ParticipantResult

STUDIES = ("thoma2025riskychoice", "franke2024bayesian", "guenther2024substitutions", "busch2024_stroop")
PROTOCOLS = [("reference", "none"), ("reference", "chat"), ("robust", "none"), ("robust", "chat")]


@pytest.fixture(scope="module")
def sample(data_root):
    out = []
    for study in STUDIES:
        out.extend(itertools.islice(records.iter_records(f"{data_root}/{study}"), 2))
    assert all(isinstance(r, records.Record) for r in out)
    return out


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def models(request, tmp_path_factory, llama_tokenizer_dir):
    """(family, converted JAX model, HF torch model, tokenizer) on the same random weights."""
    family = request.param
    # The llama tokenizer merges '>>.\n' (runaway reference spans); the bundled one does not.
    tok_dir = llama_tokenizer_dir if family == "llama" else defaults.DEFAULT_TOKENIZER
    root = tmp_path_factory.mktemp(f"model_{family}")
    hf_dir = tiny_models.make_tiny_hf_checkpoint(family, str(root / "hf"), tok_dir, max_position_embeddings=16384)
    conv_dir = str(root / "converted")
    checkpoint.convert(hf_dir, conv_dir, "float32")
    model, spec = checkpoint.load_model(conv_dir, dtype="float32")
    return family, model, torch_reference.load_hf_model(hf_dir), TokenizerInfo(tok_dir)


def _score(items, model, **kw):
    kw.setdefault("row_lengths", (2048, 4096, 8192, 16384))
    kw.setdefault("tokens_per_batch", 16384)
    out = list(stream.score_spans(items, scorer.Scorer(model, vocab_chunk=1000), **kw))
    assert all(isinstance(r, ParticipantResult) for r in out), out
    return {r.key: r for r in out}


@pytest.mark.parametrize("protocol,template", PROTOCOLS)
def test_scores_equal_hf_pytorch_reference(models, sample, protocol, template):
    family, model, torch_model, tok = models
    items = list(spans.tokenize_records(sample, tok, spans.SpanRules(protocol, template, token_budget=4000)))
    got = _score(items, model)
    worst = 0.0
    for ps in items:
        expected = torch_reference.reference_response_nll(torch_model, ps.token_ids, ps.response_index)
        ours = got[ps.key].nll
        assert len(ours) == len(expected) == ps.n_responses, ps.key
        n_tokens = got[ps.key].n_scored
        worst = max(worst, float(np.max(np.abs(ours - expected) / np.maximum(n_tokens, 1))))
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
    assert worst < 1e-5, worst  # per scored token


def test_argmax_matches_full_logits(models, sample):
    _, model, torch_model, tok = models
    import torch

    items = list(spans.tokenize_records(sample[:2], tok, spans.SpanRules("robust")))
    got = _score(items, model)
    for ps in items:
        ids = torch.as_tensor(ps.token_ids[None].astype(np.int64))
        with torch.inference_mode():
            top = torch_model(input_ids=ids).logits[0, :-1].argmax(-1).numpy()
        positions = np.flatnonzero(ps.response_index[1:] >= 0) + 1
        np.testing.assert_array_equal(got[ps.key].argmax, top[positions - 1])
        np.testing.assert_array_equal(got[ps.key].target, ps.token_ids[positions])


def test_results_do_not_depend_on_packing(models, sample):
    """Alone, together, reversed, other row lengths and batch sizes: the same per-response NLL."""
    _, model, _, tok = models
    items = list(spans.tokenize_records(sample, tok, spans.SpanRules("robust", token_budget=3000)))
    together = _score(items, model)
    variants = {
        "alone": {k: v for ps in items for k, v in _score([ps], model).items()},
        "reversed": _score(items[::-1], model),
        "shuffled_small_rows": _score(
            random.Random(0).sample(items, len(items)), model, row_lengths=(4096,), tokens_per_batch=4096
        ),
        "one_long_row": _score(items, model, row_lengths=(32768,), tokens_per_batch=32768),
        "small_chunks": _score(items, model, chunk_tokens=5000),
    }
    rows_together = packing.pack(items, (2048, 4096, 8192, 16384), tokens_per_batch=16384)
    assert any(len(b.segments) > 1 for b in rows_together), "the test must pack several participants per row"
    for name, res in variants.items():
        assert res.keys() == together.keys(), name
        for key in together:
            np.testing.assert_allclose(res[key].nll, together[key].nll, rtol=0, atol=2e-5, err_msg=name)
            np.testing.assert_array_equal(res[key].argmax, together[key].argmax, err_msg=name)


def test_too_long_participant_is_rejected_not_dropped(models, sample):
    _, model, _, tok = models
    items = list(spans.tokenize_records(sample[:3], tok, spans.SpanRules("reference")))
    longest = max(len(p.token_ids) for p in items)
    for kwargs in (dict(row_lengths=(longest - 1,)), dict(row_lengths=(4 * longest,), max_tokens=longest - 1)):
        out = list(stream.score_spans(items, scorer.Scorer(model), **kwargs))
        assert len(out) == 3
        rejected = [r for r in out if isinstance(r, records.Rejected)]
        assert rejected and all("exceed the limit" in r.reason and r.line > 0 for r in rejected)
