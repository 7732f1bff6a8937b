"""Fault injection on the results store, sweeps, locks and paths (issue 28, probe of 2026-12-06).

One test (or two) per class: 1. an interrupted first write is a fresh start, a full disk under the sweep
status fails a job and not the worker; 2. one path normalisation (``..``), sweep names never leave
out_root; 3. validated readers and one-line errors (corrupt sweep_status.json, J10, J11); 4. lock files
never follow links; 5. sweep status per condition, "skipped (in use)" instead of "failed".
"""

import json
import os
import zipfile

import pytest
from test_faults import _cli, _one_line_error  # one copy of the command-line helpers (tests/ is on sys.path)

from configs.sweeps import tiny
from psych201_jax import errors, locks, paths
from psych201_jax.runs import job, store, sweep, sweep_worker
from psych201_jax.runs.config import ScoreJob

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THOMA = os.path.join(REPO, "tests", "data", "psych201", "thoma2025riskychoice", "prompts.jsonl.zip")


def _study(folder, n=2):
    """A study of the first ``n`` participants of a real one (the vendored corpus)."""
    with zipfile.ZipFile(THOMA) as zf:
        lines = zf.read("prompts.jsonl").splitlines()[:n]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def _cfg(tmp_path, out, **over):
    base = dict(out=str(out), data=str(_study(tmp_path / "study")), cache_dir=str(tmp_path / "cache"), log_every_s=1e9)
    return ScoreJob().with_overrides({**base, **over})


TINY = dict(tiny.get_config().models[0])  # the bundled base model
PLAIN = dict(name="plain", protocol="reference", template="none", persona="none")
ROBUST = dict(name="robust", protocol="robust", template="none", persona="none")


def _sweep(tmp_path, root, conditions=(PLAIN, ROBUST), models=(TINY,)):
    m = dict(
        name="faults",
        data=str(_study(tmp_path / "study")),
        out_root=str(root),
        models=list(models),
        conditions=list(conditions),
        score=dict(cache_dir=str(tmp_path / "cache"), log_every_s=1e9),
    )
    cfg = sweep.Sweep.from_mapping(m)
    return cfg, sweep.expand(cfg)


def _run_shard(cfg, jobs):
    return sweep_worker.run_shard(jobs, cfg.overrides(), out_root=cfg.out_root, name=cfg.name)


# ------------------------------------------------------------------------------- 1. recoverable first write


def test_interrupted_first_write_is_a_fresh_start(tmp_path, caplog):
    """N13 / N84: .lock, an empty chunks/ and manifest.json.tmp-<pid> (full disk, SIGTERM or kill -9 in the
    first write) are cleaned and reused with a log line; anything else there is still refused."""
    out = tmp_path / "out"
    (out / store.CHUNKS).mkdir(parents=True)
    (out / store.LOCK).write_text("pid 1 on elsewhere since then\n")
    (out / f"{store.MANIFEST}.tmp-4242").write_text('{"half a man')
    caplog.set_level("WARNING")
    progress = job.run(_cfg(tmp_path, out))
    assert progress.participants == 2 and store.read_complete(str(out)) is not None
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert "interrupted first write" in caplog.text

    foreign = tmp_path / "foreign"
    (foreign / store.CHUNKS).mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(store.ResultsError, match="is not a results directory"):
        job.run(_cfg(tmp_path, foreign))


def test_sweep_status_on_a_full_disk_fails_the_job_not_the_worker(tmp_path, monkeypatch):
    """N12: every write of sweep_status.json hits ENOSPC (its temporary file is /dev/full): the status
    write is a one-line UserError; the sweep's conditions fail with it and the worker returns."""
    root = tmp_path / "root"
    root.mkdir()
    full = root / f"{sweep.STATUS}.tmp-{os.getpid()}"
    full.symlink_to("/dev/full")
    status = sweep.SweepStatus(str(root), "faults")
    with pytest.raises(errors.UserError, match=r"sweep_status\.json: the disk is full; free space"):
        status.update("m", state="running")
    assert not os.path.lexists(full)  # the failed write removed its temporary file
    write = getattr(sweep.SweepStatus, "_write", None)

    def always_full(self, status):  # the disk stays full: every write hits ENOSPC
        if not os.path.lexists(full):
            full.symlink_to("/dev/full")
        return write(self, status)

    full.symlink_to("/dev/full")
    monkeypatch.setattr(sweep.SweepStatus, "_write", always_full, raising=False)
    cfg, jobs = _sweep(tmp_path, root, conditions=(PLAIN,))
    outcomes = _run_shard(cfg, jobs)  # returns: the worker did not die
    assert [o["status"] for o in outcomes] == ["failed"]
    assert "the disk is full" in outcomes[0]["detail"] and "\n" not in outcomes[0]["detail"]


# ------------------------------------------------------------------------------------------------- 2. paths


def test_paths_with_dotdot_reach_no_store(tmp_path, monkeypatch):
    """N14 / N14d: a results path holding '..' scores, resumes and reads like any other path."""
    out = tmp_path / "x" / ".." / "out"
    progress = job.run(_cfg(tmp_path, out))
    assert progress.participants == 2
    monkeypatch.chdir(tmp_path / "study")
    rel = os.path.join("..", "x", "..", "out")
    assert store.read_status(rel).complete and len(list(store.iter_rows(rel))) == 2
    assert job.run(_cfg(tmp_path, rel)).participants == 2  # resume through the relative '..' path
    assert paths.normalize(rel) == str(tmp_path / "out")
    assert paths.normalize("~/r") == os.path.join(os.path.expanduser("~"), "r") and paths.normalize("") == ""


def test_sweep_names_that_leave_out_root_are_refused(tmp_path):
    """N15: a model id '..' and a condition '../../x' are refused by parsing, by --dry_run and by a run."""
    bad_model = dict(TINY, hf_id="..")
    bad_condition = dict(PLAIN, name="../../escaped")
    with pytest.raises(sweep.SweepError, match=r"'\.\.'.*not a plain folder name"):
        _sweep(tmp_path, tmp_path / "root", conditions=(PLAIN, bad_condition), models=(TINY, bad_model))
    config = tmp_path / "trav.py"
    config.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        f"    return ml_collections.ConfigDict(dict(name='trav', data={str(_study(tmp_path / 'study'))!r},\n"
        f"        out_root={str(tmp_path / 'root')!r}, models=[{TINY!r}, {bad_model!r}],\n"
        f"        conditions=[{PLAIN!r}, {bad_condition!r}]))\n"
    )
    for extra in (["--dry_run"], []):
        proc = _cli("sweep", f"--config={config}", *extra)
        assert "escaped" in _one_line_error(proc) or "problem" in proc.stdout
    assert not os.path.exists(tmp_path / "escaped") and not os.path.exists(tmp_path.parent / "escaped")


# --------------------------------------------------------------------------- 3. validated readers, one line


@pytest.fixture(scope="module")
def held_sweep(tmp_path_factory):
    """A sweep of plain + robust on the tiny model while the test holds robust's results lock (another
    worker): the status updates the worker made, its outcomes, and the sweep's root."""
    tmp = tmp_path_factory.mktemp("held")
    cfg, jobs = _sweep(tmp, tmp / "root")
    robust = next(j for j in jobs if j.condition_name == "robust")
    updates = []
    update = sweep.SweepStatus.update

    def spy(self, model, add=None, **fields):
        updates.append((fields.get("state"), dict(fields.get("conditions") or {})))
        return update(self, model, add, **fields)

    with pytest.MonkeyPatch.context() as mp, locks.FileLock(os.path.join(robust.out, store.LOCK)):
        mp.setattr(sweep.SweepStatus, "update", spy)
        outcomes = _run_shard(cfg, jobs)
    status = json.load(open(os.path.join(cfg.out_root, sweep.STATUS)))
    return cfg, jobs, updates, {o["job"].split("/")[1]: o for o in outcomes}, status


def test_corrupt_or_empty_sweep_status_is_set_aside_and_rebuilt(held_sweep, caplog):
    """N08 / N09: named in a warning, set aside as .corrupt-<time>, rebuilt from the results directories."""
    cfg, jobs, _, _, _ = held_sweep
    path = os.path.join(cfg.out_root, sweep.STATUS)
    for text in ('{\n  "models": {\n    "psych201_jax--tiny-qwen3": {"sta', ""):
        with open(path, "w") as fh:
            fh.write(text)
        caplog.clear()
        status = sweep.SweepStatus(cfg.out_root, cfg.name, jobs).read()
        assert path in caplog.text and "set aside" in caplog.text
        entry = status["models"]["psych201_jax--tiny-qwen3"]
        assert entry["conditions"] == {"done": 1, "failed": 0, "total": 2} and entry["state"] == "remaining"
        assert json.load(open(path))["models"] == status["models"]
    assert len([n for n in os.listdir(cfg.out_root) if n.startswith(f"{sweep.STATUS}.corrupt-")]) >= 1


def test_unusable_output_paths_are_one_error_line(tmp_path):
    """J10: --config.out is a file; J11 (read-only folder): a lock that cannot be created is a UserError."""
    afile = tmp_path / "outfile.txt"
    afile.write_text("keep me")
    proc = _cli("score", f"--config.data={_study(tmp_path / 'study')}", f"--config.out={afile}")
    assert str(afile) in _one_line_error(proc) and afile.read_text() == "keep me"
    with pytest.raises(errors.UserError, match="cannot create the lock file"):
        with store.ResultsLock("/proc/psych201-no-such-dir/out"):  # not creatable, even by root
            pass


# ------------------------------------------------------------------------------------------------- 4. locks


def test_lock_files_are_never_followed_and_new_folders_are_private(tmp_path):
    """N92: a lock path that is a symlink is refused and its target untouched; a folder that the lock
    creates is 0700, an existing folder keeps its mode."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious line\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / store.LOCK).symlink_to(victim)
    with pytest.raises(errors.UserError, match="symbolic link"):
        job.run(_cfg(tmp_path, out))
    assert victim.read_text() == "precious line\n"
    (out / store.LOCK).unlink()
    (out / store.LOCK).mkdir()
    with pytest.raises(errors.UserError, match="not a lock file"):
        with locks.FileLock(str(out / store.LOCK)):
            pass
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with locks.FileLock(str(shared / "new" / "x.lock")):
        pass
    assert os.stat(shared / "new").st_mode & 0o777 == 0o700 and os.stat(shared).st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------------------------- 5. reporting


def test_status_counts_each_condition_and_a_held_one_is_skipped_in_use(held_sweep):
    """N01b: the conditions count moves after each condition, not when the model ends. N03: a condition
    whose results another worker holds is 'skipped (in use)', not failed, and the model is not failed."""
    _, _, updates, outcomes, status = held_sweep
    assert outcomes["plain"]["status"] == "done"
    assert outcomes["robust"]["status"] == "skipped" and outcomes["robust"]["in_use"]
    assert "in use by another job" in outcomes["robust"]["detail"]
    before_end = [c for state, c in updates[:-1] if state == "running"]
    assert any(c.get("done") == 1 for c in before_end), updates  # counted while the model still ran
    state, conditions = updates[-1]
    assert state == "running" and conditions == {"done": 1, "failed": 0, "total": 2, "in_use": 1}
    assert status["models"]["psych201_jax--tiny-qwen3"]["state"] == "running"  # the other worker's to end
