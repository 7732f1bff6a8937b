"""The study's model set (101 models, 65 base/post-trained pairs; docs/reference-protocol.md) × conditions.

Models are listed by HF id with family, generation, size (billions), post-training kind, paired base and
architecture (``model_type``). Local snapshots are read from ``<model_root>/<hf_id>``. The vision-language
models (arch qwen2_5_vl, qwen3_vl, mllama) and Qwen3.5 (arch qwen3_5, a vision-language wrapper around a
Gated DeltaNet hybrid) are scored as their language model on text, as the paper scores them. Every listed
architecture is supported; an unsupported one would be skipped by the sweep with its reason. Centaur (a 4-bit
adapter) is not listed.

Conditions:
  plain                reference protocol, no template, no persona: the paper's main analysis (all models)
  chat                 reference protocol with the chat template (the paper's 36 Instruct/Chat models)
  persona              persona induction with the participant's own metadata (the 86 non-VL models)
  persona_shuffled     another participant's metadata (a control the paper lacks)
  persona_subset_none  no persona on exactly the persona subset (the unconfounded comparison)
  robust               offset-based spans and a token budget instead of the 32,768-character cut
  accuracy             the discrete test set (single-letter responses): argmax accuracy, also restricted to
                       each study's response options
"""

import ml_collections


def _model(hf_id, family, generation, size_b, kind, base="", arch="qwen2", chat=False, persona=True):
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
    # Qwen1.5 (Qwen2 architecture): base and -Chat.
    for s in ("0.5", "1.8", "4", "7", "14", "32", "72"):
        base = f"Qwen/Qwen1.5-{s}B"
        out += [
            _model(base, "Qwen", "Qwen1.5", s, "base"),
            _model(f"{base}-Chat", "Qwen", "Qwen1.5", s, "Instruction-tuned", base, chat=True),
        ]
    for s in ("0.5", "1.5", "7", "72"):
        base = f"Qwen/Qwen2-{s}B"
        out += [
            _model(base, "Qwen", "Qwen2", s, "base"),
            _model(f"{base}-Instruct", "Qwen", "Qwen2", s, "Instruction-tuned", base, chat=True),
        ]
    for s in ("0.5", "1.5", "3", "7", "14", "32", "72"):
        base = f"Qwen/Qwen2.5-{s}B"
        out += [
            _model(base, "Qwen", "Qwen2.5", s, "base"),
            _model(f"{base}-Instruct", "Qwen", "Qwen2.5", s, "Instruction-tuned", base, chat=True),
        ]
    for s in ("0.5", "1.5", "3", "7", "14", "32"):
        out.append(_model(f"Qwen/Qwen2.5-Coder-{s}B", "Qwen", "Qwen2.5", s, "Code", f"Qwen/Qwen2.5-{s}B"))
    for s in ("1.5", "7", "72"):
        out.append(_model(f"Qwen/Qwen2.5-Math-{s}B", "Qwen", "Qwen2.5", s, "Math", f"Qwen/Qwen2.5-{s}B"))
    for s in ("3", "7", "32", "72"):
        out.append(
            _model(
                f"Qwen/Qwen2.5-VL-{s}B-Instruct",
                "Qwen",
                "Qwen2.5",
                s,
                "Vision",
                f"Qwen/Qwen2.5-{s}B",
                arch="qwen2_5_vl",
                persona=False,
            )
        )
    for s in ("1.5", "7", "14", "32"):
        out.append(
            _model(
                f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{s}B", "Qwen", "Qwen2.5", s, "Reasoning", f"Qwen/Qwen2.5-{s}B"
            )
        )
    # Qwen3: -Base models; the post-trained ones are labelled Reasoning (scored without a template).
    for s in ("0.6", "1.7", "4", "8", "14"):
        out.append(_model(f"Qwen/Qwen3-{s}B-Base", "Qwen", "Qwen3", s, "base", arch="qwen3"))
    for s in ("0.6", "1.7", "4", "8", "14", "32"):
        base = f"Qwen/Qwen3-{s}B-Base" if s != "32" else ""  # Qwen3-32B has no base
        out.append(_model(f"Qwen/Qwen3-{s}B", "Qwen", "Qwen3", s, "Reasoning", base, arch="qwen3", chat=True))
    for s, base in (("2", "1.7"), ("4", "4"), ("8", "8"), ("32", "14")):  # the paper pairs 32B with 14B-Base
        for variant in ("Instruct", "Thinking"):
            out.append(
                _model(
                    f"Qwen/Qwen3-VL-{s}B-{variant}",
                    "Qwen",
                    "Qwen3",
                    s,
                    "Vision",
                    f"Qwen/Qwen3-{base}B-Base",
                    arch="qwen3_vl",
                    persona=False,
                )
            )
    for s in ("0.8", "2", "4", "9"):
        out.append(_model(f"Qwen/Qwen3.5-{s}B-Base", "Qwen", "Qwen3.5", s, "base", arch="qwen3_5", persona=s != "4"))
    for s in ("0.8", "2", "4", "9", "27"):
        base = f"Qwen/Qwen3.5-{s}B-Base" if s != "27" else ""
        out.append(_model(f"Qwen/Qwen3.5-{s}B", "Qwen", "Qwen3.5", s, "Reasoning", base, arch="qwen3_5", chat=True))
    # OLMo 3.
    out += [
        _model("allenai/Olmo-3-1025-7B", "OLMo", "OLMo3", 7, "base", arch="olmo3"),
        _model("allenai/Olmo-3-1125-32B", "OLMo", "OLMo3", 32, "base", arch="olmo3"),
        _model(
            "allenai/Olmo-3-7B-Instruct",
            "OLMo",
            "OLMo3",
            7,
            "Instruction-tuned",
            "allenai/Olmo-3-1025-7B",
            arch="olmo3",
            chat=True,
        ),
        _model("allenai/Olmo-3-7B-Think", "OLMo", "OLMo3", 7, "Reasoning", "allenai/Olmo-3-1025-7B", arch="olmo3"),
        _model(
            "allenai/Olmo-3.1-32B-Instruct",
            "OLMo",
            "OLMo3",
            32,
            "Instruction-tuned",
            "allenai/Olmo-3-1125-32B",
            arch="olmo3",
            chat=True,
        ),
        _model("allenai/Olmo-3.1-32B-Think", "OLMo", "OLMo3", 32, "Reasoning", "allenai/Olmo-3-1125-32B", arch="olmo3"),
    ]
    # Llama 3.x.
    for base, generation, s in (
        ("meta-llama/Meta-Llama-3-8B", "Llama3", 8),
        ("meta-llama/Llama-3.1-8B", "Llama3.1", 8),
        ("meta-llama/Llama-3.1-70B", "Llama3.1", 70),
        ("meta-llama/Llama-3.2-1B", "Llama3.2", 1),
        ("meta-llama/Llama-3.2-3B", "Llama3.2", 3),
    ):
        out += [
            _model(base, "Llama", generation, s, "base", arch="llama"),
            _model(f"{base}-Instruct", "Llama", generation, s, "Instruction-tuned", base, arch="llama", chat=True),
        ]
    out += [
        _model(
            "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
            "Llama",
            "Llama3.1",
            8,
            "Reasoning",
            "meta-llama/Llama-3.1-8B",
            arch="llama",
        ),
        _model(
            "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
            "Llama",
            "Llama3.1",
            70,
            "Reasoning",
            "meta-llama/Llama-3.1-70B",
            arch="llama",
        ),
        _model(
            "unsloth/Llama-3.2-11B-Vision",
            "Llama",
            "Llama3.2",
            11,
            "Vision",
            "meta-llama/Llama-3.1-8B",
            arch="mllama",
            persona=False,
        ),
        _model(
            "unsloth/Llama-3.2-90B-Vision",
            "Llama",
            "Llama3.2",
            90,
            "Vision",
            "meta-llama/Llama-3.1-70B",
            arch="mllama",
            persona=False,
        ),
    ]
    return out


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "psych201_paper"
    c.model_root = "/models"  # local snapshots: <model_root>/<hf_id>
    c.data = "hf:marcelbinz/Psych-201-test"  # or a local folder of its parquet files
    c.out_root = "out/sweeps/psych201_paper"
    c.models = models()
    c.conditions = [
        # The plain condition of every model also computes the head's temperature grid (calibration control).
        dict(name="plain", protocol="reference", template="none", persona="none", kinds="all", temperatures="default"),
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
        dict(name="robust", protocol="robust", template="none", persona="none", kinds="all"),
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
