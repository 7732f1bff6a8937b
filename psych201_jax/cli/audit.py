r"""psych201-audit: audit the records → token-span stage of a scoring job, without the model's weights.

Reads the job's data through the same span pipeline ``psych201-score`` uses, under the same condition
(protocol, template, persona, persona subset, seed, token budget, line limit), and prints a per-study table:
participants, rejected, responses in the text, responses scored, lost to truncation, missed / runaway /
merged / straddle, tokens, tokens/s. Writes it as CSV and lists every rejected participant with its reason
in a second CSV beside it. The tokenizer and context length come from --config.model: a converted
checkpoint, an HF directory, or a bare tokenizer directory (then the robust protocol needs
--config.max_tokens).

example:
  psych201-audit --config.model=/ckpt/Qwen3-8B-Base --config.data=/data/psych201 \
      --config.protocol=robust --config.persona=matched --out=audit.csv
"""

import os
import time
from typing import Any

from absl import flags, logging

from psych201_jax import defaults
from psych201_jax.cli import common, score_config
from psych201_jax.data import audit
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.errors import UserError

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined
_OUT = flags.DEFINE_string("out", "audit.csv", "Where to write the per-study CSV (rejections go beside it).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 2000, "Log progress every N participants.")


def tokenizer_dir(model: str) -> str:
    """A converted model's ``tokenizer/``, else the directory itself (an HF or a tokenizer directory)."""
    sub = os.path.join(model, "tokenizer")
    return sub if os.path.isdir(sub) and not os.path.isfile(os.path.join(model, "tokenizer.json")) else model


def audit_job(job, *, log_every: int = 0) -> tuple[list[audit.StudyAudit], list, TokenizerInfo]:
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


def main(argv):
    del argv
    from psych201_jax.cli.score import build_job

    job = build_job(_CONFIG.value)
    out = _OUT.value
    rejected_path = os.path.splitext(out)[0] + "_rejected.csv"
    for path in (out, rejected_path):  # fail before the pass, not after it
        try:
            with open(path, "a"):
                pass
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror}") from None
    start = time.perf_counter()
    rows, rejected, tok = audit_job(job, log_every=_LOG_EVERY.value)
    c = job.condition
    print(
        f"protocol={c.protocol.value} template={c.template.value} persona={c.persona.value} "
        f"persona_subset={c.persona_subset} tokenizer={tok.path} (sha256 {tok.sha256[:12]})"
    )
    print(audit.format_table(rows))
    print(f"wall time {time.perf_counter() - start:.1f}s")
    audit.write_csv(rows, out)
    audit.write_rejected(rejected, rejected_path)
    print(f"wrote {out} and {rejected_path} ({len(rejected)} rejected)")


def config_help() -> str:
    from psych201_jax.runs import config

    return common.help_text(__doc__ or "", __name__, config.documented_keys())


def run() -> None:
    """Console-script entry point."""
    global _CONFIG
    _CONFIG = common.define_config(
        "config", score_config.__file__, "The scoring job's configuration whose span stage is audited."
    )
    common.run(main, help_=config_help)


if __name__ == "__main__":
    run()
