"""Parity with HF PyTorch (eager attention) on real Psych-201 transcripts, per family.

Each case builds a tiny random HF checkpoint with non-trivial weight scale, converts it with the converter
(float32 and bfloat16), restores it and compares per-token log-probs of a real transcript of T tokens.
T is past original_max_position_embeddings (llama3 / YaRN scaling active), past OLMo 3's sliding window,
and past one 512-token attention block.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from psych201_jax.model import checkpoint
from psych201_jax.model.decoder import Decoder
from psych201_jax.testing import tiny_tokenizer
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint

T = 600
STUDIES = ("thoma2025riskychoice", "xu2023augmenting", "guenther2023ViSpa")

# name -> (family, tokenizer flavour, make_tiny_hf_checkpoint kwargs)
CASES = {
    "llama-llama3-untied-gqa4": ("llama", "llama", dict(num_key_value_heads=1)),
    "llama-llama3-tied-gqa2": ("llama", "llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-bias-mha-bf16shards": (
        "qwen2",
        "qwen",
        dict(num_key_value_heads=4, dtype="bfloat16", max_shard_size="300KB"),
    ),
    "qwen3-headdim32-tied-gqa2": ("qwen3", "qwen", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    "olmo3-window64-mha": ("olmo3", "qwen", dict(num_key_value_heads=4, sliding_window=64)),
    "olmo3-yarn-window100-gqa2": (
        "olmo3",
        "qwen",
        dict(
            num_key_value_heads=2,
            sliding_window=100,
            rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=128),
        ),
    ),
}


@pytest.fixture(scope="module")
def texts(data_root):
    return tiny_tokenizer.sample_texts(data_root, STUDIES, per_study=4, max_chars=8000)


@dataclasses.dataclass
class Case:
    spec: object
    model32: Decoder
    model16: Decoder
    tokens: np.ndarray  # int32[T]
    other_tokens: np.ndarray  # a second transcript, int32[T]
    ref32: np.ndarray  # HF float32 log-probs [T, V]
    ref16: np.ndarray  # HF bfloat16 trunk, float32 unembedding, log-probs [T, V]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, texts, qwen_tokenizer_dir, llama_tokenizer_dir):
    family, flavour, kwargs = CASES[request.param]
    tok_dir = llama_tokenizer_dir if flavour == "llama" else qwen_tokenizer_dir
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_hf_checkpoint(family, str(root / "hf"), tok_dir, **kwargs)
    checkpoint.convert(hf_dir, str(root / "f32"), "float32")
    checkpoint.convert(hf_dir, str(root / "bf16"), "bfloat16")
    model32, spec = checkpoint.load_model(str(root / "f32"))
    model16, _ = checkpoint.load_model(str(root / "bf16"))

    tok = AutoTokenizer.from_pretrained(tok_dir)
    long = [ids[:T] for ids in (tok(t).input_ids for t in texts) if len(ids) >= T]
    assert len(long) >= 2, "need two transcripts of at least T tokens"
    tokens, other = (np.asarray(ids, np.int32) for ids in long[:2])

    ids = torch.tensor(tokens[None], dtype=torch.long)
    with torch.no_grad():
        hf32 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
        ref32 = torch.log_softmax(hf32(ids).logits[0].float(), -1).numpy()
        hf16 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
        hidden = hf16.model(ids).last_hidden_state[0].float()
        ref16 = torch.log_softmax(hidden @ hf16.get_output_embeddings().weight.float().T, -1).numpy()
    return Case(spec, model32, model16, tokens, other, ref32, ref16)


@nnx.jit
def _log_probs(model, tokens, positions, segment_ids):
    return jax.nn.log_softmax(model.logits(model(tokens, positions, segment_ids)), axis=-1)


def _single_row(model, tokens):
    t = len(tokens)
    return np.asarray(
        _log_probs(model, jnp.asarray(tokens[None]), jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), jnp.int32))
    )[0]


def _token_log_probs(log_probs, tokens):
    """Log-prob of each next token: [T - 1]."""
    return log_probs[np.arange(len(tokens) - 1), tokens[1:]]


def test_float32_per_token_log_probs_match_hf(case):
    ref = _token_log_probs(case.ref32, case.tokens)
    ours = _token_log_probs(_single_row(case.model32, case.tokens), case.tokens)
    assert ref.std() > 1.0, "reference predictions are near-uniform; the test could not fail"
    assert np.abs(ours - ref).max() <= 1e-4


def test_float32_xla_attention_matches_hf_too(case):
    """Models load with attention "auto", the native kernel on a CPU; the plain "xla" path matches HF as well."""
    model = case.model32
    assert model.attention_backend == "auto"
    model.attention_backend = "xla"
    try:
        ours = _token_log_probs(_single_row(model, case.tokens), case.tokens)
    finally:
        model.attention_backend = "auto"
    assert np.abs(ours - _token_log_probs(case.ref32, case.tokens)).max() <= 1e-4


def test_bfloat16_mean_kl_to_hf(case):
    ours = _single_row(case.model16, case.tokens)
    kl = np.sum(np.exp(case.ref16) * (case.ref16 - ours), axis=-1)
    assert kl.mean() <= 1e-3, kl.mean()


def test_packed_row_matches_each_transcript_alone(case):
    """Two transcripts packed in one row (positions reset, padding after) score as when run alone."""
    a, b = case.tokens[:330], case.other_tokens[:230]
    pad = T - len(a) - len(b)
    tokens = np.concatenate([a, b, np.zeros(pad, np.int32)])
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(pad)]).astype(np.int32)
    segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.zeros(pad)]).astype(np.int32)
    packed = np.asarray(_log_probs(case.model32, *(jnp.asarray(x[None]) for x in (tokens, positions, segments))))[0]
    alone_a = _token_log_probs(_single_row(case.model32, a), a)
    alone_b = _token_log_probs(_single_row(case.model32, b), b)
    np.testing.assert_allclose(_token_log_probs(packed[: len(a)], a), alone_a, atol=1e-5)
    np.testing.assert_allclose(_token_log_probs(packed[len(a) : len(a) + len(b)], b), alone_b, atol=1e-5)
    assert np.isfinite(packed).all()


def _with_spec(model, spec):
    """The same parameters under a modified spec."""
    other = nnx.eval_shape(lambda: Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(other)
    return nnx.merge(graphdef, nnx.state(model))


def _max_error_with(case, spec):
    ref = _token_log_probs(case.ref32, case.tokens)
    ours = _token_log_probs(_single_row(_with_spec(case.model32, spec), case.tokens), case.tokens)
    return np.abs(ours - ref).max()


@pytest.mark.parametrize("case", ["olmo3-window64-mha", "olmo3-yarn-window100-gqa2"], indirect=True)
def test_parity_check_detects_window_off_by_one(case):
    """The float32 bound is tight enough to catch a sliding window one token too wide."""
    bad = dataclasses.replace(case.spec, sliding_window=case.spec.sliding_window + 1)
    assert _max_error_with(case, bad) > 1e-3


@pytest.mark.parametrize("case", ["llama-llama3-untied-gqa4", "olmo3-yarn-window100-gqa2"], indirect=True)
def test_parity_check_detects_missing_rope_scaling(case):
    """... and RoPE without its llama3 / YaRN scaling (positions run past original_max_position_embeddings)."""
    bad = dataclasses.replace(
        case.spec, rope=tuple((t, dataclasses.replace(r, rope_type="default")) for t, r in case.spec.rope)
    )
    assert _max_error_with(case, bad) > 1e-3
