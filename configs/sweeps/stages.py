"""Stage chains (issue 29 item 1): every published post-training stage of open releases, to see which stage
costs human-likeness (psych201-analyze's "Stage chains" section, stages.csv, fig_stages.png).

Same format as configs/sweeps/families.py (model dicts with ``arch`` = the checkpoint's model_type; local
snapshots under ``<model_root>/<hf_id>``), with the study's main conditions (plain with the temperature grid,
persona, accuracy). Each post-trained checkpoint names its ``chain`` and ``stage`` and its chain's base
(``base_hf_id``); a base is shared by the chains that start from it (OLMo 3 7B: Think and Instruct), so bases
carry no chain. Stage = the step that produced the checkpoint: base, sft, dpo, rl. Every final release here
is the RLVR output, so it is ``rl``; a chain's last member is its final model (``final`` is for a final step
that is none of these). Every stage checkpoint is also paired with its base in pair_misalignment.csv, but only
the final release counts in the broader means by type and generation.

Hub ids, checked against the model cards' stage tables ("Stage | Base Model | SFT | DPO | Final Models
(RLVR)"):
  OLMo 3 (arch olmo3; huggingface.co/allenai/Olmo-3-1025-7B, .../Olmo-3-7B-Think-DPO, .../Olmo-3-7B-Instruct):
    allenai/Olmo-3-1025-7B -> Olmo-3-7B-Think-SFT -> Olmo-3-7B-Think-DPO -> Olmo-3-7B-Think;
    allenai/Olmo-3-1025-7B -> Olmo-3-7B-Instruct-SFT -> Olmo-3-7B-Instruct-DPO -> Olmo-3-7B-Instruct;
    allenai/Olmo-3-1125-32B -> Olmo-3-32B-Think-SFT -> Olmo-3-32B-Think-DPO -> Olmo-3-32B-Think.
    The cards' table names the bases "Olmo-3-7B" / "Olmo-3-32B"; their hub ids are Olmo-3-1025-7B and
    Olmo-3-1125-32B. There is no published 32B Instruct SFT/DPO chain of Olmo 3 (the paper sweep's
    Olmo-3.1-32B-Instruct and Olmo-3.1-32B-Think are later releases, not the last stage of these chains).
  OLMo 2 (arch olmo2; huggingface.co/allenai/OLMo-2-1124-7B, .../OLMo-2-0325-32B, .../OLMo-2-0425-1B):
    allenai/OLMo-2-1124-{7,13}B -> -SFT -> -DPO -> -Instruct; allenai/OLMo-2-0425-1B -> -SFT -> -DPO ->
    -Instruct (its RL is GRPO; an intermediate allenai/OLMo-2-0425-1B-RLVR1 exists and is not listed);
    allenai/OLMo-2-0325-32B -> -SFT -> -DPO -> -Instruct (GRPO).
  Tülu 3 (arch llama; huggingface.co/allenai/Llama-3.1-Tulu-3-70B):
    meta-llama/Llama-3.1-8B -> allenai/Llama-3.1-Tulu-3-8B-SFT -> -8B-DPO -> allenai/Llama-3.1-Tulu-3-8B;
    meta-llama/Llama-3.1-70B -> allenai/Llama-3.1-Tulu-3-70B-SFT -> -70B-DPO -> allenai/Llama-3.1-Tulu-3-70B.
    (allenai/Llama-3.1-Tulu-3.1-8B is a later RL-only rerun from the same DPO checkpoint, not listed.)
"""

import os
import sys

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # configs/ is not installed: a console script run from elsewhere still finds it
    sys.path.insert(0, _REPO)

from configs.sweeps import families  # noqa: E402

CONDITIONS = ("plain", "persona", "accuracy")  # the study's main conditions, as families.py defines them


def _model(hf_id, family, generation, size_b, kind, base="", arch="olmo3", stage="", chain="") -> dict:
    """families.py's model dict (no chat condition here) with the checkpoint's stage and chain."""
    return {**families._model(hf_id, family, generation, size_b, kind, base, arch=arch), "stage": stage, "chain": chain}


def _chain(name, base, stages, family, generation, size, kind, arch) -> list[dict]:
    """The post-trained members of one chain: (hf_id, stage) in training order, all over ``base``."""
    return [
        _model(hf_id, family, generation, size, kind, base, arch=arch, stage=stage, chain=name)
        for hf_id, stage in stages
    ]


def models() -> list[dict]:
    out = []
    # OLMo 3: the 7B base starts two chains (Think, Instruct); the 32B base one (Think).
    olmo3_7b, olmo3_32b = "allenai/Olmo-3-1025-7B", "allenai/Olmo-3-1125-32B"
    out += [
        _model(olmo3_7b, "OLMo", "OLMo3", 7, "base", stage="base"),
        _model(olmo3_32b, "OLMo", "OLMo3", 32, "base", stage="base"),
    ]
    for size, base, variant, kind in (
        (7, olmo3_7b, "Think", "Reasoning"),
        (7, olmo3_7b, "Instruct", "Instruction-tuned"),
        (32, olmo3_32b, "Think", "Reasoning"),
    ):
        post = f"allenai/Olmo-3-{size}B-{variant}"
        stages = ((f"{post}-SFT", "sft"), (f"{post}-DPO", "dpo"), (post, "rl"))
        out += _chain(f"OLMo-3 {size}B {variant}", base, stages, "OLMo", "OLMo3", size, kind, "olmo3")
    # OLMo 2: November 2024 (7B, 13B), March 2025 (32B), April 2025 (1B).
    for size, release in (("1", "0425"), ("7", "1124"), ("13", "1124"), ("32", "0325")):
        base = f"allenai/OLMo-2-{release}-{size}B"
        stages = ((f"{base}-SFT", "sft"), (f"{base}-DPO", "dpo"), (f"{base}-Instruct", "rl"))
        out.append(_model(base, "OLMo", "OLMo2", size, "base", arch="olmo2", stage="base"))
        out += _chain(f"OLMo-2 {size}B Instruct", base, stages, "OLMo", "OLMo2", size, "Instruction-tuned", "olmo2")
    # Tülu 3 over Llama 3.1.
    for size in ("8", "70"):
        base = f"meta-llama/Llama-3.1-{size}B"
        post = f"allenai/Llama-3.1-Tulu-3-{size}B"
        stages = ((f"{post}-SFT", "sft"), (f"{post}-DPO", "dpo"), (post, "rl"))
        out.append(_model(base, "Llama", "Llama3.1", size, "base", arch="llama", stage="base"))
        out += _chain(f"Tülu-3 {size}B", base, stages, "Tulu", "Tulu3", size, "Instruction-tuned", "llama")
    return out


def get_config() -> ml_collections.ConfigDict:
    c = families.get_config()
    c.name = "stages"
    c.out_root = "out/sweeps/stages"
    c.models = models()
    c.conditions = [dict(x) for x in c.conditions if x["name"] in CONDITIONS]
    return c
