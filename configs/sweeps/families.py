"""Families beyond the study's eight architectures (issue 29): base/post-trained pairs of OLMo 2 and Mistral.

Same format as configs/sweeps/psych201_paper.py (model dicts with ``arch`` = the checkpoint's model_type;
local snapshots under ``<model_root>/<hf_id>``), with the study's main conditions. Hub ids as their model
cards name them (huggingface.co/allenai/OLMo-2-1124-7B lists -SFT, -DPO and -Instruct for 7B and 13B; the
stage chains are configs/sweeps/stages.py's business). Real configs of the bases are parsed, with HF's
parameter counts, by tests/test_parity.py (tests/data/hub_configs/SOURCES.md).

  OLMo 2 (arch olmo2): OLMo 3's post-norm layer with full-width QK-norm, no sliding windows.
  Mistral (arch mistral): Llama's layer with a sliding window on every layer when the config has one
    (Mistral-7B-v0.1 and its Instruct: 4096 tokens), none in v0.3 and Nemo; Nemo's head_dim (128) differs
    from hidden / heads (5120 / 32 = 160) and is read from the config.

Not supported yet: Gemma 2 and Gemma 3 (issue 29 item 3: soft caps, (1 + w) norms, sandwich norms, GeGLU,
scaled embeddings, per-layer RoPE); they would be skipped by the sweep as unsupported architectures, so they
are not listed here.
"""

import ml_collections


def _model(hf_id, family, generation, size_b, kind, base="", arch="mistral", chat=False, persona=True):
    return dict(
        hf_id=hf_id,
        family=family,
        generation=generation,
        size_b=float(size_b),
        kind=kind,
        base_hf_id=base,
        arch=arch,
        chat=chat,
        persona=persona,
    )


def models() -> list[dict]:
    out = []
    # OLMo 2 (November 2024 release): base -> final post-trained (SFT, DPO, then RLVR) Instruct.
    for s in ("7", "13"):
        base = f"allenai/OLMo-2-1124-{s}B"
        out += [
            _model(base, "OLMo", "OLMo2", s, "base", arch="olmo2"),
            _model(f"{base}-Instruct", "OLMo", "OLMo2", s, "Instruction-tuned", base, arch="olmo2", chat=True),
        ]
    # Mistral 7B v0.1 (sliding window 4096) and v0.3 (no window, 32768-token vocabulary), Mistral-Nemo 12B.
    for base, post, generation, size in (
        ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "Mistral-v0.1", 7),
        ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "Mistral-v0.3", 7),
        ("mistralai/Mistral-Nemo-Base-2407", "mistralai/Mistral-Nemo-Instruct-2407", "Mistral-Nemo", 12),
    ):
        out += [
            _model(base, "Mistral", generation, size, "base"),
            _model(post, "Mistral", generation, size, "Instruction-tuned", base, chat=True),
        ]
    return out


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "families"
    c.model_root = "/models"  # local snapshots: <model_root>/<hf_id>
    c.data = "hf:marcelbinz/Psych-201-test"  # or a local folder of its parquet files
    c.out_root = "out/sweeps/families"
    c.models = models()
    c.conditions = [
        dict(name="plain", protocol="reference", template="none", persona="none", kinds="all", temperatures="default"),
        dict(name="chat", protocol="reference", template="chat", persona="none", kinds="chat"),
        dict(name="persona", protocol="reference", template="none", persona="matched", kinds="persona"),
        dict(
            name="accuracy",
            protocol="reference",
            template="none",
            persona="none",
            kinds="persona",
            data="hf:marcelbinz/Psych-201-discrete-test",
            options="study",
        ),
    ]
    c.score = dict(dtype="bfloat16")  # overrides passed to every psych201-score job
    return c
