"""One scoring job: model + data + condition → a results directory (``psych201-score``).

Resolves the model (converting an HF directory once into a cache), opens or resumes the results
directory, streams records → token spans → packed scoring, and commits results chunk by chunk.
"""

import collections
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging

from psych201_jax import console
from psych201_jax.conditions import Condition, ConditionError, OptionsMode, Protocol
from psych201_jax.data import metadata, records, spans
from psych201_jax.errors import UserError
from psych201_jax.model import checkpoint
from psych201_jax.model import spec as modelspec
from psych201_jax.parallel import distributed, sharding
from psych201_jax.runs import model_cache, store
from psych201_jax.scoring import options, packing, scorer, stream
from psych201_jax.scoring.options import StudyOptions
from psych201_jax.types import input_id


def build_manifest(
    cfg, model_dir: str, spec, tok: spans.TokenizerInfo, protocol: spans.Protocol, n_input: int | None
) -> dict:
    """The results manifest: the determinants (what fixes the numbers, fingerprinted: a changed input file,
    model or tokenizer never resumes stale results) and provenance; ``n_input`` input participants."""
    with open(os.path.join(model_dir, checkpoint.PROVENANCE)) as fh:
        provenance = json.load(fh)
    determinants = {
        "model": os.path.abspath(model_dir),
        "model_sources": provenance.get("sha256"),
        "tokenizer_sha256": tok.sha256,
        "data": cfg.data,
        "data_sources": records.source_fingerprints(cfg.data),
        "protocol": protocol.name,
        "template": protocol.template,
        "persona": cfg.persona,
        "persona_subset": cfg.persona_subset,
        "persona_seed": cfg.seed if cfg.persona == "shuffled" else None,
        "token_budget": protocol.token_budget,
        "max_chars": protocol.max_chars,
        "dtype": cfg.dtype,
        "options": cfg.options,
        "temperatures": list(condition_of(cfg).temperatures),
    }
    return {
        "fingerprint": store.fingerprint(determinants),
        "n_input": n_input,
        "determinants": determinants,
        "model": {"dir": os.path.abspath(model_dir), "spec": dataclasses.asdict(spec), "provenance": provenance},
        "tokenizer": {"dir": tok.path, "sha256": tok.sha256},
        "config": cfg.to_dict(),
        "code_version": store.code_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summarize(out_dir: str) -> str:
    """Short per-study summary of a results directory (response-pooled mean NLL); every study read is
    listed, also one with nothing scored (an empty file, all participants rejected or unscored)."""
    protocol = store.read_manifest(out_dir).get("determinants", {}).get("protocol", "reference")
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


class ConfigError(UserError, ValueError):
    """A configuration value is invalid."""


class ModelError(UserError, RuntimeError):
    """The model directory cannot be loaded."""


def condition_of(cfg) -> Condition:
    """The job's condition from its config; a ConfigError names a bad value and the allowed ones."""
    try:
        return Condition.from_mapping(cfg)
    except ConditionError as err:
        raise ConfigError(f"config.{err}") from None


def validate_config(cfg) -> Condition:
    """Fails fast, before any model is loaded, on a config value the job cannot use; returns the condition."""
    from psych201_jax.model import attention

    condition = condition_of(cfg)
    if cfg.attention not in attention.available_backends():
        raise ConfigError(f"config.attention={cfg.attention!r} is not one of {attention.available_backends()}")
    for field in ("tokens_per_batch", "chunk_tokens", "min_row_length"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {cfg[field]!r}")
    for field in ("max_tokens", "max_row_length", "persona_reserve", "vocab_chunk"):
        if not isinstance(cfg[field], int) or cfg[field] < 0:
            raise ConfigError(f"config.{field} must be 0 (automatic) or a positive integer, got {cfg[field]!r}")
    if not cfg.out:
        raise ConfigError("config.out (the results directory) is required")
    return condition


_COMPILE_SECONDS = [0.0]


def _count_compile_time(event: str, duration_secs: float, **_) -> None:
    if event.startswith("/jax/core/compile/") or event == "/jax/compilation_cache/cache_retrieval_time_sec":
        _COMPILE_SECONDS[0] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_count_compile_time)


def compile_seconds() -> float:
    """Seconds this process spent tracing, lowering and compiling (or loading cached) programs."""
    return _COMPILE_SECONDS[0]


def enable_compile_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` ("" leaves it off): a rerun, a resumed job or
    another condition of the same model loads its compiled programs instead of compiling them again."""
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    # The sub-second programs too: with a 0.5 s floor a warm-cache job still compiled its last layer and head
    # (0.3-0.4 s each) every time, 0.6 s of the body shape's 1.0 s; the eager ops' millisecond compiles stay out.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


@dataclasses.dataclass
class LoadedModel:
    """A restored model on its mesh, its tokenizer and a scorer whose forward every condition shares."""

    model_dir: str
    spec: modelspec.ModelSpec
    tok: spans.TokenizerInfo
    scorer: scorer.Scorer


def load_key(cfg) -> str:
    """Jobs with equal keys can use one ``load``: same model, dtype, attention backend, mesh and cache."""
    fields = ("model", "dtype", "attention", "cache_dir", "mesh")
    return json.dumps({k: cfg.to_dict()[k] for k in fields}, sort_keys=True, default=str)


def load(cfg) -> LoadedModel:
    """Resolves (converting once), restores and places the model of ``cfg`` on its mesh."""
    from psych201_jax.model import attention

    model_dir = model_cache.resolve_model(cfg.model, cfg.cache_dir, cfg.dtype)
    mesh, rules = _mesh_and_rules(cfg, model_dir)
    try:
        model, spec = checkpoint.load_model(
            model_dir, dtype=cfg.dtype, attention_backend=cfg.attention, mesh=mesh, rules=rules
        )
    except Exception as err:  # orbax/tensorstore errors on a damaged checkpoint are long and obscure
        raise ModelError(
            f"could not load the converted checkpoint {model_dir} ({type(err).__name__}: "
            f"{str(err)[:300]}); if it is a conversion cache, delete it to reconvert"
        ) from err
    logging.info("attention backend: %s", attention.resolve_backend(cfg.attention, mesh.size))
    if cfg.attention == "auto" and (why := attention.auto_fallback_reason(mesh.size)):
        logging.warning("the native CPU attention kernel is unavailable (%s); attention runs as 'xla', slower", why)
    snapshots = os.path.join(cfg.cache_dir, "tokenizers") if cfg.cache_dir else ""
    tok = spans.TokenizerInfo(os.path.join(model_dir, checkpoint.TOKENIZER), snapshot_dir=snapshots)
    return LoadedModel(model_dir, spec, tok, scorer.Scorer(model, vocab_chunk=cfg.vocab_chunk, mesh=mesh, rules=rules))


# Config fields that change only a job's head (options, temperatures) or where and how it reports: jobs
# equal in everything else feed the model the same tokens and share one forward pass.
_NOT_STREAM = ("options", "temperatures", "out", "fresh", "model_info", "log_every_s")


def stream_key(cfg) -> str:
    """Jobs with equal keys score the same token stream with the same model (see ``run_conditions``)."""
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in _NOT_STREAM}, sort_keys=True, default=str)


def share_groups(cfgs: list) -> list[list]:
    """``cfgs`` grouped by stream key for ``run_conditions``, in first-appearance order."""
    groups: dict[str, list] = {}
    for cfg in cfgs:
        groups.setdefault(stream_key(cfg), []).append(cfg)
    return list(groups.values())


def run(cfg) -> stream.Progress:
    """Runs one scoring job described by ``cfg`` (see psych201_jax/runs/config.py); returns its progress."""
    distributed.initialize_from_config(cfg.get("distributed", {}))  # mesh/distributed wiring: before JAX use
    enable_compile_cache(cfg.get("compile_cache", ""))
    validate_config(cfg)
    total = records.count_participants(cfg.data)  # fails early on missing or unreadable data
    return run_conditions(load(cfg), [cfg], total=total)


def run_conditions(loaded: LoadedModel, cfgs: list, *, total: int | None = None) -> stream.Progress:
    """Scores the jobs ``cfgs`` (one share group, see ``share_groups``) in one pass over the data: one
    tokenization and one forward pass per batch, then each job's own head (options, temperature grid) on
    it, each job's results written to its own results directory with its own manifest, fingerprint and
    resume state, exactly as if it ran alone (the same compiled forward and head programs).
    """
    if len({stream_key(c) for c in cfgs}) != 1:
        raise ValueError("run_conditions: the jobs do not share one token stream")
    conditions = [validate_config(c) for c in cfgs]
    cfg, condition = cfgs[0], conditions[0]
    total = records.count_participants(cfg.data) if total is None else total
    tok, spec = loaded.tok, loaded.spec
    if condition.template.value == "chat":
        tok.check_chat_template()  # a clear error before any work, not a silently different prompt
    context = spec.max_position_embeddings
    robust = condition.protocol == Protocol.ROBUST
    if robust and not cfg.max_tokens and cfg.persona_reserve >= context:
        raise ConfigError(
            f"config.persona_reserve={cfg.persona_reserve} leaves no robust token budget in a {context}-token context"
        )
    # One budget for every condition (so persona and no-persona runs score the same responses); the
    # reserve keeps BOS, chat header and persona prefix, which are outside the budget, inside the context.
    budget = (cfg.max_tokens or context - cfg.persona_reserve) if robust else None
    protocol = spans.Protocol(condition.protocol.value, condition.template.value, token_budget=budget)
    persona_of = metadata.persona_selector(
        condition.persona.value, subset_only=condition.persona_subset, seed=cfg.seed, records=_records(cfg)
    )
    with_options = any(c.options == OptionsMode.STUDY for c in conditions)
    study_options = _collect_options(cfg, tok, protocol, persona_of) if with_options else None
    heads = [
        loaded.scorer.with_head(
            options=study_options if c.options == OptionsMode.STUDY else None, temperatures=c.temperatures
        )
        for c in conditions
    ]
    # Rows are containers of whole participants and may be longer than the context: long rows pack
    # homogeneous studies (e.g. all ~9K-token transcripts) far better than context-length rows.
    row_lengths = packing.choose_row_lengths(
        cfg.max_row_length or max(context, cfg.tokens_per_batch), cfg.min_row_length
    )
    manifests = [build_manifest(c, loaded.model_dir, spec, tok, protocol, total) for c in cfgs]
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:  # one writer job per results directory, refused up front
            for c in cfgs:
                stack.enter_context(store.ResultsLock(c.out, fresh=c.fresh))
        return _score(
            cfgs,
            conditions,
            manifests=manifests,
            heads=heads,
            tok=tok,
            protocol=protocol,
            persona_of=persona_of,
            row_lengths=row_lengths,
            context=context,
            total=total,
        )


def _score(
    cfgs: list,
    conditions: list[Condition],
    *,
    manifests: list[dict],
    heads: list[scorer.Scorer],
    tok: spans.TokenizerInfo,
    protocol: spans.Protocol,
    persona_of,
    row_lengths: tuple[int, ...],
    context: int,
    total: int | None,
) -> stream.Progress:
    """Opens (or resumes) each job's results and scores what any of them lacks, committing chunk by chunk."""
    cfg, layout = cfgs[0], heads[0].layout
    writers = [_open_writer(c, m, layout) for c, m in zip(cfgs, manifests)]  # replicas commit nothing
    already = len(set.intersection(*(w.done for w in writers)))  # done in every job: not scored again
    logging.info(
        "model %s (%s), %s participants, protocol %s/%s, persona %s, %d already done; %s",
        manifests[0]["model"]["dir"],
        manifests[0]["model"]["spec"]["model_type"],
        total,
        protocol.name,
        protocol.template,
        cfg.persona,
        already,
        ", ".join(c.out for c in cfgs),
    )

    todo: Iterator = (r for r in _records(cfg) if any(input_id(r) not in w.done for w in writers))
    todo = distributed.take_share(todo, layout.share_index, layout.share_count)
    items = spans.tokenize_records(todo, tok, protocol, persona_of=persona_of)
    progress = stream.Progress(participants=already)
    line = console.ProgressLine(total, every_s=cfg.log_every_s)

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
            tokens_per_batch=cfg.tokens_per_batch,
            chunk_tokens=cfg.chunk_tokens,
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
        for c, m in zip(cfgs, manifests):
            store.write_complete(c.out, m["fingerprint"], time.perf_counter() - progress.started)
    return progress


def _records(cfg):
    """The job's input records; the reference protocol keeps imperfect markup, as its scripts score it."""
    robust = cfg.protocol == Protocol.ROBUST
    return records.iter_records(cfg.data, strict_markers=robust, max_line_bytes=cfg.max_line_bytes if robust else None)


def _collect_options(cfg, tok: spans.TokenizerInfo, protocol: spans.Protocol, persona_of) -> StudyOptions:
    """Options of every study from a pass over all of the data (not only what is left to score, so a
    resumed job, and every process, gets the same options), tokenized as for scoring."""
    start = time.perf_counter()
    items = spans.tokenize_records(_records(cfg), tok, protocol, persona_of=persona_of)
    study_options = options.collect_options(items)
    logging.info(
        "options pass (%.1fs): %s",
        time.perf_counter() - start,
        ", ".join(f"{study} {len(ids)}" for study, ids in study_options.items()),
    )
    return study_options


def _mesh_and_rules(cfg, model_dir: str) -> tuple[jax.sharding.Mesh, sharding.Rules]:
    """The device mesh of ``cfg.mesh`` and the logical-axis rules specialised to the model."""
    try:
        mesh = sharding.mesh_from_config(cfg.get("mesh", {}))
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


def _open_writer(cfg, manifest: dict, layout: sharding.RowLayout) -> store.ResultsWriter:
    """Process 0 opens (and, with fresh, clears) the results first; then the others, each writing its own
    chunks (``chunks/p<process>-c*``); all have read the same completed inputs when this returns."""
    me = jax.process_index()
    cls = store.ResultsWriter if layout.writer else _ReplicaWriter
    writer = cls(cfg.out, manifest, fresh=cfg.fresh, process_index=0) if me == 0 else None
    distributed.sync("results-opened")
    if writer is None:
        writer = cls(cfg.out, manifest, fresh=cfg.fresh, process_index=me)
    distributed.sync("results-ready")
    logging.info("%s", layout.describe())
    return writer
