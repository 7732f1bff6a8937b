"""Bad input to a job gets a clear error and leaves earlier results intact."""

import errno
import json
import os
import shutil

import pytest

from psych201_jax import defaults
from psych201_jax.data import records
from psych201_jax.runs import job
from psych201_jax.runs import store as results
from psych201_jax.runs.config import ScoreJob


def _cfg(tmp_path, **over):
    base = dict(
        out=str(tmp_path / "out"),
        data=os.path.join(defaults.SAMPLE_DATA, "thoma2025riskychoice"),
        chunk_tokens=1000,
        log_every_s=1e9,
    )
    return ScoreJob().with_overrides({**base, **over})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("protocol", "fancy", "config.protocol='fancy' is not one of"),
        ("dtype", "float16", "config.dtype='float16'"),
        ("attention", "nope", "config.attention='nope'"),
        ("tokens_per_batch", 0, "config.tokens_per_batch must be a positive integer"),
    ],
)
def test_wrong_config_value_fails_before_writing_anything(tmp_path, field, value, message):
    with pytest.raises(job.ConfigError, match=message):
        job.run(_cfg(tmp_path, **{field: value}))
    assert not os.path.exists(tmp_path / "out")


def test_unreadable_data(tmp_path):
    with pytest.raises(records.DataError, match="no such file or directory"):
        job.run(_cfg(tmp_path, data=str(tmp_path / "missing")))
    bad = tmp_path / "badstudy"
    bad.mkdir()
    (bad / "prompts.jsonl.zip").write_bytes(b"this is not a zip file")
    with pytest.raises(records.DataError, match="prompts.jsonl.zip: unreadable"):
        job.run(_cfg(tmp_path, data=str(bad)))
    assert not os.path.exists(tmp_path / "out")


def test_missing_and_corrupt_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
        job.run(_cfg(tmp_path, model=str(tmp_path)))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(defaults.DEFAULT_MODEL, corrupt)
    for root, _, files in os.walk(corrupt / "params"):
        for name in files:
            if name not in ("_CHECKPOINT_METADATA",):
                with open(os.path.join(root, name), "wb") as fh:
                    fh.write(b"garbage")
    with pytest.raises(job.ModelError, match="could not load the converted checkpoint"):
        job.run(_cfg(tmp_path, model=str(corrupt)))
    assert not os.path.exists(tmp_path / "out")


def test_full_disk_keeps_earlier_chunks_and_resumes(tmp_path, monkeypatch):
    real = results._write_chunk
    calls = {"n": 0}

    def flaky(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            os.makedirs(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, rows)

    monkeypatch.setattr(results, "_write_chunk", flaky)
    cfg = _cfg(tmp_path)
    with pytest.raises(results.ResultsError, match="disk is full.*participants committed before are kept.*resume"):
        job.run(cfg)
    chunks = results.chunk_dirs(cfg.out)
    assert len(chunks) == 1 and not [n for n in os.listdir(os.path.join(cfg.out, "chunks")) if n.startswith(".tmp")]
    first = list(results.iter_rows(cfg.out))
    assert first and results.read_complete(cfg.out) is None

    monkeypatch.setattr(results, "_write_chunk", real)
    job.run(cfg)
    rows = list(results.iter_rows(cfg.out))
    assert len(rows) == 3 and rows[: len(first)] == first


def test_results_dir_of_another_config_is_refused_and_kept(tmp_path):
    cfg = _cfg(tmp_path)
    job.run(cfg)
    before = list(results.iter_rows(cfg.out))
    with pytest.raises(results.ResultsError, match="different configuration.*persona"):
        job.run(_cfg(tmp_path, persona="matched"))
    assert list(results.iter_rows(cfg.out)) == before
    not_results = tmp_path / "other"
    not_results.mkdir()
    (not_results / "notes.txt").write_text("mine")
    with pytest.raises(results.ResultsError, match="is not a results directory"):
        job.run(_cfg(tmp_path, out=str(not_results)))
    assert (not_results / "notes.txt").read_text() == "mine"


def test_resume_keeps_every_input_line_exactly_once(tmp_path, monkeypatch):
    """Malformed lines share the key (study, ?, ?) and a rejected id may repeat: resume goes by line."""
    import json

    study = tmp_path / "data" / "mixed"
    study.mkdir(parents=True)
    good = "You see A or B. You choose <<A>>. Again. You choose <<B>>."
    lines = [
        "{broken",
        "[1, 2]",
        json.dumps({"text": good, "experiment": "e", "participant": 1}),
        json.dumps({"text": "You choose:<<A>>.", "experiment": "e", "participant": 2}),
        json.dumps({"text": good, "experiment": "e", "participant": 2}),
        json.dumps({"text": good, "experiment": "e", "participant": 3}),
    ]
    (study / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, data=str(study), chunk_tokens=1, protocol="robust")  # robust: strict markup
    real = results._write_chunk
    calls = {"n": 0}

    def fail_second(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "simulated crash")
        return real(path, rows)

    monkeypatch.setattr(results, "_write_chunk", fail_second)
    with pytest.raises(results.ResultsError):
        job.run(cfg)
    assert len(list(results.iter_rows(cfg.out))) == 3  # two malformed lines and participant 1
    monkeypatch.setattr(results, "_write_chunk", real)
    job.run(cfg)
    rows = list(results.iter_rows(cfg.out))
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]
    by_line = {r["line"]: r for r in rows}
    assert [by_line[n]["status"] for n in range(1, 7)] == [
        "rejected",
        "rejected",
        "scored",
        "rejected",
        "rejected",
        "scored",
    ]
    assert "duplicate participant id" in by_line[5]["reason"]


def test_a_model_claiming_no_context_is_refused(tmp_path):
    """A model spec with max_position_embeddings 0 is an error, not 'no limit' (probe case C07)."""
    model = tmp_path / "ctx0"
    shutil.copytree(defaults.DEFAULT_MODEL, model)
    spec = json.loads((model / "model_spec.json").read_text())
    spec["max_position_embeddings"] = 0
    (model / "model_spec.json").write_text(json.dumps(spec))
    with pytest.raises(job.ModelError, match="context of 0 tokens"):
        job.run(_cfg(tmp_path, model=str(model)))
    assert not os.path.exists(tmp_path / "out")
