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

from absl import flags

from psych201_jax.cli import common, score_config
from psych201_jax.data import audit as audit_table
from psych201_jax.errors import UserError
from psych201_jax.runs import audit

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined
_OUT = flags.DEFINE_string("out", "audit.csv", "Where to write the per-study CSV (rejections go beside it).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 2000, "Log progress every N participants.")


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
    rows, rejected, tok = audit.audit_job(job, log_every=_LOG_EVERY.value)
    c = job.condition
    print(
        f"protocol={c.protocol.value} template={c.template.value} persona={c.persona.value} "
        f"persona_subset={c.persona_subset} tokenizer={tok.path} (sha256 {tok.sha256[:12]})"
    )
    print(audit_table.format_table(rows))
    print(f"wall time {time.perf_counter() - start:.1f}s")
    audit_table.write_csv(rows, out)
    audit_table.write_rejected(rejected, rejected_path)
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
