"""Paths of the embedded default: a small bundled Psych-201 sample and a small bundled model."""

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DATA = os.path.join(PACKAGE_DIR, "assets", "sample")
DEFAULT_MODEL = os.path.join(PACKAGE_DIR, "assets", "tiny-qwen3")
DEFAULT_TOKENIZER = os.path.join(DEFAULT_MODEL, "tokenizer")
# The same model fine-tuned further on two studies: a stand-in "post-trained" partner for the tiny sweep.
DEFAULT_POST_MODEL = os.path.join(PACKAGE_DIR, "assets", "tiny-qwen3-post")
CATEGORIES_CSV = os.path.join(PACKAGE_DIR, "assets", "psych_experiment_categories.csv")


def context_length(model_or_tokenizer_dir: str) -> int | None:
    """The model's context length from a config.json / model_spec.json beside or above the tokenizer."""
    import json

    for directory in (model_or_tokenizer_dir, os.path.dirname(os.path.normpath(model_or_tokenizer_dir))):
        for name in ("model_spec.json", "config.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path) as fh:
                    spec = json.load(fh)
                for fields in (spec, spec.get("text_config") or {}):  # a vision-language wrapper: its text model
                    for key in ("max_position_embeddings", "context_length"):
                        if isinstance(fields.get(key), int):
                            return fields[key]
    return None
