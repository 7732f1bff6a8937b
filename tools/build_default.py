r"""Rebuilds the embedded default (bundled sample + tokenizer + tiny model) from the shared data.

  python -m tools.build_default --data=$PSYCH201_DATA

Maintainers run this once; the outputs are committed under psych201_jax/data/ so README command 1
works on a fresh machine with neither the shared data nor torch.
"""

import json
import os
import shutil
import tempfile
import zipfile

import numpy as np
from absl import app, flags

from psych201_jax import defaults
from psych201_jax.model import checkpoint
from psych201_jax.testing import tiny_models, tiny_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("data", os.path.join("..", "shared", "data", "psych201"), "Psych-201 studies.")

# (study, 0-based lines): persona metadata (thoma, busch), '<<-' and '<<skip>>' responses (guenther),
# transcripts over 32,768 characters (xu2023), long multi-round games (alsobay), short ones (franke).
SAMPLE = (
    ("thoma2025riskychoice", (0, 1, 2)),
    ("franke2024bayesian", (0, 1, 2)),
    ("busch2024_stroop", (0, 1)),
    ("guenther2024substitutions", (0, 379, 517)),
    ("xu2023augmenting", (0, 1)),
    ("alsobay2025publicGoodsGame", (0, 1)),
)
TOKENIZER_STUDIES = tuple(s for s, _ in SAMPLE) + (
    "guenther2023ViSpa",
    "shahar2019twosteptask",
    "spektor2024lossaversion",
    "sandbrink2024metacontrol",
)


def build_sample(data_root: str, out_root: str) -> None:
    """Copies the SAMPLE lines verbatim into ``<out_root>/<study>/prompts.jsonl``."""
    if os.path.isdir(out_root):
        shutil.rmtree(out_root)
    for study, lines in SAMPLE:
        with zipfile.ZipFile(os.path.join(data_root, study, "prompts.jsonl.zip")) as zf:
            member = next(n for n in zf.namelist() if not n.startswith("__MACOSX") and n.endswith(".jsonl"))
            wanted = {}
            with zf.open(member) as fh:
                for i, line in enumerate(fh):
                    if i in lines:
                        json.loads(line)  # must parse
                        wanted[i] = line.rstrip(b"\n")
        os.makedirs(os.path.join(out_root, study))
        with open(os.path.join(out_root, study, "prompts.jsonl"), "wb") as out:
            out.write(b"\n".join(wanted[i] for i in lines) + b"\n")


def build_tokenizer(data_root: str, out_dir: str) -> None:
    """Byte-level BPE (4096 tokens) with '>>' split off, as large hub tokenizers effectively behave."""
    texts = tiny_tokenizer.sample_texts(data_root, TOKENIZER_STUDIES, per_study=40)
    tiny_tokenizer.train_tokenizer_dir(texts, out_dir, flavour="qwen", isolate_close=True)


def training_tokens(
    data_root: str, tokenizer_dir: str, per_study: int = 60, studies: tuple[str, ...] = TOKENIZER_STUDIES
) -> np.ndarray:
    """Token ids of the first transcripts of ``studies``, excluding the bundled sample's lines."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    held_out = dict(SAMPLE)
    ids: list[int] = []
    for study in studies:
        with zipfile.ZipFile(os.path.join(data_root, study, "prompts.jsonl.zip")) as zf:
            member = next(n for n in zf.namelist() if not n.startswith("__MACOSX") and n.endswith(".jsonl"))
            with zf.open(member) as fh:
                for i, line in enumerate(fh):
                    if i >= per_study:
                        break
                    if i not in held_out.get(study, ()):
                        ids.extend(tok(json.loads(line)["text"][:20000]).input_ids)
    return np.asarray(ids)


def _train(model, ids: np.ndarray, steps: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    window, batch = 256, 16
    for step in range(steps):
        starts = rng.integers(0, len(ids) - window - 1, batch)
        x = torch.as_tensor(np.stack([ids[s : s + window] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: training loss {loss.item():.3f}")


def build_models(data_root: str, tokenizer_dir: str, base_dir: str, post_dir: str, steps: int = 400) -> None:
    """Two 2-layer Qwen3-architecture models trained briefly (PyTorch, CPU) on Psych-201 text, converted.

    ``base_dir``: trained on the TOKENIZER_STUDIES mix. ``post_dir``: the base fine-tuned further on two
    studies only, a stand-in for post-training that shifts the distribution (for the tiny sweep). Training
    makes the demo's numbers meaningful (a few nats per response instead of a random model's ~20);
    torch is needed only here.
    """
    from transformers import AutoModelForCausalLM

    ids = training_tokens(data_root, tokenizer_dir)
    shifted = training_tokens(data_root, tokenizer_dir, studies=("alsobay2025publicGoodsGame", "thoma2025riskychoice"))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = tiny_models.make_tiny_hf_checkpoint(
            "qwen3",
            os.path.join(tmp, "hf"),
            tokenizer_dir,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            logit_scale=1.0,
        )
        model = AutoModelForCausalLM.from_pretrained(hf_dir)
        _train(model, ids, steps, seed=0)
        for out_dir, name in ((base_dir, "base"), (post_dir, "post")):
            if name == "post":
                _train(model, shifted, steps // 4, seed=1)
            model.save_pretrained(hf_dir)
            converted = os.path.join(tmp, f"converted-{name}")
            checkpoint.convert(hf_dir, converted, "float32")
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.copytree(converted, out_dir)
            _record_model_info(out_dir, BUNDLED_INFO[name])


# What the bundled models are, recorded in their provenance: a job without --config.model_info.* takes a
# converted checkpoint's identity from there.
BUNDLED_INFO = {
    "base": dict(hf_id="psych201_jax/tiny-qwen3", family="Qwen3", generation="tiny", size_b=0.0003, kind="base"),
    "post": dict(
        hf_id="psych201_jax/tiny-qwen3-post",
        family="Qwen3",
        generation="tiny",
        size_b=0.0003,
        kind="Instruction-tuned",
        base_hf_id="psych201_jax/tiny-qwen3",
    ),
}


def _record_model_info(out_dir: str, info: dict) -> None:
    path = os.path.join(out_dir, checkpoint.PROVENANCE)
    with open(path) as fh:
        provenance = json.load(fh)
    provenance["model_info"] = {"base_hf_id": "", **info}
    with open(path, "w") as fh:
        json.dump(provenance, fh, indent=2)


def main(argv):
    del argv
    build_sample(FLAGS.data, defaults.SAMPLE_DATA)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tokenizer")
        build_tokenizer(FLAGS.data, tok_dir)
        build_models(FLAGS.data, tok_dir, defaults.DEFAULT_MODEL, defaults.DEFAULT_POST_MODEL)
    print(f"wrote {defaults.SAMPLE_DATA}, {defaults.DEFAULT_MODEL} and {defaults.DEFAULT_POST_MODEL}")


if __name__ == "__main__":
    app.run(main)
