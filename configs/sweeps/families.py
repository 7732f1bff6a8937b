"""Families beyond the study's eight architectures (issue 29): base/post-trained pairs of OLMo 2, Mistral,
Gemma 2 and Gemma 3.

Same format as configs/sweeps/psych201_paper.py (model dicts with ``arch`` = the checkpoint's model_type;
local snapshots under ``<model_root>/<hf_id>``), with the study's main conditions. Hub ids as their model
cards name them (huggingface.co/allenai/OLMo-2-1124-7B lists -SFT, -DPO and -Instruct for 7B and 13B; the
stage chains are configs/sweeps/stages.py's business). Real configs of the bases are parsed, with HF's
parameter counts, by tests/test_parity.py (tests/data/hub_configs/SOURCES.md).

  OLMo 2 (arch olmo2): OLMo 3's post-norm layer with full-width QK-norm, no sliding windows.
  Mistral (arch mistral): Llama's layer with a sliding window on every layer when the config has one
    (Mistral-7B-v0.1 and its Instruct: 4096 tokens), none in v0.3 and Nemo; Nemo's head_dim (128) differs
    from hidden / heads (5120 / 32 = 160) and is read from the config.
  Gemma 2 (arch gemma2): (1 + w) norms before and after attention and MLP, GeGLU, embeddings scaled by
    sqrt(hidden), windowed (4096) and full layers alternating, attention-logit (50) and final-logit (30) soft
    caps; the 27B scales queries by query_pre_attn_scalar 144, not head_dim 128.
  Gemma 3: five windowed layers per full one, RoPE 10K local and 1M global (x 8 linear from 4B up), a
    per-head QK-norm, no soft caps. 270M and 1B are text-only (arch gemma3_text, ``-pt`` / ``-it``, the 270M
    base without a suffix); 4B, 12B and 27B are Gemma3ForConditionalGeneration (arch gemma3), scored as their
    language model on text, as the study's vision-language models are.
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
    # Gemma 2 (June 2024): base -> -it.
    for size in ("2", "9", "27"):
        base = f"google/gemma-2-{size}b"
        out += [
            _model(base, "Gemma", "Gemma2", size, "base", arch="gemma2"),
            _model(f"{base}-it", "Gemma", "Gemma2", size, "Instruction-tuned", base, arch="gemma2", chat=True),
        ]
    # Gemma 3 (March 2025; 270M August 2025): base (-pt, the 270M without a suffix) -> -it.
    for size, base, arch in (
        ("0.27", "google/gemma-3-270m", "gemma3_text"),
        ("1", "google/gemma-3-1b-pt", "gemma3_text"),
        ("4", "google/gemma-3-4b-pt", "gemma3"),
        ("12", "google/gemma-3-12b-pt", "gemma3"),
        ("27", "google/gemma-3-27b-pt", "gemma3"),
    ):
        post = base.removesuffix("-pt") + "-it"
        out += [
            _model(base, "Gemma", "Gemma3", size, "base", arch=arch),
            _model(post, "Gemma", "Gemma3", size, "Instruction-tuned", base, arch=arch, chat=True),
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
