"""A tiny sweep that runs end to end on CPU: the bundled base model and its fine-tuned "post-trained"
partner, two studies of the bundled sample, every condition."""

import os

import ml_collections

from psych201_jax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.model_root = ""
    c.data = ",".join(os.path.join(defaults.SAMPLE_DATA, s) for s in ("thoma2025riskychoice", "busch2024_stroop"))
    c.out_root = "out/sweeps/tiny"
    c.models = [
        dict(
            hf_id="psych201_jax/tiny-qwen3",
            path=defaults.DEFAULT_MODEL,
            family="TinyQwen3",
            generation="tiny",
            size_b=0.0003,
            kind="base",
            base_hf_id="",
            arch="qwen3",
            chat=False,
        ),
        dict(
            hf_id="psych201_jax/tiny-qwen3-post",
            path=defaults.DEFAULT_POST_MODEL,
            family="TinyQwen3",
            generation="tiny",
            size_b=0.0003,
            kind="Instruction-tuned",
            base_hf_id="psych201_jax/tiny-qwen3",
            arch="qwen3",
            chat=True,
        ),
    ]
    c.conditions = [
        dict(name="plain", protocol="reference", template="none", persona="none", kinds="all", temperatures="default"),
        dict(name="robust", protocol="robust", template="none", persona="none", kinds="all"),
        dict(name="chat", protocol="reference", template="chat", persona="none", kinds="chat"),
        dict(name="persona", protocol="reference", template="none", persona="matched", kinds="persona"),
        dict(name="persona_shuffled", protocol="reference", template="none", persona="shuffled", kinds="persona"),
        dict(
            name="persona_subset_none",
            protocol="reference",
            template="none",
            persona="none",
            persona_subset=True,
            kinds="persona",
        ),
        dict(name="accuracy", protocol="reference", template="none", persona="none", kinds="all", options="study"),
    ]
    c.score = dict(dtype="float32")  # overrides passed to every psych201-score job
    return c
