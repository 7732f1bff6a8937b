"""Fault injection: bad input, concurrent use and faults never kill a job silently or pass as finished.

Each test names the class of the hardening issue it covers: stale/partial results, per-participant status,
bad lines, files, concurrency, untrusted checkpoints, disk faults, one-line user errors and sweeps.
"""

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

from psych201_jax import defaults, errors, locks
from psych201_jax.data import records
from psych201_jax.model import checkpoint, hf_weights
from psych201_jax.runs import job, model_cache, store
from psych201_jax.runs.config import ScoreJob
from psych201_jax.types import Record, Rejected

THOMA = os.path.join(os.path.dirname(__file__), "data", "psych201", "thoma2025riskychoice", "prompts.jsonl.zip")


def _lines(n=3):
    """The first ``n`` raw lines of a real study (the vendored corpus)."""
    with zipfile.ZipFile(THOMA) as zf:
        return zf.read("prompts.jsonl").splitlines()[:n]


def _study(tmp_path, lines, name="study", filename="prompts.jsonl"):
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_bytes(b"\n".join(lines) + b"\n")
    return folder


def _cfg(tmp_path, data, **over):
    base = dict(out=str(tmp_path / "out"), data=str(data), cache_dir=str(tmp_path / "cache"), log_every_s=1e9)
    return ScoreJob().with_overrides({**base, **over})


def _cli(name, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", f"psych201_jax.cli.{name}", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ 1. stale / partial


def test_changed_input_content_at_the_same_path_is_refused_by_name(tmp_path):
    data = _study(tmp_path, _lines(2))
    job.run(_cfg(tmp_path, data))
    lines = _lines(3)
    (data / "prompts.jsonl").write_bytes(b"\n".join(lines) + b"\n")  # same path, new content
    with pytest.raises(store.ResultsError, match=r"changed.*data_sources.*prompts\.jsonl"):
        job.run(_cfg(tmp_path, data))
    progress = job.run(_cfg(tmp_path, data, fresh=True))
    assert progress.participants == 3


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A finished run with its completion record removed and one chunk dropped: what kill -9 leaves."""
    tmp = tmp_path_factory.mktemp("killed")
    data = _study(tmp, _lines(6))
    cfg = _cfg(tmp, data, chunk_tokens=1)  # one participant per chunk
    job.run(cfg)
    complete = tmp / "out" / store.COMPLETE
    os.remove(complete)
    chunks = store.chunk_dirs(cfg.out)
    for chunk in chunks[3:]:
        shutil.rmtree(chunk)
    return cfg.out


def test_status_of_a_killed_run_counts_what_is_missing(killed_run):
    status = store.read_status(killed_run)
    assert (status.complete, status.n_done, status.n_input) == (False, 3, 6)


def test_export_refuses_a_killed_run_unless_allowed(killed_run, tmp_path):
    line = _one_line_error(_cli("export", f"--results={killed_run}", f"--out={tmp_path / 'x.jsonl'}"))
    assert "incomplete" in line and "3 of 6" in line and not (tmp_path / "x.jsonl").exists()
    proc = _cli("export", f"--results={killed_run}", f"--out={tmp_path / 'x.jsonl'}", "--allow_incomplete")
    assert proc.returncode == 0 and "incomplete" in proc.stdout + proc.stderr
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 3


def test_analyze_refuses_a_killed_run_unless_allowed_and_then_marks_it(killed_run, tmp_path):
    line = _one_line_error(_cli("analyze", f"--results={killed_run}", f"--out={tmp_path / 'r'}", "--bootstrap=50"))
    assert "incomplete" in line and "3 of 6" in line
    proc = _cli("analyze", f"--results={killed_run}", f"--out={tmp_path / 'r'}", "--bootstrap=50", "--allow_incomplete")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "incomplete" in proc.stderr
    report = (tmp_path / "r" / "report.md").read_text()
    assert "incomplete" in report and "3 of 6" in report
    with open(tmp_path / "r" / "model_scores.csv") as fh:
        header, row = fh.read().splitlines()[:2]
    columns = dict(zip(header.split(","), row.split(",")))
    assert (columns["complete"], columns["n_done"], columns["n_input"]) == ("False", "3", "6")


def test_a_complete_run_wins_over_an_incomplete_one_in_any_order():
    from psych201_jax.analysis import runs as analysis_runs

    def run(path, complete):
        from psych201_jax.analysis import metrics

        manifest = {"config": {"model_info": {"hf_id": "M", "kind": "base"}}}
        run_ = metrics.run_from_rows(manifest, [], path)
        return dataclasses.replace(run_, complete=complete, n_done=1 if complete else 0, n_input=1)

    for order in ((run("half", False), run("full", True)), (run("full", True), run("half", False))):
        kept, notes = analysis_runs.dedupe(order)
        assert [r.path for r in kept] == ["full"] and "half" in notes[0]


# ------------------------------------------------------------------------------- 2. every row says what happened


def test_a_participant_whose_responses_are_all_cut_gets_its_own_status(tmp_path):
    obj = json.loads(_lines(1)[0])
    text = obj["text"]
    first = text.index("<<")
    obj["text"] = text[:first] + "x" * 40000 + text[first:]  # every response beyond the 32,768-character cut
    data = _study(tmp_path, [json.dumps(obj).encode(), _lines(2)[1]])
    cfg = _cfg(tmp_path, data)
    job.run(cfg)
    from psych201_jax.cli import export

    rows = list(export.export_rows(cfg.out))
    assert [r["status"] for r in rows] == ["unscored", "scored"]
    assert rows[0]["nll"] == [] and rows[0]["lost_truncation"] == rows[0]["n_markers"] > 0
    assert "32,768-character cut" in rows[0]["reason"]


def test_an_empty_study_file_is_reported(tmp_path):
    empty = _study(tmp_path, [], name="empty")
    (empty / "prompts.jsonl").write_bytes(b"")
    full = _study(tmp_path, _lines(1), name="full")
    items = list(records.iter_records([str(empty), str(full)]))
    assert isinstance(items[0], Rejected) and "no records" in items[0].reason and items[0].study == "empty"
    assert records.count_participants([str(empty), str(full)]) == 2


# --------------------------------------------------------------------------------------- 3. one bad line


@pytest.mark.parametrize(
    "bad,reason",
    [
        (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b'{"text": "a <<b>>", "experiment": "e", "participant": ' + b"7" * 5000 + b"}", "malformed"),
    ],
)
def test_a_pathological_line_is_one_rejection(tmp_path, bad, reason):
    data = _study(tmp_path, [_lines(1)[0], bad, _lines(2)[1]])
    items = list(records.iter_records(str(data)))
    assert [type(i).__name__ for i in items] == ["Record", "Rejected", "Record"]
    assert reason in items[1].reason and items[1].line == 2


def test_two_question_mark_ids_are_a_duplicate_and_the_job_finishes(tmp_path):
    obj = json.loads(_lines(1)[0])
    obj["participant"] = "?"
    line = json.dumps(obj).encode()
    data = _study(tmp_path, [line, line])
    items = list(records.iter_records(str(data)))
    assert isinstance(items[0], Record) and isinstance(items[1], Rejected) and "duplicate" in items[1].reason
    job.run(_cfg(tmp_path, data))
    assert store.read_status(str(tmp_path / "out")).complete


def test_a_utf16_file_is_decoded_not_split(tmp_path):
    text = b"\n".join(_lines(3)).decode() + "\n"
    folder = tmp_path / "u16"
    folder.mkdir()
    (folder / "prompts.jsonl").write_bytes(text.encode("utf-16"))
    items = list(records.iter_records(str(folder)))
    assert len(items) == 3 and all(isinstance(i, Record) for i in items)
    assert records.count_participants(str(folder)) == 3


def test_a_huge_line_is_rejected_under_the_line_limit(tmp_path):
    obj = json.loads(_lines(1)[0])
    obj["text"] = obj["text"] + " filler" * 200_000
    data = _study(tmp_path, [json.dumps(obj).encode(), _lines(2)[1]])
    items = list(records.iter_records(str(data), max_line_bytes=1 << 20))
    assert isinstance(items[0], Rejected) and "line limit" in items[0].reason and isinstance(items[1], Record)
    assert all(isinstance(i, Record) for i in records.iter_records(str(data)))  # no limit: kept


# ------------------------------------------------------------------------------------------------ 4. files


def test_a_damaged_deflate_stream_names_the_file(tmp_path):
    folder = tmp_path / "zipped"
    folder.mkdir()
    path = folder / "prompts.jsonl.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("prompts.jsonl", b"\n".join(_lines(3) * 20))
    raw = bytearray(path.read_bytes())
    for i in range(200, 400):
        raw[i] ^= 0x5A  # inside the compressed stream, past the local header
    path.write_bytes(bytes(raw))
    with pytest.raises(records.DataError, match=r"prompts\.jsonl\.zip"):
        list(records.iter_records(str(folder)))


def test_both_plain_and_zipped_study_files_are_an_error_naming_both(tmp_path):
    folder = _study(tmp_path, _lines(2))
    with zipfile.ZipFile(folder / "prompts.jsonl.zip", "w") as zf:
        zf.writestr("prompts.jsonl", b"\n".join(_lines(2)))
    with pytest.raises(records.DataError, match=r"prompts\.jsonl and .*prompts\.jsonl\.zip"):
        records.resolve_sources(str(folder))


def test_a_truncated_config_json_names_the_file(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen3", "hidden_si')
    with pytest.raises(errors.UserError, match=r"config\.json"):
        checkpoint.convert(str(hf), str(tmp_path / "out"), "float32")


# ------------------------------------------------------------------------------------------- 5. concurrency


def test_a_second_writer_is_refused_up_front(tmp_path):
    data = _study(tmp_path, _lines(2))
    cfg = _cfg(tmp_path, data)
    with store.ResultsLock(cfg.out):
        with pytest.raises(store.ResultsError, match="in use by another job"):
            job.run(cfg)
    job.run(cfg)  # released: the job runs
    assert store.read_status(cfg.out).complete


def test_a_stale_lock_file_of_a_dead_job_does_not_block(tmp_path):
    data = _study(tmp_path, _lines(1))
    cfg = _cfg(tmp_path, data)
    os.makedirs(cfg.out)
    with open(os.path.join(cfg.out, store.LOCK), "w") as fh:
        fh.write("pid 999999999\n")  # left by a crashed job: the OS lock died with it
    job.run(cfg)
    assert store.read_status(cfg.out).complete


def test_a_filesystem_without_file_locks_is_one_user_error(tmp_path, monkeypatch):
    data = _study(tmp_path, _lines(1))
    cfg = _cfg(tmp_path, data)

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.raises(errors.UserError, match="does not support file locks .No locks available"):
        job.run(cfg)


def test_convert_into_a_locked_or_leftover_folder(tmp_path, tiny_hf_dir):
    out = tmp_path / "conv"
    holder = subprocess.Popen(  # another process converting into the same folder holds its lock
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid other'); f.flush(); print('locked', flush=True); time.sleep(60)",
            f"{out}.lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(checkpoint.ConvertError, match="another conversion"):
            checkpoint.convert(tiny_hf_dir, str(out), "float32")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    (out / "params").mkdir(parents=True)  # what a convert killed by an older version left
    with pytest.raises(checkpoint.ConvertError, match="incomplete conversion"):
        checkpoint.convert(tiny_hf_dir, str(out), "float32")
    shutil.rmtree(out)
    checkpoint.convert(tiny_hf_dir, str(out), "float32")
    checkpoint.load_model(str(out), dtype="float32")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_two_jobs_converting_one_hf_dir_share_one_conversion(tmp_path, tiny_hf_dir, monkeypatch):
    calls = []
    real = checkpoint.convert

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "convert", counting)
    out = [None, None]

    def resolve(i):
        out[i] = model_cache.resolve_model(tiny_hf_dir, str(tmp_path / "cache"), "float32")

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] and len(calls) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        [os.path.basename(out[0]), os.path.basename(out[0]) + ".lock"]
    )


def test_a_failed_cache_conversion_leaves_no_temporary_copy(tmp_path, tiny_hf_dir, monkeypatch):
    def failing(hf_dir, out_dir, dtype, **kwargs):
        os.makedirs(os.path.join(out_dir, "params"))
        with open(os.path.join(out_dir, "params", "blob"), "wb") as fh:
            fh.write(b"0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "convert", failing)
    with pytest.raises(OSError):
        model_cache.resolve_model(tiny_hf_dir, str(tmp_path / "cache"), "float32")
    assert [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")] == []


# ------------------------------------------------------------------------------ 6. untrusted checkpoint files


def test_a_safetensors_header_claiming_2_62_bytes_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    with pytest.raises(hf_weights.WeightsError, match="header"):
        hf_weights.read_safetensors_header(str(path))


def test_an_index_pointing_outside_the_model_folder_is_refused(tmp_path, tiny_hf_dir):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    outside = tmp_path / "outside.safetensors"
    os.rename(hf / "model.safetensors", outside)
    names = list(hf_weights.read_safetensors_header(str(outside)))
    index = {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf_weights.WeightsError, match="outside"):
        hf_weights.open_weights(str(hf))


def test_a_legacy_torch_bin_converts_with_allow_pickle(tmp_path, tiny_hf_dir):
    import torch
    from safetensors.torch import load_file

    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    tensors = load_file(str(hf / "model.safetensors"))
    os.remove(hf / "model.safetensors")
    torch.save(tensors, hf / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(hf_weights.WeightsError, match="allow_pickle"):
        checkpoint.convert(str(hf), str(tmp_path / "a"), "float32")
    checkpoint.convert(str(hf), str(tmp_path / "b"), "float32", allow_pickle=True)
    reference = tmp_path / "ref"
    checkpoint.convert(tiny_hf_dir, str(reference), "float32")
    a, _ = checkpoint.load_model(str(tmp_path / "b"), dtype="float32")
    b, _ = checkpoint.load_model(str(reference), dtype="float32")
    from flax import nnx

    for x, y in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x[1][...]), np.asarray(y[1][...]))


# ---------------------------------------------------------------------------------------------- 7. faults


def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_chunk(tmp_path, monkeypatch):
    data = _study(tmp_path, _lines(3))
    cfg = _cfg(tmp_path, data, chunk_tokens=1)
    real = store._write_array

    def full_after_two_chunks(path, values, dtype):
        if "-c000002-" in path:  # the third chunk (one participant each) finds the disk full
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: [OS error 28: No space left on device]")
        return real(path, values, dtype)

    monkeypatch.setattr(store, "_write_array", full_after_two_chunks)
    with pytest.raises(store.ResultsError) as err:
        job.run(cfg)
    message = str(err.value)
    assert "disk is full" in message and "2 participants" in message and "rerun" in message
    assert "\n" not in message and len(message) < 400
    assert not [p for p in os.listdir(os.path.join(cfg.out, store.CHUNKS)) if p.startswith(".tmp")]
    monkeypatch.setattr(store, "_write_array", real)
    job.run(cfg)  # resumes
    assert store.read_status(cfg.out).n_done == 3


@pytest.mark.parametrize("damage", ["truncated_table", "missing_array"])
def test_a_corrupt_chunk_is_named_with_the_way_to_recover(tmp_path, damage):
    data = _study(tmp_path, _lines(2))
    cfg = _cfg(tmp_path, data)
    job.run(cfg)
    (chunk,) = store.chunk_dirs(cfg.out)
    if damage == "truncated_table":
        table = os.path.join(chunk, "participants.jsonl")
        with open(table, "rb") as fh:
            content = fh.read()
        with open(table, "wb") as fh:
            fh.write(content[: len(content) // 2])
    else:
        shutil.rmtree(os.path.join(chunk, "nll"))
    with pytest.raises(store.ResultsError, match=rf"{os.path.basename(chunk)}.*delete"):
        list(store.iter_rows(cfg.out))


# --------------------------------------------------------------------------------- 8. one-line user errors


@pytest.mark.parametrize(
    "name,args,needle",
    [
        ("score", ["--config.data=/nonexistent/psych201"], "no such file"),
        ("score", ["--config.protocl=robust"], "protocol"),
        ("score", ["--config.mesh.data=3"], "mesh"),
        ("export", ["--results=/nonexistent", "--out=/tmp/unused.jsonl"], "manifest"),
        ("analyze", ["--results=/nonexistent", "--out=/tmp/unused-report"], "no results directory"),
        ("convert", ["--hf=/nonexistent", "--out=/tmp/unused-conv"], "config.json"),
        ("audit", ["--config.data=/nonexistent/psych201", "--out=/tmp/unused-audit.csv"], "no such"),
        ("audit", ["--out=/nonexistent/dir/audit.csv"], "cannot write"),  # before the audit runs (U02)
        ("analyze", ["--results=/nonexistent", f"--out={__file__}"], "cannot create the report folder"),  # A08
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, name, args, needle):
    extra = [f"--config.out={tmp_path / 'o'}"] if name == "score" else []
    line = _one_line_error(_cli(name, *args, *extra))
    assert needle in line, line


def test_verbosity_shows_the_traceback():
    proc = _cli("export", "--results=/nonexistent", "--out=/tmp/unused.jsonl", "--verbosity=1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_persona_reserve_does_not_apply_to_the_reference_protocol(tmp_path):
    data = _study(tmp_path, _lines(1))
    job.run(_cfg(tmp_path, data, persona_reserve=1 << 20))  # > the 32,768-token context: robust only
    with pytest.raises(job.ConfigError, match="persona_reserve"):
        job.run(_cfg(tmp_path, data, persona_reserve=1 << 20, protocol="robust", out=str(tmp_path / "o2")))


# ---------------------------------------------------------------------------------------------- 9. sweeps


def _sweep_config(tmp_path, conditions, models):
    path = tmp_path / "sweep_cfg.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.name = 'faulty'\n"
        "    c.model_root = ''\n"
        f"    c.data = {str(_study(tmp_path, _lines(1)))!r}\n"
        f"    c.out_root = {str(tmp_path / 'sweep')!r}\n"
        f"    c.models = {models!r}\n"
        f"    c.conditions = {conditions!r}\n"
        "    c.score = dict(dtype='float32')\n"
        "    return c\n"
    )
    return path


def test_sweep_dry_run_lists_bad_conditions_and_missing_models_and_fails(tmp_path):
    models = [
        dict(hf_id="tiny", path=defaults.DEFAULT_MODEL, family="T", kind="base", arch="qwen3"),
        dict(hf_id="ghost", path=str(tmp_path / "nowhere"), family="T", kind="base", arch="qwen3"),
    ]
    conditions = [
        dict(name="plain", protocol="reference", template="none", persona="none", kinds="all"),
        dict(name="typo", protocol="robustt", template="none", persona="none", kinds="all"),
    ]
    proc = _cli("sweep", f"--config={_sweep_config(tmp_path, conditions, models)}", "--dry_run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "robustt" in out and "nowhere" in out


def test_sweep_exits_non_zero_when_a_job_failed(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    models = [dict(hf_id="broken", path=str(broken), family="T", kind="base", arch="qwen3")]
    conditions = [dict(name="plain", protocol="reference", template="none", persona="none", kinds="all")]
    proc = _cli("sweep", f"--config={_sweep_config(tmp_path, conditions, models)}")
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    from psych201_jax.testing import tiny_models

    out = tmp_path_factory.mktemp("hf")
    return tiny_models.make_tiny_hf_checkpoint("qwen3", str(out / "tiny"), defaults.DEFAULT_TOKENIZER, vocab_size=2048)


def test_locks_are_os_locks(tmp_path):
    """ResultsLock holds an OS lock (flock) while the job lives; another open file description cannot take it."""
    os.makedirs(tmp_path / "out")
    with store.ResultsLock(str(tmp_path / "out")):
        with open(tmp_path / "out" / store.LOCK) as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
