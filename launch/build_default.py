r"""Rebuilds the embedded default (bundled sample + tokenizer + tiny model) from the shared data.

  python -m launch.build_default --data=../shared/data/psych201

Maintainers run this once; the outputs are committed under psych201_jax/data/ so README command 1
works on a fresh machine with neither the shared data nor torch.
"""

import json
import os
import shutil
import zipfile

from absl import app, flags

from psych201_jax import defaults, tiny_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("data", os.path.join("..", "shared", "data", "psych201"), "Psych-201 studies.")

# (study, 0-based lines): persona metadata (thoma, busch), '<<-' and '<<skip>>' responses (guenther),
# transcripts over 32,768 characters (xu2023), long multi-round games (alsobay), short ones (franke).
SAMPLE = (("thoma2025riskychoice", (0, 1, 2)), ("franke2024bayesian", (0, 1, 2)),
          ("busch2024_stroop", (0, 1)), ("guenther2024substitutions", (0, 379, 517)),
          ("xu2023augmenting", (0, 1)), ("alsobay2025publicGoodsGame", (0, 1)))
TOKENIZER_STUDIES = tuple(s for s, _ in SAMPLE) + ("guenther2023ViSpa", "shahar2019twosteptask",
                                                   "spektor2024lossaversion", "sandbrink2024metacontrol")


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


def main(argv):
    del argv
    build_sample(FLAGS.data, defaults.SAMPLE_DATA)
    build_tokenizer(FLAGS.data, defaults.DEFAULT_TOKENIZER)
    print(f"wrote {defaults.SAMPLE_DATA} and {defaults.DEFAULT_TOKENIZER}")


if __name__ == "__main__":
    app.run(main)
