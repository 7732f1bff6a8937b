"""One simulation job: model + data + condition + sampling → a results directory (``psych201-simulate``).

The scoring job's path with the sampler in place of the head: the same model restore, span pipeline
(protocol, template, persona), resumable fingerprinted and locked results store, committed chunk by chunk.
Every response slot of every participant gets ``samples`` continuations of its teacher-forced history
(``sampling.sampler``); a participant's row holds, per slot in text order, the human response (its
labelled tokens and their text) and each sample's tokens, text, log-probability and stop reason.

A sample ends at the closing marker: at the marker's own token ids, or at any token whose text contains
``>>`` (BPE vocabularies merge it with what precedes or follows: ``'>>``, ``>>\\n``), or at EOS, or after
``max_new_tokens``. Its ``tokens`` exclude the token that closed it; its ``text`` is everything drawn, cut
before the first ``>>``. Random streams are per (seed, participant, slot, sample), so packing, the branch
capacity and resuming change no sample.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Hashable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from psych201_jax import console
from psych201_jax.conditions import OptionsMode
from psych201_jax.data import records
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.hashing import half_of
from psych201_jax.runs import job as job_lib
from psych201_jax.runs import store
from psych201_jax.runs.config import ConfigError, SimulateJob
from psych201_jax.runs.manifest import build_manifest, model_identity
from psych201_jax.sampling import sampler as sampler_lib
from psych201_jax.sampling import slots as slots_lib
from psych201_jax.scoring import packing
from psych201_jax.types import (
    GeneratedResponse,
    ParticipantSamples,
    ParticipantSpans,
    Rejected,
    SlotDraws,
    input_id,
)

MARKER = ">>"
STOP_RULE = 1  # version of the stop and text rules above (a change must not resume older samples)


@dataclasses.dataclass
class Progress:
    """How far a simulation got: participants done (resumed ones included), branches and tokens drawn."""

    participants: int = 0
    branches: int = 0
    generated: int = 0
    prefix_tokens: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def rates(self) -> str:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return f"{self.branches / seconds:,.1f} branches/s, {self.generated / seconds:,.0f} generated tokens/s"


def run(job: SimulateJob, *, fitted: tuple[float, float] | None = None) -> Progress:
    """Runs one simulation job; ``fitted``: the calibration run's two cross-fitted temperatures (needed,
    and only used, with ``temperature=calibrated``; ``psych201-simulate`` reads them from that run)."""
    job_lib.initialize_runtime(job.score)
    total = records.count_participants(job.score.data)
    return run_loaded(job_lib.load(job.score), job, total=total, fitted=fitted)


def run_loaded(
    loaded: job_lib.LoadedModel, job: SimulateJob, *, total: int | None, fitted: tuple[float, float] | None
) -> Progress:
    """Samples every participant of ``job`` with an already restored model (a sweep worker's)."""
    sim = job.simulation
    if sim.calibrated and fitted is None:
        raise ConfigError("config.temperature=calibrated: the calibration run's fitted temperatures were not given")
    if jax.process_count() > 1:
        raise ConfigError("psych201-simulate runs in one process (a mesh of its local devices); run one per host")
    tok, spec, score = loaded.tok, loaded.spec, job.score
    context = spec.max_position_embeddings
    pipeline = score.span_pipeline(context)
    pipeline.check_template(tok)
    study_options = job_lib.collect_study_options(pipeline, tok) if score.condition.options == OptionsMode.STUDY else {}
    marker_ids = marker_token_ids(tok)
    close = tuple(tok.hf.encode(MARKER, add_special_tokens=False))
    eos = tok.hf.eos_token_id
    config = sampler_lib.SamplingConfig(
        samples=sim.samples,
        max_new_tokens=sim.max_new_tokens,
        temperature=1.0 if sim.calibrated else float(sim.temperature),
        top_k=sim.top_k,
        top_p=sim.top_p,
        seed=score.seed,
        close_ids=close,
        stop_ids=tuple(sorted(marker_ids | ({eos} if isinstance(eos, int) else set()))),
        branch_capacity=job.branch_capacity,
    )
    score = score.replace(model_info=model_identity(score, loaded.model_dir))
    manifest = build_manifest(score, loaded.model_dir, spec, tok, pipeline.rules, total)
    manifest["determinants"][store.SIMULATE] = sim.as_dict() | {
        "seed": score.seed,
        "fitted_temperatures": list(fitted) if sim.calibrated and fitted else None,
        "stop_rule": STOP_RULE,
    }
    manifest["fingerprint"] = store.fingerprint(manifest["determinants"])
    manifest["config"] = job.replace(score=score).to_dict()
    row_lengths = packing.choose_row_lengths(
        score.max_row_length or max(context, score.tokens_per_batch), score.min_row_length
    )

    def temperature(key: Hashable) -> float:  # calibrated: the temperature fitted on the other half
        if fitted is None or not sim.calibrated:
            return float(sim.temperature)
        return fitted[1 - half_of(key, score.seed)]  # type: ignore[arg-type]

    with store.ResultsLock(job.out, fresh=score.fresh):
        writer = store.ResultsWriter(job.out, manifest, fresh=score.fresh)
        run_ = _Run(
            sampler_lib.SlotSampler(loaded.scorer.model(), config, mesh=loaded.scorer.mesh, rules=loaded.scorer.rules),
            tok,
            marker_ids,
            row_lengths,
            score.tokens_per_batch,
            study_options,
            temperature if sim.calibrated else None,
            Progress(participants=len(writer.done)),
        )
        progress = run_.progress
        logging.info(
            "model %s, %s participants, %d samples per slot at %s, %d already done; %s",
            manifest["model"]["dir"],
            total,
            sim.samples,
            f"the cross-fitted temperatures {fitted}" if sim.calibrated else f"T = {sim.temperature}",
            progress.participants,
            job.out,
        )
        todo = (r for r in pipeline.records() if input_id(r) not in writer.done)
        already = progress.participants
        line = console.ProgressLine(total, every_s=score.log_every_s)
        try:
            for chunk in _chunks(pipeline.spans(tok, todo), score.chunk_tokens, min(context, max(row_lengths))):
                writer.commit(run_.sample_chunk(chunk))
                progress.participants += len(chunk)
                seconds = max(time.perf_counter() - progress.started, 1e-9)
                rate = (progress.participants - already) / seconds
                eta = (total - progress.participants) / rate if total and rate > 0 else math.nan
                line.update(progress.participants, 0.0, eta, rates=progress.rates())
        finally:
            line.close()
        store.write_complete(job.out, manifest["fingerprint"], time.perf_counter() - progress.started)
    return progress


def marker_token_ids(tok: TokenizerInfo) -> set[int]:
    """Every vocabulary token whose text contains the closing marker ``>>``: drawing one closes the sample."""
    hf = tok.hf
    texts = hf.batch_decode([[i] for i in range(len(hf))], skip_special_tokens=False)
    return {i for i, text in enumerate(texts) if MARKER in text}


def _chunks(items: Iterator, chunk_tokens: int, limit: int) -> Iterator[list[ParticipantSpans | Rejected]]:
    """Participants in chunks of about ``chunk_tokens`` tokens; one longer than ``limit`` is rejected."""
    chunk: list[ParticipantSpans | Rejected] = []
    size = 0
    for item in items:
        if isinstance(item, ParticipantSpans) and len(item.token_ids) > limit:
            item = Rejected.of(item, f"{len(item.token_ids)} tokens exceed the limit of {limit} tokens (the context)")
        chunk.append(item)
        size += len(item.token_ids) if isinstance(item, ParticipantSpans) else 0
        if size >= chunk_tokens:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@dataclasses.dataclass
class _Run:
    """What every chunk of one simulation shares."""

    sampler: sampler_lib.SlotSampler
    tok: TokenizerInfo
    marker_ids: set[int]
    row_lengths: tuple[int, ...]
    tokens_per_batch: int
    study_options: Mapping[str, np.ndarray]
    temperature: Callable[[Hashable], float] | None  # per participant (calibrated), else the config's
    progress: Progress

    def sample_chunk(self, chunk: list[ParticipantSpans | Rejected]) -> list[ParticipantSamples | Rejected]:
        """The results of one chunk, in input order: a ``ParticipantSamples`` per participant with a response
        slot, a ``Rejected`` with its reason otherwise."""
        spans = [p for p in chunk if isinstance(p, ParticipantSpans)]
        slots_of = slots_lib.slots_by_key(spans)
        live = [p for p in spans if slots_of[p.key]]
        kwargs: dict = {}
        if self.study_options:
            kwargs["options_of"] = {p.key: self.study_options.get(p.study, ()) for p in live}
        if self.temperature is not None:
            kwargs["temperature_of"] = {p.key: self.temperature(p.key) for p in live}
        drawn: dict[tuple[Hashable, int], sampler_lib.SlotSamples] = {}
        self.progress.prefix_tokens += sum(len(p.token_ids) for p in live)
        batches = packing.pack(live, self.row_lengths, tokens_per_batch=self.tokens_per_batch, min_capacity=1)
        for batch in batches:
            if batch.overflow_pass:  # the same rows again (the scoring plan's overflow): nothing new to draw
                continue
            for s in self.sampler.sample_batch(batch, slots_of, **kwargs):
                drawn[(s.key, s.response)] = s
                self.progress.branches += len(s.samples)
                self.progress.generated += sum(len(x.generated) for x in s.samples)
        out: list[ParticipantSamples | Rejected] = []
        for item in chunk:
            if not isinstance(item, ParticipantSpans):
                out.append(item)
            elif not slots_of[item.key]:
                out.append(Rejected.of(item, "no response slot to sample (no human response after the first token)"))
            else:
                t = self.temperature(item.key) if self.temperature else self.sampler.config.temperature
                slots = tuple(self._draws(drawn[(item.key, s.response)], t) for s in slots_of[item.key])
                out.append(ParticipantSamples(spans=item, slots=slots))
        return out

    def _draws(self, s: sampler_lib.SlotSamples, temperature: float) -> SlotDraws:
        """One slot's stored form: the human response and each sample's tokens, text and stop reason."""
        decode = self.tok.hf.decode
        samples = []
        for x in s.samples:
            text = decode(x.generated.tolist(), skip_special_tokens=False)
            stop = x.stop
            if MARKER in text:  # closed by a token that holds the marker (with or without other text)
                text, stop = text[: text.index(MARKER)], sampler_lib.STOP_MARKER
            elif x.stop == sampler_lib.STOP_TOKEN:
                text = decode(x.tokens.tolist(), skip_special_tokens=False)
            samples.append(GeneratedResponse(tokens=x.tokens, text=text, logprob=x.logprob, stop=stop))
        human = decode(np.asarray(s.human).tolist(), skip_special_tokens=False)
        return SlotDraws(
            response=s.response, human=human, human_tokens=s.human, temperature=temperature, samples=tuple(samples)
        )
