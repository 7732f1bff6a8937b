"""Mixture-of-experts models (issue 31): base/post-trained pairs of Qwen3-MoE, Qwen3.5-MoE, Mixtral, OLMoE and
Qwen1.5-MoE.

Same format as configs/sweeps/families.py (model dicts with ``arch`` = the checkpoint's model_type; local
snapshots under ``<model_root>/<hf_id>``), with the study's main conditions. Hub ids as their model cards name
them (huggingface.co/Qwen/Qwen3-30B-A3B-Base: Qwen/Qwen3-30B-A3B is fine-tuned from it; Qwen/Qwen3.5-35B-A3B
from Qwen/Qwen3.5-35B-A3B-Base, as the hub's model tree shows; Mixtral-8x7B-v0.1 and
-Instruct-v0.1; OLMoE-1B-7B-0924 and -Instruct; Qwen1.5-MoE-A2.7B and -Chat). ``size_b`` is the total
parameter count (the active one per token in the comment); real configs of the bases are parsed with HF's
total and active counts by tests/test_parity.py (tests/data/hub_configs/SOURCES.md).

  Qwen3-MoE (arch qwen3_moe): 128 experts, 8 per token, renormalised top-k weights; Qwen3's attention.
  Mixtral (arch mixtral): 8 experts, 2 per token, always renormalised, float32 routing weights; Mistral's
    attention (no window in v0.1's config).
  OLMoE (arch olmoe): 64 experts, 8 per token, not renormalised; full-width QK-norm.
  Qwen1.5-MoE (arch qwen2_moe): 60 experts, 4 per token, plus a sigmoid-gated shared expert; q/k/v biases.
  Qwen3.5-MoE (arch qwen3_5_moe, the vision-language wrapper, scored as its language model on text): Qwen3.5's
    Gated DeltaNet hybrid (three linear-attention layers per gated attention layer) with 256 experts, 8 per
    token, always renormalised, plus a sigmoid-gated shared expert. The post-trained model thinks, as the
    paper's Qwen3.5 models do ("Reasoning").
"""

import ml_collections

from configs.sweeps.families import _model


def models() -> list[dict]:
    out = []
    for base, post, family, generation, size, arch in (
        # 30.5B total, 3.3B active per token
        ("Qwen/Qwen3-30B-A3B-Base", "Qwen/Qwen3-30B-A3B", "Qwen", "Qwen3-MoE", 30.5, "qwen3_moe"),
        # 46.7B total, 12.9B active
        ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1", "Mistral", "Mixtral", 46.7, "mixtral"),
        # 6.9B total, 1.3B active
        ("allenai/OLMoE-1B-7B-0924", "allenai/OLMoE-1B-7B-0924-Instruct", "OLMo", "OLMoE", 6.9, "olmoe"),
        # 14.3B total, 2.7B active
        ("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B-Chat", "Qwen", "Qwen1.5-MoE", 14.3, "qwen2_moe"),
    ):
        out += [
            _model(base, family, generation, size, "base", arch=arch),
            _model(post, family, generation, size, "Instruction-tuned", base, arch=arch, chat=True),
        ]
    # 34.7B total (35.1B with the vision tower), 3.5B active per token
    base = "Qwen/Qwen3.5-35B-A3B-Base"
    out += [
        _model(base, "Qwen", "Qwen3.5-MoE", 34.7, "base", arch="qwen3_5_moe"),
        _model("Qwen/Qwen3.5-35B-A3B", "Qwen", "Qwen3.5-MoE", 34.7, "Reasoning", base, arch="qwen3_5_moe", chat=True),
    ]
    return out


def get_config() -> ml_collections.ConfigDict:
    from configs.sweeps import families

    c = families.get_config()
    c.name = "moe"
    c.out_root = "out/sweeps/moe"
    c.models = models()
    return c
