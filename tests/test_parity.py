"""Parity with HF PyTorch (eager attention) on real Psych-201 transcripts, one row per family/config.

The rows are ``psych201_jax.testing.parity.FAMILIES``: each builds a tiny random HF checkpoint with
non-trivial weight scale, converts it with the converter (float32 and bfloat16), restores it and compares
per-token log-probs of a real transcript: float32 parity, bfloat16 KL, packed rows against each transcript
alone. Rows opt into the checks of a special feature (``parity.XLA_BACKEND``, ``SLIDING_WINDOW``,
``ROPE_SCALING``, ``MROPE``, ``STATE_RESET``, ``OWN_TOKENIZER``, and Gemma's ``parity.REMOVED`` features:
soft caps, (1 + w) norms, embedding and query scales, per-layer RoPE, each of which must break parity when
left out). Also: a whole scoring job against HF's
reference computation (``parity.SCORE_JOBS``). Run with -s to see the measured numbers at the end.
"""

import dataclasses
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint, hf_config
from psych201_jax.model import spec as modelspec
from psych201_jax.model.params import param_layers, param_shapes
from psych201_jax.testing import parity
from psych201_jax.testing.parity import QWEN3_5_PATTERN, single_row, token_log_probs
from psych201_jax.testing.tiny_models import VL_FAMILIES, make_tiny_hf_checkpoint

PARITY: dict[str, dict[str, float]] = {}  # row name -> measured errors (printed at the end of the module)


@pytest.fixture(scope="module", params=parity.names())
def case(request, tmp_path_factory, data_root, qwen_tokenizer_dir, llama_tokenizer_dir):
    row = parity.BY_NAME[request.param]
    tok_dir = llama_tokenizer_dir if row.tokenizer == "llama" else qwen_tokenizer_dir
    return parity.build_case(row, str(tmp_path_factory.mktemp(row.name)), tok_dir, data_root)


def _record(case, **values):
    PARITY.setdefault(case.name, {}).update(values)


def test_spec_round_trips_and_records_its_source(case):
    spec = case.spec
    assert modelspec.ModelSpec.from_json(spec.to_json()) == spec
    assert case.provenance["source_model_type"] == case.row.family
    if case.row.spec_check is not None:
        case.row.spec_check(case)


def test_float32_per_token_log_probs_match_hf(case):
    """Against HF's float32 forward (VL rows, text only: the three M-RoPE streams are equal, so 1-D RoPE must
    reproduce HF); rows with ``record_hf64_noise`` record HF's own float32 error against float64 alongside."""
    ref = token_log_probs(case.ref32, case.tokens)
    ours = token_log_probs(single_row(case.model32, case.tokens), case.tokens)
    assert ref.std() > 1.0, "reference predictions are near-uniform; the test could not fail"
    err = float(np.abs(ours - ref).max())
    _record(case, **{"float32 max |dlogp|": err})
    if case.hf32_vs_hf64 is not None:
        _record(case, **{"HF float32 vs float64": case.hf32_vs_hf64})
    assert err <= case.row.float32_atol, err


def test_bfloat16_against_hf(case):
    """Rows with ``bf16_kl``: mean KL(HF bf16 || ours bf16) within it. Rows with ``bf16_relative`` (a random
    DeltaNet hybrid, whose bf16 rounding differs between implementations by about its own bf16 error): our
    bf16 forward at most that many times as far (mean KL) from HF's float32 one as HF's own bf16 forward."""
    ours = single_row(case.model16, case.tokens)
    kl_direct = parity.mean_kl(case.ref16, ours)
    _record(case, **{"bf16 KL(HF bf16 || ours bf16)": kl_direct})
    if case.row.bf16_kl is not None:
        assert kl_direct <= case.row.bf16_kl, kl_direct
    if case.row.bf16_relative is not None:
        ours_to_fp32, hf_to_fp32 = parity.mean_kl(case.ref32, ours), parity.mean_kl(case.ref32, case.ref16)
        _record(case, **{"bf16 KL(HF fp32 || ours bf16)": ours_to_fp32, "bf16 KL(HF fp32 || HF bf16)": hf_to_fp32})
        assert hf_to_fp32 > 1e-5, "HF's bf16 forward equals its fp32 one; the comparison could not fail"
        assert ours_to_fp32 <= case.row.bf16_relative * hf_to_fp32, (ours_to_fp32, hf_to_fp32)


def test_packed_row_matches_each_transcript_alone(case):
    """Transcripts packed in one row (positions reset, padding after) score as when run alone (the Qwen3.5
    rows: boundaries inside delta-rule chunks)."""
    sources = (case.tokens, case.other_tokens)
    parts = [sources[i][a:b] for i, a, b in case.row.pack]
    slices, full = parity.packed(case.model32, parts, case.row.length)
    err = max(
        float(np.abs(token_log_probs(lp, p) - token_log_probs(single_row(case.model32, p), p)).max())
        for lp, p in zip(slices, parts)
    )
    _record(case, **{"packed vs alone max |dlogp|": err})
    assert err <= case.row.packed_atol, err
    assert np.isfinite(full).all()


# --- checks of one feature ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", parity.names(parity.XLA_BACKEND), indirect=True)
def test_float32_xla_attention_matches_hf_too(case):
    """Models load with attention "auto", the native kernel on a CPU; the plain "xla" path matches HF as well."""
    model = case.model32
    assert model.attention_backend == "auto"
    model.attention_backend = "xla"
    try:
        ours = token_log_probs(single_row(model, case.tokens), case.tokens)
    finally:
        model.attention_backend = "auto"
    assert np.abs(ours - token_log_probs(case.ref32, case.tokens)).max() <= case.row.float32_atol


def _max_error_with(case, spec):
    ref = token_log_probs(case.ref32, case.tokens)
    ours = token_log_probs(single_row(parity.with_spec(case.model32, spec), case.tokens), case.tokens)
    return np.abs(ours - ref).max()


@pytest.mark.parametrize("case", parity.names(parity.SLIDING_WINDOW), indirect=True)
def test_parity_check_detects_window_off_by_one(case):
    """The float32 bound is tight enough to catch a sliding window one token too wide."""
    bad = dataclasses.replace(case.spec, sliding_window=case.spec.sliding_window + 1)
    assert _max_error_with(case, bad) > 1e-3


@pytest.mark.parametrize("case", parity.names(parity.SLIDING_WINDOW), indirect=True)
def test_parity_check_detects_window_removed(case):
    """... and the window left out altogether (every layer attending fully): the window is exercised."""
    assert case.spec.sliding_window is not None and case.spec.sliding_window < case.row.length
    assert _max_error_with(case, dataclasses.replace(case.spec, sliding_window=None)) > 1e-3


@pytest.mark.parametrize("case", parity.names(parity.NO_LEAKAGE), indirect=True)
def test_no_leakage_between_packed_attention_participants(case):
    """Changing the first packed participant's tokens leaves the second's log-probs unchanged; the same two
    scored as one segment do change them (so the check sees what the first one could leak)."""
    n_a, n_b = (stop - start for _, start, stop in case.row.pack[:2])
    a, b, t = case.tokens[:n_a], case.other_tokens[:n_b], case.row.length
    changed = np.roll(a, 7)
    (_, lp_b), _ = parity.packed(case.model32, [a, b], t)
    (_, lp_b2), _ = parity.packed(case.model32, [changed, b], t)
    assert float(np.abs(lp_b - lp_b2).max()) <= 1e-6
    ab, changed_b = (single_row(case.model32, np.concatenate([first, b])) for first in (a, changed))
    assert float(np.abs(ab[len(a) :] - changed_b[len(a) :]).max()) > 1e-3


@pytest.mark.parametrize("case,feature", parity.removals(), indirect=["case"])
def test_parity_check_detects_feature_removed(case, feature):
    """Gemma's and OLMoE's features are exercised: the same weights under a spec without one of them (attention
    or final soft cap, the (1 + w) norm offset, the embedding scale, the query scale, RoPE per layer type,
    OLMoE's q/k/v clip) break float32 parity."""
    spec = case.spec
    bad = parity.REMOVED[feature](spec)
    assert bad != spec, f"{feature} is not in the spec"
    err = _max_error_with(case, bad)
    _record(case, **{f"without {feature}": float(err)})
    assert err > 1e-3, err


@pytest.mark.parametrize("case", parity.names(parity.ROPE_SCALING), indirect=True)
def test_parity_check_detects_missing_rope_scaling(case):
    """... and RoPE without its llama3 / YaRN scaling (positions run past original_max_position_embeddings)."""
    bad = dataclasses.replace(
        case.spec, rope=tuple((t, dataclasses.replace(r, rope_type="default")) for t, r in case.spec.rope)
    )
    assert _max_error_with(case, bad) > 1e-3


@pytest.mark.parametrize("case", parity.names(parity.MROPE), indirect=True)
def test_mrope_equals_1d_rope_only_for_equal_streams(case):
    """HF with explicit 3-D positions: equal streams reproduce our 1-D RoPE; unequal ones do not (so the
    agreement above is M-RoPE's text-only reduction, and the comparison does see the position streams)."""
    n = 1024
    ids = torch.tensor(case.tokens[None, :n], dtype=torch.long)
    ours = token_log_probs(single_row(case.model32, case.tokens[:n]), case.tokens[:n])
    t = torch.arange(n)
    pos = t[None, None].expand(3, 1, n)
    # Streams that differ by more than a constant (a constant offset per stream cancels in RoPE).
    shifted = torch.stack([t, t // 2, t // 4])[:, None]
    with torch.no_grad():
        hf = parity.hf_model(case.hf_dir, case.row.family, torch.float32)
        equal, unequal = (
            token_log_probs(
                torch.log_softmax(hf(input_ids=ids, position_ids=p, use_cache=False).logits[0].float(), -1).numpy(),
                case.tokens[:n],
            )
            for p in (pos, shifted)
        )
    assert np.abs(ours - equal).max() <= 1e-4
    assert np.abs(ours - unequal).max() > 1e-3


@pytest.mark.parametrize("case", parity.names(parity.STATE_RESET), indirect=True)
def test_no_state_leaks_between_packed_participants(case):
    """Changing the first participant's tokens leaves the second's log-probs unchanged (state reset and
    conv masking at the boundary); the same row scored as one segment does change them."""
    t = case.row.length
    a, b = case.tokens[:1001], case.other_tokens[:1500]
    changed = np.roll(a, 7)
    (_, lp_b), _ = parity.packed(case.model32, [a, b], t)
    (_, lp_b2), _ = parity.packed(case.model32, [changed, b], t)
    assert float(np.abs(lp_b - lp_b2).max()) <= 1e-6

    def one_segment(first):
        tokens = np.concatenate([first, b, np.zeros(t - len(a) - len(b), np.int32)])
        positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(t - len(a) - len(b))])
        lp = parity.log_probs(
            case.model32,
            jnp.asarray(tokens[None]),
            jnp.asarray(positions[None], jnp.int32),
            jnp.ones((1, t), jnp.int32),
        )
        return np.asarray(lp)[0, len(a) : len(a) + len(b)]

    assert float(np.abs(one_segment(a) - one_segment(changed)).max()) > 1e-3


@pytest.mark.parametrize("case", parity.names(parity.OWN_TOKENIZER), indirect=True)
def test_converted_tokenizer_splits_text_as_the_checkpoints_own(case, data_root):
    """transformers 5 loads Qwen3.5 tokenizers as Qwen3_5Tokenizer (NFC, its own pre-tokenizer), chosen by the
    config's model_type: the converted tokenizer folder must resolve to the same class and the same ids."""
    ours = TokenizerInfo(os.path.join(os.path.dirname(case.hf_dir), "f32", checkpoint.TOKENIZER)).hf
    theirs = AutoTokenizer.from_pretrained(case.hf_dir)
    assert type(ours).__name__ == type(theirs).__name__
    if case.row.family in ("qwen3_5", "qwen3_5_moe"):  # (a qwen3_5_text config maps to no tokenizer class of its own)
        # transformers 5.24 picks Qwen3_5Tokenizer; 5.17 (the accelerator box's) the generic backend.
        assert type(theirs).__name__ in ("Qwen3_5Tokenizer", "TokenizersBackend")
    texts = parity.sample_texts(data_root, case.row.texts)
    text = texts[0][:20000] + " 12345 caf\u0065\u0301"  # multi-digit numbers and a non-NFC character
    assert ours(text).input_ids == theirs(text).input_ids


@pytest.mark.parametrize("case", parity.names(parity.MOE), indirect=True)
def test_moe_router_picks_hfs_experts_on_real_text(case):
    """On the transcript, at every layer, our router (on HF's own router inputs) picks the same top-k experts as
    HF's for every token. Records the smallest gap between the k-th and the (k+1)-th router logit, our logits'
    largest difference from HF's (the gap must exceed it: no rounding flips a choice here) and how many
    (token, layer) choices are within ten times that of a tie (at most 1%). On our own hidden states a flipped
    choice would move that token's log-probs far past the float32 bound (the fewer-experts check below), so
    float32 parity on the same transcript is the end-to-end check that none flipped."""
    from psych201_jax.model import moe

    hf = parity.hf_model(case.hf_dir, case.row.family, torch.float32)
    seen = []
    layers = hf.model.language_model.layers if case.spec.wrapper else hf.model.layers
    layers = [layer for layer in layers if hasattr(layer.mlp, "gate")]  # the routed ones (dense_mlp_layers: not)
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _, args, out: seen.append((args[0], out[2]))) for layer in layers
    ]
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor(case.tokens[None], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    routers = np.asarray(case.model32.layers.router[...])
    k, gaps, drift = case.spec.num_experts_per_tok, [], 0.0
    assert len(seen) == len(param_layers(case.spec, "router"))
    for layer, (x, theirs) in enumerate(seen):
        x = x.reshape(-1, x.shape[-1]).numpy()
        ours, _ = moe.route(jnp.asarray(x), jnp.asarray(routers[layer]), case.spec)
        np.testing.assert_array_equal(np.sort(np.asarray(ours), -1), np.sort(theirs.numpy(), -1))
        logits = np.asarray(jnp.asarray(x) @ jnp.asarray(routers[layer]))
        hf_logits = torch.nn.functional.linear(torch.tensor(x), layers[layer].mlp.gate.weight).detach().numpy()
        drift = max(drift, float(np.abs(logits - hf_logits).max()))
        ranked = np.sort(logits, -1)
        gaps.append(ranked[:, -k] - ranked[:, -k - 1])
    gap, near = float(np.min(gaps)), float(np.mean(np.concatenate(gaps) < 10 * drift))
    _record(case, **{"min top-k logit gap": gap, "router logit max |ours - HF|": drift, "near ties": near})
    assert gap > drift and near <= 0.01, (gap, drift, near)


@pytest.mark.parametrize("case", parity.names(parity.MOE), indirect=True)
def test_parity_check_detects_fewer_experts_per_token(case):
    """Routing is exercised: the same weights with one expert per token fewer break float32 parity."""
    err = float(
        _max_error_with(case, dataclasses.replace(case.spec, num_experts_per_tok=case.spec.num_experts_per_tok - 1))
    )
    _record(case, **{"with k - 1 experts": err})
    assert err > 1e-3, err


# --- a whole scoring job ------------------------------------------------------------------------------


@pytest.mark.parametrize("job", parity.SCORE_JOBS, ids=lambda j: j.family)
def test_score_job_reference_and_robust_agree_with_hf(job, tmp_path, qwen_tokenizer_dir, llama_tokenizer_dir):
    """psych201_jax.cli.score on an HF wrapper dir (converted into the cache) under both protocols; each participant's
    response NLLs equal the HF wrapper's reference computation (the ``0_analyses/eval.py`` loop)."""
    tok_dir = llama_tokenizer_dir if job.tokenizer == "llama" else qwen_tokenizer_dir
    hf_dir = make_tiny_hf_checkpoint(
        job.family, str(tmp_path / "hf"), tok_dir, max_position_embeddings=parity.CONTEXT, seed=job.seed
    )
    hf = parity.hf_model(hf_dir, job.family, torch.float32)
    wrapper = job.family if job.family in VL_FAMILIES else ""
    parity.check_score_job_against_hf(hf_dir, hf, tmp_path, wrapper, rtol=job.rtol, atol=job.atol)


def test_report_parity():
    """Prints the measured parity numbers of this module (run with -s to see them)."""
    for name in sorted(PARITY):
        print(name, {k: f"{v:.2e}" for k, v in PARITY[name].items()})


# --- real hub configs of the families ---------------------------------------------------------------------

# file -> (model_type, layers, head_dim, window, parameters); sources: tests/data/hub_configs/SOURCES.md.
HUB_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hub_configs")
FAMILY_HUB_CONFIGS = {
    "Mistral-7B-v0.1.json": ("mistral", 32, 128, 4096, 7_241_732_096),
    "Mistral-7B-v0.3.json": ("mistral", 32, 128, None, 7_248_023_552),
    "Mistral-Nemo-Base-2407.json": ("mistral", 40, 128, None, 12_247_782_400),  # head_dim 128 != 5120 / 32
    "OLMo-2-1124-7B.json": ("olmo2", 32, 128, None, 7_298_617_344),
    "OLMo-2-1124-7B-Instruct.json": ("olmo2", 32, 128, None, 7_298_617_344),
    "OLMo-2-1124-13B.json": ("olmo2", 40, 128, None, 13_716_198_400),
    "gemma-2-2b.json": ("gemma2", 26, 256, 4096, 2_614_341_888),
    "gemma-2-2b-it.json": ("gemma2", 26, 256, 4096, 2_614_341_888),
    "gemma-2-9b.json": ("gemma2", 42, 256, 4096, 9_241_705_984),
    "gemma-2-9b-it.json": ("gemma2", 42, 256, 4096, 9_241_705_984),
    "gemma-2-27b.json": ("gemma2", 46, 128, 4096, 27_227_128_320),  # query_pre_attn_scalar 144 != head_dim
    "gemma-3-270m.json": ("gemma3_text", 18, 256, 512, 268_098_176),
    "gemma-3-1b-pt.json": ("gemma3_text", 26, 256, 512, 999_885_952),
    # Gemma3ForConditionalGeneration: the language model's parameters (the lm_head is tied); the whole model
    # with its SigLIP tower and projector has 4,300,079,472 / 12,187,325,040 / 27,432,406,640.
    "gemma-3-4b-pt.json": ("gemma3_text", 34, 256, 1024, 3_880_263_168),
    "gemma-3-12b-it.json": ("gemma3_text", 48, 256, 1024, 11_766_034_176),
    "gemma-3-27b-pt.json": ("gemma3_text", 62, 128, 1024, 27_009_346_304),
}
# Families whose windowed and full layers alternate: every p-th layer is full (Gemma 2: 2; Gemma 3: 6).
FULL_EVERY = {"gemma2": 2, "gemma3_text": 6}


@pytest.mark.parametrize("name", sorted(FAMILY_HUB_CONFIGS))
def test_real_hub_config_parses_with_hfs_parameter_count(name, tmp_path):
    """The hub config parses to the family's spec, and our parameter count equals HF's meta-device model's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    model_type, layers, head_dim, window, expected = FAMILY_HUB_CONFIGS[name]
    with open(os.path.join(HUB_CONFIGS, name)) as fh:
        (tmp_path / "config.json").write_text(fh.read())
    spec = hf_config.from_hf_dir(str(tmp_path))
    assert (spec.model_type, spec.num_layers, spec.head_dim, spec.sliding_window) == (
        model_type,
        layers,
        head_dim,
        window,
    )
    period = FULL_EVERY.get(model_type)
    for i, t in enumerate(spec.layer_types):
        full = window is None or (period is not None and (i + 1) % period == 0)
        assert (t == modelspec.FULL_ATTENTION) == full, (i, t)
    ours = sum(math.prod(s) for s in param_shapes(spec).values())
    config = AutoConfig.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        if spec.wrapper:  # the language model of a vision-language wrapper (and its lm_head, unless tied)
            model = AutoModelForImageTextToText.from_config(config)
            parts = [model.model.language_model] + ([] if spec.tie_word_embeddings else [model.lm_head])
            hf_total = sum(p.numel() for part in parts for p in part.parameters())
        else:
            model = AutoModelForCausalLM.from_config(config)
            hf_total = sum(p.numel() for p in model.parameters())
    print(f"{name}: ours {ours:,}, HF {hf_total:,}")
    assert ours == hf_total == expected


# Mixture-of-experts hub configs: file -> (model_type, layers, experts, per token, total, active per token); active
# counts every parameter but the experts a token's router leaves out (sources: tests/data/hub_configs/SOURCES.md).
MOE_HUB_CONFIGS = {
    "Qwen3-30B-A3B.json": ("qwen3_moe", 48, 128, 8, 30_532_122_624, 3_353_032_704),
    "Qwen3-30B-A3B-Base.json": ("qwen3_moe", 48, 128, 8, 30_532_122_624, 3_353_032_704),
    "Mixtral-8x7B-v0.1.json": ("mixtral", 32, 8, 2, 46_702_792_704, 12_879_925_248),
    "OLMoE-1B-7B-0924.json": ("olmoe", 16, 64, 8, 6_919_161_856, 1_282_017_280),
    "Qwen1.5-MoE-A2.7B.json": ("qwen2_moe", 24, 60, 4, 14_315_784_192, 2_689_173_504),
    # Qwen3.5-MoE: the wrapper's language model and its untied lm_head (the vision tower adds 446,571,248).
    "Qwen3.5-35B-A3B.json": ("qwen3_5_moe_text", 40, 256, 8, 34_660_610_688, 3_454_988_928),
    "Qwen3.5-35B-A3B-Base.json": ("qwen3_5_moe_text", 40, 256, 8, 34_660_610_688, 3_454_988_928),
}


@pytest.mark.parametrize("name", sorted(MOE_HUB_CONFIGS))
def test_real_moe_hub_config_parses_with_hfs_parameter_counts(name, tmp_path):
    """The MoE hub config parses (every layer routed; full attention, or Qwen3.5's three Gated DeltaNet layers
    per gated attention layer), and our total and active-per-token parameter counts equal HF's meta-device
    model's (its expert tensors: names with ``.experts.``; a wrapper: its language model and lm_head)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    model_type, layers, experts, top_k, total, active = MOE_HUB_CONFIGS[name]
    with open(os.path.join(HUB_CONFIGS, name)) as fh:
        (tmp_path / "config.json").write_text(fh.read())
    spec = hf_config.from_hf_dir(str(tmp_path))
    assert (spec.model_type, spec.num_layers, spec.num_experts, spec.num_experts_per_tok) == (
        model_type,
        layers,
        experts,
        top_k,
    )
    pattern = QWEN3_5_PATTERN if model_type == "qwen3_5_moe_text" else (modelspec.FULL_ATTENTION,)
    assert spec.layer_types == pattern * (layers // len(pattern)) and spec.sliding_window is None
    shapes = param_shapes(spec)
    unused = (experts - top_k) / experts
    ours = sum(math.prod(s) for s in shapes.values())
    ours_active = ours - int(sum(math.prod(shapes[n]) for n in ("e_gate", "e_up", "e_down")) * unused)
    config = AutoConfig.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        if spec.wrapper:
            wrapper = AutoModelForImageTextToText.from_config(config)
            parts = [wrapper.model.language_model, wrapper.lm_head]
        else:
            parts = [AutoModelForCausalLM.from_config(config)]
    named = [(n, p) for part in parts for n, p in part.named_parameters()]
    hf_total = sum(p.numel() for _, p in named)
    hf_active = hf_total - int(sum(p.numel() for n, p in named if ".experts." in n) * unused)
    print(f"{name}: ours {ours:,} ({ours_active:,} active), HF {hf_total:,} ({hf_active:,} active)")
    assert (ours, ours_active) == (hf_total, hf_active) == (total, active)
