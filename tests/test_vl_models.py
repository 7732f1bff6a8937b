"""Vision-language checkpoints (Qwen2.5-VL, Qwen3-VL, Llama-3.2-Vision) beyond HF parity (their parity rows
are in tests/test_parity.py): vision weights are never read, both weight layouts (pre-5 hub and
transformers-5 module names) convert to the same parameters, malformed configs are refused, real hub configs
parse to the language model's full parameter count (HF meta-device model), and VL chat templates.
"""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, AutoModelForImageTextToText

from psych201_jax import defaults
from psych201_jax.data.tokenizer import ChatTemplateError, TokenizerInfo
from psych201_jax.model import checkpoint, hf_config
from psych201_jax.model import hf_weights as weights
from psych201_jax.model import spec as modelspec
from psych201_jax.model.params import param_shapes
from psych201_jax.testing.parity import SCORE_STUDIES, run_module
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint


def _tok_dir(flavour, qwen_tokenizer_dir, llama_tokenizer_dir):
    return llama_tokenizer_dir if flavour == "llama" else qwen_tokenizer_dir


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
    spec = hf_config.from_hf_dir(hf_dir)
    bad = dataclasses.replace(spec, skipped_layers=(2, 3))
    with pytest.raises(weights.WeightsError, match=r"layers\.1\.self_attn"):
        list(weights.converted_params(weights.SafetensorsReader(hf_dir), bad, "float32"))


def test_spec_json_without_vl_fields_still_loads(layout_dirs):
    """Specs converted before the VL fields existed load as plain decoders."""
    spec = hf_config.from_hf_dir(layout_dirs["qwen2_5_vl"]["saved"])
    d = json.loads(spec.to_json())
    for key in ("wrapper", "skipped_layers", "embed_vocab_size"):
        d.pop(key)
    assert modelspec.ModelSpec.from_json(json.dumps(d)) == dataclasses.replace(spec, wrapper="")


def test_bad_mrope_section_and_an_unknown_wrapper_are_refused(tmp_path):
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
        hf_config.from_hf_config(config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe", "architectures": ["X"]}))
    with pytest.raises(modelspec.UnsupportedModelError, match="qwen3_omni_moe"):
        hf_config.from_hf_dir(str(tmp_path))


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
    spec = hf_config.from_hf_dir(str(tmp_path))
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
    spec = hf_config.from_hf_config(config)
    assert spec.num_layers == 32 and spec.skipped_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert spec.embed_rows == 128264 and spec.vocab_size == 128256 and not spec.tie_word_embeddings
    ours = sum(math.prod(s) for s in param_shapes(spec).values())
    hf_total, hf_left_out = _hf_language_model_params(config, spec)
    print(f"mllama default (11B-style): ours {ours:,}, HF language model {hf_total:,} (left out {hf_left_out:,})")
    assert hf_left_out > 0 and ours == hf_total - hf_left_out


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
    TokenizerInfo(os.path.join(defaults.DEFAULT_MODEL, checkpoint.TOKENIZER)).check_chat_template()
    model = _with_template(defaults.DEFAULT_MODEL, str(tmp_path / "model"), PARTS_ONLY_TEMPLATE)
    tok = TokenizerInfo(os.path.join(model, checkpoint.TOKENIZER))
    with pytest.raises(ChatTemplateError, match="template=none"):
        tok.check_chat_template()
    proc = run_module(
        "psych201_jax.cli.score",
        f"--config.model={model}",
        f"--config.data={os.path.join(defaults.SAMPLE_DATA, SCORE_STUDIES[1])}",
        f"--config.out={tmp_path / 'res'}",
        "--config.template=chat",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "plain-string message content" in errors[0] and "Traceback" not in proc.stderr
