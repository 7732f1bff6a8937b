"""The paper's figure definitions: which pairs, models, studies and minimum counts each of the study's plotting
scripts (Psych-201 ``0_analyses/plotting/``; docs/reference-protocol.md, "Figure definitions") selects.

The scripts select models by the study's result file name, the model id with ``/`` replaced by ``-`` plus
``.pth`` (``study_file``); the lists below are copied from the scripts verbatim. A run is in a figure when its
model's file name is listed, whatever its ``model_info`` says: kind, family and generation play no part.

  fig2      plot.py             ``PLOT_PAIRS``; d_pair over >= 2 common studies (pandas std, ddof 1); the mean
                                per post-training type is over the listed pairs with >= 2 common studies.
  accuracy  plot_accuracy.py    the same pairs and counts on the 0/1 token accuracies.
  fig3a     plot_evolution.py   ``EVOLUTION_PAIRS``, the Qwen post-trained models with their own generation's
                                base (Instruct for Qwen2/2.5; the default post-trained model for Qwen3/3.5); d
                                over >= 1 common study (ddof 1); the generation's bar is the mean over its pairs.
  fig4      plot_experiments.py ``EXPERIMENTS_PAIRS``; d_e with streaming moments (ddof 0) over >= 1 common
                                study, inner-joined with the category CSV less four categories; the "Average"
                                row is the mean over the listed pairs only.
  fig5      plot_meta.py        ``META_BASE_MODELS`` + ``META_INSTRUCT_MODELS``, no persona vs matched persona,
                                without ``META_EXCLUDED`` studies, >= 1 common study (ddof 0).
  chat      plot_instruct.py    the models with a chat-template run, each against its own no-template run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from psych201_jax.analysis.metrics import Run

FIG2_MIN_STUDIES = 2  # plot.py: ``if len(common) < 2: continue``
ACCURACY_MIN_STUDIES = 2  # plot_accuracy.py: the same
FIG3A_MIN_STUDIES = 1  # plot_evolution.py: ``if common.empty: continue``
FIG4_MIN_STUDIES = 1  # plot_experiments.py: ``if len(common) == 0: continue``
FIG5_MIN_STUDIES = 1  # plot_meta.py: ``if len(common) == 0: continue``

# plot_meta.py ``exclude``
META_EXCLUDED = ("evangelidis2023upscaling", "gunadi2021deferral")


def study_file(hf_id: str) -> str:
    """The study's result file name of a model (eval.py: ``model.replace("/", "-") + ".pth"``)."""
    return hf_id.replace("/", "-") + ".pth"


def listed_pairs(runs: Iterable[Run], listed: Sequence[tuple[str, str, str]]) -> list[tuple[Run, Run, str]]:
    """(post, base, label) for each listed (post file, base file, label) whose two models are both among
    ``runs`` (one condition), in the list's order. A post-trained run scored with a chat template falls back
    to its base's no-template run, as ``pairs.find_pairs`` does."""
    by_file: dict[str, list[Run]] = {}
    for r in runs:
        by_file.setdefault(study_file(r.model), []).append(r)
    out = []
    for post_file, base_file, label in listed:
        for post in by_file.get(post_file, ()):
            bases = by_file.get(base_file, ())
            base = next((b for b in bases if b.condition == post.condition), None) or next(
                (b for b in bases if b.condition == post.condition.with_template("none")), None
            )
            if base is not None:
                out.append((post, base, label))
    return out


def evolution_base_generation(hf_id: str) -> str | None:
    """plot_evolution.py's ``qwen_generation``: the generation of a Qwen base model from its file name (the
    left panel of fig3a), None for every other model."""
    n = study_file(hf_id).lower()
    if not n.startswith("qwen-qwen") or any(k in n for k in ("instruct", "coder", "math", "-vl-")):
        return None
    if "qwen3.5-" in n:
        return "Qwen3.5" if "base" in n else None
    if "qwen3-" in n:
        return "Qwen3" if "base" in n else None
    if "qwen2.5-" in n:
        return "Qwen2.5"
    if "qwen2-" in n:
        return "Qwen2"
    return None


def meta_label(hf_id: str) -> str | None:
    """plot_meta.py's label of a model in its lists, None when it is not listed."""
    return _META_LABELS.get(study_file(hf_id))


# plot.py and plot_accuracy.py ``PAIRS`` (identical lists): (post, base, post-training type).
PLOT_PAIRS = (
    ("Qwen-Qwen1.5-0.5B-Chat.pth", "Qwen-Qwen1.5-0.5B.pth", "Instruction-tuned"),
    ("Qwen-Qwen1.5-1.8B-Chat.pth", "Qwen-Qwen1.5-1.8B.pth", "Instruction-tuned"),
    ("Qwen-Qwen1.5-4B-Chat.pth", "Qwen-Qwen1.5-4B.pth", "Instruction-tuned"),
    ("Qwen-Qwen1.5-7B-Chat.pth", "Qwen-Qwen1.5-7B.pth", "Instruction-tuned"),
    ("Qwen-Qwen1.5-14B-Chat.pth", "Qwen-Qwen1.5-14B.pth", "Instruction-tuned"),
    ("Qwen-Qwen1.5-32B-Chat.pth", "Qwen-Qwen1.5-32B.pth", "Instruction-tuned"),
    ("Qwen-Qwen1.5-72B-Chat.pth", "Qwen-Qwen1.5-72B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2-0.5B-Instruct.pth", "Qwen-Qwen2-0.5B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2-1.5B-Instruct.pth", "Qwen-Qwen2-1.5B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2-7B-Instruct.pth", "Qwen-Qwen2-7B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2-72B-Instruct.pth", "Qwen-Qwen2-72B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-0.5B-Instruct.pth", "Qwen-Qwen2.5-0.5B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-1.5B-Instruct.pth", "Qwen-Qwen2.5-1.5B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-3B-Instruct.pth", "Qwen-Qwen2.5-3B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-7B-Instruct.pth", "Qwen-Qwen2.5-7B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-14B-Instruct.pth", "Qwen-Qwen2.5-14B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-32B-Instruct.pth", "Qwen-Qwen2.5-32B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-72B-Instruct.pth", "Qwen-Qwen2.5-72B.pth", "Instruction-tuned"),
    ("Qwen-Qwen2.5-Coder-0.5B.pth", "Qwen-Qwen2.5-0.5B.pth", "Code"),
    ("Qwen-Qwen2.5-Coder-1.5B.pth", "Qwen-Qwen2.5-1.5B.pth", "Code"),
    ("Qwen-Qwen2.5-Coder-3B.pth", "Qwen-Qwen2.5-3B.pth", "Code"),
    ("Qwen-Qwen2.5-Coder-7B.pth", "Qwen-Qwen2.5-7B.pth", "Code"),
    ("Qwen-Qwen2.5-Coder-14B.pth", "Qwen-Qwen2.5-14B.pth", "Code"),
    ("Qwen-Qwen2.5-Coder-32B.pth", "Qwen-Qwen2.5-32B.pth", "Code"),
    ("Qwen-Qwen2.5-Math-1.5B.pth", "Qwen-Qwen2.5-1.5B.pth", "Math"),
    ("Qwen-Qwen2.5-Math-7B.pth", "Qwen-Qwen2.5-7B.pth", "Math"),
    ("Qwen-Qwen2.5-Math-72B.pth", "Qwen-Qwen2.5-72B.pth", "Math"),
    ("Qwen-Qwen2.5-VL-3B-Instruct.pth", "Qwen-Qwen2.5-3B.pth", "Vision"),
    ("Qwen-Qwen2.5-VL-7B-Instruct.pth", "Qwen-Qwen2.5-7B.pth", "Vision"),
    ("Qwen-Qwen2.5-VL-32B-Instruct.pth", "Qwen-Qwen2.5-32B.pth", "Vision"),
    ("Qwen-Qwen2.5-VL-72B-Instruct.pth", "Qwen-Qwen2.5-72B.pth", "Vision"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-1.5B.pth", "Qwen-Qwen2.5-1.5B.pth", "Reasoning"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-7B.pth", "Qwen-Qwen2.5-7B.pth", "Reasoning"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-14B.pth", "Qwen-Qwen2.5-14B.pth", "Reasoning"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.pth", "Qwen-Qwen2.5-32B.pth", "Reasoning"),
    ("Qwen-Qwen3-0.6B.pth", "Qwen-Qwen3-0.6B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3-1.7B.pth", "Qwen-Qwen3-1.7B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3-4B.pth", "Qwen-Qwen3-4B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3-8B.pth", "Qwen-Qwen3-8B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3-14B.pth", "Qwen-Qwen3-14B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3.5-0.8B.pth", "Qwen-Qwen3.5-0.8B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3.5-2B.pth", "Qwen-Qwen3.5-2B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3.5-4B.pth", "Qwen-Qwen3.5-4B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3.5-9B.pth", "Qwen-Qwen3.5-9B-Base.pth", "Reasoning"),
    ("Qwen-Qwen3-VL-2B-Instruct.pth", "Qwen-Qwen3-1.7B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-4B-Instruct.pth", "Qwen-Qwen3-4B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-8B-Instruct.pth", "Qwen-Qwen3-8B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-32B-Instruct.pth", "Qwen-Qwen3-14B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-2B-Thinking.pth", "Qwen-Qwen3-1.7B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-4B-Thinking.pth", "Qwen-Qwen3-4B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-8B-Thinking.pth", "Qwen-Qwen3-8B-Base.pth", "Vision"),
    ("Qwen-Qwen3-VL-32B-Thinking.pth", "Qwen-Qwen3-14B-Base.pth", "Vision"),
    ("allenai-Olmo-3-7B-Instruct.pth", "allenai-Olmo-3-1025-7B.pth", "Instruction-tuned"),
    ("allenai-Olmo-3.1-32B-Instruct.pth", "allenai-Olmo-3-1125-32B.pth", "Instruction-tuned"),
    ("allenai-Olmo-3-7B-Think.pth", "allenai-Olmo-3-1025-7B.pth", "Reasoning"),
    ("allenai-Olmo-3.1-32B-Think.pth", "allenai-Olmo-3-1125-32B.pth", "Reasoning"),
    ("meta-llama-Meta-Llama-3-8B-Instruct.pth", "meta-llama-Meta-Llama-3-8B.pth", "Instruction-tuned"),
    ("meta-llama-Llama-3.1-8B-Instruct.pth", "meta-llama-Llama-3.1-8B.pth", "Instruction-tuned"),
    ("meta-llama-Llama-3.1-70B-Instruct.pth", "meta-llama-Llama-3.1-70B.pth", "Instruction-tuned"),
    ("meta-llama-Llama-3.2-1B-Instruct.pth", "meta-llama-Llama-3.2-1B.pth", "Instruction-tuned"),
    ("meta-llama-Llama-3.2-3B-Instruct.pth", "meta-llama-Llama-3.2-3B.pth", "Instruction-tuned"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.pth", "meta-llama-Llama-3.1-8B.pth", "Reasoning"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-70B.pth", "meta-llama-Llama-3.1-70B.pth", "Reasoning"),
    ("unsloth-Llama-3.2-11B-Vision.pth", "meta-llama-Llama-3.1-8B.pth", "Vision"),
    ("unsloth-Llama-3.2-90B-Vision.pth", "meta-llama-Llama-3.1-70B.pth", "Vision"),
)

# plot_evolution.py's ``pairs`` (built there by loops over sizes): (post, base, generation).
EVOLUTION_PAIRS = (
    ("Qwen-Qwen2-0.5B-Instruct.pth", "Qwen-Qwen2-0.5B.pth", "Qwen2"),
    ("Qwen-Qwen2-1.5B-Instruct.pth", "Qwen-Qwen2-1.5B.pth", "Qwen2"),
    ("Qwen-Qwen2-7B-Instruct.pth", "Qwen-Qwen2-7B.pth", "Qwen2"),
    ("Qwen-Qwen2-72B-Instruct.pth", "Qwen-Qwen2-72B.pth", "Qwen2"),
    ("Qwen-Qwen2.5-0.5B-Instruct.pth", "Qwen-Qwen2.5-0.5B.pth", "Qwen2.5"),
    ("Qwen-Qwen2.5-1.5B-Instruct.pth", "Qwen-Qwen2.5-1.5B.pth", "Qwen2.5"),
    ("Qwen-Qwen2.5-3B-Instruct.pth", "Qwen-Qwen2.5-3B.pth", "Qwen2.5"),
    ("Qwen-Qwen2.5-7B-Instruct.pth", "Qwen-Qwen2.5-7B.pth", "Qwen2.5"),
    ("Qwen-Qwen2.5-14B-Instruct.pth", "Qwen-Qwen2.5-14B.pth", "Qwen2.5"),
    ("Qwen-Qwen2.5-32B-Instruct.pth", "Qwen-Qwen2.5-32B.pth", "Qwen2.5"),
    ("Qwen-Qwen2.5-72B-Instruct.pth", "Qwen-Qwen2.5-72B.pth", "Qwen2.5"),
    ("Qwen-Qwen3-0.6B.pth", "Qwen-Qwen3-0.6B-Base.pth", "Qwen3"),
    ("Qwen-Qwen3-1.7B.pth", "Qwen-Qwen3-1.7B-Base.pth", "Qwen3"),
    ("Qwen-Qwen3-4B.pth", "Qwen-Qwen3-4B-Base.pth", "Qwen3"),
    ("Qwen-Qwen3-8B.pth", "Qwen-Qwen3-8B-Base.pth", "Qwen3"),
    ("Qwen-Qwen3-14B.pth", "Qwen-Qwen3-14B-Base.pth", "Qwen3"),
    ("Qwen-Qwen3.5-0.8B.pth", "Qwen-Qwen3.5-0.8B-Base.pth", "Qwen3.5"),
    ("Qwen-Qwen3.5-2B.pth", "Qwen-Qwen3.5-2B-Base.pth", "Qwen3.5"),
    ("Qwen-Qwen3.5-4B.pth", "Qwen-Qwen3.5-4B-Base.pth", "Qwen3.5"),
    ("Qwen-Qwen3.5-9B.pth", "Qwen-Qwen3.5-9B-Base.pth", "Qwen3.5"),
)

# plot_experiments.py ``PAIRS`` (its uncommented entries): (post, base, display name).
EXPERIMENTS_PAIRS = (
    ("Qwen-Qwen3-0.6B.pth", "Qwen-Qwen3-0.6B-Base.pth", "Qwen3-0.6B-Reasoning"),
    ("Qwen-Qwen3-1.7B.pth", "Qwen-Qwen3-1.7B-Base.pth", "Qwen3-1.7B-Reasoning"),
    ("Qwen-Qwen3-4B.pth", "Qwen-Qwen3-4B-Base.pth", "Qwen3-4B-Reasoning"),
    ("Qwen-Qwen3-8B.pth", "Qwen-Qwen3-8B-Base.pth", "Qwen3-8B-Reasoning"),
    ("Qwen-Qwen3-14B.pth", "Qwen-Qwen3-14B-Base.pth", "Qwen3-14B-Reasoning"),
    ("Qwen-Qwen3-VL-2B-Instruct.pth", "Qwen-Qwen3-1.7B-Base.pth", "Qwen3-2B-Vision-Instruct"),
    ("Qwen-Qwen3-VL-4B-Instruct.pth", "Qwen-Qwen3-4B-Base.pth", "Qwen3-4B-Vision-Instruct"),
    ("Qwen-Qwen3-VL-8B-Instruct.pth", "Qwen-Qwen3-8B-Base.pth", "Qwen3-8B-Vision-Instruct"),
    ("Qwen-Qwen3-VL-32B-Instruct.pth", "Qwen-Qwen3-14B-Base.pth", "Qwen3-32B-Vision-Instruct"),
    ("Qwen-Qwen3-VL-2B-Thinking.pth", "Qwen-Qwen3-1.7B-Base.pth", "Qwen3-2B-Vision-Thinking"),
    ("Qwen-Qwen3-VL-4B-Thinking.pth", "Qwen-Qwen3-4B-Base.pth", "Qwen3-4B-Vision-Thinking"),
    ("Qwen-Qwen3-VL-8B-Thinking.pth", "Qwen-Qwen3-8B-Base.pth", "Qwen3-8B-Vision-Thinking"),
    ("Qwen-Qwen3-VL-32B-Thinking.pth", "Qwen-Qwen3-14B-Base.pth", "Qwen3-32B-Vision-Thinking"),
    ("allenai-Olmo-3-7B-Instruct.pth", "allenai-Olmo-3-1025-7B.pth", "Olmo3-7B-Instruct"),
    ("allenai-Olmo-3.1-32B-Instruct.pth", "allenai-Olmo-3-1125-32B.pth", "Olmo3.1-32B-Instruct"),
    ("allenai-Olmo-3-7B-Think.pth", "allenai-Olmo-3-1025-7B.pth", "Olmo3-7B-Think"),
    ("allenai-Olmo-3.1-32B-Think.pth", "allenai-Olmo-3-1125-32B.pth", "Olmo3.1-32B-Think"),
    ("meta-llama-Llama-3.1-8B-Instruct.pth", "meta-llama-Llama-3.1-8B.pth", "Llama3.1-8B-Instruct"),
    ("meta-llama-Llama-3.1-70B-Instruct.pth", "meta-llama-Llama-3.1-70B.pth", "Llama3.1-70B-Instruct"),
    ("meta-llama-Llama-3.2-1B-Instruct.pth", "meta-llama-Llama-3.2-1B.pth", "Llama3.2-1B-Instruct"),
    ("meta-llama-Llama-3.2-3B-Instruct.pth", "meta-llama-Llama-3.2-3B.pth", "Llama3.2-3B-Instruct"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.pth", "meta-llama-Llama-3.1-8B.pth", "Llama3.1-8B-Reasoning"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-70B.pth", "meta-llama-Llama-3.1-70B.pth", "Llama3.1-70B-Reasoning"),
    ("unsloth-Llama-3.2-11B-Vision.pth", "meta-llama-Llama-3.1-8B.pth", "Llama3.2-11B-Vision"),
    ("unsloth-Llama-3.2-90B-Vision.pth", "meta-llama-Llama-3.1-70B.pth", "Llama3.2-90B-Vision"),
)

# plot_meta.py ``base_models``: (model, label).
META_BASE_MODELS = (
    ("Qwen-Qwen3-0.6B-Base.pth", "Qwen3-0.6B"),
    ("Qwen-Qwen3-1.7B-Base.pth", "Qwen3-1.7B"),
    ("Qwen-Qwen3-4B-Base.pth", "Qwen3-4B"),
    ("Qwen-Qwen3-8B-Base.pth", "Qwen3-8B"),
    ("Qwen-Qwen3-14B-Base.pth", "Qwen3-14B"),
    ("allenai-Olmo-3-1025-7B.pth", "Olmo3-7B"),
    ("allenai-Olmo-3-1125-32B.pth", "Olmo3.1-32B"),
    ("meta-llama-Llama-3.2-1B.pth", "Llama3.2-1B"),
    ("meta-llama-Llama-3.2-3B.pth", "Llama3.2-3B"),
    ("meta-llama-Llama-3.1-8B.pth", "Llama3.1-8B"),
    ("meta-llama-Llama-3.1-70B.pth", "Llama3.1-70B"),
)

# plot_meta.py ``instruct_models``: (model, label).
META_INSTRUCT_MODELS = (
    ("Qwen-Qwen3-0.6B.pth", "Qwen3-0.6B-Reasoning"),
    ("Qwen-Qwen3-1.7B.pth", "Qwen3-1.7B-Reasoning"),
    ("Qwen-Qwen3-4B.pth", "Qwen3-4B-Reasoning"),
    ("Qwen-Qwen3-8B.pth", "Qwen3-8B-Reasoning"),
    ("Qwen-Qwen3-14B.pth", "Qwen3-14B-Reasoning"),
    ("allenai-Olmo-3-7B-Instruct.pth", "Olmo3-7B-Instruct"),
    ("allenai-Olmo-3.1-32B-Instruct.pth", "Olmo3.1-32B-Instruct"),
    ("meta-llama-Llama-3.2-1B-Instruct.pth", "Llama3.2-1B-Instruct"),
    ("meta-llama-Llama-3.2-3B-Instruct.pth", "Llama3.2-3B-Instruct"),
    ("meta-llama-Llama-3.1-8B-Instruct.pth", "Llama3.1-8B-Instruct"),
    ("meta-llama-Llama-3.1-70B-Instruct.pth", "Llama3.1-70B-Instruct"),
)

_META_LABELS = dict(META_BASE_MODELS + META_INSTRUCT_MODELS)
