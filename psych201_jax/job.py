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

from psych201_jax import checkpoint, metadata, packing, records, results, scorer, spans


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
        "template": protocol.template, "persona": cfg.persona, "token_budget": protocol.token_budget,
        "max_chars": protocol.max_chars, "dtype": cfg.dtype,
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


def run(cfg) -> scorer.Progress:
    """Runs one scoring job described by ``cfg`` (see configs/score.py); returns its progress counters."""
    model_dir = resolve_model(cfg.model, cfg.cache_dir, cfg.dtype)
    model, spec = checkpoint.load_model(model_dir, dtype=cfg.dtype, attention_backend=cfg.attention)
    tok = spans.TokenizerInfo(os.path.join(model_dir, checkpoint.TOKENIZER))
    context = spec.max_position_embeddings
    budget = (cfg.max_tokens or context) if cfg.protocol == "robust" else None
    protocol = spans.Protocol(cfg.protocol, cfg.template, token_budget=budget)
    row_lengths = packing.choose_row_lengths(cfg.max_row_length or context, cfg.min_row_length)
    writer = results.ResultsWriter(cfg.out, build_manifest(cfg, model_dir, spec, tok, protocol), fresh=cfg.fresh)
    total = records.count_participants(cfg.data)
    logging.info("model %s (%s), %s participants, protocol %s/%s, persona %s, rows %s, %d already done",
                 model_dir, spec.model_type, total, cfg.protocol, cfg.template, cfg.persona, row_lengths,
                 len(writer.done))

    todo = (r for r in records.iter_records(cfg.data) if r.key not in writer.done)
    stream = spans.tokenize_records(todo, tok, protocol, persona_of=metadata.persona_selector(cfg.persona))
    progress = scorer.Progress(participants=len(writer.done))
    last_log = [0.0]

    def log_progress(p: scorer.Progress):
        now = time.perf_counter()
        if now - last_log[0] < cfg.log_every_s and p.participants < (total or math.inf):
            return
        last_log[0] = now
        rate = (p.participants - len(writer.done)) / max(now - p.started, 1e-9)
        eta = (total - p.participants) / rate if total and rate > 0 else math.nan
        logging.info("%d/%s participants, %.0f tokens/s, ETA %.0fs", p.participants, total or "?",
                     p.tokens_per_s, eta)

    pending = []
    for item in scorer.score_spans(stream, scorer.Scorer(model, vocab_chunk=cfg.vocab_chunk),
                                   row_lengths=row_lengths, tokens_per_batch=cfg.tokens_per_batch,
                                   chunk_tokens=cfg.chunk_tokens, progress=progress,
                                   on_chunk=lambda p: (writer.commit(pending), pending.clear(), log_progress(p))):
        pending.append(item)
    writer.commit(pending)
    return progress
