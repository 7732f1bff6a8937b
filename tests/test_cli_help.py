"""Every command's --help says what it does, lists its flags and (config-driven commands) every config key
with its default, taken from the typed objects' field documentation."""

import dataclasses
import subprocess
import sys

import pytest

from psych201_jax.runs import config, sweep

pytestmark = pytest.mark.quick


def _help(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", f"psych201_jax.cli.{name}", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "example:" in proc.stdout and f"psych201-{name}" in proc.stdout
    return proc.stdout


def test_simulate_help_lists_every_simulation_config_key():
    text = _help("simulate")
    keys = config.documented_keys("simulate")
    assert len(keys) == len(config.SimulateJob().flags()) and "not a closed-loop simulation" in text
    for key, _default, doc in keys:
        assert f"  {key} " in text and doc in text, key


@pytest.mark.parametrize("name", ["score", "audit"])
def test_score_and_audit_help_list_every_job_config_key(name):
    text = _help(name)
    keys = config.documented_keys()
    assert len(keys) == len(config.ScoreJob().flags())  # every flat key is documented
    for key, default, doc in keys:
        assert f"  {key} " in text and doc in text, key
        assert f"[{default}]" in text, key


def test_sweep_help_lists_every_sweep_config_key():
    text = _help("sweep")
    for field in dataclasses.fields(sweep.Sweep):
        assert f"  {field.name} " in text and field.metadata["doc"] in text, field.name
    for flag in ("--dry_run", "--emit", "--shard", "--shards", "--status", "--config"):
        assert flag in text


@pytest.mark.parametrize(
    "name,flags",
    [
        ("export", ("--results", "--out", "--allow_incomplete")),
        ("convert", ("--hf", "--out", "--dtype", "--allow_pickle")),
        ("analyze", ("--results", "--out", "--bootstrap", "--ddof")),
    ],
)
def test_other_commands_list_their_flags(name, flags):
    text = _help(name)
    for flag in flags:
        assert f"  {flag}:" in text, flag
