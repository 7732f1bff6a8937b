"""Sweeps: the paper's model set, emitted SLURM / TPU scripts, and the tiny sweep end to end: one restore
per model, shared forward passes equal to each job alone, kill -9 and rerun, concurrent shards."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from configs.sweeps import moe, psych201_paper, tiny
from psych201_jax.runs import emit, store, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unsupported_architecture_is_skipped_with_its_reason():
    cfg = psych201_paper.get_config()
    cfg.models = [dict(cfg.models[0], arch="deepseek_v3")]
    jobs = sweep.expand(sweep.Sweep.from_mapping(cfg))
    assert jobs and all("architecture 'deepseek_v3' is not supported" in j.skip_reason for j in jobs)


def test_paper_sweep_lists_the_study_models_and_pairs():
    cfg = psych201_paper.get_config()
    models = cfg.models
    assert len(models) == 101 and len({m["hf_id"] for m in models}) == 101
    assert sum(bool(m["base_hf_id"]) for m in models) == 65
    assert sum(m["chat"] for m in models) == 36 and sum(m["persona"] for m in models) == 86
    ids = {m["hf_id"] for m in models}
    assert all(m["base_hf_id"] in ids for m in models if m["base_hf_id"])
    jobs = sweep.expand(sweep.Sweep.from_mapping(cfg))
    plain = [j for j in jobs if j.condition_name == "plain"]
    assert len(plain) == 101
    # Every architecture of the study's 101 models is supported: no job of any condition is skipped.
    assert not [j for j in jobs if j.skip_reason]
    vl = {m["hf_id"] for m in models if m["arch"] in ("qwen2_5_vl", "qwen3_vl", "mllama")}
    assert len(vl) == 14  # scored as their language model
    assert len({m["hf_id"] for m in models if m["arch"] == "qwen3_5"}) == 9
    qwen3 = next(j for j in plain if j.model_info.hf_id == "Qwen/Qwen3-8B")
    args = qwen3.score_args({"dtype": "bfloat16"})
    assert "--config.model=/models/Qwen/Qwen3-8B" in args and "--config.model_info.kind=Reasoning" in args
    assert "--config.model_info.base_hf_id=Qwen/Qwen3-8B-Base" in args and "--config.dtype=bfloat16" in args
    assert "--config.options=none" in args
    accuracy = next(j for j in jobs if j.condition_name == "accuracy")
    assert "--config.options=study" in accuracy.score_args({})
    assert any(a.startswith("--config.data=hf:marcelbinz/Psych-201-discrete-test") for a in accuracy.score_args({}))


def test_moe_sweep_pairs_every_family_and_skips_nothing():
    """configs/sweeps/moe.py: a base / post-trained pair of each mixture-of-experts family, Qwen3.5-MoE included,
    every architecture supported (no job skipped)."""
    cfg = moe.get_config()
    models = cfg.models
    archs = {m["arch"] for m in models}
    assert archs == {"qwen3_moe", "qwen3_5_moe", "mixtral", "olmoe", "qwen2_moe"}
    ids = {m["hf_id"] for m in models}
    posts = [m for m in models if m["base_hf_id"]]
    assert len(models) == 10 and len(posts) == 5 and all(m["base_hf_id"] in ids for m in posts)
    assert {"Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-35B-A3B-Base"} <= ids
    jobs = sweep.expand(sweep.Sweep.from_mapping(cfg))
    assert jobs and not [j for j in jobs if j.skip_reason]


GOLDEN = pathlib.Path(__file__).parent / "data" / "golden"


def test_emitted_scripts_are_golden():
    cfg = tiny.get_config()
    jobs = sweep.expand(sweep.Sweep.from_mapping(cfg))
    for target in ("slurm", "tpu"):
        text = emit.emit_script(
            jobs, target, shards=2, config_path="configs/sweeps/tiny.py", flags=[], name=cfg.name, out_root=cfg.out_root
        )
        assert text == (GOLDEN / f"sweep_tiny_{target}.sh").read_text(), target
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_emitted_scripts_repeat_the_command_lines_config_flags_with_their_values(tmp_path):
    argv = ["--config=c.py", "--config.max_tokens", "4096", "--emit=tpu", "--config.mesh.mode=on"]
    argv += ["--distributed", "on", "--shards=2", "--config.persona", 'a "b\'s" $x']
    flags = emit.forwarded_flags(argv)
    assert flags == ["--config.max_tokens", "4096", "--config.mesh.mode=on", "--distributed", "on"] + [
        "--config.persona",
        'a "b\'s" $x',
    ]
    cfg = tiny.get_config()
    script = tmp_path / "sweep_tpu.sh"
    script.write_text(
        emit.emit_script(
            sweep.expand(sweep.Sweep.from_mapping(cfg)),
            "tpu",
            shards=2,
            config_path="c.py",
            flags=flags,
            name=cfg.name,
            out_root="out",
        )
    )
    # A stand-in gcloud records the remote command each slice's workers would run.
    fake = 'gcloud() { for a in "$@"; do case $a in --command=*) printf "%s" "${a#--command=}" > "cmd_$BASHPID";;'
    fake += " esac; done; }"
    env = dict(os.environ, TPU_PREFIX="t", ZONE="z", DIR="d")
    proc = subprocess.run(["bash", "-c", f"{fake}; export -f gcloud; bash {script}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0
    commands = [p.read_text() for p in tmp_path.glob("cmd_*")]
    assert len(commands) == 2
    for command in commands:
        prefix = "cd ~/d && .venv/bin/psych201-sweep "
        assert command.startswith(prefix)
        args = shlex.split(command[len(prefix) :])  # what the remote shell passes to psych201-sweep
        assert args[: len(flags) + 1] == ["--config=c.py", *flags] and args[-2] == "--distributed=on"


def test_shards_partition_the_paper_models():
    cfg = psych201_paper.get_config()
    units = sweep.models_of(sweep.expand(sweep.Sweep.from_mapping(cfg)))
    assert len(units) == 101
    shards = [sweep.shard_models(units, i, 8) for i in range(8)]
    names = [m for s in shards for m, _ in s]
    assert sorted(names) == sorted(m for m, _ in units) and len(set(names)) == 101
    assert all(12 <= len(s) <= 13 for s in shards)
    assert sweep.parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "x", "1/0", "-1/2"):
        try:
            sweep.parse_shard(bad)
        except sweep.SweepError:
            continue
        raise AssertionError(bad)


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=1800)


def _tiny_config(tmp_path, conditions, extra_models: str = "") -> pathlib.Path:
    config = tmp_path / "sweep_config.py"
    config.write_text(
        "from configs.sweeps import tiny\n"
        "def get_config():\n"
        "    c = tiny.get_config()\n"
        f"    c.out_root = {str(tmp_path / 'sweep')!r}\n"
        f"    c.models = list(c.models){extra_models}\n"
        f"    c.conditions = [c for c in c.conditions if c['name'] in {tuple(conditions)!r}]\n"
        "    return c\n"
    )
    return config


def _rows(out_dir) -> dict:
    """Every stored participant of a results directory by its input id, arrays as plain lists."""
    rows = {}
    for row in store.iter_rows(str(out_dir)):
        key = (row["source"], row["line"])
        assert key not in rows, f"{out_dir}: {key} stored twice"
        rows[key] = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
    return rows


def _status(tmp_path) -> dict:
    return json.loads((tmp_path / "sweep" / sweep.STATUS).read_text())


def test_tiny_sweep_end_to_end_with_a_failing_job_and_report(tmp_path):
    broken = (
        " + [dict(hf_id='broken/model', path='/nonexistent/model', family='X', generation='x', size_b=1.0,"
        " kind='base', base_hf_id='', arch='qwen3', chat=False, persona=False)]"
    )
    names = ("plain", "accuracy", "chat", "persona", "persona_shuffled", "persona_subset_none")
    config = _tiny_config(tmp_path, names, broken)
    proc = _run("psych201_jax.cli.sweep", f"--config={config}")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken job failed: the sweep says so
    outcomes = json.loads((tmp_path / "sweep" / "sweep_outcomes.json").read_text())
    status = {o["job"]: o["status"] for o in outcomes}
    assert status.pop("broken--model/plain") == "failed" and status.pop("broken--model/accuracy") == "failed"
    assert len(status) == 2 + 2 + 1 + 2 + 2 + 2 and set(status.values()) == {"done"}
    assert "2 failed" in proc.stdout
    models = _status(tmp_path)["models"]
    # One restore per model (counted by the worker around checkpoint restores); the broken one never loads.
    assert {m: e["restores"] for m, e in models.items()} == {
        "psych201_jax--tiny-qwen3": 1,
        "psych201_jax--tiny-qwen3-post": 1,
        "broken--model": 0,
    }
    assert models["broken--model"]["state"] == "failed" and models["psych201_jax--tiny-qwen3"]["state"] == "done"
    assert models["psych201_jax--tiny-qwen3-post"]["conditions"] == {"done": 6, "failed": 0, "total": 6}

    # Each job equals the same job run alone with psych201_jax.cli.score: plain and accuracy shared one forward
    # pass and one head (options and the temperature grid), chat ran a stream of its own.
    cfg = tiny.get_config()
    jobs = {j.name: j for j in sweep.expand(sweep.Sweep.from_mapping(cfg))}
    for name in ("plain", "accuracy", "chat"):
        job = jobs[f"psych201_jax--tiny-qwen3-post/{name}"]
        alone = tmp_path / "alone" / name
        args = [a for a in job.score_args(dict(cfg.score)) if not a.startswith("--config.out=")]
        single = _run("psych201_jax.cli.score", *args, f"--config.out={alone}")
        assert single.returncode == 0, single.stderr[-3000:]
        swept = _rows(tmp_path / "sweep" / job.name)
        assert swept == _rows(alone), name
        assert ("option_argmax" in next(iter(swept.values()))) == (name == "accuracy")
        assert ("nll_t" in next(iter(swept.values()))) == (name == "plain")

    again = _run("psych201_jax.cli.sweep", f"--config={config}")
    assert again.returncode == 1, again.stderr[-3000:]
    outcomes = json.loads((tmp_path / "sweep" / "sweep_outcomes.json").read_text())
    assert all(o["detail"] == "already complete" for o in outcomes if o["status"] == "done")
    status_cmd = _run("psych201_jax.cli.sweep", f"--config={config}", "--status")
    assert status_cmd.returncode == 0 and "models: 2 done, 0 running, 1 failed, 0 remaining" in status_cmd.stdout

    report = tmp_path / "report"
    analyzed = _run("psych201_jax.cli.analyze", f"--results={tmp_path / 'sweep'}", f"--out={report}", "--bootstrap=200")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    pngs = sorted(p for p in os.listdir(report) if p.endswith(".png"))
    assert {"fig_nll_by_size.png", "fig_persona_all_models.png"} <= set(pngs)  # the tiny models are in no paper list
    text = (report / "report.md").read_text()
    assert "psych201_jax/tiny-qwen3-post" in text


def _all_complete_once(tmp_path, config_names) -> None:
    """Every job of the tiny sweep is complete with each input participant stored exactly once."""
    for job in sweep.expand(sweep.Sweep.from_mapping(tiny.get_config())):
        if job.condition_name not in config_names:
            continue
        out = tmp_path / "sweep" / job.name
        assert store.read_complete(str(out)) is not None, job.name
        rows = _rows(out)  # asserts no duplicate
        assert len(rows) == store.read_manifest(str(out))["n_input"], job.name


def test_kill_9_mid_model_then_rerun_completes_every_condition_once(tmp_path):
    names = ("plain", "accuracy", "robust", "persona")
    config = _tiny_config(tmp_path, names)
    first_model = tmp_path / "sweep" / "psych201_jax--tiny-qwen3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "psych201_jax.cli.sweep", f"--config={config}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [n for n in names if (first_model / n / "complete.json").exists()]
        if done:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done and len(done) < len(names), done  # killed in the middle of the first model
    assert _status(tmp_path)["models"]["psych201_jax--tiny-qwen3"]["state"] == "running"

    again = _run("psych201_jax.cli.sweep", f"--config={config}")
    assert again.returncode == 0, again.stderr[-3000:]
    _all_complete_once(tmp_path, names)
    outcomes = json.loads((tmp_path / "sweep" / "sweep_outcomes.json").read_text())
    assert {o["job"] for o in outcomes if o["detail"] == "already complete"} >= {
        f"psych201_jax--tiny-qwen3/{n}" for n in done
    }
    assert {e["state"] for e in _status(tmp_path)["models"].values()} == {"done"}


def test_two_concurrent_shards_drain_the_sweep_without_overlap(tmp_path):
    names = ("plain", "robust")
    config = _tiny_config(tmp_path, names)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "psych201_jax.cli.sweep", f"--config={config}", f"--shard={i}/2"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    _all_complete_once(tmp_path, names)
    models = _status(tmp_path)["models"]
    assert {m: (e["state"], e["shard"], e["restores"]) for m, e in models.items()} == {
        "psych201_jax--tiny-qwen3": ("done", "0/2", 1),
        "psych201_jax--tiny-qwen3-post": ("done", "1/2", 1),
    }
    for i in range(2):
        outcomes = json.loads((tmp_path / "sweep" / f"sweep_outcomes_shard{i}of2.json").read_text())
        assert {o["job"].split("/")[0] for o in outcomes} == {list(models)[i]}


def test_a_failing_condition_does_not_fail_the_conditions_sharing_its_forward(tmp_path):
    names = ("plain", "accuracy")
    config = _tiny_config(tmp_path, names)
    foreign = tmp_path / "sweep" / "psych201_jax--tiny-qwen3" / "accuracy"
    foreign.mkdir(parents=True)
    (foreign / "manifest.json").write_text(json.dumps({"fingerprint": "another run", "determinants": {}}))
    proc = _run("psych201_jax.cli.sweep", f"--config={config}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    outcomes = {o["job"]: o for o in json.loads((tmp_path / "sweep" / "sweep_outcomes.json").read_text())}
    assert outcomes["psych201_jax--tiny-qwen3/accuracy"]["status"] == "failed"
    assert "different configuration" in outcomes["psych201_jax--tiny-qwen3/accuracy"]["detail"]
    assert {o["status"] for name, o in outcomes.items() if not name.endswith("tiny-qwen3/accuracy")} == {"done"}
