"""The simulation job (psych201-simulate) and its sweep condition, end to end on the bundled models and data:
every participant sampled or listed, the human tokens the scorer's, calibrated temperatures from the other
half, JSONL export, resume after kill -9 identical to an uninterrupted run, one-line config errors. (The
sampler on a 2x2x2 mesh against one device: tests/test_sampling_mesh.py; the job passes it the scorer's
placed parameters and rules.)"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from configs.sweeps import tiny_simulate
from psych201_jax import hashing
from psych201_jax.analysis import calibration
from psych201_jax.cli import export
from psych201_jax.runs import simulate, store, sweep, sweep_worker
from psych201_jax.runs.config import ConfigError, SimulateJob
from psych201_jax.sampling import sampler as sampler_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = 8


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """The tiny simulation sweep (plain with the temperature grid, simulate at T = 1 and calibrated), run once."""
    cfg = tiny_simulate.get_config()
    cfg.out_root = str(tmp_path_factory.mktemp("tiny_simulate"))
    parsed = sweep.Sweep.from_mapping(cfg)
    jobs = sweep.expand(parsed)
    outcomes = sweep_worker.run_shard(
        jobs,
        parsed.overrides(),
        out_root=parsed.out_root,
        name=parsed.name,
        fit_temperatures=calibration.fitted_temperatures,
    )
    assert [o["status"] for o in outcomes] == ["done"] * 6, outcomes
    return parsed, jobs


def _dirs(jobs, condition):
    return {j.model.info.hf_id: j.out for j in jobs if j.condition_name == condition}


def test_every_participant_is_sampled_or_listed_and_the_human_tokens_are_the_scorers(sweep_root):
    _, jobs = sweep_root
    plain = _dirs(jobs, "plain")
    for model, out in _dirs(jobs, "simulate").items():
        assert store.read_complete(out) is not None
        scored = {(r["study"], r["experiment"], r["participant"]): r for r in store.iter_rows(plain[model])}
        rows = list(store.iter_rows(out))
        assert len(rows) == len(scored) == store.read_manifest(out)["n_input"]
        for row in rows:
            key = (row["study"], row["experiment"], row["participant"])
            assert row["status"] in ("sampled", "rejected")
            if row["status"] == "rejected":
                assert row["reason"] and scored[key]["status"] != "scored" or "no response slot" in row["reason"]
                continue
            responses = [s["response"] for s in row["slots"]]
            assert responses == sorted(responses) and len(set(responses)) == len(responses)
            # The human tokens of the slots, in text order, are exactly the tokens the scorer labels.
            assert [t for s in row["slots"] for t in s["human_tokens"]] == scored[key]["target"], key
            for slot in row["slots"]:
                assert len(slot["samples"]) == SAMPLES and slot["temperature"] == 1.0
                for x in slot["samples"]:
                    assert ">>" not in x["text"] and np.isfinite(x["logprob"]) and x["logprob"] <= 0
                    assert len(x["tokens"]) <= 12 and x["stop"] in ("marker", "token", "length")
                    assert x["stopped"] == (x["stop"] != "length")


def test_calibrated_samples_use_the_temperature_fitted_on_the_other_half(sweep_root):
    _, jobs = sweep_root
    plain = _dirs(jobs, "plain")
    for model, out in _dirs(jobs, "simulate_calibrated").items():
        fitted = calibration.fitted_temperatures(plain[model], 0)
        determinants = store.read_manifest(out)["determinants"]["simulate"]
        assert determinants["fitted_temperatures"] == list(fitted) and determinants["temperature"] == "calibrated"
        seen = set()
        for row in store.iter_rows(out):
            key = (row["study"], row["experiment"], row["participant"])
            for slot in row.get("slots", []):
                assert slot["temperature"] == fitted[1 - hashing.half_of(key, 0)]
                seen.add(slot["temperature"])
        assert len(seen) == 2, "both halves are sampled"


def test_export_writes_one_line_per_participant_with_its_slots(sweep_root, tmp_path):
    _, jobs = sweep_root
    out = next(iter(_dirs(jobs, "simulate").values()))
    lines = list(export.export_rows(out))
    assert len(lines) == len(list(store.iter_table(out)))
    sampled = [x for x in lines if x["status"] == "sampled"]
    assert sampled and set(sampled[0]) == {"study", "experiment", "participant", "status", "reason", "slots"}
    slot = sampled[0]["slots"][0]
    assert set(slot) == {"human", "human_tokens", "temperature", "samples"}
    assert set(slot["samples"][0]) == {"tokens", "text", "logprob", "stopped"}
    json.dumps(lines)  # plain JSON


def test_the_report_has_the_generated_behaviour_section_and_figures(sweep_root, tmp_path):
    import matplotlib

    from psych201_jax.analysis import report

    matplotlib.use("Agg")
    parsed, _ = sweep_root
    notes = report.generate([parsed.out_root], str(tmp_path), n_boot=200)
    text = (tmp_path / "report.md").read_text()
    assert "## Generated behaviour" in text and "not a closed-loop simulation" in text
    assert text.count("against its base psych201_jax/tiny-qwen3 (k=8") == 2  # T = 1 and calibrated
    for name in ("diversity", "match", "distance", "pairs"):
        assert notes[f"fig_behaviour_{name}.png"] is None
        assert (tmp_path / f"fig_behaviour_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "behaviour.csv").exists() and (tmp_path / "behaviour_pairs.csv").exists()


def test_a_rerun_skips_complete_simulations_and_a_changed_one_is_not_complete(sweep_root):
    parsed, jobs = sweep_root
    sim = [j for j in jobs if j.simulation is not None]
    assert sim and all(sweep.is_complete(j) for j in sim)
    changed = dataclasses.replace(sim[0], simulation=dataclasses.replace(sim[0].simulation, samples=4))
    assert not sweep.is_complete(changed)
    scoring_view = dataclasses.replace(sim[0], simulation=None)
    assert not sweep.is_complete(scoring_view), "a simulation directory never completes a scoring job"


def test_a_token_that_holds_the_marker_closes_the_sample_and_is_cut_from_its_text():
    texts = {(5,): "J", (5, 7): "J'>>", (5, 9): "J\n", (5, 11): "Jx"}
    tok = types.SimpleNamespace(hf=types.SimpleNamespace(decode=lambda ids, **_: texts[tuple(ids)]))
    run = simulate._Run(None, tok, {7}, (8,), 8, {}, None, simulate.Progress())  # type: ignore[arg-type]

    def sample(generated, length, stop):
        return sampler_lib.Sample(np.asarray(generated, np.int32), np.full(len(generated), -0.5), length, stop)

    human = np.asarray([5], np.int32)
    slot = sampler_lib.SlotSamples(
        "k",
        0,
        human,
        (
            sample([5, 7], 1, sampler_lib.STOP_TOKEN),
            sample([5, 9], 1, sampler_lib.STOP_TOKEN),
            sample([5, 11], 2, "length"),
        ),
    )
    draws = run._draws(slot, 1.0)
    assert [(g.text, g.stop, g.tokens.tolist()) for g in draws.samples] == [
        ("J'", "marker", [5]),
        ("J", "token", [5]),
        ("Jx", "length", [5, 11]),
    ]
    assert draws.samples[0].logprob == -1.0 and draws.human == "J"


def test_config_round_trips_and_bad_values_are_config_errors():
    job = SimulateJob.from_mapping({"samples": 3, "temperature": "0", "out": "/tmp/x", "protocol": "robust"})
    assert SimulateJob.from_mapping(job.to_dict()) == job and job.simulation.temperature == 0.0
    assert "temperatures" not in job.to_dict() and not job.score.condition.temperatures
    for bad in ({"samples": 0}, {"temperature": "hot"}, {"temperature": "calibrated"}, {"branch_capacity": 0}):
        with pytest.raises(ConfigError):
            SimulateJob.from_mapping(bad)


@pytest.mark.parametrize(
    "flag, message",
    [("--config.temperature=hot", "temperature='hot'"), ("--config.temperature=calibrated", "calibration=")],
)
def test_command_line_errors_are_one_line(flag, message):
    proc = subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.simulate", flag, "--config.out=/nonexistent/x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _simulate(out, data, *args):
    """psych201-simulate as the tiny sweep's ``simulate`` condition of the bundled base model runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "psych201_jax.cli.simulate", f"--config.out={out}", f"--config.data={data}"]
        + [f"--config.samples={SAMPLES}", "--config.max_new_tokens=12", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _samples(out):
    return {
        (r["study"], r["participant"], s["response"]): [(x["tokens"], x["logprob"]) for x in s["samples"]]
        for r in store.iter_rows(out)
        for s in r.get("slots", [])
    }


def test_kill_and_resume_gives_the_samples_of_an_uninterrupted_run_with_other_batches(sweep_root, tmp_path):
    parsed, jobs = sweep_root
    reference = _dirs(jobs, "simulate")["psych201_jax/tiny-qwen3"]  # one chunk, default batches and capacity
    expected = _samples(reference)
    out = tmp_path / "killed"
    small = ("--config.chunk_tokens=3000", "--config.tokens_per_batch=4096", "--config.branch_capacity=16")
    proc = _simulate(out, parsed.data, *small)
    deadline = time.time() + 600
    while proc.poll() is None and len(store.chunk_dirs(out)) < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.read_complete(out) is None and len(store.chunk_dirs(out)) >= 1
    resumed = _simulate(out, parsed.data, *small)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    got = _samples(out)
    assert got.keys() == expected.keys() and len(list(store.iter_table(out))) == len(list(store.iter_table(reference)))
    for key, draws in expected.items():
        assert [t for t, _ in got[key]] == [t for t, _ in draws], key  # the same tokens, bit for bit
        # float32 sums of up to 12 log-probs from other batch shapes
        np.testing.assert_allclose([lp for _, lp in got[key]], [lp for _, lp in draws], rtol=2e-6, atol=1e-5)
    changed = SimulateJob.from_mapping({"out": str(out), "data": parsed.data, "samples": 3, "max_new_tokens": 12})
    with pytest.raises(store.ResultsError, match="different configuration"):  # refused, never mixed in
        simulate.run(changed)


@pytest.mark.parametrize("target", ["slurm", "tpu"])
def test_emitted_scripts_run_the_simulations_with_the_scoring_conditions(target):
    from psych201_jax.runs import emit

    cfg = tiny_simulate.get_config()
    jobs = sweep.expand(sweep.Sweep.from_mapping(cfg))
    assert [j.condition_name for j in jobs if j.simulation is not None] == ["simulate"] * 2 + [
        "simulate_calibrated"
    ] * 2
    text = emit.emit_script(
        jobs, target, shards=2, config_path="configs/sweeps/tiny_simulate.py", flags=[], name=cfg.name, out_root="/o"
    )
    assert "2 models, 6 jobs (0 skipped" in text and "--config=configs/sweeps/tiny_simulate.py" in text
    bad = dict(cfg.conditions[2]["simulate"], calibration="nope")
    broken = dict(cfg.to_dict(), conditions=[*cfg.conditions[:2], dict(cfg.conditions[2], simulate=bad)])
    with pytest.raises(sweep.SweepError, match="calibration='nope' must name a scoring condition"):
        sweep.Sweep.from_mapping(broken)


def test_options_study_draws_every_first_token_among_the_study_options(tmp_path):
    from psych201_jax import defaults
    from psych201_jax.data.tokenizer import TokenizerInfo
    from psych201_jax.scoring import options

    data = os.path.join(defaults.SAMPLE_DATA, "thoma2025riskychoice")
    job = SimulateJob.from_mapping(
        {"data": data, "out": str(tmp_path / "sim"), "options": "study", "samples": 4, "max_new_tokens": 2}
    )
    simulate.run(job)
    tok = TokenizerInfo(os.path.join(job.score.model, "tokenizer"))
    allowed = options.collect_options(job.score.span_pipeline(None).spans(tok))["thoma2025riskychoice"]
    assert len(allowed) >= 2
    firsts = [x["tokens"][:1] or [-1] for r in store.iter_rows(job.out) for s in r["slots"] for x in s["samples"]]
    assert firsts and all(t[0] in allowed for t in firsts if t != [-1])
    assert len({t[0] for t in firsts}) >= 2, "drawn, not fixed"
