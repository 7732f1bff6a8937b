"""Simulation results directories (``psych201-simulate``) → typed runs, behaviour.csv and behaviour_pairs.csv.

A simulation directory is a results directory whose manifest has ``determinants.simulate``: each sampled
participant's row holds every response slot's human response and k samples (``runs.store.iter_rows``). This
module loads them (``load_simulation``), computes ``behaviour.study_behaviour`` per model × study (the study's
response type comes from the human responses) and, for every base / post-trained pair (``model_info.base_hf_id``,
``pairs.pair_chains``) and every step of a stage chain (``pairs.find_chains``: each stage against the previous
one), ``behaviour.paired_differences`` over the studies both have, overall and per response type. Runs are
compared only within one sampling setting (condition and ``Simulation`` without its calibration run, which is
each model's own), so a T = 1 base is never paired with a greedy post-trained model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from psych201_jax.analysis import behaviour, metrics, pairs
from psych201_jax.analysis.behaviour import SimulatedParticipant, Slot, StudyBehaviour
from psych201_jax.analysis.runs import IncompleteRunError
from psych201_jax.analysis.stats import nanmean
from psych201_jax.analysis.tables import write_csv
from psych201_jax.conditions import Condition, ModelInfo, Simulation
from psych201_jax.errors import UserError
from psych201_jax.runs import store

CONDITION = (*Condition.ANALYSIS_FIELDS, "options")  # options restricts what is sampled: part of the setting
SETTING = ("samples", "temperature", "max_new_tokens", "top_k", "top_p")  # ``Simulation`` minus its calibration
INFO = ModelInfo.FIELDS[1:]  # hf_id is the "model" column
ALL_TYPES = "all"  # behaviour_pairs.csv's response_type over every study


class NotASimulationError(UserError):
    """A results directory that is not a simulation's."""


@dataclasses.dataclass(frozen=True)
class RejectedParticipant:
    """An input participant the simulation job did not sample, and why."""

    study: str
    experiment: str
    participant: str
    reason: str


@dataclasses.dataclass(frozen=True)
class StopCounts:
    """Samples of one study, and how many ended at max_new_tokens without a closing marker or stop token."""

    n_samples: int = 0
    n_length: int = 0

    @property
    def share_length(self) -> float:
        return self.n_length / self.n_samples if self.n_samples else math.nan


@dataclasses.dataclass(frozen=True)
class SimulationRun:
    """One simulation results directory: a model's samples under one condition and sampling setting.

    info: ``ModelInfo`` as a dict (as ``metrics.Run.info``); participants: the sampled ones, slots in text order
    (texts without the closing marker); rejected: the input participants not sampled; stops: study → stop
    counts; mean_temperature: the mean over slots of the temperature drawn at (the fitted ones when
    ``temperature=calibrated``)."""

    path: str
    info: Mapping[str, Any]
    condition: Condition
    simulation: Simulation
    participants: tuple[SimulatedParticipant, ...]
    rejected: tuple[RejectedParticipant, ...]
    complete: bool
    n_input: int | None
    stops: Mapping[str, StopCounts]
    mean_temperature: float

    @property
    def model(self) -> str:
        return str(self.info["hf_id"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def n_done(self) -> int:
        return len(self.participants) + len(self.rejected)

    @property
    def setting(self) -> tuple[Any, ...]:
        """What makes two runs' samples comparable: the ``SETTING`` values (the calibration run is each model's
        own, so a calibrated base and a calibrated post-trained model are compared)."""
        return tuple(getattr(self.simulation, k) for k in SETTING)

    def status(self) -> str:
        total = "?" if self.n_input is None else str(self.n_input)
        return "complete" if self.complete else f"incomplete ({self.n_done} of {total} participants)"

    def label(self) -> str:
        """The sampling setting in a few characters, e.g. ``k=8, T=1``."""
        s = self.simulation
        t = s.temperature if s.calibrated else f"{s.temperature:g}"
        extra = (f", top_k={s.top_k}" if s.top_k else "") + (f", top_p={s.top_p:g}" if s.top_p < 1 else "")
        return f"k={s.samples}, T={t}{extra}"


def load_simulation(path: str) -> SimulationRun:
    """One simulation results directory as a ``SimulationRun``; a scoring directory is a ``NotASimulationError``."""
    manifest = store.read_manifest(path)
    if not store.simulates(manifest):
        raise NotASimulationError(f"{path}: not a simulation results directory (no determinants.simulate)")
    config = manifest.get("config", {})
    simulation = Simulation.from_mapping({**config, **manifest["determinants"][store.SIMULATE]})
    participants, rejected = [], []
    stops: dict[str, list[int]] = {}
    temperatures: list[float] = []
    for row in store.iter_rows(path):
        ident = (str(row.get("study", "")), str(row.get("experiment", "")), str(row.get("participant", "")))
        if row.get("status") != store.SAMPLED:
            reason = row.get("reason") or f"status {row.get('status')!r}"
            rejected.append(RejectedParticipant(*ident, reason=str(reason)))
            continue
        slots = []
        counts = stops.setdefault(ident[0], [0, 0])
        for slot in row.get("slots") or []:
            draws = slot.get("samples") or []
            slots.append(Slot(str(slot.get("human", "")), tuple(str(d.get("text", "")) for d in draws)))
            counts[0] += len(draws)
            counts[1] += sum(d.get("stop") == "length" for d in draws)
            if isinstance(slot.get("temperature"), (int, float)):
                temperatures.append(float(slot["temperature"]))
        participants.append(SimulatedParticipant(*ident, slots=tuple(slots)))
    n_input = manifest.get("n_input")
    return SimulationRun(
        path=path,
        info=metrics.model_info(manifest),
        condition=dataclasses.replace(Condition.from_mapping(config), temperatures=()),
        simulation=simulation,
        participants=tuple(participants),
        rejected=tuple(rejected),
        complete=store.read_complete(path) is not None,
        n_input=n_input if isinstance(n_input, int) else None,
        stops={s: StopCounts(*c) for s, c in sorted(stops.items())},
        mean_temperature=float(np.mean(temperatures)) if temperatures else math.nan,
    )


@dataclasses.dataclass(frozen=True)
class LoadedSimulations:
    """The simulation runs of an analysis: complete (analysed), incomplete (listed, left out), notes."""

    complete: tuple[SimulationRun, ...]
    incomplete: tuple[SimulationRun, ...]
    notes: tuple[str, ...]


def load_simulations(dirs: Iterable[str], allow_incomplete: bool = False) -> LoadedSimulations:
    """Every simulation directory of ``dirs``. An incomplete run is refused (``IncompleteRunError``) unless
    ``allow_incomplete``; then it is listed in the notes and left out of the behaviour tables: a part of the
    participants' samples is never reported as a model's behaviour. Of two complete runs of one model, condition
    and setting the first is kept, the other noted."""
    kept: dict[tuple[str, Condition, tuple[Any, ...]], SimulationRun] = {}
    incomplete, notes = [], []
    for d in dirs:
        sim = load_simulation(d)
        if not sim.complete:
            if not allow_incomplete:
                raise IncompleteRunError(
                    f"{d}: simulation {sim.status()}; finish it by rerunning its job, or pass --allow_incomplete "
                    f"to list it as incomplete and leave it out"
                )
            logging.warning("%s: simulation %s, left out", d, sim.status())
            notes.append(f"{d}: simulation of {sim.model} {sim.status()}; left out of the behaviour tables")
            incomplete.append(sim)
            continue
        logging.info(
            "%s: %s (%s) simulation %s, %d participants sampled, %d rejected",
            d,
            sim.model,
            sim.kind,
            sim.label(),
            len(sim.participants),
            len(sim.rejected),
        )
        key = (sim.model, sim.condition, sim.setting)
        if key in kept:
            notes.append(f"{d}: same model, condition and setting as {kept[key].path}; ignored")
            continue
        kept[key] = sim
        if sim.rejected:
            notes.append(f"{d}: {len(sim.rejected)} participant(s) of {sim.model} rejected by the simulation job")
    return LoadedSimulations(tuple(kept.values()), tuple(incomplete), tuple(notes))


# ----------------------------------------------------------------------------------------------- pairs


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A post-trained (or later-stage) run against its base (``against="base"``) or the chain's previous
    stage (``against="previous"``), in one sampling setting; chain and stage from the post-trained model."""

    post: SimulationRun
    base: SimulationRun
    against: str
    chain: str = ""

    @property
    def name(self) -> str:
        return f"{self.post.model} vs {self.base.model}"


def _proxy(sim: SimulationRun) -> metrics.Run:
    """A participant-less ``metrics.Run`` carrying a simulation's identity, so ``pairs`` pairs it."""
    return metrics.Run(sim.path, sim.info, sim.condition, (), 0)


def find_comparisons(sims: Sequence[SimulationRun]) -> tuple[list[Comparison], list[str]]:
    """Every (post, base) pair by ``model_info.base_hf_id`` and every (stage, previous stage) step of a stage
    chain, within one condition and sampling setting; a step whose previous stage is the base is its pair
    (once, with the chain named). Notes for unpaired post-trained runs and chains left out."""
    groups: dict[tuple[Any, ...], list[SimulationRun]] = {}
    for sim in sims:
        groups.setdefault(sim.setting, []).append(sim)
    out: dict[tuple[str, str], Comparison] = {}
    notes = []
    for setting_runs in groups.values():
        by_path = {s.path: s for s in setting_runs}
        proxies = [_proxy(s) for s in setting_runs]
        chains, unpaired = pairs.pair_chains(proxies)
        for c in chains:
            out[(c.final.path, c.base.path)] = Comparison(by_path[c.final.path], by_path[c.base.path], "base")
        label = setting_runs[0].label()
        notes += [f"simulation of {r.model} ({label}): {why}; left out of behaviour_pairs" for r, why in unpaired]
        stage_chains, chain_notes = pairs.find_chains(proxies)
        notes += [f"simulation ({label}): {n}" for n in chain_notes]
        for c in stage_chains:
            for stage, previous in c.steps():
                key = (stage.path, previous.path)
                against = "base" if previous is c.base else "previous"
                out[key] = Comparison(by_path[stage.path], by_path[previous.path], against, c.name)
    return sorted(out.values(), key=lambda c: (c.post.label(), c.chain, c.base.model, c.post.model)), notes


# ---------------------------------------------------------------------------------------------- tables

BEHAVIOUR_COLUMNS = (
    "model",
    *INFO,
    *CONDITION,
    *SETTING,
    "mean_temperature",
    "study",
    "response_type",
    "n_participants",
    "n_slots",
    "n_samples",
    "share_length_stopped",
    "n_unparsable_samples",
    "n_unparsable_human",
    "exact_match",
    "crps",
    "crps_scaled",
    "crps_slots",
    "crps_skipped_slots",
    "human_sd",
    "tv",
    "tv_lo",
    "tv_hi",
    "js",
    "js_lo",
    "js_hi",
    "wasserstein",
    "wasserstein_lo",
    "wasserstein_hi",
    "wasserstein_scaled",
    "sample_entropy",
    "sample_distinct",
    "human_entropy",
    "human_distinct",
    "n_human_positions",
    "path",
)
PAIR_COLUMNS = (
    "post",
    "base",
    "against",
    "chain",
    "stage",
    "kind",
    "family",
    "generation",
    "size_b",
    *CONDITION,
    *SETTING,
    "response_type",
    "metric",
    "n_studies",
    "mean_post",
    "mean_base",
    "mean_human",
    "mean_diff",
    "ci_lo",
    "ci_hi",
)
RUN_COLUMNS = (
    "model",
    "kind",
    *CONDITION,
    *SETTING,
    "calibration",
    "mean_temperature",
    "n_participants",
    "n_rejected",
    "n_input",
    "complete",
    "share_length_stopped",
    "path",
)
# The human reference of a paired metric (behaviour_pairs.csv's mean_human): the spread across participants.
HUMAN_OF = {"sample_entropy": "human_entropy", "sample_distinct": "human_distinct"}


@dataclasses.dataclass(frozen=True)
class PairResult:
    """One comparison's paired differences: response type (``ALL_TYPES`` or a ``ResponseType`` value) →
    one ``PairedDifference`` per ``behaviour.PAIRED_METRICS`` metric; post / base: study → behaviour."""

    comparison: Comparison
    post: Mapping[str, StudyBehaviour]
    base: Mapping[str, StudyBehaviour]
    differences: Mapping[str, tuple[behaviour.PairedDifference, ...]]

    def difference(self, metric: str, response_type: str = ALL_TYPES) -> behaviour.PairedDifference | None:
        return next((d for d in self.differences.get(response_type, ()) if d.metric == metric), None)


@dataclasses.dataclass(frozen=True)
class BehaviourTables:
    """Everything the report's generated-behaviour section, its CSVs and figures need."""

    runs: tuple[SimulationRun, ...]
    by_run: Mapping[str, Mapping[str, StudyBehaviour]]  # run path → study → its behaviour
    pairs: tuple[PairResult, ...]
    rows: Mapping[str, list[dict]]  # behaviour, behaviour_pairs, behaviour_runs
    notes: tuple[str, ...]


def _setting_cols(sim: SimulationRun) -> dict[str, Any]:
    return {**sim.condition.values(CONDITION), **{k: getattr(sim.simulation, k) for k in SETTING}}


def behaviour_rows(sim: SimulationRun, by_study: Mapping[str, StudyBehaviour]) -> list[dict]:
    """behaviour.csv's rows of one run: one per study (a study has one response type)."""
    head = {"model": sim.model, **{k: sim.info[k] for k in INFO}, **_setting_cols(sim)}
    rows = []
    for study, b in by_study.items():
        row = {**head, "mean_temperature": sim.mean_temperature, **b.as_row()}
        row["response_type"] = row.pop("kind")
        row.update(kind=sim.kind, share_length_stopped=sim.stops.get(study, StopCounts()).share_length, path=sim.path)
        rows.append(row)
    return rows


def run_row(sim: SimulationRun) -> dict:
    """behaviour_runs.csv's row of one run (complete or not)."""
    n = sum(c.n_samples for c in sim.stops.values())
    return {
        "model": sim.model,
        "kind": sim.kind,
        **_setting_cols(sim),
        "calibration": sim.simulation.calibration,
        "mean_temperature": sim.mean_temperature,
        "n_participants": len(sim.participants),
        "n_rejected": len(sim.rejected),
        "n_input": sim.n_input,
        "complete": sim.complete,
        "share_length_stopped": sum(c.n_length for c in sim.stops.values()) / n if n else math.nan,
        "path": sim.path,
    }


def pair_rows(result: PairResult) -> list[dict]:
    """behaviour_pairs.csv's rows of one comparison: one per response type × metric; mean_post / mean_base /
    mean_human (the human spread, diversity metrics only) are means over the same studies as mean_diff."""
    c = result.comparison
    head = {
        "post": c.post.model,
        "base": c.base.model,
        "against": c.against,
        "chain": c.chain,
        "stage": c.post.info.get("stage", ""),
        **{k: c.post.info.get(k, "") for k in ("kind", "family", "generation", "size_b")},
        **_setting_cols(c.post),
    }
    rows = []
    for response_type, diffs in result.differences.items():
        for d in diffs:
            studies = [s for s, _ in d.per_study]
            human = HUMAN_OF.get(d.metric, "")
            means = {
                "mean_post": [result.post[s].metric(d.metric) for s in studies],
                "mean_base": [result.base[s].metric(d.metric) for s in studies],
                "mean_human": [getattr(result.post[s].diversity, human) for s in studies] if human else [],
            }
            rows.append(
                {
                    **head,
                    "response_type": response_type,
                    **d.as_row(),
                    **{k: nanmean(v) if v else math.nan for k, v in means.items()},
                }
            )
    return rows


def compare(
    c: Comparison,
    post: Mapping[str, StudyBehaviour],
    base: Mapping[str, StudyBehaviour],
    n_boot: int,
    seed: int,
) -> PairResult:
    """The paired differences of one comparison over all common studies and per response type."""
    types = sorted({b.kind.value for b in post.values()} & {b.kind.value for b in base.values()})
    differences = {ALL_TYPES: behaviour.paired_differences(post, base, n_boot=n_boot, seed=seed)}
    for t in types:
        only = [{s: b for s, b in side.items() if b.kind.value == t} for side in (post, base)]
        differences[t] = behaviour.paired_differences(only[0], only[1], n_boot=n_boot, seed=seed)
    return PairResult(c, post, base, differences)


def build_behaviour(
    sims: Sequence[SimulationRun],
    *,
    incomplete: Sequence[SimulationRun] = (),
    notes: Sequence[str] = (),
    n_boot: int = 2000,
    seed: int = 0,
) -> BehaviourTables:
    """Every behaviour table from the complete simulation runs (``incomplete`` ones only get a
    behaviour_runs.csv row): per run and study ``behaviour.behaviour_by_study`` (bootstrap over participants),
    per comparison ``compare`` (bootstrap over studies)."""
    by_run = {s.path: behaviour.behaviour_by_study(s.participants, n_boot=n_boot, seed=seed) for s in sims}
    comparisons, pair_notes = find_comparisons(sims)
    results = tuple(compare(c, by_run[c.post.path], by_run[c.base.path], n_boot, seed) for c in comparisons)
    rows = {
        "behaviour": [r for s in sims for r in behaviour_rows(s, by_run[s.path])],
        "behaviour_pairs": [r for p in results for r in pair_rows(p)],
        "behaviour_runs": [run_row(s) for s in (*sims, *incomplete)],
    }
    return BehaviourTables(tuple(sims), by_run, results, rows, (*notes, *pair_notes))


COLUMNS = {"behaviour": BEHAVIOUR_COLUMNS, "behaviour_pairs": PAIR_COLUMNS, "behaviour_runs": RUN_COLUMNS}


def write_behaviour(bt: BehaviourTables, out_dir: str) -> None:
    """behaviour.csv, behaviour_pairs.csv and behaviour_runs.csv in ``out_dir``, with their fixed columns."""
    for name, columns in COLUMNS.items():
        write_csv(os.path.join(out_dir, f"{name}.csv"), bt.rows[name], columns)
