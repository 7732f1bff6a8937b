"""Small HF tokenizer directories trained locally on Psych-201 text (no hub access needed).

Two flavours mirror the two tokenizer behaviours the scorer must handle:
- ``qwen``: byte-level BPE, no BOS, ChatML chat template with Qwen3's ``enable_thinking`` switch and
  its empty think block on assistant turns after the last user turn;
- ``llama``: byte-level BPE whose post-processor adds a BOS token, and a Llama-3 style chat template
  that itself emits BOS (so rendering + ``add_special_tokens=True`` gives the reference's double BOS).
Both use the Llama-3/Qwen pre-tokenizer split regex, so `` <<`` / ``>>`` merge behaviour is realistic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

# The GPT-4 / Llama-3 / Qwen2 split pattern (digits in groups of 1-3, contractions, punctuation runs).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}"
)

LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# Studies whose first transcripts train the test tokenizers: short and long transcripts, numeric responses,
# >32,768-character texts (tests/conftest.py; tools/build_test_corpus.py keeps their first lines).
TOKENIZER_STUDIES = (
    "thoma2025riskychoice",
    "franke2024bayesian",
    "guenther2024substitutions",
    "busch2024_stroop",
    "shahar2019twosteptask",
    "xu2023augmenting",
    "guenther2023ViSpa",
    "spektor2024lossaversion",
)

FLAVOURS = ("qwen", "llama")


def _special_tokens(flavour: str) -> list[str]:
    if flavour == "qwen":
        return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    if flavour == "llama":
        return ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raise ValueError(f"unknown tokenizer flavour {flavour!r}; expected one of {FLAVOURS}")


def train_tokenizer_dir(
    texts: Iterable[str], out_dir: str, *, flavour: str = "qwen", vocab_size: int = 4096, isolate_close: bool = False
) -> str:
    """Trains a byte-level BPE on ``texts`` and writes an HF tokenizer directory; returns ``out_dir``.

    Trained on Psych-201 text, BPE learns merges like ``>>.\n`` that make the reference protocol's
    ``>>`` search fail on most responses (useful in tests). ``isolate_close`` splits ``>>`` off before
    BPE, so the tokenizer behaves like the large hub tokenizers the reference was written for.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_tokens(flavour)
    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(">>"), behavior="isolated")] if isolate_close else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits
        + [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if flavour == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
                ),
            ]
        )
        kwargs = dict(bos_token=bos, eos_token="<|eot_id|>", chat_template=LLAMA_CHAT_TEMPLATE)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=131072, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def sample_texts(data_root: str, studies: Sequence[str], per_study: int = 40, max_chars: int = 20000) -> list[str]:
    """First ``per_study`` transcripts (clipped to ``max_chars``) of each study, for tokenizer training."""
    import zipfile

    texts = []
    for study in studies:
        path = os.path.join(data_root, study, "prompts.jsonl.zip")
        with zipfile.ZipFile(path) as zf:
            member = next(n for n in zf.namelist() if not n.startswith("__MACOSX") and n.endswith(".jsonl"))
            with zf.open(member) as fh:
                for i, line in enumerate(fh):
                    if i >= per_study:
                        break
                    texts.append(json.loads(line)["text"][:max_chars])
    return texts
