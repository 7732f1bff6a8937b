"""A tiny stage-chain sweep that runs end to end on CPU: the bundled base model, two intermediate "SFT" and
"DPO" stages built from it (``tools.build_stages``: deterministic, cached under
~/.cache/psych201_jax/tiny-stages) and the bundled fine-tuned model as the chain's final stage, under the study's
conditions (plain, persona, accuracy) on two studies of the bundled sample. psych201-analyze on its results
writes the "Stage chains" section, stages.csv, stages_by_domain.csv and fig_stages.png."""

import os
import sys

import ml_collections

from psych201_jax import defaults

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # tools/ is not installed: a console script run from elsewhere still finds it
    sys.path.insert(0, _REPO)

from configs.sweeps import tiny  # noqa: E402
from tools import build_stages  # noqa: E402

CONDITIONS = ("plain", "persona", "accuracy")  # the study's main conditions, as tiny.py defines them


def _model(hf_id, path, kind, stage, base="", chain=""):
    return dict(
        hf_id=hf_id,
        path=path,
        family="TinyQwen3",
        generation="tiny",
        size_b=0.0003,
        kind=kind,
        base_hf_id=base,
        arch="qwen3",
        chat=False,
        stage=stage,
        chain=chain,
    )


def get_config() -> ml_collections.ConfigDict:
    stages = build_stages.ensure()
    base, chain = build_stages.BASE_ID, build_stages.CHAIN
    c = tiny.get_config()
    c.name = "tiny_stages"
    c.out_root = "out/sweeps/tiny_stages"
    c.models = [
        _model(base, defaults.DEFAULT_MODEL, "base", "base"),
        *(_model(build_stages.stage_id(s), path, "Instruction-tuned", s, base, chain) for s, path in stages.items()),
        _model(build_stages.POST_ID, defaults.DEFAULT_POST_MODEL, "Instruction-tuned", "final", base, chain),
    ]
    c.conditions = [dict(x) for x in c.conditions if x["name"] in CONDITIONS]
    return c
