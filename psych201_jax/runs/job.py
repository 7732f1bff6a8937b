"""One scoring job: model + data + condition → a results directory (``psych201-score``).

Resolves the model (converting an HF directory once into a cache), opens or resumes the results
directory, streams records → token spans → packed scoring, and commits results chunk by chunk.
"""

import collections
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging

from psych201_jax import console
from psych201_jax.conditions import OptionsMode
from psych201_jax.data import records
from psych201_jax.data.pipeline import SpanPipeline
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.errors import UserError
from psych201_jax.model import checkpoint
from psych201_jax.model import spec as modelspec
from psych201_jax.parallel import distributed, sharding
from psych201_jax.runs import compilation, model_cache, store
from psych201_jax.runs.config import ConfigError, ScoreJob
from psych201_jax.runs.manifest import build_manifest, model_identity
from psych201_jax.scoring import options, packing, scorer, stream
from psych201_jax.scoring.options import StudyOptions
from psych201_jax.types import input_id

__all__ = ["ConfigError", "LoadedModel", "ModelError", "load", "run", "run_conditions", "share_groups", "summarize"]


def summarize(out_dir: str) -> str:
    """Short per-study summary of a results directory (response-pooled mean NLL); every study read is
    listed, also one with nothing scored (an empty file, all participants rejected or unscored)."""
    protocol = store.manifest_protocol(out_dir)
    per_study: dict[str, list[float]] = collections.defaultdict(list)
    counts: collections.Counter[str] = collections.Counter()
    for row in store.iter_rows(out_dir):
        status, _ = store.outcome(row, protocol)
        counts[status] += 1
        values = per_study[row["study"]]
        if status == "scored":
            nll = store.nll_array(row)
            values.extend(nll[~np.isnan(nll)].tolist())
    lines = [f"{'study':<32} {'responses':>9} {'mean NLL':>9}"]
    means = []
    for study in sorted(per_study):
        values = per_study[study]
        if not values:
            lines.append(f"{study:<32} {0:>9} {'-':>9}")
            continue
        means.append(float(np.mean(values)))
        lines.append(f"{study:<32} {len(values):>9} {means[-1]:>9.3f}")
    score = float(np.mean(means)) if means else math.nan
    lines.append(
        f"participants: {counts['scored']} scored, {counts['unscored']} unscored, {counts['rejected']} rejected; "
        f"model score (mean over studies of the mean response NLL): {score:.4f}"
    )
    return "\n".join(lines)


class ModelError(UserError, RuntimeError):
    """The model directory cannot be loaded."""


@dataclasses.dataclass
class LoadedModel:
    """A restored model on its mesh, its tokenizer and a scorer whose forward every condition shares."""

    model_dir: str
    spec: modelspec.ModelSpec
    tok: TokenizerInfo
    scorer: scorer.Scorer


def load(job: ScoreJob) -> LoadedModel:
    """Resolves (converting once), restores and places the model of ``job`` on its mesh."""
    from psych201_jax.model import attention

    dtype = job.condition.dtype.value
    model_dir = model_cache.resolve_model(job.model, job.cache_dir, dtype)
    mesh, rules = _mesh_and_rules(job, model_dir)
    try:
        model, spec = checkpoint.load_model(
            model_dir, dtype=dtype, attention_backend=job.attention, mesh=mesh, rules=rules
        )
    except Exception as err:  # orbax/tensorstore errors on a damaged checkpoint are long and obscure
        raise ModelError(
            f"could not load the converted checkpoint {model_dir} ({type(err).__name__}: "
            f"{str(err)[:300]}); if it is a conversion cache, delete it to reconvert"
        ) from err
    logging.info("attention backend: %s", attention.resolve_backend(job.attention, mesh.size))
    if job.attention == "auto" and (why := attention.auto_fallback_reason(mesh.size)):
        logging.warning("the native CPU attention kernel is unavailable (%s); attention runs as 'xla', slower", why)
    snapshots = os.path.join(job.cache_dir, "tokenizers") if job.cache_dir else ""
    tok = TokenizerInfo(os.path.join(model_dir, checkpoint.TOKENIZER), snapshot_dir=snapshots)
    return LoadedModel(model_dir, spec, tok, scorer.Scorer(model, vocab_chunk=job.vocab_chunk, mesh=mesh, rules=rules))


def share_groups(jobs: list[ScoreJob]) -> list[list[ScoreJob]]:
    """``jobs`` grouped by ``stream_key`` for ``run_conditions``, in first-appearance order."""
    groups: dict[ScoreJob, list[ScoreJob]] = {}
    for job in jobs:
        groups.setdefault(job.stream_key(), []).append(job)
    return list(groups.values())


def run(job: ScoreJob) -> stream.Progress:
    """Runs one scoring job; returns its progress."""
    initialize_runtime(job)
    total = records.count_participants(job.data)  # fails early on missing or unreadable data
    return run_conditions(load(job), [job], total=total)


def initialize_runtime(job: ScoreJob) -> None:
    """Multi-process wiring and the compilation cache: before any other JAX use."""
    d = job.distributed
    distributed.initialize(
        d.coordinator,
        d.num_processes,
        d.process_id,
        mode=d.mode.value,
        local_device_ids=list(d.local_device_ids) or None,
    )
    compilation.enable_compile_cache(job.compile_cache)


def run_conditions(loaded: LoadedModel, jobs: list[ScoreJob], *, total: int | None = None) -> stream.Progress:
    """Scores ``jobs`` (one share group, see ``share_groups``) in one pass over the data: one tokenization
    and one forward pass per batch, then each job's own head (options, temperature grid) on it, each job's
    results written to its own results directory with its own manifest, fingerprint and resume state,
    exactly as if it ran alone (the same compiled forward and head programs).
    """
    if len({j.stream_key() for j in jobs}) != 1:
        raise ValueError("run_conditions: the jobs do not share one token stream")
    job = jobs[0]
    total = records.count_participants(job.data) if total is None else total
    tok, spec = loaded.tok, loaded.spec
    context = spec.max_position_embeddings
    if not isinstance(context, int) or context < 1:
        raise ModelError(
            f"{loaded.model_dir}: its model spec claims a context of {context!r} tokens; it must be positive"
        )
    pipeline = job.span_pipeline(context)
    pipeline.check_template(tok)  # a clear error before any work, not a silently different prompt
    with_options = any(j.condition.options == OptionsMode.STUDY for j in jobs)
    study_options = collect_study_options(pipeline, tok) if with_options else None
    heads = [
        loaded.scorer.with_head(
            options=study_options if j.condition.options == OptionsMode.STUDY else None,
            temperatures=j.condition.temperatures,
        )
        for j in jobs
    ]
    # Rows are containers of whole participants and may be longer than the context: long rows pack
    # homogeneous studies (e.g. all ~9K-token transcripts) far better than context-length rows.
    row_lengths = packing.choose_row_lengths(
        job.max_row_length or max(context, job.tokens_per_batch), job.min_row_length
    )
    jobs = [j.replace(model_info=model_identity(j, loaded.model_dir)) for j in jobs]
    manifests = [build_manifest(j, loaded.model_dir, spec, tok, pipeline.rules, total) for j in jobs]
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:  # one writer job per results directory, refused up front
            for j in jobs:
                stack.enter_context(store.ResultsLock(j.out, fresh=j.fresh))
        return _score(
            jobs,
            manifests=manifests,
            heads=heads,
            tok=tok,
            pipeline=pipeline,
            row_lengths=row_lengths,
            context=context,
            total=total,
        )


def _score(
    jobs: list[ScoreJob],
    *,
    manifests: list[dict],
    heads: list[scorer.Scorer],
    tok: TokenizerInfo,
    pipeline: SpanPipeline,
    row_lengths: tuple[int, ...],
    context: int,
    total: int | None,
) -> stream.Progress:
    """Opens (or resumes) each job's results and scores what any of them lacks, committing chunk by chunk."""
    job, layout = jobs[0], heads[0].layout
    writers = [_open_writer(j, m, layout) for j, m in zip(jobs, manifests)]  # replicas commit nothing
    already = len(set.intersection(*(w.done for w in writers)))  # done in every job: not scored again
    logging.info(
        "model %s (%s), %s participants, protocol %s/%s, persona %s, %d already done; %s",
        manifests[0]["model"]["dir"],
        manifests[0]["model"]["spec"]["model_type"],
        total,
        pipeline.rules.protocol.value,
        pipeline.rules.template.value,
        pipeline.persona.value,
        already,
        ", ".join(j.out for j in jobs),
    )

    todo: Iterator = (r for r in pipeline.records() if any(input_id(r) not in w.done for w in writers))
    todo = distributed.take_share(todo, layout.share_index, layout.share_count)
    items = pipeline.spans(tok, todo)
    progress = stream.Progress(participants=already)
    line = console.ProgressLine(total, every_s=job.log_every_s)

    def commit():
        for j, w in enumerate(writers):
            w.commit([results[j] for results in pending if input_id(results[j]) not in w.done])
        pending.clear()

    def on_chunk(p: stream.Progress):
        commit()
        rate = (p.participants - already) / max(time.perf_counter() - p.started, 1e-9)
        eta = (total - p.participants) / rate if total and rate > 0 else math.nan
        line.update(p.participants, p.tokens_per_s, eta)

    pending: list = []
    try:
        for results in stream.score_spans_heads(
            items,
            heads,
            row_lengths=row_lengths,
            tokens_per_batch=job.tokens_per_batch,
            chunk_tokens=job.chunk_tokens,
            max_tokens=context,
            progress=progress,
            on_chunk=on_chunk,
        ):
            pending.append(results)
        commit()
    finally:
        line.close()
    distributed.sync("results-committed")  # every process's parts are committed before anyone goes on
    if jax.process_index() == 0:
        for j, m in zip(jobs, manifests):
            store.write_complete(j.out, m["fingerprint"], time.perf_counter() - progress.started)
    return progress


def collect_study_options(pipeline: SpanPipeline, tok: TokenizerInfo) -> StudyOptions:
    """Options of every study from a pass over all of the data (not only what is left to score, so a
    resumed job, and every process, gets the same options), tokenized as for scoring."""
    start = time.perf_counter()
    study_options = options.collect_options(pipeline.spans(tok))
    logging.info(
        "options pass (%.1fs): %s",
        time.perf_counter() - start,
        ", ".join(f"{study} {len(ids)}" for study, ids in study_options.items()),
    )
    return study_options


def _mesh_and_rules(job: ScoreJob, model_dir: str) -> tuple[jax.sharding.Mesh, sharding.Rules]:
    """The device mesh of ``job.mesh`` and the logical-axis rules specialised to the model."""
    m = job.mesh
    try:
        mesh = sharding.mesh_for(m.mode.value, m.data, m.fsdp, m.tensor)
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from None
    spec = modelspec.ModelSpec.load(os.path.join(model_dir, checkpoint.SPEC))
    rules = sharding.rules_for(spec, mesh)
    logging.vlog(1, "mesh %s, rules %s", dict(mesh.shape), rules)
    return mesh, rules


class _ReplicaWriter(store.ResultsWriter):
    """A process whose rows another process also computes (a replica share) commits nothing."""

    def commit(self, items):
        return None


def _open_writer(job: ScoreJob, manifest: dict, layout: sharding.RowLayout) -> store.ResultsWriter:
    """Process 0 opens (and, with fresh, clears) the results first; then the others, each writing its own
    chunks (``chunks/p<process>-c*``); all have read the same completed inputs when this returns."""
    me = jax.process_index()
    cls = store.ResultsWriter if layout.writer else _ReplicaWriter
    writer = cls(job.out, manifest, fresh=job.fresh, process_index=0) if me == 0 else None
    distributed.sync("results-opened")
    if writer is None:
        writer = cls(job.out, manifest, fresh=job.fresh, process_index=me)
    distributed.sync("results-ready")
    logging.info("%s", layout.describe())
    return writer
