r"""Rebuilds the trimmed Psych-201 corpus the tests run on (tests/data/psych201) from the full one.

  python -m tools.build_test_corpus --src=$PSYCH201_DATA --out=tests/data/psych201

Maintainers run this once; the output is committed, so the tests need nothing beside a fresh clone
(set PSYCH201_DATA to run them on another corpus, e.g. the full one). For every study it keeps a few
dozen participants, chosen by fixed rules (no randomness), and copies their JSON lines byte for byte
in source order into ``<study>/prompts.jsonl.zip`` (one deflated member ``prompts.jsonl``, fixed
timestamp, so a rebuild gives identical files). Kept, per study, where the source has them:

- the first lines, in order: 40 of thoma2025riskychoice, 30 of the studies the tests' tokenizers are
  trained on (``tests/conftest.py``: first 30 of each, so they train on the same text as on the full
  corpus), 24 of the others; tests take the first records with ``itertools.islice``;
- then traps, in source order: transcripts over 32,768 characters (at least 3, 15 for the largest
  study, and the study's longest), responses the build rewrites (``<<-3>>``, ``<<skip>>``,
  ``<<think>>``, ``More Details >>``), missing metadata values (NaN ages), one participant of every
  experiment and of every value of a categorical field (condition, gender), and participant ids
  repeated across experiments (3 ids, in 3, 2 and 2 experiments).

Also writes ``README.md`` (the source's per-study table, recomputed on the kept lines) and copies
``LICENSE``, ``psych_experiment_categories.csv`` and each study's own ``README.md``.
"""

import collections
import io
import json
import math
import os
import shutil
import zipfile

from absl import app, flags

from psych201_jax.testing import tiny_tokenizer

FLAGS = flags.FLAGS

LONG_CHARS = 32768  # the reference scripts' character cut
TOKENIZER_STUDIES = tiny_tokenizer.TOKENIZER_STUDIES  # their first 30 transcripts train the test tokenizers
HEAD = {"thoma2025riskychoice": 40, **{s: 30 for s in TOKENIZER_STUDIES if s != "thoma2025riskychoice"}}
DEFAULT_HEAD = 24
MAX_PARTICIPANTS = 40
MIN_LONG = 3
# The largest study keeps more long transcripts (they deflate ~28x): its file stays far larger than one
# record, so tests/test_records.py::test_iter_records_streams can tell streaming from reading it whole.
MIN_LONG_BY_STUDY = {"alsobay2025publicGoodsGame": 15}
PER_MARKER = 2
MARKERS = ("<<-", "<<skip>>", "<<think>>", "More Details >>")
PER_REPEATED_ID = (3, 2, 2)  # experiments kept for the first repeated ids
MAX_EXPERIMENTS = 12  # cover every experiment (and categorical value) only when there are few
CORE_FIELDS = ("text", "experiment", "participant")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

README_HEAD = """\
# Psych-201 test corpus ({n} studies, trimmed)

A trimmed copy of the per-study transcript files of the public Psych-201 repository
(github.com/marcelbinz/Psych-201, Apache-2.0, see LICENSE): `<study>/prompts.jsonl.zip` holds a few
dozen participants of the study, their JSON lines copied unmodified and in source order, one line per
participant with fields `text` (the whole session, human responses marked `<<…>>`), `experiment`,
`participant`, and optional metadata. `tools/build_test_corpus.py` selects the lines (the first ones of
each study, then long transcripts, rewritten responses, missing metadata, every experiment and ids
repeated across experiments) and wrote this file; the table below counts the kept lines.
`<study>/README.md` is the study's own description where the repository has one.
`psych_experiment_categories.csv` maps studies to domains (from the same repository's analysis folder).
"""


def read_lines(path: str) -> list[bytes]:
    """The raw JSON lines (without newline) of a study's ``prompts.jsonl.zip``."""
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if not n.startswith("__MACOSX") and n.endswith(".jsonl"))
        data = zf.read(member)
    return [line for line in data.split(b"\n") if line.strip()]


def _missing(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def select(study: str, objs: list[dict]) -> list[int]:
    """0-based source line numbers to keep, in source order."""
    head = min(HEAD.get(study, DEFAULT_HEAD), len(objs))
    keep = set(range(head))

    def add(indices, n=None):
        new = [i for i in indices if i not in keep]
        keep.update(new[:n] if n is not None else new)

    lengths = [len(o["text"]) for o in objs]
    long = [i for i, n in enumerate(lengths) if n > LONG_CHARS]
    if long:
        add(long, max(0, MIN_LONG_BY_STUDY.get(study, MIN_LONG) - sum(i in keep for i in long)))
        add([max(range(len(objs)), key=lambda i: (lengths[i], -i))])
    for marker in MARKERS:
        hits = [i for i, o in enumerate(objs) if marker in o["text"]]
        add(hits, max(0, PER_MARKER - sum(i in keep for i in hits)))
    fields = sorted({k for o in objs for k in o} - set(CORE_FIELDS))
    for field in fields:
        hits = [i for i, o in enumerate(objs) if _missing(o.get(field))]
        add(hits, max(0, PER_MARKER - sum(i in keep for i in hits)))
        values = {o[field] for o in objs if isinstance(o.get(field), str)}
        if 1 < len(values) <= MAX_EXPERIMENTS:
            first = {}
            for i, o in enumerate(objs):
                first.setdefault(o.get(field), i)
            for value in sorted(values):
                if not any(objs[i].get(field) == value for i in keep):
                    add([first[value]])
    experiments = collections.defaultdict(list)
    by_id = collections.defaultdict(list)
    for i, o in enumerate(objs):
        experiments[o["experiment"]].append(i)
        by_id[str(o["participant"])].append(i)
    if len(experiments) <= MAX_EXPERIMENTS:
        for lines in experiments.values():
            if not keep.intersection(lines):
                add(lines[:1])
    repeated = [lines for lines in by_id.values() if len({objs[i]["experiment"] for i in lines}) > 1]
    for lines, n in zip(repeated, PER_REPEATED_ID):
        seen, picked = set(), []
        for i in lines:
            if objs[i]["experiment"] not in seen:
                seen.add(objs[i]["experiment"])
                picked.append(i)
        add(picked[:n])
    if len(keep) > MAX_PARTICIPANTS:
        raise ValueError(f"{study}: {len(keep)} lines selected, more than {MAX_PARTICIPANTS}")
    return sorted(keep)


def write_zip(path: str, lines: list[bytes]) -> None:
    info = zipfile.ZipInfo("prompts.jsonl", date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, b"\n".join(lines) + b"\n", compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())


def stats(objs: list[dict]) -> dict:
    ids = collections.defaultdict(set)
    for o in objs:
        ids[str(o["participant"])].add(o["experiment"])
    return {
        "participants": len(objs),
        "responses": sum(o["text"].count("<<") for o in objs),
        "characters": sum(len(o["text"]) for o in objs),
        "extra": sorted({k for o in objs for k in o} - set(CORE_FIELDS)),
        "long": sum(len(o["text"]) > LONG_CHARS for o in objs),
        "negative": sum("<<-" in o["text"] for o in objs),
        "repeated_ids": sum(len(e) > 1 for e in ids.values()),
        "experiments": len({o["experiment"] for o in objs}),
    }


def readme(rows: dict[str, dict]) -> str:
    out = [
        README_HEAD.format(n=len(rows)),
        "| study | participants | responses (`<<`) | characters | extra fields |",
        "|---|---|---|---|---|",
    ]
    for study, s in rows.items():
        out.append(
            f"| {study} | {s['participants']} | {s['responses']} | {s['characters']} | {', '.join(s['extra'])} |"
        )
    total = {k: sum(s[k] for s in rows.values()) for k in ("participants", "responses", "characters")}
    out.append(f"| **total** | {total['participants']} | {total['responses']} | {total['characters']} | |")
    return "\n".join(out) + "\n"


def build(src: str, out: str) -> dict[str, dict]:
    studies = sorted(d for d in os.listdir(src) if os.path.isfile(os.path.join(src, d, "prompts.jsonl.zip")))
    os.makedirs(out, exist_ok=True)
    rows = {}
    for study in studies:
        lines = read_lines(os.path.join(src, study, "prompts.jsonl.zip"))
        objs = [json.loads(line) for line in lines]
        kept = select(study, objs)
        os.makedirs(os.path.join(out, study), exist_ok=True)
        path = os.path.join(out, study, "prompts.jsonl.zip")
        write_zip(path, [lines[i] for i in kept])
        assert read_lines(path) == [lines[i] for i in kept]
        readme_src = os.path.join(src, study, "README.md")
        if os.path.isfile(readme_src):
            shutil.copyfile(readme_src, os.path.join(out, study, "README.md"))
        rows[study] = {**stats([objs[i] for i in kept]), "zip_bytes": os.path.getsize(path), "source": len(objs)}
    for name in ("LICENSE", "psych_experiment_categories.csv"):
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write(readme(rows))
    return rows


def main(argv):
    del argv
    rows = build(FLAGS.src, FLAGS.out)
    print(
        f"{'study':42s} {'kept':>9s} {'responses':>9s} {'chars':>9s} {'>32768':>6s} {'<<-':>4s} "
        f"{'rep.ids':>7s} {'exps':>4s} {'zip KB':>7s}"
    )
    for study, s in rows.items():
        print(
            f"{study:42s} {s['participants']:>4d}/{s['source']:<4d} {s['responses']:>9d} "
            f"{s['characters']:>9d} {s['long']:>6d} {s['negative']:>4d} {s['repeated_ids']:>7d} "
            f"{s['experiments']:>4d} {s['zip_bytes'] / 1024:>7.1f}"
        )
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FLAGS.out) for f in fs)
    print(
        f"{len(rows)} studies, {sum(s['participants'] for s in rows.values())} participants, "
        f"{sum(s['zip_bytes'] for s in rows.values()) / 2**20:.2f} MiB zipped, "
        f"{size / 2**20:.2f} MiB in {FLAGS.out}"
    )


if __name__ == "__main__":  # flags only for the script: importing read_lines (the benchmark) defines none
    flags.DEFINE_string("src", os.path.join("..", "shared", "data", "psych201"), "The full Psych-201 corpus.")
    flags.DEFINE_string("out", os.path.join("tests", "data", "psych201"), "Where to write the trimmed corpus.")
    app.run(main)
