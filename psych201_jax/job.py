"""One scoring job: model + data + protocol/conditions → a results directory (used by launch.score).

Resolves the model (converting an HF directory once into a cache), opens or resumes the results
directory, streams records → token spans → packed scoring, and commits results chunk by chunk.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from psych201_jax import (checkpoint, distributed, metadata, modelspec, packing, records, results, scorer,
                          sharding, spans)


def _dir_key(hf_dir: str, dtype: str) -> str:
    """Cheap identity of an HF directory (file names, sizes, mtimes) for the conversion cache."""
    h = hashlib.sha256(dtype.encode())
    for name in sorted(os.listdir(hf_dir)):
        st = os.stat(os.path.join(hf_dir, name))
        h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def resolve_model(path: str, cache_dir: str, dtype: str) -> str:
    """A converted checkpoint directory for ``path`` (converting an HF directory once, atomically)."""
    if os.path.isfile(os.path.join(path, checkpoint.SPEC)):
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} is neither a converted checkpoint (model_spec.json) nor an HF "
                                f"checkpoint directory (config.json)")
    cache_dir = os.path.expanduser(cache_dir)
    target = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(path))}-{_dir_key(path, dtype)}")
    if os.path.isfile(os.path.join(target, checkpoint.PROVENANCE)):
        logging.info("using converted cache %s", target)
        return target
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logging.info("converting %s → %s (%s)", path, target, dtype)
    checkpoint.convert(path, tmp, dtype)
    os.replace(tmp, target)
    return target


def build_manifest(cfg, model_dir: str, spec, tok: spans.TokenizerInfo, protocol: spans.Protocol) -> dict:
    with open(os.path.join(model_dir, checkpoint.PROVENANCE)) as fh:
        provenance = json.load(fh)
    determinants = {
        "model": os.path.abspath(model_dir), "model_sources": provenance.get("sha256"),
        "tokenizer_sha256": tok.sha256, "data": cfg.data, "protocol": protocol.name,
        "template": protocol.template, "persona": cfg.persona, "persona_subset": cfg.persona_subset,
        "persona_seed": cfg.seed if cfg.persona == "shuffled" else None, "token_budget": protocol.token_budget,
        "max_chars": protocol.max_chars, "dtype": cfg.dtype, "options": cfg.options,
    }
    return {"fingerprint": results.fingerprint(determinants), "determinants": determinants,
            "model": {"dir": os.path.abspath(model_dir), "spec": dataclasses.asdict(spec),
                      "provenance": provenance},
            "tokenizer": {"dir": tok.path, "sha256": tok.sha256}, "config": cfg.to_dict(),
            "code_version": results.code_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def summarize(out_dir: str) -> str:
    """Short per-study summary of a results directory (response-pooled mean NLL)."""
    per_study = collections.defaultdict(list)
    counts = collections.Counter()
    for row in results.iter_rows(out_dir):
        counts[row["status"]] += 1
        if row["status"] == "scored":
            nll = results.nll_array(row)
            per_study[row["study"]].extend(nll[~np.isnan(nll)].tolist())
    lines = [f"{'study':<32} {'responses':>9} {'mean NLL':>9}"]
    means = []
    for study in sorted(per_study):
        values = per_study[study]
        mean = float(np.mean(values)) if values else math.nan
        means.append(mean)
        lines.append(f"{study:<32} {len(values):>9} {mean:>9.3f}")
    score = float(np.nanmean(means)) if means else math.nan
    lines.append(f"participants: {counts['scored']} scored, {counts['rejected']} rejected; "
                 f"model score (mean over studies of the mean response NLL): {score:.4f}")
    return "\n".join(lines)


class ConfigError(ValueError):
    """A configuration value is invalid."""


class ModelError(RuntimeError):
    """The model directory cannot be loaded."""


def validate_config(cfg) -> None:
    """Fails fast, before any model is loaded, on a config value the job cannot use."""
    from psych201_jax import attention

    choices = {"protocol": spans.PROTOCOLS, "template": spans.TEMPLATES, "persona": metadata.PERSONA_MODES,
               "dtype": ("float32", "bfloat16"), "attention": attention.available_backends(),
               "options": ("none", "study")}
    for field, allowed in choices.items():
        if cfg[field] not in allowed:
            raise ConfigError(f"config.{field}={cfg[field]!r} is not one of {tuple(allowed)}")
    for field in ("tokens_per_batch", "chunk_tokens", "vocab_chunk", "min_row_length"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {cfg[field]!r}")
    for field in ("max_tokens", "max_row_length", "persona_reserve"):
        if not isinstance(cfg[field], int) or cfg[field] < 0:
            raise ConfigError(f"config.{field} must be 0 (automatic) or a positive integer, got {cfg[field]!r}")
    if cfg.persona_subset and cfg.persona != "none":
        raise ConfigError("config.persona_subset restricts the no-persona run; use it with persona=none")
    if not cfg.out:
        raise ConfigError("config.out (the results directory) is required")


def run(cfg) -> scorer.Progress:
    """Runs one scoring job described by ``cfg`` (see configs/score.py); returns its progress counters."""
    distributed.initialize_from_config(cfg.get("distributed", {}))  # mesh/distributed wiring: before JAX use
    validate_config(cfg)
    total = records.count_participants(cfg.data)  # fails early on missing or unreadable data
    model_dir = resolve_model(cfg.model, cfg.cache_dir, cfg.dtype)
    mesh, rules = _mesh_and_rules(cfg, model_dir)  # (None, None): the single-device path
    try:
        model, spec = checkpoint.load_model(model_dir, dtype=cfg.dtype, attention_backend=cfg.attention,
                                            mesh=mesh, rules=rules)
    except Exception as err:  # orbax/tensorstore errors on a damaged checkpoint are long and obscure
        raise ModelError(f"could not load the converted checkpoint {model_dir} ({type(err).__name__}: "
                         f"{str(err)[:300]}); if it is a conversion cache, delete it to reconvert") from err
    tok = spans.TokenizerInfo(os.path.join(model_dir, checkpoint.TOKENIZER))
    context = spec.max_position_embeddings
    if cfg.persona_reserve >= context:
        raise ConfigError(f"config.persona_reserve={cfg.persona_reserve} leaves no budget in a {context}-token context")
    # One budget for every condition (so persona and no-persona runs score the same responses); the
    # reserve keeps BOS, chat header and persona prefix, which are outside the budget, inside the context.
    budget = (cfg.max_tokens or context - cfg.persona_reserve) if cfg.protocol == "robust" else None
    protocol = spans.Protocol(cfg.protocol, cfg.template, token_budget=budget)
    persona_of = metadata.persona_selector(cfg.persona, subset_only=cfg.persona_subset, seed=cfg.seed,
                                           records=_records(cfg))
    options = _collect_options(cfg, tok, protocol, persona_of) if cfg.options == "study" else None
    score_model = scorer.Scorer(model, vocab_chunk=cfg.vocab_chunk, mesh=mesh, rules=rules, options=options)
    # Rows are containers of whole participants and may be longer than the context: long rows pack
    # homogeneous studies (e.g. all ~9K-token transcripts) far better than context-length rows.
    row_lengths = packing.choose_row_lengths(cfg.max_row_length or max(context, cfg.tokens_per_batch),
                                             cfg.min_row_length)
    manifest = build_manifest(cfg, model_dir, spec, tok, protocol)
    writer = _open_writer(cfg, manifest, score_model.layout)  # one per process; replicas commit nothing
    already = len(writer.done)
    logging.info("model %s (%s), %s participants, protocol %s/%s, persona %s, rows %s, %d already done",
                 model_dir, spec.model_type, total, cfg.protocol, cfg.template, cfg.persona, row_lengths,
                 already)

    todo = (r for r in _records(cfg) if results.input_id(r) not in writer.done)
    todo = _my_share(todo, score_model.layout)  # this process's participants only
    stream = spans.tokenize_records(todo, tok, protocol, persona_of=persona_of)
    progress = scorer.Progress(participants=already)
    last_log = [0.0]

    def log_progress(p: scorer.Progress):
        now = time.perf_counter()
        if now - last_log[0] < cfg.log_every_s and p.participants < (total or math.inf):
            return
        last_log[0] = now
        rate = (p.participants - already) / max(now - p.started, 1e-9)
        eta = (total - p.participants) / rate if total and rate > 0 else math.nan
        logging.info("%d/%s participants, %.0f tokens/s, ETA %.0fs", p.participants, total or "?",
                     p.tokens_per_s, eta)

    pending = []
    for item in scorer.score_spans(stream, score_model,
                                   row_lengths=row_lengths, tokens_per_batch=cfg.tokens_per_batch,
                                   chunk_tokens=cfg.chunk_tokens, max_tokens=context, progress=progress,
                                   on_chunk=lambda p: (writer.commit(pending), pending.clear(), log_progress(p))):
        pending.append(item)
    writer.commit(pending)
    distributed.sync("results-committed")  # every process's parts are committed before anyone goes on
    if jax.process_index() == 0:
        results.write_complete(cfg.out, manifest["fingerprint"], time.perf_counter() - progress.started)
    return progress


def _records(cfg):
    """The job's input records; the reference protocol keeps imperfect markup, as its scripts score it."""
    return records.iter_records(cfg.data, strict_markers=cfg.protocol == "robust")


def _collect_options(cfg, tok: spans.TokenizerInfo, protocol: spans.Protocol, persona_of) -> dict[str, np.ndarray]:
    """Options of every study from a pass over all of the data (not only what is left to score, so a
    resumed job, and every process, gets the same options), tokenized as for scoring."""
    start = time.perf_counter()
    items = spans.tokenize_records(_records(cfg), tok, protocol, persona_of=persona_of)
    options = scorer.collect_options(items)
    logging.info("options pass (%.1fs): %s", time.perf_counter() - start,
                 ", ".join(f"{study} {len(ids)}" for study, ids in options.items()))
    return options


# --- mesh / distributed wiring (issue 5; psych201_jax/sharding.py, distributed.py) ---------------------------

def _mesh_and_rules(cfg, model_dir: str):
    """The device mesh of ``cfg.mesh`` and the logical-axis rules specialised to the model, or (None, None)."""
    mesh = sharding.mesh_from_config(cfg.get("mesh", {}))
    if mesh is None:
        return None, None
    spec = modelspec.ModelSpec.load(os.path.join(model_dir, checkpoint.SPEC))
    rules = sharding.rules_for(spec, mesh)
    logging.info("mesh %s, rules %s", dict(mesh.shape), rules)
    return mesh, rules


class _ReplicaWriter(results.ResultsWriter):
    """A process whose rows another process also computes (a replica share) commits nothing."""

    def commit(self, items):
        return None


def _open_writer(cfg, manifest: dict, layout) -> results.ResultsWriter:
    """Process 0 opens (and, with fresh, clears) the results first; then the others, each writing its own
    chunks (``chunks/p<process>-c*``); all have read the same completed inputs when this returns."""
    me = jax.process_index()
    cls = results.ResultsWriter if layout is None or layout.writer else _ReplicaWriter
    writer = cls(cfg.out, manifest, fresh=cfg.fresh, process_index=0) if me == 0 else None
    distributed.sync("results-opened")
    if writer is None:
        writer = cls(cfg.out, manifest, fresh=cfg.fresh, process_index=me)
    distributed.sync("results-ready")
    if layout is not None:
        logging.info("%s", layout.describe())
    return writer


def _my_share(items, layout):
    """Round-robin share of the input order (after resume filtering, identical on every process)."""
    if layout is None:
        return items
    return distributed.take_share(items, layout.share_index, layout.share_count)

