"""Vision-language checkpoints scored as their language model on text: Qwen2.5-VL, Qwen3-VL, Llama-3.2-Vision.

Each family is a tiny random HF checkpoint of the whole wrapper (a tiny vision tower included, as hub
checkpoints are saved), converted with the converter and compared with HF PyTorch's wrapper class on real
Psych-201 transcripts of T = 4096 tokens: float32 per-token log-probs, bfloat16 KL, packed rows. Also:
vision weights are never read, both weight layouts (pre-5 hub and transformers-5 module names) convert to
the same parameters, ``launch.score`` runs on a VL checkpoint under both protocols and agrees with the HF
reference, and real hub configs parse to the language model's full parameter count (HF meta-device model).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_model_parity import _log_probs, _single_row, _token_log_probs
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from psych201_jax import defaults
from psych201_jax.data import records, spans
from psych201_jax.model import checkpoint
from psych201_jax.model import hf_weights as weights
from psych201_jax.model import spec as modelspec
from psych201_jax.model.decoder import Decoder, param_shapes
from psych201_jax.testing import tiny_tokenizer, torch_reference
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint
from psych201_jax.types import ParticipantSpans

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 4096
CONTEXT = 16384
STUDIES = ("xu2023augmenting", "shahar2019twosteptask", "schiekiera2025metascience")

# name -> (family, tokenizer flavour, make_tiny_hf_checkpoint kwargs). Qwen2.5-VL in its hub layout
# (model.*, visual.*) and sharded; Qwen3-VL tied with 4 query heads per key/value head; Llama-3.2-Vision
# with cross-attention layers 1 and 3 of 5, in the transformers-5 module layout.
CASES = {
    "qwen2_5_vl-hub-layout-shards": ("qwen2_5_vl", "qwen", dict(max_shard_size="400KB")),
    "qwen3_vl-tied-gqa4": ("qwen3_vl", "qwen", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mllama-cross-1-3-module-layout": ("mllama", "llama", dict(layout="module")),
}
PARITY: dict[str, dict[str, float]] = {}  # name -> measured errors (printed at the end of the module)


@pytest.fixture(scope="module")
def texts(data_root):
    return tiny_tokenizer.sample_texts(data_root, STUDIES, per_study=3, max_chars=60000)


def _tok_dir(flavour, qwen_tokenizer_dir, llama_tokenizer_dir):
    return llama_tokenizer_dir if flavour == "llama" else qwen_tokenizer_dir


def _hf(hf_dir, dtype):
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


@dataclasses.dataclass
class Case:
    name: str
    family: str
    hf_dir: str
    spec: modelspec.ModelSpec
    model32: nnx.Module
    model16: nnx.Module
    tokens: np.ndarray  # int32[T]
    other_tokens: np.ndarray  # a second transcript, int32[T]
    ref32: np.ndarray  # HF float32 log-probs [T, V]
    ref16: np.ndarray  # HF bfloat16 trunk, float32 unembedding, log-probs [T, V]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, texts, qwen_tokenizer_dir, llama_tokenizer_dir):
    family, flavour, kwargs = CASES[request.param]
    tok_dir = _tok_dir(flavour, qwen_tokenizer_dir, llama_tokenizer_dir)
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_hf_checkpoint(family, str(root / "hf"), tok_dir, max_position_embeddings=CONTEXT, **kwargs)
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
        hf32 = _hf(hf_dir, torch.float32)
        logits = hf32(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        ref32 = torch.log_softmax(logits.float(), -1).numpy()
        del hf32
        hf16 = _hf(hf_dir, torch.bfloat16)
        hidden = hf16.model(input_ids=ids, use_cache=False).last_hidden_state[0].float()
        ref16 = torch.log_softmax(hidden @ hf16.get_output_embeddings().weight.float().T, -1).numpy()
    return Case(request.param, family, hf_dir, spec, model32, model16, tokens, other, ref32, ref16)


def test_spec_describes_the_language_model(case):
    spec = case.spec
    assert spec.wrapper == case.family
    assert spec.model_type == modelspec.VL_WRAPPERS[case.family]
    if case.family == "mllama":
        assert spec.skipped_layers == (1, 3) and spec.num_layers == 3 and spec.hf_layer_indices() == (0, 2, 4)
        assert spec.embed_rows == spec.vocab_size + 8 and case.model32.embed[...].shape[0] == spec.vocab_size + 8
        assert case.model32.lm_head[...].shape[0] == spec.vocab_size
    else:
        assert spec.skipped_layers == () and spec.embed_rows == spec.vocab_size
    assert spec.tie_word_embeddings == (case.family == "qwen3_vl")
    assert modelspec.ModelSpec.from_json(spec.to_json()) == spec
    with open(os.path.join(os.path.dirname(case.hf_dir), "f32", checkpoint.PROVENANCE)) as fh:
        prov = json.load(fh)
    assert prov["wrapper"] == case.family and prov["source_model_type"] == case.family
    assert prov["model_type"] == spec.model_type and prov["architectures"][0].endswith("ForConditionalGeneration")


def test_float32_per_token_log_probs_match_hf(case):
    """Text only: the three M-RoPE streams are equal, so 1-D RoPE must reproduce HF to 1e-4."""
    ref = _token_log_probs(case.ref32, case.tokens)
    ours = _token_log_probs(_single_row(case.model32, case.tokens), case.tokens)
    assert ref.std() > 1.0, "reference predictions are near-uniform; the test could not fail"
    err = float(np.abs(ours - ref).max())
    PARITY.setdefault(case.name, {})["float32 max |dlogp|"] = err
    assert err <= 1e-4, err


def test_bfloat16_mean_kl_to_hf(case):
    ours = _single_row(case.model16, case.tokens)
    kl = float(np.sum(np.exp(case.ref16) * (case.ref16 - ours), axis=-1).mean())
    PARITY.setdefault(case.name, {})["bfloat16 mean KL"] = kl
    assert kl <= 1e-3, kl


def test_packed_row_matches_each_transcript_alone(case):
    """Two transcripts packed in one row (positions reset, padding after) score as when run alone."""
    a, b = case.tokens[:2400], case.other_tokens[:1500]
    pad = T - len(a) - len(b)
    tokens = np.concatenate([a, b, np.zeros(pad, np.int32)])
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(pad)]).astype(np.int32)
    segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.zeros(pad)]).astype(np.int32)
    packed = np.asarray(_log_probs(case.model32, *(jnp.asarray(x[None]) for x in (tokens, positions, segments))))[0]
    alone_a = _token_log_probs(_single_row(case.model32, a), a)
    alone_b = _token_log_probs(_single_row(case.model32, b), b)
    err = max(
        float(np.abs(_token_log_probs(packed[: len(a)], a) - alone_a).max()),
        float(np.abs(_token_log_probs(packed[len(a) : len(a) + len(b)], b) - alone_b).max()),
    )
    PARITY.setdefault(case.name, {})["packed vs alone max |dlogp|"] = err
    assert err <= 1e-5, err
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("case", ["qwen2_5_vl-hub-layout-shards", "qwen3_vl-tied-gqa4"], indirect=True)
def test_mrope_equals_1d_rope_only_for_equal_streams(case):
    """HF with explicit 3-D positions: equal streams reproduce our 1-D RoPE; unequal ones do not (so the
    agreement above is M-RoPE's text-only reduction, and the comparison does see the position streams)."""
    n = 1024
    ids = torch.tensor(case.tokens[None, :n], dtype=torch.long)
    ours = _token_log_probs(_single_row(case.model32, case.tokens[:n]), case.tokens[:n])
    t = torch.arange(n)
    pos = t[None, None].expand(3, 1, n)
    # Streams that differ by more than a constant (a constant offset per stream cancels in RoPE).
    shifted = torch.stack([t, t // 2, t // 4])[:, None]
    with torch.no_grad():
        hf = _hf(case.hf_dir, torch.float32)
        equal, unequal = (
            _token_log_probs(
                torch.log_softmax(hf(input_ids=ids, position_ids=p, use_cache=False).logits[0].float(), -1).numpy(),
                case.tokens[:n],
            )
            for p in (pos, shifted)
        )
    assert np.abs(ours - equal).max() <= 1e-4
    assert np.abs(ours - unequal).max() > 1e-3


@pytest.mark.parametrize("case", ["mllama-cross-1-3-module-layout"], indirect=True)
def test_parity_check_detects_missing_llama3_scaling(case):
    """The float32 bound catches RoPE without its llama3 scaling (positions run past 128)."""
    bad = dataclasses.replace(
        case.spec, rope=tuple((t, dataclasses.replace(r, rope_type="default")) for t, r in case.spec.rope)
    )
    other = nnx.eval_shape(lambda: Decoder(bad, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    model = nnx.merge(nnx.split(other)[0], nnx.state(case.model32))
    ref = _token_log_probs(case.ref32, case.tokens)
    assert np.abs(_token_log_probs(_single_row(model, case.tokens), case.tokens) - ref).max() > 1e-3


# --- weights: what is read, and both layouts ---------------------------------------------------------

LAYOUT_FAMILIES = [("qwen2_5_vl", "qwen"), ("qwen3_vl", "qwen"), ("mllama", "llama")]


@pytest.fixture(scope="module")
def layout_dirs(tmp_path_factory, qwen_tokenizer_dir, llama_tokenizer_dir):
    """family -> {layout: HF dir} of the same tiny weights (seed 1) in both weight layouts."""
    out = {}
    for family, flavour in LAYOUT_FAMILIES:
        tok_dir = _tok_dir(flavour, qwen_tokenizer_dir, llama_tokenizer_dir)
        root = tmp_path_factory.mktemp(f"layouts_{family}")
        out[family] = {
            layout: make_tiny_hf_checkpoint(family, str(root / layout), tok_dir, seed=1, layout=layout)
            for layout in ("saved", "module")
        }
    return out


@pytest.mark.parametrize("family", [f for f, _ in LAYOUT_FAMILIES])
def test_vision_weights_are_never_read_and_both_layouts_convert_alike(family, layout_dirs, tmp_path, monkeypatch):
    reads: list[str] = []
    original = weights.SafetensorsReader.read

    def recording_read(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(weights.SafetensorsReader, "read", recording_read)
    states = {}
    for layout, hf_dir in layout_dirs[family].items():
        reads.clear()
        names = weights.SafetensorsReader(hf_dir).names()
        vision = {n for n in names if n.startswith(weights.VISION_PREFIXES)}
        assert vision, "the checkpoint must carry a vision tower for this test to mean anything"
        spec = checkpoint.convert(hf_dir, str(tmp_path / layout), "float32")
        prefix = weights.checkpoint_layout(names, spec).prefix
        skipped = tuple(f"{prefix}layers.{i}." for i in spec.skipped_layers)
        assert not [n for n in reads if n.startswith(weights.VISION_PREFIXES)]
        assert not [n for n in reads if n.startswith(skipped)]
        # Exactly the language model is read, each tensor once.
        language = {n for n in names - vision if not n.startswith(skipped)}
        assert len(reads) == len(set(reads)) and set(reads) == language
        if family == "mllama":
            assert skipped and any(n.startswith(skipped) for n in names)  # cross-attention tensors exist
        model, _ = checkpoint.load_model(str(tmp_path / layout))
        states[layout] = nnx.to_pure_dict(nnx.state(model))
    saved = weights.SafetensorsReader(layout_dirs[family]["saved"]).names()
    module = weights.SafetensorsReader(layout_dirs[family]["module"]).names()
    if family != "qwen3_vl":  # transformers 5 saves Qwen2.5-VL and Mllama in their pre-5 hub layout
        assert saved != module and not any(n.startswith("model.language_model.") for n in saved)
    assert all(
        n.startswith(("model.language_model.", "model.visual", "model.vision", "model.multi", "lm_head"))
        for n in module
    )
    jax.tree.map(np.testing.assert_array_equal, states["saved"], states["module"])


def test_wrong_skipped_layers_fail_conversion(layout_dirs):
    """Mapping our layers onto the wrong HF layers is a clear error, never a silently different model."""
    hf_dir = layout_dirs["mllama"]["saved"]
    spec = modelspec.from_hf_dir(hf_dir)
    bad = dataclasses.replace(spec, skipped_layers=(2, 3))
    with pytest.raises(weights.WeightsError, match=r"layers\.1\.self_attn"):
        list(weights.converted_params(weights.SafetensorsReader(hf_dir), bad, "float32"))


def test_spec_json_without_vl_fields_still_loads(layout_dirs):
    """Specs converted before the VL fields existed load as plain decoders."""
    spec = modelspec.from_hf_dir(layout_dirs["qwen2_5_vl"]["saved"])
    d = json.loads(spec.to_json())
    for key in ("wrapper", "skipped_layers", "embed_vocab_size"):
        d.pop(key)
    assert modelspec.ModelSpec.from_json(json.dumps(d)) == dataclasses.replace(spec, wrapper="")


def test_bad_mrope_section_and_qwen3_5_moe_are_refused(tmp_path):
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            rope_scaling=dict(type="mrope", mrope_section=[2, 2, 2]),
        ),
    )
    with pytest.raises(modelspec.UnsupportedModelError, match="mrope_section"):
        modelspec.from_hf_config(config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "architectures": ["X"]}))
    with pytest.raises(modelspec.UnsupportedModelError, match="qwen3_5_moe"):
        modelspec.from_hf_dir(str(tmp_path))


# --- launch.score on a VL checkpoint -------------------------------------------------------------------


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


# The bundled sample's studies of transcripts up to ~3K tokens (11 participants), so that the HF eager
# reference can check every one of them quickly.
SCORE_STUDIES = (
    "alsobay2025publicGoodsGame",
    "franke2024bayesian",
    "guenther2024substitutions",
    "thoma2025riskychoice",
)


def test_score_job_reference_and_robust_agree_with_hf(tmp_path, llama_tokenizer_dir):
    """launch.score on an HF Llama-3.2-Vision dir (converted into the cache) under both protocols; each
    participant's response NLLs equal the HF wrapper's reference computation (the eval.py loop)."""
    hf_dir = make_tiny_hf_checkpoint(
        "mllama", str(tmp_path / "hf"), llama_tokenizer_dir, max_position_embeddings=CONTEXT
    )
    check_score_job_against_hf(hf_dir, _hf(hf_dir, torch.float32), tmp_path, "mllama", rtol=1e-5, atol=1e-4)


def check_score_job_against_hf(hf_dir, hf_model, tmp_path, wrapper: str, *, rtol: float, atol: float) -> None:
    """launch.score on ``hf_dir`` (SCORE_STUDIES, 11 participants) under both protocols: every response NLL
    equals ``hf_model``'s reference computation, and the manifest records the ``wrapper``."""
    tok = spans.TokenizerInfo(hf_dir)
    data = ",".join(os.path.join(defaults.SAMPLE_DATA, study) for study in SCORE_STUDIES)
    for protocol in ("reference", "robust"):
        out = tmp_path / f"res_{protocol}"
        proc = _run(
            "launch.score",
            f"--config.model={hf_dir}",
            f"--config.data={data}",
            f"--config.out={out}",
            f"--config.protocol={protocol}",
            f"--config.cache_dir={tmp_path / 'cache'}",
            "--config.tokens_per_batch=16384",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "11 scored, 0 unscored, 0 rejected" in proc.stdout, proc.stdout[-2000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"]["spec"]["wrapper"] == wrapper
        assert (
            manifest["model"]["provenance"]["architectures"]
            == json.loads(open(os.path.join(hf_dir, "config.json")).read())["architectures"]
        )
        exported = _run("launch.export", f"--results={out}", f"--out={tmp_path / f'{protocol}.jsonl'}")
        assert exported.returncode == 0, exported.stderr[-3000:]
        rows = {
            (r["study"], r["experiment"], r["participant"]): r
            for r in map(json.loads, (tmp_path / f"{protocol}.jsonl").read_text().splitlines())
        }
        assert len(rows) == 11 and all(r["status"] == "scored" for r in rows.values())
        budget = CONTEXT - 512 if protocol == "robust" else None
        items = spans.tokenize_records(
            records.iter_records(data, strict_markers=protocol == "robust"),
            tok,
            spans.Protocol(protocol, "none", token_budget=budget),
        )
        compared = 0
        for ps in items:
            assert isinstance(ps, ParticipantSpans), ps
            expected = torch_reference.reference_response_nll(hf_model, ps.token_ids, ps.response_index)
            ours = np.asarray([x for x in rows[ps.key]["nll"] if x is not None], np.float64)
            np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol, err_msg=str(ps.key))
            compared += 1
        assert compared == 11, compared


# --- real hub configs -----------------------------------------------------------------------------------

# Verbatim copies of hub config.json files committed to public repositories (see REAL_CONFIG_SOURCES).
QWEN2_5_VL_7B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "mrope"},
    "vocab_size": 152064,
}
QWEN3_VL_8B_INSTRUCT = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 8192,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": False,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4304,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}
REAL_CONFIG_SOURCES = {
    "Qwen/Qwen2.5-VL-7B-Instruct": (
        "github.com/Harrison-HXLiu/vlm_api_test @ da6f793, models/Qwen2.5-VL-7B-Instruct/config.json"
    ),
    # The copy sets max_position_embeddings 8192 (the hub file: 262144); nothing here depends on it.
    "Qwen/Qwen3-VL-8B-Instruct": (
        "github.com/nikolay-grudanov/Team_5_AI_Tutor @ ab9ec7b, models/Qwen3-VL-8B-Instruct/config.json"
    ),
}
# name -> (config, wrapper, our decoder layers, head_dim, tied embeddings)
REAL_CONFIGS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": (QWEN2_5_VL_7B_INSTRUCT, "qwen2_5_vl", 28, 128, False),
    "Qwen/Qwen3-VL-8B-Instruct": (QWEN3_VL_8B_INSTRUCT, "qwen3_vl", 36, 128, False),
}


def _hf_language_model_params(config, spec) -> tuple[int, int]:
    """(all language-model parameters, those of layers our stack leaves out) of HF's meta-device wrapper."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    skipped = tuple(f"model.language_model.layers.{i}." for i in spec.skipped_layers)
    total = left_out = 0
    for name, p in model.named_parameters():  # tied parameters once, as HF stores them
        if name.startswith(("model.language_model.", "lm_head.")):
            total += p.numel()
            left_out += p.numel() if name.startswith(skipped) else 0
    return total, left_out


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_hub_config_parses_to_the_language_models_full_size(name, tmp_path):
    raw, wrapper, layers, head_dim, tied = REAL_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = modelspec.from_hf_dir(str(tmp_path))
    assert (spec.wrapper, spec.num_layers, spec.head_dim, spec.tie_word_embeddings) == (wrapper, layers, head_dim, tied)
    assert spec.layer_types == ("full_attention",) * layers and spec.window_for("full_attention") is None
    assert spec.rope_for("full_attention").rope_type == "default"
    ours = sum(math.prod(s) for s in param_shapes(spec).values())
    hf_total, hf_left_out = _hf_language_model_params(AutoConfig.from_pretrained(str(tmp_path)), spec)
    print(f"{name}: ours {ours:,}, HF language model {hf_total:,} (left out {hf_left_out:,})")
    assert ours == hf_total - hf_left_out


def test_mllama_11b_style_default_config_counts_without_cross_attention_layers():
    """No hub config.json of Llama-3.2-11B-Vision was found committed in the code index; HF's default
    MllamaConfig is its 11B shape (40 layers, 8 cross-attention ones): our stack is the 32 self-attention
    layers, so our count is HF's language model less the cross-attention layers."""
    config = AutoConfig.for_model("mllama")
    spec = modelspec.from_hf_config(config)
    assert spec.num_layers == 32 and spec.skipped_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert spec.embed_rows == 128264 and spec.vocab_size == 128256 and not spec.tie_word_embeddings
    ours = sum(math.prod(s) for s in param_shapes(spec).values())
    hf_total, hf_left_out = _hf_language_model_params(config, spec)
    print(f"mllama default (11B-style): ours {ours:,}, HF language model {hf_total:,} (left out {hf_left_out:,})")
    assert hf_left_out > 0 and ours == hf_total - hf_left_out


def test_report_parity(request):
    """Prints the measured parity numbers of this module (run with -s to see them)."""
    for name in sorted(PARITY):
        print(name, {k: f"{v:.2e}" for k, v in PARITY[name].items()})


# --- chat templates of vision-language processors ------------------------------------------------------

# A template in the style of VL processors that takes only lists of content parts.
PARTS_ONLY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
)


def _with_template(src_dir, out_dir, template):
    import shutil

    shutil.copytree(src_dir, out_dir)
    tok_dir = os.path.join(out_dir, checkpoint.TOKENIZER) if os.path.isdir(os.path.join(out_dir, "params")) else out_dir
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(tok_dir, name)):
            os.remove(os.path.join(tok_dir, name))
    cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["chat_template"] = template
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    return out_dir


def test_parts_only_chat_template_is_a_clear_error(tmp_path):
    """template=chat on a tokenizer whose template takes only content-part lists: one clear line, exit 2;
    the bundled model's string-content template passes the same check."""
    spans.TokenizerInfo(os.path.join(defaults.DEFAULT_MODEL, checkpoint.TOKENIZER)).check_chat_template()
    model = _with_template(defaults.DEFAULT_MODEL, str(tmp_path / "model"), PARTS_ONLY_TEMPLATE)
    tok = spans.TokenizerInfo(os.path.join(model, checkpoint.TOKENIZER))
    with pytest.raises(spans.ChatTemplateError, match="template=none"):
        tok.check_chat_template()
    proc = _run(
        "launch.score",
        f"--config.model={model}",
        f"--config.data={os.path.join(defaults.SAMPLE_DATA, SCORE_STUDIES[1])}",
        f"--config.out={tmp_path / 'res'}",
        "--config.template=chat",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "plain-string message content" in errors[0] and "Traceback" not in proc.stderr
