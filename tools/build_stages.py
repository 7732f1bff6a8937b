r"""Tiny stage-chain checkpoints for configs/sweeps/tiny_stages.py, built deterministically from the bundled models.

  python -m tools.build_stages [--out=DIR]

The bundled tiny base (psych201_jax/assets/tiny-qwen3) and its fine-tuned partner (tiny-qwen3-post) are the
ends of a stand-in chain; its intermediate "SFT" and "DPO" stages are the parameters a fraction of the way
from the base to the post model (``STAGES``), plus a small seeded perturbation so the stages are not on one
line. The results are converted checkpoints (orbax parameters, the base's spec and tokenizer, a provenance
with the stage's own parameter hash and model info), so nothing beside the two bundled models is committed.
``ensure`` builds them once into a cache folder keyed by the bundled models' hashes and this builder's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from psych201_jax import defaults

VERSION = 1
# stage name -> (fraction of the way from base to post, perturbation seed); the final stage is the post model.
STAGES = {"sft": (0.55, 1), "dpo": (0.8, 2)}
NOISE = 0.01  # perturbation scale, relative to each parameter's standard deviation
CHAIN = "tiny-qwen3 chain"
BASE_ID, POST_ID = "psych201_jax/tiny-qwen3", "psych201_jax/tiny-qwen3-post"


def stage_id(stage: str) -> str:
    return f"psych201_jax/tiny-qwen3-{stage}"


def default_root() -> str:
    return os.path.join(os.path.expanduser("~/.cache/psych201_jax"), "tiny-stages")


def _provenance(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "provenance.json")) as fh:
        return json.load(fh)


def key() -> str:
    """What the built stages depend on: the bundled models' source hashes and this builder's settings."""
    sources = [_provenance(d).get("sha256") for d in (defaults.DEFAULT_MODEL, defaults.DEFAULT_POST_MODEL)]
    text = json.dumps([VERSION, STAGES, NOISE, sources], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure(root: str | None = None) -> dict[str, str]:
    """stage -> checkpoint directory of every intermediate stage, built under ``root`` unless already there."""
    folder = os.path.join(root or default_root(), key())
    dirs = {stage: os.path.join(folder, stage) for stage in STAGES}
    if not os.path.isfile(os.path.join(folder, "done")):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(folder))
        try:
            build(tmp)
            with open(os.path.join(tmp, "done"), "w") as fh:
                fh.write("ok\n")
            try:
                os.rename(tmp, folder)
            except OSError:  # another process built it meanwhile (or a stale partial folder is there)
                if not os.path.isfile(os.path.join(folder, "done")):
                    shutil.rmtree(folder, ignore_errors=True)
                    os.rename(tmp, folder)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return dirs


def build(out_root: str) -> None:
    """Writes ``<out_root>/<stage>/`` for every stage of ``STAGES``."""
    import jax

    from psych201_jax.model import checkpoint

    def load(model_dir: str) -> dict:
        return checkpoint.ocp.load(os.path.abspath(os.path.join(model_dir, checkpoint.PARAMS)))

    base, post = load(defaults.DEFAULT_MODEL), load(defaults.DEFAULT_POST_MODEL)
    paths = jax.tree_util.tree_flatten_with_path(base)[0]
    post_leaves = jax.tree_util.tree_leaves(post)
    for stage, (alpha, seed) in STAGES.items():
        rng = np.random.default_rng(seed)
        items, digest = [], hashlib.sha256()
        for (path, b), p in zip(paths, post_leaves):
            b, p = np.asarray(b, np.float32), np.asarray(p, np.float32)
            value = b + alpha * (p - b) + NOISE * float(b.std()) * rng.standard_normal(b.shape).astype(np.float32)
            value = value.astype(np.float32)
            names = tuple(str(k.key) for k in path)
            digest.update("/".join(names).encode() + value.tobytes())
            items.append((names, value))
        out = os.path.join(out_root, stage)
        os.makedirs(out)
        checkpoint.save_params(os.path.join(out, checkpoint.PARAMS), items)
        shutil.copy(os.path.join(defaults.DEFAULT_MODEL, checkpoint.SPEC), out)
        shutil.copytree(os.path.join(defaults.DEFAULT_MODEL, checkpoint.TOKENIZER), os.path.join(out, "tokenizer"))
        provenance = _provenance(defaults.DEFAULT_MODEL)
        provenance.update(
            source=f"tools.build_stages v{VERSION}: {alpha} of the way from {BASE_ID} to {POST_ID}, seed {seed}",
            sha256={"params": digest.hexdigest()},
            model_info=dict(
                hf_id=stage_id(stage),
                family="Qwen3",
                generation="tiny",
                size_b=0.0003,
                kind="Instruction-tuned",
                base_hf_id=BASE_ID,
                stage=stage,
                chain=CHAIN,
            ),
        )
        with open(os.path.join(out, checkpoint.PROVENANCE), "w") as fh:
            json.dump(provenance, fh, indent=2)


def main(argv):
    del argv
    from absl import flags

    root = flags.FLAGS.out or None
    for stage, path in ensure(root).items():
        print(f"{stage}: {path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", "", "Cache root (default ~/.cache/psych201_jax/tiny-stages).")
    app.run(main)
