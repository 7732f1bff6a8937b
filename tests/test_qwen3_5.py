"""Qwen3.5 (Gated DeltaNet hybrid) against HF PyTorch: the wrapper (Qwen3_5ForConditionalGeneration, a tiny
vision tower and an mtp head saved with it, as hub checkpoints are) and the text-only Qwen3_5ForCausalLM.

Tiny random checkpoints of 8 layers (two repeats of three DeltaNet layers and one gated-attention layer)
on real Psych-201 transcripts of T = 4096 tokens, past 64 delta-rule chunks: float32 per-token log-probs
(HF's torch fallback of the chunked delta rule is the reference), bfloat16 KL, packed rows with segment
boundaries inside chunks, the leakage test, launch.score under both protocols, and real hub configs'
full-size parameter counts against HF's meta-device model.
"""

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_model_parity import _log_probs, _single_row, _token_log_probs
from test_vl_models import check_score_job_against_hf
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from psych201_jax.data import spans
from psych201_jax.model import checkpoint, delta_rule
from psych201_jax.model import hf_weights as weights
from psych201_jax.model import spec as modelspec
from psych201_jax.model.decoder import layer_groups, param_shapes
from psych201_jax.testing import tiny_tokenizer
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_CONFIGS = os.path.join(REPO, "tests", "data", "hub_configs")
T = 4096
CONTEXT = 16384
STUDIES = ("xu2023augmenting", "shahar2019twosteptask", "schiekiera2025metascience")
PATTERN = ("linear_attention",) * 3 + ("full_attention",)

# name -> (family, make_tiny_hf_checkpoint kwargs)
CASES = {
    "qwen3_5-wrapper-tied-mtp": ("qwen3_5", dict(tie_word_embeddings=True)),
    "qwen3_5_text-causal-lm-untied-shards": ("qwen3_5_text", dict(max_shard_size="200KB")),
}
PARITY: dict[str, dict[str, float]] = {}


def _hf(hf_dir, family, dtype):
    cls = AutoModelForImageTextToText if family == "qwen3_5" else AutoModelForCausalLM
    return cls.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").eval()


def _add_mtp_head(hf_dir):
    """Hub Qwen3.5 checkpoints carry a multi-token-prediction head (mtp.*) that HF skips on load."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["mtp.fc.weight"] = torch.zeros(8, 8)
    tensors["mtp.layers.0.input_layernorm.weight"] = torch.zeros(8)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def texts(data_root):
    return tiny_tokenizer.sample_texts(data_root, STUDIES, per_study=3, max_chars=60000)


@dataclasses.dataclass
class Case:
    name: str
    family: str
    hf_dir: str
    spec: modelspec.ModelSpec
    model32: object
    model16: object
    tokens: np.ndarray
    other_tokens: np.ndarray
    ref32: np.ndarray
    ref16: np.ndarray
    hf32_vs_hf64: float


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, texts, qwen_tokenizer_dir):
    family, kwargs = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_hf_checkpoint(
        family, str(root / "hf"), qwen_tokenizer_dir, max_position_embeddings=CONTEXT, **kwargs
    )
    if family == "qwen3_5":
        _add_mtp_head(hf_dir)
    checkpoint.convert(hf_dir, str(root / "f32"), "float32")
    checkpoint.convert(hf_dir, str(root / "bf16"), "bfloat16")
    model32, spec = checkpoint.load_model(str(root / "f32"))
    model16, _ = checkpoint.load_model(str(root / "bf16"))

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    long = [ids[:T] for ids in (tok(t).input_ids for t in texts) if len(ids) >= T]
    assert len(long) >= 2, "need two transcripts of at least T tokens"
    tokens, other = (np.asarray(ids, np.int32) for ids in long[:2])

    ids = torch.tensor(tokens[None], dtype=torch.long)
    with torch.no_grad():
        refs = {}
        for dtype in (torch.float32, torch.float64):
            hf = _hf(hf_dir, family, dtype)
            logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
            refs[dtype] = torch.log_softmax(logits.double(), -1).numpy()
        hf16 = _hf(hf_dir, family, torch.bfloat16)
        hidden = hf16.model(input_ids=ids, use_cache=False).last_hidden_state[0].float()
        ref16 = torch.log_softmax(hidden @ hf16.get_output_embeddings().weight.float().T, -1).numpy()
    noise = float(
        np.abs(_token_log_probs(refs[torch.float32], tokens) - _token_log_probs(refs[torch.float64], tokens)).max()
    )
    return Case(request.param, family, hf_dir, spec, model32, model16, tokens, other, refs[torch.float32], ref16, noise)


def test_spec_and_scan_groups(case):
    spec = case.spec
    assert spec.model_type == "qwen3_5_text" and spec.wrapper == ("qwen3_5" if case.family == "qwen3_5" else "")
    assert spec.layer_types == PATTERN * 2
    assert layer_groups(spec.layer_types) == ((0, 2, PATTERN),)  # one scan over two repeats of the pattern
    assert spec.rotary_dim == 8 and spec.head_dim == 32 and spec.norm_zero_centred and spec.attn_output_gate
    assert (spec.linear_num_key_heads, spec.linear_num_value_heads, spec.linear_conv_kernel) == (2, 4, 4)
    assert spec.tie_word_embeddings == (case.family == "qwen3_5")
    assert modelspec.ModelSpec.from_json(spec.to_json()) == spec
    shapes = param_shapes(spec)
    assert shapes["lin_wq"][0] == 6 and shapes["wq"][0] == 2 and shapes["w_up"][0] == 8
    assert shapes["wq"][-1] == 2 * spec.head_dim  # query and its output gate
    with open(os.path.join(os.path.dirname(case.hf_dir), "f32", checkpoint.PROVENANCE)) as fh:
        prov = json.load(fh)
    assert prov["source_model_type"] == case.family and prov["model_type"] == "qwen3_5_text"
    assert prov["architectures"][0] == (
        "Qwen3_5ForConditionalGeneration" if case.family == "qwen3_5" else "Qwen3_5ForCausalLM"
    )


def test_float32_per_token_log_probs_match_hf(case):
    """Against HF's float32 forward; HF's own float32 error against float64 is recorded alongside."""
    ref = _token_log_probs(case.ref32, case.tokens)
    ours = _token_log_probs(_single_row(case.model32, case.tokens), case.tokens)
    assert ref.std() > 1.0, "reference predictions are near-uniform; the test could not fail"
    err = float(np.abs(ours - ref).max())
    PARITY.setdefault(case.name, {}).update({"float32 max |dlogp|": err, "HF float32 vs float64": case.hf32_vs_hf64})
    assert err <= 1e-4, err


def test_bfloat16_is_as_close_to_float32_as_hf_bfloat16(case):
    """bfloat16 against HF. In a random DeltaNet hybrid the bf16 rounding of two implementations differs by
    about the model's own bf16 error (HF bf16 vs HF fp32 ~ 4e-3 mean KL here), so the bound is relative:
    our bf16 forward is at most 1.25x as far (mean KL) from HF's float32 one as HF's own bf16 forward is.
    The direct KL(HF bf16 || ours bf16) is recorded next to it."""
    ours = _single_row(case.model16, case.tokens)

    def kl(p, q):
        return float(np.sum(np.exp(p) * (p - q), axis=-1).mean())

    ours_to_fp32, hf_to_fp32 = kl(case.ref32, ours), kl(case.ref32, case.ref16)
    PARITY.setdefault(case.name, {}).update(
        {
            "bf16 KL(HF fp32 || ours bf16)": ours_to_fp32,
            "bf16 KL(HF fp32 || HF bf16)": hf_to_fp32,
            "bf16 KL(HF bf16 || ours bf16)": kl(case.ref16, ours),
        }
    )
    assert hf_to_fp32 > 1e-5, "HF's bf16 forward equals its fp32 one; the comparison could not fail"
    assert ours_to_fp32 <= 1.25 * hf_to_fp32, (ours_to_fp32, hf_to_fp32)


def _packed(model, parts, t):
    """Log-probs of ``parts`` (token arrays) packed in one row of length t, and each part's slice."""
    pad = t - sum(len(p) for p in parts)
    tokens = np.concatenate([*parts, np.zeros(pad, np.int32)])
    positions = np.concatenate([*(np.arange(len(p)) for p in parts), np.zeros(pad)]).astype(np.int32)
    segments = np.concatenate([*(np.full(len(p), i + 1) for i, p in enumerate(parts)), np.zeros(pad)]).astype(np.int32)
    out = np.asarray(_log_probs(model, *(jnp.asarray(x[None]) for x in (tokens, positions, segments))))[0]
    starts = np.cumsum([0, *(len(p) for p in parts)])
    return [out[a:b] for a, b in zip(starts[:-1], starts[1:])], out


def test_packed_row_matches_each_transcript_alone(case):
    """Three transcripts packed with boundaries inside delta-rule chunks (1001, 2700) score as when alone.

    Packed, a transcript's chunks start at other offsets, so float rounding differs: the bound is the float32
    parity bound (this model's own float32 noise is ~3e-5); the leakage test below is the exact check."""
    parts = [case.tokens[:1001], case.other_tokens[:1699], case.tokens[2000:3300]]
    packed, full = _packed(case.model32, parts, T)
    err = max(
        float(np.abs(_token_log_probs(lp, p) - _token_log_probs(_single_row(case.model32, p), p)).max())
        for lp, p in zip(packed, parts)
    )
    PARITY.setdefault(case.name, {})["packed vs alone max |dlogp|"] = err
    assert err <= 1e-4, err
    assert np.isfinite(full).all()


def test_no_state_leaks_between_packed_participants(case):
    """Changing the first participant's tokens leaves the second's log-probs unchanged (state reset and
    conv masking at the boundary); the same row scored as one segment does change them."""
    a, b = case.tokens[:1001], case.other_tokens[:1500]
    changed = np.roll(a, 7)
    (_, lp_b), _ = _packed(case.model32, [a, b], T)
    (_, lp_b2), _ = _packed(case.model32, [changed, b], T)
    assert float(np.abs(lp_b - lp_b2).max()) <= 1e-6

    def one_segment(first):
        tokens = np.concatenate([first, b, np.zeros(T - len(a) - len(b), np.int32)])
        positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(T - len(a) - len(b))])
        lp = _log_probs(
            case.model32,
            jnp.asarray(tokens[None]),
            jnp.asarray(positions[None], jnp.int32),
            jnp.ones((1, T), jnp.int32),
        )
        return np.asarray(lp)[0, len(a) : len(a) + len(b)]

    assert float(np.abs(one_segment(a) - one_segment(changed)).max()) > 1e-3


def test_delta_rule_reset_and_conv_mask_are_each_needed():
    """Unit level: a row of two segments equals each segment alone; dropping the segment ids (no reset, no
    conv mask) changes the second segment's output."""
    rng = np.random.default_rng(0)
    b, t, hk, hv, dk, dv = 1, 200, 2, 4, 16, 8
    q, k = (jnp.asarray(rng.normal(size=(b, t, hk, dk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(b, t, hv, dv)), jnp.float32)
    g = jnp.asarray(-0.05 * rng.uniform(size=(b, t, hv)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(b, t, hv)), jnp.float32)
    seg = jnp.asarray(np.r_[np.ones(90), 2 * np.ones(110)][None], jnp.int32)
    packed = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, seg, chunk=64)
    alone = delta_rule.chunk_gated_delta_rule(
        q[:, 90:], k[:, 90:], v[:, 90:], g[:, 90:], beta[:, 90:], jnp.ones((1, 110), jnp.int32), chunk=64
    )
    np.testing.assert_allclose(np.asarray(packed[:, 90:]), np.asarray(alone), atol=2e-6)
    merged = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, jnp.ones_like(seg), chunk=64)
    assert float(jnp.abs(merged[:, 90:] - alone).max()) > 1e-2

    w = jnp.asarray(rng.normal(size=(4, hv, dv)), jnp.float32)
    conv = delta_rule.causal_conv(v, w, seg)
    conv_alone = delta_rule.causal_conv(v[:, 90:], w, jnp.ones((1, 110), jnp.int32))
    np.testing.assert_allclose(np.asarray(conv[:, 90:]), np.asarray(conv_alone), atol=1e-6)
    assert float(jnp.abs(delta_rule.causal_conv(v, w, jnp.ones_like(seg))[:, 90:93] - conv_alone[:, :3]).max()) > 1e-2


def test_strong_decays_across_segments_stay_finite_and_isolated():
    """Decays of -40 per token (HF's init reaches that): a segment's log-decay sums fall to -1e3 within a
    chunk, so nothing may exponentiate one segment's sum against another's."""
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 192, 2, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(1, 192, 2, 16)), jnp.float32)
    g = jnp.asarray(-40.0 * rng.uniform(0.5, 1.0, size=(1, 192, 2)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(1, 192, 2)), jnp.float32)
    seg = jnp.asarray(np.r_[np.ones(40), 2 * np.ones(100), 3 * np.ones(52)][None], jnp.int32)
    out = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, seg, chunk=64)
    assert bool(jnp.isfinite(out).all())
    alone = delta_rule.chunk_gated_delta_rule(
        q[:, 40:140], k[:, 40:140], v[:, 40:140], g[:, 40:140], beta[:, 40:140], jnp.ones((1, 100), jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(out[:, 40:140]), np.asarray(alone), atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(2, 300, 2, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(2, 300, 2, 16)), jnp.float32)
    g = jnp.asarray(-rng.uniform(size=(2, 300, 2)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(2, 300, 2)), jnp.float32)
    seg = jnp.asarray(np.r_[np.ones(130), 2 * np.ones(150), np.zeros(20)][None].repeat(2, 0), jnp.int32)
    outs = [delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, seg, chunk=c) for c in (16, 64, 128)]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out[:, :280]), np.asarray(outs[0][:, :280]), atol=2e-5)


def test_converted_tokenizer_splits_text_as_the_checkpoints_own(case, texts):
    """transformers 5 loads Qwen3.5 tokenizers as Qwen3_5Tokenizer (NFC, its own pre-tokenizer), chosen by the
    config's model_type: the converted tokenizer folder must resolve to the same class and the same ids."""
    ours = spans.TokenizerInfo(os.path.join(os.path.dirname(case.hf_dir), "f32", checkpoint.TOKENIZER)).hf
    theirs = AutoTokenizer.from_pretrained(case.hf_dir)
    assert type(ours).__name__ == type(theirs).__name__
    if case.family == "qwen3_5":  # (a qwen3_5_text config maps to no tokenizer class of its own)
        # transformers 5.24 picks Qwen3_5Tokenizer; 5.17 (the accelerator box's) the generic backend.
        assert type(theirs).__name__ in ("Qwen3_5Tokenizer", "TokenizersBackend")
    text = texts[0][:20000] + " 12345 caf\u0065\u0301"  # multi-digit numbers and a non-NFC character
    assert ours(text).input_ids == theirs(text).input_ids


def test_mtp_and_vision_weights_are_never_read(tmp_path, qwen_tokenizer_dir, monkeypatch):
    hf_dir = make_tiny_hf_checkpoint("qwen3_5", str(tmp_path / "hf"), qwen_tokenizer_dir, seed=3)
    _add_mtp_head(hf_dir)
    reads: list[str] = []
    original = weights.SafetensorsReader.read

    def recording_read(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(weights.SafetensorsReader, "read", recording_read)
    names = weights.SafetensorsReader(hf_dir).names()
    skipped = {n for n in names if n.startswith(("mtp.", *weights.VISION_PREFIXES))}
    assert any(n.startswith("mtp.") for n in skipped) and any(n.startswith("model.visual.") for n in skipped)
    checkpoint.convert(hf_dir, str(tmp_path / "out"), "float32")
    assert set(reads) == names - skipped


def test_score_job_reference_and_robust_agree_with_hf(tmp_path, qwen_tokenizer_dir):
    """launch.score on an HF Qwen3.5 wrapper dir under both protocols equals HF's reference computation
    (the NLLs are sums over long responses, so the bound is relative)."""
    hf_dir = make_tiny_hf_checkpoint(
        "qwen3_5", str(tmp_path / "hf"), qwen_tokenizer_dir, max_position_embeddings=CONTEXT, seed=5
    )
    check_score_job_against_hf(hf_dir, _hf(hf_dir, "qwen3_5", torch.float32), tmp_path, "qwen3_5", rtol=1e-5, atol=1e-3)


# --- real hub configs ------------------------------------------------------------------------------------

# file -> (our layers, hidden, tied, linear value heads)
REAL_CONFIGS = {
    "Qwen3.5-0.8B.json": (24, 1024, True, 16),
    "Qwen3.5-4B.json": (32, 2560, True, 32),
    "Qwen3.5-27B.json": (64, 5120, False, 48),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_hub_config_parses_to_the_language_models_full_size(name, tmp_path):
    """Sources: tests/data/hub_configs/SOURCES.md. Our parameter count equals HF's language model (+ head)."""
    layers, hidden, tied, value_heads = REAL_CONFIGS[name]
    with open(os.path.join(HUB_CONFIGS, name)) as fh:
        (tmp_path / "config.json").write_text(fh.read())
    spec = modelspec.from_hf_dir(str(tmp_path))
    config = AutoConfig.from_pretrained(str(tmp_path))
    assert (spec.wrapper, spec.num_layers, spec.hidden_size, spec.tie_word_embeddings) == (
        "qwen3_5",
        layers,
        hidden,
        tied,
    )
    assert spec.linear_num_value_heads == value_heads and spec.rotary_dim == 64 and spec.vocab_size == 248320
    assert layer_groups(spec.layer_types) == ((0, layers // 4, PATTERN),)
    ours = sum(math.prod(s) for s in param_shapes(spec).values())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    hf_total = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))
    )
    print(f"{name}: ours {ours:,}, HF language model {hf_total:,}")
    assert ours == hf_total


def test_report_parity():
    """Prints the measured parity numbers of this module (run with -s to see them)."""
    for name in sorted(PARITY):
        print(name, {k: f"{v:.2e}" for k, v in PARITY[name].items()})
