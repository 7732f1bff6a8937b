"""Fake simulation results directories for the analysis tests: what ``psych201-simulate`` writes (manifest with
``determinants.simulate``, sampled participants' slots, rejected ones), through the store's own writer, without
running a model. ``write_narrow_and_wide`` writes a base model that samples as widely as the humans answer and a
post-trained one that always gives one answer, over studies of every response type."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psych201_jax.runs import store
from psych201_jax.types import GeneratedResponse, ParticipantSamples, ParticipantSpans, Rejected, SlotDraws

# One participant: (id, [(human response, [sampled texts]), ...] in text order).
Participant = tuple[str, Sequence[tuple[str, Sequence[str]]]]


@dataclasses.dataclass(frozen=True)
class Model:
    """The model_info of a fake simulation."""

    hf_id: str
    kind: str = "base"
    base_hf_id: str = ""
    family: str = "Fam"
    generation: str = "G1"
    size_b: float = 1.0
    stage: str = ""
    chain: str = ""


def manifest(model: Model, *, samples: int, temperature: float | str = 1.0, n_input: int | None = None) -> dict:
    """A simulation's manifest: the flat config (with model_info) and ``determinants.simulate``."""
    simulate = {
        "samples": samples,
        "temperature": temperature,
        "max_new_tokens": 8,
        "top_k": 0,
        "top_p": 1.0,
        "calibration": "/runs/calibration" if temperature == "calibrated" else "",
    }
    config = {
        "model": f"/models/{model.hf_id}",
        "protocol": "reference",
        "template": "none",
        "persona": "none",
        "options": "none",
        "dtype": "float32",
        "data": "synthetic",
        "model_info": dataclasses.asdict(model),
        **simulate,
    }
    out: dict[str, Any] = {
        "fingerprint": f"sim-{model.hf_id}-{samples}-{temperature}",
        "config": config,
        "determinants": {store.SIMULATE: simulate},
    }
    if n_input is not None:
        out["n_input"] = n_input
    return out


def _sampled(study: str, participant: Participant, line: int, temperature: float) -> ParticipantSamples:
    pid, slots = participant
    spans = ParticipantSpans(
        study=study,
        experiment=f"{study}/",
        participant=pid,
        token_ids=np.arange(4, dtype=np.int32),
        response_index=np.full(4, -1, np.int32),
        n_responses=len(slots),
        responses_text=len(slots),
        responses_scored=len(slots),
        lost_truncation=0,
        source="synthetic.jsonl",
        line=line,
    )
    draws = tuple(
        SlotDraws(
            response=i,
            human=human,
            human_tokens=np.array([1, 2], np.int32),
            temperature=temperature,
            samples=tuple(
                GeneratedResponse(
                    tokens=np.array([3], np.int32), text=t, logprob=-1.0, stop="length" if t == "..." else "marker"
                )
                for t in texts
            ),
        )
        for i, (human, texts) in enumerate(slots)
    )
    return ParticipantSamples(spans=spans, slots=draws)


def write_simulation(
    out_dir: str,
    model: Model,
    studies: Mapping[str, Sequence[Participant]],
    *,
    samples: int,
    temperature: float | str = 1.0,
    rejected: Sequence[tuple[str, str, str]] = (),
    complete: bool = True,
) -> str:
    """A simulation results directory: one chunk of ``studies`` (study → participants) plus ``rejected``
    (study, participant, reason) rows; complete.json unless ``complete`` is False. A sample text "..." is
    stored as stopped by the length limit."""
    items: list[ParticipantSamples | Rejected] = []
    t = 0.8 if temperature == "calibrated" else float(temperature)
    for study, participants in studies.items():
        items += [_sampled(study, p, len(items) + 1, t) for p in participants]
    for study, pid, reason in rejected:
        items.append(
            Rejected(
                study=study,
                experiment=f"{study}/",
                participant=pid,
                source="synthetic.jsonl",
                line=len(items) + 1,
                reason=reason,
            )
        )
    m = manifest(model, samples=samples, temperature=temperature, n_input=len(items) + (0 if complete else 5))
    store.ResultsWriter(out_dir, m).commit(items)
    if complete:
        store.write_complete(out_dir, m["fingerprint"], 1.0)
    return out_dir


# The studies of ``write_narrow_and_wide``: human responses of every response type, 8 participants × 4 slots.
def _humans(rng: np.random.Generator, study: str, n: int = 8, slots: int = 4) -> list[list[str]]:
    if study == "letters":  # category: "A" in 60%
        return [[str(rng.choice(["A", "A", "A", "B", "C"])) for _ in range(slots)] for _ in range(n)]
    if study == "ratings":  # ordinal 1..7
        return [[str(rng.integers(1, 8)) for _ in range(slots)] for _ in range(n)]
    if study == "amounts":  # number
        return [[f"{rng.normal(100, 20):.1f}" for _ in range(slots)] for _ in range(n)]
    words = ["the", "red", "left", "door", "was", "open", "quickly", "then", "I", "chose"]  # free text
    return [[" ".join(rng.choice(words, size=6)) for _ in range(slots)] for _ in range(n)]


NARROW_STUDIES = ("letters", "ratings", "amounts", "sentences")
NARROW_ANSWER = {"letters": "A", "ratings": "4", "amounts": "100", "sentences": "I chose the left door"}


def narrow_and_wide_studies(
    seed: int = 0, k: int = 6
) -> tuple[dict[str, list[Participant]], dict[str, list[Participant]]]:
    """(wide, narrow) study → participants over ``NARROW_STUDIES``, the same human responses: wide samples are
    drawn like the humans' answers (its own draws), narrow ones are ``NARROW_ANSWER`` every time (one sample of
    each slot's first participant stopped by the length limit, "...")."""
    rng = np.random.default_rng(seed)
    wide: dict[str, list[Participant]] = {}
    narrow: dict[str, list[Participant]] = {}
    for study in NARROW_STUDIES:
        humans = _humans(rng, study)
        pool = [h for person in _humans(rng, study, n=8 * k) for h in person]
        wide[study], narrow[study] = [], []
        for i, person in enumerate(humans):
            wide[study].append((f"p{i}", [(h, [str(x) for x in rng.choice(pool, size=k)]) for h in person]))
            fixed = [NARROW_ANSWER[study]] * k
            narrow[study].append((f"p{i}", [(h, fixed if i else [*fixed[:-1], "..."]) for h in person]))
    return wide, narrow


def write_narrow_and_wide(root: str, k: int = 6, seed: int = 0) -> tuple[str, str]:
    """(base dir, post dir) under ``root``: Wide-1B-Base and its post-trained Narrow-1B (kind
    Instruction-tuned), k samples per slot at T = 1; the base also has one rejected participant."""
    wide, narrow = narrow_and_wide_studies(seed, k)
    base = write_simulation(
        f"{root}/Wide-1B-Base",
        Model("Wide-1B-Base"),
        wide,
        samples=k,
        rejected=[("letters", "p-rejected", "no response marker")],
    )
    post = write_simulation(
        f"{root}/Narrow-1B", Model("Narrow-1B", kind="Instruction-tuned", base_hf_id="Wide-1B-Base"), narrow, samples=k
    )
    return base, post
