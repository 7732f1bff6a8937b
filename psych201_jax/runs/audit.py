"""The audit of a scoring job's span stage: what ``psych201-audit`` prints, read through the job's own
span pipeline (so it counts exactly what the job of that condition scores), without the model's weights."""

import os
import time

from absl import logging

from psych201_jax import defaults
from psych201_jax.data import audit
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.errors import UserError
from psych201_jax.runs.config import ScoreJob

__all__ = ["audit_job", "tokenizer_dir"]


def tokenizer_dir(model: str) -> str:
    """A converted model's ``tokenizer/``, else the directory itself (an HF or a tokenizer directory)."""
    sub = os.path.join(model, "tokenizer")
    return sub if os.path.isdir(sub) and not os.path.isfile(os.path.join(model, "tokenizer.json")) else model


def audit_job(job: ScoreJob, *, log_every: int = 0) -> tuple[list[audit.StudyAudit], list, TokenizerInfo]:
    """The per-study audits and the rejections of ``job``'s span pipeline (what its scoring job reads)."""
    tok_dir = tokenizer_dir(job.model)
    if not os.path.isdir(tok_dir):
        raise UserError(f"config.model={job.model}: no such directory (a model, HF or tokenizer directory)")
    tok = TokenizerInfo(tok_dir)
    context = defaults.context_length(job.model)
    context = defaults.context_length(tok_dir) if context is None else context
    if context is not None and context < 1:
        raise UserError(
            f"config.model={job.model}: its config claims a context of {context} tokens; it must be positive"
        )
    pipeline = job.span_pipeline(context)
    logging.info("token budget: %s (model context %s)", pipeline.rules.token_budget, context)
    audits: dict[str, audit.StudyAudit] = {}
    rejected: list = []
    start, count = time.perf_counter(), 0

    def progress(_):
        nonlocal count
        count += 1
        if log_every and count % log_every == 0:
            tokens = sum(a.tokens for a in audits.values())
            logging.info(
                "%d participants, %d tokens, %.0f tokens/s", count, tokens, tokens / (time.perf_counter() - start)
            )

    for _ in audit.timed(pipeline.spans(tok), audits, rejected, progress):
        pass
    return [audits[s] for s in sorted(audits)], rejected, tok
